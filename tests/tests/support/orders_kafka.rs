//! Helpers for the end-to-end tests of the orders example on Kafka: a tansu broker of the
//! test's own, an independent producer of orders, the example's CLI and worker processes.
//! Each test crate that includes this module uses part of it.
#![allow(dead_code, reason = "each test crate that includes this module uses part of it")]

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use faust_transport::{
    BatchBuilder, CoreTransport, KafkaOptions, KafkaTransport, TopicConfig, TopicPartition, Transport,
};
use serde_json::Value;

pub(crate) const ORDERS_BIN: &str = env!("CARGO_BIN_EXE_orders");
pub(crate) const ACCOUNTS: u64 = 1_000;

/// The tansu binary, or `None` (after printing why the test is skipped).
pub(crate) fn tansu(test: &str) -> Option<PathBuf> {
    faust_tests::test_broker(test)?;
    match std::env::var("FAUST_TANSU_BIN") {
        Ok(bin) if !bin.is_empty() => Some(PathBuf::from(bin)),
        _ => {
            eprintln!("skipping {test}: FAUST_TANSU_BIN unset (scripts/test exports it; scripts/broker bin prints it)");
            None
        }
    }
}

/// A tansu broker of the test's own, in memory, killed when dropped.
pub(crate) struct Broker {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    pub(crate) fn start(bin: &Path) -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = Broker { bin: bin.to_path_buf(), port, child: None };
        broker.restart();
        broker
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts a fresh (empty) broker on the same port, stopping the running one first.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let url = format!("tcp://{}", self.addr());
        let child = Command::new(&self.bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(self.addr()).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "tansu did not listen on {} within 10 s", self.addr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (its state is in memory; the port is free once it is gone).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The example's order for id `id` (its generator's shape): account and JSON value.
pub(crate) fn order(id: u64) -> (String, Vec<u8>) {
    let h = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let account = format!("account-{}", h % ACCOUNTS);
    let value = serde_json::json!({
        "account_id": account,
        "product_id": format!("product-{}", (h >> 24) % 1_000),
        "amount": 1 + (h >> 40) % 10,
        "price": ((h >> 12) % 100_000) as f64 / 100.0,
    });
    (account, serde_json::to_vec(&value).unwrap())
}

/// Produces orders `from..to` into `orders` (created with 4 partitions if missing), keyed by
/// order id, with our client; returns them counted per account.
pub(crate) fn produce_orders(broker: &str, from: u64, to: u64) -> BTreeMap<String, u64> {
    produce_orders_with(broker, KafkaOptions::default(), from, to)
}

/// [`produce_orders`] with a client configured by `options` (TLS, SASL).
pub(crate) fn produce_orders_with(broker: &str, options: KafkaOptions, from: u64, to: u64) -> BTreeMap<String, u64> {
    let transport = KafkaTransport::open(&format!("kafka://{broker}"), options).unwrap();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let core = transport.attach_core(0, 1).await.expect("attach");
            core.create_topic("orders", &TopicConfig::new(4)).await.expect("create orders");
            let mut truth = BTreeMap::new();
            let mut batches: Vec<BatchBuilder> = (0..4).map(|_| BatchBuilder::new()).collect();
            let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
            for id in from..to {
                let (account, value) = order(id);
                *truth.entry(account).or_insert(0) += 1;
                let key = format!("order-{id}");
                let p = (id % 4) as usize;
                batches[p].push(ts, Some(key.as_bytes()), Some(&value), &[]);
                if batches[p].len() >= 5_000 || id + 1 == to {
                    for (p, batch) in batches.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()) {
                        let batch = std::mem::take(batch);
                        core.produce(&TopicPartition::new("orders", p as u32), batch).await.expect("produce");
                    }
                }
            }
            truth
        })
        .expect("executor")
        .join()
        .expect("join")
}

pub(crate) fn cli(datadir: &Path, args: &[&str]) -> Output {
    Command::new(ORDERS_BIN)
        .arg("--datadir")
        .arg(datadir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run the orders CLI")
}

/// The counts of the running worker, through the CLI, or `None` while no worker answers.
pub(crate) fn counts(datadir: &Path) -> Option<BTreeMap<String, u64>> {
    let out = cli(datadir, &["table", "dump", "order_count", "--json"]);
    if !out.status.success() {
        return None;
    }
    let items: Value = serde_json::from_slice(&out.stdout).expect("table dump --json prints JSON");
    let items = items.as_array().expect("an array");
    Some(items.iter().map(|kv| (kv["key"].as_str().unwrap().to_string(), kv["value"].as_u64().unwrap())).collect())
}

/// An orders worker on `broker`, its log in `log`.
pub(crate) fn worker(broker: &str, datadir: &Path, log: &Path) -> Child {
    worker_with(broker, datadir, log, &[])
}

/// An orders worker on `broker` with more `worker` arguments.
pub(crate) fn worker_with(broker: &str, datadir: &Path, log: &Path, args: &[&str]) -> Child {
    worker_env(broker, datadir, log, args, &[])
}

/// An orders worker on `broker` with more `worker` arguments and environment variables.
pub(crate) fn worker_env(broker: &str, datadir: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(ORDERS_BIN)
        .arg("--broker")
        .arg(format!("kafka://{broker}"))
        .arg("--datadir")
        .arg(datadir)
        .arg("worker")
        .args(args)
        .env("BROKER_COMMIT_INTERVAL", "0.1")
        .env("TOPIC_PARTITIONS", "4")
        // tansu answers a JoinGroup round after half the session timeout, and drops a
        // SIGKILLed member only once it timed out: short rounds and quick takeovers.
        .env("BROKER_SESSION_TIMEOUT", "2")
        .env_remove("RUST_LOG")
        .env_remove("FAUST_CRASH_AT")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .expect("start the orders worker")
}

/// Waits (at most `within`) until the worker's counts add up to `total`, then a little more,
/// and returns them; fails with the worker's log if it exits or does not get there.
pub(crate) fn wait_for_counts(
    child: &mut Child,
    datadir: &Path,
    log: &Path,
    total: u64,
    within: Duration,
) -> BTreeMap<String, u64> {
    let start = Instant::now();
    let mut last = 0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the worker exited ({status}); its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        if let Some(c) = counts(datadir) {
            last = c.values().sum();
            if last >= total {
                // Anything counted twice would show up now.
                std::thread::sleep(Duration::from_millis(500));
                return counts(datadir).expect("the worker still answers");
            }
        }
        assert!(
            start.elapsed() < within,
            "only {last} of {total} orders counted within {within:?}; the worker's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `signal` and waits (bounded) for the exit.
pub(crate) fn signal_and_wait(child: &mut Child, signal: i32, within: Duration) -> std::process::ExitStatus {
    // SAFETY: signalling our own child, not yet waited for.
    unsafe { libc::kill(child.id() as i32, signal) };
    let sent = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if sent.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("signal {signal}: the worker did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn assert_exact(counted: &BTreeMap<String, u64>, truth: &BTreeMap<String, u64>, what: &str) {
    let wrong: Vec<_> = truth.iter().filter(|(k, v)| counted.get(*k) != Some(v)).take(5).collect();
    assert!(wrong.is_empty(), "{what}: accounts counted wrongly (truth shown): {wrong:?}");
    assert_eq!(counted, truth, "{what}");
}

/// Produces orders `from..to` into `orders` (created with 4 partitions if missing) with
/// rskafka, a client independent of ours, keyed by order id, order `id` into partition
/// `id % 4`; returns them counted per account.
pub(crate) fn produce_orders_rskafka(broker: &str, from: u64, to: u64) -> BTreeMap<String, u64> {
    use chrono::{TimeZone, Utc};
    use rskafka::client::partition::{Compression, UnknownTopicHandling};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let client = rskafka::client::ClientBuilder::new(vec![broker.to_string()]).build().await.expect("rskafka");
        let controller = client.controller_client().expect("controller");
        // An existing topic is fine (a second batch of orders).
        let _ = controller.create_topic("orders", 4, 1, 5_000).await;
        let now = Utc.timestamp_millis_opt(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64,
        );
        let now = now.single().expect("a timestamp");
        let mut truth = BTreeMap::new();
        let mut per_partition: Vec<Vec<rskafka::record::Record>> = vec![Vec::new(); 4];
        for id in from..to {
            let (account, value) = order(id);
            *truth.entry(account).or_insert(0) += 1;
            per_partition[(id % 4) as usize].push(rskafka::record::Record {
                key: Some(format!("order-{id}").into_bytes()),
                value: Some(value),
                headers: Default::default(),
                timestamp: now,
            });
        }
        for (p, records) in per_partition.into_iter().enumerate() {
            let pc = client
                .partition_client("orders".to_string(), p as i32, UnknownTopicHandling::Retry)
                .await
                .expect("partition client");
            for chunk in records.chunks(2_000) {
                pc.produce(chunk.to_vec(), Compression::NoCompression).await.expect("produce with rskafka");
            }
        }
        truth
    })
}
