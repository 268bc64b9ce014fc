//! TLS and SASL on connections to brokers: what the options say, the TLS client
//! configuration built from them once per transport, and the SASL exchange a connection runs
//! right after it negotiated API versions (before any other request).
//!
//! TLS is rustls (its `ring` provider) driven over the same io_uring sockets as plain text,
//! by `futures-rustls` on the cores and by `rustls::StreamOwned` on the blocking threads.
//! SASL is Kafka's framed form: SaslHandshake v1 names the mechanism, then SaslAuthenticate
//! carries the mechanism's messages (`sasl.rs`) until the exchange completes. A refusal is
//! [`Error::KafkaAuth`], which is never retried: a wrong password does not become right.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::sasl::{SaslError, SaslMechanism, SaslSession};
use crate::error::{Error, Result};

/// TLS to the brokers (Kafka's `SSL` and `SASL_SSL` security protocols).
///
/// ```
/// use faust_transport::{KafkaOptions, TlsOptions};
///
/// let options = KafkaOptions {
///     tls: Some(TlsOptions { ca_file: Some("ca.pem".into()), ..TlsOptions::default() }),
///     ..KafkaOptions::default()
/// };
/// assert!(options.tls.is_some());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of the certificate authorities that sign the brokers' certificates; `None`
    /// trusts the operating system's roots (what a managed Kafka service needs).
    pub ca_file: Option<PathBuf>,
    /// PEM files of this client's certificate chain and its private key, for brokers that
    /// authenticate clients by certificate (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name the brokers' certificates are checked against, also sent as SNI; `None`
    /// uses the host of each broker's address.
    pub server_name: Option<String>,
}

/// SASL authentication (Kafka's `SASL_PLAINTEXT` and, with [`TlsOptions`], `SASL_SSL`).
#[derive(Clone, PartialEq, Eq)]
pub struct SaslOptions {
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub mechanism: SaslMechanism,
    /// The user.
    pub username: String,
    /// The password (never printed).
    pub password: String,
}

impl std::fmt::Debug for SaslOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslOptions")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// What every connection of a transport needs to secure itself, built once.
#[derive(Clone, Default)]
pub(crate) struct Security {
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<String>,
    pub(crate) sasl: Option<SaslOptions>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security").field("tls", &self.tls.is_some()).field("sasl", &self.sasl).finish()
    }
}

impl Security {
    /// Reads the certificate files and builds the TLS configuration.
    pub(crate) fn new(tls: Option<&TlsOptions>, sasl: Option<&SaslOptions>) -> Result<Security> {
        let config = tls.map(client_config).transpose()?;
        Ok(Security {
            tls: config.map(Arc::new),
            server_name: tls.and_then(|t| t.server_name.clone()),
            sasl: sasl.cloned(),
        })
    }

    /// The TLS configuration and the name to verify `broker` (`host:port`) against, when
    /// connections use TLS.
    pub(crate) fn tls_for(&self, broker: &str) -> Result<Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>> {
        let Some(config) = &self.tls else { return Ok(None) };
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            None => broker.rsplit_once(':').map_or(broker, |(host, _)| host),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| Error::KafkaTls {
            broker: broker.to_string(),
            reason: format!("`{host}` is not a name a certificate can be checked against: {e}"),
        })?;
        Ok(Some((config.clone(), name)))
    }
}

fn config_error(what: String) -> Error {
    Error::TlsConfig { reason: what }
}

fn client_config(opts: &TlsOptions) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(format!("TLS protocol versions: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| config_error(format!("reading the CA file {}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| config_error(format!("the CA file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| config_error(format!("a certificate of the CA file {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(config_error(format!("the CA file {} holds no certificate", path.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
                return Err(config_error(format!(
                    "no CA file given and no system root certificates found{why} (set a CA file)"
                )));
            }
        }
    }
    let builder = builder.with_root_certificates(roots);
    match &opts.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
                .and_then(|certs| certs.collect::<std::result::Result<_, _>>())
                .map_err(|e| config_error(format!("reading the client certificate {}: {e}", cert_path.display())))?;
            if chain.is_empty() {
                return Err(config_error(format!("{} holds no certificate", cert_path.display())));
            }
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| config_error(format!("reading the client key {}: {e}", key_path.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                config_error(format!(
                    "the client certificate {} with the key {}: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })
        }
    }
}

/// The rustls error inside an I/O error of a TLS stream, if that is what it is: the
/// handshake failed, the peer sent an alert, or a record did not decrypt.
pub(crate) fn tls_failure(e: &std::io::Error) -> Option<String> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(|e| e.to_string())
}

/// One SASL exchange over a connection, whatever its kind: `send` makes one request and
/// returns its answer.
pub(crate) struct Exchange<'a> {
    broker: &'a str,
    options: &'a SaslOptions,
    session: SaslSession,
    /// The next message to send; `None` once the server accepted.
    next: Option<Vec<u8>>,
    rounds: u32,
}

/// SCRAM takes two rounds and PLAIN one; a server that asks for more is not one we speak to.
const MAX_ROUNDS: u32 = 4;

impl<'a> Exchange<'a> {
    /// The handshake request that opens the exchange.
    pub(crate) fn handshake(options: &SaslOptions) -> SaslHandshakeRequest {
        SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(options.mechanism.name()))
    }

    /// Checks the handshake's answer and starts the mechanism.
    pub(crate) fn start(
        broker: &'a str,
        options: &'a SaslOptions,
        answer: &SaslHandshakeResponse,
    ) -> Result<Exchange<'a>> {
        if answer.error_code != 0 {
            let offered: Vec<&str> = answer.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(auth_error(
                broker,
                options,
                format!(
                    "the broker does not offer {} (error {}; it offers: {})",
                    options.mechanism,
                    answer.error_code,
                    if offered.is_empty() { "none".to_string() } else { offered.join(", ") }
                ),
            ));
        }
        let mut session = SaslSession::new(options.mechanism, &options.username, &options.password)
            .map_err(|e| auth_error(broker, options, e.to_string()))?;
        let first = session.first_message();
        Ok(Exchange { broker, options, session, next: Some(first), rounds: 0 })
    }

    /// The next SaslAuthenticate request, or `None` when the exchange is complete.
    pub(crate) fn request(&mut self) -> Result<Option<SaslAuthenticateRequest>> {
        let Some(message) = self.next.take() else { return Ok(None) };
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return Err(auth_error(self.broker, self.options, "the exchange does not end".into()));
        }
        Ok(Some(SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(message))))
    }

    /// Takes the answer to the last request.
    pub(crate) fn answer(&mut self, answer: &SaslAuthenticateResponse) -> Result<()> {
        if answer.error_code != 0 {
            let message = answer.error_message.as_ref().map(|m| format!(": {}", m.as_str())).unwrap_or_default();
            return Err(auth_error(
                self.broker,
                self.options,
                format!("refused (error {}){message}", super::protocol::code_name(answer.error_code)),
            ));
        }
        self.next = self
            .session
            .next(&answer.auth_bytes)
            .map_err(|e: SaslError| auth_error(self.broker, self.options, e.to_string()))?;
        Ok(())
    }
}

fn auth_error(broker: &str, options: &SaslOptions, reason: String) -> Error {
    Error::KafkaAuth {
        broker: broker.to_string(),
        mechanism: options.mechanism.name(),
        username: options.username.clone(),
        reason,
    }
}
