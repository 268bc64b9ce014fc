//! The codec section: what decoding one order record costs on one core, per codec, over a
//! large array of pre-encoded records held as slices of one buffer (as a fetched batch is):
//! JSON decoded by simd-json, JSON decoded by serde_json, and the same order as a
//! fixed-layout record read in place by [`Codec::view`] (the read
//! [`Stream::for_each_in_place`](faust::Stream::for_each_in_place) makes of every record) and
//! decoded into the owned [`faust::Fixed`], which holds the record's buffer. Every decode
//! reads a field, through [`black_box`], so none is optimised away.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use faust::{Codec, Fixed};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::w2::{Order, order};

/// W2's order as a fixed-layout record (48 bytes): ids as fixed-width ASCII, the price in
/// cents.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FixedOrder {
    /// `account-NNNNNNN`, zero-padded.
    pub account_id: [u8; 16],
    /// `product-NNNN`, zero-padded.
    pub product_id: [u8; 16],
    /// Items ordered.
    pub amount: U32,
    /// Reserved (keeps `price_cents` at a multiple of 8 bytes from the start, for readers
    /// in other languages that want it aligned).
    pub reserved: U32,
    /// Unit price in cents.
    pub price_cents: U64,
}

impl FixedOrder {
    /// `o` in the fixed layout.
    pub fn from_order(o: &Order) -> FixedOrder {
        fn padded(s: &str) -> [u8; 16] {
            let mut out = [0u8; 16];
            let n = s.len().min(16);
            out[..n].copy_from_slice(&s.as_bytes()[..n]);
            out
        }
        FixedOrder {
            account_id: padded(&o.account_id),
            product_id: padded(&o.product_id),
            amount: o.amount.into(),
            reserved: 0.into(),
            price_cents: ((o.price * 100.0).round() as u64).into(),
        }
    }
}

/// The codec section's figures (records/s on one core, best of the runs).
#[derive(Debug, Clone, Copy)]
pub struct CodecFigures {
    /// Records decoded.
    pub records: usize,
    /// Mean JSON record size.
    pub json_bytes: f64,
    /// JSON decoded by simd-json (`json-simd`).
    pub json_simd: f64,
    /// JSON decoded by serde_json (`json-serde`).
    pub json_serde: f64,
    /// The fixed layout read in place (`Codec::RAW.view::<FixedOrder>`): a reference into the
    /// buffer, checked for length.
    pub zerocopy: f64,
    /// The owned form (`raw` with `Fixed<FixedOrder>`): the decoded value holds the record's
    /// buffer, a reference-count increment and decrement per record.
    pub zerocopy_owned: f64,
    /// The floor of that: the layout viewed with zerocopy alone plus a clone and a drop of
    /// the record's `Bytes` (two atomic reference-count updates), what any decoded value
    /// that holds its buffer costs at least.
    pub handle: f64,
}

impl CodecFigures {
    /// The faster JSON decoder's rate.
    pub fn json(&self) -> f64 {
        self.json_simd.max(self.json_serde)
    }

    /// Zero-copy over the faster JSON decoder.
    pub fn zerocopy_vs_json(&self) -> f64 {
        self.zerocopy / self.json()
    }
}

/// `records` encoded by `encode`, as slices of one buffer.
fn encoded(records: usize, encode: impl Fn(&Order, &mut Vec<u8>)) -> Vec<Bytes> {
    let mut buf = Vec::new();
    let mut ends = Vec::with_capacity(records);
    for i in 0..records as u64 {
        encode(&order(i, 10_000), &mut buf);
        ends.push(buf.len());
    }
    let buf = Bytes::from(buf);
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let slice = buf.slice(start..end);
            start = end;
            slice
        })
        .collect()
}

/// Records/s of one pass of `decode` over `records`.
fn rate(records: &[Bytes], decode: impl Fn(&Bytes) -> u64) -> f64 {
    let start = Instant::now();
    let mut sum = 0u64;
    for r in records {
        sum = sum.wrapping_add(decode(black_box(r)));
    }
    black_box(sum);
    records.len() as f64 / start.elapsed().as_secs_f64()
}

/// Runs the section over `records` orders.
pub fn run(records: usize, runs: usize) -> CodecFigures {
    let json = encoded(records, |o, out| Codec::JSON.encode(o, out).expect("encode an order"));
    let fixed = encoded(records, |o, out| {
        Codec::RAW.encode(&Fixed::new(&FixedOrder::from_order(o)), out).expect("encode an order")
    });
    let json_bytes = json.iter().map(Bytes::len).sum::<usize>() as f64 / records as f64;
    let decode_json = |codec: &Codec, r: &Bytes| {
        codec.decode_bytes::<Order>(r).map(|o| u64::from(o.amount)).expect("decode an order")
    };
    // The codecs take turns in every round, so a noisy neighbour slows all of them alike;
    // each keeps its best round.
    let (mut json_simd, mut json_serde, mut zerocopy, mut zerocopy_owned, mut handle) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for _ in 0..runs {
        json_simd = json_simd.max(rate(&json, |r| decode_json(&Codec::JSON_SIMD, r)));
        json_serde = json_serde.max(rate(&json, |r| decode_json(&Codec::JSON_SERDE, r)));
        zerocopy = zerocopy.max(rate(&fixed, |r| {
            Codec::RAW.view::<FixedOrder>(r).map(|o| u64::from(o.amount.get())).expect("read an order")
        }));
        zerocopy_owned = zerocopy_owned.max(rate(&fixed, |r| {
            Codec::RAW.decode_bytes::<Fixed<FixedOrder>>(r).map(|o| u64::from(o.amount.get())).expect("decode an order")
        }));
        handle = handle.max(rate(&fixed, |r| {
            let held = black_box(r.clone());
            FixedOrder::ref_from_bytes(&held).map(|o| u64::from(o.amount.get())).unwrap_or(0)
        }));
    }
    CodecFigures { records, json_bytes, json_simd, json_serde, zerocopy, zerocopy_owned, handle }
}
