//! Step handlers: the code a worker runs for a step, registered by name.
//!
//! Implement [`StepHandler`] (an `async fn handle`) and register it in a
//! [`HandlerRegistry`] under the name templates use as `handler`:
//!
//! ```
//! use tasker_worker::handler::{HandlerRegistry, StepError, StepHandler, StepInput};
//!
//! struct Greet;
//!
//! impl StepHandler for Greet {
//!     async fn handle(&self, input: StepInput) -> Result<serde_json::Value, StepError> {
//!         let name = input.context["name"].as_str().ok_or_else(|| StepError::permanent("context.name is missing"))?;
//!         Ok(serde_json::json!({ "greeting": format!("hello, {name}") }))
//!     }
//! }
//!
//! let mut registry = HandlerRegistry::with_builtins();
//! registry.register("greet", Greet).unwrap();
//! ```
//!
//! A handler runs at least once per attempt and at most once per attempt on a
//! given worker; it should be idempotent, since an attempt whose worker dies
//! is retried.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tasker_shared::identifier::{Identifier, InvalidIdentifier};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a handler gets to work with.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// The step.
    pub step_uuid: Uuid,
    /// Its task.
    pub task_uuid: Uuid,
    /// The step's name in its template.
    pub step_name: String,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// The attempt budget.
    pub max_attempts: i32,
    /// The step's configuration from the template.
    pub config: serde_json::Value,
    /// The task's context, as submitted.
    pub context: serde_json::Value,
    /// Results of the steps this one depends on, by step name.
    pub dependency_results: serde_json::Value,
    /// Cancelled when the attempt no longer counts (task cancelled, lease
    /// lost, worker shutting down). Long handlers should watch it.
    pub cancelled: CancellationToken,
}

/// Why an attempt failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// What went wrong; stored as the step's `last_error`.
    pub message: String,
    /// Retry (if attempts remain) or fail the step for good.
    pub retryable: bool,
}

impl StepError {
    /// A failure worth retrying (a timeout, an unavailable dependency).
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError { message: message.into(), retryable: true }
    }

    /// A failure that retrying cannot fix (bad input).
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError { message: message.into(), retryable: false }
    }
}

/// The result of one attempt.
pub type StepResult = Result<serde_json::Value, StepError>;

/// A step handler.
pub trait StepHandler: Send + Sync + 'static {
    /// Runs one attempt.
    fn handle(&self, input: StepInput) -> impl Future<Output = StepResult> + Send;
}

type BoxedResult = Pin<Box<dyn Future<Output = StepResult> + Send>>;

/// Object-safe form of [`StepHandler`], for the registry.
trait ErasedHandler: Send + Sync {
    fn handle_boxed(self: Arc<Self>, input: StepInput) -> BoxedResult;
}

impl<H: StepHandler> ErasedHandler for H {
    fn handle_boxed(self: Arc<Self>, input: StepInput) -> BoxedResult {
        Box::pin(async move { self.handle(input).await })
    }
}

/// A registered handler, cheap to clone.
#[derive(Clone)]
pub struct Handler(Arc<dyn ErasedHandler>);

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handler")
    }
}

impl Handler {
    /// Runs one attempt; the future owns everything it needs.
    pub fn run(&self, input: StepInput) -> BoxedResult {
        Arc::clone(&self.0).handle_boxed(input)
    }
}

/// Handlers by name.
#[derive(Debug, Clone, Default)]
pub struct HandlerRegistry {
    handlers: BTreeMap<Identifier, Handler>,
}

/// Why a handler could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is not an identifier.
    #[error("handler name: {0}")]
    InvalidName(#[from] InvalidIdentifier),
    /// The name is taken.
    #[error("a handler named `{0}` is already registered")]
    Duplicate(String),
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in handlers (`noop`, `sleep`, `fail`, `echo`).
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        crate::builtin::register(&mut registry);
        registry
    }

    /// Registers `handler` under `name`.
    pub fn register(&mut self, name: &str, handler: impl StepHandler) -> Result<(), RegistryError> {
        let name = Identifier::new(name)?;
        if self.handlers.contains_key(&name) {
            return Err(RegistryError::Duplicate(name.to_string()));
        }
        self.handlers.insert(name, Handler(Arc::new(handler)));
        Ok(())
    }

    /// The handler registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Handler> {
        self.handlers.iter().find(|(k, _)| k.as_str() == name).map(|(_, h)| h)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(Identifier::as_str)
    }
}
