//! Fuzz target: arbitrary bytes decoded with every built-in codec (`raw`, `json`,
//! `json-simd`, `json-serde`, `binary` and compositions of them) as strings, byte vectors,
//! tuples, JSON records and values, and fixed-layout records, must never panic. Errors are
//! fine; they are what bad records produce.
//!
//! The body is `faust::fuzzing::decode` (behind the engine's `unstable-fuzzing` feature), the
//! same function the engine's property tests run on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| faust::fuzzing::decode(data));
