//! Revoked devices in `device_revocation`: one row per device, read by key
//! at each registration and listed by device id.

use async_trait::async_trait;
use opamp_core::{Cursor, DeviceId, Page, PageRequest, Result, Revocation, RevocationStore};
use sqlx::postgres::PgRow;

use super::PostgresStore;
use super::error::PgError;
use super::rows::{RowReader, row_name, sql_time};
use super::status::page_start;

const REVOKE: &str = "INSERT INTO device_revocation (device_id, reason, revoked_at, revoked_by)
VALUES ($1, $2, $3, $4) ON CONFLICT (device_id) DO NOTHING";

const REINSTATE: &str = "DELETE FROM device_revocation WHERE device_id = $1";

const ONE: &str = "SELECT device_id, reason, revoked_at, revoked_by FROM device_revocation WHERE device_id = $1";

const PAGE: &str = "SELECT device_id, reason, revoked_at, revoked_by FROM device_revocation
WHERE device_id > $1 ORDER BY device_id LIMIT $2";

fn read_revocation(row: &PgRow) -> Result<Revocation> {
    let key: String = sqlx::Row::try_get(row, "device_id").unwrap_or_default();
    let name = || row_name("device_revocation", "device_id", &key);
    let r = RowReader::new(row, &name);
    let device = r.parsed("device_id", str::parse::<DeviceId>)?;
    let mut revocation = Revocation::new(device, r.get::<String>("reason")?, r.time("revoked_at")?)?;
    revocation.revoked_by = r.get("revoked_by")?;
    Ok(revocation)
}

#[async_trait]
impl RevocationStore for PostgresStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<bool> {
        let device = revocation.device;
        let done = sqlx::query(REVOKE)
            .bind(device.as_str())
            .bind(&revocation.reason)
            .bind(sql_time(revocation.revoked_at)?)
            .bind(revocation.revoked_by.as_deref())
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("revoking device {device}")))?;
        Ok(done.rows_affected() == 1)
    }

    async fn reinstate(&self, device: &DeviceId) -> Result<bool> {
        let done = sqlx::query(REINSTATE)
            .bind(device.as_str())
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("reinstating device {device}")))?;
        Ok(done.rows_affected() == 1)
    }

    async fn revocation(&self, device: &DeviceId) -> Result<Option<Revocation>> {
        let row = sqlx::query(ONE)
            .bind(device.as_str())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("revocation of device {device}")))?;
        row.as_ref().map(read_revocation).transpose()
    }

    async fn revocations(&self, page: &PageRequest) -> Result<Page<Revocation>> {
        let (after, fetch) = page_start(page)?;
        let rows = sqlx::query(PAGE)
            .bind(&after)
            .bind(fetch)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| format!("listing revocations after {after:?}")))?;
        let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
        let more = rows.len() > limit;
        let items = rows
            .iter()
            .take(limit)
            .map(read_revocation)
            .collect::<Result<Vec<_>>>()?;
        let next = match items.last() {
            Some(last) if more => Some(Cursor::new(last.device.as_str())),
            _ => None,
        };
        Ok(Page { items, next })
    }
}
