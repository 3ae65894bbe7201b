//! Records attempt outcomes in batches: whatever finished since the last
//! write goes in one `complete_and_claim` and one `fail_steps` call, each a
//! single statement committed on its own. Under load this turns many
//! completions into few transactions; when idle, a single outcome is written
//! at once (no artificial delay).
//!
//! A completion that makes dependents runnable also claims, in the same
//! statement, as much of that work as the worker has room for, and starts it
//! at once: along a chain of steps, the next step begins without a claim
//! transaction or a notification round trip of its own, and other workers are
//! notified only of the dependents it leaves.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tasker_shared::claim::AttemptRef;
use tasker_shared::discovery::Backoff;
use tasker_shared::event_system::{Event, SampledStatisticsCollector};
use tasker_shared::metrics::{self, names};
use tasker_shared::state_machine::TaskState;
use tasker_shared::step_result::{self, Continued, Failure, Recorded, Success};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::handler::StepResult;
use crate::inflight::InFlight;
use crate::worker::{Continuation, Reservation};

/// Most outcomes written in one batch.
const MAX_BATCH: usize = 256;

/// One finished attempt.
#[derive(Debug)]
pub struct Outcome {
    /// The attempt.
    pub attempt: AttemptRef,
    /// Its task.
    pub task_uuid: Uuid,
    /// Its handler (a metric label).
    pub handler: String,
    /// How many steps depend on its step (at most this many are enqueued
    /// when it completes).
    pub dependents: usize,
    /// What the handler returned.
    pub result: StepResult,
    /// How long the handler ran.
    pub elapsed: std::time::Duration,
}

/// Writes outcomes until the sender side closes and everything is written.
/// Successes that make dependents runnable also claim work for the free
/// capacity, in the same transaction, and start it (see [`Continuation`]).
pub async fn run(
    pool: PgPool,
    worker_id: String,
    mut outcomes: mpsc::Receiver<Outcome>,
    inflight: Arc<InFlight>,
    stats: SampledStatisticsCollector,
    continuation: Continuation,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = outcomes.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match outcomes.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let (successes, failures) = split(&batch);
        let dependents = batch.iter().filter(|o| o.result.is_ok()).map(|o| o.dependents).sum();
        let mut recorded: Vec<Recorded> = Vec::with_capacity(batch.len());
        let mut channels_notified = 0;
        if !successes.is_empty() {
            let written =
                with_retry(successes.len(), || complete(&pool, &worker_id, &successes, dependents, &continuation))
                    .await;
            if let Some(written) = written {
                recorded.extend(written.continued.recorded);
                channels_notified = written.continued.channels_notified;
                if let Some(reservation) = written.reservation {
                    continuation.start(written.continued.claimed, reservation).await;
                }
            }
        }
        if !failures.is_empty() {
            let written = with_retry(failures.len(), || step_result::fail_steps(&pool, &worker_id, &failures)).await;
            recorded.extend(written.into_iter().flatten());
        }
        account(&batch, &recorded, channels_notified, &stats).await;
        metrics::add_processing_time(started.elapsed());
        for outcome in batch.drain(..) {
            inflight.remove(&outcome.attempt);
        }
    }
}

fn split(batch: &[Outcome]) -> (Vec<Success>, Vec<Failure>) {
    let mut successes = Vec::new();
    let mut failures = Vec::new();
    for outcome in batch {
        match &outcome.result {
            Ok(value) => successes.push(Success { attempt: outcome.attempt, result: value.clone() }),
            Err(err) => failures.push(Failure {
                attempt: outcome.attempt,
                error: err.message.clone(),
                retryable: err.retryable,
            }),
        }
    }
    (successes, failures)
}

/// Retries transient failures: the outcome must not be lost while the lease
/// may still hold. If the database stays away past the lease, the write will be
/// rejected later anyway and the attempt retried elsewhere.
async fn with_retry<T, F, Fut>(outcomes: usize, mut write: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = tasker_shared::Result<T>>,
{
    let mut backoff = Backoff::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write().await {
            Ok(written) => return Some(written),
            Err(err) if err.is_transient() && attempt < 60 => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, outcomes, retry_in = ?delay, "recording step outcomes failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                tracing::error!(error = %err, outcomes, "could not record step outcomes; their leases will expire and the steps run again");
                return None;
            }
        }
    }
}

/// A committed batch of successes, and the work claimed with it.
struct Completed {
    continued: Continued,
    /// The capacity claimed for (any left over is given back when started).
    reservation: Option<Reservation>,
}

/// Records successes and claims what they made runnable, as far as the
/// worker has free capacity, in one statement (`complete_and_claim`). The
/// capacity is reserved first, up to `dependents`, how many steps depend on
/// the completed ones: a batch that cannot enqueue anything reserves none,
/// and leaves every permit to the claim loop.
async fn complete(
    pool: &PgPool,
    worker_id: &str,
    successes: &[Success],
    dependents: usize,
    continuation: &Continuation,
) -> tasker_shared::Result<Completed> {
    let reservation = if dependents > 0 { continuation.reserve(dependents) } else { None };
    let room = reservation.as_ref().map_or(0, |r| i32::try_from(r.capacity()).unwrap_or(i32::MAX));
    let (namespace, lease) = (continuation.namespace(), continuation.lease());
    let continued = step_result::complete_and_claim(pool, worker_id, successes, namespace, room, lease).await?;
    Ok(Completed { continued, reservation })
}

/// Metrics, statistics and logs for a recorded batch, which notified
/// `channels_notified` step channels of the dependents it left enqueued.
async fn account(batch: &[Outcome], recorded: &[Recorded], channels_notified: u64, stats: &SampledStatisticsCollector) {
    let accepted: HashSet<Uuid> = recorded.iter().filter(|r| r.accepted).map(|r| r.step_uuid).collect();
    let mut woken = HashSet::new();
    let mut finalized = HashMap::new();
    for outcome in batch {
        let step = outcome.attempt.step_uuid;
        if !accepted.contains(&step) {
            metrics::counter_by(names::STEP_RESULTS_REJECTED, 1);
            stats.record(Event::StepResultRejected, outcome.elapsed).await;
            tracing::info!(step = %step, attempt = outcome.attempt.attempt, "outcome rejected: the attempt no longer owns the step (cancelled or taken over)");
            continue;
        }
        if let Some(r) = recorded.iter().find(|r| r.step_uuid == step) {
            if r.task_woken {
                woken.insert(outcome.task_uuid);
            }
            if let (true, Some(created_at)) = (r.task_finalized, r.task_created_at) {
                finalized.insert(outcome.task_uuid, created_at);
            }
        }
        match &outcome.result {
            Ok(_) => {
                metrics::counter_with(names::STEPS_COMPLETED, "handler", &outcome.handler);
                stats.record(Event::StepCompleted, outcome.elapsed).await;
            }
            Err(err) => {
                metrics::step_failed(&outcome.handler, err.retryable);
                stats.record(Event::StepFailed, outcome.elapsed).await;
                tracing::info!(step = %step, attempt = outcome.attempt.attempt, retryable = err.retryable, error = %err.message, "step attempt failed");
            }
        }
    }
    let enqueued: usize = recorded.iter().map(|r| r.enqueued_dependents.len()).sum();
    if enqueued > 0 {
        metrics::counter_by(names::STEPS_ENQUEUED, enqueued as u64);
    }
    if channels_notified > 0 {
        metrics::notifications_sent("steps", channels_notified);
    }
    for created_at in finalized.values() {
        metrics::counter_with(names::TASKS_FINALIZED, "state", TaskState::Complete.as_str());
        let latency = (Utc::now() - *created_at).to_std().unwrap_or_default();
        stats.record(Event::TaskFinalized, latency).await;
    }
    if !woken.is_empty() {
        metrics::tasks_made_ready("step_result", woken.len() as u64);
        metrics::notifications_sent("tasks", 1);
        stats.record(Event::NotificationSent, Default::default()).await;
    }
}
