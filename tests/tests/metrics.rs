//! `/metrics` of real services after real work: valid Prometheus text (as
//! `promtool check metrics` judges it), every family documented, no unbounded
//! labels.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tasker_tests::{Deployment, ServiceSpec, TestDatabase, submit_many, templates, wait_until};

/// `promtool check metrics` on `text`; `None` if promtool is not installed and
/// the run allows skipping (scripts/test sets TASKER_SKIP_PROMTOOL when it is
/// missing; CI installs it and never skips).
fn promtool_check(text: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(_) if std::env::var_os("TASKER_SKIP_PROMTOOL").is_some() => return None,
        Err(err) => panic!("promtool is needed (apt-get install prometheus): {err}"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Some((output.status.success(), report))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_are_documented_and_carry_no_ids() {
    let db = TestDatabase::create("metrics").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "Hybrid").with("TASKER_MONITOR_INTERVAL_MS", "200"),
            ServiceSpec::worker("worker-1", "Hybrid"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::diamond("obs")).await.unwrap();
    let flaky = templates::single(
        "obs",
        "flaky",
        "fail",
        serde_json::json!({"fail_times": 1}),
        serde_json::json!({"backoff_ms": 10}),
    );
    api.publish_template(&flaky).await.unwrap();
    // Fails for good: the orchestrator finalizes these (workers finalize the rest).
    let doomed = templates::single(
        "obs",
        "doomed",
        "fail",
        serde_json::json!({"fail_times": 1}),
        serde_json::json!({"max_attempts": 1}),
    );
    api.publish_template(&doomed).await.unwrap();
    let mut tasks = submit_many(&api, "obs", "diamond", 50).await.unwrap();
    tasks.extend(submit_many(&api, "obs", "flaky", 5).await.unwrap());
    tasks.extend(submit_many(&api, "obs", "doomed", 3).await.unwrap());
    wait_until("all tasks final", Duration::from_secs(60), || async { db.final_tasks().await == 58 }).await;
    // Let the monitor's timer sample due-work depth at least once.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).unwrap();
    let uuids: Vec<String> = tasks.iter().map(ToString::to_string).collect();
    for service in &deployment.services {
        let text = reqwest::get(format!("{}/metrics", service.base_url())).await.unwrap().text().await.unwrap();
        if let Some((ok, report)) = promtool_check(&text) {
            assert!(ok, "promtool rejects {}'s metrics:\n{report}", service.name);
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let family = line.split(' ').nth(2).unwrap();
            assert!(doc.contains(&format!("`{family}`")), "{family} is not documented in docs/metrics.md");
        }
        for id in &uuids {
            assert!(!text.contains(id.as_str()), "a task id appears in {}'s metrics", service.name);
        }
    }

    let orchestrator = deployment.services[0].metrics().await.unwrap();
    for family in [
        "tasker_info",
        "tasker_tasks_discovered_total",
        "tasker_discovery_lag_seconds_bucket",
        "tasker_steps_enqueued_total",
        "tasker_notifications_sent_total",
        "tasker_listener_connected",
        "tasker_steps_retried_total",
        "tasker_tasks_finalized_total",
        "tasker_claim_duration_seconds_bucket",
        "tasker_orchestration_pass_seconds_bucket",
        "tasker_due_tasks",
        "tasker_notify_overdue_tasks",
        "tasker_notify_overdue_steps",
        "tasker_db_pool_connections",
        "tasker_statistics_samples_dropped_total",
    ] {
        assert!(orchestrator.samples.iter().any(|s| s.name == family), "orchestrator exports {family}");
    }
    assert_eq!(orchestrator.sum("tasker_tasks_finalized_total", &[("state", "error")]), 3.0);
    let worker = deployment.services[1].metrics().await.unwrap();
    assert_eq!(worker.sum("tasker_steps_started_total", &[]), 50.0 * 4.0 + 10.0 + 3.0, "every attempt counted");
    assert_eq!(worker.sum("tasker_steps_failed_total", &[("retryable", "true")]), 8.0);
    assert_eq!(worker.sum("tasker_steps_discovered_total", &[]), 50.0 * 4.0 + 10.0 + 3.0, "every claim counted");
    assert_eq!(worker.sum("tasker_tasks_finalized_total", &[("state", "complete")]), 55.0, "last completions finalize");
    assert_eq!(worker.sum("tasker_tasks_made_ready_total", &[("source", "step_result")]), 8.0, "each failure wakes");
    assert!(worker.samples.iter().any(|s| s.name == "tasker_step_duration_seconds_bucket"));
    assert!(worker.samples.iter().any(|s| {
        s.name == "tasker_discovery_lag_seconds_bucket"
            && s.labels.iter().any(|(k, v)| k == "channel_kind" && v == "steps")
    }));
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// Every NOTIFY a service says it caused (`tasker_notifications_sent_total`,
/// by channel kind) is one a listener receives, and the other way round.
/// PostgreSQL delivers one message per channel per committed transaction
/// (the payload is always empty), so the services must count transactions
/// that notified, not steps or namespaces they touched. Both of a
/// completion's ways to announce run: with free capacity the worker claims
/// dependents and announces only what it leaves; without (often, on the
/// worker with room for one attempt), the completion announces what it
/// enqueues. Failures wake tasks for the orchestrator (the task channel),
/// whose retries announce steps again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_counted_are_the_notifications_delivered() {
    let db = TestDatabase::create("notify_count").await.unwrap();
    let namespace = "counted";
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    let step_channel = format!("tasker_steps_{namespace}");
    listener.listen_all(["tasker_tasks", step_channel.as_str()]).await.unwrap();
    let received = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let counting = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok(notification) = listener.recv().await {
                *received.lock().unwrap().entry(notification.channel().to_owned()).or_default() += 1;
            }
        })
    };

    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "EventDrivenOnly"),
            ServiceSpec::worker("worker-narrow", "EventDrivenOnly").with("WORKER_CONCURRENCY", "1"),
            ServiceSpec::worker("worker-wide", "EventDrivenOnly"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::diamond(namespace)).await.unwrap();
    api.publish_template(&templates::chain(namespace)).await.unwrap();
    let flaky = templates::single(
        namespace,
        "flaky",
        "fail",
        serde_json::json!({"fail_times": 1}),
        serde_json::json!({"backoff_ms": 10}),
    );
    api.publish_template(&flaky).await.unwrap();
    let mut submitted = 0;
    for round in 0..4 {
        submitted += submit_many(&api, namespace, "diamond", 40).await.unwrap().len();
        submitted += submit_many(&api, namespace, "chain", 20).await.unwrap().len();
        submitted += submit_many(&api, namespace, "flaky", 5).await.unwrap().len();
        // Some rounds land on idle workers, some on busy ones.
        tokio::time::sleep(Duration::from_millis(100 * round)).await;
    }
    let submitted = i64::try_from(submitted).unwrap();
    wait_until("all tasks final", Duration::from_secs(60), || async { db.final_tasks().await == submitted }).await;

    // Counters and deliveries settle: read both until two reads agree.
    let mut last = None;
    let counts = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut sent = Vec::new();
        for kind in ["steps", "tasks"] {
            sent.push(deployment.metric_sum("", "tasker_notifications_sent_total", &[("channel_kind", kind)]).await);
        }
        let got = received.lock().unwrap().clone();
        let now = (sent, got.get(&step_channel).copied().unwrap_or(0), got.get("tasker_tasks").copied().unwrap_or(0));
        if last.as_ref() == Some(&now) {
            break now;
        }
        last = Some(now);
    };
    let (sent, steps_received, tasks_received) = counts;
    assert!(steps_received > 0 && tasks_received > 0, "both channels carried work: {steps_received}, {tasks_received}");
    assert_eq!(sent[0], steps_received as f64, "step-channel NOTIFYs counted by the services vs received");
    assert_eq!(sent[1], tasks_received as f64, "task-channel NOTIFYs counted by the services vs received");
    counting.abort();
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}
