//! Claim cost follows due work, not history: `claim_ready_tasks` latency with
//! 10k and with 1M finished tasks in the table, and the ratio (target <= 1.5).
//!
//! Run with `scripts/bench-claim` (starts a throwaway PostgreSQL), or with
//! `DATABASE_URL=... cargo bench -p tasker-shared --bench claim_latency`.
//! It creates and drops its own database on that server.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use sqlx::{Connection, PgConnection, PgPool};
use tasker_shared::claim::{self, DiscoveredVia, Release};
use tasker_shared::tasks::{self, NewTask};
use tasker_shared::template::{self, TaskTemplate};

const DUE_TASKS: usize = 2_000;
const CLAIM_BATCH: i32 = 20;
const ROUNDS: usize = 3_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL (scripts/bench-claim does)")?;
    let database = format!("tasker_bench_claim_{}", std::process::id());
    let mut admin = PgConnection::connect(&url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database}"))).execute(&mut admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut admin).await?;
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(options.database(&database)).await?;

    let result = run(&pool).await;
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(pool: &PgPool) -> anyhow::Result<()> {
    tasker_shared::db::migrate(pool).await?;
    let template: TaskTemplate = serde_json::from_value(serde_json::json!({
        "namespace": "bench", "name": "single", "version": "1.0.0",
        "steps": [{"name": "only", "handler": "noop"}]
    }))?;
    let mut tx = pool.begin().await?;
    template::publish_template(&mut tx, &template).await?;
    tx.commit().await?;

    println!("claim_ready_tasks latency: {DUE_TASKS} due tasks, batches of {CLAIM_BATCH}, {ROUNDS} claims per size");
    println!("{:>12} {:>10} {:>10} {:>10} {:>10}", "finished", "p50 (us)", "p95 (us)", "p99 (us)", "mean (us)");

    add_finished(pool, 10_000).await?;
    add_due(pool, &template).await?;
    let small = measure(pool, 10_000).await?;
    add_finished(pool, 990_000).await?;
    let large = measure(pool, 1_000_000).await?;

    let ratio_p50 = large.value_at_quantile(0.5) as f64 / small.value_at_quantile(0.5) as f64;
    let ratio_mean = large.mean() / small.mean();
    println!("ratio 1M / 10k: p50 {ratio_p50:.2}, mean {ratio_mean:.2} (target <= 1.5)");
    Ok(())
}

/// Inserts finished tasks (and their steps) directly, as finalization leaves
/// them. Triggers are off for this session: this is fixture loading, not the
/// code under test, and a million guarded transitions would only add time.
async fn add_finished(pool: &PgPool, n: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await?;
    sqlx::query(
        "WITH new_tasks AS (
             INSERT INTO tasker.tasks (task_uuid, template_id, namespace, state, context, created_at,
                                       updated_at, completed_at)
             SELECT gen_random_uuid(), t.template_id, 'bench', 'complete', '{}',
                    now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
             FROM generate_series(1, $1), (SELECT template_id FROM tasker.task_templates LIMIT 1) t
             RETURNING task_uuid)
         INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace, state,
                                            attempts, max_attempts, backoff_ms, timeout_ms, result)
         SELECT gen_random_uuid(), task_uuid, 'only', 'noop', 'bench', 'complete', 1, 3, 1000, 30000, 'null'
         FROM new_tasks",
    )
    .bind(n)
    .execute(&mut *conn)
    .await?;
    sqlx::query("SET session_replication_role = DEFAULT").execute(&mut *conn).await?;
    sqlx::query("VACUUM ANALYZE tasker.tasks").execute(&mut *conn).await?;
    eprintln!("  (loaded {n} finished tasks in {:.1?})", started.elapsed());
    Ok(())
}

async fn add_due(pool: &PgPool, template: &TaskTemplate) -> anyhow::Result<()> {
    let request = NewTask {
        namespace: template.namespace.clone(),
        name: template.name.clone(),
        version: None,
        context: serde_json::json!({}),
        priority: 0,
        idempotency_key: None,
    };
    for _ in 0..DUE_TASKS / tasks::MAX_BATCH {
        let mut tx = pool.begin().await?;
        tasks::create_tasks(&mut tx, "bench", &vec![request.clone(); tasks::MAX_BATCH], tasks::Start::ByOrchestrator)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Claims a batch, releases it as due again at once, and times only the claim.
async fn measure(pool: &PgPool, finished: i64) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut conn = pool.acquire().await?;
    // Warm up caches and plans.
    for round in 0..ROUNDS + 200 {
        let started = Instant::now();
        let claims =
            claim::claim_ready_tasks(&mut *conn, "bench", CLAIM_BATCH, Duration::from_secs(60), DiscoveredVia::Poll)
                .await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(claims.len() == CLAIM_BATCH as usize, "expected a full batch");
        if round >= 200 {
            histogram.record(u64::try_from(elapsed.as_micros())?)?;
        }
        let releases: Vec<Release> = claims.iter().map(|c| Release::of(c, Some(chrono::Utc::now()))).collect();
        claim::release_task_claims(&mut *conn, "bench", &releases).await?;
    }
    println!(
        "{:>12} {:>10} {:>10} {:>10} {:>10.0}",
        finished,
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.95),
        histogram.value_at_quantile(0.99),
        histogram.mean()
    );
    Ok(histogram)
}
