//! Creating, reading and cancelling tasks.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::identifier::Identifier;
use crate::state_machine::{StepState, TaskState};
use crate::template::{StoredTemplate, Version, find_template};

/// The most tasks one batch may create.
pub const MAX_BATCH: usize = 1_000;

/// A request to run a template.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// The template's namespace.
    pub namespace: Identifier,
    /// The template's name.
    pub name: Identifier,
    /// A specific version, or the highest when `None`.
    pub version: Option<Version>,
    /// Input for the handlers.
    pub context: serde_json::Value,
    /// Higher runs first.
    pub priority: i32,
    /// Makes submission idempotent within the namespace.
    pub idempotency_key: Option<String>,
}

/// The outcome of one [`NewTask`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreatedTask {
    /// The task (new, or the earlier one with the same idempotency key).
    pub task_uuid: Uuid,
    /// Its state now.
    pub state: TaskState,
    /// False when an earlier task with the same idempotency key was returned.
    #[serde(skip)]
    pub created: bool,
    /// Steps this call enqueued for it (its root steps, when it started).
    #[serde(skip)]
    pub steps_enqueued: usize,
}

/// Who makes a new task's first move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The creating statement: the root steps are enqueued, their
    /// namespaces' step channels notified and the task is in
    /// `steps_in_process` when it commits, with no orchestration pass. The
    /// submission path.
    Now,
    /// An orchestrator's first pass: the task is created due and the task
    /// channel is notified.
    ByOrchestrator,
}

/// Creates tasks, their steps and dependency edges, and starts them as `start`
/// says (a task [`Start::Now`] cannot start is left due for an orchestrator).
/// After reading the templates it sends one statement (`tasker.create_tasks`),
/// so all requests are applied or none, inside a transaction or not.
/// Requests whose idempotency key was used before (or earlier in the same
/// batch) return the existing task.
pub async fn create_tasks(
    conn: &mut PgConnection,
    actor: &str,
    requests: &[NewTask],
    start: Start,
) -> Result<Vec<CreatedTask>> {
    if requests.len() > MAX_BATCH {
        return Err(Error::InvalidInput(format!(
            "a batch may create at most {MAX_BATCH} tasks, found {}",
            requests.len()
        )));
    }
    let templates = resolve_templates(conn, requests).await?;

    let mut rows = CreateRows::default();
    let mut planned = Vec::with_capacity(requests.len());
    for request in requests {
        let stored = &templates[&TemplateKey::of(request)];
        let task_uuid = Uuid::now_v7();
        planned.push(task_uuid);
        rows.push_task(task_uuid, stored, request);
    }

    let answers = sqlx::query!(
        r#"SELECT task_uuid AS "task_uuid!", created AS "created!", state AS "state!: TaskState",
                  steps_enqueued AS "steps_enqueued!", namespace, idempotency_key
           FROM tasker.create_tasks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                                    $17, $18, $19, $20, $21)"#,
        actor,
        start == Start::Now,
        &rows.task_uuids,
        &rows.template_ids,
        &rows.namespaces,
        &rows.priorities,
        &rows.contexts,
        &rows.idempotency_keys as &[Option<String>],
        &rows.step_uuids,
        &rows.step_task_uuids,
        &rows.step_names,
        &rows.step_handlers,
        &rows.step_namespaces,
        &rows.step_priorities,
        &rows.step_configs,
        &rows.step_max_attempts,
        &rows.step_backoff_ms,
        &rows.step_timeout_ms,
        &rows.edge_task_uuids,
        &rows.edge_to,
        &rows.edge_from,
    )
    .fetch_all(&mut *conn)
    .await?;

    let mut inserted = HashMap::new();
    let mut existing = HashMap::new();
    for answer in answers {
        let steps_enqueued = usize::try_from(answer.steps_enqueued).unwrap_or(0);
        let task =
            CreatedTask { task_uuid: answer.task_uuid, state: answer.state, created: answer.created, steps_enqueued };
        if answer.created {
            inserted.insert(answer.task_uuid, task);
        } else {
            existing.insert((answer.namespace, answer.idempotency_key), task);
        }
    }
    requests
        .iter()
        .zip(planned)
        .map(|(request, task_uuid)| {
            if let Some(task) = inserted.get(&task_uuid) {
                return Ok(task.clone());
            }
            let key = (Some(request.namespace.to_string()), request.idempotency_key.clone());
            existing
                .get(&key)
                .cloned()
                .ok_or_else(|| Error::Conflict("task with this idempotency key vanished during submission".into()))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TemplateKey {
    namespace: Identifier,
    name: Identifier,
    version: Option<Version>,
}

impl TemplateKey {
    fn of(request: &NewTask) -> Self {
        TemplateKey { namespace: request.namespace.clone(), name: request.name.clone(), version: request.version }
    }
}

/// Looks up each distinct template once; names the first one that is missing.
async fn resolve_templates(
    conn: &mut PgConnection,
    requests: &[NewTask],
) -> Result<HashMap<TemplateKey, StoredTemplate>> {
    let mut templates = HashMap::new();
    for request in requests {
        let key = TemplateKey::of(request);
        if templates.contains_key(&key) {
            continue;
        }
        let found = find_template(&mut *conn, &key.namespace, &key.name, key.version).await?;
        let Some(stored) = found else {
            let namespace_exists = sqlx::query_scalar!(
                r#"SELECT EXISTS (SELECT 1 FROM tasker.namespaces WHERE name = $1) AS "exists!""#,
                key.namespace.as_str()
            )
            .fetch_one(&mut *conn)
            .await?;
            return Err(if namespace_exists {
                Error::NotFound {
                    what: "template",
                    key: match key.version {
                        Some(v) => format!("{}/{} version {v}", key.namespace, key.name),
                        None => format!("{}/{}", key.namespace, key.name),
                    },
                }
            } else {
                Error::NotFound { what: "namespace", key: key.namespace.to_string() }
            });
        };
        templates.insert(key, stored);
    }
    Ok(templates)
}

/// Column arrays for the one-statement insert.
#[derive(Debug, Default)]
struct CreateRows {
    task_uuids: Vec<Uuid>,
    template_ids: Vec<i64>,
    namespaces: Vec<String>,
    priorities: Vec<i32>,
    contexts: Vec<serde_json::Value>,
    idempotency_keys: Vec<Option<String>>,
    step_uuids: Vec<Uuid>,
    step_task_uuids: Vec<Uuid>,
    step_names: Vec<String>,
    step_handlers: Vec<String>,
    step_namespaces: Vec<String>,
    step_priorities: Vec<i32>,
    step_configs: Vec<serde_json::Value>,
    step_max_attempts: Vec<i32>,
    step_backoff_ms: Vec<i32>,
    step_timeout_ms: Vec<i32>,
    edge_task_uuids: Vec<Uuid>,
    edge_to: Vec<Uuid>,
    edge_from: Vec<Uuid>,
}

impl CreateRows {
    fn push_task(&mut self, task_uuid: Uuid, stored: &StoredTemplate, request: &NewTask) {
        let template = &stored.template;
        self.task_uuids.push(task_uuid);
        self.template_ids.push(stored.template_id);
        self.namespaces.push(template.namespace.to_string());
        self.priorities.push(request.priority);
        self.contexts.push(request.context.clone());
        self.idempotency_keys.push(request.idempotency_key.clone());

        let step_uuids: HashMap<&str, Uuid> =
            template.steps.iter().map(|s| (s.name.as_str(), Uuid::now_v7())).collect();
        for step in &template.steps {
            let step_uuid = step_uuids[step.name.as_str()];
            self.step_uuids.push(step_uuid);
            self.step_task_uuids.push(task_uuid);
            self.step_names.push(step.name.to_string());
            self.step_handlers.push(step.handler.to_string());
            self.step_namespaces.push(template.namespace.to_string());
            self.step_priorities.push(request.priority);
            self.step_configs.push(step.config.clone());
            self.step_max_attempts.push(step.max_attempts);
            self.step_backoff_ms.push(step.backoff_ms);
            self.step_timeout_ms.push(step.timeout_ms);
            for dependency in &step.depends_on {
                self.edge_task_uuids.push(task_uuid);
                self.edge_to.push(step_uuid);
                self.edge_from.push(step_uuids[dependency.as_str()]);
            }
        }
    }
}

/// A task with its steps and history, as `GET /v1/tasks/{uuid}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskDetails {
    /// The task.
    pub task_uuid: Uuid,
    /// Template namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Template version.
    pub version: String,
    /// Current state.
    pub state: TaskState,
    /// Priority.
    pub priority: i32,
    /// Context as submitted.
    pub context: serde_json::Value,
    /// Idempotency key, if one was given.
    pub idempotency_key: Option<String>,
    /// Submission time.
    pub created_at: DateTime<Utc>,
    /// When it reached a final state.
    pub completed_at: Option<DateTime<Utc>>,
    /// The steps, in creation order.
    pub steps: Vec<StepDetails>,
    /// Task state changes, oldest first.
    pub transitions: Vec<TransitionRecord>,
}

/// One step of [`TaskDetails`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDetails {
    /// The step.
    pub step_uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its handler.
    pub handler: String,
    /// Current state.
    pub state: StepState,
    /// Attempts started.
    pub attempts: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// The result, once complete.
    pub result: Option<serde_json::Value>,
    /// The last failure.
    pub last_error: Option<String>,
    /// When its retry is scheduled.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Step state changes, oldest first.
    pub transitions: Vec<TransitionRecord>,
}

/// One history row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransitionRecord {
    /// Previous state (none for creation).
    pub from: Option<String>,
    /// New state.
    pub to: String,
    /// Why.
    pub reason: String,
    /// Who: an instance id, or "api".
    pub actor: String,
    /// When (database clock).
    pub at: DateTime<Utc>,
    /// For steps: the attempt it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

/// Reads a task with its steps and history; `None` if there is no such task.
pub async fn get_task(conn: &mut PgConnection, task_uuid: Uuid) -> Result<Option<TaskDetails>> {
    let Some(task) = sqlx::query!(
        r#"SELECT t.task_uuid, t.namespace, tt.name, tt.version, t.state AS "state: TaskState",
                  t.priority, t.context, t.idempotency_key, t.created_at, t.completed_at
           FROM tasker.tasks t JOIN tasker.task_templates tt USING (template_id)
           WHERE t.task_uuid = $1"#,
        task_uuid
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };

    let transitions = sqlx::query!(
        r#"SELECT from_state, to_state, reason, actor, created_at
           FROM tasker.task_transitions WHERE task_uuid = $1 ORDER BY transition_id"#,
        task_uuid
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| TransitionRecord {
        from: r.from_state,
        to: r.to_state,
        reason: r.reason,
        actor: r.actor,
        at: r.created_at,
        attempt: None,
    })
    .collect();

    let mut step_history: HashMap<Uuid, Vec<TransitionRecord>> = HashMap::new();
    for r in sqlx::query!(
        r#"SELECT step_uuid, attempt, from_state, to_state, reason, actor, created_at
           FROM tasker.workflow_step_transitions
           WHERE step_uuid IN (SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1)
           ORDER BY transition_id"#,
        task_uuid
    )
    .fetch_all(&mut *conn)
    .await?
    {
        step_history.entry(r.step_uuid).or_default().push(TransitionRecord {
            from: r.from_state,
            to: r.to_state,
            reason: r.reason,
            actor: r.actor,
            at: r.created_at,
            attempt: Some(r.attempt),
        });
    }

    let steps = sqlx::query!(
        r#"SELECT step_uuid, name, handler, state AS "state: StepState", attempts, max_attempts,
                  result, last_error, next_retry_at
           FROM tasker.workflow_steps WHERE task_uuid = $1 ORDER BY step_uuid"#,
        task_uuid
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| StepDetails {
        transitions: step_history.remove(&r.step_uuid).unwrap_or_default(),
        step_uuid: r.step_uuid,
        name: r.name,
        handler: r.handler,
        state: r.state,
        attempts: r.attempts,
        max_attempts: r.max_attempts,
        result: r.result,
        last_error: r.last_error,
        next_retry_at: r.next_retry_at,
    })
    .collect();

    Ok(Some(TaskDetails {
        task_uuid: task.task_uuid,
        namespace: task.namespace,
        name: task.name,
        version: task.version,
        state: task.state,
        priority: task.priority,
        context: task.context,
        idempotency_key: task.idempotency_key,
        created_at: task.created_at,
        completed_at: task.completed_at,
        steps,
        transitions,
    }))
}

/// The outcome of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancellation {
    /// True if this call cancelled the task; false if it was already final.
    pub cancelled: bool,
    /// The task's state after the call.
    pub state: TaskState,
    /// How many unfinished steps were cancelled.
    pub steps_cancelled: i32,
}

/// Cancels a task and its unfinished steps (`tasker.cancel_task`).
pub async fn cancel_task(
    executor: impl PgExecutor<'_>,
    task_uuid: Uuid,
    actor: &str,
    reason: &str,
) -> Result<Option<Cancellation>> {
    let row = sqlx::query_as!(
        Cancellation,
        r#"SELECT cancelled AS "cancelled!", state AS "state!: TaskState",
                  steps_cancelled AS "steps_cancelled!"
           FROM tasker.cancel_task($1, $2, $3)"#,
        task_uuid,
        actor,
        reason,
    )
    .fetch_optional(executor)
    .await?;
    Ok(row)
}
