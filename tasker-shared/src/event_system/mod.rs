//! Statistics about what the system does, kept without slowing it down.
//!
//! [`events`] lists every event statistics are recorded for, with a priority
//! and the reason it is kept; [`sampled_statistics`] records them by sampling
//! into a bounded ring buffer that a background task writes to PostgreSQL.
//! The audit behind the list is in `docs/statistics.md`.

pub mod events;
pub mod sampled_statistics;

pub use events::{Event, Priority};
pub use sampled_statistics::{SampledStatisticsCollector, StatisticsMode};
