//! Codecs: how keys and values become bytes and back, chosen by name per topic or table
//! (Faust's `key_serializer` / `value_serializer`), with Faust's registry and composition.
//!
//! A codec is a *format*, which turns a serde value into bytes, followed by any number of
//! *transforms*, each turning bytes into bytes: `json|binary` is JSON, then base64. Encoding
//! runs the stages left to right, decoding right to left (as Faust's `codec1 | codec2`).
//!
//! | name | kind | what |
//! |---|---|---|
//! | `raw` | format | bytes as they are: strings (UTF-8), byte vectors, and [`Fixed`] records read in place |
//! | `json` | format | JSON: decoded by the faster of the two below (see [`Codec::JSON`]), encoded by serde_json |
//! | `json-simd` | format | JSON decoded by simd-json |
//! | `json-serde` | format | JSON decoded by serde_json |
//! | `binary` | transform | base64 (standard alphabet, padded), as Faust's `binary`; alone it means `raw\|binary` |
//! | user names | transform | whatever was [`register`]ed |
//!
//! Decoding goes through the record's [`Bytes`] where the engine has them
//! ([`Codec::decode_bytes`]): the `raw` format hands them to a [`Fixed`] value by reference
//! count, so a fixed-layout record is read where it was fetched, never copied.

mod fixed;

pub(crate) use fixed::view as view_fixed;
#[cfg(any(test, feature = "unstable-fuzzing"))]
pub(crate) mod fuzz;
mod json;
mod raw;
pub(crate) mod record;

pub use self::fixed::Fixed;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// A key or value that could not be encoded or decoded, or a codec name that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A stage of a codec name is neither a built-in codec nor a [`register`]ed transform.
    #[error("unknown codec `{name}` in `{spec}` (known: {known})")]
    Unknown {
        /// The stage that is not known.
        name: String,
        /// The whole name it was part of (e.g. `json|gzip`).
        spec: String,
        /// The names that are known, comma-separated.
        known: String,
    },
    /// A codec name that cannot be used: empty, a format after the first stage, or (for
    /// [`register`]) a built-in name or one with `|` or whitespace in it.
    #[error("codec name `{name}`: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value that the codec cannot encode (e.g. a number under `raw`).
    #[error("{codec} codec: cannot encode: {message}")]
    Encode {
        /// The stage that failed.
        codec: String,
        /// What went wrong.
        message: String,
    },
    /// Bytes that do not decode (malformed JSON, invalid UTF-8 for a string, bad base64, a
    /// fixed-layout record of the wrong length).
    #[error("{codec} codec: {message}")]
    Decode {
        /// The stage that failed.
        codec: String,
        /// What went wrong.
        message: String,
    },
}

impl CodecError {
    /// The stage that failed to encode or decode (`None` for a name that does not parse).
    pub fn codec(&self) -> Option<&str> {
        match self {
            CodecError::Encode { codec, .. } | CodecError::Decode { codec, .. } => Some(codec),
            CodecError::Unknown { .. } | CodecError::BadName { .. } => None,
        }
    }

    pub(crate) fn encode(codec: &str, message: impl ToString) -> CodecError {
        CodecError::Encode { codec: codec.to_string(), message: message.to_string() }
    }

    pub(crate) fn decode(codec: &str, message: impl ToString) -> CodecError {
        CodecError::Decode { codec: codec.to_string(), message: message.to_string() }
    }
}

/// A bytes-to-bytes stage of a codec (Faust's codec nodes after the first, such as `binary`):
/// a compression, an encryption, an encoding. [`register`] one under a name, then use the
/// name in codecs (`json|NAME`).
///
/// Both methods append to `out` (which may already hold bytes) and must not panic on any
/// input: `decode` is given whatever bytes a topic holds.
pub trait Transform: Send + Sync + 'static {
    /// Appends the transformed `input` to `out`.
    fn encode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError>;
    /// Appends what `encode` was given, recovered from `input`, to `out`.
    fn decode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError>;
}

/// What a [`Transform`] returns when it fails; the codec wraps it in a [`CodecError`] naming
/// the stage.
pub type TransformError = Box<dyn std::error::Error + Send + Sync>;

/// Registers `transform` under `name` for every codec parsed afterwards, in this process
/// (Faust's `faust.serializers.codecs.register`). Registering a name again replaces the
/// transform for codecs parsed afterwards; codecs already parsed keep the one they found.
///
/// ```
/// use faust::codecs::{self, Codec, Transform, TransformError};
///
/// /// Reverses the bytes (a stand-in for a compression).
/// struct Reverse;
///
/// impl Transform for Reverse {
///     fn encode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
///         out.extend(input.iter().rev());
///         Ok(())
///     }
///     fn decode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
///         self.encode(input, out)
///     }
/// }
///
/// codecs::register("reverse", Reverse)?;
/// let codec: Codec = "json|reverse|binary".parse()?;
/// let mut out = Vec::new();
/// codec.encode(&vec![1, 2], &mut out)?;
/// assert_eq!(out, b"XTIsMVs="); // base64 of `]2,1[`
/// assert_eq!(codec.decode::<Vec<u32>>(&out)?, vec![1, 2]);
/// # Ok::<(), faust::CodecError>(())
/// ```
pub fn register(name: &str, transform: impl Transform) -> Result<(), CodecError> {
    let bad = |reason: &str| Err(CodecError::BadName { name: name.to_string(), reason: reason.to_string() });
    if name.is_empty() || name.contains('|') || name.chars().any(char::is_whitespace) {
        return bad("a name is non-empty, without `|` or whitespace");
    }
    if FORMATS.iter().any(|(n, _)| *n == name) || name == BINARY {
        return bad("built-in codecs cannot be replaced");
    }
    if formats().read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(name) {
        return bad("a whole codec has this name");
    }
    let mut transforms = registry().write().unwrap_or_else(|poisoned| poisoned.into_inner());
    transforms.insert(name.to_string(), Arc::new(transform));
    Ok(())
}

/// A whole codec: the first stage of a codec, which turns values into bytes and back (Faust's
/// codecs such as `json` or `yaml`, as opposed to the byte [`Transform`]s after it). Values
/// reach it as [`serde_json::Value`]s, serde's data model in one type, so any serde format
/// fits (MessagePack, CBOR, YAML, a company's own). [`register_format`] one under a name, then
/// use the name as a codec's first stage (`NAME` or `NAME|binary`).
///
/// Both methods must not panic on any input: `decode` is given whatever bytes a topic holds.
pub trait ValueFormat: Send + Sync + 'static {
    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), TransformError>;
    /// The value `bytes` encode.
    fn decode(&self, bytes: &[u8]) -> Result<serde_json::Value, TransformError>;
}

/// Registers the whole codec `format` under `name` for every codec parsed afterwards, in this
/// process (Faust's `codecs.register` of a codec): `name` is then a first stage, alone or
/// followed by transforms. A value goes through serde's data model on the way
/// ([`ValueFormat`]), which costs a little over the built-in `json` and `raw`.
///
/// ```
/// use faust::codecs::{self, Codec, TransformError, ValueFormat};
///
/// /// JSON behind a one-byte tag: a stand-in for a binary format.
/// struct Tagged;
///
/// impl ValueFormat for Tagged {
///     fn encode(&self, value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), TransformError> {
///         out.push(b'J');
///         serde_json::to_writer(out, value)?;
///         Ok(())
///     }
///     fn decode(&self, bytes: &[u8]) -> Result<serde_json::Value, TransformError> {
///         match bytes.split_first() {
///             Some((b'J', json)) => Ok(serde_json::from_slice(json)?),
///             _ => Err("not tagged".into()),
///         }
///     }
/// }
///
/// codecs::register_format("tagged", Tagged)?;
/// let codec: Codec = "tagged".parse()?;
/// let mut out = Vec::new();
/// codec.encode(&vec![1, 2], &mut out)?;
/// assert_eq!(out, b"J[1,2]");
/// assert_eq!(codec.decode::<Vec<u32>>(&out)?, vec![1, 2]);
/// assert!(codec.decode::<Vec<u32>>(b"[1,2]").is_err());
/// let wrapped: Codec = "tagged|binary".parse()?;
/// assert_eq!(wrapped.decode::<Vec<u32>>(b"SlsxLDJd")?, vec![1, 2]);
/// # Ok::<(), faust::CodecError>(())
/// ```
pub fn register_format(name: &str, format: impl ValueFormat) -> Result<(), CodecError> {
    let bad = |reason: &str| Err(CodecError::BadName { name: name.to_string(), reason: reason.to_string() });
    if name.is_empty() || name.contains('|') || name.chars().any(char::is_whitespace) {
        return bad("a name is non-empty, without `|` or whitespace");
    }
    if FORMATS.iter().any(|(n, _)| *n == name) || name == BINARY {
        return bad("built-in codecs cannot be replaced");
    }
    if registry().read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(name) {
        return bad("a transform has this name");
    }
    // Leaked once per registration: a codec's first stage is named by a `&'static str`, and
    // formats are registered a handful of times in a process's life.
    let name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let mut formats = formats().write().unwrap_or_else(|poisoned| poisoned.into_inner());
    formats.insert(name.to_string(), (name, Arc::new(format)));
    Ok(())
}

/// The whole codecs [`register_format`]ed so far, by name.
#[allow(clippy::type_complexity)]
fn formats() -> &'static RwLock<HashMap<String, (&'static str, Arc<dyn ValueFormat>)>> {
    static FORMATS_REGISTERED: OnceLock<RwLock<HashMap<String, (&'static str, Arc<dyn ValueFormat>)>>> =
        OnceLock::new();
    FORMATS_REGISTERED.get_or_init(Default::default)
}

/// The transforms [`register`]ed so far, by name. A lock taken only to parse codec names
/// (at declaration time), never per record.
fn registry() -> &'static RwLock<HashMap<String, Arc<dyn Transform>>> {
    static REGISTRY: OnceLock<RwLock<HashMap<String, Arc<dyn Transform>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// How the first stage of a codec turns values into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Raw,
    JsonSimd,
    JsonSerde,
    /// A [`register_format`]ed codec (the spec holds it).
    Custom,
}

/// The decoder `json` uses. serde_json: on the benchmark's order records (86 bytes) it
/// decoded 4.0–5.1 M records/s on one core against simd-json's 3.3–4.7 M (serde_json was
/// ahead in all runs but one made beside a build), since simd-json's serde path copies the input, builds a tape (allocated
/// per record: it borrows the input) and then walks it; see `bench/src/codec.rs`.
const JSON_DEFAULT: Format = Format::JsonSerde;

/// The built-in formats, by name.
const FORMATS: [(&str, Format); 4] =
    [("raw", Format::Raw), ("json", JSON_DEFAULT), ("json-simd", Format::JsonSimd), ("json-serde", Format::JsonSerde)];

/// The built-in transform's name.
const BINARY: &str = "binary";

impl Format {
    fn encode<T: Serialize + ?Sized>(self, name: &str, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            Format::JsonSimd | Format::JsonSerde => {
                serde_json::to_writer(out, value).map_err(|e| CodecError::encode(name, e))
            }
            Format::Raw => raw::encode(value, out).map_err(|e| CodecError::encode(name, e)),
            Format::Custom => Err(CodecError::encode(name, "a registered codec encodes through its spec")),
        }
    }

    /// Decodes `bytes`, which are `owner`'s when `owner` is given (then a [`Fixed`] takes
    /// `owner` rather than a copy).
    #[inline]
    fn decode<T: DeserializeOwned>(self, name: &str, bytes: &[u8], owner: Option<&Bytes>) -> Result<T, CodecError> {
        match self {
            Format::JsonSerde => serde_json::from_slice(bytes).map_err(|e| CodecError::decode(name, e)),
            Format::JsonSimd => json::decode_simd(bytes).map_err(|e| CodecError::decode(name, e)),
            Format::Raw => raw::decode(bytes, owner).map_err(|e| CodecError::decode(name, e)),
            Format::Custom => Err(CodecError::decode(name, "a registered codec decodes through its spec")),
        }
    }
}

/// A transform stage with the name it was found under.
#[derive(Clone)]
struct Stage {
    name: Arc<str>,
    transform: Arc<dyn Transform>,
}

/// A parsed codec.
struct Spec {
    /// The canonical name: the stages' names joined with `|`.
    name: Cow<'static, str>,
    /// The first stage's name (`raw` when the name starts with a transform).
    format_name: &'static str,
    format: Format,
    /// The registered whole codec, when `format` is [`Format::Custom`].
    custom: Option<Arc<dyn ValueFormat>>,
    stages: Vec<Stage>,
}

const fn builtin(name: &'static str, format: Format) -> Spec {
    Spec { name: Cow::Borrowed(name), format_name: name, format, custom: None, stages: Vec::new() }
}

static RAW: Spec = builtin("raw", Format::Raw);
static JSON: Spec = builtin("json", JSON_DEFAULT);
static JSON_SIMD: Spec = builtin("json-simd", Format::JsonSimd);
static JSON_SERDE: Spec = builtin("json-serde", Format::JsonSerde);

#[derive(Clone)]
enum Repr {
    /// A built-in codec of one stage: no allocation, no reference count.
    Static(&'static Spec),
    Shared(Arc<Spec>),
}

/// A codec, by Faust's names: parse one from a name (`"json|binary".parse::<Codec>()` or
/// [`Codec::named`]) or take a built-in constant. Cheap to clone (a reference count at
/// most); two codecs are equal when their names are.
///
/// ```
/// use faust::Codec;
///
/// let codec: Codec = "json|binary".parse()?;
/// let mut out = Vec::new();
/// codec.encode(&vec!["a", "b"], &mut out)?;
/// assert_eq!(out, b"WyJhIiwiYiJd"); // base64 of ["a","b"]
/// assert_eq!(codec.decode::<Vec<String>>(&out)?, ["a", "b"]);
/// assert_eq!(Codec::named("raw")?, Codec::RAW);
/// assert!(Codec::named("pickle").is_err());
/// # Ok::<(), faust::CodecError>(())
/// ```
#[derive(Clone)]
pub struct Codec(Repr);

impl Codec {
    /// `raw`: strings (UTF-8) and byte vectors as they are, and [`Fixed`] records read in
    /// place. Numbers and structures do not encode.
    pub const RAW: Codec = Codec(Repr::Static(&RAW));
    /// `json`: JSON, encoded by serde_json and decoded by serde_json, which measured faster
    /// than simd-json on small records such as the benchmark's orders (`bench/src/codec.rs`);
    /// [`JSON_SIMD`](Codec::JSON_SIMD) is there for large documents.
    pub const JSON: Codec = Codec(Repr::Static(&JSON));
    /// `json-simd`: JSON decoded by simd-json (through a per-thread scratch copy of the
    /// input, since simd-json parses in place), encoded by serde_json.
    pub const JSON_SIMD: Codec = Codec(Repr::Static(&JSON_SIMD));
    /// `json-serde`: JSON decoded and encoded by serde_json.
    pub const JSON_SERDE: Codec = Codec(Repr::Static(&JSON_SERDE));

    /// The codec called `name`: stages separated by `|`, the first a format (`raw`, `json`,
    /// `json-simd`, `json-serde`) or a transform (then the format is `raw`), the others
    /// transforms (`binary` or [`register`]ed names).
    pub fn named(name: &str) -> Result<Codec, CodecError> {
        let parts: Vec<&str> = name.split('|').map(str::trim).collect();
        let unknown = |part: &str| {
            let mut known: Vec<String> = FORMATS.iter().map(|(n, _)| n.to_string()).collect();
            known.push(BINARY.to_string());
            let mut user: Vec<String> =
                registry().read().unwrap_or_else(|poisoned| poisoned.into_inner()).keys().cloned().collect();
            user.sort();
            known.extend(user);
            let mut whole: Vec<String> =
                formats().read().unwrap_or_else(|poisoned| poisoned.into_inner()).keys().cloned().collect();
            whole.sort();
            known.extend(whole);
            CodecError::Unknown { name: part.to_string(), spec: name.to_string(), known: known.join(", ") }
        };
        let format_named = |part: &str| FORMATS.iter().find(|(n, _)| *n == part).copied();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(CodecError::BadName { name: name.to_string(), reason: "a stage has no name".to_string() });
        }
        let registered =
            |part: &str| formats().read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(part).cloned();
        if let Some((format_name, custom)) = registered(parts[0]) {
            let stages =
                parts[1..].iter().map(|part| Self::transform(name, part, &unknown)).collect::<Result<_, _>>()?;
            return Ok(Codec(Repr::Shared(Arc::new(Spec {
                name: Cow::Owned(parts.join("|")),
                format_name,
                format: Format::Custom,
                custom: Some(custom),
                stages,
            }))));
        }
        let ((format_name, format), rest) = match format_named(parts[0]) {
            Some(format) => (format, &parts[1..]),
            None => (FORMATS[0], &parts[..]),
        };
        if rest.is_empty() {
            return Ok(match parts[0] {
                "raw" => Codec::RAW,
                "json" => Codec::JSON,
                "json-simd" => Codec::JSON_SIMD,
                _ => Codec::JSON_SERDE,
            });
        }
        let stages = rest.iter().map(|part| Self::transform(name, part, &unknown)).collect::<Result<_, _>>()?;
        Ok(Codec(Repr::Shared(Arc::new(Spec {
            name: Cow::Owned(parts.join("|")),
            format_name,
            format,
            custom: None,
            stages,
        }))))
    }

    /// The transform stage `part` of the codec `name`.
    fn transform(name: &str, part: &str, unknown: &dyn Fn(&str) -> CodecError) -> Result<Stage, CodecError> {
        let is_format = FORMATS.iter().any(|(n, _)| *n == part)
            || formats().read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(part);
        if is_format {
            return Err(CodecError::BadName {
                name: name.to_string(),
                reason: format!("`{part}` turns values into bytes, so it can only be the first stage"),
            });
        }
        let transform: Arc<dyn Transform> = if part == BINARY {
            Arc::new(Base64)
        } else {
            let transforms = registry().read().unwrap_or_else(|poisoned| poisoned.into_inner());
            transforms.get(part).cloned().ok_or_else(|| unknown(part))?
        };
        Ok(Stage { name: Arc::from(part), transform })
    }

    fn spec(&self) -> &Spec {
        match &self.0 {
            Repr::Static(spec) => spec,
            Repr::Shared(spec) => spec,
        }
    }

    /// Whether the first stage (the format) is `raw`: values are bytes or strings as they are.
    pub(crate) fn is_raw_format(&self) -> bool {
        self.spec().format_name == "raw"
    }

    /// Whether the codec is `raw` alone (no transform stages): a record's bytes are the value's.
    pub(crate) fn is_plain_raw(&self) -> bool {
        self.is_raw_format() && self.spec().stages.is_empty()
    }

    /// Reads a fixed-layout `R` in place in `bytes`, the record as fetched: a reference into
    /// the buffer, with no copy, no allocation and no reference count (the zero-copy read;
    /// [`Fixed`] is the owned form, which holds the buffer). Only `raw` without transforms
    /// keeps a record's bytes as they are, so any other codec is an error, as is a length
    /// that is not `R`'s.
    ///
    /// ```
    /// use faust::Codec;
    /// use zerocopy::little_endian::U64;
    /// use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
    ///
    /// #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    /// #[repr(C)]
    /// struct Reading {
    ///     sensor: U64,
    ///     micros: U64,
    /// }
    ///
    /// let fetched = Reading { sensor: 3.into(), micros: 250.into() }.as_bytes().to_vec();
    /// let reading: &Reading = Codec::RAW.view(&fetched)?;
    /// assert_eq!((reading.sensor.get(), reading.micros.get()), (3, 250));
    /// assert!(std::ptr::eq(reading.as_bytes().as_ptr(), fetched.as_ptr()));
    ///
    /// assert!(Codec::RAW.view::<Reading>(&fetched[1..]).is_err());
    /// assert!(Codec::JSON.view::<Reading>(&fetched).is_err());
    /// # Ok::<(), faust::CodecError>(())
    /// ```
    #[inline]
    pub fn view<'a, R: FromBytes + KnownLayout + Immutable + Unaligned>(
        &self,
        bytes: &'a [u8],
    ) -> Result<&'a R, CodecError> {
        if !self.is_plain_raw() {
            return Err(CodecError::decode(
                self.format_name(),
                format!("`{}` does not keep records as they are: only `raw` reads one in place", self.name()),
            ));
        }
        fixed::view(bytes)
    }

    /// The codec's name, stages joined with `|` (`json|binary`).
    pub fn name(&self) -> &str {
        &self.spec().name
    }

    /// The name of the format stage, for errors.
    fn format_name(&self) -> &'static str {
        self.spec().format_name
    }

    /// Appends the encoding of `value` to `out`. On an error, `out` may hold part of it.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let spec = self.spec();
        if let Some(custom) = &spec.custom {
            let name = self.format_name();
            let value = serde_json::to_value(value).map_err(|e| CodecError::encode(name, e))?;
            let mut plain = Vec::new();
            custom.encode(&value, &mut plain).map_err(|e| CodecError::encode(name, e))?;
            return self.encode_stages(&plain, out);
        }
        if spec.stages.is_empty() {
            return spec.format.encode(self.format_name(), value, out);
        }
        let mut plain = Vec::new();
        spec.format.encode(self.format_name(), value, &mut plain)?;
        self.encode_stages(&plain, out)
    }

    /// [`encode`](Codec::encode), with the common raw cases (a `String` or `Vec<u8>` key)
    /// copied straight in rather than through serde.
    pub(crate) fn encode_owned<T: Serialize + 'static>(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        if self.spec().format == Format::Raw {
            let any = value as &dyn std::any::Any;
            let plain = match (any.downcast_ref::<String>(), any.downcast_ref::<Vec<u8>>()) {
                (Some(s), _) => Some(s.as_bytes()),
                (_, Some(bytes)) => Some(&bytes[..]),
                _ => None,
            };
            if let Some(plain) = plain {
                return self.encode_stages(plain, out);
            }
        }
        self.encode(value, out)
    }

    /// Runs the transforms on the format's output `plain`, appending the result to `out`.
    fn encode_stages(&self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let stages = &self.spec().stages;
        let mut current = Cow::Borrowed(plain);
        for (i, stage) in stages.iter().enumerate() {
            let fail = |e: TransformError| CodecError::encode(&stage.name, e);
            if i + 1 == stages.len() {
                return stage.transform.encode(&current, out).map_err(fail);
            }
            let mut next = Vec::with_capacity(current.len());
            stage.transform.encode(&current, &mut next).map_err(fail)?;
            current = Cow::Owned(next);
        }
        out.extend_from_slice(&current);
        Ok(())
    }

    /// Undoes the transforms, last first.
    fn decode_stages(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut current = Cow::Borrowed(bytes);
        for stage in self.spec().stages.iter().rev() {
            let mut next = Vec::with_capacity(current.len());
            stage.transform.decode(&current, &mut next).map_err(|e| CodecError::decode(&stage.name, e))?;
            current = Cow::Owned(next);
        }
        Ok(current.into_owned())
    }

    /// Decodes a `T` from `bytes`. A [`Fixed`] value decoded this way is a copy; see
    /// [`decode_bytes`](Codec::decode_bytes).
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let spec = self.spec();
        if spec.custom.is_some() {
            return self.decode_custom(bytes);
        }
        if spec.stages.is_empty() {
            return spec.format.decode(self.format_name(), bytes, None);
        }
        let plain = Bytes::from(self.decode_stages(bytes)?);
        spec.format.decode(self.format_name(), &plain, Some(&plain))
    }

    /// Decodes a `T` from `bytes`: like [`decode`](Codec::decode), except that under `raw` a
    /// [`Fixed`] value keeps a reference-counted handle on `bytes` instead of a copy.
    pub fn decode_bytes<T: DeserializeOwned>(&self, bytes: &Bytes) -> Result<T, CodecError> {
        let spec = self.spec();
        if spec.custom.is_some() {
            return self.decode_custom(bytes);
        }
        if spec.stages.is_empty() {
            return spec.format.decode(self.format_name(), bytes, Some(bytes));
        }
        let plain = Bytes::from(self.decode_stages(bytes)?);
        spec.format.decode(self.format_name(), &plain, Some(&plain))
    }
}

impl Codec {
    /// Decodes through a registered whole codec: the transforms undone, then the format, then
    /// serde's data model into `T`.
    fn decode_custom<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let name = self.format_name();
        let Some(custom) = &self.spec().custom else { return Err(CodecError::decode(name, "not a registered codec")) };
        let plain =
            if self.spec().stages.is_empty() { Cow::Borrowed(bytes) } else { Cow::Owned(self.decode_stages(bytes)?) };
        let value = custom.decode(&plain).map_err(|e| CodecError::decode(name, e))?;
        serde_json::from_value(value).map_err(|e| CodecError::decode(name, e))
    }
}

impl std::str::FromStr for Codec {
    type Err = CodecError;

    fn from_str(name: &str) -> Result<Codec, CodecError> {
        Codec::named(name)
    }
}

impl PartialEq for Codec {
    fn eq(&self, other: &Codec) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Codec {}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Codec").field(&self.name()).finish()
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `binary`: base64 with the standard alphabet and padding (Faust's `binary` codec).
struct Base64;

impl Transform for Base64 {
    fn encode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
        use base64::Engine as _;
        let start = out.len();
        out.resize(start + base64::encoded_len(input.len(), true).ok_or("input too large for base64")?, 0);
        let written = base64::engine::general_purpose::STANDARD.encode_slice(input, &mut out[start..])?;
        out.truncate(start + written);
        Ok(())
    }

    fn decode(&self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransformError> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode_vec(input, out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
