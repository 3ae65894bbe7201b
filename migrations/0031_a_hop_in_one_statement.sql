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
-- One statement runs the three functions in turn: each reads what the one
-- before wrote (they are volatile, so each of their statements takes a new
-- snapshot), and it is one transaction when the caller sends it alone. The
-- answer is one row per input (kind 'recorded', complete_steps' columns),
-- one per claim (kind 'claimed', claim_steps' columns) and one row of kind
-- 'announced' with the number of step channels notified.

CREATE FUNCTION tasker.complete_steps_and_claim(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_results    jsonb[],
    p_capacity   integer,
    p_free       integer,
    p_backlog    boolean,
    p_namespace  text,
    p_lease      interval
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
BEGIN
    IF p_capacity IS NULL OR p_capacity < 1 OR p_free IS NULL OR p_free < 0 OR p_backlog IS NULL
       OR p_lease IS NULL OR p_lease <= interval '0' OR coalesce(p_worker_id, '') = '' THEN
        RAISE EXCEPTION 'complete_steps_and_claim needs a worker id, a capacity of 1 or more, a free count of 0 or more, a backlog flag and a positive lease'
            USING ERRCODE = '22023';
    END IF;

    RETURN QUERY
    WITH recorded AS MATERIALIZED (
        SELECT r.* FROM tasker.complete_steps(p_worker_id, p_step_uuids, p_attempts, p_results, false,
                                              p_capacity, p_namespace, p_lease) AS r
    ), continuing AS MATERIALIZED (
        SELECT c.dependents, c.started, greatest(p_capacity - cardinality(c.started), 0) AS room
        FROM (SELECT ARRAY(SELECT d FROM recorded r CROSS JOIN LATERAL unnest(r.enqueued_dependents) AS d) AS dependents,
                     ARRAY(SELECT d FROM recorded r CROSS JOIN LATERAL unnest(r.started_dependents) AS d) AS started) AS c
    ), claim AS MATERIALIZED (
        SELECT c.dependents, c.started,
               c.room + CASE WHEN p_backlog THEN p_free
                             ELSE least(p_free, greatest(cardinality(c.dependents) - c.room, 0)) END AS claim_limit
        FROM continuing c
    ), claimed AS MATERIALIZED (
        SELECT s.*
        FROM (SELECT * FROM claim c
              WHERE cardinality(c.started) > 0
                 OR (c.claim_limit > 0 AND (cardinality(c.dependents) > 0 OR p_backlog))) AS c
        CROSS JOIN LATERAL tasker.claim_steps(p_worker_id, p_namespace, c.claim_limit, p_lease, 'event',
                                              c.dependents, c.started) AS s
    ), announced AS MATERIALIZED (
        SELECT CASE WHEN cardinality(l.left_behind) > 0 THEN tasker.announce_enqueued(l.left_behind) ELSE 0 END AS channels
        FROM (SELECT ARRAY(SELECT d FROM claim c CROSS JOIN LATERAL unnest(c.dependents) AS d
                           WHERE NOT d = ANY (ARRAY(SELECT s.step_uuid FROM claimed s))) AS left_behind) AS l
    )
    SELECT 'recorded', r.step_uuid, r.accepted, r.enqueued_dependents, r.task_woken, r.task_finalized,
           r.task_created_at, r.started_dependents,
           NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::integer, NULL::integer, NULL::integer,
           NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::timestamptz, NULL::integer
    FROM recorded r
    UNION ALL
    SELECT 'claimed', s.step_uuid, NULL, NULL, NULL, NULL, NULL, NULL,
           s.task_uuid, s.namespace, s.name, s.handler, s.config, s.attempt, s.max_attempts, s.timeout_ms,
           s.lease_expires_at, s.task_context, s.dependency_results, s.enqueued_at, s.claimed_at, NULL
    FROM claimed s
    UNION ALL
    SELECT 'announced', NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, a.channels
    FROM announced a;
END
$$;

ALTER FUNCTION tasker.complete_steps_and_claim(text, uuid[], integer[], jsonb[], integer, integer, boolean, text, interval)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off;
