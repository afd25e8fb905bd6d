//! The fault suite's system and checks, one copy for every backend: a
//! supervisor and a control plane over a store and a bus under test, a small
//! fleet of devices that count what they apply, and commands issued before,
//! during and after a fault the scenario injects (a paused server, a
//! [`FaultProxy`] between a runtime and its backend, a restart).
//!
//! After each fault [`FaultRig::survive`] checks what the README promises:
//! every command accepted ends with a definite outcome; none is applied
//! twice; no session is closed because of the fault; the supervisor still
//! takes commands (a toggle to every device is acked); and every device is
//! routable again within 5 s of the fault's end. It prints the scenario's
//! figures as one row of the table in `docs/operations.md` (run the tests
//! with `--nocapture`):
//!
//! ```text
//! | scenario | issued | acked | other final | not ended | applied twice | wedged | sessions closed | recovery |
//! ```
//!
//! ```no_run
//! # async fn example(store: std::sync::Arc<dyn opamp_core::Store>, bus: std::sync::Arc<dyn opamp_core::Bus>) {
//! use opamp_core::testkit::faults::FaultRig;
//!
//! let rig = FaultRig::start(store, bus.clone(), bus).await;
//! rig.survive("server paused 3 s", || { /* SIGSTOP it */ }, || { /* SIGCONT it */ })
//!     .await;
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::FaultProxy;
use crate::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use crate::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use crate::transport::channel::{self, ChannelConfig, ChannelConnector};
use crate::transport::{AgentConnector, Capabilities, CommandAck, DeviceHello, FromDevice, ToDevice};
use crate::{Bus, CommandOutcome, CommandState, CorrelationId, DeviceId, Store, SupervisorId};

/// Devices in the small fleet of the test command; the bench runs the
/// design's full fleet per supervisor by setting [`DEVICES_ENV`].
pub const DEVICES: usize = 20;
/// The environment variable that sets the fleet's size instead of [`DEVICES`]
/// (`OPAMP_FAULT_DEVICES=20000` for the bench).
pub const DEVICES_ENV: &str = "OPAMP_FAULT_DEVICES";

/// The fleet's size: [`DEVICES_ENV`] if set (a positive number), else [`DEVICES`].
pub fn fleet_size() -> usize {
    match std::env::var(DEVICES_ENV) {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(devices) if devices > 0 => devices,
            _ => panic!("{DEVICES_ENV}={text:?} is not a positive number of devices"),
        },
        Err(_) => DEVICES,
    }
}
/// How long each fault lasts.
pub const FAULT: Duration = Duration::from_secs(3);
/// The promise: every device routable again this soon after the fault ends.
pub const ROUTABLE_WITHIN: Duration = Duration::from_secs(5);
/// How long a command accepted may take to end, its retry included.
const ENDS_WITHIN: Duration = Duration::from_secs(30);
/// A command's deadline.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a device takes to apply a command: answers arrive all through a
/// fault, so that outcomes meet the backend down.
const APPLY_TIME: Duration = Duration::from_millis(200);
/// Callers issuing commands at once.
const CALLERS: usize = 4;

/// A fault of the network between a runtime and its backend, injected by a
/// [`FaultProxy`] in front of the backend: the same three for every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkFault {
    /// Every byte held in both directions, as by a partition.
    Blackhole,
    /// Every connection cut, and new ones refused, until it ends.
    ResetAndRefused,
    /// This much added before every read is forwarded.
    Latency(Duration),
    /// Every connection open when the fault begins left half-open: nothing
    /// passes on it again, and neither end is told. New connections go
    /// through; the clients must notice the silence and connect again.
    HalfOpen,
}

/// The parts of a [`FaultRig`], when the supervisor and the control plane
/// reach the store differently (a fault between the supervisor and the store
/// only) or the supervisor holds short leases (a fault that outlasts them).
#[derive(Debug, Clone)]
pub struct FaultSystem {
    /// The supervisor's leases.
    pub lease_ttl: Duration,
    /// The store as the supervisor reaches it.
    pub supervisor_store: Arc<dyn Store>,
    /// The store as the control plane (and the rig's checks) reach it.
    pub control_store: Arc<dyn Store>,
    /// The supervisor's bus.
    pub supervisor_bus: Arc<dyn Bus>,
    /// The control plane's bus.
    pub control_bus: Arc<dyn Bus>,
}

/// Which records of accepted commands a fault may lose (a command whose
/// record is gone cannot be asked after: it is counted apart, not as lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Losing {
    /// None: every accepted command must end.
    Nothing,
    /// Those written in a failover's replication window: acknowledged by the
    /// old primary, never passed on to the new one. The store keeps its
    /// generation, so no loss is told.
    InTheFailoverWindow,
    /// Everything the store held: it came back empty, and the control plane
    /// must tell the loss (see [`ControlPlane::store_losses`]).
    TheStore,
}

impl Losing {
    fn what(self) -> &'static str {
        match self {
            Losing::Nothing => "lost",
            Losing::InTheFailoverWindow => "lost in the failover's replication window",
            Losing::TheStore => "gone with the store",
        }
    }
}

/// What the devices saw.
#[derive(Debug, Default)]
struct Tally {
    /// Times each command was applied.
    applied: Mutex<HashMap<CorrelationId, u32>>,
    /// Sessions the supervisor closed under a device.
    closed: AtomicU64,
}

/// One scenario's system: a supervisor and a control plane over the store
/// and bus under test, and the devices, all registered.
pub struct FaultRig {
    store: Arc<dyn Store>,
    supervisor: RunningSupervisor,
    control: ControlPlane,
    devices: Vec<DeviceId>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    /// How long each fault lasts.
    fault: Duration,
}

impl std::fmt::Debug for FaultRig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultRig")
            .field("store", &self.store)
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl FaultRig {
    /// Starts a supervisor on `supervisor_bus` and a control plane on
    /// `control_bus` (the same bus, or two clients of one broker when the
    /// fault is between one of them and the broker), both over `store`, and
    /// [`fleet_size`] devices; returns once every device is routable.
    pub async fn start(store: Arc<dyn Store>, supervisor_bus: Arc<dyn Bus>, control_bus: Arc<dyn Bus>) -> FaultRig {
        FaultRig::start_with(FaultSystem {
            lease_ttl: crate::store::DEFAULT_LEASE_TTL,
            supervisor_store: store.clone(),
            control_store: store,
            supervisor_bus,
            control_bus,
        })
        .await
    }

    /// Starts the rig over `system`'s parts; returns once every device is routable.
    pub async fn start_with(system: FaultSystem) -> FaultRig {
        let FaultSystem {
            lease_ttl,
            supervisor_store,
            control_store: store,
            supervisor_bus,
            control_bus,
        } = system;
        let (transport, connector) = channel::pair(ChannelConfig::default());
        let supervisor = Supervisor::new(
            SupervisorConfig::new(sid()).lease_ttl(lease_ttl),
            supervisor_store,
            supervisor_bus,
        )
        .start(vec![Arc::new(transport)])
        .await
        .expect("the supervisor starts");
        let control_config = ControlPlaneConfig {
            command_timeout: COMMAND_TIMEOUT,
            ..ControlPlaneConfig::default()
        };
        let control = ControlPlane::start(control_config, store.clone(), control_bus)
            .await
            .expect("the control plane starts");
        let devices: Vec<DeviceId> = (0..fleet_size())
            .map(|n| DeviceId::new(format!("device-{n}")).expect("a valid device id"))
            .collect();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        for device in &devices {
            tokio::spawn(run_device(connector.clone(), *device, tally.clone(), stop.clone()));
        }
        let rig = FaultRig {
            store,
            supervisor,
            control,
            devices,
            tally,
            stop,
            fault: FAULT,
        };
        // Registration takes a few store writes per device: a full fleet takes seconds.
        let registered_within = Duration::from_secs(10) + Duration::from_millis(rig.devices.len() as u64);
        rig.all_routable(registered_within)
            .await
            .expect("every device registers");
        // A full fleet registering at once can find the store's pool busy:
        // those registrations are refused and their devices connect again.
        // That is the start's, not a fault's: count from here.
        let refused = rig.tally.closed.swap(0, Ordering::Relaxed);
        if refused > 0 {
            println!("{refused} registrations refused while the fleet connected, and tried again");
        }
        rig
    }

    /// The same rig, its faults lasting `fault` instead of [`FAULT`].
    pub fn lasting(self, fault: Duration) -> FaultRig {
        FaultRig { fault, ..self }
    }

    /// Waits until every device's lease names the supervisor; how long that took.
    async fn all_routable(&self, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let owners = self.store.lookup_many(&self.devices).await;
            if matches!(&owners, Ok(owners) if owners.iter().all(|owner| *owner == Some(sid()))) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                return Err(format!("not every device routable within {within:?}: {owners:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Issues toggles from [`CALLERS`] callers at once until `until`; the
    /// ids accepted, and how many were refused.
    async fn issue(&self, until: Instant) -> (Vec<CorrelationId>, u64) {
        let (a, b, c, d) = tokio::join!(
            self.issue_from(0, until),
            self.issue_from(1, until),
            self.issue_from(2, until),
            self.issue_from(3, until),
        );
        let mut accepted = Vec::new();
        let mut refused = 0;
        for (ids, refusals) in [a, b, c, d] {
            accepted.extend(ids);
            refused += refusals;
        }
        (accepted, refused)
    }

    /// One caller: toggles to every [`CALLERS`]th device from `first`, one every 10 ms.
    async fn issue_from(&self, first: usize, until: Instant) -> (Vec<CorrelationId>, u64) {
        let (mut accepted, mut refused) = (Vec::new(), 0);
        let mut n = first;
        while Instant::now() < until {
            let device = self.devices[n % self.devices.len()];
            match tokio::time::timeout(Duration::from_secs(2), self.control.set_emission(&device, n % 2 == 0)).await {
                Ok(Ok(id)) => accepted.push(id),
                // Refused while the backend is down: the caller knows it was not issued.
                Ok(Err(err)) => {
                    assert!(
                        err.is_retryable(),
                        "a refusal during a fault says it may pass: {err} ({:?})",
                        std::error::Error::source(&err)
                    );
                    refused += 1;
                }
                Err(_) => refused += 1,
            }
            n += CALLERS;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (accepted, refused)
    }

    /// Runs `fault` for [`FAULT`] (or as long as [`lasting`](Self::lasting) says) while commands are issued, then `heal`,
    /// and checks every promise; prints the scenario's row and panics,
    /// naming the scenario, on the first promise broken.
    pub async fn survive(self, scenario: &str, fault: impl FnOnce(), heal: impl FnOnce()) {
        self.survive_losing(scenario, fault, heal, Losing::Nothing).await;
    }

    /// [`survive`](Self::survive) `fault` injected by `proxy` in front of
    /// `backend` (its name in the scenario's row), for as long as the rig's faults last.
    pub async fn survive_network(self, backend: &str, proxy: &FaultProxy, fault: NetworkFault) {
        let seconds = self.fault.as_secs();
        match fault {
            NetworkFault::Blackhole => {
                let scenario = format!("network blackhole to {backend} {seconds} s");
                self.survive(&scenario, || proxy.blackhole(true), || proxy.blackhole(false))
                    .await;
            }
            NetworkFault::ResetAndRefused => {
                let scenario = format!("connections to {backend} reset, new ones refused {seconds} s");
                let cut = || {
                    proxy.refuse(true);
                    proxy.reset();
                };
                self.survive(&scenario, cut, || proxy.refuse(false)).await;
            }
            NetworkFault::HalfOpen => {
                let scenario = format!("connections to {backend} left half-open (no byte, no FIN, no reset)");
                self.survive(&scenario, || proxy.half_open(), || {}).await;
            }
            NetworkFault::Latency(added) => {
                let scenario = format!("{} ms added to every {backend} reply {seconds} s", added.as_millis());
                self.survive(&scenario, || proxy.latency(added), || proxy.latency(Duration::ZERO))
                    .await;
            }
        }
    }

    /// The same, for a fault that loses records of commands accepted before
    /// or during it (see [`Losing`]): those are counted apart, and the rest
    /// must hold all the same.
    pub async fn survive_losing(self, scenario: &str, fault: impl FnOnce(), heal: impl FnOnce(), losing: Losing) {
        let start = Instant::now();
        let (mut accepted, mut refused) = self.issue(start + Duration::from_millis(500)).await;
        fault();
        let (during, refused_during) = self.issue(Instant::now() + self.fault).await;
        heal();
        let healed = Instant::now();
        accepted.extend(during);
        refused += refused_during;
        let routable = self.all_routable(ROUTABLE_WITHIN).await;
        let (after, refused_after) = self.issue(Instant::now() + Duration::from_millis(500)).await;
        accepted.extend(after);
        refused += refused_after;

        let mut acked = 0;
        let mut definite = 0;
        // Which other outcomes, for the row: a backpressure `failed` reads
        // differently from a `timed_out`.
        let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
        let mut lost = Vec::new();
        let mut gone_with_the_store = 0;
        // One deadline for them all: a store that stays wedged fails the
        // scenario in ENDS_WITHIN, not in a wait per command.
        let ends_by = Instant::now() + ENDS_WITHIN;
        for id in &accepted {
            let left = ends_by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                lost.push((*id, format!("still not ended {ENDS_WITHIN:?} after the fault")));
                continue;
            }
            match self.control.wait(id, left).await {
                Ok(record) if record.state == CommandState::Acked => acked += 1,
                Ok(record) if record.state.is_final() => {
                    definite += 1;
                    *outcomes.entry(record.state.as_str()).or_default() += 1;
                }
                Err(crate::Error::NotFound { .. }) if losing != Losing::Nothing => gone_with_the_store += 1,
                other => lost.push((*id, format!("{other:?}"))),
            }
        }
        let ended = healed.elapsed();
        if losing == Losing::TheStore {
            // The control plane looks at the store's generation every retry grace.
            let told_within = ControlPlaneConfig::default().retry_grace + Duration::from_secs(2);
            let since = Instant::now();
            while self.control.store_losses() == 0 && since.elapsed() < told_within {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                self.control.store_losses(),
                1,
                "{scenario}: the control plane told the store's loss once, within {told_within:?}"
            );
        }
        // Not wedged: a toggle to every device now is acked (all sent, then
        // all awaited, so that a full fleet takes one command's time).
        let mut toggles = Vec::with_capacity(self.devices.len());
        for device in &self.devices {
            let id = self.control.set_emission(device, true).await.unwrap_or_else(|err| {
                let source = std::error::Error::source(&err);
                panic!("{scenario}: issuing after the fault: {err} ({source:?})")
            });
            toggles.push(id);
        }
        let mut wedged = 0;
        for id in &toggles {
            let record = self
                .control
                .wait(id, ENDS_WITHIN)
                .await
                .unwrap_or_else(|err| panic!("{scenario}: the toggle after the fault: {err}"));
            if record.state != CommandState::Acked {
                wedged += 1;
            }
        }
        let twice: Vec<_> = self
            .tally
            .applied
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|(_, times)| **times > 1)
            .map(|(id, times)| (*id, *times))
            .collect();
        let closed = self.tally.closed.load(Ordering::Relaxed);
        let recovered = routable
            .as_ref()
            .map_or_else(|err| err.clone(), |took| format!("{:.2} s", took.as_secs_f64()));
        println!(
            "| {scenario} | {} accepted ({refused} refused) | {acked} | {definite}{} | {}{} | {} | {wedged} | {closed} | {recovered} routable, {:.2} s all ended |",
            accepted.len(),
            if outcomes.is_empty() {
                String::new()
            } else {
                let named: Vec<String> = outcomes
                    .iter()
                    .map(|(state, count)| format!("{count} {state}"))
                    .collect();
                format!(" ({})", named.join(", "))
            },
            lost.len(),
            if gone_with_the_store > 0 {
                format!(" ({gone_with_the_store} records {})", losing.what())
            } else {
                String::new()
            },
            twice.len(),
            ended.as_secs_f64(),
        );
        assert!(
            lost.is_empty(),
            "{scenario}: {} commands accepted did not end, e.g. {:?}",
            lost.len(),
            lost.first()
        );
        assert!(
            twice.is_empty(),
            "{scenario}: {} commands applied twice, e.g. {:?}",
            twice.len(),
            twice.first()
        );
        assert_eq!(closed, 0, "{scenario}: sessions closed because of a fault");
        assert_eq!(
            wedged, 0,
            "{scenario}: devices whose toggle was not acked after the fault"
        );
        routable.unwrap_or_else(|err| panic!("{scenario}: {err}"));
        assert_eq!(
            self.supervisor.connected_devices(),
            self.devices.len(),
            "{scenario}: every device still connected"
        );
        self.stop.store(true, Ordering::Relaxed);
        self.control.shutdown().await;
        self.supervisor.shutdown().await;
    }
}

fn sid() -> SupervisorId {
    SupervisorId::new("s1").expect("a valid supervisor id")
}

/// A device that answers every command at once, counting what it applies,
/// and reconnects when its session is closed (counting that too).
async fn run_device(connector: ChannelConnector, device: DeviceId, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut hello = DeviceHello::new(device);
    hello.capabilities = Capabilities::all_builtin();
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut session) = connector.connect(&hello).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            match session.inbound.recv().await {
                Ok(Some(ToDevice::Command(command))) => {
                    *tally
                        .applied
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .entry(command.correlation_id)
                        .or_default() += 1;
                    tokio::time::sleep(APPLY_TIME).await;
                    let ack = CommandAck::new(command.correlation_id, CommandOutcome::Acked);
                    if session.outbound.send(FromDevice::CommandAck(ack)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if !stop.load(Ordering::Relaxed) {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
            }
        }
    }
}
