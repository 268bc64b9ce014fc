//! One connection to one broker, on one core: requests are pipelined (written in the order
//! they are made, answered in that order by the broker, matched by correlation id), every
//! request has a deadline, and a connection that failed or timed out is dead for good — the
//! core opens a new one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_lite::{AsyncReadExt, AsyncWriteExt, StreamExt};
use glommio::net::TcpStream;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
use kafka_protocol::protocol::{Request, StrBytes};

use super::protocol::{self, MAX_FRAME, Versions, api_name};
use super::security::{self, Exchange, Security};
use crate::error::{Error, Result};

/// What a request is about, for errors.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct About<'a> {
    pub(crate) topic: Option<&'a str>,
    pub(crate) partition: Option<u32>,
}

impl<'a> About<'a> {
    pub(crate) fn topic(topic: &'a str) -> Self {
        About { topic: Some(topic), partition: None }
    }

    pub(crate) fn partition(topic: &'a str, partition: u32) -> Self {
        About { topic: Some(topic), partition: Some(partition) }
    }
}

/// Why a connection died.
#[derive(Debug, Clone)]
struct Failure {
    /// What was being done (`read`, `write`).
    op: &'static str,
    kind: std::io::ErrorKind,
    message: String,
    /// Whether TLS failed (an alert, a record that does not decrypt), not the socket.
    tls: bool,
}

impl Failure {
    fn of(op: &'static str, e: &std::io::Error) -> Failure {
        match security::tls_failure(e) {
            Some(message) => Failure { op, kind: e.kind(), message, tls: true },
            None => Failure { op, kind: e.kind(), message: e.to_string(), tls: false },
        }
    }

    fn error(&self, broker: &str) -> Error {
        if self.tls {
            Error::KafkaTls { broker: broker.to_string(), reason: self.message.clone() }
        } else {
            conn_err(broker, self.op, std::io::Error::new(self.kind, self.message.clone()))
        }
    }
}

type Reply = oneshot::Sender<std::result::Result<Bytes, Failure>>;

/// State shared by a connection and its reader and writer tasks.
#[derive(Default)]
struct State {
    /// Requests written or queued, by correlation id.
    pending: RefCell<HashMap<i32, Reply>>,
    next_id: Cell<i32>,
    /// Why the connection died.
    failed: RefCell<Option<Failure>>,
}

impl State {
    fn fail(&self, op: &'static str, e: &std::io::Error) {
        let failure = Failure::of(op, e);
        if self.failed.borrow().is_none() {
            *self.failed.borrow_mut() = Some(failure.clone());
        }
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        for (_, reply) in pending {
            let _ = reply.send(Err(failure.clone()));
        }
    }
}

/// A connection to one broker. Dropping it cancels its tasks and closes the socket.
pub(crate) struct Connection {
    broker: Arc<str>,
    client_id: Arc<str>,
    state: Rc<State>,
    frames: mpsc::UnboundedSender<Vec<u8>>,
    versions: Versions,
    _reader: glommio::Task<()>,
    _writer: glommio::Task<()>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("broker", &self.broker).field("alive", &self.is_alive()).finish()
    }
}

fn conn_err(broker: &str, op: &'static str, source: std::io::Error) -> Error {
    Error::KafkaConnection { broker: broker.to_string(), op, source }
}

impl Connection {
    /// Connects to `broker` (`host:port`), with TLS when `security` says so, negotiates API
    /// versions and authenticates (SASL), each step within `timeout`.
    pub(crate) async fn connect(
        broker: Arc<str>,
        client_id: Arc<str>,
        timeout: Duration,
        security: &Security,
    ) -> Result<Connection> {
        let addr = broker.to_socket_addrs().map_err(|e| conn_err(&broker, "resolve", e))?.next().ok_or_else(|| {
            conn_err(&broker, "resolve", std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
        })?;
        let stream = TcpStream::connect_timeout(addr, timeout.max(Duration::from_millis(1)))
            .await
            .map_err(|e| conn_err(&broker, "connect", std::io::Error::from(e)))?;
        stream.set_nodelay(true).map_err(|e| conn_err(&broker, "connect", std::io::Error::from(e)))?;
        let state = Rc::new(State::default());
        let (frames, queued) = mpsc::unbounded();
        let (reader, writer) = match security.tls_for(&broker)? {
            None => spawn_loops(stream, queued, &state),
            Some((config, name)) => {
                let handshake = futures_rustls::TlsConnector::from(config).connect(name, stream);
                let tls = futures_lite::future::or(async { Some(handshake.await) }, async {
                    glommio::timer::sleep(timeout).await;
                    None
                })
                .await;
                let tls = match tls {
                    Some(Ok(tls)) => tls,
                    Some(Err(e)) => return Err(Failure::of("TLS handshake", &e).error(&broker)),
                    None => {
                        let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "the TLS handshake timed out");
                        return Err(conn_err(&broker, "TLS handshake", e));
                    }
                };
                spawn_loops(tls, queued, &state)
            }
        };
        let mut conn = Connection {
            broker,
            client_id,
            state,
            frames,
            versions: Versions::default(),
            _reader: reader,
            _writer: writer,
        };
        conn.versions = conn.api_versions(timeout).await?;
        if let Some(sasl) = &security.sasl {
            conn.authenticate(sasl, timeout).await?;
        }
        Ok(conn)
    }

    /// The SASL exchange: a handshake naming the mechanism, then its messages.
    async fn authenticate(&self, sasl: &security::SaslOptions, timeout: Duration) -> Result<()> {
        let (_, answer) =
            self.request(ApiKey::SaslHandshake, &Exchange::handshake(sasl), timeout, About::default()).await?;
        let mut exchange = Exchange::start(&self.broker, sasl, &answer)?;
        while let Some(req) = exchange.request()? {
            let (_, answer) = self.request(ApiKey::SaslAuthenticate, &req, timeout, About::default()).await?;
            exchange.answer(&answer)?;
        }
        Ok(())
    }

    async fn api_versions(&self, timeout: Duration) -> Result<Versions> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("faust-rs"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut resp: ApiVersionsResponse = self.call(&req, 3, timeout, About::default()).await?;
        if resp.error_code == 35 {
            // UNSUPPORTED_VERSION: the broker answers with v0 and lists its ranges.
            resp = self.call(&req, 0, timeout, About::default()).await?;
        }
        if resp.error_code != 0 {
            return Err(self.broker_error(ApiKey::ApiVersions, About::default(), resp.error_code, None));
        }
        let ranges: Vec<_> = resp.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        Ok(Versions::negotiate(&ranges))
    }

    /// The broker's address.
    pub(crate) fn broker(&self) -> &Arc<str> {
        &self.broker
    }

    /// Whether the connection can still carry requests.
    pub(crate) fn is_alive(&self) -> bool {
        self.state.failed.borrow().is_none()
    }

    /// The version of `api` this connection uses.
    pub(crate) fn version(&self, api: ApiKey, about: About<'_>) -> Result<i16> {
        self.versions.get(api).ok_or_else(|| Error::KafkaProtocol {
            broker: self.broker.to_string(),
            api: api_name(api),
            topic: about.topic.map(std::sync::Arc::from),
            partition: about.partition,
            reason: "the broker supports no version of this request that this client speaks".into(),
        })
    }

    /// Sends `req` at the negotiated version and waits up to `timeout` for the answer.
    pub(crate) async fn request<R: Request>(
        &self,
        api: ApiKey,
        req: &R,
        timeout: Duration,
        about: About<'_>,
    ) -> Result<(i16, R::Response)> {
        let version = self.version(api, about)?;
        Ok((version, self.call(req, version, timeout, about).await?))
    }

    /// A broker error for a request on this connection.
    pub(crate) fn broker_error(&self, api: ApiKey, about: About<'_>, code: i16, message: Option<String>) -> Error {
        Error::KafkaBroker {
            broker: self.broker.to_string(),
            api: api_name(api),
            topic: about.topic.map(std::sync::Arc::from),
            partition: about.partition,
            code,
            message: message.map(String::into_boxed_str),
        }
    }

    /// A protocol error for a request on this connection.
    pub(crate) fn protocol_error(&self, api: ApiKey, about: About<'_>, reason: String) -> Error {
        Error::KafkaProtocol {
            broker: self.broker.to_string(),
            api: api_name(api),
            topic: about.topic.map(std::sync::Arc::from),
            partition: about.partition,
            reason,
        }
    }

    async fn call<R: Request>(
        &self,
        req: &R,
        version: i16,
        timeout: Duration,
        about: About<'_>,
    ) -> Result<R::Response> {
        let api = ApiKey::try_from(R::KEY).unwrap_or(ApiKey::ApiVersions);
        if let Some(failure) = self.state.failed.borrow().clone() {
            return Err(failure.error(&self.broker));
        }
        let id = self.state.next_id.get();
        self.state.next_id.set(id.wrapping_add(1) & i32::MAX);
        let frame = protocol::encode_request(req, version, id, &self.client_id)
            .map_err(|reason| self.protocol_error(api, about, reason))?;
        let (reply, answer) = oneshot::channel();
        self.state.pending.borrow_mut().insert(id, reply);
        if self.frames.unbounded_send(frame).is_err() {
            self.state.pending.borrow_mut().remove(&id);
            let e = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed");
            self.state.fail("write", &e);
            return Err(conn_err(&self.broker, "write", e));
        }
        let answer = futures_lite::future::or(async { Some(answer.await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        let payload = match answer {
            Some(Ok(Ok(payload))) => payload,
            Some(Ok(Err(failure))) => return Err(failure.error(&self.broker)),
            Some(Err(_)) => {
                let e = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed");
                return Err(conn_err(&self.broker, "read", e));
            }
            None => {
                // The answer may still come; the stream can no longer be trusted to be in step.
                self.state.pending.borrow_mut().remove(&id);
                self.state.fail("read", &std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"));
                return Err(Error::KafkaTimeout {
                    broker: self.broker.to_string(),
                    api: api_name(api),
                    topic: about.topic.map(std::sync::Arc::from),
                    partition: about.partition,
                    timeout,
                });
            }
        };
        protocol::decode_response::<R>(payload, version).map_err(|reason| self.protocol_error(api, about, reason))
    }
}

/// The reader and writer tasks of a connection over `stream` (plain or TLS).
fn spawn_loops<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static>(
    stream: S,
    queued: mpsc::UnboundedReceiver<Vec<u8>>,
    state: &Rc<State>,
) -> (glommio::Task<()>, glommio::Task<()>) {
    let (read, write) = futures_lite::io::split(stream);
    (
        glommio::spawn_local(read_loop(read, state.clone())),
        glommio::spawn_local(write_loop(write, queued, state.clone())),
    )
}

async fn read_loop<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin>(
    read: futures_lite::io::ReadHalf<S>,
    state: Rc<State>,
) {
    let mut read = futures_lite::io::BufReader::with_capacity(256 << 10, read);
    loop {
        let mut size = [0u8; 4];
        if let Err(e) = read.read_exact(&mut size).await {
            state.fail("read", &e);
            return;
        }
        let size = i32::from_be_bytes(size);
        if !(4..=MAX_FRAME).contains(&size) {
            state.fail("read", &std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad frame size {size}")));
            return;
        }
        let mut payload = vec![0u8; size as usize];
        if let Err(e) = read.read_exact(&mut payload).await {
            state.fail("read", &e);
            return;
        }
        let payload = Bytes::from(payload);
        let Some(id) = protocol::correlation_id(&payload) else { continue };
        // An answer nobody waits for any more (its request timed out) is dropped.
        let reply = state.pending.borrow_mut().remove(&id);
        if let Some(reply) = reply {
            let _ = reply.send(Ok(payload));
        }
    }
}

async fn write_loop<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin>(
    mut write: futures_lite::io::WriteHalf<S>,
    mut queued: mpsc::UnboundedReceiver<Vec<u8>>,
    state: Rc<State>,
) {
    while let Some(mut buf) = queued.next().await {
        // Frames queued meanwhile go out in the same write.
        while buf.len() < (1 << 20) {
            match queued.try_recv() {
                Ok(frame) => buf.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        let result = async {
            write.write_all(&buf).await?;
            write.flush().await
        }
        .await;
        if let Err(e) = result {
            state.fail("write", &e);
            return;
        }
    }
}
