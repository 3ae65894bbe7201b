//! The services, end to end: real orchestrator and worker processes, one
//! database per test. (Issue: services, deployment modes, task API.)

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use tasker_tests::{
    Deployment, ServiceSpec, TestDatabase, assert_each_attempt_ran_once, submit_many, templates, wait_until,
};

/// Two orchestrators and two workers, all in `mode`, run 500 diamond tasks;
/// every step's handler runs exactly once (counted by the workers' journals).
async fn diamonds_complete_with_each_step_run_once(mode: &str) {
    let db = TestDatabase::create("modes").await.unwrap();
    let spec = |s: ServiceSpec| s.with("POLL_INTERVAL_MS", "200");
    let mut deployment = Deployment::start(
        &db,
        &[
            spec(ServiceSpec::orchestrator("orch-1", mode)),
            spec(ServiceSpec::orchestrator("orch-2", mode)),
            spec(ServiceSpec::worker("worker-1", mode).with("NAMESPACE", "modes")),
            spec(ServiceSpec::worker("worker-2", mode).with("NAMESPACE", "modes")),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::diamond("modes")).await.unwrap();
    submit_many(&api, "modes", "diamond", 500).await.unwrap();

    wait_until("500 tasks final", Duration::from_secs(180), || async { db.final_tasks().await == 500 }).await;
    assert_eq!(db.task_states().await.get("complete"), Some(&500), "{}", deployment.logs());
    let attempts = assert_each_attempt_ran_once(&db, &deployment).await;
    assert_eq!(attempts, 2_000, "one attempt per step, no retries");
    assert_eq!(deployment.invocations().values().sum::<usize>(), 2_000, "2,000 handler invocations in all");
    db.assert_invariants().await;

    // Work was discovered the way the mode says. New tasks are announced to
    // workers (their first steps are enqueued by the submission) and finish
    // on the completion of their last step, so the discoveries are the
    // workers' step claims; a completion's own claim of the next step counts
    // as an event, in every mode.
    let discovered = deployment.metric_sum("worker", "tasker_steps_discovered_total", &[]).await;
    let by_poll = deployment.metric_sum("worker", "tasker_steps_discovered_total", &[("via", "poll")]).await;
    assert_eq!(discovered, 2_000.0, "every step claim is counted");
    match mode {
        "EventDrivenOnly" => assert_eq!(by_poll, 0.0),
        "PollingOnly" => assert!(by_poll > 0.0, "poll {by_poll}"),
        _ => {}
    }

    for (name, status) in deployment.stop_all().await {
        assert!(status.success(), "{name} exited with {status}");
    }
    db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_driven_only_runs_500_diamonds_each_step_once() {
    diamonds_complete_with_each_step_run_once("EventDrivenOnly").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_only_runs_500_diamonds_each_step_once() {
    diamonds_complete_with_each_step_run_once("PollingOnly").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_runs_500_diamonds_each_step_once() {
    diamonds_complete_with_each_step_run_once("Hybrid").await;
}

/// Along a chain, the worker that completes a step starts the next one in the
/// same statement (no claim transaction or notification round trip of its
/// own): the dependent's one history row, `pending -> in_progress`, is
/// written by the transaction that recorded its parent's result, and it has
/// no `enqueued` row. Tasks run one at a time, so the dependent is the only
/// runnable step when its parent completes, and two workers compete for it.
/// The completion starts it with the capacity its own attempt held, which no
/// claim loop can have taken, so every hop continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_continues_on_the_completing_worker_in_its_completion_transaction() {
    let db = TestDatabase::create("chain").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "EventDrivenOnly"),
            ServiceSpec::worker("worker-1", "EventDrivenOnly"),
            ServiceSpec::worker("worker-2", "EventDrivenOnly"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    api.publish_template(&templates::chain("chain")).await.unwrap();
    for n in 1..=10 {
        api.submit(&templates::task("chain", "chain")).await.unwrap();
        wait_until("the task is final", Duration::from_secs(30), || async { db.final_tasks().await == n }).await;
    }
    assert_eq!(db.task_states().await.get("complete"), Some(&10), "{}", deployment.logs());

    // Per dependent: how it started, whether it was ever enqueued on its
    // own, and whether the transaction that recorded its parent's result
    // started it.
    let hops: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT s.name, r.from_state,
                EXISTS (SELECT 1 FROM tasker.workflow_step_transitions e
                        WHERE e.step_uuid = s.step_uuid AND e.to_state = 'enqueued'),
                r.xmin::text = (SELECT c.xmin::text FROM tasker.workflow_step_transitions c
                                JOIN tasker.workflow_step_edges ed ON ed.from_step_uuid = c.step_uuid
                                WHERE ed.to_step_uuid = s.step_uuid AND c.to_state = 'complete')
         FROM tasker.workflow_steps s
         JOIN tasker.workflow_step_transitions r ON r.step_uuid = s.step_uuid AND r.to_state = 'in_progress'
         WHERE s.name <> 'a'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(hops.len(), 30, "b, c and d of 10 tasks, each started once");
    for (name, _, _, started_with_parent) in &hops {
        assert!(started_with_parent, "{name} was not started by its parent's completion: {hops:?}");
    }
    let continued = hops.iter().filter(|(_, from, enqueued, _)| from == "pending" && !enqueued).count();
    eprintln!("{continued} of 30 hops continued in the completion's statement");
    assert_eq!(continued, 30, "hops that were enqueued and claimed separately: {hops:?}");
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    for (name, status) in deployment.stop_all().await {
        assert!(status.success(), "{name} exited with {status}");
    }
    db.drop_database().await.unwrap();
}

/// Under load, the transaction that records a batch of results claims the
/// next work with the capacity those attempts held, although the results
/// enqueue nothing (one-step tasks): the claim loop, finding no free capacity,
/// waits, and claims get no transaction of their own. A step's `in_progress`
/// row written by the transaction that wrote another step's `complete` row was
/// claimed that way; only the first claims, and any made when a completion
/// found too little ready work, are the claim loop's. (Without prefetch, so
/// that the worker's capacity is its 4 running attempts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_completions_claim_the_next_work_in_their_transaction() {
    let db = TestDatabase::create("ride").await.unwrap();
    let mut deployment =
        Deployment::start(&db, &[ServiceSpec::orchestrator("orch-1", "EventDrivenOnly")]).await.unwrap();
    let api = deployment.api();
    api.publish_template(&templates::single("load", "one", "noop", json!({}), json!({}))).await.unwrap();
    submit_many(&api, "load", "one", 200).await.unwrap();
    // No prefetch: with it the claim loop has room beyond the running
    // attempts and takes the backlog in a few claims of its own.
    let worker = ServiceSpec::worker("worker-1", "EventDrivenOnly").with("WORKER_CONCURRENCY", "4");
    deployment.add(&worker.with("WORKER_PREFETCH", "0")).await.unwrap();
    wait_until("200 tasks are final", Duration::from_secs(60), || async { db.final_tasks().await == 200 }).await;
    assert_eq!(db.task_states().await.get("complete"), Some(&200), "{}", deployment.logs());

    let (by_completion, claims): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM tasker.workflow_step_transitions c
                                              WHERE c.to_state = 'complete' AND c.xmin::text = r.xmin::text)),
                count(*)
         FROM tasker.workflow_step_transitions r
         WHERE r.to_state = 'in_progress'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    eprintln!("{by_completion} of {claims} claims were made by a completion's transaction");
    assert_eq!(claims, 200, "each step claimed once");
    // Up to 4 at the start; the rest whenever a batch found fewer ready steps
    // than it had room for (never under this backlog but at the end).
    assert!(by_completion >= 150, "only {by_completion} of 200 claims rode on a completion");
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    for (name, status) in deployment.stop_all().await {
        assert!(status.success(), "{name} exited with {status}");
    }
    db.drop_database().await.unwrap();
}

/// One-step tasks of `handler` with `config`, submitted before a worker with
/// `worker_env` starts; returns, once all are complete, the most steps one
/// transaction claimed and the time from the first claim to the last result.
async fn run_one_step_tasks(
    name: &str,
    tasks: usize,
    handler_config: serde_json::Value,
    worker_env: &[(&'static str, &str)],
) -> (i64, f64) {
    let db = TestDatabase::create(name).await.unwrap();
    let mut deployment =
        Deployment::start(&db, &[ServiceSpec::orchestrator("orch-1", "EventDrivenOnly")]).await.unwrap();
    let api = deployment.api();
    api.publish_template(&templates::single(name, "nap", "sleep", handler_config, json!({}))).await.unwrap();
    submit_many(&api, name, "nap", tasks).await.unwrap();
    let worker = worker_env.iter().fold(ServiceSpec::worker("worker-1", "EventDrivenOnly"), |w, &(k, v)| w.with(k, v));
    deployment.add(&worker).await.unwrap();
    wait_until("every task is final", Duration::from_secs(60), || async { db.final_tasks().await == tasks as i64 })
        .await;
    assert_eq!(db.task_states().await.get("complete"), Some(&(tasks as i64)), "{}", deployment.logs());
    let measured: (i64, f64) = sqlx::query_as(
        "SELECT (SELECT max(n) FROM (SELECT count(*) AS n FROM tasker.workflow_step_transitions
                                      WHERE to_state = 'in_progress' GROUP BY xmin::text) per_transaction),
                (SELECT extract(epoch FROM max(created_at) FILTER (WHERE to_state = 'complete')
                                           - min(created_at) FILTER (WHERE to_state = 'in_progress')) * 1000
                 FROM tasker.workflow_step_transitions)::float8",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    for (name, status) in deployment.stop_all().await {
        assert!(status.success(), "{name} exited with {status}");
    }
    db.drop_database().await.unwrap();
    measured
}

/// Prefetch: a worker of concurrency 2 whose handlers take 20 ms may hold
/// about 10 claimed steps more (2 x 100 ms / 20 ms, within
/// `WORKER_PREFETCH=16`), waiting their turn, and still runs 2 at once: some
/// transaction claims more than 2 steps, and 40 handlers of 20 ms take at
/// least 40 x 20 / 2 = 400 ms from the first claim to the last result (run
/// all at once, the 12 held steps would finish in about 4 rounds of 20 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetching_worker_holds_more_steps_than_it_runs_at_once() {
    let env = [("WORKER_CONCURRENCY", "2"), ("WORKER_PREFETCH", "16"), ("WORKER_PREFETCH_WAIT_MS", "100")];
    let (most_in_one_claim, span_ms) = run_one_step_tasks("prefetch", 40, json!({"duration_ms": 20}), &env).await;
    eprintln!("most steps claimed at once {most_in_one_claim}; first claim to last result {span_ms:.0} ms");
    assert!(most_in_one_claim > 2, "no claim took more than the concurrency ({most_in_one_claim})");
    // The limit: 2 + 2 x 100 ms / (at least 20 ms) = at most 12.
    assert!(most_in_one_claim <= 12, "a claim took more than the limit ({most_in_one_claim})");
    assert!(span_ms >= 400.0, "40 x 20 ms handlers, 2 at a time, finished in {span_ms:.0} ms: more ran at once");
}

/// ... but a worker whose handlers take longer than the prefetch wait (50 ms
/// against 10 ms) holds no step it cannot start: no transaction claims more
/// than its concurrency, whatever `WORKER_PREFETCH` allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_slow_handlers_does_not_prefetch() {
    let env = [("WORKER_CONCURRENCY", "2"), ("WORKER_PREFETCH", "16"), ("WORKER_PREFETCH_WAIT_MS", "10")];
    let (most_in_one_claim, _) = run_one_step_tasks("noprefetch", 20, json!({"duration_ms": 50}), &env).await;
    assert!(most_in_one_claim <= 2, "a claim took {most_in_one_claim} steps with handlers slower than the wait");
}

/// An EventDrivenOnly orchestrator and worker, with `namespace`/`flaky`
/// published: one step that fails its first `fail_times` attempts, retried
/// under `policy`.
async fn event_driven_with_flaky(
    db: &TestDatabase,
    namespace: &str,
    fail_times: u32,
    policy: serde_json::Value,
) -> Deployment {
    let deployment = Deployment::start(
        db,
        &[ServiceSpec::orchestrator("orch-1", "EventDrivenOnly"), ServiceSpec::worker("worker-1", "EventDrivenOnly")],
    )
    .await
    .unwrap();
    let template = templates::single(namespace, "flaky", "fail", json!({"fail_times": fail_times}), policy);
    deployment.api().publish_template(&template).await.unwrap();
    deployment
}

/// No polling anywhere: the retry is found by the orchestrator's timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_driven_only_retries_a_failing_step_with_backoff_and_no_polling() {
    let db = TestDatabase::create("retry").await.unwrap();
    let mut deployment = event_driven_with_flaky(&db, "retry", 2, json!({"max_attempts": 3, "backoff_ms": 400})).await;
    let api = deployment.api();
    let task = api.submit(&templates::task("retry", "flaky")).await.unwrap();

    wait_until("the task is final", Duration::from_secs(30), || async { db.final_tasks().await == 1 }).await;
    let details = api.task(task).await.unwrap();
    assert_eq!(details["state"], "complete", "{details:#}");
    let step = &details["steps"][0];
    assert_eq!(step["attempts"], 3);

    // Each retry waited at least half its backoff ceiling (equal jitter):
    // 400 ms * 2^(n-1) / 2 after the n-th failure.
    let history = step["transitions"].as_array().unwrap();
    let at = |from: &str, to: &str, attempt: i64| {
        let t = history
            .iter()
            .find(|t| t["from"] == from && t["to"] == to && t["attempt"] == attempt)
            .unwrap_or_else(|| panic!("no {from} -> {to} for attempt {attempt} in {history:#?}"));
        chrono::DateTime::parse_from_rfc3339(t["at"].as_str().unwrap()).unwrap()
    };
    for (attempt, min_ms) in [(1, 200), (2, 400)] {
        let waited = at("waiting_for_retry", "enqueued", attempt) - at("in_progress", "waiting_for_retry", attempt);
        assert!(waited.num_milliseconds() >= min_ms, "retry after attempt {attempt} came after {waited}");
    }

    let polled = deployment.metric_sum("orch", "tasker_tasks_discovered_total", &[("via", "poll")]).await;
    let timed = deployment.metric_sum("orch", "tasker_tasks_discovered_total", &[("via", "timer")]).await;
    assert_eq!(polled, 0.0, "nothing was polled");
    assert!(timed >= 2.0, "both retries were picked up by the timer, got {timed}");
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// Retries of many tasks fall due at different times (jittered backoff), and
/// an orchestrator's timer holds only the earliest: each time it fires, the
/// next due time must be armed again, or the later retries wait for a wake-up
/// that EventDrivenOnly never gets. (They waited forever before the timer
/// re-armed from the database after every timer wake-up, since that read was
/// limited to once a second.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_driven_only_runs_retries_falling_due_at_different_times() {
    let db = TestDatabase::create("retries").await.unwrap();
    // First retry after 100-200 ms, each task's own draw.
    let mut deployment =
        event_driven_with_flaky(&db, "retries", 1, json!({"max_attempts": 2, "backoff_ms": 200})).await;
    let api = deployment.api();
    submit_many(&api, "retries", "flaky", 30).await.unwrap();

    wait_until("every task is final", Duration::from_secs(20), || async { db.final_tasks().await == 30 }).await;
    let states = db.task_states().await;
    assert_eq!(states.get("complete"), Some(&30), "{states:?}");
    // Retries are found by the timer (no notification announces them): at
    // the earliest due time, and again for those falling due later.
    let timed = deployment.metric_sum("orch", "tasker_tasks_discovered_total", &[("via", "timer")]).await;
    assert!(timed >= 2.0, "retries were found by the timer more than once, got {timed}");
    let polled = deployment.metric_sum("orch", "tasker_tasks_discovered_total", &[("via", "poll")]).await;
    assert_eq!(polled, 0.0, "nothing was polled");
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// A task that is due but whose row another transaction holds cannot be
/// claimed; the orchestrator looks again, ever less often (5 ms, doubling up
/// to a second), not in a loop every few milliseconds, and claims it as soon
/// as it can after the row is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_task_held_by_another_transaction_is_retried_with_backoff() {
    let db = TestDatabase::create("held").await.unwrap();
    let mut deployment =
        Deployment::start(&db, &[ServiceSpec::orchestrator("orch-1", "EventDrivenOnly")]).await.unwrap();
    let api = deployment.api();
    api.publish_template(&templates::chain("held")).await.unwrap();
    let task = api.submit(&templates::task("held", "chain")).await.unwrap();
    let claims =
        || async { deployment.metric_sum("orch", "tasker_claim_duration_seconds_count", &[("kind", "tasks")]).await };

    // Due a second ago, held, then announced.
    sqlx::query("UPDATE tasker.tasks SET ready_at = now() - interval '1 second' WHERE task_uuid = $1")
        .bind(task)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasker.tasks WHERE task_uuid = $1 FOR UPDATE")
        .bind(task)
        .execute(&mut *holder)
        .await
        .unwrap();
    let before = claims().await;
    sqlx::query("SELECT pg_notify(tasker.task_channel(), '')").execute(&db.pool).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_held = claims().await - before;
    holder.rollback().await.unwrap();

    // 5, 10, 20, ... ms up to 1 s a wait: about ten claims in 3 s. A fixed
    // 5 ms wait would make hundreds.
    assert!((2.0..=25.0).contains(&while_held), "claims while the row was held: {while_held}");
    wait_until("the task is claimed once released", Duration::from_secs(5), || async {
        let claimed: i64 = sqlx::query_scalar("SELECT claim_seq FROM tasker.tasks WHERE task_uuid = $1")
            .bind(task)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        claimed > 0
    })
    .await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// A worker stops mid-step (SIGSTOP: alive but silent, so it cannot release
/// anything). Its lease expires, the rescuer fails the attempt, another worker
/// runs attempt 2 and the task completes. When the first worker resumes, its
/// late result is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_mid_step_is_replaced_and_its_late_result_rejected() {
    let db = TestDatabase::create("dead").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "EventDrivenOnly").with("TASKER_RESCUE_INTERVAL_MS", "200"),
            ServiceSpec::worker("worker-a", "EventDrivenOnly").with("TASKER_STEP_LEASE_MS", "1500"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    let template = templates::single(
        "dead",
        "slow",
        "sleep",
        json!({"duration_ms": 2500}),
        json!({"max_attempts": 3, "backoff_ms": 100}),
    );
    api.publish_template(&template).await.unwrap();
    let task = api.submit(&templates::task("dead", "slow")).await.unwrap();

    let running = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasker.workflow_steps WHERE state = 'in_progress' AND claimed_by = 'worker-a'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            == 1
    };
    wait_until("worker-a runs the step", Duration::from_secs(20), running).await;
    deployment.service("worker-a").signal(Signal::SIGSTOP).unwrap();
    deployment
        .add(&ServiceSpec::worker("worker-b", "EventDrivenOnly").with("TASKER_STEP_LEASE_MS", "1500"))
        .await
        .unwrap();

    wait_until("the task completes on worker-b", Duration::from_secs(30), || async { db.final_tasks().await == 1 })
        .await;
    deployment.service("worker-a").signal(Signal::SIGCONT).unwrap();
    let worker_a = deployment.service("worker-a");
    wait_until("worker-a's late result is rejected", Duration::from_secs(20), || async {
        worker_a.metrics().await.is_ok_and(|m| m.sum("tasker_step_results_rejected_total", &[]) >= 1.0)
    })
    .await;

    let details = api.task(task).await.unwrap();
    assert_eq!(details["state"], "complete");
    let history: Vec<(i64, String, String, String)> = details["steps"][0]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["attempt"].as_i64().unwrap(),
                t["from"].as_str().unwrap().to_owned(),
                t["to"].as_str().unwrap().to_owned(),
                t["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(i64, String, String, String)> = [
        (0, "pending", "enqueued", "orch-1"),
        (1, "enqueued", "in_progress", "worker-a"),
        (1, "in_progress", "waiting_for_retry", "orch-1"),
        (1, "waiting_for_retry", "enqueued", "orch-1"),
        (2, "enqueued", "in_progress", "worker-b"),
        (2, "in_progress", "complete", "worker-b"),
    ]
    .into_iter()
    .map(|(a, f, t, w)| (a, f.to_owned(), t.to_owned(), w.to_owned()))
    .collect();
    assert_eq!(history, expected, "attempt 1 was rescued, never completed");
    assert!(details["steps"][0]["last_error"].as_str().unwrap().contains("lease expired"));
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// SIGTERM mid-run: the process exits 0 within its deadline, holds nothing
/// afterwards, and the remaining processes finish the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_releasing_everything_and_the_rest_finish_the_work() {
    let db = TestDatabase::create("sigterm").await.unwrap();
    let spec = |s: ServiceSpec| s.with("POLL_INTERVAL_MS", "200").with("TASKER_SHUTDOWN_TIMEOUT_MS", "8000");
    let mut deployment = Deployment::start(
        &db,
        &[
            spec(ServiceSpec::orchestrator("orch-1", "Hybrid")),
            spec(ServiceSpec::orchestrator("orch-2", "Hybrid")),
            spec(ServiceSpec::worker("worker-1", "Hybrid").with("WORKER_CONCURRENCY", "8")),
            spec(ServiceSpec::worker("worker-2", "Hybrid").with("WORKER_CONCURRENCY", "8")),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    let template = templates::single("term", "work", "sleep", json!({"duration_ms": 150}), json!({}));
    api.publish_template(&template).await.unwrap();
    submit_many(&api, "term", "work", 200).await.unwrap();
    wait_until("some tasks done", Duration::from_secs(60), || async { db.final_tasks().await >= 40 }).await;

    for name in ["worker-1", "orch-2"] {
        let service = deployment.service(name);
        service.signal(Signal::SIGTERM).unwrap();
        let status = service.wait_exit(Duration::from_secs(15)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{name} exits 0 after SIGTERM:\n{}", service.log_tail(20));
    }
    let (claims, leases): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasker.tasks WHERE claimed_by = 'orch-2'),
                (SELECT count(*) FROM tasker.workflow_steps WHERE state = 'in_progress' AND claimed_by = 'worker-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((claims, leases), (0, 0), "the stopped processes hold no claim and no lease");

    wait_until("all 200 tasks final", Duration::from_secs(90), || async { db.final_tasks().await == 200 }).await;
    assert_eq!(db.task_states().await.get("complete"), Some(&200));
    assert_each_attempt_ran_once(&db, &deployment).await;
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

#[test]
fn an_invalid_deployment_mode_exits_2_naming_the_variable() {
    for binary in ["tasker-orchestrator", "tasker-worker"] {
        let output = std::process::Command::new(tasker_tests::process::find_binary(binary).unwrap())
            .env_clear()
            .env("DATABASE_URL", "postgres://nowhere/none")
            .env("DEPLOYMENT_MODE", "Sometimes")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{binary}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("DEPLOYMENT_MODE") && stderr.contains("Sometimes"), "{binary}: {stderr}");
    }
}
