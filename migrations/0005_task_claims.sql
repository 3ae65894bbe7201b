-- Orchestrator-side claiming: ready tasks, lease extension and release, and
-- the single decision point for finalization.

-- How tasks were found when not by a notification: every claim made by a poll,
-- a catch-up sweep or a timer, with how long the work had waited. Claims made
-- by notifications (the normal case) are not logged; metrics count them. This
-- is the record an operator (and the PG_NOTIFY miss test) checks misses against.
CREATE TABLE tasker.task_discoveries (
    task_uuid      uuid NOT NULL REFERENCES tasker.tasks (task_uuid) ON DELETE CASCADE,
    claim_seq      bigint NOT NULL,
    claimed_by     text NOT NULL,
    discovered_via text NOT NULL CONSTRAINT discovered_via_known CHECK (discovered_via IN ('poll', 'sweep', 'timer')),
    ready_since    timestamptz,
    claimed_at     timestamptz NOT NULL,
    -- the claim took over an expired one: the wait was a dead orchestrator's
    took_over      boolean NOT NULL,
    PRIMARY KEY (task_uuid, claim_seq)
);
CREATE INDEX task_discoveries_claimed_idx ON tasker.task_discoveries (claimed_at);

-- Tasks whose orchestration is due now and not held by an unexpired claim. A
-- task woken while claimed looks due (ready_at <= now()) but its lease still
-- holds. Served by tasks_due_idx alone: finished tasks are not in that index.
CREATE VIEW tasker.due_tasks AS
    SELECT t.task_uuid, t.namespace, t.priority, t.ready_at, t.ready_since, t.claimed_by
    FROM tasker.tasks t
    WHERE t.ready_at <= now()
      AND (t.claim_expires_at IS NULL OR t.claim_expires_at <= now());

-- Claims up to p_limit tasks whose orchestration is due: highest priority first,
-- then longest waiting. Rows are locked with SKIP LOCKED on the tasks table itself,
-- so concurrent claimers never wait for each other and never take the same row.
-- The claim is a lease: ready_at moves to its expiry, so a claim whose owner dies
-- becomes due again without any rescuer.
CREATE FUNCTION tasker.claim_ready_tasks(
    p_orchestrator_id text,
    p_limit           integer,
    p_claim_timeout   interval,
    p_discovered_via  text
) RETURNS TABLE (
    task_uuid      uuid,
    namespace      text,
    state          text,
    priority       integer,
    ready_since    timestamptz,
    claimed_at     timestamptz,
    claim_seq      bigint,
    wake_seq       bigint,
    created_at     timestamptz,
    took_over      boolean
)
    LANGUAGE plpgsql AS $$
BEGIN
    IF p_discovered_via IS NULL OR p_discovered_via NOT IN ('event', 'poll', 'sweep', 'timer') THEN
        RAISE EXCEPTION 'discovered_via must be event, poll, sweep or timer, not %', coalesce(p_discovered_via, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_claim_timeout IS NULL OR p_claim_timeout <= interval '0'
       OR coalesce(p_orchestrator_id, '') = '' THEN
        RAISE EXCEPTION 'claim_ready_tasks needs an orchestrator id, a positive limit and a positive timeout'
            USING ERRCODE = '22023';
    END IF;

    RETURN QUERY
    WITH due AS (
        -- Locks the tasks rows themselves (the view is expanded in place).
        -- took_over: the previous claim expired (its orchestrator died or hung).
        SELECT d.task_uuid, d.claimed_by IS NOT NULL AS took_over
        FROM tasker.due_tasks d
        ORDER BY d.priority DESC, d.ready_at
        LIMIT p_limit
        FOR NO KEY UPDATE SKIP LOCKED
    )
    , claimed AS (
        UPDATE tasker.tasks t
        SET claimed_by          = p_orchestrator_id,
            claim_expires_at    = now() + p_claim_timeout,
            ready_at            = now() + p_claim_timeout,
            claim_seq           = t.claim_seq + 1,
            last_discovered_via = p_discovered_via,
            updated_at          = now()
        FROM due
        WHERE t.task_uuid = due.task_uuid
        RETURNING t.task_uuid, t.namespace, t.state, t.priority, t.ready_since, t.claim_seq, t.wake_seq,
                  t.created_at, due.took_over
    ), logged AS (
        INSERT INTO tasker.task_discoveries
            (task_uuid, claim_seq, claimed_by, discovered_via, ready_since, claimed_at, took_over)
        SELECT c.task_uuid, c.claim_seq, p_orchestrator_id, p_discovered_via, c.ready_since, now(), c.took_over
        FROM claimed c
        WHERE p_discovered_via <> 'event'
    )
    -- in the order they were chosen
    SELECT c.task_uuid, c.namespace, c.state, c.priority, c.ready_since, now(), c.claim_seq, c.wake_seq,
           c.created_at, c.took_over
    FROM claimed c
    ORDER BY c.priority DESC, c.ready_since;
END
$$;

-- Extends claims this orchestrator still holds (fenced by claim_seq). Returns
-- the tasks whose claim was extended; a missing task means the claim was lost.
CREATE FUNCTION tasker.extend_task_claims(
    p_orchestrator_id text,
    p_task_uuids      uuid[],
    p_claim_seqs      bigint[],
    p_claim_timeout   interval
) RETURNS TABLE (task_uuid uuid, claim_expires_at timestamptz)
    LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(p_task_uuids, p_claim_seqs) AS i(task_uuid, claim_seq)
    ), locked AS (
        SELECT t.task_uuid
        FROM tasker.tasks t JOIN input i ON i.task_uuid = t.task_uuid AND i.claim_seq = t.claim_seq
        WHERE t.claimed_by = p_orchestrator_id AND t.completed_at IS NULL
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE
    )
    UPDATE tasker.tasks t
    -- ready_at equal to the old expiry means nobody woke the task meanwhile: keep
    -- it pinned to the lease. Otherwise it stays at the wake-up time.
    SET ready_at         = CASE WHEN t.ready_at = t.claim_expires_at THEN now() + p_claim_timeout
                                ELSE t.ready_at END,
        claim_expires_at = now() + p_claim_timeout,
        updated_at       = now()
    FROM locked
    WHERE t.task_uuid = locked.task_uuid
    RETURNING t.task_uuid, t.claim_expires_at;
$$;

-- Releases claims. For each task the caller says when it next needs attention
-- (p_next_due: NULL for "only when woken", or a future time, e.g. a retry). If
-- the task was woken while claimed (wake_seq moved), it stays due now instead.
-- Returns every released task and whether it is still due, so the caller can
-- claim again at once rather than wait for a notification that already fired.
CREATE FUNCTION tasker.release_task_claims(
    p_orchestrator_id text,
    p_task_uuids      uuid[],
    p_claim_seqs      bigint[],
    p_wake_seqs       bigint[],
    p_next_due        timestamptz[]
) RETURNS TABLE (task_uuid uuid, still_due boolean)
    LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(p_task_uuids, p_claim_seqs, p_wake_seqs, p_next_due)
            AS i(task_uuid, claim_seq, wake_seq, next_due)
    ), locked AS (
        SELECT t.task_uuid
        FROM tasker.tasks t JOIN input i ON i.task_uuid = t.task_uuid AND i.claim_seq = t.claim_seq
        WHERE t.claimed_by = p_orchestrator_id
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE
    )
    UPDATE tasker.tasks t
    SET claimed_by       = NULL,
        claim_expires_at = NULL,
        ready_at    = CASE WHEN t.completed_at IS NOT NULL THEN NULL
                           WHEN t.wake_seq = i.wake_seq THEN i.next_due
                           ELSE LEAST(t.ready_at, i.next_due) END,
        ready_since = CASE WHEN t.completed_at IS NOT NULL THEN NULL
                           WHEN t.wake_seq = i.wake_seq THEN i.next_due
                           ELSE t.ready_since END,
        updated_at  = now()
    FROM input i, locked
    WHERE t.task_uuid = i.task_uuid AND locked.task_uuid = t.task_uuid
    RETURNING t.task_uuid,
              t.completed_at IS NULL AND t.wake_seq <> i.wake_seq;
$$;

-- The one place that decides whether a task is finished. It locks the task's
-- unfinished steps and then the task row (the schema's lock order), so two
-- callers serialize: the first finalizes, the second finds the task final.
--
-- A task completes when every step completed. It fails when a step failed for
-- good and no step is still enqueued or running (those are allowed to finish);
-- its pending and retry-waiting steps are then cancelled. A caller that does not
-- hold the claim may finalize only if nobody else holds an unexpired claim.
CREATE FUNCTION tasker.claim_task_for_finalization(
    p_task_uuid       uuid,
    p_orchestrator_id text
) RETURNS TABLE (task_uuid uuid, finalized boolean, state text, detail text)
    LANGUAGE plpgsql AS $$
DECLARE
    task        tasker.tasks%ROWTYPE;
    n_steps     integer;
    n_complete  integer;
    n_error     integer;
    n_in_flight integer;
    final_state text;
BEGIN
    SELECT * INTO task FROM tasker.tasks t WHERE t.task_uuid = p_task_uuid FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT p_task_uuid, false, NULL::text, 'no such task';
        RETURN;
    END IF;
    IF task.completed_at IS NOT NULL THEN
        RETURN QUERY SELECT p_task_uuid, false, task.state, 'already final';
        RETURN;
    END IF;
    IF task.claimed_by IS DISTINCT FROM p_orchestrator_id AND task.claim_expires_at > now() THEN
        RETURN QUERY SELECT p_task_uuid, false, task.state, 'claimed by ' || task.claimed_by;
        RETURN;
    END IF;

    -- Steps that are not final cannot change while we look: lock them.
    PERFORM 1 FROM tasker.workflow_steps s
    WHERE s.task_uuid = p_task_uuid AND s.state NOT IN ('complete', 'error', 'cancelled')
    ORDER BY s.step_uuid
    FOR NO KEY UPDATE;

    SELECT count(*),
           count(*) FILTER (WHERE s.state = 'complete'),
           count(*) FILTER (WHERE s.state = 'error'),
           count(*) FILTER (WHERE s.state IN ('enqueued', 'in_progress'))
    INTO n_steps, n_complete, n_error, n_in_flight
    FROM tasker.workflow_steps s
    WHERE s.task_uuid = p_task_uuid;

    IF n_complete = n_steps THEN
        final_state := 'complete';
    ELSIF n_error > 0 AND n_in_flight = 0 THEN
        final_state := 'error';
    ELSE
        RETURN QUERY SELECT p_task_uuid, false, task.state,
            format('not finished: %s of %s steps complete, %s failed, %s in flight',
                   n_complete, n_steps, n_error, n_in_flight);
        RETURN;
    END IF;

    IF final_state = 'error' THEN
        WITH old AS (
            SELECT s.step_uuid, s.state AS from_state
            FROM tasker.workflow_steps s
            WHERE s.task_uuid = p_task_uuid AND s.state IN ('pending', 'waiting_for_retry')
        ), cancelled AS (
            UPDATE tasker.workflow_steps s
            SET state = 'cancelled', next_retry_at = NULL, updated_at = now(), completed_at = now()
            FROM old
            WHERE s.step_uuid = old.step_uuid
            RETURNING s.step_uuid, s.attempts, old.from_state
        )
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT c.step_uuid, p_task_uuid, c.attempts, c.from_state, 'cancelled',
               'task failed: another step failed permanently', p_orchestrator_id
        FROM cancelled c;
    END IF;

    UPDATE tasker.tasks t
    SET state = final_state, completed_at = now(), ready_at = NULL, ready_since = NULL,
        claimed_by = NULL, claim_expires_at = NULL, updated_at = now()
    WHERE t.task_uuid = p_task_uuid;

    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
    VALUES (p_task_uuid, task.state, final_state,
            CASE final_state WHEN 'complete' THEN format('all %s steps complete', n_steps)
                             ELSE format('%s step(s) failed permanently', n_error) END,
            p_orchestrator_id);

    RETURN QUERY SELECT p_task_uuid, true, final_state, 'finalized';
END
$$;

-- Due work nobody has claimed for longer than p_older_than: the periodic check
-- that finds missed notifications even where no instance polls. Reads only the
-- due-work index.
CREATE FUNCTION tasker.overdue_tasks(p_older_than interval) RETURNS bigint
    LANGUAGE sql STABLE
    RETURN (SELECT count(*) FROM tasker.due_tasks d WHERE d.ready_at < now() - p_older_than);

-- Due-work depth per namespace: tasks due for orchestration and steps waiting
-- for a worker. Reads only the two due-work indexes.
CREATE FUNCTION tasker.due_work_by_namespace()
RETURNS TABLE (namespace text, due_tasks bigint, enqueued_steps bigint)
    LANGUAGE sql STABLE AS $$
    SELECT n.name,
           (SELECT count(*) FROM tasker.due_tasks d WHERE d.namespace = n.name),
           (SELECT count(*) FROM tasker.workflow_steps s WHERE s.state = 'enqueued' AND s.namespace = n.name)
    FROM tasker.namespaces n
    ORDER BY n.name;
$$;
