//! The library behind the `tasker` command, shared with the cross-process
//! tests and benchmarks.
//!
//! | concept | module |
//! |---|---|
//! | a throwaway PostgreSQL from local binaries | [`local_postgres`] |
//! | service processes: spawn, ready, metrics, signals | [`process`] |
//! | reading `/metrics` back | [`metrics`] |
//! | the task API client | [`client`] |
//! | journals against history: ran once, completed once | [`audit`] |
//! | `tasker demo` | [`demo`] |
//! | `tasker chaos` | [`chaos`] |
//! | `tasker bench` | [`bench`] |

pub mod audit;
pub mod bench;
pub mod chaos;
pub mod client;
pub mod demo;
pub mod local_postgres;
pub mod metrics;
pub mod process;
