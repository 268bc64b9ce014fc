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
