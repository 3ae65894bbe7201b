//! A mixed deployment under lost notifications: event-driven orchestrators and
//! workers whose LISTEN connections are terminated again and again while
//! thousands of tasks arrive, with polling replicas as the safety net.
//! Nothing may be lost, nothing may run twice.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tasker_tests::{Deployment, ServiceSpec, TestDatabase, assert_each_attempt_ran_once, templates, wait_until};

/// Every service's `TASKER_NOTIFY_MISS_THRESHOLD_MS`, and the database check of
/// the polling orchestrator's misses.
const MISS_THRESHOLD_MS: u32 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_mode_deployment_handles_notify_failure() {
    let db = TestDatabase::create("mixed").await.unwrap();
    // Event-driven replicas stay deaf for 1.5 s after losing their connection,
    // so that polling replicas, not only catch-up sweeps, have misses to find.
    let event = |s: ServiceSpec| {
        s.with("TASKER_LISTENER_RECONNECT_MS", "1500")
            .with("TASKER_NOTIFY_MISS_THRESHOLD_MS", MISS_THRESHOLD_MS.to_string())
    };
    let poll = |s: ServiceSpec| {
        s.with("POLL_INTERVAL_MS", "500").with("TASKER_NOTIFY_MISS_THRESHOLD_MS", MISS_THRESHOLD_MS.to_string())
    };
    let mut deployment = Deployment::start(
        &db,
        &[
            event(ServiceSpec::orchestrator("orch-event-1", "EventDrivenOnly")),
            event(ServiceSpec::orchestrator("orch-event-2", "EventDrivenOnly")),
            poll(ServiceSpec::orchestrator("orch-poll", "PollingOnly")),
            event(ServiceSpec::worker("worker-alpha", "EventDrivenOnly").with("NAMESPACE", "alpha")),
            event(ServiceSpec::worker("worker-beta", "EventDrivenOnly").with("NAMESPACE", "beta")),
            poll(ServiceSpec::worker("worker-poll", "PollingOnly")),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::diamond("alpha")).await.unwrap();
    api.publish_template(&templates::single("beta", "nap", "sleep", json!({"duration_ms": 5}), json!({})))
        .await
        .unwrap();
    api.publish_template(&templates::single(
        "alpha",
        "flaky",
        "fail",
        json!({"fail_times": 1}),
        json!({"backoff_ms": 50, "max_attempts": 3}),
    ))
    .await
    .unwrap();

    // The fault: every 700 ms, terminate every event-driven replica's LISTEN
    // connection from the server side.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (pool, stop, kills) = (db.pool.clone(), Arc::clone(&stop), Arc::clone(&kills));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let killed: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE application_name LIKE '%:listener' AND application_name NOT LIKE '%poll%'",
                )
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                kills.fetch_add(u64::try_from(killed).unwrap_or(0), Ordering::Relaxed);
            }
        })
    };

    const ROUNDS: usize = 34;
    for _ in 0..ROUNDS {
        let mut batch = Vec::with_capacity(150);
        for template in [("alpha", "diamond"), ("beta", "nap"), ("alpha", "flaky")] {
            batch.extend((0..50).map(|_| templates::task(template.0, template.1)));
        }
        api.submit_batch(&batch).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let total = i64::try_from(ROUNDS * 150).unwrap();
    wait_until("every task is final", Duration::from_secs(240), || async { db.final_tasks().await == total }).await;
    stop.store(true, Ordering::Relaxed);
    killer.await.unwrap();

    let kills = kills.load(Ordering::Relaxed);
    assert!(kills >= 12, "the listeners were terminated repeatedly ({kills} terminations)");
    assert_eq!(db.task_states().await.get("complete"), Some(&total), "every one of {total} tasks completed");

    // The polling replicas picked up what the listeners missed. How many of
    // the polling orchestrator's claims are misses depends on timing: while
    // retries fall due every few milliseconds its timer claims every due
    // task, woken ones included, often well within the threshold, which by
    // definition is no miss (some runs count none). So its count must equal
    // the database's: its claims, not taken over, that waited past the
    // threshold.
    let poll_claims = deployment.metric_sum("orch-poll", "tasker_tasks_discovered_total", &[("via", "poll")]).await;
    let poll_misses = deployment.metric_sum("orch-poll", "tasker_notify_misses_total", &[]).await;
    let catch_all_steps = deployment.metric_sum("worker-poll", "tasker_steps_started_total", &[]).await;
    assert!(poll_claims > 0.0, "the polling orchestrator claimed tasks by polling");
    let late_claims: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.task_discoveries
         WHERE claimed_by = 'orch-poll' AND NOT took_over AND claimed_at - ready_since > $1 * interval '1 millisecond'",
    )
    .bind(f64::from(MISS_THRESHOLD_MS))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(poll_misses, late_claims as f64, "the polling orchestrator's misses are its claims that waited");
    assert!(catch_all_steps > 0.0, "the catch-all polling worker ran steps the listeners missed");
    let step_misses = deployment.metric_sum("worker", "tasker_notify_misses_total", &[("channel_kind", "steps")]).await;
    assert!(step_misses > 0.0, "the workers counted the step notifications they missed");
    let reconnects = deployment.metric_sum("", "tasker_listener_reconnects_total", &[]).await;
    eprintln!(
        "{total} tasks; {kills} listener terminations, {reconnects} reconnects; polling orchestrator: \
         {poll_claims} poll claims, {poll_misses} misses; catch-all worker: {catch_all_steps} steps; \
         step misses (all workers): {step_misses}"
    );
    assert!(reconnects >= 12.0, "the faults were noticed ({reconnects} reconnects)");

    // Nothing ran twice: each attempt ran at most once, each recorded outcome
    // exactly once, no step completed twice; and the history is consistent.
    let attempts = assert_each_attempt_ran_once(&db, &deployment).await;
    let steps: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.workflow_steps").fetch_one(&db.pool).await.unwrap();
    assert!(attempts as i64 >= steps, "{attempts} attempts for {steps} steps");
    db.assert_invariants().await;
    for (name, status) in deployment.stop_all().await {
        assert!(status.success(), "{name} exited with {status}");
    }
    db.drop_database().await.unwrap();
}
