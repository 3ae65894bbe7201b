//! Crash faults: an orchestrator killed while it holds claims, a worker killed
//! mid-step, PostgreSQL restarted mid-run. Same guarantees: every task reaches
//! a final state, nothing runs twice, the history stays consistent.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use tasker_cli::local_postgres::LocalPostgres;
use tasker_tests::{
    Deployment, ServiceSpec, TestDatabase, assert_each_attempt_ran_once, submit_many, templates, wait_until,
};

async fn held_claims(db: &TestDatabase, orchestrator: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.tasks WHERE claimed_by = $1 AND claim_expires_at > now()")
        .bind(orchestrator)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_orchestrator_holding_claims_loses_nothing() {
    let db = TestDatabase::create("orchkill").await.unwrap();
    let short = |s: ServiceSpec| s.with("TASKER_CLAIM_TIMEOUT_MS", "2000").with("TASKER_CLAIM_BATCH", "16");
    let mut deployment = Deployment::start(
        &db,
        &[
            short(ServiceSpec::orchestrator("orch-victim-0", "EventDrivenOnly")),
            short(ServiceSpec::orchestrator("orch-2", "EventDrivenOnly")),
            short(ServiceSpec::orchestrator("orch-poll", "PollingOnly")).with("POLL_INTERVAL_MS", "500"),
            ServiceSpec::worker("worker-1", "Hybrid").with("POLL_INTERVAL_MS", "500"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    // Each task's step fails once: its failure wakes the task, and an
    // orchestrator claims it to schedule the retry and again to enqueue it
    // (new tasks start, and complete, without one).
    api.publish_template(&templates::single(
        "crash",
        "flaky",
        "fail",
        serde_json::json!({"fail_times": 1}),
        serde_json::json!({"backoff_ms": 50, "max_attempts": 3}),
    ))
    .await
    .unwrap();
    submit_many(&api, "crash", "flaky", 1_000).await.unwrap();

    // Freeze the victim and kill it at a moment it holds claims. Whether the
    // kill stranded work is judged after it died (a release it sent just
    // before freezing may still commit); if it did not, a new victim joins and
    // the attempt is repeated.
    let mut stranded: i64 = 0;
    for round in 0..5 {
        let name = format!("orch-victim-{round}");
        if round > 0 {
            deployment.add(&short(ServiceSpec::orchestrator(&name, "EventDrivenOnly"))).await.unwrap();
        }
        for _ in 0..500 {
            let victim = deployment.service(&name);
            victim.signal(Signal::SIGSTOP).unwrap();
            if held_claims(&db, &name).await > 0 {
                victim.signal(Signal::SIGKILL).unwrap();
                break;
            }
            victim.signal(Signal::SIGCONT).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = deployment.service(&name).wait_exit(Duration::from_secs(10)).await.unwrap();
        assert!(!status.success(), "killed, not exited");
        tokio::time::sleep(Duration::from_millis(200)).await;
        stranded = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks WHERE claimed_by = $1")
            .bind(&name)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if stranded > 0 || db.final_tasks().await == 1_000 {
            break;
        }
    }
    assert!(stranded > 0, "an orchestrator died holding claims");

    wait_until("all 1,000 tasks final", Duration::from_secs(180), || async { db.final_tasks().await == 1_000 }).await;
    assert_eq!(db.task_states().await.get("complete"), Some(&1_000));
    let taken_over = deployment.metric_sum("orch-", "tasker_claims_taken_over_total", &[]).await;
    let took_over_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.task_discoveries WHERE took_over")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eprintln!("stranded {stranded}, taken over (metrics) {taken_over}, logged takeovers {took_over_rows}");
    assert!(taken_over >= stranded as f64, "the survivors took over all {stranded} stranded claims");
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_worker_mid_step_retries_the_step_after_its_lease() {
    let db = TestDatabase::create("workerkill").await.unwrap();
    let lease = |s: ServiceSpec| s.with("TASKER_STEP_LEASE_MS", "1500");
    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "Hybrid").with("TASKER_RESCUE_INTERVAL_MS", "200"),
            lease(ServiceSpec::worker("worker-victim", "EventDrivenOnly")),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    let slow = templates::single("wk", "slow", "sleep", json!({"duration_ms": 1000}), json!({"backoff_ms": 50}));
    api.publish_template(&slow).await.unwrap();
    submit_many(&api, "wk", "slow", 20).await.unwrap();
    wait_until("the victim runs steps", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasker.workflow_steps WHERE state = 'in_progress' AND claimed_by = 'worker-victim'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            > 0
    })
    .await;
    deployment.service("worker-victim").signal(Signal::SIGKILL).unwrap();
    deployment.add(&lease(ServiceSpec::worker("worker-2", "EventDrivenOnly"))).await.unwrap();

    wait_until("all tasks final", Duration::from_secs(60), || async { db.final_tasks().await == 20 }).await;
    assert_eq!(db.task_states().await.get("complete"), Some(&20));
    let rescued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.workflow_step_transitions WHERE reason LIKE 'lease expired%worker-victim%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(rescued > 0, "the killed worker's attempts were rescued after their lease");
    let second_attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.workflow_step_transitions
         WHERE to_state = 'complete' AND attempt = 2 AND actor = 'worker-2'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(second_attempts, rescued, "each rescued step completed on its second attempt");
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// PostgreSQL goes away mid-run (a private server, so no other test notices):
/// services report not ready, reconnect with backoff, log it, and finish the
/// work once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_ride_out_a_postgres_restart() {
    let postgres = tokio::task::spawn_blocking(LocalPostgres::start).await.unwrap().unwrap();
    let db = TestDatabase::create_on(&postgres.url(), "restart").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "Hybrid").with("POLL_INTERVAL_MS", "300"),
            ServiceSpec::worker("worker-1", "Hybrid").with("POLL_INTERVAL_MS", "300"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::single("pg", "nap", "sleep", json!({"duration_ms": 20}), json!({})))
        .await
        .unwrap();
    submit_many(&api, "pg", "nap", 400).await.unwrap();
    wait_until("some tasks done", Duration::from_secs(60), || async { db.final_tasks().await >= 50 }).await;

    db.pool.close().await;
    postgres.pause().unwrap();
    for service in &deployment.services {
        let name = service.name.clone();
        wait_until(&format!("{name} reports not ready"), Duration::from_secs(20), || async {
            !service.is_ready().await
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.start_again().unwrap();
    for service in &deployment.services {
        let name = service.name.clone();
        wait_until(&format!("{name} is ready again"), Duration::from_secs(60), || async { service.is_ready().await })
            .await;
    }

    let db = TestDatabase::reconnect(db).await.unwrap();
    wait_until("all 400 tasks final", Duration::from_secs(120), || async { db.final_tasks().await == 400 }).await;
    assert_eq!(db.task_states().await.get("complete"), Some(&400));
    for service in &deployment.services {
        let log = service.log();
        assert!(log.contains("LISTEN connection lost"), "{} logged losing its LISTEN connection", service.name);
        assert!(log.contains("LISTEN connection re-established"), "{} logged reconnecting", service.name);
    }
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    for (name, status) in deployment.stop_all().await {
        assert!(status.success(), "{name} exited with {status}");
    }
    drop(db);
    tokio::task::spawn_blocking(move || drop(postgres)).await.unwrap();
}
