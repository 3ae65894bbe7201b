-- A worker's completing transaction in one statement, and so in one round
-- trip.
--
-- Since Round 16 the worker records a batch of successes and claims the next
-- work with the capacity it frees in one transaction: BEGIN, complete_steps,
-- claim_steps (taking up the dependents the completion started and claiming
-- more), announce_enqueued when it leaves dependents for other workers, and
-- COMMIT. Each is a round trip, and through sqlx on a 2-core machine a round
-- trip cost about 90 us (`cargo bench -p tasker-shared --bench round_trips`:
-- 340-380 us for `BEGIN`, two `SELECT`s and `COMMIT`, 94-102 us for one
-- `SELECT`), three of them more than needed on every hop of `tasker bench
-- latency`.
--
-- complete_steps_and_claim() makes the worker's decisions between those
-- calls in SQL, on what the worker tells it: p_capacity, the slots its
-- batch frees (the completion starts up to that many dependents), p_free,
-- the free slots it reserved beyond them, and p_backlog, whether its claim
-- loop is waiting for capacity. As in the worker before:
--
--   room  = p_capacity - started
--   extra = p_free when p_backlog, else least(p_free, enqueued dependents - room)
--   claim = up to room + extra steps, preferring the enqueued dependents,
--           when the completion started a dependent, or the limit is positive
--           and it enqueued dependents or p_backlog;
--   then announce the enqueued dependents the claim did not take.
--
-- It holds complete_steps' body (moved, not copied: complete_steps now
-- calls it without a claim and answers as before), then calls claim_steps
-- and announce_enqueued, so a call sent alone is one transaction and one
-- round trip. A wrapper that called complete_steps and claim_steps in turn
-- cost the server about 150,000 instructions a hop more than the two calls
-- (counted with scripts/bench-instructions); with the body here it costs
-- about 80,000 more (2,339,441 against 2,261,261 a step; the count leaves
-- out the protocol work of the three statements it saves; see
-- docs/benchmarks.md, Round 22, for the timed pairs). The answer is one row per
-- input (kind 'recorded', complete_steps' columns), one per claim (kind
-- 'claimed', claim_steps' columns) and one row of kind 'announced' with the
-- number of step channels notified. With p_claim false it only records, with
-- p_capacity and p_namespace as complete_steps' start limit and namespace,
-- announcing what it enqueues when p_announce says so, and answers without
-- the 'announced' row.

CREATE FUNCTION tasker.complete_steps_and_claim(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[],
    p_capacity   integer,
    p_free       integer,
    p_backlog    boolean,
    p_namespace  text,
    p_lease      interval,
    p_claim      boolean DEFAULT true,
    p_announce   boolean DEFAULT false
) RETURNS TABLE (
    kind                text,
    step_uuid           uuid,
    accepted            boolean,
    enqueued_dependents uuid[],
    task_woken          boolean,
    task_finalized      boolean,
    task_created_at     timestamptz,
    started_dependents  uuid[],
    task_uuid           uuid,
    namespace           text,
    name                text,
    handler             text,
    config              jsonb,
    attempt             integer,
    max_attempts        integer,
    timeout_ms          integer,
    lease_expires_at    timestamptz,
    task_context        jsonb,
    dependency_results  jsonb,
    enqueued_at         timestamptz,
    claimed_at          timestamptz,
    channels            integer
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
    dependents      uuid[];
    claim_room      integer;
    claim_limit     integer;
BEGIN
    IF p_claim AND (p_capacity IS NULL OR p_capacity < 1 OR p_free IS NULL OR p_free < 0 OR p_backlog IS NULL
                    OR p_lease IS NULL OR p_lease <= interval '0' OR coalesce(p_worker_id, '') = '') THEN
        RAISE EXCEPTION 'complete_steps_and_claim needs a worker id, a capacity of 1 or more, a free count of 0 or more, a backlog flag and a positive lease'
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_capacity, 0) > 0 AND (p_lease IS NULL OR p_lease <= interval '0') THEN
        RAISE EXCEPTION 'complete_steps needs a positive lease to start dependents'
            USING ERRCODE = '22023';
    END IF;

    -- The completion: complete_steps' body since 0030, its start limit and
    -- namespace now p_capacity and p_namespace. Its answer (kind 'recorded')
    -- leaves the block early when nothing was accepted or nothing is
    -- credited.
    <<answered>>
    BEGIN
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
            RETURN QUERY SELECT 'recorded'::text, i.step_uuid, false, '{}'::uuid[], false, false, NULL::timestamptz,
                                '{}'::uuid[],
                                NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::integer,
                                NULL::integer, NULL::integer,
                                NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::timestamptz, NULL::integer
                         FROM unnest(p_step_uuids) WITH ORDINALITY AS i(step_uuid, n)
                         ORDER BY i.n;
            EXIT answered;
        END IF;

        -- Dependents of the completed steps whose every dependency is now
        -- complete, looked up by key (see 0009).
        IF cardinality(edge_children) > 0 THEN
            -- The runnable ones, locked in key order as they are found. Of those
            -- of running tasks, up to p_capacity start at once, for the
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
                WHERE coalesce(p_capacity, 0) > 0 AND r.task_running
                  AND r.namespace = coalesce(p_namespace, r.namespace)
                  AND (SELECT 1 FROM tasker.workflow_steps o
                       WHERE p_namespace IS NULL AND o.state = 'enqueued' AND o.priority > r.priority
                       LIMIT 1) IS NULL
                  AND (SELECT 1 FROM tasker.workflow_steps o
                       WHERE o.state = 'enqueued' AND o.namespace = p_namespace AND o.priority > r.priority
                       LIMIT 1) IS NULL
                ORDER BY r.priority DESC, r.step_uuid
                LIMIT greatest(coalesce(p_capacity, 0), 0)
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
            SELECT 'recorded'::text, i.step_uuid, a.task_uuid IS NOT NULL, '{}'::uuid[],
                   coalesce(a.task_uuid = ANY (woken_tasks), false),
                   coalesce(a.task_uuid = ANY (finalized_tasks), false),
                   finalized_since[array_position(finalized_tasks, a.task_uuid)],
                   '{}'::uuid[],
                   NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::integer, NULL::integer, NULL::integer,
                   NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::timestamptz, NULL::integer
            FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
            LEFT JOIN unnest(accepted_steps, accepted_attempts, accepted_tasks) AS a(step_uuid, attempt, task_uuid)
                   ON a.step_uuid = i.step_uuid AND a.attempt = i.attempt
            ORDER BY i.n;
            EXIT answered;
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
        SELECT 'recorded'::text, i.step_uuid, a.task_uuid IS NOT NULL, coalesce(cr.steps, '{}'),
               coalesce(a.task_uuid = ANY (woken_tasks), false),
               coalesce(a.task_uuid = ANY (finalized_tasks), false),
               finalized_since[array_position(finalized_tasks, a.task_uuid)],
               coalesce(cr.started, '{}'),
               NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::integer, NULL::integer, NULL::integer,
               NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::timestamptz, NULL::integer
        FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
        LEFT JOIN unnest(accepted_steps, accepted_attempts, accepted_tasks) AS a(step_uuid, attempt, task_uuid)
               ON a.step_uuid = i.step_uuid AND a.attempt = i.attempt
        LEFT JOIN credited cr ON cr.parent = a.step_uuid
        ORDER BY i.n;
    END;

    IF NOT p_claim THEN
        RETURN;
    END IF;

    -- The claim, as the worker made it (see the top of this file), and the
    -- dependents it leaves, announced: announce_enqueued() notifies the
    -- namespaces of those still enqueued, so the ones claimed are skipped.
    dependents := coalesce(enqueued_steps, '{}');
    started_steps := coalesce(started_steps, '{}');
    claim_room := greatest(p_capacity - cardinality(started_steps), 0);
    claim_limit := claim_room + CASE WHEN p_backlog THEN p_free
                                     ELSE least(p_free, greatest(cardinality(dependents) - claim_room, 0)) END;
    IF cardinality(started_steps) > 0 OR (claim_limit > 0 AND (cardinality(dependents) > 0 OR p_backlog)) THEN
        RETURN QUERY
        SELECT 'claimed'::text, c.step_uuid, NULL::boolean, NULL::uuid[], NULL::boolean, NULL::boolean,
               NULL::timestamptz, NULL::uuid[], c.task_uuid, c.namespace, c.name, c.handler, c.config, c.attempt,
               c.max_attempts, c.timeout_ms, c.lease_expires_at, c.task_context, c.dependency_results,
               c.enqueued_at, c.claimed_at, NULL::integer
        FROM tasker.claim_steps(p_worker_id, p_namespace, claim_limit, p_lease, 'event',
                                dependents, started_steps) AS c;
    END IF;
    kind := 'announced';
    channels := CASE WHEN cardinality(dependents) > 0 THEN tasker.announce_enqueued(dependents) ELSE 0 END;
    RETURN NEXT;
END
$$;

ALTER FUNCTION tasker.complete_steps_and_claim(text, uuid[], integer[], jsonb[], integer, integer, boolean, text,
                                               interval, boolean, boolean)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off;

-- complete_steps answers as before, from the function that now holds its
-- body (without a claim).
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
BEGIN
    RETURN QUERY
    SELECT c.step_uuid, c.accepted, c.enqueued_dependents, c.task_woken, c.task_finalized, c.task_created_at,
           c.started_dependents
    FROM tasker.complete_steps_and_claim(p_worker_id, p_step_uuids, p_attempts, p_results,
                                         coalesce(p_start_limit, 0), 0, false, p_start_namespace, p_lease,
                                         false, p_announce) AS c;
END
$$;

ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[], boolean, integer, text, interval)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off;
