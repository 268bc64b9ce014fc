//! Windows: the window math (`math`), the per-core timer wheel that closes windows on time
//! (`wheel`), and windowed tables built on two plain tables (`table`).
//!
//! See [`WindowedTable`] for the API and `docs/windows.md` for the guarantees.

mod math;
mod table;
mod wheel;

pub use math::{WindowRange, Windowing};
pub(crate) use table::open_windows_on_this_core;
pub use table::{WindowResult, WindowedPartition, WindowedTable};
