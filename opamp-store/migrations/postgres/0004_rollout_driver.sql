-- Who drives each rollout (opamp_core::TrackingStore::claim_rollout_driver):
-- a lease, as `device_lease` is one, so one control plane drives a rollout
-- and any other takes it over once the lease lapsed. A row is deleted when
-- its driver lets the rollout go, and outlives a rollout only until it lapses
-- and is claimed again; rollouts are never deleted, so no foreign key.
CREATE TABLE rollout_driver (
    rollout_id  UUID PRIMARY KEY,
    driver      TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
