//! What control planes track: each command's record, and rollouts.
//!
//! Control planes are stateless: any instance may issue a command and any
//! other may be asked about it, so what they track lives in a
//! [`TrackingStore`](crate::TrackingStore). A [`CommandRecord`] follows one
//! command from issue to outcome; a [`Rollout`] follows a configuration as it
//! reaches a fleet in growing waves.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::command::{Command, CommandKind, CommandOutcome, CorrelationId};
use crate::config::ConfigRef;
use crate::error::{Error, Result, excerpt};
use crate::id::{AgentType, DeviceId, SupervisorId};
use crate::status::Labels;
use crate::store::Cursor;
use crate::time::Timestamp;

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CommandState {
    /// Sent to the device's supervisor; no outcome yet.
    Pending,
    /// A configuration for a device no supervisor holds: it is recorded as the
    /// device's desired configuration and pushed when the device next connects.
    Deferred,
    /// The device acknowledged it.
    Acked,
    /// The device, or its supervisor, reported a failure.
    Failed,
    /// No acknowledgement came in time, also after one retry.
    TimedOut,
    /// The device was not connected.
    DeviceOffline,
    /// The device cannot do this.
    Unsupported,
}

impl CommandState {
    /// Whether the command has ended: nothing changes it any more.
    ///
    /// A deferred command has ended as far as its sender is concerned: what is
    /// left is the device's own convergence, which its status shows.
    pub fn is_final(self) -> bool {
        !matches!(self, CommandState::Pending)
    }

    /// Whether this outcome counts against a rollout's failure rate.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            CommandState::Failed | CommandState::TimedOut | CommandState::Unsupported
        )
    }

    /// A short stable name: the JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Pending => "pending",
            CommandState::Deferred => "deferred",
            CommandState::Acked => "acked",
            CommandState::Failed => "failed",
            CommandState::TimedOut => "timed_out",
            CommandState::DeviceOffline => "device_offline",
            CommandState::Unsupported => "unsupported",
        }
    }

    /// Reads [`as_str`](Self::as_str)'s names back.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "pending" => CommandState::Pending,
            "deferred" => CommandState::Deferred,
            "acked" => CommandState::Acked,
            "failed" => CommandState::Failed,
            "timed_out" => CommandState::TimedOut,
            "device_offline" => CommandState::DeviceOffline,
            "unsupported" => CommandState::Unsupported,
            other => {
                return Err(Error::invalid_input(format!(
                    "command state {} is not one of pending, deferred, acked, failed, timed_out, device_offline, unsupported",
                    excerpt(other)
                )));
            }
        })
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&CommandOutcome> for CommandState {
    fn from(outcome: &CommandOutcome) -> Self {
        match outcome {
            CommandOutcome::Acked => CommandState::Acked,
            CommandOutcome::Failed { .. } => CommandState::Failed,
            CommandOutcome::TimedOut => CommandState::TimedOut,
            CommandOutcome::DeviceOffline => CommandState::DeviceOffline,
            CommandOutcome::Unsupported { .. } => CommandState::Unsupported,
        }
    }
}

/// How many times a command is sent at most: once, and once more after it timed out.
pub const MAX_ATTEMPTS: u32 = 2;

/// One command, from issue to outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CommandRecord {
    /// The command as last sent (a retry sends it again with a later deadline).
    pub command: Command,
    /// Where it stands.
    pub state: CommandState,
    /// The supervisor it was last sent to; none when it was never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<SupervisorId>,
    /// How many times it was sent: 1, or 2 after a retry.
    pub attempts: u32,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Timestamp>,
    /// Why it failed or was unsupported, in the words of whoever said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asked for it (an API token's name, say), when that is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiated_by: Option<String>,
}

impl CommandRecord {
    /// A record of `command`, sent to `supervisor` (none: not sent), in `state`.
    pub fn new(command: Command, supervisor: Option<SupervisorId>, state: CommandState) -> Self {
        CommandRecord {
            command,
            state,
            supervisor,
            attempts: u32::from(supervisor.is_some()),
            completed_at: None,
            reason: None,
            initiated_by: None,
        }
    }

    /// The command's correlation id.
    pub fn correlation_id(&self) -> CorrelationId {
        self.command.correlation_id
    }

    /// The device it is for.
    pub fn device(&self) -> DeviceId {
        self.command.device
    }

    /// What it asks.
    pub fn kind(&self) -> &CommandKind {
        &self.command.kind
    }

    /// Whether the command is to be sent again rather than ended with
    /// `outcome`: a timeout, when it has been sent fewer than
    /// [`MAX_ATTEMPTS`] times.
    pub fn retries_on(&self, outcome: &CommandOutcome) -> bool {
        *outcome == CommandOutcome::TimedOut && self.attempts < MAX_ATTEMPTS
    }

    /// Ends the record with `outcome` at `at`.
    pub fn complete(&mut self, outcome: &CommandOutcome, at: Timestamp) {
        self.state = CommandState::from(outcome);
        self.completed_at = Some(at);
        self.reason = match outcome {
            CommandOutcome::Failed { reason } | CommandOutcome::Unsupported { reason } => Some(reason.clone()),
            _ => None,
        };
    }

    /// Settles an insert of this record that found `stored` under its
    /// correlation id: the same record again (a write sent again after its
    /// reply was lost, which finds its own first attempt) is success; a
    /// record that differs in anything, or one gone meanwhile, is
    /// [`Error::AlreadyExists`] naming the command and what differs. Every
    /// store's `insert_command` ends with this, so they agree on "the same".
    ///
    /// Nothing may legitimately differ: an insert writes the whole record,
    /// and a record that changed since (a retry, an outcome) is no longer
    /// what was inserted.
    pub fn inserted_again(&self, stored: Option<&CommandRecord>) -> Result<()> {
        let id = self.correlation_id();
        let Some(stored) = stored else {
            return Err(Error::already_exists(format!(
                "command {id} (its record went while it was inserted)"
            )));
        };
        let (mine, theirs) = (&self.command, &stored.command);
        let differs: Vec<&str> = [
            ("device", mine.device != theirs.device),
            ("kind", mine.kind != theirs.kind),
            ("issued_at", mine.issued_at != theirs.issued_at),
            ("deadline", mine.deadline != theirs.deadline),
            ("state", self.state != stored.state),
            ("supervisor", self.supervisor != stored.supervisor),
            ("attempts", self.attempts != stored.attempts),
            ("completed_at", self.completed_at != stored.completed_at),
            ("reason", self.reason != stored.reason),
            ("initiated_by", self.initiated_by != stored.initiated_by),
        ]
        .into_iter()
        .filter_map(|(field, differs)| differs.then_some(field))
        .collect();
        if differs.is_empty() {
            Ok(())
        } else {
            Err(Error::already_exists(format!(
                "command {id}, recorded with another {}",
                differs.join(", ")
            )))
        }
    }

    /// The record as JSON, as stores keep it.
    pub fn to_json(&self) -> Vec<u8> {
        // Every member serialises infallibly (strings, numbers, the command's own JSON).
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads [`to_json`](Self::to_json)'s output; errors name what was wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|err| Error::invalid_input(format!("command record JSON: {err}")))
    }
}

/// Which devices a configuration is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Target {
    /// One device.
    Device(DeviceId),
    /// Every known device of an agent type whose labels include all of `labels`
    /// (none: every device of the type).
    Selector {
        /// The agent type.
        agent_type: AgentType,
        /// Labels the device must carry, with these values.
        #[serde(default)]
        labels: Labels,
    },
}

impl Target {
    /// Every device of `agent_type`.
    pub fn agent_type(agent_type: AgentType) -> Self {
        Target::Selector {
            agent_type,
            labels: Labels::new(),
        }
    }

    /// Whether a device of `agent_type` with `labels` is targeted (a
    /// [`Target::Device`] target is matched by id, not by this).
    pub fn selects(&self, agent_type: Option<&AgentType>, labels: &Labels) -> bool {
        match self {
            Target::Device(_) => false,
            Target::Selector {
                agent_type: wanted,
                labels: required,
            } => agent_type == Some(wanted) && required.iter().all(|(key, value)| labels.get(key) == Some(value)),
        }
    }
}

/// Notices of commands ending, from [`TrackingStore::watch_endings`](crate::TrackingStore::watch_endings):
/// the correlation id of each command whose record a writer of the store,
/// in any process, made final after the watch began.
///
/// Best effort: a notice can come late, or not at all (the store's
/// connection dropped, or notices came faster than they were taken and the
/// store dropped some rather than wait). It tells a waiter when to read the
/// record again sooner; it never replaces reading it.
#[derive(Debug)]
pub struct Endings {
    notices: tokio::sync::mpsc::Receiver<CorrelationId>,
}

impl Endings {
    /// How many notices a store keeps for a slow reader before it drops new ones.
    pub const CAPACITY: usize = 4096;

    /// A watch and the sender its store keeps ([`Self::CAPACITY`] notices deep).
    pub fn channel() -> (EndingsSender, Endings) {
        let (sender, notices) = tokio::sync::mpsc::channel(Self::CAPACITY);
        (EndingsSender(sender), Endings { notices })
    }

    /// The next command to end, or `None` once the store stopped watching for good.
    pub async fn next(&mut self) -> Option<CorrelationId> {
        self.notices.recv().await
    }
}

/// The store's side of an [`Endings`] watch.
#[derive(Debug, Clone)]
pub struct EndingsSender(tokio::sync::mpsc::Sender<CorrelationId>);

impl EndingsSender {
    /// Tells the watch that `id` ended, without waiting: a watch with
    /// [`Endings::CAPACITY`] notices untaken loses this one. Returns `false`
    /// once the watch is gone (dropped), for the store to forget it.
    pub fn tell(&self, id: CorrelationId) -> bool {
        !matches!(
            self.0.try_send(id),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
        )
    }

    /// Whether the watch is gone.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Returns once the watch is gone.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// A command issued to one device, as returned when it is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The device.
    pub device: DeviceId,
    /// The command's correlation id, to ask after it.
    pub correlation_id: CorrelationId,
}

/// The mark a store keeps of its own beginning: made once, by the first
/// control plane to use the store, and never changed after. A store that
/// has none, or another one than a running control plane read at its start,
/// lost what it held (a Redis restarted without persistence, a database
/// restored from an older backup or replaced): templates, desired configs,
/// command records and rollouts, which no device can give back.
///
/// ```
/// use opamp_core::StoreGeneration;
///
/// let generation = StoreGeneration::new();
/// let json = generation.to_json();
/// assert_eq!(StoreGeneration::from_json(&json)?, generation);
/// assert!(StoreGeneration::from_json(b"{}").is_err());
/// # Ok::<(), opamp_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreGeneration {
    /// Unique to this generation (a UUID v7, so also time-ordered).
    pub id: Uuid,
    /// When it began.
    pub began_at: Timestamp,
}

impl StoreGeneration {
    /// A new generation, beginning now.
    pub fn new() -> Self {
        StoreGeneration {
            id: Uuid::now_v7(),
            began_at: Timestamp::now(),
        }
    }

    /// The generation as JSON, as stores keep it.
    pub fn to_json(&self) -> Vec<u8> {
        // A UUID and a timestamp serialise infallibly.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads [`to_json`](Self::to_json)'s output; errors name what was wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|err| Error::invalid_input(format!("store generation JSON: {err}")))
    }
}

impl Default for StoreGeneration {
    fn default() -> Self {
        StoreGeneration::new()
    }
}

impl fmt::Display for StoreGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (begun {})", self.id, self.began_at)
    }
}

/// Identifies a rollout. Time-ordered (UUID v7): newer rollouts sort after older ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RolloutId(Uuid);

impl RolloutId {
    /// A new id, later in order than every id made before it here.
    pub fn new() -> Self {
        RolloutId(Uuid::now_v7())
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for RolloutId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RolloutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for RolloutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RolloutId({self})")
    }
}

impl FromStr for RolloutId {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Uuid::parse_str(text)
            .map(RolloutId)
            .map_err(|err| Error::invalid_input(format!("rollout id {} is not a UUID: {err}", excerpt(text))))
    }
}

impl Serialize for RolloutId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RolloutId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a rollout does: which configuration, to which devices, in which waves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RolloutSpec {
    /// The configuration to roll out.
    pub config: ConfigRef,
    /// Labels the devices must carry (none: every device of the config's agent type).
    #[serde(default)]
    pub labels: Labels,
    /// How many devices the first (canary) wave has.
    #[serde(default = "RolloutSpec::default_canary")]
    pub canary: u32,
    /// Each wave is this many times the size of the one before.
    #[serde(default = "RolloutSpec::default_growth")]
    pub growth: u32,
    /// No wave is larger than this.
    #[serde(default = "RolloutSpec::default_max_wave")]
    pub max_wave: u32,
    /// The rollout pauses when a finished wave's failures (failed, timed out,
    /// unsupported) exceed this fraction of its devices that answered.
    #[serde(default = "RolloutSpec::default_failure_threshold")]
    pub failure_threshold: f64,
}

impl RolloutSpec {
    /// A rollout of `config` to every device of its agent type, with the default waves:
    /// a canary of 1, then doubling up to 500 a wave, pausing above 10% failures.
    pub fn new(config: ConfigRef) -> Self {
        RolloutSpec {
            config,
            labels: Labels::new(),
            canary: Self::default_canary(),
            growth: Self::default_growth(),
            max_wave: Self::default_max_wave(),
            failure_threshold: Self::default_failure_threshold(),
        }
    }

    /// Only devices carrying these labels.
    pub fn with_labels(mut self, labels: Labels) -> Self {
        self.labels = labels;
        self
    }

    /// Sets the canary size, the growth factor and the largest wave.
    pub fn with_waves(mut self, canary: u32, growth: u32, max_wave: u32) -> Self {
        self.canary = canary;
        self.growth = growth;
        self.max_wave = max_wave;
        self
    }

    /// Sets the failure fraction above which the rollout pauses.
    pub fn with_failure_threshold(mut self, threshold: f64) -> Self {
        self.failure_threshold = threshold;
        self
    }

    /// The devices it targets.
    pub fn target(&self) -> Target {
        Target::Selector {
            agent_type: self.config.agent_type,
            labels: self.labels.clone(),
        }
    }

    /// The size of the wave after one of `previous` devices.
    pub fn next_wave(&self, previous: Option<u32>) -> u32 {
        match previous {
            None => self.canary.min(self.max_wave),
            Some(previous) => previous.saturating_mul(self.growth).clamp(1, self.max_wave),
        }
    }

    /// Checks the numbers; the error names the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.canary == 0 {
            return Err(Error::invalid_input("rollout canary must be at least 1 device"));
        }
        if self.growth == 0 {
            return Err(Error::invalid_input("rollout growth must be at least 1"));
        }
        if self.max_wave < self.canary {
            return Err(Error::invalid_input(format!(
                "rollout max_wave {} is smaller than its canary {}",
                self.max_wave, self.canary
            )));
        }
        if !(0.0..=1.0).contains(&self.failure_threshold) {
            return Err(Error::invalid_input(format!(
                "rollout failure_threshold {} is not between 0 and 1",
                self.failure_threshold
            )));
        }
        Ok(())
    }

    fn default_canary() -> u32 {
        1
    }

    fn default_growth() -> u32 {
        2
    }

    fn default_max_wave() -> u32 {
        500
    }

    fn default_failure_threshold() -> f64 {
        0.1
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RolloutState {
    /// Waves are going out.
    Running,
    /// Stopped until resumed: by an operator, or because a wave failed too often.
    Paused {
        /// Why.
        reason: String,
    },
    /// Every targeted device was sent the configuration.
    Completed,
    /// Stopped for good by an operator.
    Aborted,
}

impl RolloutState {
    /// A short stable name: `running`, `paused`, `completed`, `aborted`.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Whether nothing can change it any more.
    pub fn is_final(&self) -> bool {
        matches!(self, RolloutState::Completed | RolloutState::Aborted)
    }
}

/// How many of a wave's commands stand where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Tally {
    /// No outcome yet.
    pub pending: u32,
    /// Acknowledged.
    pub acked: u32,
    /// Offline devices whose desired configuration was recorded.
    pub deferred: u32,
    /// Failed, timed out or unsupported.
    pub failed: u32,
}

impl Tally {
    /// Counts one command in `state`.
    pub fn count(&mut self, state: CommandState) {
        match state {
            CommandState::Pending => self.pending += 1,
            CommandState::Acked => self.acked += 1,
            CommandState::Deferred | CommandState::DeviceOffline => self.deferred += 1,
            CommandState::Failed | CommandState::TimedOut | CommandState::Unsupported => self.failed += 1,
        }
    }

    /// Every command counted.
    pub fn total(&self) -> u32 {
        self.pending + self.acked + self.deferred + self.failed
    }

    /// Failures as a fraction of the devices that answered (0 when none did).
    pub fn failure_rate(&self) -> f64 {
        let answered = self.acked + self.failed;
        if answered == 0 {
            0.0
        } else {
            f64::from(self.failed) / f64::from(answered)
        }
    }

    /// The sum of two tallies.
    pub fn plus(self, other: Tally) -> Tally {
        Tally {
            pending: self.pending + other.pending,
            acked: self.acked + other.acked,
            deferred: self.deferred + other.deferred,
            failed: self.failed + other.failed,
        }
    }
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Wave {
    /// 1 for the canary, then 2, 3, …
    pub number: u32,
    /// Where its commands stand.
    pub tally: Tally,
    /// When its commands went out.
    pub started_at: Timestamp,
    /// When its last command ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Its commands; kept while the wave runs, dropped once it has finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<Issued>,
}

/// A configuration reaching a fleet in growing waves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Rollout {
    /// Its id.
    pub id: RolloutId,
    /// What it does.
    pub spec: RolloutSpec,
    /// Where it stands.
    #[serde(flatten)]
    pub state: RolloutState,
    /// Bumped by every write: a store accepts a write only on top of the
    /// revision it was read at, so concurrent writers never lose each other's changes.
    pub revision: u64,
    /// When it was started.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Its waves, oldest first.
    pub waves: Vec<Wave>,
    /// Where the scan for the next wave's devices resumes: a cursor of the
    /// store's fleet listing (`StatusStore::devices`), as the store made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    /// Whether every targeted device has been put in a wave.
    pub exhausted: bool,
    /// Who started it, when that is known; its commands are initiated by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
}

impl Rollout {
    /// A new running rollout of `spec`, at revision 1.
    pub fn new(spec: RolloutSpec, now: Timestamp) -> Self {
        Rollout {
            id: RolloutId::new(),
            spec,
            state: RolloutState::Running,
            revision: 1,
            created_at: now,
            updated_at: now,
            waves: Vec::new(),
            cursor: None,
            exhausted: false,
            started_by: None,
        }
    }

    /// Every wave's tally added up.
    pub fn totals(&self) -> Tally {
        self.waves
            .iter()
            .fold(Tally::default(), |sum, wave| sum.plus(wave.tally))
    }

    /// The wave still in flight, if one is.
    pub fn current_wave(&self) -> Option<&Wave> {
        self.waves.last().filter(|wave| wave.finished_at.is_none())
    }

    /// The rollout as JSON, as stores keep it.
    pub fn to_json(&self) -> Vec<u8> {
        // Every member serialises infallibly; a NaN threshold cannot pass `validate`.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads [`to_json`](Self::to_json)'s output; errors name what was wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|err| Error::invalid_input(format!("rollout JSON: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::id::ConfigVersion;

    fn config() -> ConfigRef {
        ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v2").unwrap())
    }

    #[test]
    fn command_records_round_trip_through_json() {
        let device = DeviceId::new("d1").unwrap();
        let command = Command::new(
            device,
            CommandKind::SetEmission { state: true },
            Timestamp::now(),
            Duration::from_secs(5),
        );
        let mut record = CommandRecord::new(command, Some(SupervisorId::new("s1").unwrap()), CommandState::Pending);
        assert_eq!(CommandRecord::from_json(&record.to_json()).unwrap(), record);
        record.complete(&CommandOutcome::Failed { reason: "no".into() }, Timestamp::now());
        let back = CommandRecord::from_json(&record.to_json()).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.state, CommandState::Failed);
        assert_eq!(back.reason.as_deref(), Some("no"));
    }

    #[test]
    fn bad_records_name_the_problem() {
        let err = CommandRecord::from_json(br#"{"state":"bogus"}"#).unwrap_err();
        assert!(err.to_string().contains("command record JSON"), "{err}");
        let err = CommandState::parse("later").unwrap_err();
        assert!(err.to_string().contains("\"later\""), "{err}");
    }

    #[test]
    fn rollouts_round_trip_and_order_by_id() {
        let first = Rollout::new(RolloutSpec::new(config()), Timestamp::now());
        let second = Rollout::new(RolloutSpec::new(config()), Timestamp::now());
        assert!(first.id < second.id);
        assert!(
            first.id.to_string() < second.id.to_string(),
            "text order is time order too"
        );
        assert_eq!(Rollout::from_json(&first.to_json()).unwrap(), first);
    }

    #[test]
    fn waves_grow_up_to_the_limit() {
        let spec = RolloutSpec::new(config()).with_waves(2, 3, 10);
        assert_eq!(spec.next_wave(None), 2);
        assert_eq!(spec.next_wave(Some(2)), 6);
        assert_eq!(spec.next_wave(Some(6)), 10);
        assert!(spec.validate().is_ok());
        assert!(RolloutSpec::new(config()).with_waves(0, 2, 5).validate().is_err());
        assert!(RolloutSpec::new(config()).with_waves(5, 2, 4).validate().is_err());
        let err = RolloutSpec::new(config())
            .with_failure_threshold(1.5)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("failure_threshold"), "{err}");
    }

    #[test]
    fn selectors_match_type_and_labels() {
        let fluentbit = AgentType::new("fluentbit").unwrap();
        let labels: Labels = [("ring".to_owned(), "canary".to_owned())].into();
        let target = Target::Selector {
            agent_type: fluentbit,
            labels: labels.clone(),
        };
        assert!(target.selects(Some(&fluentbit), &labels));
        assert!(!target.selects(Some(&fluentbit), &Labels::new()));
        assert!(!target.selects(None, &labels));
        assert!(Target::agent_type(fluentbit).selects(Some(&fluentbit), &Labels::new()));
    }

    #[test]
    fn failure_rate_counts_only_answers() {
        let mut tally = Tally::default();
        for state in [
            CommandState::Acked,
            CommandState::Failed,
            CommandState::Deferred,
            CommandState::Pending,
        ] {
            tally.count(state);
        }
        assert_eq!(tally.total(), 4);
        assert!((tally.failure_rate() - 0.5).abs() < f64::EPSILON);
    }
}
