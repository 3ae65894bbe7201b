//! API errors, and the one place they map to HTTP status codes.
//!
//! Every error is `{"error": "..."}` with a message that names the problem.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What went wrong handling a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (bad JSON, bad path parameter).
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but invalid (unknown field, bad DAG, bad identifier).
    #[error("{0}")]
    Unprocessable(String),
    /// No such template, namespace or task.
    #[error("{0}")]
    NotFound(String),
    /// Conflicts with what is stored (a published version, a final task).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than the limit.
    #[error("{0}")]
    TooLarge(String),
    /// Missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// Not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The database is unreachable or timed out; retry later.
    #[error("the database is unavailable; retry later")]
    Unavailable,
    /// A bug or an unexpected database error; details are logged, not returned.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The status code for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(serde_json::json!({"error": self.to_string()}))).into_response()
    }
}

impl From<tasker_shared::Error> for ApiError {
    fn from(err: tasker_shared::Error) -> Self {
        use tasker_shared::Error as E;
        match err {
            E::InvalidTemplate(m) | E::InvalidInput(m) => ApiError::Unprocessable(m),
            E::NotFound { what, key } => ApiError::NotFound(format!("{what} not found: {key}")),
            E::Conflict(m) | E::InvalidTransition(m) => ApiError::Conflict(m),
            E::Database(inner) => {
                if tasker_shared::error::is_transient(&inner) {
                    tracing::warn!(error = %inner, "request failed: database unavailable");
                    ApiError::Unavailable
                } else {
                    tracing::error!(error = %inner, "request failed");
                    ApiError::Internal
                }
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => ApiError::Unprocessable(format!("invalid request: {}", e.body_text())),
            JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest(format!("malformed JSON: {}", e.body_text())),
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected Content-Type: application/json".into())
            }
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::TooLarge("request body is too large".into())
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(format!("invalid path: {}", rejection.body_text()))
    }
}
