-- Sampled statistics: samples partitioned by day, an archive for samples past
-- retention, the tables synchronous mode updates per event, and the query that
-- reads them. See docs/statistics.md.

CREATE TABLE tasker.statistics_samples (
    recorded_at timestamptz NOT NULL,
    event_type  text NOT NULL,
    priority    text NOT NULL,
    latency_us  bigint NOT NULL,
    -- the sampling rate in force: each sample stands for 1/sample_rate events
    sample_rate real NOT NULL CONSTRAINT sample_rate_range CHECK (sample_rate > 0 AND sample_rate <= 1),
    instance_id text NOT NULL
) PARTITION BY RANGE (recorded_at);

-- Catches samples outside every daily partition (clock skew, a gap in
-- maintenance); ensure_statistics_partitions() moves them out when it creates
-- the day they belong to.
CREATE TABLE tasker.statistics_samples_default PARTITION OF tasker.statistics_samples DEFAULT;

CREATE TABLE tasker.statistics_archive (
    recorded_at timestamptz NOT NULL,
    event_type  text NOT NULL,
    priority    text NOT NULL,
    latency_us  bigint NOT NULL,
    sample_rate real NOT NULL,
    instance_id text NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX statistics_archive_recorded_idx ON tasker.statistics_archive (recorded_at);

-- The per-event tables "synchronous" mode updates inline, as the system before
-- sampling did (several writes per event). Kept only to measure against.
CREATE TABLE tasker.statistics_totals (
    event_type       text PRIMARY KEY,
    events           bigint NOT NULL,
    total_latency_us bigint NOT NULL,
    max_latency_us   bigint NOT NULL,
    updated_at       timestamptz NOT NULL
);
CREATE TABLE tasker.statistics_hourly (
    event_type       text NOT NULL,
    hour             timestamptz NOT NULL,
    events           bigint NOT NULL,
    total_latency_us bigint NOT NULL,
    PRIMARY KEY (event_type, hour)
);

-- Daily partitions are named statistics_samples_YYYYMMDD and cover one UTC day.
CREATE FUNCTION tasker.statistics_partition_name(day date) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN 'statistics_samples_' || to_char(day, 'YYYYMMDD');

-- Creates the daily partitions for p_days days from p_from (UTC) that do not
-- exist yet; rows already in the default partition for such a day move into
-- it. Returns how many partitions were created. Idempotent.
CREATE FUNCTION tasker.ensure_statistics_partitions(p_from date, p_days integer) RETURNS integer
    LANGUAGE plpgsql AS $$
DECLARE
    day     date;
    part    text;
    lo      timestamptz;
    hi      timestamptz;
    created integer := 0;
BEGIN
    FOR day IN SELECT generate_series(p_from, p_from + (p_days - 1), interval '1 day')::date LOOP
        part := tasker.statistics_partition_name(day);
        CONTINUE WHEN to_regclass('tasker.' || part) IS NOT NULL;
        lo := day::timestamp AT TIME ZONE 'UTC';
        hi := (day + 1)::timestamp AT TIME ZONE 'UTC';
        IF EXISTS (SELECT 1 FROM tasker.statistics_samples_default WHERE recorded_at >= lo AND recorded_at < hi) THEN
            EXECUTE format('CREATE TABLE tasker.%I (LIKE tasker.statistics_samples INCLUDING ALL)', part);
            EXECUTE format(
                'WITH moved AS (DELETE FROM tasker.statistics_samples_default
                                WHERE recorded_at >= %L AND recorded_at < %L RETURNING *)
                 INSERT INTO tasker.%I SELECT * FROM moved', lo, hi, part);
            EXECUTE format('ALTER TABLE tasker.statistics_samples ATTACH PARTITION tasker.%I FOR VALUES FROM (%L) TO (%L)',
                           part, lo, hi);
        ELSE
            EXECUTE format('CREATE TABLE tasker.%I PARTITION OF tasker.statistics_samples FOR VALUES FROM (%L) TO (%L)',
                           part, lo, hi);
        END IF;
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Moves every sample recorded before p_cutoff into the archive: daily
-- partitions that lie wholly before the cutoff are copied and dropped; the
-- rest (the day the cutoff falls in, the default partition) are moved row by
-- row. Exactly the rows older than the cutoff move; a second run moves none.
CREATE FUNCTION tasker.archive_statistics(p_cutoff timestamptz) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    part   record;
    moved  bigint := 0;
    n      bigint;
BEGIN
    FOR part IN
        SELECT c.relname,
               to_date(substring(c.relname FROM 'statistics_samples_([0-9]{8})$'), 'YYYYMMDD') AS day
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'tasker.statistics_samples'::regclass
          AND c.relname ~ '^statistics_samples_[0-9]{8}$'
        ORDER BY c.relname
    LOOP
        CONTINUE WHEN ((part.day + 1)::timestamp AT TIME ZONE 'UTC') > p_cutoff;
        EXECUTE format('INSERT INTO tasker.statistics_archive
                            (recorded_at, event_type, priority, latency_us, sample_rate, instance_id)
                        SELECT recorded_at, event_type, priority, latency_us, sample_rate, instance_id
                        FROM tasker.%I', part.relname);
        GET DIAGNOSTICS n = ROW_COUNT;
        moved := moved + n;
        EXECUTE format('DROP TABLE tasker.%I', part.relname);
    END LOOP;

    WITH old AS (
        DELETE FROM tasker.statistics_samples WHERE recorded_at < p_cutoff RETURNING *
    )
    INSERT INTO tasker.statistics_archive (recorded_at, event_type, priority, latency_us, sample_rate, instance_id)
    SELECT recorded_at, event_type, priority, latency_us, sample_rate, instance_id FROM old;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN moved + n;
END
$$;

-- Statistics per event type and hour between p_from and p_to, from live
-- samples and the archive: samples kept, estimated events (each sample counts
-- 1/sample_rate), and latency percentiles in milliseconds.
CREATE FUNCTION tasker.statistics_by_hour(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (
    hour             timestamptz,
    event_type       text,
    samples          bigint,
    estimated_events bigint,
    p50_ms           double precision,
    p95_ms           double precision,
    p99_ms           double precision,
    max_ms           double precision
)
    LANGUAGE sql STABLE AS $$
    SELECT date_trunc('hour', s.recorded_at) AS hour,
           s.event_type,
           count(*),
           round(sum(1.0 / s.sample_rate))::bigint,
           percentile_cont(0.50) WITHIN GROUP (ORDER BY s.latency_us) / 1000.0,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY s.latency_us) / 1000.0,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY s.latency_us) / 1000.0,
           max(s.latency_us) / 1000.0
    FROM (SELECT recorded_at, event_type, latency_us, sample_rate FROM tasker.statistics_samples
          WHERE recorded_at >= p_from AND recorded_at < p_to
          UNION ALL
          SELECT recorded_at, event_type, latency_us, sample_rate FROM tasker.statistics_archive
          WHERE recorded_at >= p_from AND recorded_at < p_to) s
    GROUP BY 1, 2
    ORDER BY 1, 2;
$$;

-- The first week of partitions, so a fresh database accepts samples at once.
SELECT tasker.ensure_statistics_partitions((now() AT TIME ZONE 'UTC')::date - 1, 8);
