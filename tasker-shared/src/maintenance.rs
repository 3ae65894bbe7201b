//! Maintenance: statistics partitions ahead of time, archival of samples past
//! retention, and deletion of finished tasks past retention.
//!
//! Every service runs the schedule; a session-level advisory lock lets one
//! instance at a time do the work (the others skip that round), and the lock
//! dies with its connection, so a crashed runner never blocks the next. Task
//! deletion goes in bounded batches, each its own short transaction, and only
//! ever touches tasks that are final.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::MaintenanceSettings;
use crate::error::Result;

/// The advisory lock key ("tasker" + maintenance).
const LOCK_KEY: i64 = 0x7461_736b_6572_0001;

/// Daily statistics partitions kept ready ahead of today.
const PARTITIONS_AHEAD_DAYS: i32 = 7;

/// What one maintenance round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Another instance held the lock: nothing was done.
    pub skipped: bool,
    /// Statistics partitions created.
    pub partitions_created: i32,
    /// Samples moved to the archive.
    pub samples_archived: i64,
    /// Finished tasks deleted (with their steps and history).
    pub tasks_deleted: u64,
}

/// Runs one round now, if no other instance is running one.
pub async fn run_once(pool: &PgPool, settings: &MaintenanceSettings, statistics_retention_days: u32) -> Result<Report> {
    let mut conn = pool.acquire().await?;
    let locked =
        sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "locked!""#, LOCK_KEY).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(Report { skipped: true, ..Report::default() });
    }
    let result = work(&mut conn, settings, statistics_retention_days).await;
    // Release even when the work failed; if this fails too, closing the
    // connection releases it.
    let unlocked =
        sqlx::query_scalar!(r#"SELECT pg_advisory_unlock($1) AS "unlocked!""#, LOCK_KEY).fetch_one(&mut *conn).await;
    if unlocked.is_err() {
        conn.close_on_drop();
    }
    result
}

async fn work(
    conn: &mut sqlx::PgConnection,
    settings: &MaintenanceSettings,
    statistics_retention_days: u32,
) -> Result<Report> {
    let partitions_created = sqlx::query_scalar!(
        r#"SELECT tasker.ensure_statistics_partitions((now() AT TIME ZONE 'UTC')::date - 1, $1 + 2) AS "n!""#,
        PARTITIONS_AHEAD_DAYS
    )
    .fetch_one(&mut *conn)
    .await?;

    let samples_archived = sqlx::query_scalar!(
        r#"SELECT tasker.archive_statistics(now() - make_interval(days => $1)) AS "n!""#,
        i32::try_from(statistics_retention_days).unwrap_or(i32::MAX)
    )
    .fetch_one(&mut *conn)
    .await?;

    let mut tasks_deleted = 0;
    if settings.task_retention_days > 0 {
        let days = i32::try_from(settings.task_retention_days).unwrap_or(i32::MAX);
        let batch = i64::from(settings.retention_batch);
        loop {
            let deleted = delete_finished_tasks(&mut *conn, days, batch).await?;
            tasks_deleted += deleted;
            if deleted < u64::try_from(batch).unwrap_or(u64::MAX) {
                break;
            }
        }
    }
    Ok(Report { skipped: false, partitions_created, samples_archived, tasks_deleted })
}

/// Deletes up to `batch` tasks that finished more than `days` days ago, with
/// their steps, edges, discoveries and history (by statement-level triggers,
/// and the discoveries by their key's cascade). One short transaction.
pub async fn delete_finished_tasks(executor: impl sqlx::PgExecutor<'_>, days: i32, batch: i64) -> Result<u64> {
    let result = sqlx::query!(
        "DELETE FROM tasker.tasks
         WHERE task_uuid IN (
             SELECT task_uuid FROM tasker.tasks
             WHERE completed_at < now() - make_interval(days => $1)
             ORDER BY completed_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        days,
        batch,
    )
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}

/// Runs maintenance shortly after start and then every `interval`, until shutdown.
pub async fn run(
    pool: PgPool,
    settings: MaintenanceSettings,
    statistics_retention_days: u32,
    shutdown: CancellationToken,
) {
    let mut next = Duration::from_secs(5);
    loop {
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = shutdown.cancelled() => return,
        }
        next = Duration::from_millis(settings.interval_ms);
        match run_once(&pool, &settings, statistics_retention_days).await {
            Ok(report) if report.skipped => tracing::debug!("maintenance: another instance holds the lock"),
            Ok(report) => tracing::info!(
                partitions_created = report.partitions_created,
                samples_archived = report.samples_archived,
                tasks_deleted = report.tasks_deleted,
                "maintenance done"
            ),
            Err(err) => tracing::warn!(error = %err, "maintenance failed; will try again next round"),
        }
    }
}
