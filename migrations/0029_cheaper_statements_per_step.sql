-- Fewer instructions per statement on the worker's path: checks that no
-- longer run on every update, a claim that skips its empty writes, and key
-- probes instead of bitmap scans.
--
-- Measured with scripts/bench-instructions, which counts PostgreSQL's
-- instructions per completed step under callgrind (the same count on every
-- run, so one run a side decides what timed runs on a shared machine could
-- not). At one step a statement (`tasker bench latency`'s hop: complete a
-- step, start its dependent, take it up) a step cost 3.14 million
-- instructions, of which 36% was executor start-up and 15% was
-- stringToNode reading stored expressions back from their text.
--
-- 1. CHECK constraints are read back from their stored text by every
--    statement that writes the table, and evaluated on every row it writes,
--    whichever columns it sets. Four of workflow_steps' and two of tasks'
--    (about 4.1 kB and 2.8 kB of stored expression) were re-read by every step
--    and task update, though none of them can fail there:
--
--    - step_state_known and task_state_known: the state guards (0002, 0019)
--      already refuse a row that starts anywhere but 'pending' and any state
--      change that is not an edge of the machine, so no other state can be
--      written while the guards are on. They are dropped.
--    - max_attempts_range, backoff_range, timeout_range and
--      idempotency_key_length: columns written when a row is inserted and
--      never updated. Each becomes a BEFORE INSERT OR UPDATE OF <column>
--      trigger whose WHEN clause is the same range test: PostgreSQL reads a
--      column trigger's WHEN clause only for a statement that inserts or
--      sets that column, so an update of a step's state never reads it. A
--      value out of range is refused as before, with the same SQLSTATE
--      (23514, check_violation) and the constraint's name.
--
--    tasks_claim_is_whole stays a CHECK: claims set and clear the claim's
--    columns on every claim and release. Like the guards, the triggers do
--    not run with session_replication_role = replica (a logical replica's
--    apply, or a data-only restore that asks for it); invariant_violations()
--    gains rule 10, which reports any row with a state outside its machine
--    or a value out of these ranges.
--
-- 2. claim_steps claimed and read in one statement: an update of the
--    candidates, their history and discovery log, and the read of what the
--    caller holds. A completion that started its dependents calls it only to
--    read those (p_started, no candidates), and still set up the three
--    writes, which wrote nothing, and fired the history's statement trigger.
--    The writes are now their own statement, run only when there are
--    candidates; the read takes the claimed steps and the started ones by
--    key. Their order changes (before: the claimed ones, then the started
--    ones, each as its statement met them); no caller depends on it.
--
-- 3. With enable_seqscan off and a generic plan's guess of ten keys in an
--    array, the planner read keys given as `= ANY (array)` (and the steps of
--    one task) with bitmap scans: a bitmap built and walked for one to four
--    rows, at about 43,000 instructions each, about twice a step. The hot
--    functions now run with enable_bitmapscan off as well, so those are
--    index scans.
--
-- Per step, under scripts/bench-instructions, at one step a round: 3.135
-- million instructions before, 2.643 million after (-15.7%; the three parts
-- alone -10.2%, -4.5% and -1.0%); at 32 steps a round, 627,081 before and
-- 582,839 after (-7.1%; -2.0%, -0.6% and -4.5%).

-- 1. Checks that run only where their columns are written.
ALTER TABLE tasker.workflow_steps
    DROP CONSTRAINT step_state_known,
    DROP CONSTRAINT max_attempts_range,
    DROP CONSTRAINT backoff_range,
    DROP CONSTRAINT timeout_range;
ALTER TABLE tasker.tasks
    DROP CONSTRAINT task_state_known,
    DROP CONSTRAINT idempotency_key_length;

CREATE FUNCTION tasker.refuse_step_budget_out_of_range() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 100, not %', NEW.max_attempts
            USING ERRCODE = 'check_violation', CONSTRAINT = 'max_attempts_range',
                  SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'max_attempts';
    ELSIF NEW.backoff_ms NOT BETWEEN 0 AND 86400000 THEN
        RAISE EXCEPTION 'backoff_ms must be between 0 and 86400000, not %', NEW.backoff_ms
            USING ERRCODE = 'check_violation', CONSTRAINT = 'backoff_range',
                  SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'backoff_ms';
    ELSIF NEW.timeout_ms NOT BETWEEN 1 AND 86400000 THEN
        RAISE EXCEPTION 'timeout_ms must be between 1 and 86400000, not %', NEW.timeout_ms
            USING ERRCODE = 'check_violation', CONSTRAINT = 'timeout_range',
                  SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'timeout_ms';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER workflow_steps_budget_in_range
    BEFORE INSERT OR UPDATE OF max_attempts, backoff_ms, timeout_ms ON tasker.workflow_steps
    FOR EACH ROW
    WHEN (NEW.max_attempts NOT BETWEEN 1 AND 100
          OR NEW.backoff_ms NOT BETWEEN 0 AND 86400000
          OR NEW.timeout_ms NOT BETWEEN 1 AND 86400000)
    EXECUTE FUNCTION tasker.refuse_step_budget_out_of_range();

CREATE FUNCTION tasker.refuse_idempotency_key_length() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF length(NEW.idempotency_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'idempotency_key must be 1 to 255 characters long, not %', length(NEW.idempotency_key)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'idempotency_key_length',
                  SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'idempotency_key';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_idempotency_key_length
    BEFORE INSERT OR UPDATE OF idempotency_key ON tasker.tasks
    FOR EACH ROW
    WHEN (length(NEW.idempotency_key) NOT BETWEEN 1 AND 255)
    EXECUTE FUNCTION tasker.refuse_idempotency_key_length();

-- invariant_violations() gains: 10. Rows hold a state of their machine and
-- values in range (what the dropped CHECK constraints said, for rows written
-- while the triggers were off). 0028's definition keeps rules 1-9 under a
-- new name.
ALTER FUNCTION tasker.invariant_violations() RENAME TO keyed_invariant_violations;

CREATE FUNCTION tasker.invariant_violations()
RETURNS TABLE (invariant text, subject uuid, detail text)
    LANGUAGE sql STABLE AS $$
    SELECT * FROM tasker.keyed_invariant_violations()

    UNION ALL
    -- 10. Rows hold a state of their machine and values in range.
    SELECT 'rows hold known states and values in range', s.step_uuid,
           format('step state %s, max_attempts %s, backoff_ms %s, timeout_ms %s',
                  s.state, s.max_attempts, s.backoff_ms, s.timeout_ms)
    FROM tasker.workflow_steps s
    WHERE s.state NOT IN (SELECT m.from_state FROM tasker.step_state_machine m
                          UNION SELECT m.to_state FROM tasker.step_state_machine m)
       OR s.max_attempts NOT BETWEEN 1 AND 100
       OR s.backoff_ms NOT BETWEEN 0 AND 86400000
       OR s.timeout_ms NOT BETWEEN 1 AND 86400000

    UNION ALL
    SELECT 'rows hold known states and values in range', t.task_uuid,
           format('task state %s, idempotency key of %s characters', t.state, length(t.idempotency_key))
    FROM tasker.tasks t
    WHERE t.state NOT IN (SELECT m.from_state FROM tasker.task_state_machine m
                          UNION SELECT m.to_state FROM tasker.task_state_machine m)
       OR length(t.idempotency_key) NOT BETWEEN 1 AND 255;
$$;

-- 2. A claim that writes only when it has candidates.
CREATE OR REPLACE FUNCTION tasker.claim_steps(
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
    claimed    uuid[];
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

    -- Claim the candidates (one update, its history, and the discovery log
    -- when not woken by an event); a call that only takes up the attempts its
    -- completion started skips this statement, and with it the set-up of
    -- three writes that would write nothing.
    IF coalesce(cardinality(candidates), 0) > 0 THEN
        WITH started AS (
            UPDATE tasker.workflow_steps s
            SET state = 'in_progress', attempts = s.attempts + 1, claimed_by = p_worker_id,
                lease_expires_at = now() + p_lease, started_at = now(), updated_at = now()
            WHERE s.step_uuid = ANY (candidates)
            RETURNING s.step_uuid, s.task_uuid, s.attempts, s.max_attempts, s.enqueued_at
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
        SELECT array_agg(st.step_uuid) INTO claimed FROM started st;
    END IF;

    -- What the caller now holds: the steps just claimed and those its
    -- completion started (p_started, only read here), each read by key with
    -- its state and owner checked outside the probe (OFFSET 0, see 0021).
    -- In no particular order: the worker starts them all, and a sort costs
    -- about 1% of a hop (counted).
    RETURN QUERY
    SELECT st.step_uuid, st.task_uuid, st.namespace, st.name, st.handler, st.config,
           st.attempts, st.max_attempts, st.timeout_ms, st.lease_expires_at,
           (SELECT t.context FROM tasker.tasks t WHERE t.task_uuid = st.task_uuid),
           coalesce((SELECT jsonb_object_agg(p.name, p.result)
                     FROM tasker.workflow_steps p
                     WHERE p.step_uuid = ANY (ARRAY(SELECT e.from_step_uuid
                                                    FROM tasker.workflow_step_edges e
                                                    WHERE e.to_step_uuid = st.step_uuid))), '{}'::jsonb),
           st.enqueued_at, now()
    FROM (SELECT s.* FROM tasker.workflow_steps s
          WHERE s.step_uuid = ANY (coalesce(claimed, '{}') || coalesce(p_started, '{}'))
          OFFSET 0) AS st
    WHERE st.state = 'in_progress' AND st.claimed_by = p_worker_id;
END
$$;


ALTER FUNCTION tasker.claim_steps(text, text, integer, interval, text, uuid[], uuid[])
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;

-- 3. Index scans, not bitmap scans, in every function that runs with
-- sequential scans off.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'tasker'::regnamespace AND 'enable_seqscan=off' = ANY (p.proconfig)
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_bitmapscan = off', f);
    END LOOP;
END
$$;
