//! `tasker chaos`: a bounded soak of a mixed deployment under random faults,
//! ending with the invariant checks (`docs/testing.md`).
//!
//! For `--minutes`, tasks of three templates (a diamond, a short sleep, a step
//! that fails once) arrive at a steady rate while, every few seconds, one fault
//! is injected at random: every LISTEN connection terminated from the server,
//! an orchestrator or a worker SIGKILLed (and a fresh one started in its
//! place), or a worker frozen for a few seconds (SIGSTOP, then SIGCONT). Then
//! submissions stop, the faults stop, and the run must drain: every task
//! complete, `tasker.invariant_violations()` empty, every attempt run at most
//! once and every recorded outcome exactly once. Exit status says whether it
//! held.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use serde_json::json;

use crate::bench::BenchDatabase;
use crate::client::ApiClient;
use crate::process::{Binary, ServiceProcess};

/// Options of `tasker chaos`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The PostgreSQL server.
    pub admin_url: String,
    /// How long faults are injected.
    pub minutes: f64,
    /// Tasks submitted per second.
    pub rate: u64,
    /// Seed for the choice of faults (printed, so a run can be repeated).
    pub seed: u64,
}

#[derive(Debug, Clone)]
struct Spec {
    binary: Binary,
    role: &'static str,
    mode: &'static str,
    env: Vec<(&'static str, String)>,
}

fn specs() -> Vec<Spec> {
    let spec = |binary, role, mode, env: &[(&'static str, &str)]| Spec {
        binary,
        role,
        mode,
        env: env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
    };
    let common: &[(&str, &str)] = &[("TASKER_CLAIM_TIMEOUT_MS", "3000"), ("TASKER_STEP_LEASE_MS", "3000")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        common.iter().chain(extra).copied().collect()
    };
    vec![
        spec(Binary::Orchestrator, "orch-event", "EventDrivenOnly", &with(&[("TASKER_RESCUE_INTERVAL_MS", "1000")])),
        spec(Binary::Orchestrator, "orch-event", "EventDrivenOnly", &with(&[])),
        spec(Binary::Orchestrator, "orch-poll", "PollingOnly", &with(&[("POLL_INTERVAL_MS", "1000")])),
        spec(Binary::Worker, "worker-alpha", "EventDrivenOnly", &with(&[("NAMESPACE", "alpha")])),
        spec(Binary::Worker, "worker-beta", "EventDrivenOnly", &with(&[("NAMESPACE", "beta")])),
        spec(Binary::Worker, "worker-poll", "PollingOnly", &with(&[("POLL_INTERVAL_MS", "1000")])),
    ]
}

async fn start(spec: &Spec, generation: usize, db_url: &str, logs: &Path) -> anyhow::Result<ServiceProcess> {
    let name = format!("{}-{generation}", spec.role);
    let mut env = vec![
        ("DATABASE_URL", db_url.to_owned()),
        ("DEPLOYMENT_MODE", spec.mode.to_owned()),
        ("TASKER_TEMPLATES_DIR", "/nonexistent".to_owned()),
        ("TASKER_DB_MAX_CONNECTIONS", "6".to_owned()),
    ];
    if spec.binary == Binary::Worker {
        env.push(("TASKER_WORKER_JOURNAL", logs.join(format!("{name}.journal")).display().to_string()));
    }
    env.extend(spec.env.iter().cloned());
    let mut service = ServiceProcess::spawn(spec.binary, &name, &env, logs).await?;
    service.wait_ready(Duration::from_secs(60)).await?;
    Ok(service)
}

/// Runs the soak; an error means an invariant failed (or the run could not start).
pub async fn run(options: Options) -> anyhow::Result<()> {
    let logs = tempfile::Builder::new().prefix("tasker-chaos.").tempdir()?;
    let db = BenchDatabase::create(&options.admin_url, "tasker_chaos").await?;
    let specs = specs();
    let mut generation = 0;
    let mut services = Vec::new();
    for spec in &specs {
        services.push(start(spec, generation, &db.url, logs.path()).await?);
        generation += 1;
    }
    let api = ApiClient::new(services[0].base_url(), None);
    api.publish_template(&json!({"namespace": "alpha", "name": "diamond", "version": "1.0.0", "steps": [
        {"name": "a", "handler": "noop"}, {"name": "b", "handler": "noop", "depends_on": ["a"]},
        {"name": "c", "handler": "sleep", "config": {"duration_ms": 20}, "depends_on": ["a"]},
        {"name": "d", "handler": "noop", "depends_on": ["b", "c"]}]}))
        .await?;
    api.publish_template(&json!({"namespace": "beta", "name": "nap", "version": "1.0.0",
        "steps": [{"name": "only", "handler": "sleep", "config": {"duration_ms": 50}}]}))
        .await?;
    api.publish_template(&json!({"namespace": "alpha", "name": "flaky", "version": "1.0.0",
        "steps": [{"name": "only", "handler": "fail", "config": {"fail_times": 1}, "backoff_ms": 200, "max_attempts": 5}]}))
    .await?;

    let mut rng = fastrand::Rng::with_seed(options.seed);
    eprintln!("chaos: {} minutes, {} tasks/s, seed {}", options.minutes, options.rate, options.seed);
    let deadline = Instant::now() + Duration::from_secs_f64(options.minutes * 60.0);
    let mut next_fault = Instant::now() + Duration::from_secs(3);
    let mut submitted: i64 = 0;
    let mut faults: Vec<String> = Vec::new();
    let templates = [("alpha", "diamond"), ("beta", "nap"), ("alpha", "flaky")];
    let mut ticks = tokio::time::interval(Duration::from_millis(1000 / options.rate.max(1)));
    while Instant::now() < deadline {
        ticks.tick().await;
        let (namespace, name) = templates[rng.usize(..templates.len())];
        // Any orchestrator will do; one may be dead: try the others.
        let mut sent = false;
        for service in services.iter().filter(|s: &&ServiceProcess| s.name.starts_with("orch")) {
            let client = ApiClient::new(service.base_url(), None);
            if client.submit(&json!({"namespace": namespace, "name": name})).await.is_ok() {
                sent = true;
                break;
            }
        }
        if sent {
            submitted += 1;
        }
        if Instant::now() >= next_fault {
            next_fault = Instant::now() + Duration::from_millis(2_000 + rng.u64(..3_000));
            faults.push(inject(&mut rng, &mut services, &specs, &mut generation, &db, logs.path()).await?);
            eprintln!("  fault {}: {}", faults.len(), faults.last().map_or("", String::as_str));
        }
    }
    eprintln!("chaos: submitted {submitted} tasks, injected {} faults; draining...", faults.len());

    let drained = crate::bench::wait_for_final(&db.pool, submitted, Duration::from_secs(600)).await;
    let verdict = check(&db, logs.path(), submitted).await;
    for service in &mut services {
        let _ = service.terminate(Duration::from_secs(30)).await;
    }
    drained.context("draining after the faults")?;
    match verdict {
        Ok(summary) => {
            println!("chaos: PASS: {summary}");
            db.drop_database().await?;
            Ok(())
        }
        Err(problems) => {
            let kept = logs.keep();
            bail!("chaos: FAIL (logs kept in {}):\n{}", kept.display(), problems.join("\n"))
        }
    }
}

/// Injects one random fault and says what it was.
async fn inject(
    rng: &mut fastrand::Rng,
    services: &mut [ServiceProcess],
    specs: &[Spec],
    generation: &mut usize,
    db: &BenchDatabase,
    logs: &Path,
) -> anyhow::Result<String> {
    match rng.u8(..3) {
        0 => {
            let killed: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE '%:listener'",
            )
            .fetch_one(&db.pool)
            .await?;
            Ok(format!("terminated {killed} LISTEN connections"))
        }
        1 => {
            let index = rng.usize(..services.len());
            let name = services[index].name.clone();
            services[index].signal(Signal::SIGKILL)?;
            services[index].wait_exit(Duration::from_secs(10)).await?;
            services[index] = start(&specs[index], *generation, &db.url, logs).await?;
            *generation += 1;
            Ok(format!("SIGKILL {name}, started {}", services[index].name))
        }
        _ => {
            let workers: Vec<usize> = (0..services.len()).filter(|&i| specs[i].binary == Binary::Worker).collect();
            let index = workers[rng.usize(..workers.len())];
            let pause = Duration::from_millis(1_000 + rng.u64(..4_000));
            services[index].signal(Signal::SIGSTOP)?;
            tokio::time::sleep(pause).await;
            services[index].signal(Signal::SIGCONT)?;
            Ok(format!("froze {} for {pause:?}", services[index].name))
        }
    }
}

/// The final checks; a summary, or every violation.
async fn check(db: &BenchDatabase, logs: &Path, submitted: i64) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let complete: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks WHERE state = 'complete'")
        .fetch_one(&db.pool)
        .await
        .unwrap_or(-1);
    if complete != submitted {
        problems.push(format!("{complete} of {submitted} tasks complete"));
    }
    match tasker_shared::invariants::violations(&db.pool).await {
        Ok(v) if v.is_empty() => {}
        Ok(v) => problems.extend(v.iter().map(|v| format!("{}: {} ({})", v.invariant, v.subject, v.detail))),
        Err(e) => problems.push(format!("invariant query failed: {e}")),
    }
    let audit = crate::audit::check_attempts(&db.pool, &crate::audit::read_journals(logs)).await;
    match (problems.is_empty(), audit) {
        (true, Ok(a)) => Ok(format!(
            "{complete} tasks complete; {} attempts, {} handler invocations, {} attempts lost with their worker and retried; invariants hold",
            a.attempts, a.invocations, a.never_ran
        )),
        (_, Ok(_)) => Err(problems),
        (_, Err(more)) => {
            problems.extend(more);
            Err(problems)
        }
    }
}
