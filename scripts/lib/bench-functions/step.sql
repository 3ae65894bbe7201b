-- bench-functions, one pgbench transaction: what a worker's completer does,
-- in one statement: claim up to :batch steps, complete them all.
WITH claimed AS MATERIALIZED (
    SELECT * FROM tasker.claim_steps('bench-' || :client_id, NULL, :batch, '5 min'))
SELECT count(*)
FROM tasker.complete_steps('bench-' || :client_id,
                           ARRAY(SELECT step_uuid FROM claimed ORDER BY step_uuid),
                           ARRAY(SELECT attempt FROM claimed ORDER BY step_uuid),
                           ARRAY(SELECT '{}'::jsonb FROM claimed));
