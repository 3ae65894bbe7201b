//! `tasker bench single | diamond | fanout | latency`: throughput and latency
//! of a real deployment, judged against PostgreSQL's own ceiling measured in
//! the same run.
//!
//! | workload | tasks | shape |
//! |---|---|---|
//! | `single` | 20,000, submitted up front | one noop step |
//! | `diamond` | 5,000, up front | a -> (b, c) -> d, noop |
//! | `fanout` | 500, up front | 1 -> 50 -> 1, noop |
//! | `latency` | 20 per second for 60 s, EventDrivenOnly | a -> b -> c -> d, noop |
//!
//! Reported: tasks/s and steps/s over the drain (first claim to last
//! completion; the submission rate separately), submit-to-complete latency
//! percentiles, per-hop latency (task created to started; step enqueued to a
//! worker's claim), database transactions and statements per step
//! (`pg_stat_database` and `pg_stat_statements` deltas over the drain), and CPU
//! seconds and peak RSS per process. The ceiling is `pgbench`: a one-row UPDATE
//! per transaction, 2 clients, 15 s; every throughput is also printed as a
//! ratio to it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tasker_shared::tasks::{self, NewTask};
use tasker_shared::template::{self, TaskTemplate};

use super::{BenchDatabase, Percentiles, percentiles, start_service, wait_for_final};
use crate::client::ApiClient;
use crate::process::{Binary, ResourceUsage, ServiceProcess};

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 20,000 one-step tasks up front.
    Single,
    /// 5,000 four-step diamonds up front.
    Diamond,
    /// 500 tasks of 1 -> 50 -> 1 up front.
    Fanout,
    /// Linear four-step tasks at a steady rate, EventDrivenOnly.
    Latency,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Single => "single",
            Workload::Diamond => "diamond",
            Workload::Fanout => "fanout",
            Workload::Latency => "latency",
        }
    }

    fn template(self) -> serde_json::Value {
        let steps: Vec<serde_json::Value> = match self {
            Workload::Single => vec![json!({"name": "only", "handler": "noop"})],
            Workload::Diamond => vec![
                json!({"name": "a", "handler": "noop"}),
                json!({"name": "b", "handler": "noop", "depends_on": ["a"]}),
                json!({"name": "c", "handler": "noop", "depends_on": ["a"]}),
                json!({"name": "d", "handler": "noop", "depends_on": ["b", "c"]}),
            ],
            Workload::Fanout => {
                let mut steps = vec![json!({"name": "start", "handler": "noop"})];
                let middle: Vec<String> = (0..50).map(|i| format!("part_{i}")).collect();
                steps.extend(middle.iter().map(|m| json!({"name": m, "handler": "noop", "depends_on": ["start"]})));
                steps.push(json!({"name": "finish", "handler": "noop", "depends_on": middle}));
                steps
            }
            Workload::Latency => vec![
                json!({"name": "a", "handler": "noop"}),
                json!({"name": "b", "handler": "noop", "depends_on": ["a"]}),
                json!({"name": "c", "handler": "noop", "depends_on": ["b"]}),
                json!({"name": "d", "handler": "noop", "depends_on": ["c"]}),
            ],
        };
        json!({"namespace": "bench", "name": self.name(), "version": "1.0.0", "steps": steps})
    }

    fn tasks(self) -> usize {
        match self {
            Workload::Single => 20_000,
            Workload::Diamond => 5_000,
            Workload::Fanout => 500,
            Workload::Latency => 20 * 60,
        }
    }
}

/// Where submit-to-complete time goes, segment by segment (medians and p99s
/// over every task or step). Step history rows carry the clock time of the
/// statement that wrote them, so each segment spans one hand-off: a commit,
/// the notification it sends, and the next statement's work up to its write.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Breakdown {
    /// Task created (its transaction's start) to its first step enqueued: the
    /// rest of the submitting transaction, which starts the task (a task left
    /// for an orchestrator adds the commit, a notification, a claim and a
    /// pass).
    pub submit_to_enqueued_ms: Percentiles,
    /// Step enqueued to a worker's claim of it: the enqueuing commit, the
    /// notification, and the claim. A dependent its parent's completion
    /// started for its own worker (pending to in progress in one statement)
    /// counts as 0.
    pub enqueued_to_claimed_ms: Percentiles,
    /// Step claimed to its result recorded: the claim's commit, the handler,
    /// and the completer's statement up to its write.
    pub claimed_to_completed_ms: Percentiles,
    /// Last step's result recorded to the task final: the rest of the
    /// completing statement, which finalizes (when an orchestrator holds the
    /// task at that moment: the wake-up, its claim and its finalizing pass).
    pub completed_to_final_ms: Percentiles,
}

impl Breakdown {
    async fn measure(pool: &PgPool) -> anyhow::Result<Self> {
        Ok(Breakdown {
            submit_to_enqueued_ms: percentiles(
                pool,
                "SELECT extract(epoch FROM f.at - t.created_at) * 1000
                 FROM tasker.tasks t
                 JOIN (SELECT task_uuid, min(created_at) AS at FROM tasker.workflow_step_transitions
                       WHERE to_state = 'enqueued' GROUP BY task_uuid) f ON f.task_uuid = t.task_uuid",
            )
            .await?,
            enqueued_to_claimed_ms: percentiles(
                pool,
                "SELECT coalesce(extract(epoch FROM s.created_at - e.created_at) * 1000, 0)
                 FROM tasker.workflow_step_transitions s
                 LEFT JOIN tasker.workflow_step_transitions e
                   ON e.step_uuid = s.step_uuid AND e.to_state = 'enqueued' AND e.attempt = 0
                 WHERE s.to_state = 'in_progress' AND s.attempt = 1
                   AND (s.from_state = 'pending' OR e.step_uuid IS NOT NULL)",
            )
            .await?,
            claimed_to_completed_ms: percentiles(
                pool,
                "SELECT extract(epoch FROM c.created_at - s.created_at) * 1000
                 FROM tasker.workflow_step_transitions c
                 JOIN tasker.workflow_step_transitions s
                   ON s.step_uuid = c.step_uuid AND s.to_state = 'in_progress' AND s.attempt = c.attempt
                 WHERE c.to_state = 'complete'",
            )
            .await?,
            completed_to_final_ms: percentiles(
                pool,
                "SELECT extract(epoch FROM f.at - l.at) * 1000
                 FROM (SELECT task_uuid, max(created_at) AS at FROM tasker.task_transitions
                       WHERE to_state = 'complete' GROUP BY task_uuid) f
                 JOIN (SELECT task_uuid, max(created_at) AS at FROM tasker.workflow_step_transitions
                       WHERE to_state = 'complete' GROUP BY task_uuid) l ON l.task_uuid = f.task_uuid",
            )
            .await?,
        })
    }
}

/// Options of a throughput benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// The PostgreSQL server.
    pub admin_url: String,
    /// The workload.
    pub workload: Workload,
    /// Orchestrator processes.
    pub orchestrators: usize,
    /// Worker processes.
    pub workers: usize,
    /// Override the workload's task count (for quick runs).
    pub tasks: Option<usize>,
    /// Extra environment for every service (`KEY=VALUE`).
    pub env: Vec<(String, String)>,
    /// Leave the database in place afterwards.
    pub keep_database: bool,
}

/// One process's resources.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    /// Instance name.
    pub name: String,
    /// CPU and memory at the end of the drain.
    pub usage: Option<ResourceUsage>,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The workload.
    pub workload: Workload,
    /// Tasks run.
    pub tasks: i64,
    /// Steps run.
    pub steps: i64,
    /// pgbench one-row UPDATE, 2 clients, 15 s: transactions per second.
    pub pgbench_tps: f64,
    /// Tasks submitted per second (submission only).
    pub submit_tasks_per_sec: f64,
    /// Drain time, first claim to last completion, seconds.
    pub drain_seconds: f64,
    /// Tasks per second over the drain.
    pub tasks_per_sec: f64,
    /// Steps per second over the drain.
    pub steps_per_sec: f64,
    /// Submit to complete.
    pub latency_ms: Percentiles,
    /// Task created to started (in `steps_in_process`): the submitting
    /// transaction, or an orchestrator's first pass for a task it left.
    pub hop_task_claim_ms: Percentiles,
    /// Step enqueued to a worker's claim.
    pub hop_step_pickup_ms: Percentiles,
    /// The path of a task, segment by segment (see [`Breakdown`]).
    pub breakdown: Breakdown,
    /// Committed transactions per step over the drain (`pg_stat_database`).
    pub transactions_per_step: f64,
    /// Statements per step over the drain (`pg_stat_statements`).
    pub statements_per_step: f64,
    /// PostgreSQL's CPU time per step over the drain, milliseconds: every
    /// server process (backends and background processes) read from `/proc`.
    /// `None` when the server does not run on this machine.
    pub server_cpu_ms_per_step: Option<f64>,
    /// PostgreSQL's CPU time over the drain divided by the drain: how many
    /// cores the database kept busy.
    pub server_cores_busy: Option<f64>,
    /// Per process.
    pub processes: Vec<ProcessReport>,
}

impl Report {
    /// steps/s divided by the pgbench ceiling.
    pub fn steps_ratio(&self) -> f64 {
        self.steps_per_sec / self.pgbench_tps
    }
    /// tasks/s divided by the pgbench ceiling.
    pub fn tasks_ratio(&self) -> f64 {
        self.tasks_per_sec / self.pgbench_tps
    }
}

/// Measures the database's ceiling: `pgbench`, a one-row UPDATE per
/// transaction over 1,000 rows, 2 clients, `seconds` long.
pub async fn pgbench_ceiling(url: &str, seconds: u64) -> anyhow::Result<f64> {
    let pool = PgPool::connect(url).await?;
    sqlx::query("DROP TABLE IF EXISTS bench_ceiling").execute(&pool).await?;
    sqlx::query("CREATE TABLE bench_ceiling (id int PRIMARY KEY, n bigint NOT NULL)").execute(&pool).await?;
    sqlx::query("INSERT INTO bench_ceiling SELECT g, 0 FROM generate_series(1, 1000) g").execute(&pool).await?;
    pool.close().await;
    let script = tempfile::Builder::new().suffix(".sql").tempfile()?;
    std::fs::write(script.path(), "\\set id random(1, 1000)\nUPDATE bench_ceiling SET n = n + 1 WHERE id = :id;\n")?;
    let output = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "2", "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(script.path())
        .arg(url)
        .output()
        .await
        .context("running pgbench (Debian: postgresql-client)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    Ok(tps)
}

/// Runs one workload end to end and prints its table.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let logs = tempfile::Builder::new().prefix("tasker-bench-logs.").tempdir()?;
    let db = BenchDatabase::create(&options.admin_url, &format!("tasker_bench_{}", options.workload.name())).await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&db.pool).await?;
    eprintln!("measuring the database's ceiling with pgbench (15 s)...");
    let pgbench_tps = pgbench_ceiling(&db.url, 15).await?;

    let workload = options.workload;
    let template: TaskTemplate = serde_json::from_value(workload.template())?;
    let mut tx = db.pool.begin().await?;
    template::publish_template(&mut tx, &template).await?;
    tx.commit().await?;
    let total = options.tasks.unwrap_or(workload.tasks());

    let mode = if workload == Workload::Latency { "EventDrivenOnly" } else { "Hybrid" };
    let mut env: Vec<(&str, String)> =
        vec![("DEPLOYMENT_MODE", mode.to_owned()), ("POLL_INTERVAL_MS", "1000".to_owned())];
    env.extend(options.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let mut services: Vec<ServiceProcess> = Vec::new();
    for i in 0..options.orchestrators {
        services
            .push(start_service(Binary::Orchestrator, &format!("bench-orch-{i}"), &db.url, &env, logs.path()).await?);
    }
    // Up-front workloads: create every task before workers start, so the
    // drain measures processing, not submission.
    let submit_started = Instant::now();
    if workload != Workload::Latency {
        create_up_front(&db.pool, &template, total).await?;
    }
    let submit_elapsed = submit_started.elapsed().as_secs_f64();
    let (xacts_before, statements_before) = counters(&db.pool).await?;
    let server_cpu_before = server_cpu(&db.pool).await?;
    for i in 0..options.workers {
        services.push(start_service(Binary::Worker, &format!("bench-worker-{i}"), &db.url, &env, logs.path()).await?);
    }
    let submit_rate = if workload == Workload::Latency {
        let api = ApiClient::new(services[0].base_url(), None);
        submit_steadily(&api, total, 20).await?
    } else {
        total as f64 / submit_elapsed
    };
    wait_for_final(&db.pool, i64::try_from(total)?, Duration::from_secs(1800)).await?;
    let (xacts_after, statements_after) = counters(&db.pool).await?;
    let server_cpu_after = server_cpu(&db.pool).await?;

    let processes: Vec<ProcessReport> =
        services.iter().map(|s| ProcessReport { name: s.name.clone(), usage: s.resource_usage() }).collect();
    let row: (i64, i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasker.tasks WHERE state = 'complete'),
                (SELECT count(*) FROM tasker.workflow_steps WHERE state = 'complete'),
                extract(epoch FROM (SELECT max(completed_at) FROM tasker.tasks)
                                 - (SELECT min(created_at) FROM tasker.workflow_step_transitions WHERE to_state = 'in_progress'))::float8",
    )
    .fetch_one(&db.pool)
    .await?;
    let (tasks_done, steps, drain) = row;
    let server_cpu_seconds = server_cpu_used(server_cpu_before.as_ref(), server_cpu_after.as_ref());
    // Submission (its transaction's start) to the finalizing statement's
    // history row (clock time): `completed_at` is its transaction's start,
    // which would leave out the finalizing statement itself.
    let latency = percentiles(
        &db.pool,
        "SELECT extract(epoch FROM f.at - t.created_at) * 1000
         FROM tasker.tasks t
         JOIN (SELECT task_uuid, max(created_at) AS at FROM tasker.task_transitions
               WHERE to_state IN ('complete', 'error', 'cancelled') GROUP BY task_uuid) f ON f.task_uuid = t.task_uuid",
    )
    .await?;
    let hop_task = percentiles(
        &db.pool,
        "SELECT extract(epoch FROM (SELECT min(tt.created_at) FROM tasker.task_transitions tt
                                    WHERE tt.task_uuid = t.task_uuid AND tt.to_state = 'steps_in_process')
                                  - t.created_at) * 1000 FROM tasker.tasks t",
    )
    .await?;
    let breakdown = Breakdown::measure(&db.pool).await?;
    for service in &mut services {
        let _ = service.terminate(Duration::from_secs(30)).await;
    }
    if options.keep_database {
        eprintln!("kept the database: {}", db.url);
    } else {
        db.drop_database().await?;
    }

    let report = Report {
        workload,
        tasks: tasks_done,
        steps,
        pgbench_tps,
        submit_tasks_per_sec: submit_rate,
        drain_seconds: drain,
        tasks_per_sec: tasks_done as f64 / drain,
        steps_per_sec: steps as f64 / drain,
        latency_ms: latency,
        hop_task_claim_ms: hop_task,
        hop_step_pickup_ms: breakdown.enqueued_to_claimed_ms,
        breakdown,
        transactions_per_step: (xacts_after - xacts_before) / steps as f64,
        statements_per_step: (statements_after - statements_before) / steps as f64,
        server_cpu_ms_per_step: server_cpu_seconds.map(|s| s * 1000.0 / steps as f64),
        server_cores_busy: server_cpu_seconds.map(|s| s / drain),
        processes,
    };
    print(&report);
    Ok(report)
}

async fn create_up_front(pool: &PgPool, template: &TaskTemplate, total: usize) -> anyhow::Result<()> {
    let request = NewTask {
        namespace: template.namespace.clone(),
        name: template.name.clone(),
        version: None,
        context: json!({}),
        priority: 0,
        idempotency_key: None,
    };
    let per_batch = (tasks::MAX_BATCH * 4 / template.steps.len()).clamp(1, tasks::MAX_BATCH);
    let mut left = total;
    while left > 0 {
        let n = left.min(per_batch);
        let mut tx = pool.begin().await?;
        tasks::create_tasks(&mut tx, "bench", &vec![request.clone(); n], tasks::Start::Now).await?;
        tx.commit().await?;
        left -= n;
    }
    Ok(())
}

/// Submits `total` tasks through the API at `rate` per second; returns the rate achieved.
async fn submit_steadily(api: &ApiClient, total: usize, rate: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(1000 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..total {
        ticks.tick().await;
        api.submit(&json!({"namespace": "bench", "name": "latency"})).await?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// CPU seconds used so far by each process of the PostgreSQL server (every pid
/// in `pg_stat_activity`, which lists background processes too), or `None`
/// when they are not processes of this machine.
async fn server_cpu(pool: &PgPool) -> anyhow::Result<Option<HashMap<i32, f64>>> {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity").fetch_all(pool).await?;
    let usage: HashMap<i32, f64> = pids
        .iter()
        .filter_map(|&pid| {
            let usage = crate::process::resource_usage(u32::try_from(pid).ok()?)?;
            Some((pid, usage.cpu_seconds))
        })
        .collect();
    // Our own connection's backend is always listed; if even it cannot be
    // read, the server is elsewhere (or its pids are in another namespace).
    Ok((!usage.is_empty()).then_some(usage))
}

/// CPU the server used between two readings. A process that started in
/// between counts from zero; one that ended in between is missed (the
/// services keep their connections, so those are few and short).
fn server_cpu_used(before: Option<&HashMap<i32, f64>>, after: Option<&HashMap<i32, f64>>) -> Option<f64> {
    let (before, after) = (before?, after?);
    Some(after.iter().map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0)).sum())
}

/// Committed transactions (this database) and statements (this database).
async fn counters(pool: &PgPool) -> anyhow::Result<(f64, f64)> {
    // Statistics reach pg_stat_database when backends flush them (at most a
    // second late); force this session's and wait a moment for the others.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (xacts, statements): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT xact_commit::float8 FROM pg_stat_database WHERE datname = current_database()),
                (SELECT sum(calls)::float8 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()))",
    )
    .fetch_one(pool)
    .await?;
    Ok((xacts.unwrap_or(0.0), statements.unwrap_or(0.0)))
}

fn print(r: &Report) {
    let p = |x: &Percentiles| format!("p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}", x.p50, x.p95, x.p99, x.max);
    println!();
    println!("workload {:?}: {} tasks, {} steps", r.workload, r.tasks, r.steps);
    println!("  pgbench ceiling (one-row UPDATE, 2 clients)   {:.0} tx/s", r.pgbench_tps);
    println!("  submission                                     {:.0} tasks/s", r.submit_tasks_per_sec);
    println!("  drain                                          {:.2} s", r.drain_seconds);
    println!(
        "  tasks/s                                        {:.0}  ({:.2} x ceiling)",
        r.tasks_per_sec,
        r.tasks_ratio()
    );
    println!(
        "  steps/s                                        {:.0}  ({:.2} x ceiling)",
        r.steps_per_sec,
        r.steps_ratio()
    );
    println!("  submit-to-complete ms                          {}", p(&r.latency_ms));
    println!("  hop: task created -> started ms                {}", p(&r.hop_task_claim_ms));
    println!("  hop: step enqueued -> claimed ms               {}", p(&r.hop_step_pickup_ms));
    let b = &r.breakdown;
    println!("  path: submitted -> first step enqueued ms      {}", p(&b.submit_to_enqueued_ms));
    println!("  path: step claimed -> result recorded ms       {}", p(&b.claimed_to_completed_ms));
    println!("  path: last result -> task final ms             {}", p(&b.completed_to_final_ms));
    println!("  transactions per step                          {:.2}", r.transactions_per_step);
    println!("  statements per step                            {:.2}", r.statements_per_step);
    match (r.server_cpu_ms_per_step, r.server_cores_busy) {
        (Some(per_step), Some(cores)) => println!(
            "  PostgreSQL cpu per step                        {per_step:.3} ms  ({cores:.2} cores busy over the drain)"
        ),
        _ => println!("  PostgreSQL cpu per step                        (server not on this machine)"),
    }
    for process in &r.processes {
        match process.usage {
            Some(u) => println!(
                "  {:<22} cpu {:>6.2} s   peak rss {:>5.1} MB",
                process.name,
                u.cpu_seconds,
                u.peak_rss_bytes as f64 / 1e6
            ),
            None => println!("  {:<22} (exited)", process.name),
        }
    }
}
