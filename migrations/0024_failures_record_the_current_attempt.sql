-- A failure batch records the current attempt's failure, not a stale one's.
--
-- fail_steps had the weakness 0023 fixed in complete_steps: its fence matched
-- input and step on step and attempt, but its UPDATE joined the input on the
-- step alone. When a step appeared twice in one call (a stale attempt's
-- failure beside the current one's, from a worker that lost the step's lease
-- and then claimed it again), the row was updated from whichever input the
-- join met first, so the stale error and its retryable flag could decide the
-- step's next state; and the answer, also joined on the step alone, reported
-- both inputs as accepted.
--
-- Now the UPDATE takes the error and the flag of the input the fence accepted
-- (by its position; of two inputs for the same attempt, the first), and the
-- answer matches step and attempt, one row per input, in input order.

CREATE OR REPLACE FUNCTION tasker.fail_steps(
    p_worker_id  text,
    p_step_uuids uuid[],
    p_attempts   integer[],
    p_errors     text[],
    p_retryable  boolean[]
) RETURNS TABLE (step_uuid uuid, accepted boolean, state text)
    LANGUAGE plpgsql AS $$
DECLARE
    failed_steps    uuid[];
    failed_attempts integer[];
    failed_states   text[];
    woken_tasks     uuid[];
BEGIN
    PERFORM tasker.lock_tasks_of_steps(p_step_uuids);

    WITH input AS (
        SELECT * FROM unnest(p_step_uuids, p_attempts, p_errors, p_retryable) WITH ORDINALITY
            AS i(step_uuid, attempt, error, retryable, n)
    ), locked AS (
        SELECT s.step_uuid, i.n, i.error, i.retryable
        FROM tasker.workflow_steps s JOIN input i ON i.step_uuid = s.step_uuid AND i.attempt = s.attempts
        WHERE s.state = 'in_progress' AND s.claimed_by = p_worker_id
        ORDER BY s.step_uuid
        FOR NO KEY UPDATE OF s
    ), chosen AS (
        SELECT DISTINCT ON (l.step_uuid) l.step_uuid, l.error, l.retryable
        FROM locked l
        ORDER BY l.step_uuid, l.n
    ), failed AS (
        UPDATE tasker.workflow_steps s
        SET state = CASE WHEN c.retryable AND s.attempts < s.max_attempts THEN 'waiting_for_retry'
                         ELSE 'error' END,
            last_error = left(coalesce(c.error, 'unknown error'), 4000),
            next_retry_at = NULL, lease_expires_at = NULL, updated_at = now(),
            completed_at = CASE WHEN c.retryable AND s.attempts < s.max_attempts THEN NULL ELSE now() END
        FROM chosen c
        WHERE s.step_uuid = c.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.attempts, s.max_attempts, s.state, c.error, c.retryable
    ), history AS (
        INSERT INTO tasker.workflow_step_transitions
            (step_uuid, task_uuid, attempt, from_state, to_state, reason, actor)
        SELECT f.step_uuid, f.task_uuid, f.attempts, 'in_progress', f.state,
               format('attempt %s of %s failed%s: %s', f.attempts, f.max_attempts,
                      CASE WHEN NOT f.retryable THEN ' (not retryable)' ELSE '' END,
                      left(coalesce(f.error, 'unknown error'), 500)),
               p_worker_id
        FROM failed f
    )
    SELECT array_agg(f.step_uuid), array_agg(f.attempts), array_agg(f.state), array_agg(DISTINCT f.task_uuid)
    INTO failed_steps, failed_attempts, failed_states, woken_tasks
    FROM failed f;

    IF woken_tasks IS NOT NULL THEN
        PERFORM tasker.wake_tasks(woken_tasks);
    END IF;

    RETURN QUERY
    SELECT i.step_uuid, r.step_uuid IS NOT NULL, r.state
    FROM unnest(p_step_uuids, p_attempts) WITH ORDINALITY AS i(step_uuid, attempt, n)
    LEFT JOIN unnest(failed_steps, failed_attempts, failed_states) AS r(step_uuid, attempt, state)
           ON r.step_uuid = i.step_uuid AND r.attempt = i.attempt
    ORDER BY i.n;
END
$$;

-- CREATE OR REPLACE resets a function's settings (see 0011 and 0014).
ALTER FUNCTION tasker.fail_steps(text, uuid[], integer[], text[], boolean[])
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
