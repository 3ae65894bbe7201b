//! Every metric Tasker exports, in one place: names, help texts, buckets, and
//! the small functions the rest of the code calls to record them.
//!
//! Names follow Prometheus conventions (`tasker_` prefix, `_total` for counters,
//! `_seconds` for durations). Labels are bounded: a service, a mode, a discovery
//! source, a handler or namespace name, never a task or step id. The list with
//! meanings is in `docs/metrics.md`.

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::claim::DiscoveredVia;

/// Metric names.
pub mod names {
    /// Gauge (1) with labels service, mode, instance.
    pub const INFO: &str = "tasker_info";
    /// Counter: notifications sent, by channel kind.
    pub const NOTIFICATIONS_SENT: &str = "tasker_notifications_sent_total";
    /// Counter: notifications received by this process's listener.
    pub const NOTIFICATIONS_RECEIVED: &str = "tasker_notifications_received_total";
    /// Counter: times a task was made due for orchestration, by source.
    pub const TASKS_MADE_READY: &str = "tasker_tasks_made_ready_total";
    /// Counter: tasks claimed by this orchestrator, by discovery source.
    pub const TASKS_DISCOVERED: &str = "tasker_tasks_discovered_total";
    /// Histogram: ready_since to claim, by discovery source.
    pub const DISCOVERY_LAG: &str = "tasker_discovery_lag_seconds";
    /// Counter: notifications no listener acted on (see `docs/metrics.md`).
    pub const NOTIFY_MISSES: &str = "tasker_notify_misses_total";
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
    gauge!(names::INFO, "service" => service.to_owned(), "mode" => mode.to_owned(), "instance" => instance.to_owned())
        .set(1.0);
    Ok(handle)
}

fn describe() {
    use names::*;
    describe_gauge!(INFO, "Always 1; labels name the service, its deployment mode and instance id.");
    describe_counter!(NOTIFICATIONS_SENT, "NOTIFY messages this process caused, by channel kind (tasks, steps).");
    describe_counter!(NOTIFICATIONS_RECEIVED, "Notifications received by this process's LISTEN connection.");
    describe_counter!(TASKS_MADE_READY, "Times this process made a task due for orchestration, by source.");
    describe_counter!(TASKS_DISCOVERED, "Tasks claimed by this orchestrator, by how they were discovered.");
    describe_histogram!(
        DISCOVERY_LAG,
        Unit::Seconds,
        "Time from a task becoming due to its claim, by discovery source."
    );
    describe_counter!(
        NOTIFY_MISSES,
        "Due tasks that no listener acted on: claimed by a poll or sweep later than the miss threshold."
    );
    describe_gauge!(LISTENER_CONNECTED, "1 while this process's LISTEN connection is up, else 0.");
    describe_counter!(LISTENER_RECONNECTS, "Times this process's LISTEN connection was re-established.");
    describe_counter!(TASKS_FINALIZED, "Tasks this orchestrator finalized, by final state.");
    describe_counter!(STEPS_STARTED, "Step attempts started (handler invocations) by this worker, by handler.");
    describe_counter!(STEPS_COMPLETED, "Step attempts that succeeded and were recorded, by handler.");
    describe_counter!(STEPS_FAILED, "Step attempts that failed and were recorded, by handler and retryability.");
    describe_counter!(STEPS_RETRIED, "Step retries scheduled by this orchestrator.");
    describe_counter!(STEP_RESULTS_REJECTED, "Step outcomes rejected by the fence (stale attempt or cancelled step).");
    describe_counter!(STEP_LEASES_EXPIRED, "Step attempts failed by this process's rescuer after their lease expired.");
    describe_histogram!(STEP_DURATION, Unit::Seconds, "Handler run time, by handler.");
    describe_histogram!(CLAIM_DURATION, Unit::Seconds, "Duration of one claim call, by kind (tasks, steps).");
    describe_histogram!(
        ORCHESTRATION_DURATION,
        Unit::Seconds,
        "Duration of one orchestration pass over a batch of claimed tasks."
    );
    describe_counter!(STEPS_ENQUEUED, "Steps enqueued by this orchestrator.");
    describe_gauge!(DB_POOL_CONNECTIONS, "Connections in this process's database pool, by state (in_use, idle).");
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
    histogram!(names::DISCOVERY_LAG, "via" => via.as_str()).record(lag.as_secs_f64());
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
