//! The worker loop: claim steps of its namespace (or of all namespaces) while
//! it has free capacity (see [`Capacity`]: its concurrency, plus the steps it
//! expects to start soon), run each attempt's handler under a timeout, keep
//! the leases alive with heartbeats, and hand outcomes to the completer.
//!
//! Shutdown: claiming stops at once; claimed attempts (running, or waiting
//! their turn) get until the deadline to finish; whatever has not finished
//! then is cancelled and reported as a retryable failure, so its step runs
//! again elsewhere without waiting for its lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tasker_shared::claim::{self, DiscoveredVia, StepClaim};
use tasker_shared::discovery::{Backoff, Discovery};
use tasker_shared::event_system::{Event, SampledStatisticsCollector};
use tasker_shared::identifier::Identifier;
use tasker_shared::metrics;
use tasker_shared::monitoring::PgNotifyMonitor;
use tasker_shared::service::sleep_unless_shutdown;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use crate::capacity::Capacity;
use crate::completer::{self, Outcome};
use crate::handler::{HandlerRegistry, StepError, StepInput, StepResult};
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
    /// Claimed steps a worker may hold beyond `concurrency`, waiting their
    /// turn; only as many as its handlers' recent mean time starts within
    /// `prefetch_wait`.
    pub prefetch: u32,
    /// How long a prefetched step is expected to wait at most; zero turns
    /// prefetching off.
    pub prefetch_wait: Duration,
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
    monitor: PgNotifyMonitor,
}

/// What each attempt task needs.
#[derive(Debug, Clone)]
struct Shared {
    context: AttemptContext,
    outcomes: mpsc::Sender<Outcome>,
}

/// What each attempt task needs besides the way to report its outcome.
#[derive(Debug, Clone)]
struct AttemptContext {
    registry: Arc<HandlerRegistry>,
    inflight: Arc<InFlight>,
    journal: Option<Arc<Journal>>,
    discovery: Discovery,
    capacity: Arc<Capacity>,
    /// Set when claiming stopped for lack of capacity: work may be waiting,
    /// so a finishing attempt should wake the claim loop.
    backlog: Arc<AtomicBool>,
}

/// Lets the completer claim, in the transaction that records results, the
/// work those results made runnable (and, under load, any ready work), and
/// start it here: a hop along a chain of steps then costs no claim
/// transaction of its own and no notification round trip.
///
/// Capacity: an attempt's slot travels with its outcome and is held until
/// the outcome is recorded; the transaction that records it claims the next
/// work with it, so under load claiming costs no transaction of its own (the
/// claim loop finds no free capacity and waits). The completer also reserves
/// the free slots before it records a batch, and its statement uses as many
/// as the dependents it enqueued need beyond its own (all of them when the
/// claim loop is waiting for capacity); it never claims more than the slots
/// it holds. What it does not use is given back and wakes the claim loop.
#[derive(Debug, Clone)]
pub struct Continuation {
    /// Attempts started here report to the completer; a weak sender, so the
    /// completer's own handle does not keep its channel open at shutdown.
    outcomes: mpsc::WeakSender<Outcome>,
    context: AttemptContext,
    namespace: Option<Identifier>,
    lease: Duration,
    shutdown: CancellationToken,
    stats: SampledStatisticsCollector,
    monitor: PgNotifyMonitor,
}

/// Capacity held by the completer, from the recording of a batch until the
/// attempts claimed with it are started, and a channel for their outcomes
/// (`None` once shutdown began or the channel closed: then nothing is claimed
/// with it). Dropped, it gives the rest back and wakes the claim loop if that
/// waits for capacity.
#[derive(Debug)]
pub struct Reservation {
    permits: Vec<OwnedSemaphorePermit>,
    outcomes: Option<mpsc::Sender<Outcome>>,
    context: AttemptContext,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.permits.is_empty() {
            self.permits.clear();
            self.context.released();
        }
    }
}

impl Reservation {
    /// How many steps may be claimed with it: its slots, as far as the
    /// worker's limit (which follows its handlers' times) still allows.
    pub fn capacity(&self) -> usize {
        if self.outcomes.is_some() { self.context.capacity.usable(self.permits.len()) } else { 0 }
    }

    /// Adds free permits.
    pub fn extend(&mut self, permits: Vec<OwnedSemaphorePermit>) {
        self.permits.extend(permits);
    }
}

impl Continuation {
    /// The permits of a batch's outcomes, to claim with once they are
    /// recorded; with no channel (nothing to claim) once shutdown began.
    pub fn hold(&self, permits: Vec<OwnedSemaphorePermit>) -> Reservation {
        // The completer is running, so the channel is open; holding a sender
        // keeps it open until the claimed steps are started.
        let outcomes = if self.shutdown.is_cancelled() { None } else { self.outcomes.upgrade() };
        Reservation { permits, outcomes, context: self.context.clone() }
    }

    /// Up to `wanted` free slots within the worker's limit, none once
    /// shutdown began. Dropped, they go back like any other slot.
    pub fn take_free(&self, wanted: usize) -> Vec<OwnedSemaphorePermit> {
        if self.shutdown.is_cancelled() || wanted == 0 {
            return Vec::new();
        }
        self.context.capacity.reserve(wanted)
    }

    /// Whether the claim loop last stopped for lack of capacity, so that
    /// ready work may be waiting for this worker: then a completion claims
    /// with all its capacity even when it enqueued nothing.
    pub fn backlog(&self) -> bool {
        self.context.backlog.load(Ordering::Acquire)
    }

    /// Claimed steps whose handler has not returned yet (running, or waiting
    /// for a turn): outcomes that may be about to arrive.
    pub fn unfinished(&self) -> usize {
        self.context.capacity.unfinished()
    }

    /// The namespace this worker claims from (`None`: every namespace).
    pub fn namespace(&self) -> Option<&Identifier> {
        self.namespace.as_ref()
    }

    /// The lease each claim takes.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Starts committed claims, one permit each, and gives the rest back.
    pub async fn start(&self, claims: Vec<StepClaim>, mut reservation: Reservation) {
        let Some(outcomes) = reservation.outcomes.clone().filter(|_| !claims.is_empty()) else {
            // Nothing claimed (a reservation without a channel claims nothing).
            return;
        };
        for claim in &claims {
            self.monitor.record_step_discovery(claim, DiscoveredVia::Event).await;
        }
        let shared = Shared { context: self.context.clone(), outcomes };
        start_attempts(claims, std::mem::take(&mut reservation.permits), &shared, &self.stats).await;
    }
}

impl AttemptContext {
    /// After permits were given back: wakes the claim loop if it stopped for
    /// lack of capacity.
    fn released(&self) {
        // The other half of the claim loop's store-then-look (see `drain`):
        // permits returned, then the flag read, with a SeqCst fence between,
        // so at least one side sees the other's write on any memory model.
        fence(Ordering::SeqCst);
        if self.backlog.load(Ordering::SeqCst) {
            self.discovery.wake(DiscoveredVia::Event);
        }
    }
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
        monitor: PgNotifyMonitor,
    ) -> Self {
        Worker { pool, config, registry: Arc::new(registry), discovery, journal: journal.map(Arc::new), stats, monitor }
    }

    /// Runs until `shutdown`, then drains as described in the module docs.
    pub async fn run(self, shutdown: CancellationToken) {
        let capacity = Arc::new(Capacity::new(
            usize::try_from(self.config.concurrency).unwrap_or(usize::MAX),
            usize::try_from(self.config.prefetch).unwrap_or(usize::MAX),
            self.config.prefetch_wait,
        ));
        let inflight = Arc::new(InFlight::default());
        // Every held step can hand over its outcome without waiting.
        let (outcomes, outcome_rx) = mpsc::channel(capacity.size());
        let shared = Shared {
            context: AttemptContext {
                registry: Arc::clone(&self.registry),
                inflight: Arc::clone(&inflight),
                journal: self.journal.clone(),
                discovery: self.discovery.clone(),
                capacity: Arc::clone(&capacity),
                backlog: Arc::new(AtomicBool::new(false)),
            },
            outcomes,
        };
        let continuation = Continuation {
            outcomes: shared.outcomes.downgrade(),
            context: shared.context.clone(),
            namespace: self.config.namespace.clone(),
            lease: self.config.lease,
            shutdown: shutdown.clone(),
            stats: self.stats.clone(),
            monitor: self.monitor.clone(),
        };
        let completer = tokio::spawn(completer::run(
            self.pool.clone(),
            self.config.id.clone(),
            outcome_rx,
            Arc::clone(&inflight),
            self.stats.clone(),
            continuation,
        ));
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(
            self.pool.clone(),
            self.config.id.clone(),
            Arc::clone(&inflight),
            self.config.lease,
            stop_heartbeat.clone(),
        ));

        let mut backoff = Backoff::new();
        while let Some(via) = self.discovery.next().await {
            match self.drain(via, &shared).await {
                Ok(()) => backoff.reset(),
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in = ?delay, "claiming steps failed; retrying");
                    if !sleep_unless_shutdown(delay, &shutdown).await {
                        break;
                    }
                    self.discovery.wake(via);
                }
            }
        }

        tracing::info!(
            held = inflight.len(),
            waiting = capacity.waiting(),
            "worker stopped claiming; waiting for claimed attempts (running or waiting their turn)"
        );
        let finished = tokio::time::timeout(self.config.shutdown_timeout, capacity.all_returned()).await;
        if finished.is_err() {
            let cancelled = inflight.cancel_all();
            tracing::warn!(cancelled, "shutdown deadline passed; cancelled attempts are released for retry");
            let _ = tokio::time::timeout(Duration::from_secs(5), capacity.all_returned()).await;
        }
        drop(shared);
        let _ = completer.await;
        stop_heartbeat.cancel();
        let _ = heartbeat.await;
        tracing::info!("worker stopped");
    }

    /// Claims while there is capacity and work; `via` is what woke it.
    async fn drain(&self, via: DiscoveredVia, shared: &Shared) -> tasker_shared::Result<()> {
        let capacity = &shared.context.capacity;
        loop {
            // Attempts give capacity back one by one, often many within
            // microseconds (when the completer takes a batch, every attempt
            // waiting to hand over its outcome finishes). Let those that are
            // ready run first, so that one claim takes what they free.
            tokio::task::yield_now().await;
            // Capacity first: the completer claims too (see `Continuation`).
            let mut reserved = capacity.reserve(usize::MAX);
            if reserved.is_empty() {
                shared.context.backlog.store(true, Ordering::SeqCst);
                // An attempt may have finished before the flag was up; look
                // again. The fence orders the flag's store before this look,
                // as `released` orders its permits before its read of the
                // flag: without both, each side could miss the other's write
                // (allowed on weakly ordered CPUs), and the loop would sleep
                // with capacity free and work waiting.
                fence(Ordering::SeqCst);
                reserved = capacity.reserve(usize::MAX);
                if reserved.is_empty() {
                    return Ok(());
                }
            }
            shared.context.backlog.store(false, Ordering::Release);

            let started = Instant::now();
            let free = reserved.len();
            let claims = claim::claim_steps(
                &self.pool,
                &self.config.id,
                self.config.namespace.as_ref(),
                i32::try_from(free).unwrap_or(i32::MAX),
                self.config.lease,
                via,
            )
            .await?;
            let claim_elapsed = started.elapsed();
            metrics::claim_duration("steps", claim_elapsed);
            self.stats.record(Event::ClaimCycle, claim_elapsed).await;
            for claim in &claims {
                self.monitor.record_step_discovery(claim, via).await;
            }
            let drained = claims.len() < free;
            start_attempts(claims, reserved, shared, &self.stats).await;
            metrics::add_processing_time(started.elapsed());
            if drained {
                return Ok(());
            }
        }
    }
}

/// Starts an attempt per claim (counted in the statistics), each holding one
/// permit, which it hands over with its outcome; permits left over are given
/// back.
async fn start_attempts(
    claims: Vec<StepClaim>,
    permits: Vec<OwnedSemaphorePermit>,
    shared: &Shared,
    stats: &SampledStatisticsCollector,
) {
    for _ in &claims {
        stats.record(Event::StepStarted, Duration::ZERO).await;
    }
    let mut permits = permits.into_iter();
    for claim in claims {
        let Some(permit) = permits.next() else {
            // Cannot happen: capacity is reserved before claiming.
            tracing::error!(step = %claim.step_uuid, "no capacity for a claimed step; its lease will expire");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if !run_attempt(claim, permit, &shared).await {
                // Not handed over: the permit went back with the outcome.
                shared.context.released();
            }
        });
    }
    if permits.len() > 0 {
        drop(permits);
        shared.context.released();
    }
}

/// Runs one attempt to an outcome and hands it, with the attempt's permit, to
/// the completer; false when the completer was gone.
async fn run_attempt(claim: StepClaim, permit: OwnedSemaphorePermit, shared: &Shared) -> bool {
    let attempt = claim.attempt_ref();
    let cancelled = shared.context.inflight.insert(attempt);
    // A prefetched step waits here for a handler turn (first come, first
    // served); its lease is kept alive meanwhile, and cancelling it stops
    // the wait.
    let turn = tokio::select! {
        biased;
        () = cancelled.cancelled() => None,
        turn = shared.context.capacity.turn() => Some(turn),
    };
    let (result, elapsed) = match turn {
        None => (
            Err(StepError::retryable(
                "attempt stopped before its handler started: lease lost, task cancelled, or worker shutting down",
            )),
            Duration::ZERO,
        ),
        Some(turn) => {
            if let Some(journal) = &shared.context.journal {
                journal.record(&claim);
            }
            metrics::step_started(&claim.handler);
            let started = Instant::now();
            let result = run_handler(&claim, &cancelled, &shared.context.registry).await;
            let elapsed = started.elapsed();
            drop(turn);
            shared.context.capacity.observe(elapsed);
            metrics::step_duration(&claim.handler, elapsed);
            (result, elapsed)
        }
    };
    shared.context.inflight.mark_finished(&attempt);
    let outcome = Outcome {
        attempt,
        task_uuid: claim.task_uuid,
        handler: claim.handler,
        namespace: claim.namespace,
        result,
        elapsed,
        permit: Some(permit),
    };
    if shared.outcomes.send(outcome).await.is_err() {
        tracing::error!(step = %attempt.step_uuid, "completer stopped before the outcome was recorded");
        return false;
    }
    true
}

/// Runs the claim's handler under its timeout, in a task of its own so that
/// a panic fails the attempt instead of the worker.
async fn run_handler(claim: &StepClaim, cancelled: &CancellationToken, registry: &HandlerRegistry) -> StepResult {
    let Some(handler) = registry.get(&claim.handler).cloned() else {
        return Err(StepError::retryable(format!(
            "no handler `{}` is registered on this worker (registered: {})",
            claim.handler,
            registry.names().collect::<Vec<_>>().join(", ")
        )));
    };
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
