//! Tasker service processes started from this machine's binaries: spawn with
//! an environment, wait until ready, read metrics, signal, wait for exit.
//! Used by `tasker demo`, `tasker bench` and the cross-process tests.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Which service binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// `tasker-orchestrator`.
    Orchestrator,
    /// `tasker-worker`.
    Worker,
}

impl Binary {
    /// The executable's name.
    pub fn file_name(self) -> &'static str {
        match self {
            Binary::Orchestrator => "tasker-orchestrator",
            Binary::Worker => "tasker-worker",
        }
    }
}

/// Finds a workspace binary: next to the current executable (a release or
/// debug build of `tasker`), one level up (a test executable in `deps/`), or on
/// PATH.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let beside = exe.parent().map(|d| d.join(name));
    let above = exe.parent().and_then(Path::parent).map(|d| d.join(name));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name));
    beside.into_iter().chain(above).chain(on_path).find(|p| p.is_file()).with_context(|| {
        format!("{name} not found next to {} or on PATH; build it with `cargo build --bins`", exe.display())
    })
}

/// A running service.
#[derive(Debug)]
pub struct ServiceProcess {
    /// Its instance id (also the log file's name).
    pub name: String,
    /// Where its HTTP endpoints listen.
    pub http: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl ServiceProcess {
    /// Starts `binary` as instance `name`, with `env` on top of a clean
    /// environment (PATH kept), logging to `<log_dir>/<name>.log`.
    pub async fn spawn(binary: Binary, name: &str, env: &[(&str, String)], log_dir: &Path) -> anyhow::Result<Self> {
        let program = find_binary(binary.file_name())?;
        let http: SocketAddr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = log_dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&program);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("INSTANCE_ID", name)
            .env("TASKER_HTTP_ADDR", http.to_string())
            .env("RUST_LOG", std::env::var("TASKER_CHILD_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().with_context(|| format!("starting {}", program.display()))?;
        Ok(ServiceProcess { name: name.to_owned(), http, child, log })
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until `/health/ready` answers 200; fails early, with the log's
    /// tail, if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("{}/health/ready", self.base_url());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before becoming ready:\n{}", self.name, self.log_tail(30));
            }
            let ok =
                client.get(&url).timeout(Duration::from_secs(2)).send().await.is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} was not ready after {timeout:?}:\n{}", self.name, self.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `/health/ready` answers 200 now.
    pub async fn is_ready(&self) -> bool {
        reqwest::Client::new()
            .get(format!("{}/health/ready", self.base_url()))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// CPU time and memory of the process so far (Linux `/proc`).
    pub fn resource_usage(&self) -> Option<ResourceUsage> {
        resource_usage(self.pid()?)
    }

    /// Scrapes `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", self.base_url()))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Metrics::parse(&text))
    }

    /// Sends `signal` (SIGTERM, SIGKILL, SIGSTOP, SIGCONT...).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("process already reaped")?;
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("{} did not exit within {timeout:?}:\n{}", self.name, self.log_tail(20)),
        }
    }

    /// SIGTERM, then the exit status (SIGKILL after `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if self.child.try_wait()?.is_some() {
            return Ok(self.child.wait().await?);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(timeout).await {
            Ok(status) => Ok(status),
            Err(err) => {
                let _ = self.child.kill().await;
                Err(err)
            }
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// CPU and memory of a process.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ResourceUsage {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory now, bytes.
    pub rss_bytes: u64,
    /// Peak resident memory, bytes.
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn resource_usage(pid: u32) -> Option<ResourceUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some(ResourceUsage { cpu_seconds: ticks / hz, rss_bytes: kb("VmRSS:")?, peak_rss_bytes: kb("VmHWM:")? })
}
