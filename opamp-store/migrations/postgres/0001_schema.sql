-- The design's Appendix C, as valid PostgreSQL, plus what the store traits need.
--
-- Every object is created unqualified: `PostgresStore` sets `search_path` to
-- its configured schema on every connection, so the tables (and sqlx's
-- `_sqlx_migrations`) land in that schema. Changes from the appendix, and why,
-- are in docs/data-model.md ("PostgreSQL"). In short:
--   * the inline INDEX clauses are CREATE INDEX statements;
--   * times are TIMESTAMPTZ (instants, never local times) and carry no NOW()
--     default where the store always writes them from its own clock;
--   * names are COLLATE "C": byte order, which is the order of the ids and
--     what keyset paging and the indexes rely on;
--   * device_registry.supervisor_id may be NULL (a status can be recorded
--     before any supervisor has the device).

-- One row per device with a recorded status: the design's `device:{id}` hash.
CREATE TABLE device_registry (
    device_id         VARCHAR(64) COLLATE "C" PRIMARY KEY,
    -- The supervisor the device is (or was last) connected to.
    supervisor_id     VARCHAR(64) COLLATE "C",
    agent_type        VARCHAR(32) COLLATE "C",
    platform          VARCHAR(32),
    version           VARCHAR(32),
    connected_at      TIMESTAMPTZ,
    last_seen         TIMESTAMPTZ,
    config_version    VARCHAR(64) COLLATE "C",
    effective_config  TEXT,
    emission_state    BOOLEAN NOT NULL DEFAULT false,
    -- Added: presence, the applied configuration's hash, labels, last error.
    status            VARCHAR(16) NOT NULL DEFAULT 'offline',
    config_hash       VARCHAR(64),
    labels            JSONB NOT NULL DEFAULT '{}',
    last_error        TEXT
);

-- The appendix's idx_supervisor, kept to the online devices and ordered by
-- device: it answers "the devices online under S, a page at a time" and the
-- per-supervisor counts.
CREATE INDEX idx_supervisor ON device_registry (supervisor_id, device_id) WHERE status = 'online';
CREATE INDEX idx_online ON device_registry (device_id) WHERE status = 'online';
CREATE INDEX idx_agent_type ON device_registry (agent_type);
CREATE INDEX idx_last_seen ON device_registry (last_seen);

-- Who holds each device: the design's `device:{id}:supervisor` with its TTL.
-- A row whose expires_at is not after the store's clock has lapsed and owns
-- nothing; PostgresStore::purge_expired deletes such rows.
CREATE TABLE device_lease (
    device_id         VARCHAR(64) COLLATE "C" PRIMARY KEY,
    supervisor_id     VARCHAR(64) COLLATE "C" NOT NULL,
    expires_at        TIMESTAMPTZ NOT NULL,
    -- Whom the last claim took the lease from: NULL if it was free (or had
    -- lapsed), the claimant itself for a renewal. Written by the claim
    -- statement from the row it locked, so concurrent claims each learn the
    -- truth about the one before them.
    claimed_from      VARCHAR(64) COLLATE "C"
);

CREATE INDEX idx_lease_expires_at ON device_lease (expires_at);

-- Immutable configuration template versions.
CREATE TABLE config_templates (
    -- '{agent_type}/{version}': 97 characters at most, so wider than the appendix's 64.
    template_id       VARCHAR(97) COLLATE "C" PRIMARY KEY,
    name              VARCHAR(128),
    agent_type        VARCHAR(32) COLLATE "C" NOT NULL,
    version           VARCHAR(64) COLLATE "C" NOT NULL,
    -- The bundle's JSON (file name -> {content_type, text | base64}).
    config_data       TEXT NOT NULL,
    -- Added: the bundle's SHA-256 (64 hex digits), to compare content cheaply.
    config_hash       VARCHAR(64) NOT NULL,
    is_active         BOOLEAN NOT NULL DEFAULT true,
    created_by        TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    -- Added: the order versions were stored in ("oldest first").
    stored_seq        BIGINT GENERATED ALWAYS AS IDENTITY,
    UNIQUE (agent_type, version)
);

CREATE INDEX idx_templates_by_agent_type ON config_templates (agent_type, stored_seq);

-- Added: the `latest` pointer of each agent type (the design's `config:{type}:latest`).
CREATE TABLE config_latest (
    agent_type        VARCHAR(32) COLLATE "C" PRIMARY KEY,
    version           VARCHAR(64) COLLATE "C" NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    FOREIGN KEY (agent_type, version) REFERENCES config_templates (agent_type, version)
);

-- Added: the configuration each device should run.
CREATE TABLE device_desired_config (
    device_id         VARCHAR(64) COLLATE "C" PRIMARY KEY,
    agent_type        VARCHAR(32) COLLATE "C" NOT NULL,
    version           VARCHAR(64) COLLATE "C" NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    FOREIGN KEY (agent_type, version) REFERENCES config_templates (agent_type, version)
);

-- Every command sent, and how it ended.
CREATE TABLE command_audit (
    id                BIGSERIAL PRIMARY KEY,
    device_id         VARCHAR(64) COLLATE "C",
    supervisor_id     VARCHAR(64) COLLATE "C",
    command_type      VARCHAR(32),
    -- The command's Appendix B JSON.
    payload           JSONB,
    correlation_id    VARCHAR(64) COLLATE "C",
    -- 'pending', then the outcome: acked, failed, timed_out, device_offline, unsupported.
    status            VARCHAR(16),
    error_message     TEXT,
    initiated_by      VARCHAR(64),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at      TIMESTAMPTZ
);

-- A command is recorded once, however often it is delivered.
CREATE UNIQUE INDEX idx_audit_correlation_id ON command_audit (correlation_id);
-- The appendix's idx_device_id and idx_created_at, extended to the keyset the pages follow.
CREATE INDEX idx_device_id ON command_audit (device_id, created_at, id);
CREATE INDEX idx_created_at ON command_audit (created_at, id);

CREATE TABLE supervisor_registry (
    supervisor_id     VARCHAR(64) COLLATE "C" PRIMARY KEY,
    pod_name          VARCHAR(128),
    pod_ip            VARCHAR(45),
    device_count      INTEGER NOT NULL DEFAULT 0,
    capacity          INTEGER NOT NULL DEFAULT 20000,
    last_heartbeat    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    status            VARCHAR(16) NOT NULL DEFAULT 'active'
);

CREATE INDEX idx_status ON supervisor_registry (status);
