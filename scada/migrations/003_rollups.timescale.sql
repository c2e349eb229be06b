-- 003 (TimescaleDB 2.x): the rollups as continuous aggregates, with the names and columns of the
-- plain variant (see 003_rollups.plain.sql), refreshed by policies; the historian does not write them.
-- time_bucket's default origin (2000-01-03, a midnight) gives the same buckets as date_bin(<width>,
-- ts, '2000-01-01') for these widths, all of which divide a day. WITH NO DATA: creation may run in
-- the migration's transaction; the first policy run fills them. Late data older than start_offset is
-- not folded in by the policy; refresh_continuous_aggregate() over that window does it by hand.

CREATE MATERIALIZED VIEW readings_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT point,
       time_bucket(INTERVAL '1 minute', ts) AS bucket,
       count(*)::integer AS count,
       sum(value) AS sum,
       min(value) AS min,
       max(value) AS max,
       min(ts) AS first_ts,
       first(value, ts) AS first,
       max(ts) AS last_ts,
       last(value, ts) AS last
FROM readings
WHERE quality = 2 AND value IS NOT NULL
GROUP BY point, time_bucket(INTERVAL '1 minute', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_15m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT point,
       time_bucket(INTERVAL '15 minutes', ts) AS bucket,
       count(*)::integer AS count,
       sum(value) AS sum,
       min(value) AS min,
       max(value) AS max,
       min(ts) AS first_ts,
       first(value, ts) AS first,
       max(ts) AS last_ts,
       last(value, ts) AS last
FROM readings
WHERE quality = 2 AND value IS NOT NULL
GROUP BY point, time_bucket(INTERVAL '15 minutes', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT point,
       time_bucket(INTERVAL '1 hour', ts) AS bucket,
       count(*)::integer AS count,
       sum(value) AS sum,
       min(value) AS min,
       max(value) AS max,
       min(ts) AS first_ts,
       first(value, ts) AS first,
       max(ts) AS last_ts,
       last(value, ts) AS last
FROM readings
WHERE quality = 2 AND value IS NOT NULL
GROUP BY point, time_bucket(INTERVAL '1 hour', ts)
WITH NO DATA;

-- Refresh windows reach 3 days back so late data of that age is folded in; the newest, still
-- open bucket is left to real-time aggregation (materialized_only = false).
SELECT add_continuous_aggregate_policy('readings_1m',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('readings_15m',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '15 minutes',
    schedule_interval => INTERVAL '5 minutes');
SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes');
