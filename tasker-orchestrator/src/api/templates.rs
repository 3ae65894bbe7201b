//! `POST /v1/templates` and `GET /v1/templates`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tasker_shared::template::{self, PublishOutcome, TaskTemplate};

use super::{ApiError, ApiState, Json};

/// Publishes a template version: 201 when new, 200 when this exact version was
/// already published, 409 when the version exists with another definition, 422
/// for an invalid DAG (naming the step at fault).
pub(super) async fn publish(
    State(state): State<ApiState>,
    Json(template): Json<TaskTemplate>,
) -> Result<impl IntoResponse, ApiError> {
    template.validate().map_err(|e| ApiError::Unprocessable(format!("invalid template: {e}")))?;
    let mut tx = state.pool.begin().await.map_err(tasker_shared::Error::from)?;
    let outcome = template::publish_template(&mut tx, &template).await?;
    tx.commit().await.map_err(tasker_shared::Error::from)?;
    let status = match outcome {
        PublishOutcome::Created => {
            tracing::info!(namespace = %template.namespace, name = %template.name, version = %template.version, "template published");
            StatusCode::CREATED
        }
        PublishOutcome::Unchanged => StatusCode::OK,
    };
    Ok((
        status,
        axum::Json(serde_json::json!({
            "namespace": template.namespace,
            "name": template.name,
            "version": template.version,
        })),
    ))
}

/// Lists every published template version.
pub(super) async fn list(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let templates = template::list_templates(&state.pool).await?;
    let body: Vec<serde_json::Value> = templates
        .into_iter()
        .map(|t| {
            serde_json::json!({
                "namespace": t.template.namespace,
                "name": t.template.name,
                "version": t.template.version,
                "steps": t.template.steps,
                "created_at": t.created_at,
            })
        })
        .collect();
    Ok(axum::Json(body))
}
