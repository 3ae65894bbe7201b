-- Step history names its step with a set-based key: one check per statement,
-- not one query and one row lock per history row.
--
-- workflow_step_transitions.step_uuid was a foreign key. PostgreSQL checks a
-- foreign key row by row: for every history row it runs a query that finds
-- and locks (FOR KEY SHARE) the step, as a separate executor run. With
-- workers claiming and completing a few hundred steps per statement
-- (Round 17's prefetch), that per-row work became the largest single cost
-- after the index writes: under bench-functions at 240 steps a call, the
-- foreign-key checks were 13.5% of the server's CPU samples (`perf`,
-- SPI_execute_snapshot under AfterTriggerEndQuery), for about three history
-- rows a step.
--
-- The guarantees stay, checked once per statement over all its rows:
--
--   - an INSERT of step history that names no step is refused, with the
--     foreign-key error code (23503): a statement-level trigger probes the
--     steps of the inserted rows by key (a scalar subquery per row, never a
--     join the planner could turn into a scan);
--   - deleting a step (by the cascade from its task, as retention does)
--     deletes its history, in one statement per deleting statement (the
--     cascade's deletes count as part of the statement that caused them, so
--     a retention batch of many tasks is one trigger call); truncating the
--     steps truncates their history.
--
-- Neither refuses a change of a step's key (no code changes one), and a
-- data-only restore must load the steps before their history or run with
-- triggers disabled.
--
-- What the key did and this does not: lock the step against a concurrent
-- delete between the check and the commit. Every writer of step history is
-- a function that inserts it in the statement that updates the step (from
-- the UPDATE's RETURNING), so the step row is already locked against
-- deletion until that transaction ends; a hand-written INSERT racing a
-- delete could leave a row naming no step, and invariant_violations() now
-- reports such a row.

ALTER TABLE tasker.workflow_step_transitions DROP CONSTRAINT workflow_step_transitions_step_uuid_fkey;

CREATE FUNCTION tasker.refuse_history_of_no_step() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT h.step_uuid INTO missing
    FROM inserted_history h
    WHERE (SELECT s.step_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = h.step_uuid) IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into workflow_step_transitions names step %, which does not exist', missing
            USING ERRCODE = '23503';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_step_transitions_name_a_step
    AFTER INSERT ON tasker.workflow_step_transitions
    REFERENCING NEW TABLE AS inserted_history
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.refuse_history_of_no_step();

-- The history's delete runs inside this trigger (pg_trigger_depth() > 1), which
-- the append-only trigger allows, as it allowed the foreign key's cascade.
CREATE FUNCTION tasker.delete_history_of_deleted_steps() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM tasker.workflow_step_transitions h
    WHERE h.step_uuid = ANY (ARRAY(SELECT d.step_uuid FROM deleted_steps d));
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_steps_delete_history
    AFTER DELETE ON tasker.workflow_steps
    REFERENCING OLD TABLE AS deleted_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.delete_history_of_deleted_steps();

-- TRUNCATE does not fire delete triggers; the key made `TRUNCATE ... CASCADE`
-- of the steps (or of the tasks) empty the history too, and so does this.
CREATE FUNCTION tasker.truncate_history_of_steps() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE tasker.workflow_step_transitions;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_steps_truncate_history
    AFTER TRUNCATE ON tasker.workflow_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.truncate_history_of_steps();

-- invariant_violations() gains: 8. Step history names an existing step.
CREATE OR REPLACE FUNCTION tasker.invariant_violations()
RETURNS TABLE (invariant text, subject uuid, detail text)
    LANGUAGE sql STABLE AS $$
    -- 1. A task's state is the target of its latest transition.
    SELECT 'task state matches its history', t.task_uuid,
           format('state %s, last transition to %s', t.state, h.to_state)
    FROM tasker.tasks t
    LEFT JOIN LATERAL (SELECT tt.to_state FROM tasker.task_transitions tt
                       WHERE tt.task_uuid = t.task_uuid
                       ORDER BY tt.transition_id DESC LIMIT 1) h ON true
    WHERE h.to_state IS DISTINCT FROM t.state

    UNION ALL
    -- 2. A step's state is the target of its latest transition (or pending if none).
    SELECT 'step state matches its history', s.step_uuid,
           format('state %s, last transition to %s', s.state, coalesce(h.to_state, '(none)'))
    FROM tasker.workflow_steps s
    LEFT JOIN LATERAL (SELECT st.to_state FROM tasker.workflow_step_transitions st
                       WHERE st.step_uuid = s.step_uuid
                       ORDER BY st.transition_id DESC LIMIT 1) h ON true
    WHERE coalesce(h.to_state, 'pending') <> s.state

    UNION ALL
    -- 3. Histories are chains: each transition starts where the previous one ended,
    --    and every edge is in the state machine.
    SELECT 'task history is a chain of allowed transitions', c.task_uuid,
           format('%s -> %s after %s', c.from_state, c.to_state, coalesce(c.prev, '(start)'))
    FROM (SELECT tt.*, lag(tt.to_state) OVER (PARTITION BY tt.task_uuid ORDER BY tt.transition_id) AS prev
          FROM tasker.task_transitions tt) c
    WHERE c.from_state IS DISTINCT FROM c.prev
       OR (c.from_state IS NULL AND c.to_state <> 'pending')
       OR (c.from_state IS NOT NULL AND NOT EXISTS (
              SELECT 1 FROM tasker.task_state_machine m
              WHERE m.from_state = c.from_state AND m.to_state = c.to_state))

    UNION ALL
    SELECT 'step history is a chain of allowed transitions', c.step_uuid,
           format('%s -> %s after %s', c.from_state, c.to_state, coalesce(c.prev, '(start)'))
    FROM (SELECT st.*, lag(st.to_state) OVER (PARTITION BY st.step_uuid ORDER BY st.transition_id) AS prev
          FROM tasker.workflow_step_transitions st) c
    WHERE c.from_state IS DISTINCT FROM coalesce(c.prev, 'pending')
       OR NOT EXISTS (SELECT 1 FROM tasker.step_state_machine m
                      WHERE m.from_state = c.from_state AND m.to_state = c.to_state)

    UNION ALL
    -- 4. Each attempt of a step started at most once, and a step completed at most once.
    SELECT 'each attempt starts at most once', st.step_uuid,
           format('attempt %s started %s times', st.attempt, count(*))
    FROM tasker.workflow_step_transitions st
    WHERE st.to_state = 'in_progress'
    GROUP BY st.step_uuid, st.attempt
    HAVING count(*) > 1

    UNION ALL
    SELECT 'a step completes at most once', st.step_uuid, format('completed %s times', count(*))
    FROM tasker.workflow_step_transitions st
    WHERE st.to_state = 'complete'
    GROUP BY st.step_uuid
    HAVING count(*) > 1

    UNION ALL
    -- 5. Attempts never exceed the step's budget.
    SELECT 'attempts within max_attempts', s.step_uuid,
           format('%s attempts of %s allowed', s.attempts, s.max_attempts)
    FROM tasker.workflow_steps s
    WHERE s.attempts > s.max_attempts

    UNION ALL
    -- 6. Final tasks are final everywhere: no claim, nothing due, a completion time,
    --    and a complete task has only complete steps.
    SELECT 'final tasks hold no claim and no due work', t.task_uuid,
           format('state %s, ready_at %s, claimed_by %s, completed_at %s',
                  t.state, t.ready_at, t.claimed_by, t.completed_at)
    FROM tasker.tasks t
    WHERE (t.state IN ('complete', 'error', 'cancelled'))
          <> (t.completed_at IS NOT NULL)
       OR (t.completed_at IS NOT NULL AND (t.ready_at IS NOT NULL OR t.claimed_by IS NOT NULL))

    UNION ALL
    SELECT 'a complete task has only complete steps', t.task_uuid,
           format('%s step(s) not complete', count(*))
    FROM tasker.tasks t
    JOIN tasker.workflow_steps s ON s.task_uuid = t.task_uuid
    WHERE t.state = 'complete' AND s.state <> 'complete'
    GROUP BY t.task_uuid

    UNION ALL
    -- 7. A final task has no step left running or waiting.
    SELECT 'a final task has no unfinished step', t.task_uuid,
           format('step %s is %s', s.name, s.state)
    FROM tasker.tasks t
    JOIN tasker.workflow_steps s ON s.task_uuid = t.task_uuid
    WHERE t.completed_at IS NOT NULL
      AND s.state NOT IN ('complete', 'error', 'cancelled')

    UNION ALL
    -- 8. Step history names an existing step (the check is set-based, 0025).
    SELECT 'step history names an existing step', h.step_uuid,
           format('%s -> %s of a step that does not exist', coalesce(h.from_state, '(start)'), h.to_state)
    FROM tasker.workflow_step_transitions h
    WHERE NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s WHERE s.step_uuid = h.step_uuid);
$$;
