//! Codecs: how keys and values become bytes and back, chosen by name per topic (Faust's
//! `key_serializer` / `value_serializer`). Every type goes through serde; `raw` carries
//! strings and bytes as they are, `json` carries anything serde can.

use serde::Serialize;
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

/// A key or value that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{codec} codec: {message}")]
pub struct CodecError {
    /// The codec's name.
    pub codec: &'static str,
    /// What went wrong.
    pub message: String,
}

/// A codec, by Faust's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// Bytes as they are: for strings (UTF-8) and byte vectors.
    Raw,
    /// JSON via serde.
    Json,
}

impl std::str::FromStr for Codec {
    type Err = CodecError;

    fn from_str(name: &str) -> Result<Codec, CodecError> {
        match name {
            "raw" => Ok(Codec::Raw),
            "json" => Ok(Codec::Json),
            other => {
                Err(CodecError { codec: "registry", message: format!("unknown codec `{other}` (known: raw, json)") })
            }
        }
    }
}

impl Codec {
    /// The codec's name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Json => "json",
        }
    }

    /// Appends the encoding of `value` to `out`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let err = |message: String| CodecError { codec: self.name(), message };
        match self {
            Codec::Json => serde_json::to_writer(out, value).map_err(|e| err(e.to_string())),
            Codec::Raw => match serde_json::to_value(value).map_err(|e| err(e.to_string()))? {
                serde_json::Value::String(s) => {
                    out.extend_from_slice(s.as_bytes());
                    Ok(())
                }
                serde_json::Value::Array(items) => {
                    for item in items {
                        let byte = item
                            .as_u64()
                            .filter(|b| *b <= 255)
                            .ok_or_else(|| err("raw carries strings and byte sequences only".to_string()))?;
                        out.push(byte as u8);
                    }
                    Ok(())
                }
                _ => Err(err("raw carries strings and byte sequences only".to_string())),
            },
        }
    }

    /// [`encode`](Codec::encode), with the common raw cases (a `String` or `Vec<u8>` key)
    /// copied straight in rather than through serde.
    pub(crate) fn encode_owned<T: Serialize + 'static>(self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        if self == Codec::Raw {
            let any = value as &dyn std::any::Any;
            if let Some(s) = any.downcast_ref::<String>() {
                out.extend_from_slice(s.as_bytes());
                return Ok(());
            }
            if let Some(bytes) = any.downcast_ref::<Vec<u8>>() {
                out.extend_from_slice(bytes);
                return Ok(());
            }
        }
        self.encode(value, out)
    }

    /// Decodes a `T` from `bytes`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let err = |message: String| CodecError { codec: self.name(), message };
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| err(e.to_string())),
            Codec::Raw => T::deserialize(RawDeserializer { bytes }).map_err(|e: RawError| err(e.0)),
        }
    }
}

#[derive(Debug)]
struct RawError(String);

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RawError {}

impl de::Error for RawError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        RawError(msg.to_string())
    }
}

/// Presents raw bytes to serde: as a string when they are UTF-8, as bytes otherwise, and as
/// a sequence of `u8` to types (like `Vec<u8>`) that ask for one.
struct RawDeserializer<'a> {
    bytes: &'a [u8],
}

impl<'de> de::Deserializer<'de> for RawDeserializer<'_> {
    type Error = RawError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        match std::str::from_utf8(self.bytes) {
            Ok(s) => visitor.visit_str(s),
            Err(_) => visitor.visit_bytes(self.bytes),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        match std::str::from_utf8(self.bytes) {
            Ok(s) => visitor.visit_str(s),
            Err(e) => Err(RawError(format!("invalid UTF-8 at byte {}", e.valid_up_to()))),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_bytes(self.bytes)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_bytes(self.bytes)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        let seq: de::value::SeqDeserializer<_, RawError> =
            de::value::SeqDeserializer::new(self.bytes.iter().map(|b| b.into_deserializer()));
        visitor.visit_seq(seq)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        option unit unit_struct newtype_struct tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Order {
        account_id: String,
        amount: u64,
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(codec: Codec, value: T) -> Vec<u8> {
        let mut out = Vec::new();
        codec.encode(&value, &mut out).unwrap();
        assert_eq!(codec.decode::<T>(&out).unwrap(), value);
        out
    }

    #[test]
    fn raw_carries_strings_and_bytes_as_they_are() {
        assert_eq!(round_trip(Codec::Raw, "account-7".to_string()), b"account-7");
        assert_eq!(round_trip(Codec::Raw, vec![0u8, 255, 3]), vec![0, 255, 3]);
        assert!(Codec::Raw.encode(&42u64, &mut Vec::new()).is_err());
        let err = Codec::Raw.decode::<String>(&[0xff, 0xfe]).unwrap_err();
        assert!(err.message.contains("UTF-8"), "{err}");
    }

    #[test]
    fn the_raw_fast_path_encodes_like_serde() {
        for value in ["", "account-7", "ünïcode"] {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            Codec::Raw.encode_owned(&value.to_string(), &mut fast).unwrap();
            Codec::Raw.encode(&value.to_string(), &mut slow).unwrap();
            assert_eq!(fast, slow);
        }
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        Codec::Raw.encode_owned(&vec![0u8, 255], &mut fast).unwrap();
        Codec::Raw.encode(&vec![0u8, 255], &mut slow).unwrap();
        assert_eq!(fast, slow);
        assert!(Codec::Raw.encode_owned(&42u64, &mut Vec::new()).is_err());
    }

    #[test]
    fn json_round_trips_and_reports_bad_input() {
        let bytes = round_trip(Codec::Json, Order { account_id: "a".into(), amount: 5 });
        assert_eq!(bytes, br#"{"account_id":"a","amount":5}"#);
        let err = Codec::Json.decode::<Order>(b"{not json").unwrap_err();
        assert_eq!(err.codec, "json");
        assert_eq!("json".parse::<Codec>().unwrap(), Codec::Json);
        assert!("pickle".parse::<Codec>().is_err());
    }
}
