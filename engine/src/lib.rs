//! faust: a thread-per-core stream-processing engine in the spirit of Faust and Kafka Streams.
//!
//! An [`App`] declares topics, agents that process their streams on every core, and
//! [`Table`]s sharded by partition and replicated through changelogs; [`App::run`] runs them
//! on pinned cores over the embedded log (`local://`) or `memory://`. The storage layer
//! (segment logs, key-value stores) is re-exported as [`storage`]:
//!
//! ```
//! use faust::storage::{Store, StoreConfig};
//!
//! let dir = tempfile::tempdir()?;
//! let mut store = Store::open(dir.path(), StoreConfig::default())?;
//! store.put(b"account-1", b"42")?;
//! store.checkpoint(b"changelog-offset=1")?;
//! assert_eq!(store.get(b"account-1").as_deref(), Some(&b"42"[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod acks;
mod app;
mod cli;
mod codec;
mod control;
mod cron;
mod error;
mod partitioner;
mod progress;
pub mod runtime;
mod settings;
mod stream;
mod table;
mod testing;
mod topic;
mod transports;
mod util;
mod window;
mod worker;

pub use crate::app::global_table::GlobalTable;
pub use crate::app::group_by::{GroupBy, Source};
pub use crate::app::join::JoinKind;
pub use crate::app::page::{WebRequest, WebResponse};
pub use crate::app::pattern::{PatternError, TopicPattern};
pub use crate::app::rpc::AskStream;
pub use crate::app::set_table::{SetGlobalTable, SetTable};
pub use crate::app::sink::{Sink, Sinks};
pub use crate::app::{Agent, App, TopicOptions};
pub use crate::codec::record::{AnyRecord, FaustRecord, Models, Record, record_namespace};
pub use crate::codec::{Codec, CodecError, Fixed};
pub use crate::cron::{CronError, Crontab};
pub use crate::error::{AgentError, AskError, SendError, TableError};
pub use crate::progress::{LogWriter, Progress, log_writer};
pub use crate::runtime::bad_record::{BadRecord, RecordPart};
pub use crate::runtime::context::{CurrentEvent, EventPosition, current_agent, current_event, current_offset};
pub use crate::runtime::sensor::Sensor;
pub use crate::runtime::signal::StopSignal;
pub use crate::runtime::stats::WorkerStats;
pub use crate::runtime::supervise::{AgentFailure, Supervisor};
pub use crate::settings::{BadRecordPolicy, ProcessingGuarantee, Settings, SettingsError, parse_partitions};
pub use crate::stream::{Event, Stream};
pub use crate::table::{Table, TablePartition};
pub use crate::testing::{TestContext, TestError};
pub use crate::topic::{SendOptions, Topic};
pub use crate::window::{WindowRange, WindowResult, WindowedPartition, WindowedTable, Windowing};
pub use crate::worker::WorkerError;
pub use faust_transport::{
    MemoryTransport, Produced, SaslMechanism, SaslOptions, TlsOptions, TopicConfig, TopicPartition,
};

/// Codecs by name, Faust's codec registry, and fixed-layout records: see [`Codec`].
pub mod codecs {
    pub use crate::codec::{
        Codec, CodecError, Fixed, Transform, TransformError, ValueFormat, register, register_format,
    };
}

/// Entry points for the fuzz targets in `engine/fuzz`; not a stable API.
#[cfg(feature = "unstable-fuzzing")]
pub mod fuzzing {
    /// Decodes `data` with every built-in codec as several value types; must never panic.
    pub fn decode(data: &[u8]) {
        crate::codec::fuzz::decode_everything(data);
    }
}

/// The storage layer: segment logs and key-value stores (the `faust-storage` crate).
pub mod storage {
    pub use faust_storage::*;
}

/// The README's examples, compiled and run as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
