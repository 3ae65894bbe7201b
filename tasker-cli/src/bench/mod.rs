//! `tasker bench`: benchmarks that print numbers (never pass/fail tests).
//!
//! Each starts real service processes against a PostgreSQL (a throwaway one,
//! or `DATABASE_URL`), runs a workload in a fresh database, and reads the
//! results from the database and the services' `/metrics`.

pub mod polling;
pub mod statistics;
pub mod throughput;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::process::{Binary, ServiceProcess};

/// A fresh, migrated database for one benchmark run, dropped afterwards.
#[derive(Debug)]
pub struct BenchDatabase {
    /// Its URL, for the services.
    pub url: String,
    /// A pool for the benchmark's own queries.
    pub pool: PgPool,
    name: String,
    admin_url: String,
}

impl BenchDatabase {
    /// Creates `name` on the server of `admin_url` (dropping a leftover first).
    pub async fn create(admin_url: &str, name: &str) -> anyhow::Result<Self> {
        let mut admin = PgConnection::connect(admin_url).await.context("connecting to PostgreSQL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut admin)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
        let options = admin_url.parse::<PgConnectOptions>()?.database(name);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(options).await?;
        tasker_shared::db::migrate(&pool).await?;
        let base = admin_url.split('?').next().unwrap_or(admin_url);
        let base = base.rsplit_once('/').map_or(base, |(prefix, _)| prefix);
        Ok(BenchDatabase {
            url: format!("{base}/{name}"),
            pool,
            name: name.to_owned(),
            admin_url: admin_url.to_owned(),
        })
    }

    /// Drops the database.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut admin)
            .await?;
        Ok(())
    }
}

/// Starts a service for a benchmark and waits until it is ready.
pub async fn start_service(
    binary: Binary,
    name: &str,
    database_url: &str,
    env: &[(&str, String)],
    logs: &Path,
) -> anyhow::Result<ServiceProcess> {
    let mut all = vec![("DATABASE_URL", database_url.to_owned()), ("TASKER_TEMPLATES_DIR", "/nonexistent".to_owned())];
    all.extend(env.iter().cloned());
    let mut service = ServiceProcess::spawn(binary, name, &all, logs).await?;
    service.wait_ready(Duration::from_secs(60)).await?;
    Ok(service)
}

/// Waits until `expected` tasks are final, printing nothing; fails after `timeout`.
pub async fn wait_for_final(pool: &PgPool, expected: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let done = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM tasker.tasks WHERE completed_at IS NOT NULL"#)
            .fetch_one(pool)
            .await?;
        if done >= expected {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {done} of {expected} tasks finished in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// The percentiles of one column of values (`values_sql` selects them), from
/// the database itself; NaN when there are none.
pub async fn percentiles(pool: &PgPool, values_sql: &str) -> anyhow::Result<Percentiles> {
    let query = format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v), percentile_cont(0.95) WITHIN GROUP (ORDER BY v),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY v), max(v)
         FROM (SELECT v::float8 FROM ({values_sql}) AS i(v)) AS x(v)"
    );
    let (p50, p95, p99, max): (Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
        sqlx::query_as(sqlx::AssertSqlSafe(query)).fetch_one(pool).await?;
    let nan = f64::NAN;
    Ok(Percentiles {
        p50: p50.unwrap_or(nan),
        p95: p95.unwrap_or(nan),
        p99: p99.unwrap_or(nan),
        max: max.unwrap_or(nan),
    })
}
