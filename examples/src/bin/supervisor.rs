//! A supervisor: holds device sessions over gRPC, executes the commands the
//! bus brings, keeps leases and status in the store.
//!
//! ```text
//! OPAMP_FLEET_KEY=$(head -c 32 /dev/urandom | base64) \
//! cargo run -p opamp-examples --bin opamp-supervisor -- \
//!     --id supervisor-1 --listen 127.0.0.1:4320 \
//!     --store redis://127.0.0.1:6379/ --bus kafka://127.0.0.1:9092
//! ```
//!
//! With `--opamp-listen` it also serves OpAMP agents (WebSocket and plain
//! HTTP), side by side with the gRPC devices.
//!
//! With `--metrics-listen` it serves `/metrics` (Prometheus text) and
//! `/health/live` over HTTP.
//!
//! Prints `listening ADDR` (then `opamp ADDR` and `metrics ADDR` when
//! asked for) on stdout once it serves devices; stops gracefully
//! on Ctrl-C or SIGTERM (the supervisor first, releasing its leases, then the
//! transport, then the bus).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use opamp_core::runtime::supervisor::{OutcomeEvents, Supervisor, SupervisorConfig};
use opamp_core::{DeviceTransport, Error, SupervisorId};
use opamp_examples::cli::TlsArgs;
use opamp_examples::cli::{FLEET_KEY_ENV, exit_code, fleet_key_from_env, parse_duration, parse_flag, shutdown_signal};
use opamp_examples::logging::LogArgs;
use opamp_examples::{BusUrl, StoreUrl, open_bus, open_store};
use opamp_transport::grpc::{DeviceAuth, GrpcServerConfig, GrpcTransport};
use opamp_transport::websocket::{DeviceIdSource, OpampAuth, OpampServerConfig, OpampTransport};
use tracing::{info, warn};

/// Serves devices over gRPC and executes the commands the bus brings.
#[derive(Debug, Parser)]
#[command(name = "opamp-supervisor", version)]
struct Args {
    /// This supervisor's id: its key on the bus and the owner named in leases. Unique in the fleet.
    #[arg(long, env = "OPAMP_SUPERVISOR_ID")]
    id: SupervisorId,
    /// Where the gRPC ControlService listens for devices (port 0 picks a free one).
    #[arg(long, env = "OPAMP_GRPC_LISTEN", default_value = "127.0.0.1:4320")]
    listen: SocketAddr,
    /// Also serve OpAMP agents (WebSocket and plain HTTP, path `/v1/opamp`)
    /// here, e.g. `127.0.0.1:4321`; needs `--auth fleet-token` (agents send
    /// `Authorization: Basic <device>:<token>` or `Bearer <token>`).
    #[arg(long, env = "OPAMP_OPAMP_LISTEN")]
    opamp_listen: Option<SocketAddr>,
    /// Where an OpAMP agent's device id comes from.
    #[arg(
        long,
        value_enum,
        env = "OPAMP_OPAMP_DEVICE_ID",
        default_value = "service-instance-id"
    )]
    opamp_device_id: OpampDeviceId,
    /// The store: `memory://`, `redis://host:port[/db]`, `redis+cluster://host:port,…`, `redis+sentinel://host:port,…/master-name` or `postgres://…`.
    // Parsed after clap, whose errors would echo the URL with its password.
    #[arg(long, env = "OPAMP_STORE", hide_env_values = true, default_value = "memory://")]
    store: String,
    /// The bus: `memory://` or `kafka://host:port[,host:port][?topic_prefix=…&replication=…]`.
    #[arg(long, env = "OPAMP_BUS", hide_env_values = true, default_value = "memory://")]
    bus: String,
    /// How devices prove who they are: `fleet-token` (the fleet key from OPAMP_FLEET_KEY)
    /// or `client-cert` (mTLS; needs --tls-cert, --tls-key and --tls-client-ca).
    #[arg(long, value_enum, env = "OPAMP_AUTH", default_value = "fleet-token")]
    auth: Auth,
    #[command(flatten)]
    tls: TlsArgs,
    /// How long a lease lasts without renewal (renewed every third of it).
    #[arg(long, env = "OPAMP_LEASE_TTL", value_parser = parse_duration, default_value = "300s")]
    lease_ttl: Duration,
    /// Commands taken from the bus and not yet finished; beyond it the supervisor stops pulling.
    #[arg(long, env = "OPAMP_MAX_IN_FLIGHT", default_value_t = 10_000)]
    max_in_flight: usize,
    /// Commands queued per device.
    #[arg(long, env = "OPAMP_DEVICE_QUEUE", default_value_t = 16)]
    device_queue: usize,
    /// How long a device has to register after opening its stream.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    register_timeout: Duration,
    /// Which command outcomes to publish as events: `all`, or `unrecorded`
    /// (only what the control plane must still act on: the supervisor records
    /// outcomes itself; halves the bus traffic of commands).
    #[arg(long, env = "OPAMP_OUTCOME_EVENTS", default_value_t = OutcomeEvents::All)]
    outcome_events: OutcomeEvents,
    /// How long a graceful shutdown waits for commands in flight, and then for the transport and the bus.
    #[arg(long, env = "OPAMP_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    shutdown_grace: Duration,
    /// Serve `GET /metrics` (Prometheus text: the outcomes this supervisor
    /// records, its devices) and `GET /health/live` here, e.g. `127.0.0.1:9464`.
    #[arg(long, env = "OPAMP_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How often to log how many devices are connected (0s: never).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    stats_interval: Duration,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OpampDeviceId {
    /// The `service.instance.id` identifying attribute of the agent description.
    ServiceInstanceId,
    /// The instance UID as 32 hex digits.
    InstanceUidHex,
    /// The instance UID as UUID text.
    InstanceUidUuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Auth {
    /// Fleet tokens derived from the fleet key.
    FleetToken,
    /// The device id is the client certificate's Common Name.
    ClientCert,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code("opamp-supervisor", run(Args::parse()).await)
}

async fn run(args: Args) -> opamp_core::Result<()> {
    args.log.init()?;
    let store_url: StoreUrl = parse_flag("--store", &args.store)?;
    let bus_url: BusUrl = parse_flag("--bus", &args.bus)?;
    let grpc = grpc_config(&args)?;

    let metrics = match args.metrics_listen {
        Some(listen) => Some(serve_metrics(listen).await?),
        None => None,
    };

    info!(store = ?store_url, bus = ?bus_url, "opening the store and the bus");
    let store = open_store(&store_url).await?;
    let bus = open_bus(&bus_url).await?;
    if store_url == StoreUrl::Memory {
        warn!(
            "memory:// store: no other process can look this supervisor's devices up; use redis:// or postgres:// for a fleet"
        );
    }
    if bus_url == BusUrl::Memory {
        warn!(
            "memory:// bus: commands can only come from this process, which sends none; use kafka:// to command devices"
        );
    }
    let opamp = match opamp_config(&args)? {
        Some(config) => Some(Arc::new(OpampTransport::bind(config).await?)),
        None => None,
    };
    let transport = Arc::new(GrpcTransport::bind(grpc).await?);
    let mut transports = vec![transport.clone() as Arc<dyn DeviceTransport>];
    if let Some(opamp) = &opamp {
        info!(listen = %opamp.local_addr(), "serving OpAMP agents over WebSocket and HTTP");
        transports.push(opamp.clone() as Arc<dyn DeviceTransport>);
    }
    let config = SupervisorConfig::new(args.id)
        .lease_ttl(args.lease_ttl)
        .max_in_flight(args.max_in_flight)
        .device_queue(args.device_queue)
        .shutdown_grace(args.shutdown_grace)
        .outcome_events(args.outcome_events);
    let running = Supervisor::new(config, store, bus.bus()).start(transports).await?;
    info!(supervisor = %args.id, listen = %transport.local_addr(), "serving devices over gRPC");
    // The line scripts and tests wait for: the addresses, with the ports chosen.
    let mut line = format!("listening {}", transport.local_addr());
    if let Some(opamp) = &opamp {
        line.push_str(&format!(" opamp {}", opamp.local_addr()));
    }
    if let Some((address, _)) = &metrics {
        line.push_str(&format!(" metrics {address}"));
    }
    println!("{line}");

    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut reloads = opamp_examples::cli::reload_signals();
    // interval() refuses zero; the guard below keeps a zero interval from ticking.
    let mut stats = tokio::time::interval(args.stats_interval.max(Duration::from_millis(1)));
    stats.tick().await;
    let signal = loop {
        tokio::select! {
            signal = &mut shutdown => break signal,
            Some(()) = reloads.recv() => reload_tls(&args, &transport, opamp.as_deref()),
            _ = stats.tick(), if !args.stats_interval.is_zero() => {
                info!(connected_devices = running.connected_devices(), "stats");
            }
        }
    };
    info!(signal, "shutting down: supervisor, then transport, then bus");
    running.shutdown().await;
    transport.shutdown(args.shutdown_grace).await;
    if let Some(opamp) = &opamp {
        opamp.shutdown(args.shutdown_grace).await;
    }
    if let Err(err) = bus.shutdown(args.shutdown_grace).await {
        warn!(error = %err, "the bus did not shut down cleanly");
    }
    if let Some((_, server)) = metrics {
        server.abort();
    }
    info!("stopped");
    Ok(())
}

/// Installs the Prometheus recorder and serves it, with a liveness probe, on
/// `listen`; the address bound (port 0 picks one) and the server's task.
async fn serve_metrics(listen: SocketAddr) -> opamp_core::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| Error::unavailable(format!("installing the Prometheus recorder: {err}")))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(handle.render())),
        )
        .route("/health/live", axum::routing::get(|| std::future::ready("ok")));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|err| Error::unavailable(format!("--metrics-listen {listen}: {err}")))?;
    let address = listener
        .local_addr()
        .map_err(|err| Error::unavailable(format!("--metrics-listen {listen}: {err}")))?;
    info!(listen = %address, "serving /metrics and /health/live");
    // Served for as long as the process runs; idle and slow scrapers are cut off.
    let server = tokio::spawn(opamp_transport::http_api::serve(
        listener,
        app,
        opamp_transport::http_api::ServeConfig::default(),
        std::future::pending(),
    ));
    Ok((address, server))
}

/// Reads --tls-cert, --tls-key and --tls-client-ca again and serves them to
/// new connections on every listener (SIGHUP); what does not load is logged
/// and the old settings stay.
fn reload_tls(args: &Args, grpc: &GrpcTransport, opamp: Option<&OpampTransport>) {
    let tls = match args.tls.server_tls() {
        Ok(Some(tls)) => tls,
        Ok(None) => return info!("SIGHUP: no TLS to reload"),
        Err(err) => return warn!(error = %err, "SIGHUP: the TLS files do not load; serving the old ones"),
    };
    let reloaded = grpc
        .reload_tls(&tls)
        .and_then(|()| opamp.map_or(Ok(()), |opamp| opamp.reload_tls(&tls)));
    match reloaded {
        Ok(()) => info!("SIGHUP: TLS certificate reloaded; new connections get it"),
        Err(err) => warn!(error = %err, "SIGHUP: the TLS files do not load; serving the old ones"),
    }
}

/// The OpAMP transport's settings, when `--opamp-listen` asks for one.
fn opamp_config(args: &Args) -> opamp_core::Result<Option<OpampServerConfig>> {
    let Some(listen) = args.opamp_listen else {
        return Ok(None);
    };
    let auth = match args.auth {
        Auth::FleetToken => OpampAuth::FleetToken(fleet_key_from_env()?.ok_or_else(|| {
            Error::invalid_input(format!(
                "--opamp-listen needs the fleet key (base64, 16+ bytes) in {FLEET_KEY_ENV}"
            ))
        })?),
        Auth::ClientCert => OpampAuth::ClientCertificate,
    };
    let source = match args.opamp_device_id {
        OpampDeviceId::ServiceInstanceId => DeviceIdSource::ServiceInstanceId,
        OpampDeviceId::InstanceUidHex => DeviceIdSource::InstanceUidHex,
        OpampDeviceId::InstanceUidUuid => DeviceIdSource::InstanceUidUuid,
    };
    let mut config = OpampServerConfig::new(listen, auth)
        .device_id(source)
        .register_timeout(args.register_timeout)
        .device_queue(args.device_queue);
    if let Some(tls) = args.tls.server_tls()? {
        config = config.tls(tls);
    }
    Ok(Some(config))
}

/// The gRPC transport's settings from the flags and OPAMP_FLEET_KEY.
fn grpc_config(args: &Args) -> opamp_core::Result<GrpcServerConfig> {
    let auth = match args.auth {
        Auth::FleetToken => match fleet_key_from_env()? {
            Some(key) => DeviceAuth::FleetToken(key),
            None => {
                return Err(Error::invalid_input(format!(
                    "--auth fleet-token needs the fleet key (base64, 16+ bytes) in {FLEET_KEY_ENV}"
                )));
            }
        },
        Auth::ClientCert if args.tls.tls_client_ca.is_none() => {
            return Err(Error::invalid_input(
                "--auth client-cert needs --tls-cert, --tls-key and --tls-client-ca",
            ));
        }
        Auth::ClientCert => DeviceAuth::ClientCertificate,
    };
    let mut config = GrpcServerConfig::new(args.listen, auth)
        .register_timeout(args.register_timeout)
        .device_queue(args.device_queue);
    if let Some(tls) = args.tls.server_tls()? {
        config = config.tls(tls);
    }
    Ok(config)
}
