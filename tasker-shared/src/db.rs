//! Connecting to PostgreSQL and applying the schema.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The schema migrations in `migrations/`, embedded in every binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How a service's connection pool is sized and named.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most connections open at once.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a caller waits for a connection before failing.
    pub acquire_timeout: Duration,
    /// Shown in `pg_stat_activity.application_name`, so an operator can tell
    /// which instance (and which role) holds a connection.
    pub application_name: String,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: 8,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(10),
            application_name: "tasker".to_owned(),
        }
    }
}

/// Parses a `postgres://` URL into connect options named for this process.
/// `sslmode=require` and friends work: sqlx is built with rustls.
pub fn connect_options(database_url: &str, application_name: &str) -> Result<PgConnectOptions, sqlx::Error> {
    // The server truncates application_name to 63 bytes; keep the tail, which
    // names the instance, and cut on a character boundary.
    let mut start = application_name.len().saturating_sub(63);
    while !application_name.is_char_boundary(start) {
        start += 1;
    }
    let name = &application_name[start..];
    Ok(PgConnectOptions::from_str(database_url)?.application_name(name))
}

/// Opens a pool. Connections are made lazily, so a service can start (and
/// report not-ready) while the database is down, and reconnects by itself.
///
/// Connections are not pinged when taken from the pool (sqlx's default is a
/// round trip before every statement's acquire, on the path of every hop). A
/// connection that died while idle fails its next statement with an I/O
/// error instead, which every caller treats as transient and retries on a
/// fresh connection.
pub fn connect_lazy(database_url: &str, settings: &PoolSettings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(database_url, &settings.application_name)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .acquire_timeout(settings.acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Applies pending migrations. Safe to run from many processes at once: sqlx
/// serializes them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
