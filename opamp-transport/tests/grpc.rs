//! The gRPC transport end to end over loopback sockets: the supervisor and
//! agent runtimes, the Fluent Bit applier, credentials, TLS, and bad input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Fleet, Pki, WAIT, Wire, did, hello, key, loopback};
use opamp_core::runtime::agent::MemoryApplier;
use opamp_core::runtime::supervisor::{RunningSupervisor, SupervisorConfig};
use opamp_core::testkit::spawn_agent;
use opamp_core::transport::{AgentConnector, AgentSession, DeviceTransport, FromDevice, StatusReport, ToDevice};
use opamp_core::{CommandKind, CommandOutcome, Error, RoutingStore};
use opamp_transport::grpc::proto::{self, envelope::Body};
use opamp_transport::grpc::{
    ClientTls, DeviceAuth, GrpcConnector, GrpcConnectorConfig, GrpcServerConfig, GrpcTransport, ServerTls,
};
use prost::Message as _;

/// gRPC with fleet tokens, for the shared scenarios.
struct Grpc;

#[async_trait]
impl Wire for Grpc {
    type Transport = GrpcTransport;

    async fn bind(&self) -> (Arc<GrpcTransport>, String) {
        let config = GrpcServerConfig::new(loopback(), DeviceAuth::FleetToken(key()));
        let transport = Arc::new(GrpcTransport::bind(config).await.unwrap());
        let url = format!("http://{}", transport.local_addr());
        (transport, url)
    }

    async fn stop(transport: &GrpcTransport) {
        transport.shutdown(Duration::from_secs(1)).await;
    }

    fn connector(&self, url: &str, device: &str) -> Arc<dyn AgentConnector> {
        Arc::new(connector(url, device))
    }
}

/// A supervisor serving gRPC with fleet tokens on a free port.
async fn supervisor(
    fleet: &Fleet,
    id: &str,
    server: impl FnOnce(GrpcServerConfig) -> GrpcServerConfig,
    supervisor: impl FnOnce(SupervisorConfig) -> SupervisorConfig,
) -> (RunningSupervisor, Arc<GrpcTransport>, String) {
    let config = server(GrpcServerConfig::new(loopback(), DeviceAuth::FleetToken(key())));
    let transport = Arc::new(GrpcTransport::bind(config).await.unwrap());
    let url = format!("http://{}", transport.local_addr());
    let running = fleet
        .start(id, vec![transport.clone() as Arc<dyn DeviceTransport>], supervisor)
        .await;
    (running, transport, url)
}

fn connector(url: &str, device: &str) -> GrpcConnector {
    GrpcConnector::new(GrpcConnectorConfig::new(url).token(key().token(&did(device)))).unwrap()
}

/// A device that registers and then only does what the test says.
async fn raw_device(url: &str, device: &str) -> AgentSession {
    common::raw_device(&connector(url, device), device).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emission_and_config_reach_a_fluent_bit_agent_over_grpc() {
    common::emission_and_config_reach_a_fluent_bit_agent(&Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_closes_the_stale_session_and_fences_its_release() {
    common::a_takeover_closes_the_stale_session_and_fences_its_release(&Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_supervisors_leases_lapse_and_the_device_rehomes() {
    common::a_dead_supervisors_leases_lapse_and_the_device_rehomes(&Grpc).await;
}

/// A raw gRPC client that sends whatever bytes it is given as frames.
mod raw {
    use prost::bytes::Buf;
    use tokio_stream::StreamExt as _;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default)]
    pub(super) struct Bytes;

    pub(super) struct Raw;

    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use prost::bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }

    impl Codec for Bytes {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    /// Opens `Control` and sends `frames` (and then holds the stream open);
    /// the response stream, or the status the call was refused with.
    pub(super) async fn call(url: &str, frames: Vec<Vec<u8>>) -> Result<tonic::Streaming<Vec<u8>>, tonic::Status> {
        call_on(connect(url).await, frames).await
    }

    /// One HTTP/2 connection to `url`; its clones share it.
    pub(super) async fn connect(url: &str) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// [`call`] on `channel`'s connection.
    pub(super) async fn call_on(
        channel: tonic::transport::Channel,
        frames: Vec<Vec<u8>>,
    ) -> Result<tonic::Streaming<Vec<u8>>, tonic::Status> {
        let mut client = tonic::client::Grpc::new(channel);
        client.ready().await.unwrap();
        let held_open = tokio_stream::iter(frames).chain(tokio_stream::pending());
        let path = "/opamp.control.v1.ControlService/Control".parse().unwrap();
        client
            .streaming(tonic::Request::new(held_open), path, Bytes)
            .await
            .map(tonic::Response::into_inner)
    }
}

fn register_frame(device: &str, token: &str) -> Vec<u8> {
    let identity = proto::EdgeIdentity {
        device_id: device.to_owned(),
        token: token.to_owned(),
        capabilities: Some(proto::Capabilities {
            emission: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    proto::Envelope {
        body: Some(Body::Register(identity)),
    }
    .encode_to_vec()
}

/// The status a refused stream ends with, after any messages before it.
async fn closing_status(mut stream: tonic::Streaming<Vec<u8>>) -> tonic::Status {
    loop {
        match tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("closed in time")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error status"),
            Err(status) => return status,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_the_offending_stream() {
    let mut fleet = Fleet::new().await;
    let (s1, _transport, url) = supervisor(
        &fleet,
        "s1",
        |c| c.register_timeout(Duration::from_millis(300)).max_message_size(4096),
        |c| c,
    )
    .await;
    let (good, _stop) = spawn_agent(
        Arc::new(connector(&url, "good")),
        hello("good"),
        Arc::new(MemoryApplier::new()),
    );
    fleet.owner_is("good", Some("s1")).await;
    let token = key().token(&did("bad")).as_str().to_owned();

    // Garbage as the first frame.
    let status = raw::call(&url, vec![vec![0xff, 0xff, 0xff, 0x0f]]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed message"), "{status:?}");

    // Garbage after a valid register: the registered device's stream is closed.
    let stream = raw::call(&url, vec![register_frame("bad", &token), vec![0x0a, 0xff, 0x01]])
        .await
        .unwrap();
    let status = closing_status(stream).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed message"), "{status:?}");

    // Something other than register first.
    let heartbeat = proto::Envelope {
        body: Some(Body::Heartbeat(proto::Heartbeat {})),
    };
    let status = raw::call(&url, vec![heartbeat.encode_to_vec()]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("the first message must be register, got heartbeat"),
        "{status:?}"
    );

    // A message only supervisors send.
    let command = proto::Envelope {
        body: Some(Body::Command(proto::Command::default())),
    };
    let stream = raw::call(&url, vec![register_frame("bad", &token), command.encode_to_vec()])
        .await
        .unwrap();
    let status = closing_status(stream).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("a device does not send command"),
        "{status:?}"
    );

    // A register whose labels are over the limits: refused, naming the label.
    let mut bloated = proto::Envelope::decode(register_frame("bad", &token).as_slice()).unwrap();
    if let Some(Body::Register(identity)) = &mut bloated.body {
        identity.labels.insert("site".into(), "x".repeat(2000));
    }
    let status = raw::call(&url, vec![bloated.encode_to_vec()]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("register: invalid input: device bad: label \"site\": its value is 2000 bytes"),
        "{status:?}"
    );

    // Nothing at all before the deadline.
    let status = raw::call(&url, Vec::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("no register message within 300ms"),
        "{status:?}"
    );

    // A message over the limit.
    let mut big = raw_device(&url, "big").await;
    let mut report = StatusReport::default();
    report.last_error = Some("x".repeat(8192));
    big.outbound.send(FromDevice::Status(report)).await.unwrap();
    let refused = tokio::time::timeout(WAIT, big.inbound.recv())
        .await
        .expect("closed in time");
    let err = refused.unwrap_err().to_string();
    assert!(err.contains("larger than the limit of 4096 bytes"), "{err}");

    // Through all of it the good device kept working.
    let id = fleet.send("s1", "good", CommandKind::SetEmission { state: true }).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    assert!(*good.emission().borrow());
    fleet.owner_is("bad", None).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_register_as_another() {
    let fleet = Fleet::new().await;
    let (s1, _transport, url) = supervisor(&fleet, "s1", |c| c, |c| c).await;
    // d1's token, claiming to be d2.
    let err = connector(&url, "d1").connect(&hello("d2")).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(err.to_string().contains("token for device d2"), "{err}");
    let no_token = GrpcConnector::new(GrpcConnectorConfig::new(&url)).unwrap();
    let err = no_token.connect(&hello("d2")).await.unwrap_err();
    assert!(err.to_string().contains("is missing"), "{err}");
    assert_eq!(fleet.store.lookup(&did("d2")).await.unwrap(), None);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_to_a_device_with_a_full_queue_fail_at_once() {
    let mut fleet = Fleet::new().await;
    let (s1, _transport, url) = supervisor(&fleet, "s1", |c| c, |c| c.device_queue(1)).await;
    let mut silent = raw_device(&url, "slow").await;
    fleet.owner_is("slow", Some("s1")).await;
    // The first command in flight (the device has it and never answers)...
    let first = fleet.send("s1", "slow", CommandKind::SetEmission { state: true }).await;
    let delivered = tokio::time::timeout(WAIT, async {
        loop {
            match silent.inbound.recv().await.unwrap() {
                Some(ToDevice::Command(command)) => return command.correlation_id,
                Some(_) => continue,
                None => panic!("the session closed"),
            }
        }
    })
    .await
    .expect("the first command reaches the device");
    assert_eq!(delivered, first);
    // ...the second fills the queue of one, and the third finds it full.
    let ids = [
        first,
        fleet
            .send("s1", "slow", CommandKind::SetEmission { state: false })
            .await,
        fleet.send("s1", "slow", CommandKind::Restart).await,
    ];
    match fleet.outcome(ids[2]).await {
        CommandOutcome::Failed { reason } => assert!(reason.contains("queue of device slow is full"), "{reason}"),
        other => panic!("expected the third command to fail, got {other:?}"),
    }
    s1.abort();
}

async fn tls_supervisor(fleet: &Fleet, auth: DeviceAuth, tls: ServerTls) -> (RunningSupervisor, String) {
    let transport = Arc::new(
        GrpcTransport::bind(GrpcServerConfig::new(loopback(), auth).tls(tls))
            .await
            .unwrap(),
    );
    let url = format!("https://localhost:{}", transport.local_addr().port());
    let running = fleet
        .start("tls", vec![transport as Arc<dyn DeviceTransport>], |c| c)
        .await;
    (running, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_tokens_and_mtls_with_the_device_id_from_the_certificate() {
    let fleet = Fleet::new().await;
    let pki = Pki::new();
    let (server_cert, server_key) = pki.issue("supervisor");

    // Server TLS, fleet tokens.
    let tls = ServerTls::new(server_cert.clone(), server_key.clone());
    let (s1, url) = tls_supervisor(&fleet, DeviceAuth::FleetToken(key()), tls).await;
    let config = GrpcConnectorConfig::new(&url)
        .token(key().token(&did("t1")))
        .tls(ClientTls::new(pki.ca_pem.clone()));
    let session = GrpcConnector::new(config).unwrap().connect(&hello("t1")).await.unwrap();
    fleet.owner_is("t1", Some("tls")).await;
    drop(session);
    s1.shutdown().await;

    // mTLS: the certificate names the device.
    let tls = ServerTls::new(server_cert, server_key).client_ca(pki.ca_pem.clone());
    let (s2, url) = tls_supervisor(&fleet, DeviceAuth::ClientCertificate, tls).await;
    let (cert, cert_key) = pki.issue("m1");
    let client_tls = ClientTls::new(pki.ca_pem.clone()).identity(cert, cert_key);
    let mtls = GrpcConnector::new(GrpcConnectorConfig::new(&url).tls(client_tls)).unwrap();
    let session = mtls.connect(&hello("m1")).await.unwrap();
    fleet.owner_is("m1", Some("tls")).await;
    let err = mtls.connect(&hello("m2")).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(
        err.to_string().contains("certificate is for device m1, not m2"),
        "{err}"
    );
    let anonymous = GrpcConnector::new(GrpcConnectorConfig::new(&url).tls(ClientTls::new(pki.ca_pem.clone()))).unwrap();
    assert!(
        anonymous.connect(&hello("m3")).await.is_err(),
        "no certificate, no session"
    );
    drop(session);
    s2.shutdown().await;

    // A server that asks for certificates without a CA to check them is refused up front.
    let err = GrpcTransport::bind(GrpcServerConfig::new(loopback(), DeviceAuth::ClientCertificate))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs TLS with a client_ca_pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_has_at_most_its_streams_open_at_once() {
    let fleet = Fleet::new().await;
    let (s1, _transport, url) = supervisor(&fleet, "s1", |c| c.max_streams_per_connection(2), |c| c).await;
    let channel = raw::connect(&url).await;
    let open = |device: &str| {
        let token = key().token(&did(device)).as_str().to_owned();
        raw::call_on(channel.clone(), vec![register_frame(device, &token)])
    };
    let first = open("c1").await.unwrap();
    let _second = open("c2").await.unwrap();
    fleet.owner_is("c2", Some("s1")).await;

    // The third waits for a stream of the connection to end…
    let third = tokio::spawn(open("c3"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third stream was opened on a connection allowed two"
    );
    fleet.owner_is("c3", None).await;
    // …and opens once one ends: c1 registering over another connection
    // takes its session over, and the server ends c1's stream here.
    let token = key().token(&did("c1")).as_str().to_owned();
    let _c1_again = raw::call(&url, vec![register_frame("c1", &token)]).await.unwrap();
    let _ended = closing_or_end(first).await;
    let _third = tokio::time::timeout(WAIT, third)
        .await
        .expect("opened once a stream ended")
        .unwrap()
        .unwrap();
    fleet.owner_is("c3", Some("s1")).await;
    s1.shutdown().await;
}

/// Reads `stream` until the server ends it, with a status or without.
async fn closing_or_end(mut stream: tonic::Streaming<Vec<u8>>) {
    loop {
        match tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("ended in time")
        {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_no_more_than_the_cap_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = Fleet::new().await;
    let (s1, transport, url) = supervisor(
        &fleet,
        "s1",
        |c| c.register_timeout(Duration::from_secs(1)).max_connections(2),
        |c| c,
    )
    .await;
    let address = transport.local_addr();
    // Two connections take both slots: one silent, one dribbling its
    // preface a byte at a time, too slowly.
    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut dribbling = tokio::net::TcpStream::connect(address).await.unwrap();
    let opened = std::time::Instant::now();
    let dribble = tokio::spawn(async move {
        for byte in b"PRI * HTTP/2.0\r\n" {
            if dribbling.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        dribbling
    });
    // A device waits in the backlog while they hold the slots…
    let device = tokio::spawn({
        let url = url.clone();
        async move { raw_device(&url, "d1").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.owner_is("d1", None).await;

    // …both are closed at the deadline…
    // (The server speaks first, its SETTINGS: read past them.)
    let mut scratch = [0; 256];
    for stream in [&mut silent, &mut dribble.await.unwrap()] {
        loop {
            match tokio::time::timeout(WAIT, stream.read(&mut scratch))
                .await
                .expect("closed in time")
            {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    let closed_after = opened.elapsed();
    assert!(closed_after < Duration::from_secs(3), "closed after {closed_after:?}");
    // …and the device is served in a slot they left.
    let _device = tokio::time::timeout(WAIT, device).await.expect("registered").unwrap();
    fleet.owner_is("d1", Some("s1")).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_certificate_serves_the_connections_that_follow() {
    let fleet = Fleet::new().await;
    let pki = Pki::new();
    let (cert, cert_key) = pki.issue("supervisor");
    let transport = Arc::new(
        GrpcTransport::bind(
            GrpcServerConfig::new(loopback(), DeviceAuth::FleetToken(key())).tls(ServerTls::new(cert, cert_key)),
        )
        .await
        .unwrap(),
    );
    let url = format!("https://localhost:{}", transport.local_addr().port());
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    let renewed = Pki::new();
    let connect = |ca: &str, device: &str| {
        let config = GrpcConnectorConfig::new(&url)
            .token(key().token(&did(device)))
            .tls(ClientTls::new(ca.to_owned()));
        let connector = GrpcConnector::new(config).unwrap();
        let device = device.to_owned();
        async move { connector.connect(&hello(&device)).await }
    };
    let _old = connect(&pki.ca_pem, "r0").await.unwrap();
    assert!(
        connect(&renewed.ca_pem, "r1").await.is_err(),
        "a client trusting another CA is refused the first certificate"
    );

    let (cert, cert_key) = renewed.issue("supervisor");
    transport.reload_tls(&ServerTls::new(cert, cert_key)).unwrap();
    let _new = connect(&renewed.ca_pem, "r1").await.unwrap();
    fleet.owner_is("r1", Some("s1")).await;
    fleet.owner_is("r0", Some("s1")).await;
    let err = transport.reload_tls(&ServerTls::new("garbage", "garbage")).unwrap_err();
    assert!(err.to_string().contains("certificate chain"), "{err}");
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reporting_too_often_has_its_stream_ended_resource_exhausted() {
    use opamp_core::transport::DeviceLimits;
    let fleet = Fleet::new().await;
    let limits = DeviceLimits::default().report_rate(60, 2);
    let (s1, _transport, url) = supervisor(&fleet, "s1", |c| c.device_limits(limits), |c| c).await;
    let mut quiet = raw_device(&url, "quiet").await;
    let mut chatty = raw_device(&url, "chatty").await;
    for _ in 0..3 {
        let _ = chatty.outbound.send(FromDevice::Heartbeat).await;
    }
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match chatty.inbound.recv().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends");
    let err = ended.unwrap_err().to_string();
    assert!(err.contains("more than 60 messages a minute (bursts of 2)"), "{err}");
    // Another device is not affected.
    quiet.outbound.send(FromDevice::Heartbeat).await.unwrap();
    fleet.owner_is("quiet", Some("s1")).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), quiet.inbound.recv())
            .await
            .is_err(),
        "the quiet device's stream stays open"
    );
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_has_at_most_its_share_of_connections() {
    use tokio::io::AsyncReadExt;
    let fleet = Fleet::new().await;
    let (s1, transport, url) = supervisor(&fleet, "s1", |c| c.max_connections_per_address(1), |c| c).await;
    let held = raw_device(&url, "d1").await;
    // A second connection from the same address is closed as it comes.
    let mut second = tokio::net::TcpStream::connect(transport.local_addr()).await.unwrap();
    let mut scratch = [0; 64];
    let read = tokio::time::timeout(WAIT, second.read(&mut scratch))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Once the first closes, there is room.
    drop(held);
    fleet.owner_is("d1", None).await;
    let _again = tokio::time::timeout(WAIT, raw_device(&url, "d2"))
        .await
        .expect("registered");
    fleet.owner_is("d2", Some("s1")).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_refused_naming_its_revocation() {
    common::a_revoked_device_is_refused_naming_its_revocation(&Grpc).await;
}

/// Connections on which no device has registered are capped: past the cap,
/// new ones are closed as they come (not at the handshake deadline);
/// connections whose device registered do not count; a silent one that goes
/// gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_connections_past_their_cap_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let fleet = Fleet::new().await;
    let (s1, transport, url) = supervisor(&fleet, "s1", |c| c.max_unverified_connections(3), |c| c).await;
    let address = transport.local_addr();
    let _registered = [raw_device(&url, "v1").await, raw_device(&url, "v2").await];
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut past = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut scratch = [0; 256];
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match past.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection past the cap was not closed at once");

    drop(silent.pop());
    let mut back = None;
    for _ in 0..50 {
        if let Ok(session) = connector(&url, "v3").connect(&common::hello("v3")).await {
            back = Some(session);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back.is_some(), "a place given back by the silent connection that went");
    fleet.owner_is("v3", Some("s1")).await;
    s1.shutdown().await;
}

/// A connection whose registration was refused, kept open by its client,
/// is closed at its deadline: it does not hold its place among the
/// unverified connections for as long as it answers pings, so a device
/// that comes after it registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_which_no_device_registers_is_closed_at_its_deadline() {
    let fleet = Fleet::new().await;
    let (s1, _transport, url) = supervisor(
        &fleet,
        "s1",
        |c| c.register_timeout(Duration::from_secs(1)).max_unverified_connections(1),
        |c| c,
    )
    .await;
    let channel = raw::connect(&url).await;
    match raw::call_on(channel.clone(), vec![register_frame("intruder", "not-a-token")]).await {
        Ok(stream) => assert_eq!(closing_status(stream).await.code(), tonic::Code::Unauthenticated),
        Err(status) => assert_eq!(status.code(), tonic::Code::Unauthenticated),
    }
    let started = std::time::Instant::now();
    let mut registered = None;
    while registered.is_none() && started.elapsed() < WAIT {
        match connector(&url, "d1").connect(&common::hello("d1")).await {
            Ok(session) => registered = Some(session),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        registered.is_some(),
        "the refused connection still held the only unverified place after {WAIT:?}"
    );
    fleet.owner_is("d1", Some("s1")).await;
    drop(channel);
    s1.shutdown().await;
}
