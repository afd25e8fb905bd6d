//! Commands sent to devices, their outcomes, and their JSON form on the bus.
//!
//! # Wire format (the design's Appendix B)
//!
//! A command on the `opamp.commands` topic is one JSON object with exactly
//! these members:
//!
//! ```json
//! {
//!   "device_id": "device-5",
//!   "command": "toggle_emission",
//!   "payload": { "state": true, "deadline": "2026-01-27T10:30:30Z" },
//!   "timestamp": "2026-01-27T10:30:00Z",
//!   "correlation_id": "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10"
//! }
//! ```
//!
//! | `command`         | payload members                                     | [`CommandKind`]        |
//! |-------------------|-----------------------------------------------------|------------------------|
//! | `toggle_emission` | `state` (bool)                                      | `SetEmission`          |
//! | `apply_config`    | `agent_type`, `config_version`                      | `ApplyConfig`          |
//! | `restart`         | none                                                | `Restart`              |
//! | `custom`          | `capability`, `type`, `data` (base64)               | `Custom`               |
//!
//! Every payload may carry `deadline` (RFC 3339): when the supervisor gives up
//! waiting for the device. Without it the deadline is `timestamp` +
//! [`DEFAULT_COMMAND_TIMEOUT`]. Unknown members are ignored, so producers may
//! add context (Appendix B's toggle carries `config_version`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::{Error, Result, excerpt};
use crate::id::{AgentType, ConfigVersion, DeviceId};
use crate::time::Timestamp;

/// How long a device has to acknowledge a command when the sender sets no deadline.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Ties a command to its acknowledgement, its outcome event and its audit row.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CorrelationId(Uuid);

impl CorrelationId {
    /// A new random (v4) id.
    pub fn new() -> Self {
        CorrelationId(Uuid::new_v4())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        CorrelationId(uuid)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CorrelationId({self})")
    }
}

impl FromStr for CorrelationId {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Uuid::parse_str(text)
            .map(CorrelationId)
            .map_err(|err| Error::invalid_input(format!("correlation id {} is not a UUID: {err}", excerpt(text))))
    }
}

impl Serialize for CorrelationId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CorrelationId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a command asks the device to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandKind {
    /// Turn telemetry emission on or off (`toggle_emission` on the wire).
    SetEmission {
        /// `true` to emit.
        state: bool,
    },
    /// Apply a stored configuration template.
    ApplyConfig {
        /// The agent type of the template.
        agent_type: AgentType,
        /// The template version.
        version: ConfigVersion,
    },
    /// Restart the agent.
    Restart,
    /// A message for a custom capability of the agent (OpAMP's `CustomMessage`).
    Custom {
        /// The capability, e.g. `com.example.diagnostics`.
        capability: String,
        /// The message type within the capability.
        message_type: String,
        /// Opaque data.
        data: Vec<u8>,
    },
    /// Close the device's session, without telling the device anything: the
    /// supervisor holding it does this itself once the device was revoked
    /// ([`RevocationStore`](crate::RevocationStore)), so that it registers
    /// again and is refused. Never sent to a device.
    Disconnect {
        /// Why, for the supervisor's log.
        reason: String,
    },
}

impl CommandKind {
    /// The name of this kind on the wire (`toggle_emission`, `apply_config`, …).
    pub fn wire_name(&self) -> &'static str {
        match self {
            CommandKind::SetEmission { .. } => "toggle_emission",
            CommandKind::ApplyConfig { .. } => "apply_config",
            CommandKind::Restart => "restart",
            CommandKind::Custom { .. } => "custom",
            CommandKind::Disconnect { .. } => "disconnect",
        }
    }
}

/// A command for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Command {
    /// Ties the command to its outcome.
    pub correlation_id: CorrelationId,
    /// The device it is for.
    pub device: DeviceId,
    /// What to do.
    pub kind: CommandKind,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When to stop waiting for the device's acknowledgement.
    pub deadline: Timestamp,
}

impl Command {
    /// A command with a fresh correlation id, issued at `now`, due `timeout` later.
    pub fn new(device: DeviceId, kind: CommandKind, now: Timestamp, timeout: Duration) -> Self {
        Command {
            correlation_id: CorrelationId::new(),
            device,
            kind,
            issued_at: now,
            deadline: now.saturating_add(timeout),
        }
    }

    /// The same command under another correlation id.
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = id;
        self
    }

    /// The Appendix B JSON of this command.
    pub fn to_json(&self) -> Vec<u8> {
        let payload = match &self.kind {
            CommandKind::SetEmission { state } => Payload {
                state: Some(*state),
                ..Payload::default()
            },
            CommandKind::ApplyConfig { agent_type, version } => Payload {
                agent_type: Some(agent_type.to_string()),
                config_version: Some(version.to_string()),
                ..Payload::default()
            },
            CommandKind::Restart => Payload::default(),
            CommandKind::Custom {
                capability,
                message_type,
                data,
            } => Payload {
                capability: Some(capability.clone()),
                message_type: Some(message_type.clone()),
                data: Some(BASE64.encode(data)),
                ..Payload::default()
            },
            CommandKind::Disconnect { reason } => Payload {
                reason: Some(reason.clone()),
                ..Payload::default()
            },
        };
        let wire = WireCommand {
            device_id: self.device.to_string(),
            command: self.kind.wire_name().to_owned(),
            payload: Payload {
                deadline: Some(self.deadline.to_rfc3339()),
                ..payload
            },
            timestamp: self.issued_at.to_rfc3339(),
            correlation_id: self.correlation_id.to_string(),
        };
        // Serialising plain strings, bools and options cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Reads the Appendix B JSON; every error names the member that was wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let wire: WireCommand =
            serde_json::from_slice(bytes).map_err(|err| Error::invalid_input(format!("command JSON: {err}")))?;
        wire.into_command()
    }
}

/// Commands serialise as their Appendix B JSON, so records embedding one read like the bus.
impl Serialize for Command {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let value: serde_json::Value = serde_json::from_slice(&self.to_json()).map_err(serde::ser::Error::custom)?;
        value.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let bytes = serde_json::to_vec(&value).map_err(serde::de::Error::custom)?;
        Command::from_json(&bytes).map_err(serde::de::Error::custom)
    }
}

/// The command as it is on the wire, before validation.
#[derive(Serialize, Deserialize)]
struct WireCommand {
    device_id: String,
    command: String,
    #[serde(default)]
    payload: Payload,
    timestamp: String,
    correlation_id: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Payload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capability: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    message_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline: Option<String>,
}

fn field<T>(name: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| Error::invalid_input(format!("command payload is missing `{name}`")))
}

fn in_member<T>(member: &str, result: Result<T>) -> Result<T> {
    result.map_err(|err| match err {
        Error::InvalidInput { message } => Error::invalid_input(format!("command `{member}`: {message}")),
        other => other,
    })
}

impl WireCommand {
    fn into_command(self) -> Result<Command> {
        let device = in_member("device_id", DeviceId::new(&self.device_id))?;
        let correlation_id = in_member("correlation_id", self.correlation_id.parse())?;
        let issued_at = in_member("timestamp", Timestamp::parse_rfc3339(&self.timestamp))?;
        let p = self.payload;
        let deadline = match p.deadline {
            Some(text) => in_member("payload.deadline", Timestamp::parse_rfc3339(&text))?,
            None => issued_at.saturating_add(DEFAULT_COMMAND_TIMEOUT),
        };
        let kind = match self.command.as_str() {
            "toggle_emission" => CommandKind::SetEmission {
                state: field("state", p.state)?,
            },
            "apply_config" => CommandKind::ApplyConfig {
                agent_type: in_member("payload.agent_type", AgentType::new(field("agent_type", p.agent_type)?))?,
                version: in_member(
                    "payload.config_version",
                    ConfigVersion::new(field("config_version", p.config_version)?),
                )?,
            },
            "restart" => CommandKind::Restart,
            "custom" => CommandKind::Custom {
                capability: field("capability", p.capability)?,
                message_type: field("type", p.message_type)?,
                data: BASE64
                    .decode(field("data", p.data)?.as_bytes())
                    .map_err(|err| Error::invalid_input(format!("command `payload.data` is not base64: {err}")))?,
            },
            "disconnect" => CommandKind::Disconnect {
                reason: p.reason.unwrap_or_default(),
            },
            other => {
                return Err(Error::invalid_input(format!(
                    "unknown command {}; expected toggle_emission, apply_config, restart, custom or disconnect",
                    excerpt(other)
                )));
            }
        };
        Ok(Command {
            correlation_id,
            device,
            kind,
            issued_at,
            deadline,
        })
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CommandOutcome {
    /// The device acknowledged it.
    Acked,
    /// The device (or the supervisor on its behalf) reported a failure.
    Failed {
        /// Why, in the words of whoever failed it.
        reason: String,
    },
    /// No acknowledgement came before the deadline.
    TimedOut,
    /// The device was not connected.
    DeviceOffline,
    /// The device cannot do this.
    Unsupported {
        /// What was not supported.
        reason: String,
    },
}

impl CommandOutcome {
    /// Whether the command took effect.
    pub fn is_success(&self) -> bool {
        matches!(self, CommandOutcome::Acked)
    }

    /// A short stable name: `acked`, `failed`, `timed_out`, `device_offline`, `unsupported`.
    pub fn name(&self) -> &'static str {
        match self {
            CommandOutcome::Acked => "acked",
            CommandOutcome::Failed { .. } => "failed",
            CommandOutcome::TimedOut => "timed_out",
            CommandOutcome::DeviceOffline => "device_offline",
            CommandOutcome::Unsupported { .. } => "unsupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn appendix_b_example_decodes() {
        let json = br#"{
          "device_id": "device-5",
          "command": "toggle_emission",
          "payload": { "state": true, "config_version": "v1.2.3" },
          "timestamp": "2026-01-27T10:30:00Z",
          "correlation_id": "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10"
        }"#;
        let cmd = Command::from_json(json).unwrap();
        assert_eq!(cmd.device.as_str(), "device-5");
        assert_eq!(cmd.kind, CommandKind::SetEmission { state: true });
        assert_eq!(cmd.issued_at, at("2026-01-27T10:30:00Z"));
        assert_eq!(cmd.deadline, at("2026-01-27T10:30:30Z"));
        assert_eq!(cmd.correlation_id.to_string(), "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10");
    }

    #[test]
    fn encodes_exactly_the_five_members() {
        let cmd = Command::new(
            DeviceId::new("device-5").unwrap(),
            CommandKind::SetEmission { state: true },
            at("2026-01-27T10:30:00Z"),
            Duration::from_secs(5),
        );
        let value: Value = serde_json::from_slice(&cmd.to_json()).unwrap();
        assert_eq!(
            value,
            json!({
                "device_id": "device-5",
                "command": "toggle_emission",
                "payload": {"state": true, "deadline": "2026-01-27T10:30:05Z"},
                "timestamp": "2026-01-27T10:30:00Z",
                "correlation_id": cmd.correlation_id.to_string(),
            })
        );
    }

    #[test]
    fn errors_name_the_member() {
        let base = json!({
            "device_id": "d1", "command": "restart", "payload": {},
            "timestamp": "2026-01-27T10:30:00Z",
            "correlation_id": "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10"
        });
        let check = |patch: Value, expect: &str| {
            let mut value = base.clone();
            for (k, v) in patch.as_object().unwrap() {
                value[k] = v.clone();
            }
            let err = Command::from_json(value.to_string().as_bytes()).unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }));
            assert!(err.to_string().contains(expect), "{err} should contain {expect}");
        };
        check(
            json!({"device_id": "bad id"}),
            "command `device_id`: device id \"bad id\"",
        );
        check(json!({"correlation_id": "nope"}), "command `correlation_id`");
        check(json!({"timestamp": "noon"}), "command `timestamp`");
        check(json!({"command": "selfdestruct"}), "unknown command \"selfdestruct\"");
        check(json!({"command": "toggle_emission"}), "missing `state`");
        check(
            json!({"command": "apply_config", "payload": {"agent_type": "fb"}}),
            "missing `config_version`",
        );
        check(
            json!({"command": "apply_config", "payload": {"agent_type": "f:b", "config_version": "1"}}),
            "command `payload.agent_type`",
        );
        check(
            json!({"command": "custom", "payload": {"capability": "c", "type": "t", "data": "%%"}}),
            "not base64",
        );
        check(json!({"payload": {"deadline": 5}}), "command JSON");
        let err = Command::from_json(b"{\"device_id\": \"d1\"").unwrap_err();
        assert!(err.to_string().starts_with("invalid input: command JSON"), "{err}");
        let err = Command::from_json(br#"{"command":"restart"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `device_id`"), "{err}");
    }

    fn arb_kind() -> impl Strategy<Value = CommandKind> {
        prop_oneof![
            any::<bool>().prop_map(|state| CommandKind::SetEmission { state }),
            ("[a-z]{1,32}", "[a-z0-9.+-]{1,64}").prop_map(|(t, v)| CommandKind::ApplyConfig {
                agent_type: AgentType::new(t).unwrap(),
                version: ConfigVersion::new(v).unwrap(),
            }),
            Just(CommandKind::Restart),
            (".{0,16}", ".{0,16}", proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(c, t, d)| {
                CommandKind::Custom {
                    capability: c,
                    message_type: t,
                    data: d,
                }
            }),
            ".{0,32}".prop_map(|reason| CommandKind::Disconnect { reason }),
        ]
    }

    proptest! {
        #[test]
        fn json_round_trips(
            device in "[A-Za-z0-9._:-]{1,64}",
            kind in arb_kind(),
            issued in 0i64..4_000_000_000_000,
            timeout_ms in 0u64..86_400_000,
            uuid in any::<u128>(),
        ) {
            let cmd = Command::new(
                DeviceId::new(device).unwrap(),
                kind,
                Timestamp::from_unix_millis(issued).unwrap(),
                Duration::from_millis(timeout_ms),
            ).with_correlation_id(CorrelationId::from_uuid(Uuid::from_u128(uuid)));
            let json = cmd.to_json();
            prop_assert_eq!(Command::from_json(&json).unwrap(), cmd);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Command::from_json(&bytes);
        }
    }
}
