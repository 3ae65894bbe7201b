-- The continuation claim's priority guard reads only the worker's namespace.
--
-- claim_steps(..., p_prefer) takes the dependents its caller enqueued unless
-- a step of higher priority waits where the worker claims from. The guard
-- was one query, `o.namespace = coalesce(p_namespace, o.namespace)`, which
-- no index can serve for a namespace worker: it read the higher-priority
-- enqueued steps of every namespace through the catch-all claimable index
-- and filtered them, so a backlog of urgent work in one namespace was read,
-- row by row, for every step another namespace's workers continued with
-- (the test a_namespace_workers_continuation_reads_only_its_namespace: 2,016
-- step rows fetched for one continued step; 16 now). It is now two queries,
-- one for
-- catch-all workers (no namespace) on workflow_steps_claimable_any_idx and
-- one for namespace workers on workflow_steps_claimable_idx (namespace,
-- priority DESC, ...); each reads nothing when its case does not apply.

CREATE OR REPLACE FUNCTION tasker.claim_steps(
    p_worker_id      text,
    p_namespace      text,
    p_limit          integer,
    p_lease          interval,
    p_discovered_via text DEFAULT 'event',
    p_prefer         uuid[] DEFAULT NULL
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

    -- p_prefer: the dependents the caller's transaction just enqueued (its
    -- own row locks). Its claim takes them, continuing their tasks, unless a
    -- step of higher priority that it did not enqueue waits where this
    -- worker claims from. Each is looked up by key, with its state and
    -- namespace checked outside the probe (OFFSET 0 keeps them there; see
    -- 0021). The guard reads, per dependent, only enqueued steps of higher
    -- priority where the worker claims from (usually none), in two
    -- spellings, so that each can use its claimable index (see 0022).
    IF p_prefer IS NOT NULL THEN
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

    IF cardinality(candidates) = 0 THEN
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
           st.attempts, st.max_attempts, st.timeout_ms, st.lease_expires_at,
           (SELECT t.context FROM tasker.tasks t WHERE t.task_uuid = st.task_uuid),
           coalesce((SELECT jsonb_object_agg(p.name, p.result)
                     FROM tasker.workflow_steps p
                     WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                    FROM tasker.workflow_step_edges e
                                                    WHERE e.to_step_uuid = st.step_uuid))), '{}'::jsonb),
           st.enqueued_at, now()
    FROM started st;
END
$$;

-- CREATE OR REPLACE resets a function's settings (see 0011 and 0014).
ALTER FUNCTION tasker.claim_steps(text, text, integer, interval, text, uuid[])
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
