//! [`Fixed`]: a fixed-layout record read in place from the buffer it was fetched in.

use std::cell::Cell;
use std::marker::PhantomData;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::ser::{Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::CodecError;

/// The newtype-struct name by which [`Fixed`]'s `Deserialize` asks for the record's own
/// buffer. Only the `raw` format's deserializer answers to it (with the buffer, through
/// [`hand_over`]); any other deserializer sees an ordinary newtype and gives bytes to copy.
pub(super) const MAGIC: &str = "$faust::private::Fixed";

thread_local! {
    /// The buffer the `raw` deserializer offers to the `Fixed` visitor it is about to call:
    /// non-null only inside [`with_hand_over`], which borrows the buffer for the whole call
    /// and resets the slot when it returns or unwinds. A plain pointer rather than a
    /// `Bytes`, so the slot has no destructor and costs a load and a store (serde's visitors
    /// cannot be given a `Bytes` otherwise).
    static HANDED_OVER: Cell<*const Bytes> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with `owner` offered to the first `Fixed` visitor that asks.
#[inline]
pub(super) fn with_hand_over<T>(owner: &Bytes, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            HANDED_OVER.set(std::ptr::null());
        }
    }
    HANDED_OVER.set(owner);
    let _reset = Reset;
    f()
}

/// The offered buffer (a reference-count increment), once.
#[inline]
fn take_hand_over() -> Option<Bytes> {
    let offered = HANDED_OVER.replace(std::ptr::null());
    // SAFETY: a non-null pointer was set by `with_hand_over` from a `&Bytes` that outlives
    // the call we are in: the slot is reset when that call ends, even by unwinding.
    (!offered.is_null()).then(|| unsafe { (*offered).clone() })
}

/// A fixed-layout record `R` read in place: it holds the buffer the record was fetched in
/// (a reference-counted [`Bytes`], no copy of the payload) and derefs to `&R` over it.
///
/// `R` is a plain-data type that [`zerocopy`] can view in any bytes of the right length
/// (`FromBytes`, `KnownLayout`, `Immutable`, and `Unaligned`, so no alignment is needed:
/// build it from zerocopy's byte-order-aware integers such as `zerocopy::little_endian::U64`).
/// Use it as a topic's or table's value type under the `raw` codec
/// ([`Codec::RAW`](crate::Codec::RAW)): the engine decodes each record from its buffer and
/// a `Fixed<R>` takes that buffer. A record whose length is not `R`'s is a bad record (a
/// [`CodecError`]), like malformed JSON. Encoding a `Fixed<R>` writes `R`'s bytes.
///
/// Under another codec, or decoded from a plain slice ([`Codec::decode`](crate::Codec::decode)),
/// a `Fixed<R>` gets a copy of the bytes: correct, just not zero-copy.
///
/// `engine/examples/zerocopy.rs` runs an app over such records
/// (`cargo run --release --example zerocopy`).
///
/// ```
/// use bytes::Bytes;
/// use faust::{Codec, Fixed};
/// use zerocopy::little_endian::{U32, U64};
/// use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
///
/// #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
/// #[repr(C)]
/// struct Order {
///     account: U32,
///     amount: U64,
/// }
///
/// let mut out = Vec::new();
/// Codec::RAW.encode(&Fixed::new(&Order { account: 7.into(), amount: 42.into() }), &mut out)?;
/// assert_eq!(out.len(), 12);
///
/// let fetched = Bytes::from(out);
/// let order: Fixed<Order> = Codec::RAW.decode_bytes(&fetched)?;
/// assert_eq!((order.account.get(), order.amount.get()), (7, 42));
/// assert_eq!(order.as_bytes().as_ptr(), fetched.as_ptr()); // read in place
///
/// assert!(Codec::RAW.decode_bytes::<Fixed<Order>>(&fetched.slice(1..)).is_err());
/// # Ok::<(), faust::CodecError>(())
/// ```
pub struct Fixed<R> {
    /// Exactly one `R`: checked when the value is made, and `Bytes` never change.
    bytes: Bytes,
    _record: PhantomData<fn() -> R>,
}

/// `bytes` viewed as an `R`, or why they are not one (their length).
#[inline]
pub(crate) fn view<R: FromBytes + KnownLayout + Immutable + Unaligned>(bytes: &[u8]) -> Result<&R, CodecError> {
    R::ref_from_bytes(bytes).map_err(|_| not_a_record::<R>(bytes.len()))
}

#[cold]
fn not_a_record<R>(len: usize) -> CodecError {
    CodecError::decode(
        "raw",
        format!("{len} bytes are not a {} ({} bytes)", std::any::type_name::<R>(), std::mem::size_of::<R>()),
    )
}

impl<R: FromBytes + KnownLayout + Immutable + Unaligned> Fixed<R> {
    /// Views `bytes` as an `R`, or says why they are not one (their length).
    pub fn from_bytes(bytes: Bytes) -> Result<Fixed<R>, CodecError> {
        view::<R>(&bytes)?;
        Ok(Fixed { bytes, _record: PhantomData })
    }

    /// A copy of `record`'s bytes, as a `Fixed` to send.
    pub fn new(record: &R) -> Fixed<R>
    where
        R: IntoBytes,
    {
        Fixed { bytes: Bytes::copy_from_slice(record.as_bytes()), _record: PhantomData }
    }

    /// The record's bytes: the buffer it was read from.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The buffer, for sending on as it is.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl<R: FromBytes + KnownLayout + Immutable + Unaligned> std::ops::Deref for Fixed<R> {
    type Target = R;

    fn deref(&self) -> &R {
        match R::ref_from_bytes(&self.bytes) {
            Ok(record) => record,
            // `from_bytes` checked the length, `R` needs no alignment and `Bytes` are
            // immutable: the view cannot fail.
            Err(_) => unreachable!("a Fixed holds exactly one record"),
        }
    }
}

impl<R> Clone for Fixed<R> {
    fn clone(&self) -> Self {
        Fixed { bytes: self.bytes.clone(), _record: PhantomData }
    }
}

impl<R> PartialEq for Fixed<R> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<R> Eq for Fixed<R> {}

impl<R> std::hash::Hash for Fixed<R> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state);
    }
}

impl<R: FromBytes + KnownLayout + Immutable + Unaligned + std::fmt::Debug> std::fmt::Debug for Fixed<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Fixed").field(&**self).finish()
    }
}

impl<R> Serialize for Fixed<R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_struct(MAGIC, &AsSerdeBytes(&self.bytes))
    }
}

/// Bytes serialized as serde bytes (not as a sequence), without the `serde_bytes` crate.
struct AsSerdeBytes<'a>(&'a [u8]);

impl Serialize for AsSerdeBytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de, R: FromBytes + KnownLayout + Immutable + Unaligned> Deserialize<'de> for Fixed<R> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_newtype_struct(MAGIC, FixedVisitor(PhantomData))
    }
}

struct FixedVisitor<R>(PhantomData<fn() -> R>);

impl<R: FromBytes + KnownLayout + Immutable + Unaligned> FixedVisitor<R> {
    fn make<E: de::Error>(bytes: Bytes) -> Result<Fixed<R>, E> {
        Fixed::from_bytes(bytes).map_err(E::custom)
    }
}

impl<'de, R: FromBytes + KnownLayout + Immutable + Unaligned> Visitor<'de> for FixedVisitor<R> {
    type Value = Fixed<R>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} bytes of a {}", std::mem::size_of::<R>(), std::any::type_name::<R>())
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Fixed<R>, D::Error> {
        match take_hand_over() {
            Some(bytes) => Self::make(bytes),
            None => deserializer.deserialize_byte_buf(self),
        }
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Fixed<R>, E> {
        Self::make(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Fixed<R>, E> {
        Self::make(Bytes::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Fixed<R>, E> {
        self.visit_bytes(v.as_bytes())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Fixed<R>, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(std::mem::size_of::<R>()));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Self::make(Bytes::from(bytes))
    }
}
