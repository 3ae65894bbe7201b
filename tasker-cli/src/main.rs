//! `tasker`: the command-line client.
//!
//! - `tasker demo`: runs a small mixed deployment end to end (see [`tasker_cli::demo`]).
//! - `tasker submit`, `tasker status`, `tasker templates`: talk to an
//!   orchestrator's API (`--url` / `TASKER_URL`, token from `TASKER_API_TOKEN`).

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tasker_cli::bench::throughput::Workload;
use tasker_cli::client::ApiClient;
use tasker_cli::demo::{self, DemoOptions};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "tasker", version, about = "Tasker's command-line client")]
struct Cli {
    /// The orchestrator's base URL.
    #[arg(long, env = "TASKER_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// Bearer token for the API, if the orchestrator requires one.
    #[arg(long, env = "TASKER_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a small mixed deployment on this machine and print a summary.
    Demo {
        /// Tasks to submit.
        #[arg(long, default_value_t = 1000)]
        tasks: usize,
        /// Seconds to wait for the tasks to finish.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// Run a benchmark (prints a table; `--json FILE` also writes the numbers).
    Bench {
        #[command(subcommand)]
        workload: BenchWorkload,
        /// Also write the results as JSON to this file.
        #[arg(long, global = true)]
        json: Option<std::path::PathBuf>,
    },
    /// A bounded soak under random faults, ending with the invariant checks.
    Chaos {
        /// Minutes of faults (the drain and checks come after).
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Tasks submitted per second.
        #[arg(long, default_value_t = 30)]
        rate: u64,
        /// Seed for the faults (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Submit a task and print its uuid.
    Submit {
        /// Template namespace.
        #[arg(long)]
        namespace: String,
        /// Template name.
        #[arg(long)]
        name: String,
        /// Template version (default: the latest).
        #[arg(long)]
        version: Option<String>,
        /// Context, as JSON.
        #[arg(long, default_value = "{}")]
        context: String,
        /// Priority (higher first).
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Idempotency key.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the task is final and print its state.
        #[arg(long)]
        wait: bool,
    },
    /// Show a task: state, steps, attempts, errors.
    Status {
        /// The task's uuid.
        task_uuid: Uuid,
        /// Print the full JSON.
        #[arg(long)]
        json: bool,
    },
    /// List templates, or publish one from a JSON file.
    Templates {
        /// A template file to publish.
        #[arg(long)]
        publish: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchWorkload {
    /// What statistics cost: the same workload with statistics off, synchronous and sampled.
    Statistics {
        /// Diamond tasks per mode (four steps each).
        #[arg(long, default_value_t = 5000)]
        tasks: usize,
    },
    /// 20,000 one-step noop tasks submitted up front.
    Single(ThroughputArgs),
    /// 5,000 four-step diamond tasks submitted up front.
    Diamond(ThroughputArgs),
    /// 500 tasks of 1 -> 50 -> 1 steps submitted up front.
    Fanout(ThroughputArgs),
    /// Linear four-step tasks at 20 tasks/s for 60 s, EventDrivenOnly.
    Latency(ThroughputArgs),
    /// PollingOnly against EventDrivenOnly: database load, discovery latency, CPU, memory.
    Polling {
        /// The polling interval.
        #[arg(long, default_value_t = 5000)]
        interval_ms: u64,
        /// Seconds of idle measurement.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        /// Tasks per second under load.
        #[arg(long, default_value_t = 20)]
        rate: u64,
        /// Seconds of load.
        #[arg(long, default_value_t = 60)]
        load_secs: u64,
    },
}

/// Options shared by the throughput workloads.
#[derive(Debug, clap::Args)]
struct ThroughputArgs {
    /// Orchestrator processes.
    #[arg(long, default_value_t = 2)]
    orchestrators: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Run this many tasks instead of the workload's count (quick runs).
    #[arg(long)]
    tasks: Option<usize>,
    /// Extra environment for every service, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Keep the benchmark's database afterwards, to study its history (only
    /// with DATABASE_URL; a throwaway server is deleted anyway).
    #[arg(long)]
    keep_database: bool,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s}"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tasker: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let api = ApiClient::new(cli.url.clone(), cli.token.clone());
    match cli.command {
        Command::Demo { tasks, timeout_secs } => {
            demo::run(DemoOptions {
                tasks,
                database_url: std::env::var("DATABASE_URL").ok(),
                timeout: Duration::from_secs(timeout_secs),
            })
            .await
        }
        Command::Bench { workload, json } => {
            let (admin_url, postgres) = database_or_throwaway()?;
            let result = match workload {
                BenchWorkload::Statistics { tasks } => {
                    let options = tasker_cli::bench::statistics::Options { tasks, admin_url };
                    tasker_cli::bench::statistics::run(options).await.and_then(|r| Ok(serde_json::to_value(r)?))
                }
                BenchWorkload::Single(args) => throughput(admin_url, Workload::Single, args).await,
                BenchWorkload::Diamond(args) => throughput(admin_url, Workload::Diamond, args).await,
                BenchWorkload::Fanout(args) => throughput(admin_url, Workload::Fanout, args).await,
                BenchWorkload::Latency(args) => throughput(admin_url, Workload::Latency, args).await,
                BenchWorkload::Polling { interval_ms, idle_secs, rate, load_secs } => {
                    let options = tasker_cli::bench::polling::Options {
                        admin_url,
                        poll_interval_ms: interval_ms,
                        idle_secs,
                        rate,
                        load_secs,
                    };
                    tasker_cli::bench::polling::run(options).await.and_then(|r| Ok(serde_json::to_value(r)?))
                }
            };
            drop(postgres);
            let report = result?;
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Chaos { minutes, rate, seed } => {
            let (admin_url, postgres) = database_or_throwaway()?;
            let seed = seed.unwrap_or_else(|| fastrand::u64(..));
            let result = tasker_cli::chaos::run(tasker_cli::chaos::Options { admin_url, minutes, rate, seed }).await;
            drop(postgres);
            result
        }
        Command::Submit { namespace, name, version, context, priority, idempotency_key, wait } => {
            let context: serde_json::Value = serde_json::from_str(&context).context("--context must be JSON")?;
            let mut body = serde_json::json!({
                "namespace": namespace, "name": name, "context": context, "priority": priority,
            });
            if let Some(v) = version {
                body["version"] = v.into();
            }
            if let Some(k) = idempotency_key {
                body["idempotency_key"] = k.into();
            }
            let task = api.submit(&body).await?;
            println!("{task}");
            if wait {
                loop {
                    let details = api.task(task).await?;
                    if details["completed_at"].is_string() {
                        println!("{}", details["state"].as_str().unwrap_or("?"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Ok(())
        }
        Command::Status { task_uuid, json } => {
            let task = api.task(task_uuid).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&task)?);
                return Ok(());
            }
            println!(
                "{} {}/{} {}: {}",
                task_uuid,
                task["namespace"].as_str().unwrap_or(""),
                task["name"].as_str().unwrap_or(""),
                task["version"].as_str().unwrap_or(""),
                task["state"].as_str().unwrap_or("")
            );
            for step in task["steps"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} {:<18} attempts {}/{}{}",
                    step["name"].as_str().unwrap_or(""),
                    step["state"].as_str().unwrap_or(""),
                    step["attempts"],
                    step["max_attempts"],
                    step["last_error"].as_str().map(|e| format!("  last error: {e}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Templates { publish } => {
            if let Some(path) = publish {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                let template: serde_json::Value = serde_json::from_str(&text)?;
                let published = api.publish_template(&template).await?;
                println!("published {published}");
                return Ok(());
            }
            for t in api.templates().await?.as_array().into_iter().flatten() {
                println!(
                    "{}/{} {} ({} steps)",
                    t["namespace"].as_str().unwrap_or(""),
                    t["name"].as_str().unwrap_or(""),
                    t["version"].as_str().unwrap_or(""),
                    t["steps"].as_array().map_or(0, Vec::len)
                );
            }
            Ok(())
        }
    }
}

async fn throughput(admin_url: String, workload: Workload, args: ThroughputArgs) -> anyhow::Result<serde_json::Value> {
    let options = tasker_cli::bench::throughput::Options {
        admin_url,
        workload,
        orchestrators: args.orchestrators,
        workers: args.workers,
        tasks: args.tasks,
        env: args.env,
        keep_database: args.keep_database,
    };
    Ok(serde_json::to_value(tasker_cli::bench::throughput::run(options).await?)?)
}

/// `DATABASE_URL` when set; otherwise a throwaway PostgreSQL, returned so the
/// caller keeps it alive (it is stopped and deleted when dropped).
fn database_or_throwaway() -> anyhow::Result<(String, Option<tasker_cli::local_postgres::LocalPostgres>)> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok((url, None));
    }
    eprintln!("starting a throwaway PostgreSQL...");
    let postgres = tasker_cli::local_postgres::LocalPostgres::start()?;
    Ok((postgres.url(), Some(postgres)))
}
