-- Finalizing in one statement what a completion batch finishes.
--
-- `pg_stat_statements` (track = all) over `tasker bench single` put 65% of
-- `complete_steps`' time in finalization: one call of
-- `claim_task_for_finalization` per finished task, each locking and counting
-- the task's steps again and updating the task by itself. Here every step of
-- a finishable task is already known complete and the task row has been
-- locked since the call began, so the batch's tasks are finalized by one
-- UPDATE and one INSERT of their history, on the same terms as
-- `claim_task_for_finalization` (which orchestrators still use).

CREATE OR REPLACE FUNCTION tasker.complete_steps(
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
    finishable_size integer[];
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
           array_agg(c.total) FILTER (WHERE c.finishable),
           array_agg(c.task_uuid) FILTER (WHERE NOT c.finishable AND c.needs_orchestrator)
    INTO finishable, finishable_size, woken_tasks
    FROM (SELECT t.task_uuid,
                 tk.state = 'steps_in_process' AND n.complete = n.total AS finishable,
                 n.total,
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
            FROM unnest(finishable, finishable_size) AS f(task_uuid, size)
            WHERE t.task_uuid = f.task_uuid
              AND t.completed_at IS NULL
              AND (t.claimed_by IS NULL OR t.claimed_by = p_worker_id OR t.claim_expires_at <= now())
            RETURNING t.task_uuid, f.size
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

ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[]) SET plan_cache_mode = force_generic_plan;
