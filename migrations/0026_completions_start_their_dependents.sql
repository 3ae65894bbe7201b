-- A completion starts the dependents it makes runnable, for its worker, in
-- the statement that finds them: one row version and one history row per
-- continued step, where there were two of each.
--
-- Since Round 9 a worker's completion claims the dependents it enqueued in
-- the same transaction (claim_steps' p_prefer): complete_steps moved each
-- one pending -> enqueued, and the claim moved it enqueued -> in_progress a
-- moment later. Neither update can be HOT (the state is in the claimable and
-- running indexes' predicates), so each wrote a new row version, a new entry
-- in the step's primary key and (task_uuid, name) key, the claimable
-- indexes' entries, and a history row with two index entries; the second
-- update of a row this transaction had already updated also made PostgreSQL
-- check the step's key to its task again. After Round 18, index inserts were
-- 27% of the server's samples under `tasker bench diamond`, and three of a
-- diamond task's four steps are continued this way.
--
-- Now complete_steps takes the claim's terms (p_start_limit, p_start_namespace,
-- p_lease) and starts up to p_start_limit runnable dependents of running
-- tasks itself: pending -> in_progress in one update, with one history row
-- (a new edge of the step machine, 'continue'). It chooses as claim_steps'
-- preference did: only where the worker claims from, never while an enqueued
-- step of higher priority waits there, highest priority first. The rest are
-- enqueued as before, and returned as before; the started ones come back in
-- started_dependents, credited to a parent the same way.
--
-- claim_steps takes them in p_started and returns them first, as claims of
-- this worker (reading them; they are not updated again), with p_limit
-- counting only what it claims beyond them (0 allowed beside p_started).
--
-- Called without p_start_limit (0), complete_steps does what it did. The
-- two functions' signatures change, so they are dropped and created again.

INSERT INTO tasker.step_state_machine (from_state, event, to_state) VALUES
    ('pending', 'continue', 'in_progress');
SELECT tasker.install_state_guards();

DROP FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[], boolean);
DROP FUNCTION tasker.claim_steps(text, text, integer, interval, text, uuid[]);

CREATE FUNCTION tasker.complete_steps(
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
    started_steps   uuid[];
BEGIN
    IF coalesce(p_start_limit, 0) > 0 AND (p_lease IS NULL OR p_lease <= interval '0') THEN
        RAISE EXCEPTION 'complete_steps needs a positive lease to start dependents'
            USING ERRCODE = '22023';
    END IF;

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
        RETURN QUERY SELECT i.step_uuid, false, '{}'::uuid[], false, false, NULL::timestamptz, '{}'::uuid[]
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
        -- The runnable ones, locked in key order as they are found. Of those
        -- of running tasks, up to p_start_limit start at once, for the
        -- caller (see the top of this file), and the rest are enqueued.
        WITH runnable AS (
            SELECT l.step_uuid, l.task_uuid, l.task_running, l.namespace, l.priority
            FROM (SELECT u AS step_uuid FROM unnest(children) AS u ORDER BY u) AS o
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
        SELECT (SELECT array_agg(r.step_uuid) FROM runnable r), (SELECT array_agg(r.task_uuid) FROM runnable r),
               (SELECT array_agg(e.step_uuid) FROM enqueued e), (SELECT array_agg(e.namespace) FROM enqueued e),
               (SELECT array_agg(st.step_uuid) FROM started st)
        INTO runnable_steps, runnable_tasks, enqueued_steps, enqueued_ns, started_steps;
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
                              AND NOT r.step_uuid = ANY (coalesce(enqueued_steps, '{}') || coalesce(started_steps, '{}')))
                     AS needs_orchestrator
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
    -- each enqueued or started dependent is credited to one completed parent
    -- of this call (the least, as before), and an accepted input (its step
    -- and attempt) reports what happened to its task.
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
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;

CREATE FUNCTION tasker.claim_steps(
    p_worker_id      text,
    p_namespace      text,
    p_limit          integer,
    p_lease          interval,
    p_discovered_via text DEFAULT 'event',
    p_prefer         uuid[] DEFAULT NULL,
    p_started        uuid[] DEFAULT NULL
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
    -- A limit of 0 is allowed beside p_started: the caller only wants the
    -- attempts its completion started.
    IF p_limit IS NULL OR p_limit < 0 OR (p_limit = 0 AND coalesce(cardinality(p_started), 0) = 0)
       OR p_lease IS NULL OR p_lease <= interval '0' OR coalesce(p_worker_id, '') = '' THEN
        RAISE EXCEPTION 'claim_steps needs a worker id, a positive limit (0 only beside started steps) and a positive lease'
            USING ERRCODE = '22023';
    END IF;

    -- p_prefer: the dependents the caller's transaction just enqueued (its
    -- own row locks). Its claim takes them, continuing their tasks, unless a
    -- step of higher priority that it did not enqueue waits where this
    -- worker claims from. Each is looked up by key, with its state and
    -- namespace checked outside the probe (OFFSET 0 keeps them there; see
    -- 0021). The guard reads, per dependent, only enqueued steps of higher
    -- priority where the worker claims from (usually none), in two
    -- spellings, so that each can use its claimable index (see 0022).
    IF p_prefer IS NOT NULL AND p_limit > 0 THEN
        SELECT array_agg(c.step_uuid) INTO candidates FROM (
            SELECT s.step_uuid
            FROM unnest(p_prefer) AS d(step_uuid)
            CROSS JOIN LATERAL (SELECT w.step_uuid, w.state, w.namespace, w.priority, w.enqueued_at
                                FROM tasker.workflow_steps w
                                WHERE w.step_uuid = d.step_uuid
                                FOR NO KEY UPDATE SKIP LOCKED
                                OFFSET 0) AS s
            WHERE s.state = 'enqueued' AND s.namespace = coalesce(p_namespace, s.namespace)
              AND (SELECT 1 FROM tasker.workflow_steps o
                   WHERE p_namespace IS NULL AND o.state = 'enqueued' AND o.priority > s.priority
                     AND NOT o.step_uuid = ANY (p_prefer)
                   LIMIT 1) IS NULL
              AND (SELECT 1 FROM tasker.workflow_steps o
                   WHERE o.state = 'enqueued' AND o.namespace = p_namespace AND o.priority > s.priority
                     AND NOT o.step_uuid = ANY (p_prefer)
                   LIMIT 1) IS NULL
            ORDER BY s.priority DESC, s.enqueued_at
            LIMIT p_limit) c;
    END IF;

    -- The rest of the limit in priority order, as always; two spellings so
    -- each can use the claimable index as well as it allows. (SKIP LOCKED
    -- does not skip the rows this transaction locked: exclude those taken.)
    IF coalesce(cardinality(candidates), 0) < p_limit AND p_namespace IS NULL THEN
        candidates := coalesce(candidates, '{}') || ARRAY(
            SELECT s.step_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'enqueued' AND NOT s.step_uuid = ANY (coalesce(candidates, '{}'))
            ORDER BY s.priority DESC, s.enqueued_at
            LIMIT p_limit - coalesce(cardinality(candidates), 0)
            FOR NO KEY UPDATE SKIP LOCKED);
    ELSIF coalesce(cardinality(candidates), 0) < p_limit THEN
        candidates := coalesce(candidates, '{}') || ARRAY(
            SELECT s.step_uuid FROM tasker.workflow_steps s
            WHERE s.state = 'enqueued' AND s.namespace = p_namespace
              AND NOT s.step_uuid = ANY (coalesce(candidates, '{}'))
            ORDER BY s.priority DESC, s.enqueued_at
            LIMIT p_limit - coalesce(cardinality(candidates), 0)
            FOR NO KEY UPDATE SKIP LOCKED);
    END IF;

    IF coalesce(cardinality(candidates), 0) = 0 AND coalesce(cardinality(p_started), 0) = 0 THEN
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
    ), taken AS (
        SELECT * FROM started
        UNION ALL
        -- Started by this transaction's completion (complete_steps'
        -- started_dependents), for this worker: only read here. Its state
        -- and owner are checked outside the key probe (OFFSET 0, see 0021).
        SELECT a.* FROM (SELECT s.* FROM tasker.workflow_steps s
                         WHERE s.step_uuid = ANY (p_started) OFFSET 0) AS a
        WHERE a.state = 'in_progress' AND a.claimed_by = p_worker_id
    )
    SELECT st.step_uuid, st.task_uuid, st.namespace, st.name, st.handler, st.config,
           st.attempts, st.max_attempts, st.timeout_ms, st.lease_expires_at,
           (SELECT t.context FROM tasker.tasks t WHERE t.task_uuid = st.task_uuid),
           coalesce((SELECT jsonb_object_agg(p.name, p.result)
                     FROM tasker.workflow_steps p
                     WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                    FROM tasker.workflow_step_edges e
                                                    WHERE e.to_step_uuid = st.step_uuid))), '{}'::jsonb),
           st.enqueued_at, now()
    FROM taken st;
END
$$;

ALTER FUNCTION tasker.claim_steps(text, text, integer, interval, text, uuid[], uuid[])
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
