-- History is keyed by what it is the history of: one index per history
-- table instead of two.
--
-- Each history table had a primary key on transition_id alone and a second
-- index on (step_uuid, transition_id) or (task_uuid, transition_id), the one
-- every reader uses: a task's or a step's history in order, the cascade and
-- the retention delete by task or step, the audit's next-transition lookup.
-- Nothing reads a history row by transition_id alone. Every transition
-- inserted an entry into both; since 0026 a `diamond` step writes 2.33 step
-- history rows and a task two or three task history rows, so the first
-- index cost about three index insertions (and their WAL) per step on the
-- hot path, for no reader.
--
-- The reader's index becomes the primary key: (step_uuid, transition_id) and
-- (task_uuid, transition_id) are unique because transition_id is (an
-- identity), and transition_id keeps the order within a step or task.
--
-- Building the new keys reads each history table once and holds an ACCESS
-- EXCLUSIVE lock on it meanwhile, so every transition waits until it is
-- done: with a large history, apply it while the services are stopped
-- (docs/deployment.md).

ALTER TABLE tasker.workflow_step_transitions DROP CONSTRAINT workflow_step_transitions_pkey;
DROP INDEX tasker.workflow_step_transitions_step_idx;
ALTER TABLE tasker.workflow_step_transitions
    ADD CONSTRAINT workflow_step_transitions_pkey PRIMARY KEY (step_uuid, transition_id);

ALTER TABLE tasker.task_transitions DROP CONSTRAINT task_transitions_pkey;
DROP INDEX tasker.task_transitions_task_idx;
ALTER TABLE tasker.task_transitions
    ADD CONSTRAINT task_transitions_pkey PRIMARY KEY (task_uuid, transition_id);
