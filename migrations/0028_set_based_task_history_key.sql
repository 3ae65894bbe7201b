-- Task history names its task with a set-based key, as step history has
-- since 0025: one check per statement, not one query and one row lock per
-- history row.
--
-- task_transitions.task_uuid was a foreign key, checked row by row: for
-- every history row PostgreSQL ran a query that finds and locks (FOR KEY
-- SHARE) the task, as a separate executor run. A task writes three history
-- rows (created, started, finished), so under `single` that was three such
-- runs per step, the same load 0025 removed from step history (where it had
-- been 13.5% of the server's CPU samples at three rows a step).
--
-- The guarantees stay, checked once per statement over all its rows:
--
--   - an INSERT of task history that names no task is refused, with the
--     foreign-key error code (23503): a statement-level trigger probes the
--     tasks of the inserted rows by key;
--   - deleting a task (retention) deletes its history, in one statement per
--     deleting statement; truncating the tasks truncates their history.
--
-- As in 0025, neither refuses a change of a task's key (no code changes
-- one), and a data-only restore must load the tasks before their history or
-- run with triggers disabled. What the key did and this does not: lock the
-- task against a concurrent delete between the check and the commit. Every
-- writer of task history inserts it in the statement that creates the task,
-- in the statement that updates it, or after locking it (FOR NO KEY UPDATE)
-- earlier in its transaction, so the task row is already locked against
-- deletion until that transaction ends (and retention deletes only finished
-- tasks, which no longer change); invariant_violations() now reports any
-- task history naming no task.

ALTER TABLE tasker.task_transitions DROP CONSTRAINT task_transitions_task_uuid_fkey;

CREATE FUNCTION tasker.refuse_history_of_no_task() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT h.task_uuid INTO missing
    FROM inserted_history h
    WHERE (SELECT t.task_uuid FROM tasker.tasks t WHERE t.task_uuid = h.task_uuid) IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into task_transitions names task %, which does not exist', missing
            USING ERRCODE = '23503';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER task_transitions_name_a_task
    AFTER INSERT ON tasker.task_transitions
    REFERENCING NEW TABLE AS inserted_history
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.refuse_history_of_no_task();

-- The history's delete runs inside this trigger (pg_trigger_depth() > 1),
-- which the append-only trigger allows, as it allowed the key's cascade.
CREATE FUNCTION tasker.delete_history_of_deleted_tasks() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM tasker.task_transitions h
    WHERE h.task_uuid = ANY (ARRAY(SELECT d.task_uuid FROM deleted_tasks d));
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_delete_history
    AFTER DELETE ON tasker.tasks
    REFERENCING OLD TABLE AS deleted_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.delete_history_of_deleted_tasks();

-- A TRUNCATE that names the history beside its subject has emptied it
-- already and still holds it open, and truncating it again inside the
-- trigger fails ("being used by active queries"): only a history that still
-- has rows is truncated. 0025's trigger for step history had that failure
-- (`TRUNCATE tasker.tasks, tasker.workflow_step_transitions CASCADE` was
-- refused), and is redefined the same way.
CREATE FUNCTION tasker.truncate_history_of_tasks() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.task_transitions) THEN
        TRUNCATE tasker.task_transitions;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_truncate_history
    AFTER TRUNCATE ON tasker.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.truncate_history_of_tasks();

CREATE OR REPLACE FUNCTION tasker.truncate_history_of_steps() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.workflow_step_transitions) THEN
        TRUNCATE tasker.workflow_step_transitions;
    END IF;
    RETURN NULL;
END
$$;

-- invariant_violations() gains: 9. Task history names an existing task.
-- 0025's definition keeps its rules under a new name, and
-- invariant_violations() returns theirs and this one's.
ALTER FUNCTION tasker.invariant_violations() RENAME TO history_invariant_violations;

CREATE FUNCTION tasker.invariant_violations()
RETURNS TABLE (invariant text, subject uuid, detail text)
    LANGUAGE sql STABLE AS $$
    SELECT * FROM tasker.history_invariant_violations()

    UNION ALL
    -- 9. Task history names an existing task (the check is set-based, above).
    SELECT 'task history names an existing task', h.task_uuid,
           format('%s -> %s of a task that does not exist', coalesce(h.from_state, '(start)'), h.to_state)
    FROM tasker.task_transitions h
    WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = h.task_uuid);
$$;
