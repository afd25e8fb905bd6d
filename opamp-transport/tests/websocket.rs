//! OpAMP over WebSocket and plain HTTP end to end over loopback sockets: the
//! shared scenarios over both transports, and the spec's behaviours (bad
//! input, limits, credentials, sequence gaps, duplicate instance uids,
//! multiplexing, throttling), each judged per connection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use common::{Fleet, WAIT, Wire, did, hello, key, loopback, sid};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use opamp_core::runtime::agent::MemoryApplier;
use opamp_core::testkit::{eventually, spawn_agent};
use opamp_core::transport::{AgentConnector, DeviceTransport, ToDevice};
use opamp_core::{CommandKind, CommandOutcome, Error, RoutingStore};
use opamp_transport::auth::FleetKey;
use opamp_transport::grpc::{DeviceAuth, GrpcConnector, GrpcConnectorConfig, GrpcServerConfig, GrpcTransport};
use opamp_transport::tls::{ClientTls, ServerTls};
use opamp_transport::websocket::proto::{
    self, AgentToServer, AnyValue, KeyValue, ServerErrorResponseType, ServerToAgent, ServerToAgentFlags, any_value,
};
use opamp_transport::websocket::{
    DeviceIdSource, EMISSION_CAPABILITY, OpampAuth, OpampConnector, OpampConnectorConfig, OpampServerConfig,
    OpampTransport, SERVER_CAPABILITIES,
};
use prost::Message as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};

/// OpAMP over WebSocket with bearer fleet tokens; `wss://` when `tls`.
struct Ws {
    tls: bool,
}

/// OpAMP over plain HTTP, polling every 50 ms, with Basic `device:token`; `https://` when `tls`.
struct Http {
    tls: bool,
}

const WS: Ws = Ws { tls: false };
const HTTP: Http = Http { tls: false };

/// The server's TLS: a `localhost` certificate from the shared test CA.
fn server_tls() -> ServerTls {
    let (_, (cert, key)) = common::shared_pki();
    ServerTls::new(cert.clone(), key.clone())
}

/// A transport, with TLS when `tls`, and its URL for `scheme` (or its secure twin).
async fn bind_with(tls: bool, scheme: &str) -> (Arc<OpampTransport>, String) {
    let transport = bind(|c| if tls { c.tls(server_tls()) } else { c }).await;
    let url = match tls {
        true => format!("{scheme}s://localhost:{}/v1/opamp", transport.local_addr().port()),
        false => format!("{scheme}://{}/v1/opamp", transport.local_addr()),
    };
    (transport, url)
}

/// `config`, trusting the shared test CA when `tls`.
fn trusting(config: OpampConnectorConfig, tls: bool) -> OpampConnectorConfig {
    match tls {
        true => config.tls(ClientTls::new(common::shared_pki().0.ca_pem.clone())),
        false => config,
    }
}

async fn bind(config: impl FnOnce(OpampServerConfig) -> OpampServerConfig) -> Arc<OpampTransport> {
    let config = config(OpampServerConfig::new(loopback(), OpampAuth::FleetToken(key())));
    Arc::new(OpampTransport::bind(config).await.unwrap())
}

#[async_trait]
impl Wire for Ws {
    type Transport = OpampTransport;

    async fn bind(&self) -> (Arc<OpampTransport>, String) {
        bind_with(self.tls, "ws").await
    }

    async fn stop(transport: &OpampTransport) {
        transport.shutdown(Duration::from_secs(1)).await;
    }

    fn connector(&self, url: &str, device: &str) -> Arc<dyn AgentConnector> {
        let config = OpampConnectorConfig::new(url).token(key().token(&did(device)));
        Arc::new(OpampConnector::new(trusting(config, self.tls)).unwrap())
    }
}

#[async_trait]
impl Wire for Http {
    type Transport = OpampTransport;

    async fn bind(&self) -> (Arc<OpampTransport>, String) {
        bind_with(self.tls, "http").await
    }

    async fn stop(transport: &OpampTransport) {
        transport.shutdown(Duration::from_secs(1)).await;
    }

    fn connector(&self, url: &str, device: &str) -> Arc<dyn AgentConnector> {
        let token = key().token(&did(device));
        let config = OpampConnectorConfig::new(url)
            .http(Duration::from_millis(50))
            .basic(device, token.as_str())
            .gzip(true);
        Arc::new(OpampConnector::new(trusting(config, self.tls)).unwrap())
    }
}

fn ws_connector(url: &str, device: &str) -> OpampConnector {
    OpampConnector::new(OpampConnectorConfig::new(url).token(key().token(&did(device)))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emission_and_config_reach_a_fluent_bit_agent_over_websocket() {
    common::emission_and_config_reach_a_fluent_bit_agent(&WS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emission_and_config_reach_a_fluent_bit_agent_over_http_polling() {
    common::emission_and_config_reach_a_fluent_bit_agent(&HTTP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emission_and_config_reach_a_fluent_bit_agent_over_websocket_with_tls() {
    common::emission_and_config_reach_a_fluent_bit_agent(&Ws { tls: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emission_and_config_reach_a_fluent_bit_agent_over_http_polling_with_tls() {
    common::emission_and_config_reach_a_fluent_bit_agent(&Http { tls: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_closes_the_stale_websocket_session_over_tls() {
    common::a_takeover_closes_the_stale_session_and_fences_its_release(&Ws { tls: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_closes_the_stale_websocket_session() {
    common::a_takeover_closes_the_stale_session_and_fences_its_release(&WS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_ends_the_stale_http_session() {
    common::a_takeover_closes_the_stale_session_and_fences_its_release(&HTTP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_device_rehomes_when_its_supervisor_dies() {
    common::a_dead_supervisors_leases_lapse_and_the_device_rehomes(&WS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_device_rehomes_when_its_supervisor_dies() {
    common::a_dead_supervisors_leases_lapse_and_the_device_rehomes(&HTTP).await;
}

// ---- a raw OpAMP client, to send what a real client would not ----

type Raw = WebSocketStream<TcpStream>;

fn bearer(device: &str) -> String {
    format!("Bearer {}", key().token(&did(device)).as_str())
}

/// A bearer token of the v1 form, which names no device: the server can
/// check it only against the device an agent's first message reports.
const UNCHECKED: &str = "Bearer v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Opens a WebSocket to `url` with `authorization`; the HTTP status if the upgrade is refused.
async fn raw_ws(url: &str, authorization: Option<&str>) -> Result<Raw, (u16, Option<String>)> {
    let mut request = url.into_client_request().unwrap();
    if let Some(value) = authorization {
        request.headers_mut().insert("authorization", value.parse().unwrap());
    }
    let host = request.uri().authority().unwrap().to_string();
    let stream = TcpStream::connect(host).await.unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
        )),
        Err(other) => panic!("the upgrade failed otherwise: {other}"),
    }
}

fn framed(message: &AgentToServer) -> Message {
    let mut bytes = vec![0];
    message.encode(&mut bytes).unwrap();
    Message::Binary(bytes.into())
}

async fn send(ws: &mut Raw, message: &AgentToServer) {
    ws.send(framed(message)).await.unwrap();
}

/// The next `ServerToAgent`.
async fn recv(ws: &mut Raw) -> ServerToAgent {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the connection is open")
            .expect("a readable frame");
        if let Message::Binary(bytes) = frame {
            assert_eq!(bytes[0], 0, "the header is 0");
            return ServerToAgent::decode(&bytes[1..]).unwrap();
        }
    }
}

/// Reads until the server closes; its close code.
async fn close_code(ws: &mut Raw) -> CloseCode {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("closed in time");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => panic!("the connection broke instead of closing: {err}"),
        }
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
    }
}

/// A full first report of the agent `uid`, which says it is `device`.
fn report(uid: [u8; 16], sequence: u64, device: &str) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: sequence,
        capabilities: proto::AgentCapabilities::ReportsStatus as u64,
        agent_description: Some(proto::AgentDescription {
            identifying_attributes: vec![text("service.instance.id", device), text("service.name", "otelcol")],
            non_identifying_attributes: vec![text("os.type", "linux")],
        }),
        custom_capabilities: Some(proto::CustomCapabilities {
            capabilities: vec![EMISSION_CAPABILITY.to_owned()],
        }),
        ..Default::default()
    }
}

/// A report with nothing but the uid and the sequence number.
fn bare(uid: [u8; 16], sequence: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: sequence,
        capabilities: proto::AgentCapabilities::ReportsStatus as u64,
        ..Default::default()
    }
}

fn error_of(reply: &ServerToAgent) -> (ServerErrorResponseType, String) {
    let error = reply.error_response.as_ref().expect("an error response");
    (error.r#type(), error.error_message.clone())
}

/// A supervisor serving OpAMP with `config` on a free port; the ws:// and http:// URLs.
async fn opamp_supervisor(
    fleet: &Fleet,
    id: &str,
    config: impl FnOnce(OpampServerConfig) -> OpampServerConfig,
) -> (opamp_core::runtime::supervisor::RunningSupervisor, String, String) {
    let transport = bind(config).await;
    let addr = transport.local_addr();
    let running = fleet
        .start(id, vec![transport as Arc<dyn DeviceTransport>], |c| c)
        .await;
    (
        running,
        format!("ws://{addr}/v1/opamp"),
        format!("http://{addr}/v1/opamp"),
    )
}

/// A good agent on its own connection, to show bad input elsewhere leaves it alone.
async fn good_agent(
    fleet: &mut Fleet,
    ws_url: &str,
) -> (Arc<opamp_core::runtime::agent::Agent>, tokio::sync::oneshot::Sender<()>) {
    let good = spawn_agent(
        Arc::new(ws_connector(ws_url, "good")),
        hello("good"),
        Arc::new(MemoryApplier::new()),
    );
    fleet.owner_is("good", Some("s1")).await;
    good
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_input_closes_only_that_connection() {
    let mut fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |c| c.max_message_size(4096)).await;
    let (good, _stop) = good_agent(&mut fleet, &url).await;
    let auth = bearer("bad");

    // No credential, a wrong one, another scheme: 401 before the upgrade.
    assert_eq!(raw_ws(&url, None).await.unwrap_err().0, 401);
    let wrong = basic("bad", key().token(&did("other")).as_str());
    assert_eq!(raw_ws(&url, Some(&wrong)).await.unwrap_err().0, 401);
    assert_eq!(raw_ws(&url, Some("Digest x")).await.unwrap_err().0, 401);

    // A forged or garbled bearer token: 401 before the upgrade too.
    let forged = bearer("other").replacen(".", ".0", 2);
    assert_eq!(raw_ws(&url, Some(&forged)).await.unwrap_err().0, 401);
    assert_eq!(raw_ws(&url, Some("Bearer x")).await.unwrap_err().0, 401);

    // A bearer token for another device than the agent reports: refused
    // after the first message, whether the token names its device (v2)…
    let mut ws = raw_ws(&url, Some(&bearer("other"))).await.unwrap();
    send(&mut ws, &report([1; 16], 1, "bad")).await;
    let (kind, message) = error_of(&recv(&mut ws).await);
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert!(message.contains("the credential is for device other"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Policy);
    // …or not (v1).
    let v1 = format!("Bearer {}", key().token_v1(&did("other")).as_str());
    let mut ws = raw_ws(&url, Some(&v1)).await.unwrap();
    send(&mut ws, &report([1; 16], 1, "bad")).await;
    let (kind, message) = error_of(&recv(&mut ws).await);
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert!(message.contains("token for device bad"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Policy);

    // A header that is not 0.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    ws.send(Message::Binary(vec![1, 0x0a, 0x00].into())).await.unwrap();
    let (kind, message) = error_of(&recv(&mut ws).await);
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert!(message.contains("header is 1"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Protocol);

    // A header that is not even a varint.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    ws.send(Message::Binary(vec![0xff; 11].into())).await.unwrap();
    let _ = recv(&mut ws).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Protocol);

    // Garbage after the header.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    ws.send(Message::Binary(vec![0, 0x0a, 0xff, 0x01].into()))
        .await
        .unwrap();
    let (_, message) = error_of(&recv(&mut ws).await);
    assert!(message.contains("not a valid AgentToServer"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Invalid);

    // Garbage after a valid registration: that agent's session ends too.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    send(&mut ws, &report([2; 16], 1, "bad")).await;
    assert_eq!(recv(&mut ws).await.capabilities, SERVER_CAPABILITIES);
    fleet.owner_is("bad", Some("s1")).await;
    ws.send(Message::Binary(vec![0, 0x0a, 0xff, 0x01].into()))
        .await
        .unwrap();
    let _ = recv(&mut ws).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Invalid);
    fleet.owner_is("bad", None).await;

    // An instance uid that is not 16 bytes.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    let mut short = report([3; 16], 1, "bad");
    short.instance_uid = vec![1, 2, 3];
    send(&mut ws, &short).await;
    let (_, message) = error_of(&recv(&mut ws).await);
    assert!(message.contains("instance_uid must be 16 bytes, got 3"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Invalid);

    // Text instead of binary.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, CloseCode::Unsupported);

    // A message over the limit: 1009.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    let mut big = report([4; 16], 1, "bad");
    big.health = Some(proto::ComponentHealth {
        last_error: "x".repeat(8192),
        ..Default::default()
    });
    let _ = ws.send(framed(&big)).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);

    // Frames broken below the message: an unmasked one (written past the
    // client library, which masks), and a fragmented ping. 1002, named.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    ws.get_mut().write_all(&[0x82, 0x01, 0x00]).await.unwrap();
    let (_, message) = error_of(&recv(&mut ws).await);
    assert!(message.contains("must be masked"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Protocol);
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    // A ping without FIN, masked with zeros.
    ws.get_mut()
        .write_all(&[0x09, 0x82, 0, 0, 0, 0, b'h', b'i'])
        .await
        .unwrap();
    let (_, message) = error_of(&recv(&mut ws).await);
    assert!(message.contains("fragmented control frame"), "{message}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Protocol);

    // A first message without its description: the full state is asked for, nothing refused.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    send(&mut ws, &bare([5; 16], 7)).await;
    let reply = recv(&mut ws).await;
    assert_eq!(reply.flags & ServerToAgentFlags::ReportFullState as u64, 1);
    assert_eq!(reply.capabilities, SERVER_CAPABILITIES);

    // Through all of it the good agent kept working.
    let id = fleet.send("s1", "good", CommandKind::SetEmission { state: true }).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    assert!(*good.emission().borrow());
    s1.shutdown().await;
}

/// A plain HTTP response: status, headers, body.
struct Posted {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

/// POSTs `body` to `url` with `headers` over a fresh connection.
async fn post(url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Posted {
    let uri: hyper::Uri = url.parse().unwrap();
    let stream = TcpStream::connect(uri.authority().unwrap().as_str()).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::post(uri.clone()).header("host", uri.authority().unwrap().as_str());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Posted { status, headers, body }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn protobuf_headers(authorization: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/x-protobuf".to_owned()),
        ("authorization", authorization.to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_is_refused_per_request() {
    let mut fleet = Fleet::new().await;
    let (s1, ws_url, url) = opamp_supervisor(&fleet, "s1", |c| c.max_message_size(4096)).await;
    let (good, _stop) = good_agent(&mut fleet, &ws_url).await;
    let auth = basic("h1", key().token(&did("h1")).as_str());

    // No credential, a wrong token (Basic and bearer): 401.
    let body = report([1; 16], 1, "h1").encode_to_vec();
    let refused = post(&url, &[("content-type", "application/x-protobuf".into())], body.clone()).await;
    assert_eq!(refused.status, 401);
    assert!(refused.headers.contains_key("www-authenticate"));
    let wrong = basic("h1", key().token(&did("h2")).as_str());
    assert_eq!(post(&url, &protobuf_headers(&wrong), body.clone()).await.status, 401);
    assert_eq!(
        post(&url, &protobuf_headers(&bearer("h2")), body.clone()).await.status,
        401
    );

    // Not protobuf; not the endpoint.
    let mut headers = protobuf_headers(&auth);
    headers[0].1 = "application/json".into();
    assert_eq!(post(&url, &headers, body.clone()).await.status, 415);
    assert_eq!(
        post(
            &url.replace("/v1/opamp", "/other"),
            &protobuf_headers(&auth),
            body.clone()
        )
        .await
        .status,
        404
    );

    // Garbage: 400 with an ErrorResponse.
    let refused = post(&url, &protobuf_headers(&auth), vec![0x0a, 0xff, 0x01]).await;
    assert_eq!(refused.status, 400);
    let (kind, message) = error_of(&ServerToAgent::decode(refused.body).unwrap());
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert!(message.contains("not a valid AgentToServer"), "{message}");

    // Over the limit, plain and after decompression: 413.
    let mut big = report([1; 16], 1, "h1");
    big.health = Some(proto::ComponentHealth {
        last_error: "x".repeat(8192),
        ..Default::default()
    });
    let big = big.encode_to_vec();
    assert_eq!(post(&url, &protobuf_headers(&auth), big.clone()).await.status, 413);
    let mut gzipped = protobuf_headers(&auth);
    gzipped.push(("content-encoding", "gzip".into()));
    let packed = gzip(&big);
    assert!(packed.len() < 4096, "small on the wire, large inside");
    assert_eq!(post(&url, &gzipped, packed).await.status, 413);
    assert_eq!(post(&url, &gzipped, b"not gzip".to_vec()).await.status, 400);

    // A gzipped request registers; a gzipped response comes when asked for.
    gzipped.push(("accept-encoding", "gzip".into()));
    let registered = post(&url, &gzipped, gzip(&body)).await;
    assert_eq!(registered.status, 200);
    assert_eq!(registered.headers.get("content-encoding").unwrap(), "gzip");
    let reply = ServerToAgent::decode(gunzip(&registered.body).as_slice()).unwrap();
    assert_eq!(reply.capabilities, SERVER_CAPABILITIES);
    assert_eq!(reply.instance_uid, vec![1; 16]);
    fleet.owner_is("h1", Some("s1")).await;

    // Its next poll, uncompressed both ways, with a sequence gap: ReportFullState.
    let polled = post(&url, &protobuf_headers(&auth), bare([1; 16], 5).encode_to_vec()).await;
    assert_eq!(polled.status, 200);
    assert!(polled.headers.get("content-encoding").is_none());
    let reply = ServerToAgent::decode(polled.body).unwrap();
    assert_eq!(reply.flags & ServerToAgentFlags::ReportFullState as u64, 1);
    // Another device's credential cannot poll for it.
    let other = basic("h2", key().token(&did("h2")).as_str());
    assert_eq!(
        post(&url, &protobuf_headers(&other), bare([1; 16], 6).encode_to_vec())
            .await
            .status,
        401
    );

    // A command waits for the poll, and is acknowledged by the agent's answer.
    let id = fleet.send("s1", "h1", CommandKind::SetEmission { state: true }).await;
    let store = fleet.store.clone();
    let command = loop {
        let polled = post(&url, &protobuf_headers(&auth), bare([1; 16], 6).encode_to_vec()).await;
        let reply = ServerToAgent::decode(polled.body).unwrap();
        if let Some(custom) = reply.custom_message {
            break custom;
        }
        assert!(store.lookup(&did("h1")).await.unwrap().is_some());
    };
    assert_eq!(command.capability, EMISSION_CAPABILITY);
    assert_eq!(command.r#type, "set_emission");
    let sent: serde_json::Value = serde_json::from_slice(&command.data).unwrap();
    assert_eq!(sent["enabled"], true);
    let mut answer = bare([1; 16], 7);
    answer.custom_message = Some(proto::CustomMessage {
        capability: EMISSION_CAPABILITY.into(),
        r#type: "set_emission_result".into(),
        data: serde_json::to_vec(&serde_json::json!({"correlation_id": sent["correlation_id"], "outcome": "acked"}))
            .unwrap(),
    });
    assert_eq!(
        post(&url, &protobuf_headers(&auth), answer.encode_to_vec())
            .await
            .status,
        200
    );
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);

    // Saying goodbye ends the session at once.
    let mut bye = bare([1; 16], 8);
    bye.agent_disconnect = Some(proto::AgentDisconnect {});
    assert_eq!(
        post(&url, &protobuf_headers(&auth), bye.encode_to_vec()).await.status,
        200
    );
    fleet.owner_is("h1", None).await;

    let id = fleet
        .send("s1", "good", CommandKind::SetEmission { state: false })
        .await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    assert!(!*good.emission().borrow());
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_idle_websockets_going_away() {
    let fleet = Fleet::new().await;
    let transport = bind(|c| c).await;
    let url = format!("ws://{}/v1/opamp", transport.local_addr());
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    // One connection with a registered agent, one with none; both idle, with no task.
    let mut registered = raw_ws(&url, Some(&bearer("idle"))).await.unwrap();
    send(&mut registered, &report([4; 16], 1, "idle")).await;
    assert_eq!(recv(&mut registered).await.error_response, None);
    let mut silent = raw_ws(&url, Some(&bearer("silent"))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let grace = Duration::from_secs(5);
    let started = std::time::Instant::now();
    transport.shutdown(grace).await;
    assert!(
        started.elapsed() < grace,
        "the connections ended before the grace ran out"
    );
    assert_eq!(close_code(&mut registered).await, CloseCode::Away);
    assert_eq!(close_code(&mut silent).await, CloseCode::Away);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_is_answered_with_report_full_state() {
    let fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |c| c).await;
    let mut ws = raw_ws(&url, Some(&bearer("seq"))).await.unwrap();
    send(&mut ws, &report([9; 16], 1, "seq")).await;
    let first = recv(&mut ws).await;
    assert_eq!(
        first.capabilities, SERVER_CAPABILITIES,
        "capabilities in the first reply"
    );
    assert_eq!(first.flags, 0);
    send(&mut ws, &bare([9; 16], 2)).await;
    let next = recv(&mut ws).await;
    assert_eq!(next.flags, 0, "no gap");
    assert_eq!(next.instance_uid, vec![9; 16]);
    send(&mut ws, &bare([9; 16], 5)).await;
    assert_eq!(recv(&mut ws).await.flags, ServerToAgentFlags::ReportFullState as u64);
    send(&mut ws, &report([9; 16], 6, "seq")).await;
    assert_eq!(recv(&mut ws).await.flags, 0, "the full state came, in sequence");
    s1.shutdown().await;
}

fn fleet_basic() -> OpampAuth {
    OpampAuth::Basic {
        username: "fleet".into(),
        password: "fleet password".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_instance_uid_is_offered_a_new_one() {
    let fleet = Fleet::new().await;
    let (s1, url, http_url) = opamp_supervisor(&fleet, "s1", |mut c| {
        c.auth = fleet_basic();
        c
    })
    .await;
    let auth = basic("fleet", "fleet password");
    let mut first = raw_ws(&url, Some(&auth)).await.unwrap();
    send(&mut first, &report([7; 16], 1, "twin-1")).await;
    assert!(recv(&mut first).await.error_response.is_none());
    fleet.owner_is("twin-1", Some("s1")).await;

    // A clone of the VM: same uid, another connection.
    let mut clone = raw_ws(&url, Some(&auth)).await.unwrap();
    send(&mut clone, &report([7; 16], 1, "twin-2")).await;
    let offered = recv(&mut clone).await;
    let fresh = offered
        .agent_identification
        .expect("a new instance uid")
        .new_instance_uid;
    assert_eq!(fresh.len(), 16);
    assert_ne!(fresh, vec![7; 16]);
    assert_eq!(
        fleet.store.lookup(&did("twin-2")).await.unwrap(),
        None,
        "not registered under the duplicate"
    );
    // The same over plain HTTP.
    let polled = post(
        &http_url,
        &protobuf_headers(&auth),
        report([7; 16], 1, "twin-3").encode_to_vec(),
    )
    .await;
    let offered = ServerToAgent::decode(polled.body).unwrap();
    assert!(offered.agent_identification.is_some());

    // With the new uid it is registered, and the first keeps its own.
    let fresh: [u8; 16] = fresh.try_into().unwrap();
    send(&mut clone, &report(fresh, 2, "twin-2")).await;
    let registered = recv(&mut clone).await;
    assert_eq!(registered.instance_uid, fresh.to_vec());
    assert!(registered.agent_identification.is_none());
    fleet.owner_is("twin-2", Some("s1")).await;
    fleet.owner_is("twin-1", Some("s1")).await;

    // Our connector adopts an offered uid by itself.
    let connector = OpampConnector::new(OpampConnectorConfig::new(&url).basic("fleet", "fleet password")).unwrap();
    let taken: [u8; 16] = connector.instance_uid();
    let mut holder = raw_ws(&url, Some(&auth)).await.unwrap();
    drop(first);
    send(&mut holder, &report(taken, 1, "holder")).await;
    assert!(recv(&mut holder).await.error_response.is_none());
    let session = connector.connect(&hello("adopter")).await.unwrap();
    assert_ne!(connector.instance_uid(), taken);
    fleet.owner_is("adopter", Some("s1")).await;
    drop(session);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_agents_share_one_websocket() {
    let mut fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |mut c| {
        c.auth = fleet_basic();
        c
    })
    .await;
    let mut ws = raw_ws(&url, Some(&basic("fleet", "fleet password"))).await.unwrap();
    let agents = [([0xa1; 16], "mux-1"), ([0xa2; 16], "mux-2"), ([0xa3; 16], "mux-3")];
    for (uid, device) in agents {
        send(&mut ws, &report(uid, 1, device)).await;
        let reply = recv(&mut ws).await;
        assert_eq!(reply.instance_uid, uid.to_vec());
        assert_eq!(reply.capabilities, SERVER_CAPABILITIES);
        fleet.owner_is(device, Some("s1")).await;
    }
    // A command to each reaches the right agent, and each answer completes its own.
    let mut ids = Vec::new();
    for (_, device) in agents {
        ids.push(fleet.send("s1", device, CommandKind::SetEmission { state: true }).await);
    }
    let mut answered = 0;
    let mut sequences = [1u64; 3];
    while answered < agents.len() {
        let message = recv(&mut ws).await;
        let Some(custom) = message.custom_message else { continue };
        let at = agents
            .iter()
            .position(|(uid, _)| uid.to_vec() == message.instance_uid)
            .expect("a known agent");
        let sent: serde_json::Value = serde_json::from_slice(&custom.data).unwrap();
        assert_eq!(
            sent["correlation_id"],
            ids[at].to_string(),
            "addressed to the agent it is for"
        );
        sequences[at] += 1;
        let mut answer = bare(agents[at].0, sequences[at]);
        answer.custom_message = Some(proto::CustomMessage {
            capability: EMISSION_CAPABILITY.into(),
            r#type: "set_emission_result".into(),
            data: serde_json::to_vec(
                &serde_json::json!({"correlation_id": sent["correlation_id"], "outcome": "acked"}),
            )
            .unwrap(),
        });
        send(&mut ws, &answer).await;
        answered += 1;
    }
    assert_eq!(fleet.outcomes(&ids).await, vec![CommandOutcome::Acked; 3]);
    // One agent leaves; the others stay.
    let mut bye = bare(agents[0].0, sequences[0] + 1);
    bye.agent_disconnect = Some(proto::AgentDisconnect {});
    send(&mut ws, &bye).await;
    fleet.owner_is("mux-1", None).await;
    fleet.owner_is("mux-2", Some("s1")).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_answers_retry_later() {
    // No supervisor: the test plays it, and keeps one registration pending.
    let transport = bind(|c| c.throttle(2, 1, Duration::from_secs(7))).await;
    let url = format!("ws://{}/v1/opamp", transport.local_addr());
    let http_url = format!("http://{}/v1/opamp", transport.local_addr());

    let mut pending = raw_ws(&url, Some(&bearer("p1"))).await.unwrap();
    send(&mut pending, &report([1; 16], 1, "p1")).await;
    let session = tokio::time::timeout(WAIT, transport.accept())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(session.hello.device, did("p1"));

    // Over WebSocket: ErrorResponse UNAVAILABLE with RetryInfo.
    let mut second = raw_ws(&url, Some(&bearer("p2"))).await.unwrap();
    send(&mut second, &report([2; 16], 1, "p2")).await;
    let reply = recv(&mut second).await;
    let error = reply.error_response.expect("an error response");
    assert_eq!(error.r#type(), ServerErrorResponseType::Unavailable);
    let Some(proto::server_error_response::Details::RetryInfo(retry)) = error.details else {
        panic!("no RetryInfo")
    };
    assert_eq!(retry.retry_after_nanoseconds, 7_000_000_000);
    // Our connector reports it as unavailable, which the agent runtime retries.
    let connector = ws_connector(&url, "p3");
    // (The limit of 2 connections is reached now: `pending` and `second`.)
    drop(second);
    let err = connector.connect(&hello("p3")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");

    // Over plain HTTP: 429 with Retry-After.
    let auth = basic("p4", key().token(&did("p4")).as_str());
    let refused = post(
        &http_url,
        &protobuf_headers(&auth),
        report([4; 16], 1, "p4").encode_to_vec(),
    )
    .await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.headers.get("retry-after").unwrap(), "7");

    // Too many connections: 503 with Retry-After before the upgrade. (The
    // server notices the closed ones in its own time: wait for a free slot.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let _third = loop {
        match raw_ws(&url, Some(&bearer("p5"))).await {
            Ok(ws) => break ws,
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(refused) => panic!("no slot freed: {refused:?}"),
        }
    };
    let (status, retry_after) = raw_ws(&url, Some(&bearer("p6"))).await.unwrap_err();
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("7"));

    // Once the supervisor registers the first, it gets its reply.
    session
        .outbound
        .try_send(ToDevice::Registered(Box::new(sid("s1"))))
        .unwrap();
    assert_eq!(recv(&mut pending).await.capabilities, SERVER_CAPABILITIES);
    transport.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_accept_queue_is_answered_503() {
    let transport = bind(|mut c| {
        c.accept_queue = 1;
        c.register_timeout = Duration::from_millis(200);
        c
    })
    .await;
    let http_url = format!("http://{}/v1/opamp", transport.local_addr());
    let url = format!("ws://{}/v1/opamp", transport.local_addr());
    // The first waits in the accept queue nobody drains; it times out unregistered.
    let mut waiting = raw_ws(&url, Some(&bearer("q1"))).await.unwrap();
    send(&mut waiting, &report([1; 16], 1, "q1")).await;
    let auth = basic("q2", key().token(&did("q2")).as_str());
    let refused = post(
        &http_url,
        &protobuf_headers(&auth),
        report([2; 16], 1, "q2").encode_to_vec(),
    )
    .await;
    assert_eq!(refused.status, 503);
    assert!(refused.headers.contains_key("retry-after"));
    // Whichever came second found the queue full; the other was never registered.
    let (kind, message) = error_of(&recv(&mut waiting).await);
    assert_eq!(kind, ServerErrorResponseType::Unavailable);
    assert!(
        message.contains("did not register it in time") || message.contains("not keeping up"),
        "{message}"
    );
    transport.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_ids_can_come_from_the_instance_uid() {
    let fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |c| c.device_id(DeviceIdSource::InstanceUidUuid)).await;
    let uid = [0x0f; 16];
    let device = "0f0f0f0f-0f0f-0f0f-0f0f-0f0f0f0f0f0f";
    // The uid is in the header, so a wrong bearer token is refused before the upgrade.
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", bearer("someone-else").parse().unwrap());
    request
        .headers_mut()
        .insert("opamp-instance-uid", device.parse().unwrap());
    let stream = TcpStream::connect(url.trim_start_matches("ws://").trim_end_matches("/v1/opamp"))
        .await
        .unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let mut ws = raw_ws(&url, Some(&bearer(device))).await.unwrap();
    send(&mut ws, &report(uid, 1, "ignored-instance-id")).await;
    assert!(recv(&mut ws).await.error_response.is_none());
    fleet.owner_is(device, Some("s1")).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_capabilities_over_opamp() {
    let mut fleet = Fleet::new().await;
    let (s1, url, http_url) = opamp_supervisor(&fleet, "s1", |c| c).await;
    let (agent, _stop) = spawn_agent(
        Arc::new(ws_connector(&url, "r1")),
        hello("r1"),
        Arc::new(MemoryApplier::new()),
    );
    fleet.owner_is("r1", Some("s1")).await;
    let id = fleet.send("s1", "r1", CommandKind::Restart).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    // It restarted its session and came back.
    eventually("r1 back", WAIT, || async {
        *agent.connected().borrow() && s1.is_connected(&did("r1"))
    })
    .await;

    // An agent that does not list the emission capability: the command is unsupported.
    let mut plain = hello("r2");
    plain.capabilities.emission = false;
    plain.capabilities.restart = false;
    let http = OpampConnectorConfig::new(&http_url)
        .http(Duration::from_millis(50))
        .token(key().token(&did("r2")));
    let (_agent, _stop2) = spawn_agent(
        Arc::new(OpampConnector::new(http).unwrap()),
        plain,
        Arc::new(MemoryApplier::new()),
    );
    fleet.owner_is("r2", Some("s1")).await;
    let id = fleet.send("s1", "r2", CommandKind::SetEmission { state: true }).await;
    assert!(matches!(fleet.outcome(id).await, CommandOutcome::Unsupported { .. }));
    let id = fleet.send("s1", "r2", CommandKind::Restart).await;
    assert!(matches!(fleet.outcome(id).await, CommandOutcome::Unsupported { .. }));
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_supervisor_serves_grpc_and_opamp_devices_at_once() {
    let mut fleet = Fleet::new().await;
    let grpc = Arc::new(
        GrpcTransport::bind(GrpcServerConfig::new(loopback(), DeviceAuth::FleetToken(key())))
            .await
            .unwrap(),
    );
    let opamp = bind(|c| c).await;
    let grpc_url = format!("http://{}", grpc.local_addr());
    let ws_url = format!("ws://{}/v1/opamp", opamp.local_addr());
    let http_url = format!("http://{}/v1/opamp", opamp.local_addr());
    let s1 = fleet
        .start(
            "s1",
            vec![grpc as Arc<dyn DeviceTransport>, opamp as Arc<dyn DeviceTransport>],
            |c| c,
        )
        .await;
    let grpc_connector =
        GrpcConnector::new(GrpcConnectorConfig::new(&grpc_url).token(key().token(&did("via-grpc")))).unwrap();
    let (grpc_agent, _a) = spawn_agent(
        Arc::new(grpc_connector),
        hello("via-grpc"),
        Arc::new(MemoryApplier::new()),
    );
    let (ws_agent, _b) = spawn_agent(
        Arc::new(ws_connector(&ws_url, "via-ws")),
        hello("via-ws"),
        Arc::new(MemoryApplier::new()),
    );
    let (http_agent, _c) = spawn_agent(
        HTTP.connector(&http_url, "via-http"),
        hello("via-http"),
        Arc::new(MemoryApplier::new()),
    );
    for (device, agent) in [
        ("via-grpc", &grpc_agent),
        ("via-ws", &ws_agent),
        ("via-http", &http_agent),
    ] {
        fleet.owner_is(device, Some("s1")).await;
        let id = fleet.send("s1", device, CommandKind::SetEmission { state: true }).await;
        assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked, "{device}");
        assert!(*agent.emission().borrow(), "{device}");
    }
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_pings_fragments_and_split_writes() {
    let mut fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |c| c.read_chunk(64)).await;
    let auth = bearer("framed");

    // A ping is answered with its payload.
    let mut ws = raw_ws(&url, Some(&auth)).await.unwrap();
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"are you there")));

    // A registration sent in three fragments, a ping between them, each
    // fragment far larger than one 64-byte read: read as one message.
    let mut first = report([7; 16], 1, "framed");
    first.capabilities |= proto::AgentCapabilities::AcceptsRestartCommand as u64;
    first.health = Some(proto::ComponentHealth {
        healthy: true,
        last_error: "y".repeat(500),
        ..Default::default()
    });
    let mut bytes = vec![0];
    first.encode(&mut bytes).unwrap();
    let third = bytes.len() / 3;
    let pieces = [&bytes[..third], &bytes[third..2 * third], &bytes[2 * third..]];
    let binary = OpCode::Data(Data::Binary);
    let continuation = OpCode::Data(Data::Continue);
    send_fragment(&mut ws, pieces[0], binary, false).await;
    ws.send(Message::Ping(Bytes::from_static(b"between"))).await.unwrap();
    send_fragment(&mut ws, pieces[1], continuation, false).await;
    send_fragment(&mut ws, pieces[2], continuation, true).await;
    let reply = recv(&mut ws).await;
    assert_eq!(reply.capabilities, SERVER_CAPABILITIES, "registered");
    fleet.owner_is("framed", Some("s1")).await;

    // A report written a byte at a time, as a slow link delivers it.
    let mut second = report([7; 16], 2, "framed");
    second.agent_description = None;
    second.capabilities = first.capabilities;
    let mut payload = vec![0];
    second.encode(&mut payload).unwrap();
    let mut frame = vec![0x82, 0x80 | payload.len() as u8, 1, 2, 3, 4];
    frame.extend(payload.iter().enumerate().map(|(at, byte)| byte ^ [1, 2, 3, 4][at % 4]));
    for byte in frame {
        ws.get_mut().write_all(&[byte]).await.unwrap();
        ws.get_mut().flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let reply = recv(&mut ws).await;
    assert_eq!(
        reply.flags & ServerToAgentFlags::ReportFullState as u64,
        0,
        "no gap: it read as sent"
    );

    // A command reaches it over the same connection; closing with 1000 is echoed.
    let id = fleet.send("s1", "framed", CommandKind::Restart).await;
    assert!(recv(&mut ws).await.command.is_some(), "the restart command");
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    ws.close(None).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(echoed, Some(Ok(Message::Close(_))) | None), "{echoed:?}");
    fleet.owner_is("framed", None).await;
    s1.shutdown().await;
}

/// One frame of a fragmented message.
async fn send_fragment(ws: &mut Raw, payload: &[u8], opcode: OpCode, fin: bool) {
    let frame = Frame::message(Bytes::copy_from_slice(payload), opcode, fin);
    ws.send(Message::Frame(frame)).await.unwrap();
}

/// Raw HTTP/1.1 bytes to the server, and what it answers within `within`.
async fn raw_http(addr: std::net::SocketAddr, bytes: &[u8], within: Duration) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(within, stream.read(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_are_cut_off_at_the_message_deadline() {
    const TIMEOUT: Duration = Duration::from_millis(600);
    let fleet = Fleet::new().await;
    let transport = bind(|c| c.message_timeout(TIMEOUT).max_message_size(1 << 20)).await;
    let addr = transport.local_addr();
    let url = format!("ws://{addr}/v1/opamp");
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    // An agent that keeps talking is never cut off, however long it lives.
    let mut good = raw_ws(&url, Some(&bearer("good"))).await.unwrap();
    send(&mut good, &report([7; 16], 1, "good")).await;
    assert_eq!(recv(&mut good).await.error_response, None);

    // A WebSocket that never sends its first message, with a token that
    // nothing can check before that message: closed at the deadline.
    let started = std::time::Instant::now();
    let mut silent = raw_ws(&url, Some(UNCHECKED)).await.unwrap();
    assert_eq!(close_code(&mut silent).await, CloseCode::Policy);
    assert!(started.elapsed() >= TIMEOUT, "closed after {:?}", started.elapsed());

    // One that begins a message and stalls, holding its buffer: the same.
    let mut stalled = raw_ws(&url, Some(UNCHECKED)).await.unwrap();
    send_fragment(&mut stalled, &[0; 512], OpCode::Data(Data::Binary), false).await;
    assert_eq!(close_code(&mut stalled).await, CloseCode::Policy);

    // Over HTTP: a declared body over the limit is refused before it is sent…
    let head = |length: usize| {
        format!(
            "POST /v1/opamp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n\
             Content-Type: application/x-protobuf\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let started = std::time::Instant::now();
    let answer = raw_http(addr, head(2 << 20).as_bytes(), WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(started.elapsed() < TIMEOUT, "refused after {:?}", started.elapsed());
    // …and one that stalls halfway is answered 408 at the deadline.
    let started = std::time::Instant::now();
    let answer = raw_http(addr, format!("{}{}", head(100), "x".repeat(10)).as_bytes(), WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive whole within 600ms"), "{answer}");
    assert!(started.elapsed() >= TIMEOUT, "answered after {:?}", started.elapsed());

    // The good agent, idle past the deadline all along, is still served.
    send(&mut good, &report([7; 16], 2, "good")).await;
    assert_eq!(recv(&mut good).await.error_response, None);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_describing_itself_past_the_limits_is_refused_naming_the_field() {
    let fleet = Fleet::new().await;
    let transport = bind(|c| c).await;
    let url = format!("ws://{}/v1/opamp", transport.local_addr());
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    let mut ws = raw_ws(&url, Some(&bearer("bloated"))).await.unwrap();
    let mut bloated = report([9; 16], 1, "bloated");
    let description = bloated.agent_description.as_mut().unwrap();
    description
        .non_identifying_attributes
        .push(text("site", &"x".repeat(2000)));
    send(&mut ws, &bloated).await;
    let (kind, message) = error_of(&recv(&mut ws).await);
    assert_eq!(kind, ServerErrorResponseType::BadRequest);
    assert!(
        message.contains("label \"site\": its value is 2000 bytes; the limit is 1024"),
        "{message}"
    );
    fleet.owner_is("bloated", None).await;

    // Within the limits, the same agent registers.
    let mut ws = raw_ws(&url, Some(&bearer("bloated"))).await.unwrap();
    send(&mut ws, &report([9; 16], 1, "bloated")).await;
    assert_eq!(recv(&mut ws).await.error_response, None);
    fleet.owner_is("bloated", Some("s1")).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchecked_bearer_token_buys_only_a_small_first_message() {
    const UNVERIFIED: usize = 64 * 1024;
    let fleet = Fleet::new().await;
    let transport = bind(|c| c.max_unverified_message_size(UNVERIFIED)).await;
    let ws_url = format!("ws://{}/v1/opamp", transport.local_addr());
    let http_url = format!("http://{}/v1/opamp", transport.local_addr());
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    let big = |uid: [u8; 16], sequence: u64, device: &str| {
        let mut big = report(uid, sequence, device);
        big.health = Some(proto::ComponentHealth {
            last_error: "x".repeat(2 * UNVERIFIED),
            ..Default::default()
        });
        big
    };

    // Over a WebSocket, before the token is checked: closed as too big…
    let mut ws = raw_ws(&ws_url, Some(UNCHECKED)).await.unwrap();
    let _ = ws.send(framed(&big([5; 16], 1, "w1"))).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);
    // …and once its first message proved the token, large messages pass.
    let mut ws = raw_ws(&ws_url, Some(&bearer("w1"))).await.unwrap();
    send(&mut ws, &report([5; 16], 1, "w1")).await;
    assert_eq!(recv(&mut ws).await.error_response, None);
    send(&mut ws, &big([5; 16], 2, "w1")).await;
    assert_eq!(recv(&mut ws).await.error_response, None);

    // Over plain HTTP a v1 bearer token is never checked before the body:
    // 413, saying how to be allowed more; a v2 token and Basic
    // device:token are checked first.
    let body = big([6; 16], 1, "h1").encode_to_vec();
    let v1 = format!("Bearer {}", key().token_v1(&did("h1")).as_str());
    let refused = post(&http_url, &protobuf_headers(&v1), body.clone()).await;
    assert_eq!(refused.status, 413);
    let text = String::from_utf8_lossy(&refused.body);
    assert!(text.contains("v1 bearer token is not yet checked"), "{text}");
    let accepted = post(&http_url, &protobuf_headers(&bearer("h1")), body.clone()).await;
    assert_eq!(accepted.status, 200, "{:?}", accepted.body);
    let token = key().token(&did("h1"));
    let accepted = post(&http_url, &protobuf_headers(&basic("h1", token.as_str())), body).await;
    assert_eq!(accepted.status, 200, "{:?}", accepted.body);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_name_the_device_over_tls() {
    let fleet = Fleet::new().await;
    let (pki, (cert, cert_key)) = common::shared_pki();
    let tls = ServerTls::new(cert.clone(), cert_key.clone()).client_ca(pki.ca_pem.clone());
    let transport = Arc::new(
        OpampTransport::bind(OpampServerConfig::new(loopback(), OpampAuth::ClientCertificate).tls(tls))
            .await
            .unwrap(),
    );
    let port = transport.local_addr().port();
    let s1 = fleet
        .start("s1", vec![transport as Arc<dyn DeviceTransport>], |c| c)
        .await;
    let (device_cert, device_key) = pki.issue("m1");
    let with_certificate = || ClientTls::new(pki.ca_pem.clone()).identity(device_cert.clone(), device_key.clone());

    // The certificate's Common Name is the device, over wss:// and https://.
    let wss = format!("wss://localhost:{port}/v1/opamp");
    let config = OpampConnectorConfig::new(&wss).tls(with_certificate());
    let session = OpampConnector::new(config)
        .unwrap()
        .connect(&hello("m1"))
        .await
        .unwrap();
    fleet.owner_is("m1", Some("s1")).await;
    drop(session);
    let https = format!("https://localhost:{port}/v1/opamp");
    let config = OpampConnectorConfig::new(&https)
        .http(Duration::from_millis(50))
        .tls(with_certificate());
    let _polling = OpampConnector::new(config)
        .unwrap()
        .connect(&hello("m1"))
        .await
        .unwrap();

    // It proves that device and no other…
    let config = OpampConnectorConfig::new(&wss).tls(with_certificate());
    let err = OpampConnector::new(config)
        .unwrap()
        .connect(&hello("m2"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the credential is for device m1, but the agent reports device m2"),
        "{err}"
    );
    // …and without one the handshake fails.
    let config = OpampConnectorConfig::new(&wss).tls(ClientTls::new(pki.ca_pem.clone()));
    let err = OpampConnector::new(config)
        .unwrap()
        .connect(&hello("m3"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    fleet.owner_is("m3", None).await;

    // Client certificates without TLS to check them are refused up front.
    let err = OpampTransport::bind(OpampServerConfig::new(loopback(), OpampAuth::ClientCertificate))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs TLS with a client CA"), "{err}");
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_certificate_serves_the_connections_that_follow() {
    let fleet = Fleet::new().await;
    let (transport, url) = bind_with(true, "ws").await;
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    // A client trusting another CA is refused the first certificate…
    let renewed = common::Pki::new();
    let (cert, cert_key) = renewed.issue("supervisor");
    let trusting_renewed = |device: &str| {
        let config = OpampConnectorConfig::new(&url)
            .token(key().token(&did(device)))
            .tls(ClientTls::new(renewed.ca_pem.clone()));
        OpampConnector::new(config).unwrap()
    };
    let err = trusting_renewed("r1").connect(&hello("r1")).await.unwrap_err();
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    // …and served once the listener is given the renewed one, without a restart.
    let open = Ws { tls: true }.connector(&url, "r0").connect(&hello("r0")).await;
    assert!(open.is_ok(), "the old CA's client connects before the reload");
    transport.reload_tls(&ServerTls::new(cert, cert_key)).unwrap();
    let _session = trusting_renewed("r1").connect(&hello("r1")).await.unwrap();
    fleet.owner_is("r1", Some("s1")).await;
    fleet.owner_is("r0", Some("s1")).await;

    // Material that does not load leaves the certificate served as it was.
    let err = transport
        .reload_tls(&ServerTls::new("not a certificate", "nor a key"))
        .unwrap_err();
    assert!(err.to_string().contains("certificate chain"), "{err}");
    let _again = trusting_renewed("r2").connect(&hello("r2")).await.unwrap();
    // A plain listener cannot take TLS while it serves.
    let (plain, _) = bind_with(false, "ws").await;
    assert!(plain.reload_tls(&server_tls()).is_err());
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refused_and_a_rotated_key_still_accepts_the_old_ones() {
    use std::time::SystemTime;
    let fleet = Fleet::new().await;
    let new_key = FleetKey::new([42u8; 32]).unwrap();
    let rotating = new_key.clone().accepting(key());
    let (s1, url, http_url) = opamp_supervisor(&fleet, "s1", |mut c| {
        c.auth = OpampAuth::FleetToken(rotating);
        c
    })
    .await;
    let now = SystemTime::now();

    // Expired: 401 before the upgrade or the body, saying so.
    let expired = new_key.token_expiring(&did("e1"), now - Duration::from_secs(60));
    let (status, _) = raw_ws(&url, Some(&format!("Bearer {}", expired.as_str())))
        .await
        .unwrap_err();
    assert_eq!(status, 401);
    let posted = post(
        &http_url,
        &protobuf_headers(&basic("e1", expired.as_str())),
        report([1; 16], 1, "e1").encode_to_vec(),
    )
    .await;
    assert_eq!(posted.status, 401);
    assert!(String::from_utf8_lossy(&posted.body).contains("expired 60 s ago"));

    // Not yet expired, and under the old key during a rotation: registered.
    let fresh = new_key.token_expiring(&did("e2"), now + Duration::from_secs(600));
    let mut ws = raw_ws(&url, Some(&format!("Bearer {}", fresh.as_str()))).await.unwrap();
    send(&mut ws, &report([2; 16], 1, "e2")).await;
    assert_eq!(recv(&mut ws).await.error_response, None);
    let mut old = raw_ws(&url, Some(&bearer("e3"))).await.unwrap();
    send(&mut old, &report([3; 16], 1, "e3")).await;
    assert_eq!(recv(&mut old).await.error_response, None);
    fleet.owner_is("e2", Some("s1")).await;
    fleet.owner_is("e3", Some("s1")).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reporting_too_often_is_told_to_wait() {
    use opamp_core::transport::DeviceLimits;
    let fleet = Fleet::new().await;
    // One report a second on average, two at once.
    let limits = DeviceLimits::default().report_rate(60, 2);
    let (s1, url, http_url) = opamp_supervisor(&fleet, "s1", |c| c.device_limits(limits)).await;

    // Over a WebSocket: the allowance is spent, then UNAVAILABLE with RetryInfo…
    let mut ws = raw_ws(&url, Some(&bearer("chatty"))).await.unwrap();
    send(&mut ws, &report([7; 16], 1, "chatty")).await;
    assert_eq!(recv(&mut ws).await.error_response, None);
    for sequence in 2..=3 {
        send(&mut ws, &bare([7; 16], sequence)).await;
        assert_eq!(recv(&mut ws).await.error_response, None);
    }
    send(&mut ws, &bare([7; 16], 4)).await;
    let throttled = recv(&mut ws).await;
    let (kind, message) = error_of(&throttled);
    assert_eq!(kind, ServerErrorResponseType::Unavailable);
    assert!(
        message.contains("more than 60 reports a minute (bursts of 2)"),
        "{message}"
    );
    match throttled.error_response.unwrap().details {
        Some(proto::server_error_response::Details::RetryInfo(info)) => {
            assert!(info.retry_after_nanoseconds > 0 && info.retry_after_nanoseconds <= 1_000_000_000)
        }
        other => panic!("expected RetryInfo, got {other:?}"),
    }
    // …the session stays, and once the allowance is back the report it
    // missed shows as a gap: the agent is asked for its full state.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(&mut ws, &bare([7; 16], 5)).await;
    let after = recv(&mut ws).await;
    assert_eq!(after.error_response, None);
    assert_ne!(after.flags & ServerToAgentFlags::ReportFullState as u64, 0);
    fleet.owner_is("chatty", Some("s1")).await;

    // Over plain HTTP: 429 with Retry-After.
    let headers = protobuf_headers(&bearer("polling"));
    let first = post(&http_url, &headers, report([8; 16], 1, "polling").encode_to_vec()).await;
    assert_eq!(first.status, 200);
    let mut statuses = Vec::new();
    for sequence in 2..=4 {
        statuses.push(
            post(&http_url, &headers, bare([8; 16], sequence).encode_to_vec())
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 429]);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_has_at_most_its_share_of_connections() {
    use tokio::io::AsyncReadExt as _;
    let fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |c| c.max_connections_per_address(2)).await;
    let mut first = raw_ws(&url, Some(&bearer("a1"))).await.unwrap();
    send(&mut first, &report([1; 16], 1, "a1")).await;
    assert_eq!(recv(&mut first).await.error_response, None);
    let _second = raw_ws(&url, Some(&bearer("a2"))).await.unwrap();
    // A third connection from the same address is closed as it comes…
    let address = url.trim_start_matches("ws://").trim_end_matches("/v1/opamp");
    let mut third = TcpStream::connect(address).await.unwrap();
    let mut byte = [0; 1];
    let read = tokio::time::timeout(WAIT, third.read(&mut byte))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // …and a WebSocket that closes gives its place back.
    drop(first);
    fleet.owner_is("a1", None).await;
    let mut again = raw_ws(&url, Some(&bearer("a3"))).await.unwrap();
    send(&mut again, &report([3; 16], 1, "a3")).await;
    assert_eq!(recv(&mut again).await.error_response, None);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_refused_naming_its_revocation_over_websocket() {
    common::a_revoked_device_is_refused_naming_its_revocation(&WS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_refused_naming_its_revocation_over_http_polling() {
    common::a_revoked_device_is_refused_naming_its_revocation(&HTTP).await;
}

/// Connections that have not had a request answered with success are
/// capped: past the cap, new ones are closed as they come; agents whose
/// upgrade succeeded do not count; a silent connection that goes gives its
/// place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_connections_past_their_cap_are_closed_at_once() {
    use tokio::io::AsyncReadExt as _;
    let fleet = Fleet::new().await;
    let (s1, url, _) = opamp_supervisor(&fleet, "s1", |c| c.max_unverified_connections(3)).await;
    let address = url.trim_start_matches("ws://").trim_end_matches("/v1/opamp").to_owned();
    let mut agents = Vec::new();
    for n in 0..4 {
        let device = format!("u{n}");
        let mut ws = raw_ws(&url, Some(&bearer(&device))).await.unwrap();
        send(&mut ws, &report([n as u8 + 1; 16], 1, &device)).await;
        assert_eq!(recv(&mut ws).await.error_response, None);
        agents.push(ws);
    }
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(address.as_str()).await.unwrap());
    }
    // Give the server time to accept them all before the one past the cap.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut past = TcpStream::connect(address.as_str()).await.unwrap();
    let mut byte = [0; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), past.read(&mut byte))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    drop(silent.pop());
    let mut back = None;
    for _ in 0..50 {
        // Until the server has seen the silent one go, this one is closed as it comes.
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", bearer("u9").parse().unwrap());
        let stream = TcpStream::connect(address.as_str()).await.unwrap();
        if let Ok((ws, _)) = tokio_tungstenite::client_async(request, stream).await {
            back = Some(ws);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut back = back.expect("a place given back by the silent connection that went");
    send(&mut back, &report([9; 16], 1, "u9")).await;
    assert_eq!(recv(&mut back).await.error_response, None);
    s1.shutdown().await;
}

/// A gzip body is decompressed as it arrives: a bomb is answered 413 as
/// soon as its output passes the limit, while its sender is still sending,
/// not once the whole compressed body has come (or the message deadline has
/// passed), and the compressed body is never held whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_refused_as_soon_as_it_inflates_past_the_limit() {
    let fleet = Fleet::new().await;
    let transport = bind(|c| c.max_message_size(64 << 10)).await;
    let addr = transport.local_addr();
    let s1 = fleet
        .start("s1", vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
        .await;
    // 4 MiB of zeros, a few KiB compressed: its first half, then a stall.
    let bomb = gzip(&vec![0; 4 << 20]);
    let begun = &bomb[..bomb.len() / 2];
    let mut request = format!(
        "POST /v1/opamp HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/x-protobuf\r\n\
         Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        bearer("bomb"),
        begun.len()
    )
    .into_bytes();
    request.extend_from_slice(begun);
    request.extend_from_slice(b"\r\n");
    let started = std::time::Instant::now();
    let answer = raw_http(addr, &request, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        started.elapsed() < opamp_transport::websocket::DEFAULT_MESSAGE_TIMEOUT / 2,
        "refused after {:?}",
        started.elapsed()
    );
    s1.shutdown().await;
}
