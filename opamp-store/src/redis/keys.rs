//! The Redis key names of the design's data model (§4.3), under an optional prefix.
//!
//! The design's `{id}` is written literally: a device's keys carry the hash tag
//! `{device-5}`, so on Redis Cluster its routing key, status hash, desired
//! configuration and index lock live in one slot, and one script may touch
//! them together. It also keeps ids apart that a plain `device:…:supervisor`
//! would confuse: `device:{d1}:supervisor` (the lease of `d1`) can never be
//! `device:{d1:supervisor}` (the status of the device `d1:supervisor`). Ids
//! cannot contain braces, so the tag always ends where the id does.

use opamp_core::{AgentType, ConfigRef, CorrelationId, DeviceId, Error, Result, RolloutId, SupervisorId};

/// The version name the `latest` pointer takes: no template may have it.
pub(super) const LATEST: &str = "latest";

/// The longest key prefix accepted.
const MAX_PREFIX: usize = 64;

/// Builds every key the store uses.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`: printable ASCII without spaces or braces (a brace
    /// would move the hash tag), at most 64 bytes; empty for none.
    pub(super) fn new(prefix: &str) -> Result<Self> {
        if prefix.len() > MAX_PREFIX {
            return Err(Error::invalid_input(format!(
                "redis key prefix {prefix:?} is {} bytes long; the limit is {MAX_PREFIX}",
                prefix.len()
            )));
        }
        if let Some(bad) = prefix.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}')) {
            return Err(Error::invalid_input(format!(
                "redis key prefix {prefix:?} contains {bad:?}; only printable ASCII without spaces, `{{` or `}}` is allowed"
            )));
        }
        Ok(Keys {
            prefix: prefix.to_owned(),
        })
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = String::with_capacity(self.prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        key.push_str(&self.prefix);
        parts.iter().for_each(|part| key.push_str(part));
        key
    }

    /// `device:{id}:supervisor`: the lease (a string naming the supervisor; its expiry is the lease's end).
    pub(super) fn lease(&self, device: &DeviceId) -> String {
        self.key(&["device:{", device.as_str(), "}:supervisor"])
    }

    /// `device:{id}`: the status hash.
    pub(super) fn status(&self, device: &DeviceId) -> String {
        self.key(&["device:{", device.as_str(), "}"])
    }

    /// `device:{id}:desired`: the configuration the device should run, `type/version`.
    pub(super) fn desired(&self, device: &DeviceId) -> String {
        self.key(&["device:{", device.as_str(), "}:desired"])
    }

    /// `device:{id}:indexing`: held while one writer brings the indexes in step with the status.
    pub(super) fn index_lock(&self, device: &DeviceId) -> String {
        self.key(&["device:{", device.as_str(), "}:indexing"])
    }

    /// `devices:online`: the set of online devices.
    pub(super) fn online(&self) -> String {
        self.key(&["devices:online"])
    }

    /// `device:{id}:revoked`: the device's revocation, as JSON.
    pub(super) fn revocation(&self, device: &DeviceId) -> String {
        self.key(&["device:{", device.as_str(), "}:revoked"])
    }

    /// `devices:revoked`: the set of revoked devices, for listing them.
    pub(super) fn revoked(&self) -> String {
        self.key(&["devices:revoked"])
    }

    /// `devices`: the set of every device that has been online.
    pub(super) fn known(&self) -> String {
        self.key(&["devices"])
    }

    /// `command:{id}`: a command's record (JSON), kept for the store's command retention.
    pub(super) fn command(&self, id: &CorrelationId) -> String {
        self.key(&["command:{", &id.to_string(), "}"])
    }

    /// `commands:{pending}`: the pending commands' ids, a sorted set scored by
    /// deadline (Unix milliseconds), for any control plane to sweep.
    pub(super) fn pending_commands(&self) -> String {
        self.key(&["commands:{pending}"])
    }

    /// `commands:ended`: the pub/sub channel on which each command that ends
    /// is announced (its correlation id), for `watch_endings`.
    pub(super) fn ended_commands(&self) -> String {
        self.key(&["commands:ended"])
    }

    /// `rollout:{rollouts}:id`: a rollout (JSON). Every rollout shares the
    /// hash tag of the index, so one script writes both.
    pub(super) fn rollout(&self, id: &RolloutId) -> String {
        self.key(&["rollout:{rollouts}:", &id.to_string()])
    }

    /// `rollouts:{rollouts}`: the ids of the rollouts, a sorted set in id (time) order.
    pub(super) fn rollouts(&self) -> String {
        self.key(&["rollouts:{rollouts}"])
    }

    /// `rollout:{id}:driver`: the lease on driving a rollout (a string naming
    /// the driver; its expiry is the lease's end). A hash tag of its own: no
    /// script touches it with another key.
    pub(super) fn rollout_driver(&self, id: &RolloutId) -> String {
        self.key(&["rollout:{", &id.to_string(), "}:driver"])
    }

    /// `store:generation`: the store's [`StoreGeneration`](opamp_core::StoreGeneration) (JSON), never expiring.
    pub(super) fn generation(&self) -> String {
        self.key(&["store:generation"])
    }

    /// `supervisors`: the set of supervisors that have held devices (for `device_counts`).
    pub(super) fn supervisors(&self) -> String {
        self.key(&["supervisors"])
    }

    /// `supervisor:{id}:devices`: the devices online under a supervisor.
    pub(super) fn supervisor_devices(&self, supervisor: &SupervisorId) -> String {
        self.key(&["supervisor:{", supervisor.as_str(), "}:devices"])
    }

    /// `supervisor:{id}:device_count`: the size of that set, kept with it.
    pub(super) fn device_count(&self, supervisor: &SupervisorId) -> String {
        self.key(&["supervisor:{", supervisor.as_str(), "}:device_count"])
    }

    /// `config:{type}:{version}`: one template.
    pub(super) fn template(&self, config: &ConfigRef) -> String {
        self.key(&["config:{", config.agent_type.as_str(), "}:", config.version.as_str()])
    }

    /// `config:{type}:latest`: the version `latest` points at.
    pub(super) fn latest(&self, agent_type: &AgentType) -> String {
        self.key(&["config:{", agent_type.as_str(), "}:", LATEST])
    }

    /// `config:{type}`: the list of the type's versions, oldest first.
    pub(super) fn versions(&self, agent_type: &AgentType) -> String {
        self.key(&["config:{", agent_type.as_str(), "}"])
    }
}

/// The Redis Cluster slot of `key` (CRC16/XMODEM of its hash tag, modulo 16384).
pub(super) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|b| *b == b'}')
            .filter(|len| *len > 0)
            .map(|len| &rest[..len])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_cluster_spec() {
        // The check value of CRC16/XMODEM, as the Redis Cluster specification gives it.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(slot("foo{{bar}}zap"), crc16(b"{bar") % 16384);
    }

    #[test]
    fn a_devices_keys_share_its_slot_and_ids_cannot_collide() {
        let keys = Keys::new("test:").unwrap();
        let d1 = DeviceId::new("d1").unwrap();
        let tricky = DeviceId::new("d1:supervisor").unwrap();
        assert_eq!(keys.lease(&d1), "test:device:{d1}:supervisor");
        assert_eq!(keys.status(&tricky), "test:device:{d1:supervisor}");
        assert_ne!(keys.lease(&d1), keys.status(&tricky));
        let slots = [
            keys.lease(&d1),
            keys.status(&d1),
            keys.desired(&d1),
            keys.index_lock(&d1),
        ]
        .map(|k| slot(&k));
        assert!(slots.iter().all(|s| *s == slots[0]), "{slots:?}");
    }

    #[test]
    fn prefixes_with_braces_or_spaces_are_refused() {
        for bad in ["a{b", "a}b", "a b", "é"] {
            let err = Keys::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err}");
        }
        assert!(Keys::new(&"x".repeat(65)).is_err());
        let err = Keys::new("fleet-é:").unwrap_err().to_string();
        assert!(err.contains("contains 'é'"), "{err}");
        assert_eq!(Keys::new("").unwrap().online(), "devices:online");
    }
}
