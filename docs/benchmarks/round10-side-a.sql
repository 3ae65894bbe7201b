-- Round 10's bench-functions side A: the definitions before 0019 and 0020
-- (0017's install_state_guards() and 0018's five-argument complete_steps),
-- restored with their settings. Side B is migrations/0019_*.sql and 0020_*.sql.

CREATE OR REPLACE FUNCTION tasker.install_state_guards() RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    guard record;
    edges text;
BEGIN
    FOR guard IN SELECT * FROM (VALUES
        ('task', 'tasks', 'tasks_state_guard', 'task_state_machine'),
        ('step', 'workflow_steps', 'workflow_steps_state_guard', 'step_state_machine'))
        AS g(machine, rel, trigger_name, machine_table)
    LOOP
        EXECUTE format(
            'SELECT string_agg(format(''(%%L, %%L)'', m.from_state, m.to_state), '', ''
                               ORDER BY m.from_state, m.to_state)
             FROM (SELECT DISTINCT from_state, to_state FROM tasker.%I) AS m', guard.machine_table)
        INTO edges;
        IF edges IS NULL THEN
            RAISE EXCEPTION 'tasker.% is empty: refusing to install a guard that rejects every transition',
                guard.machine_table;
        END IF;
        -- CREATE OR REPLACE (not DROP and CREATE) locks the table against
        -- writes only, not reads, while the migration's transaction lasts.
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I BEFORE UPDATE OF state ON tasker.%I
                 FOR EACH ROW
                 WHEN (OLD.state IS DISTINCT FROM NEW.state AND (OLD.state, NEW.state) NOT IN (%s))
                 EXECUTE FUNCTION tasker.guard_state(%L)',
            guard.trigger_name, guard.rel, edges, guard.machine);
    END LOOP;
END
$$;

SELECT tasker.install_state_guards();
CREATE OR REPLACE FUNCTION tasker.complete_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[],
    p_announce   boolean
) RETURNS TABLE (
    step_uuid           uuid,
    accepted            boolean,
    enqueued_dependents uuid[],
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
    finishable_size integer[];
    finalized_tasks uuid[];
    refused_tasks   uuid[];
    enqueued_steps  uuid[];
    enqueued_ns     text[];
    runnable_steps  uuid[];
    runnable_tasks  uuid[];
BEGIN
    PERFORM tasker.lock_tasks_of_steps(p_step_uuids);

    -- The attempt's state is checked on the locked row, outside the probe
    -- (OFFSET 0 keeps it there): inside, `state = 'in_progress'` would let
    -- the planner walk the partial index of running steps, filtering on the
    -- key, for every input. Each result is found by its position in the
    -- input (a linear search per row, at most 256 rows a call) rather than
    -- by joining the input, which would bring back the join choice.
    WITH locked AS (
        SELECT l.step_uuid
        FROM (SELECT i.step_uuid, i.attempt
              FROM unnest(p_step_uuids, p_attempts) AS i(step_uuid, attempt)
              ORDER BY i.step_uuid) AS o
        CROSS JOIN LATERAL (
            SELECT s.step_uuid, s.state
            FROM tasker.workflow_steps s
            WHERE s.step_uuid = o.step_uuid AND s.attempts = o.attempt AND s.claimed_by = p_worker_id
            FOR NO KEY UPDATE
            OFFSET 0) AS l
        WHERE l.state = 'in_progress'
    ), completed AS (
        UPDATE tasker.workflow_steps s
        SET state = 'complete',
            result = coalesce(p_results[array_position(p_step_uuids, s.step_uuid)], 'null'::jsonb),
            lease_expires_at = NULL, completed_at = now(), updated_at = now()
        WHERE s.step_uuid = ANY (ARRAY(SELECT l.step_uuid FROM locked l))
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
        RETURN QUERY SELECT i.step_uuid, false, '{}'::uuid[], false, false, NULL::timestamptz
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

    -- Enqueue those of running tasks, locking them in key order.
    WITH locked AS (
        SELECT l.step_uuid
        FROM (SELECT u AS step_uuid FROM unnest(coalesce(runnable_steps, '{}')) AS u ORDER BY u) AS o
        CROSS JOIN LATERAL (
            SELECT s.step_uuid
            FROM tasker.workflow_steps s
            WHERE s.step_uuid = o.step_uuid
              AND s.state = 'pending'
              AND (SELECT t.state FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid) = 'steps_in_process'
            FOR NO KEY UPDATE OF s) AS l
    ), enqueued AS (
        UPDATE tasker.workflow_steps s
        SET state = 'enqueued', enqueued_at = now(), updated_at = now()
        WHERE s.step_uuid = ANY (ARRAY(SELECT l.step_uuid FROM locked l))
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

    -- Without p_announce the caller announces what it leaves enqueued
    -- (announce_enqueued), after claiming what it has room for.
    IF enqueued_steps IS NOT NULL AND p_announce THEN
        PERFORM pg_notify(tasker.step_channel(ns), '')
        FROM (SELECT DISTINCT ns FROM unnest(enqueued_ns) AS ns) AS distinct_namespaces;
    END IF;

    -- Per touched task, through its index (a LATERAL aggregate, see 0009):
    -- finishable (running, every step complete), or in need of its
    -- orchestrator (nothing in flight, or runnable work the statement above
    -- could not enqueue because the task is not running normally).
    SELECT array_agg(c.task_uuid) FILTER (WHERE c.finishable),
           array_agg(c.total) FILTER (WHERE c.finishable),
           array_agg(c.task_uuid) FILTER (WHERE NOT c.finishable AND c.needs_orchestrator)
    INTO finishable, finishable_size, woken_tasks
    FROM (SELECT t.task_uuid,
                 (SELECT tk.state FROM tasker.tasks tk WHERE tk.task_uuid = t.task_uuid) = 'steps_in_process'
                     AND n.complete = n.total AS finishable,
                 n.total,
                 n.in_flight = 0
                 OR EXISTS (SELECT 1
                            FROM unnest(coalesce(runnable_steps, '{}'), coalesce(runnable_tasks, '{}'))
                                 AS r(step_uuid, task_uuid)
                            WHERE r.task_uuid = t.task_uuid
                              AND NOT r.step_uuid = ANY (coalesce(enqueued_steps, '{}'))) AS needs_orchestrator
          FROM unnest(touched_tasks) AS t(task_uuid)
          CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress')) AS in_flight,
                                     count(*) FILTER (WHERE s.state = 'complete') AS complete,
                                     count(*) AS total
                              FROM tasker.workflow_steps s
                              WHERE s.task_uuid = t.task_uuid) AS n) AS c;

    -- Every step of these tasks is complete and their rows have been locked
    -- since the start (lock_tasks_of_steps), so no step of theirs can change:
    -- finalize them all in one statement, on claim_task_for_finalization's
    -- terms (never a task another orchestrator's unexpired claim holds; that
    -- one is woken instead, for its holder).
    IF finishable IS NOT NULL THEN
        WITH finished AS (
            UPDATE tasker.tasks t
            SET state = 'complete', completed_at = now(), ready_at = NULL, ready_since = NULL,
                claimed_by = NULL, claim_expires_at = NULL, updated_at = now()
            WHERE t.task_uuid = ANY (finishable)
              AND t.completed_at IS NULL
              AND (t.claimed_by IS NULL OR t.claimed_by = p_worker_id OR t.claim_expires_at <= now())
            RETURNING t.task_uuid, finishable_size[array_position(finishable, t.task_uuid)] AS size
        ), history AS (
            INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
            SELECT fi.task_uuid, 'steps_in_process', 'complete', format('all %s steps complete', fi.size), p_worker_id
            FROM finished fi
        )
        SELECT array_agg(fi.task_uuid) INTO finalized_tasks FROM finished fi;

        refused_tasks := ARRAY(SELECT u FROM unnest(finishable) AS u
                               WHERE NOT u = ANY (coalesce(finalized_tasks, '{}')));
        IF cardinality(refused_tasks) > 0 THEN
            woken_tasks := array_cat(woken_tasks, refused_tasks);
        END IF;
    END IF;

    IF woken_tasks IS NOT NULL THEN
        PERFORM tasker.wake_tasks(woken_tasks);
    END IF;

    -- Each enqueued dependent is credited to one completed parent of this call.
    RETURN QUERY
    WITH credit AS (
        SELECT c.parent, array_agg(c.step_uuid) AS steps
        FROM (SELECT d.step_uuid,
                     (SELECT min(e.from_step_uuid::text)::uuid
                      FROM tasker.workflow_step_edges e
                      WHERE e.to_step_uuid = d.step_uuid
                        AND e.from_step_uuid = ANY (accepted_steps)) AS parent
              FROM unnest(coalesce(enqueued_steps, '{}')) AS d(step_uuid)) c
        GROUP BY c.parent
    ), outcome AS MATERIALIZED (
        SELECT i.step_uuid,
               (SELECT s.task_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = i.step_uuid) AS task_uuid
        FROM unnest(p_step_uuids) AS i(step_uuid)
    )
    SELECT o.step_uuid, o.step_uuid = ANY (accepted_steps), coalesce(cr.steps, '{}'),
           coalesce(o.task_uuid = ANY (woken_tasks), false),
           coalesce(o.task_uuid = ANY (finalized_tasks), false),
           CASE WHEN o.task_uuid = ANY (finalized_tasks)
                THEN (SELECT t.created_at FROM tasker.tasks t WHERE t.task_uuid = o.task_uuid) END
    FROM outcome o
    LEFT JOIN credit cr ON cr.parent = o.step_uuid;
END
$$;

ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[], boolean)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
