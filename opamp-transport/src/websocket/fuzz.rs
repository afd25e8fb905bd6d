//! The checks behind the `opamp_ws`, `opamp_ws_frames`, `opamp_http` and `opamp_session` fuzz
//! targets (see [`crate::testkit::fuzz`]).

use std::collections::BTreeSet;
use std::io::Read as _;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use opamp_core::CorrelationId;
use opamp_core::transport::FromDevice;
use prost::Message as _;

use super::http::{self, BodyProblem};
use super::proto::{
    AgentDescription, AgentDisconnect, AgentToServer, AnyValue, ComponentHealth, CustomCapabilities, CustomMessage,
    KeyValue, RemoteConfigStatus, ServerToAgentFlags, any_value,
};
use super::server::Reports;
use super::{DeviceIdSource, EMISSION_CAPABILITY, FLEET_CAPABILITY, convert, frames};

/// A WebSocket message from an agent: the varint header, the
/// `AgentToServer`, and the core messages the server makes of it.
///
/// What unframes re-frames to the same message; anything refused is refused
/// with a message. Of what the server makes of it, the hello re-describes to
/// the same hello, each core message re-encodes to the same message, and a
/// repeated report does not repeat its config status.
pub fn opamp_ws(data: &[u8]) {
    let message: AgentToServer = match super::unframe(data) {
        Ok(message) => message,
        Err(problem) => return assert!(!problem.to_string().is_empty(), "a refusal names what was wrong"),
    };
    let again: AgentToServer = super::unframe(&super::frame(&message)).expect("a framed message unframes");
    same_message(&again, &message, "unframing the framing gives the message back");
    reads_as_an_agent_sent_it(&message);
}

/// Messages compared as equal. A `double` attribute may be NaN, which is
/// not equal to itself (the first finding of `opamp_ws`): such messages are
/// compared by their encoded bytes, as a multiset since maps encode in no
/// fixed order (the second).
fn same_message(got: &AgentToServer, expected: &AgentToServer, what: &str) {
    if got == expected {
        return;
    }
    assert!(
        format!("{expected:?}").contains("NaN"),
        "{what}: {got:?} is not {expected:?}"
    );
    let (mut a, mut b) = (got.encode_to_vec(), expected.encode_to_vec());
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "{what}: {got:?} is not {expected:?}");
}

/// The decompression limit of the `opamp_http` check: small, so that a
/// gzip bomb within libFuzzer's input sizes goes over it.
const HTTP_LIMIT: usize = 64 * 1024;

/// A plain HTTP report body through the code the server's POST handler
/// uses, within a 64 KiB limit.
///
/// The first byte picks the `Content-Encoding`: 0 none, 1 gzip (the rest is
/// the compressed body as sent), 2 gzip (the rest is compressed here first,
/// to reach the message decoder), 3 an unsupported one. A body over the limit
/// once decompressed is refused as too large, and only then; what decodes
/// reads back the same from its own encoding, plain and gzipped.
pub fn opamp_http(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (encoding, body) = match mode % 4 {
        0 => (None, rest.to_vec()),
        1 => (Some("gzip"), rest.to_vec()),
        2 => (Some("gzip"), http::compress(rest)),
        _ => (Some("br"), rest.to_vec()),
    };
    let gzip = encoding == Some("gzip");
    match http::read_body(encoding, Bytes::from(body.clone()), HTTP_LIMIT) {
        Ok(message) => {
            let plain = message.encode_to_vec();
            for (encoding, body) in [(None, plain.clone()), (Some("gzip"), http::compress(&plain))] {
                // Twice the limit: a 5-byte negative enum value re-encodes in 10 bytes.
                let back = http::read_body(encoding, body.into(), 2 * HTTP_LIMIT).expect("an encoded message reads");
                same_message(&back, &message, "a message survives the trip through a body");
            }
            reads_as_an_agent_sent_it(&message);
        }
        Err(BodyProblem::TooLarge) => {
            assert!(gzip, "only a decompressed body can outgrow the limit");
            // Counted without keeping the output: a bomb must not be inflated here either.
            let mut inflated = 0u64;
            let mut decoder = flate2::read::GzDecoder::new(body.as_slice());
            let mut chunk = [0u8; 8192];
            while let Ok(n) = decoder.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                inflated += n as u64;
            }
            assert!(
                inflated > HTTP_LIMIT as u64,
                "a body refused as too large is over the limit"
            );
        }
        Err(BodyProblem::Encoding(problem)) => {
            assert!(
                !gzip && encoding.is_some(),
                "only an unknown encoding is refused as one"
            );
            assert!(!problem.is_empty(), "a refusal names what was wrong");
        }
        Err(BodyProblem::Compression(problem)) => {
            assert!(gzip, "only gzip bodies decompress");
            assert!(!problem.is_empty(), "a refusal names what was wrong");
        }
        Err(BodyProblem::Message(problem)) => assert!(!problem.is_empty(), "a refusal names what was wrong"),
    }
}

/// What the server makes of one `AgentToServer`, and that it is what the
/// agent meant: the hello of every device id source re-describes to the same
/// hello, each core message re-encodes (as this crate's agents send it) to
/// the same message, and a repeated report does not repeat its config status.
fn reads_as_an_agent_sent_it(message: &AgentToServer) {
    if let Ok(uid) = super::instance_uid(&message.instance_uid) {
        let sources = [
            DeviceIdSource::ServiceInstanceId,
            DeviceIdSource::InstanceUidHex,
            DeviceIdSource::InstanceUidUuid,
        ];
        for source in sources {
            match convert::device_id(source, &uid, message.agent_description.as_ref()) {
                Ok(device) => hello_round_trips(device, &uid, message),
                Err(problem) => assert!(!problem.is_empty(), "a refusal names what was wrong"),
            }
        }
    }
    let mut last = None;
    let reports = match convert::from_agent(message, &mut last) {
        Ok(reports) => reports,
        Err(problem) => return assert!(!problem.is_empty(), "a refusal names what was wrong"),
    };
    ends_with_one_heartbeat(&reports);
    for report in &reports[..reports.len() - 1] {
        let mut wire = AgentToServer::default();
        let mut emission_ids = match report {
            FromDevice::CommandAck(ack) => vec![ack.correlation_id],
            _ => Vec::new(),
        };
        assert!(
            convert::to_server(report, &mut wire, &mut emission_ids),
            "a report has a wire form"
        );
        let back = convert::from_agent(&wire, &mut None).expect("an encoded report reads");
        assert_eq!(
            back,
            vec![report.clone(), FromDevice::Heartbeat],
            "a report survives the trip"
        );
    }
    let repeat = convert::from_agent(message, &mut last).expect("a report read once reads again");
    assert!(
        !repeat.iter().any(|m| matches!(m, FromDevice::ConfigAck(_))),
        "a repeated config status is not reported twice"
    );
}

fn hello_round_trips(device: opamp_core::DeviceId, uid: &[u8; 16], message: &AgentToServer) {
    let hello = convert::hello(device, message);
    let described = AgentToServer {
        instance_uid: uid.to_vec(),
        agent_description: Some(convert::description(&hello)),
        capabilities: convert::capability_bits(&hello),
        custom_capabilities: Some(convert::custom_capabilities(&hello)),
        remote_config_status: convert::initial_config_status(&hello),
        ..Default::default()
    };
    let mut back = convert::hello(device, &described);
    // The agent side always adds its own capability.
    let custom: BTreeSet<_> = back.capabilities.custom.drain(..).collect();
    let mut expected: BTreeSet<_> = hello.capabilities.custom.iter().cloned().collect();
    expected.insert(FLEET_CAPABILITY.to_owned());
    assert_eq!(custom, expected, "custom capabilities survive the trip");
    let mut hello = hello;
    hello.capabilities.custom.clear();
    assert_eq!(back, hello, "a hello survives the trip through an agent description");
}

fn ends_with_one_heartbeat(reports: &[FromDevice]) {
    assert_eq!(
        reports.last(),
        Some(&FromDevice::Heartbeat),
        "a report ends with a heartbeat"
    );
    let heartbeats = reports.iter().filter(|m| **m == FromDevice::Heartbeat).count();
    assert_eq!(heartbeats, 1, "one heartbeat per report");
}

/// One report of an `opamp_session` script, in terms the session logic
/// tells apart (so the fuzzer does not have to find them in protobuf).
#[derive(Debug, Arbitrary)]
struct Report {
    sequence: Sequence,
    description: Option<Description>,
    capabilities: u16,
    config_status: Option<ConfigStatus>,
    health: Option<(bool, String)>,
    custom: Option<Custom>,
    disconnect: bool,
}

#[derive(Debug, Arbitrary)]
enum Sequence {
    Next,
    Same,
    Any(u64),
}

#[derive(Debug, Arbitrary)]
struct Description {
    /// `service.instance.id`: one of a few valid ids, or any text.
    instance: Result<u8, String>,
    service_name: Option<String>,
    labels: Vec<(String, String)>,
    emission: bool,
}

#[derive(Debug, Arbitrary)]
struct ConfigStatus {
    /// One of a few valid hashes, or any bytes.
    hash: Result<u8, Vec<u8>>,
    status: u8,
    error: String,
}

#[derive(Debug, Arbitrary)]
enum Custom {
    EmissionState(bool),
    SetEmissionResult { outcome: u8, reason: String },
    Raw { kind: String, data: Vec<u8> },
    OtherCapability(Vec<u8>),
}

const OUTCOMES: [&str; 4] = ["acked", "failed", "unsupported", "maybe"];

impl Report {
    fn message(&self, uid: &[u8; 16], previous: u64) -> AgentToServer {
        let text = |key: &str, value: &str| KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
        };
        let mut message = AgentToServer {
            instance_uid: uid.to_vec(),
            sequence_num: match self.sequence {
                Sequence::Next => previous.wrapping_add(1),
                Sequence::Same => previous,
                Sequence::Any(n) => n,
            },
            capabilities: u64::from(self.capabilities),
            agent_disconnect: self.disconnect.then_some(AgentDisconnect {}),
            ..Default::default()
        };
        if let Some(description) = &self.description {
            let instance = match &description.instance {
                Ok(n) => format!("device-{}", n % 3),
                Err(text) => text.clone(),
            };
            let mut identifying = vec![text(convert::SERVICE_INSTANCE_ID, &instance)];
            if let Some(name) = &description.service_name {
                identifying.push(text("service.name", name));
            }
            message.agent_description = Some(AgentDescription {
                identifying_attributes: identifying,
                non_identifying_attributes: description.labels.iter().map(|(k, v)| text(k, v)).collect(),
            });
            let mut capabilities = vec![FLEET_CAPABILITY.to_owned()];
            if description.emission {
                capabilities.push(EMISSION_CAPABILITY.to_owned());
            }
            message.custom_capabilities = Some(CustomCapabilities { capabilities });
        }
        if let Some(status) = &self.config_status {
            message.remote_config_status = Some(RemoteConfigStatus {
                last_remote_config_hash: match &status.hash {
                    Ok(n) => vec![*n % 3; 32],
                    Err(bytes) => bytes.clone(),
                },
                status: i32::from(status.status % 5),
                error_message: status.error.clone(),
            });
        }
        if let Some((healthy, last_error)) = &self.health {
            message.health = Some(ComponentHealth {
                healthy: *healthy,
                last_error: last_error.clone(),
                ..Default::default()
            });
        }
        message.custom_message = self.custom.as_ref().map(|custom| {
            let (capability, kind, data) = match custom {
                Custom::EmissionState(enabled) => (
                    EMISSION_CAPABILITY,
                    "emission_state".to_owned(),
                    format!(r#"{{"enabled":{enabled}}}"#).into_bytes(),
                ),
                Custom::SetEmissionResult { outcome, reason } => (
                    EMISSION_CAPABILITY,
                    "set_emission_result".to_owned(),
                    serde_json::json!({
                        "correlation_id": CorrelationId::new().to_string(),
                        "outcome": OUTCOMES[usize::from(*outcome) % OUTCOMES.len()],
                        "reason": reason,
                    })
                    .to_string()
                    .into_bytes(),
                ),
                Custom::Raw { kind, data } => (EMISSION_CAPABILITY, kind.clone(), data.clone()),
                Custom::OtherCapability(data) => ("com.example.other", "anything".to_owned(), data.clone()),
            };
            CustomMessage {
                capability: capability.to_owned(),
                r#type: kind,
                data,
            }
        });
        message
    }
}

/// Bytes from a client's socket through the server's WebSocket frame
/// reader, which reads them itself (see `frames`).
///
/// The first byte chooses: even, the rest is raw bytes off the wire; odd, it
/// is a script of well-formed frames that the check masks and sends.
/// Invariants: whatever the bytes, the reader reads the same messages and
/// stops at the same named problem however they are cut into reads, and
/// holds no buffer once nothing is pending; well-formed frames read back as
/// the messages they carry.
pub fn opamp_ws_frames(data: &[u8]) {
    const LIMIT: usize = 4096;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let at_once = read_frames(rest, rest.len().max(1), LIMIT);
        let step = usize::from(mode / 2 % 13) + 1;
        let in_pieces = read_frames(rest, step, LIMIT);
        assert_eq!(in_pieces, at_once, "the same bytes read in pieces of {step}");
        if let Err(problem) = &at_once.1 {
            assert!(!problem.to_string().is_empty(), "a refusal names what was wrong");
        }
        return;
    }
    let mut input = Unstructured::new(rest);
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    // `arbitrary` makes empty frames from no bytes: stop when the bytes run out.
    while !input.is_empty() {
        let Ok(frame) = ScriptFrame::arbitrary(&mut input) else {
            break;
        };
        let mask = frame.mask;
        match frame.kind % 4 {
            0 => {
                wire.extend(frames::client_frame(true, 0x2, &frame.payload, mask));
                expected.push(frames::Incoming::Binary(frame.payload));
            }
            1 => {
                // The same message in two fragments, a ping between them.
                let half = frame.payload.len() / 2;
                let ping = &frame.payload[..half.min(125)];
                wire.extend(frames::client_frame(false, 0x2, &frame.payload[..half], mask));
                wire.extend(frames::client_frame(true, 0x9, ping, mask));
                wire.extend(frames::client_frame(true, 0x0, &frame.payload[half..], mask));
                expected.push(frames::Incoming::Ping(ping.to_vec()));
                expected.push(frames::Incoming::Binary(frame.payload));
            }
            2 => {
                let payload = &frame.payload[..frame.payload.len().min(125)];
                wire.extend(frames::client_frame(true, 0x9, payload, mask));
                expected.push(frames::Incoming::Ping(payload.to_vec()));
            }
            _ => {
                wire.extend(frames::client_frame(
                    true,
                    0xA,
                    &frame.payload[..frame.payload.len().min(125)],
                    mask,
                ));
                expected.push(frames::Incoming::Pong);
            }
        }
    }
    let limit = expected.iter().map(|incoming| match incoming {
        frames::Incoming::Binary(payload) => payload.len(),
        _ => 0,
    });
    let limit = limit.max().unwrap_or(0).max(1);
    let (read, end) = read_frames(&wire, usize::from(mode / 2 % 29) + 1, limit);
    assert_eq!(end, Ok(()), "well-formed frames are accepted");
    assert_eq!(read, expected, "well-formed frames read back as sent");
}

/// One frame of an `opamp_ws_frames` script.
#[derive(Debug, Arbitrary)]
struct ScriptFrame {
    kind: u8,
    mask: [u8; 4],
    payload: Vec<u8>,
}

/// What a reader with `limit` makes of `bytes` read `step` at a time: the
/// messages, then how it stopped (`Ok` when the bytes ran out).
fn read_frames(bytes: &[u8], step: usize, limit: usize) -> (Vec<frames::Incoming>, Result<(), frames::Problem>) {
    let mut reader = frames::Reader::new(limit);
    let mut read = Vec::new();
    for piece in bytes.chunks(step) {
        reader.extend(piece);
        loop {
            match reader.next() {
                Ok(Some(incoming)) => read.push(incoming),
                Ok(None) => break,
                Err(problem) => return (read, Err(problem)),
            }
        }
        reader.settle();
        if !reader.is_partway() {
            assert_eq!(reader.held(), 0, "an idle reader holds no buffer");
        }
    }
    (read, Ok(()))
}

/// A sequence of reports from one agent through the session logic both
/// OpAMP transports share: registration needs the description and a valid
/// device id, then each report is read with the session's memory.
///
/// Invariants: a sequence gap, and only a gap, asks for the full state; a
/// config status is reported when it changes and only then; each accepted
/// report ends with one heartbeat; a refused report changes nothing and ends
/// the session; the session ends registered or closed.
pub fn opamp_session(data: &[u8]) {
    let Ok(script) = Vec::<Report>::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let uid = [7u8; 16];
    let mut session: Option<Reports> = None;
    let mut previous = 0;
    for report in &script {
        let message = report.message(&uid, previous);
        previous = message.sequence_num;
        match session.as_mut() {
            None => session = register(&uid, &message),
            Some(reports) => {
                let before = reports.clone();
                match reports.read(&message, true) {
                    Ok((flags, out)) => {
                        let gap = message.sequence_num != before.last_seq.wrapping_add(1);
                        let asks = flags & ServerToAgentFlags::ReportFullState as u64 != 0;
                        assert_eq!(
                            asks, gap,
                            "the full state is asked for at a sequence gap, and only then"
                        );
                        reported_once(&before, &message, &out);
                        assert_eq!(reports.last_seq, message.sequence_num, "the sequence number is kept");
                        if message.agent_disconnect.is_some() {
                            session = None;
                        }
                    }
                    Err(problem) => {
                        assert!(!problem.is_empty(), "a refusal names what was wrong");
                        assert_eq!(*reports, before, "a refused report changes nothing");
                        session = None;
                    }
                }
            }
        }
    }
}

/// A registration as the transports do it: the session's memory after the
/// first report, or `None` when the agent was refused (and nothing kept).
fn register(uid: &[u8; 16], message: &AgentToServer) -> Option<Reports> {
    let description = message.agent_description.as_ref()?;
    let device = match convert::device_id(DeviceIdSource::ServiceInstanceId, uid, Some(description)) {
        Ok(device) => device,
        Err(problem) => {
            assert!(!problem.is_empty(), "a refusal names what was wrong");
            return None;
        }
    };
    let hello = convert::hello(device, message);
    assert_eq!(hello.device, device);
    let mut reports = Reports::new(message.sequence_num);
    let before = reports.clone();
    match reports.read(message, false) {
        Ok((flags, out)) => {
            assert_eq!(flags, 0, "the first report has no gap to find");
            reported_once(&before, message, &out);
            Some(reports)
        }
        Err(problem) => {
            assert!(!problem.is_empty(), "a refusal names what was wrong");
            assert_eq!(reports, before, "a refused report changes nothing");
            None
        }
    }
}

/// A report's config status becomes a config ack when it differs from the
/// last one the session saw (and is not `unset`); every report ends with one heartbeat.
fn reported_once(before: &Reports, message: &AgentToServer, out: &[FromDevice]) {
    ends_with_one_heartbeat(out);
    let acks = out.iter().filter(|m| matches!(m, FromDevice::ConfigAck(_))).count();
    let changed = message.remote_config_status.as_ref().is_some_and(|status| {
        status.status != 0 && before.last_config != Some((status.last_remote_config_hash.clone(), status.status))
    });
    assert_eq!(
        acks,
        usize::from(changed),
        "a config status is reported when it changes"
    );
}

/// Real reports as this crate's agents send them, for the seed corpora of
/// `opamp_ws` and `opamp_http`; `opamp_session` starts from a few byte
/// patterns (its input is a script, not a message).
pub(crate) fn seeds() -> Vec<crate::testkit::fuzz::Seed> {
    use opamp_core::transport::{CommandAck, ConfigAck, DeviceHello, StatusReport};
    use opamp_core::{AgentType, CommandOutcome, ConfigApplyState, ConfigBundle, ConfigFile, ConfigVersion, DeviceId};

    let uid = *uuid::Uuid::from_u128(0x0190_f3a2_7c1e_7d4b_9a61_2b3c_4d5e_6f70).as_bytes();
    let bundle = ConfigBundle::new()
        .with_file(
            "fluent-bit.conf",
            ConfigFile::new("text/plain", "[SERVICE]\n    hot_reload On\n"),
        )
        .expect("a valid name");
    let mut hello = DeviceHello::new(DeviceId::new("ap-17:eth0").expect("a valid id"));
    hello.agent_type = Some(AgentType::new("fluentbit").expect("a valid agent type"));
    hello.config_version = Some(ConfigVersion::new("v2").expect("a valid version"));
    hello.config_hash = Some(bundle.hash());
    hello.labels.insert("site".into(), "berlin".into());
    hello.capabilities.emission = true;
    hello.capabilities.remote_config = true;
    hello.capabilities.restart = true;

    let first = AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 1,
        agent_description: Some(convert::description(&hello)),
        capabilities: convert::capability_bits(&hello),
        custom_capabilities: Some(convert::custom_capabilities(&hello)),
        remote_config_status: convert::initial_config_status(&hello),
        ..Default::default()
    };
    let id = "0b3a8f4e-1d2c-4e5f-8a9b-0c1d2e3f4a5b".parse().expect("a valid id");
    let mut status = StatusReport::default();
    status.emission = Some(false);
    status.healthy = Some(false);
    status.last_error = Some("output http: connection refused".into());
    let reports = [
        ("heartbeat", FromDevice::Heartbeat),
        ("status", FromDevice::Status(status)),
        (
            "emission-result",
            FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Unsupported { reason: "no".into() })),
        ),
        (
            "config-applied",
            FromDevice::ConfigAck(Box::new(ConfigAck::new(
                None,
                bundle.hash(),
                ConfigApplyState::Applied,
                None,
            ))),
        ),
    ];
    let mut messages = vec![("first-report", first)];
    for (sequence, (name, report)) in (2..).zip(reports) {
        let mut message = AgentToServer {
            instance_uid: uid.to_vec(),
            sequence_num: sequence,
            ..Default::default()
        };
        convert::to_server(&report, &mut message, &mut vec![id]);
        messages.push((name, message));
    }
    messages.push((
        "disconnect",
        AgentToServer {
            instance_uid: uid.to_vec(),
            sequence_num: 6,
            agent_disconnect: Some(AgentDisconnect {}),
            ..Default::default()
        },
    ));

    let mut seeds = Vec::new();
    for (name, message) in &messages {
        seeds.push(("opamp_ws", *name, super::frame(message)));
        let mut plain = vec![0];
        plain.extend(message.encode_to_vec());
        seeds.push(("opamp_http", *name, plain));
    }
    let mut gzipped = vec![1];
    gzipped.extend(http::compress(&messages[0].1.encode_to_vec()));
    seeds.push(("opamp_http", "first-report-gzip", gzipped));
    // 1 MiB of zeros in about 1 KiB, 16 times the check's limit: refused at the limit.
    let mut bomb = flate2::write::GzEncoder::new(vec![1], flate2::Compression::best());
    std::io::Write::write_all(&mut bomb, &vec![0; 1 << 20]).expect("writing to a Vec");
    let bomb = bomb.finish().expect("writing to a Vec");
    seeds.push(("opamp_http", "gzip-bomb", bomb));
    seeds.push(("opamp_http", "not-gzip", b"\x01not gzip at all".to_vec()));
    seeds.push(("opamp_http", "brotli", b"\x03\x0a\x10".to_vec()));
    seeds.push(("opamp_ws", "header-1", vec![1, 0x0a, 0x00]));
    seeds.push(("opamp_ws", "header-not-varint", vec![0xff; 11]));
    // The RFC's masked "Hello" as binary, a fragmented message around a ping, and a close.
    let mut wire = vec![0];
    wire.extend(frames::client_frame(true, 0x2, b"Hello", [0x37, 0xfa, 0x21, 0x3d]));
    wire.extend(frames::client_frame(false, 0x2, b"frag", [1, 2, 3, 4]));
    wire.extend(frames::client_frame(true, 0x9, b"ping", [5, 6, 7, 8]));
    wire.extend(frames::client_frame(true, 0x0, b"ment", [9, 10, 11, 12]));
    wire.extend(frames::client_frame(true, 0x8, &1000u16.to_be_bytes(), [0; 4]));
    seeds.push(("opamp_ws_frames", "wire-hello-fragments-close", wire));
    seeds.push(("opamp_ws_frames", "wire-unmasked", vec![6, 0x82, 0x02, 0, 0]));
    seeds.push((
        "opamp_ws_frames",
        "script",
        (0..96u8).map(|i| i.wrapping_mul(37) | 1).collect(),
    ));
    // Scripts: arbitrary's reading of these bytes gives a few reports each.
    for (name, length) in [("script-short", 64), ("script-long", 1024)] {
        let bytes = (0..length)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        seeds.push(("opamp_session", name, bytes));
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first finding of `opamp_ws` (fuzz/corpus/opamp_ws/nan-attribute):
    /// a message with a NaN attribute round-trips, though it is not equal to itself.
    #[test]
    fn a_nan_attribute_round_trips() {
        let message = AgentToServer {
            sequence_num: 1,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue {
                    key: "service.instance.id".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::DoubleValue(f64::NAN)),
                    }),
                }],
                non_identifying_attributes: Vec::new(),
            }),
            ..Default::default()
        };
        assert_ne!(message, message.clone(), "NaN is not equal to itself");
        opamp_ws(&super::super::frame(&message));
        let mut body = vec![0];
        body.extend(message.encode_to_vec());
        opamp_http(&body);
    }
}
