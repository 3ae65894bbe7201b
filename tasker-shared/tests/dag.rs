//! DAG readiness, template validation in SQL, and discovery cost.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;

use sqlx::PgPool;
use support::*;
use tasker_shared::state_machine::StepState;
use tasker_shared::step_result::{self, Success};
use uuid::Uuid;

async fn enqueued_names(pool: &PgPool, task: Uuid) -> BTreeSet<String> {
    let names = enqueue_pass(pool, ORCH)
        .await
        .into_iter()
        .filter(|e| e.task_uuid == task)
        .map(|e| e.step_uuid)
        .collect::<Vec<_>>();
    sqlx::query_scalar("SELECT name FROM tasker.workflow_steps WHERE step_uuid = ANY($1)")
        .bind(&names)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Claims and completes `name`, checking it was the only runnable step.
async fn run_only_runnable_step(pool: &PgPool, name: &str) {
    let claims = claim_steps(pool, "w", 10).await;
    assert_eq!(claims.len(), 1, "only {name} was runnable, got {claims:?}");
    assert_eq!(claims[0].name, name);
    let recorded = step_result::complete_steps(
        pool,
        "w",
        &[Success { attempt: claims[0].attempt_ref(), result: serde_json::json!(name) }],
    )
    .await
    .unwrap();
    assert!(recorded[0].accepted);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_diamond_runs_a_then_b_and_c_together_then_d(pool: PgPool) {
    let t = diamond("dag");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    let states = |pool: PgPool| async move {
        let mut s = Vec::new();
        for name in ["a", "b", "c", "d"] {
            s.push(step_state(&pool, task, name).await);
        }
        s
    };
    use StepState::{Complete, Enqueued, InProgress, Pending};

    // The orchestrator's first pass enqueues the root only.
    assert_eq!(enqueued_names(&pool, task).await, BTreeSet::from(["a".to_owned()]));
    assert!(enqueued_names(&pool, task).await.is_empty(), "nothing new before a completes");
    run_only_runnable_step(&pool, "a").await;

    // Completing a enqueues b and c in the same transaction: no pass needed.
    assert_eq!(states(pool.clone()).await, [Complete, Enqueued, Enqueued, Pending]);
    assert!(enqueued_names(&pool, task).await.is_empty(), "an orchestrator pass finds nothing more to do");
    let claims = claim_steps(&pool, "w", 10).await;
    assert_eq!(claims.len(), 2, "b and c run in parallel");
    let b = claims.iter().find(|c| c.name == "b").unwrap();
    let c = claims.iter().find(|c| c.name == "c").unwrap();
    assert_eq!(b.dependency_results, serde_json::json!({"a": "a"}), "b sees a's result");

    step_result::complete_steps(&pool, "w", &[Success { attempt: b.attempt_ref(), result: serde_json::json!("b") }])
        .await
        .unwrap();
    assert_eq!(states(pool.clone()).await, [Complete, Complete, InProgress, Pending], "d waits for c");
    assert!(claim_all(&pool, ORCH).await.is_empty(), "c still runs: the task is not woken");

    let recorded = step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: c.attempt_ref(), result: serde_json::json!("c") }],
    )
    .await
    .unwrap();
    assert_eq!(recorded[0].enqueued_dependents.len(), 1);
    assert_eq!(states(pool.clone()).await, [Complete, Complete, Complete, Enqueued]);
    let d = claim_steps(&pool, "w", 10).await;
    assert_eq!(d[0].dependency_results, serde_json::json!({"b": "b", "c": "c"}));
    assert_invariants(&pool).await;
}

/// The trigger guards every writer, not only the API: raw inserts of bad DAGs
/// fail with SQLSTATE TK002 and a message naming the problem.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn the_database_rejects_cyclic_and_dangling_templates_naming_the_problem(pool: PgPool) {
    sqlx::query("INSERT INTO tasker.namespaces (name) VALUES ('raw')").execute(&pool).await.unwrap();
    let cases = [
        (
            serde_json::json!({"steps": [
                {"name": "a", "handler": "noop", "depends_on": ["c"]},
                {"name": "b", "handler": "noop", "depends_on": ["a"]},
                {"name": "c", "handler": "noop", "depends_on": ["b"]}]}),
            "steps form a cycle: a, b, c",
        ),
        (
            serde_json::json!({"steps": [
                {"name": "a", "handler": "noop", "depends_on": []},
                {"name": "b", "handler": "noop", "depends_on": ["ghost"]}]}),
            "step b depends on unknown step \"ghost\"",
        ),
        (
            serde_json::json!({"steps": [
                {"name": "a", "handler": "noop"}, {"name": "a", "handler": "noop"}]}),
            "step name a is used twice",
        ),
        (serde_json::json!({"steps": []}), "non-empty \"steps\" array"),
    ];
    for (definition, expected) in cases {
        let err = sqlx::query(
            "INSERT INTO tasker.task_templates (namespace, name, version, definition)
             VALUES ('raw', 'bad', '1.0.0', $1)",
        )
        .bind(&definition)
        .execute(&pool)
        .await
        .expect_err("a bad template must be rejected");
        let db = err.as_database_error().unwrap();
        assert_eq!(db.code().as_deref(), Some("TK002"));
        assert!(db.message().contains(expected), "{} should mention {expected}", db.message());
    }
    let (stored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM tasker.task_templates").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 0);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_published_version_is_immutable(pool: PgPool) {
    let t = single("immutable");
    publish(&pool, &t).await;
    publish(&pool, &t).await; // same definition again: a no-op

    let mut changed = t.clone();
    changed.steps[0].max_attempts = 7;
    let mut tx = pool.begin().await.unwrap();
    let err = tasker_shared::template::publish_template(&mut tx, &changed).await.expect_err("conflict");
    assert!(matches!(err, tasker_shared::Error::Conflict(_)), "{err}");
}

/// Principle 4: discovery only touches due work. With ten thousand finished
/// tasks in the table, the claim query is an index scan of the due-work index
/// and never reads a finished task.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn claiming_reads_only_the_due_work_index(pool: PgPool) {
    let t = single("explain");
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 10_000).await;
    // Finish them all, the way finalization leaves them.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "UPDATE tasker.tasks SET state = 'complete', completed_at = now(), ready_at = NULL, ready_since = NULL",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("SET session_replication_role = DEFAULT").execute(&mut *conn).await.unwrap();
    sqlx::query("ANALYZE tasker.tasks").execute(&mut *conn).await.unwrap();
    submit(&pool, &t, 5).await;
    assert_eq!(tasks.len(), 10_000);

    // The claim function's candidate query, as it runs inside claim_ready_tasks.
    let (plan,): (serde_json::Value,) = sqlx::query_as(
        "EXPLAIN (ANALYZE, FORMAT JSON)
         SELECT d.task_uuid FROM tasker.due_tasks d
         ORDER BY d.priority DESC, d.ready_at LIMIT 50 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let text = plan.to_string();
    assert!(text.contains("\"Index Name\":\"tasks_due_idx\""), "uses the due-work index: {text}");
    assert!(!text.contains("Seq Scan"), "never scans the table: {text}");
    let mut scans = Vec::new();
    collect_scans(&plan[0]["Plan"], &mut scans);
    let rows_read: f64 = scans.iter().map(|n| n["Actual Rows"].as_f64().unwrap_or(0.0)).sum();
    assert!(rows_read <= 5.0, "read {rows_read} rows for 5 due tasks: {text}");

    let claimed = claim_all(&pool, ORCH).await;
    assert_eq!(claimed.len(), 5);
}

fn collect_scans<'a>(node: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    if node["Node Type"].as_str().is_some_and(|t| t.contains("Scan")) {
        out.push(node);
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        collect_scans(child, out);
    }
}

/// The hot functions run with sequential and bitmap scans off together
/// (0014, 0029). CREATE OR REPLACE resets a function's settings, so a later
/// migration that redefines one must set both again; one that set only
/// `enable_seqscan` would have its keys read with bitmap scans again.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn hot_functions_run_without_sequential_or_bitmap_scans(pool: PgPool) {
    let settings: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT p.proname::text, p.oid::regprocedure::text, p.proconfig FROM pg_proc p
         WHERE p.pronamespace = 'tasker'::regnamespace AND 'enable_seqscan=off' = ANY (p.proconfig)
         ORDER BY 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for hot in [
        "complete_steps",
        "complete_steps_and_claim",
        "claim_steps",
        "fail_steps",
        "lock_tasks_of_steps",
        "claim_ready_tasks",
        "start_tasks",
        "create_tasks",
    ] {
        assert!(settings.iter().any(|(name, _, _)| name == hot), "{hot} runs with sequential scans off: {settings:?}");
    }
    for (_, function, config) in &settings {
        assert!(config.iter().any(|c| c == "enable_bitmapscan=off"), "{function} runs with {config:?}");
    }
}

/// The step lifecycle's hot statements read the steps and edges tables by key,
/// never by scanning them, even when the planner has no statistics yet: a
/// fresh database under a bulk load, where a scan per completion batch (or per
/// claimed step) cut `tasker bench diamond` to a third (migrations/0009).
/// Counted with `pg_stat_xact_user_tables` over one transaction that runs 16
/// of 5,000 diamonds through orchestration, claims and completions in batches
/// of a worker's default size. (Batches that are a large share of a small
/// table may rightly be scanned; that is not what this guards.)
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn hot_statements_never_scan_steps_or_edges(pool: PgPool) {
    use tasker_shared::claim::{self, DiscoveredVia};
    use tasker_shared::orchestration;

    let t = diamond("scan");
    publish(&pool, &t).await;
    submit(&pool, &t, 5_000).await;

    let mut tx = pool.begin().await.unwrap();
    let claims = claim::claim_ready_tasks(&mut *tx, ORCH, 16, LEASE, DiscoveredVia::Poll).await.unwrap();
    assert_eq!(claims.len(), 16);
    orchestration::lock_claimed_tasks(&mut tx, ORCH, &claims).await.unwrap();
    let uuids: Vec<Uuid> = claims.iter().map(|c| c.task_uuid).collect();
    assert_eq!(orchestration::summarize_steps(&mut *tx, &uuids).await.unwrap().len(), 16);
    let enqueued = orchestration::enqueue_ready_steps(&mut *tx, ORCH, &claims).await.unwrap();
    assert_eq!(enqueued.len(), 16, "every claimed task's root step");
    let started: Vec<orchestration::TaskTransition> = claims
        .iter()
        .map(|c| orchestration::TaskTransition {
            task_uuid: c.task_uuid,
            claim_seq: c.claim_seq,
            from: tasker_shared::state_machine::TaskState::Pending,
            to: tasker_shared::state_machine::TaskState::StepsInProcess,
            reason: "steps enqueued".into(),
        })
        .collect();
    orchestration::transition_tasks(&mut *tx, ORCH, &started).await.unwrap();

    // a, then b and c (enqueued by a's completion), then d.
    let mut completed = 0;
    for expected in [16, 32, 16] {
        let claims = claim::claim_steps(&mut *tx, "w", None, 32, LEASE, DiscoveredVia::Event).await.unwrap();
        assert_eq!(claims.len(), expected);
        let successes: Vec<Success> =
            claims.iter().map(|c| Success { attempt: c.attempt_ref(), result: serde_json::json!(c.name) }).collect();
        let recorded = step_result::complete_steps(&mut *tx, "w", &successes).await.unwrap();
        assert!(recorded.iter().all(|r| r.accepted));
        completed += recorded.len();
    }
    assert_eq!(completed, 64, "four steps of 16 diamonds ran");

    let scans: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_scan FROM pg_stat_xact_user_tables
         WHERE schemaname = 'tasker' AND relname IN ('workflow_steps', 'workflow_step_edges')
         ORDER BY relname",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(scans.len(), 2, "both tables were read: {scans:?}");
    assert!(scans.iter().all(|(_, n)| *n == 0), "sequential scans in the hot path: {scans:?}");
    tx.rollback().await.unwrap();
}

/// Runs `n` diamonds through the submission and worker paths on one
/// connection, as a worker with room for `n` more steps does: created and
/// started by the submitting transaction; the roots claimed and completed
/// with the worker's own claim of `n` of the `2n` middle steps, the rest
/// announced and claimed the usual way; the middle steps completed with the
/// claim of every last step (nothing left to announce); the last steps
/// completed by the form that announces itself, finalizing the tasks.
async fn run_diamonds_on(conn: &mut sqlx::PgConnection, t: &tasker_shared::template::TaskTemplate, n: usize) {
    use tasker_shared::tasks::{self, Start};

    let requests: Vec<_> = (0..n).map(|_| new_task(t)).collect();
    let created = tasks::create_tasks(&mut *conn, "test", &requests, Start::Now).await.unwrap();
    assert_eq!(created.len(), n);
    run_started_diamonds_on(conn, n).await;
}

/// The worker's part of [`run_diamonds_on`], for the `n` diamonds started
/// last (and nothing else enqueued).
async fn run_started_diamonds_on(conn: &mut sqlx::PgConnection, n: usize) {
    use tasker_shared::claim::{self, DiscoveredVia};

    let room = i32::try_from(n).unwrap();

    let roots = claim::claim_steps(&mut *conn, "w", None, 64, LEASE, DiscoveredVia::Event).await.unwrap();
    assert_eq!(roots.len(), n);
    let (mut middle, announced) = complete_and_continue(conn, &roots, room).await;
    assert_eq!((middle.len(), announced), (n, 1), "half the middle steps claimed, the rest announced");
    let left = claim::claim_steps(&mut *conn, "w", None, 64, LEASE, DiscoveredVia::Event).await.unwrap();
    assert_eq!(left.len(), n);
    middle.extend(left);

    let (last, announced) = complete_and_continue(conn, &middle, room).await;
    assert_eq!((last.len(), announced), (n, 0), "every last step claimed, nothing announced");
    let recorded = step_result::complete_steps(&mut *conn, "w", &successes(&last)).await.unwrap();
    assert!(recorded.iter().all(|r| r.accepted && r.task_finalized), "{recorded:?}");
}

/// What a worker's completer does with room for `room` more steps: records
/// `claims` leaving the announcement to itself and starting up to `room` of
/// the dependents they make runnable, claims those and the enqueued ones it
/// still has room for, and announces those it left. Returns what it claimed
/// and how many channels it notified.
async fn complete_and_continue(
    conn: &mut sqlx::PgConnection,
    claims: &[tasker_shared::claim::StepClaim],
    room: i32,
) -> (Vec<tasker_shared::claim::StepClaim>, u64) {
    use tasker_shared::claim;
    use tasker_shared::step_result::{Announce, StartDependents};

    let start = StartDependents { limit: room as usize, namespace: None, lease: LEASE };
    let recorded =
        step_result::record_successes(&mut *conn, "w", &successes(claims), Announce::Later, Some(start)).await.unwrap();
    assert!(recorded.iter().all(|r| r.accepted), "{recorded:?}");
    let dependents: Vec<Uuid> = recorded.iter().flat_map(|r| r.enqueued_dependents.iter().copied()).collect();
    let started: Vec<Uuid> = recorded.iter().flat_map(|r| r.started_dependents.iter().copied()).collect();
    let room = room - started.len() as i32;
    let claimed = claim::claim_dependents(&mut *conn, "w", None, room, LEASE, &dependents, &started).await.unwrap();
    assert_eq!(claimed.iter().filter(|c| started.contains(&c.step_uuid)).count(), started.len(), "{claimed:?}");
    let announced = step_result::announce_left(&mut *conn, &recorded, &claimed).await.unwrap();
    (claimed, announced)
}

/// Each claim's attempt succeeded, with its step's name as the result.
fn successes(claims: &[tasker_shared::claim::StepClaim]) -> Vec<Success> {
    claims.iter().map(|c| Success { attempt: c.attempt_ref(), result: serde_json::json!(c.name) }).collect()
}

/// Submits `n` diamonds on one connection and fails their first steps
/// retryably: the worker's failure path, which wakes the tasks.
async fn fail_roots_on(conn: &mut sqlx::PgConnection, t: &tasker_shared::template::TaskTemplate, n: usize) {
    use tasker_shared::claim::{self, DiscoveredVia};
    use tasker_shared::step_result::Failure;
    use tasker_shared::tasks::{self, Start};

    let requests: Vec<_> = (0..n).map(|_| new_task(t)).collect();
    tasks::create_tasks(&mut *conn, "test", &requests, Start::Now).await.unwrap();
    let claims = claim::claim_steps(&mut *conn, "w", None, 64, LEASE, DiscoveredVia::Event).await.unwrap();
    assert_eq!(claims.len(), n);
    let failures: Vec<Failure> =
        claims.iter().map(|c| Failure { attempt: c.attempt_ref(), error: "boom".into(), retryable: true }).collect();
    let recorded = step_result::fail_steps(&mut *conn, "w", &failures).await.unwrap();
    assert!(recorded.iter().all(|r| r.accepted));
}

/// The hot functions run on generic plans (migration 0011), which a session
/// makes on its first call and keeps until an ANALYZE of a table they read
/// replaces them. Whatever the tables looked like then, the plans must read
/// by key once the tables have grown: a plan that scans a table, or walks a
/// whole index, costs in proportion to everything ever submitted.
///
/// The first regime is a fresh database (no statistics at all): under `tasker
/// bench latency` the statements locking and reading tasks read 47 buffers per
/// single-step call in the first ten seconds and 105 by the fiftieth (0014).
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn hot_statements_planned_on_empty_tables_still_read_by_key(pool: PgPool) {
    hot_statements_read_by_key_after_growth(&pool, 0).await;
}

/// The second regime is statistics from a small table: autovacuum's first
/// ANALYZE (here, of a few hundred tasks) replaces the plans, and the planner
/// judges walking the whole primary key of `tasks` cheaper than ten probes.
/// Under `tasker bench latency` every statement joining `tasks` then read
/// about 1,100 buffers per single-step call by the end of the run (0015).
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn hot_statements_planned_on_small_tables_still_read_by_key(pool: PgPool) {
    hot_statements_read_by_key_after_growth(&pool, 300).await;
}

/// Runs `finished_before` diamonds and analyzes the tables (as autovacuum
/// would), makes the plans on one session with a single diamond, grows the
/// tables by 5,000 tasks behind that session's back (autovacuum off, so the
/// plans stay), then counts what a second run on the session reads: 16
/// diamonds to the end and 16 whose first steps fail.
async fn hot_statements_read_by_key_after_growth(pool: &PgPool, finished_before: usize) {
    let t = diamond("fresh");
    publish(pool, &t).await;
    for statement in [
        "ALTER TABLE tasker.tasks SET (autovacuum_enabled = false)",
        "ALTER TABLE tasker.workflow_steps SET (autovacuum_enabled = false)",
        "ALTER TABLE tasker.workflow_step_edges SET (autovacuum_enabled = false)",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..finished_before / 30 {
        run_diamonds_on(&mut conn, &t, 30).await;
    }
    if finished_before > 0 {
        sqlx::query("ANALYZE tasker.tasks, tasker.workflow_steps, tasker.workflow_step_edges")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    run_diamonds_on(&mut conn, &t, 1).await;

    submit(pool, &t, 5_000).await;

    // PostgreSQL 15's per-transaction counters also hold what earlier
    // transactions of the session have not yet reported; inside one
    // transaction nothing is reported, so the difference is this run's.
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let before = table_reads(&mut tx).await;
    run_diamonds_on(&mut tx, &t, 16).await;
    fail_roots_on(&mut tx, &t, 16).await;
    let after = table_reads(&mut tx).await;
    let reads: Vec<(String, i64, i64)> = after
        .into_iter()
        .zip(before)
        .map(|((table, scans, fetched), (_, scans_before, fetched_before))| {
            (table, scans - scans_before, fetched - fetched_before)
        })
        .collect();
    assert_eq!(reads.len(), 3, "all three tables were read: {reads:?}");
    assert!(reads.iter().all(|(_, scans, _)| *scans == 0), "sequential scans in the hot path: {reads:?}");
    // 32 diamonds, 80 attempts (a run reads 912 task, 1,632 step and 352
    // edge rows); reading a whole index instead (over 5,000 tasks, 20,000
    // steps) even once would show here, and so does walking the enqueued
    // steps for each step a completion continues with (0021).
    assert!(reads.iter().all(|(_, _, fetched)| *fetched < 2_200), "rows fetched by index: {reads:?}");
    tx.rollback().await.unwrap();
}

/// Sequential scans and rows fetched through indexes, per hot table, as the
/// session's counters stand.
async fn table_reads(conn: &mut sqlx::PgConnection) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT relname::text, seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables
         WHERE schemaname = 'tasker' AND relname IN ('tasks', 'workflow_steps', 'workflow_step_edges')
         ORDER BY relname",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Each history table has one index, the key its readers use (0027): a
/// transition writes one index entry, and a task's or a step's history is
/// still read through that key, never by a scan, with 900 tasks' history
/// (9,000 step and 2,700 task history rows) in the tables.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn history_is_written_to_one_index_and_read_through_it(pool: PgPool) {
    let t = diamond("history");
    publish(&pool, &t).await;
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..30 {
        run_diamonds_on(&mut conn, &t, 30).await;
    }
    sqlx::query(
        "ANALYZE tasker.tasks, tasker.workflow_steps, tasker.task_transitions, tasker.workflow_step_transitions",
    )
    .execute(&mut *conn)
    .await
    .unwrap();

    let indexes = history_indexes(&pool).await;
    assert_eq!(indexes.len(), 2, "one index per history table: {indexes:?}");
    assert!(indexes[0].contains("task_transitions_pkey") && indexes[0].contains("(task_uuid, transition_id)"));
    assert!(indexes[1].contains("workflow_step_transitions_pkey") && indexes[1].contains("(step_uuid, transition_id)"));

    // A finished diamond: its task went pending -> steps_in_process ->
    // complete, each step pending -> ... -> complete.
    let (task,): (Uuid,) = sqlx::query_as("SELECT task_uuid FROM tasker.tasks WHERE state = 'complete' LIMIT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let details = tasker_shared::tasks::get_task(&mut conn, task).await.unwrap().unwrap();
    assert_eq!(details.transitions.last().map(|t| t.to.as_str()), Some("complete"), "{details:?}");
    assert!(details.steps.iter().all(|s| s.transitions.last().map(|t| t.to.as_str()) == Some("complete")));

    // The two history reads of get_task, as it runs them.
    for (query, key) in [
        ("SELECT * FROM tasker.task_transitions WHERE task_uuid = $1 ORDER BY transition_id", "task_transitions_pkey"),
        (
            "SELECT * FROM tasker.workflow_step_transitions
             WHERE step_uuid IN (SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1)
             ORDER BY transition_id",
            "workflow_step_transitions_pkey",
        ),
    ] {
        let (plan,): (serde_json::Value,) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) {query}")))
                .bind(task)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        let text = plan.to_string();
        assert!(text.contains(&format!("\"Index Name\":\"{key}\"")), "reads through {key}: {text}");
        assert!(!text.contains("Seq Scan"), "never scans: {text}");
    }
}

/// Upgrading to 0027 rebuilds both history tables' keys under the history
/// already there: a database at 0026 with finished and running diamonds
/// keeps every history row, has the new keys and nothing else, and its work
/// runs on.
#[sqlx::test(migrations = false)]
async fn history_survives_the_change_of_its_keys(pool: PgPool) {
    let migrator = &tasker_shared::db::MIGRATOR;
    migrator.run_to(26, &pool).await.unwrap();
    let t = diamond("upgrade");
    publish(&pool, &t).await;
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..3 {
        submit_as_at_0026(&mut conn, &t, 20).await;
        run_started_diamonds_on(&mut conn, 20).await;
    }
    let running = submit_as_at_0026(&mut conn, &t, 10).await;
    let roots = claim_steps(&pool, "w", 10).await;
    assert_eq!(roots.len(), 10);

    let history = || async {
        let step: (String,) = sqlx::query_as(
            "SELECT string_agg(format('%s %s %s %s', step_uuid, transition_id, attempt, to_state), ','
                               ORDER BY transition_id)
             FROM tasker.workflow_step_transitions",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let task: (String,) = sqlx::query_as(
            "SELECT string_agg(format('%s %s %s', task_uuid, transition_id, to_state), ',' ORDER BY transition_id)
             FROM tasker.task_transitions",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (step.0, task.0)
    };
    let before = history().await;
    assert_eq!(before.0.matches(',').count() + 1, 60 * 10 + 10 * 2, "60 diamonds' and 10 claimed roots' step history");
    assert_eq!(before.1.matches(',').count() + 1, 60 * 3 + 10 * 2, "60 finished and 10 running tasks' history");
    assert_eq!(history_indexes(&pool).await.len(), 4, "at 0026, two indexes per history table");

    migrator.run_to(27, &pool).await.unwrap();
    assert_eq!(history().await, before, "history unchanged by the upgrade");
    let keys = history_indexes(&pool).await;
    assert_eq!(keys.len(), 2, "one index per history table: {keys:?}");
    assert!(keys.iter().all(|k| k.contains("_pkey") && k.contains("_uuid, transition_id)")), "{keys:?}");

    // The claimed roots complete and the running tasks go on, writing
    // history under the new keys.
    let recorded = step_result::complete_steps(&mut *conn, "w", &successes(&roots)).await.unwrap();
    assert!(recorded.iter().all(|r| r.accepted && r.enqueued_dependents.len() == 2), "{recorded:?}");
    for &task in &running {
        for name in ["b", "c"] {
            assert_eq!(step_state(&mut *conn, task, name).await, StepState::Enqueued);
        }
    }
    for expected in [20, 10] {
        let claims = claim_steps(&pool, "w", 64).await;
        assert_eq!(claims.len(), expected, "the middle steps, then the last");
        let recorded = step_result::complete_steps(&mut *conn, "w", &successes(&claims)).await.unwrap();
        assert!(recorded.iter().all(|r| r.accepted));
    }
    for &task in &running {
        assert_eq!(task_state(&mut *conn, task).await, tasker_shared::state_machine::TaskState::Complete);
    }
    migrator.run(&pool).await.unwrap();
    run_diamonds_on(&mut conn, &t, 5).await;
    assert_invariants(&pool).await;
}

/// Submits and starts `n` tasks of `t` with the statements a database at
/// 0026 has (the submission's one statement came in 0032): its steps and
/// edges expanded from the stored definition, then `start_tasks`. Returns
/// the tasks.
async fn submit_as_at_0026(
    conn: &mut sqlx::PgConnection,
    t: &tasker_shared::template::TaskTemplate,
    n: i32,
) -> Vec<Uuid> {
    let created: Vec<Uuid> = sqlx::query_scalar(
        "WITH template AS (
             SELECT template_id, namespace, definition FROM tasker.task_templates
             WHERE namespace = $1 AND name = $2
         ), planned AS (
             SELECT gen_random_uuid() AS task_uuid, template.* FROM template, generate_series(1, $3)
         ), planned_steps AS (
             SELECT p.task_uuid, p.namespace, s.value AS step, gen_random_uuid() AS step_uuid
             FROM planned p, jsonb_array_elements(p.definition -> 'steps') AS s
         ), new_tasks AS (
             INSERT INTO tasker.tasks (task_uuid, template_id, namespace, ready_at, ready_since)
             SELECT task_uuid, template_id, namespace, now(), now() FROM planned
             RETURNING task_uuid
         ), new_steps AS (
             INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace, config,
                                                max_attempts, backoff_ms, timeout_ms)
             SELECT step_uuid, task_uuid, step ->> 'name', step ->> 'handler', namespace, step -> 'config',
                    (step ->> 'max_attempts')::int, (step ->> 'backoff_ms')::int, (step ->> 'timeout_ms')::int
             FROM planned_steps
         ), new_edges AS (
             INSERT INTO tasker.workflow_step_edges (to_step_uuid, from_step_uuid)
             SELECT dependent.step_uuid, dependency.step_uuid
             FROM planned_steps dependent
             JOIN planned_steps dependency ON dependency.task_uuid = dependent.task_uuid
                                          AND dependent.step -> 'depends_on' ? (dependency.step ->> 'name')
         ), history AS (
             INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
             SELECT task_uuid, NULL, 'pending', 'created', 'test' FROM new_tasks
         )
         SELECT task_uuid FROM new_tasks",
    )
    .bind(t.namespace.as_str())
    .bind(t.name.as_str())
    .bind(n)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let started: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT task_uuid FROM tasker.start_tasks($1, 'test')")
        .bind(&created)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(started.len(), created.len(), "every task started");
    created
}

/// The definitions of the history tables' indexes: the task history's, then
/// the step history's.
async fn history_indexes(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT pg_get_indexdef(i.indexrelid)
         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
         WHERE c.relnamespace = 'tasker'::regnamespace
           AND c.relname IN ('task_transitions', 'workflow_step_transitions')
         ORDER BY c.relname, 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}
