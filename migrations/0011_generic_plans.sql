-- Generic plans for the hot PL/pgSQL functions.
--
-- PL/pgSQL caches a plan per statement per session, but a statement with
-- parameters is planned afresh on each of its first five executions, and
-- afterwards whenever the generic plan's estimate is much worse than the
-- custom ones'. The key-array predicates of these statements (`= ANY ($1)`)
-- are estimated differently for every array, so most of them kept being
-- planned on every call: under `tasker bench latency` (one step per call)
-- `complete_steps` took 1.46 ms per call and `claim_steps` 0.29 ms; with
-- generic plans, 1.13 ms and 0.23 ms, and submit-to-complete p50 fell from
-- 13.1 to 11.8 ms (docs/benchmarks.md).
--
-- Safe because 0009 wrote these statements so that their only sensible plan
-- is a probe by key whatever the estimates; the test
-- `hot_statements_never_scan_steps_or_edges` runs them with these settings
-- and fails on any sequential scan of the steps or edges tables.
ALTER FUNCTION tasker.claim_steps(text, text, integer, interval, text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.complete_steps(text, uuid[], integer[], jsonb[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.fail_steps(text, uuid[], integer[], text[], boolean[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.start_tasks(uuid[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.enqueue_ready_steps(text, uuid[], bigint[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.claim_task_for_finalization(uuid, text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.lock_tasks_of_steps(uuid[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.wake_tasks(uuid[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.claim_ready_tasks(text, integer, interval, text) SET plan_cache_mode = force_generic_plan;
