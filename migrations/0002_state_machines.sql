-- The task and step state machines, as data. The Rust transition tables in
-- tasker-shared/src/state_machine/ are the source; these rows mirror them, and a
-- test fails if the two ever differ. The guard triggers below reject any state
-- change that is not listed here, whoever issues it (our code, psql, a script).

CREATE TABLE tasker.task_state_machine (
    from_state text NOT NULL,
    event      text NOT NULL,
    to_state   text NOT NULL,
    PRIMARY KEY (from_state, event)
);

INSERT INTO tasker.task_state_machine (from_state, event, to_state) VALUES
    ('pending',             'start',          'steps_in_process'),
    ('pending',             'cancel',         'cancelled'),
    ('steps_in_process',    'wait_for_retry', 'waiting_for_retry'),
    ('steps_in_process',    'block',          'blocked_by_failures'),
    ('steps_in_process',    'complete',       'complete'),
    ('steps_in_process',    'fail',           'error'),
    ('steps_in_process',    'cancel',         'cancelled'),
    ('waiting_for_retry',   'resume',         'steps_in_process'),
    ('waiting_for_retry',   'cancel',         'cancelled'),
    ('blocked_by_failures', 'fail',           'error'),
    ('blocked_by_failures', 'cancel',         'cancelled');

CREATE TABLE tasker.step_state_machine (
    from_state text NOT NULL,
    event      text NOT NULL,
    to_state   text NOT NULL,
    PRIMARY KEY (from_state, event)
);

INSERT INTO tasker.step_state_machine (from_state, event, to_state) VALUES
    ('pending',           'enqueue',  'enqueued'),
    ('pending',           'cancel',   'cancelled'),
    ('enqueued',          'start',    'in_progress'),
    ('enqueued',          'cancel',   'cancelled'),
    ('in_progress',       'complete', 'complete'),
    ('in_progress',       'retry',    'waiting_for_retry'),
    ('in_progress',       'fail',     'error'),
    ('in_progress',       'cancel',   'cancelled'),
    ('waiting_for_retry', 'enqueue',  'enqueued'),
    ('waiting_for_retry', 'cancel',   'cancelled');

ALTER TABLE tasker.tasks ADD CONSTRAINT task_state_known CHECK (state IN
    ('pending', 'steps_in_process', 'waiting_for_retry', 'blocked_by_failures',
     'complete', 'error', 'cancelled'));
ALTER TABLE tasker.workflow_steps ADD CONSTRAINT step_state_known CHECK (state IN
    ('pending', 'enqueued', 'in_progress', 'waiting_for_retry', 'complete', 'error', 'cancelled'));

-- Rows start in 'pending', and every later state change must be an edge of the
-- machine. TG_ARGV[0] names the machine ('task' or 'step'). SQLSTATE TK001 lets
-- clients map the error to a typed one.
CREATE FUNCTION tasker.guard_state() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    machine text := TG_ARGV[0];
    allowed boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        RAISE EXCEPTION 'a % must start in state pending, not %', machine, NEW.state
            USING ERRCODE = 'TK001';
    END IF;
    IF machine = 'task' THEN
        allowed := EXISTS (SELECT 1 FROM tasker.task_state_machine m
                           WHERE m.from_state = OLD.state AND m.to_state = NEW.state);
    ELSE
        allowed := EXISTS (SELECT 1 FROM tasker.step_state_machine m
                           WHERE m.from_state = OLD.state AND m.to_state = NEW.state);
    END IF;
    IF NOT allowed THEN
        RAISE EXCEPTION 'invalid % transition % -> %', machine, OLD.state, NEW.state
            USING ERRCODE = 'TK001';
    END IF;
    RETURN NEW;
END
$$;

-- The WHEN clauses keep the guards off the hot path unless a state changes.
CREATE TRIGGER tasks_initial_state BEFORE INSERT ON tasker.tasks
    FOR EACH ROW WHEN (NEW.state <> 'pending') EXECUTE FUNCTION tasker.guard_state('task');
CREATE TRIGGER tasks_state_guard BEFORE UPDATE OF state ON tasker.tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION tasker.guard_state('task');
CREATE TRIGGER workflow_steps_initial_state BEFORE INSERT ON tasker.workflow_steps
    FOR EACH ROW WHEN (NEW.state <> 'pending') EXECUTE FUNCTION tasker.guard_state('step');
CREATE TRIGGER workflow_steps_state_guard BEFORE UPDATE OF state ON tasker.workflow_steps
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION tasker.guard_state('step');
