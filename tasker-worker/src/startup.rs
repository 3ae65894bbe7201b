//! Builds and runs the worker service from its settings and a handler
//! registry: database, metrics, discovery (its namespace's step channel, or
//! every namespace's), the worker loop, and the health/metrics endpoints.

use anyhow::Context;
use tasker_shared::config::{Service, Settings};
use tasker_shared::db::{self, PoolSettings};
use tasker_shared::discovery::{Channels, Discovery, DiscoveryConfig};
use tasker_shared::event_system::SampledStatisticsCollector;
use tasker_shared::maintenance;
use tasker_shared::monitoring::PgNotifyMonitor;
use tasker_shared::service::{bind_http, serve_http};
use tasker_shared::{http, metrics};
use tokio_util::sync::CancellationToken;

use crate::handler::HandlerRegistry;
use crate::journal::Journal;
use crate::worker::{Worker, WorkerConfig};

/// Runs a worker with `registry` until `shutdown`.
pub async fn run(settings: Settings, registry: HandlerRegistry, shutdown: CancellationToken) -> anyhow::Result<()> {
    let id = settings.instance_id(Service::Worker);
    let mode = settings.deployment_mode;
    let namespace = settings.worker.namespace.clone();
    let metrics_handle = metrics::install("worker", mode.as_str(), &id).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let journal = match &settings.worker.journal {
        Some(path) => {
            Some(Journal::open(path, &id).with_context(|| format!("TASKER_WORKER_JOURNAL={}", path.display()))?)
        }
        None => None,
    };
    let http_listener =
        bind_http(settings.http_addr(Service::Worker)).await.context("binding the HTTP address (TASKER_HTTP_ADDR)")?;
    tracing::info!(
        instance = %id, mode = %mode,
        namespace = namespace.as_ref().map_or("(all)", |n| n.as_str()),
        handlers = %registry.names().collect::<Vec<_>>().join(","),
        concurrency = settings.worker.concurrency,
        prefetch = settings.worker.prefetch,
        prefetch_wait_ms = settings.worker.prefetch_wait_ms,
        "worker starting"
    );

    let pool = db::connect_lazy(
        settings.database_url(),
        &PoolSettings {
            max_connections: settings.db_max_connections,
            application_name: id.clone(),
            ..PoolSettings::default()
        },
    )
    .context("DATABASE_URL")?;

    // Statistics outlive processing, so the last events are flushed.
    let stats_stop = CancellationToken::new();
    let (stats, stats_writer) =
        SampledStatisticsCollector::start(&settings.statistics, pool.clone(), &id, stats_stop.clone());
    let upkeep = tokio::spawn(maintenance::run(
        pool.clone(),
        settings.maintenance.clone(),
        settings.statistics.retention_days,
        shutdown.clone(),
    ));

    let discovery = Discovery::start(
        DiscoveryConfig {
            mode,
            poll_interval: settings.poll_interval(),
            channels: namespace.clone().map_or(Channels::AllSteps, Channels::Steps),
            ping_interval: std::time::Duration::from_millis(settings.listener_ping_ms),
            reconnect_delay: std::time::Duration::from_millis(settings.listener_reconnect_ms),
            database_url: settings.database_url().to_owned(),
            listener_name: format!("{id}:listener"),
            statistics: stats.clone(),
        },
        shutdown.clone(),
    );

    let worker = Worker::new(
        pool.clone(),
        WorkerConfig {
            id: id.clone(),
            namespace,
            concurrency: settings.worker.concurrency,
            prefetch: settings.worker.prefetch,
            prefetch_wait: settings.worker.prefetch_wait(),
            lease: settings.worker.lease(),
            shutdown_timeout: settings.shutdown_timeout(),
        },
        registry,
        discovery.clone(),
        journal,
        stats.clone(),
        PgNotifyMonitor::new(&settings.monitoring, stats.clone()),
    );
    let work = tokio::spawn(worker.run(shutdown.clone()));
    let router =
        http::router(http::HealthState { pool: pool.clone(), discovery, metrics: metrics_handle, statistics: stats });
    let server = tokio::spawn(serve_http(http_listener, router, shutdown.clone()));

    shutdown.cancelled().await;
    let _ = work.await;
    let _ = server.await;
    let _ = upkeep.await;
    stats_stop.cancel();
    if let Some(writer) = stats_writer {
        writer.finished().await;
    }
    pool.close().await;
    Ok(())
}
