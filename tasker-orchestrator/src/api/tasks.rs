//! `POST /v1/tasks`, `POST /v1/tasks/batch`, `GET /v1/tasks/{uuid}`,
//! `POST /v1/tasks/{uuid}/cancel`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use tasker_shared::event_system::Event;
use tasker_shared::identifier::Identifier;
use tasker_shared::metrics::{self, names};
use tasker_shared::tasks::{self, CreatedTask, NewTask, Start};
use tasker_shared::template::Version;
use uuid::Uuid;

use super::{ApiError, ApiState, Json};

/// The body of `POST /v1/tasks` (and each entry of a batch).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitTask {
    namespace: Identifier,
    name: Identifier,
    #[serde(default)]
    version: Option<Version>,
    #[serde(default)]
    context: Option<serde_json::Value>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    idempotency_key: Option<String>,
}

impl SubmitTask {
    fn into_new_task(self, index: Option<usize>) -> Result<NewTask, ApiError> {
        let at = index.map(|i| format!("tasks[{i}]: ")).unwrap_or_default();
        let context = self.context.unwrap_or_else(|| serde_json::json!({}));
        if !context.is_object() {
            return Err(ApiError::Unprocessable(format!("{at}context must be a JSON object")));
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 255)
        {
            return Err(ApiError::Unprocessable(format!(
                "{at}idempotency_key must be 1 to 255 bytes, found {}",
                key.len()
            )));
        }
        Ok(NewTask {
            namespace: self.namespace,
            name: self.name,
            version: self.version,
            context,
            priority: self.priority,
            idempotency_key: self.idempotency_key,
        })
    }
}

/// The body of `POST /v1/tasks/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitBatch {
    tasks: Vec<SubmitTask>,
}

/// Submits one task: 201 with the new task, or 200 with the existing one when
/// its idempotency key was used before.
pub(super) async fn submit(
    State(state): State<ApiState>,
    Json(request): Json<SubmitTask>,
) -> Result<impl IntoResponse, ApiError> {
    let created = create(&state, vec![request.into_new_task(None)?]).await?;
    let task = created.into_iter().next().ok_or(ApiError::Internal)?;
    let status = if task.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(task)))
}

/// Submits up to 1,000 tasks in one statement: all or none.
pub(super) async fn submit_batch(
    State(state): State<ApiState>,
    Json(batch): Json<SubmitBatch>,
) -> Result<impl IntoResponse, ApiError> {
    if batch.tasks.is_empty() || batch.tasks.len() > tasks::MAX_BATCH {
        return Err(ApiError::Unprocessable(format!(
            "a batch holds 1 to {} tasks, found {}",
            tasks::MAX_BATCH,
            batch.tasks.len()
        )));
    }
    let requests =
        batch.tasks.into_iter().enumerate().map(|(i, t)| t.into_new_task(Some(i))).collect::<Result<Vec<_>, _>>()?;
    let created = create(&state, requests).await?;
    let body: Vec<serde_json::Value> = created
        .iter()
        .map(|t| serde_json::json!({"task_uuid": t.task_uuid, "state": t.state, "created": t.created}))
        .collect();
    Ok((StatusCode::CREATED, axum::Json(serde_json::json!({ "tasks": body }))))
}

async fn create(state: &ApiState, requests: Vec<NewTask>) -> Result<Vec<CreatedTask>, ApiError> {
    let started = std::time::Instant::now();
    // The creating statement is a transaction of its own: no BEGIN or COMMIT.
    let mut conn = state.pool.acquire().await.map_err(tasker_shared::Error::from)?;
    let created = tasks::create_tasks(&mut conn, &state.actor, &requests, Start::Now).await?;
    drop(conn);

    // Only now, with everything committed, count what happened.
    let elapsed = started.elapsed();
    let new: Vec<&CreatedTask> = created.iter().filter(|t| t.created).collect();
    for _ in &new {
        state.stats.record(Event::TaskCreated, elapsed).await;
    }
    // Started tasks announced their first steps on their namespaces' step
    // channels; any left for an orchestrator were announced on the task channel.
    let steps_enqueued: usize = new.iter().map(|t| t.steps_enqueued).sum();
    let mut step_channels: Vec<&str> = requests
        .iter()
        .zip(&created)
        .filter(|(_, t)| t.created && t.steps_enqueued > 0)
        .map(|(r, _)| r.namespace.as_str())
        .collect();
    step_channels.sort_unstable();
    step_channels.dedup();
    let left_due = new.iter().filter(|t| t.steps_enqueued == 0).count() as u64;
    if steps_enqueued > 0 {
        metrics::counter_by(names::STEPS_ENQUEUED, steps_enqueued as u64);
        metrics::notifications_sent("steps", step_channels.len() as u64);
    }
    if left_due > 0 {
        metrics::tasks_made_ready("created", left_due);
        metrics::notifications_sent("tasks", 1);
    }
    for _ in 0..step_channels.len() + usize::from(left_due > 0) {
        state.stats.record(Event::NotificationSent, elapsed).await;
    }
    Ok(created)
}

/// A task with its steps, attempts, results and history.
pub(super) async fn show(
    State(state): State<ApiState>,
    path: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(task_uuid) = path?;
    let mut conn = state.pool.acquire().await.map_err(tasker_shared::Error::from)?;
    match tasks::get_task(&mut conn, task_uuid).await? {
        Some(task) => Ok(axum::Json(task)),
        None => Err(ApiError::NotFound(format!("task not found: {task_uuid}"))),
    }
}

/// Cancels a task: its pending, enqueued, waiting and running steps are
/// cancelled; a running handler's late result will be rejected. 409 if the task
/// is already final.
pub(super) async fn cancel(
    State(state): State<ApiState>,
    path: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(task_uuid) = path?;
    let reason = "cancelled through the API";
    match tasks::cancel_task(&state.pool, task_uuid, &state.actor, reason).await? {
        None => Err(ApiError::NotFound(format!("task not found: {task_uuid}"))),
        Some(c) if !c.cancelled => Err(ApiError::Conflict(format!("task {task_uuid} is already {}", c.state))),
        Some(c) => {
            tracing::info!(task = %task_uuid, steps = c.steps_cancelled, "task cancelled");
            Ok(axum::Json(serde_json::json!({
                "task_uuid": task_uuid,
                "state": c.state,
                "steps_cancelled": c.steps_cancelled,
            })))
        }
    }
}
