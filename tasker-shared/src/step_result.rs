//! Recording what an attempt did: fenced completion and failure.
//!
//! Only the worker that claimed an attempt, presenting its attempt number, while
//! the step is still `in_progress`, can record its outcome. A late write from a
//! stale owner (its lease expired and the step was rescued, or the task was
//! cancelled) is rejected and changes nothing. In the same transaction, a
//! completion enqueues the dependents it made runnable and finalizes a task
//! whose last step it was; an outcome that leaves work for the orchestrator
//! (a failure, a task it may not finalize) wakes the task.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::claim::{AttemptRef, StepClaim};
use crate::error::Result;
use crate::identifier::Identifier;
use crate::state_machine::StepState;

/// A successful attempt and its result.
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    /// The attempt.
    pub attempt: AttemptRef,
    /// The handler's result, stored on the step.
    pub result: serde_json::Value,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The attempt.
    pub attempt: AttemptRef,
    /// What went wrong, for `last_error` and the history.
    pub error: String,
    /// Whether another attempt may succeed (if attempts remain).
    pub retryable: bool,
}

/// What the database made of a reported outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The step.
    pub step_uuid: Uuid,
    /// False when the fence rejected it (stale attempt, cancelled step).
    pub accepted: bool,
    /// The step's new state, when accepted.
    pub state: Option<StepState>,
    /// Dependents this completion made runnable and enqueued (in the same
    /// transaction; one with several parents in the call is credited to one
    /// of them); none for failures.
    pub enqueued_dependents: Vec<Uuid>,
    /// Whether its task was woken for its orchestrator by this call.
    pub task_woken: bool,
    /// Whether this call finalized its task (the last step completed).
    pub task_finalized: bool,
    /// When a task finalized by this call was submitted (for its latency).
    pub task_created_at: Option<DateTime<Utc>>,
}

/// Records successful attempts (`tasker.complete_steps`), in one statement,
/// announcing the dependents they enqueue.
pub async fn complete_steps(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    successes: &[Success],
) -> Result<Vec<Recorded>> {
    let (uuids, attempts, results) = columns(successes);
    let rows = sqlx::query!(
        r#"SELECT step_uuid AS "step_uuid!", accepted AS "accepted!", enqueued_dependents AS "enqueued_dependents!",
                  task_woken AS "task_woken!", task_finalized AS "task_finalized!", task_created_at
           FROM tasker.complete_steps($1, $2, $3, $4, true)"#,
        worker_id,
        &uuids,
        &attempts,
        &results,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            Recorded::completion(
                r.step_uuid,
                r.accepted,
                r.enqueued_dependents,
                r.task_woken,
                r.task_finalized,
                r.task_created_at,
            )
        })
        .collect())
}

/// What [`complete_and_claim`] did, in one statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Continued {
    /// One per success, in no particular order.
    pub recorded: Vec<Recorded>,
    /// Steps claimed for the caller: dependents the completions enqueued
    /// (unless a step of higher priority waited), then the oldest work.
    pub claimed: Vec<StepClaim>,
    /// Step channels notified of the dependents it left enqueued.
    pub channels_notified: u64,
}

/// Records successful attempts and claims, for a worker with `room` free
/// capacity, what they made runnable (`tasker.complete_and_claim`): one
/// statement, so one round trip, committed on its own.
///
/// It claims up to as many steps as the completions enqueued, and no more
/// than `room`: the dependents they enqueued, continuing their tasks, unless
/// a step of higher priority waits where this worker claims from, and then
/// the oldest work. It notifies other workers only of the dependents it
/// leaves. `room` must be capacity the caller has reserved, since what is
/// claimed is the caller's to run; with `room` 0 nothing is claimed and
/// every enqueued dependent is announced.
pub async fn complete_and_claim(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    successes: &[Success],
    namespace: Option<&Identifier>,
    room: i32,
    lease: Duration,
) -> Result<Continued> {
    let (uuids, attempts, results) = columns(successes);
    let rows = sqlx::query_as!(
        ContinuedRow,
        r#"SELECT claimed AS "claimed!", step_uuid AS "step_uuid!", accepted, enqueued_dependents, task_woken,
                  task_finalized, task_created_at, channels_notified, task_uuid, namespace, name, handler,
                  config, attempt, max_attempts, timeout_ms, dependents, lease_expires_at, task_context,
                  dependency_results, enqueued_at, claimed_at
           FROM tasker.complete_and_claim($1, $2, $3, $4, $5, $6, $7)"#,
        worker_id,
        &uuids,
        &attempts,
        &results,
        namespace.map(Identifier::as_str),
        room,
        lease as Duration,
    )
    .fetch_all(executor)
    .await?;

    let mut continued = Continued { recorded: Vec::new(), claimed: Vec::new(), channels_notified: 0 };
    for row in rows {
        let step_uuid = row.step_uuid;
        let incomplete =
            || sqlx::Error::Protocol(format!("complete_and_claim returned an incomplete row for step {step_uuid}"));
        if row.claimed {
            continued.claimed.push(row.into_claim().ok_or_else(incomplete)?);
        } else {
            let (recorded, channels) = row.into_completion().ok_or_else(incomplete)?;
            continued.recorded.push(recorded);
            continued.channels_notified = channels;
        }
    }
    Ok(continued)
}

/// A row of `tasker.complete_and_claim`: a completed step (`claimed` false)
/// or a claimed one, each with its own columns set.
struct ContinuedRow {
    claimed: bool,
    step_uuid: Uuid,
    accepted: Option<bool>,
    enqueued_dependents: Option<Vec<Uuid>>,
    task_woken: Option<bool>,
    task_finalized: Option<bool>,
    task_created_at: Option<DateTime<Utc>>,
    channels_notified: Option<i32>,
    task_uuid: Option<Uuid>,
    namespace: Option<String>,
    name: Option<String>,
    handler: Option<String>,
    config: Option<serde_json::Value>,
    attempt: Option<i32>,
    max_attempts: Option<i32>,
    timeout_ms: Option<i32>,
    dependents: Option<i32>,
    lease_expires_at: Option<DateTime<Utc>>,
    task_context: Option<serde_json::Value>,
    dependency_results: Option<serde_json::Value>,
    enqueued_at: Option<DateTime<Utc>>,
    claimed_at: Option<DateTime<Utc>>,
}

impl ContinuedRow {
    /// A completed step, and the channels its statement notified.
    fn into_completion(self) -> Option<(Recorded, u64)> {
        let recorded = Recorded::completion(
            self.step_uuid,
            self.accepted?,
            self.enqueued_dependents?,
            self.task_woken?,
            self.task_finalized?,
            self.task_created_at,
        );
        Some((recorded, u64::try_from(self.channels_notified?).ok()?))
    }

    /// A claimed step.
    fn into_claim(self) -> Option<StepClaim> {
        Some(StepClaim {
            step_uuid: self.step_uuid,
            task_uuid: self.task_uuid?,
            namespace: self.namespace?,
            name: self.name?,
            handler: self.handler?,
            config: self.config?,
            attempt: self.attempt?,
            max_attempts: self.max_attempts?,
            timeout_ms: self.timeout_ms?,
            dependents: self.dependents?,
            lease_expires_at: self.lease_expires_at?,
            task_context: self.task_context?,
            dependency_results: self.dependency_results?,
            enqueued_at: self.enqueued_at,
            claimed_at: self.claimed_at?,
        })
    }
}

/// The columns `complete_steps` takes.
fn columns(successes: &[Success]) -> (Vec<Uuid>, Vec<i32>, Vec<serde_json::Value>) {
    let uuids = successes.iter().map(|s| s.attempt.step_uuid).collect();
    let attempts = successes.iter().map(|s| s.attempt.attempt).collect();
    let results = successes.iter().map(|s| s.result.clone()).collect();
    (uuids, attempts, results)
}

impl Recorded {
    /// A completion as `complete_steps` reports it.
    fn completion(
        step_uuid: Uuid,
        accepted: bool,
        enqueued_dependents: Vec<Uuid>,
        task_woken: bool,
        task_finalized: bool,
        task_created_at: Option<DateTime<Utc>>,
    ) -> Self {
        Recorded {
            step_uuid,
            accepted,
            state: accepted.then_some(StepState::Complete),
            enqueued_dependents,
            task_woken,
            task_finalized,
            task_created_at,
        }
    }
}

/// Records failed attempts (`tasker.fail_steps`), in one statement.
pub async fn fail_steps(executor: impl PgExecutor<'_>, worker_id: &str, failures: &[Failure]) -> Result<Vec<Recorded>> {
    let uuids: Vec<Uuid> = failures.iter().map(|f| f.attempt.step_uuid).collect();
    let attempts: Vec<i32> = failures.iter().map(|f| f.attempt.attempt).collect();
    let errors: Vec<String> = failures.iter().map(|f| f.error.clone()).collect();
    let retryable: Vec<bool> = failures.iter().map(|f| f.retryable).collect();
    let rows = sqlx::query!(
        r#"SELECT step_uuid AS "step_uuid!", accepted AS "accepted!", state AS "state: StepState"
           FROM tasker.fail_steps($1, $2, $3, $4, $5)"#,
        worker_id,
        &uuids,
        &attempts,
        &errors,
        &retryable,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Recorded {
            step_uuid: r.step_uuid,
            accepted: r.accepted,
            state: r.state,
            enqueued_dependents: Vec::new(),
            task_woken: r.accepted,
            task_finalized: false,
            task_created_at: None,
        })
        .collect())
}
