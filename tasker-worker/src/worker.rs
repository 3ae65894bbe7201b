//! The worker loop: claim steps of its namespace (or of all namespaces) while
//! it has free capacity, run each attempt's handler under a timeout, keep the
//! leases alive with heartbeats, and hand outcomes to the completer.
//!
//! Shutdown: claiming stops at once; running attempts get until the deadline
//! to finish; whatever still runs then is cancelled and reported as a retryable
//! failure, so its step runs again elsewhere without waiting for its lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tasker_shared::claim::{self, DiscoveredVia, StepClaim};
use tasker_shared::discovery::{Backoff, Discovery};
use tasker_shared::event_system::{Event, SampledStatisticsCollector};
use tasker_shared::identifier::Identifier;
use tasker_shared::metrics;
use tasker_shared::service::sleep_unless_shutdown;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::completer::{self, Outcome};
use crate::handler::{HandlerRegistry, StepError, StepInput};
use crate::inflight::InFlight;
use crate::journal::Journal;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Names this worker in leases, history and logs.
    pub id: String,
    /// Only this namespace's steps; all namespaces when `None`.
    pub namespace: Option<Identifier>,
    /// Attempts run at once.
    pub concurrency: u32,
    /// Lease per attempt; heartbeats renew it every third of it.
    pub lease: Duration,
    /// How long shutdown waits for running attempts.
    pub shutdown_timeout: Duration,
}

/// A worker, ready to [`run`](Worker::run).
#[derive(Debug)]
pub struct Worker {
    pool: PgPool,
    config: WorkerConfig,
    registry: Arc<HandlerRegistry>,
    discovery: Discovery,
    journal: Option<Arc<Journal>>,
    stats: SampledStatisticsCollector,
}

/// What each attempt task needs.
#[derive(Debug, Clone)]
struct Shared {
    registry: Arc<HandlerRegistry>,
    inflight: Arc<InFlight>,
    outcomes: mpsc::Sender<Outcome>,
    journal: Option<Arc<Journal>>,
    discovery: Discovery,
    /// Set when claiming stopped for lack of capacity: work may be waiting,
    /// so a finishing attempt should wake the claim loop.
    backlog: Arc<AtomicBool>,
}

impl Worker {
    /// A worker over `pool`, running handlers from `registry`.
    pub fn new(
        pool: PgPool,
        config: WorkerConfig,
        registry: HandlerRegistry,
        discovery: Discovery,
        journal: Option<Journal>,
        stats: SampledStatisticsCollector,
    ) -> Self {
        Worker { pool, config, registry: Arc::new(registry), discovery, journal: journal.map(Arc::new), stats }
    }

    /// Runs until `shutdown`, then drains as described in the module docs.
    pub async fn run(self, shutdown: CancellationToken) {
        let concurrency = usize::try_from(self.config.concurrency).unwrap_or(1).max(1);
        let permits = Arc::new(Semaphore::new(concurrency));
        let inflight = Arc::new(InFlight::default());
        let (outcomes, outcome_rx) = mpsc::channel(concurrency * 2);
        let completer = tokio::spawn(completer::run(
            self.pool.clone(),
            self.config.id.clone(),
            outcome_rx,
            Arc::clone(&inflight),
            self.stats.clone(),
        ));
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(
            self.pool.clone(),
            self.config.id.clone(),
            Arc::clone(&inflight),
            self.config.lease,
            stop_heartbeat.clone(),
        ));
        let shared = Shared {
            registry: Arc::clone(&self.registry),
            inflight: Arc::clone(&inflight),
            outcomes,
            journal: self.journal.clone(),
            discovery: self.discovery.clone(),
            backlog: Arc::new(AtomicBool::new(false)),
        };

        let mut backoff = Backoff::new();
        while self.discovery.next().await.is_some() {
            match self.drain(&permits, &shared).await {
                Ok(()) => backoff.reset(),
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in = ?delay, "claiming steps failed; retrying");
                    if !sleep_unless_shutdown(delay, &shutdown).await {
                        break;
                    }
                    self.discovery.wake(DiscoveredVia::Event);
                }
            }
        }

        tracing::info!(running = inflight.len(), "worker stopped claiming; waiting for running attempts");
        let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
        let finished = tokio::time::timeout(self.config.shutdown_timeout, permits.acquire_many(all)).await;
        if finished.is_err() {
            let cancelled = inflight.cancel_all();
            tracing::warn!(cancelled, "shutdown deadline passed; cancelled attempts are released for retry");
            let _ = tokio::time::timeout(Duration::from_secs(5), permits.acquire_many(all)).await;
        }
        drop(shared);
        let _ = completer.await;
        stop_heartbeat.cancel();
        let _ = heartbeat.await;
        tracing::info!("worker stopped");
    }

    /// Claims while there is capacity and work.
    async fn drain(&self, permits: &Arc<Semaphore>, shared: &Shared) -> tasker_shared::Result<()> {
        loop {
            let mut free = permits.available_permits();
            if free == 0 {
                shared.backlog.store(true, Ordering::Release);
                // An attempt may have finished before the flag was up; look again.
                free = permits.available_permits();
                if free == 0 {
                    return Ok(());
                }
            }
            shared.backlog.store(false, Ordering::Release);

            let started = Instant::now();
            let claims = claim::claim_steps(
                &self.pool,
                &self.config.id,
                self.config.namespace.as_ref(),
                i32::try_from(free).unwrap_or(i32::MAX),
                self.config.lease,
            )
            .await?;
            let claim_elapsed = started.elapsed();
            metrics::claim_duration("steps", claim_elapsed);
            self.stats.record(Event::ClaimCycle, claim_elapsed).await;
            for _ in &claims {
                self.stats.record(Event::StepStarted, Duration::ZERO).await;
            }
            metrics::add_processing_time(started.elapsed());
            let drained = claims.len() < free;
            for claim in claims {
                let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
                    // Cannot happen: only this loop takes permits.
                    tracing::error!(step = %claim.step_uuid, "no capacity for a claimed step; its lease will expire");
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    run_attempt(claim, &shared).await;
                    drop(permit);
                    if shared.backlog.load(Ordering::Acquire) {
                        shared.discovery.wake(DiscoveredVia::Event);
                    }
                });
            }
            if drained {
                return Ok(());
            }
        }
    }
}

/// Runs one attempt to an outcome and hands it to the completer.
async fn run_attempt(claim: StepClaim, shared: &Shared) {
    let attempt = claim.attempt_ref();
    let cancelled = shared.inflight.insert(attempt);
    if let Some(journal) = &shared.journal {
        journal.record(&claim);
    }
    metrics::step_started(&claim.handler);
    let started = Instant::now();

    let result = match shared.registry.get(&claim.handler).cloned() {
        None => Err(StepError::retryable(format!(
            "no handler `{}` is registered on this worker (registered: {})",
            claim.handler,
            shared.registry.names().collect::<Vec<_>>().join(", ")
        ))),
        Some(handler) => {
            let input = StepInput {
                step_uuid: claim.step_uuid,
                task_uuid: claim.task_uuid,
                step_name: claim.name.clone(),
                attempt: claim.attempt,
                max_attempts: claim.max_attempts,
                config: claim.config.clone(),
                context: claim.task_context.clone(),
                dependency_results: claim.dependency_results.clone(),
                cancelled: cancelled.clone(),
            };
            // Its own task, so that a panicking handler fails the attempt
            // instead of the worker.
            let task = tokio::spawn(handler.run(input));
            let abort = task.abort_handle();
            tokio::select! {
                joined = tokio::time::timeout(claim.timeout(), task) => match joined {
                    Ok(Ok(result)) => result,
                    Ok(Err(join)) => Err(StepError::retryable(format!("handler panicked: {join}"))),
                    Err(_) => {
                        abort.abort();
                        Err(StepError::retryable(format!("timed out after {} ms", claim.timeout_ms)))
                    }
                },
                () = cancelled.cancelled() => {
                    abort.abort();
                    Err(StepError::retryable("attempt stopped: lease lost, task cancelled, or worker shutting down"))
                }
            }
        }
    };
    let elapsed = started.elapsed();
    metrics::step_duration(&claim.handler, elapsed);
    shared.inflight.mark_finished(&attempt);
    let outcome = Outcome {
        attempt,
        task_uuid: claim.task_uuid,
        handler: claim.handler,
        namespace: claim.namespace,
        result,
        elapsed,
    };
    if shared.outcomes.send(outcome).await.is_err() {
        tracing::error!(step = %attempt.step_uuid, "completer stopped before the outcome was recorded");
    }
}

/// Extends the leases of owned attempts every third of the lease; cancels
/// attempts whose lease the database no longer grants.
async fn heartbeat(pool: PgPool, worker_id: String, inflight: Arc<InFlight>, lease: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(lease / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let owned = inflight.snapshot();
        if owned.is_empty() {
            continue;
        }
        match claim::extend_step_leases(&pool, &worker_id, &owned, lease).await {
            Ok(extended) => {
                for attempt in owned.iter().filter(|a| !extended.contains(&a.step_uuid)) {
                    if inflight.lose(attempt) {
                        tracing::warn!(step = %attempt.step_uuid, attempt = attempt.attempt, "lease lost (step cancelled or taken over); stopping the attempt");
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, attempts = owned.len(), "heartbeat failed; leases may expire")
            }
        }
    }
}
