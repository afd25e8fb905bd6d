-- What control planes track (opamp_core::TrackingStore).

-- A command's record is its audit row: `payload` holds the command as last
-- sent and `status` where it stands ('pending', 'deferred', then the outcome).
-- A retry sends it again: count the sends.
ALTER TABLE command_audit ADD COLUMN attempts SMALLINT NOT NULL DEFAULT 1;

-- Rollouts, written whole by whichever control plane drives them; `revision`
-- makes each write conditional on the one it was read at.
CREATE TABLE rollout (
    id          UUID PRIMARY KEY,
    revision    BIGINT NOT NULL,
    body        JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);
