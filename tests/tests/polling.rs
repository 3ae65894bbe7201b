//! The polling instance's characteristics, with bounds that cannot flake:
//! PollingOnly finishes every one-step task within its interval (plus
//! scheduling slack), and holds no LISTEN connection. The numbers themselves
//! are a benchmark:
//! `./scripts/bench polling` writes them to docs/benchmarks/polling.md.

#![allow(clippy::unwrap_used)]

use tasker_cli::bench::polling::{Options, run_mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_instance_performance_characteristics() {
    let options = Options {
        admin_url: std::env::var("DATABASE_URL").unwrap(),
        poll_interval_ms: 1_000,
        idle_secs: 3,
        rate: 10,
        load_secs: 6,
    };
    let logs = tempfile::tempdir().unwrap();
    let polling = run_mode(&options, "PollingOnly", logs.path()).await.unwrap();
    let bound = options.poll_interval_ms as f64 + 1_000.0;
    // A one-step task needs one poll: its worker's (its submission starts it,
    // its completion finalizes it).
    assert!(polling.submit_to_final_ms.max <= bound, "a task took {} ms to finish", polling.submit_to_final_ms.max);
    assert!(polling.step_pickup_ms.max <= bound, "a step waited {} ms for a poll", polling.step_pickup_ms.max);
    assert!(polling.idle_statements_per_sec > 0.0, "an idle poller still polls");
    assert_eq!(polling.tasks, 60);
    assert_eq!(polling.listen_connections, 0, "PollingOnly holds no LISTEN connection");

    let event = run_mode(&options, "EventDrivenOnly", logs.path()).await.unwrap();
    assert!(event.submit_to_final_ms.max <= bound, "event-driven is never slower than the poll bound");
    assert_eq!(event.listen_connections, 2, "the event-driven orchestrator and worker each listen");
    eprintln!(
        "polling: idle {:.1} st/s, submit to final p50 {:.0} ms max {:.0} ms; event-driven: idle {:.1} st/s, submit to final p50 {:.1} ms",
        polling.idle_statements_per_sec,
        polling.submit_to_final_ms.p50,
        polling.submit_to_final_ms.max,
        event.idle_statements_per_sec,
        event.submit_to_final_ms.p50
    );
}
