-- 002 (TimescaleDB 2.x): readings as a hypertable with 1-day chunks and native compression.
-- The runner has already run CREATE EXTENSION IF NOT EXISTS timescaledb.

CREATE TABLE readings (
    point   integer NOT NULL,           -- points.id; no foreign key, for ingest speed
    ts      timestamptz NOT NULL,
    value   double precision NULL,      -- NULL only with bad quality
    quality smallint NOT NULL CHECK (quality IN (0, 1, 2)),  -- scada.model.QualityCode
    reason  text NULL,                  -- only for non-good quality
    CHECK (value IS NOT NULL OR quality = 0),
    PRIMARY KEY (point, ts)             -- makes redelivery a no-op (ON CONFLICT DO NOTHING)
);

SELECT create_hypertable('readings', 'ts', chunk_time_interval => INTERVAL '1 day');

-- Segment by point so one point's history decompresses alone; order by ts (newest first, the
-- order latest() and dashboards read in).
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'point',
    timescaledb.compress_orderby = 'ts DESC'
);

SELECT add_compression_policy('readings', compress_after => INTERVAL '7 days');
