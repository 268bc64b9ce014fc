//! JSON decoding with simd-json, which parses in place: the input is copied into a scratch
//! buffer kept per thread, with simd-json's own buffers, so a decode allocates only what the
//! value itself needs, plus the tape simd-json builds per call (its serde deserializer takes
//! the tape by value and gives no way to hand it back for reuse).

use std::cell::RefCell;

use serde::de::DeserializeOwned;

/// The scratch copy of the input and simd-json's buffers, per thread.
struct Scratch {
    input: Vec<u8>,
    buffers: simd_json::Buffers,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> =
        RefCell::new(Scratch { input: Vec::new(), buffers: simd_json::Buffers::new(256) });
}

/// Decodes `bytes` as JSON with simd-json.
pub(super) fn decode_simd<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, simd_json::Error> {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let Scratch { input, buffers } = &mut *scratch;
            input.clear();
            input.extend_from_slice(bytes);
            simd_json::serde::from_slice_with_buffers(input, buffers)
        }
        // A decode inside a decode (a `Deserialize` impl that decodes JSON itself): its own
        // buffers, rather than a panic on the borrowed ones.
        Err(_) => simd_json::serde::from_slice(&mut bytes.to_vec()),
    })
}
