//! Claiming work: orchestrators claim due tasks, workers claim enqueued steps.
//!
//! Both are leases taken with `FOR NO KEY UPDATE SKIP LOCKED` on the rows
//! themselves (see `migrations/0005_task_claims.sql` and `0006_step_lifecycle.sql`):
//! concurrent claimers never wait for each other, and never take the same row.
//! A lease that is not extended expires, and the work becomes claimable again.
//! Every later write about claimed work presents a fence (a task's `claim_seq`,
//! a step's attempt number) so a stale owner's write is rejected, not applied.
//!
//! `NO KEY UPDATE` rather than `UPDATE`: it excludes other writers just the same,
//! but does not block the key-share locks that inserting history rows (foreign
//! keys to the claimed row) takes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::Result;
use crate::identifier::Identifier;
use crate::state_machine::TaskState;
use crate::text_enum::text_enum;

text_enum! {
    /// How a claimer came to claim a task or a step; recorded with every
    /// claim not made because of a notification.
    pub enum DiscoveredVia ("discovery source") {
        /// A LISTEN notification woke the claimer.
        Event => "event",
        /// The poll timer (PollingOnly and Hybrid modes).
        Poll => "poll",
        /// A catch-up claim at start-up or after the listener reconnected.
        Sweep => "sweep",
        /// The timer for a known future `ready_at` (a scheduled retry).
        Timer => "timer",
    }
}

/// A task this orchestrator now holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskClaim {
    /// The task.
    pub task_uuid: Uuid,
    /// Its namespace.
    pub namespace: String,
    /// Its state when claimed.
    pub state: TaskState,
    /// Its priority (higher first).
    pub priority: i32,
    /// When the work became due; the discovery lag is measured from here.
    pub ready_since: Option<DateTime<Utc>>,
    /// When the claim was taken (database clock).
    pub claimed_at: DateTime<Utc>,
    /// The fence: present it to release, extend or transition.
    pub claim_seq: i64,
    /// Wake-ups seen at claim time; releasing compares it to detect new work.
    pub wake_seq: i64,
    /// When the task was submitted.
    pub created_at: DateTime<Utc>,
    /// The previous claim had expired: its orchestrator died or hung, and the
    /// discovery lag includes that wait.
    pub took_over: bool,
}

impl TaskClaim {
    /// How long the work waited between becoming due and being claimed.
    pub fn discovery_lag(&self) -> Duration {
        self.ready_since.and_then(|since| (self.claimed_at - since).to_std().ok()).unwrap_or_default()
    }
}

/// Claims up to `limit` due tasks (`tasker.claim_ready_tasks`).
pub async fn claim_ready_tasks(
    executor: impl PgExecutor<'_>,
    orchestrator_id: &str,
    limit: i32,
    claim_timeout: Duration,
    discovered_via: DiscoveredVia,
) -> Result<Vec<TaskClaim>> {
    let claims = sqlx::query_as!(
        TaskClaim,
        r#"SELECT task_uuid AS "task_uuid!", namespace AS "namespace!",
                  state AS "state!: TaskState", priority AS "priority!", ready_since,
                  claimed_at AS "claimed_at!", claim_seq AS "claim_seq!", wake_seq AS "wake_seq!",
                  created_at AS "created_at!", took_over AS "took_over!"
           FROM tasker.claim_ready_tasks($1, $2, $3, $4)"#,
        orchestrator_id,
        limit,
        claim_timeout as Duration,
        discovered_via.as_str(),
    )
    .fetch_all(executor)
    .await?;
    Ok(claims)
}

/// Extends claims still held; returns the tasks whose claim was extended.
pub async fn extend_task_claims(
    executor: impl PgExecutor<'_>,
    orchestrator_id: &str,
    claims: &[&TaskClaim],
    claim_timeout: Duration,
) -> Result<Vec<Uuid>> {
    let (uuids, seqs): (Vec<Uuid>, Vec<i64>) = claims.iter().map(|c| (c.task_uuid, c.claim_seq)).unzip();
    let extended = sqlx::query_scalar!(
        r#"SELECT task_uuid AS "task_uuid!" FROM tasker.extend_task_claims($1, $2, $3, $4)"#,
        orchestrator_id,
        &uuids,
        &seqs,
        claim_timeout as Duration,
    )
    .fetch_all(executor)
    .await?;
    Ok(extended)
}

/// Giving a claimed task back, saying when it next needs attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Release {
    /// The task.
    pub task_uuid: Uuid,
    /// The claim's fence.
    pub claim_seq: i64,
    /// Wake-ups seen at claim time.
    pub wake_seq: i64,
    /// `None`: only when something wakes it; `Some(t)`: at `t` (a retry).
    pub next_due: Option<DateTime<Utc>>,
}

impl Release {
    /// A release of `claim` that asks to be looked at again at `next_due`.
    pub fn of(claim: &TaskClaim, next_due: Option<DateTime<Utc>>) -> Self {
        Release { task_uuid: claim.task_uuid, claim_seq: claim.claim_seq, wake_seq: claim.wake_seq, next_due }
    }
}

/// A released task, and whether it is still due (woken while claimed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The task.
    pub task_uuid: Uuid,
    /// New work arrived while it was claimed: claim again now.
    pub still_due: bool,
}

/// Releases claims (`tasker.release_task_claims`). Claims no longer held (they
/// expired and were taken over) are skipped.
pub async fn release_task_claims(
    executor: impl PgExecutor<'_>,
    orchestrator_id: &str,
    releases: &[Release],
) -> Result<Vec<Released>> {
    let uuids: Vec<Uuid> = releases.iter().map(|r| r.task_uuid).collect();
    let claim_seqs: Vec<i64> = releases.iter().map(|r| r.claim_seq).collect();
    let wake_seqs: Vec<i64> = releases.iter().map(|r| r.wake_seq).collect();
    let next_due: Vec<Option<DateTime<Utc>>> = releases.iter().map(|r| r.next_due).collect();
    let released = sqlx::query_as!(
        Released,
        r#"SELECT task_uuid AS "task_uuid!", still_due AS "still_due!"
           FROM tasker.release_task_claims($1, $2, $3, $4, $5::timestamptz[])"#,
        orchestrator_id,
        &uuids,
        &claim_seqs,
        &wake_seqs,
        &next_due as &[Option<DateTime<Utc>>],
    )
    .fetch_all(executor)
    .await?;
    Ok(released)
}

/// A step attempt this worker now runs.
#[derive(Debug, Clone, PartialEq)]
pub struct StepClaim {
    /// The step.
    pub step_uuid: Uuid,
    /// Its task.
    pub task_uuid: Uuid,
    /// Its namespace.
    pub namespace: String,
    /// The step's name in its template.
    pub name: String,
    /// The handler to run.
    pub handler: String,
    /// The step's configuration from the template.
    pub config: serde_json::Value,
    /// This attempt's number (1-based); the fence for every later write.
    pub attempt: i32,
    /// The attempt budget.
    pub max_attempts: i32,
    /// How long the attempt may run.
    pub timeout_ms: i32,
    /// When the lease runs out unless extended.
    pub lease_expires_at: DateTime<Utc>,
    /// The task's context, as submitted.
    pub task_context: serde_json::Value,
    /// Results of the steps this one depends on, by step name.
    pub dependency_results: serde_json::Value,
    /// When the step was enqueued; the discovery lag is measured from here.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When the claim was taken (database clock).
    pub claimed_at: DateTime<Utc>,
}

impl StepClaim {
    /// The attempt's timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.timeout_ms).unwrap_or(1))
    }

    /// The fence identifying this attempt.
    pub fn attempt_ref(&self) -> AttemptRef {
        AttemptRef { step_uuid: self.step_uuid, attempt: self.attempt }
    }

    /// How long the step waited between being enqueued and being claimed.
    pub fn discovery_lag(&self) -> Duration {
        self.enqueued_at.and_then(|since| (self.claimed_at - since).to_std().ok()).unwrap_or_default()
    }
}

/// One attempt of one step: what fenced writes present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptRef {
    /// The step.
    pub step_uuid: Uuid,
    /// The attempt number.
    pub attempt: i32,
}

/// Claims up to `limit` enqueued steps of `namespace` (any namespace when
/// `None`), chosen in priority order and returned in no particular order.
/// Claims not made because of a notification are logged in
/// `tasker.step_discoveries`, the record misses are checked against.
pub async fn claim_steps(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    namespace: Option<&Identifier>,
    limit: i32,
    lease: Duration,
    discovered_via: DiscoveredVia,
) -> Result<Vec<StepClaim>> {
    claim(executor, worker_id, namespace, limit, lease, discovered_via, None).await
}

/// In the transaction whose completions enqueued `dependents` and started
/// `started` for this worker ([`crate::step_result::StartDependents`]):
/// returns the started ones as claims, and claims up to `limit` more: the
/// enqueued dependents first, continuing their tasks, unless a step of
/// higher priority (not among them) waits where this worker claims from, and
/// the rest of `limit` as [`claim_steps`] does. The claims come back in no
/// particular order. `limit` may be 0 when `started` is not empty.
pub async fn claim_dependents(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    namespace: Option<&Identifier>,
    limit: i32,
    lease: Duration,
    dependents: &[Uuid],
    started: &[Uuid],
) -> Result<Vec<StepClaim>> {
    // Found by the completion itself: as good as a notification.
    let continuing = Continuing { prefer: dependents, started };
    claim(executor, worker_id, namespace, limit, lease, DiscoveredVia::Event, Some(continuing)).await
}

/// What a completion's own claim continues: the dependents it enqueued
/// (preferred) and those it started.
#[derive(Clone, Copy)]
struct Continuing<'a> {
    prefer: &'a [Uuid],
    started: &'a [Uuid],
}

async fn claim(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    namespace: Option<&Identifier>,
    limit: i32,
    lease: Duration,
    discovered_via: DiscoveredVia,
    continuing: Option<Continuing<'_>>,
) -> Result<Vec<StepClaim>> {
    let prefer = continuing.map(|c| c.prefer);
    let started = continuing.map(|c| c.started);
    let claims = sqlx::query_as!(
        StepClaim,
        r#"SELECT step_uuid AS "step_uuid!", task_uuid AS "task_uuid!", namespace AS "namespace!",
                  name AS "name!", handler AS "handler!", config AS "config!",
                  attempt AS "attempt!", max_attempts AS "max_attempts!", timeout_ms AS "timeout_ms!",
                  lease_expires_at AS "lease_expires_at!", task_context AS "task_context!",
                  dependency_results AS "dependency_results!", enqueued_at, claimed_at AS "claimed_at!"
           FROM tasker.claim_steps($1, $2, $3, $4, $5, $6, $7)"#,
        worker_id,
        namespace.map(Identifier::as_str),
        limit,
        lease as Duration,
        discovered_via.as_str(),
        prefer,
        started,
    )
    .fetch_all(executor)
    .await?;
    Ok(claims)
}

/// Heartbeat: extends the leases of attempts this worker still owns. Returns
/// the steps extended; an attempt missing from it was cancelled or rescued.
pub async fn extend_step_leases(
    executor: impl PgExecutor<'_>,
    worker_id: &str,
    attempts: &[AttemptRef],
    lease: Duration,
) -> Result<Vec<Uuid>> {
    let (uuids, numbers): (Vec<Uuid>, Vec<i32>) = attempts.iter().map(|a| (a.step_uuid, a.attempt)).unzip();
    let extended = sqlx::query_scalar!(
        r#"SELECT step_uuid AS "step_uuid!" FROM tasker.extend_step_leases($1, $2, $3, $4)"#,
        worker_id,
        &uuids,
        &numbers,
        lease as Duration,
    )
    .fetch_all(executor)
    .await?;
    Ok(extended)
}
