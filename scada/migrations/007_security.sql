-- 007: tenants, users, role grants, API keys and kiosk tokens, refresh tokens, and the hash-chained
-- audit log (docs/security.md).

CREATE TABLE tenants (
    id         text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The hierarchy subtrees a tenant owns (a node and all its descendants).
CREATE TABLE tenant_nodes (
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    node_id   text NOT NULL REFERENCES nodes (id),
    PRIMARY KEY (tenant_id, node_id)
);
CREATE INDEX tenant_nodes_node_idx ON tenant_nodes (node_id);

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    username      text NOT NULL CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$'),
    password_hash text NOT NULL,                     -- argon2id, PHC string
    disabled      boolean NOT NULL DEFAULT false,
    failed_logins integer NOT NULL DEFAULT 0,
    locked_until  timestamptz NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, username)
);

-- API keys for integrations and read-only kiosk tokens for big screens: only a SHA-256 of the secret
-- is kept (the secrets are 256-bit random, so a slow hash adds nothing).
CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('key', 'kiosk')),
    name        text NOT NULL,
    secret_hash bytea NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz NULL
);

-- Roles granted on a node and its descendants, to a user or a key.
CREATE TABLE grants (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id    bigint NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id     bigint NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    node_id    text NOT NULL REFERENCES nodes (id),
    role       text NOT NULL CHECK (role IN ('viewer', 'operator', 'engineer', 'admin')),
    CHECK ((user_id IS NULL) <> (key_id IS NULL))
);
CREATE INDEX grants_user_idx ON grants (user_id);
CREATE INDEX grants_key_idx ON grants (key_id);

CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz NULL
);

-- Append-only: every entry carries the SHA-256 of the previous entry's hash and its own content.
CREATE TABLE audit_log (
    seq       bigint PRIMARY KEY,
    at        timestamptz NOT NULL,
    tenant_id text NULL,
    actor     text NOT NULL,
    action    text NOT NULL,
    target    text NOT NULL,
    detail    jsonb NOT NULL,
    prev_hash text NOT NULL,
    hash      text NOT NULL
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_tenant_idx ON audit_log (tenant_id, seq);

-- The newest entry, kept apart so that removing the tail of the log is detected too.
CREATE TABLE audit_head (
    id   smallint PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash text NOT NULL
);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
