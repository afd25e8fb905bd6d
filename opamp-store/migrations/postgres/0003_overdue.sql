-- When a pending command's acknowledgement is due, as a column, so that any
-- control plane can find the commands no outcome answered in time
-- (opamp_core::TrackingStore::overdue_commands), whoever sent them.
ALTER TABLE command_audit ADD COLUMN deadline TIMESTAMPTZ;

-- Rows written before this migration: the deadline is in the command's JSON.
UPDATE command_audit SET deadline = (payload -> 'payload' ->> 'deadline')::timestamptz
WHERE status = 'pending' AND payload -> 'payload' ? 'deadline';

-- Only pending rows are swept, so only they are indexed.
CREATE INDEX idx_audit_overdue ON command_audit (deadline, correlation_id) WHERE status = 'pending';
