//! The error type of Tasker's database operations.
//!
//! SQL functions in `migrations/` raise custom SQLSTATEs (`TK001` invalid
//! transition, `TK002` invalid template, `TK004` invalid identifier); they are
//! mapped here, once, to variants callers can match on.

use crate::template::TemplateError;

/// The result of a database operation.
pub type Result<T = (), E = Error> = std::result::Result<T, E>;

/// What went wrong in a database operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A state change the state machine does not allow (SQLSTATE TK001).
    #[error("invalid state transition: {0}")]
    InvalidTransition(String),
    /// A template that breaks the rules (Rust validation or SQLSTATE TK002).
    #[error("invalid template: {0}")]
    InvalidTemplate(String),
    /// A referenced row does not exist.
    #[error("{what} not found: {key}")]
    NotFound {
        /// The kind of thing ("task", "template", ...).
        what: &'static str,
        /// What was looked for.
        key: String,
    },
    /// The write conflicts with what is stored (e.g. a published template version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// An argument the database rejected (SQLSTATE class 22 or TK004).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Anything else: connection loss, timeouts, bugs.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<TemplateError> for Error {
    fn from(err: TemplateError) -> Self {
        Error::InvalidTemplate(err.to_string())
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        let Some(db) = err.as_database_error() else {
            return Error::Database(err);
        };
        let message = db.message().to_owned();
        match db.code().as_deref() {
            Some("TK001") => Error::InvalidTransition(message),
            Some("TK002") => Error::InvalidTemplate(message),
            Some("TK004") => Error::InvalidInput(message),
            Some(code) if code.starts_with("22") => Error::InvalidInput(message),
            _ => Error::Database(err),
        }
    }
}

impl Error {
    /// Whether retrying the same operation may succeed: lost connections,
    /// pool timeouts, serialization failures and deadlocks.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(err) => is_transient(err),
            _ => false,
        }
    }
}

/// Whether a sqlx error is worth retrying (see [`Error::is_transient`]).
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // serialization_failure, deadlock_detected, admin/crash shutdown,
            // cannot_connect_now, connection failures
            Some("40001" | "40P01" | "57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006")
        ),
        _ => false,
    }
}
