//! A TLS-terminating, SASL-checking front (a proxy) for a Kafka-protocol broker, so that a
//! client's TLS and SASL can be tested with real sockets and real handshakes against a broker
//! (tansu) that has neither.
//!
//! [`KafkaFront`] listens on loopback and opens one upstream TCP connection to the broker per
//! client connection. With [`FrontConfig::tls`] it terminates TLS (rustls, ring), optionally
//! requiring client certificates signed by a given CA. With [`FrontConfig::sasl`] it plays the
//! server side of Kafka's SASL exchange itself (`SaslHandshake`, then `SaslAuthenticate` with
//! PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) and only then pipes the connection to the broker;
//! before that it forwards `ApiVersions` (so the client sees the broker's versions) and closes
//! the connection on any other request.
//!
//! [`BrokerBehindFront`] starts a tansu broker of its own that advertises the front's address,
//! so clients that bootstrap through the front keep talking through it (Metadata and
//! FindCoordinator answers name the front). [`TestPki`] makes the certificates at run time.
//!
//! Serving is plain std: one acceptor thread and one thread per client connection, which
//! `poll(2)`s its two sockets. A failing connection ends that connection (logged to stderr);
//! dropping the front closes every connection and joins every thread.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use kafka_protocol::messages::{
    ApiKey, RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256, Sha512};

/// What a [`KafkaFront`] demands of its clients.
#[derive(Clone, Debug, Default)]
pub struct FrontConfig {
    /// TLS on the client side; `None`: plain TCP.
    pub tls: Option<FrontTls>,
    /// SASL authentication before anything but `ApiVersions` reaches the broker; `None`: none
    /// required.
    pub sasl: Option<FrontSasl>,
}

/// The front's TLS server side.
#[derive(Clone, Debug)]
pub struct FrontTls {
    /// The server's certificate chain (PEM, leaf first).
    pub cert_chain_pem: String,
    /// The server certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// `Some`: client certificates are required and must chain to one of these CA
    /// certificates (PEM); `None`: no client certificate is asked for.
    pub client_ca_pem: Option<String>,
}

/// The front's SASL server side.
#[derive(Clone, Debug)]
pub struct FrontSasl {
    /// The mechanisms offered, among `"PLAIN"`, `"SCRAM-SHA-256"` and `"SCRAM-SHA-512"`
    /// (others are listed in the handshake but fail to authenticate).
    pub mechanisms: Vec<String>,
    /// The accounts: (user, password).
    pub users: Vec<(String, String)>,
}

impl FrontSasl {
    /// One user, the given mechanisms.
    pub fn new(mechanisms: &[&str], user: &str, password: &str) -> FrontSasl {
        FrontSasl {
            mechanisms: mechanisms.iter().map(|m| m.to_string()).collect(),
            users: vec![(user.to_string(), password.to_string())],
        }
    }
}

/// Certificates for TLS tests, generated at run time (ECDSA P-256): a CA, a server
/// certificate for `127.0.0.1` and `localhost` and a client certificate both signed by it, and
/// an unrelated second CA with a client certificate of its own (for "wrong certificate" tests).
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The test CA's certificate (PEM).
    pub ca_pem: String,
    /// The server certificate (PEM), signed by the test CA; SANs: IP 127.0.0.1, DNS localhost.
    pub server_cert_pem: String,
    /// The server certificate's key (PKCS#8 PEM).
    pub server_key_pem: String,
    /// A client certificate (PEM), signed by the test CA.
    pub client_cert_pem: String,
    /// The client certificate's key (PKCS#8 PEM).
    pub client_key_pem: String,
    /// An unrelated CA's certificate (PEM).
    pub other_ca_pem: String,
    /// A client certificate (PEM) signed by the unrelated CA.
    pub other_client_cert_pem: String,
    /// That certificate's key (PKCS#8 PEM).
    pub other_client_key_pem: String,
}

impl TestPki {
    /// Generates a fresh set of certificates.
    ///
    /// # Panics
    ///
    /// When rcgen fails (it does not with these parameters).
    pub fn generate() -> TestPki {
        use rcgen::{ExtendedKeyUsagePurpose as Eku, SanType};
        let (ca, ca_key) = ca_certificate("faust test CA");
        let (other_ca, other_ca_key) = ca_certificate("faust unrelated CA");
        let server_sans = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into().expect("a DNS name")),
        ];
        let (server_cert_pem, server_key_pem) =
            leaf_certificate("localhost", server_sans, Eku::ServerAuth, &ca, &ca_key);
        let (client_cert_pem, client_key_pem) =
            leaf_certificate("faust-test-client", Vec::new(), Eku::ClientAuth, &ca, &ca_key);
        let (other_client_cert_pem, other_client_key_pem) =
            leaf_certificate("faust-other-client", Vec::new(), Eku::ClientAuth, &other_ca, &other_ca_key);
        TestPki {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            other_ca_pem: other_ca.pem(),
            other_client_cert_pem,
            other_client_key_pem,
        }
    }

    /// The front's TLS with the server certificate; with `require_client_cert`, client
    /// certificates signed by the test CA are required.
    pub fn server_tls(&self, require_client_cert: bool) -> FrontTls {
        FrontTls {
            cert_chain_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
            client_ca_pem: require_client_cert.then(|| self.ca_pem.clone()),
        }
    }
}

fn ca_certificate(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("a CA key");
    let cert = params.self_signed(&key).expect("a self-signed CA certificate");
    (cert, key)
}

fn leaf_certificate(
    name: &str,
    sans: Vec<rcgen::SanType>,
    usage: rcgen::ExtendedKeyUsagePurpose,
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> (String, String) {
    use rcgen::{CertificateParams, DnType, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("a leaf key");
    let cert = params.signed_by(&key, ca, ca_key).expect("a CA-signed certificate");
    (cert.pem(), key.serialize_pem())
}

/// The front's counters (see [`KafkaFront::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontStats {
    /// Client connections accepted.
    pub connections: u64,
    /// TLS handshakes that failed (either side rejected the other, or the client left).
    pub tls_handshake_failures: u64,
    /// SASL authentications that succeeded.
    pub sasl_successes: u64,
    /// SASL authentications that failed (wrong credentials, unsupported mechanism, bad
    /// messages).
    pub sasl_failures: u64,
    /// Connections closed because of a request other than `ApiVersions`, `SaslHandshake` and
    /// `SaslAuthenticate` before authentication.
    pub refused_before_auth: u64,
    /// Connections cut by [`KafkaFront::cut_after_request`].
    pub connections_cut: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    tls_handshake_failures: AtomicU64,
    sasl_successes: AtomicU64,
    sasl_failures: AtomicU64,
    refused_before_auth: AtomicU64,
    connections_cut: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the acceptor and the connection threads share.
struct Shared {
    upstream: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    sasl: Option<FrontSasl>,
    stop: AtomicBool,
    counters: Counters,
    /// Armed cuts: api key -> requests still to cut.
    cuts: Mutex<HashMap<i16, u32>>,
    /// Clones of every open connection's sockets (client first), by connection id, so that
    /// dropping the front can shut them down and unblock their threads.
    sockets: Mutex<HashMap<u64, Vec<TcpStream>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A lock that survives a panicked holder (the data are counters and socket clones).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Registers a socket of connection `id` (a clone, for shutdown on drop).
    fn register(&self, id: u64, socket: &TcpStream) {
        match socket.try_clone() {
            Ok(clone) => lock(&self.sockets).entry(id).or_default().push(clone),
            Err(e) => eprintln!("kafka front: connection {id}: cannot clone a socket for shutdown: {e}"),
        }
    }

    /// Shuts down and forgets connection `id`'s sockets.
    fn close(&self, id: u64) {
        if let Some(sockets) = lock(&self.sockets).remove(&id) {
            for s in sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Whether a request with `api_key` is to be cut (and counts it down).
    fn take_cut(&self, api_key: i16) -> bool {
        let mut cuts = lock(&self.cuts);
        match cuts.get_mut(&api_key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    cuts.remove(&api_key);
                }
                true
            }
            _ => false,
        }
    }
}

/// A TLS-terminating, SASL-checking proxy in front of one Kafka-protocol broker (see the
/// module documentation). Dropping it stops accepting, closes every connection and joins
/// every thread.
pub struct KafkaFront {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// How long a connection thread waits in `poll` before it looks at the stop flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Bounds on blocking socket operations of the serving threads.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cut connection waits for the answer it swallows before it closes anyway
/// (requests without answers, such as Produce with acks=0).
const CUT_WAIT: Duration = Duration::from_secs(1);
/// The largest frame accepted either way.
const MAX_FRAME: usize = 256 << 20;

impl KafkaFront {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (a broker address): see
    /// [`BrokerBehindFront`] for a broker that advertises the front.
    ///
    /// # Errors
    ///
    /// When the TLS configuration is unusable (bad PEM, key not matching) or the listener
    /// cannot be set up.
    pub fn start(upstream: SocketAddr, config: FrontConfig) -> io::Result<KafkaFront> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        KafkaFront::start_on(listener, upstream, config)
    }

    fn start_on(listener: TcpListener, upstream: SocketAddr, config: FrontConfig) -> io::Result<KafkaFront> {
        let tls = config.tls.as_ref().map(server_config).transpose()?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            tls,
            sasl: config.sasl,
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            cuts: Mutex::new(HashMap::new()),
            sockets: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("kafka-front-accept".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(KafkaFront { addr, shared, acceptor: Some(acceptor) })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters so far.
    pub fn stats(&self) -> FrontStats {
        let c = &self.shared.counters;
        FrontStats {
            connections: c.connections.load(Ordering::Relaxed),
            tls_handshake_failures: c.tls_handshake_failures.load(Ordering::Relaxed),
            sasl_successes: c.sasl_successes.load(Ordering::Relaxed),
            sasl_failures: c.sasl_failures.load(Ordering::Relaxed),
            refused_before_auth: c.refused_before_auth.load(Ordering::Relaxed),
            connections_cut: c.connections_cut.load(Ordering::Relaxed),
        }
    }

    /// Fault injection: each of the next `n` requests with `api_key` (on any connection,
    /// counted as they pass; adds to what is still armed) is forwarded to the broker, and then
    /// the connection that carried it is closed *before* the broker's answer is relayed: the
    /// broker applies the request, the client never learns it. Answers to requests sent
    /// earlier on that connection are still relayed; requests sent after it are dropped. The
    /// front waits for the swallowed answer (at most 1 s, for requests without one) and then
    /// closes both sides. Returns at once.
    pub fn cut_after_request(&self, api_key: i16, n: u32) {
        if n > 0 {
            *lock(&self.shared.cuts).entry(api_key).or_insert(0) += n;
        }
    }
}

impl KafkaFront {
    /// Stops accepting, closes every connection, joins every thread (idempotent).
    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // The acceptor is gone, so every connection thread is in `threads`; shutting the
        // sockets down unblocks their reads and writes, and they see the stop flag.
        for (_, sockets) in lock(&self.shared.sockets).drain() {
            for s in sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for KafkaFront {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("front TLS: {what}: {e}"))
}

fn server_config(tls: &FrontTls) -> io::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(tls.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error("certificate chain", e))?;
    if chain.is_empty() {
        return Err(tls_error("certificate chain", "no certificate in the PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).map_err(|e| tls_error("private key", e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions", e))?;
    let builder = match &tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.map_err(|e| tls_error("client CA", e))?).map_err(|e| tls_error("client CA", e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_error("client verifier", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| tls_error("server certificate", e))?;
    Ok(Arc::new(config))
}

/// Waits until one of `fds` is readable (or hung up, or in error) or `timeout` passed; returns
/// which are.
fn poll_readable<const N: usize>(fds: [RawFd; N], timeout: Duration) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a live, exclusively borrowed array of `N` initialised pollfd structs
    // for the whole call, and `N` is its length.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok([false; N]) } else { Err(e) };
    }
    Ok(pfds.map(|p| p.revents != 0))
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stopping() {
        match poll_readable([listener.as_raw_fd()], POLL_INTERVAL) {
            Ok([true]) => {}
            Ok([false]) => continue,
            Err(e) => {
                eprintln!("kafka front: poll on the listener: {e}");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        }
        let (client, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("kafka front: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        bump(&shared.counters.connections);
        let id = next_id;
        next_id += 1;
        // Registered here, before the thread exists, so that a drop racing with this
        // connection's start still shuts it down.
        shared.register(id, &client);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new().name(format!("kafka-front-{id}")).spawn(move || {
                if let Err(e) = serve(&shared, id, client)
                    && !shared.stopping()
                {
                    eprintln!("kafka front: connection {id} from {peer}: {e}");
                }
                shared.close(id);
            })
        };
        match thread {
            Ok(thread) => {
                let mut threads = lock(&shared.threads);
                threads.retain(|t| !t.is_finished());
                threads.push(thread);
            }
            Err(e) => {
                eprintln!("kafka front: cannot start a thread for {peer}: {e}");
                shared.close(id);
            }
        }
    }
}

/// The client side of a connection: plain TCP or TLS over it.
enum ClientIo {
    Plain(TcpStream),
    Tls(Box<rustls::ServerConnection>, TcpStream),
}

impl ClientIo {
    fn fd(&self) -> RawFd {
        match self {
            ClientIo::Plain(s) | ClientIo::Tls(_, s) => s.as_raw_fd(),
        }
    }

    /// One read from the socket (which `poll` found readable); appends what it decrypts to
    /// `out`. Returns false at the end of the stream (after appending what came before it).
    fn read_available(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        match self {
            ClientIo::Plain(s) => read_some(s, out),
            ClientIo::Tls(conn, sock) => {
                let n = match conn.read_tls(sock) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
                    Err(e) => return Err(e),
                };
                let state = match conn.process_new_packets() {
                    Ok(state) => state,
                    Err(e) => {
                        // Sends the alert rustls queued for the error.
                        let _ = flush_tls(conn, sock);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
                    }
                };
                let available = state.plaintext_bytes_to_read();
                let peer_closed = state.peer_has_closed();
                if available > 0 {
                    let len = out.len();
                    out.resize(len + available, 0);
                    conn.reader().read_exact(&mut out[len..])?;
                }
                flush_tls(conn, sock)?;
                Ok(n > 0 && !peer_closed)
            }
        }
    }

    /// Appends to `out` the plaintext that came in with the end of the TLS handshake (the
    /// client's first request often shares a segment with its Finished): it is in rustls
    /// already, so `poll` would not announce it.
    fn take_buffered(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if let ClientIo::Tls(conn, _) = self {
            let state = conn.process_new_packets().map_err(|e| invalid(format!("TLS: {e}")))?;
            let available = state.plaintext_bytes_to_read();
            if available > 0 {
                let len = out.len();
                out.resize(len + available, 0);
                conn.reader().read_exact(&mut out[len..])?;
            }
        }
        Ok(())
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        match self {
            ClientIo::Plain(s) => s.write_all(data),
            ClientIo::Tls(conn, sock) => {
                // rustls takes plaintext until its outgoing buffer is full (it returns 0
                // then): write, flush to the socket, repeat.
                let mut refused = 0;
                while !data.is_empty() {
                    let n = conn.writer().write(data)?;
                    flush_tls(conn, sock)?;
                    data = &data[n..];
                    refused = if n == 0 { refused + 1 } else { 0 };
                    if refused > 1 {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS takes no more plaintext"));
                    }
                }
                Ok(())
            }
        }
    }

    /// Sends TLS close_notify (best effort).
    fn close_notify(&mut self) {
        if let ClientIo::Tls(conn, sock) = self {
            conn.send_close_notify();
            let _ = flush_tls(conn, sock);
        }
    }
}

fn flush_tls(conn: &mut rustls::ServerConnection, sock: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One read from a socket into the end of `out`; false at the end of the stream.
fn read_some(s: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<bool> {
    const CHUNK: usize = 64 << 10;
    let len = out.len();
    out.resize(len + CHUNK, 0);
    let result = s.read(&mut out[len..]);
    match result {
        Ok(n) => {
            out.truncate(len + n);
            Ok(n > 0)
        }
        Err(e) => {
            out.truncate(len);
            if e.kind() == io::ErrorKind::Interrupted { Ok(true) } else { Err(e) }
        }
    }
}

/// Bytes received one way, cut into Kafka frames (4-byte big-endian size, then the message).
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    /// Where the first frame not handled yet starts.
    pos: usize,
}

impl Frames {
    /// The byte range (size prefix included) of the next complete frame, consumed.
    fn next_frame(&mut self) -> io::Result<Option<std::ops::Range<usize>>> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 4 {
            return Ok(None);
        }
        let size = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("frame size {size}")))?;
        if rest.len() < 4 + size {
            return Ok(None);
        }
        let range = self.pos..self.pos + 4 + size;
        self.pos = range.end;
        Ok(Some(range))
    }

    /// Drops the frames handled.
    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

fn frame_i16(frame: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
}

fn frame_i32(frame: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(frame.get(at..at + 4)?.try_into().ok()?))
}

/// Where a connection is in the SASL exchange.
enum Auth {
    /// Authenticated (or no SASL): everything is forwarded.
    Done,
    /// Waiting for `SaslHandshake`.
    Handshake,
    /// Mechanism chosen; `raw` after a v0 handshake (tokens come as bare size-prefixed frames,
    /// not in `SaslAuthenticate`).
    Authenticating { session: SaslSession, raw: bool },
}

/// What a connection does next.
enum Phase {
    Open,
    /// Waits for the broker's answers to the requests forwarded before authentication, relays
    /// them with the front's own answers queued behind them, then closes.
    Closing {
        deadline: Instant,
    },
    /// Waits for the answer with this correlation id, swallows it, closes.
    Cutting {
        correlation_id: i32,
        deadline: Instant,
    },
}

/// A connection's state beyond its sockets.
struct Conn<'a> {
    shared: &'a Shared,
    id: u64,
    client: ClientIo,
    upstream: TcpStream,
    auth: Auth,
    phase: Phase,
    /// Requests forwarded before authentication whose answers have not come back; the
    /// front's own answers wait behind them in `deferred` so that answers keep their order.
    awaiting_upstream: usize,
    deferred: Vec<Vec<u8>>,
}

fn serve(shared: &Shared, id: u64, socket: TcpStream) -> io::Result<()> {
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    let client = match &shared.tls {
        None => ClientIo::Plain(socket),
        Some(config) => {
            let mut sock = socket;
            let mut conn =
                rustls::ServerConnection::new(config.clone()).map_err(|e| io::Error::other(format!("TLS: {e}")))?;
            sock.set_read_timeout(Some(IO_TIMEOUT))?;
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut sock) {
                    bump(&shared.counters.tls_handshake_failures);
                    return Err(io::Error::new(e.kind(), format!("TLS handshake failed: {e}")));
                }
            }
            sock.set_read_timeout(None)?;
            ClientIo::Tls(Box::new(conn), sock)
        }
    };
    let upstream = TcpStream::connect_timeout(&shared.upstream, IO_TIMEOUT)
        .map_err(|e| io::Error::new(e.kind(), format!("connect to the broker at {}: {e}", shared.upstream)))?;
    upstream.set_nodelay(true)?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    shared.register(id, &upstream);
    let auth = if shared.sasl.is_some() { Auth::Handshake } else { Auth::Done };
    let mut conn =
        Conn { shared, id, client, upstream, auth, phase: Phase::Open, awaiting_upstream: 0, deferred: Vec::new() };
    conn.run()
}

impl Conn<'_> {
    fn run(&mut self) -> io::Result<()> {
        let mut from_client = Frames::default();
        let mut from_broker = Frames::default();
        self.client.take_buffered(&mut from_client.buf)?;
        if !self.on_client_bytes(&mut from_client)? {
            return Ok(());
        }
        loop {
            // Checked after registering the upstream socket: a drop that missed it has set
            // the flag already.
            if self.shared.stopping() {
                return Ok(());
            }
            let listen_to_client = match self.phase {
                Phase::Open => true,
                Phase::Closing { deadline } | Phase::Cutting { deadline, .. } => {
                    if Instant::now() >= deadline {
                        if matches!(self.phase, Phase::Cutting { .. }) {
                            bump(&self.shared.counters.connections_cut);
                        }
                        return Ok(());
                    }
                    false
                }
            };
            let ready = if listen_to_client {
                poll_readable([self.client.fd(), self.upstream.as_raw_fd()], POLL_INTERVAL)?
            } else {
                let [up] = poll_readable([self.upstream.as_raw_fd()], POLL_INTERVAL)?;
                [false, up]
            };
            if ready[0] {
                let open = self.client.read_available(&mut from_client.buf)?;
                if !self.on_client_bytes(&mut from_client)? {
                    return Ok(());
                }
                if !open {
                    return Ok(());
                }
            }
            if ready[1] {
                let open = read_some(&mut self.upstream, &mut from_broker.buf)?;
                if !self.on_broker_bytes(&mut from_broker)? {
                    return Ok(());
                }
                if !open {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the broker closed the connection"));
                }
            }
        }
    }

    /// Handles the complete frames from the client; false: close the connection now.
    fn on_client_bytes(&mut self, frames: &mut Frames) -> io::Result<bool> {
        // Consecutive frames to forward as they are, written in one go.
        let mut forward: Option<std::ops::Range<usize>> = None;
        while let Some(range) = frames.next_frame()? {
            if !matches!(self.phase, Phase::Open) {
                break;
            }
            if !matches!(self.auth, Auth::Done) {
                if let Some(f) = forward.take() {
                    self.upstream.write_all(&frames.buf[f])?;
                }
                if !self.before_auth(&frames.buf[range])? {
                    return Ok(false);
                }
                continue;
            }
            let frame = &frames.buf[range.clone()];
            forward = Some(forward.map_or(range.clone(), |f| f.start..range.end));
            if let Some(api_key) = frame_i16(frame, 4)
                && self.shared.take_cut(api_key)
            {
                self.start_cut(frame)?;
                break;
            }
        }
        if let Some(f) = forward.take() {
            self.upstream.write_all(&frames.buf[f])?;
        }
        if matches!(self.phase, Phase::Cutting { .. }) {
            // Whatever the client sends after the cut request never reaches the broker.
            frames.buf.clear();
            frames.pos = 0;
        } else {
            frames.compact();
        }
        Ok(true)
    }

    /// Notes a cut after `frame` (the caller forwards it).
    fn start_cut(&mut self, frame: &[u8]) -> io::Result<()> {
        let correlation_id = frame_i32(frame, 8).ok_or_else(|| invalid("a request too short for its header"))?;
        eprintln!(
            "kafka front: connection {}: cutting after request {} (correlation id {correlation_id})",
            self.id,
            frame_i16(frame, 4).unwrap_or(-1)
        );
        self.phase = Phase::Cutting { correlation_id, deadline: Instant::now() + CUT_WAIT };
        Ok(())
    }

    /// Relays the complete frames from the broker; false: close the connection now.
    fn on_broker_bytes(&mut self, frames: &mut Frames) -> io::Result<bool> {
        let mut relay: Option<std::ops::Range<usize>> = None;
        let mut keep_open = true;
        while let Some(range) = frames.next_frame()? {
            let frame = &frames.buf[range.clone()];
            if let Phase::Cutting { correlation_id, .. } = self.phase
                && frame_i32(frame, 4) == Some(correlation_id)
            {
                bump(&self.shared.counters.connections_cut);
                keep_open = false;
                break;
            }
            relay = Some(relay.map_or(range.clone(), |r| r.start..range.end));
            if self.awaiting_upstream > 0 {
                self.awaiting_upstream -= 1;
                if self.awaiting_upstream == 0 && !self.deferred.is_empty() {
                    if let Some(r) = relay.take() {
                        self.client.write_all(&frames.buf[r])?;
                    }
                    for answer in std::mem::take(&mut self.deferred) {
                        self.client.write_all(&answer)?;
                    }
                }
            }
        }
        if let Some(r) = relay.take() {
            self.client.write_all(&frames.buf[r])?;
        }
        frames.compact();
        if matches!(self.phase, Phase::Closing { .. }) && self.deferred.is_empty() {
            self.client.close_notify();
            return Ok(false);
        }
        Ok(keep_open)
    }

    /// An answer of the front's own, after the broker's answers still due.
    fn answer(&mut self, frame: Vec<u8>) -> io::Result<()> {
        if self.awaiting_upstream > 0 {
            self.deferred.push(frame);
            Ok(())
        } else {
            self.client.write_all(&frame)
        }
    }

    /// Closes once the answers due are out; false: close now.
    fn close_after_answers(&mut self) -> bool {
        if self.deferred.is_empty() {
            self.client.close_notify();
            false
        } else {
            self.phase = Phase::Closing { deadline: Instant::now() + IO_TIMEOUT };
            true
        }
    }

    fn refuse(&mut self, why: String) -> io::Result<bool> {
        bump(&self.shared.counters.refused_before_auth);
        eprintln!("kafka front: connection {}: refused before authentication: {why}", self.id);
        self.client.close_notify();
        Ok(false)
    }

    /// A frame before authentication completed; false: close now.
    fn before_auth(&mut self, frame: &[u8]) -> io::Result<bool> {
        let payload = &frame[4..];
        if let Auth::Authenticating { raw: true, .. } = self.auth {
            // After a v0 handshake the token comes bare, and so does the answer; a failure
            // just closes the connection.
            return match self.sasl_step(payload) {
                Ok(token) => {
                    let mut out = (token.len() as i32).to_be_bytes().to_vec();
                    out.extend_from_slice(&token);
                    self.answer(out)?;
                    Ok(true)
                }
                Err(_) => Ok(self.close_after_answers()),
            };
        }
        let Some(api_key) = frame_i16(payload, 0) else {
            return self.refuse("a frame too short for a request header".into());
        };
        match (api_key, &self.auth) {
            (18, _) => {
                // ApiVersions: the broker's answer tells the client the SASL versions.
                self.upstream.write_all(frame)?;
                if self.shared.take_cut(api_key) {
                    self.start_cut(frame)?;
                } else {
                    self.awaiting_upstream += 1;
                }
                Ok(true)
            }
            (17, Auth::Handshake) => {
                let (header, mut body) = decode_header(payload)?;
                let request = SaslHandshakeRequest::decode(&mut body, header.request_api_version).map_err(invalid)?;
                let sasl = self.shared.sasl.as_ref().ok_or_else(|| invalid("no SASL configured"))?;
                let offered: Vec<StrBytes> = sasl.mechanisms.iter().map(|m| StrBytes::from_string(m.clone())).collect();
                let requested = request.mechanism.to_string();
                let chosen = sasl.mechanisms.contains(&requested);
                let error_code = if chosen { 0 } else { UNSUPPORTED_SASL_MECHANISM };
                let response = SaslHandshakeResponse::default().with_error_code(error_code).with_mechanisms(offered);
                self.answer(encode_response(ApiKey::SaslHandshake, &header, &response)?)?;
                if !chosen {
                    bump(&self.shared.counters.sasl_failures);
                    eprintln!("kafka front: connection {}: SASL mechanism {requested:?} not offered", self.id);
                    return Ok(self.close_after_answers());
                }
                let session = SaslSession::new(&requested);
                self.auth = Auth::Authenticating { session, raw: header.request_api_version == 0 };
                Ok(true)
            }
            (36, Auth::Authenticating { .. }) => {
                let (header, mut body) = decode_header(payload)?;
                let request =
                    SaslAuthenticateRequest::decode(&mut body, header.request_api_version).map_err(invalid)?;
                let (response, failed) = match self.sasl_step(&request.auth_bytes) {
                    Ok(token) => (
                        SaslAuthenticateResponse::default()
                            .with_error_message(None)
                            .with_auth_bytes(Bytes::from(token)),
                        false,
                    ),
                    Err(message) => (
                        SaslAuthenticateResponse::default()
                            .with_error_code(SASL_AUTHENTICATION_FAILED)
                            .with_error_message(Some(StrBytes::from_string(message))),
                        true,
                    ),
                };
                self.answer(encode_response(ApiKey::SaslAuthenticate, &header, &response)?)?;
                Ok(if failed { self.close_after_answers() } else { true })
            }
            _ => {
                let version = frame_i16(payload, 2).unwrap_or(-1);
                self.refuse(format!("request with api key {api_key} (version {version})"))
            }
        }
    }

    /// Feeds a client token to the SASL session: the server's token, or the failure's
    /// message. Counts and logs the outcome, and ends authentication on success.
    fn sasl_step(&mut self, token: &[u8]) -> Result<Vec<u8>, String> {
        let shared = self.shared;
        let Auth::Authenticating { session, .. } = &mut self.auth else {
            return Err("Authentication failed: no SASL handshake".into());
        };
        let users = shared.sasl.as_ref().map_or(&[][..], |s| &s.users[..]);
        match session.step(token, users) {
            Step::Continue(token) => Ok(token),
            Step::Success(token) => {
                bump(&shared.counters.sasl_successes);
                self.auth = Auth::Done;
                Ok(token)
            }
            Step::Failure(message) => {
                bump(&shared.counters.sasl_failures);
                eprintln!("kafka front: connection {}: {message}", self.id);
                Err(message)
            }
        }
    }
}

/// Kafka's UNSUPPORTED_SASL_MECHANISM.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
/// Kafka's SASL_AUTHENTICATION_FAILED.
const SASL_AUTHENTICATION_FAILED: i16 = 58;

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// A request's header (decoded with the header version of its api and version) and its body.
fn decode_header(payload: &[u8]) -> io::Result<(RequestHeader, &[u8])> {
    let api_key = frame_i16(payload, 0).ok_or_else(|| invalid("a request too short for its header"))?;
    let version = frame_i16(payload, 2).ok_or_else(|| invalid("a request too short for its header"))?;
    let key = ApiKey::try_from(api_key).map_err(|()| invalid(format!("unknown api key {api_key}")))?;
    let mut body = payload;
    let header = RequestHeader::decode(&mut body, key.request_header_version(version)).map_err(invalid)?;
    Ok((header, body))
}

/// A response frame (size, header, body) answering the request with `header`.
fn encode_response<M: Encodable>(api_key: ApiKey, header: &RequestHeader, body: &M) -> io::Result<Vec<u8>> {
    let version = header.request_api_version;
    let mut out = vec![0u8; 4];
    ResponseHeader::default()
        .with_correlation_id(header.correlation_id)
        .encode(&mut out, api_key.response_header_version(version))
        .map_err(invalid)?;
    body.encode(&mut out, version).map_err(invalid)?;
    let size = i32::try_from(out.len() - 4).map_err(invalid)?;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Ok(out)
}

/// The outcome of one SASL step.
enum Step {
    /// The server's token; more client tokens expected.
    Continue(Vec<u8>),
    /// Authenticated; the server's last token (maybe empty).
    Success(Vec<u8>),
    /// Not authenticated: the message for the client.
    Failure(String),
}

/// The server side of one SASL exchange.
enum SaslSession {
    Plain,
    Scram(ScramServer),
    /// A mechanism offered in the configuration that the front cannot play.
    Unsupported(String),
}

impl SaslSession {
    fn new(mechanism: &str) -> SaslSession {
        match mechanism {
            "PLAIN" => SaslSession::Plain,
            "SCRAM-SHA-256" => SaslSession::Scram(ScramServer::new(ScramHash::Sha256)),
            "SCRAM-SHA-512" => SaslSession::Scram(ScramServer::new(ScramHash::Sha512)),
            other => SaslSession::Unsupported(other.to_string()),
        }
    }

    fn step(&mut self, token: &[u8], users: &[(String, String)]) -> Step {
        match self {
            SaslSession::Plain => match plain_check(token, users) {
                Ok(()) => Step::Success(Vec::new()),
                Err(why) => Step::Failure(format!("Authentication failed: {why} (PLAIN)")),
            },
            SaslSession::Unsupported(m) => Step::Failure(format!("Authentication failed: the front cannot do {m}")),
            SaslSession::Scram(scram) => {
                let mechanism = scram.hash.mechanism();
                let result = std::str::from_utf8(token).map_err(|_| "a SCRAM message that is not UTF-8".to_string());
                let result = result.and_then(|msg| match scram.state {
                    ScramState::ClientFirst => {
                        let nonce = BASE64.encode(random_bytes::<18>()?);
                        let salt = random_bytes::<16>()?;
                        scram.client_first(msg, users, &nonce, &salt, SCRAM_ITERATIONS).map(Step::Continue)
                    }
                    ScramState::ClientFinal(_) => scram.client_final(msg).map(Step::Success),
                    ScramState::Finished => Err("a SCRAM message after the exchange ended".into()),
                });
                result.unwrap_or_else(|why| {
                    scram.state = ScramState::Finished;
                    Step::Failure(format!("Authentication failed with SASL mechanism {mechanism}: {why}"))
                })
            }
        }
    }
}

/// Checks a PLAIN message (RFC 4616: `[authzid] NUL authcid NUL passwd`).
fn plain_check(token: &[u8], users: &[(String, String)]) -> Result<(), String> {
    let parts: Vec<&[u8]> = token.split(|&b| b == 0).collect();
    let [authzid, user, password] = parts[..] else {
        return Err("a malformed PLAIN message".into());
    };
    if !authzid.is_empty() && authzid != user {
        return Err("an authorization id that is not the user".into());
    }
    let known = users.iter().any(|(u, p)| u.as_bytes() == user && p.as_bytes() == password);
    if known { Ok(()) } else { Err("Invalid username or password".into()) }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| format!("no randomness: {e}"))?;
    Ok(out)
}

/// The PBKDF2 iteration count the front asks SCRAM clients for (Kafka's minimum).
const SCRAM_ITERATIONS: u32 = 4096;

/// The hash of a SCRAM mechanism (RFC 5802 with SHA-256 per RFC 7677, or SHA-512).
#[derive(Clone, Copy, Debug)]
enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha256 => "SCRAM-SHA-256",
            ScramHash::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// H(data).
    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
            ScramHash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// HMAC(key, data).
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha256 => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha512 => {
                let mut mac = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    /// Hi(password, salt, i): PBKDF2 with HMAC, one output block.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha256 => pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations).to_vec(),
            ScramHash::Sha512 => pbkdf2::pbkdf2_hmac_array::<Sha512, 64>(password, salt, iterations).to_vec(),
        }
    }
}

/// The server side of one SCRAM exchange (RFC 5802), from the stored plain-text password.
struct ScramServer {
    hash: ScramHash,
    state: ScramState,
}

enum ScramState {
    /// Waiting for client-first-message.
    ClientFirst,
    /// server-first-message sent; waiting for client-final-message.
    ClientFinal(Box<ScramExchange>),
    /// Authenticated, or failed.
    Finished,
}

/// What the server keeps between its first message and the client's final one.
struct ScramExchange {
    /// The client's gs2-header (`n,,` and the like), which `c=` must repeat.
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    /// The client's nonce followed by the server's.
    nonce: String,
    salted_password: Vec<u8>,
}

/// Decodes a SCRAM saslname (`=2C` is `,`, `=3D` is `=`).
fn scram_name(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3);
        match escape {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(format!("a malformed user name {raw:?}")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of attribute `name` (`name=value`) in `part`.
fn scram_attr(part: Option<&str>, name: char) -> Result<&str, String> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or_else(|| format!("no {name}= attribute"))
}

impl ScramServer {
    fn new(hash: ScramHash) -> ScramServer {
        ScramServer { hash, state: ScramState::ClientFirst }
    }

    /// Takes client-first-message; returns server-first-message (nonce and salt given, so
    /// that tests can replay published exchanges).
    fn client_first(
        &mut self,
        msg: &str,
        users: &[(String, String)],
        server_nonce: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Vec<u8>, String> {
        // gs2-header: cbind-flag "," [authzid] ","
        let mut header_parts = msg.splitn(3, ',');
        let flag = header_parts.next().unwrap_or_default();
        let authzid = header_parts.next().ok_or("a client-first message without a gs2 header")?;
        let bare = header_parts.next().ok_or("a client-first message without a gs2 header")?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err("channel binding is not supported".into()),
            f => return Err(format!("an unknown channel-binding flag {f:?}")),
        }
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err("a malformed authorization id".into());
        }
        let gs2_header = msg[..msg.len() - bare.len()].to_string();
        let mut attrs = bare.split(',');
        let first = attrs.next();
        if first.is_some_and(|a| a.starts_with("m=")) {
            return Err("an unsupported mandatory extension".into());
        }
        let user = scram_name(scram_attr(first, 'n')?)?;
        let client_nonce = scram_attr(attrs.next(), 'r')?;
        if client_nonce.is_empty() || client_nonce.contains(',') {
            return Err("a malformed client nonce".into());
        }
        if let Some(a) = authzid.strip_prefix("a=")
            && scram_name(a)? != user
        {
            return Err("an authorization id that is not the user".into());
        }
        let Some((_, password)) = users.iter().find(|(u, _)| *u == user) else {
            return Err("invalid credentials".into());
        };
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={iterations}", BASE64.encode(salt));
        let salted_password = self.hash.salted_password(password.as_bytes(), salt, iterations);
        let reply = server_first.clone().into_bytes();
        self.state = ScramState::ClientFinal(Box::new(ScramExchange {
            gs2_header,
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
            salted_password,
        }));
        Ok(reply)
    }

    /// Takes client-final-message; returns server-final-message (`v=ServerSignature`) when
    /// the proof is right.
    fn client_final(&mut self, msg: &str) -> Result<Vec<u8>, String> {
        let ScramState::ClientFinal(exchange) = std::mem::replace(&mut self.state, ScramState::Finished) else {
            return Err("a client-final message out of turn".into());
        };
        let at = msg.rfind(",p=").ok_or("a client-final message without a proof")?;
        let without_proof = &msg[..at];
        let proof = BASE64.decode(&msg[at + 3..]).map_err(|_| "a proof that is not base64")?;
        let mut attrs = without_proof.split(',');
        let binding =
            BASE64.decode(scram_attr(attrs.next(), 'c')?).map_err(|_| "channel binding that is not base64")?;
        if binding != exchange.gs2_header.as_bytes() {
            return Err("channel binding that does not repeat the gs2 header".into());
        }
        if scram_attr(attrs.next(), 'r')? != exchange.nonce {
            return Err("a nonce that is not the exchange's".into());
        }
        let h = self.hash;
        let auth_message = format!("{},{},{without_proof}", exchange.client_first_bare, exchange.server_first);
        let client_key = h.hmac(&exchange.salted_password, b"Client Key");
        let stored_key = h.hash(&client_key);
        let client_signature = h.hmac(&stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err("invalid credentials".into());
        }
        // ClientProof = ClientKey XOR ClientSignature, so the proof XOR the signature is the
        // client's key, whose hash must be the stored key.
        let their_key: Vec<u8> = proof.iter().zip(&client_signature).map(|(p, s)| p ^ s).collect();
        if h.hash(&their_key) != stored_key {
            return Err("invalid credentials".into());
        }
        let server_key = h.hmac(&exchange.salted_password, b"Server Key");
        let server_signature = h.hmac(&server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }
}

/// The tansu binary: `FAUST_TANSU_BIN`, else `/root/.cache/faust-rs/bin/tansu` when it exists.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Ok(bin) = std::env::var("FAUST_TANSU_BIN")
        && !bin.is_empty()
    {
        return Some(PathBuf::from(bin));
    }
    let cached = PathBuf::from("/root/.cache/faust-rs/bin/tansu");
    cached.is_file().then_some(cached)
}

/// A tansu broker of its own (in memory) behind a [`KafkaFront`], advertised at the front's
/// address, so that clients bootstrapping through the front stay on it. tansu is killed when
/// this is dropped.
pub struct BrokerBehindFront {
    /// The front clients connect to.
    pub front: KafkaFront,
    tansu: Child,
    broker: SocketAddr,
}

impl BrokerBehindFront {
    /// Starts the front (on a port of its own, bound first) and a tansu listening on another
    /// port and advertising the front's; returns once tansu accepts connections. `None`, after
    /// printing a skip notice, when there is no tansu binary (see [`tansu_bin`]).
    ///
    /// # Panics
    ///
    /// When the front or tansu cannot be started (a test setup failure).
    pub fn start(config: FrontConfig) -> Option<BrokerBehindFront> {
        let Some(bin) = tansu_bin() else {
            eprintln!("skipping: no tansu (FAUST_TANSU_BIN unset and no /root/.cache/faust-rs/bin/tansu)");
            return None;
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the front's port");
        let front_addr = listener.local_addr().expect("the front's address");
        let mut last_error = String::new();
        // The broker's port is found free and then given to tansu, so another process may
        // take it in between: try a few.
        for _ in 0..3 {
            let broker = free_port();
            let mut tansu = Command::new(&bin)
                .args(["broker", "--listener-url", &format!("tcp://{broker}")])
                .args(["--advertised-listener-url", &format!("tcp://{front_addr}")])
                .args(["--storage-engine", "memory://tansu/"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start tansu ({}): {e}", bin.display()));
            let started = Instant::now();
            let ready = loop {
                if TcpStream::connect_timeout(&broker, Duration::from_millis(200)).is_ok() {
                    break true;
                }
                if let Ok(Some(status)) = tansu.try_wait() {
                    last_error = format!("tansu exited with {status}");
                    break false;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    last_error = format!("tansu did not listen on {broker} within 10 s");
                    break false;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            if ready {
                let front = KafkaFront::start_on(listener, broker, config).expect("start the front");
                return Some(BrokerBehindFront { front, tansu, broker });
            }
            let _ = tansu.kill();
            let _ = tansu.wait();
        }
        panic!("cannot start tansu: {last_error}");
    }

    /// The front's address (what clients bootstrap from).
    pub fn addr(&self) -> SocketAddr {
        self.front.addr()
    }

    /// tansu's own address (behind the front; it advertises the front's).
    pub fn broker_addr(&self) -> SocketAddr {
        self.broker
    }
}

impl Drop for BrokerBehindFront {
    fn drop(&mut self) {
        // The front first, so that its connections do not see the broker go away.
        self.front.shutdown();
        let _ = self.tansu.kill();
        let _ = self.tansu.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SCRAM-SHA-256 exchange published in RFC 7677, section 3.
    #[test]
    fn scram_sha_256_replays_rfc_7677() {
        let users = vec![("user".to_string(), "pencil".to_string())];
        let mut server = ScramServer::new(ScramHash::Sha256);
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let first = server
            .client_first("n,,n=user,r=rOprNGfwEbeRWgbNEkqO", &users, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0", &salt, 4096)
            .expect("client-first accepted");
        assert_eq!(
            String::from_utf8(first).expect("utf-8"),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let last = server
            .client_final(
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .expect("the RFC's proof accepted");
        assert_eq!(String::from_utf8(last).expect("utf-8"), "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn scram_rejects_a_wrong_proof_and_an_unknown_user() {
        let users = vec![("user".to_string(), "pencil".to_string())];
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let mut server = ScramServer::new(ScramHash::Sha256);
        server.client_first("n,,n=user,r=abc", &users, "def", &salt, 4096).expect("client-first accepted");
        let wrong = server.client_final("c=biws,r=abcdef,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        assert_eq!(wrong, Err("invalid credentials".to_string()));
        let mut server = ScramServer::new(ScramHash::Sha256);
        let unknown = server.client_first("n,,n=nobody,r=abc", &users, "def", &salt, 4096);
        assert_eq!(unknown, Err("invalid credentials".to_string()));
        let mut server = ScramServer::new(ScramHash::Sha256);
        server.client_first("n,,n=user,r=abc", &users, "def", &salt, 4096).expect("client-first accepted");
        let replayed = server.client_final("c=biws,r=abcXXX,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        assert!(replayed.is_err(), "{replayed:?}");
    }

    #[test]
    fn scram_names_unescape() {
        assert_eq!(scram_name("a=2Cb=3Dc"), Ok("a,b=c".to_string()));
        assert!(scram_name("a=2").is_err());
        assert!(scram_name("a=41").is_err());
    }

    #[test]
    fn plain_checks_user_password_and_authzid() {
        let users = vec![("alice".to_string(), "secret".to_string())];
        assert_eq!(plain_check(b"\0alice\0secret", &users), Ok(()));
        assert_eq!(plain_check(b"alice\0alice\0secret", &users), Ok(()));
        assert!(plain_check(b"bob\0alice\0secret", &users).is_err());
        assert!(plain_check(b"\0alice\0wrong", &users).is_err());
        assert!(plain_check(b"\0alice", &users).is_err());
    }

    #[test]
    fn pki_makes_a_usable_server_config() {
        let pki = TestPki::generate();
        server_config(&pki.server_tls(true)).expect("a TLS server config from the generated PKI");
    }
}
