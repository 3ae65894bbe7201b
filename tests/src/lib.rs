//! The harness for cross-process tests: a fresh database per test on the
//! server `scripts/test` started, real `tasker-orchestrator` and
//! `tasker-worker` processes with their own environments, and the checks the
//! tests share (the invocation journal against the transition history, the
//! database invariants).
//!
//! Binaries come from the same target directory as the test executable;
//! `scripts/test` builds them first.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tasker_cli::client::ApiClient;
use tasker_cli::process::{Binary, ServiceProcess};
use tokio::time::Instant;
use uuid::Uuid;

pub use tasker_cli::metrics::Metrics;
pub use tasker_cli::process;

/// A database of its own for one test, on the `DATABASE_URL` server.
#[derive(Debug)]
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    /// A pool for the test's own queries.
    pub pool: PgPool,
    admin_url: String,
}

impl TestDatabase {
    /// Creates and migrates a fresh database on the `DATABASE_URL` server.
    pub async fn create(prefix: &str) -> anyhow::Result<Self> {
        let admin_url = std::env::var("DATABASE_URL").context("DATABASE_URL (scripts/test sets it)")?;
        Self::create_on(&admin_url, prefix).await
    }

    /// Creates and migrates a fresh database on the server of `admin_url`.
    pub async fn create_on(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let admin_url = admin_url.to_owned();
        let name = format!("{prefix}_{}", Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
        let options: PgConnectOptions = admin_url.parse::<PgConnectOptions>()?.database(&name);
        let pool = PgPoolOptions::new().max_connections(4).connect_with(options).await?;
        tasker_shared::db::migrate(&pool).await?;
        let url = replace_database(&admin_url, &name);
        Ok(TestDatabase { url, name, pool, admin_url })
    }

    /// A new pool for the same database (after the server restarted).
    pub async fn reconnect(old: TestDatabase) -> anyhow::Result<Self> {
        let options: PgConnectOptions = old.url.parse()?;
        let pool = PgPoolOptions::new().max_connections(4).connect_with(options).await?;
        Ok(TestDatabase { pool, ..old })
    }

    /// Drops the database (call at the end of a passing test; a failing test
    /// leaves it for inspection on the throwaway server).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut admin)
            .await?;
        Ok(())
    }

    /// Asserts `tasker.invariant_violations()` is empty.
    pub async fn assert_invariants(&self) {
        let violations = tasker_shared::invariants::violations(&self.pool).await.expect("invariants query");
        assert!(violations.is_empty(), "invariants violated: {violations:#?}");
    }

    /// Counts rows of every Tasker table, to show a request wrote nothing.
    pub async fn row_counts(&self) -> Vec<(String, i64)> {
        let mut counts = Vec::new();
        for table in [
            "namespaces",
            "task_templates",
            "tasks",
            "workflow_steps",
            "workflow_step_edges",
            "task_transitions",
            "workflow_step_transitions",
        ] {
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM tasker.{table}")))
                .fetch_one(&self.pool)
                .await
                .expect("count rows");
            counts.push((table.to_owned(), n));
        }
        counts
    }

    /// Tasks by state.
    pub async fn task_states(&self) -> HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT state, count(*) FROM tasker.tasks GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .expect("task states")
            .into_iter()
            .collect()
    }

    /// How many tasks are final.
    pub async fn final_tasks(&self) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasker.tasks WHERE completed_at IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .expect("count final tasks");
        n
    }
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(prefix, _)| prefix);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// One service to start: binary, instance name, deployment mode, extra env.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Orchestrator or worker.
    pub binary: Binary,
    /// Instance id (unique in the test).
    pub name: String,
    /// `DEPLOYMENT_MODE`.
    pub mode: String,
    /// Extra environment.
    pub env: Vec<(&'static str, String)>,
}

impl ServiceSpec {
    /// An orchestrator.
    pub fn orchestrator(name: &str, mode: &str) -> Self {
        ServiceSpec { binary: Binary::Orchestrator, name: name.to_owned(), mode: mode.to_owned(), env: Vec::new() }
    }

    /// A worker (all namespaces unless [`ServiceSpec::with`] sets `NAMESPACE`).
    pub fn worker(name: &str, mode: &str) -> Self {
        ServiceSpec { binary: Binary::Worker, name: name.to_owned(), mode: mode.to_owned(), env: Vec::new() }
    }

    /// Adds an environment variable.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.env.push((key, value.into()));
        self
    }
}

/// Running services of one test, their logs and journals.
#[derive(Debug)]
pub struct Deployment {
    /// The services, in start order.
    pub services: Vec<ServiceProcess>,
    dir: tempfile::TempDir,
    database_url: String,
}

impl Deployment {
    /// Starts `specs` against `db` and waits until each is ready. Workers
    /// write an invocation journal; tests fail fast on poll intervals they did
    /// not ask for.
    pub async fn start(db: &TestDatabase, specs: &[ServiceSpec]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tasker-test.").tempdir()?;
        let mut deployment = Deployment { services: Vec::new(), dir, database_url: db.url.clone() };
        for spec in specs {
            deployment.add(spec).await?;
        }
        Ok(deployment)
    }

    /// Starts one more service and waits until it is ready.
    pub async fn add(&mut self, spec: &ServiceSpec) -> anyhow::Result<&mut ServiceProcess> {
        let mut env = vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("DEPLOYMENT_MODE", spec.mode.clone()),
            ("TASKER_TEMPLATES_DIR", "/nonexistent".to_owned()),
            ("TASKER_DB_MAX_CONNECTIONS", "6".to_owned()),
            ("TASKER_SHUTDOWN_TIMEOUT_MS", "10000".to_owned()),
        ];
        if spec.binary == Binary::Worker {
            let journal = self.journal_dir().join(format!("{}.journal", spec.name));
            env.push(("TASKER_WORKER_JOURNAL", journal.display().to_string()));
        }
        env.extend(spec.env.iter().cloned());
        let mut service = ServiceProcess::spawn(spec.binary, &spec.name, &env, self.dir.path()).await?;
        service.wait_ready(Duration::from_secs(60)).await?;
        self.services.push(service);
        let last = self.services.len() - 1;
        Ok(&mut self.services[last])
    }

    /// The service named `name`.
    pub fn service(&mut self, name: &str) -> &mut ServiceProcess {
        self.services.iter_mut().find(|s| s.name == name).unwrap_or_else(|| panic!("no service {name}"))
    }

    /// An API client for the first orchestrator.
    pub fn api(&self) -> ApiClient {
        let orchestrator =
            self.services.iter().find(|s| s.name.starts_with("orch")).expect("an orchestrator named orch*");
        ApiClient::new(orchestrator.base_url(), None)
    }

    fn journal_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every handler invocation recorded by every worker's journal:
    /// `(step_uuid, attempt) -> times run`.
    pub fn invocations(&self) -> HashMap<(Uuid, i32), usize> {
        tasker_cli::audit::read_journals(self.journal_dir())
    }

    /// Sums a metric over services whose name starts with `prefix`.
    pub async fn metric_sum(&self, prefix: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for service in self.services.iter().filter(|s| s.name.starts_with(prefix)) {
            if let Ok(m) = service.metrics().await {
                total += m.sum(name, labels);
            }
        }
        total
    }

    /// Stops every service with SIGTERM and returns their exit statuses.
    pub async fn stop_all(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut statuses = Vec::new();
        for service in &mut self.services {
            if let Ok(status) = service.terminate(Duration::from_secs(30)).await {
                statuses.push((service.name.clone(), status));
            }
        }
        statuses
    }

    /// Every service's log, for a failure message.
    pub fn logs(&self) -> String {
        self.services.iter().map(|s| format!("===== {} =====\n{}\n", s.name, s.log_tail(40))).collect()
    }
}

/// Checks the workers' journals against the history (see
/// [`tasker_cli::audit::check_attempts`]); panics with every violation.
/// Returns the number of attempts started.
pub async fn assert_each_attempt_ran_once(db: &TestDatabase, deployment: &Deployment) -> usize {
    match tasker_cli::audit::check_attempts(&db.pool, &deployment.invocations()).await {
        Ok(audit) => audit.attempts,
        Err(problems) => panic!("attempts ran wrongly:\n{}", problems.join("\n")),
    }
}

/// Polls `condition` until it holds or `timeout` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Templates the tests use, as API bodies.
pub mod templates {
    use serde_json::{Value, json};

    /// A -> (B, C) -> D, all noop.
    pub fn diamond(namespace: &str) -> Value {
        json!({"namespace": namespace, "name": "diamond", "version": "1.0.0", "steps": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "depends_on": ["a"]},
            {"name": "c", "handler": "noop", "depends_on": ["a"]},
            {"name": "d", "handler": "noop", "depends_on": ["b", "c"]}]})
    }

    /// A -> B -> C -> D, all noop.
    pub fn chain(namespace: &str) -> Value {
        json!({"namespace": namespace, "name": "chain", "version": "1.0.0", "steps": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "depends_on": ["a"]},
            {"name": "c", "handler": "noop", "depends_on": ["b"]},
            {"name": "d", "handler": "noop", "depends_on": ["c"]}]})
    }

    /// One step running `handler` with `config`.
    pub fn single(namespace: &str, name: &str, handler: &str, config: Value, policy: Value) -> Value {
        let mut step = json!({"name": "only", "handler": handler, "config": config});
        if let (Some(step), Some(policy)) = (step.as_object_mut(), policy.as_object()) {
            step.extend(policy.clone());
        }
        json!({"namespace": namespace, "name": name, "version": "1.0.0", "steps": [step]})
    }

    /// A task request for `namespace`/`name`.
    pub fn task(namespace: &str, name: &str) -> Value {
        json!({"namespace": namespace, "name": name})
    }
}

/// Submits `n` tasks of `namespace`/`name` through the API, in batches.
pub async fn submit_many(api: &ApiClient, namespace: &str, name: &str, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch: Vec<serde_json::Value> = (0..left.min(500)).map(|_| templates::task(namespace, name)).collect();
        ids.extend(api.submit_batch(&batch).await?);
        left -= batch.len();
    }
    Ok(ids)
}
