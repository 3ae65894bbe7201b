//! Fixtures shared by the integration tests: templates, tasks, and a minimal
//! "orchestrator" and "worker" made of the library's SQL operations.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tasker_shared::claim::{self, DiscoveredVia, Release, StepClaim, TaskClaim};
use tasker_shared::orchestration::{self, EnqueuedStep};
use tasker_shared::state_machine::{StepState, TaskState};
use tasker_shared::tasks::{self, NewTask};
use tasker_shared::template::{self, TaskTemplate};
use uuid::Uuid;

pub const ORCH: &str = "orchestrator-a";
pub const LEASE: Duration = Duration::from_secs(30);

/// Parses a template from `(step, depends_on)` pairs, all with the noop handler.
pub fn template(namespace: &str, name: &str, steps: &[(&str, &[&str])]) -> TaskTemplate {
    let steps: Vec<_> = steps
        .iter()
        .map(|(step, deps)| serde_json::json!({"name": step, "handler": "noop", "depends_on": deps}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "namespace": namespace, "name": name, "version": "1.0.0", "steps": steps
    }))
    .expect("fixture template parses")
}

pub fn diamond(namespace: &str) -> TaskTemplate {
    template(namespace, "diamond", &[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])])
}

pub fn single(namespace: &str) -> TaskTemplate {
    template(namespace, "single", &[("only", &[])])
}

pub async fn publish(pool: &PgPool, template: &TaskTemplate) {
    let mut tx = pool.begin().await.expect("begin");
    template::publish_template(&mut tx, template).await.expect("publish");
    tx.commit().await.expect("commit");
}

pub fn new_task(template: &TaskTemplate) -> NewTask {
    NewTask {
        namespace: template.namespace.clone(),
        name: template.name.clone(),
        version: None,
        context: serde_json::json!({}),
        priority: 0,
        idempotency_key: None,
    }
}

/// Submits `n` tasks of `template` in batches; returns their ids.
pub async fn submit(pool: &PgPool, template: &TaskTemplate, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    let requests: Vec<NewTask> = (0..n).map(|_| new_task(template)).collect();
    for chunk in requests.chunks(tasks::MAX_BATCH) {
        let mut tx = pool.begin().await.expect("begin");
        let created = tasks::create_tasks(&mut tx, "test", chunk, tasks::Start::ByOrchestrator).await.expect("create");
        tx.commit().await.expect("commit");
        ids.extend(created.into_iter().map(|c| c.task_uuid));
    }
    ids
}

pub async fn claim_all(pool: &PgPool, orchestrator: &str) -> Vec<TaskClaim> {
    claim::claim_ready_tasks(pool, orchestrator, 1000, LEASE, DiscoveredVia::Poll).await.expect("claim")
}

/// Claims due tasks, enqueues their runnable steps and releases them: the part
/// of an orchestration pass that makes steps runnable.
pub async fn enqueue_pass(pool: &PgPool, orchestrator: &str) -> Vec<EnqueuedStep> {
    let claims = claim_all(pool, orchestrator).await;
    let mut tx = pool.begin().await.expect("begin");
    orchestration::lock_claimed_tasks(&mut tx, orchestrator, &claims).await.expect("lock");
    let enqueued = orchestration::enqueue_ready_steps(&mut *tx, orchestrator, &claims).await.expect("enqueue");
    // Tasks whose first steps were just enqueued start (the orchestrator's rule).
    let started: Vec<orchestration::TaskTransition> = claims
        .iter()
        .filter(|c| c.state == TaskState::Pending && enqueued.iter().any(|e| e.task_uuid == c.task_uuid))
        .map(|c| orchestration::TaskTransition {
            task_uuid: c.task_uuid,
            claim_seq: c.claim_seq,
            from: TaskState::Pending,
            to: TaskState::StepsInProcess,
            reason: "steps enqueued".into(),
        })
        .collect();
    orchestration::transition_tasks(&mut *tx, orchestrator, &started).await.expect("start");
    let releases: Vec<Release> = claims.iter().map(|c| Release::of(c, None)).collect();
    claim::release_task_claims(&mut *tx, orchestrator, &releases).await.expect("release");
    tx.commit().await.expect("commit");
    enqueued
}

pub async fn claim_steps(pool: &PgPool, worker: &str, limit: i32) -> Vec<StepClaim> {
    claim::claim_steps(pool, worker, None, limit, LEASE, DiscoveredVia::Event).await.expect("claim steps")
}

pub async fn step_state(conn: impl sqlx::PgExecutor<'_>, task: Uuid, name: &str) -> StepState {
    sqlx::query_scalar!(
        r#"SELECT state AS "state: StepState" FROM tasker.workflow_steps WHERE task_uuid = $1 AND name = $2"#,
        task,
        name
    )
    .fetch_one(conn)
    .await
    .expect("step exists")
}

pub async fn task_state(conn: impl sqlx::PgExecutor<'_>, task: Uuid) -> TaskState {
    sqlx::query_scalar!(r#"SELECT state AS "state: TaskState" FROM tasker.tasks WHERE task_uuid = $1"#, task)
        .fetch_one(conn)
        .await
        .expect("task exists")
}

/// Makes time pass for leases: moves every step lease and task claim of `task`
/// into the past, as if their holders had stopped heartbeating long ago.
pub async fn expire_leases(conn: &mut PgConnection, task: Uuid) {
    sqlx::query!(
        "UPDATE tasker.workflow_steps SET lease_expires_at = now() - interval '1 second'
         WHERE task_uuid = $1 AND state = 'in_progress'",
        task
    )
    .execute(&mut *conn)
    .await
    .expect("expire step leases");
    sqlx::query!(
        "UPDATE tasker.tasks
         SET ready_at = CASE WHEN ready_at = claim_expires_at THEN now() - interval '1 second' ELSE ready_at END,
             claim_expires_at = now() - interval '1 second'
         WHERE task_uuid = $1 AND claimed_by IS NOT NULL",
        task
    )
    .execute(&mut *conn)
    .await
    .expect("expire task claim");
}

pub async fn assert_invariants(pool: &PgPool) {
    let violations = tasker_shared::invariants::violations(pool).await.expect("invariants");
    assert!(violations.is_empty(), "invariants violated: {violations:#?}");
}

/// Asserts that a statement failed with SQLSTATE `code`.
pub fn assert_refused<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, code: &str, what: &str) {
    let err = result.expect_err(what);
    let sqlstate = err.as_database_error().and_then(|db| db.code());
    assert_eq!(sqlstate.as_deref(), Some(code), "{what}: {err}");
}

/// How many notifications `listener` received on `channel` before a marker
/// sent now: notifications reach a listener in commit order, so this counts
/// what the transactions committed since the last call sent there.
pub async fn notified_before_marker(pool: &PgPool, listener: &mut sqlx::postgres::PgListener, channel: &str) -> usize {
    sqlx::query("SELECT pg_notify($1, 'marker')").bind(channel).execute(pool).await.expect("marker");
    let mut sent = 0;
    loop {
        let notification =
            tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("marker arrives").expect("recv");
        if notification.payload() == "marker" {
            return sent;
        }
        sent += 1;
    }
}
