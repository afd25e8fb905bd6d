//! Between the wire messages of `control.proto` and the core's transport messages.
//!
//! Decoding checks everything a peer could get wrong and says which field was
//! wrong; the text ends up in the `InvalidArgument` status that closes the stream.

use std::sync::Arc;

use opamp_core::transport::{
    Capabilities, CommandAck as CoreCommandAck, ConfigAck as CoreConfigAck, ConfigPush as CoreConfigPush, DeviceHello,
    FromDevice, StatusReport, ToDevice,
};
use opamp_core::{
    AgentType, Command as CoreCommand, CommandKind, CommandOutcome, ConfigApplyState, ConfigBundle, ConfigFile,
    ConfigHash, ConfigRef, ConfigVersion, CorrelationId, DeviceId, SupervisorId, Timestamp,
};

use super::proto::{self, envelope::Body};

/// What a peer sent wrong, for the status message.
pub(crate) type Problem = String;

/// The name of an envelope's body, for messages about it.
pub(crate) fn body_name(body: &Option<Body>) -> &'static str {
    match body {
        None => "an envelope with no body",
        Some(Body::Register(_)) => "register",
        Some(Body::Command(_)) => "command",
        Some(Body::Event(_)) => "event",
        Some(Body::ConfigPush(_)) => "config_push",
        Some(Body::ConfigAck(_)) => "config_ack",
        Some(Body::CommandAck(_)) => "command_ack",
        Some(Body::Heartbeat(_)) => "heartbeat",
        Some(Body::Registered(_)) => "registered",
    }
}

fn envelope(body: Body) -> proto::Envelope {
    proto::Envelope { body: Some(body) }
}

fn optional_text(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

fn field<T>(name: &str, parsed: opamp_core::Result<T>) -> Result<T, Problem> {
    parsed.map_err(|err| format!("{name}: {err}"))
}

fn hash_of(name: &str, bytes: &[u8]) -> Result<ConfigHash, Problem> {
    field(name, ConfigHash::from_slice(bytes))
}

fn correlation_id(name: &str, text: &str) -> Result<CorrelationId, Problem> {
    field(name, text.parse())
}

fn optional_correlation_id(name: &str, text: &str) -> Result<Option<CorrelationId>, Problem> {
    optional_text(text).map(|text| correlation_id(name, text)).transpose()
}

fn timestamp(name: &str, millis: i64) -> Result<Timestamp, Problem> {
    Timestamp::from_unix_millis(millis).ok_or_else(|| format!("{name}: {millis} ms is out of range"))
}

// ---- register ----

/// The register message for `hello`, carrying `token`.
pub(crate) fn register(hello: &DeviceHello, token: &str) -> proto::Envelope {
    let caps = &hello.capabilities;
    envelope(Body::Register(proto::EdgeIdentity {
        device_id: hello.device.to_string(),
        agent_type: hello.agent_type.map(|t| t.to_string()).unwrap_or_default(),
        config_version: hello.config_version.map(|v| v.to_string()).unwrap_or_default(),
        config_hash: hello.config_hash.map(|h| h.as_bytes().to_vec()).unwrap_or_default(),
        labels: hello.labels.clone().into_iter().collect(),
        capabilities: Some(proto::Capabilities {
            emission: caps.emission,
            remote_config: caps.remote_config,
            restart: caps.restart,
            custom: caps.custom.clone(),
        }),
        token: token.to_owned(),
    }))
}

/// The device id a register message claims; `None` when it is empty, for the
/// caller to take from the client certificate (or refuse).
pub(crate) fn claimed_device(identity: &proto::EdgeIdentity) -> Result<Option<DeviceId>, Problem> {
    optional_text(&identity.device_id)
        .map(|id| field("register.device_id", DeviceId::new(id)))
        .transpose()
}

/// The hello of `device`, which proved its identity, from the rest of its register message.
pub(crate) fn hello(device: DeviceId, identity: proto::EdgeIdentity) -> Result<DeviceHello, Problem> {
    let mut hello = DeviceHello::new(device);
    hello.agent_type = optional_text(&identity.agent_type)
        .map(|t| field("register.agent_type", AgentType::new(t)))
        .transpose()?;
    hello.config_version = optional_text(&identity.config_version)
        .map(|v| field("register.config_version", ConfigVersion::new(v)))
        .transpose()?;
    if !identity.config_hash.is_empty() {
        hello.config_hash = Some(hash_of("register.config_hash", &identity.config_hash)?);
    }
    hello.labels = identity.labels.into_iter().collect();
    if let Some(caps) = identity.capabilities {
        let mut capabilities = Capabilities::default();
        capabilities.emission = caps.emission;
        capabilities.remote_config = caps.remote_config;
        capabilities.restart = caps.restart;
        capabilities.custom = caps.custom;
        hello.capabilities = capabilities;
    }
    Ok(hello)
}

// ---- supervisor -> device ----

/// The wire form of a message to a device.
pub(crate) fn to_device(message: &ToDevice) -> proto::Envelope {
    match message {
        ToDevice::Command(command) => envelope(Body::Command(command_message(command))),
        ToDevice::ConfigPush(push) => envelope(Body::ConfigPush(config_push_message(push))),
        ToDevice::Registered(supervisor) => envelope(Body::Registered(proto::Registered {
            supervisor_id: supervisor.to_string(),
        })),
        other => {
            // A message added to the core without a wire form: say so instead of dropping it silently.
            tracing::error!(message = ?other, "no gRPC form for this message; sending an empty envelope");
            proto::Envelope { body: None }
        }
    }
}

fn command_message(command: &CoreCommand) -> proto::Command {
    use proto::command::Kind;
    let kind = match &command.kind {
        CommandKind::SetEmission { state } => Kind::SetEmission(proto::SetEmission { enabled: *state }),
        CommandKind::Restart => Kind::Restart(proto::Restart {}),
        CommandKind::ApplyConfig { agent_type, version } => Kind::ApplyConfig(proto::ApplyConfig {
            agent_type: agent_type.to_string(),
            config_version: version.to_string(),
        }),
        CommandKind::Custom {
            capability,
            message_type,
            data,
        } => Kind::Custom(proto::Custom {
            capability: capability.clone(),
            message_type: message_type.clone(),
            data: data.clone(),
        }),
        // A kind added to the core without a wire form: sent as a custom
        // message no device accepts, so it answers `unsupported` rather than
        // the command vanishing.
        other => Kind::Custom(proto::Custom {
            capability: "opamp.unknown".into(),
            message_type: other.wire_name().into(),
            data: Vec::new(),
        }),
    };
    proto::Command {
        correlation_id: command.correlation_id.to_string(),
        device_id: command.device.to_string(),
        issued_at_ms: command.issued_at.unix_millis(),
        deadline_ms: command.deadline.unix_millis(),
        kind: Some(kind),
    }
}

fn config_push_message(push: &CoreConfigPush) -> proto::ConfigPush {
    proto::ConfigPush {
        correlation_id: push.correlation_id.map(|id| id.to_string()).unwrap_or_default(),
        agent_type: push.config.agent_type.to_string(),
        config_version: push.config.version.to_string(),
        config_hash: push.hash.as_bytes().to_vec(),
        files: push
            .bundle
            .files()
            .map(|(name, file)| {
                let file = proto::ConfigFile {
                    body: file.body.clone(),
                    content_type: file.content_type.clone(),
                };
                (name.to_owned(), file)
            })
            .collect(),
    }
}

/// A message from the supervisor, as the device reads it.
pub(crate) fn from_supervisor(envelope: proto::Envelope) -> Result<ToDevice, Problem> {
    match envelope.body {
        Some(Body::Command(command)) => Ok(ToDevice::Command(Box::new(command_of(command)?))),
        Some(Body::ConfigPush(push)) => Ok(ToDevice::ConfigPush(Arc::new(config_push_of(push)?))),
        Some(Body::Registered(registered)) => Ok(ToDevice::Registered(Box::new(field(
            "registered.supervisor_id",
            SupervisorId::new(&registered.supervisor_id),
        )?))),
        other => Err(format!("a supervisor does not send {}", body_name(&other))),
    }
}

fn command_of(command: proto::Command) -> Result<CoreCommand, Problem> {
    use proto::command::Kind;
    let kind = match command.kind {
        Some(Kind::SetEmission(set)) => CommandKind::SetEmission { state: set.enabled },
        Some(Kind::Restart(_)) => CommandKind::Restart,
        Some(Kind::ApplyConfig(apply)) => CommandKind::ApplyConfig {
            agent_type: field("command.apply_config.agent_type", AgentType::new(&apply.agent_type))?,
            version: field(
                "command.apply_config.config_version",
                ConfigVersion::new(&apply.config_version),
            )?,
        },
        Some(Kind::Custom(custom)) => CommandKind::Custom {
            capability: custom.capability,
            message_type: custom.message_type,
            data: custom.data,
        },
        None => return Err("command.kind is missing".into()),
    };
    let mut decoded = CoreCommand::new(
        field("command.device_id", DeviceId::new(&command.device_id))?,
        kind,
        timestamp("command.issued_at_ms", command.issued_at_ms)?,
        std::time::Duration::ZERO,
    );
    decoded.correlation_id = correlation_id("command.correlation_id", &command.correlation_id)?;
    decoded.deadline = timestamp("command.deadline_ms", command.deadline_ms)?;
    Ok(decoded)
}

fn config_push_of(push: proto::ConfigPush) -> Result<CoreConfigPush, Problem> {
    let config = ConfigRef::new(
        field("config_push.agent_type", AgentType::new(&push.agent_type))?,
        field("config_push.config_version", ConfigVersion::new(&push.config_version))?,
    );
    let mut bundle = ConfigBundle::new();
    for (name, file) in push.files {
        let file = ConfigFile::new(file.content_type, file.body);
        field(
            &format!("config_push.files[{name:?}]"),
            bundle.insert(name.clone(), file),
        )?;
    }
    let declared = hash_of("config_push.config_hash", &push.config_hash)?;
    let decoded = CoreConfigPush::new(
        optional_correlation_id("config_push.correlation_id", &push.correlation_id)?,
        config,
        bundle,
    );
    if decoded.hash != declared {
        return Err(format!(
            "config_push.config_hash is {declared} but the files hash to {}",
            decoded.hash
        ));
    }
    Ok(decoded)
}

// ---- device -> supervisor ----

/// The wire form of a message from a device.
pub(crate) fn from_device_message(message: &FromDevice) -> proto::Envelope {
    match message {
        FromDevice::CommandAck(ack) => {
            use proto::command_ack::Outcome;
            let (outcome, reason) = match &ack.outcome {
                CommandOutcome::Acked => (Outcome::Acked, String::new()),
                CommandOutcome::Failed { reason } => (Outcome::Failed, reason.clone()),
                CommandOutcome::Unsupported { reason } => (Outcome::Unsupported, reason.clone()),
                // Only the supervisor judges these; a device reporting one reports a failure.
                other => (Outcome::Failed, format!("device answered {}", other.name())),
            };
            envelope(Body::CommandAck(proto::CommandAck {
                correlation_id: ack.correlation_id.to_string(),
                outcome: outcome.into(),
                reason,
            }))
        }
        FromDevice::ConfigAck(ack) => envelope(Body::ConfigAck(proto::ConfigAck {
            correlation_id: ack.correlation_id.map(|id| id.to_string()).unwrap_or_default(),
            config_hash: ack.hash.as_bytes().to_vec(),
            state: match ack.state {
                ConfigApplyState::Applied => proto::ApplyState::Applied,
                ConfigApplyState::Applying => proto::ApplyState::Applying,
                ConfigApplyState::Failed => proto::ApplyState::Failed,
            }
            .into(),
            error: ack.error.clone().unwrap_or_default(),
        })),
        FromDevice::Status(report) => envelope(Body::Event(proto::Event {
            emission: report.emission,
            healthy: report.healthy,
            last_error: report.last_error.clone(),
        })),
        FromDevice::Heartbeat => envelope(Body::Heartbeat(proto::Heartbeat {})),
        other => {
            tracing::error!(message = ?other, "no gRPC form for this message; sending a heartbeat instead");
            envelope(Body::Heartbeat(proto::Heartbeat {}))
        }
    }
}

/// A message from a registered device, as the supervisor reads it.
pub(crate) fn from_device(envelope: proto::Envelope) -> Result<FromDevice, Problem> {
    match envelope.body {
        Some(Body::CommandAck(ack)) => {
            use proto::command_ack::Outcome;
            let outcome = match Outcome::try_from(ack.outcome) {
                Ok(Outcome::Acked) => CommandOutcome::Acked,
                Ok(Outcome::Failed) => CommandOutcome::Failed { reason: ack.reason },
                Ok(Outcome::Unsupported) => CommandOutcome::Unsupported { reason: ack.reason },
                Ok(Outcome::Unspecified) => return Err("command_ack.outcome is unset".into()),
                Err(_) => return Err(format!("command_ack.outcome {} is not a known outcome", ack.outcome)),
            };
            let id = correlation_id("command_ack.correlation_id", &ack.correlation_id)?;
            Ok(FromDevice::CommandAck(CoreCommandAck::new(id, outcome)))
        }
        Some(Body::ConfigAck(ack)) => {
            let state = match proto::ApplyState::try_from(ack.state) {
                Ok(proto::ApplyState::Applied) => ConfigApplyState::Applied,
                Ok(proto::ApplyState::Applying) => ConfigApplyState::Applying,
                Ok(proto::ApplyState::Failed) => ConfigApplyState::Failed,
                Ok(proto::ApplyState::Unset) => return Err("config_ack.state is unset".into()),
                Err(_) => return Err(format!("config_ack.state {} is not a known state", ack.state)),
            };
            Ok(FromDevice::ConfigAck(Box::new(CoreConfigAck::new(
                optional_correlation_id("config_ack.correlation_id", &ack.correlation_id)?,
                hash_of("config_ack.config_hash", &ack.config_hash)?,
                state,
                optional_text(&ack.error).map(str::to_owned),
            ))))
        }
        Some(Body::Event(event)) => {
            let mut report = StatusReport::default();
            report.emission = event.emission;
            report.healthy = event.healthy;
            report.last_error = event.last_error;
            Ok(FromDevice::Status(report))
        }
        Some(Body::Heartbeat(_)) => Ok(FromDevice::Heartbeat),
        Some(Body::Register(_)) => Err("register may only be sent once, as the first message".into()),
        other => Err(format!("a device does not send {}", body_name(&other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opamp_core::{DEFAULT_COMMAND_TIMEOUT, Labels};

    fn device() -> DeviceId {
        DeviceId::new("device-5").unwrap()
    }

    #[test]
    fn every_message_to_a_device_round_trips() {
        let now = Timestamp::from_unix_millis(1_780_000_000_123).unwrap();
        let kinds = [
            CommandKind::SetEmission { state: true },
            CommandKind::Restart,
            CommandKind::ApplyConfig {
                agent_type: AgentType::new("fluentbit").unwrap(),
                version: ConfigVersion::new("v2").unwrap(),
            },
            CommandKind::Custom {
                capability: "com.example.diag".into(),
                message_type: "dump".into(),
                data: vec![0, 1, 255],
            },
        ];
        let bundle = ConfigBundle::new()
            .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[SERVICE]\n"))
            .unwrap();
        let config = ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v2").unwrap());
        let mut messages: Vec<ToDevice> = kinds
            .into_iter()
            .map(|kind| ToDevice::Command(Box::new(CoreCommand::new(device(), kind, now, DEFAULT_COMMAND_TIMEOUT))))
            .collect();
        messages.push(ToDevice::ConfigPush(Arc::new(CoreConfigPush::new(
            Some(CorrelationId::new()),
            config,
            bundle.clone(),
        ))));
        messages.push(ToDevice::ConfigPush(Arc::new(CoreConfigPush::new(
            None, config, bundle,
        ))));
        messages.push(ToDevice::Registered(Box::new(SupervisorId::new("s1").unwrap())));
        for message in messages {
            assert_eq!(from_supervisor(to_device(&message)).unwrap(), message);
        }
    }

    #[test]
    fn every_message_from_a_device_round_trips() {
        let hash = ConfigBundle::new().hash();
        let mut report = StatusReport::default();
        report.emission = Some(false);
        report.last_error = Some("disk full".into());
        let messages = [
            FromDevice::CommandAck(CoreCommandAck::new(CorrelationId::new(), CommandOutcome::Acked)),
            FromDevice::CommandAck(CoreCommandAck::new(
                CorrelationId::new(),
                CommandOutcome::Failed { reason: "busy".into() },
            )),
            FromDevice::CommandAck(CoreCommandAck::new(
                CorrelationId::new(),
                CommandOutcome::Unsupported { reason: "no".into() },
            )),
            FromDevice::ConfigAck(Box::new(CoreConfigAck::new(
                Some(CorrelationId::new()),
                hash,
                ConfigApplyState::Failed,
                Some("reload refused".into()),
            ))),
            FromDevice::ConfigAck(Box::new(CoreConfigAck::new(
                None,
                hash,
                ConfigApplyState::Applied,
                None,
            ))),
            FromDevice::Status(report),
            FromDevice::Heartbeat,
        ];
        for message in messages {
            assert_eq!(from_device(from_device_message(&message)).unwrap(), message);
        }
    }

    #[test]
    fn register_round_trips_and_checks_fields() {
        let mut hello = DeviceHello::new(device());
        hello.agent_type = Some(AgentType::new("fluentbit").unwrap());
        hello.config_version = Some(ConfigVersion::new("v1").unwrap());
        hello.config_hash = Some(ConfigBundle::new().hash());
        hello.labels = Labels::from([("ring".to_owned(), "canary".to_owned())]);
        hello.capabilities = Capabilities::all_builtin();
        let Some(Body::Register(identity)) = register(&hello, "tok").body else {
            panic!("not a register")
        };
        assert_eq!(identity.token, "tok");
        assert_eq!(claimed_device(&identity).unwrap(), Some(device()));
        assert_eq!(super::hello(device(), identity.clone()).unwrap(), hello);

        let mut bad = identity.clone();
        bad.device_id = "no spaces".into();
        assert!(claimed_device(&bad).unwrap_err().contains("register.device_id"));
        let mut bad = identity.clone();
        bad.config_hash = vec![1, 2, 3];
        assert!(
            super::hello(device(), bad)
                .unwrap_err()
                .contains("register.config_hash")
        );
        let mut anonymous = identity;
        anonymous.device_id.clear();
        assert_eq!(claimed_device(&anonymous).unwrap(), None);
    }

    #[test]
    fn bad_messages_from_devices_are_named() {
        let cases = [
            (proto::Envelope { body: None }, "no body"),
            (
                register(&DeviceHello::new(device()), ""),
                "register may only be sent once",
            ),
            (
                envelope(Body::Registered(proto::Registered::default())),
                "does not send registered",
            ),
            (
                envelope(Body::CommandAck(proto::CommandAck {
                    correlation_id: "nope".into(),
                    outcome: 1,
                    reason: String::new(),
                })),
                "command_ack.correlation_id",
            ),
            (
                envelope(Body::CommandAck(proto::CommandAck {
                    correlation_id: CorrelationId::new().to_string(),
                    outcome: 42,
                    reason: String::new(),
                })),
                "command_ack.outcome 42",
            ),
            (
                envelope(Body::ConfigAck(proto::ConfigAck {
                    correlation_id: String::new(),
                    config_hash: vec![0; 32],
                    state: 0,
                    error: String::new(),
                })),
                "config_ack.state is unset",
            ),
            (
                envelope(Body::ConfigAck(proto::ConfigAck {
                    correlation_id: String::new(),
                    config_hash: vec![0; 31],
                    state: 1,
                    error: String::new(),
                })),
                "config_ack.config_hash",
            ),
        ];
        for (envelope, expected) in cases {
            let problem = from_device(envelope).unwrap_err();
            assert!(problem.contains(expected), "{expected}: {problem}");
        }
    }

    #[test]
    fn a_push_whose_hash_does_not_match_its_files_is_refused() {
        let config = ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v2").unwrap());
        let push = CoreConfigPush::new(None, config, ConfigBundle::new());
        let mut wire = config_push_message(&push);
        wire.files.insert(
            "extra.conf".into(),
            proto::ConfigFile {
                body: b"x".to_vec(),
                content_type: String::new(),
            },
        );
        let problem = from_supervisor(envelope(Body::ConfigPush(wire))).unwrap_err();
        assert!(problem.contains("config_push.config_hash"), "{problem}");
    }
}
