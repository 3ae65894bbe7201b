-- A submission in one statement, and so in one round trip after its
-- template is known.
--
-- The API created tasks in a transaction of five round trips: BEGIN, the
-- template, the insert of tasks, steps, edges and history, start_tasks, and
-- COMMIT. Since Round 22 a worker's hop is one statement; the submission was
-- the longest segment of a `latency` task (4.1 to 5.9 ms from the
-- submitting transaction's start to its first step enqueued, on a machine
-- where a hop took 2.4 ms).
--
-- create_tasks() is that insert and start: it inserts the tasks (a request
-- whose idempotency key is taken inserts nothing), their steps, edges and
-- creation history, then, with p_start, starts the tasks it inserted (their
-- root steps enqueued, their namespaces' step channels notified, the tasks
-- in steps_in_process), and notifies the task channel when it leaves a task
-- it inserted for an orchestrator. Sent alone it is one transaction: all of
-- a batch or none of it. It answers one row per task it inserted (created,
-- with the steps it enqueued) and one per idempotency key of a request that
-- inserted nothing (not created, with the state of the task that holds the
-- key, which it can read because it is a later statement than the insert;
-- if that task was deleted meanwhile, the call fails whole with 40001).
--
-- Its start is start_tasks() without what only tasks created earlier need:
-- no other transaction can see these tasks, so it locks nothing first, and
-- their roots are the steps no edge in the call points to. Counted with
-- `scripts/bench-instructions --submit` (the template read included), a
-- four-step chain's submission cost the server 3,048,119 instructions as
-- five statements and 2,862,990 as two (-6.1%; -3.1% at 32 tasks a call,
-- 1,463,826 -> 1,418,608); calling start_tasks() from here instead cost
-- 3,138,914.
--
-- The template is still read first, by its own statement: the caller turns
-- its step definitions into these rows.

CREATE FUNCTION tasker.create_tasks(
    p_actor            text,
    p_start            boolean,
    p_task_uuids       uuid[],
    p_template_ids     bigint[],
    p_namespaces       text[],
    p_priorities       int[],
    p_contexts         jsonb[],
    p_idempotency_keys text[],
    p_step_uuids       uuid[],
    p_step_task_uuids  uuid[],
    p_step_names       text[],
    p_step_handlers    text[],
    p_step_namespaces  text[],
    p_step_priorities  int[],
    p_step_configs     jsonb[],
    p_step_max_attempts int[],
    p_step_backoff_ms  int[],
    p_step_timeout_ms  int[],
    p_edge_task_uuids  uuid[],
    p_edge_to          uuid[],
    p_edge_from        uuid[]
) RETURNS TABLE (
    task_uuid       uuid,
    created         boolean,
    state           text,
    steps_enqueued  int,
    namespace       text,
    idempotency_key text
)
    LANGUAGE plpgsql AS $$
DECLARE
    inserted   uuid[];
    started    uuid[] := '{}';
    namespaces text[];
    answered   bigint;
    taken_namespaces text[];
    taken_keys       text[];
BEGIN
    WITH new_tasks AS (
        INSERT INTO tasker.tasks (task_uuid, template_id, namespace, priority, context,
                                  idempotency_key, ready_at, ready_since)
        SELECT t.*, now(), now()
        FROM unnest(p_task_uuids, p_template_ids, p_namespaces, p_priorities, p_contexts, p_idempotency_keys) AS t
        ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING
        RETURNING tasks.task_uuid
    ), new_steps AS (
        INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace, priority,
                                           config, max_attempts, backoff_ms, timeout_ms)
        SELECT s.*
        FROM unnest(p_step_uuids, p_step_task_uuids, p_step_names, p_step_handlers, p_step_namespaces,
                    p_step_priorities, p_step_configs, p_step_max_attempts, p_step_backoff_ms,
                    p_step_timeout_ms)
             AS s(step_uuid, task_uuid, name, handler, namespace, priority, config,
                  max_attempts, backoff_ms, timeout_ms)
        WHERE s.task_uuid IN (SELECT n.task_uuid FROM new_tasks n)
    ), new_edges AS (
        INSERT INTO tasker.workflow_step_edges (to_step_uuid, from_step_uuid)
        SELECT e.to_step, e.from_step
        FROM unnest(p_edge_task_uuids, p_edge_to, p_edge_from) AS e(task_uuid, to_step, from_step)
        WHERE e.task_uuid IN (SELECT n.task_uuid FROM new_tasks n)
    ), history AS (
        INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
        SELECT n.task_uuid, NULL, 'pending', 'created', p_actor FROM new_tasks n
    )
    SELECT ARRAY(SELECT n.task_uuid FROM new_tasks n) INTO inserted;

    -- The start (see above): the roots of the tasks this call inserted.
    IF p_start AND cardinality(inserted) > 0 THEN
        WITH enqueued AS (
            UPDATE tasker.workflow_steps s
            SET state = 'enqueued', enqueued_at = now(), updated_at = now()
            WHERE s.step_uuid = ANY (ARRAY(SELECT unnest(p_step_uuids) EXCEPT SELECT unnest(p_edge_to)))
              AND s.task_uuid = ANY (inserted)
              AND s.state = 'pending'
            RETURNING s.step_uuid, s.task_uuid, s.namespace, s.attempts
        ), step_history AS (
            INSERT INTO tasker.workflow_step_transitions
                (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
            SELECT e.step_uuid, e.task_uuid, e.attempts, 'pending', 'enqueued', 'dependencies complete', p_actor
            FROM enqueued e
        ), moved AS (
            UPDATE tasker.tasks t
            SET state = 'steps_in_process', ready_at = NULL, ready_since = NULL, updated_at = now()
            WHERE t.task_uuid = ANY (ARRAY(SELECT DISTINCT e.task_uuid FROM enqueued e)) AND t.state = 'pending'
            RETURNING t.task_uuid
        ), task_history AS (
            INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
            SELECT m.task_uuid, 'pending', 'steps_in_process', 'first steps enqueued', p_actor
            FROM moved m
        )
        SELECT ARRAY(SELECT e.task_uuid FROM enqueued e), ARRAY(SELECT DISTINCT e.namespace FROM enqueued e)
        INTO started, namespaces;

        PERFORM pg_notify(tasker.step_channel(ns), '') FROM unnest(namespaces) AS ns;
    END IF;
    RETURN QUERY
    SELECT s.task_uuid, true, 'steps_in_process'::text, count(*)::int, NULL::text, NULL::text
    FROM unnest(started) AS s(task_uuid)
    GROUP BY s.task_uuid;
    GET DIAGNOSTICS answered = ROW_COUNT;
    -- Those it did not start are due for an orchestrator.
    IF answered < cardinality(inserted) THEN
        RETURN QUERY
        SELECT i.task_uuid, true, 'pending'::text, 0, NULL::text, NULL::text
        FROM (SELECT unnest(inserted) EXCEPT SELECT unnest(started)) AS i(task_uuid);
        PERFORM pg_notify(tasker.task_channel(), '');
    END IF;

    -- A request inserts nothing only when its key is taken. The task that
    -- holds it may be deleted (retention) between the insert and this read;
    -- the call then fails whole, as a serialization failure the caller may
    -- retry, rather than commit a batch it cannot answer for.
    IF cardinality(inserted) < cardinality(p_task_uuids) THEN
        SELECT array_agg(k.namespace), array_agg(k.idempotency_key) INTO taken_namespaces, taken_keys
        FROM (SELECT DISTINCT r.namespace, r.idempotency_key
              FROM unnest(p_task_uuids, p_namespaces, p_idempotency_keys) AS r(task_uuid, namespace, idempotency_key)
              WHERE r.task_uuid <> ALL (inserted)) AS k;
        RETURN QUERY
        SELECT t.task_uuid, false, t.state, 0, t.namespace, t.idempotency_key
        FROM unnest(taken_namespaces, taken_keys) AS k(namespace, idempotency_key)
        JOIN tasker.tasks t ON t.namespace = k.namespace AND t.idempotency_key = k.idempotency_key;
        GET DIAGNOSTICS answered = ROW_COUNT;
        IF answered < cardinality(taken_keys) THEN
            RAISE EXCEPTION 'a task holding an idempotency key of this submission was deleted while it ran; '
                            'nothing was written'
                USING ERRCODE = '40001';
        END IF;
    END IF;
END
$$;
-- As the other hot functions (0011, 0014, 0029): one plan for every call,
-- and key probes however few rows the tables held when it was made.
ALTER FUNCTION tasker.create_tasks(text, boolean, uuid[], bigint[], text[], int[], jsonb[], text[], uuid[], uuid[],
                                   text[], text[], text[], int[], jsonb[], int[], int[], int[], uuid[], uuid[], uuid[])
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off;
