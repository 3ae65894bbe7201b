-- One statement, and one round trip, per batch of completions.
--
-- A worker recorded a batch of successes in a transaction of four or five
-- round trips: BEGIN, complete_steps(..., p_announce => false), claim_steps
-- (..., p_prefer), announce_enqueued when it left something, COMMIT. Along a
-- chain of steps that is one batch per hop, and under `tasker bench latency`
-- the round trips were about a quarter of a hop's time outside the
-- statements themselves. complete_and_claim() does the three calls in one
-- statement, so the worker sends it on its own, without BEGIN and COMMIT:
--
--   1. complete_steps(..., p_announce => false) records the batch;
--   2. claim_steps(..., p_prefer => the dependents it enqueued) claims up to
--      as many steps as it enqueued and as p_room allows (none when p_room
--      is 0 or nothing was enqueued), exactly as the worker's own claim did;
--   3. announce_enqueued(those dependents) NOTIFYs the namespaces of the
--      ones still enqueued, that is of the ones the claim left: this
--      statement enqueued and locked them, so no other transaction can have
--      claimed them. It returns how many channels it notified.
--
-- It returns a row per completed step (claimed = false: the completion
-- columns, and channels_notified, the same on each) and a row per claimed
-- step (claimed = true: the claim columns, as claim_steps returns them).
--
-- The worker passes as p_room the capacity it reserved for the dependents,
-- and must reserve it before the call. It reserves up to the number of
-- dependents the completed steps have, which claim_steps now returns with
-- each claim (`dependents`, an index-only count of its outgoing edges): a
-- completion that cannot enqueue anything reserves nothing, so it never
-- holds capacity the worker's claim loop could use.

-- claim_steps as in 0018, returning each claimed step's number of dependents.
DROP FUNCTION tasker.claim_steps(text, text, integer, interval, text, uuid[]);

CREATE FUNCTION tasker.claim_steps(
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
    dependents         integer,
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
    -- worker claims from. Each is looked up by key; the guard reads, per
    -- dependent, only enqueued steps of higher priority (usually none).
    IF p_prefer IS NOT NULL THEN
        SELECT array_agg(c.step_uuid) INTO candidates FROM (
            SELECT s.step_uuid
            FROM unnest(p_prefer) AS d(step_uuid)
            CROSS JOIN LATERAL (SELECT w.step_uuid, w.namespace, w.priority, w.enqueued_at
                                FROM tasker.workflow_steps w
                                WHERE w.step_uuid = d.step_uuid AND w.state = 'enqueued'
                                  AND w.namespace = coalesce(p_namespace, w.namespace)
                                FOR NO KEY UPDATE SKIP LOCKED) AS s
            WHERE (SELECT 1 FROM tasker.workflow_steps o
                   WHERE o.state = 'enqueued' AND o.priority > s.priority
                     AND o.namespace = coalesce(p_namespace, o.namespace)
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
           st.attempts, st.max_attempts, st.timeout_ms,
           (SELECT count(*)::integer FROM tasker.workflow_step_edges e WHERE e.from_step_uuid = st.step_uuid),
           st.lease_expires_at,
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

CREATE TYPE tasker.step_completion AS (
    step_uuid           uuid,
    accepted            boolean,
    enqueued_dependents uuid[],
    task_woken          boolean,
    task_finalized      boolean,
    task_created_at     timestamptz
);

CREATE FUNCTION tasker.complete_and_claim(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[],
    p_namespace  text,
    p_room       integer,
    p_lease      interval
) RETURNS TABLE (
    claimed             boolean,
    step_uuid           uuid,
    -- A completed step (claimed = false).
    accepted            boolean,
    enqueued_dependents uuid[],
    task_woken          boolean,
    task_finalized      boolean,
    task_created_at     timestamptz,
    channels_notified   integer,
    -- A claimed step (claimed = true).
    task_uuid           uuid,
    namespace           text,
    name                text,
    handler             text,
    config              jsonb,
    attempt             integer,
    max_attempts        integer,
    timeout_ms          integer,
    dependents          integer,
    lease_expires_at    timestamptz,
    task_context        jsonb,
    dependency_results  jsonb,
    enqueued_at         timestamptz,
    claimed_at          timestamptz
)
    LANGUAGE plpgsql AS $$
DECLARE
    completions tasker.step_completion[];
    enqueued    uuid[];
    channels    integer := 0;
BEGIN
    IF p_room IS NULL OR p_room < 0 THEN
        RAISE EXCEPTION 'complete_and_claim needs a room of zero or more steps, not %', coalesce(p_room::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;

    SELECT array_agg(ROW(c.step_uuid, c.accepted, c.enqueued_dependents, c.task_woken, c.task_finalized,
                         c.task_created_at)::tasker.step_completion)
    INTO completions
    FROM tasker.complete_steps(p_worker_id, p_step_uuids, p_attempts, p_results, false) AS c;

    enqueued := ARRAY(SELECT d.step_uuid
                      FROM unnest(completions) AS c
                      CROSS JOIN LATERAL unnest(c.enqueued_dependents) AS d(step_uuid));

    IF cardinality(enqueued) > 0 THEN
        IF p_room > 0 THEN
            RETURN QUERY
            SELECT true, cl.step_uuid, NULL::boolean, NULL::uuid[], NULL::boolean, NULL::boolean,
                   NULL::timestamptz, NULL::integer,
                   cl.task_uuid, cl.namespace, cl.name, cl.handler, cl.config, cl.attempt, cl.max_attempts,
                   cl.timeout_ms, cl.dependents, cl.lease_expires_at, cl.task_context, cl.dependency_results,
                   cl.enqueued_at, cl.claimed_at
            FROM tasker.claim_steps(p_worker_id, p_namespace, least(p_room, cardinality(enqueued)), p_lease,
                                    'event', enqueued) AS cl;
        END IF;
        -- After the claim: only what it left is still enqueued.
        channels := tasker.announce_enqueued(enqueued);
    END IF;

    RETURN QUERY
    SELECT false, c.step_uuid, c.accepted, c.enqueued_dependents, c.task_woken, c.task_finalized,
           c.task_created_at, channels,
           NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::integer, NULL::integer,
           NULL::integer, NULL::integer, NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
           NULL::timestamptz
    FROM unnest(completions) AS c;
END
$$;

-- Generic plans (0011) and no sequential scans (0014), as for the hot
-- functions before them.
ALTER FUNCTION tasker.claim_steps(text, text, integer, interval, text, uuid[])
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
ALTER FUNCTION tasker.complete_and_claim(text, uuid[], integer[], jsonb[], text, integer, interval)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
