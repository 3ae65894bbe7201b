//! `tasker demo`, the README's "run it" command, runs to the end with no
//! server running beforehand and leaves nothing behind.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

/// Processes started from this build's binaries (the demo's children), or
/// running a throwaway PostgreSQL. Other tasker processes on the machine (a
/// compose deployment, say) do not count.
fn tasker_processes() -> BTreeSet<String> {
    let bin_dir =
        tasker_tests::process::find_binary("tasker-orchestrator").unwrap().parent().unwrap().display().to_string();
    let output = std::process::Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains(&format!("{bin_dir}/tasker-")) || l.contains("tasker-pg."))
        .filter(|l| !l.contains(" ps -eo"))
        .map(str::to_owned)
        .collect()
}

fn throwaway_dirs() -> BTreeSet<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tasker-pg.") || n.starts_with("tasker-demo-logs."))
        .collect()
}

#[test]
fn tasker_demo_runs_to_the_end_and_leaves_nothing_behind() {
    let processes_before = tasker_processes();
    let dirs_before = throwaway_dirs();
    let tasker = tasker_tests::process::find_binary("tasker").unwrap();
    let output = std::process::Command::new(tasker)
        .args(["demo", "--tasks", "200", "--timeout-secs", "120"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("complete            200"), "{stdout}");
    assert!(stdout.contains("steps claimed by    event"), "{stdout}");
    assert!(stderr.contains("cleaned up"), "{stderr}");
    assert_eq!(tasker_processes(), processes_before, "no demo process is left");
    assert_eq!(throwaway_dirs(), dirs_before, "no demo directory is left");
}
