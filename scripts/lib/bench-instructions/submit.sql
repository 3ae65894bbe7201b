-- bench-instructions --submit, run once before the rounds: the statements
-- of a submission, prepared as sqlx prepares them in the API's connections.
-- The rounds pass their rows as literal arrays, as the API binds them.
--
-- Every side reads the template first (the statement of find_template()).
-- From 0032 on a submission is then one statement (tasker.create_tasks);
-- before, and with --two-calls, BEGIN, the insert of tasks, steps, edges and
-- history (as tasker-shared/src/tasks.rs sent it before 0032), start_tasks,
-- and COMMIT.
PREPARE find_template(text, text, text) AS
SELECT template_id, namespace, name, version, definition, created_at
FROM tasker.task_templates
WHERE namespace = $1 AND name = $2 AND ($3::text IS NULL OR version = $3)
ORDER BY string_to_array(version, '.')::int[] DESC
LIMIT 1;

PREPARE insert_round(uuid[], bigint[], text[], int[], jsonb[], text[], uuid[], uuid[], text[], text[], text[],
                     int[], jsonb[], int[], int[], int[], uuid[], uuid[], uuid[], text) AS
WITH new_tasks AS (
    INSERT INTO tasker.tasks (task_uuid, template_id, namespace, priority, context,
                              idempotency_key, ready_at, ready_since)
    SELECT t.*, now(), now()
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::int[], $5::jsonb[], $6::text[]) AS t
    ON CONFLICT ON CONSTRAINT tasks_idempotency_key_unique DO NOTHING
    RETURNING task_uuid
), new_steps AS (
    INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace, priority,
                                       config, max_attempts, backoff_ms, timeout_ms)
    SELECT s.*
    FROM unnest($7::uuid[], $8::uuid[], $9::text[], $10::text[], $11::text[], $12::int[],
                $13::jsonb[], $14::int[], $15::int[], $16::int[])
         AS s(step_uuid, task_uuid, name, handler, namespace, priority, config,
              max_attempts, backoff_ms, timeout_ms)
    WHERE s.task_uuid IN (SELECT task_uuid FROM new_tasks)
), new_edges AS (
    INSERT INTO tasker.workflow_step_edges (to_step_uuid, from_step_uuid)
    SELECT e.to_step, e.from_step
    FROM unnest($17::uuid[], $18::uuid[], $19::uuid[]) AS e(task_uuid, to_step, from_step)
    WHERE e.task_uuid IN (SELECT task_uuid FROM new_tasks)
), history AS (
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, reason, actor)
    SELECT task_uuid, NULL, 'pending', 'created', $20 FROM new_tasks
)
SELECT task_uuid FROM new_tasks;

PREPARE start_round(uuid[], text) AS
SELECT task_uuid FROM tasker.start_tasks($1, $2);
