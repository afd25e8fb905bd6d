//! The control plane: issues commands, tracks them to their outcome, manages
//! configuration templates and rolls configurations out in waves.
//!
//! It is stateless: everything it tracks lives in the store (a
//! [`TrackingStore`](crate::TrackingStore) is part of every [`Store`]), so any
//! number of instances may run behind a load balancer and any of them answers
//! for a command or a rollout another one started.
//!
//! A command goes the way of the design's §5.2: the device's owner is looked
//! up, the command is recorded as pending and published on the bus keyed by
//! that supervisor, and the supervisor records the outcome in the store
//! (step 8) and publishes it as a `CommandCompleted` event. The events are
//! consumed here by a consumer group shared by every instance: a first
//! timeout is retried on its event, and an outcome from a supervisor that
//! publishes without recording (another implementation of the wire format)
//! is recorded from it. (Ours does not publish an outcome it failed to
//! record: the command comes again.)
//!
//! - **Timeouts.** A command that timed out is sent once more, to whoever
//!   owns the device by then (it may have moved). A command that no event
//!   answers (its supervisor died) is handled the same way by the instance
//!   that sent it, `retry_grace` after its deadline.
//! - **Nothing silently lost.** A configuration for a device no supervisor
//!   holds is recorded as its desired configuration, which its next
//!   supervisor pushes when it connects: the command ends `deferred`. An
//!   emission command to an offline device ends `device_offline` at once.
//! - **Rollouts** send a configuration to the devices of an agent type (and
//!   labels) in waves: a canary, then waves growing by a factor up to a
//!   ceiling. A wave that fails more than the threshold pauses the rollout.
//!   Operators pause, resume and abort it from any instance. One driver
//!   drives it, holding a lease on it in the store
//!   ([`TrackingStore::claim_rollout_driver`](crate::TrackingStore::claim_rollout_driver)):
//!   the instance that started or resumed it, or, once that one's lease
//!   lapsed (it died), whichever instance looks first for running rollouts
//!   nobody drives (each does every `retry_grace`).
//!
//! Metrics go to the [`metrics`] facade (a host installs a recorder, e.g. a
//! Prometheus exporter): `opamp_commands_total{kind, outcome}` and
//! `opamp_command_latency_seconds{kind}` (issue to outcome recorded), counted
//! once per command by whichever runtime records its outcome (the supervisor
//! for what devices answer, the control plane for commands that never reached
//! one and timeouts nobody answered), and `opamp_event_lag_seconds` (the age
//! of the last event consumed).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::generation::Generation;
use super::{count_outcome, lock};
use crate::bus::{Bus, Delivery, Subscription};
use crate::command::{Command, CommandKind, CommandOutcome, CorrelationId, DEFAULT_COMMAND_TIMEOUT};
use crate::config::{ConfigRef, ConfigTemplate};
use crate::error::{Error, Result};
use crate::event::{DeviceEvent, EventKind};
use crate::id::{AgentType, ConfigVersion, DeviceId, GroupName};
use crate::revocation::Revocation;
use crate::store::{Cursor, Page, PageRequest, Store, validate_ttl};
use crate::time::{Clock, SystemClock, Timestamp, duration_text};
use crate::tracking::{
    CommandRecord, CommandState, Endings, Issued, Rollout, RolloutId, RolloutSpec, RolloutState, Tally, Target, Wave,
};

/// How a control plane runs. Every field has a default; durations are
/// written like `30s` or `250ms` in configuration files.
///
/// ```
/// use opamp_core::runtime::control_plane::ControlPlaneConfig;
///
/// let config: ControlPlaneConfig = serde_json::from_str(r#"{"command_timeout": "10s"}"#)?;
/// assert_eq!(config.command_timeout.as_secs(), 10);
/// assert_eq!(config.event_group.as_str(), "opamp-control-plane");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ControlPlaneConfig {
    /// The consumer group every instance consumes events in (each event is
    /// handled by one instance).
    #[serde(default = "defaults::event_group")]
    pub event_group: GroupName,
    /// How long a device has to acknowledge a command.
    #[serde(default = "defaults::command_timeout", with = "duration_text")]
    pub command_timeout: Duration,
    /// How long past its deadline a command no event answered waits before it
    /// is retried (or ends timed out).
    #[serde(default = "defaults::retry_grace", with = "duration_text")]
    pub retry_grace: Duration,
    /// The most devices one [`ControlPlane::apply_config`] call may target;
    /// larger fleets take a rollout.
    #[serde(default = "defaults::max_fanout")]
    pub max_fanout: usize,
    /// The largest template accepted, in bytes of file bodies (a push must
    /// fit the transports' message limits).
    #[serde(default = "defaults::max_template_bytes")]
    pub max_template_bytes: usize,
    /// How often a rollout's driver looks at its wave when no outcome woke it.
    #[serde(default = "defaults::rollout_poll", with = "duration_text")]
    pub rollout_poll: Duration,
    /// How long a rollout's driver holds it without renewing (it renews every
    /// third of this): how long a rollout whose control plane died waits
    /// before another takes it over.
    #[serde(default = "defaults::rollout_lease", with = "duration_text")]
    pub rollout_lease: Duration,
    /// Start on a store that lost its data (it has no generation, and the
    /// bus holds commands sent before), beginning a new generation, instead
    /// of refusing with [`Error::DataLoss`]. Off by default: an operator
    /// says so once, after choosing not to restore the store.
    #[serde(default)]
    pub accept_store_loss: bool,
}

mod defaults {
    use std::time::Duration;

    use crate::id::GroupName;

    pub(super) fn event_group() -> GroupName {
        GroupName::new("opamp-control-plane").unwrap_or_else(|_| unreachable!("a valid literal group name"))
    }
    pub(super) fn command_timeout() -> Duration {
        crate::command::DEFAULT_COMMAND_TIMEOUT
    }
    pub(super) fn retry_grace() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn max_fanout() -> usize {
        10_000
    }
    pub(super) fn max_template_bytes() -> usize {
        3 * 1024 * 1024
    }
    pub(super) fn rollout_poll() -> Duration {
        Duration::from_millis(500)
    }
    pub(super) fn rollout_lease() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            event_group: defaults::event_group(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            retry_grace: defaults::retry_grace(),
            max_fanout: defaults::max_fanout(),
            max_template_bytes: defaults::max_template_bytes(),
            rollout_poll: defaults::rollout_poll(),
            rollout_lease: defaults::rollout_lease(),
            accept_store_loss: false,
        }
    }
}

impl ControlPlaneConfig {
    /// With another command timeout.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// With another grace before an unanswered command is retried.
    pub fn retry_grace(mut self, grace: Duration) -> Self {
        self.retry_grace = grace;
        self
    }

    /// With another limit on the devices one `apply_config` call may target.
    pub fn max_fanout(mut self, devices: usize) -> Self {
        self.max_fanout = devices;
        self
    }

    /// With another event consumer group.
    pub fn event_group(mut self, group: GroupName) -> Self {
        self.event_group = group;
        self
    }

    /// With another rollout poll interval.
    pub fn rollout_poll(mut self, every: Duration) -> Self {
        self.rollout_poll = every;
        self
    }

    /// With another lease on driving a rollout.
    pub fn rollout_lease(mut self, ttl: Duration) -> Self {
        self.rollout_lease = ttl;
        self
    }

    /// Starting on a store that lost its data, or refusing to (the default).
    pub fn accept_store_loss(mut self, accept: bool) -> Self {
        self.accept_store_loss = accept;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.command_timeout.is_zero() {
            return Err(Error::invalid_input("control plane command_timeout must be above zero"));
        }
        if self.rollout_poll.is_zero() {
            return Err(Error::invalid_input("control plane rollout_poll must be above zero"));
        }
        validate_ttl(self.rollout_lease)
            .map_err(|err| Error::invalid_input(format!("control plane rollout_lease: {err}")))
    }
}

/// A running control plane. Cheap to clone; every clone is the same instance.
/// It stops when [`shutdown`](Self::shutdown) is called or the last clone is
/// dropped. Dropping it aborts its tasks as they stand: the rollouts it drove
/// keep its leases until they lapse, as if it had died; `shutdown` lets them go.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::sync::Arc;
/// use opamp_bus::memory::MemoryBus;
/// use opamp_core::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
/// use opamp_core::tracking::CommandState;
/// use opamp_core::{DeviceId, StatusPatch, StatusStore, SupervisorId, Timestamp};
/// use opamp_store::memory::MemoryStore;
///
/// let store = Arc::new(MemoryStore::new());
/// let control = ControlPlane::start(ControlPlaneConfig::default(), store.clone(), Arc::new(MemoryBus::new())).await?;
///
/// // A device that was online once and is not now: the toggle answers device-offline.
/// let d5 = DeviceId::new("device-5")?;
/// store.update_status(&d5, &StatusPatch::new().online(SupervisorId::new("s1")?, Timestamp::now())).await?;
/// store.update_status(&d5, &StatusPatch::new().offline()).await?;
/// let id = control.set_emission(&d5, false).await?;
/// assert_eq!(control.command(&id).await?.unwrap().state, CommandState::DeviceOffline);
/// control.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ControlPlane {
    handle: Arc<Handle>,
    /// Who the commands and rollouts started through this clone are recorded as started by.
    initiator: Option<Arc<str>>,
}

/// Owns the background tasks: dropping the last clone stops them.
struct Handle {
    inner: Arc<Inner>,
    tasks: Mutex<JoinSet<()>>,
}

impl Drop for Handle {
    /// Aborts every task, rollout drivers too: their leases are left to
    /// lapse, as a control plane that died leaves them.
    fn drop(&mut self) {
        // Drivers first: told to stop, they would let their leases go.
        lock(&self.inner.drivers).abort_all();
        self.inner.stopping.send_replace(true);
        lock(&self.tasks).abort_all();
    }
}

struct Inner {
    config: ControlPlaneConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    clock: Arc<dyn Clock>,
    /// Commands this instance sent, to look at once their deadline and grace passed.
    sweeps: mpsc::UnboundedSender<(Timestamp, CorrelationId)>,
    /// Woken whenever a command's outcome is recorded here (rollouts wait on it).
    progress: Notify,
    /// The [`wait`](ControlPlane::wait) calls in progress, woken by their own command's outcome only.
    waiters: Waiters,
    /// Whether the store still tells of commands ending (see [`TrackingStore::watch_endings`](crate::TrackingStore::watch_endings)).
    endings_watched: AtomicBool,
    /// Whether the event stream last answered without an error.
    events_healthy: AtomicBool,
    stopping: watch::Sender<bool>,
    /// Names this instance in its drivers' names (`<instance>#<n>`).
    instance: String,
    /// The number of the next driver's name: each driver has a name of its
    /// own, so a claim by another driver of this instance is refused too.
    next_driver: AtomicU64,
    /// The rollouts this instance drives, a task each.
    drivers: Mutex<JoinSet<()>>,
    /// The store's generation, watched for a loss of its data.
    generation: Generation,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("config", &self.inner().config)
            .field("store", &self.inner().store)
            .field("bus", &self.inner().bus)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts a control plane on `store` and `bus`, judging time by the system clock.
    pub async fn start(config: ControlPlaneConfig, store: Arc<dyn Store>, bus: Arc<dyn Bus>) -> Result<Self> {
        Self::start_with_clock(config, store, bus, Arc::new(SystemClock)).await
    }

    /// As [`start`](Self::start), with another clock.
    pub async fn start_with_clock(
        config: ControlPlaneConfig,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        config.validate()?;
        let generation = Generation::open(store.as_ref(), bus.as_ref(), config.accept_store_loss).await?;
        let events = bus.subscribe_events(&config.event_group).await?;
        let endings = store.watch_endings().await?;
        let (sweeps, sweep_queue) = mpsc::unbounded_channel();
        let (stopping, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            store,
            bus,
            clock,
            sweeps,
            progress: Notify::new(),
            waiters: Waiters::default(),
            endings_watched: AtomicBool::new(true),
            events_healthy: AtomicBool::new(true),
            stopping,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            next_driver: AtomicU64::new(1),
            drivers: Mutex::new(JoinSet::new()),
            generation,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(Arc::clone(&inner).event_loop(events));
        tasks.spawn(Arc::clone(&inner).endings_loop(endings));
        tasks.spawn(Arc::clone(&inner).sweep_loop(sweep_queue));
        info!(group = %inner.config.event_group, "control plane started");
        Ok(ControlPlane {
            handle: Arc::new(Handle {
                inner,
                tasks: Mutex::new(tasks),
            }),
            initiator: None,
        })
    }

    /// The same control plane, recording `who` (an API token's name, a user)
    /// as the initiator of the commands and rollouts started through it.
    pub fn acting_as(&self, who: impl Into<String>) -> ControlPlane {
        ControlPlane {
            handle: Arc::clone(&self.handle),
            initiator: Some(who.into().into()),
        }
    }

    fn initiator(&self) -> Option<&str> {
        self.initiator.as_deref()
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }

    /// The store it works on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner().store
    }

    /// The bus it works on.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.inner().bus
    }

    /// Its configuration.
    pub fn config(&self) -> &ControlPlaneConfig {
        &self.inner().config
    }

    /// Turns `device`'s telemetry emission on or off. Returns the command's
    /// correlation id at once; [`command`](Self::command) tells how it ends.
    ///
    /// A device that has never been seen is [`Error::NotFound`]; one that is
    /// offline ends `device_offline` at once.
    pub async fn set_emission(&self, device: &DeviceId, on: bool) -> Result<CorrelationId> {
        let issued = self
            .inner()
            .send(*device, CommandKind::SetEmission { state: on }, self.initiator())
            .await?;
        Ok(issued.correlation_id)
    }

    /// Sends the stored template `config` to the devices of `target`,
    /// recording it as each one's desired configuration first. Returns one
    /// command per device at once.
    ///
    /// The template must exist ([`Error::NotFound`]). A selector matching
    /// more than `max_fanout` devices is [`Error::InvalidInput`]: roll it out.
    pub async fn apply_config(&self, target: &Target, config: &ConfigRef) -> Result<Vec<Issued>> {
        let inner = self.inner();
        inner.template_exists(config).await?;
        let devices = match target {
            Target::Device(device) => vec![*device],
            selector => {
                let mut matched = Vec::new();
                let mut cursor = None;
                loop {
                    let (devices, next) = inner.scan(selector, cursor, inner.config.max_fanout + 1).await?;
                    matched.extend(devices);
                    if matched.len() > inner.config.max_fanout {
                        return Err(Error::invalid_input(format!(
                            "the selector matches more than {} devices; start a rollout instead",
                            inner.config.max_fanout
                        )));
                    }
                    match next {
                        Some(next) => cursor = Some(next),
                        None => break matched,
                    }
                }
            }
        };
        let mut issued = Vec::with_capacity(devices.len());
        for device in devices {
            issued.push(inner.apply_to(device, config, self.initiator()).await?);
        }
        Ok(issued)
    }

    /// The record of the command `id`, if it is known.
    pub async fn command(&self, id: &CorrelationId) -> Result<Option<CommandRecord>> {
        self.inner().store.command_record(id).await
    }

    /// Waits until the command `id` has ended, up to `timeout`, and returns
    /// its record as it stands then (still pending if time ran out).
    /// [`Error::NotFound`] if the command is not known.
    ///
    /// Outcomes recorded by this instance wake it at once, and so do those
    /// a supervisor or another instance records (most of them), through the
    /// store's notices of commands ending ([`TrackingStore::watch_endings`](crate::TrackingStore::watch_endings)). Those
    /// are best effort, so the record is also read again every so often:
    /// 100 ms after the last look at first, the wait doubling up to 1 s.
    /// Should the store stop telling, it is read 2 ms after the last look at
    /// first, doubling up to 32 ms.
    pub async fn wait(&self, id: &CorrelationId, timeout: Duration) -> Result<CommandRecord> {
        let inner = self.inner();
        let (first_look, longest_look) = if inner.endings_watched.load(Ordering::Relaxed) {
            (Duration::from_millis(100), Duration::from_secs(1))
        } else {
            (Duration::from_millis(2), Duration::from_millis(32))
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut look = first_look;
        let watch = inner.waiters.watch(*id);
        loop {
            // Registered before reading, so an outcome recorded in between still wakes us.
            let progress = watch.notify.notified();
            let record = inner
                .store
                .command_record(id)
                .await?
                .ok_or_else(|| Error::not_found(format!("command {id}")))?;
            if record.state.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(record);
            }
            let poll = deadline.min(tokio::time::Instant::now() + look);
            look = (look * 2).min(longest_look);
            tokio::select! {
                _ = progress => {}
                _ = tokio::time::sleep_until(poll) => {}
            }
        }
    }

    /// Stores a new template version. Versions are immutable: storing one
    /// again with the same files is accepted, with other files it is
    /// [`Error::AlreadyExists`]. A template over `max_template_bytes` is
    /// [`Error::InvalidInput`].
    pub async fn create_template(&self, template: &ConfigTemplate) -> Result<()> {
        let limit = self.inner().config.max_template_bytes;
        let size = template.bundle.body_bytes();
        if size > limit {
            return Err(Error::invalid_input(format!(
                "template {} has {size} bytes of files; the limit is {limit}",
                template.reference()
            )));
        }
        self.inner().store.put_template(template).await
    }

    /// The template `config`, if stored.
    pub async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>> {
        self.inner().store.template(config).await
    }

    /// The stored versions of `agent_type`, oldest first.
    pub async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>> {
        self.inner().store.template_versions(agent_type).await
    }

    /// Points `latest` of the agent type at `config`, which must be stored.
    pub async fn set_latest(&self, config: &ConfigRef) -> Result<()> {
        self.inner().store.set_latest(config).await
    }

    /// The version `latest` of `agent_type` points at.
    pub async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>> {
        self.inner().store.latest(agent_type).await
    }

    /// Starts rolling `spec.config` out; the first (canary) wave goes out at once.
    pub async fn start_rollout(&self, spec: RolloutSpec) -> Result<Rollout> {
        spec.validate()?;
        let inner = self.inner();
        inner.template_exists(&spec.config).await?;
        let mut rollout = Rollout::new(spec, inner.clock.now());
        rollout.started_by = self.initiator().map(str::to_owned);
        if !inner.store.put_rollout(&rollout).await? {
            return Err(Error::already_exists(format!("rollout {}", rollout.id)));
        }
        info!(rollout = %rollout.id, config = %rollout.spec.config, "rollout started");
        inner.drive(rollout.id).await;
        Ok(rollout)
    }

    /// The rollout `id`, if stored.
    pub async fn rollout(&self, id: &RolloutId) -> Result<Option<Rollout>> {
        self.inner().store.rollout(id).await
    }

    /// The rollouts, newest first, a page at a time.
    pub async fn rollouts(&self, page: &PageRequest) -> Result<Page<Rollout>> {
        let inner = self.inner();
        let ids = inner.store.rollouts(page).await?;
        let mut items = Vec::with_capacity(ids.items.len());
        for id in ids.items {
            // A rollout listed but gone by now is left out of the page.
            if let Some(rollout) = inner.store.rollout(&id).await? {
                items.push(rollout);
            }
        }
        Ok(Page { items, next: ids.next })
    }

    /// Pauses a running rollout: no further wave goes out until it is resumed.
    pub async fn pause_rollout(&self, id: &RolloutId) -> Result<Rollout> {
        self.inner()
            .change_rollout(id, |rollout| match &rollout.state {
                RolloutState::Running => Ok(Some(RolloutState::Paused {
                    reason: "paused by an operator".to_owned(),
                })),
                RolloutState::Paused { .. } => Ok(None),
                done => Err(Error::invalid_input(format!(
                    "rollout {id} is {}; it cannot be paused",
                    done.name()
                ))),
            })
            .await
    }

    /// Resumes a paused rollout; this instance drives it from now on, unless
    /// another driver still holds it. A running rollout is left as it is,
    /// with the driver it has.
    pub async fn resume_rollout(&self, id: &RolloutId) -> Result<Rollout> {
        let rollout = self
            .inner()
            .change_rollout(id, |rollout| match &rollout.state {
                RolloutState::Paused { .. } => Ok(Some(RolloutState::Running)),
                RolloutState::Running => Ok(None),
                done => Err(Error::invalid_input(format!(
                    "rollout {id} is {}; it cannot be resumed",
                    done.name()
                ))),
            })
            .await?;
        self.inner().drive(*id).await;
        Ok(rollout)
    }

    /// Stops a rollout for good. Commands already sent run to their outcome.
    pub async fn abort_rollout(&self, id: &RolloutId) -> Result<Rollout> {
        self.inner()
            .change_rollout(id, |rollout| match &rollout.state {
                RolloutState::Running | RolloutState::Paused { .. } => Ok(Some(RolloutState::Aborted)),
                RolloutState::Aborted => Ok(None),
                RolloutState::Completed => Err(Error::invalid_input(format!("rollout {id} is completed already"))),
            })
            .await
    }

    /// Revokes `device`: no supervisor registers it again, whatever
    /// credential it shows, until it is [reinstated](Self::reinstate), and
    /// a session it has open is closed by a `disconnect` command to the
    /// supervisor holding it (recorded as commands are). A device never seen
    /// may be revoked too (a credential leaked before it first connected).
    ///
    /// Revoking a device revoked already keeps the first revocation, and
    /// closes a session it still has open again. A reason over
    /// [`Revocation::MAX_REASON`] bytes is [`Error::InvalidInput`].
    pub async fn revoke(&self, device: &DeviceId, reason: &str) -> Result<Revoked> {
        let inner = self.inner();
        let mut revocation = Revocation::new(*device, reason, inner.clock.now())?;
        if let Some(who) = self.initiator() {
            revocation = revocation.by(who);
        }
        let created = inner.store.revoke(&revocation).await?;
        if !created {
            revocation = inner.store.revocation(device).await?.unwrap_or(revocation);
        }
        // Looked up after the revocation was written: a supervisor that
        // registered the device before reading it holds the lease by now.
        let disconnect = match inner.store.lookup(device).await? {
            None => None,
            Some(_) => {
                let kind = CommandKind::Disconnect {
                    reason: format!("revoked: {}", revocation.reason),
                };
                Some(inner.send(*device, kind, self.initiator()).await?.correlation_id)
            }
        };
        info!(%device, created, disconnect = ?disconnect, "device revoked");
        Ok(Revoked {
            revocation,
            created,
            disconnect,
        })
    }

    /// Lifts the revocation of `device`, so that it may register again.
    /// Returns `false` if it was not revoked.
    pub async fn reinstate(&self, device: &DeviceId) -> Result<bool> {
        let reinstated = self.inner().store.reinstate(device).await?;
        if reinstated {
            info!(%device, by = self.initiator().unwrap_or("-"), "device reinstated");
        }
        Ok(reinstated)
    }

    /// The revocation of `device`, if it is revoked.
    pub async fn revocation(&self, device: &DeviceId) -> Result<Option<Revocation>> {
        self.inner().store.revocation(device).await
    }

    /// The revoked devices, a page at a time.
    pub async fn revocations(&self, page: &PageRequest) -> Result<Page<Revocation>> {
        self.inner().store.revocations(page).await
    }

    /// The store's generation this control plane works in (see
    /// [`StoreGeneration`](crate::StoreGeneration)): the one it found or
    /// began at start, or the next one after a loss it noticed.
    pub fn store_generation(&self) -> crate::StoreGeneration {
        self.inner().generation.current()
    }

    /// How many times this control plane found that the store had lost its
    /// data while it ran (also counted as `opamp_store_losses_total`).
    pub fn store_losses(&self) -> u64 {
        self.inner().generation.losses()
    }

    /// Checks that the store answers and the event stream is healthy (for readiness probes).
    pub async fn check(&self) -> Result<()> {
        let inner = self.inner();
        let probe = DeviceId::new("opamp-readiness-probe")?;
        inner.store.lookup(&probe).await?;
        if !inner.events_healthy.load(Ordering::Relaxed) {
            return Err(Error::unavailable("the event stream of the bus is failing"));
        }
        Ok(())
    }

    /// Stops consuming events, sweeping and driving rollouts. The rollouts it
    /// drove stay as stored, running, and their leases are released: another
    /// instance takes them over at its next look for rollouts nobody drives.
    pub async fn shutdown(&self) {
        let inner = self.inner();
        inner.stopping.send_replace(true);
        let mut tasks = std::mem::take(&mut *lock(&self.handle.tasks));
        while tasks.join_next().await.is_some() {}
        // After the sweeper, which starts drivers too, has stopped.
        let mut drivers = std::mem::take(&mut *lock(&inner.drivers));
        while drivers.join_next().await.is_some() {}
        info!("control plane stopped");
    }
}

/// What [`ControlPlane::revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Revoked {
    /// The device's revocation: the one just made, or the one stored before.
    pub revocation: Revocation,
    /// Whether this call revoked the device (`false`: it was revoked already).
    pub created: bool,
    /// The command closing the device's session, sent to the supervisor
    /// holding it; `None` when no supervisor held it.
    pub disconnect: Option<CorrelationId>,
}

impl Inner {
    async fn template_exists(&self, config: &ConfigRef) -> Result<()> {
        match self.store.template(config).await? {
            Some(_) => Ok(()),
            None => Err(Error::not_found(format!("template {config}"))),
        }
    }

    /// Records `config` as `device`'s desired configuration and sends it.
    async fn apply_to(&self, device: DeviceId, config: &ConfigRef, initiator: Option<&str>) -> Result<Issued> {
        self.store.set_desired(&device, config).await?;
        let kind = CommandKind::ApplyConfig {
            agent_type: config.agent_type,
            version: config.version,
        };
        self.send(device, kind, initiator).await
    }

    /// Records a command and sends it to the device's owner, or ends it at
    /// once when the device has none.
    async fn send(&self, device: DeviceId, kind: CommandKind, initiator: Option<&str>) -> Result<Issued> {
        let now = self.clock.now();
        let command = Command::new(device, kind, now, self.config.command_timeout);
        let correlation_id = command.correlation_id;
        let issued = Issued { device, correlation_id };
        let Some(owner) = self.store.lookup(&device).await? else {
            let deferred = matches!(command.kind, CommandKind::ApplyConfig { .. });
            if !deferred && self.store.status(&device).await?.is_none() {
                return Err(Error::not_found(format!("device {device} is not known")));
            }
            let mut record = CommandRecord::new(command, None, CommandState::Pending);
            record.initiated_by = initiator.map(str::to_owned);
            end_unsent(&mut record, now);
            self.store.insert_command(&record).await?;
            count_outcome(&record, now);
            return Ok(issued);
        };
        let mut record = CommandRecord::new(command, Some(owner), CommandState::Pending);
        record.initiated_by = initiator.map(str::to_owned);
        self.store.insert_command(&record).await?;
        if let Err(err) = self.bus.send(&owner, &record.command).await {
            record.complete(
                &CommandOutcome::Failed {
                    reason: format!("the bus did not take it: {err}"),
                },
                self.clock.now(),
            );
            if let Err(store_err) = self.store.update_command(&record).await {
                warn!(%correlation_id, error = %store_err, "recording a command the bus refused failed");
            }
            return Err(err);
        }
        self.sweep_at(&record);
        debug!(%correlation_id, %device, supervisor = %owner, "command sent");
        Ok(issued)
    }

    fn sweep_at(&self, record: &CommandRecord) {
        let due = record.command.deadline.saturating_add(self.config.retry_grace);
        // The sweeper only stops with the control plane.
        let _ = self.sweeps.send((due, record.correlation_id()));
    }

    /// Records how the command `id` ended, or retries it once after a timeout.
    async fn finish(&self, id: &CorrelationId, outcome: &CommandOutcome) -> Result<()> {
        let Some(mut record) = self.store.command_record(id).await? else {
            // Not one of ours: sent by another producer, or forgotten by retention.
            return Ok(());
        };
        if record.state.is_final() {
            return Ok(());
        }
        if record.retries_on(outcome) {
            return self.retry(record).await;
        }
        let now = self.clock.now();
        record.complete(outcome, now);
        self.record_end(&record, now).await
    }

    /// Sends a timed-out command once more, to the device's owner now.
    async fn retry(&self, mut record: CommandRecord) -> Result<()> {
        let now = self.clock.now();
        let device = record.device();
        match self.store.lookup(&device).await? {
            None => {
                end_unsent(&mut record, now);
                self.record_end(&record, now).await
            }
            Some(owner) => {
                record.attempts += 1;
                record.supervisor = Some(owner);
                record.command.deadline = now.saturating_add(self.config.command_timeout);
                if !self.store.update_command(&record).await? {
                    return Ok(());
                }
                info!(correlation_id = %record.correlation_id(), %device, supervisor = %owner, "command timed out; retrying once");
                self.bus.send(&owner, &record.command).await?;
                self.sweep_at(&record);
                Ok(())
            }
        }
    }

    async fn record_end(&self, record: &CommandRecord, now: Timestamp) -> Result<()> {
        if self.store.update_command(record).await? {
            count_outcome(record, now);
            self.waiters.wake(&record.correlation_id());
            self.progress.notify_waiters();
        }
        Ok(())
    }

    /// Wakes the waits for each command the store says ended, until it stops telling.
    async fn endings_loop(self: Arc<Self>, mut endings: Endings) {
        let mut stopping = self.stopping.subscribe();
        loop {
            let ended = tokio::select! {
                _ = stopped(&mut stopping) => return,
                ended = endings.next() => ended,
            };
            match ended {
                Some(id) => {
                    self.waiters.wake(&id);
                    // Most outcomes are recorded by supervisors, not here.
                    self.progress.notify_waiters();
                }
                None => {
                    warn!("the store stopped telling of commands ending; waits read it every few ms instead");
                    self.endings_watched.store(false, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Handles events as they come, up to [`EVENTS_IN_FLIGHT`] at once: each
    /// outcome costs a few store round trips, which one at a time would cap
    /// an instance at a few hundred outcomes a second and queue the rest.
    /// The buses take acknowledgements in any order, and two outcomes of one
    /// command recorded at once are settled by the store's conditional update.
    /// On stopping, the events being handled are finished first.
    async fn event_loop(self: Arc<Self>, mut events: Subscription<DeviceEvent>) {
        let mut stopping = self.stopping.subscribe();
        let mut handling = JoinSet::new();
        loop {
            let room = handling.len() < EVENTS_IN_FLIGHT;
            let next = tokio::select! {
                _ = stopped(&mut stopping) => break,
                Some(_) = handling.join_next(), if !handling.is_empty() => continue,
                next = events.next(), if room => next,
            };
            match next {
                Ok(Some(delivery)) => {
                    self.events_healthy.store(true, Ordering::Relaxed);
                    handling.spawn(Arc::clone(&self).handle_event(delivery));
                }
                Ok(None) => {
                    warn!("the event stream ended");
                    self.events_healthy.store(false, Ordering::Relaxed);
                    break;
                }
                Err(err) => {
                    warn!(error = %err, "reading events failed; retrying");
                    self.events_healthy.store(false, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        while handling.join_next().await.is_some() {}
    }

    /// Records the outcome an event carries, if any, then acknowledges it.
    async fn handle_event(self: Arc<Self>, delivery: Delivery<DeviceEvent>) {
        let (event, acker) = delivery.into_parts();
        let lag = self.clock.now().duration_since(event.at);
        metrics::gauge!("opamp_event_lag_seconds").set(lag.as_secs_f64());
        if let EventKind::CommandCompleted {
            correlation_id,
            outcome,
        } = &event.kind
        {
            if let Err(err) = self.finish(correlation_id, outcome).await {
                // The sweeper looks at the command again after its deadline.
                warn!(%correlation_id, error = %err, "recording a command's outcome failed");
            }
        }
        if let Err(err) = acker.ack().await {
            warn!(error = %err, "acknowledging an event failed; it may come again");
        }
    }

    /// Looks at each command this instance sent once its deadline and grace
    /// passed: one still pending was answered by nobody, so it is treated as
    /// timed out (retried once, then ended).
    ///
    /// And, every grace period, at the commands of any instance that are
    /// overdue by twice the grace (the store lists them): their sender, had
    /// it lived, would have swept them by then. So a command whose server
    /// died is still retried or ended; should two instances sweep one at
    /// once, the store's conditional update lets one outcome stand, and a
    /// device answers a repeated delivery without acting twice.
    async fn sweep_loop(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<(Timestamp, CorrelationId)>) {
        let mut stopping = self.stopping.subscribe();
        let mut due: BinaryHeap<Reverse<(Timestamp, CorrelationId)>> = BinaryHeap::new();
        let mut orphans = tokio::time::interval(self.config.retry_grace.max(Duration::from_millis(100)));
        orphans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wait = match due.peek() {
                Some(Reverse((at, _))) => at.duration_since(self.clock.now()),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = stopped(&mut stopping) => return,
                entry = queue.recv() => match entry {
                    Some(entry) => due.push(Reverse(entry)),
                    None => return,
                },
                _ = orphans.tick() => {
                    if let Err(err) = self.generation.check(self.store.as_ref()).await {
                        debug!(error = %err, "reading the store's generation failed");
                    }
                    self.sweep_orphans().await;
                    self.adopt_rollouts().await;
                }
                _ = tokio::time::sleep(wait) => {
                    let now = self.clock.now();
                    while let Some(Reverse((at, id))) = due.peek().copied() {
                        if at > now {
                            break;
                        }
                        due.pop();
                        if let Err(err) = self.sweep(&id, now).await {
                            warn!(correlation_id = %id, error = %err, "looking at an unanswered command failed");
                        }
                    }
                }
            }
        }
    }

    /// Sweeps the commands overdue by twice the grace, whoever sent them.
    async fn sweep_orphans(&self) {
        const BATCH: usize = 100;
        let now = self.clock.now();
        let before = now.saturating_sub(self.config.retry_grace.saturating_mul(2));
        let overdue = match self.store.overdue_commands(before, BATCH).await {
            Ok(overdue) => overdue,
            Err(err) => {
                warn!(error = %err, "listing overdue commands failed");
                return;
            }
        };
        for id in overdue {
            if let Err(err) = self.sweep(&id, now).await {
                warn!(correlation_id = %id, error = %err, "looking at an overdue command failed");
            }
        }
    }

    async fn sweep(&self, id: &CorrelationId, now: Timestamp) -> Result<()> {
        let Some(record) = self.store.command_record(id).await? else {
            return Ok(());
        };
        if record.state.is_final() {
            return Ok(());
        }
        if record.command.deadline.saturating_add(self.config.retry_grace) > now {
            // Retried meanwhile: look again at its new deadline.
            self.sweep_at(&record);
            return Ok(());
        }
        info!(correlation_id = %id, device = %record.device(), "no outcome came for a command; treating it as timed out");
        self.finish(id, &CommandOutcome::TimedOut).await
    }

    /// Up to `want` devices of `target` after `cursor`, and where to continue
    /// (none: the end).
    ///
    /// Each page asked for is no larger than the devices still wanted, so
    /// the last page never holds more than fit: where to continue is always
    /// the store's own cursor, at the end of a page. A cursor is the store's
    /// to make (a Redis scan position, say); one made up here from a device
    /// id would be refused, or read as another position. A sparse selector
    /// takes more, smaller pages this way; each device listed costs a status
    /// read anyway.
    async fn scan(
        &self,
        target: &Target,
        cursor: Option<Cursor>,
        want: usize,
    ) -> Result<(Vec<DeviceId>, Option<Cursor>)> {
        let mut found = Vec::new();
        let mut after = cursor;
        loop {
            let limit = want.saturating_sub(found.len());
            let request = match after {
                Some(cursor) => PageRequest::after(cursor, limit),
                None => PageRequest::first(limit),
            };
            let page = self.store.devices(&request).await?;
            for device in page.items {
                let Some(status) = self.store.status(&device).await? else {
                    continue;
                };
                if target.selects(status.agent_type.as_ref(), &status.labels) {
                    found.push(device);
                }
            }
            match page.next {
                None => return Ok((found, None)),
                Some(next) if found.len() >= want => return Ok((found, Some(next))),
                Some(next) => after = Some(next),
            }
        }
    }

    /// Reads a rollout, lets `change` pick its new state (none: leave it),
    /// and writes it on top of the revision read, until a write wins.
    async fn change_rollout(
        &self,
        id: &RolloutId,
        change: impl Fn(&Rollout) -> Result<Option<RolloutState>>,
    ) -> Result<Rollout> {
        loop {
            let mut rollout = self
                .store
                .rollout(id)
                .await?
                .ok_or_else(|| Error::not_found(format!("rollout {id}")))?;
            let Some(state) = change(&rollout)? else {
                return Ok(rollout);
            };
            info!(rollout = %id, from = rollout.state.name(), to = state.name(), "rollout changes state");
            rollout.state = state;
            if self.write_rollout(&mut rollout).await? {
                return Ok(rollout);
            }
        }
    }

    /// Writes `rollout` as its next revision; false if another writer got there first.
    async fn write_rollout(&self, rollout: &mut Rollout) -> Result<bool> {
        rollout.revision += 1;
        rollout.updated_at = self.clock.now();
        self.store.put_rollout(rollout).await
    }

    /// Takes the lease on driving rollout `id` and, if this instance got it,
    /// drives it on a task of its own until it stops running or the lease is
    /// lost. One driver per rollout among all instances: a rollout another
    /// driver holds (this instance's too) is left to it.
    async fn drive(self: &Arc<Self>, id: RolloutId) {
        let n = self.next_driver.fetch_add(1, Ordering::Relaxed);
        let driver = format!("{}#{n}", self.instance);
        match self
            .store
            .claim_rollout_driver(&id, &driver, self.config.rollout_lease)
            .await
        {
            Ok(true) => {
                let mut drivers = lock(&self.drivers);
                // Ended drivers are reaped here, so the set holds the live ones.
                while drivers.try_join_next().is_some() {}
                drivers.spawn(Arc::clone(self).drive_rollout(id, driver));
            }
            Ok(false) => debug!(rollout = %id, "another driver holds the rollout"),
            Err(err) => warn!(
                rollout = %id, error = %err,
                "taking the lease on driving a rollout failed; the look for rollouts nobody drives tries again"
            ),
        }
    }

    /// Drives rollout `id` under the lease `driver` holds, renewing it; lets
    /// it go when the rollout stops running or this instance stops. A driver
    /// that lost its lease (it could not renew in time, and another took the
    /// rollout over) stops at its next step.
    async fn drive_rollout(self: Arc<Self>, id: RolloutId, driver: String) {
        let lost = AtomicBool::new(false);
        tokio::select! {
            () = self.drive_held(&id, &lost) => {}
            () = self.keep_lease(&id, &driver, &lost) => {}
        }
        if lost.load(Ordering::Relaxed) {
            return;
        }
        if let Err(err) = self.store.release_rollout_driver(&id, &driver).await {
            warn!(rollout = %id, error = %err, "releasing the lease on driving a rollout failed; it lapses");
        }
    }

    /// Renews the lease every third of its TTL. Once another driver has it,
    /// says so in `lost` and waits for ever: the driver stops at its next step.
    async fn keep_lease(&self, id: &RolloutId, driver: &str, lost: &AtomicBool) {
        let ttl = self.config.rollout_lease;
        loop {
            tokio::time::sleep(ttl / 3).await;
            match self.store.claim_rollout_driver(id, driver, ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(rollout = %id, "another driver took the rollout over; this one stops");
                    lost.store(true, Ordering::Relaxed);
                    return std::future::pending().await;
                }
                Err(err) => {
                    warn!(rollout = %id, error = %err, "renewing the lease on driving a rollout failed; trying again")
                }
            }
        }
    }

    /// Drives the rollouts still running that no driver holds: theirs died
    /// and its lease lapsed, or stopped with the instance that ran it, or
    /// could not take the lease when the rollout was started or resumed.
    /// Each running rollout is claimed; a live driver's lease refuses it.
    /// Every rollout is read to find the running ones.
    async fn adopt_rollouts(self: &Arc<Self>) {
        const PAGE: usize = 100;
        let mut request = PageRequest::first(PAGE);
        loop {
            let page = match self.store.rollouts(&request).await {
                Ok(page) => page,
                Err(err) => {
                    warn!(error = %err, "listing rollouts to find those nobody drives failed");
                    return;
                }
            };
            for id in page.items {
                match self.store.rollout(&id).await {
                    Ok(Some(rollout)) if rollout.state == RolloutState::Running => self.drive(id).await,
                    Ok(_) => {}
                    Err(err) => warn!(rollout = %id, error = %err, "reading a rollout failed"),
                }
            }
            match page.next {
                Some(next) => request = PageRequest::after(next, PAGE),
                None => return,
            }
        }
    }

    /// Drives rollout `id`, whose lease this driver holds, until it stops
    /// running or the lease is lost.
    async fn drive_held(&self, id: &RolloutId, lost: &AtomicBool) {
        let mut stopping = self.stopping.subscribe();
        // The outcomes of the wave in flight already known to be final: each
        // command's record is read until it has ended, and not again.
        let mut settled = HashMap::new();
        loop {
            if *stopping.borrow() || lost.load(Ordering::Relaxed) {
                return;
            }
            match self.rollout_step(id, &mut settled).await {
                Ok(Step::Again) => continue,
                Ok(Step::Wait) => {
                    let progress = self.progress.notified();
                    tokio::select! {
                        _ = stopped(&mut stopping) => return,
                        // Outcomes come in bursts: gather a few before counting again.
                        _ = progress => tokio::time::sleep(ROLLOUT_DEBOUNCE.min(self.config.rollout_poll)).await,
                        _ = tokio::time::sleep(self.config.rollout_poll) => {}
                    }
                }
                Ok(Step::Stop) => return,
                Err(err) => {
                    warn!(rollout = %id, error = %err, "a rollout step failed; trying again");
                    tokio::select! {
                        _ = stopped(&mut stopping) => return,
                        _ = tokio::time::sleep(self.config.rollout_poll) => {}
                    }
                }
            }
        }
    }

    /// One step of a rollout: tally the wave in flight, or send the next one.
    async fn rollout_step(&self, id: &RolloutId, settled: &mut HashMap<CorrelationId, CommandState>) -> Result<Step> {
        let Some(mut rollout) = self.store.rollout(id).await? else {
            return Ok(Step::Stop);
        };
        if rollout.state != RolloutState::Running {
            return Ok(Step::Stop);
        }
        if rollout.current_wave().is_some() {
            return self.tally_wave(rollout, settled).await;
        }
        if rollout.exhausted {
            rollout.state = RolloutState::Completed;
            if self.write_rollout(&mut rollout).await? {
                info!(rollout = %id, totals = ?rollout.totals(), "rollout completed");
                return Ok(Step::Stop);
            }
            return Ok(Step::Again);
        }
        let size = rollout
            .spec
            .next_wave(rollout.waves.last().map(|wave| wave.tally.total()));
        let target = rollout.spec.target();
        let (devices, cursor) = self.scan(&target, rollout.cursor.clone(), size as usize).await?;
        let exhausted = cursor.is_none();
        if devices.is_empty() {
            rollout.cursor = cursor;
            rollout.exhausted = exhausted;
            self.write_rollout(&mut rollout).await?;
            return Ok(Step::Again);
        }
        let mut commands = Vec::with_capacity(devices.len());
        let mut tally = Tally::default();
        for device in devices {
            let issued = self
                .apply_to(device, &rollout.spec.config, rollout.started_by.as_deref())
                .await?;
            commands.push(issued);
            tally.count(CommandState::Pending);
        }
        let wave = Wave {
            number: rollout.waves.len() as u32 + 1,
            tally,
            started_at: self.clock.now(),
            finished_at: None,
            commands,
        };
        info!(rollout = %id, wave = wave.number, devices = wave.commands.len(), "rollout wave sent");
        // The wave went out: record it even if the rollout was paused meanwhile.
        loop {
            rollout.waves.push(wave.clone());
            rollout.cursor = cursor.clone();
            rollout.exhausted = exhausted;
            if self.write_rollout(&mut rollout).await? {
                return Ok(Step::Again);
            }
            rollout = self
                .store
                .rollout(id)
                .await?
                .ok_or_else(|| Error::not_found(format!("rollout {id}")))?;
        }
    }

    /// Counts the wave in flight; ends it once nothing is pending, pausing
    /// the rollout when it failed too often.
    async fn tally_wave(
        &self,
        mut rollout: Rollout,
        settled: &mut HashMap<CorrelationId, CommandState>,
    ) -> Result<Step> {
        let threshold = rollout.spec.failure_threshold;
        let Some(wave) = rollout.waves.last_mut() else {
            return Ok(Step::Again);
        };
        let mut tally = Tally::default();
        for issued in &wave.commands {
            let id = issued.correlation_id;
            let state = match settled.get(&id) {
                Some(state) => *state,
                None => {
                    let state = match self.store.command_record(&id).await? {
                        Some(record) => record.state,
                        // Forgotten by retention: it ended long ago, how is unknown.
                        None => CommandState::TimedOut,
                    };
                    if state.is_final() {
                        settled.insert(id, state);
                    }
                    state
                }
            };
            tally.count(state);
        }
        let changed = tally != wave.tally;
        wave.tally = tally;
        if tally.pending > 0 {
            if changed {
                self.write_rollout(&mut rollout).await?;
            }
            return Ok(Step::Wait);
        }
        wave.finished_at = Some(self.clock.now());
        wave.commands.clear();
        settled.clear();
        let (number, rate) = (wave.number, tally.failure_rate());
        if rate > threshold {
            rollout.state = RolloutState::Paused {
                reason: format!(
                    "wave {number} failed on {} of {} devices that answered ({:.0}%), above the threshold of {:.0}%",
                    tally.failed,
                    tally.acked + tally.failed,
                    rate * 100.0,
                    threshold * 100.0
                ),
            };
            warn!(rollout = %rollout.id, wave = number, rate, "rollout paused: too many failures");
        }
        self.write_rollout(&mut rollout).await?;
        Ok(Step::Again)
    }
}

/// How long a rollout's driver gathers outcomes after one woke it.
const ROLLOUT_DEBOUNCE: Duration = Duration::from_millis(25);

/// What a rollout's driver does next.
enum Step {
    /// Take another step at once.
    Again,
    /// Wait for outcomes.
    Wait,
    /// Stop driving: the rollout is not running (or gone).
    Stop,
}

/// Ends a command whose device no supervisor holds: a configuration is
/// deferred (the device's desired configuration is recorded), anything else
/// finds the device offline.
fn end_unsent(record: &mut CommandRecord, now: Timestamp) {
    match record.command.kind {
        CommandKind::ApplyConfig { .. } => {
            record.state = CommandState::Deferred;
            record.completed_at = Some(now);
        }
        _ => record.complete(&CommandOutcome::DeviceOffline, now),
    }
}

/// How many events one instance handles at once.
const EVENTS_IN_FLIGHT: usize = 64;

/// Returns once `stopping` says so (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // Only the wait matters; the guard it returns must not be held across awaits.
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// The `wait` calls in progress, by command. One notification per command,
/// not one for all: with many calls waiting, each outcome wakes the calls
/// waiting for it instead of every call, each of which would read its
/// record again.
#[derive(Default)]
struct Waiters(Mutex<HashMap<CorrelationId, Arc<Notify>>>);

impl Waiters {
    /// Registers a wait for `id`'s outcome, until the returned watch is dropped.
    fn watch(&self, id: CorrelationId) -> Watch<'_> {
        let notify = Arc::clone(lock(&self.0).entry(id).or_default());
        Watch {
            waiters: self,
            id,
            notify,
        }
    }

    /// Wakes the calls waiting for `id`, if any.
    fn wake(&self, id: &CorrelationId) {
        if let Some(notify) = lock(&self.0).get(id) {
            notify.notify_waiters();
        }
    }
}

/// One `wait` call's registration; the last one for a command removes its entry.
struct Watch<'a> {
    waiters: &'a Waiters,
    id: CorrelationId,
    notify: Arc<Notify>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut waiters = lock(&self.waiters.0);
        // The map's reference and this one: no other call waits for the command.
        // (Others clone under the same lock, so the count cannot change meanwhile.)
        if Arc::strong_count(&self.notify) == 2 {
            waiters.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outcome wakes the waits for its own command only, and the last
    /// wait for a command to end removes its entry.
    #[tokio::test]
    async fn a_waiter_is_woken_by_its_own_command_only() {
        let waiters = Waiters::default();
        let (one, two) = (CorrelationId::new(), CorrelationId::new());
        let first = waiters.watch(one);
        let again = waiters.watch(one);
        let other = waiters.watch(two);
        let (woken, also, not_woken) = (
            first.notify.notified(),
            again.notify.notified(),
            other.notify.notified(),
        );
        waiters.wake(&one);
        let soon = |notified| tokio::time::timeout(Duration::from_millis(20), notified);
        assert!(soon(woken).await.is_ok());
        assert!(soon(also).await.is_ok());
        assert!(soon(not_woken).await.is_err(), "another command's outcome woke it");

        drop(first);
        assert_eq!(lock(&waiters.0).len(), 2, "one wait for `one` is left");
        drop(again);
        drop(other);
        assert!(lock(&waiters.0).is_empty());
    }
}
