//! Transports for the faust engine: where topics live and how records move.
//!
//! This crate will hold the `Transport` trait and its implementations (`local://` on the
//! storage crate's segment log, `memory://` for tests, `kafka://` over io_uring). For now it
//! re-exports the storage types the transports are built on.

pub use faust_storage::{Log, LogConfig};
