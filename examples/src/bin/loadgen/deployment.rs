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

use opamp_core::runtime::supervisor::OutcomeEvents;
use opamp_core::{CommandKind, DeviceId};
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
    /// How long fetches of commands wait (tansu holds each fetch that long).
    #[arg(long, value_parser = parse_duration, default_value = "5ms")]
    commands_fetch_wait: Duration,
    /// Tokio worker threads in each process but Redis (0: one per core).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// How long fetches of events and config updates wait (no command waits on them).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    background_fetch_wait: Duration,
    /// The supervisors' lease (renewed every third of it).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    lease_ttl: Duration,
    /// Partitions of the commands topic.
    #[arg(long, default_value_t = 16)]
    commands_partitions: u32,
    /// Keep the deployment up (no measurements) until stdin closes.
    #[arg(long)]
    hold: bool,
    /// Writes every command of the measured run to `DIR/latency-RATE.txt`:
    /// when it was due, how late it was sent, and its latency.
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
}

/// The `quantile` of a summary `name` for commands of `kind`, in seconds,
/// from Prometheus text.
fn summary_quantile(metrics: &str, name: &str, kind: &str, quantile: &str) -> Option<f64> {
    let wanted = [format!("kind=\"{kind}\""), format!("quantile=\"{quantile}\"")];
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let labels = series.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}')?;
        let ours = wanted.iter().all(|label| labels.split(',').any(|here| here == label));
        ours.then(|| value.parse().ok())?
    })
}

/// Seconds as milliseconds, or a dash when there are none.
fn millis_or_dash(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |seconds| format!("{:.1} ms", seconds * 1000.0))
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
        .commands_fetch_wait(args.commands_fetch_wait)
        .worker_threads(Some(args.worker_threads).filter(|threads| *threads > 0))
        .commands_partitions(args.commands_partitions);
    let command_timeout = config.command_timeout;
    let config = config.timings(args.lease_ttl, command_timeout);
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
    if let Some(dir) = &args.samples {
        let path = dir.join(format!("latency-{}.txt", args.rate));
        std::fs::write(&path, run.samples_text()).map_err(|err| format!("writing {}: {err}", path.display()))?;
    }
    // Where the time went, as each supervisor saw it (its summaries cover about the last minute).
    println!("supervisors' view, p50 / p99: issue to taken from the bus | issue to outcome recorded");
    let toggle = CommandKind::SetEmission { state: true }.wire_name();
    for n in 0..args.supervisors {
        if let Some(metrics) = deployment.supervisor_metrics(n).await {
            let metrics = metrics?;
            let quantiles = |name: &str| {
                let [p50, p99] = ["0.5", "0.99"].map(|q| summary_quantile(&metrics, name, toggle, q));
                format!("{} / {}", millis_or_dash(p50), millis_or_dash(p99))
            };
            println!(
                "  {}: {} | {}",
                Deployment::supervisor_id(n),
                quantiles("opamp_command_pickup_seconds"),
                quantiles("opamp_command_latency_seconds")
            );
        }
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
        "\nPhase 3 on loopback: {} servers, {} supervisors, {} devices over gRPC, Redis + tansu (Kafka protocol, log in {:?}, {} command partitions), {}s leases, outcome events {}, fetch waits {:?} (commands) and {:?} (the rest), tokio worker threads per process: {}:\n",
        args.servers,
        args.supervisors,
        args.devices,
        args.broker_storage,
        args.commands_partitions,
        lease.as_secs(),
        args.outcome_events,
        args.commands_fetch_wait,
        args.background_fetch_wait,
        match args.worker_threads {
            0 => "one per core".to_owned(),
            threads => threads.to_string(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_quantile_is_read_by_its_labels() {
        let metrics = "# TYPE opamp_command_pickup_seconds summary\n\
            opamp_command_pickup_seconds{kind=\"toggle_emission\",quantile=\"0.5\"} 0.02\n\
            opamp_command_pickup_seconds{kind=\"toggle_emission\",quantile=\"0.99\"} 0.031\n\
            opamp_command_pickup_seconds{kind=\"apply_config\",quantile=\"0.5\"} 0.5\n\
            opamp_command_pickup_seconds_sum{kind=\"toggle_emission\"} 12\n\
            opamp_command_latency_seconds{kind=\"toggle_emission\",quantile=\"0.5\"} 0.04\n";
        let pickup = "opamp_command_pickup_seconds";
        assert_eq!(summary_quantile(metrics, pickup, "toggle_emission", "0.5"), Some(0.02));
        assert_eq!(
            summary_quantile(metrics, pickup, "toggle_emission", "0.99"),
            Some(0.031)
        );
        assert_eq!(summary_quantile(metrics, pickup, "apply_config", "0.5"), Some(0.5));
        assert_eq!(summary_quantile(metrics, pickup, "apply_config", "0.99"), None);
        assert_eq!(
            summary_quantile(metrics, "opamp_command_latency_seconds", "toggle_emission", "0.5"),
            Some(0.04)
        );
        assert_eq!(millis_or_dash(Some(0.0315)), "31.5 ms");
        assert_eq!(millis_or_dash(None), "-");
    }
}
