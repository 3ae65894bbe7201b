//! `tasker bench polling`: what a PollingOnly deployment costs and how fast
//! it finds work, compared with EventDrivenOnly on the same workload.
//!
//! Per mode, in a fresh database: one orchestrator and one worker in that mode
//! (polling at `--interval-ms`), first idle for `--idle-secs`, then a steady
//! `--rate` one-step tasks per second for `--load-secs`. Reported:
//! - database load: statements per second (`pg_stat_statements`, this
//!   database only) while idle and under load;
//! - latency: submission to the task final (its finalizing history row), and
//!   step enqueue to a worker's claim (`enqueued` to `in_progress`): p50, p95,
//!   p99, max. A one-step task is started by its submission and finalized by
//!   its completion, so a poller's delay shows in both;
//! - CPU seconds and peak RSS of each process.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use super::{BenchDatabase, Percentiles, percentiles, start_service, wait_for_final};
use crate::client::ApiClient;
use crate::process::{Binary, ResourceUsage};

/// Options of `tasker bench polling`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The PostgreSQL server.
    pub admin_url: String,
    /// The polling interval of PollingOnly processes.
    pub poll_interval_ms: u64,
    /// Seconds of idle measurement.
    pub idle_secs: u64,
    /// Tasks submitted per second under load.
    pub rate: u64,
    /// Seconds of load.
    pub load_secs: u64,
}

/// One mode's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// The deployment mode.
    pub mode: &'static str,
    /// Tasks run.
    pub tasks: i64,
    /// Statements per second with no work.
    pub idle_statements_per_sec: f64,
    /// Statements per second under load.
    pub load_statements_per_sec: f64,
    /// Submission to the task final.
    pub submit_to_final_ms: Percentiles,
    /// Step enqueue to a worker's claim.
    pub step_pickup_ms: Percentiles,
    /// Orchestrator CPU and memory at the end.
    pub orchestrator: Option<ResourceUsage>,
    /// Worker CPU and memory at the end.
    pub worker: Option<ResourceUsage>,
    /// Orchestrator CPU seconds spent while idle.
    pub orchestrator_idle_cpu_seconds: f64,
    /// Database connections of both processes while idle, LISTEN connections included.
    pub connections: i64,
    /// LISTEN connections among them.
    pub listen_connections: i64,
}

/// Runs both modes and prints a table.
pub async fn run(options: Options) -> anyhow::Result<Vec<ModeReport>> {
    let logs = tempfile::Builder::new().prefix("tasker-bench-logs.").tempdir()?;
    let mut reports = Vec::new();
    for mode in ["PollingOnly", "EventDrivenOnly"] {
        eprintln!("measuring {mode}...");
        reports.push(run_mode(&options, mode, logs.path()).await?);
    }
    print(&options, &reports);
    Ok(reports)
}

async fn statements(pool: &PgPool) -> anyhow::Result<f64> {
    let calls: Option<f64> = sqlx::query_scalar(
        "SELECT sum(calls)::float8 FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await?;
    Ok(calls.unwrap_or(0.0))
}

/// Runs one mode end to end.
pub async fn run_mode(options: &Options, mode: &'static str, logs: &std::path::Path) -> anyhow::Result<ModeReport> {
    let db = BenchDatabase::create(&options.admin_url, &format!("tasker_bench_poll_{}", mode.to_lowercase())).await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&db.pool).await?;
    let env = vec![
        ("DEPLOYMENT_MODE", mode.to_owned()),
        ("POLL_INTERVAL_MS", options.poll_interval_ms.to_string()),
        ("TASKER_DB_MAX_CONNECTIONS", "4".to_owned()),
    ];
    let suffix = mode.to_lowercase();
    let mut orchestrator =
        start_service(Binary::Orchestrator, &format!("poll-bench-orch-{suffix}"), &db.url, &env, logs).await?;
    let mut worker = start_service(Binary::Worker, &format!("poll-bench-worker-{suffix}"), &db.url, &env, logs).await?;
    let api = ApiClient::new(orchestrator.base_url(), None);
    api.publish_template(&serde_json::json!({
        "namespace": "bench", "name": "one", "version": "1.0.0",
        "steps": [{"name": "only", "handler": "noop"}]
    }))
    .await?;
    // Let start-up work settle: migrations, first sweeps, and the first
    // maintenance round (5 s after start).
    tokio::time::sleep(Duration::from_secs(7)).await;

    let cpu_before = orchestrator.resource_usage().map_or(0.0, |u| u.cpu_seconds);
    let before = statements(&db.pool).await?;
    tokio::time::sleep(Duration::from_secs(options.idle_secs)).await;
    let idle = (statements(&db.pool).await? - before) / options.idle_secs as f64;
    let orchestrator_idle_cpu_seconds = orchestrator.resource_usage().map_or(0.0, |u| u.cpu_seconds) - cpu_before;
    let (connections, listen_connections): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE application_name LIKE '%:listener')
         FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'poll-bench-%'",
    )
    .fetch_one(&db.pool)
    .await?;

    let before = statements(&db.pool).await?;
    let started = tokio::time::Instant::now();
    let mut submitted = 0u64;
    let total = options.rate * options.load_secs;
    let mut ticks = tokio::time::interval(Duration::from_millis(1000 / options.rate.max(1)));
    while submitted < total {
        ticks.tick().await;
        api.submit(&serde_json::json!({"namespace": "bench", "name": "one"})).await?;
        submitted += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let load = (statements(&db.pool).await? - before) / elapsed;
    wait_for_final(&db.pool, i64::try_from(total)?, Duration::from_secs(300)).await?;

    let submit_to_final = percentiles(
        &db.pool,
        "SELECT extract(epoch FROM (SELECT max(tt.created_at) FROM tasker.task_transitions tt
                                    WHERE tt.task_uuid = t.task_uuid
                                      AND tt.to_state IN ('complete', 'error', 'cancelled'))
                                  - t.created_at) * 1000 FROM tasker.tasks t",
    )
    .await?;
    let step_pickup = percentiles(
        &db.pool,
        "SELECT extract(epoch FROM s.created_at - e.created_at) * 1000
         FROM tasker.workflow_step_transitions s
         JOIN tasker.workflow_step_transitions e
           ON e.step_uuid = s.step_uuid AND e.to_state = 'enqueued' AND e.attempt = 0
         WHERE s.to_state = 'in_progress' AND s.attempt = 1",
    )
    .await?;
    let report = ModeReport {
        mode,
        tasks: i64::try_from(total)?,
        idle_statements_per_sec: idle,
        load_statements_per_sec: load,
        submit_to_final_ms: submit_to_final,
        step_pickup_ms: step_pickup,
        orchestrator: orchestrator.resource_usage(),
        worker: worker.resource_usage(),
        orchestrator_idle_cpu_seconds,
        connections,
        listen_connections,
    };
    orchestrator.terminate(Duration::from_secs(30)).await?;
    worker.terminate(Duration::from_secs(30)).await?;
    db.drop_database().await?;
    Ok(report)
}

fn print(options: &Options, reports: &[ModeReport]) {
    println!();
    println!(
        "polling vs event-driven: 1 orchestrator + 1 worker, poll interval {} ms, idle {} s, then {} one-step tasks/s for {} s",
        options.poll_interval_ms, options.idle_secs, options.rate, options.load_secs
    );
    println!(
        "{:<16} {:>10} {:>10} {:>28} {:>28} {:>16} {:>16}",
        "mode",
        "idle st/s",
        "load st/s",
        "submit to final ms p50/95/99/max",
        "step pickup ms p50/95/99/max",
        "orch cpu s / MB",
        "worker cpu s / MB"
    );
    for r in reports {
        let p = |x: &Percentiles| format!("{:.0}/{:.0}/{:.0}/{:.0}", x.p50, x.p95, x.p99, x.max);
        let u = |x: &Option<ResourceUsage>| {
            x.map_or("-".to_owned(), |u| format!("{:.2} / {:.0}", u.cpu_seconds, u.peak_rss_bytes as f64 / 1e6))
        };
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>28} {:>28} {:>16} {:>16}",
            r.mode,
            r.idle_statements_per_sec,
            r.load_statements_per_sec,
            p(&r.submit_to_final_ms),
            p(&r.step_pickup_ms),
            u(&r.orchestrator),
            u(&r.worker)
        );
    }
    for r in reports {
        println!(
            "{}: orchestrator CPU while idle {:.3} s over {} s; database connections {} ({} LISTEN)",
            r.mode, r.orchestrator_idle_cpu_seconds, options.idle_secs, r.connections, r.listen_connections
        );
    }
}
