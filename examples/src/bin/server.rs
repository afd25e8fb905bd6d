//! The control-plane server: the REST API, the dashboard, health probes and
//! Prometheus metrics over a [`ControlPlane`].
//!
//! ```text
//! OPAMP_API_TOKENS=ops:operator:$(head -c 24 /dev/urandom | base64) \
//! cargo run -p opamp-examples --bin opamp-server -- \
//!     --listen 127.0.0.1:8080 --store redis://127.0.0.1:6379/ --bus kafka://127.0.0.1:9092
//! ```
//!
//! Stateless: run as many as you like on the same store and bus. With
//! `--grpc-listen` it also runs a supervisor in the same process, so a single
//! process on `memory://` backends is a whole (small) deployment.
//!
//! Prints `listening ADDR` (and `grpc ADDR` with `--grpc-listen`) on one
//! stdout line once it serves, then the made-up operator token if no
//! `--tokens` were given; stops gracefully on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;
use clap::Parser;
use opamp_core::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use opamp_core::runtime::supervisor::{Supervisor, SupervisorConfig};
use opamp_core::{DeviceTransport, Error, SupervisorId};
use opamp_examples::cli::TlsArgs;
use opamp_examples::cli::{FLEET_KEY_ENV, exit_code, fleet_key_from_env, parse_duration, parse_flag, shutdown_signal};
use opamp_examples::logging::LogArgs;
use opamp_examples::{BusUrl, StoreUrl, open_bus, open_store};
use opamp_transport::grpc::{DeviceAuth, GrpcServerConfig, GrpcTransport};
use opamp_transport::http_api::{self, ApiConfig, ApiToken, RateLimit, Role, ServeConfig};
use opamp_transport::websocket::{OpampAuth, OpampServerConfig, OpampTransport};
use tracing::{info, warn};

/// Serves the REST API and the dashboard over a control plane.
#[derive(Debug, Parser)]
#[command(name = "opamp-server", version)]
struct Args {
    /// Where the REST API, the dashboard, `/health/*` and `/metrics` listen.
    #[arg(long, env = "OPAMP_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The store: `memory://`, `redis://host:port[/db]`, `redis+cluster://host:port,…`, `redis+sentinel://host:port,…/master-name` or `postgres://…`.
    #[arg(long, env = "OPAMP_STORE", hide_env_values = true, default_value = "memory://")]
    store: String,
    /// The bus: `memory://` or `kafka://host:port[,host:port][?…]`.
    #[arg(long, env = "OPAMP_BUS", hide_env_values = true, default_value = "memory://")]
    bus: String,
    /// API tokens, comma separated, each `NAME:ROLE:SECRET` with ROLE `operator` or
    /// `read-only` and a secret of 16+ characters. Without any, one operator token
    /// is made up and printed.
    #[arg(long, env = "OPAMP_API_TOKENS", hide_env_values = true)]
    tokens: Option<String>,
    /// Requests per second each token may make (and twice that in a burst).
    #[arg(long, env = "OPAMP_API_RATE", default_value_t = 200.0)]
    rate: f64,
    /// How long a device has to acknowledge a command.
    #[arg(long, env = "OPAMP_COMMAND_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    command_timeout: Duration,
    /// Also run a supervisor in this process, serving gRPC devices here
    /// (fleet key from OPAMP_FLEET_KEY).
    #[arg(long, env = "OPAMP_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// Also serve OpAMP agents (WebSocket and plain HTTP, `/v1/opamp`) with that
    /// supervisor; device ids from `service.instance.id`, fleet tokens as credentials.
    #[arg(long, env = "OPAMP_OPAMP_LISTEN", requires = "grpc_listen")]
    opamp_listen: Option<SocketAddr>,
    /// A certificate chain (PEM): HTTPS for the API, and TLS on that
    #[command(flatten)]
    tls: TlsArgs,
    /// The id of that supervisor.
    #[arg(long, env = "OPAMP_SUPERVISOR_ID", default_value = "server-supervisor")]
    supervisor_id: SupervisorId,
    /// Start even if the store lost its data (it has no generation while the
    /// bus holds commands sent before): what it held is given up, and a new
    /// generation begins. Without it the server refuses to start, saying so.
    #[arg(long, env = "OPAMP_ACCEPT_STORE_LOSS")]
    accept_store_loss: bool,
    /// How long a graceful shutdown waits for each part.
    #[arg(long, env = "OPAMP_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    shutdown_grace: Duration,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code("opamp-server", run(Args::parse()).await)
}

async fn run(args: Args) -> opamp_core::Result<()> {
    args.log.init()?;
    let store_url: StoreUrl = parse_flag("--store", &args.store)?;
    let bus_url: BusUrl = parse_flag("--bus", &args.bus)?;
    let (tokens, made_up) = match &args.tokens {
        Some(tokens) => (parse_tokens(tokens)?, None),
        None => {
            let (token, secret) = made_up_token()?;
            (vec![token], Some(secret))
        }
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| Error::unavailable(format!("installing the Prometheus recorder: {err}")))?;

    info!(store = ?store_url, bus = ?bus_url, "opening the store and the bus");
    let store = open_store(&store_url).await?;
    let bus = open_bus(&bus_url).await?;
    let config = ControlPlaneConfig::default()
        .command_timeout(args.command_timeout)
        .accept_store_loss(args.accept_store_loss);
    let control = ControlPlane::start(config, store.clone(), bus.bus()).await?;

    let tls = args.tls.server_tls()?;
    let supervisor = match args.grpc_listen {
        None => None,
        Some(listen) => {
            let key = fleet_key_from_env()?.ok_or_else(|| {
                Error::invalid_input(format!(
                    "--grpc-listen needs the fleet key (base64, 16+ bytes) in {FLEET_KEY_ENV}"
                ))
            })?;
            let mut grpc = GrpcServerConfig::new(listen, DeviceAuth::FleetToken(key.clone()));
            if let Some(tls) = &tls {
                grpc = grpc.tls(tls.clone());
            }
            let transport = Arc::new(GrpcTransport::bind(grpc).await?);
            let mut transports = vec![transport.clone() as Arc<dyn DeviceTransport>];
            let opamp = match args.opamp_listen {
                Some(listen) => {
                    let mut config = OpampServerConfig::new(listen, OpampAuth::FleetToken(key));
                    if let Some(tls) = &tls {
                        config = config.tls(tls.clone());
                    }
                    let opamp = Arc::new(OpampTransport::bind(config).await?);
                    transports.push(opamp.clone() as Arc<dyn DeviceTransport>);
                    Some(opamp)
                }
                None => None,
            };
            let running = Supervisor::new(SupervisorConfig::new(args.supervisor_id), store, bus.bus())
                .start(transports)
                .await?;
            info!(supervisor = %args.supervisor_id, listen = %transport.local_addr(), "serving devices over gRPC");
            Some((running, transport, opamp))
        }
    };

    let mut api = ApiConfig::new().rate_limit(RateLimit::new(args.rate, (args.rate * 2.0).ceil() as u32)?);
    for token in tokens {
        api = api.token(token);
    }
    let app = http_api::router(control.clone(), api.metrics(metrics))?;
    let listener = http_api::listen(args.listen, http_api::DEFAULT_BACKLOG)
        .await
        .map_err(|err| Error::unavailable(format!("--listen {}: cannot listen: {err}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|err| Error::unavailable(format!("--listen {}: {err}", args.listen)))?;
    info!(listen = %local, "serving the REST API and the dashboard");
    // The line scripts and tests wait for, with the ports chosen.
    match &supervisor {
        Some((_, transport, Some(opamp))) => {
            println!(
                "listening {local} grpc {} opamp {}",
                transport.local_addr(),
                opamp.local_addr()
            )
        }
        Some((_, transport, None)) => println!("listening {local} grpc {}", transport.local_addr()),
        None => println!("listening {local}"),
    }
    if let Some(secret) = made_up {
        // The one way to learn it: printed once, on stdout.
        println!("operator token: {secret}");
    }

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = match &tls {
        Some(tls) => ServeConfig::default().tls(tls)?,
        None => ServeConfig::default(),
    };
    let api_tls = serve.tls_reloader();
    let http = tokio::spawn(http_api::serve(listener, app, serve, async {
        let _ = http_stopped.await;
    }));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut reloads = opamp_examples::cli::reload_signals();
    let signal = loop {
        tokio::select! {
            signal = &mut shutdown => break signal,
            Some(()) = reloads.recv() => {
                let (grpc, opamp) = match &supervisor {
                    Some((_, grpc, opamp)) => (Some(grpc.as_ref()), opamp.as_deref()),
                    None => (None, None),
                };
                reload_tls(&args, api_tls.as_deref(), grpc, opamp);
            }
        }
    };
    info!(
        signal,
        "shutting down: HTTP, then the supervisor, the bus and the control plane"
    );
    let _ = stop_http.send(());
    match tokio::time::timeout(args.shutdown_grace, http).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => warn!(error = %err, "the HTTP server task failed"),
        Err(_) => warn!("requests still open after the shutdown grace; dropping them"),
    }
    if let Some((running, transport, opamp)) = supervisor {
        running.shutdown().await;
        transport.shutdown(args.shutdown_grace).await;
        if let Some(opamp) = opamp {
            opamp.shutdown(args.shutdown_grace).await;
        }
    }
    // The bus first: events it already fetched drain into the running control plane.
    if let Err(err) = bus.shutdown(args.shutdown_grace).await {
        warn!(error = %err, "the bus did not shut down cleanly");
    }
    control.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Reads the TLS files again and serves them to new connections on every
/// listener (SIGHUP); what does not load is logged and the old ones stay.
fn reload_tls(
    args: &Args,
    api: Option<&opamp_transport::tls::Reloadable>,
    grpc: Option<&GrpcTransport>,
    opamp: Option<&OpampTransport>,
) {
    let tls = match args.tls.server_tls() {
        Ok(Some(tls)) => tls,
        Ok(None) => return info!("SIGHUP: no TLS to reload"),
        Err(err) => return warn!(error = %err, "SIGHUP: the TLS files do not load; serving the old ones"),
    };
    let reloaded = api
        .map_or(Ok(()), |api| api.reload(&tls))
        .and_then(|()| grpc.map_or(Ok(()), |grpc| grpc.reload_tls(&tls)))
        .and_then(|()| opamp.map_or(Ok(()), |opamp| opamp.reload_tls(&tls)));
    match reloaded {
        Ok(()) => info!("SIGHUP: TLS certificate reloaded; new connections get it"),
        Err(err) => warn!(error = %err, "SIGHUP: the TLS files do not load; serving the old ones"),
    }
}

/// `NAME:ROLE:SECRET,…`; errors name the entry (never its secret).
fn parse_tokens(text: &str) -> opamp_core::Result<Vec<ApiToken>> {
    let mut tokens = Vec::new();
    for (n, entry) in text
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .enumerate()
    {
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::invalid_input(format!(
                "--tokens entry {}: expected NAME:ROLE:SECRET",
                n + 1
            )));
        };
        let role = match role {
            "operator" => Role::Operator,
            "read-only" => Role::ReadOnly,
            other => {
                return Err(Error::invalid_input(format!(
                    "--tokens entry {} ({name}): role {other:?} is neither operator nor read-only",
                    n + 1
                )));
            }
        };
        tokens.push(ApiToken::new(name, secret, role).map_err(|err| match err {
            Error::InvalidInput { message } => {
                Error::invalid_input(format!("--tokens entry {} ({name}): {message}", n + 1))
            }
            other => other,
        })?);
    }
    if tokens.is_empty() {
        return Err(Error::invalid_input("--tokens names no token"));
    }
    Ok(tokens)
}

/// A random operator token, and its secret to print.
fn made_up_token() -> opamp_core::Result<(ApiToken, String)> {
    let mut bytes = [0_u8; 24];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    let secret = BASE64.encode(bytes);
    Ok((ApiToken::new("operator", secret.clone(), Role::Operator)?, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_errors_name_the_entry_not_the_secret() {
        let tokens = parse_tokens("ops:operator:0123456789abcdef, view:read-only:fedcba9876543210").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!((tokens[1].name(), tokens[1].role()), ("view", Role::ReadOnly));
        let err = parse_tokens("ops:admin:0123456789abcdef").unwrap_err().to_string();
        assert!(err.contains("entry 1 (ops)") && err.contains("admin"), "{err}");
        let err = parse_tokens("ops:operator:short-secret").unwrap_err().to_string();
        assert!(err.contains("entry 1 (ops)") && !err.contains("short-secret"), "{err}");
        assert!(parse_tokens("nocolons").is_err());
        assert!(parse_tokens(" , ").is_err());
    }

    #[test]
    fn made_up_tokens_are_accepted_and_distinct() {
        let (a, secret_a) = made_up_token().unwrap();
        let (_, secret_b) = made_up_token().unwrap();
        assert_eq!(a.role(), Role::Operator);
        assert_ne!(secret_a, secret_b);
        assert_eq!(secret_a.len(), 32);
    }
}
