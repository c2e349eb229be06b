-- 002 (plain PostgreSQL): readings, range-partitioned by day on ts.
-- Partitions are named readings_pYYYYMMDD and cover [day 00:00 UTC, next day 00:00 UTC). They are
-- created ahead by the historian's maintenance task and on demand when a batch needs one. There
-- is deliberately no DEFAULT partition: a row for a missing day fails loudly instead of landing
-- in a catch-all table that later blocks creating that day's partition. Retention drops whole
-- partitions (DROP TABLE), which is instant and leaves no bloat.

CREATE TABLE readings (
    point   integer NOT NULL,           -- points.id; no foreign key, for ingest speed
    ts      timestamptz NOT NULL,
    value   double precision NULL,      -- NULL only with bad quality
    quality smallint NOT NULL CHECK (quality IN (0, 1, 2)),  -- scada.model.QualityCode
    reason  text NULL,                  -- only for non-good quality
    CHECK (value IS NOT NULL OR quality = 0),
    PRIMARY KEY (point, ts)             -- makes redelivery a no-op (ON CONFLICT DO NOTHING)
) PARTITION BY RANGE (ts);

-- Rows arrive in time order, so a BRIN index on ts is tiny and prunes time-range scans across
-- points; made on the parent, every partition inherits it.
CREATE INDEX readings_ts_brin ON readings USING brin (ts);
