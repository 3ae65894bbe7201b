//! The HTTP endpoints every service serves: liveness, readiness, metrics.
//!
//! - `GET /health/live`: the process runs (200 always).
//! - `GET /health/ready`: the database answers within a second and, in modes
//!   that listen, the LISTEN connection is up. 503 otherwise, with the reason.
//! - `GET /metrics`: Prometheus text format.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::discovery::Discovery;
use crate::event_system::SampledStatisticsCollector;

/// What the health endpoints look at.
#[derive(Debug, Clone)]
pub struct HealthState {
    /// The service's pool.
    pub pool: PgPool,
    /// Discovery, whose LISTEN connection readiness depends on.
    pub discovery: Discovery,
    /// The metrics recorder's handle.
    pub metrics: PrometheusHandle,
    /// The statistics collector, whose counters are published at render time.
    pub statistics: SampledStatisticsCollector,
}

/// The `/health/*` and `/metrics` routes.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

async fn ready(State(state): State<HealthState>) -> Response {
    let database = tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(&state.pool)).await;
    let database_ok = matches!(database, Ok(Ok(_)));
    let listens = state.discovery.mode().listens();
    let listener_ok = !listens || state.discovery.listener_connected();
    let body = serde_json::json!({
        "ready": database_ok && listener_ok,
        "database": if database_ok { "ok" } else { "unreachable" },
        "listener": if !listens { "not used" } else if listener_ok { "connected" } else { "disconnected" },
        "mode": state.discovery.mode().as_str(),
    });
    let status = if database_ok && listener_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn render_metrics(State(state): State<HealthState>) -> Response {
    crate::metrics::pool_connections(&state.pool);
    crate::metrics::export_cumulative_times();
    state.statistics.export_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}
