//! Revoked devices in Redis: each revocation is a JSON string under the
//! device's own hash tag (`device:{id}:revoked`), so the read every
//! registration makes lands on the device's own shard of a cluster, and the
//! set `devices:revoked` indexes them for listing.
//!
//! The two live in different slots on a cluster, so they are written one
//! after the other: the revocation first and the index after it (a revoke
//! retried puts a missing index entry back), and on reinstating the
//! revocation is dropped first and its index entry after it. A listing
//! skips index entries whose revocation is gone.

use async_trait::async_trait;
use opamp_core::{DeviceId, Page, PageRequest, Result, Revocation, RevocationStore};
use redis::Value;

use super::error::RedisError;
use super::{RedisStore, checked, text};

impl RedisStore {
    fn read_revocation(key: &str, stored: Option<String>) -> Result<Option<Revocation>> {
        stored
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|err| RedisError::garbled(key, None, format!("not a revocation in JSON: {err}")).into())
            })
            .transpose()
    }

    async fn index_revoked(&self, device: &DeviceId, revoked: bool) -> Result<()> {
        let index = self.keys.revoked();
        let command = if revoked { "SADD" } else { "SREM" };
        let cmd = redis::cmd(command).arg(&index).arg(device.as_str()).to_owned();
        checked(&index, self.one(|| format!("{command} {index} {device}"), &cmd).await?)?;
        Ok(())
    }
}

#[async_trait]
impl RevocationStore for RedisStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<bool> {
        let key = self.keys.revocation(&revocation.device);
        let json = serde_json::to_string(revocation).map_err(|err| {
            opamp_core::Error::invalid_input(format!("revocation of {} as JSON: {err}", revocation.device))
        })?;
        let set = redis::cmd("SET").arg(&key).arg(json).arg("NX").to_owned();
        let stored = checked(&key, self.one(|| format!("SET {key} NX"), &set).await?)?;
        // Indexed whether or not this call stored it: a revoke retried after
        // the index write failed puts the entry back.
        self.index_revoked(&revocation.device, true).await?;
        Ok(!matches!(stored, Value::Nil))
    }

    async fn reinstate(&self, device: &DeviceId) -> Result<bool> {
        let key = self.keys.revocation(device);
        let dropped = checked(&key, self.on_key("DEL", &key).await?)?;
        self.index_revoked(device, false).await?;
        Ok(matches!(dropped, Value::Int(n) if n > 0))
    }

    async fn revocation(&self, device: &DeviceId) -> Result<Option<Revocation>> {
        let key = self.keys.revocation(device);
        Self::read_revocation(&key, self.get(&key).await?)
    }

    async fn revocations(&self, page: &PageRequest) -> Result<Page<Revocation>> {
        let devices = self.list_set(&self.keys.revoked(), page).await?;
        let keys = devices
            .items
            .iter()
            .map(|device| self.keys.revocation(device))
            .collect();
        let revocations = self
            .batch(
                keys,
                |key| redis::cmd("GET").arg(key).to_owned(),
                |key, reply| Self::read_revocation(key, text(reply, key)?),
            )
            .await?;
        Ok(Page {
            // An index entry whose revocation is gone is a reinstatement half done.
            items: revocations.into_iter().flatten().collect(),
            next: devices.next,
        })
    }
}
