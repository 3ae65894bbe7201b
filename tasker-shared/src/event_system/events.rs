//! The event taxonomy: every event Tasker records statistics for, in one place.
//!
//! Each event has a [`Priority`], which sets its sampling rate, and a reason it
//! is worth keeping at all (`docs/statistics.md` has the audit). Urgent events
//! are rare and each one matters to an operator, so every one is kept; the
//! hot-path events that happen several times per step are sampled thinly, since
//! their distribution, not each occurrence, is what is useful.

use crate::text_enum::text_enum;

text_enum! {
    /// How much each occurrence of an event matters; sets its sampling rate.
    pub enum Priority ("priority") {
        /// Rare and individually significant: always recorded (rate 1.0 by default).
        Urgent => "urgent",
        /// Once per task or per failure (0.5).
        High => "high",
        /// Once per step (0.1).
        Normal => "normal",
        /// Several times per step, or per poll (0.01).
        Low => "low",
    }
}

text_enum! {
    /// Every event statistics are recorded for. The latency recorded with each
    /// is documented on the variant.
    pub enum Event ("event") {
        /// A task was created. Latency: the submitting request's transaction.
        TaskCreated => "task_created",
        /// An orchestrator claimed a task. Latency: discovery lag (ready_since to claim).
        TaskClaimed => "task_claimed",
        /// A task was claimed by a poll or sweep after the miss threshold: a
        /// notification nobody acted on. Latency: discovery lag.
        NotifyMiss => "notify_miss",
        /// An orchestration pass enqueued steps. Latency: the pass.
        StepsEnqueued => "steps_enqueued",
        /// A worker started an attempt. Latency: time since the step was claimed (zero).
        StepStarted => "step_started",
        /// An attempt succeeded and was recorded. Latency: handler run time.
        StepCompleted => "step_completed",
        /// An attempt failed and was recorded. Latency: handler run time.
        StepFailed => "step_failed",
        /// An orchestrator scheduled a retry. Latency: the backoff chosen.
        StepRetried => "step_retried",
        /// A step attempt's lease expired and the rescuer failed it. Latency: zero.
        StepLeaseExpired => "step_lease_expired",
        /// The fence rejected an attempt's outcome. Latency: handler run time.
        StepResultRejected => "step_result_rejected",
        /// A task reached a final state. Latency: submission to finalization.
        TaskFinalized => "task_finalized",
        /// A process caused a NOTIFY. Latency: the transaction that sent it.
        NotificationSent => "notification_sent",
        /// A listener received a notification. Latency: zero (delivery time is not observable).
        NotificationReceived => "notification_received",
        /// A claim call (poll, sweep, event or timer wake-up). Latency: the claim.
        ClaimCycle => "claim_cycle",
        /// A LISTEN connection was re-established. Latency: time disconnected.
        ListenerReconnected => "listener_reconnected",
    }
}

impl Event {
    /// The event's priority.
    pub const fn priority(self) -> Priority {
        self.spec().0
    }

    /// Why the event is recorded at all.
    pub const fn reason(self) -> &'static str {
        self.spec().1
    }

    /// The taxonomy: priority and reason of each event.
    const fn spec(self) -> (Priority, &'static str) {
        use Event as E;
        use Priority as P;
        match self {
            E::NotifyMiss => {
                (P::Urgent, "each miss is a notification lost; the alert and its investigation need every one")
            }
            E::StepLeaseExpired => {
                (P::Urgent, "a worker died or hung; rare, and each one explains a slow or retried step")
            }
            E::StepResultRejected => {
                (P::Urgent, "a stale or cancelled attempt finished; rare, and a sign of lease or cancel trouble")
            }
            E::ListenerReconnected => {
                (P::Urgent, "a listener lost its connection; rare, and the window in which notifications can be lost")
            }
            E::TaskFinalized => (P::High, "end-to-end latency per task, the number users feel; once per task"),
            E::StepFailed => (P::High, "failure rates per handler; failures are rarer than successes"),
            E::StepRetried => (P::High, "retry pressure and the backoff actually applied"),
            E::TaskCreated => (P::Normal, "submission rate and the cost of the submit transaction"),
            E::TaskClaimed => (P::Normal, "discovery lag distribution by source; once per claim"),
            E::StepCompleted => (P::Normal, "handler run-time distribution; once per step"),
            E::StepsEnqueued => (P::Normal, "orchestration pass duration; once per pass"),
            E::StepStarted => (P::Low, "start rate only; the completion event carries the run time"),
            E::NotificationSent => (P::Low, "NOTIFY volume; metrics count every one, samples only show the trend"),
            E::NotificationReceived => (P::Low, "delivery volume per listener; metrics count every one"),
            E::ClaimCycle => (P::Low, "claim cost over time; happens on every wake-up and poll"),
        }
    }

    /// A dense index (declaration order), for per-event arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_a_priority_and_a_reason() {
        for event in Event::ALL {
            assert!(!event.reason().is_empty(), "{event}");
            let _ = event.priority();
        }
        let urgent = Event::ALL.iter().filter(|e| e.priority() == Priority::Urgent).count();
        assert!(urgent >= 3, "the rare operational events are urgent");
    }

    #[test]
    fn indexes_are_dense_and_distinct() {
        let indexes: Vec<usize> = Event::ALL.iter().map(|e| e.index()).collect();
        assert_eq!(indexes, (0..Event::ALL.len()).collect::<Vec<_>>());
    }
}
