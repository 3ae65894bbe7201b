//! The task API: every kind of bad input gets a 4xx JSON error that names the
//! problem and writes nothing; idempotency, cancellation and the bearer token.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tasker_tests::{Deployment, ServiceSpec, TestDatabase, templates, wait_until};

/// Sends a raw body; returns status and the JSON error message.
async fn raw(base: &str, method: Method, path: &str, body: &str, content_type: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{base}{path}")).body(body.to_owned());
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_naming_the_problem_and_writes_nothing() {
    let db = TestDatabase::create("api").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[ServiceSpec::orchestrator("orch-1", "PollingOnly").with("TASKER_MAX_BODY_BYTES", "262144")],
    )
    .await
    .unwrap();
    let api = deployment.api();
    let base = deployment.services[0].base_url();
    api.publish_template(&templates::diamond("shop")).await.unwrap();
    let before = db.row_counts().await;

    let big_context = "x".repeat(300_000);
    let json_ct = Some("application/json");
    let cycle = json!({"namespace": "shop", "name": "loop", "version": "1.0.0", "steps": [
        {"name": "a", "handler": "noop", "depends_on": ["b"]},
        {"name": "b", "handler": "noop", "depends_on": ["a"]}]});
    let dangling = json!({"namespace": "shop", "name": "dangle", "version": "1.0.0", "steps": [
        {"name": "a", "handler": "noop", "depends_on": ["ghost"]}]});
    let mut batch: Vec<Value> = (0..10).map(|_| templates::task("shop", "diamond")).collect();
    batch[5] = templates::task("shop", "nonexistent");
    let too_many: Vec<Value> = (0..1001).map(|_| templates::task("shop", "diamond")).collect();

    // (what, method, path, body, content type, expected status, message fragment)
    type Case<'a> = (&'a str, Method, &'a str, String, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("malformed JSON", Method::POST, "/v1/tasks", "{\"namespace\": ".into(), json_ct, 400, "malformed JSON"),
        ("not JSON at all", Method::POST, "/v1/tasks", "{}".into(), None, 415, "application/json"),
        ("unknown template", Method::POST, "/v1/tasks", templates::task("shop", "nope").to_string(), json_ct, 404, "template not found: shop/nope"),
        ("unknown namespace", Method::POST, "/v1/tasks", templates::task("nowhere", "diamond").to_string(), json_ct, 404, "namespace not found: nowhere"),
        ("invalid identifier", Method::POST, "/v1/tasks", templates::task("Shop;DROP", "diamond").to_string(), json_ct, 422, "not a valid identifier"),
        ("unknown field", Method::POST, "/v1/tasks", json!({"namespace": "shop", "name": "diamond", "colour": 1}).to_string(), json_ct, 422, "unknown field `colour`"),
        ("context not an object", Method::POST, "/v1/tasks", json!({"namespace": "shop", "name": "diamond", "context": [1]}).to_string(), json_ct, 422, "context must be a JSON object"),
        ("bad version", Method::POST, "/v1/tasks", json!({"namespace": "shop", "name": "diamond", "version": "latest"}).to_string(), json_ct, 422, "MAJOR.MINOR.PATCH"),
        ("oversize body", Method::POST, "/v1/tasks", json!({"namespace": "shop", "name": "diamond", "context": {"x": big_context}}).to_string(), json_ct, 413, "too large"),
        ("cyclic DAG", Method::POST, "/v1/templates", cycle.to_string(), json_ct, 422, "cycle"),
        ("dangling DAG", Method::POST, "/v1/templates", dangling.to_string(), json_ct, 422, "depends on unknown step `ghost`"),
        ("changed published version", Method::POST, "/v1/templates", json!({"namespace": "shop", "name": "diamond", "version": "1.0.0", "steps": [{"name": "a", "handler": "noop"}]}).to_string(), json_ct, 409, "already published"),
        ("batch with one bad entry", Method::POST, "/v1/tasks/batch", json!({"tasks": batch}).to_string(), json_ct, 404, "template not found: shop/nonexistent"),
        ("batch over 1,000", Method::POST, "/v1/tasks/batch", json!({"tasks": too_many}).to_string(), json_ct, 422, "1 to 1000 tasks"),
        ("empty batch", Method::POST, "/v1/tasks/batch", json!({"tasks": []}).to_string(), json_ct, 422, "1 to 1000 tasks"),
        ("bad task id", Method::GET, "/v1/tasks/not-a-uuid", String::new(), None, 400, "invalid path"),
        ("unknown task", Method::GET, "/v1/tasks/01890000-0000-7000-8000-000000000000", String::new(), None, 404, "task not found"),
        ("cancel unknown task", Method::POST, "/v1/tasks/01890000-0000-7000-8000-000000000000/cancel", String::new(), None, 404, "task not found"),
    ];
    for (what, method, path, body, content_type, status, message) in cases {
        let (got, error) = raw(&base, method, path, &body, content_type).await;
        assert_eq!(got, status, "{what}: {error}");
        let text = error["error"].as_str().unwrap_or_else(|| panic!("{what}: no JSON error in {error}"));
        assert!(text.contains(message), "{what}: `{text}` should mention `{message}`");
        assert_eq!(db.row_counts().await, before, "{what} must write nothing");
    }

    // Idempotency: the same key returns the same task, with 200 the second time.
    let request = json!({"namespace": "shop", "name": "diamond", "idempotency_key": "order-42"});
    let (first, a) = raw(&base, Method::POST, "/v1/tasks", &request.to_string(), json_ct).await;
    let (second, b) = raw(&base, Method::POST, "/v1/tasks", &request.to_string(), json_ct).await;
    assert_eq!((first, second), (201, 200));
    assert_eq!(a["task_uuid"], b["task_uuid"]);
    let (tasks,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasker.tasks").fetch_one(&db.pool).await.unwrap();
    assert_eq!(tasks, 1);

    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_guards_v1_but_not_health_or_metrics() {
    let db = TestDatabase::create("auth").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[ServiceSpec::orchestrator("orch-1", "PollingOnly").with("TASKER_API_TOKEN", "s3cret")],
    )
    .await
    .unwrap();
    let base = deployment.services[0].base_url();
    let client = reqwest::Client::new();
    let get = |auth: Option<&'static str>| {
        let mut r = client.get(format!("{base}/v1/templates"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    assert_eq!(get(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(get(Some("Bearer wrong")).await.unwrap().status().as_u16(), 401);
    assert_eq!(get(Some("Bearer s3cret")).await.unwrap().status().as_u16(), 200);
    for open in ["/health/live", "/health/ready", "/metrics"] {
        assert_eq!(client.get(format!("{base}{open}")).send().await.unwrap().status().as_u16(), 200, "{open}");
    }
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}

/// Cancelling a running task cancels its steps; the running handler's late
/// result is rejected; a final task cannot be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_rejects_the_handlers_late_result() {
    let db = TestDatabase::create("cancel").await.unwrap();
    let mut deployment = Deployment::start(
        &db,
        &[
            ServiceSpec::orchestrator("orch-1", "EventDrivenOnly"),
            // Heartbeats every 0.5 s, so the worker notices the cancel quickly.
            ServiceSpec::worker("worker-1", "EventDrivenOnly").with("TASKER_STEP_LEASE_MS", "1500"),
        ],
    )
    .await
    .unwrap();
    let api = deployment.api();
    let template = json!({"namespace": "cx", "name": "slow", "version": "1.0.0", "steps": [
        {"name": "a", "handler": "sleep", "config": {"duration_ms": 3000}},
        {"name": "b", "handler": "noop", "depends_on": ["a"]}]});
    api.publish_template(&template).await.unwrap();
    let task = api.submit(&templates::task("cx", "slow")).await.unwrap();
    wait_until("step a runs", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasker.workflow_steps WHERE state = 'in_progress'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 1
    })
    .await;

    let cancelled = api.cancel(task).await.unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["steps_cancelled"], 2, "the running step and the pending one");
    let worker = deployment.service("worker-1");
    wait_until("the handler's late result is rejected", Duration::from_secs(20), || async {
        worker.metrics().await.is_ok_and(|m| m.sum("tasker_step_results_rejected_total", &[]) >= 1.0)
    })
    .await;
    let details = api.task(task).await.unwrap();
    assert_eq!(details["state"], "cancelled");
    assert!(details["steps"].as_array().unwrap().iter().all(|s| s["state"] == "cancelled"), "{details:#}");

    let (status, _) = api.request(Method::POST, &format!("/v1/tasks/{task}/cancel"), None).await.unwrap();
    assert_eq!(status, 409, "a final task cannot be cancelled again");
    db.assert_invariants().await;
    deployment.stop_all().await;
    db.drop_database().await.unwrap();
}
