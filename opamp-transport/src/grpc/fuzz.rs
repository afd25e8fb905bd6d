//! The check behind the `grpc_envelope` fuzz target (see [`crate::testkit::fuzz`]).

use prost::Message as _;

use super::convert;
use super::proto::{Envelope, envelope::Body};

/// Bytes as a gRPC `Envelope`, read the way both ends read one.
///
/// Whatever decodes re-encodes to the same envelope; what the supervisor
/// accepts from a device (and the device from its supervisor) maps back to
/// the wire and reads again as the same core message; a register message's
/// hello survives the same trip; anything refused is refused with a message.
pub fn grpc_envelope(data: &[u8]) {
    let Ok(envelope) = Envelope::decode(data) else {
        return;
    };
    let again = Envelope::decode(envelope.encode_to_vec().as_slice()).expect("an encoded envelope decodes");
    assert_eq!(again, envelope, "decoding the encoding gives the envelope back");

    match convert::from_device(envelope.clone()) {
        Ok(message) => {
            let back = convert::from_device(convert::from_device_message(&message))
                .expect("a message from a device re-encodes to one the supervisor reads");
            assert_eq!(back, message, "a device's message survives the trip to the wire");
        }
        Err(problem) => assert!(!problem.is_empty(), "a refusal names what was wrong"),
    }
    match convert::from_supervisor(envelope.clone()) {
        Ok(message) => {
            let back = convert::from_supervisor(convert::to_device(&message))
                .expect("a message to a device re-encodes to one the device reads");
            assert_eq!(back, message, "a supervisor's message survives the trip to the wire");
        }
        Err(problem) => assert!(!problem.is_empty(), "a refusal names what was wrong"),
    }
    if let Some(Body::Register(identity)) = envelope.body {
        let token = identity.token.clone();
        let claimed = match convert::claimed_device(&identity) {
            Ok(Some(device)) => device,
            Ok(None) => return,
            Err(problem) => return assert!(!problem.is_empty(), "a refusal names what was wrong"),
        };
        let hello = match convert::hello(claimed, identity) {
            Ok(hello) => hello,
            Err(problem) => return assert!(!problem.is_empty(), "a refusal names what was wrong"),
        };
        let Some(Body::Register(wire)) = convert::register(&hello, &token).body else {
            panic!("a hello encodes as register");
        };
        let device = convert::claimed_device(&wire)
            .expect("an encoded device id reads")
            .expect("an encoded register names its device");
        let back = convert::hello(device, wire).expect("an encoded hello reads");
        assert_eq!(back, hello, "a hello survives the trip to the wire");
    }
}

/// Real envelopes each way, and a few broken ones, for the seed corpus.
pub(crate) fn seeds() -> Vec<crate::testkit::fuzz::Seed> {
    use std::sync::Arc;
    use std::time::Duration;

    use opamp_core::transport::{CommandAck, ConfigAck, ConfigPush, DeviceHello, FromDevice, StatusReport, ToDevice};
    use opamp_core::{
        AgentType, Command, CommandKind, CommandOutcome, ConfigApplyState, ConfigBundle, ConfigFile, ConfigRef,
        ConfigVersion, CorrelationId, DeviceId, SupervisorId, Timestamp,
    };

    let device = DeviceId::new("ap-17:eth0").expect("a valid id");
    let fluentbit = AgentType::new("fluentbit").expect("a valid agent type");
    let v2 = ConfigVersion::new("v2").expect("a valid version");
    let id: CorrelationId = "0b3a8f4e-1d2c-4e5f-8a9b-0c1d2e3f4a5b".parse().expect("a valid id");
    let at = Timestamp::from_unix_millis(1_769_506_200_250).expect("in range");
    let bundle = ConfigBundle::new()
        .with_file(
            "fluent-bit.conf",
            ConfigFile::new("text/plain", "[SERVICE]\n    hot_reload On\n"),
        )
        .expect("a valid name");

    let mut hello = DeviceHello::new(device);
    hello.agent_type = Some(fluentbit);
    hello.config_version = Some(v2);
    hello.config_hash = Some(bundle.hash());
    hello.labels.insert("site".into(), "berlin".into());
    hello.capabilities.emission = true;
    hello.capabilities.remote_config = true;
    hello.capabilities.restart = true;

    let command = |kind| {
        let mut command = Command::new(device, kind, at, Duration::from_secs(30));
        command.correlation_id = id;
        ToDevice::Command(Box::new(command))
    };
    let mut status = StatusReport::default();
    status.emission = Some(true);
    status.healthy = Some(false);
    status.last_error = Some("output http: connection refused".into());

    let to_device = [
        (
            "registered",
            ToDevice::Registered(Box::new(SupervisorId::new("supervisor-3").expect("a valid id"))),
        ),
        ("set-emission", command(CommandKind::SetEmission { state: false })),
        ("restart", command(CommandKind::Restart)),
        (
            "apply-config",
            command(CommandKind::ApplyConfig {
                agent_type: fluentbit,
                version: v2,
            }),
        ),
        (
            "custom",
            command(CommandKind::Custom {
                capability: "com.example.diag".into(),
                message_type: "dump".into(),
                data: vec![0, 1, 255],
            }),
        ),
        (
            "config-push",
            ToDevice::ConfigPush(Arc::new(ConfigPush::new(
                Some(id),
                ConfigRef::new(fluentbit, v2),
                bundle.clone(),
            ))),
        ),
    ];
    let from_device = [
        ("heartbeat", FromDevice::Heartbeat),
        ("status", FromDevice::Status(status)),
        (
            "command-acked",
            FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Acked)),
        ),
        (
            "command-failed",
            FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Failed { reason: "busy".into() })),
        ),
        (
            "config-failed",
            FromDevice::ConfigAck(Box::new(ConfigAck::new(
                Some(id),
                bundle.hash(),
                ConfigApplyState::Failed,
                Some("parse error line 3".into()),
            ))),
        ),
    ];
    let mut seeds: Vec<crate::testkit::fuzz::Seed> = vec![(
        "grpc_envelope",
        "register",
        convert::register(&hello, "v1.ZGV2aWNlLXRva2Vu").encode_to_vec(),
    )];
    seeds.extend(
        to_device
            .iter()
            .map(|(name, m)| ("grpc_envelope", *name, convert::to_device(m).encode_to_vec())),
    );
    seeds.extend(
        from_device
            .iter()
            .map(|(name, m)| ("grpc_envelope", *name, convert::from_device_message(m).encode_to_vec())),
    );
    let mut truncated = convert::register(&hello, "token").encode_to_vec();
    truncated.truncate(truncated.len() / 2);
    seeds.push(("grpc_envelope", "truncated", truncated));
    // A length prefix claiming far more bytes than follow.
    seeds.push((
        "grpc_envelope",
        "huge-length",
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
    ));
    seeds
}
