//! What the fleet knows about each device, and partial updates to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::ConfigHash;
use crate::id::{AgentType, ConfigVersion, DeviceId, SupervisorId};
use crate::time::Timestamp;

/// Free-form `key → value` labels describing a device (site, model, ring, …).
pub type Labels = BTreeMap<String, String>;

/// Whether a device is connected to a supervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Connected (the design's `status "online"`).
    Online,
    /// Not connected.
    #[default]
    Offline,
}

impl Presence {
    /// `online` or `offline`, as stored in the design's `device:{id}` hash.
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Offline => "offline",
        }
    }
}

/// The status of one device: the design's `device:{id}` hash and more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceStatus {
    /// The device.
    #[serde(rename = "device_id")]
    pub device: DeviceId,
    /// Online or offline.
    pub status: Presence,
    /// The supervisor it is (or was last) connected to.
    pub supervisor: Option<SupervisorId>,
    /// Whether it emits telemetry.
    pub emission: bool,
    /// The configuration version it last reported as applied.
    pub config_version: Option<ConfigVersion>,
    /// The hash of the configuration it last reported as applied.
    pub config_hash: Option<ConfigHash>,
    /// The kind of agent it runs.
    pub agent_type: Option<AgentType>,
    /// When it was last heard from.
    pub last_seen: Option<Timestamp>,
    /// When its current (or last) session began.
    pub connected_at: Option<Timestamp>,
    /// Its labels.
    pub labels: Labels,
    /// The last error it reported, cleared by a success.
    pub last_error: Option<String>,
}

impl DeviceStatus {
    /// The status of a device nothing is known about yet: offline, no emission.
    pub fn new(device: DeviceId) -> Self {
        DeviceStatus {
            device,
            status: Presence::Offline,
            supervisor: None,
            emission: false,
            config_version: None,
            config_hash: None,
            agent_type: None,
            last_seen: None,
            connected_at: None,
            labels: Labels::new(),
            last_error: None,
        }
    }

    /// Whether the device is online.
    pub fn is_online(&self) -> bool {
        self.status == Presence::Online
    }

    /// Applies `patch` as a store must (see [`StatusPatch`]); the fence is the caller's to check.
    pub fn apply(&mut self, patch: &StatusPatch) {
        match &patch.presence {
            Some(PresenceUpdate::Online {
                supervisor,
                connected_at,
            }) => {
                self.status = Presence::Online;
                self.supervisor = Some(*supervisor);
                self.connected_at = Some(*connected_at);
            }
            Some(PresenceUpdate::Offline) => self.status = Presence::Offline,
            None => {}
        }
        if let Some(emission) = patch.emission {
            self.emission = emission;
        }
        if let Some(version) = patch.config_version {
            self.config_version = Some(version);
        }
        if let Some(hash) = patch.config_hash {
            self.config_hash = Some(hash);
        }
        if let Some(agent_type) = patch.agent_type {
            self.agent_type = Some(agent_type);
        }
        if let Some(last_seen) = patch.last_seen {
            self.last_seen = Some(last_seen);
        }
        if let Some(labels) = &patch.labels {
            self.labels = labels.clone();
        }
        if let Some(last_error) = &patch.last_error {
            self.last_error = last_error.clone();
        }
    }
}

/// A change of presence within a [`StatusPatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceUpdate {
    /// The device connected to `supervisor` at `connected_at`.
    Online {
        /// Its new supervisor.
        supervisor: SupervisorId,
        /// When the session began.
        connected_at: Timestamp,
    },
    /// The device disconnected. Usually sent with a fence, so that a stale
    /// supervisor cannot mark offline a device that is now online elsewhere.
    Offline,
}

/// A partial update of a [`DeviceStatus`]: fields left `None` are unchanged.
///
/// A store applies a patch atomically, creating the status if there is none,
/// and keeps its indexes in step: a device marked online under supervisor S is
/// in the online set and in S's device set (and in no other supervisor's);
/// marked offline, it is in neither.
///
/// With a [`fence`](StatusPatch::fenced_by), the patch applies only while the
/// stored status names that supervisor; otherwise the store changes nothing
/// and returns [`Error::NotOwner`](crate::Error::NotOwner) naming the one it
/// names, or, when the device has no status at all (never recorded, or lost
/// with the store's data), [`Error::NotFound`](crate::Error::NotFound) naming
/// the device. The two differ for a supervisor: another owner means its
/// session is stale; no status means the store forgot it, and the supervisor
/// should write it again.
///
/// With a [lease condition](StatusPatch::leased_by), the patch applies (and
/// creates the status if there is none) only while that supervisor holds the
/// device's lease, as [`lookup`](crate::RoutingStore::lookup) judges it,
/// checked in the same atomic step as the write; otherwise the store changes
/// nothing and returns [`Error::NotOwner`](crate::Error::NotOwner) naming the
/// lease's holder, if any. A supervisor marks a device online under itself
/// this way after claiming it, so that of two supervisors registering one
/// device at once, the status ends up naming the one whose claim came last.
/// A patch carries a fence or a lease condition, not both
/// ([`Error::InvalidInput`](crate::Error::InvalidInput)).
///
/// ```
/// use opamp_core::{StatusPatch, SupervisorId, Timestamp};
///
/// let s1 = SupervisorId::new("supervisor-1")?;
/// let online = StatusPatch::new().online(s1, Timestamp::now()).emission(true);
/// let offline = StatusPatch::new().offline().fenced_by(s1);
/// # let _ = (online, offline);
/// # Ok::<(), opamp_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusPatch {
    /// Apply only while the status names this supervisor.
    pub fence: Option<SupervisorId>,
    /// Apply only while this supervisor holds the device's lease.
    pub lease: Option<SupervisorId>,
    /// A change of presence.
    pub presence: Option<PresenceUpdate>,
    /// New emission state.
    pub emission: Option<bool>,
    /// New applied configuration version.
    pub config_version: Option<ConfigVersion>,
    /// New applied configuration hash.
    pub config_hash: Option<ConfigHash>,
    /// New agent type.
    pub agent_type: Option<AgentType>,
    /// New last-seen time.
    pub last_seen: Option<Timestamp>,
    /// New labels (replacing all of them).
    pub labels: Option<Labels>,
    /// `Some(Some(e))` records an error, `Some(None)` clears it.
    pub last_error: Option<Option<String>>,
}

impl StatusPatch {
    /// A patch that changes nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies only while the stored status names `supervisor`.
    pub fn fenced_by(mut self, supervisor: SupervisorId) -> Self {
        self.fence = Some(supervisor);
        self
    }

    /// Applies only while `supervisor` holds the device's lease.
    pub fn leased_by(mut self, supervisor: SupervisorId) -> Self {
        self.lease = Some(supervisor);
        self
    }

    /// The [`Error::InvalidInput`](crate::Error::InvalidInput) of a patch
    /// carrying both a fence and a lease condition, which stores refuse.
    pub fn check_conditions(&self, device: &DeviceId) -> crate::Result<()> {
        match (self.fence, self.lease) {
            (Some(fence), Some(lease)) => Err(crate::Error::invalid_input(format!(
                "status patch of device {device} is both fenced by {fence} and conditional on the lease of {lease}; \
                 it may carry one of the two"
            ))),
            _ => Ok(()),
        }
    }

    /// Marks the device online under `supervisor`, connected at `at`.
    pub fn online(mut self, supervisor: SupervisorId, at: Timestamp) -> Self {
        self.presence = Some(PresenceUpdate::Online {
            supervisor,
            connected_at: at,
        });
        self
    }

    /// Marks the device offline.
    pub fn offline(mut self) -> Self {
        self.presence = Some(PresenceUpdate::Offline);
        self
    }

    /// Sets the emission state.
    pub fn emission(mut self, state: bool) -> Self {
        self.emission = Some(state);
        self
    }

    /// Sets the applied configuration version and hash.
    pub fn config(mut self, version: ConfigVersion, hash: Option<ConfigHash>) -> Self {
        self.config_version = Some(version);
        self.config_hash = hash;
        self
    }

    /// Sets the agent type.
    pub fn agent_type(mut self, agent_type: AgentType) -> Self {
        self.agent_type = Some(agent_type);
        self
    }

    /// Sets the last-seen time.
    pub fn last_seen(mut self, at: Timestamp) -> Self {
        self.last_seen = Some(at);
        self
    }

    /// Replaces the labels.
    pub fn labels(mut self, labels: Labels) -> Self {
        self.labels = Some(labels);
        self
    }

    /// Records (`Some`) or clears (`None`) the last error.
    pub fn last_error(mut self, error: Option<String>) -> Self {
        self.last_error = Some(error);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_changes_only_what_is_set() {
        let s1 = SupervisorId::new("s1").unwrap();
        let t = Timestamp::from_unix_seconds(100).unwrap();
        let mut status = DeviceStatus::new(DeviceId::new("d").unwrap());
        status.apply(
            &StatusPatch::new()
                .online(s1, t)
                .emission(true)
                .last_error(Some("x".into())),
        );
        assert!(status.is_online());
        assert_eq!(status.supervisor, Some(s1));
        assert_eq!(status.connected_at, Some(t));
        assert!(status.emission);
        status.apply(&StatusPatch::new().offline().last_error(None));
        assert!(!status.is_online());
        assert_eq!(status.supervisor, Some(s1), "the last supervisor is kept");
        assert!(status.emission, "untouched fields keep their values");
        assert_eq!(status.last_error, None);
    }
}
