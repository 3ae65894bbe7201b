//! Handlers the worker binary ships, for demos and tests:
//!
//! | handler | does | config |
//! |---|---|---|
//! | `noop` | nothing; returns `null` | none |
//! | `sleep` | waits, then returns `{"slept_ms": n}` | `duration_ms` (default 100) |
//! | `fail` | fails the first `fail_times` attempts, then returns `{"attempt": n}` | `fail_times` (default 1), `retryable` (default true), `message` |
//! | `echo` | returns its input: `{"context", "config", "dependencies"}` | none |

use std::time::Duration;

use crate::handler::{HandlerRegistry, StepError, StepHandler, StepInput, StepResult};

/// Registers every built-in handler.
pub fn register(registry: &mut HandlerRegistry) {
    // The names are constant identifiers and the registry is fresh: cannot fail.
    let _ = registry.register("noop", Noop);
    let _ = registry.register("sleep", Sleep);
    let _ = registry.register("fail", Fail);
    let _ = registry.register("echo", Echo);
}

/// Does nothing.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

impl StepHandler for Noop {
    async fn handle(&self, _input: StepInput) -> StepResult {
        Ok(serde_json::Value::Null)
    }
}

/// Sleeps for `config.duration_ms`, stopping early if the attempt is cancelled.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

impl StepHandler for Sleep {
    async fn handle(&self, input: StepInput) -> StepResult {
        let ms = match input.config.get("duration_ms") {
            None => 100,
            Some(v) => {
                v.as_u64().ok_or_else(|| StepError::permanent("sleep: config.duration_ms must be a whole number"))?
            }
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(serde_json::json!({ "slept_ms": ms })),
            () = input.cancelled.cancelled() => Err(StepError::retryable("sleep: attempt cancelled")),
        }
    }
}

/// Fails the first `config.fail_times` attempts (to show retries), then succeeds.
#[derive(Debug, Clone, Copy)]
pub struct Fail;

impl StepHandler for Fail {
    async fn handle(&self, input: StepInput) -> StepResult {
        let fail_times = input.config.get("fail_times").and_then(serde_json::Value::as_i64).unwrap_or(1);
        let retryable = input.config.get("retryable").and_then(serde_json::Value::as_bool).unwrap_or(true);
        if i64::from(input.attempt) <= fail_times {
            let message = input.config.get("message").and_then(serde_json::Value::as_str).unwrap_or("injected failure");
            let message = format!("{message} (attempt {} of {} planned failures)", input.attempt, fail_times);
            return Err(StepError { message, retryable });
        }
        Ok(serde_json::json!({ "attempt": input.attempt }))
    }
}

/// Returns its input.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

impl StepHandler for Echo {
    async fn handle(&self, input: StepInput) -> StepResult {
        Ok(serde_json::json!({
            "context": input.context,
            "config": input.config,
            "dependencies": input.dependency_results,
        }))
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    use super::*;

    fn input(attempt: i32, config: serde_json::Value) -> StepInput {
        StepInput {
            step_uuid: Uuid::nil(),
            task_uuid: Uuid::nil(),
            step_name: "s".into(),
            attempt,
            max_attempts: 3,
            config,
            context: serde_json::json!({"order": 42}),
            dependency_results: serde_json::json!({"a": 1}),
            cancelled: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn fail_fails_the_planned_attempts_then_succeeds() {
        let config = serde_json::json!({"fail_times": 2});
        assert!(Fail.handle(input(1, config.clone())).await.expect_err("1").retryable);
        assert!(Fail.handle(input(2, config.clone())).await.is_err());
        assert_eq!(Fail.handle(input(3, config)).await, Ok(serde_json::json!({"attempt": 3})));
        let permanent = Fail.handle(input(1, serde_json::json!({"retryable": false}))).await;
        assert!(!permanent.expect_err("fails").retryable);
    }

    #[tokio::test]
    async fn echo_returns_its_input_and_sleep_validates_its_config() {
        let out = Echo.handle(input(1, serde_json::json!({"k": "v"}))).await.expect("echo");
        assert_eq!(out["context"]["order"], 42);
        assert_eq!(out["dependencies"]["a"], 1);
        let bad = Sleep.handle(input(1, serde_json::json!({"duration_ms": "soon"}))).await;
        assert!(!bad.expect_err("bad config").retryable);
        let cancelled = input(1, serde_json::json!({"duration_ms": 60_000}));
        cancelled.cancelled.cancel();
        assert!(Sleep.handle(cancelled).await.is_err(), "a cancelled sleep stops at once");
    }

    #[test]
    fn builtins_are_registered_and_names_are_unique() {
        let mut registry = HandlerRegistry::with_builtins();
        assert_eq!(registry.names().collect::<Vec<_>>(), ["echo", "fail", "noop", "sleep"]);
        assert!(registry.register("noop", Noop).is_err());
        assert!(registry.register("Bad Name", Noop).is_err());
    }
}
