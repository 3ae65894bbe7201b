//! The task and step state machines.
//!
//! Each machine is one table of `(from, event, to)` edges ([`TaskState::TRANSITIONS`],
//! [`StepState::TRANSITIONS`]). Everything else is derived from it: [`TaskState::apply`]
//! answers "what does this event do here", and migration `0002_state_machines.sql`
//! holds the same rows for the SQL guard triggers (a test keeps the two equal).
//! In the database every transition is a compare-and-set (`UPDATE ... WHERE state =
//! $expected`) plus one history row; a transition missing from the table is rejected
//! in Rust with [`InvalidTransition`] and in SQL with SQLSTATE `TK001`.

mod step;
mod task;

pub use step::{StepEvent, StepState};
pub use task::{TaskEvent, TaskState};

/// An event that the machine does not allow in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{machine} state machine: event `{event}` is not allowed in state `{from}`")]
pub struct InvalidTransition {
    /// `"task"` or `"step"`.
    pub machine: &'static str,
    /// The state the event was applied to.
    pub from: &'static str,
    /// The rejected event.
    pub event: &'static str,
}

/// Looks `(from, event)` up in a transition table.
fn lookup<S: Copy + PartialEq, E: Copy + PartialEq>(table: &[(S, E, S)], from: S, event: E) -> Option<S> {
    table.iter().find(|(f, e, _)| *f == from && *e == event).map(|&(_, _, to)| to)
}
