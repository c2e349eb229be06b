-- 004: per-point retention class and counter range.
-- retention: the name of a class of the site file's `retention:` section (the retention job maps a
-- name it does not know to 'default'). counter_wrap: for energy/gas/fuel counters read from an
-- integer register, the engineering value at which the register rolls over to 0 (2^bits x scale);
-- NULL when unknown (float registers, not a counter). Both are written by the catalog sync.

ALTER TABLE points
    ADD COLUMN retention text NOT NULL DEFAULT 'default'
        CHECK (retention ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    ADD COLUMN counter_wrap double precision NULL CHECK (counter_wrap > 0);

-- The node energy roll-up finds a subtree's counters by device.
CREATE INDEX points_counter_idx ON points (device_id) WHERE kind IN ('energy_counter', 'gas_counter', 'fuel_counter');
