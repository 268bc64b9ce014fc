//! Takeover on `memory://`: how long after a worker leaves its group until every partition
//! it held is processed by the worker that stays.
//!
//! Worker A starts alone on an 8-partition topic of orders, counting per account in a table
//! (store on disk, as in production); worker B joins and takes half the partitions, A
//! suspending their shards; orders keep flowing at a steady rate into every partition. Then B
//! is stopped: it stops fetching, commits and leaves. Measured: from B leaving the group (it
//! is no longer a member) to A having processed an event of each partition B held — which
//! includes the group handing them over, A reopening each shard (its suspended copy is stale:
//! B wrote to the changelog meanwhile) and replaying the changelog tail B wrote.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faust::{App, MemoryTransport, Settings, TopicConfig, TopicPartition};
use faust_transport::CoreTransport;

use crate::w2::{Order, order};

const PARTITIONS: u32 = 8;
const GROUP: &str = "takeover";

/// What a takeover measured.
#[derive(Debug, Clone, Copy)]
pub struct Takeover {
    /// From the leaving worker no longer being a member to the last of its partitions
    /// processed by the other worker, in milliseconds.
    pub takeover_ms: f64,
    /// From the stop request to the same moment (includes the leaving worker's last commit).
    pub stop_to_processed_ms: f64,
    /// Partitions that moved.
    pub moved: usize,
    /// Changelog records the staying worker replayed to take them over (the tail).
    pub replayed: u64,
}

/// When each worker first processed an event of each partition after a mark (ns since
/// `base`), u64::MAX until then.
struct Seen {
    base: Instant,
    mark_ns: AtomicU64,
    first: Vec<AtomicU64>,
}

impl Seen {
    fn new(base: Instant) -> Seen {
        Seen {
            base,
            mark_ns: AtomicU64::new(u64::MAX),
            first: (0..PARTITIONS).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

fn worker(transport: &MemoryTransport, dir: &Path, name: &str, seen: Arc<Seen>) -> App {
    let mut settings = Settings::new(GROUP);
    settings.broker = "memory://".into();
    settings.cores = Some(1);
    settings.datadir = dir.join(name);
    settings.topic_partitions = PARTITIONS;
    settings.commit_interval = Duration::from_millis(500);
    let app = App::new(settings).with_memory_transport(transport.clone());
    let orders = app.topic::<String, Order>("orders");
    let counts = app.table::<String, u64>("counts").with_default(|| 0);
    app.agent("count", &orders, move |mut stream| {
        let (counts, seen) = (counts.clone(), seen.clone());
        async move {
            while let Some(event) = stream.next_event().await {
                counts.update(&event.value.account_id, |c| *c += 1)?;
                let now = seen.now_ns();
                if now > seen.mark_ns.load(Ordering::Relaxed) {
                    seen.first[event.tp.partition as usize].fetch_min(now, Ordering::Relaxed);
                }
            }
            Ok(())
        }
    });
    app
}

fn produce(transport: &MemoryTransport, from: u64, n: u64) {
    let mut batches: Vec<faust::storage::BatchBuilder> = (0..PARTITIONS).map(|_| Default::default()).collect();
    for i in from..from + n {
        let o = order(i, 10_000);
        let value = serde_json::to_vec(&o).unwrap_or_default();
        batches[(i % u64::from(PARTITIONS)) as usize].push(0, Some(o.account_id.as_bytes()), Some(&value), &[]);
    }
    for (p, batch) in batches.into_iter().enumerate() {
        let tp = TopicPartition::new("orders", p as u32);
        let _ = futures_lite::future::block_on(transport.produce(&tp, batch));
    }
}

fn wait(what: &str, within: Duration, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "takeover benchmark: {what} took over {within:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs the takeover once in `dir`, with `preload` orders counted before B joins.
pub fn run(dir: &Path, preload: u64) -> Takeover {
    let transport = MemoryTransport::new();
    transport.create_topic_now("orders", &TopicConfig::new(PARTITIONS)).expect("orders topic");
    produce(&transport, 0, preload);
    let base = Instant::now();
    let seen_a = Arc::new(Seen::new(base));
    let a = worker(&transport, dir, "a", seen_a.clone());
    let a_thread = {
        let a = a.clone();
        std::thread::spawn(move || a.run())
    };
    let committed_all = |transport: &MemoryTransport| {
        let tps: Vec<TopicPartition> = (0..PARTITIONS).map(|p| TopicPartition::new("orders", p)).collect();
        let committed = futures_lite::future::block_on(transport.committed(GROUP, &tps)).unwrap_or_default();
        tps.iter().zip(committed).all(|(tp, c)| c == Some(transport.high_watermark(tp).unwrap_or(0)))
    };
    wait("the first worker counting the preload", Duration::from_secs(120), || committed_all(&transport));
    // Steady traffic from here on: 100 orders per partition every 2 ms (400 k orders/s max).
    let flowing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (transport, flowing) = (transport.clone(), flowing.clone());
        std::thread::spawn(move || {
            let mut next = preload;
            while flowing.load(Ordering::Relaxed) {
                produce(&transport, next, 800);
                next += 800;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let b = worker(&transport, dir, "b", Arc::new(Seen::new(base)));
    let b_thread = {
        let b = b.clone();
        std::thread::spawn(move || b.run())
    };
    wait("the second worker joining", Duration::from_secs(60), || {
        transport.group_assignment(GROUP).len() == 2 && transport.pending_revokes(GROUP) == 0
    });
    wait("the second worker starting", Duration::from_secs(60), || b.stats().partitions_assigned > 0);
    // B is the member that joined last.
    let moved: Vec<u32> = transport
        .group_assignment(GROUP)
        .into_iter()
        .max_by_key(|(member, _)| member_number(member))
        .map(|(_, tps)| tps)
        .unwrap_or_default()
        .into_iter()
        .filter(|tp| &*tp.topic == "orders")
        .map(|tp| tp.partition)
        .collect();
    // Let B process for a while, so the changelog moves on under A's suspended shards.
    std::thread::sleep(Duration::from_millis(1500));
    let replayed_before = a.stats().changelog_records_replayed;
    seen_a.mark_ns.store(seen_a.now_ns(), Ordering::Relaxed);
    let stop_ns = seen_a.now_ns();
    b.stop_signal().stop();
    let left = Arc::new(AtomicU64::new(u64::MAX));
    {
        let (transport, left, seen) = (transport.clone(), left.clone(), seen_a.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if transport.group_assignment(GROUP).len() == 1 {
                    left.store(seen.now_ns(), Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
    }
    wait("the takeover", Duration::from_secs(60), || {
        moved.iter().all(|&p| seen_a.first[p as usize].load(Ordering::Relaxed) != u64::MAX)
    });
    let processed_ns = moved.iter().map(|&p| seen_a.first[p as usize].load(Ordering::Relaxed)).max().unwrap_or(stop_ns);
    wait("the leave to be seen", Duration::from_secs(10), || left.load(Ordering::Relaxed) != u64::MAX);
    let left_ns = left.load(Ordering::Relaxed);
    flowing.store(false, Ordering::Relaxed);
    let _ = producer.join();
    let _ = b_thread.join();
    a.stop_signal().stop();
    let _ = a_thread.join();
    Takeover {
        takeover_ms: processed_ns.saturating_sub(left_ns) as f64 / 1e6,
        stop_to_processed_ms: processed_ns.saturating_sub(stop_ns) as f64 / 1e6,
        moved: moved.len(),
        replayed: a.stats().changelog_records_replayed - replayed_before,
    }
}

fn member_number(member: &str) -> u64 {
    member.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}
