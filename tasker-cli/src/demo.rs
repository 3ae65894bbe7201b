//! `tasker demo`: a small mixed deployment on this machine, end to end.
//!
//! Starts (unless `DATABASE_URL` is set) a throwaway PostgreSQL, then two
//! EventDrivenOnly orchestrators, one PollingOnly orchestrator, two
//! EventDrivenOnly workers for the `fulfillment` namespace and one PollingOnly
//! catch-all worker; publishes the order-fulfillment template, submits a batch
//! of tasks with a progress bar, and prints a summary. Everything it started is
//! stopped and deleted when it ends, Ctrl-C included.

use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::client::ApiClient;
use crate::local_postgres::LocalPostgres;
use crate::process::{Binary, ServiceProcess};

/// The template the demo runs (also shipped in `templates/`).
pub const ORDER_FULFILLMENT: &str = include_str!("../../templates/fulfillment/order_fulfillment.json");

/// The demo's knobs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Tasks to submit.
    pub tasks: usize,
    /// Use this database instead of starting one.
    pub database_url: Option<String>,
    /// Give up waiting for completion after this long.
    pub timeout: Duration,
}

/// One service of the demo deployment: name, binary, mode, extra environment.
struct Spec {
    name: &'static str,
    binary: Binary,
    mode: &'static str,
    extra: &'static [(&'static str, &'static str)],
}

const DEPLOYMENT: &[Spec] = &[
    Spec { name: "orch-event-1", binary: Binary::Orchestrator, mode: "EventDrivenOnly", extra: &[] },
    Spec { name: "orch-event-2", binary: Binary::Orchestrator, mode: "EventDrivenOnly", extra: &[] },
    Spec {
        name: "orch-poll-1",
        binary: Binary::Orchestrator,
        mode: "PollingOnly",
        extra: &[("POLL_INTERVAL_MS", "1000")],
    },
    Spec {
        name: "worker-fulfillment-1",
        binary: Binary::Worker,
        mode: "EventDrivenOnly",
        extra: &[("NAMESPACE", "fulfillment")],
    },
    Spec {
        name: "worker-fulfillment-2",
        binary: Binary::Worker,
        mode: "EventDrivenOnly",
        extra: &[("NAMESPACE", "fulfillment")],
    },
    Spec { name: "worker-poll-1", binary: Binary::Worker, mode: "PollingOnly", extra: &[("POLL_INTERVAL_MS", "1000")] },
];

/// Runs the demo; everything started is cleaned up before it returns.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let mut postgres = match &options.database_url {
        Some(_) => None,
        None => {
            eprintln!("starting a throwaway PostgreSQL...");
            Some(LocalPostgres::start()?)
        }
    };
    let url = match (&options.database_url, &postgres) {
        (Some(url), _) => url.clone(),
        (None, Some(pg)) => pg.url(),
        (None, None) => unreachable!("a server was started above"),
    };
    let logs = tempfile::Builder::new().prefix("tasker-demo-logs.").tempdir()?;

    let outcome = tokio::select! {
        result = run_deployment(&url, logs.path(), &options) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Children are killed when their handles drop (inside run_deployment);
    // the server and the directories go now.
    if let Some(pg) = postgres.as_mut() {
        pg.stop();
    }
    drop(logs);
    eprintln!("cleaned up: no process or data directory of the demo is left");
    outcome
}

async fn run_deployment(url: &str, logs: &std::path::Path, options: &DemoOptions) -> anyhow::Result<()> {
    let mut services = Vec::new();
    for spec in DEPLOYMENT {
        let mut env = vec![
            ("DATABASE_URL", url.to_owned()),
            ("DEPLOYMENT_MODE", spec.mode.to_owned()),
            ("TASKER_TEMPLATES_DIR", "/nonexistent".to_owned()),
            ("TASKER_DB_MAX_CONNECTIONS", "5".to_owned()),
        ];
        env.extend(spec.extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let mut service = ServiceProcess::spawn(spec.binary, spec.name, &env, logs).await?;
        if services.is_empty() {
            // The first orchestrator applies the schema; the rest start after it.
            service.wait_ready(Duration::from_secs(60)).await?;
        }
        services.push(service);
    }
    for service in &mut services {
        service.wait_ready(Duration::from_secs(60)).await?;
    }
    eprintln!(
        "deployment ready: {}",
        DEPLOYMENT.iter().map(|s| format!("{} ({})", s.name, s.mode)).collect::<Vec<_>>().join(", ")
    );

    let api = ApiClient::new(services[0].base_url(), None);
    let template: serde_json::Value = serde_json::from_str(ORDER_FULFILLMENT)?;
    api.publish_template(&template).await?;
    let pool = PgPool::connect(url).await?;

    let started = std::time::Instant::now();
    let bar = ProgressBar::new(options.tasks as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tasks complete ({per_sec})",
    )?);
    let mut submitted = 0;
    while submitted < options.tasks {
        let n = (options.tasks - submitted).min(200);
        let batch: Vec<serde_json::Value> = (submitted..submitted + n)
            .map(|i| serde_json::json!({"namespace": "fulfillment", "name": "order_fulfillment", "context": {"order_id": i}}))
            .collect();
        api.submit_batch(&batch).await?;
        submitted += n;
    }
    let deadline = started + options.timeout;
    loop {
        let done = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM tasker.tasks WHERE completed_at IS NOT NULL"#)
            .fetch_one(&pool)
            .await?;
        bar.set_position(u64::try_from(done).unwrap_or(0));
        if done as usize >= options.tasks {
            break;
        }
        if std::time::Instant::now() > deadline {
            bar.abandon();
            anyhow::bail!("only {done} of {} tasks finished within {:?}", options.tasks, options.timeout);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();

    print_summary(&pool, &services, options.tasks).await?;
    pool.close().await;

    for service in &mut services {
        let status = service.terminate(Duration::from_secs(30)).await?;
        if !status.success() {
            eprintln!("warning: {} exited with {status}", service.name);
        }
    }
    Ok(())
}

async fn print_summary(pool: &PgPool, services: &[ServiceProcess], tasks: usize) -> anyhow::Result<()> {
    let row = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE state = 'complete') AS "complete!",
                  count(*) FILTER (WHERE state <> 'complete') AS "other!",
                  extract(epoch FROM max(completed_at) - min(created_at))::float8 AS span,
                  percentile_cont(0.50) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - created_at)) AS p50,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - created_at)) AS p95,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - created_at)) AS p99,
                  max(extract(epoch FROM completed_at - created_at))::float8 AS max
           FROM tasker.tasks"#
    )
    .fetch_one(pool)
    .await
    .context("reading the results")?;
    let (complete, other, span, p50, p95, p99, max) =
        (row.complete, row.other, row.span, row.p50, row.p95, row.p99, row.max);
    let ms = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.0} ms", s * 1000.0));

    let mut tasks_discovered = std::collections::BTreeMap::new();
    let mut steps_discovered = std::collections::BTreeMap::new();
    let mut steps = 0.0;
    for service in services {
        let m = service.metrics().await?;
        for via in ["event", "poll", "sweep", "timer"] {
            *tasks_discovered.entry(via).or_insert(0.0) += m.sum("tasker_tasks_discovered_total", &[("via", via)]);
            *steps_discovered.entry(via).or_insert(0.0) += m.sum("tasker_steps_discovered_total", &[("via", via)]);
        }
        steps += m.sum("tasker_steps_started_total", &[]);
    }
    let by_via = |counts: &std::collections::BTreeMap<&str, f64>| {
        counts.iter().map(|(via, n)| format!("{via} {n}")).collect::<Vec<_>>().join(", ")
    };

    println!();
    println!("Tasker demo: {tasks} order_fulfillment tasks (4 steps each)");
    println!("  complete            {complete} (other final states: {other})");
    println!("  steps run           {steps}");
    if let Some(span) = span {
        println!(
            "  throughput          {:.0} tasks/s ({:.0} steps/s) from first submission to last completion",
            complete as f64 / span,
            steps / span
        );
    }
    println!("  submit-to-complete  p50 {}  p95 {}  p99 {}  max {}", ms(p50), ms(p95), ms(p99), ms(max));
    println!("  steps claimed by    {}", by_via(&steps_discovered));
    println!("  tasks claimed by    {} (orchestrators: retries and failures only)", by_via(&tasks_discovered));
    println!("  metrics (while running):");
    for service in services {
        println!("    {:<22} {}/metrics", service.name, service.base_url());
    }
    Ok(())
}
