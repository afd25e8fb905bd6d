//! The supervisor and agent runtimes end to end, over the in-process transport
//! with the memory store and bus.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use async_trait::async_trait;
use opamp_bus::memory::{MemoryBus, MemoryBusConfig};
use opamp_core::runtime::agent::{ConfigApplier, MemoryApplier};
use opamp_core::runtime::supervisor::{OutcomeEvents, RunningSupervisor, Supervisor, SupervisorConfig};
use opamp_core::testkit::failing::FailingStore;
use opamp_core::testkit::{eventually, spawn_agent};
use opamp_core::transport::channel::{self, ChannelConnector, ChannelTransport};
use opamp_core::transport::{
    AgentConnector, Capabilities, CommandAck, DeviceHello, DeviceLimits, DeviceSession, DeviceTransport,
    FailoverConnector, FromDevice, Inbound, StatusReport, ToDevice,
};
use opamp_core::{
    AgentType, Bus, Clock, Command, CommandBus, CommandKind, CommandOutcome, CommandRecord, CommandState, ConfigBundle,
    ConfigFile, ConfigHash, ConfigRef, ConfigStore, ConfigTemplate, ConfigVersion, CorrelationId, DeviceEvent,
    DeviceId, Error, EventBus, EventKind, GroupName, ManualClock, Page, PageRequest, Presence, PresenceUpdate, Result,
    RoutingStore, StatusPatch, StatusStore, Store, Subscription, SupervisorId, Timestamp, TrackingStore,
};
use opamp_store::memory::MemoryStore;

const WAIT: Duration = Duration::from_secs(10);

struct Fleet {
    store: Arc<MemoryStore>,
    bus: Arc<MemoryBus>,
    clock: Arc<ManualClock>,
    events: Subscription<DeviceEvent>,
}

impl Fleet {
    async fn new() -> Self {
        let clock = Arc::new(ManualClock::starting_now());
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let bus = Arc::new(MemoryBus::new());
        let events = bus.subscribe_events(&GroupName::new("test").unwrap()).await.unwrap();
        Fleet {
            store,
            bus,
            clock,
            events,
        }
    }

    async fn supervisor(
        &self,
        id: &str,
        config: impl FnOnce(SupervisorConfig) -> SupervisorConfig,
    ) -> (RunningSupervisor, ChannelConnector) {
        let (transport, connector) = channel::pair(channel::ChannelConfig::default());
        let supervisor = self.supervisor_on(id, config, Arc::new(transport)).await;
        (supervisor, connector)
    }

    /// A supervisor over `store` and `bus` instead of the fleet's own (a failing wrapper, a smaller bus).
    async fn supervisor_over_bus(
        &self,
        id: &str,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
    ) -> (RunningSupervisor, ChannelConnector) {
        let (transport, connector) = channel::pair(channel::ChannelConfig::default());
        let supervisor = Supervisor::new(SupervisorConfig::new(sid(id)), store, bus)
            .with_clock(self.clock.clone())
            .start(vec![Arc::new(transport)])
            .await
            .unwrap();
        (supervisor, connector)
    }

    async fn supervisor_on(
        &self,
        id: &str,
        config: impl FnOnce(SupervisorConfig) -> SupervisorConfig,
        transport: Arc<dyn DeviceTransport>,
    ) -> RunningSupervisor {
        self.supervisor_on_store(id, config, transport, self.store.clone())
            .await
    }

    /// A supervisor on `store` (the fleet's, behind a wrapper) rather than the fleet's store itself.
    async fn supervisor_over(&self, id: &str, store: Arc<dyn Store>) -> (RunningSupervisor, ChannelConnector) {
        self.supervisor_over_bus(id, store, self.bus.clone()).await
    }

    async fn supervisor_on_store(
        &self,
        id: &str,
        config: impl FnOnce(SupervisorConfig) -> SupervisorConfig,
        transport: Arc<dyn DeviceTransport>,
        store: Arc<dyn Store>,
    ) -> RunningSupervisor {
        let bus: Arc<dyn Bus> = self.bus.clone();
        Supervisor::new(config(SupervisorConfig::new(sid(id))), store, bus)
            .with_clock(self.clock.clone())
            .start(vec![transport])
            .await
            .unwrap()
    }

    async fn send(&self, to: &str, device: &str, kind: CommandKind, timeout: Duration) -> CorrelationId {
        let command = Command::new(did(device), kind, self.clock.now(), timeout);
        self.bus.send(&sid(to), &command).await.unwrap();
        command.correlation_id
    }

    /// Sends a command the way a control plane does: recorded as pending
    /// first, as sent `attempts` times.
    async fn send_tracked(
        &self,
        to: &str,
        device: &str,
        kind: CommandKind,
        timeout: Duration,
        attempts: u32,
    ) -> CorrelationId {
        let command = Command::new(did(device), kind, self.clock.now(), timeout);
        let mut record = CommandRecord::new(command.clone(), Some(sid(to)), CommandState::Pending);
        record.attempts = attempts;
        self.store.insert_command(&record).await.unwrap();
        self.bus.send(&sid(to), &command).await.unwrap();
        command.correlation_id
    }

    async fn record(&self, id: CorrelationId) -> Option<CommandRecord> {
        self.store.command_record(&id).await.unwrap()
    }

    /// The next event matching `pick`, acknowledging every event seen.
    async fn event<T>(&mut self, mut pick: impl FnMut(&DeviceEvent) -> Option<T>) -> T {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let delivery = self.events.next().await.unwrap().expect("event stream open");
                let found = pick(delivery.message());
                delivery.ack().await.unwrap();
                if let Some(found) = found {
                    return found;
                }
            }
        })
        .await;
        found.expect("the expected event within the deadline")
    }

    async fn outcome(&mut self, id: CorrelationId) -> CommandOutcome {
        self.event(|e| match &e.kind {
            EventKind::CommandCompleted {
                correlation_id,
                outcome,
            } if *correlation_id == id => Some(outcome.clone()),
            _ => None,
        })
        .await
    }

    /// Turns emission on for `device` through supervisor `to`, and expects it acknowledged.
    async fn toggle_acked(&mut self, to: &str, device: &str) {
        let id = self
            .send(to, device, CommandKind::SetEmission { state: true }, WAIT)
            .await;
        assert_eq!(
            self.outcome(id).await,
            CommandOutcome::Acked,
            "toggle of {device} via {to}"
        );
    }

    /// Supervisor `to` claims `device` in the store and marks it online
    /// there, as a takeover does, whatever supervisor holds its session.
    async fn take_over(&self, device: &str, to: &str) {
        self.store
            .claim(&did(device), &sid(to), Duration::from_secs(300))
            .await
            .unwrap();
        let online = opamp_core::StatusPatch::new().online(sid(to), self.clock.now());
        self.store.update_status(&did(device), &online).await.unwrap();
    }

    async fn owner_is(&self, device: &str, owner: Option<&str>) {
        let store = self.store.clone();
        let device = did(device);
        let owner = owner.map(sid);
        eventually(&format!("{device} owned by {owner:?}"), WAIT, || {
            let store = store.clone();
            async move { store.lookup(&device).await.unwrap() == owner }
        })
        .await;
    }
}

fn did(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn sid(id: &str) -> SupervisorId {
    SupervisorId::new(id).unwrap()
}

fn hello(device: &str) -> DeviceHello {
    let mut hello = DeviceHello::new(did(device));
    hello.capabilities = Capabilities::all_builtin();
    hello.agent_type = Some(AgentType::new("fluentbit").unwrap());
    hello
}

async fn template(store: &MemoryStore, version: &str) -> (ConfigRef, ConfigBundle) {
    let config = ConfigRef::new(
        AgentType::new("fluentbit").unwrap(),
        ConfigVersion::new(version).unwrap(),
    );
    let bundle = ConfigBundle::new()
        .with_file(
            "fluent-bit.conf",
            ConfigFile::new("text/plain", format!("[SERVICE]\n    # {version}\n")),
        )
        .unwrap();
    store
        .put_template(&ConfigTemplate::new(config, bundle.clone(), "test", Timestamp::now()))
        .await
        .unwrap();
    (config, bundle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toggle_and_config_push_end_to_end() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let applier = Arc::new(MemoryApplier::new());
    let (agent, _stop) = spawn_agent(Arc::new(connector), hello("d1"), applier.clone());
    fleet.owner_is("d1", Some("s1")).await;
    fleet
        .event(|e| matches!(e.kind, EventKind::Connected { .. }).then_some(()))
        .await;

    fleet.toggle_acked("s1", "d1").await;
    assert!(*agent.emission().borrow());
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert!(status.emission);
    assert_eq!(status.status, Presence::Online);
    assert_eq!(status.supervisor, Some(sid("s1")));

    let (config, bundle) = template(&fleet.store, "v1").await;
    let kind = CommandKind::ApplyConfig {
        agent_type: config.agent_type,
        version: config.version,
    };
    let id = fleet.send("s1", "d1", kind, WAIT).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert_eq!(status.config_version, Some(config.version));
    assert_eq!(status.config_hash, Some(bundle.hash()));
    assert_eq!(applier.current().map(|a| a.hash), Some(bundle.hash()));
    assert_eq!(status.last_error, None);
    assert_eq!(s1.connected_devices(), 1);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_recorded_with_their_reason() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let applier = Arc::new(MemoryApplier::new());
    applier.reject_with(Some("reload returned status 1".into()));
    let mut limited = hello("d1");
    limited.capabilities.restart = false;
    let (_agent, _stop) = spawn_agent(Arc::new(connector), limited, applier);
    fleet.owner_is("d1", Some("s1")).await;

    let (config, _) = template(&fleet.store, "v1").await;
    let apply = CommandKind::ApplyConfig {
        agent_type: config.agent_type,
        version: config.version,
    };
    let id = fleet.send("s1", "d1", apply, WAIT).await;
    assert_eq!(
        fleet.outcome(id).await,
        CommandOutcome::Failed {
            reason: "reload returned status 1".into()
        }
    );
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert_eq!(status.last_error.as_deref(), Some("reload returned status 1"));
    assert_eq!(status.config_version, None);

    let missing = CommandKind::ApplyConfig {
        agent_type: config.agent_type,
        version: ConfigVersion::new("v9").unwrap(),
    };
    let id = fleet.send("s1", "d1", missing, WAIT).await;
    match fleet.outcome(id).await {
        CommandOutcome::Failed { reason } => assert!(reason.contains("fluentbit/v9 does not exist"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }

    let id = fleet.send("s1", "d1", CommandKind::Restart, WAIT).await;
    match fleet.outcome(id).await {
        CommandOutcome::Unsupported { reason } => assert!(reason.contains("restart"), "{reason}"),
        other => panic!("expected unsupported, got {other:?}"),
    }

    let id = fleet
        .send("s1", "nobody", CommandKind::SetEmission { state: true }, WAIT)
        .await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::DeviceOffline);
    s1.shutdown().await;
}

/// A status report telling `emission` and `error`, as far as given.
fn report(emission: Option<bool>, error: Option<&str>) -> FromDevice {
    let mut report = StatusReport::default();
    report.emission = emission;
    report.last_error = error.map(str::to_owned);
    FromDevice::Status(report)
}

/// A device that registers and then never answers.
async fn silent_device(connector: &ChannelConnector, device: &str) -> opamp_core::transport::AgentSession {
    let mut session = connector.connect(&hello(device)).await.unwrap();
    let first = session.inbound.recv().await.unwrap();
    assert!(matches!(first, Some(ToDevice::Registered(_))), "{first:?}");
    session
}

/// Waits for `device` to be pushed the command `id`, as the next message it gets.
async fn expect_command(device: &mut opamp_core::transport::AgentSession, id: CorrelationId) {
    let pushed = tokio::time::timeout(WAIT, device.inbound.recv())
        .await
        .expect("pushed in time")
        .unwrap();
    assert!(
        matches!(&pushed, Some(ToDevice::Command(c)) if c.correlation_id == id),
        "{pushed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_records_outcomes_itself_but_leaves_a_first_timeout_to_the_retry() {
    // No control plane runs here: whatever is recorded, the supervisor recorded.
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut silent = silent_device(&connector, "slow").await;
    let (_agent, _stop) = spawn_agent(Arc::new(connector), hello("d1"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("d1", Some("s1")).await;

    let acked = fleet
        .send_tracked("s1", "d1", CommandKind::SetEmission { state: true }, WAIT, 1)
        .await;
    assert_eq!(fleet.outcome(acked).await, CommandOutcome::Acked, "still published");
    let record = fleet.record(acked).await.unwrap();
    assert_eq!(record.state, CommandState::Acked);
    assert!(record.completed_at.is_some());

    // A first timeout stays pending for the control plane to send again; a second ends it.
    let short = Duration::from_millis(200);
    let first = fleet
        .send_tracked("s1", "slow", CommandKind::SetEmission { state: true }, short, 1)
        .await;
    expect_command(&mut silent, first).await;
    assert_eq!(fleet.outcome(first).await, CommandOutcome::TimedOut);
    assert_eq!(fleet.record(first).await.unwrap().state, CommandState::Pending);
    let last = fleet
        .send_tracked("s1", "slow", CommandKind::SetEmission { state: true }, short, 2)
        .await;
    expect_command(&mut silent, last).await;
    assert_eq!(fleet.outcome(last).await, CommandOutcome::TimedOut);
    assert_eq!(fleet.record(last).await.unwrap().state, CommandState::TimedOut);

    // A command nobody recorded (another producer's) is answered on the bus only.
    let untracked = fleet
        .send("s1", "d1", CommandKind::SetEmission { state: false }, WAIT)
        .await;
    assert_eq!(fleet.outcome(untracked).await, CommandOutcome::Acked);
    assert_eq!(fleet.record(untracked).await, None);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_unrecorded_outcome_events_only_what_the_control_plane_needs_is_published() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet
        .supervisor("s1", |c| c.outcome_events(OutcomeEvents::Unrecorded))
        .await;
    let mut silent = silent_device(&connector, "slow").await;
    let (_agent, _stop) = spawn_agent(Arc::new(connector), hello("d1"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("d1", Some("s1")).await;

    // Recorded, so not published: the next outcome on the bus is the untracked command's.
    let recorded = fleet
        .send_tracked("s1", "d1", CommandKind::SetEmission { state: true }, WAIT, 1)
        .await;
    let untracked = fleet
        .send("s1", "d1", CommandKind::SetEmission { state: false }, WAIT)
        .await;
    let first = fleet
        .event(|e| match &e.kind {
            EventKind::CommandCompleted { correlation_id, .. } => Some(*correlation_id),
            _ => None,
        })
        .await;
    assert_eq!(first, untracked, "the recorded outcome was published");
    assert_eq!(fleet.record(recorded).await.unwrap().state, CommandState::Acked);

    // A first timeout is published, for the control plane to send it again.
    let timed_out = fleet
        .send_tracked(
            "s1",
            "slow",
            CommandKind::SetEmission { state: true },
            Duration::from_millis(200),
            1,
        )
        .await;
    expect_command(&mut silent, timed_out).await;
    assert_eq!(fleet.outcome(timed_out).await, CommandOutcome::TimedOut);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_devices_time_out_and_fill_only_their_own_queue() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c.device_queue(1)).await;
    let mut silent = silent_device(&connector, "slow").await;
    let (agent, _stop) = spawn_agent(Arc::new(connector), hello("fast"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("slow", Some("s1")).await;
    fleet.owner_is("fast", Some("s1")).await;

    // The first waits for its ack, the second waits in the device's queue of one, the third finds it full.
    let first = fleet
        .send(
            "s1",
            "slow",
            CommandKind::SetEmission { state: true },
            Duration::from_millis(300),
        )
        .await;
    expect_command(&mut silent, first).await;
    let second = fleet
        .send(
            "s1",
            "slow",
            CommandKind::SetEmission { state: false },
            Duration::from_millis(600),
        )
        .await;
    let third = fleet
        .send("s1", "slow", CommandKind::SetEmission { state: true }, WAIT)
        .await;
    let other = fleet
        .send("s1", "fast", CommandKind::SetEmission { state: true }, WAIT)
        .await;

    let mut outcomes = std::collections::HashMap::new();
    while outcomes.len() < 4 {
        let (id, outcome) = fleet
            .event(|e| match &e.kind {
                EventKind::CommandCompleted {
                    correlation_id,
                    outcome,
                } => Some((*correlation_id, outcome.clone())),
                _ => None,
            })
            .await;
        outcomes.insert(id, outcome);
    }
    assert_eq!(
        outcomes[&other],
        CommandOutcome::Acked,
        "a slow device never blocks another"
    );
    assert!(*agent.emission().borrow());
    match &outcomes[&third] {
        CommandOutcome::Failed { reason } => assert!(reason.contains("queue of device slow is full"), "{reason}"),
        other => panic!("expected a full queue, got {other:?}"),
    }
    assert_eq!(outcomes[&first], CommandOutcome::TimedOut);
    assert_eq!(outcomes[&second], CommandOutcome::TimedOut);
    let status = fleet.store.status(&did("slow")).await.unwrap().unwrap();
    assert!(status.last_error.unwrap().contains("timed out"));
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_hold_no_task_and_wake_for_what_comes() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = tasks();
    let mut devices = Vec::new();
    for n in 0..200 {
        devices.push(silent_device(&connector, &format!("idle-{n:03}")).await);
    }
    assert_eq!(s1.connected_devices(), 200);
    eventually("every idle session without a task", WAIT, || async {
        tasks() < before + 10
    })
    .await;

    // A message from an idle device wakes its session.
    devices[7].outbound.send(report(None, Some("disk full"))).await.unwrap();
    let store = fleet.store.clone();
    eventually("the report recorded", WAIT, || {
        let store = store.clone();
        async move {
            let status = store.status(&did("idle-007")).await.unwrap().unwrap();
            status.last_error.as_deref() == Some("disk full")
        }
    })
    .await;

    // So does a command, and the answer to it.
    let id = fleet
        .send("s1", "idle-042", CommandKind::SetEmission { state: true }, WAIT)
        .await;
    let device = &mut devices[42];
    expect_command(device, id).await;
    device
        .outbound
        .send(FromDevice::CommandAck(CommandAck::new(id, CommandOutcome::Acked)))
        .await
        .unwrap();
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    eventually("idle again", WAIT, || async { tasks() < before + 10 }).await;

    // A device that leaves while idle is released.
    drop(devices.remove(3));
    fleet.owner_is("idle-003", None).await;
    assert_eq!(s1.connected_devices(), 199);

    // One that leaves with a command in flight and another queued ends both, definitely.
    let in_flight = fleet
        .send("s1", "idle-005", CommandKind::SetEmission { state: true }, WAIT)
        .await;
    let leaving = &mut devices[4];
    expect_command(leaving, in_flight).await;
    let queued = fleet
        .send("s1", "idle-005", CommandKind::SetEmission { state: false }, WAIT)
        .await;
    drop(devices.remove(4));
    assert_eq!(fleet.outcome(in_flight).await, CommandOutcome::DeviceOffline);
    assert_eq!(fleet.outcome(queued).await, CommandOutcome::DeviceOffline);
    eventually("idle-005 offline", WAIT, || {
        let store = store.clone();
        async move { store.status(&did("idle-005")).await.unwrap().unwrap().status == Presence::Offline }
    })
    .await;
    s1.shutdown().await;
    for device in &mut devices {
        assert_eq!(device.inbound.recv().await.unwrap(), None, "closed by the shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_moves_the_device_and_fences_the_old_owner() {
    let mut fleet = Fleet::new().await;
    let (s1, c1) = fleet.supervisor("s1", |c| c).await;
    let (s2, c2) = fleet.supervisor("s2", |c| c).await;
    let old = silent_device(&c1, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;

    // The device reconnects to s2 while s1 still has its old session.
    let (_agent, _stop) = spawn_agent(Arc::new(c2), hello("d1"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("d1", Some("s2")).await;
    let (from, to) = fleet
        .event(|e| match e.kind {
            EventKind::TakenOver { from, to } => Some((from, to)),
            _ => None,
        })
        .await;
    assert_eq!((from, to), (sid("s1"), sid("s2")));

    // s1 finds out at its next renewal, closes the stale session, and erases nothing.
    s1.renew_leases().await;
    let s1_ref = &s1;
    eventually("s1 dropped its stale session", WAIT, || async move {
        !s1_ref.is_connected(&did("d1"))
    })
    .await;
    drop(old);
    fleet.owner_is("d1", Some("s2")).await;
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert_eq!((status.status, status.supervisor), (Presence::Online, Some(sid("s2"))));
    assert!(s2.is_connected(&did("d1")));

    fleet.toggle_acked("s2", "d1").await;
    s1.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_supervisors_leases_lapse_and_devices_rehome() {
    let mut fleet = Fleet::new().await;
    let (s1, c1) = fleet.supervisor("s1", |c| c).await;
    let (s2, c2) = fleet.supervisor("s2", |c| c).await;
    let mut stuck = silent_device(&c1, "d9").await;
    let failover = FailoverConnector::new(vec![Arc::new(c1), Arc::new(c2)]).unwrap();
    let (_agent, _stop) = spawn_agent(Arc::new(failover), hello("d1"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("d1", Some("s1")).await;
    fleet.owner_is("d9", Some("s1")).await;

    // s1 pushes a command to d9 and dies before d9 answers: the command must not be lost.
    let pending = fleet
        .send("s1", "d9", CommandKind::SetEmission { state: true }, WAIT)
        .await;
    expect_command(&mut stuck, pending).await;
    s1.abort();
    drop(stuck);

    // The agent re-homes to s2; the lease of the device that does not come back lapses.
    fleet.owner_is("d1", Some("s2")).await;
    fleet
        .clock
        .advance(opamp_core::DEFAULT_LEASE_TTL + Duration::from_secs(1));
    assert_eq!(
        fleet.store.lookup(&did("d9")).await.unwrap(),
        None,
        "a lapsed lease is never returned"
    );

    // s1 restarts and gets the command it never acknowledged; d9 is gone, so it ends definitely.
    let (s1, _c1) = fleet.supervisor("s1", |c| c).await;
    assert_eq!(fleet.outcome(pending).await, CommandOutcome::DeviceOffline);
    fleet.toggle_acked("s2", "d1").await;
    s1.shutdown().await;
    s2.shutdown().await;
}

/// A transport whose sessions send garbage after registering.
#[derive(Debug)]
struct Garbage {
    inner: ChannelTransport,
}

#[derive(Debug)]
struct Broken;

impl Inbound<FromDevice> for Broken {
    fn poll_recv(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<Option<FromDevice>>> {
        std::task::Poll::Ready(Err(Error::invalid_input("frame 1: not a protobuf Envelope")))
    }
}

#[async_trait]
impl DeviceTransport for Garbage {
    fn name(&self) -> &'static str {
        "garbage"
    }

    async fn accept(&self) -> Result<Option<DeviceSession>> {
        Ok(self.inner.accept().await?.map(|s| {
            if s.hello.device.as_str() == "bad" {
                DeviceSession::new(s.hello, "garbage", Box::new(Broken), s.outbound)
            } else {
                s
            }
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_that_session() {
    let mut fleet = Fleet::new().await;
    let (transport, connector) = channel::pair(channel::ChannelConfig::default());
    let s1 = fleet
        .supervisor_on("s1", |c| c, Arc::new(Garbage { inner: transport }))
        .await;
    let (agent, _stop) = spawn_agent(
        Arc::new(connector.clone()),
        hello("good"),
        Arc::new(MemoryApplier::new()),
    );
    fleet.owner_is("good", Some("s1")).await;
    let mut bad = silent_device(&connector, "bad").await;
    // The supervisor drops the bad session: the device sees its stream end.
    let ended = tokio::time::timeout(WAIT, bad.inbound.recv())
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(ended, None);
    fleet.owner_is("bad", None).await;

    fleet.toggle_acked("s1", "good").await;
    assert!(*agent.emission().borrow());
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_device_says_about_itself_is_bounded() {
    let fleet = Fleet::new().await;
    let limits = DeviceLimits::default();
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;

    // A hello with a label too long is refused: not registered, not routable.
    let mut bloated = hello("bloated");
    bloated
        .labels
        .insert("site".into(), "x".repeat(limits.max_label_value_bytes + 1));
    let mut refused = connector.connect(&bloated).await.unwrap();
    let why = tokio::time::timeout(WAIT, refused.inbound.recv())
        .await
        .expect("answered in time")
        .unwrap();
    assert!(
        matches!(&why, Some(ToDevice::Refused(why)) if why.reason.contains("label \"site\"")),
        "the bloated hello is refused, naming the label: {why:?}"
    );
    let ended = refused.inbound.recv().await.unwrap();
    assert_eq!(ended, None, "the bloated hello's session is closed");
    fleet.owner_is("bloated", None).await;
    assert!(fleet.store.status(&did("bloated")).await.unwrap().is_none());

    // An error of a megabyte is stored cut to the limit, and says so.
    let device = silent_device(&connector, "chatty").await;
    let huge = "e".repeat(1 << 20);
    device.outbound.send(report(None, Some(&huge))).await.unwrap();
    let store = fleet.store.clone();
    eventually("the cut error recorded", WAIT, || {
        let store = store.clone();
        async move {
            let status = store.status(&did("chatty")).await.unwrap().unwrap();
            status
                .last_error
                .is_some_and(|error| error.len() <= 4096 && error.ends_with("… (cut from 1048576 bytes)"))
        }
    })
    .await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_supervisor_serves_several_transports() {
    let mut fleet = Fleet::new().await;
    let (first, to_first) = channel::pair(channel::ChannelConfig::default());
    let (second, to_second) = channel::pair(channel::ChannelConfig::default());
    let store: Arc<dyn Store> = fleet.store.clone();
    let bus: Arc<dyn Bus> = fleet.bus.clone();
    let s1 = Supervisor::new(SupervisorConfig::new(sid("s1")), store, bus)
        .with_clock(fleet.clock.clone())
        .start(vec![Arc::new(first), Arc::new(second)])
        .await
        .unwrap();
    let (_a, _stop_a) = spawn_agent(Arc::new(to_first), hello("via-first"), Arc::new(MemoryApplier::new()));
    let (_b, _stop_b) = spawn_agent(Arc::new(to_second), hello("via-second"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("via-first", Some("s1")).await;
    fleet.owner_is("via-second", Some("s1")).await;
    fleet.toggle_acked("s1", "via-first").await;
    fleet.toggle_acked("s1", "via-second").await;
    assert_eq!(s1.connected_devices(), 2);
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_reach_the_store_and_the_event_stream() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;
    device
        .outbound
        .send(report(Some(true), Some("disk full")))
        .await
        .unwrap();
    let changed = fleet
        .event(|e| match e.kind {
            EventKind::StatusChanged { emission, .. } => Some(emission),
            _ => None,
        })
        .await;
    assert_eq!(changed, Some(true));
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert!(status.emission);
    assert_eq!(status.last_error.as_deref(), Some("disk full"));
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_status_the_supervisor_did_not_know_is_announced() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;
    // The toggle is recorded from its ack; the report an agent sends after it repeats it.
    let id = fleet
        .send("s1", "d1", CommandKind::SetEmission { state: true }, WAIT)
        .await;
    expect_command(&mut device, id).await;
    let ack = opamp_core::transport::CommandAck::new(id, CommandOutcome::Acked);
    device.outbound.send(FromDevice::CommandAck(ack)).await.unwrap();
    device.outbound.send(report(Some(true), None)).await.unwrap();
    // Then the device turns emission off by itself, and reports an error.
    device.outbound.send(report(Some(false), None)).await.unwrap();
    device.outbound.send(report(None, Some("disk full"))).await.unwrap();

    let first_change = fleet
        .event(|e| match e.kind {
            EventKind::StatusChanged { emission, .. } => Some(emission),
            _ => None,
        })
        .await;
    assert_eq!(first_change, Some(false), "the repeat of the toggle is not announced");
    eventually("the error recorded", WAIT, || async {
        let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
        !status.emission && status.last_error.as_deref() == Some("disk full")
    })
    .await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_command_makes_the_agent_reconnect() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let (agent, _stop) = spawn_agent(Arc::new(connector), hello("d1"), Arc::new(MemoryApplier::new()));
    fleet
        .event(|e| matches!(e.kind, EventKind::Connected { .. }).then_some(()))
        .await;

    let id = fleet.send("s1", "d1", CommandKind::Restart, WAIT).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    // The agent ends its session after acknowledging, then registers again.
    fleet
        .event(|e| matches!(e.kind, EventKind::Disconnected { .. }).then_some(()))
        .await;
    fleet
        .event(|e| matches!(e.kind, EventKind::Connected { .. }).then_some(()))
        .await;
    fleet.owner_is("d1", Some("s1")).await;
    let agent_ref = &agent;
    eventually("the agent is connected again", WAIT, || async move {
        *agent_ref.connected().borrow()
    })
    .await;
    fleet.toggle_acked("s1", "d1").await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_supervisor_is_a_crash() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;
    drop(s1);
    // The session ends, but as in a crash the lease is left to lapse.
    let ended = tokio::time::timeout(WAIT, device.inbound.recv())
        .await
        .expect("ended in time")
        .unwrap();
    assert_eq!(ended, None);
    assert_eq!(fleet.store.lookup(&did("d1")).await.unwrap(), Some(sid("s1")));
    fleet.clock.advance(opamp_core::DEFAULT_LEASE_TTL);
    assert_eq!(fleet.store.lookup(&did("d1")).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_is_recorded_even_when_the_device_moved_on_meanwhile() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;
    let id = fleet
        .send_tracked("s1", "d1", CommandKind::SetEmission { state: true }, WAIT, 1)
        .await;
    expect_command(&mut device, id).await;

    // Another supervisor takes the device over before its answer reaches s1:
    // s1 may no longer write the device's status, but the outcome is the command's.
    fleet.take_over("d1", "s2").await;
    let ack = opamp_core::transport::CommandAck::new(id, CommandOutcome::Acked);
    device.outbound.send(FromDevice::CommandAck(ack)).await.unwrap();

    eventually("the ack recorded", WAIT, || async {
        fleet
            .record(id)
            .await
            .is_some_and(|record| record.state == CommandState::Acked)
    })
    .await;
    eventually("s1 forgot d1", WAIT, || async { !s1.is_connected(&did("d1")) }).await;
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert!(!status.emission, "the fenced write was refused");
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fenced_write_closes_the_stale_session() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;

    // Another supervisor takes the device over while s1 still holds a session for it.
    fleet.take_over("d1", "s2").await;
    // A report with news to record (an empty one is only a heartbeat, recorded at most every tenth of the lease).
    device.outbound.send(report(Some(true), None)).await.unwrap();
    let ended = tokio::time::timeout(WAIT, device.inbound.recv())
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(ended, None, "s1 closed its stale session");
    eventually("s1 forgot d1", WAIT, || async { !s1.is_connected(&did("d1")) }).await;
    fleet.owner_is("d1", Some("s2")).await;
    s1.shutdown().await;
}

/// Answers command `id` as done.
async fn answer(device: &opamp_core::transport::AgentSession, id: CorrelationId) {
    let ack = opamp_core::transport::CommandAck::new(id, CommandOutcome::Acked);
    device.outbound.send(FromDevice::CommandAck(ack)).await.unwrap();
}

/// Sends device d1 a toggle through s1 and expects it to be the next thing
/// the device is pushed: nothing sent before it is pushed (again) first.
async fn next_pushed_is_a_marker(fleet: &Fleet, device: &mut opamp_core::transport::AgentSession) {
    let marker = fleet
        .send_tracked("s1", "d1", CommandKind::SetEmission { state: true }, WAIT, 1)
        .await;
    expect_command(device, marker).await;
}

async fn ends_as(fleet: &Fleet, id: CorrelationId, state: CommandState) {
    let store = fleet.store.clone();
    eventually(&format!("command {id} recorded as {state:?}"), WAIT, || {
        let store = store.clone();
        async move { store.command_record(&id).await.unwrap().map(|record| record.state) == Some(state) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_while_a_command_is_answered_delays_its_outcome_and_wedges_nothing() {
    let fleet = Fleet::new().await;
    let store = Arc::new(FailingStore::new(fleet.store.clone()));
    // A bus that holds two commands outstanding at most: one never ended wedges it at once.
    let bus = Arc::new(MemoryBus::with_config(MemoryBusConfig::default().with_capacity(2)).unwrap());
    let (s1, connector) = fleet.supervisor_over_bus("s1", store.clone(), bus.clone()).await;
    let mut device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;
    let send = |n: usize| {
        let (fleet, bus) = (&fleet, bus.clone());
        async move {
            let command = Command::new(
                did("d1"),
                CommandKind::SetEmission { state: n % 2 == 0 },
                fleet.clock.now(),
                WAIT,
            );
            let record = CommandRecord::new(command.clone(), Some(sid("s1")), CommandState::Pending);
            fleet.store.insert_command(&record).await.unwrap();
            tokio::time::timeout(WAIT, bus.send(&sid("s1"), &command))
                .await
                .expect("the bus takes a command: the supervisor is not wedged")
                .unwrap();
            command.correlation_id
        }
    };

    let first = send(0).await;
    expect_command(&mut device, first).await;
    store.fail(true);
    let refused = store.refused();
    answer(&device, first).await;
    eventually("the outcome's write refused", WAIT, || async {
        store.refused() > refused
    })
    .await;
    store.fail(false);
    ends_as(&fleet, first, CommandState::Acked).await;

    for n in 1..=4 {
        let id = send(n).await;
        expect_command(&mut device, id).await;
        answer(&device, id).await;
        ends_as(&fleet, id, CommandState::Acked).await;
    }
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_again_after_it_ended_is_not_run_again() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut device = silent_device(&connector, "d1").await;
    fleet.owner_is("d1", Some("s1")).await;

    let restart = Command::new(did("d1"), CommandKind::Restart, fleet.clock.now(), WAIT);
    let record = CommandRecord::new(restart.clone(), Some(sid("s1")), CommandState::Pending);
    fleet.store.insert_command(&record).await.unwrap();
    fleet.bus.send(&sid("s1"), &restart).await.unwrap();
    expect_command(&mut device, restart.correlation_id).await;
    answer(&device, restart.correlation_id).await;
    ends_as(&fleet, restart.correlation_id, CommandState::Acked).await;

    // Delivered again, as a bus does after a restart from an older commit.
    fleet.bus.send(&sid("s1"), &restart).await.unwrap();
    next_pushed_is_a_marker(&fleet, &mut device).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_the_device_runs_already_is_not_pushed_again() {
    let fleet = Fleet::new().await;
    let (config, bundle) = template(&fleet.store, "v1").await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut running = hello("d1");
    running.config_hash = Some(bundle.hash());
    let mut device = connector.connect(&running).await.unwrap();
    let first = device.inbound.recv().await.unwrap();
    assert!(matches!(first, Some(ToDevice::Registered(_))), "{first:?}");
    fleet.owner_is("d1", Some("s1")).await;

    let apply = CommandKind::ApplyConfig {
        agent_type: config.agent_type,
        version: config.version,
    };
    let id = fleet.send_tracked("s1", "d1", apply, WAIT, 1).await;
    ends_as(&fleet, id, CommandState::Acked).await;
    next_pushed_is_a_marker(&fleet, &mut device).await;
    s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_update_that_meets_a_store_outage_is_applied_once_the_store_answers() {
    let fleet = Fleet::new().await;
    let (v1, bundle1) = template(&fleet.store, "v1").await;
    let store = Arc::new(FailingStore::new(fleet.store.clone()));
    let (s1, connector) = fleet.supervisor_over("s1", store.clone()).await;
    let applier = Arc::new(MemoryApplier::new());
    let (_agent, _stop) = spawn_agent(Arc::new(connector), hello("d1"), applier.clone());
    fleet.owner_is("d1", Some("s1")).await;

    store.fail(true);
    let refused = store.refused();
    let update = opamp_core::ConfigUpdate::new(v1, opamp_core::Labels::new(), fleet.clock.now());
    fleet.bus.broadcast(&update).await.unwrap();
    eventually("the update's reads refused", WAIT, || async {
        store.refused() > refused
    })
    .await;
    store.fail(false);
    let hash = bundle1.hash();
    eventually("v1 applied after the outage", WAIT, || {
        let applier = applier.clone();
        async move { applier.current().map(|a| a.hash) == Some(hash) }
    })
    .await;
    assert_eq!(fleet.store.desired(&did("d1")).await.unwrap(), Some(v1));
    s1.shutdown().await;
}
/// A device that reports everything a status holds: agent type, labels and the config it runs.
fn described(device: &str) -> DeviceHello {
    let mut hello = hello(device);
    hello.labels = [
        ("site".to_owned(), "lab".to_owned()),
        ("ring".to_owned(), "1".to_owned()),
    ]
    .into();
    hello.config_version = Some(ConfigVersion::new("v7").unwrap());
    hello.config_hash = Some(ConfigHash::from_slice(&[7; 32]).unwrap());
    hello
}

/// Whether the supervisor has left the device's session open with nothing sent on it.
fn still_open(device: &mut opamp_core::transport::AgentSession) -> bool {
    let polled = device
        .inbound
        .poll_recv(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    matches!(polled, std::task::Poll::Pending)
}

/// Registers `count` described devices on `connector`, owned by `owner`.
async fn described_fleet(
    fleet: &Fleet,
    connector: &ChannelConnector,
    owner: &str,
    count: usize,
) -> Vec<(DeviceId, opamp_core::transport::AgentSession)> {
    let mut devices = Vec::new();
    for n in 0..count {
        let name = format!("d{n}");
        let mut session = connector.connect(&described(&name)).await.unwrap();
        let first = session.inbound.recv().await.unwrap();
        assert!(matches!(first, Some(ToDevice::Registered(_))), "{first:?}");
        fleet.owner_is(&name, Some(owner)).await;
        devices.push((did(&name), session));
    }
    devices
}

type Sessions = [(DeviceId, opamp_core::transport::AgentSession)];

/// When each of `devices` registered, by its status.
async fn connected_at(store: &dyn Store, devices: &Sessions) -> Vec<Timestamp> {
    let mut at = Vec::new();
    for (device, _) in devices {
        at.push(store.status(device).await.unwrap().unwrap().connected_at.unwrap());
    }
    at
}

/// Waits for every device to be `owner`'s again with its whole status.
async fn all_restored(store: &dyn Store, devices: &Sessions, owner: &str, connected_at: &[Timestamp]) {
    for ((device, _), at) in devices.iter().zip(connected_at) {
        eventually(&format!("{device} re-claimed with its whole status"), WAIT, || {
            fully_restored(store, device, owner, *at)
        })
        .await;
    }
}

fn none_closed(supervisor: &RunningSupervisor, devices: &mut Sessions) {
    for (device, session) in devices {
        assert!(supervisor.is_connected(device), "{device} still has its session");
        assert!(still_open(session), "{device}'s session was not closed");
    }
}

/// Whether `device`'s lease is `owner`'s and its status is everything its hello said, online under `owner`.
async fn fully_restored(store: &dyn Store, device: &DeviceId, owner: &str, connected_at: Timestamp) -> bool {
    let expected = described(device.as_str());
    let Some(status) = store.status(device).await.unwrap() else {
        return false;
    };
    store.lookup(device).await.unwrap() == Some(sid(owner))
        && status.status == Presence::Online
        && status.supervisor == Some(sid(owner))
        && status.connected_at == Some(connected_at)
        && status.last_seen.is_some()
        && status.agent_type == expected.agent_type
        && status.labels == expected.labels
        && status.config_version == expected.config_version
        && status.config_hash == expected.config_hash
}

/// The store loses its data while devices are connected (Redis restarted
/// empty): the first status write to find no status makes the supervisor
/// claim every device again, at once rather than at its next renewal (100 s
/// away here), and write each one's whole status from its session; no
/// session is closed, and the write that noticed is recorded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_its_data_is_reclaimed_at_once_without_closing_sessions() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut devices = described_fleet(&fleet, &connector, "s1", 5).await;
    let connected_at = connected_at(&*fleet.store, &devices).await;

    fleet.store.clear();
    let (_, first) = &devices[0];
    first.outbound.send(report(Some(true), None)).await.unwrap();

    all_restored(&*fleet.store, &devices, "s1", &connected_at).await;
    let (noticed, _) = &devices[0];
    assert!(
        fleet.store.status(noticed).await.unwrap().unwrap().emission,
        "the report that noticed is recorded"
    );
    none_closed(&s1, &mut devices);
    s1.shutdown().await;
}

/// A renewal that finds leases gone (the store restarted empty) claims every
/// device again with its whole status, not only `online`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_lost_with_the_store_are_reclaimed_with_the_whole_status() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut devices = described_fleet(&fleet, &connector, "s1", 3).await;
    let connected_at = connected_at(&*fleet.store, &devices).await;

    fleet.store.clear();
    s1.renew_leases().await;

    all_restored(&*fleet.store, &devices, "s1", &connected_at).await;
    none_closed(&s1, &mut devices);
    s1.shutdown().await;
}

/// The memory store, with calls a test can hold back and count: the first
/// write marking a device online under `held` waits until the test lets it
/// go (to land a registration's status write after another supervisor's
/// registration of the same device); claims wait while the test holds them;
/// claims and status writes that find no status are counted.
#[derive(Debug)]
struct Gated {
    store: Arc<MemoryStore>,
    held: Option<SupervisorId>,
    armed: AtomicBool,
    holding: tokio::sync::Notify,
    release: tokio::sync::Notify,
    claims_open: tokio::sync::watch::Sender<bool>,
    claims: AtomicUsize,
    missing: AtomicUsize,
}

impl Gated {
    fn new(store: Arc<MemoryStore>, held: Option<&str>) -> Self {
        Gated {
            store,
            held: held.map(sid),
            armed: true.into(),
            holding: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
            claims_open: tokio::sync::watch::Sender::new(true),
            claims: AtomicUsize::new(0),
            missing: AtomicUsize::new(0),
        }
    }

    /// Waits until the online write is held.
    async fn holding(&self) {
        tokio::time::timeout(WAIT, self.holding.notified())
            .await
            .expect("the online write held in time");
    }
}

#[async_trait]
impl RoutingStore for Gated {
    async fn claim(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Result<opamp_core::Claim> {
        self.claims.fetch_add(1, SeqCst);
        let _ = self.claims_open.subscribe().wait_for(|open| *open).await.map(drop);
        self.store.claim(device, supervisor, ttl).await
    }
    async fn renew(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Result<Vec<DeviceId>> {
        self.store.renew(supervisor, devices, ttl).await
    }
    async fn release(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool> {
        self.store.release(device, supervisor).await
    }
    async fn lookup(&self, device: &DeviceId) -> Result<Option<SupervisorId>> {
        self.store.lookup(device).await
    }
    async fn lookup_many(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>> {
        self.store.lookup_many(devices).await
    }
}

#[async_trait]
impl StatusStore for Gated {
    async fn update_status(&self, device: &DeviceId, patch: &StatusPatch) -> Result<()> {
        let online_here = matches!(
            &patch.presence,
            Some(PresenceUpdate::Online { supervisor, .. }) if Some(*supervisor) == self.held
        );
        if online_here && self.armed.swap(false, SeqCst) {
            self.holding.notify_one();
            self.release.notified().await;
        }
        let written = self.store.update_status(device, patch).await;
        if let Err(Error::NotFound { .. }) = &written {
            self.missing.fetch_add(1, SeqCst);
        }
        written
    }
    async fn status(&self, device: &DeviceId) -> Result<Option<opamp_core::DeviceStatus>> {
        self.store.status(device).await
    }
    async fn online_devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        self.store.online_devices(page).await
    }
    async fn devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        self.store.devices(page).await
    }
    async fn supervisor_devices(&self, supervisor: &SupervisorId, page: &PageRequest) -> Result<Page<DeviceId>> {
        self.store.supervisor_devices(supervisor, page).await
    }
    async fn device_counts(&self) -> Result<Vec<opamp_core::SupervisorLoad>> {
        self.store.device_counts().await
    }
}

#[async_trait]
impl ConfigStore for Gated {
    async fn put_template(&self, template: &ConfigTemplate) -> Result<()> {
        self.store.put_template(template).await
    }
    async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>> {
        self.store.template(config).await
    }
    async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>> {
        self.store.template_versions(agent_type).await
    }
    async fn set_latest(&self, config: &ConfigRef) -> Result<()> {
        self.store.set_latest(config).await
    }
    async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>> {
        self.store.latest(agent_type).await
    }
    async fn set_desired(&self, device: &DeviceId, config: &ConfigRef) -> Result<()> {
        self.store.set_desired(device, config).await
    }
    async fn desired(&self, device: &DeviceId) -> Result<Option<ConfigRef>> {
        self.store.desired(device).await
    }
    async fn clear_desired(&self, device: &DeviceId) -> Result<bool> {
        self.store.clear_desired(device).await
    }
}

#[async_trait]
impl opamp_core::RevocationStore for Gated {
    async fn revoke(&self, revocation: &opamp_core::Revocation) -> Result<bool> {
        self.store.revoke(revocation).await
    }
    async fn reinstate(&self, device: &DeviceId) -> Result<bool> {
        self.store.reinstate(device).await
    }
    async fn revocation(&self, device: &DeviceId) -> Result<Option<opamp_core::Revocation>> {
        self.store.revocation(device).await
    }
    async fn revocations(&self, page: &PageRequest) -> Result<Page<opamp_core::Revocation>> {
        self.store.revocations(page).await
    }
}

#[async_trait]
impl TrackingStore for Gated {
    async fn insert_command(&self, record: &CommandRecord) -> Result<()> {
        self.store.insert_command(record).await
    }
    async fn update_command(&self, record: &CommandRecord) -> Result<bool> {
        self.store.update_command(record).await
    }
    async fn command_record(&self, id: &CorrelationId) -> Result<Option<CommandRecord>> {
        self.store.command_record(id).await
    }
    async fn overdue_commands(&self, before: Timestamp, limit: usize) -> Result<Vec<CorrelationId>> {
        self.store.overdue_commands(before, limit).await
    }
    async fn watch_endings(&self) -> Result<opamp_core::Endings> {
        self.store.watch_endings().await
    }
    async fn put_rollout(&self, rollout: &opamp_core::Rollout) -> Result<bool> {
        self.store.put_rollout(rollout).await
    }
    async fn rollout(&self, id: &opamp_core::RolloutId) -> Result<Option<opamp_core::Rollout>> {
        self.store.rollout(id).await
    }
    async fn rollouts(&self, page: &PageRequest) -> Result<Page<opamp_core::RolloutId>> {
        self.store.rollouts(page).await
    }
    async fn claim_rollout_driver(&self, id: &opamp_core::RolloutId, driver: &str, ttl: Duration) -> Result<bool> {
        self.store.claim_rollout_driver(id, driver, ttl).await
    }
    async fn release_rollout_driver(&self, id: &opamp_core::RolloutId, driver: &str) -> Result<bool> {
        self.store.release_rollout_driver(id, driver).await
    }
    async fn generation(&self) -> Result<Option<opamp_core::StoreGeneration>> {
        self.store.generation().await
    }
    async fn begin_generation(&self, generation: &opamp_core::StoreGeneration) -> Result<opamp_core::StoreGeneration> {
        self.store.begin_generation(generation).await
    }
}

/// One device registers on s1 and s2 at once, and s1's status write lands
/// after s2 claimed the device and wrote its own: the registration is fenced
/// by the lease, so s1's write is refused and s1 closes its session. One live
/// session is left, on s2, and the status names s2, which holds the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_registrations_leave_one_session_and_the_status_naming_the_lease_holder() {
    let fleet = Fleet::new().await;
    let holds = Arc::new(Gated::new(fleet.store.clone(), Some("s1")));
    let (s1, c1) = fleet.supervisor_over("s1", holds.clone()).await;
    let (s2, c2) = fleet.supervisor("s2", |c| c).await;

    // s1 claims the device; its online write is held.
    let mut on_s1 = c1.connect(&hello("d1")).await.unwrap();
    holds.holding().await;
    fleet.owner_is("d1", Some("s1")).await;
    // s2 registers it meanwhile: it claims it and marks it online.
    let mut on_s2 = silent_device(&c2, "d1").await;
    fleet.owner_is("d1", Some("s2")).await;
    // Now s1's write lands.
    holds.release.notify_one();

    let refused = tokio::time::timeout(WAIT, on_s1.inbound.recv())
        .await
        .expect("s1 answered in time")
        .unwrap();
    assert!(
        matches!(&refused, Some(ToDevice::Refused(why)) if why.reason.contains("s2") && !why.denied),
        "s1 refused the registration, naming the holder: {refused:?}"
    );
    let closed = on_s1.inbound.recv().await.unwrap();
    assert_eq!(closed, None, "s1 closed its session without registering it");
    eventually("s1 holds no session for d1", WAIT, || async {
        !s1.is_connected(&did("d1"))
    })
    .await;
    assert!(s2.is_connected(&did("d1")));
    assert!(still_open(&mut on_s2), "s2's session stays");
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert_eq!((status.status, status.supervisor), (Presence::Online, Some(sid("s2"))));
    fleet.owner_is("d1", Some("s2")).await;
    s1.shutdown().await;
    s2.shutdown().await;
}

/// The store loses its data and, before s1 notices, d0 registers on s2: when
/// s1 claims its devices again (d1's report noticed the loss), its claim of d0
/// is a takeover of s2's newer session, so s1 hands the lease back and closes
/// its own session of d0; d1 it keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaiming_after_store_loss_leaves_a_device_registered_elsewhere_meanwhile() {
    let fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let mut devices = described_fleet(&fleet, &connector, "s1", 2).await;

    fleet.store.clear();
    fleet.take_over("d0", "s2").await;
    let (_, d1) = &devices[1];
    d1.outbound.send(report(Some(true), None)).await.unwrap();

    let (_, d0) = &mut devices[0];
    let closed = tokio::time::timeout(WAIT, d0.inbound.recv())
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(closed, None, "s1 closed its older session of d0");
    fleet.owner_is("d0", Some("s2")).await;
    let status = fleet.store.status(&did("d0")).await.unwrap().unwrap();
    assert_eq!(status.supervisor, Some(sid("s2")), "s1 wrote nothing over s2's status");
    fleet.owner_is("d1", Some("s1")).await;
    let (_, d1) = &mut devices[1];
    assert!(still_open(d1));
    s1.shutdown().await;
}

/// Every device notices the store's loss at once (each one's report finds no
/// status while claims are held back): each claims itself again once, and
/// the re-assertion of every device is one pass, or two when devices notice
/// while one runs; not a pass per device that noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_noticing_the_loss_together_make_one_pass() {
    const DEVICES: usize = 20;
    let fleet = Fleet::new().await;
    let gated = Arc::new(Gated::new(fleet.store.clone(), None));
    let (s1, connector) = fleet.supervisor_over("s1", gated.clone()).await;
    let mut devices = described_fleet(&fleet, &connector, "s1", DEVICES).await;
    let connected_at = connected_at(&*fleet.store, &devices).await;

    gated.claims_open.send_replace(false);
    fleet.store.clear();
    let claims_before = gated.claims.load(SeqCst);
    for (_, session) in &devices {
        session.outbound.send(report(Some(true), None)).await.unwrap();
    }
    eventually("every device noticed", WAIT, || async {
        gated.missing.load(SeqCst) >= DEVICES
    })
    .await;
    gated.claims_open.send_replace(true);

    all_restored(&*fleet.store, &devices, "s1", &connected_at).await;
    none_closed(&s1, &mut devices);
    // Counted once the supervisor stopped: it waits for a pass under way.
    s1.shutdown().await;
    let claims = gated.claims.load(SeqCst) - claims_before;
    assert!(
        claims <= DEVICES + 2 * DEVICES,
        "{claims} claims for {DEVICES} devices: more than two passes"
    );
}

/// A device is revoked while it registers, after its registration read that
/// it was not revoked and before its session was listed: the disconnect
/// reaches its supervisor before the session does, and the session is
/// closed as soon as it is listed, not left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_while_it_registers_is_closed_once_listed() {
    let fleet = Fleet::new().await;
    let holds = Arc::new(Gated::new(fleet.store.clone(), Some("s1")));
    let (s1, c1) = fleet.supervisor_over("s1", holds.clone()).await;
    let control = opamp_core::runtime::control_plane::ControlPlane::start_with_clock(
        Default::default(),
        fleet.store.clone(),
        fleet.bus.clone(),
        fleet.clock.clone(),
    )
    .await
    .unwrap();

    // s1 claimed d1 and found it not revoked; its online write is held.
    let mut device = c1.connect(&hello("d1")).await.unwrap();
    holds.holding().await;
    let revoked = control.revoke(&did("d1"), "stolen").await.unwrap();
    let disconnect = revoked.disconnect.expect("sent to s1, which holds the lease");
    let ended = control.wait(&disconnect, WAIT).await.unwrap();
    assert_eq!(
        ended.state,
        CommandState::DeviceOffline,
        "no session of d1 was listed yet"
    );
    holds.release.notify_one();

    let mut registered = false;
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(message) = device.inbound.recv().await.unwrap() {
            registered |= matches!(message, ToDevice::Registered(_));
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the revoked device's session is still open after {WAIT:?}"
    );
    assert!(registered, "it was listed, then closed");
    eventually("s1 holds no session for d1", WAIT, || async {
        !s1.is_connected(&did("d1"))
    })
    .await;
    control.shutdown().await;
    s1.shutdown().await;
}

/// An agent whose sessions are closed again and again after they registered
/// reconnects after the shortest delay each time: a session that registered
/// was a success, so the backoff starts over (it used to grow with every
/// session lost in the agent's life: 11 s for eight with these settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reconnects_promptly_however_many_registered_sessions_it_lost() {
    let mut fleet = Fleet::new().await;
    let (s1, connector) = fleet.supervisor("s1", |c| c).await;
    let config = opamp_core::runtime::agent::AgentConfig::new(hello("d1"))
        .backoff(Duration::from_millis(50), Duration::from_secs(5));
    let agent = Arc::new(opamp_core::runtime::agent::Agent::new(
        config,
        Arc::new(connector),
        Arc::new(MemoryApplier::new()),
    ));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = Arc::clone(&agent);
    tokio::spawn(async move {
        running
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    fleet
        .event(|e| matches!(e.kind, EventKind::Connected { .. }).then_some(()))
        .await;
    let started = std::time::Instant::now();
    for _ in 0..8 {
        let reason = "closed by the test".to_owned();
        fleet.send("s1", "d1", CommandKind::Disconnect { reason }, WAIT).await;
        fleet
            .event(|e| matches!(e.kind, EventKind::Connected { .. }).then_some(()))
            .await;
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "eight reconnections took {took:?}");
    s1.shutdown().await;
}
