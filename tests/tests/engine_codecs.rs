//! Codecs on a real worker (the `test_context` harness over `memory://`): fixed-layout
//! records read in place as topic values and kept as table values, a bad fixed-layout
//! record skipped and counted, a composed codec (`json|binary`) and a registered transform
//! on a topic, and codec names from settings and the environment.

use faust::codecs::{self, Codec, Fixed, Transform, TransformError};
use faust::{App, Settings, TopicPartition};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

#[derive(Debug, Clone, Copy, PartialEq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Order {
    account: U32,
    amount: U64,
}

fn order(account: u32, amount: u64) -> Fixed<Order> {
    Fixed::new(&Order { account: account.into(), amount: amount.into() })
}

/// The key of `account`'s orders.
fn key(account: u32) -> Option<String> {
    Some(format!("account-{account}"))
}

/// Puts orders of 5, 7, 11 and 13 (accounts 0, 1, 0, 1) to each of `topics`.
fn put_orders(test: &faust::TestContext, topics: &[&faust::Topic<String, Fixed<Order>>]) {
    for (i, amount) in [5u64, 7, 11, 13].into_iter().enumerate() {
        let account = i as u32 % 2;
        for topic in topics {
            test.put(topic, key(account).as_ref(), &order(account, amount)).unwrap();
        }
    }
}

#[test]
fn fixed_records_are_topic_values_and_table_values() {
    let app = App::new(Settings::new("codecs-fixed"));
    let orders = app.topic_with::<String, Fixed<Order>>("orders", Codec::RAW, Codec::RAW);
    // The same topic seen as bytes, to write a record that is not an `Order`.
    let raw_orders = app.topic_with::<String, Vec<u8>>("orders", Codec::RAW, Codec::RAW);
    let sums = app.table::<String, u64>("sums").with_default(|| 0);
    let latest = app.table::<String, Fixed<Order>>("latest").with_codecs(Codec::RAW, Codec::RAW);
    let (s, l) = (sums.clone(), latest.clone());
    app.agent("sum", &orders, move |mut stream| {
        let (sums, latest) = (s.clone(), l.clone());
        async move {
            while let Some(order) = stream.next().await {
                assert_eq!(order.as_bytes().len(), size_of::<Order>());
                let account = format!("account-{}", order.account.get());
                sums.update(&account, |total| *total += order.amount.get())?;
                latest.insert(account, order)?;
            }
            Ok(())
        }
    });

    let test = app.test_context().unwrap();
    put_orders(&test, &[&orders]);
    // Three bytes are not an `Order`: a bad record, skipped and counted.
    test.put(&raw_orders, key(0).as_ref(), &vec![1u8, 2, 3]).unwrap();
    test.put(&orders, key(1).as_ref(), &order(1, 100)).unwrap();

    let sums_now = test.table(&sums).unwrap();
    assert_eq!(sums_now.get("account-0"), Some(&(5 + 11)));
    assert_eq!(sums_now.get("account-1"), Some(&(7 + 13 + 100)));
    let latest_now = test.table(&latest).unwrap();
    assert_eq!(*latest_now["account-0"], *order(0, 11));
    assert_eq!(*latest_now["account-1"], *order(1, 100));
    assert_eq!(app.stats().bad_records, 1);

    // On the log, a record is the 12 bytes of the layout, nothing more.
    let written = test.records(&raw_orders).unwrap();
    assert!(written.iter().filter(|(_, v)| v.len() == 12).count() == 5, "{written:?}");
    test.stop().unwrap();
}

/// Reverses the bytes: a stand-in for a compression.
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

#[test]
fn composed_codecs_and_registered_transforms_carry_topics() {
    codecs::register("engine-codecs-reverse", Reverse).unwrap();
    let app = App::new(Settings::new("codecs-composed"));
    let numbers = app.topic_with::<String, Vec<u64>>("numbers", Codec::RAW, "json|binary".parse().unwrap());
    let out_codec: Codec = "json|engine-codecs-reverse".parse().unwrap();
    let sums = app.topic_with::<String, u64>("sums", "binary".parse().unwrap(), out_codec);
    let out = sums.clone();
    app.agent("sum", &numbers, move |mut stream| {
        let out = out.clone();
        async move {
            while let Some(event) = stream.next_event().await {
                out.send_soon(event.key.as_ref(), &event.value.iter().sum())?;
            }
            Ok(())
        }
    });
    let test = app.test_context().unwrap();
    test.put(&numbers, Some(&"a".to_string()), &vec![1, 2, 39]).unwrap();
    assert_eq!(test.records(&sums).unwrap(), vec![(Some("a".to_string()), 42)]);

    // As stored: base64 of JSON in, reversed JSON with a base64 key out.
    let stored = |topic: &str| {
        (0..8)
            .flat_map(|p| test.transport().records(&TopicPartition::new(topic, p)).unwrap())
            .map(|r| (r.key.unwrap().to_vec(), r.value.unwrap().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(stored("numbers"), vec![(b"a".to_vec(), b"WzEsMiwzOV0=".to_vec())]);
    assert_eq!(stored("sums"), vec![(b"YQ==".to_vec(), b"24".to_vec())]);
    test.stop().unwrap();
}

#[test]
fn settings_name_the_default_codecs() {
    let settings = Settings::new("codecs-settings")
        .from_vars([("APP_KEY_SERIALIZER", "json"), ("APP_VALUE_SERIALIZER", "json|binary")])
        .unwrap();
    let app = App::new(settings);
    let topic = app.topic::<u32, String>("t");
    app.agent("drain", &topic, |mut stream| async move {
        while let Some(value) = stream.next().await {
            assert_eq!(value, "x");
        }
        Ok(())
    });
    let test = app.test_context().unwrap();
    test.put(&topic, Some(&7), &"x".to_string()).unwrap();
    let stored: Vec<_> = (0..8)
        .flat_map(|p| test.transport().records(&TopicPartition::new("t", p)).unwrap())
        .map(|r| (r.key.unwrap().to_vec(), r.value.unwrap().to_vec()))
        .collect();
    assert_eq!(stored, vec![(b"7".to_vec(), b"Ingi".to_vec())]); // base64 of "x" with its quotes
    assert_eq!(test.records(&topic).unwrap(), vec![(Some(7), "x".to_string())]);
    test.stop().unwrap();

    let err = Settings::new("codecs-settings").from_vars([("APP_VALUE_SERIALIZER", "json|gzip")]).unwrap_err();
    assert_eq!(err.variable, "APP_VALUE_SERIALIZER");
    assert!(err.reason.contains("unknown codec `gzip`"), "{err}");
}

#[test]
fn for_each_in_place_reads_fixed_records_and_rejects_bad_ones() {
    let app = App::new(Settings::new("codecs-in-place"));
    let orders = app.topic_with::<String, Fixed<Order>>("orders", Codec::RAW, Codec::RAW);
    let raw_orders = app.topic_with::<String, Vec<u8>>("orders", Codec::RAW, Codec::RAW);
    // The same records through a processor: values are `Fixed<Order>` the filter saw.
    let big = app.topic_with::<String, Fixed<Order>>("big", Codec::RAW, Codec::RAW);
    let sums = app.table::<String, u64>("sums").with_default(|| 0);
    let s = sums.clone();
    app.agent("sum", &orders, move |stream| {
        let sums = s.clone();
        stream.for_each_in_place(move |order: &Order| {
            sums.update(&format!("account-{}", order.account.get()), |t| *t += order.amount.get())?;
            Ok(())
        })
    });
    let s = sums.clone();
    app.agent("big", &big, move |stream| {
        let sums = s.clone();
        stream.filter(|o| o.amount.get() >= 10).for_each_in_place(move |order: &Order| {
            // Keyed like the source (a table is partitioned like the stream).
            sums.update(&format!("big-{}", order.account.get()), |t| *t += order.amount.get())?;
            Ok(())
        })
    });

    let test = app.test_context().unwrap();
    put_orders(&test, &[&orders, &big]);
    // Thirteen bytes are not an `Order` (twelve): a bad record, skipped and counted.
    test.put(&raw_orders, key(0).as_ref(), &vec![0u8; 13]).unwrap();
    test.put(&orders, key(1).as_ref(), &order(1, 100)).unwrap();

    let sums_now = test.table(&sums).unwrap();
    assert_eq!(sums_now.get("account-0"), Some(&(5 + 11)));
    assert_eq!(sums_now.get("account-1"), Some(&(7 + 13 + 100)));
    assert_eq!(sums_now.get("big-0"), Some(&11));
    assert_eq!(sums_now.get("big-1"), Some(&13));
    assert_eq!(app.stats().bad_records, 1);
    test.stop().unwrap();
}
