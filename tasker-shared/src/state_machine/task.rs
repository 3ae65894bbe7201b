//! The task state machine.

use super::{InvalidTransition, lookup};
use crate::text_enum::text_enum;

text_enum! {
    /// Where a task is in its life. `complete`, `error` and `cancelled` are final.
    pub enum TaskState ("task state") {
        /// Created; no step has been enqueued yet.
        Pending => "pending",
        /// At least one step is enqueued or running.
        StepsInProcess => "steps_in_process",
        /// Nothing is running; a failed step waits for its retry time.
        WaitingForRetry => "waiting_for_retry",
        /// A step failed for good; steps still running may finish, nothing new starts.
        BlockedByFailures => "blocked_by_failures",
        /// Every step completed.
        Complete => "complete",
        /// A step failed for good and nothing is running any more.
        Error => "error",
        /// Cancelled through the API.
        Cancelled => "cancelled",
    }
}

text_enum! {
    /// What can happen to a task.
    pub enum TaskEvent ("task event") {
        /// The first steps were enqueued.
        Start => "start",
        /// Nothing runs any more, and a retry is scheduled.
        WaitForRetry => "wait_for_retry",
        /// A retry was enqueued.
        Resume => "resume",
        /// A step failed permanently while others still run.
        Block => "block",
        /// Finalized: every step completed.
        Complete => "complete",
        /// Finalized: a step failed permanently.
        Fail => "fail",
        /// Cancelled by a user.
        Cancel => "cancel",
    }
}

impl TaskState {
    /// The task state machine: the only place its edges are written in Rust.
    pub const TRANSITIONS: &'static [(TaskState, TaskEvent, TaskState)] = {
        use TaskEvent as E;
        use TaskState as S;
        &[
            (S::Pending, E::Start, S::StepsInProcess),
            (S::Pending, E::Cancel, S::Cancelled),
            (S::StepsInProcess, E::WaitForRetry, S::WaitingForRetry),
            (S::StepsInProcess, E::Block, S::BlockedByFailures),
            (S::StepsInProcess, E::Complete, S::Complete),
            (S::StepsInProcess, E::Fail, S::Error),
            (S::StepsInProcess, E::Cancel, S::Cancelled),
            (S::WaitingForRetry, E::Resume, S::StepsInProcess),
            (S::WaitingForRetry, E::Cancel, S::Cancelled),
            (S::BlockedByFailures, E::Fail, S::Error),
            (S::BlockedByFailures, E::Cancel, S::Cancelled),
        ]
    };

    /// The state `event` leads to from `self`, or why it cannot happen.
    pub fn apply(self, event: TaskEvent) -> Result<TaskState, InvalidTransition> {
        lookup(Self::TRANSITIONS, self, event).ok_or(InvalidTransition {
            machine: "task",
            from: self.as_str(),
            event: event.as_str(),
        })
    }

    /// Final states have no outgoing edges.
    pub fn is_final(self) -> bool {
        !Self::TRANSITIONS.iter().any(|(from, _, _)| *from == self)
    }
}
