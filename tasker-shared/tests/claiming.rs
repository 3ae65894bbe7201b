//! Claiming really locks: concurrent claimers, lease expiry and fencing,
//! concurrent finalization.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use support::*;
use tasker_shared::claim::{self, AttemptRef, DiscoveredVia, Release};
use tasker_shared::finalize;
use tasker_shared::state_machine::{StepState, TaskState};
use tasker_shared::step_result::{self, Announce, Failure, StartDependents, Success};
use uuid::Uuid;

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn eight_concurrent_claimers_take_each_due_task_exactly_once(
    pool_options: PgPoolOptions,
    connect_options: PgConnectOptions,
) {
    let pool = pool_options.connect_with(connect_options.clone()).await.unwrap();
    let t = single("claims");
    publish(&pool, &t).await;
    let submitted = submit(&pool, &t, 2_000).await;

    // Each claimer has its own connection. lock_timeout turns any wait for
    // another claimer's row lock into an error, so "never blocks" is checked,
    // not assumed.
    let mut claimers = Vec::new();
    for i in 0..8 {
        let options = connect_options.clone();
        claimers.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect_with(&options).await.unwrap();
            sqlx::query("SET lock_timeout = '20ms'").execute(&mut conn).await.unwrap();
            let me = format!("claimer-{i}");
            let mut mine = Vec::new();
            loop {
                let batch = claim::claim_ready_tasks(&mut conn, &me, 13, Duration::from_secs(600), DiscoveredVia::Poll)
                    .await
                    .expect("claim must not wait on another claimer's locks");
                if batch.is_empty() {
                    break;
                }
                mine.extend(batch.into_iter().map(|c| c.task_uuid));
            }
            (me, mine)
        }));
    }

    let mut owner: HashMap<Uuid, String> = HashMap::new();
    let mut claimers_with_work = 0;
    for claimer in claimers {
        let (me, mine) = claimer.await.unwrap();
        claimers_with_work += usize::from(!mine.is_empty());
        for task in mine {
            if let Some(first) = owner.insert(task, me.clone()) {
                panic!("task {task} claimed by both {first} and {me}");
            }
        }
    }
    assert_eq!(owner.len(), submitted.len(), "every task claimed");
    assert!(claimers_with_work > 1, "claims were spread over several claimers");

    let (claimed_by_db,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM tasker.tasks WHERE claimed_by IS NOT NULL AND claim_seq = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(claimed_by_db, 2_000, "each task claimed once: claim_seq is 1 everywhere");
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn claims_take_higher_priority_then_older_work_first(pool: PgPool) {
    let t = single("prio");
    publish(&pool, &t).await;
    let mut tx = pool.begin().await.unwrap();
    let mut requests = Vec::new();
    for priority in [0, 5, 0, 9] {
        let mut r = new_task(&t);
        r.priority = priority;
        requests.push(r);
    }
    let created =
        tasker_shared::tasks::create_tasks(&mut tx, "test", &requests, tasker_shared::tasks::Start::ByOrchestrator)
            .await
            .unwrap();
    tx.commit().await.unwrap();

    let claims = claim::claim_ready_tasks(&pool, ORCH, 10, LEASE, DiscoveredVia::Poll).await.unwrap();
    let order: Vec<Uuid> = claims.iter().map(|c| c.task_uuid).collect();
    // All four were created in one statement with the same ready_at; among
    // equal priorities the order is not specified, so check priorities only.
    let priorities: Vec<i32> = claims.iter().map(|c| c.priority).collect();
    assert_eq!(priorities, [9, 5, 0, 0]);
    assert_eq!(order[0], created[3].task_uuid);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn an_expired_step_lease_is_claimable_again_and_the_stale_owner_is_fenced_out(pool: PgPool) {
    let t = single("lease");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];

    enqueue_pass(&pool, ORCH).await;
    let first = claim_steps(&pool, "worker-a", 10).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);

    // worker-a goes silent; its lease runs out and the rescuer fails the attempt.
    let mut conn = pool.acquire().await.unwrap();
    expire_leases(&mut conn, task).await;
    let expired = tasker_shared::orchestration::expire_step_leases(&pool, "rescuer", 100).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].state, StepState::WaitingForRetry);

    // The orchestrator schedules the retry for now and enqueues it.
    let retries = tasker_shared::orchestration::unscheduled_retries(&pool, &[task]).await.unwrap();
    assert_eq!(retries.len(), 1);
    let now = chrono::Utc::now() - chrono::Duration::milliseconds(1);
    tasker_shared::orchestration::schedule_step_retries(&pool, &[(retries[0].step_uuid, now)]).await.unwrap();
    let enqueued = enqueue_pass(&pool, ORCH).await;
    assert_eq!(enqueued.len(), 1, "the retry was enqueued");

    let second = claim_steps(&pool, "worker-b", 10).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempt, 2);

    // The first owner's late result is rejected; the second owner's is recorded.
    let late = step_result::complete_steps(
        &pool,
        "worker-a",
        &[Success { attempt: first[0].attempt_ref(), result: serde_json::json!({"from": "a"}) }],
    )
    .await
    .unwrap();
    assert!(!late[0].accepted, "stale completion must be rejected");
    // Presenting the new attempt number does not help someone who does not own it.
    let forged = step_result::complete_steps(
        &pool,
        "worker-a",
        &[Success { attempt: second[0].attempt_ref(), result: serde_json::json!({"from": "a"}) }],
    )
    .await
    .unwrap();
    assert!(!forged[0].accepted, "another worker's attempt must be rejected");

    let ok = step_result::complete_steps(
        &pool,
        "worker-b",
        &[Success { attempt: second[0].attempt_ref(), result: serde_json::json!({"from": "b"}) }],
    )
    .await
    .unwrap();
    assert!(ok[0].accepted);

    let result: serde_json::Value = sqlx::query_scalar("SELECT result FROM tasker.workflow_steps WHERE task_uuid = $1")
        .bind(task)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(result, serde_json::json!({"from": "b"}));

    let history: Vec<(i32, Option<String>, String, String)> = sqlx::query_as(
        "SELECT attempt, from_state, to_state, actor FROM tasker.workflow_step_transitions
         WHERE task_uuid = $1 ORDER BY transition_id",
    )
    .bind(task)
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected: Vec<(i32, Option<String>, String, String)> = [
        (0, "pending", "enqueued", ORCH),
        (1, "enqueued", "in_progress", "worker-a"),
        (1, "in_progress", "waiting_for_retry", "rescuer"),
        (1, "waiting_for_retry", "enqueued", ORCH),
        (2, "enqueued", "in_progress", "worker-b"),
        (2, "in_progress", "complete", "worker-b"),
    ]
    .into_iter()
    .map(|(a, f, t, w)| (a, Some(f.to_owned()), t.to_owned(), w.to_owned()))
    .collect();
    assert_eq!(history, expected);
    assert_invariants(&pool).await;
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn an_expired_task_claim_passes_to_another_orchestrator_and_fences_the_first(pool: PgPool) {
    let t = single("taskclaim");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];

    let first = claim_all(&pool, "orch-a").await;
    assert_eq!(first.len(), 1);
    assert!(claim_all(&pool, "orch-b").await.is_empty(), "held claims are not claimable");

    let mut conn = pool.acquire().await.unwrap();
    expire_leases(&mut conn, task).await;
    let second = claim_all(&pool, "orch-b").await;
    assert_eq!(second.len(), 1, "an expired claim is claimable again");
    assert_eq!(second[0].claim_seq, first[0].claim_seq + 1);

    // orch-a's late writes are fenced out.
    let released = claim::release_task_claims(&pool, "orch-a", &[Release::of(&first[0], None)]).await.unwrap();
    assert!(released.is_empty(), "stale release must not apply");
    let extended = claim::extend_task_claims(&pool, "orch-a", &[&first[0]], LEASE).await.unwrap();
    assert!(extended.is_empty(), "stale extension must not apply");
    let moved = tasker_shared::orchestration::transition_tasks(
        &pool,
        "orch-a",
        &[tasker_shared::orchestration::TaskTransition {
            task_uuid: task,
            claim_seq: first[0].claim_seq,
            from: TaskState::Pending,
            to: TaskState::Cancelled,
            reason: "stale".into(),
        }],
    )
    .await
    .unwrap();
    assert!(moved.is_empty(), "stale transition must not apply");
    let enqueued = tasker_shared::orchestration::enqueue_ready_steps(&pool, "orch-a", &first).await.unwrap();
    assert!(enqueued.is_empty(), "stale enqueue must not apply");

    // orch-b holds it and can act.
    let extended = claim::extend_task_claims(&pool, "orch-b", &[&second[0]], LEASE).await.unwrap();
    assert_eq!(extended, [task]);
    let released = claim::release_task_claims(&pool, "orch-b", &[Release::of(&second[0], None)]).await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(task_state(&pool, task).await, TaskState::Pending);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_task_woken_while_claimed_stays_due_after_release(pool: PgPool) {
    // a and b run in parallel.
    let t = template("wake", "pair", &[("a", &[]), ("b", &[])]);
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    enqueue_pass(&pool, ORCH).await;
    let steps = claim_steps(&pool, "w", 10).await;
    let step = |name: &str| steps.iter().find(|s| s.name == name).unwrap().attempt_ref();

    // a completes beside a running b: nothing for an orchestrator to do.
    step_result::complete_steps(&pool, "w", &[Success { attempt: step("a"), result: serde_json::json!(1) }])
        .await
        .unwrap();
    assert!(claim_all(&pool, ORCH).await.is_empty(), "not woken");

    // Something else wakes it, and an orchestrator claims it.
    sqlx::query("SELECT tasker.wake_tasks($1)").bind(vec![task]).execute(&pool).await.unwrap();
    let claim = claim_all(&pool, ORCH).await;
    assert_eq!(claim.len(), 1);

    // While it is held, b completes: nothing is in flight any more, so the task
    // is woken again, but stays claimed.
    let recorded =
        step_result::complete_steps(&pool, "w", &[Success { attempt: step("b"), result: serde_json::json!(2) }])
            .await
            .unwrap();
    assert!(recorded[0].task_woken);
    assert!(claim_all(&pool, "other").await.is_empty(), "still held");

    let released = claim::release_task_claims(&pool, ORCH, &[Release::of(&claim[0], None)]).await.unwrap();
    assert_eq!(released.len(), 1);
    assert!(released[0].still_due, "the wake-up during the claim is not lost");
    assert_eq!(claim_all(&pool, "other").await.len(), 1);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn completions_enqueue_what_they_unblock_and_the_last_one_finalizes(pool: PgPool) {
    let t = template("quiet", "fan", &[("start", &[]), ("x", &["start"]), ("y", &["start"]), ("end", &["x", "y"])]);
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    enqueue_pass(&pool, ORCH).await;
    let start = claim_steps(&pool, "w", 10).await;
    let recorded = step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: start[0].attempt_ref(), result: serde_json::json!(0) }],
    )
    .await
    .unwrap();
    assert_eq!(recorded[0].enqueued_dependents.len(), 2, "x and y, in the completing transaction");
    assert!(!recorded[0].task_woken);
    let middle = claim_steps(&pool, "w", 10).await;
    assert_eq!(middle.len(), 2);

    let first = step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: middle[0].attempt_ref(), result: serde_json::json!(1) }],
    )
    .await
    .unwrap();
    assert_eq!((first[0].enqueued_dependents.len(), first[0].task_woken), (0, false), "its sibling still runs");
    let second = step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: middle[1].attempt_ref(), result: serde_json::json!(2) }],
    )
    .await
    .unwrap();
    assert_eq!(
        (second[0].enqueued_dependents.len(), second[0].task_woken),
        (1, false),
        "`end` enqueued, nothing to wake for"
    );
    assert!(claim_all(&pool, ORCH).await.is_empty());

    let end = claim_steps(&pool, "w", 10).await;
    let last = step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: end[0].attempt_ref(), result: serde_json::json!(3) }],
    )
    .await
    .unwrap();
    assert!(last[0].task_finalized && !last[0].task_woken, "all done: the completion finalizes, nobody is woken");
    assert!(last[0].task_created_at.is_some());
    assert_eq!(task_state(&pool, task).await, TaskState::Complete);
    assert!(claim_all(&pool, ORCH).await.is_empty());
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM tasker.task_transitions WHERE task_uuid = $1 ORDER BY transition_id DESC LIMIT 1",
    )
    .bind(task)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(actor, "w", "finalized by the completing worker");
    assert_invariants(&pool).await;
}

/// Both parents of a join completed in one call enqueue it once, credited to
/// one of them; an outcome the fence rejects in the same call reports nothing
/// about its task; and each answer belongs to its input.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn one_call_completing_both_parents_credits_the_join_to_one(pool: PgPool) {
    let t = template("quiet", "fan", &[("start", &[]), ("x", &["start"]), ("y", &["start"]), ("end", &["x", "y"])]);
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 2).await;
    enqueue_pass(&pool, ORCH).await;
    let starts = claim_steps(&pool, "w", 10).await;
    assert_eq!(starts.len(), 2);
    let (first, other) =
        if starts[0].task_uuid == tasks[0] { (&starts[0], &starts[1]) } else { (&starts[1], &starts[0]) };
    let done = Success { attempt: first.attempt_ref(), result: serde_json::json!(0) };
    step_result::complete_steps(&pool, "w", &[done]).await.unwrap();
    let middle = claim_steps(&pool, "w", 10).await;
    assert_eq!(middle.len(), 2, "x and y of the first task");

    let stale = AttemptRef { step_uuid: other.step_uuid, attempt: other.attempt + 1 };
    let successes = [
        Success { attempt: middle[0].attempt_ref(), result: serde_json::json!(1) },
        Success { attempt: stale, result: serde_json::json!("stale") },
        Success { attempt: middle[1].attempt_ref(), result: serde_json::json!(2) },
    ];
    let recorded = step_result::complete_steps(&pool, "w", &successes).await.unwrap();
    let answers: Vec<(Uuid, bool)> = recorded.iter().map(|r| (r.step_uuid, r.accepted)).collect();
    assert_eq!(
        answers,
        vec![(middle[0].step_uuid, true), (other.step_uuid, false), (middle[1].step_uuid, true)],
        "one answer per input, in input order"
    );
    let join: Uuid = sqlx::query_scalar(
        "SELECT step_uuid FROM tasker.workflow_steps WHERE task_uuid = $1 AND name = 'end' AND state = 'enqueued'",
    )
    .bind(tasks[0])
    .fetch_one(&pool)
    .await
    .unwrap();
    let credited: Vec<&Vec<Uuid>> = [&recorded[0], &recorded[2]].iter().map(|r| &r.enqueued_dependents).collect();
    assert!(
        credited == [&vec![join], &vec![]] || credited == [&vec![], &vec![join]],
        "the join is credited to exactly one parent: {credited:?}"
    );
    let rejected = &recorded[1];
    assert!(rejected.enqueued_dependents.is_empty() && !rejected.task_woken && !rejected.task_finalized);
    assert_eq!(rejected.task_created_at, None);
    assert!(recorded.iter().all(|r| !r.task_finalized && !r.task_woken), "the join still has to run");
    assert_eq!(task_state(&pool, tasks[1]).await, TaskState::StepsInProcess, "the stale outcome changed nothing");
}

/// A stale attempt's outcome beside the current attempt's, in one call (a
/// worker that lost a step's lease and claimed it again): the current
/// result is stored, only the current input is answered as accepted, and the
/// task it finalizes is reported on that row alone.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_stale_outcome_beside_the_current_one_is_answered_as_rejected(pool: PgPool) {
    let t = single("dup");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    enqueue_pass(&pool, ORCH).await;
    let claimed = claim_steps(&pool, "w", 1).await;
    let current = claimed[0].attempt_ref();
    let stale = AttemptRef { step_uuid: current.step_uuid, attempt: current.attempt - 1 };
    let successes = [
        Success { attempt: stale, result: serde_json::json!("stale") },
        Success { attempt: current, result: serde_json::json!("current") },
    ];
    let recorded = step_result::complete_steps(&pool, "w", &successes).await.unwrap();

    assert_eq!(recorded.len(), 2);
    assert!(!recorded[0].accepted && !recorded[0].task_finalized && recorded[0].task_created_at.is_none());
    assert!(recorded[1].accepted && recorded[1].task_finalized);
    let created_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT created_at FROM tasker.tasks WHERE task_uuid = $1")
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(recorded[1].task_created_at, Some(created_at));
    let result: serde_json::Value = sqlx::query_scalar("SELECT result FROM tasker.workflow_steps WHERE step_uuid = $1")
        .bind(current.step_uuid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(result, serde_json::json!("current"));
}

/// The failure batch's counterpart: a stale attempt's permanent failure beside
/// the current attempt's retryable one neither decides the step's next state
/// nor reads as accepted.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_stale_failure_beside_the_current_one_is_answered_as_rejected(pool: PgPool) {
    let t = single("dupfail");
    publish(&pool, &t).await;
    submit(&pool, &t, 1).await;
    enqueue_pass(&pool, ORCH).await;
    let claimed = claim_steps(&pool, "w", 1).await;
    let current = claimed[0].attempt_ref();
    let stale = AttemptRef { step_uuid: current.step_uuid, attempt: current.attempt - 1 };
    let failures = [
        Failure { attempt: stale, error: "stale".into(), retryable: false },
        Failure { attempt: current, error: "current".into(), retryable: true },
    ];
    let recorded = step_result::fail_steps(&pool, "w", &failures).await.unwrap();

    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].step_uuid, current.step_uuid);
    assert!(!recorded[0].accepted && recorded[0].state.is_none(), "{:?}", recorded[0]);
    assert!(recorded[1].accepted, "{:?}", recorded[1]);
    assert_eq!(recorded[1].state, Some(StepState::WaitingForRetry));
    let (state, error): (String, String) =
        sqlx::query_as("SELECT state, last_error FROM tasker.workflow_steps WHERE step_uuid = $1")
            .bind(current.step_uuid)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), error.as_str()), ("waiting_for_retry", "current"));
    let history: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM tasker.workflow_step_transitions WHERE step_uuid = $1 AND from_state = 'in_progress'",
    )
    .bind(current.step_uuid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(history, [format!("attempt {} of 3 failed: current", current.attempt)]);
    assert_invariants(&pool).await;
}

/// Tasks finalized by one call each report their own submission time.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn one_call_finalizing_several_tasks_reports_each_its_own_submission_time(pool: PgPool) {
    let t = single("several");
    publish(&pool, &t).await;
    // One submission each, so that no two tasks share a creation time.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.extend(submit(&pool, &t, 1).await);
    }
    enqueue_pass(&pool, ORCH).await;
    let claimed = claim_steps(&pool, "w", 10).await;
    assert_eq!(claimed.len(), 4);
    let successes: Vec<Success> =
        claimed.iter().map(|c| Success { attempt: c.attempt_ref(), result: serde_json::json!(null) }).collect();
    let recorded = step_result::complete_steps(&pool, "w", &successes).await.unwrap();

    let created: HashMap<Uuid, chrono::DateTime<chrono::Utc>> =
        sqlx::query_as("SELECT task_uuid, created_at FROM tasker.tasks WHERE task_uuid = ANY ($1)")
            .bind(&tasks)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let distinct: std::collections::HashSet<_> = created.values().collect();
    assert_eq!(distinct.len(), 4, "the check needs distinct submission times");
    for (claim, answer) in claimed.iter().zip(&recorded) {
        assert_eq!(answer.step_uuid, claim.step_uuid);
        assert!(answer.task_finalized);
        assert_eq!(answer.task_created_at, Some(created[&claim.task_uuid]), "step {}", claim.step_uuid);
    }
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_last_completion_does_not_finalize_a_task_an_orchestrator_holds_but_wakes_it(pool: PgPool) {
    let t = single("held");
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    enqueue_pass(&pool, ORCH).await;
    let step = claim_steps(&pool, "w", 10).await;
    // An orchestrator holds the task (woken for some other reason) while the
    // step's result arrives.
    sqlx::query("SELECT tasker.wake_tasks($1)").bind(vec![task]).execute(&pool).await.unwrap();
    let claims = claim_all(&pool, ORCH).await;
    assert_eq!(claims.len(), 1);

    let recorded = step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: step[0].attempt_ref(), result: serde_json::json!(1) }],
    )
    .await
    .unwrap();
    assert!(!recorded[0].task_finalized && recorded[0].task_woken, "refused, and woken for the holder instead");
    assert_eq!(task_state(&pool, task).await, TaskState::StepsInProcess);

    // The holder's release sees the wake-up; whoever claims next finalizes.
    let released = claim::release_task_claims(&pool, ORCH, &[Release::of(&claims[0], None)]).await.unwrap();
    assert!(released[0].still_due);
    let again = claim_all(&pool, "other").await;
    assert_eq!(again.len(), 1);
    let f = finalize::claim_task_for_finalization(&pool, task, "other").await.unwrap();
    assert!(f.finalized, "{f:?}");
}

/// A completion starts the dependent it makes runnable for its worker
/// (`StartDependents`), though older work of the same priority waits, so it
/// leaves nothing to announce; but while a step of higher priority waits,
/// the dependent is enqueued, the worker's claim (`claim_dependents`) takes
/// the urgent step first, and the dependent left behind is announced.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_completion_continues_its_own_tasks_unless_higher_priority_work_waits(pool: PgPool) {
    let t = template("cont", "chain", &[("a", &[]), ("b", &["a"])]);
    publish(&pool, &t).await;
    submit(&pool, &t, 3).await;
    enqueue_pass(&pool, ORCH).await;
    let roots = claim_steps(&pool, "w", 2).await;
    assert_eq!(roots.len(), 2, "the third task's root stays enqueued: older work than any dependent");

    let continue_with = async |root: &tasker_shared::claim::StepClaim, limit: i32| {
        let mut tx = pool.begin().await.unwrap();
        let success = Success { attempt: root.attempt_ref(), result: serde_json::json!("a") };
        let start = StartDependents { limit: limit as usize, namespace: None, lease: LEASE };
        let recorded =
            step_result::record_successes(&mut *tx, "w", &[success], Announce::Later, Some(start)).await.unwrap();
        let (dependents, started) = (recorded[0].enqueued_dependents.clone(), recorded[0].started_dependents.clone());
        assert_eq!(dependents.len() + started.len(), 1, "{recorded:?}");
        let room = limit - started.len() as i32;
        let claimed = claim::claim_dependents(&mut *tx, "w", None, room, LEASE, &dependents, &started).await.unwrap();
        let announced = step_result::announce_left(&mut *tx, &recorded, &claimed).await.unwrap();
        tx.commit().await.unwrap();
        (claimed, announced, started)
    };

    let (claimed, announced, started) = continue_with(&roots[0], 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].task_uuid, claimed[0].name.as_str()), (roots[0].task_uuid, "b"), "its own dependent");
    assert_eq!(started, [claimed[0].step_uuid], "started by the completion itself");
    assert_eq!(announced, 0, "nothing left to announce");
    // One update and one history row: pending -> in_progress, attempt 1.
    let history: Vec<(Option<String>, String, i32)> = sqlx::query_as(
        "SELECT from_state, to_state, attempt FROM tasker.workflow_step_transitions
         WHERE step_uuid = $1 ORDER BY transition_id",
    )
    .bind(claimed[0].step_uuid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(history, [(Some("pending".to_string()), "in_progress".to_string(), 1)]);
    assert_eq!(claimed[0].attempt, 1);

    let mut urgent = new_task(&t);
    urgent.priority = 7;
    let mut tx = pool.begin().await.unwrap();
    let created =
        tasker_shared::tasks::create_tasks(&mut tx, "test", &[urgent], tasker_shared::tasks::Start::ByOrchestrator)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    enqueue_pass(&pool, ORCH).await;
    // Room for two: the urgent root, then the rest in the usual order (the
    // third task's root is older than the dependent just enqueued).
    let (claimed, announced, started) = continue_with(&roots[1], 2).await;
    assert!(started.is_empty(), "the dependent waits behind the urgent step: {started:?}");
    let got: Vec<(Uuid, &str)> = claimed.iter().map(|c| (c.task_uuid, c.name.as_str())).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains(&(created[0].task_uuid, "a")), "higher priority first: {got:?}");
    assert!(got.iter().all(|&(_, name)| name == "a"), "then the oldest, not the dependent: {got:?}");
    assert_eq!(announced, 1, "the dependent left behind is announced");

    let left = claim_steps(&pool, "other", 10).await;
    let left: Vec<(Uuid, &str)> = left.iter().map(|c| (c.task_uuid, c.name.as_str())).collect();
    assert_eq!(left, [(roots[1].task_uuid, "b")], "only the second task's dependent is left");
    assert_invariants(&pool).await;
}

/// A namespace worker's continuation claim checks for higher-priority work
/// in its own namespace only, through that namespace's claimable index: a
/// backlog of urgent work elsewhere is neither waited for nor read (0022: 16
/// step rows fetched here; before, 2,016, the whole backlog per continued
/// step). An urgent step in its own namespace still goes first.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_namespace_workers_continuation_reads_only_its_namespace(pool: PgPool) {
    use tasker_shared::identifier::Identifier;
    use tasker_shared::tasks::{self, NewTask, Start};

    let chain = template("mine", "chain", &[("a", &[]), ("b", &["a"])]);
    let other = template("theirs", "one", &[("a", &[])]);
    publish(&pool, &chain).await;
    publish(&pool, &other).await;
    let urgent = |t: &tasker_shared::template::TaskTemplate, n: usize| -> Vec<NewTask> {
        (0..n).map(|_| NewTask { priority: 5, ..new_task(t) }).collect()
    };
    for batch in urgent(&other, 2_000).chunks(tasks::MAX_BATCH) {
        let mut tx = pool.begin().await.unwrap();
        tasks::create_tasks(&mut tx, "test", batch, Start::Now).await.unwrap();
        tx.commit().await.unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    tasks::create_tasks(&mut tx, "test", &[new_task(&chain), new_task(&chain)], Start::Now).await.unwrap();
    tx.commit().await.unwrap();
    sqlx::query("ANALYZE tasker.workflow_steps").execute(&pool).await.unwrap();
    let mine = Identifier::new("mine").unwrap();
    let roots = claim::claim_steps(&pool, "w", Some(&mine), 2, LEASE, DiscoveredVia::Event).await.unwrap();
    assert_eq!(roots.len(), 2);

    // Completes `root` with the continuation claim of a worker of `mine`
    // with room for one step; returns what it claimed and the step rows the
    // transaction fetched.
    let continue_with = async |root: &tasker_shared::claim::StepClaim| {
        let mut tx = pool.begin().await.unwrap();
        let fetched = async |tx: &mut sqlx::PgConnection| -> i64 {
            sqlx::query_scalar(
                "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables
                 WHERE schemaname = 'tasker' AND relname = 'workflow_steps'",
            )
            .fetch_one(tx)
            .await
            .unwrap()
        };
        let before = fetched(&mut tx).await;
        let success = Success { attempt: root.attempt_ref(), result: serde_json::json!("a") };
        let start = StartDependents { limit: 1, namespace: Some(&mine), lease: LEASE };
        let recorded =
            step_result::record_successes(&mut *tx, "w", &[success], Announce::Later, Some(start)).await.unwrap();
        let (dependents, started) = (recorded[0].enqueued_dependents.clone(), recorded[0].started_dependents.clone());
        let room = 1 - started.len() as i32;
        let claimed =
            claim::claim_dependents(&mut *tx, "w", Some(&mine), room, LEASE, &dependents, &started).await.unwrap();
        let read = fetched(&mut tx).await - before;
        tx.commit().await.unwrap();
        (claimed, read)
    };

    let (claimed, read) = continue_with(&roots[0]).await;
    assert_eq!((claimed.len(), claimed[0].name.as_str()), (1, "b"), "urgent work elsewhere does not hold it back");
    assert!(read < 200, "the continuation read {read} step rows: the other namespace's backlog");

    let mut tx = pool.begin().await.unwrap();
    tasks::create_tasks(&mut tx, "test", &urgent(&chain, 1), Start::Now).await.unwrap();
    tx.commit().await.unwrap();
    let (claimed, _) = continue_with(&roots[1]).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].name, "a", "an urgent step of its own namespace goes first");
    assert_eq!(claimed[0].namespace, "mine");
}

/// A worker that records results with `Announce::Later`, claims, and then
/// calls `announce_left` in the same transaction announces on the step
/// channel only the dependents it leaves enqueued: none when it took them
/// all, one notification when it leaves some or claimed nothing; and the
/// count it is told is what was sent. Notifications reach a listener in
/// commit order, so a marker sent after each transaction shows whether that
/// transaction notified.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_completion_announces_only_the_dependents_its_worker_leaves(pool: PgPool) {
    let t = template("hop", "fan", &[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["a"])]);
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 3).await;
    enqueue_pass(&pool, ORCH).await;
    let roots = claim_steps(&pool, "w", 10).await;
    assert_eq!(roots.len(), 3);

    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen("tasker_steps_hop").await.unwrap();
    let mut notifications_before_marker =
        async || notified_before_marker(&pool, &mut listener, "tasker_steps_hop").await;
    let hop = async |task: Uuid, limit: i32| {
        let root = roots.iter().find(|r| r.task_uuid == task).unwrap();
        let mut tx = pool.begin().await.unwrap();
        let success = Success { attempt: root.attempt_ref(), result: serde_json::json!("a") };
        let start = (limit > 0).then_some(StartDependents { limit: limit as usize, namespace: None, lease: LEASE });
        let recorded = step_result::record_successes(&mut *tx, "w", &[success], Announce::Later, start).await.unwrap();
        let (dependents, started) = (recorded[0].enqueued_dependents.clone(), recorded[0].started_dependents.clone());
        assert!(recorded[0].accepted && dependents.len() + started.len() == 3, "{recorded:?}");
        assert_eq!(started.len(), limit as usize, "{recorded:?}");
        let claimed = if limit > 0 {
            let room = limit - started.len() as i32;
            claim::claim_dependents(&mut *tx, "w", None, room, LEASE, &dependents, &started).await.unwrap()
        } else {
            Vec::new()
        };
        let announced = step_result::announce_left(&mut *tx, &recorded, &claimed).await.unwrap();
        tx.commit().await.unwrap();
        (claimed, announced)
    };

    let (all, announced) = hop(tasks[0], 3).await;
    let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["b", "c", "d"]);
    assert!(all.iter().all(|c| c.task_uuid == tasks[0] && c.dependency_results == serde_json::json!({"a": "a"})));
    assert_eq!((announced, notifications_before_marker().await), (0, 0), "what the worker took is not announced");

    let (some, announced) = hop(tasks[1], 2).await;
    assert_eq!(some.len(), 2);
    assert_eq!((announced, notifications_before_marker().await), (1, 1), "the dependent left is announced, once");

    let (none, announced) = hop(tasks[2], 0).await;
    assert!(none.is_empty());
    assert_eq!((announced, notifications_before_marker().await), (1, 1), "with nothing claimed, every dependent is");

    // What was announced is there for any worker; everything runs to the end.
    let left = claim_steps(&pool, "other", 10).await;
    assert_eq!(left.len(), 4, "one of the second task, three of the third");
    for (worker, claims) in [("w", all.iter().chain(&some).collect::<Vec<_>>()), ("other", left.iter().collect())] {
        let successes: Vec<Success> =
            claims.iter().map(|c| Success { attempt: c.attempt_ref(), result: serde_json::json!(1) }).collect();
        let recorded = step_result::complete_steps(&pool, worker, &successes).await.unwrap();
        assert!(recorded.iter().all(|r| r.accepted), "{recorded:?}");
    }
    for task in &tasks {
        assert_eq!(task_state(&pool, *task).await, TaskState::Complete);
    }
    assert_invariants(&pool).await;
}

/// `complete_and_claim` makes, in one statement, the claim the worker's
/// completing transaction made in three calls: it takes up the dependents
/// the completion started, tops up with as many reserved free slots as the
/// enqueued dependents need (all of them under a backlog), claims nothing
/// more without dependents or a backlog, and announces exactly the
/// dependents it leaves. A rejected outcome claims nothing; bad arguments are
/// refused with nothing written.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_completion_and_its_claim_in_one_statement_decide_as_the_worker_did(pool: PgPool) {
    use tasker_shared::step_result::{ClaimWith, Continued};

    let fan = template("one", "fan", &[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["a"])]);
    let single = single("one");
    publish(&pool, &fan).await;
    publish(&pool, &single).await;
    let fans = submit(&pool, &fan, 4).await;
    enqueue_pass(&pool, ORCH).await;
    let roots = claim_steps(&pool, "w", 10).await;
    assert_eq!(roots.len(), 4);

    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen("tasker_steps_one").await.unwrap();
    let mut notified = async || notified_before_marker(&pool, &mut listener, "tasker_steps_one").await;
    let hop = async |attempt: AttemptRef, capacity: usize, free: usize, backlog: bool| -> Continued {
        let success = Success { attempt, result: serde_json::json!("a") };
        let claim = ClaimWith { capacity, free, backlog, namespace: None, lease: LEASE };
        step_result::complete_and_claim(&pool, "w", &[success], claim).await.unwrap()
    };
    let root_of = |task: Uuid| roots.iter().find(|r| r.task_uuid == task).unwrap().attempt_ref();
    let names = |c: &Continued| {
        let mut names: Vec<String> = c.claimed.iter().map(|c| c.name.clone()).collect();
        names.sort_unstable();
        names
    };

    // Room for one: the completion starts a dependent; two free slots cover
    // the two it enqueued, so nothing is left to announce.
    let all = hop(root_of(fans[0]), 1, 2, false).await;
    assert!(all.recorded[0].accepted && all.recorded[0].started_dependents.len() == 1, "{all:?}");
    assert_eq!(names(&all), ["b", "c", "d"]);
    assert!(
        all.claimed.iter().all(|c| c.task_uuid == fans[0] && c.dependency_results == serde_json::json!({"a": "a"}))
    );
    assert_eq!((all.announced, notified().await), (0, 0), "what the worker took is not announced");

    // One free slot for two enqueued dependents: one is left, and announced.
    let some = hop(root_of(fans[1]), 1, 1, false).await;
    assert_eq!(some.claimed.len(), 2, "{some:?}");
    assert_eq!((some.announced, notified().await), (1, 1), "the dependent left is announced, once");

    // No free slot: only the started dependent; two are announced (one channel).
    let one = hop(root_of(fans[2]), 1, 0, false).await;
    assert_eq!(one.claimed.len(), 1);
    assert_eq!(one.claimed[0].step_uuid, one.recorded[0].started_dependents[0]);
    assert_eq!((one.announced, notified().await), (1, 1));

    // A stale attempt is rejected and claims nothing, though a slot is free.
    let stale = AttemptRef { attempt: 7, ..root_of(fans[3]) };
    let rejected = hop(stale, 1, 3, false).await;
    assert_eq!((rejected.recorded.len(), rejected.recorded[0].accepted), (1, false), "{rejected:?}");
    assert!(rejected.claimed.is_empty() && rejected.announced == 0, "{rejected:?}");

    // What was announced is there for any worker.
    assert_eq!(claim_steps(&pool, "other", 10).await.len(), 3, "one of the second task, two of the third");

    // A one-step task's completion enqueues nothing: without a backlog it
    // claims nothing more, though ready work waits; with one, it fills its
    // capacity and the free slots.
    let waiting = submit(&pool, &single, 6).await;
    enqueue_pass(&pool, ORCH).await;
    let singles = claim_steps(&pool, "w", 2).await;
    assert!(singles.iter().all(|c| waiting.contains(&c.task_uuid)), "{singles:?}");
    let idle = hop(singles[0].attempt_ref(), 1, 3, false).await;
    assert!(idle.recorded[0].accepted && idle.recorded[0].task_finalized, "{idle:?}");
    assert!(idle.claimed.is_empty(), "no dependents and no backlog: no claim: {idle:?}");
    let busy = hop(singles[1].attempt_ref(), 1, 2, true).await;
    assert_eq!(busy.claimed.len(), 3, "capacity 1 and 2 free slots, under a backlog: {busy:?}");
    assert_eq!(busy.announced, 0);

    // Bad arguments: refused, nothing written.
    let held = claim_steps(&pool, "w", 1).await;
    let success = Success { attempt: held[0].attempt_ref(), result: serde_json::json!(1) };
    for (capacity, lease) in [(0, LEASE), (1, Duration::ZERO)] {
        let claim = ClaimWith { capacity, free: 0, backlog: false, namespace: None, lease };
        let err = step_result::complete_and_claim(&pool, "w", std::slice::from_ref(&success), claim).await.unwrap_err();
        assert!(matches!(err, tasker_shared::Error::InvalidInput(_)), "capacity {capacity}, lease {lease:?}: {err:?}");
    }
    assert_eq!(step_state(&pool, held[0].task_uuid, "only").await, StepState::InProgress, "nothing written");
    let enqueued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.workflow_steps WHERE state = 'enqueued'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(enqueued, 0, "the last one-step task's step is the one held");
    assert_invariants(&pool).await;
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_task_started_at_creation_has_its_roots_enqueued_and_needs_no_orchestrator(pool: PgPool) {
    let t = diamond("fast");
    publish(&pool, &t).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen_all(["tasker_tasks", "tasker_steps_fast"]).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let created = tasker_shared::tasks::create_tasks(
        &mut tx,
        "api",
        &[new_task(&t), new_task(&t)],
        tasker_shared::tasks::Start::Now,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(created.iter().all(|c| c.state == TaskState::StepsInProcess && c.steps_enqueued == 1), "{created:?}");
    let task = created[0].task_uuid;
    assert_eq!(step_state(&pool, task, "a").await, StepState::Enqueued);
    assert_eq!(step_state(&pool, task, "b").await, StepState::Pending);
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.unwrap().unwrap();
    assert_eq!(notification.channel(), "tasker_steps_fast", "announced to workers, once, not to orchestrators");
    assert!(tokio::time::timeout(Duration::from_millis(300), listener.recv()).await.is_err());
    assert!(claim_all(&pool, ORCH).await.is_empty(), "nothing due for an orchestrator");

    // Workers alone take both tasks to the end.
    loop {
        let claims = claim_steps(&pool, "w", 10).await;
        if claims.is_empty() {
            break;
        }
        let successes: Vec<Success> =
            claims.iter().map(|c| Success { attempt: c.attempt_ref(), result: serde_json::json!(1) }).collect();
        step_result::complete_steps(&pool, "w", &successes).await.unwrap();
    }
    for c in &created {
        assert_eq!(task_state(&pool, c.task_uuid).await, TaskState::Complete);
    }
    assert!(claim_all(&pool, ORCH).await.is_empty());
    assert_invariants(&pool).await;
}

/// A submission is one statement (`tasker.create_tasks`, 0032), so a batch
/// sent without a transaction is still applied whole or not at all; a key
/// taken earlier, or earlier in the same batch, answers with that task; and
/// tasks left for an orchestrator are due and announced on the task channel.
#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn a_submission_is_one_statement_applied_whole_or_not_at_all(pool: PgPool) {
    use tasker_shared::tasks::{Start, create_tasks};

    let t = diamond("whole");
    publish(&pool, &t).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen_all(["tasker_tasks", "tasker_steps_whole"]).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let keyed = |key: &str| tasker_shared::tasks::NewTask { idempotency_key: Some(key.into()), ..new_task(&t) };
    let rows = || async {
        sqlx::query_as::<_, (i64, i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM tasker.tasks), (SELECT count(*) FROM tasker.workflow_steps),
                    (SELECT count(*) FROM tasker.workflow_step_edges), (SELECT count(*) FROM tasker.task_transitions)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    // The database refuses the third request's key (the API checks it first;
    // this is the last line): the two before it are not written either.
    let refused =
        create_tasks(&mut conn, "api", &[new_task(&t), keyed("k"), keyed(&"x".repeat(256))], Start::Now).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(rows().await, (0, 0, 0, 0), "nothing written");
    assert_eq!(notified_before_marker(&pool, &mut listener, "tasker_steps_whole").await, 0, "nothing announced");

    let created = create_tasks(&mut conn, "api", &[keyed("k"), keyed("k"), new_task(&t)], Start::Now).await.unwrap();
    let (first, again, other) = (&created[0], &created[1], &created[2]);
    assert!(first.created && other.created && !again.created, "{created:?}");
    assert_eq!(again.task_uuid, first.task_uuid, "the key's task, taken earlier in the batch");
    assert!(created.iter().all(|c| c.state == TaskState::StepsInProcess), "{created:?}");
    assert_eq!((first.steps_enqueued, again.steps_enqueued, other.steps_enqueued), (1, 0, 1));
    assert_eq!(rows().await, (2, 8, 8, 4), "two diamonds, each created and started");
    assert_eq!(notified_before_marker(&pool, &mut listener, "tasker_steps_whole").await, 1, "one per channel");

    let later = create_tasks(&mut conn, "api", &[keyed("k")], Start::Now).await.unwrap();
    assert_eq!((later[0].task_uuid, later[0].created), (first.task_uuid, false));
    assert_eq!(rows().await, (2, 8, 8, 4), "nothing more written");

    // The task holding a taken key is deleted (as retention may) after the
    // insert found the key taken and before the call reads its holder: here
    // by a trigger on the insert's history. The whole call fails, as a
    // transient error the caller may retry, and nothing of it is written.
    sqlx::raw_sql(
        "CREATE FUNCTION tasker.test_delete_key_holder() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN DELETE FROM tasker.tasks WHERE idempotency_key = 'k'; RETURN NULL; END $$;
         CREATE TRIGGER test_delete_key_holder AFTER INSERT ON tasker.task_transitions
             FOR EACH STATEMENT EXECUTE FUNCTION tasker.test_delete_key_holder();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let vanished = create_tasks(&mut conn, "api", &[new_task(&t), keyed("k")], Start::Now).await;
    assert!(vanished.as_ref().is_err_and(|e| e.is_transient()), "{vanished:?}");
    assert_eq!(rows().await, (2, 8, 8, 4), "nothing written, and the holder is still there");
    assert_eq!(notified_before_marker(&pool, &mut listener, "tasker_steps_whole").await, 0, "nothing announced");
    sqlx::raw_sql("DROP TRIGGER test_delete_key_holder ON tasker.task_transitions").execute(&pool).await.unwrap();

    let left = create_tasks(&mut conn, "api", &[new_task(&t), new_task(&t)], Start::ByOrchestrator).await.unwrap();
    assert!(left.iter().all(|c| c.created && c.state == TaskState::Pending && c.steps_enqueued == 0), "{left:?}");
    assert_eq!(notified_before_marker(&pool, &mut listener, "tasker_tasks").await, 1, "announced once");
    let mut due: Vec<Uuid> = claim_all(&pool, ORCH).await.iter().map(|c| c.task_uuid).collect();
    let mut expected: Vec<Uuid> = left.iter().map(|c| c.task_uuid).collect();
    due.sort();
    expected.sort();
    assert_eq!(due, expected, "due for an orchestrator, and nothing else");
    assert_invariants(&pool).await;
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn step_claims_not_made_by_a_notification_are_logged_with_their_wait(pool: PgPool) {
    let t = single("logged");
    publish(&pool, &t).await;
    submit(&pool, &t, 3).await;
    enqueue_pass(&pool, ORCH).await;
    let by_event = claim::claim_steps(&pool, "w1", None, 1, LEASE, DiscoveredVia::Event).await.unwrap();
    let by_poll = claim::claim_steps(&pool, "w2", None, 1, LEASE, DiscoveredVia::Poll).await.unwrap();
    let by_sweep = claim::claim_steps(&pool, "w3", None, 1, LEASE, DiscoveredVia::Sweep).await.unwrap();
    let logged: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT step_uuid, claimed_by, discovered_via FROM tasker.step_discoveries
         WHERE enqueued_at IS NOT NULL AND claimed_at >= enqueued_at ORDER BY claimed_by",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        logged,
        vec![
            (by_poll[0].step_uuid, "w2".to_owned(), "poll".to_owned()),
            (by_sweep[0].step_uuid, "w3".to_owned(), "sweep".to_owned())
        ],
        "the event claim of {} is not logged",
        by_event[0].step_uuid
    );
    assert!(by_poll[0].enqueued_at.is_some() && by_poll[0].claimed_at >= by_poll[0].enqueued_at.unwrap());
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn overdue_steps_are_enqueued_steps_waiting_past_the_threshold(pool: PgPool) {
    let t = single("overdue");
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 3).await;
    enqueue_pass(&pool, ORCH).await;
    let overdue = |older_than: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT tasker.overdue_steps($1::interval)")
                .bind(older_than)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(overdue("5 seconds").await, 0, "just enqueued");
    // One step has waited 10 s.
    sqlx::query("UPDATE tasker.workflow_steps SET enqueued_at = now() - interval '10 seconds' WHERE task_uuid = $1")
        .bind(tasks[0])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(overdue("5 seconds").await, 1);
    assert_eq!(overdue("1 minute").await, 0);
    // Claimed, it is no longer waiting (the oldest is claimed first).
    let claimed = claim_steps(&pool, "w", 1).await;
    assert_eq!(claimed[0].task_uuid, tasks[0]);
    assert_eq!(overdue("5 seconds").await, 0);
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn of_two_concurrent_finalizers_exactly_one_wins(pool_options: PgPoolOptions, connect_options: PgConnectOptions) {
    let pool = pool_options.connect_with(connect_options.clone()).await.unwrap();
    let t = single("finalize");
    publish(&pool, &t).await;
    let tasks = submit(&pool, &t, 10).await;
    enqueue_pass(&pool, ORCH).await;
    let steps = claim_steps(&pool, "w", 100).await;
    // A holder's claims keep the completions from finalizing (they wake the
    // tasks instead); then the holder is gone and its claims expire, so that
    // two other orchestrators find every task finished and unheld.
    sqlx::query("SELECT tasker.wake_tasks($1)").bind(&tasks).execute(&pool).await.unwrap();
    assert_eq!(claim_all(&pool, "holder").await.len(), 10);
    let successes: Vec<Success> =
        steps.iter().map(|s| Success { attempt: s.attempt_ref(), result: serde_json::json!(null) }).collect();
    let recorded = step_result::complete_steps(&pool, "w", &successes).await.unwrap();
    assert!(recorded.iter().all(|r| r.accepted && !r.task_finalized && r.task_woken));
    let mut conn = pool.acquire().await.unwrap();
    for &task in &tasks {
        expire_leases(&mut conn, task).await;
    }
    drop(conn);

    let mut gate = PgConnection::connect_with(&connect_options).await.unwrap();
    for &task in &tasks {
        // Hold the task row so that both finalizers are certainly in flight at
        // once, queued on the same lock; then let them race.
        let mut hold = gate.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM tasker.tasks WHERE task_uuid = $1 FOR UPDATE")
            .bind(task)
            .execute(&mut *hold)
            .await
            .unwrap();
        let racers: Vec<_> = ["orch-a", "orch-b"]
            .into_iter()
            .map(|me| {
                let options = connect_options.clone();
                tokio::spawn(async move {
                    let mut conn = PgConnection::connect_with(&options).await.unwrap();
                    finalize::claim_task_for_finalization(&mut conn, task, me).await.unwrap()
                })
            })
            .collect();
        wait_for_lock_waiters(&pool, 2).await;
        hold.commit().await.unwrap();
        let mut results = Vec::new();
        for racer in racers {
            results.push(racer.await.unwrap());
        }
        let (ra, rb) = (&results[0], &results[1]);
        assert!(ra.finalized ^ rb.finalized, "exactly one finalizer wins for {task}: {ra:?} / {rb:?}");
        assert_eq!(ra.state, Some(TaskState::Complete));
        assert_eq!(rb.state, Some(TaskState::Complete));
    }
    let (finalizations,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM tasker.task_transitions WHERE to_state = 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(finalizations, 10, "one completion transition per task");
    assert_invariants(&pool).await;
}

#[sqlx::test(migrator = "tasker_shared::db::MIGRATOR")]
async fn finalization_waits_for_running_steps_and_fails_a_task_with_a_permanent_failure(pool: PgPool) {
    let t = template("fin", "pair", &[("a", &[]), ("b", &[]), ("c", &["a", "b"])]);
    publish(&pool, &t).await;
    let task = submit(&pool, &t, 1).await[0];
    enqueue_pass(&pool, ORCH).await;
    let steps = claim_steps(&pool, "w", 10).await;
    assert_eq!(steps.len(), 2);

    let recorded = step_result::fail_steps(
        &pool,
        "w",
        &[Failure { attempt: steps[0].attempt_ref(), error: "boom".into(), retryable: false }],
    )
    .await
    .unwrap();
    assert_eq!(recorded[0].state, Some(StepState::Error));

    let early = finalize::claim_task_for_finalization(&pool, task, ORCH).await.unwrap();
    assert!(!early.finalized, "a step is still running: {early:?}");
    assert!(early.detail.contains("1 in flight"), "{}", early.detail);

    step_result::complete_steps(
        &pool,
        "w",
        &[Success { attempt: steps[1].attempt_ref(), result: serde_json::json!(1) }],
    )
    .await
    .unwrap();
    let done = finalize::claim_task_for_finalization(&pool, task, ORCH).await.unwrap();
    assert!(done.finalized);
    assert_eq!(done.state, Some(TaskState::Error));
    assert_eq!(step_state(&pool, task, "c").await, StepState::Cancelled);
    assert_invariants(&pool).await;
}

/// Waits until `n` sessions wait for a lock.
async fn wait_for_lock_waiters(pool: &PgPool, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {waiting} of {n} sessions waiting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
