//! `SampledStatisticsCollector`: statistics that never hold up processing.
//!
//! - **Sampling.** Each [`Event`] has a [`Priority`]; each priority a rate
//!   (default urgent 1.0, high 0.5, normal 0.1, low 0.01). Deciding is one
//!   thread-local random number and a compare: no lock, no allocation.
//! - **A bounded ring buffer** (`ringbuf`) holds sampled records. Its producer
//!   is shared by every thread behind a `Mutex` that is only ever *tried*: if
//!   the buffer is full, or another thread is pushing at that instant, the
//!   sample is dropped and counted, never waited for.
//! - **A background writer** drains the buffer in batches (one multi-row
//!   `INSERT ... SELECT FROM unnest(...)` each) when a batch is ready or the
//!   flush interval passes, retries a failed write a few times and then drops
//!   the batch (counted), and flushes everything on shutdown.
//! - **Modes.** `sampled` (default), `off`, and `synchronous`: every event
//!   written inline with three writes (sample, per-event totals, hourly
//!   rollup), as the system before sampling did, kept only to measure against.
//!
//! Time spent in [`SampledStatisticsCollector::record`] is accumulated (see
//! [`recording_time`]); with [`crate::metrics::processing_time`] it gives the
//! share of processing time spent on statistics, in production as in the
//! benchmark (`tasker_statistics_recording_seconds`, `tasker_processing_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events::{Event, Priority};
use crate::config::StatisticsSettings;

/// The statistics mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatisticsMode {
    /// Sampled per priority into a ring buffer, written in the background (default).
    Sampled,
    /// Nothing recorded.
    Off,
    /// Every event written inline, several writes each: the old way, kept only
    /// as a baseline to measure against.
    Synchronous,
}

impl StatisticsMode {
    /// The name used in configuration.
    pub const fn as_str(self) -> &'static str {
        match self {
            StatisticsMode::Sampled => "sampled",
            StatisticsMode::Off => "off",
            StatisticsMode::Synchronous => "synchronous",
        }
    }
}

/// One sampled event: fixed-size and `Copy`, so pushing it allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    event: Event,
    latency_us: u64,
    at_unix_us: i64,
}

/// Why samples were lost (the `reason` label of the drop counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The ring buffer was full.
    BufferFull,
    /// Another thread was pushing at that instant.
    Contended,
    /// The database rejected the batch after retries.
    WriteFailed,
}

impl DropReason {
    const ALL: [DropReason; 3] = [DropReason::BufferFull, DropReason::Contended, DropReason::WriteFailed];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::Contended => "contended",
            DropReason::WriteFailed => "write_failed",
        }
    }
}

/// Nanoseconds spent inside `record` calls, process-wide.
static RECORDING_NANOS: AtomicU64 = AtomicU64::new(0);

/// Total time this process has spent recording statistics on its hot paths.
pub fn recording_time() -> Duration {
    Duration::from_nanos(RECORDING_NANOS.load(Ordering::Relaxed))
}

struct Inner {
    mode: StatisticsMode,
    /// Per priority: sample when a uniform `u64` is below this; `u64::MAX` means always.
    thresholds: [u64; 4],
    rates: [f64; 4],
    producer: Mutex<HeapProd<Sample>>,
    flush_batch: usize,
    writer_wake: Notify,
    dropped: [AtomicU64; 3],
    written: AtomicU64,
    instance_id: String,
    pool: PgPool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("mode", &self.mode)
            .field("rates", &self.rates)
            .field("flush_batch", &self.flush_batch)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// Records statistics about [`Event`]s as configured; cheap to clone.
#[derive(Debug, Clone)]
pub struct SampledStatisticsCollector {
    inner: Arc<Inner>,
}

/// The background writer, to await on shutdown (it flushes, then ends).
#[derive(Debug)]
pub struct Writer(tokio::task::JoinHandle<()>);

impl Writer {
    /// Waits until the writer has flushed and stopped.
    pub async fn finished(self) {
        let _ = self.0.await;
    }
}

impl SampledStatisticsCollector {
    /// A collector, and (in `sampled` mode) its background writer, which runs
    /// until `shutdown` and then flushes what is buffered.
    pub fn start(
        settings: &StatisticsSettings,
        pool: PgPool,
        instance_id: &str,
        shutdown: CancellationToken,
    ) -> (Self, Option<Writer>) {
        let (producer, consumer) = HeapRb::<Sample>::new(settings.buffer_capacity.max(1)).split();
        let rates = [
            settings.sample_rate_urgent,
            settings.sample_rate_high,
            settings.sample_rate_normal,
            settings.sample_rate_low,
        ];
        let collector = SampledStatisticsCollector {
            inner: Arc::new(Inner {
                mode: settings.mode,
                thresholds: rates.map(threshold),
                rates,
                producer: Mutex::new(producer),
                flush_batch: settings.flush_batch.max(1),
                writer_wake: Notify::new(),
                dropped: Default::default(),
                written: AtomicU64::new(0),
                instance_id: instance_id.to_owned(),
                pool,
            }),
        };
        let writer = (settings.mode == StatisticsMode::Sampled).then(|| {
            let interval = Duration::from_millis(settings.flush_interval_ms);
            Writer(tokio::spawn(run_writer(collector.clone(), consumer, interval, shutdown)))
        });
        (collector, writer)
    }

    /// The mode in force.
    pub fn mode(&self) -> StatisticsMode {
        self.inner.mode
    }

    /// Records `event`, the way the mode says: sampled (never waits), not at
    /// all, or synchronously (waits for the writes). Time spent here counts as
    /// statistics time.
    pub async fn record(&self, event: Event, latency: Duration) {
        let started = Instant::now();
        match self.inner.mode {
            StatisticsMode::Off => {}
            StatisticsMode::Sampled => {
                self.record_if_sampled(event, latency);
            }
            StatisticsMode::Synchronous => self.write_synchronously(event, latency).await,
        }
        let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        RECORDING_NANOS.fetch_add(spent, Ordering::Relaxed);
    }

    /// The sampled path: decides by priority and, if sampled, pushes into the
    /// ring buffer. Never blocks; allocates nothing. Returns whether the event
    /// was kept.
    pub fn record_if_sampled(&self, event: Event, latency: Duration) -> bool {
        if !self.should_sample(event.priority()) {
            return false;
        }
        let sample = Sample {
            event,
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            at_unix_us: unix_micros(),
        };
        let Ok(mut producer) = self.inner.producer.try_lock() else {
            self.drop_one(DropReason::Contended);
            return false;
        };
        if producer.try_push(sample).is_err() {
            drop(producer);
            self.drop_one(DropReason::BufferFull);
            return false;
        }
        let waiting = producer.occupied_len();
        drop(producer);
        if waiting == self.inner.flush_batch {
            self.inner.writer_wake.notify_one();
        }
        true
    }

    fn should_sample(&self, priority: Priority) -> bool {
        let threshold = self.inner.thresholds[priority as usize];
        threshold == u64::MAX || fastrand::u64(..) < threshold
    }

    fn drop_one(&self, reason: DropReason) {
        self.inner.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Samples lost, by reason, since start.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.inner.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// Samples written to the database since start.
    pub fn written(&self) -> u64 {
        self.inner.written.load(Ordering::Relaxed)
    }

    /// Publishes the counters as metrics (called when `/metrics` renders).
    pub fn export_metrics(&self) {
        for reason in DropReason::ALL {
            metrics::counter!(crate::metrics::names::STATISTICS_DROPPED, "reason" => reason.as_str())
                .absolute(self.dropped(reason));
        }
        metrics::counter!(crate::metrics::names::STATISTICS_WRITTEN).absolute(self.written());
    }

    /// Synchronous mode: three inline writes per event, as before sampling.
    async fn write_synchronously(&self, event: Event, latency: Duration) {
        let latency_us = i64::try_from(latency.as_micros()).unwrap_or(i64::MAX);
        let pool = &self.inner.pool;
        let writes = async {
            sqlx::query!(
                "INSERT INTO tasker.statistics_samples (recorded_at, event_type, priority, latency_us, sample_rate, instance_id)
                 VALUES (now(), $1, $2, $3, 1.0, $4)",
                event.as_str(),
                event.priority().as_str(),
                latency_us,
                self.inner.instance_id,
            )
            .execute(pool)
            .await?;
            sqlx::query!(
                "INSERT INTO tasker.statistics_totals AS t (event_type, events, total_latency_us, max_latency_us, updated_at)
                 VALUES ($1, 1, $2, $2, now())
                 ON CONFLICT (event_type) DO UPDATE
                 SET events = t.events + 1, total_latency_us = t.total_latency_us + $2,
                     max_latency_us = greatest(t.max_latency_us, $2), updated_at = now()",
                event.as_str(),
                latency_us,
            )
            .execute(pool)
            .await?;
            sqlx::query!(
                "INSERT INTO tasker.statistics_hourly AS h (event_type, hour, events, total_latency_us)
                 VALUES ($1, date_trunc('hour', now()), 1, $2)
                 ON CONFLICT (event_type, hour) DO UPDATE
                 SET events = h.events + 1, total_latency_us = h.total_latency_us + $2",
                event.as_str(),
                latency_us,
            )
            .execute(pool)
            .await?;
            Ok::<_, sqlx::Error>(())
        };
        match writes.await {
            Ok(()) => {
                self.inner.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                self.drop_one(DropReason::WriteFailed);
                tracing::debug!(error = %err, "synchronous statistics write failed");
            }
        }
    }

    /// Writes one batch: a single multi-row insert.
    async fn write_batch(&self, batch: &[Sample]) -> Result<(), sqlx::Error> {
        let mut at = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut priorities = Vec::with_capacity(batch.len());
        let mut latencies = Vec::with_capacity(batch.len());
        let mut rates = Vec::with_capacity(batch.len());
        for sample in batch {
            at.push(sample.at_unix_us);
            events.push(sample.event.as_str());
            let priority = sample.event.priority();
            priorities.push(priority.as_str());
            latencies.push(i64::try_from(sample.latency_us).unwrap_or(i64::MAX));
            rates.push(self.inner.rates[priority as usize] as f32);
        }
        sqlx::query!(
            "INSERT INTO tasker.statistics_samples (recorded_at, event_type, priority, latency_us, sample_rate, instance_id)
             SELECT to_timestamp(s.at_us / 1e6), s.event, s.priority, s.latency_us, s.rate, $6
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::real[])
                  AS s(at_us, event, priority, latency_us, rate)",
            &at,
            &events as &[&str],
            &priorities as &[&str],
            &latencies,
            &rates,
            self.inner.instance_id,
        )
        .execute(&self.inner.pool)
        .await?;
        Ok(())
    }
}

/// `u64::MAX * rate`, with 1.0 meaning "always".
fn threshold(rate: f64) -> u64 {
    if rate >= 1.0 {
        u64::MAX
    } else if rate <= 0.0 {
        0
    } else {
        (rate * u64::MAX as f64) as u64
    }
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// How often a failed batch is tried before it is dropped.
const WRITE_ATTEMPTS: u32 = 3;

async fn run_writer(
    collector: SampledStatisticsCollector,
    mut consumer: HeapCons<Sample>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let batch_size = collector.inner.flush_batch;
    let mut batch: Vec<Sample> = Vec::with_capacity(batch_size);
    // The first flush is one interval after start (a plain `interval` ticks
    // at once: whether that tick drained anything depended on how soon this
    // task was first scheduled).
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticks.tick() => false,
            () = collector.inner.writer_wake.notified() => false,
            () = shutdown.cancelled() => true,
        };
        // Drain everything there is, a batch at a time.
        loop {
            batch.clear();
            batch.extend(consumer.pop_iter().take(batch_size));
            if batch.is_empty() {
                break;
            }
            write_with_retry(&collector, &batch).await;
            if batch.len() < batch_size {
                break;
            }
        }
        if stopping {
            tracing::debug!(written = collector.written(), "statistics writer flushed and stopped");
            return;
        }
    }
}

async fn write_with_retry(collector: &SampledStatisticsCollector, batch: &[Sample]) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=WRITE_ATTEMPTS {
        match collector.write_batch(batch).await {
            Ok(()) => {
                collector.inner.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(err) if attempt < WRITE_ATTEMPTS => {
                tracing::debug!(error = %err, attempt, "statistics batch write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(err) => {
                tracing::warn!(error = %err, dropped = batch.len(), "statistics batch dropped after {WRITE_ATTEMPTS} attempts");
                collector.inner.dropped[DropReason::WriteFailed as usize]
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: StatisticsMode, capacity: usize) -> StatisticsSettings {
        StatisticsSettings { mode, buffer_capacity: capacity, ..StatisticsSettings::default() }
    }

    /// A pool that never connects: these tests never reach the database.
    fn no_database() -> PgPool {
        sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("a lazy pool")
    }

    #[tokio::test]
    async fn observed_sampling_fractions_match_the_configured_rates() {
        let (collector, _) = SampledStatisticsCollector::start(
            &settings(StatisticsMode::Sampled, 1 << 20),
            no_database(),
            "test",
            CancellationToken::new(),
        );
        fastrand::seed(20261126);
        const N: u64 = 100_000;
        for (event, rate) in [
            (Event::NotifyMiss, 1.0),
            (Event::TaskFinalized, 0.5),
            (Event::StepCompleted, 0.1),
            (Event::ClaimCycle, 0.01),
        ] {
            let kept = (0..N).filter(|_| collector.record_if_sampled(event, Duration::ZERO)).count() as f64;
            // Binomial: mean N*p, sd sqrt(N*p*(1-p)); allow 5 sd (a seeded RNG
            // makes this deterministic; the bound says how far off is wrong).
            let n = N as f64;
            let tolerance = 5.0 * (n * rate * (1.0 - rate)).sqrt();
            assert!((kept - n * rate).abs() <= tolerance.max(0.5), "{event}: kept {kept} of {N}, rate {rate}");
        }
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts_without_blocking() {
        let mut s = settings(StatisticsMode::Sampled, 64);
        s.sample_rate_urgent = 1.0;
        // No writer is draining (the writer task is never polled to completion
        // while this test holds the thread), so the buffer fills.
        let (collector, _) = SampledStatisticsCollector::start(&s, no_database(), "test", CancellationToken::new());
        let mut slowest = Duration::ZERO;
        for _ in 0..10_000 {
            let started = Instant::now();
            collector.record_if_sampled(Event::NotifyMiss, Duration::from_millis(1));
            slowest = slowest.max(started.elapsed());
        }
        assert_eq!(collector.dropped(DropReason::BufferFull), 10_000 - 64);
        // Not a timing assertion on the machine's speed: a blocked producer
        // would wait forever, since nothing drains the buffer.
        assert!(slowest < Duration::from_secs(1), "a producer waited {slowest:?}");
    }

    #[tokio::test]
    async fn off_records_nothing_and_thresholds_cover_the_edges() {
        let (collector, writer) = SampledStatisticsCollector::start(
            &settings(StatisticsMode::Off, 64),
            no_database(),
            "test",
            CancellationToken::new(),
        );
        assert!(writer.is_none());
        collector.record(Event::NotifyMiss, Duration::ZERO).await;
        assert_eq!(collector.dropped(DropReason::BufferFull), 0);
        assert_eq!(threshold(1.0), u64::MAX);
        assert_eq!(threshold(0.0), 0);
        assert!(threshold(0.5) > u64::MAX / 3 && threshold(0.5) < u64::MAX / 3 * 2);
    }
}
