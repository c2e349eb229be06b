-- 003 (plain PostgreSQL): rollups of good-quality readings per point, maintained by the historian.
-- readings_1m, readings_15m and readings_1h hold, per (point, bucket), the count, sum, min and max of
-- the good-quality values and the first and last value with their timestamps. Buckets start at
-- date_bin(<width>, ts, '2000-01-01 00:00:00+00'). The historian merges the rows it actually
-- inserted into readings (INSERT ... ON CONFLICT DO NOTHING RETURNING) into these tables in the same
-- transaction, so a redelivered batch changes nothing and late data merges into its bucket.
-- Retention drops rows by bucket (no partitions: these tables are ~60x, 900x and 3600x smaller).

CREATE TABLE readings_1m (
    point    integer NOT NULL,          -- points.id
    bucket   timestamptz NOT NULL,      -- date_bin('1 minute', ts, '2000-01-01 00:00:00+00')
    count    integer NOT NULL,          -- good-quality values in the bucket
    sum      double precision,
    min      double precision,
    max      double precision,
    first_ts timestamptz,
    first    double precision,          -- value at first_ts
    last_ts  timestamptz,
    last     double precision,          -- value at last_ts
    PRIMARY KEY (point, bucket)
);

CREATE TABLE readings_15m (LIKE readings_1m INCLUDING ALL);
CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL);

-- Rollup rows are updated in place many times while their bucket is current: leave room on each
-- page so the updates stay HOT (no index change, no new index entry).
ALTER TABLE readings_1m SET (fillfactor = 70);
ALTER TABLE readings_15m SET (fillfactor = 70);
ALTER TABLE readings_1h SET (fillfactor = 70);
