//! Faust's `Record` layout: a model's fields as a JSON object, with
//! `"__faust": {"ns": NAMESPACE}` beside them, so that a Faust app and ours can share topics
//! in both directions ([`Record`]), and decoding by namespace for topics that carry several
//! models ([`Models`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::CodecError;

/// A type that Faust knows as a `faust.Record` model: its namespace is the `namespace=` of
/// the Python class, or Faust's default, `module.ClassName` (`orders.Order` for class
/// `Order` in `orders.py`).
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, PartialEq)]
/// struct Order {
///     account_id: String,
///     amount: u32,
/// }
///
/// impl faust::FaustRecord for Order {
///     const NAMESPACE: &'static str = "orders.Order";
/// }
/// ```
pub trait FaustRecord: Serialize + DeserializeOwned {
    /// The model's namespace in Faust's registry.
    const NAMESPACE: &'static str;
}

/// A value in Faust's `Record` layout: its fields, and `"__faust": {"ns": T::NAMESPACE}`.
/// Use it as a topic's value type (with the `json` codec) to read what a Faust app sends and
/// to send what it reads: a record whose namespace is another model's is refused by name (a
/// [`CodecError`] naming both), one without the metadata is taken as `T` (Faust writes it
/// unless `include_metadata=False`).
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, PartialEq)]
/// # struct Order { account_id: String, amount: u32 }
/// # impl faust::FaustRecord for Order { const NAMESPACE: &'static str = "orders.Order"; }
/// use faust::{Codec, Record};
///
/// let order = Record(Order { account_id: "a1".into(), amount: 5 });
/// let mut out = Vec::new();
/// Codec::JSON.encode(&order, &mut out)?;
/// assert_eq!(out, br#"{"account_id":"a1","amount":5,"__faust":{"ns":"orders.Order"}}"#);
/// assert_eq!(Codec::JSON.decode::<Record<Order>>(&out)?, order);
/// # Ok::<(), faust::CodecError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Record<T>(pub T);

impl<T> Record<T> {
    /// The model itself.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Record<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Record<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

#[derive(Serialize, Deserialize)]
struct Metadata<N> {
    ns: N,
}

impl<T: FaustRecord> Serialize for Record<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct WithMetadata<'a, T> {
            #[serde(flatten)]
            fields: &'a T,
            #[serde(rename = "__faust")]
            metadata: Metadata<&'static str>,
        }
        WithMetadata { fields: &self.0, metadata: Metadata { ns: T::NAMESPACE } }.serialize(serializer)
    }
}

impl<'de, T: FaustRecord> Deserialize<'de> for Record<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound = "T: DeserializeOwned")]
        struct WithMetadata<T> {
            #[serde(flatten)]
            fields: T,
            #[serde(rename = "__faust", default)]
            metadata: Option<Metadata<String>>,
        }
        let read = WithMetadata::<T>::deserialize(deserializer)?;
        match read.metadata {
            Some(Metadata { ns }) if ns != T::NAMESPACE => Err(serde::de::Error::custom(format!(
                "a Faust record of namespace `{ns}` where `{}` was expected",
                T::NAMESPACE
            ))),
            _ => Ok(Record(read.fields)),
        }
    }
}

/// The namespace of a Faust record in JSON (`None` when `bytes` is not a JSON object with
/// Faust's metadata).
pub fn record_namespace(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyMetadata {
        #[serde(rename = "__faust")]
        metadata: Metadata<String>,
    }
    serde_json::from_slice::<OnlyMetadata>(bytes).ok().map(|m| m.metadata.ns)
}

type DecodeAny = Arc<dyn Fn(&[u8]) -> Result<Box<dyn Any + Send>, CodecError> + Send + Sync>;

/// Decoding by namespace, as Faust does for a topic declared without a value type: register
/// the models a topic may carry, then [`decode`](Models::decode) each record as the model its
/// `__faust.ns` names.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, PartialEq)]
/// # struct Order { account_id: String, amount: u32 }
/// # impl faust::FaustRecord for Order { const NAMESPACE: &'static str = "orders.Order"; }
/// # #[derive(Debug, Serialize, Deserialize, PartialEq)]
/// # struct Refund { order_id: String }
/// # impl faust::FaustRecord for Refund { const NAMESPACE: &'static str = "orders.Refund"; }
/// use faust::Models;
///
/// let mut models = Models::new();
/// models.register::<Order>().register::<Refund>();
/// let any = models.decode(br#"{"order_id":"o7","__faust":{"ns":"orders.Refund"}}"#)?;
/// assert_eq!(any.namespace(), "orders.Refund");
/// assert_eq!(any.downcast::<Refund>().ok(), Some(Refund { order_id: "o7".into() }));
/// # Ok::<(), faust::CodecError>(())
/// ```
#[derive(Clone, Default)]
pub struct Models {
    by_namespace: BTreeMap<&'static str, Model>,
}

/// A registered model.
#[derive(Clone)]
struct Model {
    rust_type: &'static str,
    /// Its fields, when it is a struct (serde names them).
    fields: Option<&'static [&'static str]>,
    decode: DecodeAny,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_namespace.keys()).finish()
    }
}

impl Models {
    /// No models.
    pub fn new() -> Models {
        Models::default()
    }

    /// Adds model `T`, under its namespace.
    pub fn register<T: FaustRecord + Send + 'static>(&mut self) -> &mut Models {
        let decode: DecodeAny = Arc::new(|bytes: &[u8]| {
            let record: Record<T> = serde_json::from_slice(bytes).map_err(|e| CodecError::decode("json", e))?;
            Ok(Box::new(record.0) as Box<dyn Any + Send>)
        });
        let model = Model { rust_type: std::any::type_name::<T>(), fields: struct_fields::<T>(), decode };
        self.by_namespace.insert(T::NAMESPACE, model);
        self
    }

    /// The registered models: each namespace with the Rust type it decodes to.
    pub fn list(&self) -> Vec<(&'static str, &'static str)> {
        self.by_namespace.iter().map(|(ns, model)| (*ns, model.rust_type)).collect()
    }

    /// The fields of the model of `namespace` (Faust's `faust model NAME`), in declaration
    /// order as serde names them; `None` when no model has that namespace, or when it is not
    /// a plain struct (an enum, a map, a struct with flattened fields).
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// #[derive(Serialize, Deserialize)]
    /// struct Order {
    ///     account_id: String,
    ///     #[serde(rename = "amount_cents")]
    ///     amount: u64,
    /// }
    /// impl faust::FaustRecord for Order {
    ///     const NAMESPACE: &'static str = "orders.Order";
    /// }
    ///
    /// let mut models = faust::Models::new();
    /// models.register::<Order>();
    /// assert_eq!(models.fields("orders.Order"), Some(&["account_id", "amount_cents"][..]));
    /// ```
    pub fn fields(&self, namespace: &str) -> Option<&'static [&'static str]> {
        self.by_namespace.get(namespace).and_then(|model| model.fields)
    }

    /// Decodes `bytes` as the model its namespace names; a record without Faust's metadata,
    /// or of a namespace not registered, is a [`CodecError`] saying so.
    pub fn decode(&self, bytes: &[u8]) -> Result<AnyRecord, CodecError> {
        let ns = record_namespace(bytes)
            .ok_or_else(|| CodecError::decode("json", "not a Faust record: no `__faust.ns` metadata"))?;
        let Some(Model { decode, .. }) = self.by_namespace.get(ns.as_str()) else {
            let known: Vec<&str> = self.by_namespace.keys().copied().collect();
            return Err(CodecError::decode("json", format!("no model of namespace `{ns}` (registered: {known:?})")));
        };
        Ok(AnyRecord { value: decode(bytes)?, namespace: ns })
    }
}

/// The field names of `T` when serde deserializes it as a struct: asked of a deserializer
/// that records them and reads nothing.
fn struct_fields<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let mut fields = None;
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// A deserializer that only answers `deserialize_struct`, recording the field names (through
/// newtype wrappers); everything else is an error.
struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(serde::de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// A record [`Models::decode`] read: the model, of the type its namespace names.
#[derive(Debug)]
pub struct AnyRecord {
    namespace: String,
    value: Box<dyn Any + Send>,
}

impl AnyRecord {
    /// The record's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The model as a `T`, or the record back when it is another model.
    pub fn downcast<T: 'static>(self) -> Result<T, AnyRecord> {
        match self.value.downcast::<T>() {
            Ok(value) => Ok(*value),
            Err(value) => Err(AnyRecord { namespace: self.namespace, value }),
        }
    }

    /// Whether the model is a `T`.
    pub fn is<T: 'static>(&self) -> bool {
        self.value.is::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    struct Order {
        account_id: String,
        amount: u32,
        price: f64,
        note: Option<String>,
    }

    impl FaustRecord for Order {
        const NAMESPACE: &'static str = "shop.Order";
    }

    #[test]
    fn a_model_s_fields_are_listed_when_it_is_a_struct() {
        #[derive(Serialize, Deserialize)]
        struct Cents(u64);
        impl FaustRecord for Cents {
            const NAMESPACE: &'static str = "shop.Cents";
        }
        #[derive(Serialize, Deserialize)]
        struct Wrapped(Order);
        impl FaustRecord for Wrapped {
            const NAMESPACE: &'static str = "shop.Wrapped";
        }
        let mut models = Models::new();
        models.register::<Order>().register::<Cents>().register::<Wrapped>();
        assert_eq!(models.fields("shop.Order"), Some(&["account_id", "amount", "price", "note"][..]));
        assert_eq!(models.fields("shop.Wrapped"), models.fields("shop.Order"), "through a newtype");
        assert_eq!(models.fields("shop.Cents"), None, "not a struct");
        assert_eq!(models.fields("shop.Missing"), None, "not registered");
    }

    #[test]
    fn the_layout_is_fausts() {
        // What `Order(account_id="a", amount=2, price=1.5, note=None).dumps()` gives in Faust
        // (field order as declared, metadata last).
        let faust = r#"{"account_id":"a","amount":2,"price":1.5,"note":null,"__faust":{"ns":"shop.Order"}}"#;
        let order = Record(Order { account_id: "a".into(), amount: 2, price: 1.5, note: None });
        assert_eq!(serde_json::to_string(&order).unwrap(), faust);
        assert_eq!(serde_json::from_str::<Record<Order>>(faust).unwrap(), order);
        // Without metadata (Faust's include_metadata=False), and with the metadata first.
        let bare = r#"{"account_id":"a","amount":2,"price":1.5,"note":null}"#;
        assert_eq!(serde_json::from_str::<Record<Order>>(bare).unwrap(), order);
        let first = r#"{"__faust":{"ns":"shop.Order"},"amount":2,"account_id":"a","price":1.5,"note":null}"#;
        assert_eq!(serde_json::from_str::<Record<Order>>(first).unwrap(), order);
    }

    #[test]
    fn another_models_record_is_refused_by_name() {
        let refund = r#"{"account_id":"a","amount":2,"price":1.5,"note":null,"__faust":{"ns":"shop.Refund"}}"#;
        let e = serde_json::from_str::<Record<Order>>(refund).unwrap_err().to_string();
        assert!(e.contains("shop.Refund") && e.contains("shop.Order"), "{e}");
        let mut models = Models::new();
        models.register::<Order>();
        let e = models.decode(refund.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("shop.Refund") && e.contains("shop.Order"), "{e}");
        assert!(models.decode(b"{}").is_err());
        assert!(models.decode(b"\xff").is_err());
    }

    proptest! {
        #[test]
        fn records_round_trip_and_decode_by_namespace(
            account_id in ".{0,20}", amount in any::<u32>(), price in -1e9f64..1e9, note in proptest::option::of(".{0,10}"),
        ) {
            let order = Order { account_id, amount, price, note };
            let bytes = serde_json::to_vec(&Record(order.clone())).unwrap();
            let namespace = record_namespace(&bytes);
            prop_assert_eq!(namespace.as_deref(), Some("shop.Order"));
            prop_assert_eq!(serde_json::from_slice::<Record<Order>>(&bytes).unwrap().into_inner(), order.clone());
            let mut models = Models::new();
            models.register::<Order>();
            prop_assert_eq!(models.decode(&bytes).unwrap().downcast::<Order>().ok(), Some(order));
        }
    }
}
