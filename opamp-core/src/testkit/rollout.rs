//! Rollouts on every store: the control plane driving a rollout, run by each
//! backend's tests the way the store conformance suite is.
//!
//! A rollout's driver pages through the store's fleet listing and keeps its
//! place in the store's own cursors, and takes a lease on driving it that the
//! store keeps; both differ from store to store, so a rollout is only known
//! to work on a store these scenarios ran on. Each scenario takes a
//! [`StoreFixture`] (a fresh store and its clock) and a bus; devices are
//! played by a stand-in supervisor that acknowledges every command it is
//! sent, recording the outcome as a real one does, and counts them.
//! [`rollout_scenarios!`](crate::rollout_scenarios) turns them into tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::command::CommandOutcome;
use crate::config::ConfigRef;
use crate::id::{AgentType, DeviceId, SupervisorId};
use crate::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use crate::status::{Labels, StatusPatch};
use crate::store::DEFAULT_LEASE_TTL;
use crate::testkit::eventually;
use crate::testkit::store::StoreFixture;
use crate::time::Clock;
use crate::tracking::{Rollout, RolloutId, RolloutSpec, RolloutState};

/// Expands into one test per rollout scenario.
///
/// `$fixture` is an `async fn() -> StoreFixture` as for
/// [`store_conformance!`](crate::store_conformance); `$bus` an
/// `async fn() -> Arc<dyn Bus>` making a fresh bus (the memory bus will do: the
/// store is what is under test). The tests land in a module named
/// `rollout_scenarios`.
///
/// ```no_run
/// async fn fixture() -> opamp_core::testkit::store::StoreFixture {
///     let clock = std::sync::Arc::new(opamp_core::ManualClock::starting_now());
///     let store = opamp_store::memory::MemoryStore::with_clock(clock.clone());
///     opamp_core::testkit::store::StoreFixture::new(std::sync::Arc::new(store), clock)
/// }
///
/// async fn bus() -> std::sync::Arc<dyn opamp_core::Bus> {
///     std::sync::Arc::new(opamp_bus::memory::MemoryBus::new())
/// }
///
/// opamp_core::rollout_scenarios!(fixture, bus);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! rollout_scenarios {
    ($fixture:path, $bus:path) => {
        $crate::rollout_scenarios!(@cases $fixture, $bus;
            a_rollout_reaches_every_selected_device_once,
            resuming_a_running_rollout_keeps_one_driver,
            a_rollout_whose_driver_died_is_taken_over_once_its_lease_lapses,
        );
    };
    (@cases $fixture:path, $bus:path; $($case:ident),+ $(,)?) => {
        mod rollout_scenarios {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = $fixture().await;
                    $crate::testkit::rollout::$case(&f, $bus().await).await;
                }
            )+
        }
    };
}

/// How long a scenario waits for what the control plane does on its own.
const WAIT: Duration = Duration::from_secs(30);

/// The scenarios' control planes' lease on driving a rollout.
const LEASE: Duration = Duration::from_secs(10);

/// The supervisor every stand-in device is online under.
fn supervisor() -> SupervisorId {
    SupervisorId::new("rollout-s1").expect("a valid literal supervisor id")
}

fn fluentbit() -> AgentType {
    AgentType::new("fluentbit").expect("a valid literal agent type")
}

fn ring(name: &str) -> Labels {
    Labels::from([("ring".to_owned(), name.to_owned())])
}

/// A control plane on the fixture's store and clock that looks often.
async fn control_plane(f: &StoreFixture, bus: &Arc<dyn Bus>) -> ControlPlane {
    let config = ControlPlaneConfig::default()
        .rollout_poll(Duration::from_millis(20))
        .retry_grace(Duration::from_millis(100))
        .rollout_lease(LEASE);
    ControlPlane::start_with_clock(config, f.store.clone(), bus.clone(), f.clock.clone())
        .await
        .expect("starting a control plane")
}

/// Puts `devices` online under [`supervisor`], each with its labels, as a
/// supervisor registering them would.
async fn online(f: &StoreFixture, devices: &[(DeviceId, Labels)]) {
    let now = f.clock.now();
    for (device, labels) in devices {
        f.store.claim(device, &supervisor(), DEFAULT_LEASE_TTL).await.unwrap();
        let patch = StatusPatch::new()
            .online(supervisor(), now)
            .agent_type(fluentbit())
            .labels(labels.clone());
        f.store.update_status(device, &patch).await.unwrap();
    }
}

async fn template(f: &StoreFixture, version: &str) -> ConfigRef {
    let made = crate::testkit::fluent_bit_template(version, f.clock.now());
    f.store.put_template(&made).await.unwrap();
    made.reference()
}

/// A stand-in for [`supervisor`]: it acknowledges every command it is sent,
/// recording the outcome in the store (as a supervisor does) before taking it
/// off the bus, and counts what each device was sent. While held, it counts
/// commands as they come and answers them once let go.
struct StandIn {
    sent: Arc<Mutex<BTreeMap<DeviceId, usize>>>,
    answering: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StandIn {
    /// Starts answering at once (`answering`), or holds the answers until [`Self::answer`].
    async fn start(f: &StoreFixture, bus: &Arc<dyn Bus>, answering: bool) -> Self {
        let mut commands = bus.subscribe(&supervisor()).await.unwrap();
        let sent: Arc<Mutex<BTreeMap<DeviceId, usize>>> = Arc::default();
        let (answering, mut go) = watch::channel(answering);
        let (store, clock, counted) = (f.store.clone(), f.clock.clone(), sent.clone());
        let task = tokio::spawn(async move {
            while let Ok(Some(delivery)) = commands.next().await {
                let (command, acker) = delivery.into_parts();
                *lock(&counted).entry(command.device).or_default() += 1;
                if go.wait_for(|go| *go).await.is_err() {
                    return;
                }
                let id = command.correlation_id;
                let mut record = store
                    .command_record(&id)
                    .await
                    .unwrap()
                    .expect("a sent command is recorded");
                record.complete(&CommandOutcome::Acked, clock.now());
                store.update_command(&record).await.unwrap();
                acker.ack().await.unwrap();
            }
        });
        StandIn { sent, answering, task }
    }

    /// Answers the commands held and those to come.
    fn answer(&self) {
        self.answering.send_replace(true);
    }

    /// How many commands each device was sent so far.
    fn sent(&self) -> BTreeMap<DeviceId, usize> {
        lock(&self.sent).clone()
    }

    /// Checks that each of `selected` was sent one command, and no other device any.
    fn assert_each_sent_once(&self, selected: &[DeviceId]) {
        let sent = self.sent();
        let twice: Vec<_> = sent.iter().filter(|(_, times)| **times > 1).collect();
        assert!(
            twice.is_empty(),
            "devices sent the configuration more than once: {twice:?}"
        );
        let missed: Vec<_> = selected.iter().filter(|device| !sent.contains_key(device)).collect();
        assert!(missed.is_empty(), "selected devices never sent it: {missed:?}");
        assert_eq!(
            sent.len(),
            selected.len(),
            "devices the selector left out were sent it: {sent:?}"
        );
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn rollout_now(f: &StoreFixture, id: &RolloutId) -> Rollout {
    f.store.rollout(id).await.unwrap().expect("the rollout is stored")
}

async fn completed(f: &StoreFixture, id: &RolloutId, what: &str) -> Rollout {
    eventually(what, WAIT, || async {
        rollout_now(f, id).await.state == RolloutState::Completed
    })
    .await;
    rollout_now(f, id).await
}

/// Every selected device is sent the configuration exactly once and the
/// rollout completes, whatever the store's cursors look like: ids that are
/// numbers and ids that are not, and devices the selector leaves out between
/// them, so that a wave's devices end in the middle of a page of the listing.
pub async fn a_rollout_reaches_every_selected_device_once(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let ids = (1..=40)
        .map(|n| n.to_string())
        .chain((1..=12).map(|n| format!("node-{n:02}")));
    let fleet: Vec<(DeviceId, Labels)> = ids
        .enumerate()
        .map(|(n, id)| {
            (
                DeviceId::new(id).unwrap(),
                ring(if n % 3 == 1 { "alpha" } else { "beta" }),
            )
        })
        .collect();
    online(f, &fleet).await;
    let selected: Vec<DeviceId> = fleet
        .iter()
        .filter(|(_, labels)| *labels == ring("beta"))
        .map(|(device, _)| *device)
        .collect();
    let v2 = template(f, "v2").await;
    let devices = StandIn::start(f, &bus, true).await;
    let control = control_plane(f, &bus).await;

    let spec = RolloutSpec::new(v2).with_labels(ring("beta")).with_waves(2, 2, 5);
    let rollout = control.start_rollout(spec).await.unwrap();
    let done = completed(f, &rollout.id, "the rollout completed").await;

    devices.assert_each_sent_once(&selected);
    let sizes: Vec<u32> = done.waves.iter().map(|wave| wave.tally.total()).collect();
    assert_eq!(
        sizes.iter().sum::<u32>() as usize,
        selected.len(),
        "wave sizes {sizes:?}"
    );
    assert!(
        sizes.iter().all(|size| *size <= 5),
        "no wave is larger than max_wave: {sizes:?}"
    );
    assert_eq!(done.totals().acked as usize, selected.len());
    control.shutdown().await;
}

/// `count` devices of the rollouts' selector, `d0`, `d1`, …
async fn plain_fleet(f: &StoreFixture, count: usize) -> Vec<DeviceId> {
    let fleet: Vec<(DeviceId, Labels)> = (0..count)
        .map(|n| (DeviceId::new(format!("d{n}")).unwrap(), ring("beta")))
        .collect();
    online(f, &fleet).await;
    fleet.into_iter().map(|(device, _)| device).collect()
}

/// Waits until the rollout has sent `waves` waves.
async fn waves_sent(f: &StoreFixture, id: &RolloutId, waves: usize) {
    let what = format!("wave {waves} sent");
    eventually(&what, WAIT, || async { rollout_now(f, id).await.waves.len() >= waves }).await;
}

/// Resuming a rollout that is running changes nothing: it keeps its one
/// driver, and no device is sent the configuration twice, nor a wave
/// recorded twice.
pub async fn resuming_a_running_rollout_keeps_one_driver(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let fleet = plain_fleet(f, 7).await;
    let v3 = template(f, "v3").await;
    let devices = StandIn::start(f, &bus, false).await;
    let control = control_plane(f, &bus).await;
    let spec = RolloutSpec::new(v3).with_labels(ring("beta")).with_waves(1, 2, 4);
    let rollout = control.start_rollout(spec).await.unwrap();
    waves_sent(f, &rollout.id, 1).await;

    // Each resume of old started a driver of its own; several make their
    // race to send the next wave near certain.
    for _ in 0..10 {
        let resumed = control.resume_rollout(&rollout.id).await.unwrap();
        assert_eq!(resumed.state, RolloutState::Running);
    }
    devices.answer();
    let done = completed(f, &rollout.id, "the resumed rollout completed").await;
    devices.assert_each_sent_once(&fleet);
    let sizes: Vec<u32> = done.waves.iter().map(|wave| wave.tally.total()).collect();
    assert_eq!(sizes, [1, 2, 4], "each wave once");
    control.shutdown().await;
}

/// A rollout whose control plane died is driven on by another once the
/// dead one's lease on driving it has lapsed, and not before; no device is
/// sent the configuration twice.
pub async fn a_rollout_whose_driver_died_is_taken_over_once_its_lease_lapses(f: &StoreFixture, bus: Arc<dyn Bus>) {
    let fleet = plain_fleet(f, 7).await;
    let v4 = template(f, "v4").await;
    let devices = StandIn::start(f, &bus, false).await;
    let first = control_plane(f, &bus).await;
    let spec = RolloutSpec::new(v4).with_labels(ring("beta")).with_waves(1, 2, 4);
    let rollout = first.start_rollout(spec).await.unwrap();
    waves_sent(f, &rollout.id, 1).await;
    // Dropped, not shut down: its tasks are aborted and its lease is left to lapse.
    drop(first);

    let second = control_plane(f, &bus).await;
    devices.answer();
    let canary = rollout_now(f, &rollout.id).await.waves[0].commands[0].correlation_id;
    eventually("the canary acknowledged", WAIT, || async {
        f.store
            .command_record(&canary)
            .await
            .unwrap()
            .is_some_and(|record| record.state.is_final())
    })
    .await;
    // Several of the second instance's checks for rollouts nobody drives (every 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = rollout_now(f, &rollout.id).await;
    assert_eq!(
        (waiting.state.clone(), waiting.waves.len()),
        (RolloutState::Running, 1),
        "taken over while the first driver's lease was live"
    );

    f.clock.advance(LEASE);
    let done = completed(f, &rollout.id, "the rollout, taken over, completed").await;
    devices.assert_each_sent_once(&fleet);
    let sizes: Vec<u32> = done.waves.iter().map(|wave| wave.tally.total()).collect();
    assert_eq!(sizes, [1, 2, 4]);
    second.shutdown().await;
}
