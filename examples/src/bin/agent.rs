//! A device agent: connects to a supervisor over gRPC (failing over between
//! several), answers commands, and applies configuration to Fluent Bit.
//!
//! ```text
//! OPAMP_FLEET_KEY=… cargo run -p opamp-examples --bin opamp-agent -- \
//!     --server http://127.0.0.1:4320 --server http://127.0.0.1:4321 \
//!     --device device-5 --agent-type fluentbit --label ring=canary \
//!     --fluent-bit-config-dir /etc/fluent-bit
//! ```
//!
//! With `--applier memory` it keeps configurations in memory instead, to try
//! it without Fluent Bit. Stops on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use opamp_core::runtime::agent::{Agent, AgentConfig, ConfigApplier, MemoryApplier};
use opamp_core::runtime::fluent_bit::{DEFAULT_RELOAD_URL, FluentBitApplier, FluentBitConfig};
use opamp_core::transport::{AgentConnector, Capabilities, DeviceHello, FailoverConnector};
use opamp_core::{AgentType, DeviceId, Error, Labels};
use opamp_examples::cli::{
    FLEET_KEY_ENV, exit_code, fleet_key_from_env, parse_duration, parse_label, read_pem, shutdown_signal,
};
use opamp_examples::logging::LogArgs;
use opamp_transport::auth::DeviceToken;
use opamp_transport::grpc::{ClientTls, GrpcConnector, GrpcConnectorConfig};
use opamp_transport::websocket::{OpampConnector, OpampConnectorConfig};
use tracing::info;

/// A device agent: registers with a supervisor, answers commands, applies configuration.
#[derive(Debug, Parser)]
#[command(name = "opamp-agent", version)]
struct Args {
    /// A supervisor's URL: gRPC as http://host:port (https:// with --tls-ca), or
    /// OpAMP as ws://host:port/v1/opamp (WebSocket) or opamp+http://host:port/v1/opamp
    /// (plain HTTP polling), over TLS as wss:// and opamp+https:// (trusting
    /// --tls-ca, or the public roots without it). Repeat it for failover: the agent tries them in turn
    /// when a connection is lost.
    #[arg(
        long = "server",
        value_name = "URL",
        env = "OPAMP_SERVERS",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,
    /// How often an `opamp+http://` agent polls (commands wait for the next poll).
    #[arg(long, env = "OPAMP_POLL_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    poll_interval: Duration,
    /// This device's id.
    #[arg(long, env = "OPAMP_DEVICE_ID")]
    device: DeviceId,
    /// The kind of agent this device runs (what configuration templates it takes).
    #[arg(long, env = "OPAMP_AGENT_TYPE", default_value = "fluentbit")]
    agent_type: AgentType,
    /// A label, key=value; repeat it for more. Config updates select devices by labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The device token; by default derived from the fleet key in OPAMP_FLEET_KEY.
    /// Not needed with a client certificate (--tls-cert).
    #[arg(long, env = "OPAMP_DEVICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA (PEM) the supervisors' certificates chain to; connects over TLS when given.
    #[arg(long, env = "OPAMP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name to check the supervisors' certificates against, when not the URL's host.
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// This device's certificate chain (PEM), for supervisors that authenticate by certificate.
    #[arg(long, env = "OPAMP_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This device's private key (PEM).
    #[arg(long, env = "OPAMP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// What applies pushed configuration: `fluent-bit` (files and a hot reload) or `memory`
    /// (kept in memory, for trying it without Fluent Bit).
    #[arg(long, value_enum, env = "OPAMP_APPLIER", default_value = "fluent-bit")]
    applier: Applier,
    /// The directory Fluent Bit reads its configuration from (--applier fluent-bit).
    #[arg(long, env = "OPAMP_FLUENT_BIT_CONFIG_DIR", required_if_eq("applier", "fluent-bit"))]
    fluent_bit_config_dir: Option<PathBuf>,
    /// Fluent Bit's hot-reload endpoint.
    #[arg(long, env = "OPAMP_FLUENT_BIT_RELOAD_URL", default_value = DEFAULT_RELOAD_URL)]
    fluent_bit_reload_url: String,
    /// How long a reload may take before the push counts as failed (and is rolled back).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    fluent_bit_reload_timeout: Duration,
    /// How often to send a heartbeat.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    heartbeat: Duration,
    /// The first reconnect delay, doubled after each failure.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    backoff_min: Duration,
    /// The longest reconnect delay.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    backoff_max: Duration,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Applier {
    /// Writes the files into --fluent-bit-config-dir and asks Fluent Bit to reload.
    FluentBit,
    /// Keeps the configuration in memory.
    Memory,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code("opamp-agent", run(Args::parse()).await)
}

async fn run(args: Args) -> opamp_core::Result<()> {
    args.log.init()?;
    let connector = connector(&args)?;
    let applier: Arc<dyn ConfigApplier> = match args.applier {
        Applier::Memory => Arc::new(MemoryApplier::new()),
        Applier::FluentBit => {
            let dir = args
                .fluent_bit_config_dir
                .clone()
                .ok_or_else(|| Error::invalid_input("--applier fluent-bit needs --fluent-bit-config-dir"))?;
            let config = FluentBitConfig::new(dir)
                .reload_url(args.fluent_bit_reload_url.clone())
                .reload_timeout(args.fluent_bit_reload_timeout);
            Arc::new(FluentBitApplier::new(config)?)
        }
    };

    let mut hello = DeviceHello::new(args.device);
    hello.agent_type = Some(args.agent_type);
    hello.labels = args.labels.iter().cloned().collect::<Labels>();
    hello.capabilities = Capabilities::all_builtin();
    let config = AgentConfig::new(hello)
        .heartbeat_interval(args.heartbeat)
        .backoff(args.backoff_min, args.backoff_max);
    let agent = Agent::new(config, connector, applier);

    // The runtime logs commands and pushes; the session's ups and downs are logged here.
    let mut connected = agent.connected();
    let device = args.device;
    tokio::spawn(async move {
        let mut was = false;
        // Every failed attempt sends `false` again; only transitions are logged.
        while connected.changed().await.is_ok() {
            let now = *connected.borrow_and_update();
            if now != was {
                info!(%device, connected = now, "{}", if now { "connected" } else { "disconnected" });
                was = now;
            }
        }
    });
    info!(%device, servers = ?args.servers, applier = ?args.applier, "agent starting");
    agent
        .run(async {
            let signal = shutdown_signal().await;
            info!(%device, signal, "shutting down");
        })
        .await;
    info!(%device, "stopped");
    Ok(())
}

/// An OpAMP connector for a `ws://`, `wss://`, `opamp+http://` or
/// `opamp+https://` URL; none for other URLs.
fn opamp_connector(
    url: &str,
    device: &DeviceId,
    token: Option<&DeviceToken>,
    tls: Option<&ClientTls>,
    poll_interval: Duration,
) -> opamp_core::Result<Option<Arc<dyn AgentConnector>>> {
    let mut config = if url.starts_with("ws://") || url.starts_with("wss://") {
        OpampConnectorConfig::new(url)
    } else if let Some(rest) = url.strip_prefix("opamp+") {
        OpampConnectorConfig::new(rest).http(poll_interval)
    } else {
        return Ok(None);
    };
    let secure = url.starts_with("wss://") || url.starts_with("opamp+https://");
    match (tls, secure) {
        (Some(tls), true) => config = config.tls(tls.clone()),
        (Some(_), false) => {
            return Err(Error::invalid_input(format!(
                "--server {url}: --tls-ca is given, so use wss:// or opamp+https://"
            )));
        }
        // The public roots vouch for the server.
        (None, _) => {}
    }
    // Basic `<device>:<token>` proves the device on every request, polls
    // included; a client certificate (--tls-cert) proves it on its own.
    if let Some(token) = token {
        config = config.basic(device.as_str(), token.as_str());
    } else if tls.is_none_or(|tls| tls.identity.is_none()) {
        return Err(Error::invalid_input(format!(
            "--server {url}: OpAMP agents need a fleet token ({FLEET_KEY_ENV} or --token) or a client certificate"
        )));
    }
    Ok(Some(Arc::new(OpampConnector::new(config)?)))
}

/// One connector per `--server` (gRPC or OpAMP by its scheme), tried in turn.
fn connector(args: &Args) -> opamp_core::Result<Arc<dyn AgentConnector>> {
    let token = match (&args.token, fleet_key_from_env()?) {
        (Some(token), _) => Some(DeviceToken::new(token.clone())),
        (None, Some(key)) => Some(key.token(&args.device)),
        (None, None) if args.tls_cert.is_some() => None,
        (None, None) => {
            return Err(Error::invalid_input(format!(
                "no credential: set {FLEET_KEY_ENV} (the fleet key the device token is derived from), \
                 --token, or --tls-cert and --tls-key"
            )));
        }
    };
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let mut tls = ClientTls::new(read_pem(ca, "--tls-ca")?);
            if let Some(domain) = &args.tls_domain {
                tls = tls.domain(domain.clone());
            }
            if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                tls = tls.identity(read_pem(cert, "--tls-cert")?, read_pem(key, "--tls-key")?);
            }
            Some(tls)
        }
    };
    let connectors = args
        .servers
        .iter()
        .map(|url| {
            if let Some(opamp) = opamp_connector(url, &args.device, token.as_ref(), tls.as_ref(), args.poll_interval)? {
                return Ok(opamp);
            }
            let mut config = GrpcConnectorConfig::new(url.clone());
            if let Some(token) = &token {
                config = config.token(token.clone());
            }
            if let Some(tls) = &tls {
                config = config.tls(tls.clone());
            }
            Ok(Arc::new(GrpcConnector::new(config)?) as Arc<dyn AgentConnector>)
        })
        .collect::<opamp_core::Result<Vec<_>>>()?;
    Ok(Arc::new(FailoverConnector::new(connectors)?))
}
