-- 008: dispatches: every write the controller (or an operator through it) wants, recorded before it is
-- sent, so approval, sending, verification and the revert at hold_until survive a restart
-- (control_engine.dispatcher).

CREATE TABLE dispatches (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    node_id          text NOT NULL REFERENCES nodes (id),
    point_id         text NOT NULL,
    value            double precision NOT NULL,
    previous_value   double precision NULL,     -- read just before sending; written back at hold_until
    reason           text NOT NULL,
    rule_id          text NOT NULL,
    stage            smallint NOT NULL DEFAULT 0,
    priority         smallint NOT NULL,
    mode             text NOT NULL CHECK (mode IN ('auto', 'approve', 'advisory')),
    state            text NOT NULL CHECK (state IN ('advisory', 'awaiting_approval', 'approved', 'rejected',
                                                    'sending', 'verified', 'failed', 'reverting', 'reverted',
                                                    'revert_failed')),
    hold_until       timestamptz NULL,
    expected_kw      double precision NULL,
    correlation_id   text NULL,
    result           jsonb NULL,
    decided_by       text NULL,
    decided_at       timestamptz NULL,
    decision_comment text NOT NULL DEFAULT ''
);
CREATE INDEX dispatches_state_idx ON dispatches (state, id);
CREATE INDEX dispatches_hold_idx ON dispatches (hold_until) WHERE state = 'verified';
