//! The workflow step state machine.

use super::{InvalidTransition, lookup};
use crate::text_enum::text_enum;

text_enum! {
    /// Where a step is in its life. `complete`, `error` and `cancelled` are final.
    pub enum StepState ("step state") {
        /// Waiting for its dependencies.
        Pending => "pending",
        /// Runnable; waiting for a worker of its namespace to claim it.
        Enqueued => "enqueued",
        /// Claimed by a worker, under a lease; an attempt is running.
        InProgress => "in_progress",
        /// An attempt failed and attempts remain; waits for its retry time.
        WaitingForRetry => "waiting_for_retry",
        /// An attempt succeeded; the result is recorded.
        Complete => "complete",
        /// Failed for good: not retryable, or out of attempts.
        Error => "error",
        /// Cancelled with its task.
        Cancelled => "cancelled",
    }
}

text_enum! {
    /// What can happen to a step.
    pub enum StepEvent ("step event") {
        /// Made runnable (dependencies complete, or retry time reached).
        Enqueue => "enqueue",
        /// Claimed by a worker: a new attempt starts.
        Start => "start",
        /// Made runnable by a completion whose worker starts it in the same
        /// statement: enqueued and claimed at once, a new attempt starts.
        Continue => "continue",
        /// The attempt succeeded.
        Complete => "complete",
        /// The attempt failed and will be retried.
        Retry => "retry",
        /// The attempt failed for good.
        Fail => "fail",
        /// The task was cancelled or failed.
        Cancel => "cancel",
    }
}

impl StepState {
    /// The step state machine: the only place its edges are written in Rust.
    pub const TRANSITIONS: &'static [(StepState, StepEvent, StepState)] = {
        use StepEvent as E;
        use StepState as S;
        &[
            (S::Pending, E::Enqueue, S::Enqueued),
            (S::Pending, E::Continue, S::InProgress),
            (S::Pending, E::Cancel, S::Cancelled),
            (S::Enqueued, E::Start, S::InProgress),
            (S::Enqueued, E::Cancel, S::Cancelled),
            (S::InProgress, E::Complete, S::Complete),
            (S::InProgress, E::Retry, S::WaitingForRetry),
            (S::InProgress, E::Fail, S::Error),
            (S::InProgress, E::Cancel, S::Cancelled),
            (S::WaitingForRetry, E::Enqueue, S::Enqueued),
            (S::WaitingForRetry, E::Cancel, S::Cancelled),
        ]
    };

    /// The state `event` leads to from `self`, or why it cannot happen.
    pub fn apply(self, event: StepEvent) -> Result<StepState, InvalidTransition> {
        lookup(Self::TRANSITIONS, self, event).ok_or(InvalidTransition {
            machine: "step",
            from: self.as_str(),
            event: event.as_str(),
        })
    }

    /// Final states have no outgoing edges.
    pub fn is_final(self) -> bool {
        !Self::TRANSITIONS.iter().any(|(from, _, _)| *from == self)
    }

    /// Enqueued or running: a worker has it, or will soon.
    pub fn is_in_flight(self) -> bool {
        matches!(self, StepState::Enqueued | StepState::InProgress)
    }
}
