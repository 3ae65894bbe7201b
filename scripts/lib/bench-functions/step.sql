-- bench-functions, one pgbench transaction: what a worker's completer does,
-- in one statement: claim up to :batch steps, complete them all. It calls the
-- five-argument complete_steps, as the worker does: the four-argument one is a
-- LANGUAGE sql wrapper that cannot be inlined (it is volatile and has SET
-- clauses), so its body would be parsed and planned again on every call.
WITH claimed AS MATERIALIZED (
    SELECT * FROM tasker.claim_steps('bench-' || :client_id, NULL, :batch, '5 min'))
SELECT count(*)
FROM tasker.complete_steps('bench-' || :client_id,
                           ARRAY(SELECT step_uuid FROM claimed ORDER BY step_uuid),
                           ARRAY(SELECT attempt FROM claimed ORDER BY step_uuid),
                           ARRAY(SELECT '{}'::jsonb FROM claimed),
                           true);
