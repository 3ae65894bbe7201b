//! `tasker-orchestrator`: `serve` (default) runs the service; `migrate` applies
//! the schema and exits. Configuration comes from the environment (and an
//! optional TOML file, `TASKER_CONFIG`); see the README's table.

use clap::{Parser, Subcommand};
use tasker_shared::config::Settings;
use tasker_shared::service::{self, EXIT_BAD_CONFIG};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "tasker-orchestrator", version, about = "Tasker's orchestrator service")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the orchestrator (the default).
    Serve,
    /// Apply pending schema migrations, then exit.
    Migrate,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("tasker-orchestrator: configuration error: {err}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    service::init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tasker-orchestrator: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let shutdown = CancellationToken::new();
                service::cancel_on_signal(shutdown.clone());
                tasker_orchestrator::startup::run(settings, shutdown).await
            }
            Command::Migrate => migrate(&settings).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<tasker_orchestrator::startup::BadTemplateFile>().is_some() => {
            tracing::error!("{err:#}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = tasker_shared::db::connect_lazy(settings.database_url(), &Default::default())?;
    tasker_shared::db::migrate(&pool).await?;
    pool.close().await;
    tracing::info!("schema is up to date");
    Ok(())
}
