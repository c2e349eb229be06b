-- 010: the carbon-budget controller's own state (control_engine.controller.ControllerStateStore):
-- each node's stage and since when, and the gap sizing of its rules, saved after every cycle that
-- changes them, so a restarted controller resumes its stages and dwell timers instead of climbing
-- again from stage 0. Holds are not here: the dispatches table (008) is their record.

CREATE TABLE controller_state (
    scope          text PRIMARY KEY,              -- one controller per scope ('default')
    state          jsonb NOT NULL,                -- control_engine.controller.state_to_json
    saved_at       timestamptz NOT NULL,          -- the controller's clock at the cycle that saved it
    fencing_token  bigint NULL                    -- the control lease's token: a deposed leader cannot overwrite
);
