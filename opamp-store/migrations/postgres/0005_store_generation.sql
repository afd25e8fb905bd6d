-- The store's generation (opamp_core::TrackingStore::generation): one row,
-- written by the first control plane to use the schema and never changed,
-- so that control planes notice a database restored from an older backup or
-- replaced by an empty one. The body is opamp_core::StoreGeneration as JSON.
CREATE TABLE store_generation (
    singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    body       JSONB NOT NULL
);
