-- State guards that cost a function call only when they reject.
--
-- The guards of 0002 called tasker.guard_state() for every state change, and
-- that PL/pgSQL call (plus the lookup it runs) is about a tenth of the
-- server's CPU time under `tasker bench diamond`: each step changes state
-- three times. The triggers now carry the machine's edges in their WHEN
-- clause, which the executor evaluates inline, so a valid transition costs a
-- few text comparisons and the function runs only for a transition it will
-- reject (with the same TK001 error as before).
--
-- The edges are read from the machine tables, which stay the SQL source (the
-- tests check them against the Rust tables, and check every ordered pair of
-- states against the triggers themselves). A migration that changes a machine
-- table must call tasker.install_state_guards() afterwards; the test
-- `state_guards_list_the_machine_tables_edges` fails if it does not.

CREATE FUNCTION tasker.install_state_guards() RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    guard record;
    edges text;
BEGIN
    FOR guard IN SELECT * FROM (VALUES
        ('task', 'tasks', 'tasks_state_guard', 'task_state_machine'),
        ('step', 'workflow_steps', 'workflow_steps_state_guard', 'step_state_machine'))
        AS g(machine, rel, trigger_name, machine_table)
    LOOP
        EXECUTE format(
            'SELECT string_agg(format(''(%%L, %%L)'', m.from_state, m.to_state), '', ''
                               ORDER BY m.from_state, m.to_state)
             FROM (SELECT DISTINCT from_state, to_state FROM tasker.%I) AS m', guard.machine_table)
        INTO edges;
        IF edges IS NULL THEN
            RAISE EXCEPTION 'tasker.% is empty: refusing to install a guard that rejects every transition',
                guard.machine_table;
        END IF;
        -- CREATE OR REPLACE (not DROP and CREATE) locks the table against
        -- writes only, not reads, while the migration's transaction lasts.
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I BEFORE UPDATE OF state ON tasker.%I
                 FOR EACH ROW
                 WHEN (OLD.state IS DISTINCT FROM NEW.state AND (OLD.state, NEW.state) NOT IN (%s))
                 EXECUTE FUNCTION tasker.guard_state(%L)',
            guard.trigger_name, guard.rel, edges, guard.machine);
    END LOOP;
END
$$;

SELECT tasker.install_state_guards();
