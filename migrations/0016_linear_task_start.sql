-- Starting a batch of submitted tasks in time linear in the batch.
--
-- `start_tasks` moved each task with an enqueued root to steps_in_process
-- through `t.task_uuid IN (SELECT e.task_uuid FROM enqueued e)`, which the
-- planner (a CTE is estimated at one row) ran as a nested loop over the
-- enqueued steps for every task: 499,500 comparisons for a batch of 1,000
-- tasks (auto_explain over `tasker bench diamond`'s submission: 170 ms per
-- 1,000-task call, most of it there). The enqueued tasks are a subset of
-- the locked ones, so they are updated by key instead: an index condition
-- on the array of their keys.

CREATE OR REPLACE FUNCTION tasker.start_tasks(
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
        WHERE t.task_uuid = ANY (ARRAY(SELECT e.task_uuid FROM enqueued e))
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

-- CREATE OR REPLACE resets a function's settings (see 0011 and 0014).
ALTER FUNCTION tasker.start_tasks(uuid[], text)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
