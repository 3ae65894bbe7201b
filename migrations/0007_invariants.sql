-- Invariants that must hold at every commit, as one query an operator (or a
-- test) can run by hand: `SELECT * FROM tasker.invariant_violations();`
-- An empty result means the history and the current state agree.

CREATE FUNCTION tasker.invariant_violations()
RETURNS TABLE (invariant text, subject uuid, detail text)
    LANGUAGE sql STABLE AS $$
    -- 1. A task's state is the target of its latest transition.
    SELECT 'task state matches its history', t.task_uuid,
           format('state %s, last transition to %s', t.state, h.to_state)
    FROM tasker.tasks t
    LEFT JOIN LATERAL (SELECT tt.to_state FROM tasker.task_transitions tt
                       WHERE tt.task_uuid = t.task_uuid
                       ORDER BY tt.transition_id DESC LIMIT 1) h ON true
    WHERE h.to_state IS DISTINCT FROM t.state

    UNION ALL
    -- 2. A step's state is the target of its latest transition (or pending if none).
    SELECT 'step state matches its history', s.step_uuid,
           format('state %s, last transition to %s', s.state, coalesce(h.to_state, '(none)'))
    FROM tasker.workflow_steps s
    LEFT JOIN LATERAL (SELECT st.to_state FROM tasker.workflow_step_transitions st
                       WHERE st.step_uuid = s.step_uuid
                       ORDER BY st.transition_id DESC LIMIT 1) h ON true
    WHERE coalesce(h.to_state, 'pending') <> s.state

    UNION ALL
    -- 3. Histories are chains: each transition starts where the previous one ended,
    --    and every edge is in the state machine.
    SELECT 'task history is a chain of allowed transitions', c.task_uuid,
           format('%s -> %s after %s', c.from_state, c.to_state, coalesce(c.prev, '(start)'))
    FROM (SELECT tt.*, lag(tt.to_state) OVER (PARTITION BY tt.task_uuid ORDER BY tt.transition_id) AS prev
          FROM tasker.task_transitions tt) c
    WHERE c.from_state IS DISTINCT FROM c.prev
       OR (c.from_state IS NULL AND c.to_state <> 'pending')
       OR (c.from_state IS NOT NULL AND NOT EXISTS (
              SELECT 1 FROM tasker.task_state_machine m
              WHERE m.from_state = c.from_state AND m.to_state = c.to_state))

    UNION ALL
    SELECT 'step history is a chain of allowed transitions', c.step_uuid,
           format('%s -> %s after %s', c.from_state, c.to_state, coalesce(c.prev, '(start)'))
    FROM (SELECT st.*, lag(st.to_state) OVER (PARTITION BY st.step_uuid ORDER BY st.transition_id) AS prev
          FROM tasker.workflow_step_transitions st) c
    WHERE c.from_state IS DISTINCT FROM coalesce(c.prev, 'pending')
       OR NOT EXISTS (SELECT 1 FROM tasker.step_state_machine m
                      WHERE m.from_state = c.from_state AND m.to_state = c.to_state)

    UNION ALL
    -- 4. Each attempt of a step started at most once, and a step completed at most once.
    SELECT 'each attempt starts at most once', st.step_uuid,
           format('attempt %s started %s times', st.attempt, count(*))
    FROM tasker.workflow_step_transitions st
    WHERE st.to_state = 'in_progress'
    GROUP BY st.step_uuid, st.attempt
    HAVING count(*) > 1

    UNION ALL
    SELECT 'a step completes at most once', st.step_uuid, format('completed %s times', count(*))
    FROM tasker.workflow_step_transitions st
    WHERE st.to_state = 'complete'
    GROUP BY st.step_uuid
    HAVING count(*) > 1

    UNION ALL
    -- 5. Attempts never exceed the step's budget.
    SELECT 'attempts within max_attempts', s.step_uuid,
           format('%s attempts of %s allowed', s.attempts, s.max_attempts)
    FROM tasker.workflow_steps s
    WHERE s.attempts > s.max_attempts

    UNION ALL
    -- 6. Final tasks are final everywhere: no claim, nothing due, a completion time,
    --    and a complete task has only complete steps.
    SELECT 'final tasks hold no claim and no due work', t.task_uuid,
           format('state %s, ready_at %s, claimed_by %s, completed_at %s',
                  t.state, t.ready_at, t.claimed_by, t.completed_at)
    FROM tasker.tasks t
    WHERE (t.state IN ('complete', 'error', 'cancelled'))
          <> (t.completed_at IS NOT NULL)
       OR (t.completed_at IS NOT NULL AND (t.ready_at IS NOT NULL OR t.claimed_by IS NOT NULL))

    UNION ALL
    SELECT 'a complete task has only complete steps', t.task_uuid,
           format('%s step(s) not complete', count(*))
    FROM tasker.tasks t
    JOIN tasker.workflow_steps s ON s.task_uuid = t.task_uuid
    WHERE t.state = 'complete' AND s.state <> 'complete'
    GROUP BY t.task_uuid

    UNION ALL
    -- 7. A final task has no step left running or waiting.
    SELECT 'a final task has no unfinished step', t.task_uuid,
           format('step %s is %s', s.name, s.state)
    FROM tasker.tasks t
    JOIN tasker.workflow_steps s ON s.task_uuid = t.task_uuid
    WHERE t.completed_at IS NOT NULL
      AND s.state NOT IN ('complete', 'error', 'cancelled');
$$;
