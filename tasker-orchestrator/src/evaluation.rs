//! Deciding what a claimed task needs, from how its steps stand.
//!
//! The decision names the state the task should be in; the events that get it
//! there are found in the task state machine's table, so a plan can never ask
//! for a transition the machine (and the SQL guard) would reject. Whether a
//! task is *finished* is not decided here but by
//! `tasker.claim_task_for_finalization()`; a plan only says "ask".

use chrono::{DateTime, Utc};
use tasker_shared::orchestration::StepCounts;
use tasker_shared::state_machine::{TaskEvent, TaskState};

/// What to do with one claimed task in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Transitions to apply, in order (at most two).
    pub events: Vec<TaskEvent>,
    /// Ask `claim_task_for_finalization` (after the events).
    pub finalize: bool,
    /// When to look at the task again if nothing wakes it (a scheduled retry).
    pub next_due: Option<DateTime<Utc>>,
}

/// Plans the next move of a task in `state` whose steps are `counts`, after
/// this pass enqueued what it could. `next_retry_at` is the earliest scheduled
/// retry among its steps.
pub fn plan(state: TaskState, counts: &StepCounts, next_retry_at: Option<DateTime<Utc>>) -> Plan {
    let nothing = Plan { events: Vec::new(), finalize: false, next_due: None };
    if state.is_final() || counts.total() == 0 {
        return nothing;
    }
    let all_complete = counts.complete == counts.total();
    let failed_for_good = counts.error > 0;
    let in_flight = counts.in_flight() > 0;

    // The state to be in, and whether to ask for finalization from there.
    let (target, finalize) = if all_complete {
        (TaskState::StepsInProcess, true)
    } else if failed_for_good && !in_flight {
        (finalizable_failure_state(state), true)
    } else if failed_for_good {
        (TaskState::BlockedByFailures, false)
    } else if in_flight {
        (TaskState::StepsInProcess, false)
    } else if counts.waiting_for_retry > 0 {
        (TaskState::WaitingForRetry, false)
    } else {
        // Only pending steps and nothing runnable: nothing to move.
        (state, false)
    };

    // A blocked task retries nothing (its retries are not enqueued): the
    // completion of its last running step wakes it for finalization.
    let retries = !finalize && target != TaskState::BlockedByFailures;
    let route = path(state, target);
    Plan {
        finalize: finalize && route.is_some(),
        next_due: next_retry_at.filter(|_| retries && counts.waiting_for_retry > 0),
        events: route.unwrap_or_default(),
    }
}

/// A failure is finalized from `blocked_by_failures` if the task is already
/// there, else from `steps_in_process` (both have an edge to `error`).
fn finalizable_failure_state(state: TaskState) -> TaskState {
    if state == TaskState::BlockedByFailures { TaskState::BlockedByFailures } else { TaskState::StepsInProcess }
}

/// The shortest sequence of events from `from` to `to` in the task machine.
/// `None` when `to` cannot be reached (e.g. leaving `blocked_by_failures`).
pub fn path(from: TaskState, to: TaskState) -> Option<Vec<TaskEvent>> {
    let mut frontier = vec![(from, Vec::new())];
    let mut seen = vec![from];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for (state, events) in frontier {
            if state == to {
                return Some(events);
            }
            for &(edge_from, event, edge_to) in TaskState::TRANSITIONS {
                // Final states are reached only through finalization.
                if edge_from == state && !edge_to.is_final() && !seen.contains(&edge_to) {
                    seen.push(edge_to);
                    let mut longer = events.clone();
                    longer.push(event);
                    next.push((edge_to, longer));
                }
            }
        }
        frontier = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tasker_shared::state_machine::StepState;

    use super::*;

    fn counts(spec: &[(StepState, i64)]) -> StepCounts {
        let mut c = StepCounts::default();
        for &(state, n) in spec {
            c.add(state, n);
        }
        c
    }

    #[test]
    fn a_new_task_with_enqueued_steps_starts() {
        let p = plan(TaskState::Pending, &counts(&[(StepState::Enqueued, 1), (StepState::Pending, 3)]), None);
        assert_eq!(p, Plan { events: vec![TaskEvent::Start], finalize: false, next_due: None });
    }

    #[test]
    fn all_complete_asks_for_finalization() {
        let p = plan(TaskState::StepsInProcess, &counts(&[(StepState::Complete, 4)]), None);
        assert!(p.finalize && p.events.is_empty());
    }

    #[test]
    fn a_failure_blocks_while_others_run_then_fails_the_task() {
        let running = counts(&[(StepState::Error, 1), (StepState::InProgress, 1), (StepState::Pending, 1)]);
        let p = plan(TaskState::StepsInProcess, &running, None);
        assert_eq!(p.events, [TaskEvent::Block]);
        assert!(!p.finalize);

        // A retry beside the failure is not due: nothing would enqueue it,
        // and a past due time would bring the task back at once, again and
        // again, until the running step finished.
        let past = Utc::now() - chrono::Duration::seconds(1);
        let waiting = counts(&[(StepState::Error, 1), (StepState::InProgress, 1), (StepState::WaitingForRetry, 1)]);
        for state in [TaskState::StepsInProcess, TaskState::BlockedByFailures] {
            assert_eq!(plan(state, &waiting, Some(past)).next_due, None, "from {state:?}");
        }

        let drained = counts(&[(StepState::Error, 1), (StepState::Complete, 1), (StepState::Pending, 1)]);
        let p = plan(TaskState::BlockedByFailures, &drained, None);
        assert!(p.finalize && p.events.is_empty());
    }

    #[test]
    fn a_retry_with_nothing_running_waits_until_its_time() {
        let at = Utc::now() + chrono::Duration::seconds(3);
        let p = plan(
            TaskState::StepsInProcess,
            &counts(&[(StepState::WaitingForRetry, 1), (StepState::Pending, 2)]),
            Some(at),
        );
        assert_eq!(p.events, [TaskEvent::WaitForRetry]);
        assert_eq!(p.next_due, Some(at));

        let resumed =
            plan(TaskState::WaitingForRetry, &counts(&[(StepState::Enqueued, 1), (StepState::Pending, 2)]), None);
        assert_eq!(resumed.events, [TaskEvent::Resume]);
    }

    #[test]
    fn a_retry_beside_a_running_step_keeps_the_task_running_but_remembers_the_time() {
        let at = Utc::now() + chrono::Duration::seconds(3);
        let p = plan(
            TaskState::StepsInProcess,
            &counts(&[(StepState::WaitingForRetry, 1), (StepState::InProgress, 1)]),
            Some(at),
        );
        assert!(p.events.is_empty() && !p.finalize);
        assert_eq!(p.next_due, Some(at));
    }

    fn any_state() -> impl Strategy<Value = TaskState> {
        proptest::sample::select(TaskState::ALL.to_vec())
    }

    proptest! {
        /// Whatever the counts, a plan only asks for moves the machine allows,
        /// and finalization only from a state with an edge to a final state.
        #[test]
        fn plans_only_use_edges_of_the_machine(
            state in any_state(),
            n in proptest::collection::vec(0i64..4, 7),
        ) {
            let c = counts(&[
                (StepState::Pending, n[0]), (StepState::Enqueued, n[1]), (StepState::InProgress, n[2]),
                (StepState::WaitingForRetry, n[3]), (StepState::Complete, n[4]), (StepState::Error, n[5]),
                (StepState::Cancelled, n[6]),
            ]);
            let p = plan(state, &c, None);
            let mut current = state;
            for event in &p.events {
                current = current.apply(*event).expect("plan uses table edges");
            }
            if p.finalize {
                let final_edge = TaskState::TRANSITIONS
                    .iter()
                    .any(|(from, _, to)| *from == current && to.is_final() && *to != TaskState::Cancelled);
                prop_assert!(final_edge, "finalize from {current}");
            }
            if state.is_final() {
                prop_assert!(p.events.is_empty() && !p.finalize);
            }
        }
    }
}
