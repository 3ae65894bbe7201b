//! The state machines: one table in Rust, mirrored in SQL, enforced by both,
//! and a property test of random, duplicated and stale events against a model.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use proptest::prelude::*;
use sqlx::{Connection, PgPool};
use support::*;
use tasker_shared::claim::AttemptRef;
use tasker_shared::state_machine::{StepEvent, StepState, TaskEvent, TaskState};
use tasker_shared::step_result::{self, Failure, Success};
use uuid::Uuid;

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn the_sql_machines_mirror_the_rust_tables(pool: PgPool) {
    let mut sql_tasks: Vec<(String, String, String)> =
        sqlx::query_as("SELECT from_state, event, to_state FROM tasker.task_state_machine")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut rust_tasks: Vec<(String, String, String)> =
        TaskState::TRANSITIONS.iter().map(|(f, e, t)| (f.to_string(), e.to_string(), t.to_string())).collect();
    sql_tasks.sort();
    rust_tasks.sort();
    assert_eq!(sql_tasks, rust_tasks);

    let mut sql_steps: Vec<(String, String, String)> =
        sqlx::query_as("SELECT from_state, event, to_state FROM tasker.step_state_machine")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut rust_steps: Vec<(String, String, String)> =
        StepState::TRANSITIONS.iter().map(|(f, e, t)| (f.to_string(), e.to_string(), t.to_string())).collect();
    sql_steps.sort();
    rust_steps.sort();
    assert_eq!(sql_steps, rust_steps);
}

#[test]
fn rust_rejects_every_event_not_in_the_table() {
    for &state in TaskState::ALL {
        for &event in TaskEvent::ALL {
            let listed = TaskState::TRANSITIONS.iter().find(|(f, e, _)| *f == state && *e == event);
            match (state.apply(event), listed) {
                (Ok(to), Some((_, _, expected))) => assert_eq!(to, *expected),
                (Err(err), None) => assert!(err.to_string().contains(event.as_str())),
                (got, listed) => panic!("{state} + {event}: got {got:?}, table says {listed:?}"),
            }
        }
    }
    for &state in StepState::ALL {
        for &event in StepEvent::ALL {
            let listed = StepState::TRANSITIONS.iter().find(|(f, e, _)| *f == state && *e == event);
            assert_eq!(state.apply(event).ok(), listed.map(|(_, _, to)| *to), "{state} + {event}");
        }
    }
    assert!(TaskState::Complete.is_final() && TaskState::Error.is_final() && TaskState::Cancelled.is_final());
    assert!(!TaskState::BlockedByFailures.is_final());
}

/// For every ordered pair of states, puts a row in the first (with the guard
/// triggers switched off for this session only) and tries to move it to the
/// second with the guards on. Exactly the pairs in the table may pass.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn sql_guards_reject_every_transition_not_in_the_table(pool: PgPool) {
    let t = single("guards");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    let mut conn = pool.acquire().await.unwrap();

    for &from in TaskState::ALL {
        for &to in TaskState::ALL {
            if from == to {
                continue;
            }
            force_state(&mut conn, "tasks", "task_uuid", task, from.as_str()).await;
            let allowed = TaskState::TRANSITIONS.iter().any(|(f, _, t)| *f == from && *t == to);
            let result = sqlx::query("UPDATE tasker.tasks SET state = $1 WHERE task_uuid = $2")
                .bind(to.as_str())
                .bind(task)
                .execute(&mut *conn)
                .await;
            check_guard(result, allowed, &format!("task {from} -> {to}"));
        }
    }

    let step: Uuid = sqlx::query_scalar("SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1")
        .bind(task)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    for &from in StepState::ALL {
        for &to in StepState::ALL {
            if from == to {
                continue;
            }
            force_state(&mut conn, "workflow_steps", "step_uuid", step, from.as_str()).await;
            let allowed = StepState::TRANSITIONS.iter().any(|(f, _, t)| *f == from && *t == to);
            let result = sqlx::query("UPDATE tasker.workflow_steps SET state = $1 WHERE step_uuid = $2")
                .bind(to.as_str())
                .bind(step)
                .execute(&mut *conn)
                .await;
            check_guard(result, allowed, &format!("step {from} -> {to}"));
        }
    }

    // Rows must start in pending.
    let bad_insert = sqlx::query(
        "INSERT INTO tasker.tasks (task_uuid, template_id, namespace, state)
         SELECT gen_random_uuid(), template_id, namespace, 'complete' FROM tasker.task_templates LIMIT 1",
    )
    .execute(&mut *conn)
    .await;
    check_guard(bad_insert, false, "insert a task as complete");
}

/// History is append-only, goes with the task it describes, and cannot name a
/// task (task history) or a step (step history) that does not exist.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn history_is_append_only_goes_with_its_task_and_never_dangles(pool: PgPool) {
    let t = diamond("history");
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 3).await;
    enqueue_pass(&pool, ORCH).await;
    // (task history rows, step history rows) of a task.
    let history_of = |task: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT (SELECT count(*) FROM tasker.task_transitions WHERE task_uuid = $1),
                        (SELECT count(*) FROM tasker.workflow_step_transitions WHERE task_uuid = $1)",
            )
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for &task in &tasks {
        let (task_rows, step_rows) = history_of(task).await;
        assert!(task_rows > 0 && step_rows > 0, "a started task has both histories: {task_rows}, {step_rows}");
    }

    for statement in [
        "DELETE FROM tasker.task_transitions",
        "DELETE FROM tasker.workflow_step_transitions",
        "UPDATE tasker.task_transitions SET reason = 'rewritten'",
        "UPDATE tasker.workflow_step_transitions SET reason = 'rewritten'",
    ] {
        assert_refused(sqlx::query(statement).execute(&pool).await, "TK003", statement);
    }

    // Deleting tasks (as retention does, many in one statement) takes their
    // steps and all their history.
    sqlx::query("DELETE FROM tasker.tasks WHERE task_uuid = ANY($1)")
        .bind([tasks[0], tasks[2]])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(history_of(tasks[0]).await, (0, 0), "history went with its task");
    assert_eq!(history_of(tasks[2]).await, (0, 0), "history went with its task, deleted in the same statement");
    let (task_rows, step_rows) = history_of(tasks[1]).await;
    assert!(task_rows > 0 && step_rows > 0, "other tasks keep theirs");
    assert_invariants(&pool).await;

    // A task history row naming no task, and a step history row naming no
    // step (of a task that exists), are refused.
    let ghost = Uuid::now_v7();
    let task_history = sqlx::query(
        "INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
         VALUES ($1, NULL, 'pending', 'test', 'test')",
    )
    .bind(ghost)
    .execute(&pool)
    .await;
    assert_refused(task_history, "23503", "task history naming no task");
    let step_history = sqlx::query(
        "INSERT INTO tasker.workflow_step_transitions
             (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
         VALUES ($1, $2, 0, 'pending', 'enqueued', 'test', 'test')",
    )
    .bind(ghost)
    .bind(tasks[1])
    .execute(&pool)
    .await;
    assert_refused(step_history, "23503", "step history naming no step");

    // Step history's key is checked once per statement (0025), over all of its
    // rows: one row naming no step among rows naming real ones refuses the
    // whole insert, and none of it is written.
    let before = history_of(tasks[1]).await;
    let mixed = sqlx::query(
        "INSERT INTO tasker.workflow_step_transitions
             (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
         SELECT s.step_uuid, s.task_uuid, 0, 'pending', 'enqueued', 'test', 'test'
         FROM tasker.workflow_steps s WHERE s.task_uuid = $2
         UNION ALL
         SELECT $1, $2, 0, 'pending', 'enqueued', 'test', 'test'",
    )
    .bind(ghost)
    .bind(tasks[1])
    .execute(&pool)
    .await;
    assert_refused(mixed, "23503", "a statement with one step history row naming no step");
    assert_eq!(history_of(tasks[1]).await, before, "nothing of the refused statement was written");
    // Task history's likewise (0028).
    let mixed = sqlx::query(
        "INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
         VALUES ($2, 'pending', 'pending', 'test', 'test'), ($1, NULL, 'pending', 'test', 'test')",
    )
    .bind(ghost)
    .bind(tasks[1])
    .execute(&pool)
    .await;
    assert_refused(mixed, "23503", "a statement with one task history row naming no task");
    assert_eq!(history_of(tasks[1]).await, before, "nothing of the refused statement was written");
    assert_invariants(&pool).await;

    // Unlike a foreign key, the check does not lock the step until commit, so
    // the invariants look for history that names no step. A row written with
    // triggers disabled (as a restore may run) is reported.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "INSERT INTO tasker.workflow_step_transitions
             (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
         VALUES ($1, $2, 0, 'pending', 'enqueued', 'test', 'test')",
    )
    .bind(ghost)
    .bind(tasks[1])
    .execute(&mut *conn)
    .await
    .unwrap();
    let other_ghost = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
         VALUES ($1, NULL, 'pending', 'test', 'test')",
    )
    .bind(other_ghost)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("RESET session_replication_role").execute(&mut *conn).await.unwrap();
    drop(conn);
    let violations = tasker_shared::invariants::violations(&pool).await.unwrap();
    assert!(
        violations.iter().any(|v| v.invariant == "step history names an existing step" && v.subject == ghost),
        "a step history row naming no step is reported: {violations:#?}"
    );
    assert!(
        violations.iter().any(|v| v.invariant == "task history names an existing task" && v.subject == other_ghost),
        "a task history row naming no task is reported: {violations:#?}"
    );

    // (task history rows, step history rows) in all.
    let all_history_rows = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT (SELECT count(*) FROM tasker.task_transitions),
                    (SELECT count(*) FROM tasker.workflow_step_transitions)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    // Truncating the tasks (and so, by cascade, the steps) truncates both
    // histories too, as the foreign keys' cascades did.
    sqlx::query("TRUNCATE tasker.tasks CASCADE").execute(&pool).await.unwrap();
    let left = all_history_rows().await;
    assert_eq!(left, (0, 0), "both histories went with the truncated tasks and steps");

    // A TRUNCATE that names the histories too (as a reset script may) works:
    // the triggers do not truncate again what the statement emptied.
    submit(&pool, &t, 2).await;
    enqueue_pass(&pool, ORCH).await;
    sqlx::query("TRUNCATE tasker.tasks, tasker.task_transitions, tasker.workflow_step_transitions CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    let left = all_history_rows().await;
    assert_eq!(left, (0, 0));
}

/// Steps name their task and edges their steps through set-based keys
/// (0033), as history does: a statement inserting a step of no task or an
/// edge of no step is refused whole (23503); deleting tasks deletes their
/// steps, and with them their edges, history and discoveries; truncating the
/// tasks or the steps empties what hangs from them; and rows written past
/// the triggers are reported by the invariants.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn steps_and_edges_name_what_exists_and_go_with_it(pool: PgPool) {
    use tasker_shared::claim::{self, DiscoveredVia};

    let t = diamond("keys");
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 3).await;
    enqueue_pass(&pool, ORCH).await;
    let claims = claim::claim_steps(&pool, "w", None, 10, LEASE, DiscoveredVia::Poll).await.unwrap();
    assert_eq!(claims.len(), 3, "every root, claimed by a poll, so each has a discovery row");
    // (steps, edges, step history, discoveries) of a task.
    let rows_of = |task: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64, i64, i64)>(
                "SELECT (SELECT count(*) FROM tasker.workflow_steps WHERE task_uuid = $1),
                        (SELECT count(*) FROM tasker.workflow_step_edges e JOIN tasker.workflow_steps s
                           ON s.step_uuid = e.to_step_uuid WHERE s.task_uuid = $1),
                        (SELECT count(*) FROM tasker.workflow_step_transitions WHERE task_uuid = $1),
                        (SELECT count(*) FROM tasker.step_discoveries d JOIN tasker.workflow_steps s
                           USING (step_uuid) WHERE s.task_uuid = $1)",
            )
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let all_steps_and_edges = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT (SELECT count(*) FROM tasker.workflow_steps), (SELECT count(*) FROM tasker.workflow_step_edges)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(rows_of(tasks[1]).await, (4, 4, 2, 1), "a diamond with its root enqueued and claimed");

    // A step naming no task, alone or beside one naming a real task.
    let ghost = Uuid::now_v7();
    let insert_steps = |tasks: Vec<Uuid>| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace,
                                                    max_attempts, backoff_ms, timeout_ms)
                 SELECT gen_random_uuid(), t, 'extra', 'noop', 'keys', 1, 0, 1000 FROM unnest($1::uuid[]) AS t",
            )
            .bind(tasks)
            .execute(&pool)
            .await
        }
    };
    let before = all_steps_and_edges().await;
    assert_refused(insert_steps(vec![ghost]).await, "23503", "a step naming no task");
    assert_refused(insert_steps(vec![tasks[1], ghost]).await, "23503", "a statement with one step naming no task");
    assert_eq!(all_steps_and_edges().await, before, "nothing of the refused statements was written");

    // An edge naming no step, at either end, alone or beside a real one.
    let steps: Vec<Uuid> =
        sqlx::query_scalar("SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1 ORDER BY name")
            .bind(tasks[1])
            .fetch_all(&pool)
            .await
            .unwrap();
    let insert_edges = |edges: Vec<(Uuid, Uuid)>| {
        let pool = pool.clone();
        async move {
            let (to, from): (Vec<Uuid>, Vec<Uuid>) = edges.into_iter().unzip();
            sqlx::query(
                "INSERT INTO tasker.workflow_step_edges (to_step_uuid, from_step_uuid)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[])",
            )
            .bind(to)
            .bind(from)
            .execute(&pool)
            .await
        }
    };
    assert_refused(insert_edges(vec![(ghost, steps[0])]).await, "23503", "an edge to no step");
    assert_refused(insert_edges(vec![(steps[3], ghost)]).await, "23503", "an edge from no step");
    assert_refused(
        insert_edges(vec![(steps[3], steps[0]), (steps[2], ghost)]).await,
        "23503",
        "a statement with one edge naming no step",
    );
    assert_eq!(all_steps_and_edges().await, before, "nothing of the refused statements was written");
    assert_invariants(&pool).await;

    // Deleting tasks (as retention does, many in one statement) takes their
    // steps, and with those their edges, history and discoveries.
    sqlx::query("DELETE FROM tasker.tasks WHERE task_uuid = ANY($1)")
        .bind([tasks[0], tasks[2]])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(rows_of(tasks[0]).await, (0, 0, 0, 0), "all went with the task");
    assert_eq!(rows_of(tasks[2]).await, (0, 0, 0, 0), "all went with the task, deleted in the same statement");
    assert_eq!(all_steps_and_edges().await, (4, 4), "every edge went with its steps, whichever end");
    assert_eq!(rows_of(tasks[1]).await, (4, 4, 2, 1), "another task keeps its own");
    assert_invariants(&pool).await;

    // Unlike a foreign key, the checks lock nothing until commit, so the
    // invariants look for steps naming no task and edges naming no step. Rows
    // written with triggers disabled (as a restore may run) are reported.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    let orphan: Uuid = sqlx::query_scalar(
        "INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace,
                                            max_attempts, backoff_ms, timeout_ms)
         VALUES (gen_random_uuid(), $1, 'orphan', 'noop', 'keys', 1, 0, 1000) RETURNING step_uuid",
    )
    .bind(ghost)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query("INSERT INTO tasker.workflow_step_edges (to_step_uuid, from_step_uuid) VALUES ($1, $2)")
        .bind(ghost)
        .bind(steps[0])
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("RESET session_replication_role").execute(&mut *conn).await.unwrap();
    drop(conn);
    let violations = tasker_shared::invariants::violations(&pool).await.unwrap();
    let reported = |subject: Uuid| {
        violations
            .iter()
            .any(|v| v.invariant == "steps and edges name existing tasks and steps" && v.subject == subject)
    };
    assert!(reported(orphan), "a step naming no task is reported: {violations:#?}");
    assert!(reported(ghost), "an edge naming no step is reported: {violations:#?}");
    sqlx::query("DELETE FROM tasker.workflow_steps WHERE step_uuid = $1").bind(orphan).execute(&pool).await.unwrap();
    sqlx::query("DELETE FROM tasker.workflow_step_edges WHERE to_step_uuid = $1")
        .bind(ghost)
        .execute(&pool)
        .await
        .unwrap();
    assert_invariants(&pool).await;

    // Truncating the steps empties the edges; truncating the tasks the steps
    // and edges, also when the statement names them itself.
    sqlx::query("TRUNCATE tasker.workflow_steps CASCADE").execute(&pool).await.unwrap();
    assert_eq!(all_steps_and_edges().await, (0, 0));
    submit(&pool, &t, 2).await;
    sqlx::query("TRUNCATE tasker.tasks CASCADE").execute(&pool).await.unwrap();
    assert_eq!(all_steps_and_edges().await, (0, 0), "steps and edges went with the truncated tasks");
    submit(&pool, &t, 2).await;
    sqlx::query("TRUNCATE tasker.tasks, tasker.workflow_steps, tasker.workflow_step_edges CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(all_steps_and_edges().await, (0, 0));
    // Also when it names the steps' discoveries, which keep their foreign key
    // (so the steps, which have some, cannot be truncated without them).
    submit(&pool, &t, 2).await;
    enqueue_pass(&pool, ORCH).await;
    assert_eq!(claim::claim_steps(&pool, "w", None, 10, LEASE, DiscoveredVia::Poll).await.unwrap().len(), 2);
    sqlx::query("TRUNCATE tasker.tasks, tasker.step_discoveries CASCADE").execute(&pool).await.unwrap();
    assert_eq!(all_steps_and_edges().await, (0, 0));
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.workflow_step_transitions").fetch_one(&pool).await.unwrap();
    assert_eq!(history, 0, "the steps' history went with them");
    assert_invariants(&pool).await;
}

/// The guards' edge lists (0017; one array since 0019; in a function per
/// machine, which the trigger calls, since 0030) are what
/// `install_state_guards()` writes from the machine tables now: a migration
/// that changed a table and did not reinstall the guards fails here.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn state_guards_list_the_machine_tables_edges(pool: PgPool) {
    // (trigger, its definition, the definition of the function it calls).
    let definitions = || async {
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT g.tgname::text, pg_get_triggerdef(g.oid), pg_get_functiondef(f.oid)
             FROM pg_trigger g
             JOIN pg_proc f ON f.pronamespace = 'tasker'::regnamespace
                           AND f.proname = CASE g.tgname WHEN 'tasks_state_guard' THEN 'task_transition_allowed'
                                                         ELSE 'step_transition_allowed' END
             WHERE g.tgname IN ('tasks_state_guard', 'workflow_steps_state_guard') ORDER BY g.tgname",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let installed = definitions().await;
    assert_eq!(installed.len(), 2);
    // Every edge of each machine, from the Rust tables (which the SQL tables
    // mirror), in install_state_guards()' order.
    let edges = |pairs: Vec<(String, String)>| {
        let mut edges: Vec<String> = pairs.into_iter().map(|(from, to)| format!("{from}>{to}")).collect();
        edges.sort_unstable();
        edges.dedup();
        format!("ANY ('{{{}}}'::text[])", edges.join(","))
    };
    let task_edges = edges(TaskState::TRANSITIONS.iter().map(|(f, _, t)| (f.to_string(), t.to_string())).collect());
    let step_edges = edges(StepState::TRANSITIONS.iter().map(|(f, _, t)| (f.to_string(), t.to_string())).collect());
    for (name, trigger, function) in &installed {
        let (expected, allowed) = if name == "tasks_state_guard" {
            (&task_edges, "task_transition_allowed(old.state, new.state)")
        } else {
            (&step_edges, "step_transition_allowed(old.state, new.state)")
        };
        assert!(trigger.contains(allowed), "{name} asks {allowed}: {trigger}");
        assert!(
            function.contains(expected.as_str()),
            "{name}'s function lists the machine's edges, {expected}: {function}"
        );
    }
    sqlx::query("SELECT tasker.install_state_guards()").execute(&pool).await.unwrap();
    assert_eq!(definitions().await, installed, "reinstalling from the tables changes nothing");

    // And the check is live: an edge added to a table shows up on reinstall.
    sqlx::query("INSERT INTO tasker.step_state_machine VALUES ('complete', 'reopen', 'pending')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT tasker.install_state_guards()").execute(&pool).await.unwrap();
    assert_ne!(definitions().await, installed);
}

/// The range checks of 0029 run where their columns are written (an insert,
/// or an update that sets them) and refuse as the CHECK constraints did:
/// SQLSTATE 23514 with the constraint's name, nothing written. Values at the
/// bounds pass, and an update of other columns does not run the checks. A
/// state outside the machine is refused by the guards, and rows written with
/// triggers off are reported by `invariant_violations()`.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn values_out_of_range_are_refused_where_written_and_audited(pool: PgPool) {
    let t = single("ranges");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    let step: Uuid = sqlx::query_scalar("SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1")
        .bind(task)
        .fetch_one(&pool)
        .await
        .unwrap();
    let rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM tasker.workflow_steps) + (SELECT count(*) FROM tasker.tasks)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    // A copy of the step under another name, with `column` set to `value`.
    let insert_copy = |column: &str, value: i32| {
        let values = ["max_attempts", "backoff_ms", "timeout_ms"].map(|c| if c == column { "$2" } else { c });
        let pool = pool.clone();
        let sql = format!(
            "INSERT INTO tasker.workflow_steps
                 (step_uuid, task_uuid, name, handler, namespace, max_attempts, backoff_ms, timeout_ms)
             SELECT gen_random_uuid(), task_uuid, 'copy ' || gen_random_uuid(), handler, namespace, {}
             FROM tasker.workflow_steps WHERE step_uuid = $1",
            values.join(", ")
        );
        async move { sqlx::query(sqlx::AssertSqlSafe(sql)).bind(step).bind(value).execute(&pool).await }
    };
    let update = |column: &str, value: i32| {
        let pool = pool.clone();
        let sql = format!("UPDATE tasker.workflow_steps SET {column} = $2 WHERE step_uuid = $1");
        async move { sqlx::query(sqlx::AssertSqlSafe(sql)).bind(step).bind(value).execute(&pool).await }
    };
    let refused_as = |result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>, constraint: &str, what: &str| {
        let named = result.as_ref().err().and_then(|e| e.as_database_error()?.constraint().map(str::to_owned));
        assert_refused(result, "23514", what);
        assert_eq!(named.as_deref(), Some(constraint), "{what}");
    };

    // (column, lowest, highest, constraint)
    let ranges = [
        ("max_attempts", 1, 100, "max_attempts_range"),
        ("backoff_ms", 0, 86_400_000, "backoff_range"),
        ("timeout_ms", 1, 86_400_000, "timeout_range"),
    ];
    for (column, low, high, constraint) in ranges {
        for value in [low, high] {
            insert_copy(column, value).await.unwrap_or_else(|e| panic!("insert {column} = {value}: {e}"));
            update(column, value).await.unwrap_or_else(|e| panic!("update {column} = {value}: {e}"));
        }
        update(column, low).await.unwrap();
        let before = rows().await;
        for value in [low - 1, high + 1] {
            refused_as(insert_copy(column, value).await, constraint, &format!("insert {column} = {value}"));
            refused_as(update(column, value).await, constraint, &format!("update {column} = {value}"));
        }
        assert_eq!(rows().await, before, "nothing was inserted");
        let kept: i32 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {column} FROM tasker.workflow_steps WHERE step_uuid = $1"
        )))
        .bind(step)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(kept, low, "nothing was updated");
    }

    for key in [String::new(), "k".repeat(256)] {
        let result = sqlx::query("UPDATE tasker.tasks SET idempotency_key = $2 WHERE task_uuid = $1")
            .bind(task)
            .bind(&key)
            .execute(&pool)
            .await;
        refused_as(result, "idempotency_key_length", &format!("an idempotency key of {} characters", key.len()));
    }
    let before = rows().await;
    let result = sqlx::query(
        "INSERT INTO tasker.tasks (task_uuid, template_id, namespace, idempotency_key)
         SELECT gen_random_uuid(), template_id, namespace, $2 FROM tasker.tasks WHERE task_uuid = $1",
    )
    .bind(task)
    .bind("k".repeat(256))
    .execute(&pool)
    .await;
    refused_as(result, "idempotency_key_length", "a task inserted with an idempotency key of 256 characters");
    assert_eq!(rows().await, before, "nothing was inserted");
    for key in ["k".to_string(), "k".repeat(255)] {
        sqlx::query("UPDATE tasker.tasks SET idempotency_key = $2 WHERE task_uuid = $1")
            .bind(task)
            .bind(&key)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("an idempotency key of {} characters: {e}", key.len()));
    }

    // A state outside the machine is refused by the guard.
    let result = sqlx::query("UPDATE tasker.workflow_steps SET state = 'lost' WHERE step_uuid = $1")
        .bind(step)
        .execute(&pool)
        .await;
    assert_refused(result, "TK001", "a step state outside the machine");
    let result =
        sqlx::query("UPDATE tasker.tasks SET state = 'lost' WHERE task_uuid = $1").bind(task).execute(&pool).await;
    assert_refused(result, "TK001", "a task state outside the machine");
    assert_invariants(&pool).await;

    // Written with triggers off (as a replica's apply would): the update of
    // the state alone does not run the range checks, and the audit reports
    // each row.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query("UPDATE tasker.workflow_steps SET max_attempts = 0 WHERE step_uuid = $1")
        .bind(step)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE tasker.tasks SET state = 'lost', idempotency_key = '' WHERE task_uuid = $1")
        .bind(task)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SET session_replication_role = DEFAULT").execute(&mut *conn).await.unwrap();
    let touched = sqlx::query("UPDATE tasker.tasks SET updated_at = now() WHERE task_uuid = $1")
        .bind(task)
        .execute(&mut *conn)
        .await
        .expect("an update that does not set the idempotency key does not check it");
    assert_eq!(touched.rows_affected(), 1);
    let cancelled = sqlx::query("UPDATE tasker.workflow_steps SET state = 'cancelled' WHERE step_uuid = $1")
        .bind(step)
        .execute(&mut *conn)
        .await
        .expect("an update that does not set a budget column does not check it");
    assert_eq!(cancelled.rows_affected(), 1);
    let reported: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT subject, detail FROM tasker.invariant_violations()
         WHERE invariant = 'rows hold known states and values in range' ORDER BY detail",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert_eq!(reported[0].0, step, "{reported:?}");
    assert!(reported[0].1.contains("max_attempts 0"), "{reported:?}");
    assert_eq!(reported[1].0, task, "{reported:?}");
    assert!(reported[1].1.contains("task state lost, idempotency key of 0 characters"), "{reported:?}");
}

async fn force_state(conn: &mut sqlx::PgConnection, table: &str, key: &str, id: Uuid, state: &str) {
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE tasker.{table} SET state = $1 WHERE {key} = $2")))
        .bind(state)
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SET session_replication_role = DEFAULT").execute(&mut *conn).await.unwrap();
}

fn check_guard(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>, allowed: bool, what: &str) {
    match result {
        Ok(_) => assert!(allowed, "{what} must be rejected"),
        Err(err) => {
            assert!(!allowed, "{what} must be allowed, got {err}");
            let db = err.as_database_error().expect("a database error");
            assert_eq!(db.code().as_deref(), Some("TK001"), "{what}: {err}");
            let mapped = tasker_shared::Error::from(err);
            assert!(matches!(mapped, tasker_shared::Error::InvalidTransition(_)), "{mapped}");
        }
    }
}

// ---------------------------------------------------------------------------
// Property: random, duplicated and stale events against a model.

/// What a test step can be told, by any of the parties that touch it.
#[derive(Debug, Clone)]
enum Op {
    /// An orchestrator pass: enqueue what is runnable (first run or due retry).
    Enqueue,
    /// A worker claims enqueued steps.
    Claim(usize),
    /// A worker reports success for the attempt it believes it runs; `stale`
    /// reports for the previous attempt instead.
    Complete { worker: usize, stale: bool },
    /// A worker reports failure.
    Fail { worker: usize, stale: bool, retryable: bool },
    /// Time passes beyond the lease; the rescuer runs.
    ExpireLease,
    /// A user cancels the task.
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Enqueue),
        3 => (0..2usize).prop_map(Op::Claim),
        3 => (0..2usize, proptest::bool::weighted(0.2)).prop_map(|(worker, stale)| Op::Complete { worker, stale }),
        3 => (0..2usize, proptest::bool::weighted(0.2), any::<bool>())
            .prop_map(|(worker, stale, retryable)| Op::Fail { worker, stale, retryable }),
        1 => Just(Op::ExpireLease),
        1 => Just(Op::Cancel),
    ]
}

/// The simple model: the rules in plain words, using the Rust table for moves.
#[derive(Debug, Clone)]
struct Model {
    state: StepState,
    attempts: i32,
    owner: Option<usize>,
    max_attempts: i32,
    cancelled: bool,
}

impl Model {
    fn step(&mut self, event: StepEvent) {
        self.state = self.state.apply(event).expect("the model only makes table moves");
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Enqueue => {
                if !self.cancelled && matches!(self.state, StepState::Pending | StepState::WaitingForRetry) {
                    self.step(StepEvent::Enqueue);
                }
            }
            Op::Claim(worker) => {
                if self.state == StepState::Enqueued {
                    self.step(StepEvent::Start);
                    self.attempts += 1;
                    self.owner = Some(worker);
                }
            }
            Op::Complete { worker, stale } => {
                if self.state == StepState::InProgress && self.owner == Some(worker) && !stale {
                    self.step(StepEvent::Complete);
                }
            }
            Op::Fail { worker, stale, retryable } => {
                if self.state == StepState::InProgress && self.owner == Some(worker) && !stale {
                    let retry = retryable && self.attempts < self.max_attempts;
                    self.step(if retry { StepEvent::Retry } else { StepEvent::Fail });
                }
            }
            Op::ExpireLease => {
                if self.state == StepState::InProgress {
                    let retry = self.attempts < self.max_attempts;
                    self.step(if retry { StepEvent::Retry } else { StepEvent::Fail });
                }
            }
            Op::Cancel => {
                if !self.state.is_final() {
                    self.step(StepEvent::Cancel);
                }
                self.cancelled = true;
            }
        }
    }
}

const WORKERS: [&str; 2] = ["worker-0", "worker-1"];

async fn run_case(pool: &PgPool, ops: &[Op]) {
    let t = single("prop");
    let task = submit(pool, &t, 1).await[0];
    let mut model = Model { state: StepState::Pending, attempts: 0, owner: None, max_attempts: 3, cancelled: false };
    let step: Uuid = sqlx::query_scalar("SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1")
        .bind(task)
        .fetch_one(pool)
        .await
        .unwrap();

    for op in ops {
        // What a worker believes its attempt number is.
        let attempt = |stale: bool| AttemptRef { step_uuid: step, attempt: model.attempts - i32::from(stale) };
        match *op {
            Op::Enqueue => {
                // Schedule any pending retry for now, then run a pass on this task only.
                let retries = tasker_shared::orchestration::unscheduled_retries(pool, &[task]).await.unwrap();
                let now = chrono::Utc::now() - chrono::Duration::milliseconds(1);
                let times: Vec<_> = retries.iter().map(|r| (r.step_uuid, now)).collect();
                tasker_shared::orchestration::schedule_step_retries(pool, &times).await.unwrap();
                sqlx::query("UPDATE tasker.tasks SET ready_at = now(), ready_since = now() WHERE task_uuid = $1 AND completed_at IS NULL")
                    .bind(task)
                    .execute(pool)
                    .await
                    .unwrap();
                enqueue_pass(pool, ORCH).await;
            }
            Op::Claim(worker) => {
                claim_steps(pool, WORKERS[worker], 10).await;
            }
            Op::Complete { worker, stale } => {
                let success = Success { attempt: attempt(stale), result: serde_json::json!(worker) };
                step_result::complete_steps(pool, WORKERS[worker], &[success]).await.unwrap();
            }
            Op::Fail { worker, stale, retryable } => {
                let failure = Failure { attempt: attempt(stale), error: "injected".into(), retryable };
                step_result::fail_steps(pool, WORKERS[worker], &[failure]).await.unwrap();
            }
            Op::ExpireLease => {
                let mut conn = pool.acquire().await.unwrap();
                expire_leases(&mut conn, task).await;
                tasker_shared::orchestration::expire_step_leases(pool, "rescuer", 10).await.unwrap();
            }
            Op::Cancel => {
                tasker_shared::tasks::cancel_task(pool, task, "user", "test").await.unwrap();
            }
        }
        model.apply(op);

        let (state, attempts): (String, i32) =
            sqlx::query_as("SELECT state, attempts FROM tasker.workflow_steps WHERE step_uuid = $1")
                .bind(step)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(state, model.state.as_str(), "after {op:?} in {ops:?}");
        assert_eq!(attempts, model.attempts, "after {op:?} in {ops:?}");
    }
}

#[test]
fn random_histories_with_duplicates_and_stale_reports_match_the_model() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (pool, database) = runtime.block_on(fresh_database("tasker_prop"));
    runtime.block_on(publish(&pool, &single("prop")));

    let config = ProptestConfig { cases: 96, ..ProptestConfig::default() };
    proptest!(config, |(ops in proptest::collection::vec(op(), 1..24))| {
        runtime.block_on(run_case(&pool, &ops));
    });

    runtime.block_on(async {
        assert_invariants(&pool).await;
        pool.close().await;
        drop_database(&database).await;
    });
}

/// A new, migrated database on the DATABASE_URL server; returns a pool and its name.
async fn fresh_database(prefix: &str) -> (PgPool, String) {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test");
    let name = format!("{prefix}_{}", Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.database(&name))
        .await
        .unwrap();
    tasker_shared::db::migrate(&pool).await.unwrap();
    (pool, name)
}

async fn drop_database(name: &str) {
    let url = std::env::var("DATABASE_URL").unwrap();
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}
