//! A blocking connection to one broker, for the threads that are not glommio executors: the
//! worker's control thread (partition counts) and the consumer-group member's thread (group
//! requests and heartbeats). Requests go one at a time; every step is bounded by a timeout,
//! and a connection that failed or timed out is dropped (its stream may be out of step).

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use kafka_protocol::messages::{ApiKey, ApiVersionsRequest};
use kafka_protocol::protocol::{Request, StrBytes};

use super::protocol::{self, Versions, api_name};
use crate::error::{Error, Result};

/// One blocking connection, with the API versions negotiated when it opened.
pub(crate) struct BlockingConn {
    broker: String,
    client_id: String,
    stream: TcpStream,
    versions: Versions,
    next_id: i32,
}

impl std::fmt::Debug for BlockingConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingConn").field("broker", &self.broker).finish()
    }
}

impl BlockingConn {
    /// Connects to `broker` (`host:port`) and negotiates API versions, each step within
    /// `timeout`.
    pub(crate) fn connect(broker: &str, client_id: &str, timeout: Duration) -> Result<BlockingConn> {
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
        self.stream.set_write_timeout(Some(timeout)).map_err(|e| conn_err("write", e))?;
        self.stream.set_read_timeout(Some(timeout)).map_err(|e| conn_err("read", e))?;
        self.stream.write_all(&frame).map_err(|e| conn_err("write", e))?;
        let payload = protocol::read_frame_blocking(&mut self.stream).map_err(|e| conn_err("read", e))?;
        if protocol::correlation_id(&payload) != Some(id) {
            return Err(protocol_err(format!("answer out of step: expected correlation id {id}")));
        }
        protocol::decode_response::<R>(payload, version).map_err(protocol_err)
    }
}
