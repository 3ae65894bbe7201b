-- bench-instructions: :tasks linear four-step tasks (a -> b -> c -> d), as
-- `tasker bench latency` runs them, started, so their first steps are
-- enqueued. Keys are derived from the row numbers, not random, so that every
-- run builds the same indexes and counts the same instructions.
SET client_min_messages = warning;
INSERT INTO tasker.namespaces VALUES ('bench');
INSERT INTO tasker.task_templates (namespace, name, version, definition)
SELECT 'bench', 'chain', '1.0.0',
       '{"steps": [{"name": "a", "handler": "noop"},
                   {"name": "b", "handler": "noop", "depends_on": ["a"]},
                   {"name": "c", "handler": "noop", "depends_on": ["b"]},
                   {"name": "d", "handler": "noop", "depends_on": ["c"]}]}';
CREATE TEMP TABLE new_tasks AS
    SELECT md5('task ' || g)::uuid AS task_uuid, g FROM generate_series(1, :tasks) AS g;
INSERT INTO tasker.tasks (task_uuid, template_id, namespace)
SELECT task_uuid, (SELECT min(template_id) FROM tasker.task_templates), 'bench' FROM new_tasks ORDER BY g;
CREATE TEMP TABLE new_steps AS
    SELECT t.task_uuid, n.name, md5('step ' || t.g || n.name)::uuid AS step_uuid
    FROM new_tasks t, unnest(ARRAY['a', 'b', 'c', 'd']) AS n(name);
INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, handler, namespace, max_attempts, backoff_ms, timeout_ms)
SELECT step_uuid, task_uuid, name, 'noop', 'bench', 3, 0, 60000 FROM new_steps;
INSERT INTO tasker.workflow_step_edges (to_step_uuid, from_step_uuid)
SELECT t.step_uuid, f.step_uuid
FROM new_steps t JOIN new_steps f ON f.task_uuid = t.task_uuid
WHERE (t.name, f.name) IN (('b', 'a'), ('c', 'b'), ('d', 'c'));
SELECT count(*) FROM tasker.start_tasks(ARRAY(SELECT task_uuid FROM new_tasks ORDER BY g), 'bench');
VACUUM ANALYZE;
