//! The whole system in one process, on in-memory backends.
//!
//! A control plane, two supervisors, N simulated devices (agents over the
//! in-process transport), the memory store and the memory bus. The demo walks
//! through the design's flows and prints what happened:
//!
//! 1. registration: every device connects, its lease is claimed, it is marked online;
//! 2. a toggle: the owner is looked up, the command goes on the bus keyed by
//!    that supervisor, the device acknowledges, the control plane records the outcome;
//! 3. a toggle of every device, with latencies;
//! 4. a configuration push to a label selector, which one device rejects;
//! 5. a rollout to the whole fleet in growing waves, which pauses on a
//!    failure and is resumed;
//! 6. a supervisor crash: its devices move to the other one, and commands follow them.
//!
//! With `--serve` it then keeps the REST API and the dashboard up (printing
//! the address and a token) until Ctrl-C.
//!
//! ```text
//! cargo run -p opamp-examples --bin opamp-demo -- --devices 2000 --serve
//! ```

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::agent::{Agent, AgentConfig, MemoryApplier};
use opamp_core::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use opamp_core::runtime::supervisor::{Supervisor, SupervisorConfig};
use opamp_core::tracking::CommandState;
use opamp_core::transport::{AgentConnector, Capabilities, DeviceHello, FailoverConnector};
use opamp_core::{
    AgentType, Bus, ConfigBundle, ConfigFile, ConfigRef, ConfigTemplate, ConfigVersion, DeviceId, Labels, PageRequest,
    RolloutSpec, RolloutState, RoutingStore, StatusStore, Store, SupervisorId, Target, Timestamp,
};
use opamp_store::memory::MemoryStore;
use opamp_transport::channel;
use opamp_transport::http_api::{self, ApiConfig, ApiToken, RateLimit, Role, ServeConfig};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Runs a small fleet in one process and walks through the design's flows.
#[derive(Debug, Parser)]
#[command(name = "opamp-demo", version)]
struct Args {
    /// How many simulated devices to connect.
    #[arg(long, default_value_t = 1000, env = "OPAMP_DEMO_DEVICES")]
    devices: usize,
    /// After the walk-through, keep serving the REST API and the dashboard
    /// until Ctrl-C.
    #[arg(long)]
    serve: bool,
    /// Where `--serve` listens.
    #[arg(long, default_value = "127.0.0.1:8080", env = "OPAMP_DEMO_LISTEN")]
    listen: std::net::SocketAddr,
    /// Log filter, e.g. `warn`, `info` or `opamp_core=debug` (logs go to stderr).
    #[arg(long, default_value = "error", env = "RUST_LOG")]
    log: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .with_writer(std::io::stderr)
        .init();
    let n = args.devices.max(2);

    let store = Arc::new(MemoryStore::new());
    let bus = Arc::new(MemoryBus::new());
    let control = ControlPlane::start(ControlPlaneConfig::default(), store.clone(), bus.clone()).await?;

    println!(
        "opamp-demo: a control plane, 2 supervisors and {n} simulated devices; in-memory store and bus, in-process transport\n"
    );

    // Two supervisors, each with its own transport.
    let mut supervisors = Vec::new();
    let mut connectors: Vec<Arc<dyn AgentConnector>> = Vec::new();
    for name in ["supervisor-1", "supervisor-2"] {
        let (transport, connector) = channel::pair(channel::ChannelConfig::default());
        let store: Arc<dyn Store> = store.clone();
        let bus: Arc<dyn Bus> = bus.clone();
        let running = Supervisor::new(SupervisorConfig::new(SupervisorId::new(name)?), store, bus)
            .start(vec![Arc::new(transport)])
            .await?;
        supervisors.push(running);
        connectors.push(Arc::new(connector));
    }

    // 1. Registration.
    println!("1. Registration");
    let started = Instant::now();
    let (stop_agents, agents_stop) = watch::channel(false);
    let mut appliers = Vec::with_capacity(n);
    for i in 0..n {
        let device = device_id(i);
        // Each device prefers one supervisor and fails over to the other.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        let failover = FailoverConnector::new(order.iter().map(|&k| connectors[k].clone()).collect())?;
        let applier = Arc::new(MemoryApplier::new());
        appliers.push(applier.clone());
        let agent = Agent::new(
            AgentConfig::new(hello(device, i)).backoff(Duration::from_millis(20), Duration::from_secs(2)),
            Arc::new(failover),
            applier,
        );
        let mut stop = agents_stop.clone();
        tokio::spawn(async move {
            agent
                .run(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await
        });
    }
    let progress = Progress::new("devices online", n);
    wait_until("every device registered", || async {
        let online = online_total(&*store).await;
        progress.show(online);
        online == n
    })
    .await?;
    progress.done();
    let took = started.elapsed();
    println!(
        "   {n} devices connected, leased and marked online in {} ({:.0} devices/s)",
        fmt(took),
        n as f64 / took.as_secs_f64()
    );
    for load in store.device_counts().await? {
        println!("   {}: {} devices", load.supervisor, load.devices);
    }

    // 2. One toggle, step by step.
    let device = device_id(42 % n);
    println!("\n2. Toggle emission of {device}");
    let lookup_started = Instant::now();
    let owner = store.lookup(&device).await?;
    let lookup_took = lookup_started.elapsed();
    println!(
        "   GET device:{{{device}}}:supervisor -> {} ({})",
        owner.map_or("none".into(), |o| o.to_string()),
        fmt(lookup_took)
    );
    let sent = Instant::now();
    let id = control.set_emission(&device, true).await?;
    let record = control.wait(&id, WAIT).await?;
    let status = store.status(&device).await?.ok_or("no status")?;
    println!(
        "   command {id} sent to {}: {} in {}; the store now says emission={}",
        record.supervisor.map_or("nobody".into(), |s| s.to_string()),
        record.state,
        fmt(sent.elapsed()),
        status.emission
    );

    // 3. Toggle every device.
    println!("\n3. Toggle emission of every device ({n} commands, all sent at once)");
    let started = Instant::now();
    let mut pending = JoinSet::new();
    for i in 0..n {
        let control = control.clone();
        pending.spawn(async move {
            let sent = Instant::now();
            let id = control.set_emission(&device_id(i), i % 3 != 0).await?;
            let record = control.wait(&id, WAIT).await?;
            Ok::<_, opamp_core::Error>((record.state, sent.elapsed()))
        });
    }
    let mut latencies = Vec::with_capacity(n);
    let mut by_state: BTreeMap<CommandState, usize> = BTreeMap::new();
    for result in pending.join_all().await {
        let (state, latency) = result?;
        *by_state.entry(state).or_default() += 1;
        latencies.push(latency);
    }
    let took = started.elapsed();
    latencies.sort();
    println!(
        "   {} in {} ({:.0} commands/s); issue to outcome recorded: p50 {}, p99 {}, max {}",
        summarize(&by_state),
        fmt(took),
        n as f64 / took.as_secs_f64(),
        fmt(percentile(&latencies, 0.50)),
        fmt(percentile(&latencies, 0.99)),
        fmt(*latencies.last().unwrap_or(&Duration::ZERO)),
    );

    // 4. A configuration push to one site, which one device rejects.
    let v1 = ConfigRef::new(AgentType::new("fluentbit")?, ConfigVersion::new("v1.0.0")?);
    let bundle = ConfigBundle::new().with_file(
        "fluent-bit.conf",
        ConfigFile::new("text/plain", "[SERVICE]\n    hot_reload On\n[INPUT]\n    name cpu\n"),
    )?;
    control
        .create_template(&ConfigTemplate::new(v1, bundle.clone(), "demo", Timestamp::now()))
        .await?;
    let rejecting = 4 % n;
    appliers[rejecting].reject_with(Some("fluent-bit reload answered {\"status\":1}".into()));
    let site = Labels::from([("site".to_owned(), "campus-0".to_owned())]);
    println!(
        "\n4. Push template {v1} (hash {}…) to every fluentbit device at site=campus-0; {} rejects it",
        &bundle.hash().to_string()[..12],
        device_id(rejecting)
    );
    let target = Target::Selector {
        agent_type: v1.agent_type,
        labels: site,
    };
    let issued = control.apply_config(&target, &v1).await?;
    let mut by_state: BTreeMap<CommandState, usize> = BTreeMap::new();
    for command in &issued {
        let record = control.wait(&command.correlation_id, WAIT).await?;
        *by_state.entry(record.state).or_default() += 1;
        if let Some(reason) = &record.reason {
            println!("   {} {}: {reason}", command.device, record.state);
        }
    }
    let applied = store.status(&device_id(0)).await?.ok_or("no status")?;
    println!(
        "   {} devices selected: {}; {} now reports {}",
        issued.len(),
        summarize(&by_state),
        device_id(0),
        applied.config_version.map_or("nothing".into(), |v| v.to_string())
    );

    // 5. A rollout of a new version to the whole fleet, in growing waves.
    let v2 = ConfigRef::new(v1.agent_type, ConfigVersion::new("v2.0.0")?);
    let bundle = ConfigBundle::new().with_file(
        "fluent-bit.conf",
        ConfigFile::new("text/plain", "[SERVICE]\n    hot_reload On\n[INPUT]\n    name mem\n"),
    )?;
    control
        .create_template(&ConfigTemplate::new(v2, bundle, "demo", Timestamp::now()))
        .await?;
    let spec = RolloutSpec::new(v2).with_waves(1, 4, 1000).with_failure_threshold(0.01);
    println!(
        "\n5. Roll {v2} out to all {n} devices: a canary of 1, waves growing 4x up to 1000, pausing above 1% failures"
    );
    let started = Instant::now();
    let rollout = control.start_rollout(spec).await?;
    let mut resumed = false;
    let terminal = std::io::stdout().is_terminal();
    let mut shown_waves = 0;
    let done = loop {
        let now = control.rollout(&rollout.id).await?.ok_or("the rollout vanished")?;
        let totals = now.totals();
        let line = format!(
            "   wave {:>2}: {:>6} acked, {:>3} failed, {:>5} in flight",
            now.waves.len(),
            totals.acked,
            totals.failed,
            totals.pending
        );
        if terminal {
            print!("\r{line}   ");
            let _ = std::io::stdout().flush();
        } else if now.waves.len() != shown_waves && now.current_wave().is_none() {
            // Not a terminal: a line per finished wave rather than a redrawn one.
            shown_waves = now.waves.len();
            println!("{line}");
        }
        match &now.state {
            RolloutState::Completed | RolloutState::Aborted => break now,
            RolloutState::Paused { reason } if !resumed => {
                println!("{}   paused: {reason}", if terminal { "\n" } else { "" });
                println!("   the operator fixes {} and resumes", device_id(rejecting));
                appliers[rejecting].reject_with(None);
                control.resume_rollout(&rollout.id).await?;
                resumed = true;
            }
            RolloutState::Paused { reason } => return Err(format!("paused again: {reason}").into()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let totals = done.totals();
    if terminal {
        println!();
    }
    println!(
        "   {} in {} waves and {}: {} acked, {} failed",
        done.state.name(),
        done.waves.len(),
        fmt(started.elapsed()),
        totals.acked,
        totals.failed
    );

    // 6. A supervisor crashes; its devices move to the other one.
    let dead = supervisors.remove(0);
    let dead_id = dead.id();
    let survivor = &supervisors[0];
    let stranded = devices_of(&*store, &dead_id).await;
    println!("\n6. {dead_id} crashes, holding {stranded} devices");
    let started = Instant::now();
    dead.abort();
    wait_until("every device routable to the survivor", || async {
        all_routed_to(&*store, n, survivor.id()).await
    })
    .await?;
    println!(
        "   all {n} devices re-homed to {} and routable again in {}",
        survivor.id(),
        fmt(started.elapsed())
    );
    let moved = device_id(0);
    let sent = Instant::now();
    let id = control.set_emission(&moved, false).await?;
    let record = control.wait(&id, WAIT).await?;
    println!(
        "   a toggle of {moved} now goes to {}: {} in {}",
        record.supervisor.map_or("nobody".into(), |s| s.to_string()),
        record.state,
        fmt(sent.elapsed())
    );

    if args.serve {
        serve(&control, args.listen).await?;
    }

    // Done: stop the devices, then the surviving supervisor and the control plane, gracefully.
    let _ = stop_agents.send(true);
    for supervisor in supervisors {
        supervisor.shutdown().await;
    }
    control.shutdown().await;
    println!("\ndone: every command ended with a definite outcome, recorded by the control plane; nothing was lost.");
    Ok(())
}

/// Serves the REST API and the dashboard over the demo's control plane until Ctrl-C.
async fn serve(control: &ControlPlane, listen: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let config = ApiConfig::new()
        .token(ApiToken::new("demo", secret.clone(), Role::Operator)?)
        .rate_limit(RateLimit::new(500.0, 1000)?);
    let app = http_api::router(control.clone(), config)?;
    let listener = http_api::listen(listen, http_api::DEFAULT_BACKLOG).await?;
    println!(
        "\nThe dashboard: http://{} (token {secret}); Ctrl-C to stop.",
        listener.local_addr()?
    );
    http_api::serve(listener, app, ServeConfig::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

/// How long the demo waits for any one outcome.
const WAIT: Duration = Duration::from_secs(30);

/// A progress line for a long operation, redrawn in place at most every 100 ms.
struct Progress {
    what: &'static str,
    total: usize,
    last: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(what: &'static str, total: usize) -> Self {
        Progress {
            what,
            total,
            last: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn show(&self, done: usize) {
        if !std::io::stdout().is_terminal() {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.elapsed() >= Duration::from_millis(100) {
            *last = Instant::now();
            print!("\r   {done}/{} {}", self.total, self.what);
            let _ = std::io::stdout().flush();
        }
    }

    fn done(&self) {
        if std::io::stdout().is_terminal() {
            print!("\r");
        }
    }
}

fn device_id(i: usize) -> DeviceId {
    // Four digits up to 9,999 devices, more beyond: always a valid id.
    DeviceId::new(format!("device-{i:04}")).unwrap_or_else(|_| unreachable!("device ids are ASCII and short"))
}

fn hello(device: DeviceId, i: usize) -> DeviceHello {
    let mut hello = DeviceHello::new(device);
    hello.agent_type = AgentType::new("fluentbit").ok();
    hello.capabilities = Capabilities::all_builtin();
    hello.labels = Labels::from([("site".to_owned(), format!("campus-{}", i % 4))]);
    hello
}

async fn online_total(store: &dyn StatusStore) -> usize {
    let counts = store.device_counts().await.unwrap_or_default();
    counts.iter().map(|load| load.devices as usize).sum()
}

async fn devices_of(store: &dyn StatusStore, supervisor: &SupervisorId) -> usize {
    let mut total = 0;
    let mut page = PageRequest::first(1000);
    loop {
        let Ok(listed) = store.supervisor_devices(supervisor, &page).await else {
            return total;
        };
        total += listed.items.len();
        match listed.next {
            Some(next) => page = PageRequest::after(next, 1000),
            None => return total,
        }
    }
}

async fn all_routed_to(store: &dyn RoutingStore, n: usize, supervisor: SupervisorId) -> bool {
    let devices: Vec<DeviceId> = (0..n).map(device_id).collect();
    match store.lookup_many(&devices).await {
        Ok(owners) => owners.iter().all(|owner| *owner == Some(supervisor)),
        Err(_) => false,
    }
}

async fn wait_until<F, Fut>(what: &str, mut done: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        if Instant::now() > deadline {
            return Err(format!("{what}: not done within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summarize(counts: &BTreeMap<CommandState, usize>) -> String {
    let parts: Vec<String> = counts.iter().map(|(state, count)| format!("{count} {state}")).collect();
    parts.join(", ")
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else if d < Duration::from_secs(1) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}
