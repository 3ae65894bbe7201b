//! Optional bearer-token authentication for `/v1/*` (`TASKER_API_TOKEN`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The expected token.
#[derive(Debug, Clone)]
pub(super) struct Token(Arc<str>);

impl Token {
    /// Wraps the configured token.
    pub(super) fn new(token: String) -> Self {
        Token(token.into())
    }
}

/// Rejects requests without `Authorization: Bearer <token>` (401, JSON).
pub(super) async fn require_bearer(State(token): State<Token>, request: Request, next: Next) -> Response {
    let presented =
        request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.0.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::Unauthorized("invalid bearer token".into()).into_response(),
        None => ApiError::Unauthorized("missing Authorization: Bearer <token>".into()).into_response(),
    }
}

/// Compares without an early exit, so timing does not reveal a prefix match.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
