//! Tasker's worker: claims the steps of its namespace (or of every namespace),
//! runs registered handlers with bounded concurrency, and records outcomes
//! through the fenced completion.
//!
//! Embed it to run your own handlers: build a [`handler::HandlerRegistry`],
//! register your [`handler::StepHandler`]s, and call [`startup::run`].
//!
//! | concept | module |
//! |---|---|
//! | the handler trait and registry | [`handler`] |
//! | handlers the binary ships | [`builtin`] |
//! | the claim/run loop, heartbeats, shutdown | [`worker`] |
//! | batched outcome recording | [`completer`] |
//! | attempts currently owned | [`inflight`] |
//! | the invocation journal | [`journal`] |
//! | building and running the service | [`startup`] |

pub mod builtin;
pub mod capacity;
pub mod completer;
pub mod handler;
pub mod inflight;
pub mod journal;
pub mod startup;
pub mod worker;
