//! The database side of orchestrating claimed tasks: what their steps look
//! like, enqueueing what became runnable, scheduling retries, moving task
//! states, and rescuing steps whose worker vanished.
//!
//! An orchestrator runs these inside one transaction per batch of claims,
//! starting with [`lock_claimed_tasks`] so it takes task rows before step rows,
//! the lock order every function in the schema follows.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::claim::TaskClaim;
use crate::error::Result;
use crate::state_machine::{StepState, TaskState};

/// Locks the tasks of `claims` that this orchestrator still holds, in
/// task_uuid order, and returns their current states.
pub async fn lock_claimed_tasks(
    conn: &mut PgConnection,
    orchestrator_id: &str,
    claims: &[TaskClaim],
) -> Result<Vec<(Uuid, TaskState)>> {
    let (uuids, seqs): (Vec<Uuid>, Vec<i64>) = claims.iter().map(|c| (c.task_uuid, c.claim_seq)).unzip();
    let rows = sqlx::query!(
        r#"SELECT t.task_uuid, t.state AS "state: TaskState"
           FROM tasker.tasks t
           JOIN unnest($2::uuid[], $3::bigint[]) AS i(task_uuid, claim_seq)
             ON i.task_uuid = t.task_uuid AND i.claim_seq = t.claim_seq
           WHERE t.claimed_by = $1
           ORDER BY t.task_uuid
           FOR NO KEY UPDATE OF t"#,
        orchestrator_id,
        &uuids,
        &seqs,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.task_uuid, r.state)).collect())
}

/// How a task's steps are spread over the step states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Waiting for dependencies.
    pub pending: i64,
    /// Waiting for a worker.
    pub enqueued: i64,
    /// Running.
    pub in_progress: i64,
    /// Failed, waiting for a retry.
    pub waiting_for_retry: i64,
    /// Succeeded.
    pub complete: i64,
    /// Failed for good.
    pub error: i64,
    /// Cancelled.
    pub cancelled: i64,
}

impl StepCounts {
    /// Adds `n` steps in `state`.
    pub fn add(&mut self, state: StepState, n: i64) {
        let slot = match state {
            StepState::Pending => &mut self.pending,
            StepState::Enqueued => &mut self.enqueued,
            StepState::InProgress => &mut self.in_progress,
            StepState::WaitingForRetry => &mut self.waiting_for_retry,
            StepState::Complete => &mut self.complete,
            StepState::Error => &mut self.error,
            StepState::Cancelled => &mut self.cancelled,
        };
        *slot += n;
    }

    /// All steps.
    pub fn total(&self) -> i64 {
        self.pending
            + self.enqueued
            + self.in_progress
            + self.waiting_for_retry
            + self.complete
            + self.error
            + self.cancelled
    }

    /// Enqueued or running.
    pub fn in_flight(&self) -> i64 {
        self.enqueued + self.in_progress
    }
}

/// A task's steps, summarized for the orchestrator's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSummary {
    /// The task.
    pub task_uuid: Uuid,
    /// Steps per state.
    pub counts: StepCounts,
    /// The earliest scheduled retry, if any.
    pub next_retry_at: Option<DateTime<Utc>>,
}

/// Summarizes the steps of each task.
pub async fn summarize_steps(executor: impl PgExecutor<'_>, task_uuids: &[Uuid]) -> Result<Vec<StepSummary>> {
    let rows = sqlx::query!(
        // Per task through its index (a LATERAL aggregate): as one GROUP BY
        // over `task_uuid = ANY ($1)`, default or stale statistics let the
        // planner scan the whole steps table instead (migrations/0009).
        r#"SELECT t.task_uuid AS "task_uuid!", s.state AS "state!: StepState", s.n AS "n!", s.next_retry_at
           FROM (SELECT DISTINCT u FROM unnest($1::uuid[]) AS u) AS t(task_uuid)
           CROSS JOIN LATERAL (SELECT s.state, count(*) AS n, min(s.next_retry_at) AS next_retry_at
                               FROM tasker.workflow_steps s
                               WHERE s.task_uuid = t.task_uuid
                               GROUP BY s.state) AS s
           ORDER BY t.task_uuid"#,
        task_uuids,
    )
    .fetch_all(executor)
    .await?;

    let mut summaries: Vec<StepSummary> = Vec::new();
    for row in rows {
        if summaries.last().is_none_or(|s| s.task_uuid != row.task_uuid) {
            summaries.push(StepSummary {
                task_uuid: row.task_uuid,
                counts: StepCounts::default(),
                next_retry_at: None,
            });
        }
        if let Some(summary) = summaries.last_mut() {
            summary.counts.add(row.state, row.n);
            if row.state == StepState::WaitingForRetry {
                summary.next_retry_at = row.next_retry_at;
            }
        }
    }
    Ok(summaries)
}

/// A failed step waiting for its retry to be scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnscheduledRetry {
    /// The step.
    pub step_uuid: Uuid,
    /// Attempts so far (all failed).
    pub attempts: i32,
    /// The step's backoff base.
    pub backoff_ms: i32,
}

/// Failed steps of these tasks whose retry has no time yet.
pub async fn unscheduled_retries(executor: impl PgExecutor<'_>, task_uuids: &[Uuid]) -> Result<Vec<UnscheduledRetry>> {
    let rows = sqlx::query_as!(
        UnscheduledRetry,
        r#"SELECT step_uuid, attempts, backoff_ms
           FROM tasker.workflow_steps
           WHERE task_uuid = ANY ($1) AND state = 'waiting_for_retry' AND next_retry_at IS NULL
           ORDER BY step_uuid"#,
        task_uuids,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows)
}

/// Sets retry times (`tasker.schedule_step_retries`); returns how many were set.
pub async fn schedule_step_retries(executor: impl PgExecutor<'_>, retries: &[(Uuid, DateTime<Utc>)]) -> Result<i32> {
    let (uuids, times): (Vec<Uuid>, Vec<DateTime<Utc>>) = retries.iter().copied().unzip();
    let scheduled = sqlx::query_scalar!(r#"SELECT tasker.schedule_step_retries($1, $2) AS "n!""#, &uuids, &times,)
        .fetch_one(executor)
        .await?;
    Ok(scheduled)
}

/// A step that was just enqueued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueuedStep {
    /// Its task.
    pub task_uuid: Uuid,
    /// The step.
    pub step_uuid: Uuid,
    /// Its namespace (whose channel was notified).
    pub namespace: String,
}

/// Enqueues every step that became runnable in the held tasks, notifying each
/// namespace's step channel once (`tasker.enqueue_ready_steps`).
pub async fn enqueue_ready_steps(
    executor: impl PgExecutor<'_>,
    orchestrator_id: &str,
    claims: &[TaskClaim],
) -> Result<Vec<EnqueuedStep>> {
    let (uuids, seqs): (Vec<Uuid>, Vec<i64>) = claims.iter().map(|c| (c.task_uuid, c.claim_seq)).unzip();
    let rows = sqlx::query_as!(
        EnqueuedStep,
        r#"SELECT task_uuid AS "task_uuid!", step_uuid AS "step_uuid!", namespace AS "namespace!"
           FROM tasker.enqueue_ready_steps($1, $2, $3)"#,
        orchestrator_id,
        &uuids,
        &seqs,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows)
}

/// A task state change an orchestrator decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTransition {
    /// The task.
    pub task_uuid: Uuid,
    /// The claim's fence.
    pub claim_seq: i64,
    /// Expected current state (compare-and-set).
    pub from: TaskState,
    /// New state.
    pub to: TaskState,
    /// Why, for the history.
    pub reason: String,
}

/// Applies task transitions (`tasker.transition_tasks`); returns the tasks that
/// moved. The others changed meanwhile (cancelled, claim lost) and are skipped.
pub async fn transition_tasks(
    executor: impl PgExecutor<'_>,
    orchestrator_id: &str,
    transitions: &[TaskTransition],
) -> Result<Vec<Uuid>> {
    let uuids: Vec<Uuid> = transitions.iter().map(|t| t.task_uuid).collect();
    let seqs: Vec<i64> = transitions.iter().map(|t| t.claim_seq).collect();
    let from: Vec<TaskState> = transitions.iter().map(|t| t.from).collect();
    let to: Vec<TaskState> = transitions.iter().map(|t| t.to).collect();
    let reasons: Vec<String> = transitions.iter().map(|t| t.reason.clone()).collect();
    let moved = sqlx::query_scalar!(
        r#"SELECT task_uuid AS "task_uuid!" FROM tasker.transition_tasks($1, $2, $3, $4, $5, $6)"#,
        orchestrator_id,
        &uuids,
        &seqs,
        &from as &[TaskState],
        &to as &[TaskState],
        &reasons,
    )
    .fetch_all(executor)
    .await?;
    Ok(moved)
}

/// A step whose lease expired, and where the rescuer put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredStep {
    /// The step.
    pub step_uuid: Uuid,
    /// Its task (woken).
    pub task_uuid: Uuid,
    /// `waiting_for_retry`, or `error` when out of attempts.
    pub state: StepState,
}

/// Fails up to `limit` running attempts whose lease expired
/// (`tasker.expire_step_leases`), waking their tasks.
pub async fn expire_step_leases(executor: impl PgExecutor<'_>, actor: &str, limit: i32) -> Result<Vec<ExpiredStep>> {
    let rows = sqlx::query_as!(
        ExpiredStep,
        r#"SELECT step_uuid AS "step_uuid!", task_uuid AS "task_uuid!", state AS "state!: StepState"
           FROM tasker.expire_step_leases($1, $2)"#,
        actor,
        limit,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows)
}
