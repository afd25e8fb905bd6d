//! Leases in `device_lease`, each operation one statement.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use opamp_core::store::validate_ttl;
use opamp_core::{Claim, DeviceId, Result, RoutingStore, SupervisorId, Timestamp};

use super::PostgresStore;
use super::error::PgError;
use super::pipeline;
use super::rows::{row_name, sql_time, stored};

/// Takes the lease. On conflict the `SET` expressions read the row this
/// statement locked, its newest version: the owner it replaces (if its lease
/// is live) goes to `claimed_from`, and comes back through `RETURNING`.
const CLAIM: &str = "\
INSERT INTO device_lease AS l (device_id, supervisor_id, expires_at, claimed_from)
VALUES ($1, $2, $3, NULL)
ON CONFLICT (device_id) DO UPDATE SET
    claimed_from = CASE WHEN l.expires_at > $4 THEN l.supervisor_id END,
    supervisor_id = EXCLUDED.supervisor_id,
    expires_at = EXCLUDED.expires_at
RETURNING claimed_from";

/// Extends the live leases `$1` holds among `$2`; returns the devices extended.
const RENEW: &str = "\
UPDATE device_lease AS l SET expires_at = $3
FROM UNNEST($2::text[]) AS r(device_id)
WHERE l.device_id = r.device_id AND l.supervisor_id = $1 AND l.expires_at > $4
RETURNING l.device_id";

const RELEASE: &str = "\
DELETE FROM device_lease WHERE device_id = $1 AND supervisor_id = $2 AND expires_at > $3";

pub(super) const LOOKUP: &str = "SELECT supervisor_id FROM device_lease WHERE device_id = $1 AND expires_at > $2";

/// The live owners among `$1`, with each entry's (1-based) position in the input.
const LOOKUP_MANY: &str = "\
SELECT r.ord, l.supervisor_id
FROM UNNEST($1::text[]) WITH ORDINALITY AS r(device_id, ord)
JOIN device_lease AS l ON l.device_id = r.device_id AND l.expires_at > $2";

const PURGE: &str = "DELETE FROM device_lease WHERE expires_at <= $1";

/// A supervisor id read from `device_lease`; bad text is an error naming the row.
pub(super) fn stored_supervisor(device: &str, column: &'static str, text: &str) -> Result<SupervisorId> {
    stored(
        || row_name("device_lease", "device_id", device),
        column,
        text,
        str::parse::<SupervisorId>,
    )
}

/// Each device's owner from `(ordinal, owner)` rows of an `UNNEST … WITH
/// ORDINALITY` over `devices`: `None` where no row came back.
pub(super) fn place_owners(devices: &[&str], rows: Vec<(i64, String)>) -> Vec<Result<Option<SupervisorId>>> {
    let mut answers: Vec<Result<Option<SupervisorId>>> = devices.iter().map(|_| Ok(None)).collect();
    for (ord, owner) in rows {
        // Ordinals come from the array the statement was sent: 1..=len.
        if let Some(at) = usize::try_from(ord - 1).ok().filter(|at| *at < devices.len()) {
            answers[at] = stored_supervisor(devices[at], "supervisor_id", &owner).map(Some);
        }
    }
    answers
}

impl PostgresStore {
    /// The owner of `device` at `now`, through the pool.
    async fn lookup_pooled(&self, device: &DeviceId, now: Timestamp) -> Result<Option<SupervisorId>> {
        let owner: Option<String> = sqlx::query_scalar(LOOKUP)
            .bind(device.as_str())
            .bind(sql_time(now)?)
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("lookup of device {device}")))?;
        owner
            .map(|owner| stored_supervisor(device.as_str(), "supervisor_id", &owner))
            .transpose()
    }

    /// Deletes every lapsed lease; returns how many it deleted.
    ///
    /// Lapsed leases are already invisible; this only gives their space back.
    /// One statement: a host may run it on a timer.
    pub async fn purge_expired(&self) -> Result<u64> {
        let now = sql_time(self.clock.now())?;
        let done = sqlx::query(PURGE)
            .bind(now)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| "purging lapsed leases"))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl RoutingStore for PostgresStore {
    async fn claim(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Result<Claim> {
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let previous: Option<String> = sqlx::query_scalar(CLAIM)
            .bind(device.as_str())
            .bind(supervisor.as_str())
            .bind(sql_time(now.saturating_add(ttl))?)
            .bind(sql_time(now)?)
            .fetch_one(&self.db)
            .await
            .map_err(PgError::query(|| format!("claim of device {device} by {supervisor}")))?;
        Ok(match previous {
            None => Claim::Acquired,
            Some(previous) if previous == supervisor.as_str() => Claim::Renewed,
            Some(previous) => Claim::TakenOver {
                previous: stored_supervisor(device.as_str(), "claimed_from", &previous)?,
            },
        })
    }

    async fn renew(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Result<Vec<DeviceId>> {
        validate_ttl(ttl)?;
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
        let renewed: Vec<String> = sqlx::query_scalar(RENEW)
            .bind(supervisor.as_str())
            .bind(&ids)
            .bind(sql_time(now.saturating_add(ttl))?)
            .bind(sql_time(now)?)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("renewal of {} leases by {supervisor}", devices.len())
            }))?;
        let renewed: HashSet<&str> = renewed.iter().map(String::as_str).collect();
        Ok(devices
            .iter()
            .filter(|device| !renewed.contains(device.as_str()))
            .copied()
            .collect())
    }

    async fn release(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool> {
        let done = sqlx::query(RELEASE)
            .bind(device.as_str())
            .bind(supervisor.as_str())
            .bind(sql_time(self.clock.now())?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("release of device {device} by {supervisor}")))?;
        Ok(done.rows_affected() > 0)
    }

    async fn lookup(&self, device: &DeviceId) -> Result<Option<SupervisorId>> {
        let now = self.clock.now();
        if let Some(pipes) = &self.pipes {
            match pipes.lookup(*device, now).await {
                pipeline::Answer::Owner(owner) => {
                    return owner
                        .map(|owner| stored_supervisor(device.as_str(), "supervisor_id", &owner))
                        .transpose();
                }
                pipeline::Answer::Failed => return self.lookup_pooled(device, now).await,
                pipeline::Answer::Unsupported => {}
            }
        }
        match self.lanes.lookup(*device, now).await {
            Some(answer) => answer,
            None => self.lookup_pooled(device, now).await,
        }
    }

    async fn lookup_many(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
        let owners: Vec<(i64, String)> = sqlx::query_as(LOOKUP_MANY)
            .bind(&ids)
            .bind(sql_time(self.clock.now())?)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| format!("lookup of {} devices", devices.len())))?;
        place_owners(&ids, owners).into_iter().collect()
    }
}
