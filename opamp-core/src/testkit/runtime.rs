//! The supervisor and the control plane on every backend: scenarios each
//! store's and each bus's tests run, the way the conformance suites are.
//!
//! The runtimes are generic over the traits, but what they lean on differs
//! from backend to backend: how a store fences a status write and answers a
//! lease, how a bus delivers a command again. So the runtimes are only known
//! to work on a backend these scenarios ran on. Each scenario takes a
//! [`StoreFixture`] (a fresh store and its clock) and a fresh bus, starts
//! real supervisors and a real control plane on them, and plays devices over
//! the in-process transport. [`runtime_scenarios!`](crate::runtime_scenarios)
//! turns them into tests.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::Bus;
use crate::command::{CommandOutcome, CorrelationId};
use crate::id::{AgentType, DeviceId, SupervisorId};
use crate::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use crate::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use crate::status::StatusPatch;
use crate::store::{PageRequest, Store};
use crate::testkit::eventually;
use crate::testkit::store::StoreFixture;
use crate::time::Clock;
use crate::tracking::CommandState;
use crate::tracking::Target;
use crate::transport::channel::{self, ChannelConfig, ChannelConnector};
use crate::transport::{
    AgentConnector, AgentSession, Capabilities, CommandAck, ConfigAck, DeviceHello, FromDevice, ToDevice,
};

/// Expands into one test per runtime scenario, in a module named
/// `runtime_scenarios`.
///
/// `$fixture` is an `async fn() -> StoreFixture` as for
/// [`store_conformance!`](crate::store_conformance); `$bus` an
/// `async fn() -> Arc<dyn Bus>` making a fresh bus, isolated from every
/// other (a Kafka bus with topics of its own).
///
/// ```no_run
/// use std::sync::Arc;
///
/// async fn fixture() -> opamp_core::testkit::store::StoreFixture {
///     let clock = Arc::new(opamp_core::ManualClock::starting_now());
///     let store = opamp_store::memory::MemoryStore::with_clock(clock.clone());
///     opamp_core::testkit::store::StoreFixture::new(Arc::new(store), clock)
/// }
///
/// async fn bus() -> Arc<dyn opamp_core::Bus> {
///     Arc::new(opamp_bus::memory::MemoryBus::new())
/// }
///
/// opamp_core::runtime_scenarios!(fixture, bus);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! runtime_scenarios {
    ($fixture:path, $bus:path) => {
        $crate::runtime_scenarios!(@cases $fixture, $bus;
            a_command_and_a_config_push_reach_the_device,
            a_command_delivered_again_runs_once,
            a_device_that_moves_is_taken_over_and_fenced,
            a_device_gone_ends_its_commands_offline,
            a_store_that_lost_its_data_is_refused_until_the_loss_is_accepted,
            a_config_for_a_device_nobody_holds_reaches_it_when_it_registers,
            an_unanswered_command_is_retried_at_the_devices_new_owner,
            a_command_whose_sender_died_is_swept_by_another_instance,
            devices_converge_on_their_desired_config,
            a_supervisor_shut_down_releases_its_devices_and_marks_them_offline,
            a_command_left_by_a_crashed_supervisor_ends_when_it_restarts,
            lapsed_leases_of_connected_devices_are_claimed_again,
            a_revoked_device_is_disconnected_and_refused_until_reinstated,
        );
    };
    (@cases $fixture:path, $bus:path; $($case:ident),+ $(,)?) => {
        mod runtime_scenarios {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = $fixture().await;
                    $crate::testkit::runtime::$case(&f, $bus().await).await;
                }
            )+
        }
    };
}

/// How long a scenario waits for what the runtimes do on their own (a
/// broker-backed bus rebalances and fetches in its own time).
const WAIT: Duration = Duration::from_secs(30);

/// The runtimes of one scenario: supervisors and a control plane on the
/// fixture's store and clock and the scenario's bus.
struct Rig {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    clock: Arc<crate::ManualClock>,
    control: ControlPlane,
}

impl Rig {
    async fn start(f: &StoreFixture, bus: Arc<dyn Bus>) -> Rig {
        Rig::start_with(f, bus, ControlPlaneConfig::default()).await
    }

    async fn start_with(f: &StoreFixture, bus: Arc<dyn Bus>, config: ControlPlaneConfig) -> Rig {
        let control = ControlPlane::start_with_clock(config, f.store.clone(), bus.clone(), f.clock.clone())
            .await
            .expect("starting a control plane");
        Rig {
            store: f.store.clone(),
            bus,
            clock: f.clock.clone(),
            control,
        }
    }

    /// A supervisor `id` serving its own in-process transport.
    async fn supervisor(&self, id: &str) -> (RunningSupervisor, ChannelConnector) {
        let (transport, connector) = channel::pair(ChannelConfig::default());
        let supervisor = Supervisor::new(SupervisorConfig::new(sid(id)), self.store.clone(), self.bus.clone())
            .with_clock(self.clock.clone())
            .start(vec![Arc::new(transport)])
            .await
            .expect("starting a supervisor");
        (supervisor, connector)
    }

    /// `device` connects to a new supervisor `id`, which takes it over.
    async fn moved_to(&self, device: DeviceId, id: &str) -> (RunningSupervisor, AgentSession) {
        let (supervisor, connector) = self.supervisor(id).await;
        let session = connect(&connector, device).await;
        self.owner_is(device, id).await;
        (supervisor, session)
    }

    async fn owner_is(&self, device: DeviceId, owner: &str) {
        let (store, owner) = (self.store.clone(), sid(owner));
        eventually(&format!("{device} owned by {owner}"), WAIT, || {
            let store = store.clone();
            async move { store.lookup(&device).await.ok().flatten() == Some(owner) }
        })
        .await;
    }

    /// Waits for command `id` to end, and returns how.
    async fn ended(&self, id: CorrelationId) -> CommandState {
        let record = self.control.wait(&id, WAIT).await.expect("the command is recorded");
        assert!(
            record.state.is_final(),
            "command {id} did not end within {WAIT:?}: {record:?}"
        );
        record.state
    }

    async fn stop(self, supervisors: Vec<RunningSupervisor>) {
        self.control.shutdown().await;
        for supervisor in supervisors {
            supervisor.shutdown().await;
        }
    }
}

fn sid(id: &str) -> SupervisorId {
    SupervisorId::new(id).expect("a valid literal supervisor id")
}

fn did(id: &str) -> DeviceId {
    DeviceId::new(id).expect("a valid literal device id")
}

fn fluentbit() -> AgentType {
    AgentType::new("fluentbit").expect("a valid literal agent type")
}

/// What a Fluent Bit device says when it connects.
fn hello(device: DeviceId) -> DeviceHello {
    let mut hello = DeviceHello::new(device);
    hello.capabilities = Capabilities::all_builtin();
    hello.agent_type = Some(fluentbit());
    hello
}

/// Connects `device` and waits for its registration.
async fn connect(connector: &ChannelConnector, device: DeviceId) -> AgentSession {
    connect_as(connector, hello(device)).await
}

/// Connects saying `hello` and waits for the registration.
async fn connect_as(connector: &ChannelConnector, hello: DeviceHello) -> AgentSession {
    let device = hello.device;
    let mut session = connector.connect(&hello).await.expect("connecting a device");
    let first = tokio::time::timeout(WAIT, session.inbound.recv()).await;
    assert!(
        matches!(first, Ok(Ok(Some(ToDevice::Registered(_))))),
        "{device}: the first message is the registration, got {first:?}"
    );
    session
}

/// The next message the device is sent.
async fn next_message(device: &mut AgentSession, what: &str) -> Option<ToDevice> {
    tokio::time::timeout(WAIT, device.inbound.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing came within {WAIT:?}"))
        .unwrap_or_else(|err| panic!("{what}: {err}"))
}

/// Waits for command `id` to be pushed, as the next message, and acknowledges it.
async fn answer(device: &mut AgentSession, id: CorrelationId) {
    match next_message(device, "a command").await {
        Some(ToDevice::Command(command)) if command.correlation_id == id => {
            let ack = CommandAck::new(id, CommandOutcome::Acked);
            device
                .outbound
                .send(FromDevice::CommandAck(ack))
                .await
                .expect("answering");
        }
        other => panic!("expected command {id}, the device was sent {other:?}"),
    }
}

/// Expects the next message to be a push of `bundle`'s configuration, and
/// acknowledges it as applied.
async fn apply_push(device: &mut AgentSession, bundle: &crate::ConfigBundle) {
    let push = match next_message(device, "a config push").await {
        Some(ToDevice::ConfigPush(push)) => push,
        other => panic!("expected a config push, got {other:?}"),
    };
    assert_eq!(push.hash, bundle.hash(), "the push carries the configuration expected");
    let ack = ConfigAck::new(push.correlation_id, push.hash, crate::ConfigApplyState::Applied, None);
    device
        .outbound
        .send(FromDevice::ConfigAck(Box::new(ack)))
        .await
        .expect("answering");
}

/// A toggle and a configuration push, each issued through the control
/// plane, reach the device through its supervisor and end acked, and the
/// device's status says what it now runs.
pub async fn a_command_and_a_config_push_reach_the_device(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-1");
    let mut session = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;

    let toggle = rig.control.set_emission(&device, true).await.expect("issuing a toggle");
    answer(&mut session, toggle).await;
    assert_eq!(rig.ended(toggle).await, CommandState::Acked);

    let template = crate::testkit::fluent_bit_template("v1", rig.clock.now());
    let (config, bundle) = (template.reference(), template.bundle.clone());
    rig.control
        .create_template(&template)
        .await
        .expect("storing a template");
    let issued = rig
        .control
        .apply_config(&Target::Device(device), &config)
        .await
        .expect("pushing a config");
    apply_push(&mut session, &bundle).await;
    assert_eq!(rig.ended(issued[0].correlation_id).await, CommandState::Acked);
    let status = rig.store.status(&device).await.unwrap().expect("a status");
    assert_eq!(
        (status.emission, status.config_version, status.config_hash),
        (true, Some(config.version), Some(bundle.hash()))
    );
    rig.stop(vec![s1]).await;
}

/// A command the bus delivers again after it ended (as a broker replaying
/// from an older commit does) is not run again: the next thing the device
/// is sent is the command after it.
pub async fn a_command_delivered_again_runs_once(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-1");
    let mut session = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;

    let first = rig.control.set_emission(&device, true).await.unwrap();
    answer(&mut session, first).await;
    assert_eq!(rig.ended(first).await, CommandState::Acked);
    let record = rig.control.command(&first).await.unwrap().expect("recorded");
    rig.bus
        .send(&sid("s1"), &record.command)
        .await
        .expect("sending it again");
    let second = rig.control.set_emission(&device, false).await.unwrap();
    answer(&mut session, second).await;
    assert_eq!(rig.ended(second).await, CommandState::Acked);
    rig.stop(vec![s1]).await;
}

/// A device that registers on a second supervisor is owned there; the first
/// closes its stale session, and commands follow the device.
pub async fn a_device_that_moves_is_taken_over_and_fenced(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, on_s1) = rig.supervisor("s1").await;
    let (s2, on_s2) = rig.supervisor("s2").await;
    let device = did("device-1");
    let mut old = connect(&on_s1, device).await;
    rig.owner_is(device, "s1").await;

    let mut new = connect(&on_s2, device).await;
    rig.owner_is(device, "s2").await;
    // The old session is closed at s1's next write for the device, or its next renewal.
    s1.renew_leases().await;
    loop {
        match next_message(&mut old, "the stale session closing").await {
            None => break,
            Some(ToDevice::Command(command)) => panic!("s1 still pushes to its stale session: {command:?}"),
            Some(_) => {}
        }
    }
    let toggle = rig.control.set_emission(&device, true).await.unwrap();
    answer(&mut new, toggle).await;
    assert_eq!(rig.ended(toggle).await, CommandState::Acked);
    let status = rig.store.status(&device).await.unwrap().expect("a status");
    assert_eq!(status.supervisor, Some(sid("s2")), "the status names the new owner");
    rig.stop(vec![s1, s2]).await;
}

/// A device that disconnected is released and marked offline; a command to
/// it ends `device_offline` at once instead of waiting for its deadline.
pub async fn a_device_gone_ends_its_commands_offline(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-1");
    let session = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;
    drop(session);
    let store = rig.store.clone();
    eventually("the device released", WAIT, || {
        let store = store.clone();
        async move { store.lookup(&device).await.ok().flatten().is_none() }
    })
    .await;
    let id = rig.control.set_emission(&device, true).await.unwrap();
    assert_eq!(rig.ended(id).await, CommandState::DeviceOffline);
    rig.stop(vec![s1]).await;
}

/// A store with no generation on a bus that holds commands sent before (as
/// after the store came back empty) makes a control plane refuse to start,
/// with [`Error::DataLoss`](crate::Error::DataLoss), until it is told to
/// accept the loss; it then begins a generation, which later starts keep.
pub async fn a_store_that_lost_its_data_is_refused_until_the_loss_is_accepted(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let start = |accept: bool| {
        let config = ControlPlaneConfig::default().accept_store_loss(accept);
        ControlPlane::start_with_clock(config, f.store.clone(), bus.clone(), f.clock.clone())
    };
    // What an earlier generation of the system sent.
    let earlier = crate::Command::new(
        did("device-1"),
        crate::CommandKind::SetEmission { state: true },
        f.clock.now(),
        Duration::from_secs(30),
    );
    bus.send(&sid("s1"), &earlier).await.expect("sending a command");

    let err = start(false).await.expect_err("a store that lost its data is refused");
    assert!(matches!(err, crate::Error::DataLoss { .. }), "{err:?}");
    assert!(
        err.to_string().contains("--accept-store-loss"),
        "says how to go on: {err}"
    );
    assert_eq!(f.store.generation().await.unwrap(), None, "a refusal marks nothing");

    let accepted = start(true).await.expect("starting, the loss accepted");
    let generation = accepted.store_generation();
    assert_eq!(f.store.generation().await.unwrap(), Some(generation.clone()));
    accepted.shutdown().await;

    let again = start(false).await.expect("the next start finds the generation");
    assert_eq!(again.store_generation(), generation);
    assert_eq!(again.store_losses(), 0);
    again.shutdown().await;
}

/// Short deadlines, so that the sweep of unanswered commands runs within a
/// scenario (the store's clock is moved past them by hand).
fn quick_retries() -> ControlPlaneConfig {
    ControlPlaneConfig::default()
        .command_timeout(Duration::from_millis(300))
        .retry_grace(Duration::from_millis(100))
}

/// Makes `device` look held by a supervisor that died: a live lease and an
/// online status, and nobody reading what is sent to it.
async fn held_by_a_dead_supervisor(rig: &Rig, device: DeviceId) {
    let ghost = sid("ghost");
    rig.store
        .claim(&device, &ghost, Duration::from_secs(600))
        .await
        .expect("claiming for the ghost");
    rig.store
        .update_status(&device, &StatusPatch::new().online(ghost, rig.clock.now()))
        .await
        .expect("writing the ghost's status");
}

/// Nothing is lost for a device no supervisor holds: a toggle to one seen
/// before ends `device_offline` at once, sent to no one; one to a device
/// never seen is `NotFound`, naming it; a config for a device nobody holds
/// ends `deferred` and becomes its desired config, pushed by the supervisor
/// it registers with.
pub async fn a_config_for_a_device_nobody_holds_reaches_it_when_it_registers(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let gone = did("device-gone");
    let patches = [
        StatusPatch::new().online(sid("s9"), rig.clock.now()),
        StatusPatch::new().offline(),
    ];
    for patch in &patches {
        rig.store.update_status(&gone, patch).await.expect("writing a status");
    }
    let id = rig
        .control
        .set_emission(&gone, true)
        .await
        .expect("issuing to an offline device");
    let record = rig.control.command(&id).await.unwrap().expect("a record");
    assert_eq!(
        (record.state, record.supervisor, record.attempts),
        (CommandState::DeviceOffline, None, 0)
    );
    let err = rig
        .control
        .set_emission(&did("never-seen"), true)
        .await
        .expect_err("a device never seen");
    assert!(
        matches!(err, crate::Error::NotFound { .. }) && err.to_string().contains("never-seen"),
        "{err}"
    );

    let template = crate::testkit::fluent_bit_template("v1", rig.clock.now());
    let config = template.reference();
    rig.control
        .create_template(&template)
        .await
        .expect("storing a template");
    let device = did("device-new");
    let issued = rig
        .control
        .apply_config(&Target::Device(device), &config)
        .await
        .expect("a config for a device nobody holds");
    let record = rig
        .control
        .command(&issued[0].correlation_id)
        .await
        .unwrap()
        .expect("a record");
    assert_eq!(record.state, CommandState::Deferred);
    assert_eq!(rig.store.desired(&device).await.unwrap(), Some(config));

    let (s1, connector) = rig.supervisor("s1").await;
    let mut session = connect(&connector, device).await;
    apply_push(&mut session, &template.bundle).await;
    let store = rig.store.clone();
    let hash = template.bundle.hash();
    eventually("the status says what the device runs", WAIT, || {
        let store = store.clone();
        async move {
            let status = store.status(&device).await.ok().flatten();
            status.is_some_and(|status| status.config_hash == Some(hash))
        }
    })
    .await;

    let missing = crate::ConfigRef::new(fluentbit(), crate::ConfigVersion::new("v404").unwrap());
    let err = rig
        .control
        .apply_config(&Target::Device(device), &missing)
        .await
        .expect_err("a template never stored");
    assert!(
        matches!(err, crate::Error::NotFound { .. }) && err.to_string().contains("fluentbit/v404"),
        "{err}"
    );
    rig.stop(vec![s1]).await;
}

/// A command sent to a supervisor that died is not answered; once its
/// deadline and the grace passed, the control plane looks the device up
/// again and sends it to the supervisor the device moved to, where it ends
/// acked on its second attempt.
pub async fn an_unanswered_command_is_retried_at_the_devices_new_owner(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start_with(f, bus, quick_retries()).await;
    let device = did("device-1");
    held_by_a_dead_supervisor(&rig, device).await;
    let id = rig.control.set_emission(&device, true).await.expect("issuing");
    let record = rig.control.command(&id).await.unwrap().expect("a record");
    assert_eq!(record.supervisor, Some(sid("ghost")));

    let (s2, mut session) = rig.moved_to(device, "s2").await;
    rig.clock.advance(Duration::from_millis(500));
    answer(&mut session, id).await;
    assert_eq!(rig.ended(id).await, CommandState::Acked);
    let record = rig.control.command(&id).await.unwrap().expect("a record");
    assert_eq!((record.supervisor, record.attempts), (Some(sid("s2")), 2));
    rig.stop(vec![s2]).await;
}

/// The same, when the control plane that sent the command died too: any
/// other finds it among the store's overdue commands and retries it.
pub async fn a_command_whose_sender_died_is_swept_by_another_instance(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start_with(f, bus, quick_retries()).await;
    let device = did("device-1");
    held_by_a_dead_supervisor(&rig, device).await;
    let id = rig.control.set_emission(&device, true).await.expect("issuing");
    rig.control.shutdown().await;
    let other = ControlPlane::start_with_clock(quick_retries(), rig.store.clone(), rig.bus.clone(), rig.clock.clone())
        .await
        .expect("starting another control plane");

    let (s2, mut session) = rig.moved_to(device, "s2").await;
    // Past the deadline and twice the grace: the other instance's sweep finds it.
    rig.clock.advance(Duration::from_millis(600));
    answer(&mut session, id).await;
    let record = other.wait(&id, WAIT).await.expect("the record");
    assert_eq!(
        (record.state, record.supervisor, record.attempts),
        (CommandState::Acked, Some(sid("s2")), 2)
    );
    other.shutdown().await;
    s2.shutdown().await;
}

/// A device is pushed its desired configuration when it registers, unless
/// it runs it already; a broadcast update reaches the devices of its agent
/// type (and labels), becomes their desired configuration, and is pushed
/// once to each.
pub async fn devices_converge_on_their_desired_config(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let v1 = crate::testkit::fluent_bit_template("v1", rig.clock.now());
    let v2 = crate::testkit::fluent_bit_template("v2", rig.clock.now());
    for template in [&v1, &v2] {
        rig.control.create_template(template).await.expect("storing a template");
    }
    let (behind, current, other) = (did("behind"), did("current"), did("other"));
    for device in [behind, current] {
        rig.store
            .set_desired(&device, &v1.reference())
            .await
            .expect("a desired config");
    }

    let mut behind_session = connect(&connector, behind).await;
    apply_push(&mut behind_session, &v1.bundle).await;
    let mut runs_v1 = hello(current);
    runs_v1.config_hash = Some(v1.bundle.hash());
    let mut current_session = connect_as(&connector, runs_v1).await;
    let mut otelcol = hello(other);
    otelcol.agent_type = Some(AgentType::new("otelcol").unwrap());
    let _other_session = connect_as(&connector, otelcol).await;
    rig.owner_is(other, "s1").await;

    let update = crate::ConfigUpdate::new(v2.reference(), crate::Labels::new(), rig.clock.now());
    rig.bus.broadcast(&update).await.expect("broadcasting");
    apply_push(&mut behind_session, &v2.bundle).await;
    // Its next message is v2: v1, which it ran, was never pushed to it.
    apply_push(&mut current_session, &v2.bundle).await;
    assert_eq!(rig.store.desired(&current).await.unwrap(), Some(v2.reference()));
    assert_eq!(rig.store.desired(&other).await.unwrap(), None, "another agent type");
    rig.stop(vec![s1]).await;
}

/// A supervisor shut down gracefully lets its devices go: no lease names
/// it, their statuses say offline, and a command to one ends
/// `device_offline` at once.
pub async fn a_supervisor_shut_down_releases_its_devices_and_marks_them_offline(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-1");
    let _session = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;
    s1.shutdown().await;
    assert_eq!(rig.store.lookup(&device).await.unwrap(), None);
    let status = rig.store.status(&device).await.unwrap().expect("a status");
    assert!(!status.is_online(), "{status:?}");
    let id = rig.control.set_emission(&device, true).await.expect("issuing");
    assert_eq!(rig.ended(id).await, CommandState::DeviceOffline);
    rig.stop(vec![]).await;
}

/// A supervisor that crashes (aborted, nothing acknowledged or released)
/// after pushing a command its device never answered gets the command again
/// when it restarts, from the bus; the device is gone, so it ends
/// `device_offline` instead of being lost.
pub async fn a_command_left_by_a_crashed_supervisor_ends_when_it_restarts(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-9");
    let mut stuck = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;
    let id = rig.control.set_emission(&device, true).await.expect("issuing");
    match next_message(&mut stuck, "the command").await {
        Some(ToDevice::Command(command)) if command.correlation_id == id => {}
        other => panic!("expected command {id}, got {other:?}"),
    }
    s1.abort();
    drop(stuck);

    let (s1, _connector) = rig.supervisor("s1").await;
    assert_eq!(rig.ended(id).await, CommandState::DeviceOffline);
    rig.stop(vec![s1]).await;
}

/// A connected device whose lease lapsed (a renewal that came too late) is
/// claimed again by its supervisor's next renewal, without a word to it.
pub async fn lapsed_leases_of_connected_devices_are_claimed_again(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-1");
    let _session = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;
    rig.clock.advance(crate::DEFAULT_LEASE_TTL + Duration::from_secs(1));
    assert_eq!(rig.store.lookup(&device).await.unwrap(), None, "the lease lapsed");
    s1.renew_leases().await;
    rig.owner_is(device, "s1").await;
    rig.stop(vec![s1]).await;
}

/// Revoking a connected device closes its session (a `disconnect` command
/// to its supervisor, recorded as acked); it is then refused at every
/// registration, and no supervisor holds it, until it is reinstated.
pub async fn a_revoked_device_is_disconnected_and_refused_until_reinstated(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let rig = Rig::start(f, bus).await;
    let (s1, connector) = rig.supervisor("s1").await;
    let device = did("device-1");
    let mut session = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;

    let revoked = rig
        .control
        .acting_as("ops")
        .revoke(&device, "token leaked")
        .await
        .expect("revoking");
    assert!(revoked.created);
    assert_eq!(revoked.revocation.revoked_by.as_deref(), Some("ops"));
    let disconnect = revoked.disconnect.expect("a disconnect for the supervisor holding it");
    assert_eq!(rig.ended(disconnect).await, CommandState::Acked);
    let closed = tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = session.inbound.recv().await {} }).await;
    assert!(
        closed.is_ok(),
        "the revoked device's session is still open after {WAIT:?}"
    );

    // It comes back and is refused: no registration, no owner.
    for _ in 0..2 {
        let mut again = connector
            .connect(&hello(device))
            .await
            .expect("the transport accepts it");
        let first = tokio::time::timeout(WAIT, again.inbound.recv()).await;
        match first {
            Ok(Ok(Some(ToDevice::Refused(refused)))) => {
                assert!(refused.denied, "{refused:?}");
                assert!(refused.reason.contains("device-1 was revoked at"), "{}", refused.reason);
                assert!(refused.reason.contains("token leaked"), "{}", refused.reason);
            }
            other => panic!("a revoked device is told it is refused, not {other:?}"),
        }
        let end = tokio::time::timeout(WAIT, again.inbound.recv()).await;
        assert!(
            matches!(end, Ok(Ok(None))),
            "the session ends after the refusal: {end:?}"
        );
        assert_eq!(
            rig.store.lookup(&device).await.unwrap(),
            None,
            "nobody holds a revoked device"
        );
    }
    let again = rig.control.revoke(&device, "twice").await.expect("revoking again");
    assert!(!again.created && again.disconnect.is_none(), "{again:?}");
    assert_eq!(again.revocation.reason, "token leaked", "the first revocation stays");
    let listed = rig.control.revocations(&PageRequest::first(10)).await.unwrap();
    assert_eq!(listed.items.iter().map(|r| r.device).collect::<Vec<_>>(), vec![device]);

    assert!(rig.control.reinstate(&device).await.unwrap());
    let mut back = connect(&connector, device).await;
    rig.owner_is(device, "s1").await;
    let toggle = rig.control.set_emission(&device, true).await.unwrap();
    answer(&mut back, toggle).await;
    assert_eq!(rig.ended(toggle).await, CommandState::Acked);
    rig.stop(vec![s1]).await;
}
