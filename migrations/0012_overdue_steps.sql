-- The overdue-work gauge for step channels.
--
-- Since 0010 a new task's first steps, and every dependent, are announced on
-- the namespaces' step channels; `overdue_tasks` (0005) sees only the task
-- channel's work. This counts enqueued steps no worker has claimed for longer
-- than p_older_than: lost step notifications where no worker polls, and
-- equally a backlog no worker has room for (both are work waiting past the
-- threshold). Reads only the claimable-steps index.
CREATE FUNCTION tasker.overdue_steps(p_older_than interval) RETURNS bigint
    LANGUAGE sql STABLE
    RETURN (SELECT count(*) FROM tasker.workflow_steps s
            WHERE s.state = 'enqueued' AND s.enqueued_at < now() - p_older_than);
