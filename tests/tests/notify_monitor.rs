//! PG_NOTIFY miss detection against ground truth, on both kinds of channel.
//!
//! Workers' LISTEN connections (step channels) and orchestrators' (the task
//! channel) are terminated from the server, in turn, during bursts of work
//! announced on exactly that channel: new one-step tasks, whose step the
//! submitting transaction announces to workers; and tasks whose step fails
//! for good, whose failure wakes the task for an orchestrator. The misses the
//! services count must equal, exactly, the work made ready while no listener
//! of that channel was connected and then found by anything but a
//! notification, as the database records it. A control run without faults,
//! with polling replicas racing the listeners, must count none.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tasker_tests::{Deployment, ServiceSpec, TestDatabase, templates, wait_until};
use uuid::Uuid;

const NAMESPACE: &str = "notify";
const THRESHOLD_MS: &str = "1000";
const ROUNDS: i64 = 3;
const BURST: i64 = 100;

async fn due_tasks(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.due_tasks").fetch_one(&db.pool).await.unwrap()
}

async fn misses_counted(deployment: &Deployment, prefix: &str, channel_kind: &str) -> f64 {
    deployment.metric_sum(prefix, "tasker_notify_misses_total", &[("channel_kind", channel_kind)]).await
}

/// Listeners whose application name matches `pattern`, by when their current
/// LISTEN began.
async fn listeners_back(db: &TestDatabase, pattern: &str) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT query_start FROM pg_stat_activity WHERE application_name LIKE $1 AND query LIKE 'LISTEN%'",
    )
    .bind(pattern)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Terminates the LISTEN connections matching `pattern`; returns when.
async fn kill_listeners(db: &TestDatabase, pattern: &str, expected: i64) -> DateTime<Utc> {
    let (killed_at, killed): (DateTime<Utc>, i64) = sqlx::query_as(
        "SELECT now(), count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE $1",
    )
    .bind(pattern)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(killed, expected, "the LISTEN connections of {pattern} were terminated");
    killed_at
}

/// Waits for every listener of `pattern` to be back; returns when the first
/// came back (until then, nobody heard that channel).
async fn first_back(db: &TestDatabase, pattern: &str, expected: usize, killed_at: DateTime<Utc>) -> DateTime<Utc> {
    wait_until("the listeners are back", Duration::from_secs(30), || async {
        listeners_back(db, pattern).await.len() == expected
    })
    .await;
    let first = *listeners_back(db, pattern).await.iter().min().unwrap();
    assert!(first > killed_at);
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_missed_notification_is_counted_and_nothing_else() {
    let db = TestDatabase::create("notify").await.unwrap();
    // A lost LISTEN connection stays down for 3 s (to 4.5 s with jitter): long
    // enough that everything announced meanwhile waits past the threshold
    // before the catch-up sweep finds it.
    let event = |spec: ServiceSpec| {
        spec.with("TASKER_NOTIFY_MISS_THRESHOLD_MS", THRESHOLD_MS).with("TASKER_LISTENER_RECONNECT_MS", "3000")
    };
    let poll =
        |spec: ServiceSpec| spec.with("POLL_INTERVAL_MS", "300").with("TASKER_NOTIFY_MISS_THRESHOLD_MS", THRESHOLD_MS);
    let worker = |spec: ServiceSpec| {
        // Room for a whole burst, so the sweep after a reconnect takes all of
        // it at once (work left behind a full worker is claimed as capacity
        // frees, prompted by the worker itself, not by a poll or sweep).
        spec.with("NAMESPACE", NAMESPACE).with("WORKER_CONCURRENCY", "128")
    };
    let mut deployment = Deployment::start(
        &db,
        &[
            // Short claims, so no timer set for another orchestrator's claim is
            // still pending when the next round starts.
            event(ServiceSpec::orchestrator("orch-event-1", "EventDrivenOnly")).with("TASKER_CLAIM_TIMEOUT_MS", "1500"),
            event(ServiceSpec::orchestrator("orch-event-2", "EventDrivenOnly")).with("TASKER_CLAIM_TIMEOUT_MS", "1500"),
            poll(ServiceSpec::orchestrator("orch-poll", "PollingOnly")),
            worker(event(ServiceSpec::worker("worker-event-1", "EventDrivenOnly"))),
            worker(event(ServiceSpec::worker("worker-event-2", "EventDrivenOnly"))),
            worker(poll(ServiceSpec::worker("worker-poll", "PollingOnly"))),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::single(NAMESPACE, "one", "noop", json!({}), json!({}))).await.unwrap();
    // Fails for good on its first attempt: the failure wakes the task for an
    // orchestrator, on the task channel.
    api.publish_template(&templates::single(
        NAMESPACE,
        "doomed",
        "fail",
        json!({"fail_times": 1}),
        json!({"max_attempts": 1}),
    ))
    .await
    .unwrap();
    let burst = |name: &str| (0..BURST).map(|_| templates::task(NAMESPACE, name)).collect::<Vec<_>>();

    // Control: 2,000 tasks, no faults, pollers racing the listeners on fresh
    // work on both channels. Paced, so the question is "are misses invented",
    // not "how big a backlog can the services drain in a second".
    for _ in 0..20 {
        let mut batch = burst("one");
        batch.truncate(50);
        batch.extend(burst("doomed").into_iter().take(50));
        api.submit_batch(&batch).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("the control run completes", Duration::from_secs(120), || async { db.final_tasks().await == 2_000 })
        .await;
    let polled_tasks = deployment.metric_sum("orch-poll", "tasker_tasks_discovered_total", &[("via", "poll")]).await;
    let polled_steps = deployment.metric_sum("worker-poll", "tasker_steps_discovered_total", &[("via", "poll")]).await;
    let misses = deployment.metric_sum("", "tasker_notify_misses_total", &[]).await;
    assert_eq!(misses, 0.0, "no false positives (the pollers claimed {polled_tasks} tasks, {polled_steps} steps)");
    let late: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tasker.task_discoveries WHERE claimed_at - ready_since > interval '1 second')
              + (SELECT count(*) FROM tasker.step_discoveries WHERE claimed_at - enqueued_at > interval '1 second')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(late, 0, "and the database agrees: nothing waited past the threshold");

    // Faults: the pollers leave (they could otherwise find outage work before
    // the threshold, which is fine, but not the scenario under test).
    deployment.service("orch-poll").terminate(Duration::from_secs(20)).await.unwrap();
    deployment.service("worker-poll").terminate(Duration::from_secs(20)).await.unwrap();
    let (mut step_truth, mut task_truth) = (0i64, 0i64);
    let (mut step_burst, mut task_burst) = (BTreeSet::new(), BTreeSet::new());
    let mut finished = 2_000;
    let quiet = |finished: i64| {
        let db = &db;
        async move {
            // Quiet: nothing due or waiting, no claim held, no timer pending.
            wait_until("quiescence", Duration::from_secs(60), || async {
                db.final_tasks().await == finished && due_tasks(db).await == 0
            })
            .await;
            tokio::time::sleep(Duration::from_millis(1_700)).await;
        }
    };
    for _ in 0..ROUNDS {
        // Step channels: new tasks are announced to workers, none of whom hears.
        quiet(finished).await;
        let killed_at = kill_listeners(&db, "worker-event-%:listener", 2).await;
        step_burst.extend(api.submit_batch(&burst("one")).await.unwrap());
        finished += BURST;
        wait_until("the step burst completes", Duration::from_secs(60), || async {
            db.final_tasks().await == finished
        })
        .await;
        let back = first_back(&db, "worker-event-%:listener", 2, killed_at).await;
        let missed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasker.step_discoveries WHERE enqueued_at >= $1 AND enqueued_at < $2",
        )
        .bind(killed_at)
        .bind(back)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        step_truth += missed;

        // Task channel: failures wake tasks for orchestrators, none of whom hears.
        quiet(finished).await;
        let killed_at = kill_listeners(&db, "orch-event-%:listener", 2).await;
        task_burst.extend(api.submit_batch(&burst("doomed")).await.unwrap());
        finished += BURST;
        wait_until("the task burst completes", Duration::from_secs(60), || async {
            db.final_tasks().await == finished
        })
        .await;
        let back = first_back(&db, "orch-event-%:listener", 2, killed_at).await;
        let missed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasker.task_discoveries WHERE ready_since >= $1 AND ready_since < $2",
        )
        .bind(killed_at)
        .bind(back)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        task_truth += missed;
    }

    let counted_steps = misses_counted(&deployment, "worker-event", "steps").await;
    let counted_tasks = misses_counted(&deployment, "orch-event", "tasks").await;
    assert_eq!(counted_steps, step_truth as f64, "step misses counted equal the database's ground truth");
    assert_eq!(counted_tasks, task_truth as f64, "task misses counted equal the database's ground truth");
    assert_eq!(misses_counted(&deployment, "orch-event", "steps").await, 0.0);
    assert_eq!(misses_counted(&deployment, "worker-event", "tasks").await, 0.0);
    // And the ground truth is what the scenario says: every burst waited.
    assert_eq!(step_truth, ROUNDS * BURST, "each step-burst task's step was announced while no worker listened");
    assert_eq!(task_truth, ROUNDS * BURST, "each failed burst task was woken while no orchestrator listened");
    let swept_tasks: BTreeSet<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT task_uuid FROM tasker.task_discoveries WHERE discovered_via = 'sweep'")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(task_burst.is_subset(&swept_tasks), "every failed burst task was found by a sweep");
    let swept_steps: BTreeSet<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT s.task_uuid FROM tasker.step_discoveries d
         JOIN tasker.workflow_steps s ON s.step_uuid = d.step_uuid WHERE d.discovered_via = 'sweep'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(step_burst.is_subset(&swept_steps), "every step-burst task's step was found by a sweep");
    let states = db.task_states().await;
    assert_eq!(states.get("error"), Some(&(1_000 + ROUNDS * BURST)), "{states:?}");
    let reconnects = deployment.metric_sum("", "tasker_listener_reconnects_total", &[]).await;
    assert_eq!(reconnects, (ROUNDS * 4) as f64, "each fault was noticed by both of its listeners");
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}
