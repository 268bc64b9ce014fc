//! Tests of the Kafka front (`faust_tests::kafka_front`) itself, with clients independent of
//! ours: aiokafka (Python, `tests/tests/support/front_client.py`) for TLS and SASL, and
//! hand-encoded requests over raw sockets for what the front answers itself. Each test starts
//! its own tansu behind its own front, and skips (with a notice) without tansu or without the
//! Python virtual environment that `scripts/test` makes.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use faust_tests::kafka_front::{BrokerBehindFront, FrontConfig, FrontSasl, FrontStats, TestPki};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pässword";

/// The Python with aiokafka, or `None` (after printing why the test is skipped).
fn python(test: &str) -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let candidates = [
            std::env::var_os("FAUST_TEST_PYTHON").filter(|p| !p.is_empty()).map(PathBuf::from),
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/faust-venv/bin/python")),
        ];
        candidates.into_iter().flatten().find(|python| {
            Command::new(python)
                .args(["-c", "import aiokafka"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    });
    if found.is_none() {
        eprintln!("skipping {test}: no Python with aiokafka (target/faust-venv, made by scripts/test)");
    }
    found.clone()
}

/// The front and tansu, and the Python client, or `None` when either is missing.
fn setup(test: &str, config: FrontConfig) -> Option<(BrokerBehindFront, PathBuf)> {
    let python = python(test)?;
    let broker = BrokerBehindFront::start(config)?;
    Some((broker, python))
}

/// How the Python client connects.
#[derive(Default)]
struct Client<'a> {
    protocol: &'a str,
    mechanism: &'a str,
    password: &'a str,
    /// The CA the client trusts (PEM).
    ca: Option<&'a str>,
    /// The client's certificate and key (PEM).
    cert: Option<(&'a str, &'a str)>,
}

/// The Python client's outcome: whether it succeeded, and its output (JSON line and stderr).
struct Outcome {
    ok: bool,
    output: String,
}

fn run_client(python: &Path, broker: &BrokerBehindFront, topic: &str, client: &Client<'_>) -> Outcome {
    let dir = tempfile::TempDir::new().expect("a temporary directory");
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/front_client.py");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .args(["--bootstrap", &broker.addr().to_string(), "--protocol", client.protocol, "--topic", topic])
        .args(["--timeout", "25"]);
    if !client.mechanism.is_empty() {
        command.args(["--mechanism", client.mechanism, "--user", USER, "--password", client.password]);
    }
    if let Some(ca) = client.ca {
        command.arg("--cafile").arg(write("ca.pem", ca));
    }
    if let Some((cert, key)) = client.cert {
        command.arg("--certfile").arg(write("client.pem", cert)).arg("--keyfile").arg(write("client.key", key));
    }
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start the Python client");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the Python client") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let output = format!("{stdout}{stderr}");
    let ok = status.is_some_and(|s| s.success());
    if ok {
        let line = stdout.lines().last().expect("a JSON result line");
        let result: serde_json::Value = serde_json::from_str(line).expect("the result is JSON");
        assert_eq!(result["ok"], true, "{output}");
        assert_eq!(result["consumed"], serde_json::json!(["record-0", "record-1", "record-2"]), "{output}");
    } else {
        assert!(status.is_some(), "the Python client did not finish within 40 s: {output}");
    }
    Outcome { ok, output }
}

/// Waits (at most 3 s) until the front's counters satisfy `check`; returns them.
fn stats_until(broker: &BrokerBehindFront, check: impl Fn(&FrontStats) -> bool) -> FrontStats {
    let started = Instant::now();
    loop {
        let stats = broker.front.stats();
        if check(&stats) || started.elapsed() > Duration::from_secs(3) {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sasl(mechanism: &str) -> Option<FrontSasl> {
    Some(FrontSasl::new(&[mechanism], USER, PASSWORD))
}

fn assert_succeeds(outcome: &Outcome) {
    assert!(outcome.ok, "the client failed:\n{}", outcome.output);
}

fn assert_fails(outcome: &Outcome, expected: &[&str]) {
    assert!(!outcome.ok, "the client succeeded where it should not have:\n{}", outcome.output);
    assert!(
        expected.iter().any(|e| outcome.output.contains(e)),
        "the failure mentions none of {expected:?}:\n{}",
        outcome.output
    );
}

#[test]
fn plain_tcp_without_sasl_passes_through() {
    let Some((broker, python)) = setup("plain_tcp_without_sasl_passes_through", FrontConfig::default()) else {
        return;
    };
    let client = Client { protocol: "PLAINTEXT", ..Client::default() };
    assert_succeeds(&run_client(&python, &broker, "front-plain", &client));
    let stats = broker.front.stats();
    assert!(stats.connections >= 1, "{stats:?}");
    assert_eq!((stats.sasl_successes, stats.sasl_failures, stats.refused_before_auth), (0, 0, 0), "{stats:?}");
}

/// A right password works; a wrong one fails with SASL_AUTHENTICATION_FAILED's message and
/// counts a failure.
fn sasl_case(test: &str, mechanism: &str, right: bool) {
    let config = FrontConfig { tls: None, sasl: sasl(mechanism) };
    let Some((broker, python)) = setup(test, config) else { return };
    let password = if right { PASSWORD } else { "not-the-password" };
    let client = Client { protocol: "SASL_PLAINTEXT", mechanism, password, ..Client::default() };
    let outcome = run_client(&python, &broker, test, &client);
    if right {
        assert_succeeds(&outcome);
        let stats = broker.front.stats();
        // The admin client, the producer and the consumer each authenticate at least once.
        assert!(stats.sasl_successes >= 3, "{stats:?}");
        assert_eq!((stats.sasl_failures, stats.refused_before_auth), (0, 0), "{stats:?}");
    } else {
        assert_fails(&outcome, &["SaslAuthenticationFailed", "Authentication failed"]);
        let stats = stats_until(&broker, |s| s.sasl_failures >= 1);
        assert!(stats.sasl_failures >= 1, "{stats:?}");
        assert_eq!(stats.sasl_successes, 0, "{stats:?}");
    }
}

#[test]
fn sasl_plain_right_password() {
    sasl_case("sasl_plain_right_password", "PLAIN", true);
}

#[test]
fn sasl_plain_wrong_password_fails() {
    sasl_case("sasl_plain_wrong_password_fails", "PLAIN", false);
}

#[test]
fn scram_sha_256_right_password() {
    sasl_case("scram_sha_256_right_password", "SCRAM-SHA-256", true);
}

#[test]
fn scram_sha_256_wrong_password_fails() {
    sasl_case("scram_sha_256_wrong_password_fails", "SCRAM-SHA-256", false);
}

#[test]
fn scram_sha_512_right_password() {
    sasl_case("scram_sha_512_right_password", "SCRAM-SHA-512", true);
}

#[test]
fn scram_sha_512_wrong_password_fails() {
    sasl_case("scram_sha_512_wrong_password_fails", "SCRAM-SHA-512", false);
}

#[test]
fn tls_verified_against_the_test_ca() {
    let pki = TestPki::generate();
    let config = FrontConfig { tls: Some(pki.server_tls(false)), sasl: None };
    let Some((broker, python)) = setup("tls_verified_against_the_test_ca", config) else { return };
    let client = Client { protocol: "SSL", ca: Some(&pki.ca_pem), ..Client::default() };
    assert_succeeds(&run_client(&python, &broker, "front-tls", &client));
    assert_eq!(broker.front.stats().tls_handshake_failures, 0);
}

#[test]
fn tls_client_trusting_another_ca_fails() {
    let pki = TestPki::generate();
    let config = FrontConfig { tls: Some(pki.server_tls(false)), sasl: None };
    let Some((broker, python)) = setup("tls_client_trusting_another_ca_fails", config) else { return };
    let client = Client { protocol: "SSL", ca: Some(&pki.other_ca_pem), ..Client::default() };
    let outcome = run_client(&python, &broker, "front-tls-other-ca", &client);
    assert_fails(&outcome, &["CERTIFICATE_VERIFY_FAILED", "certificate verify failed"]);
    let stats = stats_until(&broker, |s| s.tls_handshake_failures >= 1);
    assert!(stats.tls_handshake_failures >= 1, "{stats:?}");
}

#[test]
fn mtls_with_the_ca_signed_client_certificate() {
    let pki = TestPki::generate();
    let config = FrontConfig { tls: Some(pki.server_tls(true)), sasl: None };
    let Some((broker, python)) = setup("mtls_with_the_ca_signed_client_certificate", config) else { return };
    let cert = Some((pki.client_cert_pem.as_str(), pki.client_key_pem.as_str()));
    let client = Client { protocol: "SSL", ca: Some(&pki.ca_pem), cert, ..Client::default() };
    assert_succeeds(&run_client(&python, &broker, "front-mtls", &client));
    assert_eq!(broker.front.stats().tls_handshake_failures, 0);
}

#[test]
fn mtls_without_a_client_certificate_fails() {
    let pki = TestPki::generate();
    let config = FrontConfig { tls: Some(pki.server_tls(true)), sasl: None };
    let Some((broker, python)) = setup("mtls_without_a_client_certificate_fails", config) else { return };
    let client = Client { protocol: "SSL", ca: Some(&pki.ca_pem), ..Client::default() };
    let outcome = run_client(&python, &broker, "front-mtls-none", &client);
    assert_fails(&outcome, &["CERTIFICATE_REQUIRED", "certificate required", "Unable to bootstrap"]);
    let stats = stats_until(&broker, |s| s.tls_handshake_failures >= 1);
    assert!(stats.tls_handshake_failures >= 1, "{stats:?}");
}

#[test]
fn mtls_with_another_cas_client_certificate_fails() {
    let pki = TestPki::generate();
    let config = FrontConfig { tls: Some(pki.server_tls(true)), sasl: None };
    let Some((broker, python)) = setup("mtls_with_another_cas_client_certificate_fails", config) else {
        return;
    };
    let cert = Some((pki.other_client_cert_pem.as_str(), pki.other_client_key_pem.as_str()));
    let client = Client { protocol: "SSL", ca: Some(&pki.ca_pem), cert, ..Client::default() };
    let outcome = run_client(&python, &broker, "front-mtls-other", &client);
    assert_fails(&outcome, &["UNKNOWN_CA", "unknown ca", "BAD_CERTIFICATE", "bad certificate", "Unable to bootstrap"]);
    let stats = stats_until(&broker, |s| s.tls_handshake_failures >= 1);
    assert!(stats.tls_handshake_failures >= 1, "{stats:?}");
}

#[test]
fn tls_with_scram_sha_512() {
    let pki = TestPki::generate();
    let config = FrontConfig { tls: Some(pki.server_tls(false)), sasl: sasl("SCRAM-SHA-512") };
    let Some((broker, python)) = setup("tls_with_scram_sha_512", config) else { return };
    let client = Client {
        protocol: "SASL_SSL",
        mechanism: "SCRAM-SHA-512",
        password: PASSWORD,
        ca: Some(&pki.ca_pem),
        ..Client::default()
    };
    assert_succeeds(&run_client(&python, &broker, "front-tls-scram", &client));
    let stats = broker.front.stats();
    assert!(stats.sasl_successes >= 3, "{stats:?}");
    assert_eq!((stats.tls_handshake_failures, stats.sasl_failures), (0, 0), "{stats:?}");
}

// Raw protocol, hand-encoded: what the front answers itself.

const CLIENT_ID: &[u8] = b"front-raw";

/// A request frame with a v1 header (api key, version, correlation id, client id).
fn request(api_key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    message.extend_from_slice(&api_key.to_be_bytes());
    message.extend_from_slice(&version.to_be_bytes());
    message.extend_from_slice(&correlation_id.to_be_bytes());
    message.extend_from_slice(&(CLIENT_ID.len() as i16).to_be_bytes());
    message.extend_from_slice(CLIENT_ID);
    message.extend_from_slice(body);
    sized(&message)
}

/// `message` behind its 4-byte size.
fn sized(message: &[u8]) -> Vec<u8> {
    let mut frame = (message.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(message);
    frame
}

/// A Kafka STRING (i16 length).
fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as i16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn connect(broker: &BrokerBehindFront) -> TcpStream {
    let stream = TcpStream::connect(broker.addr()).expect("connect to the front");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    stream
}

/// The next frame's message (without its size).
fn read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let mut message = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut message)?;
    Ok(message)
}

/// Asserts that the peer closes the connection without sending anything.
fn assert_closed_silently(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection closed, got {n} bytes: {:?}", &buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the connection closed: {e}"),
    }
}

/// Reads an ApiVersions v0 answer: its correlation id and its api keys.
fn api_versions_v0(stream: &mut TcpStream) -> (i32, Vec<i16>) {
    let message = read_frame(stream).expect("an ApiVersions answer");
    let correlation_id = i32::from_be_bytes(message[0..4].try_into().expect("4 bytes"));
    let error_code = i16::from_be_bytes(message[4..6].try_into().expect("2 bytes"));
    assert_eq!(error_code, 0);
    let count = i32::from_be_bytes(message[6..10].try_into().expect("4 bytes")) as usize;
    let keys = (0..count).map(|i| i16::from_be_bytes([message[10 + 6 * i], message[11 + 6 * i]])).collect();
    (correlation_id, keys)
}

/// A SaslHandshake v0/v1 answer: correlation id, error code, mechanisms.
fn handshake_answer(stream: &mut TcpStream) -> (i32, i16, Vec<String>) {
    let message = read_frame(stream).expect("a SaslHandshake answer");
    let correlation_id = i32::from_be_bytes(message[0..4].try_into().expect("4 bytes"));
    let error_code = i16::from_be_bytes(message[4..6].try_into().expect("2 bytes"));
    let count = i32::from_be_bytes(message[6..10].try_into().expect("4 bytes"));
    let mut at = 10;
    let mut mechanisms = Vec::new();
    for _ in 0..count {
        let len = i16::from_be_bytes([message[at], message[at + 1]]) as usize;
        mechanisms.push(String::from_utf8(message[at + 2..at + 2 + len].to_vec()).expect("utf-8"));
        at += 2 + len;
    }
    (correlation_id, error_code, mechanisms)
}

#[test]
fn request_before_authentication_is_refused() {
    let config = FrontConfig { tls: None, sasl: sasl("PLAIN") };
    let Some(broker) = BrokerBehindFront::start(config) else { return };
    let mut stream = connect(&broker);
    // ApiVersions is forwarded to the broker, which lists the SASL apis.
    stream.write_all(&request(18, 0, 1, &[])).expect("send ApiVersions");
    let (correlation_id, keys) = api_versions_v0(&mut stream);
    assert_eq!(correlation_id, 1);
    assert!(keys.contains(&17) && keys.contains(&36), "{keys:?}");
    // Metadata v0 (all topics: an empty array) before authenticating.
    stream.write_all(&request(3, 0, 2, &0i32.to_be_bytes())).expect("send Metadata");
    assert_closed_silently(&mut stream);
    let stats = stats_until(&broker, |s| s.refused_before_auth >= 1);
    assert_eq!(stats.refused_before_auth, 1, "{stats:?}");
    assert_eq!((stats.sasl_successes, stats.sasl_failures), (0, 0), "{stats:?}");
}

#[test]
fn unsupported_mechanism_is_answered_with_the_offered_ones() {
    let config =
        FrontConfig { tls: None, sasl: Some(FrontSasl::new(&["SCRAM-SHA-256", "SCRAM-SHA-512"], USER, PASSWORD)) };
    let Some(broker) = BrokerBehindFront::start(config) else { return };
    let mut stream = connect(&broker);
    stream.write_all(&request(17, 1, 5, &string("PLAIN"))).expect("send SaslHandshake");
    let (correlation_id, error_code, mechanisms) = handshake_answer(&mut stream);
    assert_eq!((correlation_id, error_code), (5, 33));
    assert_eq!(mechanisms, ["SCRAM-SHA-256", "SCRAM-SHA-512"]);
    assert_closed_silently(&mut stream);
    assert_eq!(stats_until(&broker, |s| s.sasl_failures >= 1).sasl_failures, 1);
}

/// SaslAuthenticate v2 is a flexible version: compact bytes and tagged fields in the request
/// (header v2) and in the answer (header v1).
#[test]
fn sasl_authenticate_v2_plain_then_pass_through() {
    let config = FrontConfig { tls: None, sasl: sasl("PLAIN") };
    let Some(broker) = BrokerBehindFront::start(config) else { return };
    let authenticate_v2 = |stream: &mut TcpStream, correlation_id: i32, password: &str| {
        let token = format!("\0{USER}\0{password}");
        let mut message = Vec::new();
        message.extend_from_slice(&36i16.to_be_bytes());
        message.extend_from_slice(&2i16.to_be_bytes());
        message.extend_from_slice(&correlation_id.to_be_bytes());
        message.extend_from_slice(&string("front-raw"));
        message.push(0); // header tagged fields
        assert!(token.len() + 1 < 128, "a one-byte varint");
        message.push(token.len() as u8 + 1); // compact bytes: length + 1
        message.extend_from_slice(token.as_bytes());
        message.push(0); // body tagged fields
        stream.write_all(&sized(&message)).expect("send SaslAuthenticate v2");
        let answer = read_frame(stream).expect("a SaslAuthenticate answer");
        assert_eq!(i32::from_be_bytes(answer[0..4].try_into().expect("4 bytes")), correlation_id);
        assert_eq!(answer[4], 0, "no header tagged fields");
        let error_code = i16::from_be_bytes([answer[5], answer[6]]);
        let message_len = answer[7] as usize; // compact nullable string: 0 is null, else length + 1
        let error_message =
            (message_len > 0).then(|| String::from_utf8(answer[8..8 + message_len - 1].to_vec()).expect("utf-8"));
        (error_code, error_message)
    };

    let mut stream = connect(&broker);
    stream.write_all(&request(17, 1, 1, &string("PLAIN"))).expect("send SaslHandshake");
    assert_eq!(handshake_answer(&mut stream).1, 0);
    assert_eq!(authenticate_v2(&mut stream, 2, PASSWORD), (0, None));
    // Authenticated: requests go to the broker.
    stream.write_all(&request(18, 0, 3, &[])).expect("send ApiVersions");
    assert_eq!(api_versions_v0(&mut stream).0, 3);

    let mut stream = connect(&broker);
    stream.write_all(&request(17, 1, 1, &string("PLAIN"))).expect("send SaslHandshake");
    assert_eq!(handshake_answer(&mut stream).1, 0);
    let (error_code, error_message) = authenticate_v2(&mut stream, 2, "wrong");
    assert_eq!(error_code, 58);
    assert!(error_message.is_some_and(|m| m.contains("Authentication failed")));
    assert_closed_silently(&mut stream);
    let stats = stats_until(&broker, |s| s.sasl_failures >= 1);
    assert_eq!((stats.sasl_successes, stats.sasl_failures), (1, 1), "{stats:?}");
}

/// After a v0 handshake, tokens travel bare (a size, then the token), without SaslAuthenticate.
#[test]
fn sasl_handshake_v0_takes_bare_tokens() {
    let config = FrontConfig { tls: None, sasl: sasl("PLAIN") };
    let Some(broker) = BrokerBehindFront::start(config) else { return };
    let mut stream = connect(&broker);
    stream.write_all(&request(17, 0, 1, &string("PLAIN"))).expect("send SaslHandshake v0");
    assert_eq!(handshake_answer(&mut stream), (1, 0, vec!["PLAIN".to_string()]));
    stream.write_all(&sized(format!("\0{USER}\0{PASSWORD}").as_bytes())).expect("send the PLAIN token");
    assert_eq!(read_frame(&mut stream).expect("an empty token"), Vec::<u8>::new());
    stream.write_all(&request(18, 0, 2, &[])).expect("send ApiVersions");
    assert_eq!(api_versions_v0(&mut stream).0, 2);
    assert_eq!(broker.front.stats().sasl_successes, 1);
}

#[test]
fn cut_after_request_closes_without_the_answer() {
    let Some(broker) = BrokerBehindFront::start(FrontConfig::default()) else { return };
    let mut stream = connect(&broker);
    stream.write_all(&request(18, 0, 1, &[])).expect("send ApiVersions");
    assert_eq!(api_versions_v0(&mut stream).0, 1);
    broker.front.cut_after_request(18, 1);
    stream.write_all(&request(18, 0, 2, &[])).expect("send ApiVersions");
    assert_closed_silently(&mut stream);
    assert_eq!(stats_until(&broker, |s| s.connections_cut >= 1).connections_cut, 1);
    // The cut is spent: a new connection is answered.
    let mut stream = connect(&broker);
    stream.write_all(&request(18, 0, 3, &[])).expect("send ApiVersions");
    assert_eq!(api_versions_v0(&mut stream).0, 3);
    assert_eq!(broker.front.stats().connections_cut, 1);
}

/// Dropping a front returns promptly with connections open in every state: idle in the TLS
/// handshake, and idle after it (piped to an upstream that never answers). No tansu needed.
#[test]
fn drop_is_prompt_with_open_connections() {
    use faust_tests::kafka_front::KafkaFront;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("a silent upstream");
    let upstream_addr = upstream.local_addr().expect("its address");
    let pki = TestPki::generate();
    let tls = KafkaFront::start(upstream_addr, FrontConfig { tls: Some(pki.server_tls(false)), sasl: None })
        .expect("start a TLS front");
    let plain = KafkaFront::start(upstream_addr, FrontConfig::default()).expect("start a plain front");
    let _in_handshake = TcpStream::connect(tls.addr()).expect("connect to the TLS front");
    let mut piped = TcpStream::connect(plain.addr()).expect("connect to the plain front");
    piped.write_all(&request(18, 0, 1, &[])).expect("send ApiVersions");
    let started = Instant::now();
    while (tls.stats().connections, plain.stats().connections) != (1, 1) {
        assert!(started.elapsed() < Duration::from_secs(3), "the fronts did not accept");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    drop(tls);
    drop(plain);
    assert!(started.elapsed() < Duration::from_secs(2), "dropping took {:?}", started.elapsed());
    piped.set_read_timeout(Some(Duration::from_secs(2))).expect("read timeout");
    assert_closed_silently(&mut piped);
}

/// A client that sends a nonsense frame loses its connection; the front serves the next.
#[test]
fn a_broken_client_ends_only_its_connection() {
    let Some(broker) = BrokerBehindFront::start(FrontConfig::default()) else { return };
    let mut broken = connect(&broker);
    broken.write_all(&(-5i32).to_be_bytes()).expect("send a negative frame size");
    assert_closed_silently(&mut broken);
    let mut stream = connect(&broker);
    stream.write_all(&request(18, 0, 7, &[])).expect("send ApiVersions");
    assert_eq!(api_versions_v0(&mut stream).0, 7);
}
