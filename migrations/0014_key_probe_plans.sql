-- Key probes whatever the table's size was when the plan was made.
--
-- 0011 gave the hot functions generic plans, which each session makes on its
-- first call and keeps until an ANALYZE of a table it reads invalidates them.
-- A session that starts on a fresh database makes them while every table is
-- a page or two, where a sequential scan is the cheapest plan, and kept
-- scanning as the tables grew: under `tasker bench latency` the statements
-- that lock and read tasks read 47 buffers per single-step call in the first
-- ten seconds and 105 by the fiftieth, and submit-to-complete drifted with
-- them, until autovacuum's first ANALYZE (up to a minute in) replaced the
-- plans. Every statement in these functions reads by key or through a partial
-- index, so a scan is never what they mean: with sequential scans priced out,
-- the plan is the key probe from the first call. (Where no index applies the
-- planner still scans; the setting changes costs, not results.)
--
-- The test `hot_statements_planned_on_empty_tables_still_read_by_key` makes the
-- plans on near-empty tables, grows the tables, and fails on any scan.

ALTER FUNCTION tasker.claim_steps(text, text, integer, interval, text) SET enable_seqscan = off;
ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.fail_steps(text, uuid[], integer[], text[], boolean[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.start_tasks(uuid[], text) SET enable_seqscan = off;
ALTER FUNCTION tasker.enqueue_ready_steps(text, uuid[], bigint[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.claim_task_for_finalization(uuid, text) SET enable_seqscan = off;
ALTER FUNCTION tasker.lock_tasks_of_steps(uuid[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.wake_tasks(uuid[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.claim_ready_tasks(text, integer, interval, text) SET enable_seqscan = off;
