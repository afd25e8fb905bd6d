//! Between OpAMP's messages and the core's transport messages, both ways.
//!
//! Decoding checks what a peer could get wrong and says which field was
//! wrong; the text ends up in the `ErrorResponse` (or HTTP status) that
//! refuses the message.

use std::sync::Arc;
use std::time::Duration;

use opamp_core::transport::{
    Capabilities, CommandAck, ConfigAck, ConfigPush, DeviceHello, FromDevice, StatusReport, ToDevice,
};
use opamp_core::{
    AgentType, Command, CommandKind, CommandOutcome, ConfigApplyState, ConfigBundle, ConfigFile, ConfigHash, ConfigRef,
    ConfigVersion, CorrelationId, DeviceId, SupervisorId, Timestamp,
};
use serde::{Deserialize, Serialize};

use super::proto::{
    self, AgentCapabilities as AgentCap, AgentToServer, AnyValue, KeyValue, RemoteConfigStatuses, ServerToAgent,
    any_value,
};
use super::{DeviceIdSource, EMISSION_CAPABILITY, FLEET_CAPABILITY};

/// What a peer sent wrong, for the refusal.
pub(super) type Problem = String;

/// The identifying attribute naming the agent instance.
pub(super) const SERVICE_INSTANCE_ID: &str = "service.instance.id";
/// The identifying attribute naming the kind of agent.
const SERVICE_NAME: &str = "service.name";
/// The non-identifying attribute carrying the configuration version an agent of this project runs.
const CONFIG_VERSION_ATTRIBUTE: &str = "io.opamp-fleet.config_version";

const SET_EMISSION: &str = "set_emission";
const SET_EMISSION_RESULT: &str = "set_emission_result";
const EMISSION_STATE: &str = "emission_state";
const REGISTERED: &str = "registered";
const CONFIG_REF: &str = "config_ref";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetEmission {
    correlation_id: String,
    enabled: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetEmissionResult {
    correlation_id: String,
    outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reason: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmissionState {
    enabled: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigRefData {
    agent_type: String,
    version: String,
}

fn has(bits: u64, capability: AgentCap) -> bool {
    bits & capability as u64 != 0
}

fn string_value(value: Option<&AnyValue>) -> Option<&str> {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => Some(text),
        _ => None,
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string_value(kv.value.as_ref()))
}

fn text_attribute(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn custom(capability: &str, kind: &str, data: Vec<u8>) -> proto::CustomMessage {
    proto::CustomMessage {
        capability: capability.to_owned(),
        r#type: kind.to_owned(),
        data,
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs of strings and booleans cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn parse_json<'a, T: Deserialize<'a>>(what: &str, data: &'a [u8]) -> Result<T, Problem> {
    serde_json::from_slice(data).map_err(|err| format!("custom message {what}: {err}"))
}

// ---- server side: agent -> core ----

/// The device id of an agent, as `source` says to derive it.
pub(super) fn device_id(
    source: DeviceIdSource,
    uid: &[u8; 16],
    description: Option<&proto::AgentDescription>,
) -> Result<DeviceId, Problem> {
    let text = match source {
        DeviceIdSource::ServiceInstanceId => description
            .and_then(|d| attribute(&d.identifying_attributes, SERVICE_INSTANCE_ID))
            .ok_or_else(|| {
                format!("agent_description.identifying_attributes has no string {SERVICE_INSTANCE_ID}, which names the device")
            })?
            .to_owned(),
        DeviceIdSource::InstanceUidHex => uid.iter().map(|b| format!("{b:02x}")).collect(),
        DeviceIdSource::InstanceUidUuid => super::uuid_text(uid),
    };
    DeviceId::new(&text).map_err(|err| format!("device id {text:?}: {err}"))
}

/// Everything but the device id of an agent's hello, from its first full report.
///
/// `service.name` becomes the agent type and string non-identifying
/// attributes the labels; values this project cannot hold (an agent type
/// with spaces, say) are left out rather than refusing an agent over metadata.
pub(super) fn hello(device: DeviceId, message: &AgentToServer) -> DeviceHello {
    let mut hello = DeviceHello::new(device);
    if let Some(description) = &message.agent_description {
        hello.agent_type =
            attribute(&description.identifying_attributes, SERVICE_NAME).and_then(|name| AgentType::new(name).ok());
        for kv in &description.non_identifying_attributes {
            let Some(value) = string_value(kv.value.as_ref()) else {
                continue;
            };
            if kv.key == CONFIG_VERSION_ATTRIBUTE {
                hello.config_version = ConfigVersion::new(value).ok();
            } else {
                hello.labels.insert(kv.key.clone(), value.to_owned());
            }
        }
    }
    if let Some(status) = &message.remote_config_status {
        if status.status == RemoteConfigStatuses::Applied as i32 {
            hello.config_hash = ConfigHash::from_slice(&status.last_remote_config_hash).ok();
        }
    }
    hello.capabilities = capabilities_of(message);
    hello
}

fn capabilities_of(message: &AgentToServer) -> Capabilities {
    let custom = message
        .custom_capabilities
        .as_ref()
        .map(|c| c.capabilities.clone())
        .unwrap_or_default();
    let mut capabilities = Capabilities::default();
    capabilities.emission = custom.iter().any(|c| c == EMISSION_CAPABILITY);
    capabilities.remote_config = has(message.capabilities, AgentCap::AcceptsRemoteConfig);
    capabilities.restart = has(message.capabilities, AgentCap::AcceptsRestartCommand);
    capabilities.custom = custom;
    capabilities
}

/// Whether the agent is one of this project's, which understands [`FLEET_CAPABILITY`] messages.
pub(super) fn speaks_fleet(hello: &DeviceHello) -> bool {
    hello.capabilities.custom.iter().any(|c| c == FLEET_CAPABILITY)
}

/// The last remote config status an agent reported, so a repeat (after
/// `ReportFullState`, say) is not reported to the supervisor twice.
pub(super) type LastConfigStatus = Option<(Vec<u8>, i32)>;

/// The core messages one report carries, ending with a heartbeat (any
/// message keeps the lease).
pub(super) fn from_agent(message: &AgentToServer, last: &mut LastConfigStatus) -> Result<Vec<FromDevice>, Problem> {
    let mut out = Vec::new();
    if let Some(status) = &message.remote_config_status {
        let key = (status.last_remote_config_hash.clone(), status.status);
        if last.as_ref() != Some(&key) {
            let state = match RemoteConfigStatuses::try_from(status.status) {
                Ok(RemoteConfigStatuses::Applied) => Some(ConfigApplyState::Applied),
                Ok(RemoteConfigStatuses::Applying) => Some(ConfigApplyState::Applying),
                Ok(RemoteConfigStatuses::Failed) => Some(ConfigApplyState::Failed),
                Ok(RemoteConfigStatuses::Unset) => None,
                Err(_) => {
                    return Err(format!(
                        "remote_config_status.status {} is not a known status",
                        status.status
                    ));
                }
            };
            if let Some(state) = state {
                let hash = ConfigHash::from_slice(&status.last_remote_config_hash)
                    .map_err(|err| format!("remote_config_status.last_remote_config_hash: {err}"))?;
                let error = (!status.error_message.is_empty()).then(|| status.error_message.clone());
                out.push(FromDevice::ConfigAck(Box::new(ConfigAck::new(
                    None, hash, state, error,
                ))));
            }
            *last = Some(key);
        }
    }
    let mut report = StatusReport::default();
    if let Some(health) = &message.health {
        report.healthy = Some(health.healthy);
        report.last_error = (!health.last_error.is_empty()).then(|| health.last_error.clone());
    }
    if let Some(custom) = &message.custom_message {
        if custom.capability == EMISSION_CAPABILITY {
            match custom.r#type.as_str() {
                EMISSION_STATE => {
                    let state: EmissionState = parse_json(EMISSION_STATE, &custom.data)?;
                    report.emission = Some(state.enabled);
                }
                SET_EMISSION_RESULT => out.push(FromDevice::CommandAck(emission_result(&custom.data)?)),
                other => {
                    return Err(format!(
                        "custom message type {other:?} is not one an agent sends for {EMISSION_CAPABILITY}"
                    ));
                }
            }
        }
    }
    if report != StatusReport::default() {
        out.push(FromDevice::Status(report));
    }
    out.push(FromDevice::Heartbeat);
    Ok(out)
}

fn emission_result(data: &[u8]) -> Result<CommandAck, Problem> {
    let result: SetEmissionResult = parse_json(SET_EMISSION_RESULT, data)?;
    let id: CorrelationId = result
        .correlation_id
        .parse()
        .map_err(|err| format!("custom message {SET_EMISSION_RESULT}: correlation_id: {err}"))?;
    let outcome = match result.outcome.as_str() {
        "acked" => CommandOutcome::Acked,
        "failed" => CommandOutcome::Failed { reason: result.reason },
        "unsupported" => CommandOutcome::Unsupported { reason: result.reason },
        other => {
            return Err(format!(
                "custom message {SET_EMISSION_RESULT}: outcome {other:?} is not acked, failed or unsupported"
            ));
        }
    };
    Ok(CommandAck::new(id, outcome))
}

// ---- server side: core -> agent ----

/// A message for an agent, and what to tell the supervisor once it is sent
/// (OpAMP has no acknowledgement for restarts and custom messages).
pub(super) struct Outgoing {
    pub(super) message: ServerToAgent,
    pub(super) on_sent: Option<FromDevice>,
    /// What to tell the supervisor if the message cannot be sent (too large).
    pub(super) on_refused: Option<FromDevice>,
}

/// The OpAMP form of `message` for the agent `uid`; `fleet` says whether it
/// understands [`FLEET_CAPABILITY`] messages.
pub(super) fn to_agent(message: &ToDevice, uid: &[u8; 16], fleet: bool) -> Outgoing {
    let mut out = ServerToAgent {
        instance_uid: uid.to_vec(),
        ..Default::default()
    };
    let failed = |id: CorrelationId, reason: &str| {
        Some(FromDevice::CommandAck(CommandAck::new(
            id,
            CommandOutcome::Failed {
                reason: reason.to_owned(),
            },
        )))
    };
    let too_large = "the message is larger than the OpAMP size limit";
    let (on_sent, on_refused) = match message {
        ToDevice::Command(command) => {
            let id = command.correlation_id;
            let delivered = Some(FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Acked)));
            match &command.kind {
                CommandKind::SetEmission { state } => {
                    let data = json(&SetEmission {
                        correlation_id: id.to_string(),
                        enabled: *state,
                    });
                    out.custom_message = Some(custom(EMISSION_CAPABILITY, SET_EMISSION, data));
                    // The agent answers with set_emission_result.
                    (None, failed(id, too_large))
                }
                CommandKind::Restart => {
                    out.command = Some(proto::ServerToAgentCommand {
                        r#type: proto::CommandType::Restart as i32,
                    });
                    (delivered, failed(id, too_large))
                }
                CommandKind::Custom {
                    capability,
                    message_type,
                    data,
                } => {
                    out.custom_message = Some(custom(capability, message_type, data.clone()));
                    (delivered, failed(id, too_large))
                }
                other => {
                    // ApplyConfig reaches devices as a ConfigPush; a kind added
                    // to the core later has no OpAMP form: say so.
                    let reason = format!("OpAMP has no form for {}", other.wire_name());
                    let unsupported =
                        FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Unsupported { reason }));
                    return Outgoing {
                        message: out,
                        on_sent: Some(unsupported.clone()),
                        on_refused: Some(unsupported),
                    };
                }
            }
        }
        ToDevice::ConfigPush(push) => {
            let config_map = push
                .bundle
                .files()
                .map(|(name, file)| {
                    let file = proto::AgentConfigFile {
                        body: file.body.to_vec(),
                        content_type: file.content_type.clone(),
                    };
                    (name.to_owned(), file)
                })
                .collect();
            out.remote_config = Some(proto::AgentRemoteConfig {
                config: Some(proto::AgentConfigMap { config_map }),
                config_hash: push.hash.as_bytes().to_vec(),
            });
            if fleet {
                let data = json(&ConfigRefData {
                    agent_type: push.config.agent_type.to_string(),
                    version: push.config.version.to_string(),
                });
                out.custom_message = Some(custom(FLEET_CAPABILITY, CONFIG_REF, data));
            }
            let refused = FromDevice::ConfigAck(Box::new(ConfigAck::new(
                push.correlation_id,
                push.hash,
                ConfigApplyState::Failed,
                Some(too_large.to_owned()),
            )));
            (None, Some(refused))
        }
        ToDevice::Registered(supervisor) => {
            out.capabilities = super::SERVER_CAPABILITIES;
            out.custom_capabilities = Some(proto::CustomCapabilities {
                capabilities: vec![EMISSION_CAPABILITY.to_owned(), FLEET_CAPABILITY.to_owned()],
            });
            if fleet {
                out.custom_message = Some(custom(
                    FLEET_CAPABILITY,
                    REGISTERED,
                    supervisor.to_string().into_bytes(),
                ));
            }
            (None, None)
        }
        other => {
            tracing::error!(message = ?other, "no OpAMP form for this message; sending an empty ServerToAgent");
            (None, None)
        }
    };
    Outgoing {
        message: out,
        on_sent,
        on_refused,
    }
}

/// An `ErrorResponse` for `uid`; `retry_after` makes it `UNAVAILABLE` with `RetryInfo`.
pub(super) fn error_response(uid: &[u8], message: String, retry_after: Option<Duration>) -> ServerToAgent {
    use proto::ServerErrorResponseType as Type;
    let (kind, details) = match retry_after {
        Some(wait) => (
            Type::Unavailable,
            Some(proto::server_error_response::Details::RetryInfo(proto::RetryInfo {
                retry_after_nanoseconds: u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX),
            })),
        ),
        None => (Type::BadRequest, None),
    };
    ServerToAgent {
        instance_uid: uid.to_vec(),
        error_response: Some(proto::ServerErrorResponse {
            r#type: kind as i32,
            error_message: message,
            details,
        }),
        ..Default::default()
    }
}

// ---- client side ----

/// The agent description of `hello`: the device id as `service.instance.id`,
/// the agent type as `service.name`, labels and the config version as
/// non-identifying attributes.
pub(super) fn description(hello: &DeviceHello) -> proto::AgentDescription {
    let mut identifying = vec![text_attribute(SERVICE_INSTANCE_ID, hello.device.as_str())];
    if let Some(agent_type) = hello.agent_type {
        identifying.push(text_attribute(SERVICE_NAME, agent_type.as_str()));
    }
    let mut other: Vec<KeyValue> = hello
        .labels
        .iter()
        .map(|(k, v)| text_attribute(k, v.as_str()))
        .collect();
    if let Some(version) = hello.config_version {
        other.push(text_attribute(CONFIG_VERSION_ATTRIBUTE, version.as_str()));
    }
    proto::AgentDescription {
        identifying_attributes: identifying,
        non_identifying_attributes: other,
    }
}

/// The capability bits of `hello`.
pub(super) fn capability_bits(hello: &DeviceHello) -> u64 {
    let caps = &hello.capabilities;
    let mut bits = AgentCap::ReportsStatus as u64
        | AgentCap::ReportsHealth as u64
        | AgentCap::ReportsRemoteConfig as u64
        | AgentCap::ReportsHeartbeat as u64;
    if caps.remote_config {
        bits |= AgentCap::AcceptsRemoteConfig as u64;
    }
    if caps.restart {
        bits |= AgentCap::AcceptsRestartCommand as u64;
    }
    bits
}

/// The custom capabilities of `hello`, with this project's own.
pub(super) fn custom_capabilities(hello: &DeviceHello) -> proto::CustomCapabilities {
    let mut capabilities = vec![FLEET_CAPABILITY.to_owned()];
    if hello.capabilities.emission {
        capabilities.push(EMISSION_CAPABILITY.to_owned());
    }
    capabilities.extend(
        hello
            .capabilities
            .custom
            .iter()
            .filter(|c| *c != FLEET_CAPABILITY && *c != EMISSION_CAPABILITY)
            .cloned(),
    );
    proto::CustomCapabilities { capabilities }
}

/// The remote config status of the configuration `hello` says it runs.
pub(super) fn initial_config_status(hello: &DeviceHello) -> Option<proto::RemoteConfigStatus> {
    hello.config_hash.map(|hash| proto::RemoteConfigStatus {
        last_remote_config_hash: hash.as_bytes().to_vec(),
        status: RemoteConfigStatuses::Applied as i32,
        error_message: String::new(),
    })
}

/// Fills the parts of `message` that carry `report`; `emission_ids` are the
/// commands answered with `set_emission_result` (OpAMP acknowledges nothing
/// else: the server acknowledged those when it sent them).
///
/// Returns whether there was anything to send.
pub(super) fn to_server(
    report: &FromDevice,
    message: &mut AgentToServer,
    emission_ids: &mut Vec<CorrelationId>,
) -> bool {
    match report {
        FromDevice::CommandAck(ack) => {
            let Some(at) = emission_ids.iter().position(|id| *id == ack.correlation_id) else {
                return false;
            };
            emission_ids.swap_remove(at);
            let (outcome, reason) = match &ack.outcome {
                CommandOutcome::Acked => ("acked", String::new()),
                CommandOutcome::Unsupported { reason } => ("unsupported", reason.clone()),
                CommandOutcome::Failed { reason } => ("failed", reason.clone()),
                other => ("failed", format!("device answered {}", other.name())),
            };
            let data = json(&SetEmissionResult {
                correlation_id: ack.correlation_id.to_string(),
                outcome: outcome.to_owned(),
                reason,
            });
            message.custom_message = Some(custom(EMISSION_CAPABILITY, SET_EMISSION_RESULT, data));
        }
        FromDevice::ConfigAck(ack) => {
            let status = match ack.state {
                ConfigApplyState::Applied => RemoteConfigStatuses::Applied,
                ConfigApplyState::Applying => RemoteConfigStatuses::Applying,
                ConfigApplyState::Failed => RemoteConfigStatuses::Failed,
            };
            message.remote_config_status = Some(proto::RemoteConfigStatus {
                last_remote_config_hash: ack.hash.as_bytes().to_vec(),
                status: status as i32,
                error_message: ack.error.clone().unwrap_or_default(),
            });
        }
        FromDevice::Status(report) => {
            if report.healthy.is_some() || report.last_error.is_some() {
                message.health = Some(proto::ComponentHealth {
                    healthy: report.healthy.unwrap_or(report.last_error.is_none()),
                    last_error: report.last_error.clone().unwrap_or_default(),
                    ..Default::default()
                });
            }
            if let Some(enabled) = report.emission {
                let data = json(&EmissionState { enabled });
                message.custom_message = Some(custom(EMISSION_CAPABILITY, EMISSION_STATE, data));
            }
        }
        FromDevice::Heartbeat => {}
        other => {
            tracing::error!(message = ?other, "no OpAMP form for this message; sending a heartbeat instead");
        }
    }
    true
}

/// What the client makes of a `ServerToAgent`.
#[derive(Debug, Default)]
pub(super) struct FromServer {
    /// Messages for the agent runtime.
    pub(super) messages: Vec<ToDevice>,
    /// The server asked for everything again.
    pub(super) report_full_state: bool,
    /// The server gave the agent a new instance uid.
    pub(super) new_instance_uid: Option<[u8; 16]>,
    /// The supervisor that registered the agent, in the first reply.
    pub(super) registered: Option<SupervisorId>,
    /// A remote config the agent cannot take (its hash is not one of ours): report it failed.
    pub(super) refused_config: Option<proto::RemoteConfigStatus>,
}

/// Reads a `ServerToAgent` for the agent `hello`; an `ErrorResponse` is an error.
pub(super) fn from_server(
    message: ServerToAgent,
    hello: &DeviceHello,
    emission_ids: &mut Vec<CorrelationId>,
) -> Result<FromServer, opamp_core::Error> {
    use opamp_core::Error;
    let mut out = FromServer::default();
    if let Some(error) = message.error_response {
        let text = format!("the OpAMP server refused the message: {}", error.error_message);
        return Err(match proto::ServerErrorResponseType::try_from(error.r#type) {
            Ok(proto::ServerErrorResponseType::Unavailable) => {
                let wait = match error.details {
                    Some(proto::server_error_response::Details::RetryInfo(info)) => {
                        format!(" (retry after {} ms)", info.retry_after_nanoseconds / 1_000_000)
                    }
                    None => String::new(),
                };
                Error::unavailable(format!("{text}{wait}"))
            }
            _ => Error::invalid_input(text),
        });
    }
    let bad = |what: String| Error::invalid_input(format!("message from the OpAMP server: {what}"));
    out.report_full_state = message.flags & proto::ServerToAgentFlags::ReportFullState as u64 != 0;
    if let Some(identification) = message.agent_identification {
        out.new_instance_uid = Some(
            super::instance_uid(&identification.new_instance_uid)
                .map_err(|e| bad(format!("agent_identification.new_{e}")))?,
        );
    }
    let mut config_ref = None;
    if let Some(custom) = &message.custom_message {
        if custom.capability == FLEET_CAPABILITY {
            match custom.r#type.as_str() {
                REGISTERED => {
                    let text = String::from_utf8_lossy(&custom.data);
                    out.registered = Some(SupervisorId::new(&*text).map_err(|e| bad(format!("registered: {e}")))?);
                }
                CONFIG_REF => {
                    let data: ConfigRefData = parse_json(CONFIG_REF, &custom.data).map_err(bad)?;
                    config_ref = Some(ConfigRef::new(
                        AgentType::new(&data.agent_type).map_err(|e| bad(format!("config_ref: {e}")))?,
                        ConfigVersion::new(&data.version).map_err(|e| bad(format!("config_ref: {e}")))?,
                    ));
                }
                other => return Err(bad(format!("unknown {FLEET_CAPABILITY} message type {other:?}"))),
            }
        } else if custom.capability == EMISSION_CAPABILITY && custom.r#type == SET_EMISSION {
            let data: SetEmission = parse_json(SET_EMISSION, &custom.data).map_err(bad)?;
            let id: CorrelationId = data
                .correlation_id
                .parse()
                .map_err(|e| bad(format!("set_emission correlation_id: {e}")))?;
            emission_ids.push(id);
            out.messages
                .push(command(hello, id, CommandKind::SetEmission { state: data.enabled }));
        } else if hello.capabilities.custom.contains(&custom.capability) {
            let kind = CommandKind::Custom {
                capability: custom.capability.clone(),
                message_type: custom.r#type.clone(),
                data: custom.data.clone(),
            };
            out.messages.push(command(hello, CorrelationId::new(), kind));
        }
    }
    if let Some(remote) = message.remote_config {
        match config_push(remote, config_ref, hello) {
            Ok(push) => out.messages.push(ToDevice::ConfigPush(Arc::new(push))),
            Err(status) => out.refused_config = Some(status),
        }
    }
    if let Some(command) = message.command {
        if command.r#type == proto::CommandType::Restart as i32 {
            out.messages.push(command_of(hello, CommandKind::Restart));
        }
    }
    Ok(out)
}

fn command(hello: &DeviceHello, id: CorrelationId, kind: CommandKind) -> ToDevice {
    let mut command = Command::new(
        hello.device,
        kind,
        Timestamp::now(),
        opamp_core::DEFAULT_COMMAND_TIMEOUT,
    );
    command.correlation_id = id;
    ToDevice::Command(Box::new(command))
}

fn command_of(hello: &DeviceHello, kind: CommandKind) -> ToDevice {
    command(hello, CorrelationId::new(), kind)
}

/// The push a remote config is; the failed status to report if it cannot be one.
fn config_push(
    remote: proto::AgentRemoteConfig,
    config_ref: Option<ConfigRef>,
    hello: &DeviceHello,
) -> Result<ConfigPush, proto::RemoteConfigStatus> {
    let refuse = |why: String| proto::RemoteConfigStatus {
        last_remote_config_hash: remote.config_hash.clone(),
        status: RemoteConfigStatuses::Failed as i32,
        error_message: why,
    };
    let hash = ConfigHash::from_slice(&remote.config_hash)
        .map_err(|err| refuse(format!("remote_config.config_hash: {err}")))?;
    let mut bundle = ConfigBundle::new();
    for (name, file) in remote.config.map(|c| c.config_map).unwrap_or_default() {
        bundle
            .insert(name.clone(), ConfigFile::new(file.content_type, file.body))
            .map_err(|err| refuse(format!("remote_config file {name:?}: {err}")))?;
    }
    // A server of another project names no template version: the hash does.
    let config = match config_ref {
        Some(config) => config,
        None => {
            let agent_type = hello
                .agent_type
                .ok_or_else(|| refuse("the server named no config_ref and the agent has no agent type".into()))?;
            let version = ConfigVersion::new(format!("h{}", &hash.to_string()[..16]))
                .map_err(|err| refuse(format!("config version from the hash: {err}")))?;
            ConfigRef::new(agent_type, version)
        }
    };
    let mut push = ConfigPush::new(None, config, bundle);
    if push.hash != hash {
        return Err(refuse(format!(
            "remote_config.config_hash is {hash} but the files hash to {}",
            push.hash
        )));
    }
    push.hash = hash;
    Ok(push)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn did() -> DeviceId {
        DeviceId::new("edge-1").unwrap()
    }

    fn our_hello() -> DeviceHello {
        let mut hello = DeviceHello::new(did());
        hello.agent_type = Some(AgentType::new("fluentbit").unwrap());
        hello.config_version = Some(ConfigVersion::new("v1").unwrap());
        hello.config_hash = Some(ConfigBundle::new().hash());
        hello.labels.insert("ring".into(), "canary".into());
        hello.capabilities = Capabilities::all_builtin();
        hello
    }

    fn first_report(hello: &DeviceHello) -> AgentToServer {
        AgentToServer {
            instance_uid: vec![1; 16],
            agent_description: Some(description(hello)),
            capabilities: capability_bits(hello),
            custom_capabilities: Some(custom_capabilities(hello)),
            remote_config_status: initial_config_status(hello),
            ..Default::default()
        }
    }

    #[test]
    fn a_hello_survives_the_trip_through_opamp() {
        let hello = our_hello();
        let report = first_report(&hello);
        let device = device_id(
            DeviceIdSource::ServiceInstanceId,
            &[1; 16],
            report.agent_description.as_ref(),
        )
        .unwrap();
        let mut back = super::hello(device, &report);
        assert!(speaks_fleet(&back));
        back.capabilities
            .custom
            .retain(|c| c != FLEET_CAPABILITY && c != EMISSION_CAPABILITY);
        assert_eq!(back, hello);
    }

    #[test]
    fn device_ids_come_from_the_configured_source() {
        let uid = [0xab; 16];
        assert_eq!(
            device_id(DeviceIdSource::InstanceUidHex, &uid, None).unwrap().as_str(),
            "ab".repeat(16)
        );
        assert_eq!(
            device_id(DeviceIdSource::InstanceUidUuid, &uid, None).unwrap().as_str(),
            "abababab-abab-abab-abab-abababababab"
        );
        let err = device_id(DeviceIdSource::ServiceInstanceId, &uid, None).unwrap_err();
        assert!(err.contains("service.instance.id"), "{err}");
        let bad = proto::AgentDescription {
            identifying_attributes: vec![text_attribute(SERVICE_INSTANCE_ID, "has spaces")],
            ..Default::default()
        };
        let err = device_id(DeviceIdSource::ServiceInstanceId, &uid, Some(&bad)).unwrap_err();
        assert!(err.contains("has spaces"), "{err}");
    }

    #[test]
    fn reports_become_core_messages_once() {
        let hash = ConfigBundle::new().hash();
        let mut last = None;
        let mut ids = Vec::new();
        let mut message = AgentToServer::default();
        let ack = FromDevice::ConfigAck(Box::new(ConfigAck::new(None, hash, ConfigApplyState::Applied, None)));
        assert!(to_server(&ack, &mut message, &mut ids));
        let mut status = StatusReport::default();
        status.emission = Some(true);
        status.last_error = Some("disk full".into());
        to_server(&FromDevice::Status(status.clone()), &mut message, &mut ids);
        let mut expected_status = status;
        expected_status.healthy = Some(false);
        assert_eq!(
            from_agent(&message, &mut last).unwrap(),
            vec![ack, FromDevice::Status(expected_status.clone()), FromDevice::Heartbeat]
        );
        // The same config status again (a full-state report) is not a new ack.
        assert_eq!(
            from_agent(&message, &mut last).unwrap(),
            vec![FromDevice::Status(expected_status), FromDevice::Heartbeat]
        );
    }

    #[test]
    fn emission_commands_round_trip_with_their_answers() {
        let hello = our_hello();
        let command = Command::new(
            did(),
            CommandKind::SetEmission { state: true },
            Timestamp::now(),
            Duration::from_secs(5),
        );
        let id = command.correlation_id;
        let out = to_agent(&ToDevice::Command(Box::new(command)), &[1; 16], true);
        assert!(out.on_sent.is_none(), "the agent answers emission itself");
        let mut ids = Vec::new();
        let got = from_server(out.message, &hello, &mut ids).unwrap();
        let [ToDevice::Command(received)] = got.messages.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(received.correlation_id, id);
        assert_eq!(received.kind, CommandKind::SetEmission { state: true });

        let mut message = AgentToServer::default();
        let answer = FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Acked));
        assert!(to_server(&answer, &mut message, &mut ids));
        assert!(ids.is_empty());
        let mut last = None;
        assert_eq!(from_agent(&message, &mut last).unwrap()[0], answer);
        // An ack of a command OpAMP does not acknowledge is not sent.
        assert!(!to_server(&answer, &mut AgentToServer::default(), &mut ids));
    }

    #[test]
    fn pushes_restarts_and_registration_reach_the_agent() {
        let hello = our_hello();
        let bundle = ConfigBundle::new()
            .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[SERVICE]\n"))
            .unwrap();
        let config = ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v2").unwrap());
        let push = ConfigPush::new(None, config, bundle);
        let out = to_agent(&ToDevice::ConfigPush(Arc::new(push.clone())), &[1; 16], true);
        let got = from_server(out.message, &hello, &mut Vec::new()).unwrap();
        assert_eq!(got.messages, vec![ToDevice::ConfigPush(Arc::new(push.clone()))]);

        // Without the fleet capability the version is named after the hash.
        let out = to_agent(&ToDevice::ConfigPush(Arc::new(push.clone())), &[1; 16], false);
        let got = from_server(out.message, &hello, &mut Vec::new()).unwrap();
        let [ToDevice::ConfigPush(foreign)] = got.messages.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(foreign.hash, push.hash);
        assert!(foreign.config.version.as_str().starts_with('h'));

        let restart = Command::new(did(), CommandKind::Restart, Timestamp::now(), Duration::from_secs(5));
        let out = to_agent(&ToDevice::Command(Box::new(restart.clone())), &[1; 16], true);
        assert!(
            matches!(&out.on_sent, Some(FromDevice::CommandAck(ack)) if ack.correlation_id == restart.correlation_id)
        );
        let got = from_server(out.message, &hello, &mut Vec::new()).unwrap();
        assert!(matches!(got.messages.as_slice(), [ToDevice::Command(c)] if c.kind == CommandKind::Restart));

        let supervisor = SupervisorId::new("s1").unwrap();
        let out = to_agent(&ToDevice::Registered(Box::new(supervisor)), &[1; 16], true);
        assert_eq!(out.message.capabilities, super::super::SERVER_CAPABILITIES);
        let got = from_server(out.message, &hello, &mut Vec::new()).unwrap();
        assert_eq!(got.registered, Some(supervisor));
    }

    #[test]
    fn bad_reports_are_named() {
        let mut last = None;
        let cases = [
            (
                AgentToServer {
                    remote_config_status: Some(proto::RemoteConfigStatus {
                        last_remote_config_hash: vec![1, 2],
                        status: RemoteConfigStatuses::Applied as i32,
                        error_message: String::new(),
                    }),
                    ..Default::default()
                },
                "last_remote_config_hash",
            ),
            (
                AgentToServer {
                    remote_config_status: Some(proto::RemoteConfigStatus {
                        status: 42,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "status 42",
            ),
            (
                AgentToServer {
                    custom_message: Some(custom(EMISSION_CAPABILITY, SET_EMISSION_RESULT, b"{".to_vec())),
                    ..Default::default()
                },
                "set_emission_result",
            ),
            (
                AgentToServer {
                    custom_message: Some(custom(EMISSION_CAPABILITY, "explode", Vec::new())),
                    ..Default::default()
                },
                "\"explode\"",
            ),
        ];
        for (message, expected) in cases {
            let problem = from_agent(&message, &mut last).unwrap_err();
            assert!(problem.contains(expected), "{expected}: {problem}");
        }
        let refusal = error_response(&[1; 16], "slow down".into(), Some(Duration::from_secs(2)));
        let err = from_server(refusal, &our_hello(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, opamp_core::Error::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("retry after 2000 ms"), "{err}");
    }
}
