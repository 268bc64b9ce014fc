//! The `raw` format: strings and bytes as they are, through small serde adapters of our own
//! (no intermediate value, no allocation), and the hand-over of a record's [`Bytes`] to a
//! [`Fixed`](super::Fixed) value.

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::ser::{self, Impossible, Serialize};

/// What went wrong in the raw format.
#[derive(Debug)]
pub(super) struct RawError(String);

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

impl ser::Error for RawError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        RawError(msg.to_string())
    }
}

const ONLY: &str = "raw carries strings and byte sequences only";

fn only<T>() -> Result<T, RawError> {
    Err(RawError(ONLY.to_string()))
}

/// Appends `value`, which must serialize as a string, bytes, or a sequence of bytes
/// (possibly inside newtypes or `Some`), to `out`.
pub(super) fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), RawError> {
    value.serialize(RawSerializer { out })
}

/// Decodes `bytes`, which are `owner`'s when `owner` is given.
#[inline]
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8], owner: Option<&Bytes>) -> Result<T, RawError> {
    T::deserialize(RawDeserializer { bytes, owner })
}

struct RawSerializer<'a> {
    out: &'a mut Vec<u8>,
}

/// The methods of a serializer that only refuses.
macro_rules! refuse {
    ($($method:ident($($arg:ty),*) -> $ok:ty;)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<$ok, RawError> { only() })*
    };
}

impl<'a> ser::Serializer for RawSerializer<'a> {
    type Ok = ();
    type Error = RawError;
    type SerializeSeq = ByteSeq<'a>;
    type SerializeTuple = ByteSeq<'a>;
    type SerializeTupleStruct = Impossible<(), RawError>;
    type SerializeTupleVariant = Impossible<(), RawError>;
    type SerializeMap = Impossible<(), RawError>;
    type SerializeStruct = Impossible<(), RawError>;
    type SerializeStructVariant = Impossible<(), RawError>;

    fn serialize_str(self, v: &str) -> Result<(), RawError> {
        self.out.extend_from_slice(v.as_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), RawError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), RawError> {
        self.out.extend_from_slice(v);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), RawError> {
        value.serialize(self)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Result<(), RawError> {
        value.serialize(self)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<ByteSeq<'a>, RawError> {
        self.out.reserve(len.unwrap_or(0));
        Ok(ByteSeq { out: self.out })
    }

    fn serialize_tuple(self, len: usize) -> Result<ByteSeq<'a>, RawError> {
        self.serialize_seq(Some(len))
    }

    refuse! {
        serialize_bool(bool) -> ();
        serialize_i8(i8) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_u8(u8) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_unit_variant(&'static str, u32, &'static str) -> ();
        serialize_tuple_struct(&'static str, usize) -> Impossible<(), RawError>;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Impossible<(), RawError>;
        serialize_map(Option<usize>) -> Impossible<(), RawError>;
        serialize_struct(&'static str, usize) -> Impossible<(), RawError>;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Impossible<(), RawError>;
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), RawError> {
        only()
    }
}

/// A sequence under `raw`: each element must be a byte.
struct ByteSeq<'a> {
    out: &'a mut Vec<u8>,
}

impl ByteSeq<'_> {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), RawError> {
        let byte = value.serialize(ByteSerializer)?;
        self.out.push(byte);
        Ok(())
    }
}

impl ser::SerializeSeq for ByteSeq<'_> {
    type Ok = ();
    type Error = RawError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), RawError> {
        self.push(value)
    }

    fn end(self) -> Result<(), RawError> {
        Ok(())
    }
}

impl ser::SerializeTuple for ByteSeq<'_> {
    type Ok = ();
    type Error = RawError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), RawError> {
        self.push(value)
    }

    fn end(self) -> Result<(), RawError> {
        Ok(())
    }
}

/// One element of a byte sequence: any integer from 0 to 255.
struct ByteSerializer;

fn byte(v: impl TryInto<u8>) -> Result<u8, RawError> {
    v.try_into().or_else(|_| only())
}

impl ser::Serializer for ByteSerializer {
    type Ok = u8;
    type Error = RawError;
    type SerializeSeq = Impossible<u8, RawError>;
    type SerializeTuple = Impossible<u8, RawError>;
    type SerializeTupleStruct = Impossible<u8, RawError>;
    type SerializeTupleVariant = Impossible<u8, RawError>;
    type SerializeMap = Impossible<u8, RawError>;
    type SerializeStruct = Impossible<u8, RawError>;
    type SerializeStructVariant = Impossible<u8, RawError>;

    fn serialize_u8(self, v: u8) -> Result<u8, RawError> {
        Ok(v)
    }
    fn serialize_u16(self, v: u16) -> Result<u8, RawError> {
        byte(v)
    }
    fn serialize_u32(self, v: u32) -> Result<u8, RawError> {
        byte(v)
    }
    fn serialize_u64(self, v: u64) -> Result<u8, RawError> {
        byte(v)
    }
    fn serialize_i8(self, v: i8) -> Result<u8, RawError> {
        byte(v)
    }
    fn serialize_i16(self, v: i16) -> Result<u8, RawError> {
        byte(v)
    }
    fn serialize_i32(self, v: i32) -> Result<u8, RawError> {
        byte(v)
    }
    fn serialize_i64(self, v: i64) -> Result<u8, RawError> {
        byte(v)
    }

    refuse! {
        serialize_bool(bool) -> u8;
        serialize_f32(f32) -> u8;
        serialize_f64(f64) -> u8;
        serialize_char(char) -> u8;
        serialize_str(&str) -> u8;
        serialize_bytes(&[u8]) -> u8;
        serialize_none() -> u8;
        serialize_unit() -> u8;
        serialize_unit_struct(&'static str) -> u8;
        serialize_unit_variant(&'static str, u32, &'static str) -> u8;
        serialize_seq(Option<usize>) -> Impossible<u8, RawError>;
        serialize_tuple(usize) -> Impossible<u8, RawError>;
        serialize_tuple_struct(&'static str, usize) -> Impossible<u8, RawError>;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Impossible<u8, RawError>;
        serialize_map(Option<usize>) -> Impossible<u8, RawError>;
        serialize_struct(&'static str, usize) -> Impossible<u8, RawError>;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Impossible<u8, RawError>;
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<u8, RawError> {
        only()
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Result<u8, RawError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<u8, RawError> {
        only()
    }
}

/// Presents raw bytes to serde: as a string when they are UTF-8, as bytes otherwise, as a
/// sequence of `u8` to types (like `Vec<u8>`) that ask for one, and as the record's own
/// [`Bytes`] to a [`Fixed`](super::Fixed) value when `owner` has them.
struct RawDeserializer<'a> {
    bytes: &'a [u8],
    /// The buffer `bytes` are, when the caller has it.
    owner: Option<&'a Bytes>,
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

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, RawError> {
        // The pointer comparison is the common case (one copy of the constant), the string
        // comparison the fallback.
        if (std::ptr::eq(name, super::fixed::MAGIC) || name == super::fixed::MAGIC)
            && let Some(owner) = self.owner
        {
            // The visitor is `Fixed`'s: it takes the buffer first thing, synchronously.
            return super::fixed::with_hand_over(owner, || visitor.visit_newtype_struct(self));
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RawError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        unit unit_struct tuple
        tuple_struct map struct enum identifier ignored_any
    }
}
