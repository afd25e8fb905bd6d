//! Load generator: simulated devices over gRPC, OpAMP and MQTT, and the benchmarks built on them.
//!
//! ```text
//! # The idle-connection benchmark: supervisor vs a bare tonic server, side by side.
//! cargo run --release -p opamp-examples --bin opamp-loadgen -- grpc-idle --low 2000 --high 15000
//!
//! # Idle OpAMP agents over WebSocket vs Mosquitto holding idle MQTT clients.
//! cargo run --release -p opamp-examples --bin opamp-loadgen -- opamp-idle --low 2000 --high 15000
//!
//! # Their parts, by hand:
//! opamp-loadgen serve --kind supervisor --listen 127.0.0.1:4317      # or bare, transport, opamp-supervisor, opamp-transport
//! opamp-loadgen devices --url http://127.0.0.1:4317 --count 5000 --source 127.0.0.2
//! opamp-loadgen devices --protocol opamp --url ws://127.0.0.1:4320/v1/opamp --count 5000
//!
//! # End-to-end command latency through opamp-server, 10,000 devices over gRPC:
//! cargo build --release -p opamp-examples --bins
//! target/release/opamp-loadgen command-latency --devices 10000 --rates 1000,5000
//! ```
//!
//! `devices` opens one connection per simulated device (a gRPC stream, an
//! OpAMP WebSocket, or an MQTT connection), registers it (with its fleet token
//! for gRPC and OpAMP), waits for `registered` (or MQTT's CONNACK), prints how
//! long that took, and holds the connections idle until its stdin closes. A
//! process holds at most ~19,900 sockets here, so the benchmarks spread
//! devices over several processes, each connecting from its own 127.x.y.z
//! source address.
//!
//! `grpc-idle` and `opamp-idle` measure each server's resident memory (VmRSS)
//! with `low` and then `high` devices connected and report the slope per
//! device, round after round: `grpc-idle` for the supervisor runtime
//! (in-memory store and bus, gRPC transport) against a bare tonic server
//! holding the same streams; `opamp-idle` for the supervisor serving OpAMP
//! over WebSocket against a Mosquitto broker (its own process, its own config
//! on a free loopback port) holding as many idle MQTT 3.1.1 clients.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

mod deployment;
mod fleet;
use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::supervisor::{Supervisor, SupervisorConfig};
use opamp_core::transport::{
    AgentConnector, Capabilities, CommandAck, DeviceHello, DeviceSession, DeviceTransport, FromDevice, Inbound,
    Outbound, ToDevice,
};
use opamp_core::{AgentType, CommandOutcome, DeviceId, Store, SupervisorId};
use opamp_examples::rest::RestClient;
use opamp_transport::auth::FleetKey;
use opamp_transport::grpc::{DeviceAuth, GrpcConnector, GrpcConnectorConfig, GrpcServerConfig, GrpcTransport};
use opamp_transport::tls::{ClientTls, ServerTls};
use opamp_transport::websocket::{OpampAuth, OpampConnector, OpampConnectorConfig, OpampServerConfig, OpampTransport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

/// Attempts per device before a registration counts as failed.
const ATTEMPTS: usize = 3;

/// The environment variable the fleet key (base64) is passed in.
const FLEET_KEY_ENV: &str = "OPAMP_FLEET_KEY";

#[derive(Debug, Parser)]
#[command(name = "opamp-loadgen", version)]
struct Args {
    #[command(subcommand)]
    command: Job,
}

#[derive(Debug, Subcommand)]
enum Job {
    /// Idle gRPC streams: memory per device and registration rate, supervisor vs bare tonic.
    GrpcIdle(IdleArgs),
    /// Idle OpAMP agents over WebSocket: memory per agent, supervisor vs Mosquitto with idle MQTT clients.
    OpampIdle(IdleArgs),
    /// Serves gRPC devices until stdin closes (one side of `grpc-idle`).
    Serve(ServeArgs),
    /// Connects simulated devices and holds them until stdin closes (the other side).
    Devices(DeviceArgs),
    /// End-to-end command latency (REST call to ack recorded) against an opamp-server with devices over gRPC.
    CommandLatency(LatencyArgs),
    /// Connects devices that answer every command, until stdin closes (the device side of `command-latency`).
    Responders(DeviceArgs),
    /// Simulated devices running the agent runtime, spread over several supervisors, until stdin closes.
    Fleet(fleet::FleetArgs),
    /// The Phase 3 deployment on Redis and Kafka: its figures, or (`--hold`) kept up for use.
    Deployment(deployment::DeploymentArgs),
}

#[derive(Debug, clap::Args)]
struct IdleArgs {
    /// Devices connected at the first memory reading.
    #[arg(long, default_value_t = 2000)]
    low: usize,
    /// Devices connected at the second memory reading.
    #[arg(long, default_value_t = 15000)]
    high: usize,
    /// Rounds, each measuring both servers; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Devices per client process (each process connects from its own source address).
    #[arg(long, default_value_t = 8000)]
    per_process: usize,
    /// Registrations in flight per client process.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[command(flatten)]
    reads: WsReads,
    /// The store of the supervisor rows: `memory://`, or a `redis://` or
    /// `postgres://` URL (its records then live in that server, not in the
    /// supervisor's process). The bus is in memory either way.
    #[arg(long, default_value = "memory://")]
    store: String,
    /// The servers to measure, in each round (default: `bare,supervisor` for
    /// `grpc-idle`, `mosquitto,opamp-supervisor` for `opamp-idle`).
    #[arg(long, value_enum, value_delimiter = ',')]
    servers: Vec<ServerKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServerKind {
    /// The supervisor runtime on the in-memory store and bus, serving the gRPC transport.
    Supervisor,
    /// The gRPC transport alone: sessions accepted, answered `registered` and held, no runtime.
    Transport,
    /// A bare tonic `ControlService` that answers `registered` and holds the stream.
    Bare,
    /// The supervisor runtime on the in-memory store and bus, serving OpAMP (agents over WebSocket).
    OpampSupervisor,
    /// The OpAMP transport alone: sessions accepted, answered `registered` and held, no runtime.
    OpampTransport,
    /// The OpAMP transport alone over TLS (`wss://`, a certificate from a CA
    /// made for the run): what TLS costs against `opamp-transport`.
    OpampTransportTls,
    /// A Mosquitto broker (Debian's `mosquitto`) holding idle MQTT clients: the baseline of `opamp-idle`.
    Mosquitto,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Supervisor => "supervisor",
            ServerKind::Transport => "transport",
            ServerKind::Bare => "bare",
            ServerKind::OpampSupervisor => "opamp-supervisor",
            ServerKind::OpampTransport => "opamp-transport",
            ServerKind::OpampTransportTls => "opamp-transport-tls",
            ServerKind::Mosquitto => "mosquitto",
        }
    }

    /// What its clients speak.
    fn protocol(self) -> Protocol {
        match self {
            ServerKind::Supervisor | ServerKind::Transport | ServerKind::Bare => Protocol::Grpc,
            ServerKind::OpampSupervisor | ServerKind::OpampTransport | ServerKind::OpampTransportTls => Protocol::Opamp,
            ServerKind::Mosquitto => Protocol::Mqtt,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// The design's ControlService over gRPC, with fleet tokens.
    Grpc,
    /// OpAMP over WebSocket, with fleet tokens as bearer credentials.
    Opamp,
    /// MQTT 3.1.1: CONNECT, CONNACK, then a PINGREQ every half keep-alive.
    Mqtt,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[arg(long, value_enum)]
    kind: ServerKind,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[command(flatten)]
    reads: WsReads,
    /// The supervisor's store (the supervisor kinds only).
    #[arg(long, default_value = "memory://")]
    store: String,
}

/// How the OpAMP server reads its WebSockets (default: the transport's).
#[derive(Debug, Clone, Copy, clap::Args)]
struct WsReads {
    /// Bytes one read from an agent's WebSocket asks for. The server holds
    /// no buffer for an idle connection; this sets how many reads a message takes.
    #[arg(long)]
    ws_read_chunk: Option<usize>,
}

impl WsReads {
    fn args(self) -> Vec<String> {
        match self.ws_read_chunk {
            Some(bytes) => vec!["--ws-read-chunk".to_owned(), bytes.to_string()],
            None => Vec::new(),
        }
    }
}

#[derive(Debug, clap::Args)]
struct DeviceArgs {
    /// What the devices speak (default: `opamp` for a `ws://` URL, else `grpc`).
    #[arg(long, value_enum)]
    protocol: Option<Protocol>,
    /// The server's URL: `http://127.0.0.1:4317` (gRPC), `ws://127.0.0.1:4320/v1/opamp` (OpAMP),
    /// `127.0.0.1:1883` (MQTT).
    #[arg(long)]
    url: String,
    /// How many devices.
    #[arg(long)]
    count: usize,
    /// The number of the first device (devices are `dev-NNNNNN`).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// The local address to connect from.
    #[arg(long)]
    source: Option<IpAddr>,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    // The servers and clients of a TLS benchmark find its certificates here.
    let pki = match &args.command {
        Job::OpampIdle(idle) if idle.servers.contains(&ServerKind::OpampTransportTls) => Some(RunPki::create()?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async move {
        match args.command {
            Job::GrpcIdle(idle) => idle_benchmark(idle, Benchmark::Grpc).await,
            Job::OpampIdle(idle) => idle_benchmark(idle, Benchmark::Opamp).await,
            Job::Serve(serve) => serve_until_stdin_closes(serve).await,
            Job::Devices(devices) => devices_until_stdin_closes(devices).await,
            Job::CommandLatency(latency) => command_latency(latency).await,
            Job::Responders(devices) => responders_until_stdin_closes(devices).await,
            Job::Fleet(fleet) => fleet::run(fleet).await,
            Job::Deployment(args) => deployment::run(args).await,
        }
    });
    if let Some(RunPki(dir)) = pki {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn fleet_key() -> Result<FleetKey, Box<dyn std::error::Error>> {
    let text = std::env::var(FLEET_KEY_ENV).map_err(|_| format!("{FLEET_KEY_ENV} (base64 fleet key) is not set"))?;
    Ok(FleetKey::from_base64(&text)?)
}

async fn wait_for_stdin_eof() {
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

// ---- serve ----

async fn serve_until_stdin_closes(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let key = fleet_key()?;
    let grpc = || GrpcServerConfig::new(args.listen, DeviceAuth::FleetToken(key.clone()));
    let opamp = || {
        let config = OpampServerConfig::new(args.listen, OpampAuth::FleetToken(key.clone()));
        match args.reads.ws_read_chunk {
            Some(bytes) => config.read_chunk(bytes),
            None => config,
        }
    };
    let store =
        || async { opamp_examples::open_store(&opamp_examples::cli::parse_flag("--store", &args.store)?).await };
    match args.kind {
        ServerKind::Supervisor => supervise(Arc::new(GrpcTransport::bind(grpc()).await?), store().await?).await?,
        ServerKind::OpampSupervisor => {
            supervise(Arc::new(OpampTransport::bind(opamp()).await?), store().await?).await?
        }
        ServerKind::Transport => hold_sessions(&GrpcTransport::bind(grpc()).await?).await?,
        ServerKind::OpampTransport => hold_sessions(&OpampTransport::bind(opamp()).await?).await?,
        ServerKind::OpampTransportTls => {
            let tls = RunPki::from_env()?.server()?;
            hold_sessions(&OpampTransport::bind(opamp().tls(tls)).await?).await?
        }
        ServerKind::Mosquitto => return Err("mosquitto is its own program: `opamp-idle` starts it".into()),
        ServerKind::Bare => {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            println!("listening {}", listener.local_addr()?);
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let server = tonic::transport::Server::builder()
                .add_service(ControlServiceServer::new(Bare))
                .serve_with_incoming_shutdown(incoming, wait_for_stdin_eof());
            server.await?;
        }
    }
    Ok(())
}

/// A transport that says where it listens.
trait Listening: DeviceTransport {
    fn address(&self) -> SocketAddr;
}

impl Listening for GrpcTransport {
    fn address(&self) -> SocketAddr {
        self.local_addr()
    }
}

impl Listening for OpampTransport {
    fn address(&self) -> SocketAddr {
        self.local_addr()
    }
}

/// The supervisor runtime on `store` and the in-memory bus, serving `transport` until stdin closes.
async fn supervise<T: Listening>(transport: Arc<T>, store: Arc<dyn Store>) -> Result<(), Box<dyn std::error::Error>> {
    println!("listening {}", transport.address());
    let config = SupervisorConfig::new(SupervisorId::new("loadgen-supervisor")?);
    let supervisor = Supervisor::new(config, store, Arc::new(MemoryBus::new()))
        .start(vec![transport as Arc<dyn DeviceTransport>])
        .await?;
    wait_for_stdin_eof().await;
    supervisor.abort();
    Ok(())
}

/// The transport alone: every session is answered `registered` and held, no runtime.
async fn hold_sessions(transport: &dyn Listening) -> Result<(), Box<dyn std::error::Error>> {
    println!("listening {}", transport.address());
    let me = SupervisorId::new("loadgen-transport")?;
    let mut held = Vec::new();
    let accepting = async {
        while let Ok(Some(session)) = transport.accept().await {
            let _ = session.outbound.try_send(ToDevice::Registered(Box::new(me)));
            held.push(HeldSession::new(session));
        }
    };
    tokio::select! {
        _ = accepting => {}
        _ = wait_for_stdin_eof() => {}
    }
    Ok(())
}

/// A session held by `hold_sessions`: its two queues and nothing else (no
/// task, not the hello), reading each message from the device as it arrives
/// and dropping it, as a supervisor would read it. So what the benchmark
/// measures is the transport's memory, not messages piling up in the harness.
struct HeldSession {
    inbound: Mutex<Box<dyn Inbound<FromDevice>>>,
    _outbound: Outbound<ToDevice>,
    /// Woken while another thread was reading: read again.
    again: AtomicBool,
}

impl HeldSession {
    fn new(session: DeviceSession) -> Arc<Self> {
        let held = Arc::new(HeldSession {
            inbound: Mutex::new(session.inbound),
            _outbound: session.outbound,
            again: AtomicBool::new(false),
        });
        held.read_all();
        held
    }

    /// Reads until the queue is empty; the queue keeps this as its waker.
    fn read_all(self: &Arc<Self>) {
        let waker = Waker::from(Arc::clone(self));
        let mut cx = Context::from_waker(&waker);
        loop {
            self.again.store(true, Ordering::SeqCst);
            // A wake from inside `poll_recv` below finds the lock taken; it leaves `again` set.
            let Ok(mut inbound) = self.inbound.try_lock() else {
                return;
            };
            while self.again.swap(false, Ordering::SeqCst) {
                while let Poll::Ready(Ok(Some(_))) = inbound.poll_recv(&mut cx) {}
            }
            drop(inbound);
            if !self.again.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

impl Wake for HeldSession {
    fn wake(self: Arc<Self>) {
        self.read_all();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.read_all();
    }
}

/// The same protocol generated with stock tonic (default codec and settings), for the baseline.
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod stock {
    tonic::include_proto!("opamp.control.v1");
}

use stock::control_service_server::{ControlService, ControlServiceServer};
use stock::{Envelope, envelope::Body};

/// The baseline: tonic and nothing else. Reads `register`, answers
/// `registered`, then holds the stream, draining whatever the device sends.
struct Bare;

type BareStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Envelope, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for Bare {
    type ControlStream = BareStream;

    async fn control(
        &self,
        request: tonic::Request<tonic::Streaming<Envelope>>,
    ) -> Result<tonic::Response<BareStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        inbound.message().await?;
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let registered = Envelope {
            body: Some(Body::Registered(stock::Registered {
                supervisor_id: "bare".into(),
            })),
        };
        let stream = tokio_stream::StreamExt::chain(tokio_stream::once(Ok(registered)), tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

// ---- devices ----

/// What a `devices` process prints once every device has registered (or failed).
#[derive(Debug, Clone, Copy, Default)]
struct Registered {
    ok: usize,
    failed: usize,
    retried: usize,
    wall: Duration,
    p50: Duration,
    p99: Duration,
}

impl Registered {
    fn line(&self) -> String {
        format!(
            "registered ok={} failed={} retried={} wall_us={} p50_us={} p99_us={}",
            self.ok,
            self.failed,
            self.retried,
            self.wall.as_micros(),
            self.p50.as_micros(),
            self.p99.as_micros()
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let mut parsed = Registered::default();
        for field in line.strip_prefix("registered ")?.split(' ') {
            let (name, value) = field.split_once('=')?;
            let value: u64 = value.parse().ok()?;
            match name {
                "ok" => parsed.ok = value as usize,
                "failed" => parsed.failed = value as usize,
                "retried" => parsed.retried = value as usize,
                "wall_us" => parsed.wall = Duration::from_micros(value),
                "p50_us" => parsed.p50 = Duration::from_micros(value),
                "p99_us" => parsed.p99 = Duration::from_micros(value),
                _ => return None,
            }
        }
        Some(parsed)
    }
}

async fn devices_until_stdin_closes(mut args: DeviceArgs) -> Result<(), Box<dyn std::error::Error>> {
    let protocol = *args.protocol.get_or_insert(if args.url.starts_with("ws://") {
        Protocol::Opamp
    } else {
        Protocol::Grpc
    });
    let key = match protocol {
        Protocol::Mqtt => None,
        Protocol::Grpc | Protocol::Opamp => Some(fleet_key()?),
    };
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in args.first..args.first + args.count {
        let device = DeviceId::new(format!("dev-{n:06}"))?;
        let client = Client::new(&args, key.as_ref(), &device)?;
        let (permits, tally) = (permits.clone(), tally.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire().await;
            let begun = Instant::now();
            // As a device would: a connection refused or reset in a storm is tried again.
            let mut registered = client.register(&device).await;
            for _ in 1..ATTEMPTS {
                match &registered {
                    Err(err) if err.is_retryable() => {
                        tally.retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        registered = client.register(&device).await;
                    }
                    _ => break,
                }
            }
            let mut state = tally.state.lock().expect("not poisoned");
            match registered {
                Ok(held) => {
                    state.latencies.push(begun.elapsed());
                    state.held.push(held);
                }
                Err(err) => state.failures.push(format!("{device}: {err}")),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let wall = started.elapsed();
    let summary = {
        let mut state = tally.state.lock().expect("not poisoned");
        state.latencies.sort();
        for failure in state.failures.iter().take(5) {
            eprintln!("failed: {failure}");
        }
        Registered {
            ok: state.latencies.len(),
            failed: state.failures.len(),
            retried: tally.retried.load(std::sync::atomic::Ordering::Relaxed),
            wall,
            p50: percentile(&state.latencies, 0.50),
            p99: percentile(&state.latencies, 0.99),
        }
    };
    println!("{}", summary.line());
    wait_for_stdin_eof().await;
    drop(tally);
    Ok(())
}

/// How one simulated device reaches its server.
enum Client {
    /// Through a transport's connector (gRPC, OpAMP): registered once `registered` arrives.
    Connector(Box<dyn AgentConnector>),
    /// A hand-written MQTT 3.1.1 client: registered once CONNACK accepts it.
    Mqtt { broker: SocketAddr, source: Option<IpAddr> },
}

impl Client {
    fn new(args: &DeviceArgs, key: Option<&FleetKey>, device: &DeviceId) -> Result<Self, Box<dyn std::error::Error>> {
        let token = || key.map(|key| key.token(device)).ok_or("no fleet key");
        Ok(match args.protocol.unwrap_or(Protocol::Grpc) {
            Protocol::Grpc => {
                let mut config = GrpcConnectorConfig::new(&args.url).token(token()?);
                if let Some(source) = args.source {
                    config = config.local_address(source);
                }
                Client::Connector(Box::new(GrpcConnector::new(config)?))
            }
            Protocol::Opamp => {
                let mut config = OpampConnectorConfig::new(&args.url).token(token()?);
                if args.url.starts_with("wss://") {
                    config = config.tls(RunPki::from_env()?.client()?);
                }
                if let Some(source) = args.source {
                    config = config.local_address(source);
                }
                Client::Connector(Box::new(OpampConnector::new(config)?))
            }
            Protocol::Mqtt => Client::Mqtt {
                broker: args.url.parse()?,
                source: args.source,
            },
        })
    }

    async fn register(&self, device: &DeviceId) -> Result<Held, opamp_core::Error> {
        match self {
            Client::Connector(connector) => {
                let mut hello = DeviceHello::new(*device);
                hello.agent_type = Some(AgentType::new("fluentbit").expect("a valid agent type"));
                hello.capabilities = Capabilities::all_builtin();
                let mut session = connector.connect(&hello).await?;
                match session.inbound.recv().await? {
                    Some(ToDevice::Registered(_)) => Ok(Box::new(session)),
                    other => Err(opamp_core::Error::invalid_input(format!(
                        "expected registered, got {other:?}"
                    ))),
                }
            }
            Client::Mqtt { broker, source } => mqtt::connect(*broker, *source, device.as_str())
                .await
                .map(|idle| Box::new(idle) as Held)
                .map_err(|err| opamp_core::Error::unavailable(format!("MQTT {broker}: {err}"))),
        }
    }
}

/// A connection held open until the process is told to stop (a session, or an MQTT keep-alive task).
type Held = Box<dyn std::any::Any + Send>;

/// The MQTT 3.1.1 client of the Mosquitto baseline: the least a real idle client does.
mod mqtt {
    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    /// The keep-alive the client announces; it pings every half of it, as clients do.
    const KEEP_ALIVE: Duration = Duration::from_secs(60);

    /// Connects, sends CONNECT (clean session), waits for a CONNACK that accepts it,
    /// and leaves a task pinging the broker; aborting the task closes the connection.
    pub(super) async fn connect(
        broker: SocketAddr,
        source: Option<IpAddr>,
        client_id: &str,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let socket = if broker.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = source {
            socket.bind(SocketAddr::new(source, 0))?;
        }
        let mut stream = socket.connect(broker).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&connect_packet(client_id)?).await?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await?;
        match connack {
            [0x20, 0x02, _, 0] => Ok(tokio::spawn(keep_alive(stream))),
            [0x20, 0x02, _, code] => Err(std::io::Error::other(format!(
                "CONNACK refused the client: code {code}"
            ))),
            other => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("expected CONNACK, got {other:02x?}"),
            )),
        }
    }

    fn connect_packet(client_id: &str) -> std::io::Result<Vec<u8>> {
        let id = u16::try_from(client_id.len()).map_err(|_| std::io::Error::other("client id too long"))?;
        let keep_alive = u16::try_from(KEEP_ALIVE.as_secs()).unwrap_or(u16::MAX);
        // Variable header: protocol name "MQTT", level 4 (3.1.1), flags (clean session), keep-alive.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
        body.extend_from_slice(&keep_alive.to_be_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10];
        let mut remaining = body.len();
        loop {
            let byte = (remaining % 128) as u8;
            remaining /= 128;
            packet.push(if remaining > 0 { byte | 0x80 } else { byte });
            if remaining == 0 {
                break;
            }
        }
        packet.extend_from_slice(&body);
        Ok(packet)
    }

    async fn keep_alive(mut stream: TcpStream) {
        let half = KEEP_ALIVE / 2;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
        let mut pong = [0u8; 2];
        loop {
            ticks.tick().await;
            // PINGREQ, then PINGRESP; anything else ends the connection.
            if stream.write_all(&[0xC0, 0x00]).await.is_err() || stream.read_exact(&mut pong).await.is_err() {
                return;
            }
            if pong != [0xD0, 0x00] {
                return;
            }
        }
    }
}

/// What the device tasks of one process found.
#[derive(Default)]
struct Tally {
    retried: std::sync::atomic::AtomicUsize,
    state: Mutex<TallyState>,
}

#[derive(Default)]
struct TallyState {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    /// The connections, held open until the process is told to stop.
    held: Vec<Held>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

// ---- grpc-idle and opamp-idle ----

/// A child process (this binary, or the Mosquitto baseline), killed when dropped.
struct Process {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

async fn spawn_self(args: &[String], key: &str) -> Result<Process, Box<dyn std::error::Error>> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(args).env(FLEET_KEY_ENV, key);
    if let Some(dir) = RUN_PKI.get() {
        command.env(RunPki::ENV, dir);
    }
    Process::spawn(command)
}

impl Process {
    fn spawn(mut command: Command) -> Result<Process, Box<dyn std::error::Error>> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        Ok(Process {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    async fn line(&mut self) -> Result<String, Box<dyn std::error::Error>> {
        let line = tokio::time::timeout(Duration::from_secs(300), self.lines.next_line()).await??;
        line.ok_or_else(|| "the child exited early".into())
    }

    fn rss_kib(&self) -> Result<u64, Box<dyn std::error::Error>> {
        let pid = self.child.id().ok_or("the child has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).ok_or("no VmRSS value")?.parse()?)
    }
}

/// A Mosquitto broker on a free loopback port, with its config in a throwaway folder.
struct Mosquitto {
    process: Process,
    port: u16,
    dir: std::path::PathBuf,
}

impl Mosquitto {
    async fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("opamp-loadgen-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("mosquitto.conf");
        // No persistence, no limit on clients, errors only: a broker holding connections and nothing else.
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\n\
                 log_dest stderr\nlog_type error\n"
            ),
        )?;
        // Debian installs it in /usr/sbin, which a non-root PATH may lack.
        let program = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .unwrap_or("mosquitto");
        let mut command = Command::new(program);
        command.arg("-c").arg(&config);
        let process = Process::spawn(command)
            .map_err(|err| format!("cannot start mosquitto ({err}); install it with `apt-get install -y mosquitto`"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                return Err(format!("mosquitto does not listen on 127.0.0.1:{port} after 10 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Mosquitto { process, port, dir })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server measured once.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rss_low_kib: u64,
    rss_high_kib: u64,
    per_device_bytes: f64,
    registration_rate: f64,
    retried: usize,
    p50: Duration,
    p99: Duration,
}

/// Which idle benchmark: its default servers, its baseline and its words.
#[derive(Debug, Clone, Copy)]
enum Benchmark {
    Grpc,
    Opamp,
}

impl Benchmark {
    fn default_servers(self) -> Vec<ServerKind> {
        match self {
            Benchmark::Grpc => vec![ServerKind::Bare, ServerKind::Supervisor],
            Benchmark::Opamp => vec![ServerKind::Mosquitto, ServerKind::OpampSupervisor],
        }
    }

    fn baseline(self) -> ServerKind {
        match self {
            Benchmark::Grpc => ServerKind::Bare,
            Benchmark::Opamp => ServerKind::Mosquitto,
        }
    }

    fn baseline_name(self) -> &'static str {
        match self {
            Benchmark::Grpc => "bare tonic",
            Benchmark::Opamp => "Mosquitto",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Benchmark::Grpc => "idle gRPC streams",
            Benchmark::Opamp => "idle OpAMP agents over WebSocket vs idle MQTT clients",
        }
    }
}

/// Where this process made its run's TLS material, for the processes it starts.
static RUN_PKI: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The TLS material of a run: a CA and a server certificate it signed,
/// made by the benchmark and found by its server and client processes
/// through [`RunPki::ENV`].
struct RunPki(std::path::PathBuf);

impl RunPki {
    const ENV: &'static str = "OPAMP_LOADGEN_TLS_DIR";

    /// Makes the CA and the certificate in a directory of its own, for the
    /// processes this one starts.
    fn create() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("opamp-loadgen-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate()?;
        std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
        std::fs::write(dir.join("server.pem"), cert.pem())?;
        std::fs::write(dir.join("server.key"), key.serialize_pem())?;
        let _ = RUN_PKI.set(dir.clone());
        Ok(RunPki(dir))
    }

    fn from_env() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = std::env::var_os(Self::ENV).ok_or_else(|| format!("{} is not set", Self::ENV))?;
        Ok(RunPki(dir.into()))
    }

    fn server(&self) -> Result<ServerTls, Box<dyn std::error::Error>> {
        Ok(ServerTls::new(
            std::fs::read(self.0.join("server.pem"))?,
            std::fs::read(self.0.join("server.key"))?,
        ))
    }

    fn client(&self) -> Result<ClientTls, Box<dyn std::error::Error>> {
        Ok(ClientTls::new(std::fs::read(self.0.join("ca.pem"))?).domain("localhost"))
    }
}

async fn idle_benchmark(mut args: IdleArgs, benchmark: Benchmark) -> Result<(), Box<dyn std::error::Error>> {
    if args.low == 0 || args.high <= args.low {
        return Err("--high must be more than --low, and --low more than 0".into());
    }
    if args.servers.is_empty() {
        args.servers = benchmark.default_servers();
    }
    let key = random_key();
    let mut results: Vec<(ServerKind, Measured)> = Vec::new();
    let mut address_block = 0u8;
    for round in 1..=args.rounds {
        for &kind in &args.servers {
            address_block = address_block.wrapping_add(1);
            let measured = measure_idle(&args, kind, &key, address_block).await?;
            eprintln!("round {round} {kind:?}: {measured:?}");
            results.push((kind, measured));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    print_idle_table(&args, benchmark, &results);
    Ok(())
}

fn random_key() -> String {
    use base64::Engine as _;
    let mut bytes = Vec::new();
    for _ in 0..2 {
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn measure_idle(
    args: &IdleArgs,
    kind: ServerKind,
    key: &str,
    block: u8,
) -> Result<Measured, Box<dyn std::error::Error>> {
    // Mosquitto is its own program; every other server is this binary's `serve`.
    let mut mosquitto = None;
    let mut served = None;
    let url = if kind == ServerKind::Mosquitto {
        let broker = Mosquitto::start().await?;
        let url = format!("127.0.0.1:{}", broker.port);
        mosquitto = Some(broker);
        url
    } else {
        let mut serve = vec!["serve".to_owned(), "--kind".to_owned(), kind.name().to_owned()];
        serve.extend(args.reads.args());
        serve.extend(["--store".to_owned(), args.store.clone()]);
        let mut server = spawn_self(&serve, key).await?;
        let listening = server.line().await?;
        let addr = listening
            .strip_prefix("listening ")
            .ok_or("the server did not say where it listens")?
            .to_owned();
        served = Some(server);
        match kind.protocol() {
            Protocol::Opamp if kind == ServerKind::OpampTransportTls => format!("wss://{addr}/v1/opamp"),
            Protocol::Opamp => format!("ws://{addr}/v1/opamp"),
            Protocol::Grpc | Protocol::Mqtt => format!("http://{addr}"),
        }
    };
    let server = match (&mosquitto, &served) {
        (Some(broker), _) => &broker.process,
        (None, Some(server)) => server,
        (None, None) => return Err("no server was started".into()),
    };

    let mut clients = Vec::new();
    let mut next_source = 2u8;
    let mut connect = |first: usize, count: usize| {
        let mut batch = Vec::new();
        let mut start = first;
        while start < first + count {
            let n = args.per_process.min(first + count - start);
            let source = format!("127.{block}.0.{next_source}");
            next_source += 1;
            batch.push(vec![
                "devices".to_owned(),
                "--protocol".to_owned(),
                kind.protocol()
                    .to_possible_value()
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default(),
                "--url".to_owned(),
                url.clone(),
                "--count".to_owned(),
                n.to_string(),
                "--first".to_owned(),
                start.to_string(),
                "--source".to_owned(),
                source,
                "--concurrency".to_owned(),
                args.concurrency.to_string(),
            ]);
            start += n;
        }
        batch
    };

    let low = run_batch(connect(0, args.low), key, &mut clients).await?;
    settle().await;
    let rss_low_kib = median_rss(server).await?;
    let high = run_batch(connect(args.low, args.high - args.low), key, &mut clients).await?;
    settle().await;
    let rss_high_kib = median_rss(server).await?;
    if low.failed + high.failed > 0 {
        return Err(format!("{} devices failed to register", low.failed + high.failed).into());
    }
    let added = (args.high - args.low) as f64;
    drop(clients);
    drop(served);
    drop(mosquitto);
    Ok(Measured {
        rss_low_kib,
        rss_high_kib,
        per_device_bytes: (rss_high_kib.saturating_sub(rss_low_kib) * 1024) as f64 / added,
        registration_rate: added / high.wall.as_secs_f64(),
        retried: low.retried + high.retried,
        p50: high.p50,
        p99: high.p99,
    })
}

/// Starts every client process of a batch at once and waits until all have registered their devices.
async fn run_batch(
    batch: Vec<Vec<String>>,
    key: &str,
    clients: &mut Vec<Process>,
) -> Result<Registered, Box<dyn std::error::Error>> {
    let first = clients.len();
    for args in batch {
        clients.push(spawn_self(&args, key).await?);
    }
    let mut total = Registered::default();
    for client in &mut clients[first..] {
        let line = client.line().await?;
        let registered = Registered::parse(&line).ok_or_else(|| format!("unexpected output: {line}"))?;
        total.ok += registered.ok;
        total.failed += registered.failed;
        total.retried += registered.retried;
        // The processes ran side by side: the batch took as long as the slowest.
        total.wall = total.wall.max(registered.wall);
        total.p50 = total.p50.max(registered.p50);
        total.p99 = total.p99.max(registered.p99);
    }
    Ok(total)
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn median_rss(server: &Process) -> Result<u64, Box<dyn std::error::Error>> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(server.rss_kib()?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn print_idle_table(args: &IdleArgs, benchmark: Benchmark, results: &[(ServerKind, Measured)]) {
    let of = |kind: ServerKind, pick: fn(&Measured) -> f64| {
        median(
            results
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, m)| pick(m))
                .collect(),
        )
    };
    let added = args.high - args.low;
    println!(
        "\n{}: {} → {} devices, {} rounds, medians (per device = RSS slope)\n",
        benchmark.title(),
        args.low,
        args.high,
        args.rounds
    );
    println!(
        "| server | RSS at {} | RSS at {} | per device | registration rate ({added} devices) | p50 | p99 |",
        args.low, args.high
    );
    println!("|---|---|---|---|---|---|---|");
    let in_memory = args.store == "memory://";
    for &kind in &args.servers {
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.0} B | {:.0} /s | {:.1} ms | {:.1} ms |",
            match kind {
                ServerKind::Bare => "bare tonic",
                ServerKind::Transport => "gRPC transport alone",
                ServerKind::Supervisor if in_memory => "supervisor (memory store + bus)",
                ServerKind::Supervisor => "supervisor (store elsewhere, memory bus)",
                ServerKind::OpampSupervisor if in_memory => "supervisor over OpAMP WebSocket (memory store + bus)",
                ServerKind::OpampSupervisor => "supervisor over OpAMP WebSocket (store elsewhere, memory bus)",
                ServerKind::OpampTransport => "OpAMP WebSocket transport alone",
                ServerKind::OpampTransportTls => "OpAMP WebSocket transport alone, over TLS",
                ServerKind::Mosquitto => "Mosquitto, idle MQTT 3.1.1 clients",
            },
            of(kind, |m| m.rss_low_kib as f64) / 1024.0,
            of(kind, |m| m.rss_high_kib as f64) / 1024.0,
            of(kind, |m| m.per_device_bytes),
            of(kind, |m| m.registration_rate),
            of(kind, |m| m.p50.as_secs_f64() * 1e3),
            of(kind, |m| m.p99.as_secs_f64() * 1e3),
        );
    }
    let retried: usize = results.iter().map(|(_, m)| m.retried).sum();
    let baseline = benchmark.baseline();
    if args.servers.contains(&baseline) {
        let base_memory = of(baseline, |m| m.per_device_bytes);
        let base_rate = of(baseline, |m| m.registration_rate);
        println!();
        for &kind in args.servers.iter().filter(|k| **k != baseline) {
            println!(
                "{kind:?} / {}: memory per device {:.2}×, registration rate {:.2}×",
                benchmark.baseline_name(),
                of(kind, |m| m.per_device_bytes) / base_memory,
                of(kind, |m| m.registration_rate) / base_rate,
            );
        }
    }
    println!("registrations retried after a refused or reset connection: {retried}, in all rounds");
}

// ---- command-latency ----

/// Connects `count` devices that answer every command at once (as a device
/// that applies a toggle in no time would), prints the registration line,
/// and answers until its stdin closes.
async fn responders_until_stdin_closes(args: DeviceArgs) -> Result<(), Box<dyn std::error::Error>> {
    let key = fleet_key()?;
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.count)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in args.first..args.first + args.count {
        let device = DeviceId::new(format!("dev-{n:06}"))?;
        let mut config = GrpcConnectorConfig::new(&args.url).token(key.token(&device));
        if let Some(source) = args.source {
            config = config.local_address(source);
        }
        let connector = GrpcConnector::new(config)?;
        let (permits, latencies, failures) = (permits.clone(), latencies.clone(), failures.clone());
        tasks.spawn(async move {
            let permit = permits.acquire().await;
            let mut hello = DeviceHello::new(device);
            hello.agent_type = Some(AgentType::new("fluentbit").expect("a valid agent type"));
            hello.capabilities = Capabilities::all_builtin();
            let begun = Instant::now();
            let mut session = match connector.connect(&hello).await {
                Ok(session) => session,
                Err(err) => {
                    failures.lock().expect("not poisoned").push(format!("{device}: {err}"));
                    return;
                }
            };
            let mut registered = false;
            drop(permit);
            while let Ok(Some(message)) = session.inbound.recv().await {
                match message {
                    ToDevice::Registered(_) if !registered => {
                        registered = true;
                        latencies.lock().expect("not poisoned").push(begun.elapsed());
                    }
                    ToDevice::Command(command) => {
                        let ack = CommandAck::new(command.correlation_id, CommandOutcome::Acked);
                        if session.outbound.send(FromDevice::CommandAck(ack)).await.is_err() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    // Every device has registered (or failed) once as many latencies and failures as devices are in.
    while latencies.lock().expect("not poisoned").len() + failures.lock().expect("not poisoned").len() < args.count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let summary = {
        let mut latencies = latencies.lock().expect("not poisoned");
        latencies.sort();
        let failures = failures.lock().expect("not poisoned");
        for failure in failures.iter().take(5) {
            eprintln!("failed: {failure}");
        }
        Registered {
            ok: latencies.len(),
            failed: failures.len(),
            retried: 0,
            wall: started.elapsed(),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
        }
    };
    println!("{}", summary.line());
    wait_for_stdin_eof().await;
    tasks.abort_all();
    Ok(())
}

#[derive(Debug, clap::Args)]
struct LatencyArgs {
    /// Devices connected over gRPC, answering every command.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Commands per second offered, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000])]
    rates: Vec<u32>,
    /// How long each rate is offered.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    seconds: Duration,
    /// Devices per responder process (one source address each, so up to
    /// about 28,000). One process by default: on a small machine every
    /// further process competes with the server for the cores.
    #[arg(long, default_value_t = 10_000)]
    per_process: usize,
    /// The opamp-server binary (default: next to this one).
    #[arg(long)]
    server: Option<std::path::PathBuf>,
    /// Writes every command of each rate to `DIR/latency-RATE.txt`: when it
    /// was due, how late it was sent, and its latency.
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

/// End-to-end command latency: REST call to outcome recorded.
///
/// Starts `opamp-server` (in-memory store and bus, a supervisor in the same
/// process serving gRPC), connects the devices from responder processes,
/// then offers each rate open-loop from this process: every command is a
/// `POST /api/v1/devices/{id}/emission?wait=10s`, which answers once the
/// control plane has recorded the device's acknowledgement. Latency runs from the moment
/// the command was due to be sent (so a client falling behind counts against
/// it), to that answer.
async fn command_latency(args: LatencyArgs) -> Result<(), Box<dyn std::error::Error>> {
    let key = random_key();
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let server_bin = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("opamp-server"),
    };
    let mut server = spawn(
        &server_bin,
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--grpc-listen".into(),
            "127.0.0.1:0".into(),
            "--tokens".into(),
            format!("bench:operator:{secret}"),
            "--rate".into(),
            "1000000".into(),
        ],
        &key,
    )
    .await?;
    let line = server.line().await?;
    let (http, grpc) = match line.split(' ').collect::<Vec<_>>().as_slice() {
        ["listening", http, "grpc", grpc] => (http.to_string(), grpc.to_string()),
        _ => return Err(format!("unexpected output of opamp-server: {line}").into()),
    };
    println!("opamp-server: REST on {http}, gRPC devices on {grpc}");

    let mut responders = Vec::new();
    let mut first = 0;
    let mut connected = 0;
    let block = 100 + uuid::Uuid::new_v4().as_bytes()[0] % 150;
    for (n, chunk) in chunks(args.devices, args.per_process).into_iter().enumerate() {
        // A /16 of loopback picked afresh each run: the ports a run's
        // connections leave in TIME_WAIT stay taken on their source address
        // for a minute, and 10,000 of them a run soon exhaust one address.
        let source = format!("127.{block}.{}.{}", n / 200, 2 + n % 200);
        let process = spawn_self(
            &[
                "responders".into(),
                "--url".into(),
                format!("http://{grpc}"),
                "--count".into(),
                chunk.to_string(),
                "--first".into(),
                first.to_string(),
                "--source".into(),
                source,
            ],
            &key,
        )
        .await?;
        responders.push(process);
        first += chunk;
    }
    for responder in &mut responders {
        let line = responder.line().await?;
        let registered = Registered::parse(&line).ok_or_else(|| format!("unexpected output: {line}"))?;
        if registered.failed > 0 {
            return Err(format!("{} devices failed to register", registered.failed).into());
        }
        connected += registered.ok;
    }
    println!("{connected} devices connected over gRPC, each answering every command");

    let client = RestClient::new(&http, &secret);
    let mut rows = Vec::new();
    for &rate in &args.rates {
        // A short warm-up at the same rate, not counted.
        offer(
            std::slice::from_ref(&client),
            rate,
            Duration::from_secs(1),
            args.devices,
            0,
        )
        .await?;
        let run = offer(std::slice::from_ref(&client), rate, args.seconds, args.devices, 1).await?;
        println!(
            "  {rate}/s offered: {} commands, {:.0}/s achieved, {}{}",
            run.sent,
            run.achieved,
            run.figures(),
            if run.failures.is_empty() {
                String::new()
            } else {
                format!(", {} not acked", run.failures.len())
            }
        );
        for failure in run.failures.iter().take(3) {
            println!("    {failure}");
        }
        if let Some(dir) = &args.samples {
            let path = dir.join(format!("latency-{rate}.txt"));
            std::fs::write(&path, run.samples_text()).map_err(|err| format!("writing {}: {err}", path.display()))?;
        }
        rows.push((rate, run));
    }
    // The control plane's own view, issue to outcome recorded, over every run (warm-ups included).
    if let Ok((200, metrics)) = client.call(hyper::Method::GET, "/metrics", None).await {
        let metrics = String::from_utf8_lossy(&metrics);
        println!("opamp-server's opamp_command_latency_seconds (issue to outcome recorded, all runs):");
        for line in metrics
            .lines()
            .filter(|line| line.starts_with("opamp_command_latency_seconds{"))
        {
            println!("  {line}");
        }
    }
    drop(responders);
    drop(server);

    println!(
        "\nEnd-to-end command latency, REST call to acknowledgement recorded ({connected} devices over gRPC, in-memory backends):\n"
    );
    println!("| offered | commands | achieved | p50 | p99 | max | not acked |");
    println!("|---|---|---|---|---|---|---|");
    for (rate, run) in rows {
        println!(
            "| {rate}/s | {} | {:.0}/s | {} | {} | {} | {} |",
            run.sent,
            run.achieved,
            micros(run.p50),
            micros(run.p99),
            micros(run.max),
            run.failures.len()
        );
    }
    Ok(())
}

fn chunks(total: usize, per: usize) -> Vec<usize> {
    let per = per.max(1);
    (0..total.div_ceil(per)).map(|n| per.min(total - n * per)).collect()
}

fn micros(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

async fn spawn(binary: &std::path::Path, args: &[String], key: &str) -> Result<Process, Box<dyn std::error::Error>> {
    let mut child = Command::new(binary)
        .args(args)
        .env(FLEET_KEY_ENV, key)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("starting {}: {err}", binary.display()))?;
    let stdout = child.stdout.take().ok_or("child has no stdout")?;
    Ok(Process {
        child,
        lines: BufReader::new(stdout).lines(),
    })
}

/// One rate offered for a while.
struct Run {
    sent: usize,
    /// Commands handed to the runtime per second, over the time it took to
    /// hand them all (the pacing thread falls behind on a busy machine).
    achieved: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    failures: Vec<String>,
    /// Every command, in the order they were due.
    samples: Vec<Sample>,
}

/// When one command was due and how it went, for reading where a tail came from.
struct Sample {
    /// Due this long after the run began.
    due: Duration,
    /// How late the pacing thread handed it to the runtime.
    handed_late: Duration,
    /// How late its task began, after it was due.
    began_late: Duration,
    /// From due to the answer, whatever the answer was.
    latency: Duration,
}

impl Run {
    /// `p50 …, p99 …, max …` of the acknowledged commands.
    fn figures(&self) -> String {
        format!(
            "p50 {}, p99 {}, max {}",
            micros(self.p50),
            micros(self.p99),
            micros(self.max)
        )
    }

    /// The samples as text: one line per command, in microseconds, under a header.
    fn samples_text(&self) -> String {
        let mut text = String::from("due_us handed_late_us began_late_us latency_us\n");
        for sample in &self.samples {
            text.push_str(&format!(
                "{} {} {} {}\n",
                sample.due.as_micros(),
                sample.handed_late.as_micros(),
                sample.began_late.as_micros(),
                sample.latency.as_micros()
            ));
        }
        text
    }
}

/// How long the load generator waits for an answer to a command's request.
const NO_ANSWER: Duration = Duration::from_secs(20);

/// Offers `rate` commands a second for `duration`, open loop, to devices in
/// turn, through `clients` in turn.
///
/// A thread of its own paces the commands with the OS's sleep, precise to
/// tens of microseconds: tokio's timers tick in whole milliseconds, so
/// pacing with them would send commands in bursts, each up to a millisecond
/// after it was due, and count that against the system measured.
async fn offer(
    clients: &[RestClient],
    rate: u32,
    duration: Duration,
    devices: usize,
    round: usize,
) -> Result<Run, Box<dyn std::error::Error>> {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let clients = clients.to_vec();
    let runtime = tokio::runtime::Handle::current();
    let (sending, tasks) = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        let mut tasks = Vec::with_capacity(total);
        for n in 0..total {
            let due = start + interval.mul_f64(n as f64);
            if let Some(ahead) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(ahead);
            }
            let client = clients[n % clients.len()].clone();
            let device = format!("dev-{:06}", n % devices);
            let on = (n / devices + round) % 2 == 0;
            let handed_late = due.elapsed();
            tasks.push(runtime.spawn(async move {
                let began_late = due.elapsed();
                // The server answers within its 10 s wait; a request it never
                // answers (lost in an overflowing listen queue) fails here
                // instead of holding the run up.
                let outcome = match tokio::time::timeout(NO_ANSWER, client.toggle_and_wait(&device, on)).await {
                    Ok(outcome) => outcome.map(|record| {
                        let state = record["state"].as_str().unwrap_or("?").to_owned();
                        (state, record)
                    }),
                    Err(_) => Err(format!("no answer within {NO_ANSWER:?}")),
                };
                let sample = Sample {
                    due: due.duration_since(start),
                    handed_late,
                    began_late,
                    latency: due.elapsed(),
                };
                (sample, outcome.map_err(|err| format!("{device}: {err}")))
            }));
        }
        (start.elapsed(), tasks)
    })
    .await?;
    let mut latencies = Vec::with_capacity(total);
    let mut failures = Vec::new();
    let mut samples = Vec::with_capacity(total);
    for task in tasks {
        let (sample, outcome) = task.await?;
        match outcome {
            Ok((state, _)) if state == "acked" => latencies.push(sample.latency),
            Ok((state, record)) => failures.push(format!("ended {state}: {record}")),
            Err(err) => failures.push(err),
        }
        samples.push(sample);
    }
    latencies.sort();
    Ok(Run {
        sent: total,
        achieved: total as f64 / sending.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        failures,
        samples,
    })
}
