//! The embedded transport on two real glommio executors: a produce from a core that does not
//! own the partition travels to the owner and comes back acknowledged; fetches wait for
//! appends; reads elsewhere than on the owner are refused; topics, records and committed
//! offsets survive a reopen; a second opener of the directory gets a clear error.

use std::time::Duration;

use faust_transport::{
    BatchBuilder, CoreTransport, Error, LocalTransport, OffsetSpec, TopicConfig, TopicPartition, Transport,
};
use futures_channel::oneshot;
use glommio::{LocalExecutorBuilder, Placement};

fn batch(values: &[&str]) -> BatchBuilder {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(1_000, Some(v.as_bytes()), Some(v.as_bytes()), &[]);
    }
    b
}

fn values(records: &[faust_transport::Record]) -> Vec<String> {
    records.iter().map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned()).collect()
}

/// Runs `f(core)` on two executors that share `transport`, and returns their results.
fn on_two_cores<F, Fut, T>(transport: &LocalTransport, f: F) -> Vec<T>
where
    F: Fn(usize, faust_transport::LocalCore) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..2)
        .map(|core| {
            let (t, f) = (transport.clone(), f.clone());
            LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("test-core-{core}"))
                .spawn(move || async move {
                    let local = t.attach_core(core, 2).await.expect("attach");
                    f(core, local).await
                })
                .expect("spawn executor")
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("executor")).collect()
}

#[test]
fn cross_core_produce_fetch_commit_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let transport = LocalTransport::open(dir.path(), 2).unwrap();
    let (created_tx, created_rx) = oneshot::channel::<()>();
    let created_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(created_tx)));
    let created_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(created_rx)));
    let t0 = TopicPartition::new("orders", 0); // owned by core 0 (partition mod cores)
    let t1 = TopicPartition::new("orders", 1); // owned by core 1
    let results = on_two_cores(&transport, {
        let (t0, t1) = (t0.clone(), t1.clone());
        move |core, local| {
            let (t0, t1) = (t0.clone(), t1.clone());
            let created_tx = created_tx.clone();
            let created_rx = created_rx.clone();
            async move {
                if core == 0 {
                    local.create_topic("orders", &TopicConfig::new(2)).await.unwrap();
                    let _ = created_tx.lock().unwrap().take().unwrap().send(());
                    // Waits until core 1's produce has been appended here.
                    let f = local.fetch(&t0, 0, 1 << 20, Duration::from_secs(10)).await.unwrap();
                    let err = local.fetch(&t1, 0, 1 << 20, Duration::ZERO).await.unwrap_err();
                    assert!(matches!(err, Error::NotOwner { core: 0, owner: 1, .. }), "{err}");
                    local.commit("app", None, &[(t0.clone(), 2)]).await.unwrap();
                    local.shutdown().await.unwrap();
                    values(&f.records)
                } else {
                    let rx = created_rx.lock().unwrap().take().unwrap();
                    rx.await.unwrap();
                    // Core 1 does not own orders/0: the append travels to core 0.
                    let p = local.produce(&t0, batch(&["a", "b"])).await.unwrap();
                    assert_eq!((p.base_offset, p.last_offset), (0, 1));
                    let p = local.produce(&t1, batch(&["c"])).await.unwrap();
                    assert_eq!(p.base_offset, 0);
                    let f = local.fetch(&t1, 0, 1 << 20, Duration::ZERO).await.unwrap();
                    assert_eq!(local.list_offset(&t1, OffsetSpec::Latest).await.unwrap(), 1);
                    local.commit("app", None, &[(t1.clone(), 1)]).await.unwrap();
                    local.shutdown().await.unwrap();
                    values(&f.records)
                }
            }
        }
    });
    assert_eq!(results, vec![vec!["a".to_string(), "b".to_string()], vec!["c".to_string()]]);

    // Only one process may hold the directory (another handle in this process counts too).
    let err = LocalTransport::open(dir.path(), 2).unwrap_err();
    assert!(matches!(&err, Error::DirectoryInUse { holder, .. } if *holder == std::process::id().to_string()), "{err}");
    drop(transport);

    // Everything is still there after a reopen.
    let transport = LocalTransport::open(dir.path(), 2).unwrap();
    let results = on_two_cores(&transport, {
        let (t0, t1) = (t0.clone(), t1.clone());
        move |core, local| {
            let (t0, t1) = (t0.clone(), t1.clone());
            async move {
                let tp = if core == 0 { t0.clone() } else { t1.clone() };
                let meta = local.topic_metadata("orders").await.unwrap().unwrap();
                assert_eq!(meta.config.partitions, 2);
                let committed = local.committed("app", &[t0, t1]).await.unwrap();
                assert_eq!(committed, vec![Some(2), Some(1)]);
                let records = local.fetch(&tp, 0, 1 << 20, Duration::ZERO).await.unwrap().records;
                local.shutdown().await.unwrap();
                values(&records)
            }
        }
    });
    assert_eq!(results, vec![vec!["a".to_string(), "b".to_string()], vec!["c".to_string()]]);
}

#[test]
fn owners_follow_placement_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let transport = LocalTransport::open(dir.path(), 2).unwrap();
    // Place partition 0 on core 1 instead of the default core 0.
    transport.set_owners([(TopicPartition::new("t", 0), 1)]);
    let results = on_two_cores(&transport, move |core, local| async move {
        if core == 1 {
            assert!(matches!(
                local.create_topic("no/slashes", &TopicConfig::new(1)).await,
                Err(Error::InvalidTopicName { .. })
            ));
            local.create_topic("t", &TopicConfig::new(1)).await.unwrap();
            local.produce(&TopicPartition::new("t", 0), batch(&["x"])).await.unwrap();
            let f = local.fetch(&TopicPartition::new("t", 0), 0, 1 << 20, Duration::ZERO).await.unwrap();
            local.shutdown().await.unwrap();
            f.records.len()
        } else {
            let owner = local.owner(&TopicPartition::new("t", 0));
            local.shutdown().await.unwrap();
            owner
        }
    });
    assert_eq!(results, vec![1, 1]);
}

/// Runs `f` on one executor attached to `transport` (a one-core transport).
fn on_one_core<F, Fut, T>(transport: &LocalTransport, f: F) -> T
where
    F: FnOnce(faust_transport::LocalCore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let t = transport.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move { f(t.attach_core(0, 1).await.expect("attach")).await })
        .expect("spawn executor")
        .join()
        .expect("executor")
}

/// Committed offsets and topic settings are checksummed: an edited number or a flipped byte
/// is reported as damage, never read as data. A damaged offsets file falls back to the
/// previous commit (a complete, consistent state); a damaged settings file to its copy;
/// both copies damaged is a typed error naming the file and the remedy.
#[test]
fn damaged_offsets_and_settings_files_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("orders", 0);
    {
        let transport = LocalTransport::open(dir.path(), 1).unwrap();
        let tp = tp.clone();
        on_one_core(&transport, move |local| async move {
            local.create_topic("orders", &TopicConfig::new(3)).await.unwrap();
            local.commit("app", None, &[(tp.clone(), 100)]).await.unwrap();
            local.commit("app", None, &[(tp.clone(), 200)]).await.unwrap();
            local.shutdown().await.unwrap();
        });
    }
    let offsets = dir.path().join(".groups/app.offsets");
    let text = std::fs::read_to_string(&offsets).unwrap();
    assert!(text.contains("orders\t0\t200") && text.contains("crc32c "), "{text}");
    // One digit changed: the newest commit is not trusted; the previous one (100) is used.
    std::fs::write(&offsets, text.replace("\t200", "\t900")).unwrap();
    let committed = |dir: &std::path::Path| {
        let transport = LocalTransport::open(dir, 1).unwrap();
        let tp = tp.clone();
        on_one_core(&transport, move |local| async move {
            let c = local.committed("app", std::slice::from_ref(&tp)).await;
            local.shutdown().await.unwrap();
            c.map_err(|e| e.to_string())
        })
    };
    assert_eq!(committed(dir.path()), Ok(vec![Some(100)]));
    // The previous copy damaged too: an error that says what to do.
    std::fs::write(dir.path().join(".groups/app.offsets.prev"), "faust-offsets 2\norders\t0\t1\x00").unwrap();
    let err = committed(dir.path()).unwrap_err();
    assert!(err.contains("app.offsets is damaged") && err.contains("delete it"), "{err}");

    // Topic settings: a flipped byte in the file is mended from its copy.
    let meta = dir.path().join("orders/topic.meta");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("partitions=3", "partitions=5")).unwrap();
    let transport = LocalTransport::open(dir.path(), 1).unwrap();
    let partitions = on_one_core(&transport, |local| async move {
        let p = local.topic_metadata("orders").await.unwrap().unwrap().config.partitions;
        local.shutdown().await.unwrap();
        p
    });
    assert_eq!(partitions, 3);
    drop(transport);
    assert_eq!(std::fs::read_to_string(&meta).unwrap(), text, "the damaged file was mended");
    std::fs::write(&meta, "partitions=3\ncrc32c 00000000\n").unwrap();
    std::fs::write(dir.path().join("orders/topic.meta.prev"), "x").unwrap();
    let err = LocalTransport::open(dir.path(), 1).unwrap_err();
    assert!(matches!(&err, Error::DamagedFile { .. }), "{err}");
}

/// A read that meets a damaged batch fails with an error that names the damaged partition;
/// `repair` drops the damaged batch, keeps every other record at its offset, and the log
/// takes appends again at the same high-water mark.
#[test]
fn a_damaged_log_is_repaired_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let transport = LocalTransport::open(dir.path(), 1).unwrap();
    let tp = TopicPartition::new("t", 0);
    let root = dir.path().to_path_buf();
    let (report, values_after, next) = on_one_core(&transport, move |local| async move {
        local.create_topic("t", &TopicConfig::new(1)).await.unwrap();
        for i in 0..10 {
            local.produce(&tp, batch(&[&format!("v{i}")])).await.unwrap();
        }
        // Flip a byte inside the fifth batch's value.
        let segment = root.join("t/0/00000000000000000000.log");
        let mut bytes = std::fs::read(&segment).unwrap();
        let at = bytes.windows(2).position(|w| w == b"v4").unwrap();
        bytes[at] ^= 0x20;
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::File::options().write(true).open(&segment).unwrap(),
            &bytes[at..at + 1],
            at as u64,
        )
        .unwrap();
        let err = local.fetch(&tp, 0, 1 << 20, Duration::ZERO).await.unwrap_err();
        assert_eq!(err.damaged_log(), Some(&tp), "{err}");
        let report = local.repair(&tp).unwrap();
        let records = local.fetch(&tp, 0, 1 << 20, Duration::ZERO).await.unwrap().records;
        let next = local.produce(&tp, batch(&["v10"])).await.unwrap().base_offset;
        local.shutdown().await.unwrap();
        (
            report,
            records
                .iter()
                .map(|r| (r.offset, String::from_utf8_lossy(r.value.as_deref().unwrap()).into_owned()))
                .collect::<Vec<_>>(),
            next,
        )
    });
    assert_eq!(report.lost, vec![4..5], "{report}");
    let expected: Vec<(u64, String)> = (0..10).filter(|&i| i != 4).map(|i| (i, format!("v{i}"))).collect();
    assert_eq!(values_after, expected);
    assert_eq!(next, 10);
}

/// Reads every record of `tp` from its earliest offset.
async fn read_all(local: &faust_transport::LocalCore, tp: &TopicPartition) -> Vec<faust_transport::Record> {
    let mut out = Vec::new();
    let mut next = local.list_offset(tp, OffsetSpec::Earliest).await.unwrap();
    let end = local.list_offset(tp, OffsetSpec::Latest).await.unwrap();
    while next < end {
        let f = local.fetch(tp, next, 1 << 20, Duration::ZERO).await.unwrap();
        out.extend(f.records);
        next = f.next_offset;
    }
    out
}

/// Upkeep on small segments: a topic with `retention_bytes` stays near its limit; a compacted
/// topic keeps, below its horizon, the latest record of each key, and every record past the
/// horizon untouched (a changelog's uncommitted tail never replaces a committed record).
#[test]
fn maintain_enforces_retention_and_compacts_below_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let options = faust_transport::LocalOptions { segment_bytes: 8192 };
    let transport = LocalTransport::open_with(dir.path(), 1, options).unwrap();
    on_one_core(&transport, |local| async move {
        let events = TopicPartition::new("events", 0);
        let config = TopicConfig { retention_bytes: Some(32 << 10), ..TopicConfig::new(1) };
        local.create_topic("events", &config).await.unwrap();
        let changelog = TopicPartition::new("counts", 0);
        local.create_topic("counts", &TopicConfig::new(1).compacted()).await.unwrap();
        for round in 0..200u32 {
            let mut b = BatchBuilder::new();
            for i in 0..20u32 {
                b.push(1_000, Some(b"k"), Some(format!("event {round} {i} {}", "x".repeat(40)).as_bytes()), &[]);
            }
            local.produce(&events, b).await.unwrap();
            let mut b = BatchBuilder::new();
            for key in 0..10u32 {
                b.push(1_000, Some(format!("key-{key}").as_bytes()), Some(format!("{round}").as_bytes()), &[]);
            }
            local.produce(&changelog, b).await.unwrap();
            if round == 150 {
                // The committed end: what follows may still be rolled back.
                let end = local.list_offset(&changelog, OffsetSpec::Latest).await.unwrap();
                local.set_compaction_horizon(&changelog, end);
            }
        }
        let mut steps = 0;
        while local.maintain(4096).unwrap() {
            steps += 1;
            assert!(steps < 10_000, "upkeep does not finish");
        }
        let kept = read_all(&local, &events).await;
        let bytes: usize = kept.iter().map(|r| r.value.as_ref().map_or(0, |v| v.len())).sum();
        assert!(bytes < (32 << 10) + 2 * 8192, "events keep {bytes} bytes");
        assert_eq!(values(&kept).last().map(String::as_str), Some(&*format!("event 199 19 {}", "x".repeat(40))));
        let records = read_all(&local, &changelog).await;
        let horizon = 151 * 10;
        let below: Vec<_> = records.iter().filter(|r| r.offset < horizon).collect();
        let above = records.iter().filter(|r| r.offset >= horizon).count();
        assert_eq!(above, 49 * 10, "every record past the horizon stays");
        assert!(below.len() < 151 * 10 / 4, "compaction left {} of 1510 records below the horizon", below.len());
        // Below the horizon, each key's latest value there is still the one a replay ends with.
        for key in 0..10u32 {
            let k = format!("key-{key}");
            let last = below.iter().rev().find(|r| r.key.as_deref() == Some(k.as_bytes())).unwrap();
            assert_eq!(last.value.as_deref(), Some(&b"150"[..]), "{k}");
        }
        local.shutdown().await.unwrap();
    });
}

/// A fetch waiting on one partition is woken by appends to that partition: while another
/// partition of the core takes appends, it keeps waiting (its answer is not an empty read
/// cut short), and it returns its own records as soon as they are appended.
#[test]
fn a_waiting_fetch_wakes_for_its_own_partition() {
    let dir = tempfile::tempdir().unwrap();
    let transport = LocalTransport::open(dir.path(), 1).unwrap();
    let (busy, quiet) = (TopicPartition::new("events", 0), TopicPartition::new("events", 1));
    let (waited, values_read) = on_one_core(&transport, move |local| async move {
        local.create_topic("events", &TopicConfig::new(2)).await.expect("create");
        let local = std::rc::Rc::new(local);
        let appender = {
            let (local, busy, quiet) = (local.clone(), busy.clone(), quiet.clone());
            glommio::spawn_local(async move {
                for i in 0..20 {
                    local.produce(&busy, batch(&[&format!("busy-{i}")])).await.expect("produce busy");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                local.produce(&quiet, batch(&["quiet-0"])).await.expect("produce quiet");
            })
        };
        let started = std::time::Instant::now();
        let fetched = local.fetch(&quiet, 0, 1 << 20, Duration::from_secs(10)).await.expect("fetch");
        let waited = started.elapsed();
        appender.await;
        (waited, values(&fetched.records))
    });
    assert_eq!(values_read, vec!["quiet-0".to_string()], "the quiet partition's own record");
    // Twenty appends to the busy partition, 10 ms apart, came first; the fetch returned at
    // the quiet partition's append, long before its 10 s wait.
    assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(5), "waited {waited:?}");
}
