//! Configuration: defaults, then an optional TOML file (`TASKER_CONFIG`), then
//! the environment, with the `config` crate.
//!
//! Every environment variable is listed once, in [`ENVIRONMENT`], with the file
//! key it overrides and how its value is checked. A bad value stops start-up with
//! a [`ConfigError`] that names the variable; binaries exit with code 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::deployment::DeploymentMode;
pub use crate::event_system::StatisticsMode;
use crate::identifier::Identifier;

/// What went wrong loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An environment variable with a value that does not parse or is out of range.
    #[error("invalid {var}={value:?}: {expected}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// A setting that must be given is missing.
    #[error("{var} is not set (or `{key}` in the config file): {why}")]
    Missing {
        /// The environment variable.
        var: &'static str,
        /// The file key.
        key: &'static str,
        /// What it is for.
        why: &'static str,
    },
    /// A value (from any layer) out of range.
    #[error("{var} (`{key}`): {problem}")]
    OutOfRange {
        /// The environment variable.
        var: &'static str,
        /// The file key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The TOML file could not be read or has wrong types; names the file and key.
    #[error("config file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The parse error, naming the key.
        #[source]
        source: config::ConfigError,
    },
}

/// Which service is loading its settings: decides defaults like the HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `tasker-orchestrator`.
    Orchestrator,
    /// `tasker-worker`.
    Worker,
}

impl Service {
    /// The short name used in instance ids and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Service::Orchestrator => "orchestrator",
            Service::Worker => "worker",
        }
    }
}

/// All settings of a service. Field docs name the environment variable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `DATABASE_URL`: the PostgreSQL URL (required). `sslmode=require` works.
    pub database_url: Option<String>,
    /// `DEPLOYMENT_MODE`: how work is discovered.
    pub deployment_mode: DeploymentMode,
    /// `INSTANCE_ID`: names this process in claims, history and metrics.
    /// Default: service, host, pid and start time, unique per process start.
    pub instance_id: Option<String>,
    /// `POLL_INTERVAL_MS`: claim interval in PollingOnly and Hybrid modes.
    pub poll_interval_ms: u64,
    /// `TASKER_HTTP_ADDR`: where `/health/*`, `/metrics` (and the API) listen.
    pub http_addr: Option<SocketAddr>,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `TASKER_DB_MAX_CONNECTIONS`: the connection pool's size.
    pub db_max_connections: u32,
    /// `TASKER_SHUTDOWN_TIMEOUT_MS`: how long SIGTERM waits for in-flight work.
    pub shutdown_timeout_ms: u64,
    /// `TASKER_LISTENER_PING_MS`: a silent LISTEN connection is pinged this often,
    /// so a half-open connection is found and replaced.
    pub listener_ping_ms: u64,
    /// `TASKER_LISTENER_RECONNECT_MS`: the first wait before re-establishing a
    /// lost LISTEN connection (doubling, up to 5 s, while it keeps failing).
    pub listener_reconnect_ms: u64,
    /// Orchestrator settings.
    pub orchestrator: OrchestratorSettings,
    /// Worker settings.
    pub worker: WorkerSettings,
    /// Sampled statistics settings.
    pub statistics: StatisticsSettings,
    /// Maintenance (partitions, archival, retention) settings.
    pub maintenance: MaintenanceSettings,
    /// PG_NOTIFY monitoring settings.
    pub monitoring: MonitoringSettings,
}

/// Settings only the orchestrator reads (`[orchestrator]` in the file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrchestratorSettings {
    /// `TASKER_CLAIM_BATCH`: tasks per `claim_ready_tasks()` call.
    pub claim_batch: u32,
    /// `TASKER_CLAIM_TIMEOUT_MS`: how long a task claim lasts unless released.
    pub claim_timeout_ms: u64,
    /// `TASKER_TEMPLATES_DIR`: JSON templates published at start-up (if the
    /// directory exists).
    pub templates_dir: PathBuf,
    /// `TASKER_API_TOKEN`: when set, `/v1/*` requires `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// `TASKER_RESCUE_INTERVAL_MS`: how often expired step leases are looked for.
    pub rescue_interval_ms: u64,
    /// `TASKER_MAX_BODY_BYTES`: the largest request body the API accepts.
    pub max_body_bytes: usize,
}

/// Settings only the worker reads (`[worker]` in the file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// `NAMESPACE`: the namespace whose steps this worker runs; all when unset.
    pub namespace: Option<Identifier>,
    /// `WORKER_CONCURRENCY`: steps run at once.
    pub concurrency: u32,
    /// `WORKER_PREFETCH`: claimed steps a worker may hold beyond its
    /// concurrency, waiting their turn (0 turns prefetching off). Only as many
    /// as the handlers' recent mean time starts within `prefetch_wait_ms` are
    /// claimed.
    pub prefetch: u32,
    /// `WORKER_PREFETCH_WAIT_MS`: how long a prefetched step may expect to
    /// wait for its turn.
    pub prefetch_wait_ms: u64,
    /// `TASKER_STEP_LEASE_MS`: a step attempt's lease; heartbeats renew it at a third.
    pub lease_ms: u64,
    /// `TASKER_WORKER_JOURNAL`: if set, a file to which every handler invocation
    /// is appended (`step_uuid attempt handler instance`), for audits and tests.
    pub journal: Option<PathBuf>,
}

/// Statistics settings (`[statistics]` in the file); see `docs/statistics.md`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatisticsSettings {
    /// `TASKER_STATISTICS_MODE`: `sampled`, `off`, or `synchronous` (the
    /// per-event inline writes of the system before sampling; for measurement).
    pub mode: StatisticsMode,
    /// `TASKER_SAMPLE_RATE_URGENT`: fraction of urgent events kept (0.01 to 1.0).
    pub sample_rate_urgent: f64,
    /// `TASKER_SAMPLE_RATE_HIGH`.
    pub sample_rate_high: f64,
    /// `TASKER_SAMPLE_RATE_NORMAL`.
    pub sample_rate_normal: f64,
    /// `TASKER_SAMPLE_RATE_LOW`.
    pub sample_rate_low: f64,
    /// `TASKER_STATISTICS_BUFFER`: samples the ring buffer holds; when full, new
    /// samples are dropped and counted.
    pub buffer_capacity: usize,
    /// `TASKER_STATISTICS_FLUSH_BATCH`: the writer flushes when this many wait.
    pub flush_batch: usize,
    /// `TASKER_STATISTICS_FLUSH_MS`: ... or when this long has passed.
    pub flush_interval_ms: u64,
    /// `TASKER_STATISTICS_RETENTION_DAYS`: samples older than this move to the archive.
    pub retention_days: u32,
}

/// Maintenance settings (`[maintenance]` in the file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceSettings {
    /// `TASKER_MAINTENANCE_INTERVAL_MS`: how often maintenance runs (one
    /// instance at a time, whichever service gets the lock).
    pub interval_ms: u64,
    /// `TASKER_TASK_RETENTION_DAYS`: finished tasks older than this are deleted
    /// with their steps and history; 0 keeps them forever.
    pub task_retention_days: u32,
    /// `TASKER_RETENTION_BATCH`: tasks deleted per transaction.
    pub retention_batch: u32,
}

/// PG_NOTIFY monitoring settings (`[monitoring]` in the file); see `docs/metrics.md`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitoringSettings {
    /// `TASKER_NOTIFY_MISS_THRESHOLD_MS`: a task claimed by a poll or sweep this
    /// long after it became due counts as a missed notification. Keep it well
    /// above the event path's p99 and well below polling replicas' interval.
    pub notify_miss_threshold_ms: u64,
    /// `TASKER_NOTIFY_WARN_MS`: discovery lags above this are logged at warn
    /// with the task's id.
    pub notify_warn_ms: u64,
    /// `TASKER_MONITOR_INTERVAL_MS`: how often overdue work and due-work depth
    /// are sampled.
    pub interval_ms: u64,
}

impl Default for MonitoringSettings {
    fn default() -> Self {
        MonitoringSettings { notify_miss_threshold_ms: 2_000, notify_warn_ms: 30_000, interval_ms: 5_000 }
    }
}

impl MonitoringSettings {
    /// The miss threshold.
    pub fn miss_threshold(&self) -> Duration {
        Duration::from_millis(self.notify_miss_threshold_ms)
    }

    /// The warning level.
    pub fn warn_after(&self) -> Duration {
        Duration::from_millis(self.notify_warn_ms)
    }

    /// The sampling period.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: None,
            deployment_mode: DeploymentMode::Hybrid,
            instance_id: None,
            poll_interval_ms: 1_000,
            http_addr: None,
            log_format: LogFormat::Text,
            db_max_connections: 10,
            shutdown_timeout_ms: 30_000,
            listener_ping_ms: 30_000,
            listener_reconnect_ms: 100,
            orchestrator: OrchestratorSettings::default(),
            worker: WorkerSettings::default(),
            statistics: StatisticsSettings::default(),
            maintenance: MaintenanceSettings::default(),
            monitoring: MonitoringSettings::default(),
        }
    }
}

impl Default for StatisticsSettings {
    fn default() -> Self {
        StatisticsSettings {
            mode: StatisticsMode::Sampled,
            sample_rate_urgent: 1.0,
            sample_rate_high: 0.5,
            sample_rate_normal: 0.1,
            sample_rate_low: 0.01,
            buffer_capacity: 16_384,
            flush_batch: 1_000,
            flush_interval_ms: 1_000,
            retention_days: 30,
        }
    }
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        MaintenanceSettings { interval_ms: 3_600_000, task_retention_days: 30, retention_batch: 1_000 }
    }
}

impl Default for OrchestratorSettings {
    fn default() -> Self {
        OrchestratorSettings {
            claim_batch: 64,
            claim_timeout_ms: 30_000,
            templates_dir: PathBuf::from("templates"),
            api_token: None,
            rescue_interval_ms: 5_000,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            namespace: None,
            concurrency: 16,
            prefetch: 256,
            prefetch_wait_ms: 10,
            lease_ms: 30_000,
            journal: None,
        }
    }
}

/// How an environment value is checked before it overrides the file.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Millis,
    Count,
    Mode,
    Namespace,
    Address,
    Format,
    /// A whole number, zero allowed.
    Whole,
    /// A sampling rate, 0.01 to 1.0.
    Rate,
    StatisticsMode,
}

/// One environment variable: its name, the file key it overrides, its kind.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    /// The variable's name.
    pub var: &'static str,
    /// The dotted key in the TOML file.
    pub key: &'static str,
    kind: Kind,
}

const fn env(var: &'static str, key: &'static str, kind: Kind) -> EnvVar {
    EnvVar { var, key, kind }
}

/// Every environment variable Tasker's services read (besides `TASKER_CONFIG`
/// and `RUST_LOG`), in one place.
pub const ENVIRONMENT: &[EnvVar] = &[
    env("DATABASE_URL", "database_url", Kind::Text),
    env("DEPLOYMENT_MODE", "deployment_mode", Kind::Mode),
    env("INSTANCE_ID", "instance_id", Kind::Text),
    env("POLL_INTERVAL_MS", "poll_interval_ms", Kind::Millis),
    env("TASKER_HTTP_ADDR", "http_addr", Kind::Address),
    env("LOG_FORMAT", "log_format", Kind::Format),
    env("TASKER_DB_MAX_CONNECTIONS", "db_max_connections", Kind::Count),
    env("TASKER_SHUTDOWN_TIMEOUT_MS", "shutdown_timeout_ms", Kind::Millis),
    env("TASKER_LISTENER_PING_MS", "listener_ping_ms", Kind::Millis),
    env("TASKER_LISTENER_RECONNECT_MS", "listener_reconnect_ms", Kind::Millis),
    env("TASKER_CLAIM_BATCH", "orchestrator.claim_batch", Kind::Count),
    env("TASKER_CLAIM_TIMEOUT_MS", "orchestrator.claim_timeout_ms", Kind::Millis),
    env("TASKER_TEMPLATES_DIR", "orchestrator.templates_dir", Kind::Text),
    env("TASKER_API_TOKEN", "orchestrator.api_token", Kind::Text),
    env("TASKER_RESCUE_INTERVAL_MS", "orchestrator.rescue_interval_ms", Kind::Millis),
    env("TASKER_MAX_BODY_BYTES", "orchestrator.max_body_bytes", Kind::Count),
    env("NAMESPACE", "worker.namespace", Kind::Namespace),
    env("WORKER_CONCURRENCY", "worker.concurrency", Kind::Count),
    env("WORKER_PREFETCH", "worker.prefetch", Kind::Whole),
    env("WORKER_PREFETCH_WAIT_MS", "worker.prefetch_wait_ms", Kind::Millis),
    env("TASKER_STEP_LEASE_MS", "worker.lease_ms", Kind::Millis),
    env("TASKER_WORKER_JOURNAL", "worker.journal", Kind::Text),
    env("TASKER_STATISTICS_MODE", "statistics.mode", Kind::StatisticsMode),
    env("TASKER_SAMPLE_RATE_URGENT", "statistics.sample_rate_urgent", Kind::Rate),
    env("TASKER_SAMPLE_RATE_HIGH", "statistics.sample_rate_high", Kind::Rate),
    env("TASKER_SAMPLE_RATE_NORMAL", "statistics.sample_rate_normal", Kind::Rate),
    env("TASKER_SAMPLE_RATE_LOW", "statistics.sample_rate_low", Kind::Rate),
    env("TASKER_STATISTICS_BUFFER", "statistics.buffer_capacity", Kind::Count),
    env("TASKER_STATISTICS_FLUSH_BATCH", "statistics.flush_batch", Kind::Count),
    env("TASKER_STATISTICS_FLUSH_MS", "statistics.flush_interval_ms", Kind::Millis),
    env("TASKER_STATISTICS_RETENTION_DAYS", "statistics.retention_days", Kind::Count),
    env("TASKER_MAINTENANCE_INTERVAL_MS", "maintenance.interval_ms", Kind::Millis),
    env("TASKER_TASK_RETENTION_DAYS", "maintenance.task_retention_days", Kind::Whole),
    env("TASKER_RETENTION_BATCH", "maintenance.retention_batch", Kind::Count),
    env("TASKER_NOTIFY_MISS_THRESHOLD_MS", "monitoring.notify_miss_threshold_ms", Kind::Millis),
    env("TASKER_NOTIFY_WARN_MS", "monitoring.notify_warn_ms", Kind::Millis),
    env("TASKER_MONITOR_INTERVAL_MS", "monitoring.interval_ms", Kind::Millis),
];

/// The most claimed steps a worker may hold beyond its concurrency.
pub const MAX_PREFETCH: u32 = 10_000;

/// The lowest sampling rate accepted (the plan's range is 0.01 to 1.0).
pub const MIN_RATE: f64 = 0.01;

/// The variable naming the optional TOML file.
pub const CONFIG_FILE_VAR: &str = "TASKER_CONFIG";

impl EnvVar {
    /// Checks a value and converts it for the `config` crate.
    fn parse(&self, value: &str) -> Result<config::Value, ConfigError> {
        let invalid = |expected: String| ConfigError::InvalidEnv { var: self.var, value: value.to_owned(), expected };
        let trimmed = value.trim();
        Ok(match self.kind {
            Kind::Text => {
                if trimmed.is_empty() {
                    return Err(invalid("expected a non-empty value".into()));
                }
                trimmed.into()
            }
            Kind::Millis | Kind::Count => {
                let n: u64 = trimmed.parse().map_err(|_| invalid("expected a positive whole number".into()))?;
                if n == 0 {
                    return Err(invalid("expected a positive whole number".into()));
                }
                n.into()
            }
            Kind::Mode => trimmed.parse::<DeploymentMode>().map_err(|e| invalid(e.to_string()))?.as_str().into(),
            Kind::Namespace => Identifier::new(trimmed).map_err(|e| invalid(e.to_string()))?.to_string().into(),
            Kind::Address => trimmed
                .parse::<SocketAddr>()
                .map_err(|_| invalid("expected an address like 0.0.0.0:8080".into()))?
                .to_string()
                .into(),
            Kind::Format => match trimmed.to_ascii_lowercase().as_str() {
                "text" | "json" => trimmed.to_ascii_lowercase().into(),
                _ => return Err(invalid("expected text or json".into())),
            },
            Kind::Whole => {
                trimmed.parse::<u64>().map_err(|_| invalid("expected a whole number (0 or more)".into()))?.into()
            }
            Kind::Rate => {
                let rate: f64 =
                    trimmed.parse().map_err(|_| invalid("expected a sampling rate between 0.01 and 1.0".into()))?;
                if !(MIN_RATE..=1.0).contains(&rate) {
                    return Err(invalid("expected a sampling rate between 0.01 and 1.0".into()));
                }
                rate.into()
            }
            Kind::StatisticsMode => match trimmed.to_ascii_lowercase().as_str() {
                mode @ ("sampled" | "off" | "synchronous") => mode.into(),
                _ => return Err(invalid("expected sampled, off or synchronous".into())),
            },
        })
    }
}

impl Settings {
    /// Loads settings from the process environment (and `TASKER_CONFIG`).
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(|var| std::env::var(var).ok())
    }

    /// Loads settings with `lookup` standing in for the environment.
    pub fn load_from(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        let file = lookup(CONFIG_FILE_VAR).map(PathBuf::from);
        if let Some(path) = &file {
            builder =
                builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml).required(true));
        }
        for var in ENVIRONMENT {
            if let Some(value) = lookup(var.var) {
                builder =
                    builder.set_override(var.key, var.parse(&value)?).map_err(|source| file_error(&file, source))?;
            }
        }
        let settings: Settings =
            builder.build().and_then(config::Config::try_deserialize).map_err(|source| file_error(&file, source))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Range checks that hold whichever layer a value came from.
    fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |var: &'static str, key: &'static str, value: u64, min: u64, unit: &str| {
            if value < min {
                Err(ConfigError::OutOfRange {
                    var,
                    key,
                    problem: format!("must be at least {min}{unit}, found {value}{unit}"),
                })
            } else {
                Ok(())
            }
        };
        at_least("POLL_INTERVAL_MS", "poll_interval_ms", self.poll_interval_ms, 10, " ms")?;
        at_least("TASKER_DB_MAX_CONNECTIONS", "db_max_connections", self.db_max_connections.into(), 2, "")?;
        at_least("TASKER_LISTENER_PING_MS", "listener_ping_ms", self.listener_ping_ms, 100, " ms")?;
        at_least("TASKER_CLAIM_BATCH", "orchestrator.claim_batch", self.orchestrator.claim_batch.into(), 1, "")?;
        at_least(
            "TASKER_CLAIM_TIMEOUT_MS",
            "orchestrator.claim_timeout_ms",
            self.orchestrator.claim_timeout_ms,
            1_000,
            " ms",
        )?;
        at_least(
            "TASKER_RESCUE_INTERVAL_MS",
            "orchestrator.rescue_interval_ms",
            self.orchestrator.rescue_interval_ms,
            100,
            " ms",
        )?;
        at_least("WORKER_CONCURRENCY", "worker.concurrency", self.worker.concurrency.into(), 1, "")?;
        at_least("TASKER_STEP_LEASE_MS", "worker.lease_ms", self.worker.lease_ms, 1_000, " ms")?;
        at_least("WORKER_PREFETCH_WAIT_MS", "worker.prefetch_wait_ms", self.worker.prefetch_wait_ms, 1, " ms")?;
        if self.worker.prefetch_wait_ms >= self.worker.lease_ms {
            return Err(ConfigError::OutOfRange {
                var: "WORKER_PREFETCH_WAIT_MS",
                key: "worker.prefetch_wait_ms",
                problem: format!(
                    "must be shorter than the step lease (TASKER_STEP_LEASE_MS, {} ms), found {} ms",
                    self.worker.lease_ms, self.worker.prefetch_wait_ms
                ),
            });
        }
        if self.worker.prefetch > MAX_PREFETCH {
            return Err(ConfigError::OutOfRange {
                var: "WORKER_PREFETCH",
                key: "worker.prefetch",
                problem: format!("must be at most {MAX_PREFETCH}, found {}", self.worker.prefetch),
            });
        }
        if self.orchestrator.claim_batch > 1_000 {
            return Err(ConfigError::OutOfRange {
                var: "TASKER_CLAIM_BATCH",
                key: "orchestrator.claim_batch",
                problem: format!("must be at most 1000, found {}", self.orchestrator.claim_batch),
            });
        }
        for (var, key, rate) in [
            ("TASKER_SAMPLE_RATE_URGENT", "statistics.sample_rate_urgent", self.statistics.sample_rate_urgent),
            ("TASKER_SAMPLE_RATE_HIGH", "statistics.sample_rate_high", self.statistics.sample_rate_high),
            ("TASKER_SAMPLE_RATE_NORMAL", "statistics.sample_rate_normal", self.statistics.sample_rate_normal),
            ("TASKER_SAMPLE_RATE_LOW", "statistics.sample_rate_low", self.statistics.sample_rate_low),
        ] {
            if !(MIN_RATE..=1.0).contains(&rate) {
                return Err(ConfigError::OutOfRange {
                    var,
                    key,
                    problem: format!("a sampling rate must be between 0.01 and 1.0, found {rate}"),
                });
            }
        }
        at_least(
            "TASKER_STATISTICS_BUFFER",
            "statistics.buffer_capacity",
            self.statistics.buffer_capacity as u64,
            16,
            "",
        )?;
        at_least("TASKER_STATISTICS_FLUSH_BATCH", "statistics.flush_batch", self.statistics.flush_batch as u64, 1, "")?;
        at_least(
            "TASKER_STATISTICS_FLUSH_MS",
            "statistics.flush_interval_ms",
            self.statistics.flush_interval_ms,
            10,
            " ms",
        )?;
        at_least(
            "TASKER_STATISTICS_RETENTION_DAYS",
            "statistics.retention_days",
            self.statistics.retention_days.into(),
            1,
            " days",
        )?;
        at_least(
            "TASKER_MAINTENANCE_INTERVAL_MS",
            "maintenance.interval_ms",
            self.maintenance.interval_ms,
            1_000,
            " ms",
        )?;
        at_least(
            "TASKER_RETENTION_BATCH",
            "maintenance.retention_batch",
            self.maintenance.retention_batch.into(),
            1,
            "",
        )?;
        at_least("TASKER_MONITOR_INTERVAL_MS", "monitoring.interval_ms", self.monitoring.interval_ms, 100, " ms")?;
        if self.database_url.is_none() {
            return Err(ConfigError::Missing {
                var: "DATABASE_URL",
                key: "database_url",
                why: "the PostgreSQL URL, e.g. postgres://tasker@localhost/tasker",
            });
        }
        Ok(())
    }

    /// The database URL (validated to be present).
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or_default()
    }

    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// The shutdown deadline.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The HTTP address, with the service's default port.
    pub fn http_addr(&self, service: Service) -> SocketAddr {
        self.http_addr.unwrap_or_else(|| match service {
            Service::Orchestrator => SocketAddr::from(([0, 0, 0, 0], 8080)),
            Service::Worker => SocketAddr::from(([0, 0, 0, 0], 8081)),
        })
    }

    /// The instance id: `INSTANCE_ID`, or one unique to this process start.
    pub fn instance_id(&self, service: Service) -> String {
        self.instance_id.clone().unwrap_or_else(|| default_instance_id(service))
    }
}

/// `<service>-<host>-<pid>-<start time in ms, base 36>`: unique per process
/// start even when many replicas share a host name.
pub fn default_instance_id(service: Service) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
    format!("{}-{host}-{}-{}", service.name(), std::process::id(), base36(started))
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

fn file_error(file: &Option<PathBuf>, source: config::ConfigError) -> ConfigError {
    ConfigError::File { path: file.clone().unwrap_or_else(|| PathBuf::from("(environment)")), source }
}

impl OrchestratorSettings {
    /// The task claim lease.
    pub fn claim_timeout(&self) -> Duration {
        Duration::from_millis(self.claim_timeout_ms)
    }

    /// The rescuer's period.
    pub fn rescue_interval(&self) -> Duration {
        Duration::from_millis(self.rescue_interval_ms)
    }
}

impl WorkerSettings {
    /// The step attempt lease.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// How long a prefetched step may expect to wait for its turn.
    pub fn prefetch_wait(&self) -> Duration {
        Duration::from_millis(self.prefetch_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write;

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::load_from(|k| map.get(k).cloned())
    }

    #[test]
    fn the_plans_variable_names_work_as_written() {
        let s = load(&[
            ("DATABASE_URL", "postgres://db/tasker"),
            ("DEPLOYMENT_MODE", "PollingOnly"),
            ("INSTANCE_ID", "orch-poll-1"),
            ("POLL_INTERVAL_MS", "5000"),
            ("NAMESPACE", "fulfillment"),
        ])
        .expect("valid");
        assert_eq!(s.deployment_mode, DeploymentMode::PollingOnly);
        assert_eq!(s.instance_id(Service::Worker), "orch-poll-1");
        assert_eq!(s.poll_interval(), Duration::from_secs(5));
        assert_eq!(s.worker.namespace.as_ref().map(Identifier::as_str), Some("fulfillment"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let base = ("DATABASE_URL", "postgres://db/tasker");
        for (var, value) in [
            ("DEPLOYMENT_MODE", "Sometimes"),
            ("POLL_INTERVAL_MS", "soon"),
            ("POLL_INTERVAL_MS", "0"),
            ("NAMESPACE", "Robert'); DROP TABLE"),
            ("WORKER_CONCURRENCY", "-1"),
            ("TASKER_HTTP_ADDR", "localhost"),
            ("LOG_FORMAT", "xml"),
            ("TASKER_SAMPLE_RATE_LOW", "0.001"),
            ("TASKER_SAMPLE_RATE_HIGH", "1.5"),
            ("TASKER_SAMPLE_RATE_NORMAL", "often"),
            ("TASKER_STATISTICS_MODE", "sometimes"),
        ] {
            let err = load(&[base, (var, value)]).expect_err(var).to_string();
            assert!(err.contains(var), "{err} should name {var}");
        }
        let err = load(&[base, ("POLL_INTERVAL_MS", "5")]).expect_err("too small").to_string();
        assert!(err.contains("POLL_INTERVAL_MS") && err.contains("at least 10"), "{err}");
        let err = load(&[]).expect_err("no url").to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn prefetch_is_on_by_default_can_be_turned_off_and_is_bounded() {
        let base = ("DATABASE_URL", "postgres://db/tasker");
        let s = load(&[base]).expect("valid");
        assert_eq!((s.worker.prefetch, s.worker.prefetch_wait()), (256, Duration::from_millis(10)));
        let off = load(&[base, ("WORKER_PREFETCH", "0")]).expect("0 turns it off");
        assert_eq!(off.worker.prefetch, 0);
        for (vars, expected) in [
            (vec![("WORKER_PREFETCH", "10001")], "at most 10000"),
            (vec![("WORKER_PREFETCH", "-1")], "whole number"),
            (vec![("WORKER_PREFETCH_WAIT_MS", "0")], "positive"),
            (vec![("WORKER_PREFETCH_WAIT_MS", "30000")], "shorter than the step lease"),
            (
                vec![("WORKER_PREFETCH_WAIT_MS", "2000"), ("TASKER_STEP_LEASE_MS", "1500")],
                "shorter than the step lease",
            ),
        ] {
            let mut all = vec![base];
            all.extend(vars.iter().copied());
            let err = load(&all).expect_err(expected).to_string();
            assert!(
                err.contains(vars[0].0) && err.contains(expected),
                "{err} should name {} and say {expected}",
                vars[0].0
            );
        }
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        let mut file = tempfile_path("layers.toml");
        writeln!(
            file.1,
            "database_url = \"postgres://file/db\"\npoll_interval_ms = 2500\n\
             [worker]\nconcurrency = 3\n[orchestrator]\nclaim_batch = 7"
        )
        .unwrap();
        let path = file.0.to_string_lossy().into_owned();
        let s = load(&[(CONFIG_FILE_VAR, &path), ("WORKER_CONCURRENCY", "9")]).expect("valid");
        assert_eq!(s.database_url(), "postgres://file/db");
        assert_eq!(s.poll_interval_ms, 2500, "file over default");
        assert_eq!(s.worker.concurrency, 9, "environment over file");
        assert_eq!(s.orchestrator.claim_batch, 7);
        assert_eq!(s.orchestrator.claim_timeout_ms, 30_000, "default kept");

        let mut bad = tempfile_path("bad.toml");
        writeln!(bad.1, "database_url = \"x\"\npoll_intervall_ms = 5").unwrap();
        let path = bad.0.to_string_lossy().into_owned();
        let err = load(&[(CONFIG_FILE_VAR, &path)]).expect_err("typo").to_string();
        assert!(err.contains("bad.toml") && err.contains("poll_intervall_ms"), "{err}");
    }

    #[test]
    fn sampling_rates_default_to_the_plan_and_are_validated_from_file_and_environment() {
        let base = ("DATABASE_URL", "postgres://db/tasker");
        let s = load(&[base]).expect("defaults");
        let st = &s.statistics;
        assert_eq!(
            (st.sample_rate_urgent, st.sample_rate_high, st.sample_rate_normal, st.sample_rate_low),
            (1.0, 0.5, 0.1, 0.01)
        );
        assert_eq!(st.mode, StatisticsMode::Sampled);

        let s = load(&[base, ("TASKER_SAMPLE_RATE_NORMAL", "0.25"), ("TASKER_STATISTICS_MODE", "synchronous")])
            .expect("valid");
        assert_eq!(s.statistics.sample_rate_normal, 0.25);
        assert_eq!(s.statistics.mode, StatisticsMode::Synchronous);

        let mut file = tempfile_path("rates.toml");
        writeln!(file.1, "database_url = \"x\"\n[statistics]\nsample_rate_low = 0.005").unwrap();
        let path = file.0.to_string_lossy().into_owned();
        let err = load(&[(CONFIG_FILE_VAR, &path)]).expect_err("too low").to_string();
        assert!(err.contains("statistics.sample_rate_low") && err.contains("0.01"), "{err}");
    }

    #[test]
    fn default_instance_ids_differ_per_service_and_carry_the_pid() {
        let id = default_instance_id(Service::Worker);
        assert!(id.starts_with("worker-"));
        assert!(id.contains(&format!("-{}-", std::process::id())));
    }

    fn tempfile_path(name: &str) -> (tempfile::TempPath, std::fs::File) {
        let file = tempfile::Builder::new().prefix("tasker-config-").suffix(name).tempfile().unwrap();
        let (file, path) = file.into_parts();
        (path, file)
    }
}
