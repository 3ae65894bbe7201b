//! Every metric Tasker exports, in one place: names, help texts, buckets, and
//! the small functions the rest of the code calls to record them.
//!
//! Names follow Prometheus conventions (`tasker_` prefix, `_total` for counters,
//! `_seconds` for durations). Labels are bounded: a service, a mode, a discovery
//! source, a handler or namespace name, never a task or step id. The list with
//! meanings is in `docs/metrics.md`.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::claim::DiscoveredVia;

/// Metric names.
pub mod names {
    /// Gauge (1) with labels service, mode, instance_id.
    pub const INFO: &str = "tasker_info";
    /// Counter: notifications sent, by channel kind.
    pub const NOTIFICATIONS_SENT: &str = "tasker_notifications_sent_total";
    /// Counter: notifications received by this process's listener.
    pub const NOTIFICATIONS_RECEIVED: &str = "tasker_notifications_received_total";
    /// Counter: times a task was made due for orchestration, by source.
    pub const TASKS_MADE_READY: &str = "tasker_tasks_made_ready_total";
    /// Counter: tasks claimed by this orchestrator, by discovery source.
    pub const TASKS_DISCOVERED: &str = "tasker_tasks_discovered_total";
    /// Counter: steps claimed by this worker, by discovery source.
    pub const STEPS_DISCOVERED: &str = "tasker_steps_discovered_total";
    /// Histogram: due (a task's ready_since, a step's enqueued_at) to claim, by
    /// channel kind and discovery source.
    pub const DISCOVERY_LAG: &str = "tasker_discovery_lag_seconds";
    /// Counter: notifications no listener acted on (see `docs/metrics.md`), by channel kind and discovery source.
    pub const NOTIFY_MISSES: &str = "tasker_notify_misses_total";
    /// Counter: claims that took over an expired claim (a dead or hung orchestrator's).
    pub const CLAIMS_TAKEN_OVER: &str = "tasker_claims_taken_over_total";
    /// Gauge: tasks due, unclaimed and older than the miss threshold.
    pub const NOTIFY_OVERDUE: &str = "tasker_notify_overdue_tasks";
    /// Gauge: steps enqueued, unclaimed, older than the miss threshold.
    pub const NOTIFY_OVERDUE_STEPS: &str = "tasker_notify_overdue_steps";
    /// Gauge: tasks due for orchestration, by namespace.
    pub const DUE_TASKS: &str = "tasker_due_tasks";
    /// Gauge: steps enqueued and waiting for a worker, by namespace.
    pub const ENQUEUED_STEPS: &str = "tasker_enqueued_steps";
    /// Gauge: 1 while the LISTEN connection is up.
    pub const LISTENER_CONNECTED: &str = "tasker_listener_connected";
    /// Counter: LISTEN connections re-established.
    pub const LISTENER_RECONNECTS: &str = "tasker_listener_reconnects_total";
    /// Counter: tasks finalized, by final state.
    pub const TASKS_FINALIZED: &str = "tasker_tasks_finalized_total";
    /// Counter: step attempts started (handler invocations), by handler.
    pub const STEPS_STARTED: &str = "tasker_steps_started_total";
    /// Counter: attempts that succeeded, by handler.
    pub const STEPS_COMPLETED: &str = "tasker_steps_completed_total";
    /// Counter: attempts that failed, by handler and whether retryable.
    pub const STEPS_FAILED: &str = "tasker_steps_failed_total";
    /// Counter: retries scheduled by orchestrators.
    pub const STEPS_RETRIED: &str = "tasker_steps_retried_total";
    /// Counter: outcomes the fence rejected (stale attempt, cancelled step).
    pub const STEP_RESULTS_REJECTED: &str = "tasker_step_results_rejected_total";
    /// Counter: attempts failed by the rescuer after their lease expired.
    pub const STEP_LEASES_EXPIRED: &str = "tasker_step_leases_expired_total";
    /// Histogram: handler run time, by handler.
    pub const STEP_DURATION: &str = "tasker_step_duration_seconds";
    /// Histogram: one claim call, by kind (tasks, steps).
    pub const CLAIM_DURATION: &str = "tasker_claim_duration_seconds";
    /// Histogram: one orchestration pass over a batch of claimed tasks.
    pub const ORCHESTRATION_DURATION: &str = "tasker_orchestration_pass_seconds";
    /// Counter: steps enqueued by orchestrators.
    pub const STEPS_ENQUEUED: &str = "tasker_steps_enqueued_total";
    /// Gauge: connections of this process's pool, by state (in_use, idle).
    pub const DB_POOL_CONNECTIONS: &str = "tasker_db_pool_connections";
    /// Counter: statistics samples lost, by reason.
    pub const STATISTICS_DROPPED: &str = "tasker_statistics_samples_dropped_total";
    /// Counter: statistics samples written to the database.
    pub const STATISTICS_WRITTEN: &str = "tasker_statistics_samples_written_total";
    /// Gauge: cumulative seconds spent recording statistics on processing paths.
    pub const STATISTICS_RECORDING: &str = "tasker_statistics_recording_seconds";
    /// Gauge: cumulative seconds spent in processing operations (claims,
    /// orchestration passes, outcome writes), statistics included.
    pub const PROCESSING: &str = "tasker_processing_seconds";
}

/// Bucket bounds (seconds) for latencies from sub-millisecond to a minute.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Discovery lag spans event latency (ms) to poll intervals and outages (minutes).
const LAG_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Installs the process-wide Prometheus recorder and describes every metric.
/// Call once, at start-up; returns the handle `/metrics` renders.
pub fn install(service: &str, mode: &str, instance: &str) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(names::DISCOVERY_LAG.into()), LAG_BUCKETS)
        .and_then(|b| b.set_buckets(LATENCY_BUCKETS))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    gauge!(names::INFO, "service" => service.to_owned(), "mode" => mode.to_owned(), "instance_id" => instance.to_owned())
        .set(1.0);
    Ok(handle)
}

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count.
    Counter,
    /// A level.
    Gauge,
    /// A distribution with buckets.
    Histogram,
}

/// Every metric: name, kind and help text. `docs/metrics.md` documents each
/// (a test checks it mentions them all).
pub const CATALOG: &[(&str, Kind, &str)] = {
    use names::*;
    &[
        (INFO, Kind::Gauge, "Always 1; labels name the service, its deployment mode and instance id (instance_id)."),
        (NOTIFICATIONS_SENT, Kind::Counter, "NOTIFY messages this process caused, by channel kind (tasks, steps)."),
        (NOTIFICATIONS_RECEIVED, Kind::Counter, "Notifications received by this process's LISTEN connection."),
        (TASKS_MADE_READY, Kind::Counter, "Times this process made a task due for orchestration, by source."),
        (TASKS_DISCOVERED, Kind::Counter, "Tasks claimed by this orchestrator, by how they were discovered."),
        (STEPS_DISCOVERED, Kind::Counter, "Steps claimed by this worker, by how they were discovered."),
        (
            DISCOVERY_LAG,
            Kind::Histogram,
            "Time from work becoming due (a task due, a step enqueued) to its claim, by channel kind and discovery source.",
        ),
        (
            NOTIFY_MISSES,
            Kind::Counter,
            "Missed notifications: tasks or steps found by a poll, sweep or timer more than the miss threshold after they became due, by channel kind and source.",
        ),
        (
            CLAIMS_TAKEN_OVER,
            Kind::Counter,
            "Task claims that took over an expired claim (its orchestrator died or hung).",
        ),
        (
            NOTIFY_OVERDUE,
            Kind::Gauge,
            "Tasks due, unclaimed and waiting longer than the miss threshold (sampled on a timer).",
        ),
        (
            NOTIFY_OVERDUE_STEPS,
            Kind::Gauge,
            "Steps enqueued, unclaimed and waiting longer than the miss threshold (sampled on a timer).",
        ),
        (DUE_TASKS, Kind::Gauge, "Tasks due for orchestration, by namespace (sampled on a timer)."),
        (ENQUEUED_STEPS, Kind::Gauge, "Steps enqueued and waiting for a worker, by namespace (sampled on a timer)."),
        (LISTENER_CONNECTED, Kind::Gauge, "1 while this process's LISTEN connection is up, else 0."),
        (LISTENER_RECONNECTS, Kind::Counter, "Times this process's LISTEN connection was re-established."),
        (
            TASKS_FINALIZED,
            Kind::Counter,
            "Tasks this process finalized, by final state (workers: the completion of a task's last step).",
        ),
        (STEPS_STARTED, Kind::Counter, "Step attempts started (handler invocations) by this worker, by handler."),
        (STEPS_COMPLETED, Kind::Counter, "Step attempts that succeeded and were recorded, by handler."),
        (STEPS_FAILED, Kind::Counter, "Step attempts that failed and were recorded, by handler and retryability."),
        (STEPS_RETRIED, Kind::Counter, "Step retries scheduled by this orchestrator."),
        (
            STEP_RESULTS_REJECTED,
            Kind::Counter,
            "Step outcomes rejected by the fence (stale attempt or cancelled step).",
        ),
        (
            STEP_LEASES_EXPIRED,
            Kind::Counter,
            "Step attempts failed by this process's rescuer after their lease expired.",
        ),
        (STEP_DURATION, Kind::Histogram, "Handler run time, by handler."),
        (CLAIM_DURATION, Kind::Histogram, "Duration of one claim call, by kind (tasks, steps)."),
        (ORCHESTRATION_DURATION, Kind::Histogram, "Duration of one orchestration pass over a batch of claimed tasks."),
        (
            STEPS_ENQUEUED,
            Kind::Counter,
            "Steps this process enqueued: orchestrators a task's first steps and retries, workers the dependents a completion made runnable.",
        ),
        (DB_POOL_CONNECTIONS, Kind::Gauge, "Connections in this process's database pool, by state (in_use, idle)."),
        (
            STATISTICS_DROPPED,
            Kind::Counter,
            "Statistics samples lost, by reason (buffer_full, contended, write_failed).",
        ),
        (STATISTICS_WRITTEN, Kind::Counter, "Statistics samples written to the database."),
        (STATISTICS_RECORDING, Kind::Gauge, "Cumulative time spent recording statistics on processing paths."),
        (
            PROCESSING,
            Kind::Gauge,
            "Cumulative time spent in processing operations (claims, orchestration passes, outcome writes), statistics included.",
        ),
    ]
};

fn describe() {
    for &(name, kind, help) in CATALOG {
        match kind {
            Kind::Counter => describe_counter!(name, help),
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Histogram => describe_histogram!(name, help),
        }
    }
}

/// The LISTEN connection went up or down.
pub fn listener_connected(connected: bool) {
    gauge!(names::LISTENER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

/// The LISTEN connection was re-established.
pub fn listener_reconnected() {
    counter!(names::LISTENER_RECONNECTS).increment(1);
}

/// A notification arrived on a channel of `kind`.
pub fn notification_received(kind: &'static str) {
    counter!(names::NOTIFICATIONS_RECEIVED, "channel_kind" => kind).increment(1);
}

/// This process caused `n` notifications on channels of `kind`.
pub fn notifications_sent(kind: &'static str, n: u64) {
    counter!(names::NOTIFICATIONS_SENT, "channel_kind" => kind).increment(n);
}

/// This process made `n` tasks due, because of `source`.
pub fn tasks_made_ready(source: &'static str, n: u64) {
    counter!(names::TASKS_MADE_READY, "source" => source).increment(n);
}

/// A task was claimed after waiting `lag`.
pub fn task_discovered(via: DiscoveredVia, lag: Duration) {
    counter!(names::TASKS_DISCOVERED, "via" => via.as_str()).increment(1);
    histogram!(names::DISCOVERY_LAG, "channel_kind" => "tasks", "via" => via.as_str()).record(lag.as_secs_f64());
}

/// A step was claimed after waiting `lag` since it was enqueued.
pub fn step_discovered(via: DiscoveredVia, lag: Duration) {
    counter!(names::STEPS_DISCOVERED, "via" => via.as_str()).increment(1);
    histogram!(names::DISCOVERY_LAG, "channel_kind" => "steps", "via" => via.as_str()).record(lag.as_secs_f64());
}

/// Records how long a claim call took.
pub fn claim_duration(kind: &'static str, elapsed: Duration) {
    histogram!(names::CLAIM_DURATION, "kind" => kind).record(elapsed.as_secs_f64());
}

/// Samples the pool's connection counts.
pub fn pool_connections(pool: &sqlx::PgPool) {
    let size = f64::from(pool.size());
    let idle = pool.num_idle() as f64;
    gauge!(names::DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
    gauge!(names::DB_POOL_CONNECTIONS, "state" => "in_use").set((size - idle).max(0.0));
}

/// Adds `n` to a counter without labels.
pub fn counter_by(name: &'static str, n: u64) {
    counter!(name).increment(n);
}

/// Adds one to a counter with one label.
pub fn counter_with(name: &'static str, label: &'static str, value: &str) {
    counter!(name, label => value.to_owned()).increment(1);
}

/// Records one orchestration pass.
pub fn orchestration_duration(elapsed: Duration) {
    histogram!(names::ORCHESTRATION_DURATION).record(elapsed.as_secs_f64());
}

/// An attempt of `handler` failed.
pub fn step_failed(handler: &str, retryable: bool) {
    counter!(names::STEPS_FAILED, "handler" => handler.to_owned(), "retryable" => if retryable { "true" } else { "false" })
        .increment(1);
}

/// An attempt of `handler` started.
pub fn step_started(handler: &str) {
    counter!(names::STEPS_STARTED, "handler" => handler.to_owned()).increment(1);
}

/// An attempt of `handler` ran for `elapsed`.
pub fn step_duration(handler: &str, elapsed: Duration) {
    histogram!(names::STEP_DURATION, "handler" => handler.to_owned()).record(elapsed.as_secs_f64());
}

/// Nanoseconds spent in processing operations, process-wide.
static PROCESSING_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Adds the duration of one processing operation (claim, orchestration pass,
/// outcome write), statistics calls inside it included.
pub fn add_processing_time(elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    PROCESSING_NANOS.fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
}

/// Total time this process has spent in processing operations.
pub fn processing_time() -> Duration {
    Duration::from_nanos(PROCESSING_NANOS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Publishes the cumulative time gauges (called when `/metrics` renders).
pub fn export_cumulative_times() {
    gauge!(names::PROCESSING).set(processing_time().as_secs_f64());
    gauge!(names::STATISTICS_RECORDING).set(crate::event_system::sampled_statistics::recording_time().as_secs_f64());
}

/// A claim found `via` a poll or sweep was a missed notification on a
/// channel of `kind` (tasks, steps).
pub fn notify_miss(kind: &'static str, via: DiscoveredVia) {
    counter!(names::NOTIFY_MISSES, "channel_kind" => kind, "via" => via.as_str()).increment(1);
}

/// The overdue-work levels: tasks due and steps enqueued, unclaimed past the
/// miss threshold.
pub fn overdue_work(tasks: i64, steps: i64) {
    gauge!(names::NOTIFY_OVERDUE).set(tasks as f64);
    gauge!(names::NOTIFY_OVERDUE_STEPS).set(steps as f64);
}

/// Due-work depth of one namespace.
pub fn due_work(namespace: &str, due_tasks: i64, enqueued_steps: i64) {
    gauge!(names::DUE_TASKS, "namespace" => namespace.to_owned()).set(due_tasks as f64);
    gauge!(names::ENQUEUED_STEPS, "namespace" => namespace.to_owned()).set(enqueued_steps as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_in_docs_metrics_md() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
            .expect("docs/metrics.md exists");
        for (name, _, help) in CATALOG {
            assert!(doc.contains(&format!("`{name}`")), "docs/metrics.md does not document {name}");
            assert!(!help.is_empty());
            assert!(name.starts_with("tasker_"), "{name}");
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for (name, kind, _) in CATALOG {
            match kind {
                Kind::Counter => assert!(name.ends_with("_total"), "{name}"),
                Kind::Gauge | Kind::Histogram => assert!(!name.ends_with("_total"), "{name}"),
            }
        }
    }
}
