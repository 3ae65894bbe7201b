//! The orchestrator loop: claim due tasks, then, for each batch in one
//! transaction, schedule retries, enqueue runnable steps, move task states,
//! finalize what is finished, and release the claims.
//!
//! Every write is fenced by the claim (`claim_seq`), so a pass that outlives its
//! lease changes nothing; and every decision is re-checked by the database
//! (compare-and-set, guard triggers, `claim_task_for_finalization`), so a late,
//! duplicated or missing wake-up cannot corrupt a task.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tasker_shared::claim::{self, DiscoveredVia, Release, TaskClaim};
use tasker_shared::discovery::{Backoff, Discovery};
use tasker_shared::finalize;
use tasker_shared::metrics::{self, names};
use tasker_shared::orchestration::{self, StepSummary, TaskTransition};
use tasker_shared::retry::BackoffPolicy;
use tasker_shared::service::sleep_unless_shutdown;
use tasker_shared::state_machine::TaskState;
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
}

/// What a pass over one batch found out.
#[derive(Debug, Default)]
struct PassOutcome {
    /// Some task was woken while we held it: claim again now.
    still_due: bool,
}

impl Orchestrator {
    /// An orchestrator with id `id` (claims, history and logs use it).
    pub fn new(
        pool: PgPool,
        id: String,
        claim_batch: u32,
        claim_timeout: Duration,
        discovery: Discovery,
    ) -> Self {
        Orchestrator {
            pool,
            id,
            claim_batch: i32::try_from(claim_batch).unwrap_or(64),
            claim_timeout,
            discovery,
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
    /// timer for the next known due time.
    async fn drain(&self, via: DiscoveredVia) -> tasker_shared::Result<()> {
        loop {
            let started = Instant::now();
            let claims = claim::claim_ready_tasks(
                &self.pool,
                &self.id,
                self.claim_batch,
                self.claim_timeout,
                via,
            )
            .await?;
            metrics::claim_duration("tasks", started.elapsed());
            if claims.is_empty() {
                break;
            }
            for c in &claims {
                metrics::task_discovered(via, c.discovery_lag());
            }
            let full = claims.len() == usize::try_from(self.claim_batch).unwrap_or(usize::MAX);
            let outcome = match self.orchestrate(&claims).await {
                Ok(outcome) => outcome,
                Err(err) => {
                    self.release_after_failure(&claims).await;
                    return Err(err);
                }
            };
            if !full && !outcome.still_due {
                break;
            }
        }
        self.arm_timer().await
    }

    /// Sets the discovery timer to the earliest future due time in the
    /// database: a scheduled retry, or a claim that may be abandoned. This is
    /// what lets EventDrivenOnly run retries without polling.
    async fn arm_timer(&self) -> tasker_shared::Result<()> {
        let next = sqlx::query_scalar!(
            "SELECT min(ready_at) FROM tasker.tasks WHERE ready_at > now() AND ready_at IS NOT NULL"
        )
        .fetch_one(&self.pool)
        .await?;
        if let Some(at) = next {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            self.discovery
                .schedule(tokio::time::Instant::now() + wait)
                .await;
        }
        Ok(())
    }

    /// After a failed pass, hands the claims back so another pass can try soon
    /// instead of waiting for the leases to expire. Best effort: if the database
    /// is unreachable, the leases expire on their own.
    async fn release_after_failure(&self, claims: &[TaskClaim]) {
        let releases: Vec<Release> = claims
            .iter()
            .map(|c| Release::of(c, Some(Utc::now())))
            .collect();
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
            orchestration::lock_claimed_tasks(&mut tx, &self.id, claims)
                .await?
                .into_iter()
                .collect();
        let claims: Vec<TaskClaim> = claims
            .iter()
            .filter_map(|c| {
                held.get(&c.task_uuid)
                    .map(|&state| TaskClaim { state, ..c.clone() })
            })
            .collect();
        let uuids: Vec<Uuid> = claims.iter().map(|c| c.task_uuid).collect();

        self.schedule_retries(&mut tx, &uuids).await?;
        let enqueued = orchestration::enqueue_ready_steps(&mut *tx, &self.id, &claims).await?;
        let summaries: HashMap<Uuid, StepSummary> =
            orchestration::summarize_steps(&mut *tx, &uuids)
                .await?
                .into_iter()
                .map(|s| (s.task_uuid, s))
                .collect();

        let mut plans = Vec::with_capacity(claims.len());
        for claim in &claims {
            let Some(summary) = summaries.get(&claim.task_uuid) else {
                continue;
            };
            plans.push((
                claim,
                evaluation::plan(claim.state, &summary.counts, summary.next_retry_at),
            ));
        }

        self.apply_transitions(&mut tx, &plans).await?;
        let to_finalize: Vec<Uuid> = plans
            .iter()
            .filter(|(_, p)| p.finalize)
            .map(|(c, _)| c.task_uuid)
            .collect();
        let finalized = finalize::finalize_tasks(&mut *tx, &to_finalize, &self.id).await?;

        let releases: Vec<Release> = plans
            .iter()
            .map(|(c, p)| Release::of(c, p.next_due))
            .collect();
        let released = claim::release_task_claims(&mut *tx, &self.id, &releases).await?;
        let next_due = plans.iter().filter_map(|(_, p)| p.next_due).min();
        if let Some(at) = next_due {
            announce_due(&mut tx, at).await?;
        }
        tx.commit().await?;

        // Only now, with everything committed, count what happened.
        record_enqueued(&enqueued);
        for f in finalized.iter().filter(|f| f.finalized) {
            let state = f.state.map_or("unknown", TaskState::as_str);
            metrics::counter_with(names::TASKS_FINALIZED, "state", state);
            tracing::debug!(task = %f.task_uuid, state, "task finalized");
        }
        if let Some(at) = next_due {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            self.discovery
                .schedule(tokio::time::Instant::now() + wait)
                .await;
        }
        metrics::orchestration_duration(started.elapsed());
        Ok(PassOutcome {
            still_due: released.iter().any(|r| r.still_due),
        })
    }

    /// Gives failed steps waiting for a retry their retry time (backoff with
    /// jitter, from each step's policy).
    async fn schedule_retries(
        &self,
        tx: &mut sqlx::PgConnection,
        uuids: &[Uuid],
    ) -> tasker_shared::Result<()> {
        let unscheduled = orchestration::unscheduled_retries(&mut *tx, uuids).await?;
        if unscheduled.is_empty() {
            return Ok(());
        }
        let mut rng = fastrand::Rng::new();
        let now = Utc::now();
        let retries: Vec<(Uuid, DateTime<Utc>)> = unscheduled
            .iter()
            .map(|r| {
                let delay = BackoffPolicy::from_millis(r.backoff_ms).delay(r.attempts, &mut rng);
                (
                    r.step_uuid,
                    now + chrono::Duration::from_std(delay).unwrap_or_default(),
                )
            })
            .collect();
        let scheduled = orchestration::schedule_step_retries(&mut *tx, &retries).await?;
        metrics::counter_by(names::STEPS_RETRIED, u64::try_from(scheduled).unwrap_or(0));
        Ok(())
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

fn reason(event: tasker_shared::state_machine::TaskEvent) -> &'static str {
    use tasker_shared::state_machine::TaskEvent as E;
    match event {
        E::Start => "first steps enqueued",
        E::WaitForRetry => "nothing running; waiting for a retry",
        E::Resume => "retry enqueued",
        E::Block => "a step failed permanently; letting running steps finish",
        E::Complete => "all steps complete",
        E::Fail => "a step failed permanently",
        E::Cancel => "cancelled",
    }
}

/// Tells every listening orchestrator when known future work falls due, so
/// their timers cover a retry even if this process stops.
async fn announce_due(tx: &mut sqlx::PgConnection, at: DateTime<Utc>) -> tasker_shared::Result<()> {
    let payload = format!("due:{}", at.timestamp_millis());
    sqlx::query!("SELECT pg_notify(tasker.task_channel(), $1)", payload)
        .execute(&mut *tx)
        .await?;
    metrics::notifications_sent("tasks", 1);
    Ok(())
}

fn record_enqueued(enqueued: &[orchestration::EnqueuedStep]) {
    if enqueued.is_empty() {
        return;
    }
    metrics::counter_by(names::STEPS_ENQUEUED, enqueued.len() as u64);
    let mut namespaces: Vec<&str> = enqueued.iter().map(|e| e.namespace.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    metrics::notifications_sent("steps", namespaces.len() as u64);
}
