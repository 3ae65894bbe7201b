//! Builds and runs the orchestrator service from its settings: database and
//! schema, templates, metrics, discovery, the orchestration loop, the rescuer,
//! and the HTTP API; then shuts it all down in order on SIGTERM/SIGINT.

use std::path::Path;

use anyhow::Context;
use tasker_shared::config::{Service, Settings};
use tasker_shared::db::{self, PoolSettings};
use tasker_shared::discovery::{Channels, Discovery, DiscoveryConfig};
use tasker_shared::event_system::SampledStatisticsCollector;
use tasker_shared::maintenance;
use tasker_shared::monitoring::{PgNotifyMonitor, pg_notify_monitor};
use tasker_shared::service::{bind_http, retry_until, serve_http};
use tasker_shared::template::{self, PublishOutcome, TaskTemplate};
use tasker_shared::{http, metrics};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::orchestrator::Orchestrator;
use crate::rescuer;

/// A template file that could not be loaded: a configuration error (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("template file {path}: {problem}")]
pub struct BadTemplateFile {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Runs the orchestrator until `shutdown` (or a signal) stops it.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let id = settings.instance_id(Service::Orchestrator);
    let mode = settings.deployment_mode;
    let templates = read_templates(&settings.orchestrator.templates_dir)?;
    let metrics_handle =
        metrics::install("orchestrator", mode.as_str(), &id).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let http_listener = bind_http(settings.http_addr(Service::Orchestrator))
        .await
        .context("binding the HTTP address (TASKER_HTTP_ADDR)")?;
    tracing::info!(instance = %id, mode = %mode, "orchestrator starting");

    let pool = db::connect_lazy(
        settings.database_url(),
        &PoolSettings {
            max_connections: settings.db_max_connections,
            application_name: id.clone(),
            ..PoolSettings::default()
        },
    )
    .context("DATABASE_URL")?;

    let Some(()) = retry_until("connecting and migrating the schema", &shutdown, || db::migrate(&pool)).await else {
        return Ok(());
    };
    tracing::info!("schema is up to date");
    publish_templates(&pool, &templates).await?;

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
            channels: Channels::Tasks,
            ping_interval: std::time::Duration::from_millis(settings.listener_ping_ms),
            reconnect_delay: std::time::Duration::from_millis(settings.listener_reconnect_ms),
            database_url: settings.database_url().to_owned(),
            listener_name: format!("{id}:listener"),
            statistics: stats.clone(),
        },
        shutdown.clone(),
    );

    let orchestrator = Orchestrator::new(
        pool.clone(),
        id.clone(),
        settings.orchestrator.claim_batch,
        settings.orchestrator.claim_timeout(),
        discovery.clone(),
        stats.clone(),
        PgNotifyMonitor::new(&settings.monitoring, stats.clone()),
    );
    let checks =
        tokio::spawn(pg_notify_monitor::run_checks(pool.clone(), settings.monitoring.clone(), shutdown.clone()));
    let orchestration = tokio::spawn(orchestrator.run(shutdown.clone()));
    let rescue = tokio::spawn(rescuer::run(
        pool.clone(),
        id.clone(),
        settings.orchestrator.rescue_interval(),
        stats.clone(),
        shutdown.clone(),
    ));

    let router = http::router(http::HealthState {
        pool: pool.clone(),
        discovery,
        metrics: metrics_handle,
        statistics: stats.clone(),
    })
    .merge(api::router(
        ApiState { pool: pool.clone(), actor: id.clone(), stats: stats.clone() },
        settings.orchestrator.max_body_bytes,
        settings.orchestrator.api_token.clone(),
    ));
    let server = tokio::spawn(serve_http(http_listener, router, shutdown.clone()));

    shutdown.cancelled().await;
    let deadline = settings.shutdown_timeout();
    let stopped = tokio::time::timeout(deadline, async {
        let _ = orchestration.await;
        let _ = rescue.await;
        let _ = server.await;
        let _ = upkeep.await;
        let _ = checks.await;
        stats_stop.cancel();
        if let Some(writer) = stats_writer {
            writer.finished().await;
        }
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(?deadline, "shutdown deadline passed; claims still held will expire by themselves");
    }
    pool.close().await;
    tracing::info!("orchestrator stopped");
    Ok(())
}

/// Reads every `*.json` template under `dir` (recursively). A missing directory
/// is fine; an unreadable or invalid file is a configuration error.
pub fn read_templates(dir: &Path) -> Result<Vec<TaskTemplate>, BadTemplateFile> {
    let mut files = Vec::new();
    collect_json_files(dir, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bad = |problem: String| BadTemplateFile { path: path.display().to_string(), problem };
            let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
            let template: TaskTemplate = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            template.validate().map_err(|e| bad(e.to_string()))?;
            Ok(template)
        })
        .collect()
}

fn collect_json_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_json_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

async fn publish_templates(pool: &sqlx::PgPool, templates: &[TaskTemplate]) -> anyhow::Result<()> {
    for t in templates {
        let mut tx = pool.begin().await?;
        let outcome = template::publish_template(&mut tx, t)
            .await
            .with_context(|| format!("publishing template {}/{} {}", t.namespace, t.name, t.version))?;
        tx.commit().await?;
        if outcome == PublishOutcome::Created {
            tracing::info!(namespace = %t.namespace, name = %t.name, version = %t.version, "template published");
        }
    }
    Ok(())
}
