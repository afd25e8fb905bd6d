//! The supervisor runtime: holds device sessions, executes commands, keeps leases.
//!
//! A supervisor accepts sessions from one or more [`DeviceTransport`]s at once.
//! For each device that registers it
//!
//! 1. claims the device's lease in the store (publishing a
//!    [`EventKind::TakenOver`] event when another supervisor held it),
//! 2. marks it online, with what it reported in its hello,
//! 3. executes the device's commands one at a time, in the order the bus
//!    delivered them, and
//! 4. on disconnect releases the lease and marks it offline, both fenced, so
//!    that a supervisor that lost the device can never erase the new owner.
//!
//! A session runs in a task only while it has something to do: a message
//! from the device, a command to start, a command awaiting its answer. An
//! idle session is a record in the supervisor's map and a waker in its
//! device's inbound queue; whatever happens to it next (a message, a command,
//! a close) spawns its task again. So a supervisor's memory per idle device is
//! that record, not a task's.
//!
//! Commands come from the bus. Each is delivered to the device, its
//! acknowledgement awaited until the command's deadline, the outcome written
//! to the store (the device's status, and the command's record: the design's
//! §5.2, step 8) and published as an event, and only then is the bus delivery
//! acknowledged: a supervisor that dies mid-command has it redelivered. A
//! first timeout is not written to the record: the control plane sends the
//! command again on its event.
//!
//! Every delivery ends. A write the store or bus refuses for a while
//! (unavailable, timed out) is tried again in place, with backoff, so that a
//! store or broker that blips holds up the commands of the devices it
//! touches, and only until it answers again; a write refused for good hands
//! the delivery back to the bus (`nack`), which delivers it again later or,
//! past its bound, dead-letters it. Execution is idempotent: before running
//! a command the supervisor reads its record, and one that has ended (run
//! before a restart, say) is acknowledged without running again; an outcome
//! that could not be recorded is remembered, so that its delivery handed
//! back is recorded, not run again; a configuration the device runs already
//! is not pushed again. Each outcome written is counted in
//! `opamp_commands_total` and `opamp_command_latency_seconds`, and each
//! command taken from the bus in `opamp_command_pickup_seconds` (issue to
//! taken: how long it spent reaching its supervisor, on the clocks of the
//! instance that issued it and this one; a retry counts from its first issue).
//!
//! Leases are renewed for all connected devices every `lease_ttl / 3`, in
//! batches of one store call each. A store that lost its data (restarted
//! empty, say) is no takeover: when a renewal finds a lease gone with nobody
//! else holding it, or a fenced status write finds no status at all
//! (`NotFound`), every device here is claimed again at once, in one pass
//! however many notice, and its whole status (agent type, labels, config,
//! emission, `connected_at`) written again from its session, conditional on
//! the lease just claimed; no session is closed. Only another supervisor's
//! lease, or a status naming another supervisor (`NotOwner`), closes a
//! session here as stale: at the next renewal or as soon as a fenced write
//! for it is refused.
//!
//! Devices converge on their desired configuration: when one registers with a
//! configuration hash other than its desired template's, and when a broadcast
//! [`ConfigUpdate`] selects it (which also records the update as its desired
//! configuration), the template is pushed to it.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{count_outcome, lock};
use crate::bus::{Acker, Bus, ConfigUpdate, Delivery, Subscription};
use crate::command::{Command, CommandKind, CommandOutcome, CorrelationId};
use crate::config::{ConfigHash, ConfigRef};
use crate::error::{Error, Result};
use crate::event::{ConfigApplyState, DeviceEvent, EventKind};
use crate::id::{AgentType, ConfigVersion, DeviceId, SupervisorId};
use crate::status::{Labels, StatusPatch};
use crate::store::{Claim, ConfigStoreExt, StatusStoreExt, Store, validate_ttl};
use crate::time::{Clock, SystemClock, Timestamp, duration_text};
use crate::tracking::CommandRecord;
use crate::transport::{
    Capabilities, ConfigPush, DeviceHello, DeviceLimits, DeviceSession, DeviceTransport, FromDevice, Inbound, Outbound,
    Refused, StatusReport, ToDevice, TrySendError,
};

/// How a supervisor runs.
///
/// Reads from configuration files: only `id` is required; durations are
/// written like `300s` or `250ms`.
///
/// ```
/// use std::time::Duration;
/// use opamp_core::runtime::supervisor::SupervisorConfig;
///
/// let config: SupervisorConfig = serde_json::from_str(r#"{"id": "supervisor-3", "lease_ttl": "2m"}"#)?;
/// assert_eq!(config.lease_ttl, Duration::from_secs(120));
/// assert_eq!(config.device_queue, 16);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// This supervisor's id: its key on the bus and the owner named in leases.
    pub id: SupervisorId,
    /// How long a lease lasts without renewal.
    #[serde(default = "defaults::lease_ttl", with = "duration_text")]
    pub lease_ttl: Duration,
    /// Devices renewed per store call.
    #[serde(default = "defaults::renew_batch")]
    pub renew_batch: usize,
    /// Commands waiting per device; a command finding the queue full fails at once.
    #[serde(default = "defaults::device_queue")]
    pub device_queue: usize,
    /// Commands taken from the bus and not yet finished, over all devices.
    /// When reached, the supervisor stops pulling from the bus (back-pressure).
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// How long a graceful shutdown waits for in-flight commands.
    #[serde(default = "defaults::shutdown_grace", with = "duration_text")]
    pub shutdown_grace: Duration,
    /// Which command outcomes are published as `CommandCompleted` events.
    #[serde(default)]
    pub outcome_events: OutcomeEvents,
    /// What a device may report about itself: a hello over these is refused,
    /// errors longer than allowed are cut.
    #[serde(default)]
    pub device_limits: DeviceLimits,
}

/// Which command outcomes a supervisor publishes as `CommandCompleted` events.
///
/// A supervisor records each outcome in the command's record itself; the
/// control plane needs the event only for what it must still act on. Other
/// readers of the event stream (an audit trail, say) may want them all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutcomeEvents {
    /// Every outcome (the default).
    #[default]
    All,
    /// Only those the supervisor did not record: a first timeout, which the
    /// control plane sends again, and commands that have no record (sent by
    /// another producer). Halves the bus traffic of commands.
    Unrecorded,
}

impl OutcomeEvents {
    /// `all` or `unrecorded`, as configuration files and flags spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeEvents::All => "all",
            OutcomeEvents::Unrecorded => "unrecorded",
        }
    }
}

impl fmt::Display for OutcomeEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OutcomeEvents {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "all" => Ok(OutcomeEvents::All),
            "unrecorded" => Ok(OutcomeEvents::Unrecorded),
            other => Err(Error::invalid_input(format!(
                "outcome events {other:?}: expected all or unrecorded"
            ))),
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub(super) fn lease_ttl() -> Duration {
        crate::store::DEFAULT_LEASE_TTL
    }
    pub(super) fn renew_batch() -> usize {
        1000
    }
    pub(super) fn device_queue() -> usize {
        16
    }
    pub(super) fn max_in_flight() -> usize {
        10_000
    }
    pub(super) fn shutdown_grace() -> Duration {
        Duration::from_secs(10)
    }
}

impl SupervisorConfig {
    /// The defaults: 300 s leases renewed in batches of 1,000, 16 queued
    /// commands per device, 10,000 in flight, 10 s of shutdown grace.
    pub fn new(id: SupervisorId) -> Self {
        SupervisorConfig {
            id,
            lease_ttl: defaults::lease_ttl(),
            renew_batch: defaults::renew_batch(),
            device_queue: defaults::device_queue(),
            max_in_flight: defaults::max_in_flight(),
            shutdown_grace: defaults::shutdown_grace(),
            outcome_events: OutcomeEvents::default(),
            device_limits: DeviceLimits::default(),
        }
    }

    /// With another lease TTL.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// With another per-device command queue length.
    pub fn device_queue(mut self, commands: usize) -> Self {
        self.device_queue = commands;
        self
    }

    /// With another limit on commands in flight.
    pub fn max_in_flight(mut self, commands: usize) -> Self {
        self.max_in_flight = commands;
        self
    }

    /// With another shutdown grace period.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// With `events` choosing which command outcomes are published as events.
    pub fn outcome_events(mut self, events: OutcomeEvents) -> Self {
        self.outcome_events = events;
        self
    }

    /// With other bounds on what a device may report about itself.
    pub fn device_limits(mut self, limits: DeviceLimits) -> Self {
        self.device_limits = limits;
        self
    }

    fn validate(&self) -> Result<()> {
        validate_ttl(self.lease_ttl)?;
        for (name, value) in [
            ("renew_batch", self.renew_batch),
            ("device_queue", self.device_queue),
            ("max_in_flight", self.max_in_flight),
        ] {
            if !(1..=Semaphore::MAX_PERMITS).contains(&value) {
                return Err(Error::invalid_input(format!(
                    "supervisor {name} must be between 1 and {}, got {value}",
                    Semaphore::MAX_PERMITS
                )));
            }
        }
        Ok(())
    }
}

/// A supervisor, ready to [`start`](Supervisor::start).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::sync::Arc;
/// use opamp_core::runtime::supervisor::{Supervisor, SupervisorConfig};
/// use opamp_core::transport::channel;
/// use opamp_core::SupervisorId;
/// use opamp_bus::memory::MemoryBus;
/// use opamp_store::memory::MemoryStore;
///
/// let (transport, _connector) = channel::pair(channel::ChannelConfig::default());
/// let config = SupervisorConfig::new(SupervisorId::new("supervisor-1")?);
/// let running = Supervisor::new(config, Arc::new(MemoryStore::new()), Arc::new(MemoryBus::new()))
///     .start(vec![Arc::new(transport)])
///     .await?;
/// assert_eq!(running.connected_devices(), 0);
/// running.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Supervisor {
    config: SupervisorConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    clock: Arc<dyn Clock>,
}

impl Supervisor {
    /// A supervisor on `store` and `bus`, using the system clock.
    pub fn new(config: SupervisorConfig, store: Arc<dyn Store>, bus: Arc<dyn Bus>) -> Self {
        Supervisor {
            config,
            store,
            bus,
            clock: Arc::new(SystemClock),
        }
    }

    /// With another clock (for tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Subscribes to this supervisor's commands and starts accepting devices
    /// from every transport.
    pub async fn start(self, transports: Vec<Arc<dyn DeviceTransport>>) -> Result<RunningSupervisor> {
        self.config.validate()?;
        let commands = self.bus.subscribe(&self.config.id).await?;
        let updates = self.bus.subscribe_broadcasts(&self.config.id).await?;
        let (stopping, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            in_flight: Arc::new(Semaphore::new(self.config.max_in_flight)),
            config: self.config,
            store: self.store,
            bus: self.bus,
            clock: self.clock,
            sessions: Mutex::new(HashSet::new()),
            session_tasks: Mutex::new(JoinSet::new()),
            runtime: tokio::runtime::Handle::current(),
            next_session: AtomicU64::new(1),
            lost: Notify::new(),
            stopping,
            unrecorded: Mutex::default(),
            disconnects: Mutex::default(),
        });
        let mut loops = JoinSet::new();
        for transport in transports {
            loops.spawn(Arc::clone(&inner).accept_loop(transport));
        }
        loops.spawn(Arc::clone(&inner).command_loop(commands));
        loops.spawn(Arc::clone(&inner).update_loop(updates));
        loops.spawn(Arc::clone(&inner).renew_loop());
        loops.spawn(Arc::clone(&inner).reclaim_loop());
        info!(supervisor = %inner.config.id, "supervisor started");
        Ok(RunningSupervisor { inner, loops })
    }
}

/// A started supervisor. Stop it gracefully with [`shutdown`](Self::shutdown);
/// dropping it stops it at once, as [`abort`](Self::abort) does.
pub struct RunningSupervisor {
    inner: Arc<Inner>,
    loops: JoinSet<()>,
}

impl fmt::Debug for RunningSupervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSupervisor")
            .field("id", &self.inner.config.id)
            .field("connected_devices", &self.connected_devices())
            .finish()
    }
}

impl RunningSupervisor {
    /// This supervisor's id.
    pub fn id(&self) -> SupervisorId {
        self.inner.config.id
    }

    /// How many devices have a registered session here.
    pub fn connected_devices(&self) -> usize {
        self.inner.sessions().len()
    }

    /// Whether `device` has a registered session here.
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.inner.sessions().contains(device)
    }

    /// Renews every lease now instead of at the next tick.
    pub async fn renew_leases(&self) {
        self.inner.renew_all().await;
    }

    /// Stops gracefully: stops accepting devices and taking commands, waits
    /// (up to the configured grace) for commands in flight, then closes every
    /// session, releasing its lease and marking it offline.
    pub async fn shutdown(mut self) {
        let inner = &self.inner;
        info!(supervisor = %inner.config.id, "supervisor shutting down");
        inner.stopping.send_replace(true);
        while self.loops.join_next().await.is_some() {}

        let all = u32::try_from(inner.config.max_in_flight).unwrap_or(u32::MAX);
        if tokio::time::timeout(inner.config.shutdown_grace, inner.in_flight.acquire_many(all))
            .await
            .is_err()
        {
            warn!(supervisor = %inner.config.id, "commands still in flight after the shutdown grace; closing anyway");
        }
        // Closing a session spawns its task if it was idle; a device that
        // registered meanwhile is closed on the next round.
        loop {
            let open: Vec<Arc<Session>> = inner.sessions().iter().map(|listed| Arc::clone(&listed.0)).collect();
            for session in &open {
                session.close();
            }
            let mut tasks = std::mem::take(&mut *lock(&inner.session_tasks));
            if tasks.is_empty() {
                // Nothing runs any of them (none should be left): forget them.
                inner.sessions().clear();
                break;
            }
            while tasks.join_next().await.is_some() {}
        }
        info!(supervisor = %inner.config.id, "supervisor stopped");
    }

    /// Stops at once, as a crash would: no lease is released, nothing is
    /// marked offline, unacknowledged commands stay on the bus. For failover
    /// tests and demos.
    pub fn abort(self) {
        drop(self);
    }
}

impl Drop for RunningSupervisor {
    fn drop(&mut self) {
        // After a graceful shutdown there is nothing left to stop.
        self.inner.stopping.send_replace(true);
        self.loops.abort_all();
        lock(&self.inner.session_tasks).abort_all();
        let sessions: Vec<Listed> = self.inner.sessions().drain().collect();
        for listed in sessions {
            listed.0.abandon();
        }
    }
}

struct Inner {
    config: SupervisorConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    clock: Arc<dyn Clock>,
    sessions: Mutex<HashSet<Listed>>,
    /// Registrations, and the sessions that have something to do.
    session_tasks: Mutex<JoinSet<()>>,
    /// Where a session woken from outside the runtime (by a transport's thread) spawns its task.
    runtime: tokio::runtime::Handle,
    next_session: AtomicU64,
    /// Wakes `reclaim_loop`: the store lost devices held here.
    lost: Notify,
    in_flight: Arc<Semaphore>,
    stopping: watch::Sender<bool>,
    /// Outcomes of commands run here whose recording failed for good: their
    /// deliveries were handed back, and are recorded, not run, when they come
    /// again. Empty unless the store refuses writes.
    unrecorded: Mutex<HashMap<CorrelationId, (CommandOutcome, Option<ConfigHash>)>>,
    /// Devices told to disconnect (revoked) while no session of theirs was
    /// listed here, and when: one registering meanwhile, whose check of its
    /// revocation came just before the revocation, is closed once listed.
    disconnects: Mutex<HashMap<DeviceId, tokio::time::Instant>>,
}

/// The first and the longest wait before a store or bus call refused for a
/// while is tried again.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// The least time a command must have left to be started: a fifth of its
/// time, at most this. One pushed with less would likely be answered after
/// its deadline, and then the control plane's retry has the device apply it
/// a second time; not pushed, it is retried with time of its own.
const START_MARGIN: Duration = Duration::from_secs(1);
/// How long a disconnect for a device not listed here waits for a
/// registration under way to list it: far longer than a registration takes.
const DISCONNECT_WINDOW: Duration = Duration::from_secs(30);
/// How long a delivery handed back waits before the bus delivers it again.
const HAND_BACK_DELAY: Duration = Duration::from_secs(1);
/// The most outcomes remembered for deliveries handed back; past it, one
/// that comes back runs again.
const MAX_UNRECORDED: usize = 10_000;

/// What a session is given to do.
enum Work {
    /// Execute a command from the bus.
    Command(Box<Job>),
    /// Make sure the device runs this configuration.
    Converge(Arc<ConfigPush>),
}

/// A command taken from the bus, with what it needs to finish.
struct Job {
    command: Command,
    acker: Acker,
    _permit: OwnedSemaphorePermit,
}

/// What a device must answer for the command in flight to finish.
enum Expect {
    CommandAck(CorrelationId),
    ConfigAck { config: ConfigRef, hash: ConfigHash },
}

struct InFlight {
    job: Job,
    expect: Expect,
    deadline: tokio::time::Instant,
}

impl Inner {
    fn sessions(&self) -> MutexGuard<'_, HashSet<Listed>> {
        lock(&self.sessions)
    }

    fn session(&self, device: &DeviceId) -> Option<Arc<Session>> {
        self.sessions().get(device).map(|listed| Arc::clone(&listed.0))
    }

    /// Runs `session`'s task: it was idle and something woke it.
    fn spawn_session(&self, session: Arc<Session>) {
        let mut tasks = lock(&self.session_tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(session.drive(), &self.runtime);
    }

    fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    async fn accept_loop(self: Arc<Self>, transport: Arc<dyn DeviceTransport>) {
        let mut stopping = self.stopping();
        loop {
            let accepted = tokio::select! {
                accepted = transport.accept() => accepted,
                _ = stopped(&mut stopping) => return,
            };
            match accepted {
                Ok(Some(session)) => {
                    let mut tasks = lock(&self.session_tasks);
                    while tasks.try_join_next().is_some() {}
                    tasks.spawn(Arc::clone(&self).run_session(session));
                }
                Ok(None) => {
                    info!(transport = transport.name(), "transport closed");
                    return;
                }
                Err(err) => {
                    warn!(transport = transport.name(), error = %err, "accepting a device failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn command_loop(self: Arc<Self>, mut commands: Subscription<Command>) {
        let mut stopping = self.stopping();
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&self.in_flight).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stopped(&mut stopping) => return,
            };
            match self.next_delivery(&mut commands, "commands").await {
                Some(delivery) => self.dispatch(delivery, permit),
                None => return,
            }
        }
    }

    /// Applies config updates one at a time, in bus order: one the store
    /// refuses for a while is tried again in place, so that an older update
    /// never lands after a newer one.
    async fn update_loop(self: Arc<Self>, mut updates: Subscription<ConfigUpdate>) {
        while let Some(delivery) = self.next_delivery(&mut updates, "config updates").await {
            let (update, acker) = delivery.into_parts();
            let applied = self
                .persist("applying a config update", || self.converge_fleet(&update))
                .await;
            let ended = match applied {
                Ok(()) => acker.ack().await,
                // Stopping: it comes again to this supervisor's next subscription.
                Err(_) if self.is_stopping() => continue,
                Err(err) => {
                    warn!(
                        supervisor = %self.config.id,
                        config = %update.config,
                        correlation_id = %update.correlation_id,
                        error = %err,
                        "applying a config update failed; handing it back"
                    );
                    acker
                        .nack(
                            HAND_BACK_DELAY,
                            format!("applying config update {}: {err}", update.config),
                        )
                        .await
                }
            };
            if let Err(err) = ended {
                warn!(supervisor = %self.config.id, error = %err, "ending a config update's delivery failed");
            }
        }
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Calls `call` until it succeeds, trying again with backoff while it
    /// fails with an error that may pass (the store or bus unavailable or
    /// slow). Returns an error that will not pass at once, and the last error
    /// once the supervisor is stopping.
    async fn persist<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut stopping = self.stopping();
        let mut backoff = RETRY_BACKOFF.0;
        let mut tries = 0u32;
        loop {
            let err = match call().await {
                Ok(value) => return Ok(value),
                Err(err) if err.is_retryable() && !self.is_stopping() => err,
                Err(err) => return Err(err),
            };
            tries += 1;
            // One warning per outage and call, not one per try.
            if tries == 1 {
                warn!(supervisor = %self.config.id, error = %err, "{what} failed; trying again");
            } else {
                debug!(supervisor = %self.config.id, error = %err, tries, "{what} failed again; trying again");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(&mut stopping) => return Err(err),
            }
            backoff = (backoff * 2).min(RETRY_BACKOFF.1);
        }
    }

    /// The next message of `subscription`, retrying read errors with backoff;
    /// `None` once the supervisor stops or the subscription ends.
    async fn next_delivery<T: Send>(&self, subscription: &mut Subscription<T>, what: &str) -> Option<Delivery<T>> {
        let mut stopping = self.stopping();
        let mut backoff = Duration::from_millis(50);
        loop {
            let next = tokio::select! {
                next = subscription.next() => next,
                _ = stopped(&mut stopping) => return None,
            };
            match next {
                Ok(Some(delivery)) => return Some(delivery),
                Ok(None) => {
                    warn!(supervisor = %self.config.id, "the {what} subscription ended");
                    return None;
                }
                Err(err) => {
                    warn!(supervisor = %self.config.id, error = %err, "reading {what} failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped(&mut stopping) => return None,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Records `update` as the desired configuration of every device here it
    /// selects, and pushes it to them.
    async fn converge_fleet(&self, update: &ConfigUpdate) -> Result<()> {
        let config = update.config;
        let template = match self.store.template(&config).await? {
            Some(template) => template,
            None => {
                warn!(%config, correlation_id = %update.correlation_id, "a config update names a template that does not exist; ignoring it");
                return Ok(());
            }
        };
        let push = Arc::new(ConfigPush::new(Some(update.correlation_id), config, template.bundle));
        let selected: Vec<Arc<Session>> = self
            .sessions()
            .iter()
            .filter(|listed| listed.0.agent_type == Some(config.agent_type) && update.selects(&listed.0.labels))
            .map(|listed| Arc::clone(&listed.0))
            .collect();
        debug!(%config, devices = selected.len(), "config update selects devices here");
        for session in selected {
            let device = session.device;
            self.store.set_desired(&device, &config).await?;
            if let Err(TrySendError::Full(_)) = session.offer(Work::Converge(Arc::clone(&push))) {
                warn!(%device, %config, "the device's queue is full; it converges on its desired config when it next registers");
            }
        }
        Ok(())
    }

    /// The push that brings a registering device to its desired configuration, if it runs another (`running`).
    async fn desired_push(&self, device: &DeviceId, running: Option<ConfigHash>) -> Option<Arc<ConfigPush>> {
        match self.store.desired_template(device).await {
            Ok(Some(template)) => {
                let push = ConfigPush::new(None, template.reference(), template.bundle);
                (Some(push.hash) != running).then(|| Arc::new(push))
            }
            Ok(None) => None,
            Err(err) => {
                warn!(%device, error = %err, "loading the desired config failed; not converging now");
                None
            }
        }
    }

    /// Another supervisor owns `device` now: close the session here.
    fn drop_stale(&self, device: &DeviceId) {
        if let Some(session) = self.session(device) {
            info!(%device, supervisor = %self.config.id, "device owned elsewhere now; closing the stale session");
            session.close();
        }
    }

    /// Hands a command to its device's session, or finishes it at once.
    fn dispatch(self: &Arc<Self>, delivery: Delivery<Command>, permit: OwnedSemaphorePermit) {
        let (command, acker) = delivery.into_parts();
        let waited = self.clock.now().duration_since(command.issued_at);
        metrics::histogram!("opamp_command_pickup_seconds", "kind" => command.kind.wire_name())
            .record(waited.as_secs_f64());
        let job = Box::new(Job {
            command,
            acker,
            _permit: permit,
        });
        let remembered = lock(&self.unrecorded).remove(&job.command.correlation_id);
        if let Some((outcome, applied)) = remembered {
            // Run here already: only its outcome is still to be recorded.
            let inner = Arc::clone(self);
            lock(&self.session_tasks).spawn(async move {
                inner.finish(*job, outcome, applied).await;
            });
            return;
        }
        if let CommandKind::Disconnect { reason } = &job.command.kind {
            let outcome = self.disconnect(job.command.device, reason);
            let inner = Arc::clone(self);
            lock(&self.session_tasks).spawn(async move {
                inner.finish(*job, outcome, None).await;
            });
            return;
        }
        let refused = match self.session(&job.command.device) {
            None => (job, CommandOutcome::DeviceOffline),
            Some(session) => match session.offer(Work::Command(job)) {
                Ok(()) => return,
                Err(TrySendError::Full(Work::Command(job))) => {
                    let reason = format!(
                        "the command queue of device {} is full ({} waiting)",
                        job.command.device, self.config.device_queue
                    );
                    (job, CommandOutcome::Failed { reason })
                }
                Err(TrySendError::Closed(Work::Command(job))) => (job, CommandOutcome::DeviceOffline),
                // What was sent was a command, so a command is what comes back.
                Err(_) => return,
            },
        };
        let inner = Arc::clone(self);
        // Tracked with the sessions, so that `abort` stops it as a crash would.
        lock(&self.session_tasks).spawn(async move {
            inner.finish(*refused.0, refused.1, None).await;
        });
    }

    /// Closes `device`'s session here at once, ahead of whatever it has to
    /// do (its commands end `device_offline`). With none listed, remembers
    /// the device for a registration under way.
    fn disconnect(&self, device: DeviceId, reason: &str) -> CommandOutcome {
        match self.session(&device) {
            Some(session) => {
                info!(%device, supervisor = %self.config.id, reason, "disconnecting the device");
                session.close();
                CommandOutcome::Acked
            }
            None => {
                let now = tokio::time::Instant::now();
                let mut disconnects = lock(&self.disconnects);
                disconnects.retain(|_, at| now.duration_since(*at) < DISCONNECT_WINDOW);
                disconnects.insert(device, now);
                CommandOutcome::DeviceOffline
            }
        }
    }

    /// Whether `device`, just listed, was told to disconnect while it registered.
    fn told_to_disconnect(&self, device: &DeviceId) -> bool {
        let mut disconnects = lock(&self.disconnects);
        if disconnects.is_empty() {
            return false;
        }
        disconnects
            .remove(device)
            .is_some_and(|at| at.elapsed() < DISCONNECT_WINDOW)
    }

    async fn renew_loop(self: Arc<Self>) {
        let mut stopping = self.stopping();
        let period = self.config.lease_ttl / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.renew_all().await,
                _ = stopped(&mut stopping) => return,
            }
        }
    }

    async fn renew_all(&self) {
        let devices: Vec<DeviceId> = self.sessions().iter().map(|listed| listed.0.device).collect();
        let me = self.config.id;
        for batch in devices.chunks(self.config.renew_batch) {
            match self.store.renew(&me, batch, self.config.lease_ttl).await {
                Ok(lost) => self.reassert(&lost).await,
                Err(err) => warn!(supervisor = %me, error = %err, devices = batch.len(), "renewing leases failed"),
            }
        }
    }

    /// Lease renewals failed for these devices, still connected here: looked
    /// up in one call, those another supervisor holds are closed here; if any
    /// lease lapsed or vanished (the store restarted empty, say), the others
    /// here are likely gone too, so every device is claimed again.
    async fn reassert(&self, lost: &[DeviceId]) {
        let me = self.config.id;
        if lost.is_empty() {
            return;
        }
        let owners = match self.store.lookup_many(lost).await {
            Ok(owners) => owners,
            Err(err) => {
                warn!(supervisor = %me, error = %err, devices = lost.len(), "looking up lost leases failed");
                return;
            }
        };
        let mut unheld = false;
        for (device, owner) in lost.iter().zip(owners) {
            match owner {
                Some(owner) if owner != me => {
                    info!(%device, supervisor = %me, new_owner = %owner, "device taken over; closing the stale session");
                    if let Some(session) = self.session(device) {
                        session.close();
                    }
                }
                _ => unheld = true,
            }
        }
        if unheld {
            self.store_lost();
        }
    }

    /// The store has forgotten devices held here (a lease or a status is
    /// gone): claims every device here again, with its whole status, as soon
    /// as `reclaim_loop` gets to it. Debounced: however many sessions notice
    /// at once, that is one pass (and one more if some notice during it).
    fn store_lost(&self) {
        self.lost.notify_one();
    }

    async fn reclaim_loop(self: Arc<Self>) {
        let mut stopping = self.stopping();
        loop {
            tokio::select! {
                _ = self.lost.notified() => self.reclaim_all().await,
                _ = stopped(&mut stopping) => return,
            }
        }
    }

    async fn reclaim_all(self: &Arc<Self>) {
        // Each device is two round trips (claim, then status); a few dozen at
        // once keep 20,000 devices from taking 40,000 round trips end to end.
        const AT_ONCE: usize = 64;
        let sessions: Vec<Arc<Session>> = self.sessions().iter().map(|listed| Arc::clone(&listed.0)).collect();
        info!(supervisor = %self.config.id, devices = sessions.len(), "the store lost devices held here; claiming every device again");
        // Dropped with this task, as a crash (`abort`) drops it.
        let mut running = JoinSet::new();
        for session in sessions {
            if running.len() >= AT_ONCE {
                running.join_next().await;
            }
            let inner = Arc::clone(self);
            running.spawn(async move {
                inner.reclaim(&session, None).await;
            });
        }
        while running.join_next().await.is_some() {}
    }

    /// A fenced write of `patch` found no status for `device` (the store
    /// lost it): claims it again and writes its whole status with `patch`
    /// over it, and has every other device here claimed again too. Returns
    /// whether the status was written.
    async fn status_lost(&self, device: &DeviceId, patch: Option<&StatusPatch>) -> bool {
        self.store_lost();
        match self.session(device) {
            Some(session) => self.reclaim(&session, patch).await,
            None => false,
        }
    }

    /// Claims `session`'s device again and writes its whole status (with
    /// `extra` over it), conditional on the lease just claimed. Returns
    /// whether the status was written. A device that another supervisor
    /// holds meanwhile is left to it: its session there is the newer one.
    async fn reclaim(&self, session: &Arc<Session>, extra: Option<&StatusPatch>) -> bool {
        let (me, device, ttl) = (self.config.id, session.device, self.config.lease_ttl);
        if session.slot().closing {
            // Closed meanwhile (replaced by a newer session, say): its status is not to be written.
            return false;
        }
        match self.store.claim(&device, &me, ttl).await {
            Ok(Claim::Acquired | Claim::Renewed) => {}
            Ok(Claim::TakenOver { previous }) => {
                // The device registered there while the store had forgotten
                // it here: give the lease back, and close the older session.
                info!(%device, supervisor = %me, owner = %previous, "device registered elsewhere meanwhile; closing the stale session");
                if let Err(err) = self.store.claim(&device, &previous, ttl).await {
                    warn!(%device, owner = %previous, error = %err, "handing a lease back failed");
                }
                session.close();
                return false;
            }
            Err(err) => {
                warn!(%device, supervisor = %me, error = %err, "claiming a device again failed");
                return false;
            }
        }
        let patch = session.whole_status(me, self.clock.now(), extra).leased_by(me);
        match self.store.update_status(&device, &patch).await {
            Ok(()) => true,
            Err(Error::NotOwner(_)) => {
                info!(%device, supervisor = %me, "device claimed elsewhere meanwhile; closing the stale session");
                session.close();
                false
            }
            Err(err) => {
                warn!(%device, supervisor = %me, error = %err, "writing a device's status again failed");
                false
            }
        }
    }

    async fn publish(&self, device: DeviceId, kind: EventKind) -> Result<()> {
        let event = DeviceEvent::new(device, kind, self.clock.now());
        self.bus.publish_event(&event).await
    }

    /// Registers the device of a session just accepted, then runs the
    /// session until it first has nothing to do.
    // Awaits that are not live while the session is first driven are boxed,
    // so that the registration's state is not laid out next to the session's.
    // Not an `async fn`: the future of one stores its arguments twice, as
    // arguments and as the locals they are moved into.
    #[allow(clippy::manual_async_fn)]
    fn run_session(self: Arc<Self>, session: DeviceSession) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let me = self.config.id;
            let device = session.hello.device;
            let connected_at = match Box::pin(self.register(&session.hello)).await {
                Ok(at) => at,
                Err(err) => {
                    warn!(%device, peer = %session.peer, error = %err, "registering a device failed; closing its session");
                    // A fresh queue has room; the transport tells the device why.
                    let _ = session
                        .outbound
                        .try_send(ToDevice::Refused(Box::new(Refused::of(&err))));
                    return;
                }
            };
            // The session keeps only what it needs of the hello.
            let DeviceSession {
                hello,
                inbound,
                outbound,
                peer,
            } = session;
            let registered = Arc::new(Session {
                inner: Arc::downgrade(&self),
                id: self.next_session.fetch_add(1, Ordering::Relaxed),
                device,
                agent_type: hello.agent_type,
                labels: hello.labels,
                connected_at,
                slot: Mutex::new(Slot {
                    // This task runs it first.
                    run: Run::Running {
                        woken: false,
                        waker: None,
                    },
                    closing: false,
                    work: VecDeque::new(),
                    peer: Some(Peer {
                        capabilities: hello.capabilities,
                        inbound,
                        outbound,
                        current: None,
                        converging: None,
                        last_touch: tokio::time::Instant::now(),
                    }),
                    recorded: Recorded {
                        config_version: hello.config_version,
                        config_hash: hello.config_hash,
                        emission: None,
                    },
                }),
            });
            if let Some(Listed(previous)) = self.sessions().replace(Listed(Arc::clone(&registered))) {
                // The device reconnected here while its old session lingered.
                previous.close();
            }
            if self.told_to_disconnect(&device) {
                info!(%device, supervisor = %me, "device revoked while it registered; closing its session");
                registered.close();
            }
            if let Some(peer) = &registered.slot().peer {
                // A fresh queue has room; if the device is already gone the session notices.
                let _ = peer.outbound.try_send(ToDevice::Registered(Box::new(me)));
            }
            debug!(%device, %peer, supervisor = %me, "device registered");
            if let Err(err) = Box::pin(self.publish(device, EventKind::Connected { supervisor: me })).await {
                warn!(%device, error = %err, "publishing a connected event failed");
            }
            if let Some(push) = Box::pin(self.desired_push(&device, hello.config_hash)).await {
                if let Err(TrySendError::Full(_)) = registered.offer(Work::Converge(push)) {
                    warn!(%device, "the device's queue is full; not converging now");
                }
            }
            Box::pin(registered.drive()).await;
        }
    }

    /// After a session ended: finishes what it still had to do, and releases
    /// the device unless it registered again here meanwhile.
    async fn end_session(&self, device: DeviceId, id: u64, work: VecDeque<Work>, current: Option<Box<InFlight>>) {
        let me = self.config.id;
        let removed = {
            let mut sessions = self.sessions();
            match sessions.get(&device) {
                Some(listed) if listed.0.id == id => sessions.remove(&device),
                _ => false,
            }
        };
        // Whatever this session still had to do cannot reach the device through it any more.
        if let Some(flight) = current {
            self.finish(flight.job, CommandOutcome::DeviceOffline, None).await;
        }
        for work in work {
            if let Work::Command(job) = work {
                self.finish(*job, CommandOutcome::DeviceOffline, None).await;
            }
        }
        if removed {
            // Both fenced: if another supervisor holds the device now, neither touches its records.
            let released = self.store.release(&device, &me).await;
            let offline = self.store.mark_offline(&device, &me).await;
            if let Err(err) = released.and(offline) {
                warn!(%device, error = %err, "releasing a device failed");
            }
            if let Err(err) = self.publish(device, EventKind::Disconnected { supervisor: me }).await {
                warn!(%device, error = %err, "publishing a disconnected event failed");
            }
        }
    }

    /// Claims the device and marks it online here, conditional on the lease
    /// just claimed: of two supervisors registering it at once, the one whose
    /// claim came last writes the status, and the other fails here
    /// (`NotOwner`) and closes its session. Returns when the session began.
    async fn register(&self, hello: &DeviceHello) -> Result<Timestamp> {
        // Transports check too, to tell the device why; this holds for any transport.
        self.config.device_limits.check_hello(hello)?;
        let me = self.config.id;
        let device = hello.device;
        let claim = self.store.claim(&device, &me, self.config.lease_ttl).await?;
        // Read after the claim: a revocation written after this read finds
        // the device's lease here, so its disconnect comes here.
        let refused = match self.store.revocation(&device).await {
            Ok(None) => None,
            Ok(Some(revoked)) => Some(revoked.refusal()),
            Err(err) => Some(err),
        };
        if let Some(refused) = refused {
            if let Err(release) = self.store.release(&device, &me).await {
                warn!(%device, error = %release, "releasing a device not registered failed");
            }
            return Err(refused);
        }
        if let Claim::TakenOver { previous } = claim {
            info!(%device, from = %previous, to = %me, "device taken over");
            if let Err(err) = self
                .publish(device, EventKind::TakenOver { from: previous, to: me })
                .await
            {
                warn!(%device, error = %err, "publishing a takeover event failed");
            }
        }
        let now = self.clock.now();
        let mut patch = StatusPatch::new()
            .online(me, now)
            .last_seen(now)
            .labels(hello.labels.clone())
            .leased_by(me);
        patch.agent_type = hello.agent_type;
        patch.config_version = hello.config_version;
        patch.config_hash = hello.config_hash;
        if let Err(err) = self.store.update_status(&device, &patch).await {
            // Do not leave a lease pointing here for a device that is not
            // served here (fenced: a newer claim's lease stays).
            if let Err(release) = self.store.release(&device, &me).await {
                warn!(%device, error = %release, "releasing after a failed registration failed");
            }
            return Err(err);
        }
        Ok(now)
    }

    /// What to send a device for `command`, and the answer to expect; or,
    /// when it cannot be sent, its outcome.
    async fn message_for(&self, command: &Command) -> Result<(ToDevice, Expect), CommandOutcome> {
        let CommandKind::ApplyConfig { agent_type, version } = &command.kind else {
            let message = ToDevice::Command(Box::new(command.clone()));
            return Ok((message, Expect::CommandAck(command.correlation_id)));
        };
        let config = ConfigRef::new(*agent_type, *version);
        match self.store.template(&config).await {
            Ok(Some(template)) => {
                let push = ConfigPush::new(Some(command.correlation_id), config, template.bundle);
                let expect = Expect::ConfigAck {
                    config,
                    hash: push.hash,
                };
                Ok((ToDevice::ConfigPush(Arc::new(push)), expect))
            }
            Ok(None) => Err(CommandOutcome::Failed {
                reason: format!("config template {config} does not exist"),
            }),
            Err(err) => Err(CommandOutcome::Failed {
                reason: format!("loading config template {config} failed: {err}"),
            }),
        }
    }

    /// Ends the command's `record` with `outcome` (design §5.2, step 8),
    /// unless it is to be sent again (a first timeout, which the control plane
    /// retries on the event) or there is none (another producer's command).
    /// Returns whether the record has ended (by this call or before it).
    async fn record_outcome(&self, record: Option<CommandRecord>, outcome: &CommandOutcome) -> Result<bool> {
        let Some(mut record) = record else {
            return Ok(false);
        };
        if record.state.is_final() {
            return Ok(true);
        }
        if record.retries_on(outcome) {
            return Ok(false);
        }
        let now = self.clock.now();
        record.complete(outcome, now);
        if self.store.update_command(&record).await? {
            count_outcome(&record, now);
        }
        // Not updated: it ended meanwhile.
        Ok(true)
    }

    /// Records a command's outcome, publishes it, and only then acknowledges
    /// it on the bus. Writes the store or bus refuses for a while are tried
    /// again in place; one refused for good hands the delivery back, the
    /// outcome remembered so that it is recorded, not run again, when it
    /// comes back. Returns whether the device's status was written with
    /// what the outcome changed: not for outcomes that change nothing in it
    /// (the device offline, the command unsupported), not when another
    /// supervisor holds the device (the outcome is still recorded), nor when
    /// the write failed.
    async fn finish(&self, job: Job, outcome: CommandOutcome, applied: Option<ConfigHash>) -> bool {
        let me = self.config.id;
        let command = &job.command;
        let device = command.device;
        let patch = match (&command.kind, &outcome) {
            // Nothing reached the device: its status is not this command's to change.
            (CommandKind::Disconnect { .. }, _) => None,
            (CommandKind::SetEmission { state }, CommandOutcome::Acked) => {
                Some(StatusPatch::new().emission(*state).last_error(None))
            }
            (CommandKind::ApplyConfig { version, .. }, CommandOutcome::Acked) => {
                Some(StatusPatch::new().config(*version, applied).last_error(None))
            }
            (_, CommandOutcome::Acked) => Some(StatusPatch::new().last_error(None)),
            (_, CommandOutcome::Failed { reason }) => Some(StatusPatch::new().last_error(Some(reason.clone()))),
            (_, CommandOutcome::TimedOut) => Some(StatusPatch::new().last_error(Some(format!(
                "command {} ({}) timed out",
                command.correlation_id,
                command.kind.wire_name()
            )))),
            _ => None,
        };
        let writes_status = patch.is_some();
        let patch = patch.map(|patch| patch.last_seen(self.clock.now()).fenced_by(me));
        // The device's status is written and the command's record read at
        // once: one round trip's wait, not two.
        let status = async {
            match &patch {
                Some(patch) => {
                    self.persist("recording a device's status", || {
                        self.store.update_status(&device, patch)
                    })
                    .await
                }
                None => Ok(()),
            }
        };
        let record = self.persist("reading a command's record", || {
            self.store.command_record(&command.correlation_id)
        });
        let (status, record) = tokio::join!(status, record);
        let status_written = match status {
            Ok(()) => writes_status,
            // The outcome is still the command's: it is recorded below.
            Err(Error::NotOwner(_)) => {
                self.drop_stale(&device);
                false
            }
            // The store lost the device: written again, whole, with this outcome.
            Err(Error::NotFound { .. }) => self.status_lost(&device, patch.as_ref()).await,
            Err(err) => return self.hand_back(job, outcome, applied, err).await,
        };
        let recorded = match record {
            Ok(record) => self.record_outcome(record, &outcome).await,
            Err(err) => Err(err),
        };
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(err) => {
                self.hand_back(job, outcome, applied, err).await;
                return status_written;
            }
        };
        if !recorded || self.config.outcome_events == OutcomeEvents::All {
            let completed = EventKind::CommandCompleted {
                correlation_id: command.correlation_id,
                outcome: outcome.clone(),
            };
            let event = DeviceEvent::new(device, completed, self.clock.now());
            if let Err(err) = self
                .persist("publishing an outcome", || self.bus.publish_event(&event))
                .await
            {
                self.hand_back(job, outcome, applied, err).await;
                return status_written;
            }
        }
        debug!(%device, correlation_id = %command.correlation_id, outcome = outcome.name(), "command finished");
        if let Err(err) = job.acker.ack().await {
            warn!(%device, correlation_id = %command.correlation_id, error = %err, "acknowledging a command failed");
        }
        status_written
    }

    /// Ends a command's delivery whose outcome could not be recorded: hands
    /// it back to the bus, remembering the outcome so that the delivery that
    /// comes again records it instead of running the command again. When the
    /// supervisor is stopping it is left as it is, to come again to the next
    /// subscription. Returns false: no status was written.
    async fn hand_back(&self, job: Job, outcome: CommandOutcome, applied: Option<ConfigHash>, err: Error) -> bool {
        let command = &job.command;
        let (device, id) = (command.device, command.correlation_id);
        if self.is_stopping() {
            warn!(%device, correlation_id = %id, error = %err, "recording an outcome failed while stopping; it comes again to the next subscription");
            return false;
        }
        warn!(%device, correlation_id = %id, error = %err, "recording an outcome failed; handing the command back to the bus");
        {
            // Bounded: a delivery handed back too often is dead-lettered and
            // never comes to take its outcome out again.
            let mut unrecorded = lock(&self.unrecorded);
            if unrecorded.len() < MAX_UNRECORDED {
                unrecorded.insert(id, (outcome, applied));
            }
        }
        let reason = format!("recording the outcome of command {id} for device {device}: {err}");
        if let Err(err) = job.acker.nack(HAND_BACK_DELAY, reason).await {
            warn!(%device, correlation_id = %id, error = %err, "handing a command back failed");
        }
        false
    }

    /// Whether `command` ended already (run before a restart, or by another
    /// supervisor before a takeover): then it is not run again. Reading its
    /// record is tried again while the store is unavailable; an error that
    /// does not pass is returned.
    async fn has_ended(&self, command: &Command) -> Result<bool> {
        let record = self
            .persist("reading a command's record", || {
                self.store.command_record(&command.correlation_id)
            })
            .await?;
        Ok(record.is_some_and(|record| record.state.is_final()))
    }
}

/// A registered device's session.
///
/// Held by the sessions map and, while it is idle, by the waker its device's
/// inbound queue keeps; [`drive`](Self::drive) runs it. It is woken (as a
/// [`Waker`]) by a message from the device, a command or push offered to it,
/// or a close, and runs in a task only until it has nothing left to do.
struct Session {
    // Weak: the supervisor's map holds the session, and a session that
    // outlives the supervisor (in a transport's queue) must not keep it.
    inner: Weak<Inner>,
    /// Tells this session from a later one of the same device.
    id: u64,
    device: DeviceId,
    /// For selecting the device in broadcast config updates, and for writing
    /// its whole status again if the store loses it.
    agent_type: Option<AgentType>,
    labels: Labels,
    /// When it registered: its status's `connected_at`.
    connected_at: Timestamp,
    slot: Mutex<Slot>,
}

/// What a session's task shares with its wakers and the rest of the supervisor.
struct Slot {
    run: Run,
    /// The supervisor closed it: the device was taken over or reconnected, or
    /// the supervisor is stopping.
    closing: bool,
    /// Commands and pushes not started yet, at most `device_queue` of them.
    work: VecDeque<Work>,
    /// The session's own state, here while it is idle; its task holds it while it runs.
    peer: Option<Peer>,
    /// Here rather than in `peer`, so that the supervisor can write the
    /// device's whole status again while its task runs.
    recorded: Recorded,
}

/// What a session last recorded in its device's status that can change
/// while it runs. (The version is kept inline: nearly every device has one,
/// and a box would cost more than its 66 bytes.)
#[derive(Clone, Copy, Default)]
struct Recorded {
    /// The configuration the device runs, as far as this session knows.
    config_version: Option<ConfigVersion>,
    config_hash: Option<ConfigHash>,
    /// Whether the device emits: a report that repeats it (as an agent's
    /// does after a toggle) changes nothing.
    emission: Option<bool>,
}

/// A session in the supervisor's map, found by its device id: the id is kept
/// once, in the session, not again as the map's key.
struct Listed(Arc<Session>);

impl Borrow<DeviceId> for Listed {
    fn borrow(&self) -> &DeviceId {
        &self.0.device
    }
}

impl Hash for Listed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As the id itself hashes, which `Borrow` requires.
        self.0.device.hash(state);
    }
}

impl PartialEq for Listed {
    fn eq(&self, other: &Self) -> bool {
        self.0.device == other.0.device
    }
}

impl Eq for Listed {}

/// Whether a task runs the session.
enum Run {
    /// No task: the next wake spawns one.
    Idle,
    /// A task runs it. `woken`: something happened since it last looked;
    /// `waker`: the task's, while it waits for the answer to a command.
    Running { woken: bool, waker: Option<Waker> },
    /// The session is over.
    Ended,
}

/// What happens next in a session.
enum Next {
    Message(FromDevice),
    Work(Work),
    /// The command in flight is past its deadline.
    Overdue,
    /// Nothing, for now.
    Nothing,
    Ended(&'static str),
    /// The supervisor was dropped: stop without a word, as a crash would.
    Abandoned,
}

impl Wake for Session {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut slot = lock(&self.slot);
        match &mut slot.run {
            Run::Idle => {
                let Some(inner) = self.inner.upgrade() else {
                    // The supervisor is gone.
                    slot.run = Run::Ended;
                    return;
                };
                slot.run = Run::Running {
                    woken: false,
                    waker: None,
                };
                drop(slot);
                inner.spawn_session(Arc::clone(self));
            }
            Run::Running { woken, waker } => {
                *woken = true;
                let waker = waker.take();
                drop(slot);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Run::Ended => {}
        }
    }
}

impl Session {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        lock(&self.slot)
    }

    fn recorded(&self) -> Recorded {
        self.slot().recorded
    }

    fn record_config(&self, version: ConfigVersion, hash: ConfigHash) {
        let recorded = &mut self.slot().recorded;
        recorded.config_version = Some(version);
        recorded.config_hash = Some(hash);
    }

    fn record_emission(&self, emission: Option<bool>) {
        if let Some(emission) = emission {
            self.slot().recorded.emission = Some(emission);
        }
    }

    /// The device's whole status as this session knows it, online here since
    /// it registered and seen `now`, with the fields `extra` sets over it.
    fn whole_status(&self, me: SupervisorId, now: Timestamp, extra: Option<&StatusPatch>) -> StatusPatch {
        let recorded = self.recorded();
        let mut patch = StatusPatch::new()
            .online(me, self.connected_at)
            .last_seen(now)
            .labels(self.labels.clone());
        patch.agent_type = self.agent_type;
        patch.config_version = recorded.config_version;
        patch.config_hash = recorded.config_hash;
        patch.emission = recorded.emission;
        if let Some(extra) = extra {
            patch.emission = extra.emission.or(patch.emission);
            patch.config_version = extra.config_version.or(patch.config_version);
            patch.config_hash = extra.config_hash.or(patch.config_hash);
            patch.last_seen = extra.last_seen.or(patch.last_seen);
            patch.last_error.clone_from(&extra.last_error);
        }
        patch
    }

    /// Queues a command or push; hands it back if the queue is full or the session is over.
    fn offer(self: &Arc<Self>, work: Work) -> Result<(), TrySendError<Work>> {
        let Some(inner) = self.inner.upgrade() else {
            return Err(TrySendError::Closed(work));
        };
        let mut slot = self.slot();
        if slot.closing || matches!(slot.run, Run::Ended) {
            return Err(TrySendError::Closed(work));
        }
        if slot.work.len() >= inner.config.device_queue {
            return Err(TrySendError::Full(work));
        }
        slot.work.push_back(work);
        drop(slot);
        self.wake_by_ref();
        Ok(())
    }

    /// Ends the session: its device is disconnected, what it had queued finishes as `device_offline`.
    fn close(self: &Arc<Self>) {
        self.slot().closing = true;
        self.wake_by_ref();
    }

    /// Ends the session at once, as a crash would: its device is
    /// disconnected, nothing is recorded, commands stay unacknowledged on the bus.
    fn abandon(&self) {
        let mut slot = self.slot();
        slot.run = Run::Ended;
        let peer = slot.peer.take();
        let work = std::mem::take(&mut slot.work);
        drop(slot);
        drop((peer, work));
    }

    /// Runs the session until it has nothing to do (its state goes back into
    /// the slot) or it ends (its device is released).
    async fn drive(self: Arc<Self>) {
        // The supervisor is gone, or it was dropped and `abandon` took the state.
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let Some(peer) = self.slot().peer.take() else {
            return;
        };
        let waker = Waker::from(Arc::clone(&self));
        let mut runner = Runner {
            inner,
            session: self,
            peer,
        };
        let why = loop {
            match runner.next(&waker) {
                Next::Message(message) => Box::pin(runner.on_message(message)).await,
                Next::Work(Work::Command(job)) => Box::pin(runner.start(*job)).await,
                Next::Work(Work::Converge(push)) => runner.converge(push),
                Next::Overdue => {
                    if let Some(flight) = runner.peer.current.take() {
                        Box::pin(runner.inner.finish(flight.job, CommandOutcome::TimedOut, None)).await;
                    }
                }
                Next::Nothing => match runner.peer.current.as_ref().map(|flight| flight.deadline) {
                    // A command awaits its answer: wait here for it, or for its deadline.
                    Some(deadline) => {
                        tokio::select! {
                            _ = runner.session.woken() => {}
                            _ = Box::pin(tokio::time::sleep_until(deadline)) => {}
                        }
                    }
                    None => match runner.idle() {
                        Some(woken) => runner = woken,
                        None => return,
                    },
                },
                Next::Ended(why) => break why,
                Next::Abandoned => return,
            }
            // A device that sends without pause must not keep a worker thread to itself.
            tokio::task::consume_budget().await;
        };
        let Runner {
            inner,
            session,
            mut peer,
        } = runner;
        let work = {
            let mut slot = session.slot();
            slot.run = Run::Ended;
            std::mem::take(&mut slot.work)
        };
        let current = peer.current.take();
        Box::pin(inner.end_session(session.device, session.id, work, current)).await;
        debug!(device = %session.device, supervisor = %inner.config.id, reason = why, "session ended");
        // The device stays connected until its release is recorded.
        drop(peer);
    }

    /// Waits until the session is woken.
    fn woken(&self) -> impl std::future::Future<Output = ()> + '_ {
        poll_fn(|cx: &mut Context<'_>| {
            let mut slot = self.slot();
            match &mut slot.run {
                Run::Running { woken: false, waker } => {
                    match waker {
                        Some(waker) => waker.clone_from(cx.waker()),
                        None => *waker = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        })
    }
}

/// What a session keeps of its device once it is registered.
struct Peer {
    capabilities: Capabilities,
    inbound: Box<dyn Inbound<FromDevice>>,
    outbound: Outbound<ToDevice>,
    // Boxed, like `converging`: a session spends most of its life idle.
    current: Option<Box<InFlight>>,
    /// A configuration pushed to converge the device, not for a command, awaiting its ack.
    converging: Option<Box<(ConfigRef, ConfigHash)>>,
    last_touch: tokio::time::Instant,
}

/// A session while its task runs it.
struct Runner {
    inner: Arc<Inner>,
    session: Arc<Session>,
    peer: Peer,
}

impl Runner {
    /// What to do next, in this order: end if closed, read the device's
    /// messages, time out the command in flight, start the next command.
    /// Whatever it polls and finds empty wakes the session when it is not.
    fn next(&mut self, waker: &Waker) -> Next {
        {
            let mut slot = self.session.slot();
            match &mut slot.run {
                Run::Running { woken, waker } => {
                    // Looking now: what happens from here on wakes it again.
                    *woken = false;
                    *waker = None;
                }
                Run::Ended => return Next::Abandoned,
                Run::Idle => {}
            }
            if slot.closing {
                return Next::Ended("closed by the supervisor");
            }
        }
        match self.peer.inbound.poll_recv(&mut Context::from_waker(waker)) {
            Poll::Ready(Ok(Some(message))) => return Next::Message(message),
            Poll::Ready(Ok(None)) => return Next::Ended("the device disconnected"),
            Poll::Ready(Err(err)) => {
                warn!(device = %self.session.device, error = %err, "device sent bad input; closing its session");
                return Next::Ended("bad input");
            }
            Poll::Pending => {}
        }
        match &self.peer.current {
            Some(flight) if flight.deadline <= tokio::time::Instant::now() => Next::Overdue,
            Some(_) => Next::Nothing,
            None => self.session.slot().work.pop_front().map_or(Next::Nothing, Next::Work),
        }
    }

    /// Puts the session's state back in its slot so that the task can end;
    /// hands the runner back instead if it was woken since it last looked.
    fn idle(self) -> Option<Runner> {
        let mut slot = self.session.slot();
        match slot.run {
            Run::Running { woken: true, .. } => {
                drop(slot);
                Some(self)
            }
            // Abandoned meanwhile: the state goes with the task.
            Run::Ended => {
                drop(slot);
                drop(self);
                None
            }
            Run::Running { woken: false, .. } | Run::Idle => {
                slot.run = Run::Idle;
                slot.peer = Some(self.peer);
                None
            }
        }
    }

    async fn start(&mut self, job: Job) {
        let inner = Arc::clone(&self.inner);
        let command = &job.command;
        let missing = self.missing_capability(&command.kind);
        // Whether it ended already, and what to send, are read at once.
        let (ended, message) = tokio::join!(inner.has_ended(command), async {
            match missing {
                None => Ok(inner.message_for(command).await),
                Some(missing) => Err(missing),
            }
        });
        match ended {
            Ok(false) => {}
            Ok(true) => {
                debug!(device = %command.device, correlation_id = %command.correlation_id, "the command ended already; not running it again");
                if let Err(err) = job.acker.ack().await {
                    warn!(device = %command.device, error = %err, "acknowledging a command failed");
                }
                return;
            }
            // Stopping: it comes again to the next subscription.
            Err(_) if inner.is_stopping() => return,
            Err(err) => {
                // Whether it ran cannot be told: not run now, it comes again.
                let reason = format!("reading the record of command {}: {err}", command.correlation_id);
                warn!(device = %command.device, error = %err, "cannot tell whether a command ran; handing it back");
                if let Err(err) = job.acker.nack(HAND_BACK_DELAY, reason).await {
                    warn!(device = %command.device, error = %err, "handing a command back failed");
                }
                return;
            }
        }
        let now = inner.clock.now();
        let margin = (command.deadline.duration_since(command.issued_at) / 5).min(START_MARGIN);
        let refused = if command.deadline <= now.saturating_add(margin) {
            CommandOutcome::TimedOut
        } else {
            match message {
                Err(missing) => CommandOutcome::Unsupported {
                    reason: format!("device {} does not accept {missing}", command.device),
                },
                // A configuration the device runs already is not pushed again.
                Ok(Ok((_, Expect::ConfigAck { hash, .. }))) if self.session.recorded().config_hash == Some(hash) => {
                    inner.finish(job, CommandOutcome::Acked, Some(hash)).await;
                    return;
                }
                Ok(Ok((message, expect))) => match self.peer.outbound.try_send(message) {
                    Ok(()) => {
                        let deadline = tokio::time::Instant::now() + command.deadline.duration_since(now);
                        self.peer.current = Some(Box::new(InFlight { job, expect, deadline }));
                        return;
                    }
                    Err(TrySendError::Full(_)) => CommandOutcome::Failed {
                        reason: format!("the send queue of device {} is full", command.device),
                    },
                    Err(TrySendError::Closed(_)) => CommandOutcome::DeviceOffline,
                },
                Ok(Err(outcome)) => outcome,
            }
        };
        inner.finish(job, refused, None).await;
    }

    /// Pushes `push` unless the device runs it already or is being sent it.
    fn converge(&mut self, push: Arc<ConfigPush>) {
        let device = self.session.device;
        let pending = self.peer.converging.as_deref().map(|(_, hash)| *hash);
        if self.session.recorded().config_hash == Some(push.hash) || pending == Some(push.hash) {
            return;
        }
        if !self.peer.capabilities.remote_config {
            debug!(%device, config = %push.config, "the device does not accept remote configuration; not converging");
            return;
        }
        let target = (push.config, push.hash);
        match self.peer.outbound.try_send(ToDevice::ConfigPush(push)) {
            Ok(()) => {
                debug!(%device, config = %target.0, "pushing the desired config");
                self.peer.converging = Some(Box::new(target));
            }
            Err(_) => warn!(%device, config = %target.0, "the device's send queue is full; not converging now"),
        }
    }

    /// Records the answer to a push made to converge the device.
    async fn converged(&mut self, ack: &crate::transport::ConfigAck) {
        let inner = Arc::clone(&self.inner);
        let device = self.session.device;
        let patch = match (self.peer.converging.as_deref().copied(), ack.state) {
            (Some((config, hash)), ConfigApplyState::Applied) if hash == ack.hash => {
                self.session.record_config(config.version, hash);
                StatusPatch::new().config(config.version, Some(hash)).last_error(None)
            }
            (Some((config, hash)), ConfigApplyState::Failed) if hash == ack.hash => {
                StatusPatch::new().last_error(Some(format!(
                    "applying {config}: {}",
                    ack.error.as_deref().unwrap_or("the device did not say why")
                )))
            }
            _ => return,
        };
        self.peer.converging = None;
        let patch = patch.last_seen(inner.clock.now()).fenced_by(inner.config.id);
        match inner.store.update_status(&device, &patch).await {
            Ok(()) => {}
            Err(Error::NotOwner(_)) => inner.drop_stale(&device),
            Err(Error::NotFound { .. }) => {
                inner.status_lost(&device, Some(&patch)).await;
            }
            Err(err) => warn!(%device, error = %err, "recording a config ack failed"),
        }
    }

    fn missing_capability(&self, kind: &CommandKind) -> Option<String> {
        let caps = &self.peer.capabilities;
        match kind {
            CommandKind::SetEmission { .. } if !caps.emission => Some("toggle_emission".into()),
            CommandKind::ApplyConfig { .. } if !caps.remote_config => Some("remote configuration".into()),
            CommandKind::Restart if !caps.restart => Some("restart".into()),
            CommandKind::Custom { capability, .. } if !caps.custom.contains(capability) => {
                Some(format!("custom capability {capability:?}"))
            }
            _ => None,
        }
    }

    async fn on_message(&mut self, mut message: FromDevice) {
        let inner = Arc::clone(&self.inner);
        let device = self.session.device;
        // Free text from the device is stored and published: bounded first.
        let limits = &inner.config.device_limits;
        match &mut message {
            FromDevice::CommandAck(ack) => match &mut ack.outcome {
                CommandOutcome::Failed { reason } | CommandOutcome::Unsupported { reason } => limits.cut_error(reason),
                _ => {}
            },
            FromDevice::ConfigAck(ack) => limits.cut_optional_error(&mut ack.error),
            FromDevice::Status(report) => limits.cut_optional_error(&mut report.last_error),
            _ => {}
        }
        match message {
            FromDevice::CommandAck(ack) => match self.peer.current.as_deref() {
                Some(InFlight {
                    expect: Expect::CommandAck(id),
                    ..
                }) if *id == ack.correlation_id => {
                    let outcome = match ack.outcome {
                        // A device can only say whether it did it; the rest is the supervisor's to judge.
                        CommandOutcome::TimedOut | CommandOutcome::DeviceOffline => CommandOutcome::Failed {
                            reason: format!("device answered {}", ack.outcome.name()),
                        },
                        other => other,
                    };
                    if let Some(flight) = self.peer.current.take() {
                        let emission = match (&flight.job.command.kind, &outcome) {
                            (CommandKind::SetEmission { state }, CommandOutcome::Acked) => Some(*state),
                            _ => None,
                        };
                        if inner.finish(flight.job, outcome, None).await {
                            // Recorded with `last_seen`, as a heartbeat would be.
                            self.peer.last_touch = tokio::time::Instant::now();
                            self.session.record_emission(emission);
                        }
                    }
                }
                _ => {
                    debug!(%device, correlation_id = %ack.correlation_id, "ignoring an answer to no command in flight")
                }
            },
            FromDevice::ConfigAck(ack) => {
                let matches = matches!(
                    self.peer.current.as_deref(),
                    Some(InFlight { expect: Expect::ConfigAck { hash, .. }, .. }) if *hash == ack.hash
                );
                let event = EventKind::ConfigAck {
                    hash: ack.hash,
                    state: ack.state,
                    error: ack.error.clone(),
                };
                if let Err(err) = inner.publish(device, event).await {
                    warn!(%device, error = %err, "publishing a config ack failed");
                }
                if !matches {
                    return self.converged(&ack).await;
                }
                if ack.state == ConfigApplyState::Applying {
                    return;
                }
                if ack.state == ConfigApplyState::Applied {
                    if let Some(InFlight {
                        expect: Expect::ConfigAck { config, hash },
                        ..
                    }) = self.peer.current.as_deref()
                    {
                        self.session.record_config(config.version, *hash);
                    }
                }
                if let Some(flight) = self.peer.current.take() {
                    let outcome = match ack.state {
                        ConfigApplyState::Applied => CommandOutcome::Acked,
                        _ => CommandOutcome::Failed {
                            reason: ack.error.unwrap_or_else(|| "the device did not say why".into()),
                        },
                    };
                    if let Expect::ConfigAck { config, .. } = &flight.expect {
                        debug!(%device, %config, outcome = outcome.name(), "config push answered");
                    }
                    inner.finish(flight.job, outcome, Some(ack.hash)).await;
                }
            }
            FromDevice::Status(report) => self.on_status(report).await,
            FromDevice::Heartbeat => self.touch().await,
        }
    }

    /// Records a status report and announces a change of emission. A report
    /// that tells nothing new (what the session last recorded, no error) is
    /// only a sign of life, recorded as a heartbeat is.
    async fn on_status(&mut self, report: StatusReport) {
        let recorded = self.session.recorded().emission;
        let changed = report.emission.filter(|emission| recorded != Some(*emission));
        if changed.is_none() && report.last_error.is_none() {
            return self.touch().await;
        }
        let inner = Arc::clone(&self.inner);
        let device = self.session.device;
        let mut patch = StatusPatch::new()
            .last_seen(inner.clock.now())
            .fenced_by(inner.config.id);
        patch.emission = report.emission;
        if let Some(error) = report.last_error {
            patch.last_error = Some(Some(error));
        }
        let written = match inner.store.update_status(&device, &patch).await {
            Ok(()) => true,
            Err(Error::NotOwner(_)) => {
                inner.drop_stale(&device);
                false
            }
            Err(Error::NotFound { .. }) => inner.status_lost(&device, Some(&patch)).await,
            Err(err) => {
                warn!(%device, error = %err, "recording a status report failed");
                false
            }
        };
        if written {
            self.session.record_emission(report.emission);
        }
        if changed.is_some() {
            let changed = EventKind::StatusChanged {
                emission: changed,
                config_version: None,
            };
            if let Err(err) = inner.publish(device, changed).await {
                warn!(%device, error = %err, "publishing a status change failed");
            }
        }
        self.peer.last_touch = tokio::time::Instant::now();
    }

    /// Records `last_seen`, at most once per tenth of the lease TTL: heartbeats
    /// from 20,000 devices must not become 20,000 store writes each.
    async fn touch(&mut self) {
        let inner = Arc::clone(&self.inner);
        if self.peer.last_touch.elapsed() < inner.config.lease_ttl / 10 {
            return;
        }
        self.peer.last_touch = tokio::time::Instant::now();
        let device = self.session.device;
        let patch = StatusPatch::new()
            .last_seen(inner.clock.now())
            .fenced_by(inner.config.id);
        match inner.store.update_status(&device, &patch).await {
            Ok(()) => {}
            Err(Error::NotOwner(_)) => inner.drop_stale(&device),
            Err(Error::NotFound { .. }) => {
                inner.status_lost(&device, Some(&patch)).await;
            }
            Err(err) => warn!(%device, error = %err, "recording a heartbeat failed"),
        }
    }
}

/// Waits until the supervisor is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across other awaits: it is not `Send`.
    let _ = stopping.wait_for(|stopping| *stopping).await.map(drop);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_named() {
        let id = SupervisorId::new("s1").unwrap();
        assert!(SupervisorConfig::new(id).validate().is_ok());
        let err = SupervisorConfig::new(id)
            .device_queue(0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("device_queue must be between 1 and"), "{err}");
        let err = SupervisorConfig::new(id)
            .max_in_flight(usize::MAX)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_in_flight"), "{err}");
        let err = SupervisorConfig::new(id)
            .lease_ttl(Duration::ZERO)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("lease TTL"), "{err}");
    }

    #[test]
    fn an_idle_session_stays_small() {
        // A supervisor keeps one per device: 376 B before it kept the config
        // version to write the status again after store loss (issue #23).
        let size = std::mem::size_of::<Session>();
        assert!(size <= 440, "a session is {size} B");
    }

    #[test]
    fn outcome_events_are_spelled_the_same_in_files_and_flags() {
        let config: SupervisorConfig = serde_json::from_str(r#"{"id": "s1", "outcome_events": "unrecorded"}"#).unwrap();
        assert_eq!(config.outcome_events, OutcomeEvents::Unrecorded);
        let config: SupervisorConfig = serde_json::from_str(r#"{"id": "s1"}"#).unwrap();
        assert_eq!(config.outcome_events, OutcomeEvents::All);
        for events in [OutcomeEvents::All, OutcomeEvents::Unrecorded] {
            assert_eq!(events.to_string().parse::<OutcomeEvents>().unwrap(), events);
        }
        let err = "none".parse::<OutcomeEvents>().unwrap_err().to_string();
        assert!(err.contains("\"none\": expected all or unrecorded"), "{err}");
    }
}
