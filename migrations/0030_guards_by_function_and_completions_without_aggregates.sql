-- A hop's statements with less to set up: state guards whose WHEN clause is
-- one function call, and a completion with fewer statements and aggregates.
--
-- Counted with scripts/bench-instructions (callgrind, PostgreSQL's
-- instructions per completed step; see docs/benchmarks.md, Round 22), a hop
-- of `tasker bench latency` spent, after 0029:
--
-- * 10% re-reading the guards' WHEN clause. PostgreSQL stores it as node
--   text and reads it back for each statement that updates the table; the
--   constant array of edges (0019) is stored byte by byte, so about 120,000
--   instructions went into parsing it per updating statement, two or three
--   statements a hop.
-- * 17% setting up aggregates (ExecInitAgg): complete_steps read its results
--   into variables with array_agg, an Agg node per query or subquery:
--   eleven of a hop's thirteen.
--
-- 1. The guards keep their edges in an IMMUTABLE PL/pgSQL function per
--    machine, tasker.task_transition_allowed() and
--    tasker.step_transition_allowed(), which install_state_guards() writes
--    from the machine tables as before. The WHEN clause is the call (a few
--    hundred bytes stored); PL/pgSQL keeps the function's compiled body, with
--    the array, for the session, so a row pays one short call instead of a
--    statement parsing 2 kB. What a guard allows and rejects, and its TK001
--    error from guard_state(), are unchanged.
-- 2. complete_steps locks its inputs' tasks in its own first statement
--    (lock_tasks_of_steps' statements as one, without the nested call and
--    its settings), reads the completed steps' edges in the statement that
--    completes them, reads every result into its variables with ARRAY()
--    subqueries instead of array_agg, and answers without the crediting's
--    groupings when it enqueued and started nothing. Its arguments, answer
--    and locking order are unchanged.

CREATE OR REPLACE FUNCTION tasker.install_state_guards() RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    guard record;
    edges text[];
BEGIN
    FOR guard IN SELECT * FROM (VALUES
        ('task', 'tasks', 'tasks_state_guard', 'task_state_machine', 'task_transition_allowed'),
        ('step', 'workflow_steps', 'workflow_steps_state_guard', 'step_state_machine', 'step_transition_allowed'))
        AS g(machine, rel, trigger_name, machine_table, allowed)
    LOOP
        EXECUTE format(
            'SELECT array_agg(m.from_state || ''>'' || m.to_state ORDER BY m.from_state, m.to_state)
             FROM (SELECT DISTINCT from_state, to_state FROM tasker.%I) AS m', guard.machine_table)
        INTO edges;
        IF edges IS NULL THEN
            RAISE EXCEPTION 'tasker.% is empty: refusing to install a guard that rejects every transition',
                guard.machine_table;
        END IF;
        -- 'from>to' names an edge only while no state contains '>'.
        IF EXISTS (SELECT 1 FROM unnest(edges) AS e WHERE e LIKE '%>%>%') THEN
            RAISE EXCEPTION 'tasker.% has a state containing ''>'': cannot write its guard', guard.machine_table;
        END IF;
        EXECUTE format(
            'CREATE OR REPLACE FUNCTION tasker.%I(from_state text, to_state text) RETURNS boolean
                 LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $body$
             BEGIN
                 RETURN (from_state || ''>'' || to_state) = ANY (%L::text[]);
             END
             $body$',
            guard.allowed, edges::text);
        EXECUTE format('COMMENT ON FUNCTION tasker.%I(text, text) IS %L', guard.allowed,
            format('Whether from_state -> to_state is an edge of the %s machine '
                   '(written from tasker.%s by install_state_guards())', guard.machine, guard.machine_table));
        -- CREATE OR REPLACE (not DROP and CREATE) locks the table against
        -- writes only, not reads, while the migration's transaction lasts.
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I BEFORE UPDATE OF state ON tasker.%I
                 FOR EACH ROW
                 WHEN (OLD.state IS DISTINCT FROM NEW.state AND NOT tasker.%I(OLD.state, NEW.state))
                 EXECUTE FUNCTION tasker.guard_state(%L)',
            guard.trigger_name, guard.rel, guard.allowed, guard.machine);
    END LOOP;
END
$$;

SELECT tasker.install_state_guards();

CREATE OR REPLACE FUNCTION tasker.complete_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[],
    p_announce   boolean,
    p_start_limit     integer DEFAULT 0,
    p_start_namespace text DEFAULT NULL,
    p_lease           interval DEFAULT NULL
) RETURNS TABLE (
    step_uuid           uuid,
    accepted            boolean,
    enqueued_dependents uuid[],
    task_woken          boolean,
    task_finalized      boolean,
    task_created_at     timestamptz,
    started_dependents  uuid[]
)
    LANGUAGE plpgsql AS $$
DECLARE
    accepted_steps  uuid[];
    accepted_attempts integer[];
    accepted_tasks  uuid[];
    edge_children   uuid[];
    edge_parents    uuid[];
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
    started_steps   uuid[];
BEGIN
    IF coalesce(p_start_limit, 0) > 0 AND (p_lease IS NULL OR p_lease <= interval '0') THEN
        RAISE EXCEPTION 'complete_steps needs a positive lease to start dependents'
            USING ERRCODE = '22023';
    END IF;

    -- The tasks of the inputs, locked in key order before any of their
    -- steps (as lock_tasks_of_steps does, in one statement and without the
    -- call).
    PERFORM l.task_uuid
    FROM (SELECT DISTINCT s.task_uuid FROM tasker.workflow_steps s
          WHERE s.step_uuid = ANY (p_step_uuids) ORDER BY s.task_uuid) AS o
    CROSS JOIN LATERAL (SELECT t.task_uuid FROM tasker.tasks t
                        WHERE t.task_uuid = o.task_uuid
                        FOR NO KEY UPDATE) AS l;

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
    ), edges AS (
        -- The completed steps' outgoing edges, read by key (see 0009) in the
        -- same statement: they say which dependents to look at, and which
        -- completed parent each one is credited to.
        SELECT e.to_step_uuid, e.from_step_uuid
        FROM tasker.workflow_step_edges e
        WHERE e.from_step_uuid = ANY (ARRAY(SELECT c.step_uuid FROM completed c))
    )
    SELECT ARRAY(SELECT c.step_uuid FROM completed c), ARRAY(SELECT c.attempts FROM completed c),
           ARRAY(SELECT c.task_uuid FROM completed c),
           ARRAY(SELECT e.to_step_uuid FROM edges e), ARRAY(SELECT e.from_step_uuid FROM edges e)
    INTO accepted_steps, accepted_attempts, accepted_tasks, edge_children, edge_parents;

    IF cardinality(accepted_steps) = 0 THEN
        RETURN QUERY SELECT i.step_uuid, false, '{}'::uuid[], false, false, NULL::timestamptz, '{}'::uuid[]
                     FROM unnest(p_step_uuids) WITH ORDINALITY AS i(step_uuid, n)
                     ORDER BY i.n;
        RETURN;
    END IF;

    -- Dependents of the completed steps whose every dependency is now
    -- complete, looked up by key (see 0009).
    IF cardinality(edge_children) > 0 THEN
        -- The runnable ones, locked in key order as they are found. Of those
        -- of running tasks, up to p_start_limit start at once, for the
        -- caller (see the top of this file), and the rest are enqueued.
        WITH runnable AS (
            SELECT l.step_uuid, l.task_uuid, l.task_running, l.namespace, l.priority
            FROM (SELECT DISTINCT u AS step_uuid FROM unnest(edge_children) AS u ORDER BY u) AS o
            CROSS JOIN LATERAL (
                SELECT s.step_uuid, s.task_uuid, s.namespace, s.priority,
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
        ), chosen AS (
            -- Where the caller claims from, unless an enqueued step of higher
            -- priority waits there: claim_steps' guard for its preferred
            -- steps (see 0022), in the same two spellings.
            SELECT r.step_uuid
            FROM runnable r
            WHERE coalesce(p_start_limit, 0) > 0 AND r.task_running
              AND r.namespace = coalesce(p_start_namespace, r.namespace)
              AND (SELECT 1 FROM tasker.workflow_steps o
                   WHERE p_start_namespace IS NULL AND o.state = 'enqueued' AND o.priority > r.priority
                   LIMIT 1) IS NULL
              AND (SELECT 1 FROM tasker.workflow_steps o
                   WHERE o.state = 'enqueued' AND o.namespace = p_start_namespace AND o.priority > r.priority
                   LIMIT 1) IS NULL
            ORDER BY r.priority DESC, r.step_uuid
            LIMIT greatest(coalesce(p_start_limit, 0), 0)
        ), enqueued AS (
            UPDATE tasker.workflow_steps s
            SET state = 'enqueued', enqueued_at = now(), updated_at = now()
            WHERE s.step_uuid = ANY (ARRAY(SELECT r.step_uuid FROM runnable r WHERE r.task_running
                                           EXCEPT SELECT c.step_uuid FROM chosen c))
            RETURNING s.step_uuid, s.task_uuid, s.namespace, s.attempts
        ), started AS (
            UPDATE tasker.workflow_steps s
            SET state = 'in_progress', attempts = s.attempts + 1, claimed_by = p_worker_id,
                lease_expires_at = now() + p_lease, enqueued_at = now(), started_at = now(), updated_at = now()
            WHERE s.step_uuid = ANY (ARRAY(SELECT c.step_uuid FROM chosen c))
            RETURNING s.step_uuid, s.task_uuid, s.attempts, s.max_attempts
        ), history AS (
            INSERT INTO tasker.workflow_step_transitions
                (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
            SELECT e.step_uuid, e.task_uuid, e.attempts, 'pending', 'enqueued', 'dependencies complete', p_worker_id
            FROM enqueued e
            UNION ALL
            SELECT st.step_uuid, st.task_uuid, st.attempts, 'pending', 'in_progress',
                   format('dependencies complete; attempt %s of %s started', st.attempts, st.max_attempts),
                   p_worker_id
            FROM started st
        )
        SELECT ARRAY(SELECT r.step_uuid FROM runnable r), ARRAY(SELECT r.task_uuid FROM runnable r),
               ARRAY(SELECT e.step_uuid FROM enqueued e), ARRAY(SELECT e.namespace FROM enqueued e),
               ARRAY(SELECT st.step_uuid FROM started st)
        INTO runnable_steps, runnable_tasks, enqueued_steps, enqueued_ns, started_steps;
    END IF;

    -- Without p_announce the caller announces what it leaves enqueued
    -- (announce_enqueued), after claiming what it has room for.
    IF cardinality(enqueued_steps) > 0 AND p_announce THEN
        PERFORM pg_notify(tasker.step_channel(ns), '')
        FROM (SELECT DISTINCT ns FROM unnest(enqueued_ns) AS ns) AS distinct_namespaces;
    END IF;

    -- Per touched task, through its index (a LATERAL aggregate, see 0009):
    -- finishable (running, every step complete), or in need of its
    -- orchestrator (nothing in flight, or runnable work the statement above
    -- could not enqueue because the task is not running normally).
    WITH c AS MATERIALIZED (
          SELECT t.task_uuid,
                 (SELECT tk.state FROM tasker.tasks tk WHERE tk.task_uuid = t.task_uuid) = 'steps_in_process'
                     AND n.complete = n.total AS finishable,
                 n.total,
                 n.in_flight = 0
                 OR EXISTS (SELECT 1
                            FROM unnest(coalesce(runnable_steps, '{}'), coalesce(runnable_tasks, '{}'))
                                 AS r(step_uuid, task_uuid)
                            WHERE r.task_uuid = t.task_uuid
                              AND NOT r.step_uuid = ANY (coalesce(enqueued_steps, '{}') || coalesce(started_steps, '{}')))
                     AS needs_orchestrator
          FROM (SELECT DISTINCT u AS task_uuid FROM unnest(accepted_tasks) AS u) AS t
          CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress')) AS in_flight,
                                     count(*) FILTER (WHERE s.state = 'complete') AS complete,
                                     count(*) AS total
                              FROM tasker.workflow_steps s
                              WHERE s.task_uuid = t.task_uuid) AS n)
    SELECT ARRAY(SELECT c.task_uuid FROM c WHERE c.finishable), ARRAY(SELECT c.total FROM c WHERE c.finishable),
           ARRAY(SELECT c.task_uuid FROM c WHERE NOT c.finishable AND c.needs_orchestrator)
    INTO finishable, finishable_size, woken_tasks;

    -- Every step of these tasks is complete and their rows have been locked
    -- since the start (the first statement), so no step of theirs can change:
    -- finalize them all in one statement, on claim_task_for_finalization's
    -- terms (never a task another orchestrator's unexpired claim holds; that
    -- one is woken instead, for its holder).
    IF cardinality(finishable) > 0 THEN
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
        SELECT ARRAY(SELECT fi.task_uuid FROM finished fi), ARRAY(SELECT fi.created_at FROM finished fi)
        INTO finalized_tasks, finalized_since;

        refused_tasks := ARRAY(SELECT u FROM unnest(finishable) AS u
                               WHERE NOT u = ANY (coalesce(finalized_tasks, '{}')));
        IF cardinality(refused_tasks) > 0 THEN
            woken_tasks := array_cat(woken_tasks, refused_tasks);
        END IF;
    END IF;

    IF cardinality(woken_tasks) > 0 THEN
        PERFORM tasker.wake_tasks(woken_tasks);
    END IF;

    -- The answer, from the arrays above, one row per input in input order:
    -- each enqueued or started dependent is credited to one completed parent
    -- of this call (the least, as before), and an accepted input (its step
    -- and attempt) reports what happened to its task.
    -- With no dependent to credit (a task's last step, a one-step task),
    -- without the crediting's two groupings.
    IF coalesce(cardinality(enqueued_steps), 0) + coalesce(cardinality(started_steps), 0) = 0 THEN
        RETURN QUERY
        SELECT i.step_uuid, a.task_uuid IS NOT NULL, '{}'::uuid[],
               coalesce(a.task_uuid = ANY (woken_tasks), false),
               coalesce(a.task_uuid = ANY (finalized_tasks), false),
               finalized_since[array_position(finalized_tasks, a.task_uuid)],
               '{}'::uuid[]
        FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
        LEFT JOIN unnest(accepted_steps, accepted_attempts, accepted_tasks) AS a(step_uuid, attempt, task_uuid)
               ON a.step_uuid = i.step_uuid AND a.attempt = i.attempt
        ORDER BY i.n;
        RETURN;
    END IF;
    RETURN QUERY
    WITH credit AS (
        SELECT min(e.parent::text)::uuid AS parent, e.child
        FROM unnest(edge_children, edge_parents) AS e(child, parent)
        WHERE e.child = ANY (coalesce(enqueued_steps, '{}') || coalesce(started_steps, '{}'))
        GROUP BY e.child
    ), credited AS (
        SELECT c.parent,
               coalesce(array_agg(c.child) FILTER (WHERE c.child = ANY (coalesce(enqueued_steps, '{}'))), '{}') AS steps,
               coalesce(array_agg(c.child) FILTER (WHERE c.child = ANY (coalesce(started_steps, '{}'))), '{}') AS started
        FROM credit c GROUP BY c.parent
    )
    SELECT i.step_uuid, a.task_uuid IS NOT NULL, coalesce(cr.steps, '{}'),
           coalesce(a.task_uuid = ANY (woken_tasks), false),
           coalesce(a.task_uuid = ANY (finalized_tasks), false),
           finalized_since[array_position(finalized_tasks, a.task_uuid)],
           coalesce(cr.started, '{}')
    FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
    LEFT JOIN unnest(accepted_steps, accepted_attempts, accepted_tasks) AS a(step_uuid, attempt, task_uuid)
           ON a.step_uuid = i.step_uuid AND a.attempt = i.attempt
    LEFT JOIN credited cr ON cr.parent = a.step_uuid
    ORDER BY i.n;
END
$$;

ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[], boolean, integer, text, interval)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
    SET enable_bitmapscan = off;
