//! Tasker's shared core, used by the orchestrator, the worker, the CLI and the
//! cross-process tests.
//!
//! | concept | module |
//! |---|---|
//! | validated names (namespaces, steps, handlers) | [`identifier`] |
//! | task and step state machines | [`state_machine`] |
//! | templates: the DAG and its rules | [`template`] |
//! | creating, reading, cancelling tasks | [`tasks`] |
//! | claiming tasks and steps, leases | [`claim`] |
//! | recording step outcomes (fenced) | [`step_result`] |
//! | orchestration's database side | [`orchestration`] |
//! | deciding that a task is finished | [`finalize`] |
//! | retry backoff | [`retry`] |
//! | connecting and migrating | [`db`] |
//! | configuration (defaults, file, environment) | [`config`] |
//! | deployment modes | [`deployment`] |
//! | discovering work: LISTEN, poll, sweep, timer | [`discovery`] |
//! | metric names and recording | [`metrics`] |
//! | PG_NOTIFY miss detection | [`monitoring`] |
//! | health and metrics endpoints | [`http`] |
//! | sampled statistics and the event taxonomy | [`event_system`] |
//! | logging, signals, HTTP serving for binaries | [`service`] |
//! | invariants over the whole database | [`invariants`] |
//! | partitions, archival, retention | [`maintenance`] |
//!
//! All SQL is in `migrations/` (schema and functions) or in `query!` calls in
//! these modules; every function takes an executor, so callers choose whether it
//! runs on the pool or inside their own transaction.

pub mod claim;
pub mod config;
pub mod db;
pub mod deployment;
pub mod discovery;
pub mod error;
pub mod event_system;
pub mod finalize;
pub mod http;
pub mod identifier;
pub mod invariants;
pub mod maintenance;
pub mod metrics;
pub mod monitoring;
pub mod orchestration;
pub mod retry;
pub mod service;
pub mod state_machine;
pub mod step_result;
pub mod tasks;
pub mod template;
mod text_enum;

pub use error::{Error, Result};
pub use identifier::Identifier;
pub use text_enum::UnknownName;
