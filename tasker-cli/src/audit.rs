//! Checks of a finished run that need more than the database's own invariants:
//! the workers' invocation journals against the transition history. Used by the
//! cross-process tests and `tasker chaos`; the queries are in `docs/testing.md`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sqlx::PgPool;
use uuid::Uuid;

/// Handler invocations per attempt, `(step_uuid, attempt) -> runs`, from every
/// `*.journal` file in `dir` (see `TASKER_WORKER_JOURNAL`).
pub fn read_journals(dir: &Path) -> HashMap<(Uuid, i32), usize> {
    let mut counts = HashMap::new();
    let files = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
    for path in files.filter(|p| p.extension().is_some_and(|e| e == "journal")) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (Some(step), Some(attempt)) = (parts.next(), parts.next()) else { continue };
            let (Ok(step), Ok(attempt)) = (step.parse::<Uuid>(), attempt.parse::<i32>()) else { continue };
            *counts.entry((step, attempt)).or_insert(0) += 1;
        }
    }
    counts
}

/// What [`check_attempts`] looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptAudit {
    /// Attempts started according to the history.
    pub attempts: usize,
    /// Handler invocations according to the journals.
    pub invocations: usize,
    /// Attempts whose claim never reached a worker (rescued after their lease).
    pub never_ran: usize,
}

/// Checks the journals against the history:
/// - no attempt ran more than once, and none ran without a start in the history;
/// - every attempt whose outcome a worker recorded ran exactly once;
/// - an attempt that never ran (its claim reached the database but not its
///   worker: the worker died, or the connection dropped at commit) was failed by
///   the rescuer after its lease expired, or cancelled;
/// - no step completed more than once.
///
/// Returns what was checked, or every violation found.
pub async fn check_attempts(
    pool: &PgPool,
    invocations: &HashMap<(Uuid, i32), usize>,
) -> Result<AttemptAudit, Vec<String>> {
    let attempts: Vec<(Uuid, i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT s.step_uuid, s.attempt, next.to_state, next.reason
         FROM tasker.workflow_step_transitions s
         LEFT JOIN LATERAL (
             SELECT n.to_state, n.reason FROM tasker.workflow_step_transitions n
             WHERE n.step_uuid = s.step_uuid AND n.transition_id > s.transition_id
             ORDER BY n.transition_id LIMIT 1) next ON true
         WHERE s.to_state = 'in_progress'",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| vec![format!("reading the history: {e}")])?;

    let mut problems = Vec::new();
    let mut never_ran = 0;
    for (step, attempt, next, reason) in &attempts {
        let runs = invocations.get(&(*step, *attempt)).copied().unwrap_or(0);
        if runs > 1 {
            problems.push(format!("attempt {attempt} of step {step} ran {runs} times"));
        }
        let rescued = reason.as_deref().is_some_and(|r| r.starts_with("lease expired"));
        let recorded_by_worker = match next.as_deref() {
            Some("complete") => true,
            Some("waiting_for_retry" | "error") => !rescued,
            _ => false,
        };
        if recorded_by_worker && runs != 1 {
            problems.push(format!("attempt {attempt} of step {step} has a recorded outcome but ran {runs} times"));
        }
        if runs == 0 && !recorded_by_worker {
            never_ran += 1;
            if !(rescued || next.as_deref() == Some("cancelled") || next.is_none()) {
                problems.push(format!(
                    "attempt {attempt} of step {step} never ran, yet was not rescued: {next:?} {reason:?}"
                ));
            }
        }
    }
    let started: HashSet<(Uuid, i32)> = attempts.iter().map(|(s, a, _, _)| (*s, *a)).collect();
    for (attempt, runs) in invocations {
        if !started.contains(attempt) {
            problems.push(format!("attempt {attempt:?} ran {runs} times without a start in the history"));
        }
    }
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT step_uuid FROM tasker.workflow_step_transitions
                               WHERE to_state = 'complete' GROUP BY step_uuid HAVING count(*) > 1) m",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| vec![format!("reading completions: {e}")])?;
    if twice > 0 {
        problems.push(format!("{twice} steps completed more than once"));
    }
    if problems.is_empty() {
        Ok(AttemptAudit { attempts: attempts.len(), invocations: invocations.values().sum(), never_ran })
    } else {
        Err(problems)
    }
}
