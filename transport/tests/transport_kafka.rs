//! The Kafka transport against a real broker, with rskafka as the independent client.
//!
//! These tests need a broker: `scripts/test` starts one (tansu, see `scripts/broker`) and
//! exports `FAUST_TEST_BROKER=127.0.0.1:PORT` (and `FAUST_TANSU_BIN` for the restart test).
//! Without it they print a notice and pass. Each test makes its own uniquely named topics.
//! Our client runs on a glommio executor thread; rskafka on a tokio runtime on the test
//! thread.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use faust_transport::Compression as OurCompression;
use faust_transport::{
    AssignmentEvent, BatchBuilder, CoreTransport, Error, JoinRequest, KafkaCore, KafkaOptions, KafkaTransport,
    Membership, OffsetSpec, Record, TopicConfig, TopicPartition, Transport,
};
use glommio::{LocalExecutorBuilder, Placement};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};

fn broker() -> Option<String> {
    match std::env::var("FAUST_TEST_BROKER") {
        Ok(b) if !b.is_empty() => Some(b),
        _ => {
            eprintln!("skipping: FAUST_TEST_BROKER not set (scripts/test starts a broker)");
            None
        }
    }
}

macro_rules! require_broker {
    () => {
        match broker() {
            Some(b) => b,
            None => return,
        }
    };
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{name}-{}-{}-{}", std::process::id(), nanos % 1_000_000_000, N.fetch_add(1, Ordering::Relaxed))
}

fn transport(broker: &str) -> KafkaTransport {
    let options = KafkaOptions { request_timeout: Duration::from_secs(10), ..KafkaOptions::default() };
    KafkaTransport::open(&format!("kafka://{broker}"), options).expect("open")
}

/// Runs `f` on a fresh glommio executor thread with a core handle on `t`.
fn on_glommio<T, F, Fut>(t: &KafkaTransport, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(KafkaCore) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let t = t.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("kafka-test")
        .spawn(move || async move {
            let core = t.attach_core(0, 1).await.expect("attach");
            f(core).await
        })
        .expect("executor")
        .join()
        .expect("join")
}

fn tokio<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

async fn rs_client(broker: &str) -> Client {
    ClientBuilder::new(vec![broker.to_string()]).build().await.expect("rskafka client")
}

async fn rs_partition(client: &Client, topic: &str, partition: i32) -> PartitionClient {
    client.partition_client(topic.to_string(), partition, UnknownTopicHandling::Retry).await.expect("partition client")
}

/// A record as both clients can express it: unique header names, no null header values.
#[derive(Debug, Clone, PartialEq)]
struct Plain {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: BTreeMap<String, Vec<u8>>,
    timestamp: i64,
}

impl Plain {
    fn sample(i: usize) -> Plain {
        let mut headers = BTreeMap::new();
        if i.is_multiple_of(3) {
            headers.insert("trace".to_string(), format!("t{i}").into_bytes());
            headers.insert("empty".to_string(), Vec::new());
        }
        Plain {
            key: (!i.is_multiple_of(5)).then(|| format!("key-{i}").into_bytes()),
            value: match i % 7 {
                0 => Some(Vec::new()),
                1 => None,
                _ => Some(format!("value-{i}-{}", "x".repeat(i % 50)).into_bytes()),
            },
            headers,
            timestamp: 1_700_000_000_000 + (i as i64 * 37) % 10_000 - 5_000,
        }
    }

    fn from_record(r: &Record) -> Plain {
        Plain {
            key: r.key.as_ref().map(|k| k.to_vec()),
            value: r.value.as_ref().map(|v| v.to_vec()),
            headers: r
                .headers()
                .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.unwrap_or_default().to_vec()))
                .collect(),
            timestamp: r.timestamp,
        }
    }

    fn to_rskafka(&self) -> rskafka::record::Record {
        rskafka::record::Record {
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self.headers.clone(),
            timestamp: Utc.timestamp_millis_opt(self.timestamp).single().expect("timestamp"),
        }
    }

    fn from_rskafka(r: &rskafka::record::Record) -> Plain {
        Plain {
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp: r.timestamp.timestamp_millis(),
        }
    }

    fn push(&self, batch: &mut BatchBuilder) {
        let headers: Vec<(&[u8], Option<&[u8]>)> =
            self.headers.iter().map(|(n, v)| (n.as_bytes(), Some(v.as_slice()))).collect();
        batch.push(self.timestamp, self.key.as_deref(), self.value.as_deref(), &headers);
    }
}

/// Fetches `tp` from `from` with our client until `n` records came (bounded).
async fn fetch_n(core: &KafkaCore, tp: &TopicPartition, from: u64, n: usize, max_bytes: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let mut offset = from;
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} records of {tp} within 60 s", out.len());
        let f = core.fetch(tp, offset, max_bytes, Duration::from_millis(200)).await.expect("fetch");
        assert!(f.records.iter().all(|r| r.offset >= offset), "records below the requested offset");
        offset = f.next_offset;
        out.extend(f.records);
    }
    out
}

/// Fetches `n` records of `topic/partition` with rskafka (bounded).
async fn rs_fetch_n(pc: &PartitionClient, n: usize) -> Vec<(i64, Plain)> {
    let mut out = Vec::new();
    let mut offset = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(Instant::now() < deadline, "rskafka got only {} of {n} records within 60 s", out.len());
        let (records, _hw) = pc.fetch_records(offset, 1..4_000_000, 200).await.expect("rskafka fetch");
        for r in records {
            if r.offset >= offset {
                offset = r.offset + 1;
                out.push((r.offset, Plain::from_rskafka(&r.record)));
            }
        }
    }
    out
}

#[test]
fn rskafka_produces_and_we_consume() {
    let broker = require_broker!();
    let topic = unique("rs-to-us");
    let want: Vec<Plain> = (0..2_000).map(Plain::sample).collect();
    let (b, t, w) = (broker.clone(), topic.clone(), want.clone());
    tokio(async move {
        let client = rs_client(&b).await;
        client.controller_client().expect("controller").create_topic(&t, 2, 1, 5_000).await.expect("create");
        let pc = rs_partition(&client, &t, 1).await;
        for chunk in w.chunks(300) {
            pc.produce(chunk.iter().map(Plain::to_rskafka).collect(), Compression::NoCompression)
                .await
                .expect("produce");
        }
    });
    let got = on_glommio(&transport(&broker), move |core| async move {
        let meta = core.topic_metadata(&topic).await.expect("metadata").expect("exists");
        assert_eq!(meta.config.partitions, 2);
        fetch_n(&core, &TopicPartition::new(topic.as_str(), 1), 0, 2_000, 64 << 10).await
    });
    assert_eq!(got.len(), want.len());
    for (i, (r, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(&Plain::from_record(r), w, "record {i}");
    }
}

#[test]
fn we_consume_what_rskafka_compressed() {
    let broker = require_broker!();
    let topic = unique("compressed");
    let want: Vec<Plain> = (0..400).map(Plain::sample).collect();
    let codecs = [Compression::Gzip, Compression::Lz4, Compression::Snappy, Compression::Zstd];
    let (b, t, w) = (broker.clone(), topic.clone(), want.clone());
    tokio(async move {
        let client = rs_client(&b).await;
        client.controller_client().expect("controller").create_topic(&t, 1, 1, 5_000).await.expect("create");
        let pc = rs_partition(&client, &t, 0).await;
        for (chunk, codec) in w.chunks(100).zip(codecs) {
            pc.produce(chunk.iter().map(Plain::to_rskafka).collect(), codec).await.expect("produce");
        }
    });
    let got = on_glommio(&transport(&broker), move |core| async move {
        fetch_n(&core, &TopicPartition::new(topic.as_str(), 0), 0, 400, 1 << 20).await
    });
    assert_eq!(got.len(), want.len());
    for (i, (r, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(&Plain::from_record(r), w, "record {i}");
    }
}

#[test]
fn rskafka_consumes_what_we_compressed() {
    let broker = require_broker!();
    let topic = unique("we-compress");
    let want: Vec<Plain> = (0..400).map(Plain::sample).collect();
    let codecs = [OurCompression::Gzip, OurCompression::Snappy, OurCompression::Lz4, OurCompression::Zstd];
    for (i, (chunk, codec)) in want.chunks(100).zip(codecs).enumerate() {
        let options = KafkaOptions { compression: codec, ..KafkaOptions::default() };
        let t = KafkaTransport::open(&format!("kafka://{broker}"), options).expect("open");
        let (topic, chunk) = (topic.clone(), chunk.to_vec());
        on_glommio(&t, move |core| async move {
            if i == 0 {
                core.create_topic(&topic, &TopicConfig::new(1)).await.expect("create");
            }
            let mut batch = BatchBuilder::new();
            chunk.iter().for_each(|p| p.push(&mut batch));
            core.produce(&TopicPartition::new(topic.as_str(), 0), batch).await.expect("produce");
        });
    }
    let t = topic.clone();
    let got = tokio(async move {
        let client = rs_client(&broker).await;
        rs_fetch_n(&rs_partition(&client, &t, 0).await, 400).await
    });
    for (i, ((offset, r), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(*offset, i as i64);
        assert_eq!(r, w, "record {i}");
    }
}

#[test]
fn we_produce_and_rskafka_consumes() {
    let broker = require_broker!();
    let topic = unique("us-to-rs");
    let want: Vec<Plain> = (0..2_000).map(Plain::sample).collect();
    let (t, w) = (topic.clone(), want.clone());
    let produced = on_glommio(&transport(&broker), move |core| async move {
        core.create_topic(&t, &TopicConfig::new(3)).await.expect("create");
        let tp = TopicPartition::new(t.as_str(), 2);
        let mut out = Vec::new();
        for chunk in w.chunks(500) {
            let mut batch = BatchBuilder::new();
            chunk.iter().for_each(|p| p.push(&mut batch));
            out.push(core.produce(&tp, batch).await.expect("produce"));
        }
        out
    });
    let ranges: Vec<_> = produced.iter().map(|p| (p.partition, p.base_offset, p.last_offset)).collect();
    assert_eq!(ranges, vec![(2, 0, 499), (2, 500, 999), (2, 1000, 1499), (2, 1500, 1999)]);
    let got = tokio(async move {
        let client = rs_client(&broker).await;
        rs_fetch_n(&rs_partition(&client, &topic, 2).await, 2_000).await
    });
    assert_eq!(got.len(), want.len());
    for (i, ((offset, r), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(*offset, i as i64);
        assert_eq!(r, w, "record {i}");
    }
}

#[test]
fn headers_null_keys_and_empty_values_round_trip_through_us() {
    let broker = require_broker!();
    let topic = unique("headers");
    on_glommio(&transport(&broker), move |core| async move {
        core.create_topic(&topic, &TopicConfig::new(1)).await.expect("create");
        let tp = TopicPartition::new(topic.as_str(), 0);
        let headers: [(&[u8], Option<&[u8]>); 4] =
            [(b"dup", Some(b"1")), (b"null", None), (b"dup", Some(b"2")), (b"empty", Some(b""))];
        let mut batch = BatchBuilder::new();
        batch.push(5, None, None, &headers);
        batch.push(-1, Some(b""), Some(b""), &[]);
        batch.push(i64::MAX / 2, Some(b"k"), Some(b"v"), &headers[..1]);
        core.produce(&tp, batch).await.expect("produce");
        let got = fetch_n(&core, &tp, 0, 3, 1 << 20).await;
        assert_eq!(got[0].headers().collect::<Vec<_>>(), headers.to_vec());
        assert_eq!((got[0].key.as_ref(), got[0].value.as_ref(), got[0].timestamp), (None, None, 5));
        assert_eq!(got[1].key.as_deref(), Some(&b""[..]));
        assert_eq!(got[1].value.as_deref(), Some(&b""[..]));
        assert_eq!(got[1].timestamp, -1);
        assert_eq!(got[2].timestamp, i64::MAX / 2);
        // From the middle of a batch: only the records at or after the offset.
        let f = core.fetch(&tp, 1, 1 << 20, Duration::from_millis(10)).await.expect("fetch");
        assert_eq!(f.records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((f.next_offset, f.high_watermark), (3, 3));
        // At the high-water mark: nothing, after at most max_wait.
        let start = Instant::now();
        let f = core.fetch(&tp, 3, 1 << 20, Duration::from_millis(300)).await.expect("fetch");
        assert!(f.records.is_empty() && f.next_offset == 3);
        assert!(start.elapsed() < Duration::from_secs(5));
        // Past it: a typed error with the partition's range.
        match core.fetch(&tp, 10, 1 << 20, Duration::from_millis(10)).await {
            Err(Error::OffsetOutOfRange { requested: 10, earliest: 0, high_watermark: 3, .. }) => {}
            other => panic!("expected OffsetOutOfRange, got {other:?}"),
        }
    });
}

#[test]
fn a_long_poll_on_one_partition_delays_nothing_else() {
    let broker = require_broker!();
    let topic = unique("long-poll");
    on_glommio(&transport(&broker), move |core| async move {
        let core = std::rc::Rc::new(core);
        core.create_topic(&topic, &TopicConfig::new(2)).await.expect("create");
        let (idle, busy) = (TopicPartition::new(topic.as_str(), 0), TopicPartition::new(topic.as_str(), 1));
        let poll = glommio::spawn_local({
            let core = core.clone();
            async move {
                let start = Instant::now();
                let f = core.fetch(&idle, 0, 1 << 20, Duration::from_secs(4)).await.expect("long poll");
                (f.records.len(), start.elapsed())
            }
        });
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        let mut batch = BatchBuilder::new();
        batch.push(1, None, Some(b"v"), &[]);
        core.produce(&busy, batch).await.expect("produce");
        let got = fetch_n(&core, &busy, 0, 1, 1 << 20).await;
        core.commit(&unique("g"), None, &[(busy.clone(), 1)]).await.expect("commit");
        let took = start.elapsed();
        assert_eq!(got.len(), 1);
        assert!(took < Duration::from_secs(2), "produce, fetch and commit took {took:?} behind a long poll");
        let (n, waited) = poll.await;
        assert_eq!(n, 0);
        assert!(waited >= Duration::from_secs(3), "the long poll returned after {waited:?}");
    });
}

#[test]
fn produces_made_in_order_land_in_order_from_a_fresh_core() {
    let broker = require_broker!();
    let topic = unique("order");
    let t = topic.clone();
    on_glommio(&transport(&broker), move |core| async move {
        core.create_topic(&t, &TopicConfig::new(1)).await.expect("create");
    });
    // A new core: no connection yet, so the produces all wait for the first one to open.
    on_glommio(&transport(&broker), move |core| async move {
        let core = std::rc::Rc::new(core);
        let tp = TopicPartition::new(topic.as_str(), 0);
        let tasks: Vec<_> = (0..30u8)
            .map(|i| {
                let (core, tp) = (core.clone(), tp.clone());
                glommio::spawn_local(async move {
                    let mut batch = BatchBuilder::new();
                    batch.push(1, None, Some(&[i]), &[]);
                    core.produce(&tp, batch).await.expect("produce").base_offset
                })
            })
            .collect();
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.push(t.await);
        }
        assert_eq!(offsets, (0..30).collect::<Vec<u64>>());
        assert_eq!(core.stats().connections_opened, 1, "one connection for all of them");
        assert_eq!(core.stats().produce_requests, 30);
        let got = fetch_n(&core, &tp, 0, 30, 1 << 20).await;
        let values: Vec<u8> = got.iter().map(|r| r.value.as_deref().map_or(255, |v| v[0])).collect();
        assert_eq!(values, (0..30).collect::<Vec<u8>>());
    });
}

#[test]
fn lingering_produces_share_requests_and_keep_partition_order() {
    let broker = require_broker!();
    let topic = unique("linger");
    let options = KafkaOptions { linger: Duration::from_millis(100), ..KafkaOptions::default() };
    let t = KafkaTransport::open(&format!("kafka://{broker}"), options).expect("open");
    on_glommio(&t, move |core| async move {
        let core = std::rc::Rc::new(core);
        core.create_topic(&topic, &TopicConfig::new(4)).await.expect("create");
        let produce = |p: u32, v: u8| {
            let (core, tp) = (core.clone(), TopicPartition::new(topic.as_str(), p));
            glommio::spawn_local(async move {
                let mut batch = BatchBuilder::new();
                batch.push(1, None, Some(&[v]), &[]);
                batch.push(2, None, Some(&[v]), &[]);
                core.produce(&tp, batch).await.expect("produce")
            })
        };
        let start = Instant::now();
        // Partitions 0..4 share a request; the second and third batches of partition 0 each
        // open a queue of their own, sent after it.
        let tasks: Vec<_> = [(0, 1), (1, 2), (2, 3), (0, 4), (3, 5), (0, 6)].map(|(p, v)| produce(p, v)).into();
        let mut produced = Vec::new();
        for t in tasks {
            produced.push(t.await);
        }
        assert!(start.elapsed() >= Duration::from_millis(100), "no linger: {:?}", start.elapsed());
        let offsets: Vec<_> = produced.iter().map(|p| (p.partition, p.base_offset, p.last_offset)).collect();
        assert_eq!(offsets, vec![(0, 0, 1), (1, 0, 1), (2, 0, 1), (0, 2, 3), (3, 0, 1), (0, 4, 5)]);
        // Three requests: partitions 0, 1, 2; then 0 and 3; then 0.
        assert_eq!(core.stats().produce_requests, 3);
        let got = fetch_n(&core, &TopicPartition::new(topic.as_str(), 0), 0, 6, 1 << 20).await;
        let values: Vec<u8> = got.iter().map(|r| r.value.as_deref().map_or(0, |v| v[0])).collect();
        assert_eq!(values, vec![1, 1, 4, 4, 6, 6]);

        // The produce that holds a queue is dropped while it lingers: the one that joined it
        // is retried, not lost.
        let tp1 = TopicPartition::new(topic.as_str(), 1);
        let dropped = {
            let (core, tp) = (core.clone(), tp1.clone());
            glommio::spawn_local(async move {
                let mut batch = BatchBuilder::new();
                batch.push(1, None, Some(b"dropped"), &[]);
                futures_lite::future::or(async { Some(core.produce(&tp, batch).await) }, async {
                    glommio::timer::sleep(Duration::from_millis(30)).await;
                    None
                })
                .await
            })
        };
        glommio::timer::sleep(Duration::from_millis(10)).await;
        let joined = produce(2, 9);
        assert!(dropped.await.is_none());
        let p = joined.await;
        assert_eq!((p.partition, p.base_offset), (2, 2));
    });
}

#[test]
fn a_large_batch_and_a_one_mib_record() {
    let broker = require_broker!();
    let topic = unique("large");
    let t = topic.clone();
    let big = vec![0xabu8; 1 << 20];
    let big2 = big.clone();
    on_glommio(&transport(&broker), move |core| async move {
        core.create_topic(&t, &TopicConfig::new(2)).await.expect("create");
        let tp = TopicPartition::new(t.as_str(), 0);
        let mut batch = BatchBuilder::with_capacity(8 << 20);
        for i in 0..50_000u32 {
            batch.push(i64::from(i), Some(&i.to_be_bytes()), Some(format!("value-{i:08}").as_bytes()), &[]);
        }
        let p = core.produce(&tp, batch).await.expect("produce 50k");
        assert_eq!((p.base_offset, p.last_offset), (0, 49_999));
        let got = fetch_n(&core, &tp, 0, 50_000, 1 << 20).await;
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(r.key.as_deref(), Some(&(i as u32).to_be_bytes()[..]));
            assert_eq!(r.value.as_deref(), Some(format!("value-{i:08}").as_bytes()));
        }
        let tp1 = TopicPartition::new(t.as_str(), 1);
        let mut batch = BatchBuilder::new();
        batch.push(1, Some(b"big"), Some(&big2), &[]);
        batch.push(2, Some(b"after"), Some(b"small"), &[]);
        core.produce(&tp1, batch).await.expect("produce 1 MiB");
        // A fetch smaller than the record still returns it (the broker sends the first batch whole).
        let got = fetch_n(&core, &tp1, 0, 2, 64 << 10).await;
        assert_eq!(got[0].value.as_deref().map(<[u8]>::len), Some(1 << 20));
        assert!(got[0].value.as_deref() == Some(&big2[..]));
        assert_eq!(got[1].value.as_deref(), Some(&b"small"[..]));
    });
    let got = tokio(async move {
        let client = rs_client(&broker).await;
        rs_fetch_n(&rs_partition(&client, &topic, 1).await, 2).await
    });
    assert!(got[0].1.value.as_deref() == Some(&big[..]));
}

#[test]
fn list_offsets_earliest_latest_and_by_timestamp() {
    let broker = require_broker!();
    let topic = unique("offsets");
    let t = topic.clone();
    const LOOKUPS: [i64; 8] = [0, 5_000, 9_999, 10_000, 14_500, 15_000, 29_000, 1_000_000];
    let ours = on_glommio(&transport(&broker), move |core| async move {
        core.create_topic(&t, &TopicConfig::new(1)).await.expect("create");
        let tp = TopicPartition::new(t.as_str(), 0);
        assert_eq!(core.list_offset(&tp, OffsetSpec::Earliest).await.expect("earliest"), 0);
        assert_eq!(core.list_offset(&tp, OffsetSpec::Latest).await.expect("latest"), 0);
        for round in 0..3i64 {
            let mut batch = BatchBuilder::new();
            for i in 0..10i64 {
                batch.push(1_000 * (round * 10 + i), None, Some(b"v"), &[]);
            }
            core.produce(&tp, batch).await.expect("produce");
            // max_wait 0 and 1 byte: still an answer, with the partition's high-water mark.
            let f = core.fetch(&tp, 0, 1, Duration::ZERO).await.expect("fetch");
            assert_eq!(f.high_watermark, 10 * (round as u64 + 1));
            assert_eq!(core.list_offset(&tp, OffsetSpec::Latest).await.expect("latest"), f.high_watermark);
        }
        let missing = TopicPartition::new(t.as_str(), 5);
        assert!(matches!(core.list_offset(&missing, OffsetSpec::Latest).await, Err(Error::UnknownPartition { .. })));
        let mut got = vec![
            core.list_offset(&tp, OffsetSpec::Earliest).await.expect("earliest"),
            core.list_offset(&tp, OffsetSpec::Latest).await.expect("latest"),
        ];
        for ts in LOOKUPS {
            got.push(core.list_offset(&tp, OffsetSpec::Timestamp(ts)).await.expect("by timestamp"));
        }
        got
    });
    let theirs = tokio(async move {
        use rskafka::client::partition::OffsetAt;
        let client = rs_client(&broker).await;
        let pc = rs_partition(&client, &topic, 0).await;
        let mut got = vec![
            pc.get_offset(OffsetAt::Earliest).await.expect("earliest"),
            pc.get_offset(OffsetAt::Latest).await.expect("latest"),
        ];
        for ts in LOOKUPS {
            let at = Utc.timestamp_millis_opt(ts).single().expect("ts");
            got.push(pc.get_offset(OffsetAt::Timestamp(at)).await.expect("by timestamp"));
        }
        got
    });
    // tansu answers ListOffsets with the base offset of the last batch plus one for latest
    // (21 here, also to rskafka; our client corrects it with the fetch high-water mark) and
    // with 0 for every timestamp. So timestamps are checked against Kafka's semantics only
    // where tansu gets them right, and otherwise against rskafka's answers.
    assert_eq!(&ours[..2], &[0, 30]);
    assert_eq!(theirs[0], 0);
    assert!(theirs[1] == 30 || theirs[1] == 21, "rskafka latest {}", theirs[1]);
    let kafka = [0, 5, 10, 10, 15, 15, 29, 30];
    let broker_is_tansu = theirs[2..].iter().all(|&o| o == 0);
    for (i, &ts) in LOOKUPS.iter().enumerate() {
        if broker_is_tansu {
            assert_eq!(ours[2 + i] as i64, theirs[2 + i], "timestamp {ts}");
        } else {
            assert_eq!(ours[2 + i], kafka[i], "timestamp {ts}");
        }
    }
}

#[test]
fn create_topic_is_idempotent_and_checks_partitions() {
    let broker = require_broker!();
    let topic = unique("create");
    on_glommio(&transport(&broker), move |core| async move {
        assert_eq!(core.topic_metadata(&topic).await.expect("metadata"), None);
        let config = TopicConfig { retention: Some(Duration::from_secs(3600)), ..TopicConfig::new(4).compacted() };
        let m = core.create_topic(&topic, &config).await.expect("create");
        assert_eq!(m.config.partitions, 4);
        let again = core.create_topic(&topic, &TopicConfig::new(4)).await.expect("create again");
        assert_eq!(again.config.partitions, 4);
        match core.create_topic(&topic, &TopicConfig::new(6)).await {
            Err(Error::PartitionMismatch { existing: 4, requested: 6, .. }) => {}
            other => panic!("expected PartitionMismatch, got {other:?}"),
        }
        assert_eq!(core.topic_metadata(&topic).await.expect("metadata").map(|m| m.config.partitions), Some(4));
        assert!(matches!(
            core.create_topic("bad/name", &TopicConfig::new(1)).await,
            Err(Error::InvalidTopicName { .. })
        ));
        // Produce to a topic that does not exist: the batch comes back.
        let mut batch = BatchBuilder::new();
        batch.push(1, None, Some(b"v"), &[]);
        let err = core.produce(&TopicPartition::new(unique("missing"), 0), batch).await.expect_err("unknown topic");
        assert!(
            matches!(&err, Error::Produce { source, .. } if matches!(**source, Error::UnknownTopic { .. })),
            "{err}"
        );
        assert_eq!(err.into_batch().map(|b| b.len()), Some(1));
    });
}

#[test]
fn topic_names_lists_created_topics_sorted_without_internal_ones() {
    let broker = require_broker!();
    let (a, b) = (unique("names-b"), unique("names-a"));
    on_glommio(&transport(&broker), move |core| async move {
        core.create_topic(&a, &TopicConfig::new(1)).await.expect("create");
        core.create_topic(&b, &TopicConfig::new(2)).await.expect("create");
        // Other tests make topics on the same broker at the same time: look for ours only.
        let names = core.topic_names().await.expect("topic names");
        assert!(names.contains(&a) && names.contains(&b), "{names:?}");
        assert!(names.is_sorted(), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("__")), "{names:?}");
    });
}

#[test]
fn commits_round_trip() {
    let broker = require_broker!();
    let topic = unique("commits");
    let group = unique("group");
    let t = transport(&broker);
    let (t2, g2, top2) = (t.clone(), group.clone(), topic.clone());
    on_glommio(&t, move |core| async move {
        core.create_topic(&topic, &TopicConfig::new(3)).await.expect("create");
        let tps: Vec<_> = (0..3).map(|p| TopicPartition::new(topic.as_str(), p)).collect();
        assert_eq!(core.committed(&group, &tps).await.expect("committed"), vec![None, None, None]);
        core.commit(&group, None, &[(tps[0].clone(), 17), (tps[2].clone(), 4)]).await.expect("commit");
        assert_eq!(core.committed(&group, &tps).await.expect("committed"), vec![Some(17), None, Some(4)]);
        core.commit(&group, None, &[(tps[0].clone(), 18)]).await.expect("commit");
        core.shutdown().await.expect("shutdown");
    });
    // Another core's handle (its own connections) sees them.
    on_glommio(&t2, move |core| async move {
        let tps: Vec<_> = (0..3).map(|p| TopicPartition::new(top2.as_str(), p)).collect();
        assert_eq!(core.committed(&g2, &tps).await.expect("committed"), vec![Some(18), None, Some(4)]);
        assert_eq!(core.committed(&unique("other"), &tps[..1]).await.expect("committed"), vec![None]);
    });
}

#[test]
fn static_membership_assigns_the_listed_partitions() {
    let broker = require_broker!();
    let (a, b) = (unique("member-a"), unique("member-b"));
    let t = transport(&broker);
    let (a2, b2) = (a.clone(), b.clone());
    on_glommio(&t, move |core| async move {
        core.create_topic(&a2, &TopicConfig::new(3)).await.expect("create");
        core.create_topic(&b2, &TopicConfig::new(2)).await.expect("create");
    });
    let join = JoinRequest { topics: vec![a.clone(), b.clone()], copartitioned: vec![], weight: 1, changelogs: vec![] };
    let listed = vec![TopicPartition::new(a.as_str(), 1), TopicPartition::new("not-joined", 0)];
    let options = KafkaOptions { partitions: Some(listed), ..KafkaOptions::default() };
    let t = KafkaTransport::open(&format!("kafka://{broker}"), options).expect("open");
    let mut m = t.membership("g", &join).expect("membership");
    let event = futures_lite::future::block_on(m.next_event()).expect("event");
    assert_eq!(
        event,
        AssignmentEvent::Assigned { generation: 1, partitions: vec![TopicPartition::new(a.as_str(), 1)] }
    );

    let join = JoinRequest { topics: vec![unique("absent")], copartitioned: vec![], weight: 1, changelogs: vec![] };
    let options = KafkaOptions { partitions: Some(Vec::new()), ..KafkaOptions::default() };
    let t = KafkaTransport::open(&format!("kafka://{broker}"), options).expect("open");
    let mut m = t.membership("g", &join).expect("membership");
    assert!(matches!(futures_lite::future::block_on(m.next_event()), Err(Error::UnknownTopic { .. })));
    t.close();
    assert!(matches!(futures_lite::future::block_on(m.next_event()), Err(Error::Closed)));
}

#[test]
fn a_closed_port_fails_with_a_typed_error_in_time() {
    // Needs no broker: a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let options = KafkaOptions {
        request_timeout: Duration::from_secs(2),
        retries: 2,
        retry_backoff: Duration::from_millis(50),
        ..KafkaOptions::default()
    };
    let t = KafkaTransport::open(&format!("kafka://127.0.0.1:{port}"), options).expect("open");
    let start = Instant::now();
    let (fetched, produced) = on_glommio(&t, move |core| async move {
        let tp = TopicPartition::new("t", 0);
        let fetched = core.fetch(&tp, 0, 1024, Duration::from_millis(100)).await.map(|_| ());
        let mut batch = BatchBuilder::new();
        batch.push(1, None, Some(b"v"), &[]);
        let produced = core.produce(&tp, batch).await.map(|_| ());
        (fetched, produced)
    });
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    let err = fetched.expect_err("fetch from a closed port");
    assert!(
        matches!(&err, Error::KafkaConnection { broker, op: "connect", .. } if broker.ends_with(&port.to_string())),
        "{err}"
    );
    let err = produced.expect_err("produce to a closed port");
    assert!(
        matches!(&err, Error::Produce { source, .. } if matches!(**source, Error::KafkaConnection { .. })),
        "{err}"
    );
    assert_eq!(err.into_batch().map(|b| b.len()), Some(1));
}

#[test]
fn a_silent_broker_times_out() {
    // A listener that accepts and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let keep = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let options = KafkaOptions { request_timeout: Duration::from_millis(500), retries: 0, ..KafkaOptions::default() };
    let t = KafkaTransport::open(&format!("kafka://127.0.0.1:{port}"), options).expect("open");
    let start = Instant::now();
    let result =
        on_glommio(
            &t,
            move |core| async move { core.list_offset(&TopicPartition::new("t", 0), OffsetSpec::Latest).await },
        );
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert!(matches!(result, Err(Error::KafkaTimeout { api: "ApiVersions", .. })), "{result:?}");
    let _ = keep.join();
}

/// A tansu broker of the test's own, on a fixed port, that can be killed and started again.
struct OwnBroker {
    bin: String,
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnBroker {
    fn start(bin: &str) -> OwnBroker {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let mut b = OwnBroker { bin: bin.to_string(), port, child: None };
        b.restart();
        b
    }

    fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(&self.bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn the_client_reconnects_after_a_broker_restart() {
    let Ok(bin) = std::env::var("FAUST_TANSU_BIN") else {
        eprintln!("skipping: FAUST_TANSU_BIN not set (scripts/test sets it)");
        return;
    };
    let mut own = OwnBroker::start(&bin);
    let options = KafkaOptions {
        request_timeout: Duration::from_secs(2),
        retries: 3,
        retry_backoff: Duration::from_millis(50),
        ..KafkaOptions::default()
    };
    let t = KafkaTransport::open(&format!("kafka://127.0.0.1:{}", own.port), options).expect("open");
    let topic = unique("restart");
    let (to_test, from_test) = std::sync::mpsc::channel::<()>();
    let (to_core, from_core) = std::sync::mpsc::channel::<&'static str>();
    let t2 = t.clone();
    let core_thread = std::thread::spawn(move || {
        on_glommio(&t2, move |core| async move {
            let tp = TopicPartition::new(topic.as_str(), 0);
            let produce = |n: u8| {
                let mut b = BatchBuilder::new();
                b.push(1, None, Some(&[n]), &[]);
                b
            };
            core.create_topic(&topic, &TopicConfig::new(1)).await.expect("create");
            core.produce(&tp, produce(1)).await.expect("produce before");
            to_core.send("produced").expect("send");
            // Wait (polling: this is the core's only task) until the broker was killed.
            while from_test.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            let err = core.list_offset(&tp, OffsetSpec::Latest).await.expect_err("broker down");
            assert!(
                matches!(err, Error::KafkaConnection { .. } | Error::KafkaTimeout { .. }),
                "expected a connection error, got {err}"
            );
            to_core.send("failed").expect("send");
            while from_test.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            // The restarted broker has lost the topic (memory storage): create it again.
            assert_eq!(core.topic_metadata(&topic).await.expect("metadata"), None);
            core.create_topic(&topic, &TopicConfig::new(1)).await.expect("create again");
            let p = core.produce(&tp, produce(2)).await.expect("produce after");
            assert_eq!(p.base_offset, 0);
            let f = core.fetch(&tp, 0, 1 << 20, Duration::from_millis(100)).await.expect("fetch after");
            assert_eq!(f.records.len(), 1);
            assert_eq!(f.records[0].value.as_deref(), Some(&[2u8][..]));
        })
    });
    assert_eq!(from_core.recv_timeout(Duration::from_secs(30)), Ok("produced"));
    own.kill();
    to_test.send(()).expect("send");
    assert_eq!(from_core.recv_timeout(Duration::from_secs(30)), Ok("failed"));
    own.restart();
    to_test.send(()).expect("send");
    core_thread.join().expect("core thread");
}

/// Throughput of our client and rskafka, ~200k records of 100 bytes each way. Run with
/// `scripts/broker start` and
/// `FAUST_TEST_BROKER=... cargo test --release -p faust-transport --test transport_kafka -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_against_rskafka() {
    let broker = require_broker!();
    const N: usize = 200_000;
    const CHUNK: usize = 10_000;
    let value = vec![b'x'; 100];
    let ours = unique("bench-ours");
    let theirs = unique("bench-rskafka");

    let (t, v) = (ours.clone(), value.clone());
    let (produce_s, fetch_s, produce_seq_s) = on_glommio(&transport(&broker), move |core| async move {
        let core = std::rc::Rc::new(core);
        core.create_topic(&t, &TopicConfig::new(1)).await.expect("create");
        let tp = TopicPartition::new(t.as_str(), 0);
        let start = Instant::now();
        let mut pending = Vec::new();
        for c in 0..N / CHUNK {
            let mut batch = BatchBuilder::with_capacity(CHUNK * 140);
            for i in 0..CHUNK {
                batch.push((c * CHUNK + i) as i64, None, Some(&v), &[]);
            }
            // Up to 4 requests in flight on the connection.
            pending.push(glommio::spawn_local({
                let core = core.clone();
                let tp = tp.clone();
                async move { core.produce(&tp, batch).await.expect("produce") }
            }));
            if pending.len() == 4 {
                pending.remove(0).await;
            }
        }
        for p in pending {
            p.await;
        }
        let produce_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let got = fetch_n(&core, &tp, 0, N, 4 << 20).await;
        let fetch_s = start.elapsed().as_secs_f64();
        assert_eq!(got.len(), N);
        // One request at a time, as rskafka's loop below does.
        let tp1 = TopicPartition::new(format!("{t}-seq"), 0);
        core.create_topic(&tp1.topic, &TopicConfig::new(1)).await.expect("create");
        let start = Instant::now();
        for c in 0..N / CHUNK {
            let mut batch = BatchBuilder::with_capacity(CHUNK * 140);
            for i in 0..CHUNK {
                batch.push((c * CHUNK + i) as i64, None, Some(&v), &[]);
            }
            core.produce(&tp1, batch).await.expect("produce");
        }
        (produce_s, fetch_s, start.elapsed().as_secs_f64())
    });

    let (b, t) = (broker.clone(), theirs.clone());
    let (rs_produce_s, rs_fetch_s) = tokio(async move {
        let client = rs_client(&b).await;
        client.controller_client().expect("controller").create_topic(&t, 1, 1, 5_000).await.expect("create");
        let pc = rs_partition(&client, &t, 0).await;
        let start = Instant::now();
        for c in 0..N / CHUNK {
            let records = (0..CHUNK)
                .map(|i| rskafka::record::Record {
                    key: None,
                    value: Some(value.clone()),
                    headers: BTreeMap::new(),
                    timestamp: Utc.timestamp_millis_opt((c * CHUNK + i) as i64).single().expect("ts"),
                })
                .collect();
            pc.produce(records, Compression::NoCompression).await.expect("produce");
        }
        let produce_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut offset = 0i64;
        let mut n = 0usize;
        while n < N {
            let (records, _) = pc.fetch_records(offset, 1..4_000_000, 200).await.expect("fetch");
            for r in records {
                if r.offset >= offset {
                    offset = r.offset + 1;
                    n += 1;
                }
            }
        }
        (produce_s, start.elapsed().as_secs_f64())
    });
    let rate = |s: f64| N as f64 / s / 1e6;
    println!("records: {N} x 100 bytes, one partition, broker {broker}");
    println!(
        "faust-transport  produce {:.2} M/s (4 requests in flight), {:.2} M/s (1 in flight)  fetch {:.2} M/s",
        rate(produce_s),
        rate(produce_seq_s),
        rate(fetch_s)
    );
    println!("rskafka          produce {:.2} M/s (1 in flight)  fetch {:.2} M/s", rate(rs_produce_s), rate(rs_fetch_s));
}

/// Options for group tests: tansu answers a JoinGroup round after about half the session
/// timeout, so a short one keeps rebalances to a second or two.
fn group_options() -> KafkaOptions {
    KafkaOptions {
        request_timeout: Duration::from_secs(10),
        session_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(300),
        rebalance_timeout: Duration::from_secs(10),
        ..KafkaOptions::default()
    }
}

/// The member's next event, within `secs` seconds.
fn next_within(m: &mut faust_transport::KafkaMembership, secs: u64) -> AssignmentEvent {
    let timeout = async {
        futures_timer::Delay::new(Duration::from_secs(secs)).await;
        None
    };
    match futures_lite::future::block_on(futures_lite::future::or(async { Some(m.next_event().await) }, timeout)) {
        Some(event) => event.expect("an assignment event"),
        None => panic!("no assignment event within {secs} s"),
    }
}

/// Two workers in one consumer group: the first gets every partition; when the second joins,
/// the first is asked to give half back, commits them as a member of the group, confirms, and
/// only then does the second get them, starting from those commits. When the second leaves,
/// the first gets them back.
#[test]
fn two_members_share_a_topic_in_two_steps() {
    let broker = require_broker!();
    let (topic, group) = (unique("shared"), unique("group"));
    let url = format!("kafka://{broker}");
    let (ta, tb) = (
        KafkaTransport::open(&url, group_options()).expect("open"),
        KafkaTransport::open(&url, group_options()).expect("open"),
    );
    let t2 = topic.clone();
    on_glommio(&ta, move |core| async move {
        core.create_topic(&t2, &TopicConfig::new(4)).await.expect("create");
    });
    let all: Vec<TopicPartition> = (0..4).map(|p| TopicPartition::new(topic.as_str(), p)).collect();
    let join = JoinRequest { topics: vec![topic.clone()], copartitioned: vec![], weight: 1, changelogs: vec![] };
    let mut a = ta.membership(&group, &join).expect("membership");
    assert!(
        matches!(next_within(&mut a, 20), AssignmentEvent::Assigned { partitions, .. } if partitions == all),
        "a lone member gets everything"
    );

    let mut b = tb.membership(&group, &join).expect("membership");
    let AssignmentEvent::Revoked { generation, partitions: moving } = next_within(&mut a, 30) else {
        panic!("a gives some back")
    };
    assert_eq!(moving.len(), 2, "{moving:?}");
    assert!(matches!(next_within(&mut b, 30), AssignmentEvent::Assigned { partitions, .. } if partitions.is_empty()));
    // a commits what it gives away, as a member of the group, then confirms.
    let fence = faust_transport::Fence { member: a.member_id().expect("a group member"), generation };
    let (g2, first) = (group.clone(), moving[0].clone());
    on_glommio(&ta, move |core| async move {
        core.commit(&g2, Some(&fence), &[(first, 5)]).await.expect("a fenced commit by the owner");
    });
    futures_lite::future::block_on(a.revoked(generation)).expect("confirm");
    let AssignmentEvent::Assigned { partitions: got, .. } = next_within(&mut b, 30) else { panic!("b gets them") };
    assert_eq!(got, moving);
    let (g2, first) = (group.clone(), moving[0].clone());
    let committed = on_glommio(&tb, move |core| async move { core.committed(&g2, &[first]).await.expect("committed") });
    assert_eq!(committed, vec![Some(5)], "b starts from a's commit");

    // b leaves: a gets its partitions back at once.
    futures_lite::future::block_on(b.leave()).expect("leave");
    let AssignmentEvent::Assigned { partitions: back, .. } = next_within(&mut a, 30) else {
        panic!("a gets them back")
    };
    assert_eq!(back, moving);
    futures_lite::future::block_on(a.leave()).expect("leave");
    ta.close();
    tb.close();
}

/// Interop: the offsets a member of our group commits are what aiokafka (the client Faust
/// uses) reads as the group's committed offsets, and the offsets aiokafka commits are what we
/// read. Needs `FAUST_TEST_PYTHON` (a Python with faust-streaming, hence aiokafka; made by
/// `scripts/faust-python`).
#[test]
fn committed_offsets_read_the_same_with_aiokafka() {
    let broker = require_broker!();
    let Some(python) = std::env::var("FAUST_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        eprintln!("skipping: FAUST_TEST_PYTHON unset (scripts/test sets it)");
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/faust/committed_offsets.py");
    let aiokafka = |group: &str, topic: &str, args: &[String]| -> String {
        let out = std::process::Command::new(&python)
            .args([script, broker.as_str(), group, topic, "3"])
            .args(args)
            .output()
            .expect("run aiokafka");
        assert!(out.status.success(), "aiokafka: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
    };
    let (topic, group) = (unique("interop"), unique("interop-group"));
    let t = KafkaTransport::open(&format!("kafka://{broker}"), group_options()).expect("open");
    let t2 = topic.clone();
    on_glommio(&t, move |core| async move {
        core.create_topic(&t2, &TopicConfig::new(3)).await.expect("create");
    });
    // Ours, as a member of the group (its generation and member id).
    let join = JoinRequest { topics: vec![topic.clone()], copartitioned: vec![], weight: 1, changelogs: vec![] };
    let mut member = t.membership(&group, &join).expect("membership");
    let AssignmentEvent::Assigned { generation, partitions } = next_within(&mut member, 20) else { panic!("in") };
    assert_eq!(partitions.len(), 3);
    let fence = faust_transport::Fence { member: member.member_id().expect("a member"), generation };
    let offsets: Vec<(TopicPartition, u64)> =
        partitions.iter().map(|tp| (tp.clone(), 10 + u64::from(tp.partition))).collect();
    let g2 = group.clone();
    on_glommio(&t, move |core| async move {
        core.commit(&g2, Some(&fence), &offsets).await.expect("commit as a member");
    });
    let read: serde_json::Value = serde_json::from_str(&aiokafka(&group, &topic, &["read".into()])).expect("JSON");
    assert_eq!(read, serde_json::json!({"0": 10, "1": 11, "2": 12}), "aiokafka reads what our member committed");
    futures_lite::future::block_on(member.leave()).expect("leave");

    // aiokafka's, read by us.
    let other = unique("interop-aiokafka");
    let args: Vec<String> = ["commit", "0=100", "1=101", "2=102"].iter().map(|s| s.to_string()).collect();
    assert_eq!(aiokafka(&other, &topic, &args), "ok");
    let tps: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new(topic.as_str(), p)).collect();
    let got = on_glommio(&t, move |core| async move { core.committed(&other, &tps).await.expect("committed") });
    assert_eq!(got, vec![Some(100), Some(101), Some(102)], "we read what aiokafka committed");
    t.close();
}

/// Static membership: a worker that crashes and restarts with its instance id gets its
/// partitions back at once, without waiting for its old session to time out (a dynamic member
/// would wait for the group to drop the dead one: the session timeout, 10 s here).
///
/// On tansu, only this lone-member case is tested: tansu does not tell other static members to
/// rejoin when one rejoins with new metadata, so the second round of a two-step hand-over
/// between static members waits until they rejoin for another reason (Kafka tells them).
#[test]
fn a_static_member_gets_its_partitions_back_after_a_restart() {
    let broker = require_broker!();
    let (topic, group) = (unique("static"), unique("static-group"));
    let url = format!("kafka://{broker}");
    let options = || KafkaOptions {
        session_timeout: Duration::from_secs(10),
        group_instance_id: Some("worker-a".to_string()),
        ..group_options()
    };
    let ta = KafkaTransport::open(&url, options()).expect("open");
    let t2 = topic.clone();
    on_glommio(&ta, move |core| async move {
        core.create_topic(&t2, &TopicConfig::new(4)).await.expect("create");
    });
    let join = JoinRequest { topics: vec![topic.clone()], copartitioned: vec![], weight: 1, changelogs: vec![] };
    let mut a = ta.membership(&group, &join).expect("membership");
    let AssignmentEvent::Assigned { partitions: first, .. } = next_within(&mut a, 30) else { panic!("a is in") };
    assert_eq!(first.len(), 4);
    // a "crashes" (no LeaveGroup: a static member does not leave) and comes straight back.
    drop(a);
    ta.close();
    let restarted = Instant::now();
    let ta = KafkaTransport::open(&url, options()).expect("open");
    let mut a = ta.membership(&group, &join).expect("membership");
    let AssignmentEvent::Assigned { partitions: back, .. } = next_within(&mut a, 30) else { panic!("a is back") };
    assert_eq!(back, first, "the same partitions");
    assert!(
        restarted.elapsed() < Duration::from_secs(9),
        "back in {:?}, before the old session timed out",
        restarted.elapsed()
    );
    futures_lite::future::block_on(a.leave()).expect("leave");
    ta.close();
}
