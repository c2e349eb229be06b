-- 005: the carbon ledger, its restatements (audit records), quotas, quota alert state and the
-- latest month-end forecasts. Written by the analytics role (control_engine.carbon), read by the API.

-- One row per node, local hour (its start, in UTC), carrier and source; replaced, never added to, when
-- the ledger recomputes an hour. Days and months roll up from hours in the site's time zone.
CREATE TABLE ledger_hourly (
    node_id    text NOT NULL REFERENCES nodes (id),
    hour       timestamptz NOT NULL,
    carrier    text NOT NULL,
    source     text NOT NULL CHECK (source IN ('metered', 'unmetered', 'storage')),
    scope      smallint NOT NULL CHECK (scope IN (1, 2)),
    activity   double precision NOT NULL,    -- in unit: used, generated (PV) or net charged (storage)
    unit       text NOT NULL,
    co2e_kg    double precision NOT NULL,
    factor_id  text NULL,                    -- the emission factor in force for the hour
    points     integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, hour, carrier, source)
);
CREATE INDEX ledger_hourly_hour_idx ON ledger_hourly (hour);

-- A closed hour whose rows changed (late or corrected readings): append-only.
CREATE TABLE ledger_restatements (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id      text NOT NULL REFERENCES nodes (id),
    hour         timestamptz NOT NULL,
    carrier      text NOT NULL,
    source       text NOT NULL,
    old_co2e_kg  double precision NOT NULL,
    new_co2e_kg  double precision NOT NULL,
    old_activity double precision NOT NULL,
    new_activity double precision NOT NULL,
    reason       text NOT NULL,
    restated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_restatements_node_idx ON ledger_restatements (node_id, hour);

-- A node's allowance for one month of the site's time zone, and the carbon price that values it.
CREATE TABLE quotas (
    node_id         text NOT NULL REFERENCES nodes (id),
    month           text NOT NULL CHECK (month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    quota_t         double precision NOT NULL CHECK (quota_t > 0 AND quota_t < 'Infinity'),
    price_cny_per_t double precision NOT NULL DEFAULT 0 CHECK (price_cny_per_t >= 0 AND price_cny_per_t < 'Infinity'),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, month)
);

-- Which quota thresholds have fired (and not re-armed) per node, month and basis: survives restarts,
-- so an alert is sent once per crossing even across one.
CREATE TABLE quota_alert_state (
    node_id       text NOT NULL REFERENCES nodes (id),
    month         text NOT NULL,
    basis         text NOT NULL CHECK (basis IN ('actual', 'forecast')),
    fired_pct     double precision[] NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, month, basis)
);

-- The latest month-end forecast per node and month.
CREATE TABLE carbon_forecasts (
    node_id     text NOT NULL REFERENCES nodes (id),
    month       text NOT NULL,
    computed_at timestamptz NOT NULL,
    actual_t    double precision NOT NULL,
    forecast_t  double precision NOT NULL,
    low_t       double precision NOT NULL,
    high_t      double precision NOT NULL,
    method      text NOT NULL,
    PRIMARY KEY (node_id, month)
);
