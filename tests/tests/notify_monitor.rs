//! PG_NOTIFY miss detection against ground truth: orchestrators' LISTEN
//! connections are terminated from the server during bursts of submissions;
//! the misses the orchestrators count must equal, exactly, the tasks made ready
//! while no listener was connected and then found by anything but a
//! notification, as the database records them. A control run without faults
//! must count none.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tasker_tests::{Deployment, ServiceSpec, TestDatabase, templates, wait_until};
use uuid::Uuid;

const NAMESPACE: &str = "notify";
const THRESHOLD_MS: &str = "1000";

async fn due_tasks(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.due_tasks").fetch_one(&db.pool).await.unwrap()
}

async fn misses_counted(deployment: &Deployment) -> f64 {
    deployment.metric_sum("orch", "tasker_notify_misses_total", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_missed_notification_is_counted_and_nothing_else() {
    let db = TestDatabase::create("notify").await.unwrap();
    let orchestrator = |name: &str| {
        ServiceSpec::orchestrator(name, "EventDrivenOnly")
            .with("TASKER_NOTIFY_MISS_THRESHOLD_MS", THRESHOLD_MS)
            // A lost LISTEN connection stays down for 3 s (to 4.5 s with jitter):
            // long enough that everything announced meanwhile waits past the
            // threshold before the catch-up sweep finds it.
            .with("TASKER_LISTENER_RECONNECT_MS", "3000")
            // Short claims, so no timer set for another orchestrator's claim is
            // still pending when the next round starts.
            .with("TASKER_CLAIM_TIMEOUT_MS", "1500")
    };
    let mut deployment = Deployment::start(
        &db,
        &[
            orchestrator("orch-event-1"),
            orchestrator("orch-event-2"),
            ServiceSpec::orchestrator("orch-poll", "PollingOnly")
                .with("POLL_INTERVAL_MS", "300")
                .with("TASKER_NOTIFY_MISS_THRESHOLD_MS", THRESHOLD_MS),
            ServiceSpec::worker("worker-1", "EventDrivenOnly").with("NAMESPACE", NAMESPACE),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::single(NAMESPACE, "one", "noop", serde_json::json!({}), serde_json::json!({})))
        .await
        .unwrap();

    // Control: 2,000 tasks, no faults, a poller racing the listeners on fresh
    // work. Paced, so the question is "are misses invented", not "how big a
    // backlog can two orchestrators drain in a second".
    for _ in 0..20 {
        let batch: Vec<_> = (0..100).map(|_| templates::task(NAMESPACE, "one")).collect();
        api.submit_batch(&batch).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("the control run completes", Duration::from_secs(120), || async { db.final_tasks().await == 2_000 })
        .await;
    let polled = deployment.metric_sum("orch", "tasker_tasks_discovered_total", &[("via", "poll")]).await;
    assert_eq!(misses_counted(&deployment).await, 0.0, "no false positives (the poller claimed {polled} tasks)");
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.task_discoveries WHERE claimed_at - ready_since > interval '1 second'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(late, 0, "and the database agrees: nothing waited past the threshold");

    // Faults: the poller leaves (it could otherwise find outage work before the
    // threshold, which is fine, but not the scenario under test).
    deployment.service("orch-poll").terminate(Duration::from_secs(20)).await.unwrap();
    let mut ground_truth = 0i64;
    let mut burst_tasks = BTreeSet::new();
    for round in 0..4 {
        // Quiet: nothing due, no claim held, no timer pending.
        wait_until("quiescence", Duration::from_secs(60), || async {
            db.final_tasks().await == 2_000 + 100 * round && due_tasks(&db).await == 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1_700)).await;

        let (killed_at, killed): (DateTime<Utc>, i64) = sqlx::query_as(
            "SELECT now(), count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name LIKE 'orch-event-%:listener'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(killed, 2, "both orchestrators' LISTEN connections were terminated");
        let batch: Vec<_> = (0..100).map(|_| templates::task(NAMESPACE, "one")).collect();
        burst_tasks.extend(api.submit_batch(&batch).await.unwrap());

        wait_until("the burst completes", Duration::from_secs(60), || async {
            db.final_tasks().await == 2_000 + 100 * (round + 1)
        })
        .await;
        wait_until("both listeners are back", Duration::from_secs(30), || async {
            listeners_back(&db).await.len() == 2
        })
        .await;
        // No listener was connected from the kill until the first came back.
        let first_back = *listeners_back(&db).await.iter().min().unwrap();
        assert!(first_back > killed_at);
        let missed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasker.task_discoveries WHERE ready_since >= $1 AND ready_since < $2",
        )
        .bind(killed_at)
        .bind(first_back)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ground_truth += missed;
    }

    let counted = misses_counted(&deployment).await;
    assert_eq!(counted, ground_truth as f64, "misses counted (all instances) equal the database's ground truth");
    // And the ground truth is what the scenario says: every burst task waited.
    let found: BTreeSet<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT task_uuid FROM tasker.task_discoveries WHERE discovered_via = 'sweep'")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(ground_truth, 400, "each of the 400 burst tasks was announced while nobody listened");
    assert!(burst_tasks.is_subset(&found), "every burst task was found by a sweep");
    let reconnects = deployment.metric_sum("orch-event", "tasker_listener_reconnects_total", &[]).await;
    assert_eq!(reconnects, 8.0, "each of the 4 faults was noticed by both orchestrators");
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// When each orchestrator's current LISTEN began (the new connection's LISTEN).
async fn listeners_back(db: &TestDatabase) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT query_start FROM pg_stat_activity
         WHERE application_name LIKE 'orch-event-%:listener' AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}
