//! Operational monitoring that needs more than a counter: PG_NOTIFY misses.

pub mod pg_notify_monitor;

pub use pg_notify_monitor::PgNotifyMonitor;
