-- Step lifecycle: enqueueing (orchestrator), claiming, heartbeats and fenced
-- completion (worker), lease expiry (rescuer), task transitions and cancel.
-- Lock order everywhere: task rows by task_uuid, then step rows by step_uuid.

-- Enqueues the steps that became runnable in tasks this orchestrator holds:
-- pending steps whose dependencies all completed, and failed steps whose retry
-- time has come. Each namespace's step channel is notified once per call.
CREATE FUNCTION tasker.enqueue_ready_steps(
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
        WHERE t.claimed_by = p_orchestrator_id
          AND t.state IN ('pending', 'steps_in_process', 'waiting_for_retry')
    ), ready AS (
        SELECT s.step_uuid, s.state AS from_state
        FROM tasker.workflow_steps s
        JOIN held h ON h.task_uuid = s.task_uuid
        WHERE (s.state = 'pending'
               AND NOT EXISTS (SELECT 1
                               FROM tasker.workflow_step_edges e
                               JOIN tasker.workflow_steps p ON p.step_uuid = e.from_step_uuid
                               WHERE e.to_step_uuid = s.step_uuid AND p.state <> 'complete'))
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

-- Sets the retry time of failed steps that wait for one. Idempotent: a step
-- whose retry is already scheduled keeps its time.
CREATE FUNCTION tasker.schedule_step_retries(
    p_step_uuids uuid[],
    p_retry_at   timestamptz[]
) RETURNS integer
    LANGUAGE sql AS $$
    WITH scheduled AS (
        UPDATE tasker.workflow_steps s
        SET next_retry_at = i.retry_at, updated_at = now()
        FROM unnest(p_step_uuids, p_retry_at) AS i(step_uuid, retry_at)
        WHERE s.step_uuid = i.step_uuid AND s.state = 'waiting_for_retry' AND s.next_retry_at IS NULL
        RETURNING 1
    )
    SELECT count(*)::integer FROM scheduled;
$$;

-- Claims up to p_limit enqueued steps of one namespace (or of any namespace when
-- p_namespace is NULL) for p_worker_id, with SKIP LOCKED on the step rows. Each
-- claim starts a new attempt; the attempt number and the worker id together fence
-- every later write about it. Returns what the handler needs: its config, the
-- task context and the results of the steps it depends on.
CREATE FUNCTION tasker.claim_steps(
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
                     FROM tasker.workflow_step_edges e
                     JOIN tasker.workflow_steps p ON p.step_uuid = e.from_step_uuid
                     WHERE e.to_step_uuid = st.step_uuid), '{}'::jsonb)
    FROM started st
    JOIN tasker.tasks t ON t.task_uuid = st.task_uuid;
END
$$;

-- Heartbeat: extends the leases of running attempts this worker still owns.
-- A step missing from the result was cancelled or rescued: its handler's result
-- will be rejected, so the worker can stop it.
CREATE FUNCTION tasker.extend_step_leases(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_lease      interval
) RETURNS TABLE (step_uuid uuid, lease_expires_at timestamptz)
    LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(p_step_uuids, p_attempts) AS i(step_uuid, attempt)
    ), locked AS (
        SELECT s.step_uuid
        FROM tasker.workflow_steps s JOIN input i ON i.step_uuid = s.step_uuid AND i.attempt = s.attempts
        WHERE s.state = 'in_progress' AND s.claimed_by = p_worker_id
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE
    )
    UPDATE tasker.workflow_steps s
    SET lease_expires_at = now() + p_lease, updated_at = now()
    FROM locked
    WHERE s.step_uuid = locked.step_uuid
    RETURNING s.step_uuid, s.lease_expires_at;
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
CREATE FUNCTION tasker.complete_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[]
) RETURNS TABLE (step_uuid uuid, accepted boolean, dependents_enqueued integer, task_woken boolean)
    LANGUAGE plpgsql AS $$
DECLARE
    accepted_steps uuid[];
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
    -- complete. Driven from the completed steps' edges (MATERIALIZED keeps the
    -- planner from starting at "all pending steps" when statistics lag).
    WITH children AS MATERIALIZED (
        SELECT DISTINCT e.to_step_uuid AS step_uuid
        FROM tasker.workflow_step_edges e
        WHERE e.from_step_uuid = ANY (accepted_steps)
    )
    SELECT array_agg(d.step_uuid), array_agg(d.task_uuid)
    INTO runnable_steps, runnable_tasks
    FROM children c
    JOIN tasker.workflow_steps d ON d.step_uuid = c.step_uuid
    WHERE d.state = 'pending'
      AND NOT EXISTS (SELECT 1
                      FROM tasker.workflow_step_edges e2
                      JOIN tasker.workflow_steps p ON p.step_uuid = e2.from_step_uuid
                      WHERE e2.to_step_uuid = d.step_uuid AND p.state <> 'complete');

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
    SELECT array_agg(t.task_uuid) INTO woken_tasks
    FROM unnest(touched_tasks) AS t(task_uuid)
    WHERE NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s
                      WHERE s.task_uuid = t.task_uuid AND s.state IN ('enqueued', 'in_progress'))
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

-- Records failed attempts, fenced like complete_steps. A retryable failure with
-- attempts left moves the step to waiting_for_retry (the orchestrator schedules
-- the retry); anything else is a permanent failure. Accepted failures wake tasks.
CREATE FUNCTION tasker.fail_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_errors     text[],
    p_retryable  boolean[]
) RETURNS TABLE (step_uuid uuid, accepted boolean, state text)
    LANGUAGE plpgsql AS $$
DECLARE
    failed_steps  uuid[];
    failed_states text[];
    woken_tasks   uuid[];
BEGIN
    PERFORM tasker.lock_tasks_of_steps(p_step_uuids);

    WITH input AS (
        SELECT * FROM unnest(p_step_uuids, p_attempts, p_errors, p_retryable)
            AS i(step_uuid, attempt, error, retryable)
    ), locked AS (
        SELECT s.step_uuid
        FROM tasker.workflow_steps s JOIN input i ON i.step_uuid = s.step_uuid AND i.attempt = s.attempts
        WHERE s.state = 'in_progress' AND s.claimed_by = p_worker_id
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE
    ), failed AS (
        UPDATE tasker.workflow_steps s
        SET state = CASE WHEN i.retryable AND s.attempts < s.max_attempts THEN 'waiting_for_retry'
                         ELSE 'error' END,
            last_error = left(coalesce(i.error, 'unknown error'), 4000),
            next_retry_at = NULL, lease_expires_at = NULL, updated_at = now(),
            completed_at = CASE WHEN i.retryable AND s.attempts < s.max_attempts THEN NULL ELSE now() END
        FROM input i, locked l
        WHERE s.step_uuid = i.step_uuid AND l.step_uuid = s.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.attempts, s.max_attempts, s.state, i.error, i.retryable
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT f.step_uuid, f.task_uuid, f.attempts, 'in_progress', f.state,
               format('attempt %s of %s failed%s: %s', f.attempts, f.max_attempts,
                      CASE WHEN NOT f.retryable THEN ' (not retryable)' ELSE '' END,
                      left(coalesce(f.error, 'unknown error'), 500)),
               p_worker_id
        FROM failed f
    )
    SELECT array_agg(f.step_uuid), array_agg(f.state), array_agg(DISTINCT f.task_uuid)
    INTO failed_steps, failed_states, woken_tasks
    FROM failed f;

    IF woken_tasks IS NOT NULL THEN
        PERFORM tasker.wake_tasks(woken_tasks);
    END IF;

    RETURN QUERY
    SELECT i.step_uuid, r.step_uuid IS NOT NULL, r.state
    FROM unnest(p_step_uuids) AS i(step_uuid)
    LEFT JOIN unnest(failed_steps, failed_states) AS r(step_uuid, state) ON r.step_uuid = i.step_uuid;
END
$$;

-- The lease rescuer: running attempts whose lease expired (the worker died or
-- stopped heartbeating) fail as if they had failed retryably. Their tasks are
-- woken. Tasks locked by someone else are skipped this round.
CREATE FUNCTION tasker.expire_step_leases(
    p_actor text,
    p_limit integer
) RETURNS TABLE (step_uuid uuid, task_uuid uuid, state text)
    LANGUAGE plpgsql AS $$
DECLARE
    tasks_locked uuid[];
    expired_steps uuid[];
    expired_tasks uuid[];
    expired_states text[];
BEGIN
    SELECT array_agg(t.task_uuid) INTO tasks_locked FROM (
        SELECT t.task_uuid FROM tasker.tasks t
        WHERE t.task_uuid IN (
            SELECT s.task_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'in_progress' AND s.lease_expires_at < now()
            ORDER BY s.lease_expires_at
            LIMIT p_limit)
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE SKIP LOCKED) t;

    IF tasks_locked IS NULL THEN
        RETURN;
    END IF;

    WITH locked AS (
        SELECT s.step_uuid
        FROM tasker.workflow_steps s
        WHERE s.task_uuid = ANY (tasks_locked)
          AND s.state = 'in_progress' AND s.lease_expires_at < now()
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE
    ), expired AS (
        UPDATE tasker.workflow_steps s
        SET state = CASE WHEN s.attempts < s.max_attempts THEN 'waiting_for_retry' ELSE 'error' END,
            last_error = format('lease expired: worker %s stopped heartbeating during attempt %s',
                                s.claimed_by, s.attempts),
            next_retry_at = NULL, lease_expires_at = NULL, updated_at = now(),
            completed_at = CASE WHEN s.attempts < s.max_attempts THEN NULL ELSE now() END
        FROM locked l
        WHERE s.step_uuid = l.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.attempts, s.state, s.last_error
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT e.step_uuid, e.task_uuid, e.attempts, 'in_progress', e.state, e.last_error, p_actor
        FROM expired e
    )
    SELECT array_agg(e.step_uuid), array_agg(e.task_uuid), array_agg(e.state)
    INTO expired_steps, expired_tasks, expired_states
    FROM expired e;

    IF expired_steps IS NULL THEN
        RETURN;
    END IF;

    PERFORM tasker.wake_tasks(expired_tasks);
    RETURN QUERY SELECT * FROM unnest(expired_steps, expired_tasks, expired_states);
END
$$;

-- Applies task state transitions decided by an orchestrator that holds the
-- claims: compare-and-set on (state, claim) plus one history row each. Returns
-- the tasks that moved; the others had changed meanwhile (e.g. cancelled).
CREATE FUNCTION tasker.transition_tasks(
    p_orchestrator_id text,
    p_task_uuids      uuid[],
    p_claim_seqs      bigint[],
    p_from_states     text[],
    p_to_states       text[],
    p_reasons         text[]
) RETURNS TABLE (task_uuid uuid)
    LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(p_task_uuids, p_claim_seqs, p_from_states, p_to_states, p_reasons)
            AS i(task_uuid, claim_seq, from_state, to_state, reason)
    ), locked AS (
        SELECT t.task_uuid
        FROM tasker.tasks t
        JOIN input i ON i.task_uuid = t.task_uuid AND i.claim_seq = t.claim_seq AND i.from_state = t.state
        WHERE t.claimed_by = p_orchestrator_id
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE
    ), moved AS (
        UPDATE tasker.tasks t
        SET state = i.to_state, updated_at = now()
        FROM input i, locked l
        WHERE t.task_uuid = i.task_uuid AND l.task_uuid = t.task_uuid
        RETURNING t.task_uuid, i.from_state, i.to_state, i.reason
    ), history AS (
        INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
        SELECT m.task_uuid, m.from_state, m.to_state, m.reason, p_orchestrator_id FROM moved m
    )
    SELECT m.task_uuid FROM moved m;
$$;

-- Cancels a task and every step that has not finished. A running handler's
-- later result is rejected by the completion fence (the step is no longer
-- in_progress). Returns whether this call cancelled it and the task's state.
CREATE FUNCTION tasker.cancel_task(
    p_task_uuid uuid,
    p_actor     text,
    p_reason    text
) RETURNS TABLE (cancelled boolean, state text, steps_cancelled integer)
    LANGUAGE plpgsql AS $$
DECLARE
    task    tasker.tasks%ROWTYPE;
    n_steps integer;
BEGIN
    SELECT * INTO task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF task.completed_at IS NOT NULL THEN
        RETURN QUERY SELECT false, task.state, 0;
        RETURN;
    END IF;

    WITH locked AS (
        SELECT s.step_uuid, s.state AS from_state
        FROM tasker.workflow_steps s
        WHERE s.task_uuid = p_task_uuid AND s.state NOT IN ('complete', 'error', 'cancelled')
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE
    ), stopped AS (
        UPDATE tasker.workflow_steps s
        SET state = 'cancelled', next_retry_at = NULL, lease_expires_at = NULL,
            completed_at = now(), updated_at = now()
        FROM locked l
        WHERE s.step_uuid = l.step_uuid
        RETURNING s.step_uuid, s.attempts, l.from_state
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT st.step_uuid, p_task_uuid, st.attempts, st.from_state, 'cancelled', p_reason, p_actor
        FROM stopped st
    )
    SELECT count(*) INTO n_steps FROM stopped;

    UPDATE tasker.tasks t
    SET state = 'cancelled', completed_at = now(), ready_at = NULL, ready_since = NULL,
        claimed_by = NULL, claim_expires_at = NULL, updated_at = now()
    WHERE t.task_uuid = p_task_uuid;

    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
    VALUES (p_task_uuid, task.state, 'cancelled', p_reason, p_actor);

    RETURN QUERY SELECT true, 'cancelled'::text, n_steps;
END
$$;
