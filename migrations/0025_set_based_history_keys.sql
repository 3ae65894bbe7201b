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

-- invariant_violations() gains: 8. Step history names an existing step. The
-- rules of 0007 keep their definition under a new name, and
-- invariant_violations() returns theirs and this one's.
ALTER FUNCTION tasker.invariant_violations() RENAME TO state_invariant_violations;

CREATE FUNCTION tasker.invariant_violations()
RETURNS TABLE (invariant text, subject uuid, detail text)
    LANGUAGE sql STABLE AS $$
    SELECT * FROM tasker.state_invariant_violations()

    UNION ALL
    -- 8. Step history names an existing step (the check is set-based, above).
    SELECT 'step history names an existing step', h.step_uuid,
           format('%s -> %s of a step that does not exist', coalesce(h.from_state, '(start)'), h.to_state)
    FROM tasker.workflow_step_transitions h
    WHERE NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s WHERE s.step_uuid = h.step_uuid);
$$;
