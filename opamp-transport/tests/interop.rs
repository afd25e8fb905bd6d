//! OpAMP clients this project did not write, against the supervisor serving
//! OpAMP on loopback: they register (device online, with the derived id), take
//! a pushed config and acknowledge it (recorded in the store), keep their
//! lease with heartbeats, and go offline when they leave; they also send their
//! full state to a restarted server, read the delay when throttled, and take a
//! new `instance_uid` when theirs collides.
//!
//! | client | from | transport |
//! |---|---|---|
//! | OpenTelemetry's Python OpAMP client | PyPI `opentelemetry-opamp-client` | plain HTTP (its only one) |
//! | Elastic's Node.js OpAMP client | npm `@elastic/opamp-client-node` | plain HTTP (its only one) |
//! | the Python client's messages, framed over the `websockets` library | PyPI `opentelemetry-opamp-client`, `websockets` | WebSocket |
//!
//! Neither published client speaks WebSocket; the third row sends the Python
//! client package's own protobuf messages (built and decoded by its code) over
//! a WebSocket library this project did not write either, with the spec's
//! varint header added by `scripts/interop/python_ws_agent.py`.
//!
//! The clients are installed by `scripts/services/opamp-clients start DIR`
//! (`scripts/test` does it) under `$OPAMP_CACHE/opamp-clients`, or wherever
//! `OPAMP_TEST_OPAMP_CLIENTS` points. Without them the tests fail under CI
//! (`CI` set) and skip, loudly, elsewhere.
#![cfg(feature = "websocket")]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use opamp_core::transport::DeviceTransport;
use opamp_core::{
    AgentType, Bus, Command as FleetCommand, CommandBus, CommandKind, CommandOutcome, ConfigBundle, ConfigFile,
    ConfigRef, ConfigStore, ConfigTemplate, ConfigVersion, CorrelationId, DeviceEvent, DeviceId, EventBus, EventKind,
    GroupName, Presence, RoutingStore, StatusStore, Store, Subscription, SupervisorId, Timestamp,
};
use opamp_store::memory::MemoryStore;
use opamp_transport::auth::FleetKey;
use opamp_transport::websocket::{DeviceIdSource, OpampAuth, OpampServerConfig, OpampTransport, proto};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// How long any one thing may take.
const WAIT: Duration = Duration::from_secs(20);
/// How often the clients send a heartbeat (poll, over HTTP), in seconds.
const HEARTBEAT_SECS: f64 = 0.25;
/// A plain HTTP agent silent this long is gone: a few missed heartbeats.
const HTTP_SESSION_TIMEOUT: Duration = Duration::from_millis(1500);
/// Short leases, so that "the lease is kept" means it was renewed, several times.
const LEASE_TTL: Duration = Duration::from_secs(2);

fn key() -> FleetKey {
    FleetKey::new(b"interop-test fleet secret").unwrap()
}

fn did(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn sid(id: &str) -> SupervisorId {
    SupervisorId::new(id).unwrap()
}

/// Where `scripts/services/opamp-clients` installed the clients, if it did.
fn installed_clients() -> Option<PathBuf> {
    let root = std::env::var_os("OPAMP_TEST_OPAMP_CLIENTS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("OPAMP_CACHE").map(|cache| PathBuf::from(cache).join("opamp-clients")))
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/opamp/opamp-clients")))?;
    let python = root.join("venv/bin/python");
    let node = root.join("node/node_modules/@elastic/opamp-client-node/package.json");
    if python.exists() && node.exists() {
        return Some(root);
    }
    let why = format!(
        "the external OpAMP clients are not installed under {} (run `scripts/services/opamp-clients start /tmp/opamp-clients`, \
         or point OPAMP_TEST_OPAMP_CLIENTS at an installation)",
        root.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("\n!!! SKIPPED: {why}\n");
    None
}

/// The driver scripts, in the repository.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/interop")
        .join(name)
}

/// An external client this project did not write, and the transport it uses.
#[derive(Debug, Clone, Copy)]
enum Client {
    /// OpenTelemetry's Python client (PyPI `opentelemetry-opamp-client`), plain HTTP.
    PythonHttp,
    /// Elastic's Node.js client (npm `@elastic/opamp-client-node`), plain HTTP.
    NodeHttp,
    /// The Python client's messages over the `websockets` library.
    PythonWebSocket,
}

impl Client {
    /// The `service.name` it reports, which becomes the device's agent type.
    fn agent_type(self) -> &'static str {
        match self {
            Client::PythonHttp => "interop-python",
            Client::NodeHttp => "interop-node",
            Client::PythonWebSocket => "interop-python-ws",
        }
    }

    /// How the server derives device ids for it: the Node.js client sets no
    /// `service.instance.id`, so its `instance_uid` names it.
    fn device_ids(self) -> DeviceIdSource {
        match self {
            Client::PythonHttp | Client::PythonWebSocket => DeviceIdSource::ServiceInstanceId,
            Client::NodeHttp => DeviceIdSource::InstanceUidUuid,
        }
    }

    /// The line it prints for each heartbeat (each poll over HTTP) the server answered.
    fn heartbeat_event(self) -> &'static str {
        match self {
            Client::PythonHttp => "connected",
            Client::NodeHttp => "sent",
            Client::PythonWebSocket => "beat",
        }
    }

    /// Whether it tells the server it leaves (`agent_disconnect`, or closing its socket).
    fn says_goodbye(self) -> bool {
        !matches!(self, Client::NodeHttp)
    }

    /// The command that runs it against `addr` as `device`, with its fleet
    /// token (as bearer over HTTP, Basic over WebSocket).
    fn command(self, clients: &Path, addr: std::net::SocketAddr, device: &str) -> Command {
        let token = key().token(&did(device));
        let authorization = match self {
            Client::PythonHttp | Client::NodeHttp => format!("Bearer {}", token.as_str()),
            Client::PythonWebSocket => basic(device, token.as_str()),
        };
        self.command_with(clients, addr, device, &authorization)
    }

    /// The command that runs it against `addr` as `device` (its
    /// `service.instance.id`, or for the Node.js client its `instance_uid`),
    /// sending `authorization`.
    fn command_with(self, clients: &Path, addr: std::net::SocketAddr, device: &str, authorization: &str) -> Command {
        let (mut command, script_name, scheme, id_flag) = match self {
            Client::PythonHttp => (
                Command::new(clients.join("venv/bin/python")),
                "python_http_agent.py",
                "http",
                "--instance-id",
            ),
            Client::NodeHttp => {
                let mut command = Command::new("node");
                command.env("NODE_PATH", clients.join("node/node_modules"));
                (command, "node_http_agent.js", "http", "--instance-uid")
            }
            Client::PythonWebSocket => (
                Command::new(clients.join("venv/bin/python")),
                "python_ws_agent.py",
                "ws",
                "--instance-id",
            ),
        };
        command.arg(script(script_name)).args([
            "--endpoint",
            &format!("{scheme}://{addr}/v1/opamp"),
            id_flag,
            device,
            "--header",
            &format!("Authorization: {authorization}"),
            "--service-name",
            self.agent_type(),
            "--heartbeat",
            &HEARTBEAT_SECS.to_string(),
        ]);
        command.env("PYTHONUNBUFFERED", "1");
        command
    }
}

/// An HTTP Basic `Authorization` value.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A running client process and every line it printed: its JSON events, and
/// any other line as `{"stdout": ..}` or `{"stderr": ..}` (shown when a step fails).
struct Driver {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Driver {
    fn spawn(name: &str, mut command: Command) -> Driver {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start the {name} client: {err}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let parsed = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "stdout": line }));
                sink.lock().unwrap().push(parsed);
            }
        });
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(json!({ "stderr": line }));
            }
        });
        Driver {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// Everything it printed so far.
    fn dump(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn events(&self, event: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line["event"] == event)
            .cloned()
            .collect()
    }

    /// Waits for the `nth` (from 1) `event` line the client prints.
    async fn nth(&self, event: &str, nth: usize) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(found) = self.events(event).get(nth - 1) {
                return found.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "the {} client printed no {event:?} #{nth} within {WAIT:?}; it printed:\n{:#?}",
                    self.name,
                    self.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes its stdin: the driver stops its client the client's own way.
    fn stop(&mut self) {
        self.stdin = None;
    }

    async fn exited(&mut self) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the client exits in time")
            .unwrap();
        assert!(
            status.success(),
            "the {} client failed ({status}); it printed:\n{:#?}",
            self.name,
            self.dump()
        );
    }
}

/// A supervisor serving OpAMP on loopback, on an in-memory store and bus.
struct Fleet {
    store: Arc<MemoryStore>,
    bus: Arc<MemoryBus>,
    events: Subscription<DeviceEvent>,
    supervisor: RunningSupervisor,
    transport: Arc<OpampTransport>,
    addr: std::net::SocketAddr,
}

/// The server's settings for these tests: fleet tokens, short HTTP sessions.
fn server_config(addr: std::net::SocketAddr, device_ids: DeviceIdSource) -> OpampServerConfig {
    OpampServerConfig::new(addr, OpampAuth::FleetToken(key()))
        .device_id(device_ids)
        .http_session_timeout(HTTP_SESSION_TIMEOUT)
}

impl Fleet {
    async fn start(device_ids: DeviceIdSource) -> Fleet {
        let store = Arc::new(MemoryStore::new());
        let bus = Arc::new(MemoryBus::new());
        let events = bus.subscribe_events(&GroupName::new("interop").unwrap()).await.unwrap();
        let config = server_config("127.0.0.1:0".parse().unwrap(), device_ids);
        let (supervisor, transport) = serve("s1", config, &store, &bus).await;
        Fleet {
            addr: transport.local_addr(),
            store,
            bus,
            events,
            supervisor,
            transport,
        }
    }

    /// Stops the supervisor and its transport, and starts `id` on the same
    /// address and store: a server restart, as its agents see it.
    async fn restart_as(&mut self, id: &str, device_ids: DeviceIdSource) {
        self.transport.shutdown(Duration::from_secs(1)).await;
        let (supervisor, transport) = serve(id, server_config(self.addr, device_ids), &self.store, &self.bus).await;
        std::mem::replace(&mut self.supervisor, supervisor).shutdown().await;
        self.transport = transport;
    }

    async fn until_status(&self, what: &str, device: &DeviceId, check: impl Fn(&opamp_core::DeviceStatus) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self.store.status(device).await.unwrap();
            if status.as_ref().is_some_and(&check) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{device}: {what} not true within {WAIT:?}; its status: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stores a template for `agent_type` and pushes it to `device`; its outcome.
    async fn push(
        &mut self,
        device: &DeviceId,
        agent_type: &str,
        version: &str,
        bundle: ConfigBundle,
    ) -> CommandOutcome {
        let config = ConfigRef::new(
            AgentType::new(agent_type).unwrap(),
            ConfigVersion::new(version).unwrap(),
        );
        let template = ConfigTemplate::new(config, bundle, "interop", Timestamp::now());
        self.store.put_template(&template).await.unwrap();
        let kind = CommandKind::ApplyConfig {
            agent_type: config.agent_type,
            version: config.version,
        };
        let command = FleetCommand::new(*device, kind, Timestamp::now(), WAIT);
        self.bus.send(&sid("s1"), &command).await.unwrap();
        self.outcome(command.correlation_id).await
    }

    async fn outcome(&mut self, id: CorrelationId) -> CommandOutcome {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let delivery = self.events.next().await.unwrap().expect("event stream open");
                let found = match &delivery.message().kind {
                    EventKind::CommandCompleted {
                        correlation_id,
                        outcome,
                    } if *correlation_id == id => Some(outcome.clone()),
                    _ => None,
                };
                delivery.ack().await.unwrap();
                if let Some(found) = found {
                    return found;
                }
            }
        })
        .await;
        found.expect("the command's outcome within the deadline")
    }
}

async fn serve(
    id: &str,
    config: OpampServerConfig,
    store: &Arc<MemoryStore>,
    bus: &Arc<MemoryBus>,
) -> (RunningSupervisor, Arc<OpampTransport>) {
    let transport = Arc::new(OpampTransport::bind(config).await.unwrap());
    let (store, bus): (Arc<dyn Store>, Arc<dyn Bus>) = (store.clone(), bus.clone());
    let supervisor = Supervisor::new(SupervisorConfig::new(sid(id)).lease_ttl(LEASE_TTL), store, bus)
        .start(vec![transport.clone() as Arc<dyn DeviceTransport>])
        .await
        .unwrap();
    (supervisor, transport)
}

fn json_bundle(name: &str, body: &str) -> ConfigBundle {
    ConfigBundle::new()
        .with_file(name, ConfigFile::new("application/json", body))
        .unwrap()
}

/// The whole life of one external agent: register, config, heartbeats, leave.
async fn lifecycle(client: Client, device: &str) {
    let Some(clients) = installed_clients() else { return };
    let mut fleet = Fleet::start(client.device_ids()).await;
    let device_id = did(device);
    let mut agent = Driver::spawn(&format!("{client:?}"), client.command(&clients, fleet.addr, device));

    // Registered under the derived id, online, with its service.name as agent type.
    fleet
        .until_status("online at s1", &device_id, |s| {
            s.status == Presence::Online && s.supervisor == Some(sid("s1"))
        })
        .await;
    assert_eq!(fleet.store.lookup(&device_id).await.unwrap(), Some(sid("s1")));
    let status = fleet.store.status(&device_id).await.unwrap().unwrap();
    assert_eq!(
        status.agent_type.map(|t| t.to_string()).as_deref(),
        Some(client.agent_type())
    );
    assert!(fleet.supervisor.is_connected(&device_id));

    // A config pushed from our side reaches it, and its RemoteConfigStatus comes back as the ack.
    let bundle = json_bundle("app.json", r#"{"sampling": 0.25, "exporters": ["otlp"]}"#);
    let outcome = fleet.push(&device_id, client.agent_type(), "v1", bundle.clone()).await;
    assert_eq!(outcome, CommandOutcome::Acked, "{:#?}", agent.dump());
    let applied = agent.nth("config", 1).await;
    assert_eq!(
        applied["hash"],
        bundle.hash().to_string(),
        "the config_hash is the bundle's hash"
    );
    assert_eq!(
        applied["files"],
        json!({"app.json": {"sampling": 0.25, "exporters": ["otlp"]}})
    );
    let status = fleet.store.status(&device_id).await.unwrap().unwrap();
    assert_eq!(status.config_version, Some(ConfigVersion::new("v1").unwrap()));
    assert_eq!(status.config_hash, Some(bundle.hash()));

    // One it cannot parse comes back FAILED, with its reason; the applied one stays.
    let broken = json_bundle("app.json", "{ not json");
    match fleet.push(&device_id, client.agent_type(), "v2", broken.clone()).await {
        CommandOutcome::Failed { reason } => assert!(reason.contains("app.json"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(agent.nth("refused", 1).await["hash"], broken.hash().to_string());
    let status = fleet.store.status(&device_id).await.unwrap().unwrap();
    assert_eq!(status.config_version, Some(ConfigVersion::new("v1").unwrap()));
    assert!(status.last_error.is_some_and(|e| e.contains("app.json")));

    // Heartbeats keep the session and the lease: well past the HTTP session
    // timeout and the lease's TTL (counted in the client's own heartbeats),
    // it is still connected, still owned, and was seen again.
    let seen = status.last_seen.expect("seen");
    let beats = agent.events(client.heartbeat_event()).len();
    let needed = ((2 * LEASE_TTL.max(HTTP_SESSION_TIMEOUT)).as_secs_f64() / HEARTBEAT_SECS).ceil() as usize;
    agent.nth(client.heartbeat_event(), beats + needed).await;
    assert!(
        fleet.supervisor.is_connected(&device_id),
        "still connected after {needed} heartbeats"
    );
    assert_eq!(
        fleet.store.lookup(&device_id).await.unwrap(),
        Some(sid("s1")),
        "lease renewed"
    );
    let status = fleet.store.status(&device_id).await.unwrap().unwrap();
    assert_eq!(status.status, Presence::Online);
    assert!(
        status.last_seen.is_some_and(|last| last > seen),
        "heartbeats are recorded"
    );

    // It leaves: offline, and the lease is let go. A client that says goodbye
    // is gone at once; one that just stops polling, after the session timeout.
    agent.stop();
    agent.exited().await;
    if client.says_goodbye() {
        assert!(agent.events("stopped").len() + agent.events("closed").len() > 0);
    }
    fleet
        .until_status("offline", &device_id, |s| s.status == Presence::Offline)
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet.store.lookup(&device_id).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the lease is released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!fleet.supervisor.is_connected(&device_id));
    fleet.supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_python_client_over_http() {
    lifecycle(Client::PythonHttp, "py-http-agent-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elastic_node_client_over_http() {
    // Its device id is its instance_uid, as UUID text.
    lifecycle(Client::NodeHttp, "0190a6f1-7c4e-7b1a-8e2d-5f3c9a1b2c3d").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_messages_over_websocket() {
    lifecycle(Client::PythonWebSocket, "py-ws-agent-1").await;
}

/// A server restart forgets every agent. A plain HTTP agent's next poll (a
/// heartbeat, without its description) is answered with `ReportFullState`;
/// the client sends its full state and is registered by the new supervisor.
async fn full_state_after_a_restart(client: Client, device: &str) {
    let Some(clients) = installed_clients() else { return };
    let mut fleet = Fleet::start(client.device_ids()).await;
    let device_id = did(device);
    let mut agent = Driver::spawn(&format!("{client:?}"), client.command(&clients, fleet.addr, device));
    fleet
        .until_status("online at s1", &device_id, |s| {
            s.status == Presence::Online && s.supervisor == Some(sid("s1"))
        })
        .await;

    fleet.restart_as("s2", client.device_ids()).await;
    fleet
        .until_status("online at s2", &device_id, |s| {
            s.status == Presence::Online && s.supervisor == Some(sid("s2"))
        })
        .await;
    assert_eq!(fleet.store.lookup(&device_id).await.unwrap(), Some(sid("s2")));
    assert!(fleet.supervisor.is_connected(&device_id));
    if matches!(client, Client::NodeHttp) {
        // This client shows the flags of each reply: it was asked.
        let report_full_state = proto::ServerToAgentFlags::ReportFullState as u64;
        assert!(
            agent.events("sent").iter().any(|sent| sent["flags"]
                .as_u64()
                .is_some_and(|flags| flags & report_full_state != 0)),
            "{:#?}",
            agent.dump()
        );
    }
    agent.stop();
    agent.exited().await;
    fleet.supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_python_client_reports_full_state_to_a_restarted_server() {
    full_state_after_a_restart(Client::PythonHttp, "py-http-agent-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elastic_node_client_reports_full_state_to_a_restarted_server() {
    full_state_after_a_restart(Client::NodeHttp, "0190a6f1-7c4e-7b1a-8e2d-5f3c9a1b2c3e").await;
}

/// A server that cannot register agents in time (here: a transport no
/// supervisor accepts from) throttles them and says when to come back:
/// `503` with `Retry-After` over HTTP, `ErrorResponse` `UNAVAILABLE` with
/// `RetryInfo` over WebSocket; the clients read the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_clients_are_told_when_to_retry() {
    let Some(clients) = installed_clients() else { return };
    // Above the Node.js client's floor of 30 s, so the value it reads is ours.
    let retry_after = Duration::from_secs(45);
    let throttling = |device_ids| async move {
        let config = server_config("127.0.0.1:0".parse().unwrap(), device_ids)
            .register_timeout(Duration::from_millis(200))
            .throttle(100, 100, retry_after);
        OpampTransport::bind(config).await.unwrap()
    };

    let http = throttling(Client::NodeHttp.device_ids()).await;
    let node = Driver::spawn(
        "NodeHttp",
        Client::NodeHttp.command(&clients, http.local_addr(), "0190a6f1-7c4e-7b1a-8e2d-5f3c9a1b2c3f"),
    );
    let failed = node.nth("send_failed", 1).await;
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("503")), "{failed}");
    assert_eq!(failed["retry_after_ms"], json!(retry_after.as_millis() as u64));

    let ws = throttling(Client::PythonWebSocket.device_ids()).await;
    let python = Driver::spawn(
        "PythonWebSocket",
        Client::PythonWebSocket.command(&clients, ws.local_addr(), "py-ws-agent-2"),
    );
    let error = python.nth("error", 1).await;
    assert_eq!(
        error["type"],
        json!(proto::ServerErrorResponseType::Unavailable as i32),
        "{error}"
    );
    assert_eq!(error["retry_after_ns"], json!(retry_after.as_nanos() as u64));

    http.shutdown(Duration::from_secs(1)).await;
    ws.shutdown(Duration::from_secs(1)).await;
}

/// A server where any agent may register under its `instance_uid` (one
/// fleet-wide Basic credential), on `store`: agents that collide can then
/// register under the new uid they are offered.
async fn uid_server(id: &str, store: &Arc<MemoryStore>) -> (RunningSupervisor, Arc<OpampTransport>) {
    let fleet_wide = OpampAuth::Basic {
        username: "fleet".into(),
        password: "interop".into(),
    };
    let config = OpampServerConfig::new("127.0.0.1:0".parse().unwrap(), fleet_wide)
        .device_id(DeviceIdSource::InstanceUidUuid)
        .http_session_timeout(HTTP_SESSION_TIMEOUT);
    serve(id, config, store, &Arc::new(MemoryBus::new())).await
}

async fn until_online(store: &MemoryStore, device: &str) {
    let device = did(device);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = store.status(&device).await.unwrap();
        if status.as_ref().is_some_and(|s| s.status == Presence::Online) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{device} online: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first uid other than `uid` (32 hex digits) the Node.js client sent
/// with, as UUID text.
async fn node_renamed(agent: &Driver, uid: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(sent) = agent.events("sent").into_iter().find(|sent| sent["uid"] != uid) {
            let hex = sent["uid"].as_str().unwrap().to_owned();
            return [&hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]].join("-");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the {} client kept instance_uid {uid}; it printed:\n{:#?}",
            agent.name,
            agent.dump()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Agents that arrive with an `instance_uid` a WebSocket agent holds are
/// offered a new one (`agent_identification.new_instance_uid`), take it, are
/// asked for their full state under it, and are registered beside the first:
/// a second WebSocket agent, and Elastic's Node.js client over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_instance_uids_are_given_new_ones() {
    let Some(clients) = installed_clients() else { return };
    let store = Arc::new(MemoryStore::new());
    let (supervisor, transport) = uid_server("s1", &store).await;
    let addr = transport.local_addr();
    let authorization = basic("fleet", "interop");
    let uid = "0190a6f1-7c4e-7b1a-8e2d-5f3c9a1b2c40";
    let ws_agent = |name: &str| {
        let mut command = Client::PythonWebSocket.command_with(&clients, addr, name, &authorization);
        command.args(["--instance-uid", uid]);
        Driver::spawn(name, command)
    };

    let first = ws_agent("py-ws-agent-3");
    until_online(&store, uid).await;
    let second = ws_agent("py-ws-agent-4");
    let offered = second.nth("new_uid", 1).await["uid"].as_str().unwrap().to_owned();
    let offered = [
        &offered[..8],
        &offered[8..12],
        &offered[12..16],
        &offered[16..20],
        &offered[20..],
    ]
    .join("-");
    assert_ne!(offered, uid);
    until_online(&store, &offered).await;

    let node = Driver::spawn(
        "NodeHttp",
        Client::NodeHttp.command_with(&clients, addr, uid, &authorization),
    );
    let renamed = node_renamed(&node, &uid.replace('-', "")).await;
    until_online(&store, &renamed).await;

    assert!(first.events("new_uid").is_empty(), "the first keeps its uid");
    assert_eq!(store.lookup(&did(uid)).await.unwrap(), Some(sid("s1")));
    drop((first, second, node));
    supervisor.shutdown().await;
}
