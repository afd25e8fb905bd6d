//! The control plane end to end: real supervisors and agents over the
//! in-process transport, on the memory store and bus.

use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::agent::MemoryApplier;
use opamp_core::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use opamp_core::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use opamp_core::testkit::{eventually, spawn_agent};
use opamp_core::tracking::{CommandState, RolloutState};
use opamp_core::transport::channel::{self, ChannelConnector};
use opamp_core::transport::{AgentConnector, Capabilities, DeviceHello};
use opamp_core::{
    AgentType, Bus, Clock, CommandOutcome, ConfigBundle, ConfigFile, ConfigRef, ConfigTemplate, ConfigVersion,
    CorrelationId, DeviceId, Error, Labels, PageRequest, RolloutSpec, RoutingStore, StatusStore, Store, SupervisorId,
    SystemClock, Target, Timestamp, TrackingStore,
};
use opamp_store::memory::MemoryStore;

const WAIT: Duration = Duration::from_secs(10);

struct Fleet {
    store: Arc<MemoryStore>,
    bus: Arc<MemoryBus>,
    clock: Arc<dyn Clock>,
    control: ControlPlane,
}

impl Fleet {
    async fn new(config: ControlPlaneConfig) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let bus = Arc::new(MemoryBus::new());
        let control = ControlPlane::start_with_clock(config, store.clone(), bus.clone(), clock.clone())
            .await
            .unwrap();
        Fleet {
            store,
            bus,
            clock,
            control,
        }
    }

    async fn supervisor(&self, id: &str) -> (RunningSupervisor, ChannelConnector) {
        let (transport, connector) = channel::pair(channel::ChannelConfig::default());
        let store: Arc<dyn Store> = self.store.clone();
        let bus: Arc<dyn Bus> = self.bus.clone();
        let supervisor = Supervisor::new(SupervisorConfig::new(sid(id)), store, bus)
            .with_clock(self.clock.clone())
            .start(vec![Arc::new(transport)])
            .await
            .unwrap();
        (supervisor, connector)
    }

    /// Connects an agent for `device` and waits until it is online.
    async fn device(&self, connector: &ChannelConnector, hello: DeviceHello, applier: Arc<MemoryApplier>) {
        let device = hello.device;
        let connector: Arc<dyn AgentConnector> = Arc::new(connector.clone());
        let (_agent, stop) = spawn_agent(connector, hello, applier);
        // The agent runs until the test ends.
        std::mem::forget(stop);
        self.online(device).await;
    }

    async fn online(&self, device: DeviceId) {
        let store = self.store.clone();
        eventually(&format!("{device} online"), WAIT, || {
            let store = store.clone();
            async move { store.lookup(&device).await.unwrap().is_some() }
        })
        .await;
    }

    /// Waits until the command `id` has ended and returns its final state.
    async fn ended(&self, id: CorrelationId) -> CommandState {
        let control = self.control.clone();
        eventually(&format!("command {id} ended"), WAIT, || {
            let control = control.clone();
            async move { control.command(&id).await.unwrap().unwrap().state.is_final() }
        })
        .await;
        self.control.command(&id).await.unwrap().unwrap().state
    }

    async fn template(&self, version: &str) -> ConfigRef {
        let config = ConfigRef::new(fluentbit(), ConfigVersion::new(version).unwrap());
        let bundle = ConfigBundle::new()
            .with_file(
                "fluent-bit.conf",
                ConfigFile::new("text/plain", format!("# {version}\n")),
            )
            .unwrap();
        self.control
            .create_template(&ConfigTemplate::new(config, bundle, "test", Timestamp::now()))
            .await
            .unwrap();
        config
    }
}

fn did(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn sid(id: &str) -> SupervisorId {
    SupervisorId::new(id).unwrap()
}

fn fluentbit() -> AgentType {
    AgentType::new("fluentbit").unwrap()
}

fn hello(device: &str, labels: &[(&str, &str)]) -> DeviceHello {
    let mut hello = DeviceHello::new(did(device));
    hello.capabilities = Capabilities::all_builtin();
    hello.agent_type = Some(fluentbit());
    hello.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toggle_is_tracked_to_its_acknowledgement() {
    let fleet = Fleet::new(ControlPlaneConfig::default()).await;
    let (_s1, connector) = fleet.supervisor("s1").await;
    fleet
        .device(&connector, hello("d1", &[]), Arc::new(MemoryApplier::new()))
        .await;

    let id = fleet.control.set_emission(&did("d1"), true).await.unwrap();
    let record = fleet.control.wait(&id, WAIT).await.unwrap();
    assert_eq!(record.state, CommandState::Acked);
    assert!(matches!(
        fleet.control.wait(&CorrelationId::new(), WAIT).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!((record.supervisor, record.attempts), (Some(sid("s1")), 1));
    assert!(record.completed_at.is_some());
    assert!(fleet.store.status(&did("d1")).await.unwrap().unwrap().emission);

    // Another instance on the same store and bus answers for it too.
    let other = ControlPlane::start(ControlPlaneConfig::default(), fleet.store.clone(), fleet.bus.clone())
        .await
        .unwrap();
    assert_eq!(other.command(&id).await.unwrap().unwrap().state, CommandState::Acked);
    let id = other.acting_as("alice").set_emission(&did("d1"), false).await.unwrap();
    assert_eq!(fleet.ended(id).await, CommandState::Acked);
    let record = fleet.control.command(&id).await.unwrap().unwrap();
    assert_eq!(record.initiated_by.as_deref(), Some("alice"));
    other.shutdown().await;
    fleet.control.check().await.unwrap();
}

/// An outcome another instance records (here written straight into the
/// shared store) ends a `wait` at once, through the store's notice, not
/// when the wait next reads the record (100 ms after its first look). Time
/// is tokio's paused clock, so "at once" means no timer had to fire.
#[tokio::test(start_paused = true)]
async fn a_wait_hears_at_once_of_an_outcome_another_instance_records() {
    let fleet = Fleet::new(ControlPlaneConfig::default()).await;
    let d1 = did("d1");
    fleet
        .store
        .claim(&d1, &sid("s1"), Duration::from_secs(600))
        .await
        .unwrap();
    let id = fleet.control.set_emission(&d1, true).await.unwrap();
    let waiting = {
        let control = fleet.control.clone();
        tokio::spawn(async move { control.wait(&id, Duration::from_secs(5)).await })
    };
    // The wait has looked once and sleeps until its next look.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!waiting.is_finished());

    let mut record = fleet.store.command_record(&id).await.unwrap().unwrap();
    record.complete(&CommandOutcome::Acked, fleet.clock.now());
    let recorded = tokio::time::Instant::now();
    assert!(fleet.store.update_command(&record).await.unwrap());
    let ended = waiting.await.unwrap().unwrap();
    assert_eq!(ended.state, CommandState::Acked);
    assert_eq!(
        recorded.elapsed(),
        Duration::ZERO,
        "the wait read the record again on its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_answers_times_out_after_one_retry() {
    let config = ControlPlaneConfig::default()
        .command_timeout(Duration::from_millis(200))
        .retry_grace(Duration::from_secs(5));
    let fleet = Fleet::new(config).await;
    let (_s1, connector) = fleet.supervisor("s1").await;
    // A device that registers and then reads nothing.
    let _mute = connector.connect(&hello("mute", &[])).await.unwrap();
    fleet.online(did("mute")).await;

    let id = fleet.control.set_emission(&did("mute"), true).await.unwrap();
    let waited = fleet.control.wait(&id, Duration::from_millis(20)).await.unwrap();
    assert_eq!(
        waited.state,
        CommandState::Pending,
        "time ran out before the device's deadline"
    );
    assert_eq!(fleet.ended(id).await, CommandState::TimedOut);
    assert_eq!(fleet.control.command(&id).await.unwrap().unwrap().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_reach_the_matching_devices_and_templates_are_immutable() {
    let fleet = Fleet::new(ControlPlaneConfig::default()).await;
    let (_s1, connector) = fleet.supervisor("s1").await;
    for (device, ring) in [("a1", "canary"), ("a2", "canary"), ("a3", "main")] {
        fleet
            .device(
                &connector,
                hello(device, &[("ring", ring)]),
                Arc::new(MemoryApplier::new()),
            )
            .await;
    }
    let mut other = hello("b1", &[("ring", "canary")]);
    other.agent_type = Some(AgentType::new("otelcol").unwrap());
    fleet.device(&connector, other, Arc::new(MemoryApplier::new())).await;

    let v2 = fleet.template("v2").await;
    let canary: Labels = [("ring".to_owned(), "canary".to_owned())].into();
    let target = Target::Selector {
        agent_type: fluentbit(),
        labels: canary,
    };
    let issued = fleet.control.apply_config(&target, &v2).await.unwrap();
    let mut devices: Vec<String> = issued.iter().map(|i| i.device.to_string()).collect();
    devices.sort();
    assert_eq!(devices, ["a1", "a2"]);
    for issued in issued {
        assert_eq!(fleet.ended(issued.correlation_id).await, CommandState::Acked);
    }
    assert_eq!(
        fleet.store.status(&did("a1")).await.unwrap().unwrap().config_version,
        Some(v2.version)
    );
    assert_eq!(
        fleet.store.status(&did("a3")).await.unwrap().unwrap().config_version,
        None
    );

    // Templates: the same content again is fine, other content is refused, too big is refused.
    fleet.template("v2").await;
    let other_bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "# other\n"))
        .unwrap();
    let err = fleet
        .control
        .create_template(&ConfigTemplate::new(v2, other_bundle, "test", Timestamp::now()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let huge = ConfigBundle::new()
        .with_file("big.conf", ConfigFile::new("text/plain", vec![b'x'; 4 * 1024 * 1024]))
        .unwrap();
    let v3 = ConfigRef::new(fluentbit(), ConfigVersion::new("v3").unwrap());
    let err = fleet
        .control
        .create_template(&ConfigTemplate::new(v3, huge, "test", Timestamp::now()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { .. }) && err.to_string().contains("limit"),
        "{err}"
    );
    assert!(matches!(
        fleet.control.set_latest(&v3).await,
        Err(Error::NotFound { .. })
    ));
    fleet.control.set_latest(&v2).await.unwrap();
    assert_eq!(fleet.control.latest(&fluentbit()).await.unwrap(), Some(v2.version));
    assert_eq!(
        fleet.control.template_versions(&fluentbit()).await.unwrap(),
        vec![v2.version]
    );

    // A selector matching more than max_fanout devices asks for a rollout.
    let small = ControlPlane::start(
        ControlPlaneConfig::default().max_fanout(1),
        fleet.store.clone(),
        fleet.bus.clone(),
    )
    .await
    .unwrap();
    let err = small
        .apply_config(&Target::agent_type(fluentbit()), &v2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { .. }) && err.to_string().contains("rollout"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_goes_out_in_growing_waves() {
    let fleet = Fleet::new(ControlPlaneConfig::default().rollout_poll(Duration::from_millis(20))).await;
    let (_s1, connector) = fleet.supervisor("s1").await;
    for n in 0..7 {
        fleet
            .device(&connector, hello(&format!("r{n}"), &[]), Arc::new(MemoryApplier::new()))
            .await;
    }
    let v5 = fleet.template("v5").await;
    let rollout = fleet
        .control
        .acting_as("bob")
        .start_rollout(RolloutSpec::new(v5).with_waves(1, 2, 4))
        .await
        .unwrap();
    assert_eq!(rollout.started_by.as_deref(), Some("bob"));

    let control = fleet.control.clone();
    eventually("the rollout completed", WAIT, || {
        let control = control.clone();
        async move { control.rollout(&rollout.id).await.unwrap().unwrap().state == RolloutState::Completed }
    })
    .await;
    let done = fleet.control.rollout(&rollout.id).await.unwrap().unwrap();
    let sizes: Vec<u32> = done.waves.iter().map(|wave| wave.tally.total()).collect();
    assert_eq!(sizes, [1, 2, 4]);
    assert_eq!(done.totals().acked, 7);
    assert!(
        done.waves
            .iter()
            .all(|wave| wave.finished_at.is_some() && wave.commands.is_empty())
    );
    for n in 0..7 {
        let status = fleet.store.status(&did(&format!("r{n}"))).await.unwrap().unwrap();
        assert_eq!(status.config_version, Some(v5.version), "r{n}");
    }
    let listed = fleet.control.rollouts(&PageRequest::first(10)).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    let err = fleet.control.pause_rollout(&rollout.id).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_wave_pauses_the_rollout_until_resumed_and_abort_is_final() {
    let fleet = Fleet::new(ControlPlaneConfig::default().rollout_poll(Duration::from_millis(20))).await;
    let (_s1, connector) = fleet.supervisor("s1").await;
    // The canary (the first device in id order) rejects the config.
    let rejecting = Arc::new(MemoryApplier::new());
    rejecting.reject_with(Some("reload returned status 1".into()));
    fleet.device(&connector, hello("p0", &[]), rejecting).await;
    for n in 1..4 {
        fleet
            .device(&connector, hello(&format!("p{n}"), &[]), Arc::new(MemoryApplier::new()))
            .await;
    }
    let v6 = fleet.template("v6").await;
    let rollout = fleet.control.start_rollout(RolloutSpec::new(v6)).await.unwrap();

    let control = fleet.control.clone();
    eventually("the rollout paused", WAIT, || {
        let control = control.clone();
        async move {
            matches!(
                control.rollout(&rollout.id).await.unwrap().unwrap().state,
                RolloutState::Paused { .. }
            )
        }
    })
    .await;
    let paused = fleet.control.rollout(&rollout.id).await.unwrap().unwrap();
    match &paused.state {
        RolloutState::Paused { reason } => assert!(reason.contains("wave 1 failed on 1 of 1"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(paused.waves.len(), 1);

    fleet.control.resume_rollout(&rollout.id).await.unwrap();
    eventually("the resumed rollout completed", WAIT, || {
        let control = control.clone();
        async move { control.rollout(&rollout.id).await.unwrap().unwrap().state == RolloutState::Completed }
    })
    .await;
    let done = fleet.control.rollout(&rollout.id).await.unwrap().unwrap();
    assert_eq!((done.totals().acked, done.totals().failed), (3, 1));

    // Pause, then abort; an aborted rollout cannot be resumed.
    let second = fleet.control.start_rollout(RolloutSpec::new(v6)).await.unwrap();
    let paused = fleet.control.pause_rollout(&second.id).await.unwrap();
    assert!(matches!(
        paused.state,
        RolloutState::Paused { .. } | RolloutState::Completed
    ));
    if paused.state != RolloutState::Completed {
        assert_eq!(
            fleet.control.abort_rollout(&second.id).await.unwrap().state,
            RolloutState::Aborted
        );
        let err = fleet.control.resume_rollout(&second.id).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { .. }) && err.to_string().contains("aborted"),
            "{err}"
        );
    }
    let unknown = fleet
        .control
        .pause_rollout(&opamp_core::RolloutId::new())
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::NotFound { .. }), "{unknown:?}");
}
