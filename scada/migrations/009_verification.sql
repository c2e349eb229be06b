-- 009: the measured effect of each dispatch (control_engine.verify_service): energy and kgCO2e avoided
-- against a similar-day baseline, with its uncertainty, or why it could not be measured. One row per
-- dispatch, written once (the dispatch id is the idempotency key); read by the API for the dispatch
-- JSON and the monthly sums.

CREATE TABLE dispatch_verifications (
    dispatch_id         bigint PRIMARY KEY REFERENCES dispatches (id) ON DELETE CASCADE,
    node_id             text NOT NULL REFERENCES nodes (id),
    status              text NOT NULL CHECK (status IN ('measured', 'unmeasurable')),
    reason              text NOT NULL DEFAULT '',       -- why unmeasurable; '' when measured
    month               text NOT NULL CHECK (month ~ '^[0-9]{4}-[0-9]{2}$'),  -- of event_start, site zone
    event_start         timestamptz NOT NULL,           -- the measured window, on the interval grid
    event_end           timestamptz NULL,               -- NULL: the dispatch had no end (no hold_until)
    post_end            timestamptz NULL,               -- end of the rebound window, if one was netted
    interval_s          integer NOT NULL,
    meters              text[] NOT NULL DEFAULT '{}',   -- point ids summed as the affected load
    meter_basis         text NOT NULL DEFAULT '',       -- device | node_consumption | node_supply | none
    energy_avoided_kwh  double precision NULL,          -- net of rebound; NULL when unmeasurable
    uncertainty_kwh     double precision NULL,          -- ± half-width at confidence
    co2e_avoided_kg     double precision NULL,
    co2e_uncertainty_kg double precision NULL,
    confidence          double precision NULL,
    baseline_kwh        double precision NULL,
    actual_kwh          double precision NULL,
    rebound_kwh         double precision NULL,
    rebound_co2e_kg     double precision NULL,
    flags               text[] NOT NULL DEFAULT '{}',
    baseline_method     text NOT NULL DEFAULT '',
    days_used           integer NOT NULL DEFAULT 0,
    factor_ids          text[] NOT NULL DEFAULT '{}',   -- emission factors in force over the windows
    detail              jsonb NOT NULL DEFAULT '{}',    -- per-interval baseline and actual, similar days
    verified_at         timestamptz NOT NULL DEFAULT now(),
    audited_at          timestamptz NULL,               -- set once the audit entry is written
    CHECK (status = 'unmeasurable' OR (energy_avoided_kwh IS NOT NULL AND uncertainty_kwh IS NOT NULL
                                       AND co2e_avoided_kg IS NOT NULL AND co2e_uncertainty_kg IS NOT NULL
                                       AND confidence IS NOT NULL)),
    CHECK (status = 'measured' OR reason <> '')
);
CREATE INDEX dispatch_verifications_month_idx ON dispatch_verifications (month, node_id);
CREATE INDEX dispatch_verifications_unaudited_idx ON dispatch_verifications (dispatch_id)
    WHERE audited_at IS NULL;
