//! Records attempt outcomes in batches: whatever finished since the last
//! write goes in one `complete_steps` and one `fail_steps` call. Under load
//! this turns many completions into few transactions; when idle, a single
//! outcome is written at once (no artificial delay).
//!
//! Each outcome brings its attempt's capacity (a permit), and the transaction
//! that records a batch claims the next work with it and starts that work at
//! once: the dependents it enqueued first, so that along a chain of steps the
//! next step begins without a claim transaction or a notification round trip
//! of its own; then, when the claim loop is waiting for capacity, any ready
//! step, so that under load one transaction records a batch and claims the
//! next. Other workers are notified only of the dependents it leaves.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tasker_shared::claim::{AttemptRef, StepClaim};
use tasker_shared::discovery::Backoff;
use tasker_shared::event_system::{Event, SampledStatisticsCollector};
use tasker_shared::metrics::{self, names};
use tasker_shared::state_machine::TaskState;
use tasker_shared::step_result::{self, ClaimWith, Failure, Recorded, Success};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use uuid::Uuid;

use crate::handler::StepResult;
use crate::inflight::InFlight;
use crate::worker::Continuation;

/// Most outcomes written in one batch.
const MAX_BATCH: usize = 256;

/// Yields in a row that bring no further outcome before a batch is written:
/// attempts that are about to finish (a handler that returns at once takes a
/// few scheduler turns to report) join the batch; no timer delays it.
const IDLE_YIELDS: u32 = 2;

/// The same while handlers run or prefetched steps wait for their turn: a
/// waiting step takes a few turns more (its turn is handed over, its handler
/// spawned and joined) before it reports.
const PENDING_YIELDS: u32 = 8;

/// One finished attempt.
#[derive(Debug)]
pub struct Outcome {
    /// The attempt.
    pub attempt: AttemptRef,
    /// Its task.
    pub task_uuid: Uuid,
    /// Its handler (a metric label).
    pub handler: String,
    /// Its namespace (whose step channel its dependents are announced on).
    pub namespace: String,
    /// What the handler returned.
    pub result: StepResult,
    /// How long the handler ran.
    pub elapsed: std::time::Duration,
    /// The attempt's capacity, held until the outcome is recorded and then
    /// used to claim the next work (taken out by the completer).
    pub permit: Option<OwnedSemaphorePermit>,
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
        let mut idle = 0;
        let patience = || if continuation.unfinished() > 0 { PENDING_YIELDS } else { IDLE_YIELDS };
        while batch.len() < MAX_BATCH && idle < patience() {
            match outcomes.try_recv() {
                Ok(next) => {
                    batch.push(next);
                    idle = 0;
                }
                Err(_) => {
                    idle += 1;
                    tokio::task::yield_now().await;
                }
            }
        }
        let started = std::time::Instant::now();
        // Given back when dropped, once the batch is recorded, except what
        // the successes' transaction claims work with.
        let mut reservation = continuation.hold(batch.iter_mut().filter_map(|o| o.permit.take()).collect());
        let (successes, failures) = split(&batch);
        let mut recorded: Vec<Recorded> = Vec::with_capacity(batch.len());
        let mut announced_left = None;
        // Failures first: every permit of the batch is then held until its
        // outcome is recorded, and the successes' transaction claims with all.
        if !failures.is_empty() {
            let written = with_retry(failures.len(), || step_result::fail_steps(&pool, &worker_id, &failures)).await;
            recorded.extend(written.into_iter().flatten());
        }
        if !successes.is_empty() {
            let capacity = reservation.capacity();
            let written =
                with_retry(successes.len(), || complete(&pool, &worker_id, &successes, &continuation, capacity)).await;
            if let Some(written) = written {
                recorded.extend(written.recorded);
                announced_left = written.announced_left;
                reservation.extend(written.extra);
                continuation.start(written.claimed, reservation).await;
            }
        }
        account(&batch, &recorded, announced_left, &stats).await;
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
    recorded: Vec<Recorded>,
    claimed: Vec<StepClaim>,
    /// Free slots taken beyond the batch's own capacity.
    extra: Vec<OwnedSemaphorePermit>,
    /// Step channels the worker notified for the dependents it left enqueued;
    /// `None` when the completion announced everything it enqueued itself.
    announced_left: Option<u64>,
}

/// Records successes and, in the same statement (one transaction, one round
/// trip), claims work with the batch's `capacity` (0 once shutdown began:
/// then it only records, announcing what it enqueues itself). The completion
/// starts up to `capacity` of the dependents it makes runnable, for this
/// worker (one update a step, continuing their tasks, unless a step of
/// higher priority waits where the worker claims from); the claim then takes
/// those up and fills what is left of `capacity`, topped up with free slots
/// when the dependents it enqueued need more, or, when the claim loop is
/// waiting for capacity, with every free slot the worker's limit allows
/// (which grows as the handlers' times let it prefetch): the enqueued
/// dependents first, then any ready step. It claims only when the completion
/// started or enqueued dependents or the claim loop is waiting for capacity
/// (so an idle worker does not look for work twice). The dependents it
/// leaves, and only those, are announced to other workers
/// (`step_result::complete_and_claim` makes these decisions in SQL). The
/// free slots are reserved before the statement, so that what it claims
/// has a slot; those it does not use go back when the claims start.
async fn complete(
    pool: &PgPool,
    worker_id: &str,
    successes: &[Success],
    continuation: &Continuation,
    capacity: usize,
) -> tasker_shared::Result<Completed> {
    if capacity == 0 {
        let recorded = step_result::complete_steps(pool, worker_id, successes).await?;
        return Ok(Completed { recorded, claimed: Vec::new(), extra: Vec::new(), announced_left: None });
    }
    // The flag first: a claim loop that stops for lack of capacity after
    // this read finds the slots reserved below gone, and is woken when the
    // unused ones go back.
    let backlog = continuation.backlog();
    let extra = continuation.take_free(usize::MAX);
    let claim = ClaimWith {
        capacity,
        free: extra.len(),
        backlog,
        namespace: continuation.namespace(),
        lease: continuation.lease(),
    };
    let continued = step_result::complete_and_claim(pool, worker_id, successes, claim).await?;
    Ok(Completed {
        recorded: continued.recorded,
        claimed: continued.claimed,
        extra,
        announced_left: Some(continued.announced),
    })
}

/// Metrics, statistics and logs for a recorded batch; `announced_left` as in
/// [`Completed`].
async fn account(
    batch: &[Outcome],
    recorded: &[Recorded],
    announced_left: Option<u64>,
    stats: &SampledStatisticsCollector,
) {
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
    // Started dependents were enqueued and claimed at once.
    let enqueued: usize = recorded.iter().map(|r| r.enqueued_dependents.len() + r.started_dependents.len()).sum();
    if enqueued > 0 {
        metrics::counter_by(names::STEPS_ENQUEUED, enqueued as u64);
        // The completion itself notifies each namespace it enqueued in.
        let announced = announced_left.unwrap_or_else(|| {
            let mut namespaces: Vec<&str> = batch
                .iter()
                .filter(|o| {
                    recorded.iter().any(|r| r.step_uuid == o.attempt.step_uuid && !r.enqueued_dependents.is_empty())
                })
                .map(|o| o.namespace.as_str())
                .collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            namespaces.len() as u64
        });
        if announced > 0 {
            metrics::notifications_sent("steps", announced);
        }
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
