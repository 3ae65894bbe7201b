-- A completion reads each row it needs once.
--
-- complete_steps found its runnable dependents with one statement and then
-- probed them again, by key, in the statement that locks and enqueues them;
-- and it ended with a statement that looked every input step up again (for
-- its task), every enqueued dependent's edges again (for the parent to
-- credit it to), and every finalized task again (for its submission time).
-- During a drain no key probe of a step is cheap: each step has been updated
-- two or three times without HOT (its state is in the claimable and running
-- indexes' predicates), so a probe visits several row versions. Under
-- `tasker bench diamond` with pg_stat_statements.track = all, the last
-- statement took 47 us and the runnable lookup 10 us of the function's
-- 273 us per step.
--
-- Now the runnable dependents are found, locked in key order and enqueued
-- (those of running tasks) in one statement, and the answer is computed from
-- what the statements already returned: the completing UPDATE returns each
-- accepted step's task, the lookup of dependents keeps the edges it reads,
-- and the finalizing UPDATE returns the task's submission time.
--
-- Fixed on the way: when a step appeared twice in one call (a stale
-- attempt's outcome beside the current one's), the result stored was the
-- first occurrence's, possibly the stale attempt's, and both inputs were
-- answered as accepted. The result is now the accepted input's, and only
-- that input is answered as accepted.
--
-- Two other differences, neither seen by callers: runnable dependents of a
-- task that is not running are locked too (its row is already locked, by
-- lock_tasks_of_steps), and an outcome the fence rejected reports its task
-- as neither woken nor finalized (it was reported so when an accepted step
-- of the same task woke or finalized it; callers read those fields of
-- accepted outcomes only).

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
    accepted_attempts integer[];
    accepted_tasks  uuid[];
    edge_children   uuid[];
    edge_parents    uuid[];
    children        uuid[];
    touched_tasks   uuid[];
    woken_tasks     uuid[];
    finishable      uuid[];
    finishable_size integer[];
    finalized_tasks uuid[];
    finalized_since timestamptz[];
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
    --
    -- A step can appear twice in one call (a stale attempt's outcome beside
    -- the current one's, from a worker that lost the step's lease and then
    -- claimed it again): the result stored is the accepted input's, found by
    -- its position among the locked inputs (both arrays are read from the
    -- same materialized rows, in the same order), not by the step's first
    -- occurrence in the input.
    WITH locked AS (
        SELECT l.step_uuid, o.n
        FROM (SELECT i.step_uuid, i.attempt, i.n
              FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
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
            result = coalesce(p_results[(ARRAY(SELECT l.n::integer FROM locked l))[array_position(ARRAY(SELECT l.step_uuid FROM locked l), s.step_uuid)]], 'null'::jsonb),
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
    SELECT array_agg(c.step_uuid), array_agg(c.attempts), array_agg(c.task_uuid), array_agg(DISTINCT c.task_uuid)
    INTO accepted_steps, accepted_attempts, accepted_tasks, touched_tasks
    FROM completed c;

    IF accepted_steps IS NULL THEN
        RETURN QUERY SELECT i.step_uuid, false, '{}'::uuid[], false, false, NULL::timestamptz
                     FROM unnest(p_step_uuids) WITH ORDINALITY AS i(step_uuid, n)
                     ORDER BY i.n;
        RETURN;
    END IF;

    -- Dependents of the completed steps whose every dependency is now
    -- complete, looked up by key (see 0009). The edges read are kept: they
    -- say which completed parent each enqueued dependent is credited to.
    SELECT array_agg(e.to_step_uuid), array_agg(e.from_step_uuid), array_agg(DISTINCT e.to_step_uuid)
    INTO edge_children, edge_parents, children
    FROM tasker.workflow_step_edges e
    WHERE e.from_step_uuid = ANY (accepted_steps);

    IF children IS NOT NULL THEN
        -- The runnable ones, locked in key order as they are found; those of
        -- running tasks are enqueued.
        WITH runnable AS (
            SELECT l.step_uuid, l.task_uuid, l.task_running
            FROM (SELECT u AS step_uuid FROM unnest(children) AS u ORDER BY u) AS o
            CROSS JOIN LATERAL (
                SELECT s.step_uuid, s.task_uuid,
                       (SELECT t.state FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid) = 'steps_in_process'
                           AS task_running
                FROM tasker.workflow_steps s
                WHERE s.step_uuid = o.step_uuid
                  AND s.state = 'pending'
                  AND NOT EXISTS (SELECT 1 FROM tasker.workflow_steps p
                                  WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                                 FROM tasker.workflow_step_edges e
                                                                 WHERE e.to_step_uuid = s.step_uuid))
                                    AND p.state <> 'complete')
                FOR NO KEY UPDATE OF s) AS l
        ), enqueued AS (
            UPDATE tasker.workflow_steps s
            SET state = 'enqueued', enqueued_at = now(), updated_at = now()
            WHERE s.step_uuid = ANY (ARRAY(SELECT r.step_uuid FROM runnable r WHERE r.task_running))
            RETURNING s.step_uuid, s.task_uuid, s.namespace, s.attempts
        ), history AS (
            INSERT INTO tasker.workflow_step_transitions
                (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
            SELECT e.step_uuid, e.task_uuid, e.attempts, 'pending', 'enqueued', 'dependencies complete', p_worker_id
            FROM enqueued e
        )
        SELECT (SELECT array_agg(r.step_uuid) FROM runnable r), (SELECT array_agg(r.task_uuid) FROM runnable r),
               array_agg(e.step_uuid), array_agg(e.namespace)
        INTO runnable_steps, runnable_tasks, enqueued_steps, enqueued_ns
        FROM enqueued e;
    END IF;

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
            RETURNING t.task_uuid, t.created_at, finishable_size[array_position(finishable, t.task_uuid)] AS size
        ), history AS (
            INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
            SELECT fi.task_uuid, 'steps_in_process', 'complete', format('all %s steps complete', fi.size), p_worker_id
            FROM finished fi
        )
        SELECT array_agg(fi.task_uuid), array_agg(fi.created_at)
        INTO finalized_tasks, finalized_since
        FROM finished fi;

        refused_tasks := ARRAY(SELECT u FROM unnest(finishable) AS u
                               WHERE NOT u = ANY (coalesce(finalized_tasks, '{}')));
        IF cardinality(refused_tasks) > 0 THEN
            woken_tasks := array_cat(woken_tasks, refused_tasks);
        END IF;
    END IF;

    IF woken_tasks IS NOT NULL THEN
        PERFORM tasker.wake_tasks(woken_tasks);
    END IF;

    -- The answer, from the arrays above, one row per input in input order:
    -- each enqueued dependent is credited to one completed parent of this
    -- call (the least, as before), and an accepted input (its step and
    -- attempt) reports what happened to its task.
    RETURN QUERY
    WITH credit AS (
        SELECT min(e.parent::text)::uuid AS parent, e.child
        FROM unnest(edge_children, edge_parents) AS e(child, parent)
        WHERE e.child = ANY (coalesce(enqueued_steps, '{}'))
        GROUP BY e.child
    ), credited AS (
        SELECT c.parent, array_agg(c.child) AS steps FROM credit c GROUP BY c.parent
    )
    SELECT i.step_uuid, a.task_uuid IS NOT NULL, coalesce(cr.steps, '{}'),
           coalesce(a.task_uuid = ANY (woken_tasks), false),
           coalesce(a.task_uuid = ANY (finalized_tasks), false),
           finalized_since[array_position(finalized_tasks, a.task_uuid)]
    FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
    LEFT JOIN unnest(accepted_steps, accepted_attempts, accepted_tasks) AS a(step_uuid, attempt, task_uuid)
           ON a.step_uuid = i.step_uuid AND a.attempt = i.attempt
    LEFT JOIN credited cr ON cr.parent = a.step_uuid
    ORDER BY i.n;
END
$$;

-- CREATE OR REPLACE resets a function's settings (see 0011 and 0014).
ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[], boolean)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
