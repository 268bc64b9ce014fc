use super::fuzz::{Layout, Order, decode_everything};
use super::*;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use zerocopy::IntoBytes as _;

/// Reverses the bytes: a user transform.
struct Reverse;

impl Transform for Reverse {
    fn encode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
        out.extend(input.iter().rev());
        Ok(())
    }
    fn decode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
        self.encode(input, out)
    }
}

/// XORs with a key and prefixes a checksum byte, so its decode can fail: a user transform
/// with errors of its own.
struct Checked;

impl Transform for Checked {
    fn encode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
        out.push(input.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
        out.extend(input.iter().map(|b| b ^ 0x5a));
        Ok(())
    }
    fn decode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
        let (sum, rest) = input.split_first().ok_or("empty")?;
        let start = out.len();
        out.extend(rest.iter().map(|b| b ^ 0x5a));
        if out[start..].iter().fold(0u8, |a, b| a.wrapping_add(*b)) != *sum {
            return Err("checksum mismatch".into());
        }
        Ok(())
    }
}

fn register_test_transforms() {
    // Registering again is harmless: the tests of this module share the process.
    register("test-reverse", Reverse).unwrap();
    register("test-checked", Checked).unwrap();
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(codec: &Codec, value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    codec.encode(value, &mut out).unwrap();
    assert_eq!(&codec.decode::<T>(&out).unwrap(), value, "{codec}");
    assert_eq!(&codec.decode_bytes::<T>(&Bytes::from(out.clone())).unwrap(), value, "{codec}");
    out
}

fn fixed_layout() -> impl Strategy<Value = Layout> {
    (any::<u32>(), any::<u16>(), any::<[u8; 2]>(), any::<i64>()).prop_map(|(a, k, f, m)| Layout {
        account: a.into(),
        kind: k.into(),
        flags: f,
        amount: m.into(),
    })
}

fn order() -> impl Strategy<Value = Order> {
    (".*", "[a-z0-9-]{0,12}", any::<u32>(), -1e12f64..1e12).prop_map(|(account_id, product_id, amount, price)| Order {
        account_id,
        product_id,
        amount,
        price,
    })
}

#[test]
fn raw_carries_strings_and_bytes_as_they_are() {
    assert_eq!(round_trip(&Codec::RAW, &"account-7".to_string()), b"account-7");
    assert_eq!(round_trip(&Codec::RAW, &vec![0u8, 255, 3]), vec![0, 255, 3]);
    assert_eq!(round_trip(&Codec::RAW, &Some("x".to_string())), b"x");
    assert!(Codec::RAW.encode(&42u64, &mut Vec::new()).is_err());
    assert!(Codec::RAW.encode(&vec![256u32], &mut Vec::new()).is_err());
    let err = Codec::RAW.decode::<String>(&[0xff, 0xfe]).unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
    assert_eq!(err.codec(), Some("raw"));
}

#[test]
fn the_raw_fast_path_encodes_like_serde() {
    register_test_transforms();
    for codec in [Codec::RAW, "binary".parse().unwrap(), "raw|test-reverse|binary".parse().unwrap()] {
        for value in ["", "account-7", "ünïcode"] {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            codec.encode_owned(&value.to_string(), &mut fast).unwrap();
            codec.encode(&value.to_string(), &mut slow).unwrap();
            assert_eq!(fast, slow);
        }
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        codec.encode_owned(&vec![0u8, 255], &mut fast).unwrap();
        codec.encode(&vec![0u8, 255], &mut slow).unwrap();
        assert_eq!(fast, slow);
        assert!(codec.encode_owned(&42u64, &mut Vec::new()).is_err());
    }
}

#[test]
fn json_round_trips_and_reports_bad_input() {
    for codec in [Codec::JSON, Codec::JSON_SIMD, Codec::JSON_SERDE] {
        let order = Order { account_id: "a".into(), product_id: "p".into(), amount: 5, price: 1.5 };
        let bytes = round_trip(&codec, &order);
        assert_eq!(bytes, br#"{"account_id":"a","product_id":"p","amount":5,"price":1.5}"#);
        let err = codec.decode::<Order>(b"{not json").unwrap_err();
        assert_eq!(err.codec(), Some(codec.name()));
        assert!(matches!(err, CodecError::Decode { .. }));
    }
}

#[test]
fn binary_is_base64_like_fausts() {
    let binary: Codec = "binary".parse().unwrap();
    assert_eq!(round_trip(&binary, &"hello".to_string()), b"aGVsbG8=");
    let json_binary: Codec = "json|binary".parse().unwrap();
    assert_eq!(round_trip(&json_binary, &vec![1, 2, 3]), b"WzEsMiwzXQ==");
    let err = json_binary.decode::<Vec<u32>>(b"not base64!").unwrap_err();
    assert_eq!(err.codec(), Some("binary"));
    let err = json_binary.decode::<Vec<u32>>(b"bm90IGpzb24=").unwrap_err(); // "not json"
    assert_eq!(err.codec(), Some("json"));
}

#[test]
fn names_parse_into_stages_and_unknown_names_are_typed_errors() {
    register_test_transforms();
    assert_eq!(Codec::named("raw").unwrap(), Codec::RAW);
    assert_eq!(Codec::named("json").unwrap(), Codec::JSON);
    assert_eq!(Codec::named(" json | binary ").unwrap().name(), "json|binary");
    assert_eq!(Codec::named("binary").unwrap().name(), "binary");
    assert_eq!(Codec::named("test-reverse|binary").unwrap().name(), "test-reverse|binary");
    match Codec::named("json|gzip").unwrap_err() {
        CodecError::Unknown { name, spec, known } => {
            assert_eq!((name.as_str(), spec.as_str()), ("gzip", "json|gzip"));
            assert!(
                known.contains("json-simd") && known.contains("binary") && known.contains("test-reverse"),
                "{known}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(Codec::named("pickle"), Err(CodecError::Unknown { .. })));
    assert!(matches!(Codec::named("binary|json"), Err(CodecError::BadName { .. })));
    assert!(matches!(Codec::named(""), Err(CodecError::BadName { .. })));
    assert!(matches!(Codec::named("json||binary"), Err(CodecError::BadName { .. })));
    for bad in ["json", "binary", "raw", "", "a|b", "a b"] {
        assert!(matches!(register(bad, Reverse), Err(CodecError::BadName { .. })), "{bad}");
    }
}

#[test]
fn a_user_transform_error_names_its_stage() {
    register_test_transforms();
    let codec: Codec = "json|test-checked".parse().unwrap();
    let mut out = Vec::new();
    codec.encode(&"x", &mut out).unwrap();
    out[1] ^= 1;
    let err = codec.decode::<String>(&out).unwrap_err();
    assert_eq!(err.codec(), Some("test-checked"));
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn fixed_reads_in_place_from_the_records_bytes() {
    let record = Layout { account: 7.into(), kind: 2.into(), flags: [1, 0], amount: (-42).into() };
    let mut out = Vec::new();
    Codec::RAW.encode(&Fixed::new(&record), &mut out).unwrap();
    assert_eq!(out, record.as_bytes());
    let fetched = Bytes::from(out);
    let fixed: Fixed<Layout> = Codec::RAW.decode_bytes(&fetched).unwrap();
    assert_eq!(*fixed, record);
    let at = &*fixed as *const Layout as usize;
    let range = fetched.as_ptr() as usize..fetched.as_ptr() as usize + fetched.len();
    assert!(range.contains(&at) && at + size_of::<Layout>() <= range.end, "read in place");

    // From a slice, or under another codec: a copy, still correct.
    let copied: Fixed<Layout> = Codec::RAW.decode(&fetched).unwrap();
    assert_eq!(*copied, record);
    assert_ne!(copied.as_bytes().as_ptr(), fetched.as_ptr());
    let json = round_trip(&Codec::JSON, &Fixed::new(&record));
    assert_eq!(*Codec::JSON_SIMD.decode::<Fixed<Layout>>(&json).unwrap(), record);
    // Through a transform: the decoded buffer is handed over without another copy.
    let binary: Codec = "binary".parse().unwrap();
    assert_eq!(
        *binary.decode_bytes::<Fixed<Layout>>(&Bytes::from(round_trip(&binary, &Fixed::new(&record)))).unwrap(),
        record
    );
}

#[test]
fn a_fixed_record_of_the_wrong_length_is_a_decode_error() {
    for len in [0, 1, size_of::<Layout>() - 1, size_of::<Layout>() + 1, 100] {
        let bytes = Bytes::from(vec![0u8; len]);
        let err = Codec::RAW.decode_bytes::<Fixed<Layout>>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err:?}");
        assert!(err.to_string().contains("bytes are not a"), "{err}");
        assert!(Codec::RAW.decode::<Fixed<Layout>>(&bytes).is_err());
        assert!(Fixed::<Layout>::from_bytes(bytes).is_err());
    }
    // Nothing of a failed hand-over is left for the next decode, under any codec.
    let record = Layout { account: 1.into(), kind: 2.into(), flags: [3, 4], amount: 5.into() };
    let mut json = Vec::new();
    Codec::JSON.encode(&Fixed::new(&record), &mut json).unwrap();
    for codec in [Codec::JSON, Codec::JSON_SIMD] {
        assert!(Codec::RAW.decode_bytes::<Fixed<Layout>>(&Bytes::from_static(b"short")).is_err());
        let fixed: Fixed<Layout> = codec.decode_bytes(&Bytes::from(json.clone())).unwrap();
        assert_eq!(*fixed, record);
    }
}

#[test]
fn the_fuzz_body_survives_known_hard_inputs() {
    for data in [
        &b""[..],
        b"{",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        b"\"\\ud800\"",
        b"1e999999",
        b"-",
        b"{\"account_id\":\"a\",\"amount\":1e400}",
        b"\xff\xfe\x00",
        b"====",
        &[0u8; 16],
    ] {
        decode_everything(data);
    }
}

/// The codecs every value of a type should round-trip through.
fn codecs_for_values() -> Vec<Codec> {
    register_test_transforms();
    [
        "json",
        "json-simd",
        "json-serde",
        "json|binary",
        "json-simd|binary|binary",
        "json|test-reverse|test-checked|binary",
    ]
    .iter()
    .map(|n| n.parse().unwrap())
    .collect()
}

fn codecs_for_bytes() -> Vec<Codec> {
    register_test_transforms();
    ["raw", "binary", "raw|binary", "raw|test-checked", "test-reverse|binary|test-checked"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect()
}

proptest! {
    #[test]
    fn every_codec_round_trips_orders(order in order()) {
        for codec in codecs_for_values() {
            round_trip(&codec, &order);
        }
    }

    #[test]
    fn every_codec_round_trips_json_values(value in proptest::collection::btree_map(".*", proptest::collection::vec(proptest::option::of(any::<i64>()), 0..4), 0..4)) {
        for codec in codecs_for_values() {
            round_trip(&codec, &value);
        }
    }

    #[test]
    fn raw_codecs_round_trip_strings_and_bytes(s in ".*", b in proptest::collection::vec(any::<u8>(), 0..200)) {
        for codec in codecs_for_bytes() {
            round_trip(&codec, &s);
            round_trip(&codec, &b);
        }
    }

    #[test]
    fn fixed_round_trips_under_every_raw_codec(record in fixed_layout()) {
        for codec in codecs_for_bytes() {
            let mut out = Vec::new();
            codec.encode(&Fixed::new(&record), &mut out).unwrap();
            let fixed: Fixed<Layout> = codec.decode_bytes(&Bytes::from(out)).unwrap();
            prop_assert_eq!(*fixed, record);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        decode_everything(&data);
    }

    #[test]
    fn json_like_bytes_never_panic_a_decoder(data in r#"[\[\]{}",:0-9a-z.eE+\-\\ ]{0,80}"#) {
        decode_everything(data.as_bytes());
    }

    #[test]
    fn simd_and_serde_agree_on_what_decodes(data in r#"\{("[a-z_]{0,10}":("[a-z0-9]{0,5}"|[0-9]{1,4}(\.[0-9])?),?){0,5}\}"#) {
        let simd = Codec::JSON_SIMD.decode::<Order>(data.as_bytes());
        let serde = Codec::JSON_SERDE.decode::<Order>(data.as_bytes());
        prop_assert_eq!(simd.is_ok(), serde.is_ok(), "{} {:?} {:?}", data, simd, serde);
        if let (Ok(a), Ok(b)) = (simd, serde) {
            prop_assert_eq!(a, b);
        }
    }
}

#[test]
fn codecs_and_fixed_values_cross_threads() {
    // A `Codec` is declared once and used on every core; a `Fixed` value is sent like any
    // other value (its buffer is reference-counted atomically).
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Codec>();
    send_sync::<CodecError>();
    send_sync::<Fixed<Layout>>();
}

/// JSON with its bytes reversed: a whole codec of the tests' own.
struct ReversedJson;

impl ValueFormat for ReversedJson {
    fn encode(&self, value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), TransformError> {
        out.extend(serde_json::to_vec(value)?.into_iter().rev());
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<serde_json::Value, TransformError> {
        Ok(serde_json::from_slice(&bytes.iter().rev().copied().collect::<Vec<u8>>())?)
    }
}

#[test]
fn whole_codecs_are_first_stages_by_name() {
    register_format("reversed-json", ReversedJson).unwrap();
    let codec: Codec = "reversed-json|binary".parse().unwrap();
    let order = Order { account_id: "a".into(), product_id: "p".into(), amount: 2, price: 1.5 };
    let mut out = Vec::new();
    codec.encode(&order, &mut out).unwrap();
    assert_eq!(codec.decode::<Order>(&out).unwrap(), order);
    assert_eq!(codec.decode_bytes::<Order>(&Bytes::from(out)).unwrap(), order);
    // Names: no clash with built-ins or transforms; a format is only ever first.
    for (name, says) in [("json", "built-in"), ("binary", "built-in"), ("a|b", "without `|`")] {
        let e = register_format(name, ReversedJson).unwrap_err().to_string();
        assert!(e.contains(says), "{name}: {e}");
    }
    let e = "json|reversed-json".parse::<Codec>().unwrap_err().to_string();
    assert!(e.contains("can only be the first stage"), "{e}");
    assert!(register("reversed-json", Base64).unwrap_err().to_string().contains("whole codec"));
    // Bad bytes are a decode error naming the codec, never a panic.
    let e = codec.decode::<Order>(b"not base64 at all!").unwrap_err();
    assert!(matches!(e, CodecError::Decode { .. }), "{e}");
    let plain: Codec = "reversed-json".parse().unwrap();
    let e = plain.decode::<Order>(b"}{").unwrap_err().to_string();
    assert!(e.contains("reversed-json"), "{e}");
}
