-- 001: the account hierarchy, devices and points (the catalog the historian resolves ids against).
-- Ids follow scada.model.ID_PATTERN; a point id is "<device>.<key>" and is checked here too, so a
-- row written by any tool agrees with what the streams carry.

CREATE TABLE nodes (
    id     text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name   text NOT NULL,
    level  text NOT NULL CHECK (level IN ('group', 'park', 'enterprise', 'workshop')),
    parent text NULL REFERENCES nodes (id),
    CHECK (parent IS NULL OR parent <> id)
);
CREATE INDEX nodes_parent_idx ON nodes (parent);

CREATE TABLE devices (
    id         text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    node_id    text NOT NULL REFERENCES nodes (id),
    name       text NOT NULL,
    kind       text NOT NULL,
    protocol   text NOT NULL,
    config     jsonb NOT NULL DEFAULT '{}'::jsonb,
    retired_at timestamptz NULL
);
CREATE INDEX devices_node_idx ON devices (node_id);

-- points.id is a compact surrogate key: readings store it (4 bytes) instead of the text id.
CREATE TABLE points (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    point_id   text NOT NULL UNIQUE,
    device_id  text NOT NULL REFERENCES devices (id),
    key        text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name       text NOT NULL,
    kind       text NOT NULL,
    unit       text NOT NULL,
    carrier    text NOT NULL DEFAULT 'none',
    writable   boolean NOT NULL DEFAULT false,
    retired_at timestamptz NULL,
    CHECK (point_id = device_id || '.' || key)
);
CREATE INDEX points_device_idx ON points (device_id);
