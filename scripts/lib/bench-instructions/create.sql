-- bench-instructions --submit, from 0032 on: the submission's one
-- statement after the template (tasker.create_tasks), with the rows of
-- submit.sql's insert_round and the task start it replaces.
PREPARE create_round(uuid[], bigint[], text[], int[], jsonb[], text[], uuid[], uuid[], text[], text[], text[],
                     int[], jsonb[], int[], int[], int[], uuid[], uuid[], uuid[], text) AS
SELECT task_uuid, created, state, steps_enqueued, namespace, idempotency_key
FROM tasker.create_tasks($20, true, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17, $18, $19);
