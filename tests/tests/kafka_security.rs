//! Our Kafka client with TLS, SASL and idempotent producing, against a real broker (tansu)
//! behind a TLS-terminating, SASL-checking front (`faust_tests::kafka_front`; tansu has
//! neither itself). Real sockets and real handshakes: wrong certificates and wrong passwords
//! must be refused with typed errors naming the broker, and a produce whose answer is lost
//! must be retried without writing its records twice.
//!
//! Each test starts a broker of its own behind its own front (`FAUST_TANSU_BIN`, exported by
//! `scripts/test`); skipped, with a notice, without a broker.

#[path = "support/orders_kafka.rs"]
mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faust_tests::kafka_front::{BrokerBehindFront, FrontConfig, FrontSasl, TestPki};
use faust_transport::{
    BatchBuilder, CoreTransport, Error, KafkaCore, KafkaOptions, KafkaTransport, OffsetSpec, SaslMechanism,
    SaslOptions, TlsOptions, TopicConfig, TopicPartition, Transport,
};
use support::*;

/// The certificates of a test, written where the client reads them.
struct Pki {
    pki: TestPki,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = TestPki::generate();
        let dir = tempfile::tempdir().unwrap();
        for (name, pem) in [
            ("ca.pem", &pki.ca_pem),
            ("other-ca.pem", &pki.other_ca_pem),
            ("client.pem", &pki.client_cert_pem),
            ("client-key.pem", &pki.client_key_pem),
            ("other-client.pem", &pki.other_client_cert_pem),
            ("other-client-key.pem", &pki.other_client_key_pem),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Pki { pki, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// TLS trusting `ca` (a file name), with a client certificate if named.
    fn tls(&self, ca: &str, client: Option<(&str, &str)>) -> TlsOptions {
        TlsOptions {
            ca_file: Some(self.path(ca)),
            client_cert: client.map(|(c, k)| (self.path(c), self.path(k))),
            server_name: None,
        }
    }
}

fn start(test: &str, config: FrontConfig) -> Option<BrokerBehindFront> {
    tansu(test)?;
    BrokerBehindFront::start(config)
}

fn options(tls: Option<TlsOptions>, sasl: Option<SaslOptions>) -> KafkaOptions {
    KafkaOptions {
        request_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(50),
        tls,
        sasl,
        ..KafkaOptions::default()
    }
}

fn sasl(mechanism: SaslMechanism, password: &str) -> Option<SaslOptions> {
    Some(SaslOptions { mechanism, username: "alice".into(), password: password.into() })
}

/// Runs `f` on a glommio executor with a core of a transport to `addr` with `options`.
fn on_core<T, F, Fut>(addr: &str, options: KafkaOptions, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(KafkaCore) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let t = KafkaTransport::open(&format!("kafka://{addr}"), options).expect("open");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let core = t.attach_core(0, 1).await.expect("attach");
            f(core).await
        })
        .expect("executor")
        .join()
        .expect("join")
}

fn batch(from: u32, n: u32) -> BatchBuilder {
    let mut b = BatchBuilder::new();
    for i in from..from + n {
        b.push(i64::from(i), Some(format!("k{i}").as_bytes()), Some(format!("v{i}").as_bytes()), &[]);
    }
    b
}

/// Creates a topic, produces 50 records, reads them back: the values, in order.
async fn round_trip(core: KafkaCore, topic: &str) -> Result<Vec<String>, Error> {
    core.create_topic(topic, &TopicConfig::new(1)).await?;
    let tp = TopicPartition::new(topic, 0);
    core.produce(&tp, batch(0, 50)).await?;
    let mut values = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while values.len() < 50 && Instant::now() < deadline {
        let fetched = core.fetch(&tp, values.len() as u64, 1 << 20, Duration::from_millis(200)).await?;
        values
            .extend(fetched.records.iter().map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap()).into_owned()));
    }
    Ok(values)
}

fn expected() -> Vec<String> {
    (0..50).map(|i| format!("v{i}")).collect()
}

fn round_trip_on(addr: &str, options: KafkaOptions) -> Result<Vec<String>, Error> {
    on_core(addr, options, |core| async move { round_trip(core, "secured").await })
}

#[test]
fn tls_verifies_the_broker_and_carries_the_records() {
    let pki = Pki::new();
    let config = FrontConfig { tls: Some(pki.pki.server_tls(false)), sasl: None };
    let Some(b) = start("tls_verifies_the_broker_and_carries_the_records", config) else { return };
    let addr = b.addr().to_string();
    assert_eq!(round_trip_on(&addr, options(Some(pki.tls("ca.pem", None)), None)).unwrap(), expected());

    // A client that trusts another CA refuses the broker: typed, naming the broker, not retried.
    let failures = b.front.stats().tls_handshake_failures;
    let started = Instant::now();
    let e = round_trip_on(&addr, options(Some(pki.tls("other-ca.pem", None)), None)).unwrap_err();
    assert!(matches!(&e, Error::KafkaTls { broker, .. } if broker == &addr), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a refused certificate is not retried: {:?}",
        started.elapsed()
    );
    assert_eq!(b.front.stats().tls_handshake_failures, failures + 1);

    // A name the certificate does not hold is refused too.
    let wrong_name = TlsOptions { server_name: Some("kafka.example.com".into()), ..pki.tls("ca.pem", None) };
    let e = round_trip_on(&addr, options(Some(wrong_name), None)).unwrap_err();
    assert!(matches!(e, Error::KafkaTls { .. }), "{e}");

    // Plain text to a TLS listener fails rather than hangs.
    let e = round_trip_on(&addr, KafkaOptions { retries: 0, ..options(None, None) }).unwrap_err();
    assert!(matches!(e, Error::KafkaConnection { .. } | Error::KafkaTimeout { .. }), "{e}");
}

#[test]
fn client_certificates_are_presented_and_checked() {
    let pki = Pki::new();
    let config = FrontConfig { tls: Some(pki.pki.server_tls(true)), sasl: None };
    let Some(b) = start("client_certificates_are_presented_and_checked", config) else { return };
    let addr = b.addr().to_string();
    let ours = options(Some(pki.tls("ca.pem", Some(("client.pem", "client-key.pem")))), None);
    assert_eq!(round_trip_on(&addr, ours).unwrap(), expected());

    for (what, client) in
        [("no certificate", None), ("another CA's", Some(("other-client.pem", "other-client-key.pem")))]
    {
        let e = round_trip_on(&addr, options(Some(pki.tls("ca.pem", client)), None)).unwrap_err();
        assert!(matches!(&e, Error::KafkaTls { broker, .. } if broker == &addr), "{what}: {e}");
    }

    // A missing key file is a settings error at open, naming the file.
    let missing =
        TlsOptions { client_cert: Some((pki.path("client.pem"), pki.path("nowhere.pem"))), ..pki.tls("ca.pem", None) };
    let e = KafkaTransport::open(&format!("kafka://{addr}"), options(Some(missing), None)).unwrap_err();
    assert!(matches!(&e, Error::TlsConfig { reason } if reason.contains("nowhere.pem")), "{e}");
}

fn sasl_case(test: &str, tls: bool, mechanism: SaslMechanism) {
    let pki = Pki::new();
    let config = FrontConfig {
        tls: tls.then(|| pki.pki.server_tls(false)),
        sasl: Some(FrontSasl::new(&[mechanism.name()], "alice", "pencil")),
    };
    let Some(b) = start(test, config) else { return };
    let addr = b.addr().to_string();
    let tls_options = tls.then(|| pki.tls("ca.pem", None));
    assert_eq!(round_trip_on(&addr, options(tls_options.clone(), sasl(mechanism, "pencil"))).unwrap(), expected());
    let stats = b.front.stats();
    assert!(stats.sasl_successes >= 1 && stats.sasl_failures == 0, "{stats:?}");

    // A wrong password: one refusal, typed, naming the mechanism and the user; never retried.
    let started = Instant::now();
    let e = round_trip_on(&addr, options(tls_options.clone(), sasl(mechanism, "crayon"))).unwrap_err();
    match &e {
        Error::KafkaAuth { broker, mechanism: m, username, .. } => {
            assert_eq!((broker.as_str(), *m, username.as_str()), (addr.as_str(), mechanism.name(), "alice"));
        }
        other => panic!("expected an authentication error, got {other}"),
    }
    assert!(!e.to_string().contains("crayon"), "the password is not in the error: {e}");
    assert_eq!(b.front.stats().sasl_failures, 1, "the wrong password was tried once");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    // No credentials at all: the front closes the connection at the first request that is not
    // part of authentication.
    let e = round_trip_on(&addr, KafkaOptions { retries: 0, ..options(tls_options, None) }).unwrap_err();
    assert!(matches!(e, Error::KafkaConnection { .. }), "{e}");
    assert!(b.front.stats().refused_before_auth >= 1);
}

#[test]
fn sasl_plain_over_plain_text() {
    sasl_case("sasl_plain_over_plain_text", false, SaslMechanism::Plain);
}

#[test]
fn sasl_scram_sha_256_over_plain_text() {
    sasl_case("sasl_scram_sha_256_over_plain_text", false, SaslMechanism::ScramSha256);
}

#[test]
fn sasl_scram_sha_512_over_tls() {
    sasl_case("sasl_scram_sha_512_over_tls", true, SaslMechanism::ScramSha512);
}

#[test]
fn a_mechanism_the_broker_does_not_offer_is_refused_by_name() {
    let config = FrontConfig { tls: None, sasl: Some(FrontSasl::new(&["SCRAM-SHA-512"], "alice", "pencil")) };
    let Some(b) = start("a_mechanism_the_broker_does_not_offer_is_refused_by_name", config) else { return };
    let e = round_trip_on(&b.addr().to_string(), options(None, sasl(SaslMechanism::Plain, "pencil"))).unwrap_err();
    assert!(matches!(e, Error::KafkaAuth { .. }), "{e}");
    assert!(e.to_string().contains("SCRAM-SHA-512"), "the error lists what the broker offers: {e}");
}

/// Produces 50 records while the front cuts the connection after the first Produce request
/// reached the broker (the broker wrote the batch, the client never heard): the client retries.
/// Returns every record of the partition, and what the produce reported.
fn produce_through_a_cut(b: &BrokerBehindFront, topic: &'static str, idempotent: bool) -> (Vec<String>, (u64, u64)) {
    let addr = b.addr().to_string();
    let front = &b.front;
    let opts = KafkaOptions { idempotent, ..options(None, None) };
    // Topic and producer id first, so that the cut falls on the Produce itself.
    let warm = opts.clone();
    on_core(&addr, warm, move |core| async move {
        core.create_topic(topic, &TopicConfig::new(1)).await.unwrap();
    });
    let cuts = front.stats().connections_cut;
    front.cut_after_request(0, 1);
    let produced = on_core(&addr, opts.clone(), move |core| async move {
        let tp = TopicPartition::new(topic, 0);
        let produced = core.produce(&tp, batch(0, 50)).await.expect("the retried produce succeeds");
        let end = core.list_offset(&tp, OffsetSpec::Latest).await.unwrap();
        let mut values = Vec::new();
        while (values.len() as u64) < end {
            let fetched = core.fetch(&tp, values.len() as u64, 1 << 20, Duration::from_millis(200)).await.unwrap();
            values.extend(
                fetched.records.iter().map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap()).into_owned()),
            );
        }
        (values, (produced.base_offset, produced.last_offset))
    });
    assert_eq!(front.stats().connections_cut, cuts + 1, "the front cut the connection once");
    produced
}

#[test]
fn a_produce_whose_answer_is_lost_is_written_once() {
    let Some(b) = start("a_produce_whose_answer_is_lost_is_written_once", FrontConfig::default()) else { return };
    let (values, (base, last)) = produce_through_a_cut(&b, "idempotent", true);
    assert_eq!(values, expected(), "written exactly once, in order");
    assert_eq!((base, last), (0, 49), "the retry reports the offsets of the batch it wrote");

    // The same cut without idempotence writes the batch twice: the test does catch duplicates.
    let (values, _) = produce_through_a_cut(&b, "not-idempotent", false);
    assert_eq!(values.len(), 100, "{values:?}");
}

/// The orders example's worker, configured from the environment, counts exactly through TLS
/// and SCRAM-SHA-512 (its group membership, fetches, produces and commits all go through
/// the front); with a wrong password it stops at once with an error that says so.
#[test]
fn a_worker_counts_orders_through_tls_and_scram() {
    let pki = Pki::new();
    let config = FrontConfig {
        tls: Some(pki.pki.server_tls(false)),
        sasl: Some(FrontSasl::new(&["SCRAM-SHA-512"], "alice", "pencil")),
    };
    let Some(b) = start("a_worker_counts_orders_through_tls_and_scram", config) else { return };
    let addr = b.addr().to_string();
    let orders = 20_000;
    let producer = options(Some(pki.tls("ca.pem", None)), sasl(SaslMechanism::ScramSha512, "pencil"));
    let truth = produce_orders_with(&addr, producer, 0, orders);

    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("worker.log"));
    let ca = pki.path("ca.pem");
    let env = |password: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("BROKER_SSL_CAFILE", ca.display().to_string()),
            ("BROKER_SASL_MECHANISM", "SCRAM-SHA-512".into()),
            ("BROKER_SASL_USERNAME", "alice".into()),
            ("BROKER_SASL_PASSWORD", password.into()),
            // On failure the log says where the worker was.
            ("RUST_LOG", "info,faust_transport=debug".into()),
        ]
    };
    let run = |password: &'static str, log: &Path| {
        let vars = env(password);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        worker_env(&addr, &data, log, &[], &vars)
    };
    let mut child = run("pencil", &log);
    let counted = wait_for_counts(&mut child, &data, &log, orders, Duration::from_secs(120));
    assert_exact(&counted, &truth, "through TLS and SCRAM-SHA-512");
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert_eq!(b.front.stats().sasl_failures, 0);

    let bad_log = dir.path().join("bad.log");
    let mut child = run("crayon", &bad_log);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "a worker with a wrong password kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&bad_log).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(text.contains("SASL SCRAM-SHA-512 authentication of user `alice` failed"), "{text}");
    assert!(!text.contains("crayon"), "the password is not logged: {text}");
}
