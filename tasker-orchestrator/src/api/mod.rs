//! The task API (`/v1/*`), as DESIGN.md specifies it.
//!
//! | route | handler |
//! |---|---|
//! | `POST /v1/templates`, `GET /v1/templates` | [`templates`] |
//! | `POST /v1/tasks`, `POST /v1/tasks/batch`, `GET /v1/tasks/{uuid}`, `POST /v1/tasks/{uuid}/cancel` | [`tasks`] |
//!
//! Bodies are limited in size, must be JSON, and reject unknown fields. A rejected
//! request writes nothing: validation happens before any write, and every write
//! of a request is one transaction. When a token is configured, every route here
//! requires `Authorization: Bearer <token>` ([`auth`]).

mod auth;
mod error;
mod tasks;
mod templates;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::routing::{get, post};
use sqlx::PgPool;

pub use error::ApiError;

/// What the API handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The orchestrator's pool.
    pub pool: PgPool,
    /// Recorded as the actor of transitions the API causes.
    pub actor: String,
    /// Statistics (task creation).
    pub stats: tasker_shared::event_system::SampledStatisticsCollector,
}

/// The `/v1` routes, with body limit and optional bearer-token auth.
pub fn router(state: ApiState, max_body_bytes: usize, api_token: Option<String>) -> Router {
    let routes = Router::new()
        .route("/v1/templates", post(templates::publish).get(templates::list))
        .route("/v1/tasks", post(tasks::submit))
        .route("/v1/tasks/batch", post(tasks::submit_batch))
        .route("/v1/tasks/{task_uuid}", get(tasks::show))
        .route("/v1/tasks/{task_uuid}/cancel", post(tasks::cancel))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state);
    match api_token {
        Some(token) => {
            routes.layer(axum::middleware::from_fn_with_state(auth::Token::new(token), auth::require_bearer))
        }
        None => routes,
    }
}

/// `axum::Json`, with rejections turned into [`ApiError`] JSON bodies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Json(value))
    }
}
