//! The device agent runtime: connects, registers, answers commands, applies configuration.
//!
//! An [`Agent`] keeps one session with a supervisor through an
//! [`AgentConnector`], reconnecting with exponential backoff and jitter when it
//! ends. It sends heartbeats, answers `toggle_emission` and `restart`, and
//! hands configuration pushes to a [`ConfigApplier`], acknowledging each with
//! the outcome.
//!
//! Deliveries are at-least-once: a command whose acknowledgement was lost with
//! its supervisor is sent again, through the device's new supervisor, under
//! the same correlation id. The agent carries out each command once: it
//! remembers the answers to its last [`REMEMBERED_ANSWERS`] commands and
//! answers a repeat with the same outcome, and it acknowledges a push of the
//! configuration it already runs (same content hash) without applying it again.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::command::{CommandKind, CommandOutcome, CorrelationId};
use crate::config::{ConfigHash, ConfigRef};
use crate::event::ConfigApplyState;
use crate::time::duration_text;
use crate::transport::{
    AgentConnector, AgentSession, CommandAck, ConfigAck, ConfigPush, DeviceHello, FromDevice, StatusReport, ToDevice,
};

/// Applies configuration pushed to a device.
///
/// ```
/// use async_trait::async_trait;
/// use opamp_core::runtime::agent::{AppliedConfig, ConfigApplier};
/// use opamp_core::transport::ConfigPush;
///
/// /// Accepts every configuration and remembers nothing.
/// #[derive(Debug)]
/// struct Accepting;
///
/// #[async_trait]
/// impl ConfigApplier for Accepting {
///     async fn apply(&self, _push: &ConfigPush) -> Result<(), String> {
///         Ok(())
///     }
///     fn current(&self) -> Option<AppliedConfig> {
///         None
///     }
/// }
/// ```
#[async_trait]
pub trait ConfigApplier: Send + Sync + Debug + 'static {
    /// Applies `push`. On failure the previous configuration must still (or
    /// again) be in effect, and the error says why it failed.
    async fn apply(&self, push: &ConfigPush) -> std::result::Result<(), String>;

    /// The configuration in effect now, reported when the agent registers.
    fn current(&self) -> Option<AppliedConfig>;
}

/// A configuration an agent has applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedConfig {
    /// Which template version.
    pub config: ConfigRef,
    /// Its content hash.
    pub hash: ConfigHash,
}

/// A [`ConfigApplier`] that keeps the configuration in memory: for simulated
/// devices and tests. It can be told to reject what it is sent.
#[derive(Debug, Default)]
pub struct MemoryApplier {
    state: Mutex<MemoryApplierState>,
}

#[derive(Debug, Default)]
struct MemoryApplierState {
    current: Option<AppliedConfig>,
    rejecting: Option<String>,
    applied: usize,
}

impl MemoryApplier {
    /// An applier with no configuration that accepts everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, rejects every push with `reason` (`None` accepts again).
    pub fn reject_with(&self, reason: Option<String>) {
        self.lock().rejecting = reason;
    }

    /// How many pushes it has applied.
    pub fn applied_count(&self) -> usize {
        self.lock().applied
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryApplierState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl ConfigApplier for MemoryApplier {
    async fn apply(&self, push: &ConfigPush) -> std::result::Result<(), String> {
        let mut state = self.lock();
        if let Some(reason) = &state.rejecting {
            return Err(reason.clone());
        }
        state.current = Some(AppliedConfig {
            config: push.config,
            hash: push.hash,
        });
        state.applied += 1;
        Ok(())
    }

    fn current(&self) -> Option<AppliedConfig> {
        self.lock().current
    }
}

/// How an agent runs.
///
/// Reads from configuration files: only `hello.device` is required;
/// durations are written like `30s` or `100ms`.
///
/// ```
/// use opamp_core::runtime::agent::AgentConfig;
///
/// let config: AgentConfig = serde_json::from_str(r#"{"hello": {"device": "device-5"}, "heartbeat_interval": "10s"}"#)?;
/// assert_eq!(config.heartbeat_interval.as_secs(), 10);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AgentConfig {
    /// Who the device is and what it can do; the configuration it reports is
    /// filled in from the applier at every connect.
    pub hello: DeviceHello,
    /// How often to send a heartbeat.
    #[serde(default = "defaults::heartbeat_interval", with = "duration_text")]
    pub heartbeat_interval: Duration,
    /// The first reconnect delay.
    #[serde(default = "defaults::backoff_min", with = "duration_text")]
    pub backoff_min: Duration,
    /// The longest reconnect delay.
    #[serde(default = "defaults::backoff_max", with = "duration_text")]
    pub backoff_max: Duration,
}

mod defaults {
    use std::time::Duration;

    pub(super) fn heartbeat_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn backoff_min() -> Duration {
        Duration::from_millis(100)
    }
    pub(super) fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
}

impl AgentConfig {
    /// Heartbeats every 30 s; reconnects after 100 ms, doubling up to 30 s, with jitter.
    pub fn new(hello: DeviceHello) -> Self {
        AgentConfig {
            hello,
            heartbeat_interval: defaults::heartbeat_interval(),
            backoff_min: defaults::backoff_min(),
            backoff_max: defaults::backoff_max(),
        }
    }

    /// With another heartbeat interval.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// With other reconnect delays.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }
}

/// A device agent.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use opamp_core::runtime::agent::{Agent, AgentConfig, MemoryApplier};
/// use opamp_core::transport::{channel, Capabilities, DeviceHello};
/// use opamp_core::DeviceId;
///
/// let (_transport, connector) = channel::pair(channel::ChannelConfig::default());
/// let mut hello = DeviceHello::new(DeviceId::new("device-5").unwrap());
/// hello.capabilities = Capabilities::all_builtin();
/// let agent = Agent::new(AgentConfig::new(hello), Arc::new(connector), Arc::new(MemoryApplier::new()));
/// assert!(!*agent.emission().borrow());
/// // agent.run(shutdown_signal).await keeps it connected until the signal.
/// # }
/// ```
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    connector: Arc<dyn AgentConnector>,
    applier: Arc<dyn ConfigApplier>,
    emission: watch::Sender<bool>,
    connected: watch::Sender<bool>,
    answered: Answered,
}

/// How many command answers an agent remembers to recognise a repeated delivery.
pub const REMEMBERED_ANSWERS: usize = 64;

/// The answers to the agent's last commands, so a repeat is answered, not carried out again.
#[derive(Debug, Default)]
struct Answered {
    recent: Mutex<VecDeque<(CorrelationId, CommandOutcome)>>,
    repeats: AtomicU64,
}

impl Answered {
    /// The answer already given to `id`, if it is recent; counts the repeat.
    fn repeat(&self, id: CorrelationId) -> Option<CommandOutcome> {
        let recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = recent
            .iter()
            .find(|(seen, _)| *seen == id)
            .map(|(_, outcome)| outcome.clone())?;
        self.repeats.fetch_add(1, Ordering::Relaxed);
        Some(outcome)
    }

    fn remember(&self, id: CorrelationId, outcome: &CommandOutcome) {
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent.len() == REMEMBERED_ANSWERS {
            recent.pop_front();
        }
        recent.push_back((id, outcome.clone()));
    }
}

/// Why a session ended.
enum SessionEnd {
    Shutdown,
    Restart,
    /// `refused` when the device was refused: its credential, or the device itself (revoked),
    /// which retrying will not mend: worth an operator's attention.
    Lost {
        why: String,
        refused: bool,
    },
}

impl SessionEnd {
    fn lost(err: &crate::Error) -> Self {
        SessionEnd::Lost {
            why: err.to_string(),
            refused: matches!(err, crate::Error::Unauthenticated { .. }),
        }
    }

    fn closed() -> Self {
        SessionEnd::Lost {
            why: "the supervisor closed the session".into(),
            refused: false,
        }
    }
}

impl Agent {
    /// An agent connecting through `connector` and applying configuration with `applier`.
    pub fn new(config: AgentConfig, connector: Arc<dyn AgentConnector>, applier: Arc<dyn ConfigApplier>) -> Self {
        Agent {
            config,
            connector,
            applier,
            emission: watch::Sender::new(false),
            connected: watch::Sender::new(false),
            answered: Answered::default(),
        }
    }

    /// How many deliveries this agent recognised as repeats (a command it had
    /// already answered, a configuration it already ran) and answered without
    /// acting again.
    pub fn repeats_answered(&self) -> u64 {
        self.answered.repeats.load(Ordering::Relaxed)
    }

    /// Whether the device emits telemetry; changes when a command says so.
    pub fn emission(&self) -> watch::Receiver<bool> {
        self.emission.subscribe()
    }

    /// Whether the agent has a session with a supervisor now.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Keeps the agent connected until `shutdown` completes.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let device = self.config.hello.device;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut jitter = Jitter::seeded(device.as_str());
        let mut failures: u32 = 0;
        loop {
            let registered = AtomicBool::new(false);
            let end = tokio::select! {
                end = self.connect_and_serve(&registered) => end,
                _ = &mut shutdown => SessionEnd::Shutdown,
            };
            if registered.load(Ordering::Relaxed) {
                // A session that got as far as registering was a success: the
                // backoff starts over. One refused at registration (a revoked
                // device, say) backs off further each time.
                failures = 0;
            }
            self.connected.send_replace(false);
            let delay = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Restart => {
                    info!(%device, "restarting the session as asked");
                    failures = 0;
                    self.config.backoff_min
                }
                SessionEnd::Lost { why, refused } => {
                    failures = failures.saturating_add(1);
                    let exp = self
                        .config
                        .backoff_min
                        .saturating_mul(1 << failures.min(20).saturating_sub(1));
                    let delay = jitter.spread(exp.min(self.config.backoff_max));
                    if refused {
                        warn!(%device, reason = %why, ?delay, "the device was refused (its credential, or the device itself); retrying");
                    } else {
                        debug!(%device, reason = %why, ?delay, "session lost; reconnecting");
                    }
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    async fn connect_and_serve(&self, registered: &AtomicBool) -> SessionEnd {
        let mut hello = self.config.hello.clone();
        if let Some(applied) = self.applier.current() {
            hello.agent_type = Some(applied.config.agent_type);
            hello.config_version = Some(applied.config.version);
            hello.config_hash = Some(applied.hash);
        }
        let session = match self.connector.connect(&hello).await {
            Ok(session) => session,
            Err(err) => return SessionEnd::lost(&err),
        };
        self.connected.send_replace(true);
        self.serve(session, registered).await
    }

    async fn serve(&self, mut session: AgentSession, registered: &AtomicBool) -> SessionEnd {
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                message = session.inbound.recv() => match message {
                    Ok(Some(message)) => {
                        if matches!(message, ToDevice::Registered(_)) {
                            registered.store(true, Ordering::Relaxed);
                        }
                        let (answer, end) = self.handle(message).await;
                        for reply in answer {
                            if session.outbound.send(reply).await.is_err() {
                                return SessionEnd::closed();
                            }
                        }
                        if let Some(end) = end {
                            return end;
                        }
                    }
                    Ok(None) => return SessionEnd::closed(),
                    Err(err) => return SessionEnd::lost(&err),
                },
                _ = heartbeat.tick() => {
                    if session.outbound.send(FromDevice::Heartbeat).await.is_err() {
                        return SessionEnd::closed();
                    }
                }
            }
        }
    }

    /// What to answer `message` with, and whether the session ends after.
    async fn handle(&self, message: ToDevice) -> (Vec<FromDevice>, Option<SessionEnd>) {
        let device = self.config.hello.device;
        match message {
            ToDevice::Command(command) => {
                if let Some(outcome) = self.answered.repeat(command.correlation_id) {
                    debug!(%device, correlation_id = %command.correlation_id, "a repeated command: answered again, not carried out");
                    return (
                        vec![FromDevice::CommandAck(CommandAck::new(command.correlation_id, outcome))],
                        None,
                    );
                }
                let caps = &self.config.hello.capabilities;
                let (outcome, end) = match &command.kind {
                    CommandKind::SetEmission { state } if caps.emission => {
                        self.emission.send_replace(*state);
                        info!(%device, emission = state, "emission set");
                        (CommandOutcome::Acked, None)
                    }
                    CommandKind::Restart if caps.restart => (CommandOutcome::Acked, Some(SessionEnd::Restart)),
                    other => (
                        CommandOutcome::Unsupported {
                            reason: format!("this agent does not handle {}", other.wire_name()),
                        },
                        None,
                    ),
                };
                self.answered.remember(command.correlation_id, &outcome);
                let ack = FromDevice::CommandAck(CommandAck::new(command.correlation_id, outcome));
                let mut answers = vec![ack];
                if let (CommandKind::SetEmission { .. }, None) = (&command.kind, &end) {
                    answers.push(FromDevice::Status(StatusReport {
                        emission: Some(*self.emission.borrow()),
                        ..StatusReport::default()
                    }));
                }
                (answers, end)
            }
            ToDevice::Registered(supervisor) => {
                debug!(%device, %supervisor, "registered");
                (Vec::new(), None)
            }
            ToDevice::Refused(refused) => {
                let end = SessionEnd::Lost {
                    why: format!("not registered: {}", refused.reason),
                    refused: refused.denied,
                };
                (Vec::new(), Some(end))
            }
            ToDevice::ConfigPush(push) => {
                let ack = |state, error| {
                    FromDevice::ConfigAck(Box::new(ConfigAck::new(push.correlation_id, push.hash, state, error)))
                };
                if !self.config.hello.capabilities.remote_config {
                    let reason = "this agent does not accept remote configuration".to_owned();
                    return (vec![ack(ConfigApplyState::Failed, Some(reason))], None);
                }
                if self.applier.current().is_some_and(|running| running.hash == push.hash) {
                    self.answered.repeats.fetch_add(1, Ordering::Relaxed);
                    debug!(%device, config = %push.config, hash = %push.hash, "already running this configuration");
                    return (vec![ack(ConfigApplyState::Applied, None)], None);
                }
                match self.applier.apply(&push).await {
                    Ok(()) => {
                        info!(%device, config = %push.config, hash = %push.hash, "config applied");
                        (vec![ack(ConfigApplyState::Applied, None)], None)
                    }
                    Err(reason) => {
                        warn!(%device, config = %push.config, %reason, "config rejected");
                        (vec![ack(ConfigApplyState::Failed, Some(reason))], None)
                    }
                }
            }
        }
    }
}

/// Spreads reconnect delays over [delay/2, delay] so a fleet that lost its
/// supervisor does not come back in one wave.
struct Jitter(u64);

impl Jitter {
    fn seeded(salt: &str) -> Self {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let salt = salt.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Jitter(time ^ salt)
    }

    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn spread(&mut self, delay: Duration) -> Duration {
        let fraction = 0.5 + (self.next() >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        delay.mul_f64(fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_whole() {
        let mut jitter = Jitter::seeded("d1");
        for _ in 0..1000 {
            let d = jitter.spread(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }
    fn agent(applier: Arc<MemoryApplier>) -> Agent {
        let (_transport, connector) =
            crate::transport::channel::pair(crate::transport::channel::ChannelConfig::default());
        let mut hello = DeviceHello::new(crate::DeviceId::new("d1").unwrap());
        hello.capabilities = crate::transport::Capabilities::all_builtin();
        Agent::new(AgentConfig::new(hello), Arc::new(connector), applier)
    }

    fn acks(answers: &[FromDevice]) -> Vec<String> {
        answers
            .iter()
            .filter_map(|answer| match answer {
                FromDevice::CommandAck(ack) => Some(format!("{} {:?}", ack.correlation_id, ack.outcome)),
                FromDevice::ConfigAck(ack) => Some(format!("{:?} {:?}", ack.correlation_id, ack.state)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_repeated_command_is_answered_again_but_carried_out_once() {
        let agent = agent(Arc::new(MemoryApplier::new()));
        let command = crate::Command::new(
            crate::DeviceId::new("d1").unwrap(),
            CommandKind::SetEmission { state: true },
            crate::Timestamp::now(),
            Duration::from_secs(30),
        );
        let (first, _) = agent.handle(ToDevice::Command(Box::new(command.clone()))).await;
        assert!(*agent.emission().borrow());
        // Meanwhile another command turns emission off; then the first comes again (a retry).
        let off = crate::Command::new(
            command.device,
            CommandKind::SetEmission { state: false },
            crate::Timestamp::now(),
            Duration::from_secs(30),
        );
        agent.handle(ToDevice::Command(Box::new(off))).await;
        let (again, end) = agent.handle(ToDevice::Command(Box::new(command))).await;
        assert_eq!(acks(&again), acks(&first[..1]), "the same answer, {again:?}");
        assert!(end.is_none());
        assert!(!*agent.emission().borrow(), "the repeat must not turn emission back on");
        assert_eq!(agent.repeats_answered(), 1);
    }

    #[tokio::test]
    async fn a_push_of_the_running_configuration_is_acknowledged_without_applying_it_again() {
        let applier = Arc::new(MemoryApplier::new());
        let agent = agent(applier.clone());
        let config = ConfigRef::new(
            crate::AgentType::new("fluentbit").unwrap(),
            crate::ConfigVersion::new("v1").unwrap(),
        );
        let bundle = crate::ConfigBundle::new()
            .with_file("fluent-bit.conf", crate::ConfigFile::new("text/plain", "[SERVICE]\n"))
            .unwrap();
        let push = |id| Arc::new(ConfigPush::new(Some(id), config, bundle.clone()));
        let (first, second) = (CorrelationId::new(), CorrelationId::new());
        let (answers, _) = agent.handle(ToDevice::ConfigPush(push(first))).await;
        assert_eq!(acks(&answers), [format!("{:?} Applied", Some(first))]);
        let (answers, _) = agent.handle(ToDevice::ConfigPush(push(second))).await;
        assert_eq!(acks(&answers), [format!("{:?} Applied", Some(second))]);
        assert_eq!(applier.applied_count(), 1, "applied once");
        assert_eq!(agent.repeats_answered(), 1);
    }
}
