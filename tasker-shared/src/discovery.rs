//! The discovery loop both services use: how a process learns that there is
//! work to claim, according to its [`DeploymentMode`].
//!
//! - **LISTEN** (EventDrivenOnly, Hybrid): a dedicated connection listens on the
//!   service's channels. Every notification is a wake-up ([`DiscoveredVia::Event`]).
//!   A lost connection is always noticed (an error, sqlx's silent reconnect, or
//!   a failed ping of a silent connection), and every (re)connect is followed by
//!   a catch-up claim ([`DiscoveredVia::Sweep`]), so notifications sent while
//!   nobody listened are not lost for good.
//! - **Poll** (PollingOnly, Hybrid): a wake-up every poll interval.
//! - **Timer**: the consumer tells discovery when known future work falls due
//!   (a scheduled retry, a claim that may expire); discovery wakes it then.
//!
//! Wake-ups are coalesced: however many arrive while the consumer is busy, it
//! sees one, attributed to the most telling source (sweep, event, timer, poll).
//! Notification payloads are hints only: `due:<unix ms>` arms the timer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::claim::DiscoveredVia;
use crate::deployment::DeploymentMode;
use crate::event_system::{Event, SampledStatisticsCollector};
use crate::identifier::Identifier;
use crate::metrics;

/// Which channels a process listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channels {
    /// The task channel (orchestrators).
    Tasks,
    /// One namespace's step channel (a namespace worker).
    Steps(Identifier),
    /// Every namespace's step channel, including namespaces created later (a
    /// catch-all worker).
    AllSteps,
}

impl Channels {
    /// The metric label for notifications on these channels.
    pub fn kind(&self) -> &'static str {
        match self {
            Channels::Tasks => "tasks",
            Channels::Steps(_) | Channels::AllSteps => "steps",
        }
    }
}

/// How discovery runs.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The deployment mode.
    pub mode: DeploymentMode,
    /// The poll period (PollingOnly, Hybrid).
    pub poll_interval: Duration,
    /// What to listen to (EventDrivenOnly, Hybrid).
    pub channels: Channels,
    /// A LISTEN connection silent this long is pinged.
    pub ping_interval: Duration,
    /// The first wait before re-establishing a lost LISTEN connection.
    pub reconnect_delay: Duration,
    /// The database to listen on.
    pub database_url: String,
    /// `application_name` of the LISTEN connection (`<instance>:listener`), so
    /// operators and tests can find it in `pg_stat_activity`.
    pub listener_name: String,
    /// Where notifications and reconnects are recorded.
    pub statistics: SampledStatisticsCollector,
}

const EVENT: u8 = 1;
const POLL: u8 = 2;
const SWEEP: u8 = 4;
const TIMER: u8 = 8;

/// Pending wake-ups, coalesced into bits.
#[derive(Debug, Default)]
struct Signals {
    pending: AtomicU8,
    notify: Notify,
}

impl Signals {
    fn raise(&self, bit: u8) {
        self.pending.fetch_or(bit, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// Takes every pending wake-up, attributed to the most telling one.
    fn take(&self) -> Option<DiscoveredVia> {
        let bits = self.pending.swap(0, Ordering::AcqRel);
        // A sweep claims what notifications may have missed; an event beats a
        // timer or a poll that happened to coincide with it.
        [
            (SWEEP, DiscoveredVia::Sweep),
            (EVENT, DiscoveredVia::Event),
            (TIMER, DiscoveredVia::Timer),
            (POLL, DiscoveredVia::Poll),
        ]
        .into_iter()
        .find(|(bit, _)| bits & bit != 0)
        .map(|(_, via)| via)
    }
}

/// The earliest known future due time, and a way to re-arm its sleeper.
#[derive(Debug, Default)]
struct Timer {
    at: Mutex<Option<Instant>>,
    rearm: Notify,
    /// Set when a time was reached; see [`Discovery::timer_fired`].
    fired: AtomicBool,
}

/// A running discovery loop. Dropping it does not stop it: cancel the token
/// given to [`Discovery::start`].
#[derive(Debug, Clone)]
pub struct Discovery {
    signals: Arc<Signals>,
    timer: Arc<Timer>,
    listener_connected: Arc<AtomicBool>,
    mode: DeploymentMode,
    shutdown: CancellationToken,
}

impl Discovery {
    /// Starts the listener, poller and timer tasks for `config.mode`.
    pub fn start(config: DiscoveryConfig, shutdown: CancellationToken) -> Discovery {
        let discovery = Discovery {
            signals: Arc::new(Signals::default()),
            timer: Arc::new(Timer::default()),
            listener_connected: Arc::new(AtomicBool::new(false)),
            mode: config.mode,
            shutdown,
        };
        if config.mode.listens() {
            tokio::spawn(listen(config.clone(), discovery.clone()));
        } else {
            // Nothing announces work in PollingOnly mode: claim once at start.
            discovery.signals.raise(SWEEP);
        }
        if config.mode.polls() {
            tokio::spawn(poll(config.poll_interval, discovery.clone()));
        }
        tokio::spawn(run_timer(discovery.clone()));
        discovery
    }

    /// Waits for the next wake-up; `None` once shutdown began.
    pub async fn next(&self) -> Option<DiscoveredVia> {
        loop {
            let notified = self.signals.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shutdown.is_cancelled() {
                return None;
            }
            if let Some(via) = self.signals.take() {
                return Some(via);
            }
            tokio::select! {
                () = &mut notified => {}
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// Asks for a wake-up (e.g. capacity freed up, or more work is known to be due).
    pub fn wake(&self, via: DiscoveredVia) {
        self.signals.raise(match via {
            DiscoveredVia::Event => EVENT,
            DiscoveredVia::Poll => POLL,
            DiscoveredVia::Sweep => SWEEP,
            DiscoveredVia::Timer => TIMER,
        });
    }

    /// Asks for a [`DiscoveredVia::Timer`] wake-up at `at` (or earlier, if an
    /// earlier time is already known).
    pub async fn schedule(&self, at: Instant) {
        let mut earliest = self.timer.at.lock().await;
        if earliest.is_none_or(|current| at < current) {
            *earliest = Some(at);
            self.timer.rearm.notify_one();
        }
    }

    /// Whether the timer reached a time since the last call. The timer holds
    /// only the earliest known time, so once it fired the consumer must find
    /// the next one itself (however the wake-up was attributed: a timer that
    /// fires together with a notification wakes the consumer as an event).
    pub fn timer_fired(&self) -> bool {
        self.timer.fired.swap(false, Ordering::AcqRel)
    }

    /// Whether the LISTEN connection is up (always false in PollingOnly mode).
    pub fn listener_connected(&self) -> bool {
        self.listener_connected.load(Ordering::Acquire)
    }

    /// The mode this discovery runs in.
    pub fn mode(&self) -> DeploymentMode {
        self.mode
    }

    fn set_connected(&self, connected: bool) {
        self.listener_connected.store(connected, Ordering::Release);
        metrics::listener_connected(connected);
    }
}

async fn poll(interval: Duration, discovery: Discovery) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; start-up is covered by the sweep
    loop {
        tokio::select! {
            _ = ticks.tick() => discovery.signals.raise(POLL),
            () = discovery.shutdown.cancelled() => return,
        }
    }
}

async fn run_timer(discovery: Discovery) {
    loop {
        let rearmed = discovery.timer.rearm.notified();
        tokio::pin!(rearmed);
        rearmed.as_mut().enable();
        let at = *discovery.timer.at.lock().await;
        let sleep = async {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                let mut earliest = discovery.timer.at.lock().await;
                if *earliest == at {
                    *earliest = None;
                }
                drop(earliest);
                discovery.timer.fired.store(true, Ordering::Release);
                discovery.signals.raise(TIMER);
            }
            () = &mut rearmed => {}
            () = discovery.shutdown.cancelled() => return,
        }
    }
}

/// Keeps a LISTEN connection up for as long as the process runs.
async fn listen(config: DiscoveryConfig, discovery: Discovery) {
    let mut backoff = Backoff::starting_at(config.reconnect_delay);
    let mut connected_before = false;
    let mut disconnected_at = std::time::Instant::now();
    loop {
        if discovery.shutdown.is_cancelled() {
            return;
        }
        let session = async {
            let pool = listener_pool(&config)?;
            let mut listener = PgListener::connect_with(&pool).await?;
            // Reconnect ourselves, after a delay, and always sweep afterwards.
            listener.eager_reconnect(false);
            let namespace_channel = subscribe(&mut listener, &config.channels).await?;
            Ok::<_, sqlx::Error>((pool, listener, namespace_channel))
        };
        let (pool, mut listener, namespace_channel) = match session.await {
            Ok(ok) => ok,
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in = ?delay, "LISTEN connection failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = discovery.shutdown.cancelled() => return,
                }
            }
        };
        backoff.reset();
        discovery.set_connected(true);
        if connected_before {
            metrics::listener_reconnected();
            config.statistics.record(Event::ListenerReconnected, disconnected_at.elapsed()).await;
            tracing::warn!("LISTEN connection re-established; sweeping for work announced while it was down");
        } else {
            tracing::info!(channels = ?config.channels, "listening for notifications");
        }
        connected_before = true;
        // Claim whatever became due before (or while) we started listening.
        discovery.signals.raise(SWEEP);

        let reason = receive(&config, &discovery, &mut listener, namespace_channel.as_deref()).await;
        discovery.set_connected(false);
        disconnected_at = std::time::Instant::now();
        // Give the connection back before closing its pool.
        drop(listener);
        match reason {
            Ended::Shutdown => return,
            Ended::Lost(why) => {
                let delay = backoff.next_delay();
                tracing::warn!(reason = %why, reconnect_in = ?delay, "LISTEN connection lost");
                pool.close().await;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = discovery.shutdown.cancelled() => return,
                }
            }
        }
    }
}

enum Ended {
    Shutdown,
    Lost(String),
}

async fn receive(
    config: &DiscoveryConfig,
    discovery: &Discovery,
    listener: &mut PgListener,
    namespace_channel: Option<&str>,
) -> Ended {
    let kind = config.channels.kind();
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(config.ping_interval, listener.try_recv()) => next,
            () = discovery.shutdown.cancelled() => return Ended::Shutdown,
        };
        match next {
            Ok(Ok(Some(notification))) => {
                metrics::notification_received(kind);
                config.statistics.record(Event::NotificationReceived, Duration::ZERO).await;
                if Some(notification.channel()) == namespace_channel {
                    if let Err(err) = follow_namespace(listener, notification.payload()).await {
                        return Ended::Lost(format!("could not LISTEN to a new namespace: {err}"));
                    }
                    continue;
                }
                if let Some(at) = due_hint(notification.payload()) {
                    discovery.schedule(at).await;
                } else {
                    discovery.signals.raise(EVENT);
                }
            }
            // sqlx noticed the connection drop and already reconnected and
            // re-subscribed; anything sent in between is lost. Sweep.
            // The connection closed (eager reconnect is off: we reconnect
            // ourselves, after the reconnect delay, and sweep).
            Ok(Ok(None)) => return Ended::Lost("connection closed".to_owned()),
            Ok(Err(err)) => return Ended::Lost(err.to_string()),
            // Silent for a whole ping interval: make sure the connection lives.
            Err(_elapsed) => {
                let ping =
                    tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(&mut *listener)).await;
                match ping {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Ended::Lost(format!("ping failed: {err}")),
                    Err(_) => return Ended::Lost("ping timed out".to_owned()),
                }
            }
        }
    }
}

fn listener_pool(config: &DiscoveryConfig) -> Result<PgPool, sqlx::Error> {
    let options = crate::db::connect_options(&config.database_url, &config.listener_name)?;
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options))
}

/// LISTENs to the channels; returns the namespace channel when following all
/// namespaces. Channel names come from the schema's functions, their one home.
/// Queries run on the listener's own connection (its pool has only that one).
async fn subscribe(listener: &mut PgListener, channels: &Channels) -> Result<Option<String>, sqlx::Error> {
    match channels {
        Channels::Tasks => {
            let channel =
                sqlx::query_scalar!(r#"SELECT tasker.task_channel() AS "channel!""#).fetch_one(&mut *listener).await?;
            listener.listen(&channel).await?;
            Ok(None)
        }
        Channels::Steps(namespace) => {
            let channel = step_channel(listener, namespace.as_str()).await?;
            listener.listen(&channel).await?;
            Ok(None)
        }
        Channels::AllSteps => {
            let namespace_channel = sqlx::query_scalar!(r#"SELECT tasker.namespace_channel() AS "channel!""#)
                .fetch_one(&mut *listener)
                .await?;
            listener.listen(&namespace_channel).await?;
            let channels =
                sqlx::query_scalar!(r#"SELECT tasker.step_channel(name) AS "channel!" FROM tasker.namespaces"#)
                    .fetch_all(&mut *listener)
                    .await?;
            listener.listen_all(channels.iter().map(String::as_str)).await?;
            Ok(Some(namespace_channel))
        }
    }
}

async fn follow_namespace(listener: &mut PgListener, namespace: &str) -> Result<(), sqlx::Error> {
    let channel = step_channel(listener, namespace).await?;
    listener.listen(&channel).await?;
    tracing::info!(namespace, "following a new namespace");
    Ok(())
}

async fn step_channel(listener: &mut PgListener, namespace: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT tasker.step_channel($1) AS "channel!""#, namespace).fetch_one(&mut *listener).await
}

/// Parses a `due:<unix ms>` hint into an instant on the monotonic clock.
fn due_hint(payload: &str) -> Option<Instant> {
    let unix_ms: i64 = payload.strip_prefix("due:")?.parse().ok()?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ahead = u64::try_from(unix_ms.saturating_sub(now_ms)).unwrap_or(0);
    Some(Instant::now() + Duration::from_millis(ahead))
}

/// Exponential backoff for reconnects and retries: each delay is the current
/// step plus up to 50% jitter (never less than the step), and the step doubles
/// up to a cap.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    current: Duration,
}

impl Backoff {
    /// The default first step.
    const MIN: Duration = Duration::from_millis(100);
    /// The largest step.
    const MAX: Duration = Duration::from_secs(5);

    /// Starts at 100 ms.
    pub fn new() -> Self {
        Self::starting_at(Self::MIN)
    }

    /// Starts at `min` (at most the 5 s cap, unless `min` itself is larger).
    pub fn starting_at(min: Duration) -> Self {
        Backoff { min, current: min }
    }

    /// The next delay, then doubles the step.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current.mul_f64(1.0 + fastrand::f64() * 0.5);
        self.current = (self.current * 2).min(Self::MAX.max(self.min));
        delay
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesced_wake_ups_are_attributed_to_the_most_telling_source() {
        let signals = Signals::default();
        assert_eq!(signals.take(), None);
        signals.raise(POLL);
        signals.raise(EVENT);
        assert_eq!(signals.take(), Some(DiscoveredVia::Event));
        assert_eq!(signals.take(), None, "taking clears");
        signals.raise(EVENT);
        signals.raise(SWEEP);
        assert_eq!(signals.take(), Some(DiscoveredVia::Sweep));
        signals.raise(POLL);
        signals.raise(TIMER);
        assert_eq!(signals.take(), Some(DiscoveredVia::Timer));
    }

    #[test]
    fn due_hints_parse_and_anything_else_is_an_event() {
        let soon = chrono::Utc::now().timestamp_millis() + 60_000;
        let at = due_hint(&format!("due:{soon}")).expect("a hint");
        assert!(at > Instant::now() + Duration::from_secs(50));
        assert!(due_hint("").is_none());
        assert!(due_hint("due:soon").is_none());
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(150));
        assert!(delays.iter().all(|d| *d <= Backoff::MAX.mul_f64(1.5)));
        assert!(delays[9] >= Backoff::MAX);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(150));
        let mut slow = Backoff::starting_at(Duration::from_secs(3));
        assert!(slow.next_delay() >= Duration::from_secs(3), "never shorter than the first step");
    }

    /// A discovery with only its timer running.
    fn timer_only(shutdown: &CancellationToken) -> Discovery {
        let discovery = Discovery {
            signals: Arc::new(Signals::default()),
            timer: Arc::new(Timer::default()),
            listener_connected: Arc::new(AtomicBool::new(false)),
            mode: DeploymentMode::EventDrivenOnly,
            shutdown: shutdown.clone(),
        };
        tokio::spawn(run_timer(discovery.clone()));
        discovery
    }

    #[tokio::test]
    async fn a_scheduled_time_wakes_the_consumer_by_timer() {
        let shutdown = CancellationToken::new();
        let discovery = timer_only(&shutdown);
        discovery.schedule(Instant::now() + Duration::from_millis(20)).await;
        let woke = tokio::time::timeout(Duration::from_secs(5), discovery.next()).await;
        assert_eq!(woke.expect("woken before the deadline"), Some(DiscoveredVia::Timer));
        assert!(discovery.timer_fired(), "the time was reached");
        assert!(!discovery.timer_fired(), "and is reported once");
        shutdown.cancel();
        assert_eq!(discovery.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_fires_with_a_notification_is_still_reported() {
        let shutdown = CancellationToken::new();
        let discovery = timer_only(&shutdown);
        discovery.schedule(Instant::now() + Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        discovery.wake(DiscoveredVia::Event);
        // Coalesced, the wake-up is attributed to the event ...
        assert_eq!(discovery.next().await, Some(DiscoveredVia::Event));
        // ... and the consumer still learns that the timer's time is spent.
        assert!(discovery.timer_fired());
        shutdown.cancel();
    }
}
