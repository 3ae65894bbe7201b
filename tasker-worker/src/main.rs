//! `tasker-worker`: runs the built-in handlers (`noop`, `sleep`, `fail`,
//! `echo`). Configuration comes from the environment (and an optional TOML
//! file, `TASKER_CONFIG`); see the README's table.

use clap::Parser;
use tasker_shared::config::Settings;
use tasker_shared::service::{self, EXIT_BAD_CONFIG};
use tasker_worker::handler::HandlerRegistry;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "tasker-worker", version, about = "Tasker's worker service (built-in handlers)")]
struct Cli {}

fn main() -> std::process::ExitCode {
    let Cli {} = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("tasker-worker: configuration error: {err}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    service::init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tasker-worker: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        service::cancel_on_signal(shutdown.clone());
        tasker_worker::startup::run(settings, HandlerRegistry::with_builtins(), shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
