//! The database's invariants, checked by `tasker.invariant_violations()`
//! (`migrations/0007_invariants.sql`, extended by
//! `migrations/0025_set_based_history_keys.sql`,
//! `migrations/0028_set_based_task_history_key.sql` and
//! `migrations/0029_cheaper_statements_per_step.sql`; documented in `docs/testing.md`).

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::Result;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which rule.
    pub invariant: String,
    /// The task or step it concerns.
    pub subject: Uuid,
    /// What was found.
    pub detail: String,
}

/// Every violation in the database; empty when all invariants hold.
pub async fn violations(executor: impl PgExecutor<'_>) -> Result<Vec<Violation>> {
    let rows = sqlx::query_as!(
        Violation,
        r#"SELECT invariant AS "invariant!", subject AS "subject!", detail AS "detail!"
           FROM tasker.invariant_violations()"#
    )
    .fetch_all(executor)
    .await?;
    Ok(rows)
}
