//! The whole system in one process, on in-memory backends.
//!
//! Two supervisors, N simulated devices (agents over the in-process
//! transport), the memory store and the memory bus. The demo walks through the
//! design's flows and prints what happened:
//!
//! 1. registration: every device connects, its lease is claimed, it is marked online;
//! 2. a toggle: the owner is looked up, the command goes on the bus keyed by
//!    that supervisor, the device acknowledges, the outcome is recorded;
//! 3. a toggle of every device, with latencies;
//! 4. a configuration push, which one device rejects;
//! 5. a supervisor crash: its devices re-home to the other one.
//!
//! ```text
//! cargo run -p opamp-examples --bin opamp-demo -- --devices 2000
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::agent::{Agent, AgentConfig, MemoryApplier};
use opamp_core::runtime::supervisor::{Supervisor, SupervisorConfig};
use opamp_core::transport::{AgentConnector, Capabilities, DeviceHello, FailoverConnector};
use opamp_core::{
    AgentType, Bus, Command, CommandBus, CommandKind, CommandOutcome, ConfigBundle, ConfigFile, ConfigRef, ConfigStore,
    ConfigTemplate, ConfigVersion, CorrelationId, DeviceId, EventBus, EventKind, GroupName, Labels, PageRequest,
    RoutingStore, StatusStore, Store, SupervisorId, Timestamp,
};
use opamp_store::memory::MemoryStore;
use opamp_transport::channel;
use tokio::sync::{oneshot, watch};

/// Runs a small fleet in one process and walks through the design's flows.
#[derive(Debug, Parser)]
#[command(name = "opamp-demo", version)]
struct Args {
    /// How many simulated devices to connect.
    #[arg(long, default_value_t = 1000, env = "OPAMP_DEMO_DEVICES")]
    devices: usize,
    /// Log filter, e.g. `warn`, `info` or `opamp_core=debug` (logs go to stderr).
    #[arg(long, default_value = "error", env = "RUST_LOG")]
    log: String,
}

type Outcome = (CommandOutcome, Duration);

/// Who waits for which command's outcome; fed by the event stream.
#[derive(Default)]
struct Waiters {
    waiting: Mutex<HashMap<CorrelationId, (Instant, oneshot::Sender<Outcome>)>>,
}

impl Waiters {
    fn wait_for(&self, id: CorrelationId) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (Instant::now(), tx));
        rx
    }

    fn complete(&self, id: CorrelationId, outcome: CommandOutcome) {
        if let Some((sent, tx)) = self.lock().remove(&id) {
            let _ = tx.send((outcome, sent.elapsed()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CorrelationId, (Instant, oneshot::Sender<Outcome>)>> {
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a stateless control-plane server does for one command: look up the
/// owner, publish on the bus keyed by it.
struct Control {
    store: Arc<MemoryStore>,
    bus: Arc<MemoryBus>,
    waiters: Arc<Waiters>,
}

impl Control {
    async fn send(
        &self,
        device: DeviceId,
        kind: CommandKind,
    ) -> opamp_core::Result<(SupervisorId, oneshot::Receiver<Outcome>)> {
        let owner = self
            .store
            .lookup(&device)
            .await?
            .ok_or_else(|| opamp_core::Error::not_found(format!("owner of {device}")))?;
        let command = Command::new(device, kind, Timestamp::now(), Duration::from_secs(10));
        let done = self.waiters.wait_for(command.correlation_id);
        self.bus.send(&owner, &command).await?;
        Ok((owner, done))
    }
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
    let waiters = Arc::new(Waiters::default());
    let control = Control {
        store: store.clone(),
        bus: bus.clone(),
        waiters: waiters.clone(),
    };
    spawn_outcome_listener(&bus, waiters).await?;

    println!("opamp-demo: {n} simulated devices, 2 supervisors, in-memory store and bus, in-process transport\n");

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
    wait_until("every device registered", || async { online_total(&*store).await == n }).await?;
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
        "   GET device:{device}:supervisor -> {} ({})",
        owner.map_or("none".into(), |o| o.to_string()),
        fmt(lookup_took)
    );
    let (owner, done) = control.send(device, CommandKind::SetEmission { state: true }).await?;
    let (outcome, latency) = done.await?;
    let status = store.status(&device).await?.ok_or("no status")?;
    println!(
        "   command sent to {owner}: {} in {}; the store now says emission={}",
        outcome.name(),
        fmt(latency),
        status.emission
    );

    // 3. Toggle every device.
    println!("\n3. Toggle emission of every device ({n} commands, all sent at once)");
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        pending.push(
            control
                .send(device_id(i), CommandKind::SetEmission { state: i % 3 != 0 })
                .await?
                .1,
        );
    }
    let mut latencies = Vec::with_capacity(n);
    let mut by_outcome: HashMap<&'static str, usize> = HashMap::new();
    for done in pending {
        let (outcome, latency) = done.await?;
        *by_outcome.entry(outcome.name()).or_default() += 1;
        latencies.push(latency);
    }
    let took = started.elapsed();
    latencies.sort();
    println!(
        "   {} in {} ({:.0} commands/s); latency p50 {}, p99 {}, max {}",
        summarize(&by_outcome),
        fmt(took),
        n as f64 / took.as_secs_f64(),
        fmt(percentile(&latencies, 0.50)),
        fmt(percentile(&latencies, 0.99)),
        fmt(*latencies.last().unwrap_or(&Duration::ZERO)),
    );

    // 4. A configuration push that one device rejects.
    let targets = n.min(10);
    let rejecting = device_id(7 % targets);
    appliers[7 % targets].reject_with(Some("fluent-bit reload answered {\"status\":1}".into()));
    let config = ConfigRef::new(AgentType::new("fluentbit")?, ConfigVersion::new("v1.0.0")?);
    let bundle = ConfigBundle::new().with_file(
        "fluent-bit.conf",
        ConfigFile::new("text/plain", "[SERVICE]\n    hot_reload On\n[INPUT]\n    name cpu\n"),
    )?;
    store
        .put_template(&ConfigTemplate::new(config, bundle.clone(), "demo", Timestamp::now()))
        .await?;
    println!(
        "\n4. Push config {config} (hash {}…) to {targets} devices; {rejecting} rejects it",
        &bundle.hash().to_string()[..12]
    );
    let mut pushes = Vec::new();
    for i in 0..targets {
        let kind = CommandKind::ApplyConfig {
            agent_type: config.agent_type,
            version: config.version,
        };
        pushes.push((device_id(i), control.send(device_id(i), kind).await?.1));
    }
    let mut by_outcome: HashMap<&'static str, usize> = HashMap::new();
    for (device, done) in pushes {
        let (outcome, _) = done.await?;
        *by_outcome.entry(outcome.name()).or_default() += 1;
        if let CommandOutcome::Failed { reason } = &outcome {
            println!("   {device} failed: {reason}");
        }
    }
    let applied = store.status(&device_id(0)).await?.ok_or("no status")?;
    println!(
        "   {}; {} now reports {}",
        summarize(&by_outcome),
        device_id(0),
        applied.config_version.map_or("nothing".into(), |v| v.to_string())
    );

    // 5. A supervisor crashes; its devices re-home.
    let dead = supervisors.remove(0);
    let dead_id = dead.id();
    let survivor = &supervisors[0];
    let stranded = devices_of(&*store, &dead_id).await;
    println!("\n5. {dead_id} crashes, holding {stranded} devices");
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
    let moved = device_id(1);
    let (owner, done) = control.send(moved, CommandKind::SetEmission { state: false }).await?;
    let (outcome, latency) = done.await?;
    println!(
        "   a toggle of {moved} now goes to {owner}: {} in {}",
        outcome.name(),
        fmt(latency)
    );

    // Done: stop the devices, then the surviving supervisor, gracefully.
    let _ = stop_agents.send(true);
    for supervisor in supervisors {
        supervisor.shutdown().await;
    }
    println!("\ndone: every command ended with a definite outcome; nothing was lost.");
    Ok(())
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

async fn spawn_outcome_listener(bus: &Arc<MemoryBus>, waiters: Arc<Waiters>) -> opamp_core::Result<()> {
    let mut events = bus.subscribe_events(&GroupName::new("demo-server")?).await?;
    tokio::spawn(async move {
        while let Ok(Some(delivery)) = events.next().await {
            if let EventKind::CommandCompleted {
                correlation_id,
                outcome,
            } = &delivery.message().kind
            {
                waiters.complete(*correlation_id, outcome.clone());
            }
            let _ = delivery.ack().await;
        }
    });
    Ok(())
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

fn summarize(counts: &HashMap<&'static str, usize>) -> String {
    let mut parts: Vec<String> = counts.iter().map(|(name, count)| format!("{count} {name}")).collect();
    parts.sort();
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
