-- The step lifecycle's hot statements, rewritten so that their lookups stay
-- index probes whatever the planner's statistics say. Same behaviour, same
-- signatures as in 0006.
--
-- Why: `tasker bench diamond` on a fresh database (tables bulk-loaded faster
-- than autovacuum analyses them) ran at a third of its usual speed whenever the
-- planner, misled by default or stale estimates, chose a hash join fed by a
-- sequential scan of workflow_steps, once per statement or, worse, once per
-- row in a correlated subquery. auto_explain showed the plans and perf showed
-- PostgreSQL's CPU going to heap scans and hashing (docs/benchmarks.md).
--
-- The idioms:
--   - a step's dependencies are read as
--       p.step_uuid = ANY (ARRAY(SELECT from_step_uuid FROM edges WHERE to_step_uuid = ...))
--     whose only sensible plan is a primary-key probe per dependency (a join
--     between edges and steps lets the planner hash the whole steps table);
--   - batch statements carry their key array as a predicate (`= ANY (...)`),
--     so the keyed path is always on offer;
--   - per-task questions go through a LATERAL aggregate, which the planner
--     cannot turn into a hash over every matching row of the table.

-- Enqueues the steps that became runnable in tasks this orchestrator holds:
-- pending steps whose dependencies all completed, and failed steps whose retry
-- time has come. Each namespace's step channel is notified once per call.
CREATE OR REPLACE FUNCTION tasker.enqueue_ready_steps(
    p_orchestrator_id text,
    p_task_uuids      uuid[],
    p_claim_seqs      bigint[]
) RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text)
    LANGUAGE plpgsql AS $$
DECLARE
    step_ids   uuid[];
    task_ids   uuid[];
    namespaces text[];
BEGIN
    WITH held AS (
        SELECT t.task_uuid
        FROM tasker.tasks t
        JOIN unnest(p_task_uuids, p_claim_seqs) AS i(task_uuid, claim_seq)
          ON i.task_uuid = t.task_uuid AND i.claim_seq = t.claim_seq
        WHERE t.task_uuid = ANY (p_task_uuids)
          AND t.claimed_by = p_orchestrator_id
          AND t.state IN ('pending', 'steps_in_process', 'waiting_for_retry')
    ), ready AS (
        SELECT s.step_uuid, s.state AS from_state
        FROM tasker.workflow_steps s
        JOIN held h ON h.task_uuid = s.task_uuid
        WHERE (s.state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM tasker.workflow_steps p
                               WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                              FROM tasker.workflow_step_edges e
                                                              WHERE e.to_step_uuid = s.step_uuid))
                                 AND p.state <> 'complete'))
           OR (s.state = 'waiting_for_retry' AND s.next_retry_at <= now())
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE OF s
    ), enqueued AS (
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', enqueued_at = now(), next_retry_at = NULL, updated_at = now()
        FROM ready r
        WHERE s.step_uuid = r.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.namespace, s.attempts, r.from_state
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT e.step_uuid, e.task_uuid, e.attempts, e.from_state, 'enqueued',
               CASE e.from_state WHEN 'pending' THEN 'dependencies complete'
                                 ELSE format('retry %s due', e.attempts + 1) END,
               p_orchestrator_id
        FROM enqueued e
    )
    SELECT array_agg(e.step_uuid), array_agg(e.task_uuid), array_agg(e.namespace)
    INTO step_ids, task_ids, namespaces
    FROM enqueued e;

    IF step_ids IS NULL THEN
        RETURN;
    END IF;

    PERFORM pg_notify(tasker.step_channel(ns), '')
    FROM (SELECT DISTINCT ns FROM unnest(namespaces) AS ns) AS distinct_namespaces;

    RETURN QUERY SELECT * FROM unnest(task_ids, step_ids, namespaces);
END
$$;

-- Claims up to p_limit enqueued steps of one namespace (or of any namespace when
-- p_namespace is NULL) for p_worker_id, with SKIP LOCKED on the step rows. Each
-- claim starts a new attempt; the attempt number and the worker id together fence
-- every later write about it. Returns what the handler needs: its config, the
-- task context and the results of the steps it depends on.
CREATE OR REPLACE FUNCTION tasker.claim_steps(
    p_worker_id text,
    p_namespace text,
    p_limit     integer,
    p_lease     interval
) RETURNS TABLE (
    step_uuid          uuid,
    task_uuid          uuid,
    namespace          text,
    name               text,
    handler            text,
    config             jsonb,
    attempt            integer,
    max_attempts       integer,
    timeout_ms         integer,
    lease_expires_at   timestamptz,
    task_context       jsonb,
    dependency_results jsonb
)
    LANGUAGE plpgsql AS $$
DECLARE
    candidates uuid[];
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_lease IS NULL OR p_lease <= interval '0'
       OR coalesce(p_worker_id, '') = '' THEN
        RAISE EXCEPTION 'claim_steps needs a worker id, a positive limit and a positive lease'
            USING ERRCODE = '22023';
    END IF;

    -- Two spellings so each can use the claimable index as well as it allows.
    IF p_namespace IS NULL THEN
        SELECT array_agg(c.step_uuid) INTO candidates FROM (
            SELECT s.step_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'enqueued'
            ORDER BY s.priority DESC, s.enqueued_at
            LIMIT p_limit
            FOR NO KEY UPDATE SKIP LOCKED) c;
    ELSE
        SELECT array_agg(c.step_uuid) INTO candidates FROM (
            SELECT s.step_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'enqueued' AND s.namespace = p_namespace
            ORDER BY s.priority DESC, s.enqueued_at
            LIMIT p_limit
            FOR NO KEY UPDATE SKIP LOCKED) c;
    END IF;

    IF candidates IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH started AS (
        UPDATE tasker.workflow_steps s
        SET state = 'in_progress', attempts = s.attempts + 1, claimed_by = p_worker_id,
            lease_expires_at = now() + p_lease, started_at = now(), updated_at = now()
        WHERE s.step_uuid = ANY (candidates)
        RETURNING s.*
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT st.step_uuid, st.task_uuid, st.attempts, 'enqueued', 'in_progress',
               format('attempt %s of %s started', st.attempts, st.max_attempts), p_worker_id
        FROM started st
    )
    SELECT st.step_uuid, st.task_uuid, st.namespace, st.name, st.handler, st.config,
           st.attempts, st.max_attempts, st.timeout_ms, st.lease_expires_at, t.context,
           coalesce((SELECT jsonb_object_agg(p.name, p.result)
                     FROM tasker.workflow_steps p
                     WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                    FROM tasker.workflow_step_edges e
                                                    WHERE e.to_step_uuid = st.step_uuid))), '{}'::jsonb)
    FROM started st
    JOIN tasker.tasks t ON t.task_uuid = st.task_uuid;
END
$$;

-- Records successful attempts. Fenced: only the worker that claimed the attempt,
-- presenting the attempt number, while the step is still in_progress. Anything
-- else (a stale owner after its lease expired, a result after cancel) is
-- rejected and changes nothing.
--
-- In the same transaction, dependents that became runnable are enqueued (and
-- their namespaces notified once each), if their task is running normally: a
-- hop from one step to the next costs one transaction and one notification,
-- not an orchestration pass. The task is woken only when its orchestrator has
-- something to do: nothing of it is enqueued or running any more (it can be
-- finalized, or settled after a failure), or a dependent became runnable in a
-- task that is not running normally. Both are safe because the task rows are
-- locked first: a sibling's concurrent completion has either committed (and
-- is seen here) or waits for this transaction (and will see this one).
CREATE OR REPLACE FUNCTION tasker.complete_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[]
) RETURNS TABLE (step_uuid uuid, accepted boolean, dependents_enqueued integer, task_woken boolean)
    LANGUAGE plpgsql AS $$
DECLARE
    accepted_steps uuid[];
    children       uuid[];
    touched_tasks  uuid[];
    woken_tasks    uuid[];
    enqueued_steps uuid[];
    enqueued_ns    text[];
    runnable_steps uuid[];
    runnable_tasks uuid[];
BEGIN
    PERFORM tasker.lock_tasks_of_steps(p_step_uuids);

    WITH input AS (
        SELECT * FROM unnest(p_step_uuids, p_attempts, p_results) AS i(step_uuid, attempt, result)
    ), locked AS (
        SELECT s.step_uuid
        FROM tasker.workflow_steps s JOIN input i ON i.step_uuid = s.step_uuid AND i.attempt = s.attempts
        WHERE s.state = 'in_progress' AND s.claimed_by = p_worker_id
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE
    ), completed AS (
        UPDATE tasker.workflow_steps s
        SET state = 'complete', result = coalesce(i.result, 'null'::jsonb), lease_expires_at = NULL,
            completed_at = now(), updated_at = now()
        FROM input i, locked l
        WHERE s.step_uuid = i.step_uuid AND l.step_uuid = s.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.attempts
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT c.step_uuid, c.task_uuid, c.attempts, 'in_progress', 'complete',
               format('attempt %s succeeded', c.attempts), p_worker_id
        FROM completed c
    )
    SELECT array_agg(c.step_uuid), array_agg(DISTINCT c.task_uuid)
    INTO accepted_steps, touched_tasks
    FROM completed c;

    IF accepted_steps IS NULL THEN
        RETURN QUERY SELECT i.step_uuid, false, 0, false FROM unnest(p_step_uuids) AS i(step_uuid);
        RETURN;
    END IF;

    -- Dependents of the completed steps whose every dependency is now
    -- complete. Driven from the completed steps' edges: the children are
    -- collected first and looked up by key, so the planner cannot start from
    -- "all pending steps" (a hash over the whole table) when statistics lag.
    SELECT array_agg(DISTINCT e.to_step_uuid) INTO children
    FROM tasker.workflow_step_edges e
    WHERE e.from_step_uuid = ANY (accepted_steps);

    SELECT array_agg(d.step_uuid), array_agg(d.task_uuid)
    INTO runnable_steps, runnable_tasks
    FROM tasker.workflow_steps d
    WHERE d.step_uuid = ANY (children)
      AND d.state = 'pending'
      AND NOT EXISTS (SELECT 1 FROM tasker.workflow_steps p
                      WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                     FROM tasker.workflow_step_edges e
                                                     WHERE e.to_step_uuid = d.step_uuid))
                        AND p.state <> 'complete');

    -- Enqueue those of running tasks.
    WITH runnable AS MATERIALIZED (
        SELECT d.step_uuid, d.namespace
        FROM unnest(coalesce(runnable_steps, '{}')) AS r(step_uuid)
        JOIN tasker.workflow_steps d ON d.step_uuid = r.step_uuid
        JOIN tasker.tasks t ON t.task_uuid = d.task_uuid
        WHERE t.state = 'steps_in_process'
    ), locked AS (
        SELECT s.step_uuid, r.namespace
        FROM tasker.workflow_steps s JOIN runnable r ON r.step_uuid = s.step_uuid
        WHERE s.state = 'pending'
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE OF s
    ), enqueued AS (
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', enqueued_at = now(), updated_at = now()
        FROM locked l
        WHERE s.step_uuid = l.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.namespace, s.attempts
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT e.step_uuid, e.task_uuid, e.attempts, 'pending', 'enqueued', 'dependencies complete', p_worker_id
        FROM enqueued e
    )
    SELECT array_agg(e.step_uuid), array_agg(e.namespace)
    INTO enqueued_steps, enqueued_ns
    FROM enqueued e;

    IF enqueued_steps IS NOT NULL THEN
        PERFORM pg_notify(tasker.step_channel(ns), '')
        FROM (SELECT DISTINCT ns FROM unnest(enqueued_ns) AS ns) AS distinct_namespaces;
    END IF;

    -- Wake a task when its orchestrator has something to do: nothing of it is
    -- in flight, or it has runnable work the step above could not enqueue
    -- (its task is not running normally).
    -- The in-flight check reads each touched task's steps through its index
    -- (the aggregate keeps it a per-task lookup; as a plain NOT EXISTS beside
    -- the OR, the planner may hash every in-flight step of the table instead).
    SELECT array_agg(t.task_uuid) INTO woken_tasks
    FROM unnest(touched_tasks) AS t(task_uuid)
    CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress')) AS n
                        FROM tasker.workflow_steps s
                        WHERE s.task_uuid = t.task_uuid) AS in_flight
    WHERE in_flight.n = 0
       OR EXISTS (SELECT 1
                  FROM unnest(coalesce(runnable_steps, '{}'), coalesce(runnable_tasks, '{}')) AS r(step_uuid, task_uuid)
                  WHERE r.task_uuid = t.task_uuid
                    AND NOT r.step_uuid = ANY (coalesce(enqueued_steps, '{}')));
    IF woken_tasks IS NOT NULL THEN
        PERFORM tasker.wake_tasks(woken_tasks);
    END IF;

    -- Each enqueued dependent is credited to one completed parent of this call.
    RETURN QUERY
    WITH credit AS (
        SELECT c.parent, count(*)::integer AS n
        FROM (SELECT min(e.from_step_uuid::text)::uuid AS parent
              FROM unnest(coalesce(enqueued_steps, '{}')) AS d(step_uuid)
              JOIN tasker.workflow_step_edges e ON e.to_step_uuid = d.step_uuid
              WHERE e.from_step_uuid = ANY (accepted_steps)
              GROUP BY d.step_uuid) c
        GROUP BY c.parent
    )
    SELECT i.step_uuid, i.step_uuid = ANY (accepted_steps), coalesce(cr.n, 0),
           coalesce(s.task_uuid = ANY (woken_tasks), false)
    FROM unnest(p_step_uuids) AS i(step_uuid)
    LEFT JOIN credit cr ON cr.parent = i.step_uuid
    LEFT JOIN tasker.workflow_steps s ON s.step_uuid = i.step_uuid;
END
$$;

-- The due-work gauge (read every few seconds by each orchestrator's PgNotify
-- monitor) is estimated per namespace; on a namespaces table never analysed the
-- estimate exceeds jit_above_cost and each call spent 50 to 400 ms compiling
-- itself (pg_stat_statements' jit_* columns, during `tasker bench diamond`).
-- Nothing Tasker runs is long enough to gain from JIT; this is the one
-- statement whose estimate reached it.
ALTER FUNCTION tasker.due_work_by_namespace() SET jit = off;
