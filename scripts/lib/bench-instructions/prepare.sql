-- bench-instructions, run once before the rounds: the two statements of a
-- round, prepared (the worker's are prepared too), then the first claim.
--
-- A round is the worker's completing transaction: complete the steps it
-- holds, starting their dependents for itself (up to $1, the capacity the
-- completed steps free), then take up what that started and claim more
-- ready steps to hold $1 again (claim_steps with p_started). At batch 1 this
-- is a hop of `tasker bench latency`: one step completed, its dependent
-- started and taken up, and after a task's last step the next task's first
-- step claimed (there, the worker's claim loop, woken by the submission's
-- notification). Each statement finds its input with a probe of the
-- running-steps index; that probe is the same on every side compared.
PREPARE complete_round(integer) AS
SELECT count(*)
FROM (SELECT ARRAY(SELECT step_uuid FROM tasker.workflow_steps
                   WHERE state = 'in_progress' AND claimed_by = 'bench' ORDER BY step_uuid) AS steps,
             ARRAY(SELECT attempts FROM tasker.workflow_steps
                   WHERE state = 'in_progress' AND claimed_by = 'bench' ORDER BY step_uuid) AS attempts) AS held
CROSS JOIN LATERAL tasker.complete_steps('bench', held.steps, held.attempts,
                                         array_fill('{}'::jsonb, ARRAY[cardinality(held.steps)]),
                                         false, $1, 'bench', '5 min');

PREPARE claim_round(integer) AS
SELECT count(*)
FROM (SELECT ARRAY(SELECT step_uuid FROM tasker.workflow_steps
                   WHERE state = 'in_progress' AND claimed_by = 'bench') AS started) AS held
CROSS JOIN LATERAL tasker.claim_steps('bench', 'bench', $1 - cardinality(held.started),
                                      '5 min', 'event', NULL, held.started);

