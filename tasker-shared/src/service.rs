//! What every service binary does the same way: logging, signals, the HTTP
//! server, waiting for the database at start-up.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::discovery::Backoff;

/// The exit code for invalid configuration (DESIGN.md: "exit code 2").
pub const EXIT_BAD_CONFIG: i32 = 2;

/// Sets up logging: `RUST_LOG` filters (default `info`), `LOG_FORMAT` picks
/// text or JSON lines, on stderr.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT (Ctrl-C). A second signal exits at once.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutting down: no new work is claimed; in-flight work finishes or is released");
        shutdown.cancel();
        let again = wait_for_signal().await;
        tracing::warn!(signal = again, "second signal: exiting immediately");
        std::process::exit(130);
    });
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Binds the HTTP port, so start-up fails at once if it is taken.
pub async fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
    Ok(listener)
}

/// Serves `router` until `shutdown` is cancelled, then finishes the requests
/// in flight.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// Retries `attempt` with backoff until it succeeds or `shutdown` is cancelled
/// (then `None`). Logs each failure with `what`.
pub async fn retry_until<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new();
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in = ?delay, "{what} failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// Sleeps for `delay` unless shutdown begins first (returns false then).
pub async fn sleep_unless_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shutdown.cancelled() => false,
    }
}
