-- 006: alarms. Every state transition of every alarm (append-only), the current status of each alarm,
-- and the alarm engine's and detectors' state, so a restart continues where it stopped.
-- Written by the analytics role (anomaly.service), read by the API.

CREATE TABLE alarm_events (
    key          text PRIMARY KEY,            -- "<alarm id>#<seq>": a redelivered event changes nothing
    alarm_id     text NOT NULL,
    seq          bigint NOT NULL,
    at           timestamptz NOT NULL,
    from_state   text NOT NULL,
    to_state     text NOT NULL,
    cause        text NOT NULL,
    by_whom      text NOT NULL,
    comment      text NOT NULL DEFAULT '',
    value        double precision NULL,
    message      text NOT NULL,
    priority     smallint NOT NULL CHECK (priority BETWEEN 1 AND 4),
    console      text NOT NULL,
    node_id      text NOT NULL,
    device_id    text NULL,
    point_id     text NULL,
    group_id     text NULL,
    annunciated  boolean NOT NULL,
    chattering   boolean NOT NULL,
    extra        jsonb NOT NULL DEFAULT '{}'::jsonb,   -- e.g. excess_kwh and excess_kgco2e of an energy anomaly
    event        jsonb NOT NULL                      -- the whole event (AlarmEvent.to_dict)
);
CREATE INDEX alarm_events_at_idx ON alarm_events (at);
CREATE INDEX alarm_events_alarm_idx ON alarm_events (alarm_id, at);
CREATE INDEX alarm_events_console_idx ON alarm_events (console, at);

CREATE TABLE alarm_status (
    alarm_id    text PRIMARY KEY,
    state       text NOT NULL,
    since       timestamptz NOT NULL,
    priority    smallint NOT NULL,
    console     text NOT NULL,
    node_id     text NOT NULL,
    device_id   text NULL,
    point_id    text NULL,
    group_id    text NULL,
    message     text NOT NULL,
    value       double precision NULL,
    extra       jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alarm_status_console_idx ON alarm_status (console) WHERE state <> 'normal';

-- One row: the alarm engine's snapshot and every detector's learned state.
CREATE TABLE anomaly_state (
    id        smallint PRIMARY KEY CHECK (id = 1),
    engine    jsonb NOT NULL,
    detectors jsonb NOT NULL,
    saved_at  timestamptz NOT NULL DEFAULT now()
);
