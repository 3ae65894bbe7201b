//! Finalization: the single decision that a task is complete or failed.
//!
//! `tasker.claim_task_for_finalization()` serializes callers on the task's rows
//! and decides from the steps alone, so however many orchestrators ask, exactly
//! one finalizes a task, and only when it really is finished.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::Result;
use crate::state_machine::TaskState;

/// The answer to "may I finalize this task?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalization {
    /// The task.
    pub task_uuid: Uuid,
    /// True only for the caller that moved the task to its final state.
    pub finalized: bool,
    /// The task's state after the call (None: no such task).
    pub state: Option<TaskState>,
    /// Why not, or "finalized".
    pub detail: String,
}

/// Asks to finalize one task.
pub async fn claim_task_for_finalization(
    executor: impl PgExecutor<'_>,
    task_uuid: Uuid,
    orchestrator_id: &str,
) -> Result<Finalization> {
    let row = sqlx::query_as!(
        Finalization,
        r#"SELECT task_uuid AS "task_uuid!", finalized AS "finalized!",
                  state AS "state: TaskState", detail AS "detail!"
           FROM tasker.claim_task_for_finalization($1, $2)"#,
        task_uuid,
        orchestrator_id,
    )
    .fetch_one(executor)
    .await?;
    Ok(row)
}

/// Asks to finalize several tasks in one statement (same semantics, task by
/// task, in task_uuid order so concurrent callers lock in the same order).
pub async fn finalize_tasks(
    executor: impl PgExecutor<'_>,
    task_uuids: &[Uuid],
    orchestrator_id: &str,
) -> Result<Vec<Finalization>> {
    let rows = sqlx::query_as!(
        Finalization,
        r#"SELECT f.task_uuid AS "task_uuid!", f.finalized AS "finalized!",
                  f.state AS "state: TaskState", f.detail AS "detail!"
           FROM (SELECT DISTINCT u FROM unnest($1::uuid[]) AS u ORDER BY u) AS input,
                LATERAL tasker.claim_task_for_finalization(input.u, $2) AS f"#,
        task_uuids,
        orchestrator_id,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows)
}
