//! Sampled statistics against a real database: flushing, outages, archival,
//! and the maintenance runner's retention and locking.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use support::*;
use tasker_shared::config::{MaintenanceSettings, StatisticsSettings};
use tasker_shared::event_system::sampled_statistics::DropReason;
use tasker_shared::event_system::{Event, SampledStatisticsCollector, StatisticsMode};
use tasker_shared::maintenance;
use tokio_util::sync::CancellationToken;

fn sampled(capacity: usize, flush_batch: usize) -> StatisticsSettings {
    StatisticsSettings {
        mode: StatisticsMode::Sampled,
        buffer_capacity: capacity,
        flush_batch,
        flush_interval_ms: 60_000,
        ..StatisticsSettings::default()
    }
}

async fn sample_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.statistics_samples").fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn shutdown_flushes_everything_buffered(pool: PgPool) {
    let shutdown = CancellationToken::new();
    // A flush interval of a minute and a batch larger than what is recorded:
    // only shutdown can write these.
    let (collector, writer) =
        SampledStatisticsCollector::start(&sampled(4096, 10_000), pool.clone(), "t", shutdown.clone());
    for _ in 0..2_500 {
        assert!(collector.record_if_sampled(Event::NotifyMiss, Duration::from_millis(3)));
    }
    assert_eq!(sample_rows(&pool).await, 0, "nothing written before shutdown");
    shutdown.cancel();
    writer.unwrap().finished().await;
    assert_eq!(sample_rows(&pool).await, 2_500);
    assert_eq!(collector.written(), 2_500);
    let (event, latency, rate): (String, i64, f32) =
        sqlx::query_as("SELECT event_type, latency_us, sample_rate FROM tasker.statistics_samples LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((event.as_str(), latency, rate), ("notify_miss", 3_000, 1.0));
}

/// The samples table disappears for a while (an outage as the writer sees
/// it). Producers keep recording without waiting; the batches that could not
/// be written are dropped and counted; every sample is either written or
/// counted; writing resumes when the table is back.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_database_outage_loses_only_counted_samples_and_never_blocks_producers(pool: PgPool) {
    let shutdown = CancellationToken::new();
    let mut settings = sampled(1_000, 100);
    settings.flush_interval_ms = 20;
    let (collector, writer) = SampledStatisticsCollector::start(&settings, pool.clone(), "t", shutdown.clone());

    sqlx::query("ALTER TABLE tasker.statistics_samples RENAME TO statistics_samples_away")
        .execute(&pool)
        .await
        .unwrap();
    let mut recorded = 0u64;
    let mut slowest = Duration::ZERO;
    for round in 0..40 {
        for _ in 0..100 {
            let started = Instant::now();
            collector.record_if_sampled(Event::StepLeaseExpired, Duration::ZERO);
            slowest = slowest.max(started.elapsed());
            recorded += 1;
        }
        if round == 20 {
            // Let the writer fail a few batches for good before the table returns.
            wait_until_dropped(&collector).await;
            sqlx::query("ALTER TABLE tasker.statistics_samples_away RENAME TO statistics_samples")
                .execute(&pool)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    writer.unwrap().finished().await;

    let written = u64::try_from(sample_rows(&pool).await).unwrap();
    let dropped = collector.dropped(DropReason::WriteFailed)
        + collector.dropped(DropReason::BufferFull)
        + collector.dropped(DropReason::Contended);
    assert!(collector.dropped(DropReason::WriteFailed) > 0, "the outage cost some samples");
    assert!(written > 0, "writing resumed after the outage");
    assert_eq!(written, collector.written());
    assert_eq!(written + dropped, recorded, "every sample is written or counted as dropped");
    assert!(slowest < Duration::from_secs(1), "a producer waited {slowest:?}");
}

async fn wait_until_dropped(collector: &SampledStatisticsCollector) {
    for _ in 0..400 {
        if collector.dropped(DropReason::WriteFailed) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the writer never gave up on a batch");
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn archival_moves_exactly_the_rows_older_than_the_cutoff_and_is_idempotent(pool: PgPool) {
    // Partitions for the last 45 days; samples every 6 hours over 60 days, so
    // some land in dropped-whole partitions, some in the partition the cutoff
    // splits, and the oldest in the default partition.
    sqlx::query("SELECT tasker.ensure_statistics_partitions((now() AT TIME ZONE 'UTC')::date - 45, 46)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO tasker.statistics_samples (recorded_at, event_type, priority, latency_us, sample_rate, instance_id)
         SELECT now() - make_interval(hours => h), 'task_claimed', 'normal', h, 0.1, 't'
         FROM generate_series(0, 60 * 24, 6) AS h",
    )
    .execute(&pool)
    .await
    .unwrap();
    let in_default: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.statistics_samples_default").fetch_one(&pool).await.unwrap();
    assert!(in_default > 0, "the oldest samples sit in the default partition");

    let cutoff: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now() - interval '30 days'").fetch_one(&pool).await.unwrap();
    let expected_old: Vec<i64> = sqlx::query_scalar(
        "SELECT latency_us FROM tasker.statistics_samples WHERE recorded_at < $1 ORDER BY latency_us",
    )
    .bind(cutoff)
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected_kept: Vec<i64> = sqlx::query_scalar(
        "SELECT latency_us FROM tasker.statistics_samples WHERE recorded_at >= $1 ORDER BY latency_us",
    )
    .bind(cutoff)
    .fetch_all(&pool)
    .await
    .unwrap();

    let moved: i64 =
        sqlx::query_scalar("SELECT tasker.archive_statistics($1)").bind(cutoff).fetch_one(&pool).await.unwrap();
    assert_eq!(moved as usize, expected_old.len());
    let archived: Vec<i64> = sqlx::query_scalar("SELECT latency_us FROM tasker.statistics_archive ORDER BY latency_us")
        .fetch_all(&pool)
        .await
        .unwrap();
    let kept: Vec<i64> = sqlx::query_scalar("SELECT latency_us FROM tasker.statistics_samples ORDER BY latency_us")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(archived, expected_old, "exactly the rows before the cutoff were archived");
    assert_eq!(kept, expected_kept, "and nothing else");

    let again: i64 =
        sqlx::query_scalar("SELECT tasker.archive_statistics($1)").bind(cutoff).fetch_one(&pool).await.unwrap();
    assert_eq!(again, 0, "a second run moves nothing");
    let archived_again: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.statistics_archive").fetch_one(&pool).await.unwrap();
    assert_eq!(archived_again as usize, expected_old.len());

    // The read side sees both: one row per hour with samples.
    let hours: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.statistics_by_hour(now() - interval '61 days', now() + interval '1 hour')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(hours as usize, expected_old.len() + expected_kept.len());
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn retention_deletes_only_finished_tasks_past_the_cutoff(pool: PgPool) {
    let t = single("retention");
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 6).await;
    // Finish four through the real path, then age them: two long ago, two recently.
    enqueue_pass(&pool, ORCH).await;
    let steps = claim_steps(&pool, "w", 10).await;
    let successes: Vec<_> = steps[..4]
        .iter()
        .map(|s| tasker_shared::step_result::Success { attempt: s.attempt_ref(), result: serde_json::json!(1) })
        .collect();
    // Each completion finalizes its one-step task.
    let recorded = tasker_shared::step_result::complete_steps(&pool, "w", &successes).await.unwrap();
    assert!(recorded.iter().all(|r| r.task_finalized));
    let finished: Vec<uuid::Uuid> = steps[..4].iter().map(|s| s.task_uuid).collect();
    let old_finished = &finished[..2];
    let running: Vec<uuid::Uuid> = tasks.iter().filter(|t| !finished.contains(t)).copied().collect();
    sqlx::query("UPDATE tasker.tasks SET completed_at = now() - interval '40 days' WHERE task_uuid = ANY($1)")
        .bind(old_finished)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE tasker.tasks SET created_at = now() - interval '40 days' WHERE task_uuid = ANY($1)")
        .bind(&running)
        .execute(&pool)
        .await
        .unwrap();

    // 0 keeps everything.
    let keep = MaintenanceSettings { task_retention_days: 0, ..MaintenanceSettings::default() };
    let report = maintenance::run_once(&pool, &keep, 30).await.unwrap();
    assert_eq!(report.tasks_deleted, 0);

    let settings =
        MaintenanceSettings { task_retention_days: 30, retention_batch: 1, ..MaintenanceSettings::default() };
    let report = maintenance::run_once(&pool, &settings, 30).await.unwrap();
    assert_eq!(report.tasks_deleted, 2, "in batches of one");
    let left: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT task_uuid FROM tasker.tasks").fetch_all(&pool).await.unwrap();
    assert_eq!(left.len(), 4);
    assert!(old_finished.iter().all(|t| !left.contains(t)), "old finished tasks are gone");
    assert!(running.iter().all(|t| left.contains(t)), "running tasks stay, however old");
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = ANY($1))
              + (SELECT count(*) FROM tasker.task_transitions WHERE task_uuid = ANY($1))
              + (SELECT count(*) FROM tasker.workflow_step_transitions WHERE task_uuid = ANY($1))",
    )
    .bind(old_finished)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "steps and history went with their tasks");

    let again = maintenance::run_once(&pool, &settings, 30).await.unwrap();
    assert_eq!(again.tasks_deleted, 0, "a second run deletes nothing");
    assert_invariants(&pool).await;
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn only_one_instance_runs_maintenance_at_a_time(pool: PgPool) {
    let mut holder = pool.acquire().await.unwrap();
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(x'7461736b65720001'::bigint)")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(held);
    let report = maintenance::run_once(&pool, &MaintenanceSettings::default(), 30).await.unwrap();
    assert!(report.skipped, "another instance holds the lock");
    // The holder goes away (as a crashed runner would): its session, and the
    // lock with it, ends.
    sqlx::Connection::close(holder.detach()).await.unwrap();
    let report = maintenance::run_once(&pool, &MaintenanceSettings::default(), 30).await.unwrap();
    assert!(!report.skipped);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn synchronous_mode_writes_three_rows_per_event_inline(pool: PgPool) {
    let settings = StatisticsSettings { mode: StatisticsMode::Synchronous, ..StatisticsSettings::default() };
    let (collector, writer) = SampledStatisticsCollector::start(&settings, pool.clone(), "t", CancellationToken::new());
    assert!(writer.is_none(), "nothing in the background: the caller waits");
    for _ in 0..10 {
        collector.record(Event::StepCompleted, Duration::from_millis(2)).await;
    }
    assert_eq!(sample_rows(&pool).await, 10, "every event, unsampled");
    let (events, total): (i64, i64) = sqlx::query_as(
        "SELECT events, total_latency_us FROM tasker.statistics_totals WHERE event_type = 'step_completed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((events, total), (10, 20_000));
    let hourly: i64 =
        sqlx::query_scalar("SELECT sum(events)::bigint FROM tasker.statistics_hourly").fetch_one(&pool).await.unwrap();
    assert_eq!(hourly, 10);
}
