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
    /// Dependents this completion made runnable and started at once for the
    /// caller, under [`StartDependents`] (credited as the enqueued ones are):
    /// [`crate::claim::claim_dependents`] returns them as claims.
    pub started_dependents: Vec<Uuid>,
    /// Whether its task was woken for its orchestrator by this call (false
    /// when rejected).
    pub task_woken: bool,
    /// Whether this call finalized its task (the last step completed; false
    /// when rejected).
    pub task_finalized: bool,
    /// When a task finalized by this call was submitted (for its latency).
    pub task_created_at: Option<DateTime<Utc>>,
}

/// Who announces the dependents a completion enqueues on their step channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// The completion itself.
    Now,
    /// The caller, later in the same transaction, with [`announce_left`]
    /// after its own claim: then the dependents it claims itself are not
    /// announced to other workers.
    Later,
}

/// The claim a completion makes for its worker: up to `limit` of the
/// dependents it makes runnable start at once (pending to in progress, one
/// update each), where the worker claims from (`namespace`; any when `None`),
/// unless an enqueued step of higher priority waits there. The rest are
/// enqueued. Each started one is an attempt of the worker's under `lease`,
/// and the caller must take it up with [`crate::claim::claim_dependents`] in
/// the same transaction.
#[derive(Debug, Clone, Copy)]
pub struct StartDependents<'a> {
    /// At most this many.
    pub limit: usize,
    /// Where the worker claims from.
    pub namespace: Option<&'a Identifier>,
    /// The started attempts' lease.
    pub lease: Duration,
}

/// Records successful attempts (`tasker.complete_steps`), in one statement,
/// announcing the dependents they enqueue.
pub async fn complete_steps(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    successes: &[Success],
) -> Result<Vec<Recorded>> {
    record_successes(executor, worker_id, successes, Announce::Now, None).await
}

/// Records successful attempts, in one statement; `announce` says who
/// announces the dependents they enqueue, and `start` which of them start at
/// once for the caller.
pub async fn record_successes(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    successes: &[Success],
    announce: Announce,
    start: Option<StartDependents<'_>>,
) -> Result<Vec<Recorded>> {
    let uuids: Vec<Uuid> = successes.iter().map(|s| s.attempt.step_uuid).collect();
    let attempts: Vec<i32> = successes.iter().map(|s| s.attempt.attempt).collect();
    let results: Vec<serde_json::Value> = successes.iter().map(|s| s.result.clone()).collect();
    let start_limit = start.map_or(0, |s| i32::try_from(s.limit).unwrap_or(i32::MAX));
    let rows = sqlx::query!(
        r#"SELECT step_uuid AS "step_uuid!", accepted AS "accepted!", enqueued_dependents AS "enqueued_dependents!",
                  task_woken AS "task_woken!", task_finalized AS "task_finalized!", task_created_at,
                  started_dependents AS "started_dependents!"
           FROM tasker.complete_steps($1, $2, $3, $4, $5, $6, $7, $8)"#,
        worker_id,
        &uuids,
        &attempts,
        &results,
        announce == Announce::Now,
        start_limit,
        start.and_then(|s| s.namespace).map(Identifier::as_str),
        start.map(|s| s.lease) as Option<Duration>,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Recorded {
            step_uuid: r.step_uuid,
            accepted: r.accepted,
            state: r.accepted.then_some(StepState::Complete),
            enqueued_dependents: r.enqueued_dependents,
            started_dependents: r.started_dependents,
            task_woken: r.task_woken,
            task_finalized: r.task_finalized,
            task_created_at: r.task_created_at,
        })
        .collect())
}

/// After [`record_successes`] with [`Announce::Later`] and the caller's own
/// claim, in the same transaction: announces the dependents `recorded`
/// enqueued that are not among `claimed`, on their namespaces' step channels.
/// They were enqueued by this transaction, so no other one can have claimed
/// them: these are exactly what the caller leaves for other workers. Makes no
/// call when it took them all. Returns how many channels it notified.
pub async fn announce_left(executor: impl PgExecutor<'_>, recorded: &[Recorded], claimed: &[StepClaim]) -> Result<u64> {
    let left: Vec<Uuid> = recorded
        .iter()
        .flat_map(|r| &r.enqueued_dependents)
        .filter(|step| !claimed.iter().any(|c| c.step_uuid == **step))
        .copied()
        .collect();
    if left.is_empty() {
        return Ok(0);
    }
    let channels =
        sqlx::query_scalar!(r#"SELECT tasker.announce_enqueued($1) AS "channels!""#, &left).fetch_one(executor).await?;
    Ok(u64::try_from(channels).unwrap_or(0))
}

/// The claim a worker makes with what a batch of successes frees, when the
/// recording and the claim go in one statement ([`complete_and_claim`]).
#[derive(Debug, Clone, Copy)]
pub struct ClaimWith<'a> {
    /// The slots the batch's attempts free (at least 1): the completion
    /// starts up to this many of the dependents it makes runnable, as
    /// [`StartDependents`] does.
    pub capacity: usize,
    /// Free slots the caller reserved beyond `capacity`. The claim uses all
    /// of them when `backlog`, otherwise only as many as the dependents left
    /// enqueued need.
    pub free: usize,
    /// Whether the worker's claim loop is waiting for capacity (ready work
    /// may be waiting): then the claim fills every slot, even when the
    /// completion enqueued nothing.
    pub backlog: bool,
    /// Where the worker claims from (`None`: every namespace).
    pub namespace: Option<&'a Identifier>,
    /// Each claimed attempt's lease.
    pub lease: Duration,
}

/// What [`complete_and_claim`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Continued {
    /// One per success, as [`record_successes`] returns them.
    pub recorded: Vec<Recorded>,
    /// The attempts the worker now holds: the dependents the completion
    /// started and whatever else the claim took, in no particular order.
    pub claimed: Vec<StepClaim>,
    /// Step channels notified of the dependents the worker left enqueued.
    pub announced: u64,
}

/// Records successes, claims the next work with what they free, and
/// announces the dependents left for other workers, in one statement
/// (`tasker.complete_steps_and_claim`): sent alone, it is one transaction and
/// one round trip where [`record_successes`], [`crate::claim::claim_dependents`]
/// and [`announce_left`] in a transaction take four. The claim is made as
/// those three make it: it takes up the dependents the completion started,
/// then claims up to `capacity` minus those, plus `free` under a backlog or
/// else as many of `free` as the enqueued dependents need, preferring them;
/// and it claims at all only when the completion started or enqueued
/// dependents or there is a backlog.
pub async fn complete_and_claim(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    successes: &[Success],
    claim: ClaimWith<'_>,
) -> Result<Continued> {
    let uuids: Vec<Uuid> = successes.iter().map(|s| s.attempt.step_uuid).collect();
    let attempts: Vec<i32> = successes.iter().map(|s| s.attempt.attempt).collect();
    let results: Vec<serde_json::Value> = successes.iter().map(|s| s.result.clone()).collect();
    let rows = sqlx::query!(
        r#"SELECT kind AS "kind!", step_uuid, accepted, enqueued_dependents, task_woken, task_finalized,
                  task_created_at, started_dependents, task_uuid, namespace, name, handler, config, attempt,
                  max_attempts, timeout_ms, lease_expires_at, task_context, dependency_results, enqueued_at,
                  claimed_at, channels
           FROM tasker.complete_steps_and_claim($1, $2, $3, $4, $5, $6, $7, $8, $9)"#,
        worker_id,
        &uuids,
        &attempts,
        &results,
        i32::try_from(claim.capacity).unwrap_or(i32::MAX),
        i32::try_from(claim.free).unwrap_or(i32::MAX),
        claim.backlog,
        claim.namespace.map(Identifier::as_str),
        claim.lease as Duration,
    )
    .fetch_all(executor)
    .await?;
    let mut continued = Continued { recorded: Vec::new(), claimed: Vec::new(), announced: 0 };
    for r in rows {
        let malformed =
            || sqlx::Error::Protocol(format!("complete_steps_and_claim returned an incomplete {} row", r.kind));
        match r.kind.as_str() {
            "recorded" => {
                let accepted = r.accepted.ok_or_else(malformed)?;
                continued.recorded.push(Recorded {
                    step_uuid: r.step_uuid.ok_or_else(malformed)?,
                    accepted,
                    state: accepted.then_some(StepState::Complete),
                    enqueued_dependents: r.enqueued_dependents.ok_or_else(malformed)?,
                    started_dependents: r.started_dependents.ok_or_else(malformed)?,
                    task_woken: r.task_woken.ok_or_else(malformed)?,
                    task_finalized: r.task_finalized.ok_or_else(malformed)?,
                    task_created_at: r.task_created_at,
                });
            }
            "claimed" => continued.claimed.push(StepClaim {
                step_uuid: r.step_uuid.ok_or_else(malformed)?,
                task_uuid: r.task_uuid.ok_or_else(malformed)?,
                namespace: r.namespace.ok_or_else(malformed)?,
                name: r.name.ok_or_else(malformed)?,
                handler: r.handler.ok_or_else(malformed)?,
                config: r.config.ok_or_else(malformed)?,
                attempt: r.attempt.ok_or_else(malformed)?,
                max_attempts: r.max_attempts.ok_or_else(malformed)?,
                timeout_ms: r.timeout_ms.ok_or_else(malformed)?,
                lease_expires_at: r.lease_expires_at.ok_or_else(malformed)?,
                task_context: r.task_context.ok_or_else(malformed)?,
                dependency_results: r.dependency_results.ok_or_else(malformed)?,
                enqueued_at: r.enqueued_at,
                claimed_at: r.claimed_at.ok_or_else(malformed)?,
            }),
            "announced" => continued.announced = u64::try_from(r.channels.ok_or_else(malformed)?).unwrap_or(0),
            _ => return Err(malformed().into()),
        }
    }
    Ok(continued)
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
            started_dependents: Vec::new(),
            task_woken: r.accepted,
            task_finalized: false,
            task_created_at: None,
        })
        .collect())
}
