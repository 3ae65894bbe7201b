//! The library behind the `tasker` command, shared with the cross-process
//! tests and benchmarks.
//!
//! | concept | module |
//! |---|---|
//! | a throwaway PostgreSQL from local binaries | [`local_postgres`] |
//! | service processes: spawn, ready, metrics, signals | [`process`] |
//! | reading `/metrics` back | [`metrics`] |
//! | the task API client | [`client`] |
//! | `tasker demo` | [`demo`] |
//! | `tasker bench` | [`bench`] |

pub mod bench;
pub mod client;
pub mod demo;
pub mod local_postgres;
pub mod metrics;
pub mod process;
