//! Events about devices, published by supervisors on the event bus.
//!
//! # Wire format
//!
//! On the `opamp.events` topic (keyed by device id) an event is one JSON
//! object shaped like a command of Appendix B:
//!
//! ```json
//! {"device_id": "device-5", "event": "command_completed",
//!  "payload": {"correlation_id": "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10", "outcome": "acked"},
//!  "timestamp": "2026-01-27T10:30:00.012Z"}
//! ```

use serde::{Deserialize, Serialize};

use crate::command::{CommandOutcome, CorrelationId};
use crate::config::ConfigHash;
use crate::error::{Error, Result};
use crate::id::{ConfigVersion, DeviceId, SupervisorId};
use crate::time::Timestamp;

/// Where a device stands with a configuration it was sent.
///
/// Mirrors OpAMP's `RemoteConfigStatuses` (APPLIED, APPLYING, FAILED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigApplyState {
    /// The configuration is in effect.
    Applied,
    /// The device is applying it; a final state follows.
    Applying,
    /// Applying failed; the device kept or restored its previous configuration.
    Failed,
}

/// Something that happened to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceEvent {
    /// The device.
    #[serde(rename = "device_id")]
    pub device: DeviceId,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// When it happened.
    #[serde(rename = "timestamp")]
    pub at: Timestamp,
}

/// What happened to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", content = "payload", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The device connected to a supervisor and registered.
    Connected {
        /// The supervisor it connected to.
        supervisor: SupervisorId,
    },
    /// The device's session with a supervisor ended.
    Disconnected {
        /// The supervisor it was connected to.
        supervisor: SupervisorId,
    },
    /// The device registered with another supervisor while one still held it.
    TakenOver {
        /// The previous owner, which must drop its stale session.
        from: SupervisorId,
        /// The new owner.
        to: SupervisorId,
    },
    /// The device reported on a configuration it was sent.
    ConfigAck {
        /// The hash of the configuration the report is about.
        hash: ConfigHash,
        /// Where applying it stands.
        state: ConfigApplyState,
        /// Why it failed, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The device's reported state changed.
    StatusChanged {
        /// Whether it emits telemetry now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        emission: Option<bool>,
        /// The configuration version now in effect.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_version: Option<ConfigVersion>,
    },
    /// A command to the device ended.
    CommandCompleted {
        /// The command's correlation id.
        correlation_id: CorrelationId,
        /// How it ended.
        #[serde(flatten)]
        outcome: CommandOutcome,
    },
}

impl DeviceEvent {
    /// An event about `device` at `at`.
    pub fn new(device: DeviceId, kind: EventKind, at: Timestamp) -> Self {
        DeviceEvent { device, kind, at }
    }

    /// The JSON form.
    pub fn to_json(&self) -> Vec<u8> {
        // Every field serialises infallibly (strings, bools, validated names).
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the JSON form; errors name what was wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|err| Error::invalid_input(format!("event JSON: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn event(kind: EventKind) -> DeviceEvent {
        DeviceEvent::new(
            DeviceId::new("device-5").unwrap(),
            kind,
            Timestamp::parse_rfc3339("2026-01-27T10:30:00.012Z").unwrap(),
        )
    }

    #[test]
    fn command_completed_json() {
        let id: CorrelationId = "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10".parse().unwrap();
        let e = event(EventKind::CommandCompleted {
            correlation_id: id,
            outcome: CommandOutcome::Failed {
                reason: "reload returned 1".into(),
            },
        });
        let value: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(
            value,
            json!({
                "device_id": "device-5",
                "event": "command_completed",
                "payload": {"correlation_id": id.to_string(), "outcome": "failed", "reason": "reload returned 1"},
                "timestamp": "2026-01-27T10:30:00.012Z"
            })
        );
        assert_eq!(DeviceEvent::from_json(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn every_kind_round_trips() {
        let s1 = SupervisorId::new("s1").unwrap();
        let s2 = SupervisorId::new("s2").unwrap();
        let kinds = [
            EventKind::Connected { supervisor: s1 },
            EventKind::Disconnected { supervisor: s1 },
            EventKind::TakenOver { from: s1, to: s2 },
            EventKind::ConfigAck {
                hash: crate::ConfigBundle::new().hash(),
                state: ConfigApplyState::Failed,
                error: Some("bad".into()),
            },
            EventKind::StatusChanged {
                emission: Some(true),
                config_version: None,
            },
            EventKind::CommandCompleted {
                correlation_id: CorrelationId::new(),
                outcome: CommandOutcome::TimedOut,
            },
        ];
        for kind in kinds {
            let e = event(kind);
            assert_eq!(DeviceEvent::from_json(&e.to_json()).unwrap(), e);
        }
    }

    #[test]
    fn bad_events_are_invalid_input() {
        let err = DeviceEvent::from_json(
            br#"{"device_id":"d","event":"exploded","payload":{},"timestamp":"2026-01-27T10:30:00Z"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }));
        assert!(err.to_string().contains("exploded"), "{err}");
        assert!(DeviceEvent::from_json(b"[]").is_err());
    }
}
