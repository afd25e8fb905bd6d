-- Revoked devices (opamp_core::RevocationStore): a device with a row here may
-- not register with any supervisor until the row is deleted (reinstated).
-- Supervisors read one row by key at each registration; operators list them
-- by device id.
CREATE TABLE device_revocation (
    device_id   VARCHAR(64) COLLATE "C" PRIMARY KEY,
    reason      TEXT NOT NULL,
    revoked_at  TIMESTAMPTZ NOT NULL,
    revoked_by  TEXT
);
