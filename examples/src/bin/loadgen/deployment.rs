//! `deployment`: the design's Phase 3 on this machine (issue #10), measured.
//!
//! Starts [`Deployment`] (Redis, tansu, servers, supervisors, device
//! simulators as processes) and measures, in this order:
//! 1. the connection storm: every simulator starts all its devices at once;
//!    the time until every device is claimed in the store;
//! 2. end-to-end command latency (REST call to ack recorded) through Redis and
//!    Kafka, offered open loop to the servers in turn;
//! 3. failover: `kill -9` of one supervisor, then the time until every device
//!    is routed to a live supervisor again.
//!
//! With `--hold` it measures nothing: it prints where everything listens and
//! keeps the deployment up until stdin closes or Ctrl-C (`scripts/deployment`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use opamp_core::DeviceId;
use opamp_core::runtime::supervisor::OutcomeEvents;
use opamp_examples::cli::parse_duration;
use opamp_examples::deployment::{BrokerStorage, Deployment, DeploymentConfig};

use crate::{micros, offer, parse_seconds};

#[derive(Debug, clap::Args)]
pub(crate) struct DeploymentArgs {
    /// Where the logs and the broker's data go (emptied first).
    #[arg(long, default_value = "/tmp/opamp-deployment")]
    dir: PathBuf,
    /// `opamp-server` processes.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// `opamp-supervisor` processes.
    #[arg(long, default_value_t = 5)]
    supervisors: usize,
    /// Simulated devices, in all.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Simulator processes sharing them.
    #[arg(long, default_value_t = 2)]
    simulators: usize,
    /// Commands per second offered for the latency figure.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long that rate is offered, in seconds.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    seconds: Duration,
    /// Where the broker keeps its log: `sqlite` (kept across a restart) or
    /// `memory` (lost with the broker, and far cheaper for tansu to serve).
    #[arg(long, value_enum, default_value_t = BrokerStorage::Sqlite)]
    broker_storage: BrokerStorage,
    /// Which command outcomes the supervisors publish as events: `all`, or
    /// `unrecorded` (only first timeouts: the supervisors record outcomes themselves).
    #[arg(long, default_value_t = OutcomeEvents::Unrecorded)]
    outcome_events: OutcomeEvents,
    /// How long fetches of events and config updates wait (no command waits on them).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    background_fetch_wait: Duration,
    /// Partitions of the commands topic.
    #[arg(long, default_value_t = 16)]
    commands_partitions: u32,
    /// Keep the deployment up (no measurements) until stdin closes.
    #[arg(long)]
    hold: bool,
}

pub(crate) async fn run(args: DeploymentArgs) -> Result<(), Box<dyn std::error::Error>> {
    let _ = std::fs::remove_dir_all(&args.dir);
    let bin_dir = std::env::current_exe()?
        .parent()
        .ok_or("the binary has no folder")?
        .to_path_buf();
    let config = DeploymentConfig::new(&args.dir, bin_dir)
        .size(args.servers, args.supervisors, args.devices, args.simulators)
        .broker_storage(args.broker_storage)
        .outcome_events(args.outcome_events)
        .background_fetch_wait(args.background_fetch_wait)
        .commands_partitions(args.commands_partitions);
    let lease = config.lease_ttl;
    let mut deployment = Deployment::start(config).await?;
    let connected = deployment.connected_in;
    let store = opamp_examples::open_store(&deployment.store_url().parse()?).await?;
    let devices: Vec<DeviceId> = deployment
        .devices()
        .iter()
        .map(|device| DeviceId::new(device.as_str()))
        .collect::<Result<_, _>>()?;
    let routable = |live: Vec<String>| {
        let (store, devices) = (store.clone(), devices.clone());
        async move {
            loop {
                if let Ok(owners) = store.lookup_many(&devices).await
                    && owners
                        .iter()
                        .all(|owner| owner.as_ref().is_some_and(|owner| live.contains(&owner.to_string())))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Timed from the simulators' start: a device is claimed before its
    // session is up, so this check only confirms it (an upper bound).
    let polling = Instant::now();
    routable(deployment.live_supervisors()).await;
    let claimed = connected + polling.elapsed();
    println!(
        "deployment up in {}: {} servers, {} supervisors, {} devices connected {} after their simulators started",
        args.dir.display(),
        args.servers,
        args.supervisors,
        args.devices,
        micros(claimed)
    );
    for (n, server) in deployment.live_servers().iter().enumerate() {
        println!("  server-{n}: {} (REST, dashboard at /)", server.base());
    }
    println!(
        "  store {}\n  bus {}\n  API token {}",
        deployment.store_url(),
        deployment.bus_url(),
        deployment.api_secret()
    );
    if args.hold {
        println!(
            "holding until stdin closes (Ctrl-D) or Ctrl-C; logs in {}",
            args.dir.display()
        );
        tokio::select! {
            _ = crate::wait_for_stdin_eof() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        deployment.stop().await?;
        return Ok(());
    }

    let servers = deployment.live_servers();
    offer(&servers, args.rate, Duration::from_secs(2), args.devices, 0).await?;
    let run = offer(&servers, args.rate, args.seconds, args.devices, 1).await?;
    println!(
        "latency at {}/s: {} commands, {:.0}/s achieved, {}, {} not acked",
        args.rate,
        run.sent,
        run.achieved,
        run.figures(),
        run.failures.len()
    );
    for failure in run.failures.iter().take(3) {
        println!("    {failure}");
    }

    let killed = Instant::now();
    deployment.kill_supervisor(0).await?;
    routable(deployment.live_supervisors()).await;
    let failover = killed.elapsed();
    let moved = args.devices / args.supervisors;
    println!(
        "failover: every device routable again {} after kill -9 of supervisor-0 (~{moved} devices moved)",
        micros(failover)
    );
    let reports = deployment.stop().await?;
    for report in &reports {
        println!("  {report}");
    }

    println!(
        "\nPhase 3 on loopback: {} servers, {} supervisors, {} devices over gRPC, Redis + tansu (Kafka protocol, log in {:?}, {} command partitions), {}s leases, outcome events {}, background fetch wait {:?}:\n",
        args.servers,
        args.supervisors,
        args.devices,
        args.broker_storage,
        args.commands_partitions,
        lease.as_secs(),
        args.outcome_events,
        args.background_fetch_wait
    );
    println!("| measure | figure | target |");
    println!("|---|---|---|");
    println!(
        "| connection storm: {} devices at once, every one claimed | {} (sessions up: {}) | ≤ 5 s |",
        args.devices,
        micros(claimed),
        micros(connected)
    );
    println!(
        "| command latency at {}/s offered ({:.0}/s achieved, {} commands, {} not acked) | {} | p99 ≤ 25 ms |",
        args.rate,
        run.achieved,
        run.sent,
        run.failures.len(),
        run.figures()
    );
    println!(
        "| failover: kill -9 of a supervisor holding ~{moved} devices until every device routable | {} | ≤ 10 s for 2,000 |",
        micros(failover)
    );
    Ok(())
}
