//! `tasker bench statistics`: what statistics cost, in one run.
//!
//! The same workload (by default 5,000 diamond tasks: 20,000 steps) runs
//! three times, with statistics `off`, `synchronous` (the old inline writes)
//! and `sampled`, each in a fresh database with one EventDrivenOnly
//! orchestrator and one EventDrivenOnly worker. Tasks are created before the
//! services start, so only processing is measured.
//!
//! Reported per mode, from the services' own counters:
//! - processing time `P`: time spent in claims, orchestration passes and
//!   outcome writes (`tasker_processing_seconds`, summed over services);
//! - statistics time `S`: the part of it spent recording statistics
//!   (`tasker_statistics_recording_seconds`);
//! - the share `S / P` (target in sampled mode: < 1%), and the reduction of
//!   statistics time from synchronous to sampled (target >= 50%);
//! - wall time of the drain (first step started to last task final), and the
//!   wall-clock statistics overhead against `off`, for comparison.
//!
//! Then a micro-benchmark of `record_if_sampled`: ns per call on the sampled
//! and the unsampled path.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Serialize;
use tasker_shared::config::StatisticsSettings;
use tasker_shared::event_system::{Event, SampledStatisticsCollector, StatisticsMode};
use tasker_shared::tasks::{self, NewTask};
use tasker_shared::template::{self, TaskTemplate};
use tokio_util::sync::CancellationToken;

use super::{BenchDatabase, start_service, wait_for_final};
use crate::process::Binary;

/// Options of `tasker bench statistics`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Diamond tasks per mode (four steps each).
    pub tasks: usize,
    /// The PostgreSQL server to use.
    pub admin_url: String,
}

/// One mode's results.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// The statistics mode.
    pub mode: &'static str,
    /// Steps processed.
    pub steps: i64,
    /// Drain wall time, seconds.
    pub wall_seconds: f64,
    /// Steps per second over the drain.
    pub steps_per_second: f64,
    /// Processing time summed over services, seconds.
    pub processing_seconds: f64,
    /// Statistics time summed over services, seconds.
    pub statistics_seconds: f64,
    /// Statistics share of processing time.
    pub statistics_share: f64,
    /// Sample rows in the database after the services stopped.
    pub samples_written: f64,
    /// Samples dropped (any reason).
    pub samples_dropped: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per mode, in run order.
    pub modes: Vec<ModeResult>,
    /// `S / P` in sampled mode (target < 0.01).
    pub sampled_share: f64,
    /// `1 - S_sampled / S_synchronous` (target >= 0.5).
    pub reduction: f64,
    /// Wall-clock overhead against `off`: `(T_mode - T_off) / T_mode`, per mode.
    pub wall_overhead: Vec<(String, f64)>,
    /// ns per `record_if_sampled` call on the sampled path.
    pub record_sampled_ns: f64,
    /// ns per call on the unsampled path.
    pub record_unsampled_ns: f64,
    /// ns per call for a low-priority event at its default rate (0.01).
    pub record_low_priority_ns: f64,
}

fn diamond() -> anyhow::Result<TaskTemplate> {
    Ok(serde_json::from_value(serde_json::json!({
        "namespace": "bench", "name": "diamond", "version": "1.0.0", "steps": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "depends_on": ["a"]},
            {"name": "c", "handler": "noop", "depends_on": ["a"]},
            {"name": "d", "handler": "noop", "depends_on": ["b", "c"]}]
    }))?)
}

/// Runs the benchmark and prints its table.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let logs = tempfile::Builder::new().prefix("tasker-bench-logs.").tempdir()?;
    let mut modes = Vec::new();
    for mode in [StatisticsMode::Off, StatisticsMode::Synchronous, StatisticsMode::Sampled] {
        eprintln!("running {} tasks with statistics {}...", options.tasks, mode.as_str());
        modes.push(run_mode(&options, mode, logs.path()).await?);
    }
    let by = |m: &str| modes.iter().find(|r| r.mode == m).cloned();
    let (Some(off), Some(sync), Some(sampled)) = (by("off"), by("synchronous"), by("sampled")) else {
        anyhow::bail!("a mode did not run");
    };
    // Its own thread and runtime: the loop must not share a runtime with anything.
    let (record_sampled_ns, record_unsampled_ns, record_low_priority_ns) =
        std::thread::spawn(micro_benchmark).join().map_err(|_| anyhow::anyhow!("micro-benchmark panicked"))?;
    let report = Report {
        sampled_share: sampled.statistics_share,
        reduction: 1.0 - sampled.statistics_seconds / sync.statistics_seconds,
        wall_overhead: [&sync, &sampled]
            .iter()
            .map(|r| (r.mode.to_owned(), (r.wall_seconds - off.wall_seconds) / r.wall_seconds))
            .collect(),
        modes,
        record_sampled_ns,
        record_unsampled_ns,
        record_low_priority_ns,
    };
    print(&report);
    Ok(report)
}

async fn run_mode(options: &Options, mode: StatisticsMode, logs: &std::path::Path) -> anyhow::Result<ModeResult> {
    let db = BenchDatabase::create(&options.admin_url, &format!("tasker_bench_stats_{}", mode.as_str())).await?;
    let template = diamond()?;
    let mut tx = db.pool.begin().await?;
    template::publish_template(&mut tx, &template).await?;
    tx.commit().await?;
    let request = NewTask {
        namespace: template.namespace.clone(),
        name: template.name.clone(),
        version: None,
        context: serde_json::json!({}),
        priority: 0,
        idempotency_key: None,
    };
    let mut left = options.tasks;
    while left > 0 {
        let n = left.min(tasks::MAX_BATCH);
        let mut tx = db.pool.begin().await?;
        tasks::create_tasks(&mut tx, "bench", &vec![request.clone(); n], tasks::Start::Now).await?;
        tx.commit().await?;
        left -= n;
    }

    let env = vec![
        ("DEPLOYMENT_MODE", "EventDrivenOnly".to_owned()),
        ("TASKER_STATISTICS_MODE", mode.as_str().to_owned()),
        ("TASKER_DB_MAX_CONNECTIONS", "10".to_owned()),
    ];
    let suffix = mode.as_str();
    let mut orchestrator =
        start_service(Binary::Orchestrator, &format!("bench-orch-{suffix}"), &db.url, &env, logs).await?;
    let mut worker = start_service(Binary::Worker, &format!("bench-worker-{suffix}"), &db.url, &env, logs).await?;
    let expected = i64::try_from(options.tasks)?;
    wait_for_final(&db.pool, expected, Duration::from_secs(1800)).await?;

    let (mut processing, mut statistics, mut dropped) = (0.0, 0.0, 0.0);
    for service in [&orchestrator, &worker] {
        let m = service.metrics().await?;
        processing += m.sum("tasker_processing_seconds", &[]);
        statistics += m.sum("tasker_statistics_recording_seconds", &[]);
        dropped += m.sum("tasker_statistics_samples_dropped_total", &[]);
    }
    let row = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM tasker.workflow_steps WHERE state = 'complete') AS "steps!",
                  extract(epoch FROM (SELECT max(completed_at) FROM tasker.tasks)
                                   - (SELECT min(created_at) FROM tasker.workflow_step_transitions
                                      WHERE to_state = 'in_progress'))::float8 AS "wall!""#
    )
    .fetch_one(&db.pool)
    .await?;
    orchestrator.terminate(Duration::from_secs(30)).await?;
    worker.terminate(Duration::from_secs(30)).await?;
    // Shutdown flushed the buffers: count what reached the database.
    let stored =
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM tasker.statistics_samples"#).fetch_one(&db.pool).await?;
    db.drop_database().await?;

    Ok(ModeResult {
        mode: mode.as_str(),
        steps: row.steps,
        wall_seconds: row.wall,
        steps_per_second: row.steps as f64 / row.wall,
        processing_seconds: processing,
        statistics_seconds: statistics,
        statistics_share: if processing > 0.0 { statistics / processing } else { 0.0 },
        samples_written: stored as f64,
        samples_dropped: dropped,
    })
}

/// ns per `record_if_sampled` call: always sampled (urgent, rate 1.0, into a
/// buffer large enough), never sampled (rate 0), and a low-priority event at
/// its default rate 0.01.
fn micro_benchmark() -> (f64, f64, f64) {
    const CALLS: usize = 2_000_000;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let Ok(runtime) = runtime else { return (f64::NAN, f64::NAN, f64::NAN) };
    runtime.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool never connects");
        let measure = |settings: StatisticsSettings, event: Event| {
            let (collector, _writer) =
                SampledStatisticsCollector::start(&settings, pool.clone(), "bench", CancellationToken::new());
            let started = Instant::now();
            for _ in 0..CALLS {
                black_box(collector.record_if_sampled(black_box(event), black_box(Duration::from_micros(7))));
            }
            started.elapsed().as_nanos() as f64 / CALLS as f64
        };
        let base = StatisticsSettings { buffer_capacity: CALLS + 1, ..StatisticsSettings::default() };
        let sampled = measure(base.clone(), Event::NotifyMiss);
        let unsampled = measure(StatisticsSettings { sample_rate_low: 0.0, ..base.clone() }, Event::ClaimCycle);
        let low = measure(base, Event::ClaimCycle);
        (sampled, unsampled, low)
    })
}

fn print(report: &Report) {
    println!();
    println!("statistics cost, same workload per mode (noop diamonds, 1 orchestrator + 1 worker, EventDrivenOnly)");
    println!(
        "{:<12} {:>7} {:>9} {:>9} {:>13} {:>13} {:>9} {:>9} {:>8}",
        "mode", "steps", "wall s", "steps/s", "processing s", "statistics s", "share", "written", "dropped"
    );
    for r in &report.modes {
        println!(
            "{:<12} {:>7} {:>9.2} {:>9.0} {:>13.3} {:>13.4} {:>8.3}% {:>9.0} {:>8.0}",
            r.mode,
            r.steps,
            r.wall_seconds,
            r.steps_per_second,
            r.processing_seconds,
            r.statistics_seconds,
            r.statistics_share * 100.0,
            r.samples_written,
            r.samples_dropped
        );
    }
    println!();
    println!(
        "(a) share of processing time on statistics, sampled: {:.3}%  (target < 1%)",
        report.sampled_share * 100.0
    );
    println!(
        "(b) statistics time, synchronous -> sampled: {:.1}% reduction  (target >= 50%)",
        report.reduction * 100.0
    );
    for (mode, overhead) in &report.wall_overhead {
        println!("    wall-clock overhead against off, {mode}: {:+.1}%", overhead * 100.0);
    }
    println!(
        "record_if_sampled: {:.1} ns/call sampled, {:.1} ns/call unsampled, {:.1} ns/call low priority at 0.01",
        report.record_sampled_ns, report.record_unsampled_ns, report.record_low_priority_ns
    );
}
