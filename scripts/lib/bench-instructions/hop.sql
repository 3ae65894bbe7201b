-- bench-instructions, from 0031 on: a round is the one statement the worker
-- sends (complete_steps_and_claim), with the capacity of the steps it holds
-- ($1), no free slots beyond them, and a backlog, so that after a task's
-- last step it claims the next task's first, as claim_round does.
PREPARE hop_round(integer) AS
SELECT count(*)
FROM (SELECT ARRAY(SELECT step_uuid FROM tasker.workflow_steps
                   WHERE state = 'in_progress' AND claimed_by = 'bench' ORDER BY step_uuid) AS steps,
             ARRAY(SELECT attempts FROM tasker.workflow_steps
                   WHERE state = 'in_progress' AND claimed_by = 'bench' ORDER BY step_uuid) AS attempts) AS held
CROSS JOIN LATERAL tasker.complete_steps_and_claim('bench', held.steps, held.attempts,
                                                   array_fill('{}'::jsonb, ARRAY[cardinality(held.steps)]),
                                                   $1, 0, true, 'bench', '5 min');

