//! The orchestrator loop: claim due tasks, then, for each batch in one
//! transaction, schedule retries, enqueue runnable steps, move task states,
//! finalize what is finished, and release the claims.
//!
//! Every write is fenced by the claim (`claim_seq`), so a pass that outlives its
//! lease changes nothing; and every decision is re-checked by the database
//! (compare-and-set, guard triggers, `claim_task_for_finalization`), so a late,
//! duplicated or missing wake-up cannot corrupt a task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tasker_shared::claim::{self, DiscoveredVia, Release, TaskClaim};
use tasker_shared::discovery::{Backoff, Discovery};
use tasker_shared::event_system::{Event, SampledStatisticsCollector};
use tasker_shared::finalize;
use tasker_shared::metrics::{self, names};
use tasker_shared::monitoring::PgNotifyMonitor;
use tasker_shared::orchestration::{self, StepSummary, TaskTransition};
use tasker_shared::retry::BackoffPolicy;
use tasker_shared::service::sleep_unless_shutdown;
use tasker_shared::state_machine::{TaskEvent, TaskState};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::evaluation;

/// Claims and orchestrates tasks until shutdown.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    pool: PgPool,
    id: String,
    claim_batch: i32,
    claim_timeout: Duration,
    discovery: Discovery,
    stats: SampledStatisticsCollector,
    monitor: PgNotifyMonitor,
    /// Reading the next due time from the database (see `arm_timer`).
    arming: Arc<Mutex<Arming>>,
}

/// How often, at most, the next due time is read from the database unless the
/// timer fired. Retries this process schedules arm the timer directly, and
/// other processes' arrive as hints; the read catches the rest (retries after
/// the earliest, abandoned claims, lost hints).
const ARM_INTERVAL: Duration = Duration::from_secs(1);

/// The first wait before looking again at a task found due but left
/// unclaimed (it fell due after the claim looked, or another transaction held
/// its row). It doubles while that keeps happening, up to [`ARM_INTERVAL`],
/// so a row held for long costs a claim a second, not a busy loop.
const DUE_AGAIN: Duration = Duration::from_millis(5);

/// State of the reads of the next due time.
#[derive(Debug)]
struct Arming {
    /// When the last read succeeded.
    last_read: Option<Instant>,
    /// The wait for a task found due but unclaimed (see [`DUE_AGAIN`]).
    due_again: Duration,
}

/// What a pass over one batch found out.
#[derive(Debug, Default)]
struct PassOutcome {
    /// Some task was woken while we held it: claim again now.
    still_due: bool,
}

/// What a committed pass did, for metrics and statistics.
#[derive(Debug, Default)]
struct PassRecord {
    enqueued: usize,
    namespaces_notified: usize,
    due_announced: bool,
    retry_delays: Vec<Duration>,
    finalized: Vec<(Uuid, TaskState, DateTime<Utc>)>,
}

impl Orchestrator {
    /// An orchestrator with id `id` (claims, history and logs use it).
    pub fn new(
        pool: PgPool,
        id: String,
        claim_batch: u32,
        claim_timeout: Duration,
        discovery: Discovery,
        stats: SampledStatisticsCollector,
        monitor: PgNotifyMonitor,
    ) -> Self {
        Orchestrator {
            pool,
            id,
            claim_batch: i32::try_from(claim_batch).unwrap_or(64),
            claim_timeout,
            discovery,
            stats,
            monitor,
            arming: Arc::new(Mutex::new(Arming { last_read: None, due_again: DUE_AGAIN })),
        }
    }

    /// Runs until `shutdown`: waits for a wake-up, then drains due work.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        while let Some(via) = self.discovery.next().await {
            match self.drain(via).await {
                Ok(()) => backoff.reset(),
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in = ?delay, "orchestration failed; retrying");
                    if !sleep_unless_shutdown(delay, &shutdown).await {
                        break;
                    }
                    self.discovery.wake(via);
                }
            }
        }
        tracing::info!("orchestrator stopped claiming");
    }

    /// Claims and processes batches until no due task is left, then arms the
    /// timer for the next known due time. Once the timer fired (or after a
    /// sweep) it always reads that time from the database: the timer holds
    /// one time, the earliest, so the retries that fall due after it are
    /// known only there.
    async fn drain(&self, via: DiscoveredVia) -> tasker_shared::Result<()> {
        loop {
            let iteration = Instant::now();
            let claims =
                claim::claim_ready_tasks(&self.pool, &self.id, self.claim_batch, self.claim_timeout, via).await?;
            let claim_elapsed = iteration.elapsed();
            metrics::claim_duration("tasks", claim_elapsed);
            self.stats.record(Event::ClaimCycle, claim_elapsed).await;
            if claims.is_empty() {
                metrics::add_processing_time(iteration.elapsed());
                break;
            }
            for c in &claims {
                self.monitor.record_discovery(c, via).await;
            }
            let full = claims.len() == usize::try_from(self.claim_batch).unwrap_or(usize::MAX);
            let outcome = match self.orchestrate(&claims).await {
                Ok(outcome) => outcome,
                Err(err) => {
                    self.release_after_failure(&claims).await;
                    return Err(err);
                }
            };
            metrics::add_processing_time(iteration.elapsed());
            if !full && !outcome.still_due {
                break;
            }
        }
        let timer_fired = self.discovery.timer_fired();
        self.arm_timer(timer_fired || via == DiscoveredVia::Sweep).await
    }

    /// Sets the discovery timer to the earliest due time in the database (as
    /// `due_tasks` defines due): a scheduled retry, a claim that may be
    /// abandoned, or a task already due that the last claim did not take
    /// (see [`DUE_AGAIN`]). This is what lets EventDrivenOnly run retries
    /// without polling. Unless `forced`, it reads at most once per
    /// [`ARM_INTERVAL`], and otherwise sets the timer for when the next read
    /// is allowed, so a read always follows. The wait is measured on the
    /// database's clock.
    async fn arm_timer(&self, forced: bool) -> tasker_shared::Result<()> {
        let last_read = self.arming.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last_read;
        if let Some(last_read) = last_read.filter(|at| !forced && at.elapsed() < ARM_INTERVAL) {
            self.discovery.schedule((last_read + ARM_INTERVAL).into()).await;
            return Ok(());
        }
        // A claimed task falls due when its claim expires: a wake-up during
        // the claim moves ready_at, not the claim, and ready_at is never later
        // than the claim's expiry.
        let wait_ms = sqlx::query_scalar!(
            "SELECT (extract(epoch FROM min(GREATEST(ready_at, claim_expires_at)) - now()) * 1000)::float8
             FROM tasker.tasks WHERE ready_at IS NOT NULL"
        )
        .fetch_one(&self.pool)
        .await?;
        let wait = {
            let mut arming = self.arming.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            arming.last_read = Some(Instant::now());
            match wait_ms {
                Some(ms) if ms <= 0.0 => {
                    let wait = arming.due_again;
                    arming.due_again = (wait * 2).min(ARM_INTERVAL);
                    Some(wait)
                }
                Some(ms) => {
                    arming.due_again = DUE_AGAIN;
                    Duration::try_from_secs_f64(ms / 1000.0).ok()
                }
                None => {
                    arming.due_again = DUE_AGAIN;
                    None
                }
            }
        };
        if let Some(wait) = wait {
            tracing::debug!(?wait, forced, "timer armed from the database");
            self.discovery.schedule(tokio::time::Instant::now() + wait).await;
        }
        Ok(())
    }

    /// Sets the discovery timer for `at`, a retry time a pass computed on its
    /// host's clock. If the clocks disagree and the timer fires early, the
    /// cost is a claim that finds nothing and a read (the timer fired).
    async fn schedule_at(&self, at: DateTime<Utc>) {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        self.discovery.schedule(tokio::time::Instant::now() + wait).await;
    }

    /// After a failed pass, hands the claims back so another pass can try soon
    /// instead of waiting for the leases to expire. Best effort: if the database
    /// is unreachable, the leases expire on their own.
    async fn release_after_failure(&self, claims: &[TaskClaim]) {
        let releases: Vec<Release> = claims.iter().map(|c| Release::of(c, Some(Utc::now()))).collect();
        if let Err(err) = claim::release_task_claims(&self.pool, &self.id, &releases).await {
            tracing::warn!(error = %err, tasks = claims.len(), "could not release claims; they expire by themselves");
        }
    }

    /// One pass over a batch of claims, in one transaction.
    async fn orchestrate(&self, claims: &[TaskClaim]) -> tasker_shared::Result<PassOutcome> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;

        // Task rows first (the schema's lock order); drop claims we lost.
        let held: HashMap<Uuid, TaskState> =
            orchestration::lock_claimed_tasks(&mut tx, &self.id, claims).await?.into_iter().collect();
        let claims: Vec<TaskClaim> = claims
            .iter()
            .filter_map(|c| held.get(&c.task_uuid).map(|&state| TaskClaim { state, ..c.clone() }))
            .collect();
        let uuids: Vec<Uuid> = claims.iter().map(|c| c.task_uuid).collect();

        let retry_delays = self.schedule_retries(&mut tx, &uuids).await?;
        let enqueued = orchestration::enqueue_ready_steps(&mut *tx, &self.id, &claims).await?;
        let summaries: HashMap<Uuid, StepSummary> =
            orchestration::summarize_steps(&mut *tx, &uuids).await?.into_iter().map(|s| (s.task_uuid, s)).collect();

        let mut plans = Vec::with_capacity(claims.len());
        for claim in &claims {
            let Some(summary) = summaries.get(&claim.task_uuid) else { continue };
            plans.push((claim, evaluation::plan(claim.state, &summary.counts, summary.next_retry_at)));
        }

        self.apply_transitions(&mut tx, &plans).await?;
        let to_finalize: Vec<Uuid> = plans.iter().filter(|(_, p)| p.finalize).map(|(c, _)| c.task_uuid).collect();
        let finalized = finalize::finalize_tasks(&mut *tx, &to_finalize, &self.id).await?;

        let releases: Vec<Release> = plans.iter().map(|(c, p)| Release::of(c, p.next_due)).collect();
        let released = claim::release_task_claims(&mut *tx, &self.id, &releases).await?;
        let next_due = plans.iter().filter_map(|(_, p)| p.next_due).min();
        if let Some(at) = next_due {
            announce_due(&mut tx, at).await?;
        }
        tx.commit().await?;

        // Only now, with everything committed, count what happened.
        let created: HashMap<Uuid, DateTime<Utc>> = claims.iter().map(|c| (c.task_uuid, c.created_at)).collect();
        let record = PassRecord {
            enqueued: enqueued.len(),
            namespaces_notified: notified_namespaces(&enqueued),
            due_announced: next_due.is_some(),
            retry_delays,
            finalized: finalized
                .iter()
                .filter(|f| f.finalized)
                .filter_map(|f| Some((f.task_uuid, f.state?, *created.get(&f.task_uuid)?)))
                .collect(),
        };
        if let Some(at) = next_due {
            self.schedule_at(at).await;
        }
        self.account(&record, started.elapsed()).await;
        Ok(PassOutcome { still_due: released.iter().any(|r| r.still_due) })
    }

    /// Metrics and statistics for a committed pass.
    async fn account(&self, record: &PassRecord, pass: Duration) {
        metrics::orchestration_duration(pass);
        if record.enqueued > 0 {
            metrics::counter_by(names::STEPS_ENQUEUED, record.enqueued as u64);
            self.stats.record(Event::StepsEnqueued, pass).await;
        }
        if record.namespaces_notified > 0 {
            metrics::notifications_sent("steps", record.namespaces_notified as u64);
        }
        if record.due_announced {
            metrics::notifications_sent("tasks", 1);
        }
        for _ in 0..record.namespaces_notified + usize::from(record.due_announced) {
            self.stats.record(Event::NotificationSent, pass).await;
        }
        if !record.retry_delays.is_empty() {
            metrics::counter_by(names::STEPS_RETRIED, record.retry_delays.len() as u64);
        }
        for delay in &record.retry_delays {
            self.stats.record(Event::StepRetried, *delay).await;
        }
        for (task, state, created_at) in &record.finalized {
            metrics::counter_with(names::TASKS_FINALIZED, "state", state.as_str());
            tracing::debug!(task = %task, state = %state, "task finalized");
            let latency = (Utc::now() - *created_at).to_std().unwrap_or_default();
            self.stats.record(Event::TaskFinalized, latency).await;
        }
    }

    /// Gives failed steps waiting for a retry their retry time (backoff with
    /// jitter, from each step's policy); returns the delays chosen.
    async fn schedule_retries(
        &self,
        tx: &mut sqlx::PgConnection,
        uuids: &[Uuid],
    ) -> tasker_shared::Result<Vec<Duration>> {
        let unscheduled = orchestration::unscheduled_retries(&mut *tx, uuids).await?;
        if unscheduled.is_empty() {
            return Ok(Vec::new());
        }
        let mut rng = fastrand::Rng::new();
        let now = Utc::now();
        let delays: Vec<Duration> =
            unscheduled.iter().map(|r| BackoffPolicy::from_millis(r.backoff_ms).delay(r.attempts, &mut rng)).collect();
        let retries: Vec<(Uuid, DateTime<Utc>)> = unscheduled
            .iter()
            .zip(&delays)
            .map(|(r, delay)| (r.step_uuid, now + chrono::Duration::from_std(*delay).unwrap_or_default()))
            .collect();
        orchestration::schedule_step_retries(&mut *tx, &retries).await?;
        Ok(delays)
    }

    /// Applies the plans' transitions; plans have at most two events, applied
    /// as two rounds of compare-and-set.
    async fn apply_transitions(
        &self,
        tx: &mut sqlx::PgConnection,
        plans: &[(&TaskClaim, evaluation::Plan)],
    ) -> tasker_shared::Result<()> {
        for round in 0..2 {
            let transitions: Vec<TaskTransition> = plans
                .iter()
                .filter_map(|(claim, plan)| {
                    let event = *plan.events.get(round)?;
                    let mut from = claim.state;
                    for earlier in &plan.events[..round] {
                        from = from.apply(*earlier).ok()?;
                    }
                    let to = from.apply(event).ok()?;
                    Some(TaskTransition {
                        task_uuid: claim.task_uuid,
                        claim_seq: claim.claim_seq,
                        from,
                        to,
                        reason: reason(event).to_owned(),
                    })
                })
                .collect();
            if transitions.is_empty() {
                break;
            }
            orchestration::transition_tasks(&mut *tx, &self.id, &transitions).await?;
        }
        Ok(())
    }
}

fn reason(event: TaskEvent) -> &'static str {
    match event {
        TaskEvent::Start => "first steps enqueued",
        TaskEvent::WaitForRetry => "nothing running; waiting for a retry",
        TaskEvent::Resume => "retry enqueued",
        TaskEvent::Block => "a step failed permanently; letting running steps finish",
        TaskEvent::Complete => "all steps complete",
        TaskEvent::Fail => "a step failed permanently",
        TaskEvent::Cancel => "cancelled",
    }
}

/// Tells every listening orchestrator when known future work falls due, so
/// their timers cover a retry even if this process stops.
async fn announce_due(tx: &mut sqlx::PgConnection, at: DateTime<Utc>) -> tasker_shared::Result<()> {
    // Rounded up: a hint a fraction of a millisecond early wakes its
    // listeners before the task is due, for a claim that finds nothing.
    let payload = format!("due:{}", due_hint_millis(at));
    sqlx::query!("SELECT pg_notify(tasker.task_channel(), $1)", payload).execute(&mut *tx).await?;
    Ok(())
}

/// `at` in Unix milliseconds, rounded up: never before `at`.
fn due_hint_millis(at: DateTime<Utc>) -> i64 {
    (at.timestamp_micros() + 999).div_euclid(1000)
}

/// How many step channels `enqueue_ready_steps` notified: one per namespace.
fn notified_namespaces(enqueued: &[orchestration::EnqueuedStep]) -> usize {
    let mut namespaces: Vec<&str> = enqueued.iter().map(|e| e.namespace.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    namespaces.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_hints_are_never_early() {
        let exact = DateTime::from_timestamp_micros(1_700_000_000_123_000).unwrap();
        assert_eq!(due_hint_millis(exact), 1_700_000_000_123);
        let within = DateTime::from_timestamp_micros(1_700_000_000_123_001).unwrap();
        assert_eq!(due_hint_millis(within), 1_700_000_000_124);
    }
}
