-- The common path of a task without an orchestration pass at either end, and
-- PG_NOTIFY miss detection on the step channels that path relies on.
--
-- Why: `tasker bench latency` showed two of a four-step task's six hand-offs
-- going through an orchestrator: submission to the first step enqueued
-- (6.8 ms at p50: the submission's commit and NOTIFY, a claim transaction, a
-- pass) and the last result to the task final (3.2 ms). A one-step task
-- needed two orchestration passes for one step of work. Now:
--
--   - the submitting transaction starts what it creates (`start_tasks`): it
--     enqueues the root steps and moves the task to steps_in_process, the same
--     writes an orchestrator's first pass makes;
--   - the completion that finishes a task's last step finalizes it, through
--     `claim_task_for_finalization` like any orchestrator (so it still never
--     finalizes a task another orchestrator holds; that task is woken instead).
--
-- Orchestrators keep everything else (retries, failures, rescues, timers) and
-- remain the safety net: a task the fast paths leave alone stays due.
--
-- A task's first notification is then on its namespace's step channel, not
-- the task channel, so misses are detected there too: every step claim made by
-- a poll or sweep is logged with how long the step had waited since it was
-- enqueued (`step_discoveries`), as task claims are (`task_discoveries`).

CREATE TABLE tasker.step_discoveries (
    step_uuid      uuid NOT NULL REFERENCES tasker.workflow_steps (step_uuid) ON DELETE CASCADE,
    attempt        integer NOT NULL,
    claimed_by     text NOT NULL,
    discovered_via text NOT NULL CONSTRAINT discovered_via_known CHECK (discovered_via IN ('poll', 'sweep', 'timer')),
    enqueued_at    timestamptz,
    claimed_at     timestamptz NOT NULL,
    PRIMARY KEY (step_uuid, attempt)
);
CREATE INDEX step_discoveries_claimed_idx ON tasker.step_discoveries (claimed_at);

-- Starts tasks that were just created and nobody holds: enqueues their root
-- steps (those without dependencies), moves each task to steps_in_process and
-- clears its due time, with the history an orchestrator's first pass writes.
-- Each namespace's step channel is notified once. A task with nothing to
-- enqueue is left pending and due, for an orchestrator.
CREATE FUNCTION tasker.start_tasks(
    p_task_uuids uuid[],
    p_actor      text
) RETURNS TABLE (task_uuid uuid, step_uuid uuid, namespace text)
    LANGUAGE plpgsql AS $$
DECLARE
    step_ids   uuid[];
    task_ids   uuid[];
    namespaces text[];
BEGIN
    WITH locked AS (
        SELECT t.task_uuid
        FROM tasker.tasks t
        WHERE t.task_uuid = ANY (p_task_uuids) AND t.state = 'pending' AND t.claimed_by IS NULL
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE
    ), roots AS (
        SELECT s.step_uuid
        FROM tasker.workflow_steps s
        JOIN locked l ON l.task_uuid = s.task_uuid
        WHERE s.task_uuid = ANY (p_task_uuids)
          AND s.state = 'pending'
          AND NOT EXISTS (SELECT 1 FROM tasker.workflow_step_edges e WHERE e.to_step_uuid = s.step_uuid)
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE OF s
    ), enqueued AS (
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', enqueued_at = now(), updated_at = now()
        FROM roots r
        WHERE s.step_uuid = r.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.namespace, s.attempts
    ), step_history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT e.step_uuid, e.task_uuid, e.attempts, 'pending', 'enqueued', 'dependencies complete', p_actor
        FROM enqueued e
    ), started AS (
        UPDATE tasker.tasks t
        SET state = 'steps_in_process', ready_at = NULL, ready_since = NULL, updated_at = now()
        FROM locked l
        WHERE t.task_uuid = l.task_uuid
          AND t.task_uuid IN (SELECT e.task_uuid FROM enqueued e)
        RETURNING t.task_uuid
    ), task_history AS (
        INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
        SELECT st.task_uuid, 'pending', 'steps_in_process', 'first steps enqueued', p_actor
        FROM started st
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
-- task context and the results of the steps it depends on; and, for the
-- PG_NOTIFY monitor, when each step was enqueued and when it was claimed.
-- Claims not made because of a notification (p_discovered_via poll, sweep or
-- timer) are logged in step_discoveries.
DROP FUNCTION tasker.claim_steps(text, text, integer, interval);
CREATE FUNCTION tasker.claim_steps(
    p_worker_id      text,
    p_namespace      text,
    p_limit          integer,
    p_lease          interval,
    p_discovered_via text DEFAULT 'event'
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
    dependency_results jsonb,
    enqueued_at        timestamptz,
    claimed_at         timestamptz
)
    LANGUAGE plpgsql AS $$
DECLARE
    candidates uuid[];
BEGIN
    IF p_discovered_via IS NULL OR p_discovered_via NOT IN ('event', 'poll', 'sweep', 'timer') THEN
        RAISE EXCEPTION 'discovered_via must be event, poll, sweep or timer, not %', coalesce(p_discovered_via, 'NULL')
            USING ERRCODE = '22023';
    END IF;
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
    ), logged AS (
        INSERT INTO tasker.step_discoveries
            (step_uuid, attempt, claimed_by, discovered_via, enqueued_at, claimed_at)
        SELECT st.step_uuid, st.attempts, p_worker_id, p_discovered_via, st.enqueued_at, now()
        FROM started st
        WHERE p_discovered_via <> 'event'
    )
    SELECT st.step_uuid, st.task_uuid, st.namespace, st.name, st.handler, st.config,
           st.attempts, st.max_attempts, st.timeout_ms, st.lease_expires_at, t.context,
           coalesce((SELECT jsonb_object_agg(p.name, p.result)
                     FROM tasker.workflow_steps p
                     WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                    FROM tasker.workflow_step_edges e
                                                    WHERE e.to_step_uuid = st.step_uuid))), '{}'::jsonb),
           st.enqueued_at, now()
    FROM started st
    JOIN tasker.tasks t ON t.task_uuid = st.task_uuid;
END
$$;

-- Records successful attempts. Fenced: only the worker that claimed the attempt,
-- presenting the attempt number, while the step is still in_progress. Anything
-- else (a stale owner after its lease expired, a result after cancel) is
-- rejected and changes nothing.
--
-- In the same transaction:
--   - dependents that became runnable are enqueued (and their namespaces
--     notified once each), if their task is running normally: a hop from one
--     step to the next costs one transaction and one notification, not an
--     orchestration pass;
--   - a running task whose every step is now complete is finalized, through
--     claim_task_for_finalization (which refuses while another orchestrator
--     holds the task: it is woken instead);
--   - a task is woken when its orchestrator has something to do: nothing of
--     it is enqueued or running any more and it was not finalized here (it
--     can be settled after a failure), or a dependent became runnable in a
--     task that is not running normally.
-- All of it is safe because the task rows are locked first: a sibling's
-- concurrent completion has either committed (and is seen here) or waits for
-- this transaction (and will see this one).
DROP FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[]);
CREATE FUNCTION tasker.complete_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[]
) RETURNS TABLE (
    step_uuid           uuid,
    accepted            boolean,
    dependents_enqueued integer,
    task_woken          boolean,
    task_finalized      boolean,
    task_created_at     timestamptz
)
    LANGUAGE plpgsql AS $$
DECLARE
    accepted_steps  uuid[];
    children        uuid[];
    touched_tasks   uuid[];
    woken_tasks     uuid[];
    finishable      uuid[];
    finalized_tasks uuid[];
    refused_tasks   uuid[];
    enqueued_steps  uuid[];
    enqueued_ns     text[];
    runnable_steps  uuid[];
    runnable_tasks  uuid[];
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
        RETURN QUERY SELECT i.step_uuid, false, 0, false, false, NULL::timestamptz
                     FROM unnest(p_step_uuids) AS i(step_uuid);
        RETURN;
    END IF;

    -- Dependents of the completed steps whose every dependency is now
    -- complete, looked up by key (see 0009).
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

    -- Per touched task, through its index (a LATERAL aggregate, see 0009):
    -- finishable (running, every step complete), or in need of its
    -- orchestrator (nothing in flight, or runnable work the statement above
    -- could not enqueue because the task is not running normally).
    SELECT array_agg(c.task_uuid) FILTER (WHERE c.finishable),
           array_agg(c.task_uuid) FILTER (WHERE NOT c.finishable AND c.needs_orchestrator)
    INTO finishable, woken_tasks
    FROM (SELECT t.task_uuid,
                 tk.state = 'steps_in_process' AND n.complete = n.total AS finishable,
                 n.in_flight = 0
                 OR EXISTS (SELECT 1
                            FROM unnest(coalesce(runnable_steps, '{}'), coalesce(runnable_tasks, '{}'))
                                 AS r(step_uuid, task_uuid)
                            WHERE r.task_uuid = t.task_uuid
                              AND NOT r.step_uuid = ANY (coalesce(enqueued_steps, '{}'))) AS needs_orchestrator
          FROM unnest(touched_tasks) AS t(task_uuid)
          JOIN tasker.tasks tk ON tk.task_uuid = t.task_uuid
          CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress')) AS in_flight,
                                     count(*) FILTER (WHERE s.state = 'complete') AS complete,
                                     count(*) AS total
                              FROM tasker.workflow_steps s
                              WHERE s.task_uuid = t.task_uuid) AS n) AS c;

    IF finishable IS NOT NULL THEN
        SELECT array_agg(f.task_uuid) FILTER (WHERE f.finalized),
               array_agg(f.task_uuid) FILTER (WHERE NOT f.finalized)
        INTO finalized_tasks, refused_tasks
        FROM (SELECT u FROM unnest(finishable) AS u ORDER BY u) AS i,
             LATERAL tasker.claim_task_for_finalization(i.u, p_worker_id) AS f;
        woken_tasks := array_cat(woken_tasks, refused_tasks);
    END IF;

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
           coalesce(s.task_uuid = ANY (woken_tasks), false),
           coalesce(s.task_uuid = ANY (finalized_tasks), false),
           CASE WHEN s.task_uuid = ANY (finalized_tasks) THEN t.created_at END
    FROM unnest(p_step_uuids) AS i(step_uuid)
    LEFT JOIN credit cr ON cr.parent = i.step_uuid
    LEFT JOIN tasker.workflow_steps s ON s.step_uuid = i.step_uuid
    LEFT JOIN tasker.tasks t ON t.task_uuid = s.task_uuid;
END
$$;
