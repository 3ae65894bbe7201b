//! `PgNotifyMonitor`: is PG_NOTIFY delivering?
//!
//! NOTIFY is at most once: a listener that is disconnected (or was never
//! there) misses what was sent meanwhile, and the work waits until a poll or a
//! catch-up sweep finds it. Work is announced on two kinds of channel, and the
//! monitor looks at every claim on both: orchestrators' task claims (the task
//! channel) and workers' step claims (the namespaces' step channels, on which
//! a new task's first steps and every dependent are announced).
//!
//! - It records how the work was found (event, poll, sweep, timer) and the lag
//!   from when it became due (a task's `ready_since`, a step's `enqueued_at`)
//!   to the claim (`tasker_tasks_discovered_total{via}`,
//!   `tasker_steps_discovered_total{via}`,
//!   `tasker_discovery_lag_seconds{channel_kind, via}`).
//! - A **miss** is work found by anything but a notification (a poll, a
//!   catch-up sweep, or a timer that happened to fire) more than the miss
//!   threshold after it became due (`tasker_notify_misses_total{channel_kind,
//!   via}`). A poll or sweep that merely races a listener on fresh work claims
//!   it well within the threshold and is not a miss; a notification that
//!   reached a listener is claimed by an event, however late; and a task whose
//!   previous claim expired waited for a dead orchestrator, not for a
//!   notification (`tasker_claims_taken_over_total` counts those). The default
//!   threshold (2 s) is far above the event path's lag (milliseconds) and well
//!   below polling replicas' intervals (the plan's 5 s).
//! - Lags above the warning level (the plan's 30 s) of work not found by a
//!   notification are logged at warn with the work's id.
//!
//! Misses must also be seen where no instance polls: [`run_checks`] counts, on
//! a timer, tasks that are due and unclaimed, and steps enqueued and
//! unclaimed, for longer than the threshold (`tasker_notify_overdue_tasks`,
//! `tasker_notify_overdue_steps`: gauges, levels, so work later claimed by a
//! poll is not counted twice), and samples due-work depth per namespace
//! (`tasker_due_tasks`, `tasker_enqueued_steps`).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::claim::{DiscoveredVia, StepClaim, TaskClaim};
use crate::config::MonitoringSettings;
use crate::event_system::{Event, SampledStatisticsCollector};
use crate::metrics;

/// Watches discovery for missed notifications.
#[derive(Debug, Clone)]
pub struct PgNotifyMonitor {
    miss_threshold: Duration,
    warn_after: Duration,
    stats: SampledStatisticsCollector,
}

impl PgNotifyMonitor {
    /// A monitor with the configured threshold and warning level.
    pub fn new(settings: &MonitoringSettings, stats: SampledStatisticsCollector) -> Self {
        PgNotifyMonitor { miss_threshold: settings.miss_threshold(), warn_after: settings.warn_after(), stats }
    }

    /// Whether a claim found `via` after waiting `lag` is a missed notification;
    /// `took_over`: the previous claim had expired.
    pub fn is_miss(&self, via: DiscoveredVia, lag: Duration, took_over: bool) -> bool {
        via != DiscoveredVia::Event && !took_over && lag > self.miss_threshold
    }

    /// Records how a claimed task was discovered; returns whether it was a miss.
    pub async fn record_discovery(&self, claim: &TaskClaim, via: DiscoveredVia) -> bool {
        let lag = claim.discovery_lag();
        metrics::task_discovered(via, lag);
        self.stats.record(Event::TaskClaimed, lag).await;
        if claim.took_over {
            metrics::counter_by(metrics::names::CLAIMS_TAKEN_OVER, 1);
        }
        self.judge(Channel::Tasks, claim.task_uuid, via, lag, claim.took_over).await
    }

    /// Records how a claimed step was discovered; returns whether it was a miss.
    pub async fn record_step_discovery(&self, claim: &StepClaim, via: DiscoveredVia) -> bool {
        let lag = claim.discovery_lag();
        metrics::step_discovered(via, lag);
        self.judge(Channel::Steps, claim.step_uuid, via, lag, false).await
    }

    async fn judge(&self, channel: Channel, subject: Uuid, via: DiscoveredVia, lag: Duration, took_over: bool) -> bool {
        let miss = self.is_miss(via, lag, took_over);
        if miss {
            metrics::notify_miss(channel.kind(), via);
            self.stats.record(Event::NotifyMiss, lag).await;
        }
        if via != DiscoveredVia::Event && lag > self.warn_after {
            let what = channel.subject();
            tracing::warn!(
                id = %subject, lag = ?lag, via = %via,
                "{what} was due for {lag:?} before it was discovered; likely a missed PG_NOTIFY"
            );
        }
        miss
    }
}

/// The kind of channel work was announced on.
#[derive(Debug, Clone, Copy)]
enum Channel {
    Tasks,
    Steps,
}

impl Channel {
    /// The `channel_kind` label.
    fn kind(self) -> &'static str {
        match self {
            Channel::Tasks => "tasks",
            Channel::Steps => "steps",
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Channel::Tasks => "task",
            Channel::Steps => "step",
        }
    }
}

/// Samples, every `settings.interval_ms`, the overdue-work gauge and due-work
/// depth per namespace, until shutdown. Cheap: both read only the partial
/// indexes over due work.
pub async fn run_checks(pool: PgPool, settings: MonitoringSettings, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(settings.interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(err) = check(&pool, settings.miss_threshold()).await {
            tracing::debug!(error = %err, "monitoring check failed");
        }
    }
}

async fn check(pool: &PgPool, threshold: Duration) -> crate::Result<()> {
    let overdue = sqlx::query!(
        r#"SELECT tasker.overdue_tasks($1) AS "tasks!", tasker.overdue_steps($1) AS "steps!""#,
        threshold as Duration
    )
    .fetch_one(pool)
    .await?;
    metrics::overdue_work(overdue.tasks, overdue.steps);
    let depth = sqlx::query!(
        r#"SELECT namespace AS "namespace!", due_tasks AS "due_tasks!", enqueued_steps AS "enqueued_steps!"
           FROM tasker.due_work_by_namespace()"#
    )
    .fetch_all(pool)
    .await?;
    for row in depth {
        metrics::due_work(&row.namespace, row.due_tasks, row.enqueued_steps);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StatisticsSettings;

    fn monitor() -> PgNotifyMonitor {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let settings =
            StatisticsSettings { mode: crate::event_system::StatisticsMode::Off, ..StatisticsSettings::default() };
        let (stats, _) = SampledStatisticsCollector::start(&settings, pool, "t", CancellationToken::new());
        PgNotifyMonitor::new(&MonitoringSettings::default(), stats)
    }

    #[tokio::test]
    async fn only_late_discoveries_by_anything_but_a_notification_are_misses() {
        let m = monitor();
        let late = Duration::from_secs(3);
        let fresh = Duration::from_millis(40);
        assert!(m.is_miss(DiscoveredVia::Poll, late, false));
        assert!(m.is_miss(DiscoveredVia::Sweep, late, false));
        assert!(m.is_miss(DiscoveredVia::Timer, late, false), "overdue work a timer happened to find");
        assert!(!m.is_miss(DiscoveredVia::Poll, fresh, false), "a poller racing a listener on fresh work");
        assert!(!m.is_miss(DiscoveredVia::Timer, fresh, false), "a retry claimed when due");
        assert!(!m.is_miss(DiscoveredVia::Event, late, false), "a notification that arrived, however late");
        assert!(!m.is_miss(DiscoveredVia::Poll, late, true), "waiting for a dead orchestrator's claim to expire");
    }
}
