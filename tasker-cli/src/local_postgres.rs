//! A throwaway PostgreSQL server from the locally installed binaries
//! (`initdb`, `pg_ctl`): a temporary data directory and a free port on
//! 127.0.0.1, stopped and deleted when dropped. The Rust twin of
//! `scripts/lib/postgres.sh`, used by `tasker demo` and `tasker bench`.
//!
//! PostgreSQL refuses to run as root; as root, the server runs as the
//! `postgres` user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// A running throwaway server.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: Option<tempfile::TempDir>,
    bin_dir: PathBuf,
    port: u16,
    run_as_postgres: bool,
}

impl LocalPostgres {
    /// Initializes a cluster and starts it; the database `tasker` exists.
    pub fn start() -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("tasker-pg.").tempdir()?;
        let run_as_postgres = nix::unistd::geteuid().is_root();
        if run_as_postgres {
            let user = nix::unistd::User::from_name("postgres")?
                .context("running as root needs a `postgres` user to run the server")?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
        }
        let mut server = LocalPostgres { dir: Some(dir), bin_dir, port: 0, run_as_postgres };
        let data = server.data_dir();
        server.run("initdb", &["-D", &data, "-U", "tasker", "--auth=trust", "-E", "UTF8", "--no-locale"])?;
        let mut last_error = None;
        for _ in 0..5 {
            server.port = free_port()?;
            let options = server.server_options();
            let log = server.dir_path().join("server.log").display().to_string();
            match server.run("pg_ctl", &["-D", &data, "-w", "-t", "60", "-l", &log, "-o", &options, "start"]) {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                Err(err) => last_error = Some(err),
            }
        }
        if let Some(err) = last_error {
            return Err(err.context("starting PostgreSQL"));
        }
        server.run("createdb", &["-h", "127.0.0.1", "-p", &server.port.to_string(), "-U", "tasker", "tasker"])?;
        Ok(server)
    }

    /// `postgres://tasker@127.0.0.1:<port>/tasker`.
    pub fn url(&self) -> String {
        format!("postgres://tasker@127.0.0.1:{}/tasker", self.port)
    }

    /// The temporary directory holding the cluster.
    pub fn dir_path(&self) -> &Path {
        self.dir.as_ref().map_or_else(|| Path::new("/nonexistent"), |d| d.path())
    }

    /// `postgres` options: port, socket directory, loopback only, and
    /// pg_stat_statements (the benchmarks read it).
    fn server_options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 \
             -c shared_preload_libraries=pg_stat_statements -c shared_buffers=256MB",
            self.port,
            self.dir_path().display()
        )
    }

    fn data_dir(&self) -> String {
        self.dir_path().join("data").display().to_string()
    }

    /// Stops the server but keeps its data (see [`LocalPostgres::start_again`]).
    pub fn pause(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"])
    }

    /// Starts a server stopped by [`LocalPostgres::pause`], with its old options.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir_path().join("server.log").display().to_string();
        let options = self.server_options();
        self.run("pg_ctl", &["-D", &data, "-w", "-t", "60", "-l", &log, "-o", &options, "start"])
    }

    /// Stops the server and deletes its directory. Idempotent.
    pub fn stop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        let data = self.data_dir();
        if let Err(err) = self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"]) {
            eprintln!("warning: stopping the throwaway PostgreSQL: {err:#}");
            let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
        if let Some(dir) = self.dir.take()
            && let Err(err) = dir.close()
        {
            eprintln!("warning: removing the throwaway PostgreSQL directory: {err}");
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let binary = self.bin_dir.join(program);
        let mut command = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !output.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The directory with `initdb` and `pg_ctl`: from PATH, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        // initdb on PATH may be a symlink into the real directory, next to createdb.
        let real = std::fs::canonicalize(dir.join("initdb"))?;
        if let Some(parent) = real.parent() {
            return Ok(parent.to_path_buf());
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    candidates.sort();
    candidates.pop().context("PostgreSQL's initdb and pg_ctl were not found; install PostgreSQL or set DATABASE_URL")
}
