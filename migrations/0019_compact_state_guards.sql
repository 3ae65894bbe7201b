-- State guards whose WHEN clause is one array lookup.
--
-- 0017 wrote each machine's edges into its guard trigger's WHEN clause as a
-- row comparison per edge: about 10 kB of stored expression per trigger.
-- PostgreSQL reads a trigger's WHEN clause back from that text once per
-- statement that updates the table, so every UPDATE of a step or a task
-- parsed it again: under `tasker bench latency`, where most statements
-- update one row, that parsing was 3.7% of the server's CPU time (`perf`,
-- stringToNode under ExecBRUpdateTriggersNew). The clause now compares
-- 'from>to' against one constant array of the machine's edges (about 2 kB
-- stored); the per-row check compares about ten short strings. What a
-- guard allows and rejects is unchanged: the same
-- edges, from the same tables, and the same TK001 error from guard_state()
-- for a transition it rejects.

CREATE OR REPLACE FUNCTION tasker.install_state_guards() RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    guard record;
    edges text[];
BEGIN
    FOR guard IN SELECT * FROM (VALUES
        ('task', 'tasks', 'tasks_state_guard', 'task_state_machine'),
        ('step', 'workflow_steps', 'workflow_steps_state_guard', 'step_state_machine'))
        AS g(machine, rel, trigger_name, machine_table)
    LOOP
        EXECUTE format(
            'SELECT array_agg(m.from_state || ''>'' || m.to_state ORDER BY m.from_state, m.to_state)
             FROM (SELECT DISTINCT from_state, to_state FROM tasker.%I) AS m', guard.machine_table)
        INTO edges;
        IF edges IS NULL THEN
            RAISE EXCEPTION 'tasker.% is empty: refusing to install a guard that rejects every transition',
                guard.machine_table;
        END IF;
        -- 'from>to' names an edge only while no state contains '>'.
        IF EXISTS (SELECT 1 FROM unnest(edges) AS e WHERE e LIKE '%>%>%') THEN
            RAISE EXCEPTION 'tasker.% has a state containing ''>'': cannot write its guard', guard.machine_table;
        END IF;
        -- CREATE OR REPLACE (not DROP and CREATE) locks the table against
        -- writes only, not reads, while the migration's transaction lasts.
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I BEFORE UPDATE OF state ON tasker.%I
                 FOR EACH ROW
                 WHEN (OLD.state IS DISTINCT FROM NEW.state AND NOT (OLD.state || ''>'' || NEW.state) = ANY (%L::text[]))
                 EXECUTE FUNCTION tasker.guard_state(%L)',
            guard.trigger_name, guard.rel, edges::text, guard.machine);
    END LOOP;
END
$$;

SELECT tasker.install_state_guards();
