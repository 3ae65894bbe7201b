-- Steps name their task, and edges their steps, with set-based keys: one
-- check per statement, not one query and one row lock per row. History
-- made the same change in 0025 and 0028.
--
-- A four-step chain's submission inserts four steps and three edges, whose
-- foreign keys PostgreSQL checked row by row: for every row and key a query
-- that finds and locks (FOR KEY SHARE) the task or step, as an executor run
-- of its own, ten of the twelve key checks of a chain (the task's namespace
-- and template are the other two). Counted with `scripts/bench-instructions
-- --submit` (see docs/benchmarks.md, Round 23), the foreign-key checks of a
-- submission's inserted rows were 15.1% of its instructions (433,688 of
-- 2,865,295), and those of the rows its start updates 3.5% more (PostgreSQL
-- checks a row's keys again when the transaction that inserted it updates
-- it; one of those three re-checks is a step's). With set-based keys a
-- submission costs 7.9% less (2,862,990 -> 2,636,053), 21.6% less at 32
-- tasks a call.
--
-- The guarantees stay, checked once per statement over all its rows:
--
--   - an INSERT of steps that names no task, or of edges that name no step
--     (at either end), is refused with the foreign-key error code (23503):
--     a statement-level trigger probes the inserted rows' tasks or steps by
--     key;
--   - deleting tasks (retention) deletes their steps, and deleting steps
--     deletes their edges, in one statement per deleting statement, as the
--     keys' cascades did (the steps' history and discoveries go with the
--     steps as before); truncating the tasks truncates the steps, and
--     truncating the steps the edges.
--
-- As in 0025 and 0028, none of this refuses a change of a key (no code
-- changes one), and a data-only restore must load tasks, steps and edges in
-- that order or run with triggers disabled. What the keys did and this does
-- not: lock the task or step against a concurrent delete between the check
-- and the commit. Steps and edges are inserted only by create_tasks(), in the
-- statement that inserts their task, which no other transaction can see
-- until it commits; invariant_violations() now reports a step naming no
-- task and an edge naming no step, which a hand-written INSERT racing a
-- delete could leave.

ALTER TABLE tasker.workflow_steps DROP CONSTRAINT workflow_steps_task_uuid_fkey;
ALTER TABLE tasker.workflow_step_edges DROP CONSTRAINT workflow_step_edges_to_step_uuid_fkey;
ALTER TABLE tasker.workflow_step_edges DROP CONSTRAINT workflow_step_edges_from_step_uuid_fkey;

CREATE FUNCTION tasker.refuse_steps_of_no_task() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT s.task_uuid INTO missing
    FROM inserted_steps s
    WHERE (SELECT t.task_uuid FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid) IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into workflow_steps names task %, which does not exist', missing
            USING ERRCODE = '23503';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_steps_name_a_task
    AFTER INSERT ON tasker.workflow_steps
    REFERENCING NEW TABLE AS inserted_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.refuse_steps_of_no_task();

CREATE FUNCTION tasker.refuse_edges_of_no_step() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT e.step_uuid INTO missing
    FROM inserted_edges i
    CROSS JOIN LATERAL (VALUES (i.to_step_uuid), (i.from_step_uuid)) AS e(step_uuid)
    WHERE (SELECT s.step_uuid FROM tasker.workflow_steps s WHERE s.step_uuid = e.step_uuid) IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into workflow_step_edges names step %, which does not exist', missing
            USING ERRCODE = '23503';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_step_edges_name_steps
    AFTER INSERT ON tasker.workflow_step_edges
    REFERENCING NEW TABLE AS inserted_edges
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.refuse_edges_of_no_step();

-- The cascades. Deleting the steps fires their own statement-level triggers
-- (their history, their edges) and their discoveries' foreign key.
CREATE FUNCTION tasker.delete_steps_of_deleted_tasks() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM tasker.workflow_steps s
    WHERE s.task_uuid = ANY (ARRAY(SELECT d.task_uuid FROM deleted_tasks d));
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_delete_steps
    AFTER DELETE ON tasker.tasks
    REFERENCING OLD TABLE AS deleted_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.delete_steps_of_deleted_tasks();

CREATE FUNCTION tasker.delete_edges_of_deleted_steps() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    deleted uuid[] := ARRAY(SELECT d.step_uuid FROM deleted_steps d);
BEGIN
    DELETE FROM tasker.workflow_step_edges e WHERE e.to_step_uuid = ANY (deleted);
    DELETE FROM tasker.workflow_step_edges e WHERE e.from_step_uuid = ANY (deleted);
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_steps_delete_edges
    AFTER DELETE ON tasker.workflow_steps
    REFERENCING OLD TABLE AS deleted_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.delete_edges_of_deleted_steps();

-- As 0028's history triggers: a TRUNCATE that named the steps or edges too
-- has emptied them already and still holds them open, so only a table that
-- still has rows is truncated. The steps' discoveries keep their foreign
-- key, so the steps are truncated together with them. A statement that
-- named the discoveries holds them open too, and they cannot be named again
-- (object_in_use): then the steps are deleted instead, which the key's
-- cascade and the steps' own triggers follow.
CREATE FUNCTION tasker.truncate_steps_of_tasks() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.workflow_steps) THEN
        BEGIN
            TRUNCATE tasker.workflow_steps, tasker.step_discoveries;
        EXCEPTION WHEN object_in_use THEN
            DELETE FROM tasker.workflow_steps;
        END;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_truncate_steps
    AFTER TRUNCATE ON tasker.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.truncate_steps_of_tasks();

CREATE FUNCTION tasker.truncate_edges_of_steps() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasker.workflow_step_edges) THEN
        TRUNCATE tasker.workflow_step_edges;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_steps_truncate_edges
    AFTER TRUNCATE ON tasker.workflow_steps
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.truncate_edges_of_steps();

-- The cascades' deletes probe by key, as the keys' cascades did, whatever
-- the tables held when a session planned them: a trigger function's
-- statements take no parameters, so a session keeps the plan it made first,
-- and one made while the steps were few could scan them ever after. History's
-- cascades (0025, 0028) get the same settings.
ALTER FUNCTION tasker.delete_steps_of_deleted_tasks() SET enable_seqscan = off SET enable_bitmapscan = off;
ALTER FUNCTION tasker.delete_edges_of_deleted_steps() SET enable_seqscan = off SET enable_bitmapscan = off;
ALTER FUNCTION tasker.delete_history_of_deleted_steps() SET enable_seqscan = off SET enable_bitmapscan = off;
ALTER FUNCTION tasker.delete_history_of_deleted_tasks() SET enable_seqscan = off SET enable_bitmapscan = off;

-- invariant_violations() gains: 11. Steps name an existing task, and edges
-- existing steps. 0029's definition keeps its rules under a new name.
ALTER FUNCTION tasker.invariant_violations() RENAME TO range_invariant_violations;

CREATE FUNCTION tasker.invariant_violations()
RETURNS TABLE (invariant text, subject uuid, detail text)
    LANGUAGE sql STABLE AS $$
    SELECT * FROM tasker.range_invariant_violations()

    UNION ALL
    -- 11. Steps name an existing task (the check is set-based, above).
    SELECT 'steps and edges name existing tasks and steps', s.step_uuid,
           format('step %s of a task that does not exist', s.name)
    FROM tasker.workflow_steps s
    WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid)

    UNION ALL
    -- ... and edges existing steps.
    SELECT 'steps and edges name existing tasks and steps', e.to_step_uuid,
           format('edge from %s to %s, %s', e.from_step_uuid, e.to_step_uuid,
                  CASE WHEN NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s WHERE s.step_uuid = e.to_step_uuid)
                       THEN 'whose dependent step does not exist'
                       ELSE 'whose dependency step does not exist' END)
    FROM tasker.workflow_step_edges e
    WHERE NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s WHERE s.step_uuid = e.to_step_uuid)
       OR NOT EXISTS (SELECT 1 FROM tasker.workflow_steps s WHERE s.step_uuid = e.from_step_uuid);
$$;
