//! The client side of SASL for Kafka's `SaslAuthenticate` exchange: PLAIN (RFC 4616) and
//! SCRAM-SHA-256/-512 (RFC 5802, RFC 7677). Pure logic: the connection code carries the bytes.
//!
//! Everything the server sends is untrusted: a malformed message is a typed error, never a panic.
//! Passwords are used as their UTF-8 bytes without SASLprep (RFC 4013); for ASCII passwords, the
//! common case, SASLprep changes nothing. Usernames are not SASLprep'd either, only escaped.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// RFC 7677 §4: a client must refuse fewer iterations than this (a weak or impostor server).
const MIN_ITERATIONS: u32 = 4096;
/// Kafka brokers cap SCRAM iterations at 16384; far more than that only burns our CPU (a hostile
/// server could ask for billions), so it is refused too.
const MAX_ITERATIONS: u32 = 1_000_000;

/// A SASL mechanism for authenticating to Kafka brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// PLAIN (RFC 4616): the password is sent as is, so use it only over TLS.
    Plain,
    /// SCRAM-SHA-256 (RFC 7677).
    ScramSha256,
    /// SCRAM-SHA-512 (RFC 5802 with SHA-512).
    ScramSha512,
}

impl SaslMechanism {
    /// Kafka's name for it: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl FromStr for SaslMechanism {
    type Err = String;

    /// Case-insensitive, with `_` accepted for `-` (`scram_sha_256`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Ok(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            _ => Err(format!("unknown SASL mechanism `{s}` (expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")),
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a SASL exchange failed on the client side.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SaslError {
    /// No random bytes for the client nonce. (getrandom's error is `std::error::Error` only
    /// with its `std` feature, which we do not enable, so it is shown rather than chained.)
    #[error("SASL: no random bytes for the SCRAM nonce: {0}")]
    Random(getrandom::Error),
    /// A server message does not parse; `problem` says which part.
    #[error("SASL {mechanism}: malformed {message} message from the server: {problem}")]
    Malformed { mechanism: SaslMechanism, message: &'static str, problem: &'static str },
    /// The server's nonce does not extend ours: a replay or a broken server.
    #[error("SASL {mechanism}: the server's nonce does not start with the client's nonce")]
    NonceMismatch { mechanism: SaslMechanism },
    /// The server asked for too few (weak) or absurdly many (CPU-burning) PBKDF2 iterations.
    #[error(
        "SASL {mechanism}: the server asks for {iterations} iterations; refusing (allowed {MIN_ITERATIONS}..={MAX_ITERATIONS})"
    )]
    Iterations { mechanism: SaslMechanism, iterations: u32 },
    /// The server ended the exchange with `e=<text>`.
    #[error("SASL {mechanism}: the server refused authentication: {text}")]
    Server { mechanism: SaslMechanism, text: String },
    /// The server's signature is wrong: it does not know our credentials, so it may be an impostor.
    #[error("SASL {mechanism}: the server's signature does not verify (is it an impostor?)")]
    BadServerSignature { mechanism: SaslMechanism },
    /// A server message arrived when none was expected.
    #[error("SASL {mechanism}: server message received {when}")]
    OutOfOrder { mechanism: SaslMechanism, when: &'static str },
}

/// Where an exchange stands. Each step takes the state out (leaving `Done`), so a failed step
/// leaves the session finished and any later message is refused.
enum State {
    /// `first_message` has not been called.
    Start,
    /// PLAIN: the credentials are sent; any answer completes the exchange.
    PlainSent,
    /// SCRAM: client-first sent, kept without the GS2 header (part of AuthMessage).
    FirstSent(String),
    /// SCRAM: client-final sent; the signature a genuine server will send back.
    FinalSent(Vec<u8>),
    Done,
}

/// One authentication exchange.
pub(crate) struct SaslSession {
    mechanism: SaslMechanism,
    username: String,
    password: String,
    /// Printable, without ',' (RFC 5802 `printable`).
    nonce: String,
    state: State,
}

// By hand, so the password never reaches a log.
impl fmt::Debug for SaslSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslSession")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl SaslSession {
    /// A new exchange with a fresh random nonce (24 random bytes in base64: printable, no ',').
    pub(crate) fn new(mechanism: SaslMechanism, username: &str, password: &str) -> Result<SaslSession, SaslError> {
        let mut random = [0u8; 24];
        getrandom::fill(&mut random).map_err(SaslError::Random)?;
        Ok(Self::with_nonce(mechanism, username, password, &BASE64.encode(random)))
    }

    /// The same with a given client nonce (tests, RFC vectors).
    pub(crate) fn with_nonce(mechanism: SaslMechanism, username: &str, password: &str, nonce: &str) -> SaslSession {
        SaslSession {
            mechanism,
            username: username.to_owned(),
            password: password.to_owned(),
            nonce: nonce.to_owned(),
            state: State::Start,
        }
    }

    /// The first message the client sends. PLAIN: `\0user\0pass` (no authorization identity; a
    /// NUL inside either would make the server misread the fields and refuse). SCRAM:
    /// `n,,n=<saslname>,r=<nonce>` (no channel binding, no authzid).
    pub(crate) fn first_message(&mut self) -> Vec<u8> {
        if self.mechanism == SaslMechanism::Plain {
            self.state = State::PlainSent;
            return [b"\0", self.username.as_bytes(), b"\0", self.password.as_bytes()].concat();
        }
        let bare = format!("n={},r={}", escape_saslname(&self.username), self.nonce);
        let message = format!("n,,{bare}").into_bytes();
        self.state = State::FirstSent(bare);
        message
    }

    /// Handles the server's answer to the last message: `Ok(Some(msg))` = send `msg` next;
    /// `Ok(None)` = the exchange is complete and (for SCRAM) the server's signature verified.
    pub(crate) fn next(&mut self, server: &[u8]) -> Result<Option<Vec<u8>>, SaslError> {
        let mechanism = self.mechanism;
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start => Err(SaslError::OutOfOrder { mechanism, when: "before the client's first message" }),
            State::Done => Err(SaslError::OutOfOrder { mechanism, when: "after the exchange ended" }),
            // PLAIN has no server challenge: the broker's answer (usually empty) just ends it.
            State::PlainSent => Ok(None),
            State::FirstSent(bare) => {
                let (client_final, server_signature) = self.client_final(&bare, server)?;
                self.state = State::FinalSent(server_signature);
                Ok(Some(client_final))
            }
            State::FinalSent(server_signature) => {
                let malformed = |problem| SaslError::Malformed { mechanism, message: "server-final", problem };
                let text = std::str::from_utf8(server).map_err(|_| malformed("not UTF-8"))?;
                // server-final = (server-error / verifier) ["," extensions]
                let first = text.split(',').next().unwrap_or_default();
                if let Some(error) = first.strip_prefix("e=") {
                    return Err(SaslError::Server { mechanism, text: error.to_owned() });
                }
                let verifier = first.strip_prefix("v=").ok_or_else(|| malformed("neither v= nor e="))?;
                let signature = BASE64.decode(verifier).map_err(|_| malformed("v= is not base64"))?;
                if !constant_time_eq(&signature, &server_signature) {
                    return Err(SaslError::BadServerSignature { mechanism });
                }
                Ok(None)
            }
        }
    }

    /// From server-first (`r=<nonce>,s=<salt>,i=<count>[,ext]`): client-final, and the server
    /// signature to expect in server-final (RFC 5802 §3).
    fn client_final(&self, bare: &str, server: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SaslError> {
        let mechanism = self.mechanism;
        let malformed = |problem| SaslError::Malformed { mechanism, message: "server-first", problem };
        let server_first = std::str::from_utf8(server).map_err(|_| malformed("not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in server_first.split(',') {
            match attribute.split_at_checked(2) {
                Some(("m=", _)) => return Err(malformed("mandatory extension m= is not supported")),
                Some(("e=", text)) => return Err(SaslError::Server { mechanism, text: text.to_owned() }),
                Some(("r=", value)) => nonce = nonce.or(Some(value)),
                Some(("s=", value)) => salt = salt.or(Some(value)),
                Some(("i=", value)) => iterations = iterations.or(Some(value)),
                // Extensions (RFC 5802 §5.1) we do not know are ignored, as the RFC asks.
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| malformed("missing r= (nonce)"))?;
        let salt = salt.ok_or_else(|| malformed("missing s= (salt)"))?;
        let iterations = iterations.ok_or_else(|| malformed("missing i= (iteration count)"))?;
        // The server appends its own part; an equal nonce would mean it added nothing.
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(SaslError::NonceMismatch { mechanism });
        }
        let salt = BASE64.decode(salt).map_err(|_| malformed("s= is not base64"))?;
        if salt.is_empty() {
            return Err(malformed("s= is empty"));
        }
        let iterations: u32 = iterations.parse().map_err(|_| malformed("i= is not a number"))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(SaslError::Iterations { mechanism, iterations });
        }

        // "biws" is base64("n,,"), the GS2 header of client-first.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let (proof, server_signature) =
            proof_and_signature(mechanism, self.password.as_bytes(), &salt, iterations, auth_message.as_bytes());
        let client_final = format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes();
        Ok((client_final, server_signature))
    }
}

/// ClientProof and ServerSignature (RFC 5802 §3) with the mechanism's hash.
fn proof_and_signature(
    mechanism: SaslMechanism,
    password: &[u8],
    salt: &[u8],
    iterations: u32,
    auth_message: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    // One body for both hashes: a generic function would need hmac's long list of trait bounds.
    macro_rules! with_hash {
        ($hash:ty) => {{
            // HMAC takes keys of any length, so `new_from_slice` cannot fail (the fallback is unreachable).
            let mac = |key: &[u8], data: &[u8]| {
                let mac = Hmac::<$hash>::new_from_slice(key);
                mac.map(|mac| mac.chain_update(data).finalize().into_bytes().to_vec()).unwrap_or_default()
            };
            // SaltedPassword = Hi(password, salt, i): PBKDF2 with the same HMAC.
            let mut salted = vec![0; <$hash as Digest>::output_size()];
            pbkdf2::pbkdf2_hmac::<$hash>(password, salt, iterations, &mut salted);
            let client_key = mac(&salted, b"Client Key");
            let client_signature = mac(&<$hash>::digest(&client_key), auth_message);
            let proof = client_key.iter().zip(&client_signature).map(|(k, s)| k ^ s).collect();
            (proof, mac(&mac(&salted, b"Server Key"), auth_message))
        }};
    }
    match mechanism {
        SaslMechanism::ScramSha512 => with_hash!(Sha512),
        // PLAIN never gets here (it has no server-first); SHA-256 stands in.
        SaslMechanism::ScramSha256 | SaslMechanism::Plain => with_hash!(Sha256),
    }
}

/// RFC 5802 `saslname`: ',' and '=' would end or confuse the attribute, so they become =2C and =3D.
fn escape_saslname(name: &str) -> String {
    // '=' first, so the '=' of =2C is not escaped again.
    name.replace('=', "=3D").replace(',', "=2C")
}

/// Compares without stopping at the first difference, so timing does not reveal how much of a
/// forged signature was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";

    fn scram(mechanism: SaslMechanism, server_first: &str) -> (SaslSession, Result<Option<Vec<u8>>, SaslError>) {
        let mut session = SaslSession::with_nonce(mechanism, "user", "pencil", NONCE);
        assert_eq!(session.first_message(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let answer = session.next(server_first.as_bytes());
        (session, answer)
    }

    #[test]
    fn rfc7677_sha256_vector() {
        let (mut session, client_final) = scram(SaslMechanism::ScramSha256, SERVER_FIRST);
        let expected = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                        p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(client_final.unwrap().unwrap(), expected.as_bytes());
        assert!(session.next(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap().is_none());
        assert!(matches!(session.next(b""), Err(SaslError::OutOfOrder { .. })));
    }

    #[test]
    fn sha512_vector() {
        // Computed with Python's hashlib (pbkdf2_hmac('sha512', ...), hmac, base64) from RFC
        // 5802's formulas, with the inputs of RFC 7677's SHA-256 vector.
        let (mut session, client_final) = scram(SaslMechanism::ScramSha512, SERVER_FIRST);
        let expected = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=gMGXRcevScNtxZ6/8lQYpGtnsNAc3mGc\
                        mNomv+xnoOMw+3R2xNJdMNnzMlTN8PPC6wdp6dybEmDYXYTxwnYPJQ==";
        assert_eq!(client_final.unwrap().unwrap(), expected.as_bytes());
        let server_final = "v=ZQnYEgWQMFmmsM8aQMF0nDDCy/AgCzkwk8CmMZYcMg0vSVlKDanekLtifDSeVGT4+5ZxXnJq199RVG2rR7N7Zw==";
        assert!(session.next(server_final.as_bytes()).unwrap().is_none());
    }

    #[test]
    fn wrong_server_signature_is_refused() {
        let (mut session, answer) = scram(SaslMechanism::ScramSha256, SERVER_FIRST);
        answer.unwrap();
        let forged = session.next(b"v=6rriTRBi23WpRR/wanOqtTLJsd5lBlQuUIP2xstaBcQ=");
        assert!(matches!(forged, Err(SaslError::BadServerSignature { .. })), "{forged:?}");
        // The failed step ended the exchange.
        assert!(matches!(session.next(b"v="), Err(SaslError::OutOfOrder { .. })));
    }

    #[test]
    fn server_error_carries_its_text() {
        let (mut session, answer) = scram(SaslMechanism::ScramSha256, SERVER_FIRST);
        answer.unwrap();
        let error = session.next(b"e=invalid-proof").unwrap_err();
        assert!(matches!(&error, SaslError::Server { text, .. } if text == "invalid-proof"), "{error:?}");
        assert!(error.to_string().contains("invalid-proof"));
    }

    #[test]
    fn foreign_nonce_is_refused() {
        for server_first in
            ["r=somebodyElse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "r=rOprNGfwEbeRWgbNEkqO,s=AA==,i=4096"]
        {
            let (_, answer) = scram(SaslMechanism::ScramSha256, server_first);
            assert!(matches!(answer, Err(SaslError::NonceMismatch { .. })), "{server_first}: {answer:?}");
        }
    }

    #[test]
    fn too_few_iterations_are_refused() {
        let (_, answer) = scram(SaslMechanism::ScramSha256, &SERVER_FIRST.replace("i=4096", "i=1000"));
        assert!(matches!(answer, Err(SaslError::Iterations { iterations: 1000, .. })), "{answer:?}");
    }

    #[test]
    fn malformed_server_first_is_an_error() {
        let without_salt = format!("r={NONCE}xyz,i=4096");
        let bad_salt = format!("r={NONCE}xyz,s=!!,i=4096");
        let cases: [&[u8]; 6] =
            [b"", b"garbage", b"m=x,r=y", b"\xff,r=x", without_salt.as_bytes(), bad_salt.as_bytes()];
        for case in cases {
            let mut session = SaslSession::with_nonce(SaslMechanism::ScramSha512, "user", "pencil", NONCE);
            session.first_message();
            let answer = session.next(case);
            assert!(matches!(answer, Err(SaslError::Malformed { .. })), "{case:?}: {answer:?}");
        }
        let (_, answer) = scram(SaslMechanism::ScramSha256, &without_salt);
        assert!(matches!(answer, Err(SaslError::Malformed { problem: "missing s= (salt)", .. })), "{answer:?}");
    }

    #[test]
    fn plain_first_message_and_completion() {
        let mut session = SaslSession::with_nonce(SaslMechanism::Plain, "alice", "s3cret", "unused");
        assert_eq!(session.first_message(), b"\0alice\0s3cret");
        assert!(session.next(b"").unwrap().is_none());
        assert!(!format!("{session:?}").contains("s3cret"));
    }

    #[test]
    fn scram_username_is_escaped() {
        let mut session = SaslSession::with_nonce(SaslMechanism::ScramSha256, "a,b=c", "pw", "nonce");
        assert_eq!(session.first_message(), b"n,,n=a=2Cb=3Dc,r=nonce");
    }

    #[test]
    fn random_nonce_is_printable_without_commas() {
        let mut session = SaslSession::new(SaslMechanism::ScramSha256, "user", "pw").unwrap();
        let first = String::from_utf8(session.first_message()).unwrap();
        let nonce = first.strip_prefix("n,,n=user,r=").unwrap();
        assert_eq!(nonce.len(), 32);
        assert!(nonce.bytes().all(|b| b.is_ascii_graphic() && b != b','));
    }

    #[test]
    fn mechanism_names_round_trip() {
        for mechanism in [SaslMechanism::Plain, SaslMechanism::ScramSha256, SaslMechanism::ScramSha512] {
            assert_eq!(mechanism.to_string().parse::<SaslMechanism>(), Ok(mechanism));
            assert_eq!(mechanism.name().to_lowercase().replace('-', "_").parse::<SaslMechanism>(), Ok(mechanism));
        }
        let error = "GSSAPI".parse::<SaslMechanism>().unwrap_err();
        assert!(error.contains("PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"), "{error}");
    }

    proptest! {
        #[test]
        fn arbitrary_server_messages_never_panic(first in proptest::collection::vec(any::<u8>(), 0..200),
                                                 last in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut session = SaslSession::with_nonce(SaslMechanism::ScramSha256, "user", "pencil", NONCE);
            session.first_message();
            let _ = session.next(&first);
            // And arbitrary bytes as server-final (state set directly: no PBKDF2 per case).
            let mut session = SaslSession {
                state: State::FinalSent(vec![7; 32]),
                ..SaslSession::with_nonce(SaslMechanism::ScramSha256, "user", "pencil", NONCE)
            };
            prop_assert!(session.next(&last).is_err());
        }
    }
}
