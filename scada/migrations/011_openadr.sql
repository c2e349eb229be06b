-- 011: the state of the OpenADR 2.0b VTNs the gateway serves (protocols/openadr): who registered, what
-- they report, and every event with the VEN's answer, so a restarted gateway re-serves the same events
-- (same ids and modification numbers) instead of forgetting a curtailment the EMS has accepted.
-- Written by the gateway that owns the device; a handful of rows per dispatch.

CREATE TABLE openadr_registrations (
    device_id        text PRIMARY KEY,
    ven_id           text NOT NULL,
    ven_name         text NOT NULL,
    registration_id  text NOT NULL,
    registered_at    timestamptz NOT NULL,
    reports          jsonb NOT NULL DEFAULT '{}'   -- rID -> {resource_id, measurement, unit, scale, point}
);

CREATE TABLE openadr_events (
    event_id                 text PRIMARY KEY,
    device_id                text NOT NULL,
    point_id                 text NOT NULL,
    correlation_id           text NOT NULL DEFAULT '',
    signal                   text NOT NULL CHECK (signal IN ('load_dispatch', 'simple')),
    requested                double precision NOT NULL,   -- the value written, in the point's unit
    payload                  double precision NOT NULL,   -- the signal payload sent to the VEN
    dtstart                  timestamptz NOT NULL,
    duration_s               double precision NOT NULL CHECK (duration_s > 0),
    modification_number      integer NOT NULL DEFAULT 0,
    cancelled                boolean NOT NULL DEFAULT false,
    opt                      text NOT NULL DEFAULT 'none' CHECK (opt IN ('none', 'optIn', 'optOut')),
    opt_modification_number  integer NULL,                -- the version the VEN answered
    created_at               timestamptz NOT NULL,
    updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX openadr_events_device_start ON openadr_events (device_id, dtstart DESC);
