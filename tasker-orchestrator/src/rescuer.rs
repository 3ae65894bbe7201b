//! The lease rescuer: finds step attempts whose worker stopped heartbeating
//! (died, hung, partitioned) and fails them retryably, so their steps run
//! again once the lease has expired. Runs in every orchestrator, whatever its
//! deployment mode: an expired lease announces itself to nobody.
//!
//! Many orchestrators may run it at once; `expire_step_leases` skips rows
//! another rescuer holds, so they share the work instead of colliding.

use std::time::Duration;

use sqlx::PgPool;
use tasker_shared::event_system::{Event, SampledStatisticsCollector};
use tasker_shared::metrics::{self, names};
use tasker_shared::orchestration;
use tasker_shared::state_machine::StepState;
use tokio_util::sync::CancellationToken;

/// Attempts failed per call at most.
const BATCH: i32 = 500;

/// Runs the rescuer every `interval` until `shutdown`.
pub async fn run(
    pool: PgPool,
    actor: String,
    interval: Duration,
    stats: SampledStatisticsCollector,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        loop {
            match orchestration::expire_step_leases(&pool, &actor, BATCH).await {
                Ok(expired) => {
                    for step in &expired {
                        stats.record(Event::StepLeaseExpired, Duration::ZERO).await;
                        tracing::warn!(
                            step = %step.step_uuid, task = %step.task_uuid, now = %step.state,
                            "step lease expired: its worker stopped heartbeating"
                        );
                    }
                    if !expired.is_empty() {
                        metrics::counter_by(names::STEP_LEASES_EXPIRED, expired.len() as u64);
                        let tasks = expired.iter().map(|s| s.task_uuid).collect::<std::collections::HashSet<_>>();
                        metrics::tasks_made_ready("rescue", tasks.len() as u64);
                        metrics::notifications_sent("tasks", 1);
                        let failed = expired.iter().filter(|s| s.state == StepState::Error).count();
                        if failed > 0 {
                            tracing::warn!(failed, "steps out of attempts after lease expiry");
                        }
                    }
                    if expired.len() < usize::try_from(BATCH).unwrap_or(usize::MAX) {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "lease rescue failed; will retry");
                    break;
                }
            }
        }
    }
}
