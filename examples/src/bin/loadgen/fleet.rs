//! `fleet`: a device simulator for a deployment of several supervisors.
//!
//! Every device runs the real agent runtime ([`Agent`]) over gRPC: it
//! registers, heartbeats, answers commands, applies configuration into memory
//! and, when its session is lost, reconnects with backoff. Its connector
//! places it by rendezvous hashing over the supervisors it is given
//! ([`FailoverConnector::spread`]): the fleet spreads evenly, and the devices
//! of a supervisor that dies spread evenly over the others.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opamp_core::runtime::agent::{Agent, AgentConfig, MemoryApplier};
use opamp_core::transport::{AgentConnector, Capabilities, DeviceHello, FailoverConnector};
use opamp_core::{AgentType, DeviceId};
use opamp_transport::grpc::{GrpcConnector, GrpcConnectorConfig};
use tokio::sync::watch;

use crate::{fleet_key, parse_seconds, wait_for_stdin_eof};

#[derive(Debug, clap::Args)]
pub(crate) struct FleetArgs {
    /// The supervisors' gRPC URLs, comma separated, in the same order for every simulator.
    #[arg(long, value_delimiter = ',', required = true)]
    supervisors: Vec<String>,
    /// How many devices.
    #[arg(long)]
    count: usize,
    /// The number of the first device (devices are `dev-NNNNNN`).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Seconds between a device's heartbeats.
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    heartbeat: Duration,
    /// Seconds a device waits on a supervisor that does not answer before
    /// moving to the next: the interval of HTTP/2 pings on its connection
    /// and their timeout, and the limit on connecting and on registering
    /// (by default the gRPC connector's own: 30 s pings answered within
    /// 10 s, 5 s to connect, 10 s to register).
    #[arg(long, value_parser = parse_seconds)]
    patience: Option<Duration>,
    /// Seconds before a device's first reconnect attempt (doubling, with jitter).
    #[arg(long, value_parser = parse_seconds, default_value = "0.2")]
    backoff_min: Duration,
    /// The longest wait between reconnect attempts, in seconds.
    #[arg(long, value_parser = parse_seconds, default_value = "2")]
    backoff_max: Duration,
    /// The local address to connect from.
    #[arg(long)]
    source: Option<IpAddr>,
}

/// Runs the devices until stdin closes. Prints `connected N in T ms` once
/// every device has had a session, and at the end `fleet: …` with what the
/// devices did.
pub(crate) async fn run(args: FleetArgs) -> Result<(), Box<dyn std::error::Error>> {
    let key = fleet_key()?;
    let started = Instant::now();
    let (stop, stopping) = watch::channel(false);
    let agent_type = AgentType::new("fluentbit")?;
    let mut agents = Vec::with_capacity(args.count);
    let mut tasks = tokio::task::JoinSet::new();
    for n in args.first..args.first + args.count {
        let device = DeviceId::new(format!("dev-{n:06}"))?;
        let mut connectors: Vec<Arc<dyn AgentConnector>> = Vec::with_capacity(args.supervisors.len());
        for url in &args.supervisors {
            let mut config = GrpcConnectorConfig::new(url.as_str()).token(key.token(&device));
            if let Some(patience) = args.patience {
                config.keepalive_interval = patience;
                config.keepalive_timeout = patience;
                config.connect_timeout = patience;
                config.register_timeout = patience;
            }
            if let Some(source) = args.source {
                config = config.local_address(source);
            }
            connectors.push(Arc::new(GrpcConnector::new(config)?));
        }
        let mut hello = DeviceHello::new(device);
        hello.agent_type = Some(agent_type);
        hello.capabilities = Capabilities::all_builtin();
        let config = AgentConfig::new(hello)
            .heartbeat_interval(args.heartbeat)
            .backoff(args.backoff_min, args.backoff_max);
        let applier = Arc::new(MemoryApplier::new());
        let agent = Arc::new(Agent::new(
            config,
            Arc::new(FailoverConnector::spread(connectors)?),
            applier.clone(),
        ));
        let (running, mut stopping) = (agent.clone(), stopping.clone());
        tasks.spawn(async move {
            running
                .run(async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                })
                .await;
        });
        agents.push((agent, applier));
    }

    // Every device has had a session once each `connected` has been true.
    for (agent, _) in &agents {
        let mut connected = agent.connected();
        connected.wait_for(|up| *up).await?;
    }
    println!("connected {} in {} ms", agents.len(), started.elapsed().as_millis());

    wait_for_stdin_eof().await;
    let online = agents.iter().filter(|(agent, _)| *agent.connected().borrow()).count();
    stop.send_replace(true);
    while tasks.join_next().await.is_some() {}
    let applied: usize = agents.iter().map(|(_, applier)| applier.applied_count()).sum();
    let repeats: u64 = agents.iter().map(|(agent, _)| agent.repeats_answered()).sum();
    println!(
        "fleet: {} devices, {online} connected at the end, {applied} configs applied, {repeats} repeats answered without acting",
        agents.len()
    );
    Ok(())
}
