-- Notification channels and task wake-ups.
--
-- NOTIFY is a hint (see DESIGN.md): it only wakes a listener sooner. Payloads are
-- never needed for correctness. Channel names are defined here, once; services
-- ask for them with `SELECT tasker.task_channel()` / `tasker.step_channel($1)`.

CREATE FUNCTION tasker.task_channel() RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 'tasker_tasks';

-- Namespaces are identifiers of at most 48 characters, so this stays within
-- PostgreSQL's 63-byte limit and can never contain a quote.
CREATE FUNCTION tasker.step_channel(namespace text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF NOT coalesce(tasker.is_identifier(namespace), false) THEN
        RAISE EXCEPTION 'namespace % is not an identifier', coalesce(quote_literal(namespace), 'NULL')
            USING ERRCODE = 'TK004';
    END IF;
    RETURN 'tasker_steps_' || namespace;
END
$$;

-- Listened to by catch-all workers, which follow every namespace's step channel.
CREATE FUNCTION tasker.namespace_channel() RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 'tasker_namespaces';

CREATE FUNCTION tasker.announce_namespace() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(tasker.namespace_channel(), NEW.name);
    RETURN NULL;
END
$$;

CREATE TRIGGER namespaces_announce AFTER INSERT ON tasker.namespaces
    FOR EACH ROW EXECUTE FUNCTION tasker.announce_namespace();

-- Marks tasks as having orchestration work due now, and notifies the task
-- channel once. Terminal tasks are left alone. A task that is currently claimed
-- stays claimed (claim_ready_tasks skips it until release or expiry), but its
-- wake_seq moves, so the releasing orchestrator sees that work arrived.
--
-- Lock order (everywhere in this schema): task rows by task_uuid, then step rows
-- by step_uuid. Callers that already hold the task locks lose nothing by this.
CREATE FUNCTION tasker.wake_tasks(p_task_uuids uuid[]) RETURNS integer
    LANGUAGE plpgsql AS $$
DECLARE
    woken integer;
BEGIN
    WITH locked AS (
        SELECT t.task_uuid
        FROM tasker.tasks t
        WHERE t.task_uuid = ANY (p_task_uuids) AND t.completed_at IS NULL
        ORDER BY t.task_uuid
        FOR NO KEY UPDATE
    ), woken_rows AS (
        UPDATE tasker.tasks t
        SET ready_since = CASE WHEN t.ready_at IS NULL OR t.ready_at > now() THEN now()
                               ELSE t.ready_since END,
            ready_at    = LEAST(t.ready_at, now()),
            wake_seq    = t.wake_seq + 1,
            updated_at  = now()
        FROM locked
        WHERE t.task_uuid = locked.task_uuid
        RETURNING 1
    )
    SELECT count(*) INTO woken FROM woken_rows;

    IF woken > 0 THEN
        PERFORM pg_notify(tasker.task_channel(), '');
    END IF;
    RETURN woken;
END
$$;

-- Takes the row locks of the tasks that own these steps, in task_uuid order:
-- the first half of the schema's lock order, for functions that then write steps.
CREATE FUNCTION tasker.lock_tasks_of_steps(p_step_uuids uuid[]) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM tasker.tasks t
    WHERE t.task_uuid IN (SELECT s.task_uuid FROM tasker.workflow_steps s
                          WHERE s.step_uuid = ANY (p_step_uuids))
    ORDER BY t.task_uuid
    FOR NO KEY UPDATE OF t;
END
$$;
