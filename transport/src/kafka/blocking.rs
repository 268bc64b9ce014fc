//! A blocking connection to one broker, for the threads that are not glommio executors: the
//! worker's control thread (partition counts) and the consumer-group member's thread (group
//! requests and heartbeats). Requests go one at a time; every step is bounded by a timeout,
//! and a connection that failed or timed out is dropped (its stream may be out of step).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use kafka_protocol::messages::{ApiKey, ApiVersionsRequest};
use kafka_protocol::protocol::{Request, StrBytes};

use super::protocol::{self, Versions, api_name};
use super::security::{self, Exchange, Security};
use crate::error::{Error, Result};

/// The socket, in plain text or inside TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One blocking connection, with the API versions negotiated when it opened.
pub(crate) struct BlockingConn {
    broker: String,
    client_id: String,
    stream: Stream,
    versions: Versions,
    next_id: i32,
}

impl std::fmt::Debug for BlockingConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingConn").field("broker", &self.broker).finish()
    }
}

impl BlockingConn {
    /// Connects to `broker` (`host:port`), with TLS when `security` says so, negotiates API
    /// versions and authenticates (SASL), each step within `timeout`.
    pub(crate) fn connect(
        broker: &str,
        client_id: &str,
        timeout: Duration,
        security: &Security,
    ) -> Result<BlockingConn> {
        let conn_err = |op: &'static str, source: std::io::Error| Error::KafkaConnection {
            broker: broker.to_string(),
            op,
            source,
        };
        let addr = broker
            .to_socket_addrs()
            .map_err(|e| conn_err("resolve", e))?
            .next()
            .ok_or_else(|| conn_err("resolve", std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))?;
        let timeout = timeout.max(Duration::from_millis(1));
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| conn_err("connect", e))?;
        stream.set_nodelay(true).map_err(|e| conn_err("connect", e))?;
        let stream = match security.tls_for(broker)? {
            None => Stream::Plain(stream),
            Some((config, name)) => {
                let tls_err = |e: rustls::Error| Error::KafkaTls { broker: broker.to_string(), reason: e.to_string() };
                let mut session = rustls::ClientConnection::new(config, name).map_err(tls_err)?;
                let mut stream = stream;
                stream.set_read_timeout(Some(timeout)).map_err(|e| conn_err("TLS handshake", e))?;
                stream.set_write_timeout(Some(timeout)).map_err(|e| conn_err("TLS handshake", e))?;
                while session.is_handshaking() {
                    session.complete_io(&mut stream).map_err(|e| match security::tls_failure(&e) {
                        Some(reason) => Error::KafkaTls { broker: broker.to_string(), reason },
                        None => conn_err("TLS handshake", e),
                    })?;
                }
                Stream::Tls(Box::new(rustls::StreamOwned::new(session, stream)))
            }
        };
        let mut conn = BlockingConn {
            broker: broker.to_string(),
            client_id: client_id.to_string(),
            stream,
            versions: Versions::default(),
            next_id: 1,
        };
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("faust-rs"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut resp = conn.call(&req, 3, timeout)?;
        if resp.error_code == 35 {
            // UNSUPPORTED_VERSION: the broker answers with v0 and lists its ranges.
            resp = conn.call(&req, 0, timeout)?;
        }
        if resp.error_code != 0 {
            return Err(conn.broker_error(ApiKey::ApiVersions, resp.error_code, None));
        }
        let ranges: Vec<_> = resp.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        conn.versions = Versions::negotiate(&ranges);
        if let Some(sasl) = &security.sasl {
            let (_, answer) = conn.request(ApiKey::SaslHandshake, &Exchange::handshake(sasl), timeout)?;
            let mut exchange = Exchange::start(broker, sasl, &answer)?;
            while let Some(req) = exchange.request()? {
                let (_, answer) = conn.request(ApiKey::SaslAuthenticate, &req, timeout)?;
                exchange.answer(&answer)?;
            }
        }
        Ok(conn)
    }

    /// The broker's address.
    pub(crate) fn broker(&self) -> &str {
        &self.broker
    }

    /// The version of `api` this connection uses.
    pub(crate) fn version(&self, api: ApiKey) -> Result<i16> {
        self.versions.get(api).ok_or_else(|| Error::KafkaProtocol {
            broker: self.broker.clone(),
            api: api_name(api),
            topic: None,
            partition: None,
            reason: "the broker supports no version of this request that this client speaks".into(),
        })
    }

    /// Sends `req` at the negotiated version and waits up to `timeout` for the answer.
    pub(crate) fn request<R: Request>(
        &mut self,
        api: ApiKey,
        req: &R,
        timeout: Duration,
    ) -> Result<(i16, R::Response)> {
        let version = self.version(api)?;
        Ok((version, self.call(req, version, timeout)?))
    }

    /// A broker error for a request on this connection.
    pub(crate) fn broker_error(&self, api: ApiKey, code: i16, message: Option<String>) -> Error {
        Error::KafkaBroker {
            broker: self.broker.clone(),
            api: api_name(api),
            topic: None,
            partition: None,
            code,
            message: message.map(String::into_boxed_str),
        }
    }

    fn call<R: Request>(&mut self, req: &R, version: i16, timeout: Duration) -> Result<R::Response> {
        let api = api_name(ApiKey::try_from(R::KEY).unwrap_or(ApiKey::ApiVersions));
        let broker = self.broker.clone();
        let conn_err =
            |op: &'static str, source: std::io::Error| Error::KafkaConnection { broker: broker.clone(), op, source };
        let protocol_err =
            |reason: String| Error::KafkaProtocol { broker: broker.clone(), api, topic: None, partition: None, reason };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1) & i32::MAX;
        let frame = protocol::encode_request(req, version, id, &self.client_id).map_err(protocol_err)?;
        let timeout = timeout.max(Duration::from_millis(1));
        self.stream.socket().set_write_timeout(Some(timeout)).map_err(|e| conn_err("write", e))?;
        self.stream.socket().set_read_timeout(Some(timeout)).map_err(|e| conn_err("read", e))?;
        let io_err = |op: &'static str, e: std::io::Error| match security::tls_failure(&e) {
            Some(reason) => Error::KafkaTls { broker: broker.clone(), reason },
            None => conn_err(op, e),
        };
        self.stream.write_all(&frame).and_then(|()| self.stream.flush()).map_err(|e| io_err("write", e))?;
        let payload = protocol::read_frame_blocking(&mut self.stream).map_err(|e| io_err("read", e))?;
        if protocol::correlation_id(&payload) != Some(id) {
            return Err(protocol_err(format!("answer out of step: expected correlation id {id}")));
        }
        protocol::decode_response::<R>(payload, version).map_err(protocol_err)
    }
}
