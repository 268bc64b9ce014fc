//! The body of the `decode` fuzz target (`engine/fuzz`): arbitrary bytes decoded with every
//! built-in codec, as the value types the engine commonly meets. It is a plain function so
//! the property tests run it on stable too. Decoding may fail; it must not panic.

use bytes::Bytes;
use zerocopy::little_endian::{I64, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Codec, Fixed};

/// A JSON record like the benchmark's orders.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Order {
    pub(crate) account_id: String,
    pub(crate) product_id: String,
    pub(crate) amount: u32,
    pub(crate) price: f64,
}

/// A fixed-layout record.
#[derive(Debug, Clone, Copy, PartialEq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct Layout {
    pub(crate) account: U32,
    pub(crate) kind: U16,
    pub(crate) flags: [u8; 2],
    pub(crate) amount: I64,
}

/// The codecs the fuzz target tries.
pub(crate) const CODECS: [&str; 8] =
    ["raw", "json", "json-simd", "json-serde", "binary", "json|binary", "json-simd|binary|binary", "raw|binary"];

/// Decodes `data` with every codec of [`CODECS`] as several types.
pub(crate) fn decode_everything(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    for name in CODECS {
        let Ok(codec) = Codec::named(name) else { continue };
        let _ = codec.decode::<String>(data);
        let _ = codec.decode::<Vec<u8>>(data);
        let _ = codec.decode::<(u64, i32, bool, char)>(data);
        let _ = codec.decode_bytes::<Order>(&bytes);
        let _ = codec.decode_bytes::<serde_json::Value>(&bytes);
        let _ = codec.decode_bytes::<std::collections::BTreeMap<String, Vec<Option<f64>>>>(&bytes);
        if let Ok(fixed) = codec.decode_bytes::<Fixed<Layout>>(&bytes) {
            std::hint::black_box(fixed.amount.get());
        }
        let _ = codec.decode::<Fixed<Layout>>(data);
    }
}
