//! A small client for the orchestrator's task API.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use uuid::Uuid;

/// Talks to one orchestrator's `/v1` API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// A non-2xx answer: status and the `error` message.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {message}")]
pub struct ApiFailure {
    /// The status code.
    pub status: u16,
    /// The `error` field of the body (or the body).
    pub message: String,
}

impl ApiClient {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
        ApiClient { base: base.into().trim_end_matches('/').to_owned(), token, http }
    }

    /// Sends `body` (if any) with `method` to `path`; returns status and JSON.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("calling {}{path}", self.base))?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, json))
    }

    async fn expect_ok(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let (status, json) = self.request(method, path, body).await?;
        if !(200..300).contains(&status) {
            let message = json.get("error").and_then(Value::as_str).map_or_else(|| json.to_string(), str::to_owned);
            bail!(ApiFailure { status, message });
        }
        Ok(json)
    }

    /// `POST /v1/templates`.
    pub async fn publish_template(&self, template: &Value) -> anyhow::Result<Value> {
        self.expect_ok(reqwest::Method::POST, "/v1/templates", Some(template)).await
    }

    /// `GET /v1/templates`.
    pub async fn templates(&self) -> anyhow::Result<Value> {
        self.expect_ok(reqwest::Method::GET, "/v1/templates", None).await
    }

    /// `POST /v1/tasks`; returns the task's uuid.
    pub async fn submit(&self, task: &Value) -> anyhow::Result<Uuid> {
        let body = self.expect_ok(reqwest::Method::POST, "/v1/tasks", Some(task)).await?;
        task_uuid(&body)
    }

    /// `POST /v1/tasks/batch`; returns the tasks' uuids in order.
    pub async fn submit_batch(&self, tasks: &[Value]) -> anyhow::Result<Vec<Uuid>> {
        let body = self
            .expect_ok(reqwest::Method::POST, "/v1/tasks/batch", Some(&serde_json::json!({ "tasks": tasks })))
            .await?;
        body["tasks"].as_array().context("batch answer without tasks")?.iter().map(task_uuid).collect()
    }

    /// `GET /v1/tasks/{uuid}`.
    pub async fn task(&self, task_uuid: Uuid) -> anyhow::Result<Value> {
        self.expect_ok(reqwest::Method::GET, &format!("/v1/tasks/{task_uuid}"), None).await
    }

    /// `POST /v1/tasks/{uuid}/cancel`.
    pub async fn cancel(&self, task_uuid: Uuid) -> anyhow::Result<Value> {
        self.expect_ok(reqwest::Method::POST, &format!("/v1/tasks/{task_uuid}/cancel"), None).await
    }
}

fn task_uuid(body: &Value) -> anyhow::Result<Uuid> {
    let text = body["task_uuid"].as_str().with_context(|| format!("no task_uuid in {body}"))?;
    Ok(text.parse()?)
}
