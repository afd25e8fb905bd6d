//! The command bus: commands to supervisors, configuration broadcasts, and device events.
//!
//! Delivery is at-least-once. A consumer gets [`Delivery`]s and ends each one
//! explicitly once it has done its work: it acknowledges it, or hands it back
//! ([`Delivery::nack`]) to have it delivered again, to the same subscription,
//! after a delay; past [`DEFAULT_MAX_DELIVERIES`] deliveries (each backend's
//! setting) a message handed back goes to the bus's dead letters with the
//! reason instead. A delivery that was neither acknowledged nor handed back
//! comes again to the next subscriber of the same stream (after a restart,
//! say). So consumers must be idempotent, by correlation id.
//!
//! A delivery that never ends holds the stream back: a log-based broker
//! cannot commit past it, and both buses bound what is outstanding. So every
//! delivery must end, one way or the other.
//!
//! Acknowledgements may come in any order. The next subscriber never gets
//! again what was acknowledged before the oldest unacknowledged delivery; it
//! may get again what was acknowledged after it (a log-based broker such as
//! Kafka keeps one committed position per partition).
//!
//! What a bus holds is bounded, so that a consumer falling behind does not
//! make memory grow without limit: the memory bus makes senders wait while a
//! queue is full (back-pressure); a broker-backed bus keeps the backlog in
//! the broker and bounds what a consumer has fetched but not acknowledged.

use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::command::{Command, CorrelationId};
use crate::config::ConfigRef;
use crate::error::{Error, Result};
use crate::event::DeviceEvent;
use crate::id::{GroupName, SupervisorId};
use crate::status::Labels;
use crate::time::Timestamp;

/// How many times a bus delivers a message that its consumer keeps handing
/// back ([`Delivery::nack`]) before it goes to the dead letters instead.
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;

/// Where a backend records acknowledgements.
///
/// Backends implement this; users only see it through [`Acker`].
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use opamp_core::{AckSink, Acker, Delivery};
///
/// /// Remembers the highest token acknowledged.
/// #[derive(Debug, Default)]
/// struct Highest(AtomicU64);
///
/// #[async_trait]
/// impl AckSink for Highest {
///     async fn ack(&self, token: u64) -> opamp_core::Result<()> {
///         self.0.fetch_max(token, Ordering::Relaxed);
///         Ok(())
///     }
///
///     async fn nack(&self, _token: u64, _attempt: u32, _retry_in: Duration, reason: String) -> opamp_core::Result<()> {
///         Err(opamp_core::Error::unsupported(format!("this sink cannot deliver again ({reason})")))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// let sink = Arc::new(Highest::default());
/// Delivery::new("hello", Acker::new(sink.clone(), 7)).ack().await?;
/// assert_eq!(sink.0.load(Ordering::Relaxed), 7);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait AckSink: Send + Sync + Debug + 'static {
    /// Records that the delivery identified by `token` was handled.
    async fn ack(&self, token: u64) -> Result<()>;

    /// Hands the delivery identified by `token` back: deliver it again to the
    /// same subscription after `retry_in`, as delivery number `attempt + 1`,
    /// or, once `attempt` reached the bus's bound, send it to the dead letters
    /// with `reason`. After the subscription ended it has no effect.
    async fn nack(&self, token: u64, attempt: u32, retry_in: Duration, reason: String) -> Result<()>;
}

/// Ends one delivery: acknowledges it or hands it back. Dropping it without
/// either leaves the delivery outstanding: it comes again to the next
/// subscriber, and until then holds the stream back.
///
/// Ending a delivery after the subscription ended (dropped, or taken over) is
/// not an error but has no effect: the delivery comes again all the same.
#[must_use = "a delivery that is not acknowledged is delivered again"]
pub struct Acker {
    sink: Arc<dyn AckSink>,
    token: u64,
    attempt: u32,
}

impl Acker {
    /// An acker that reports `token`, delivered for the first time, to `sink` (for backends).
    pub fn new(sink: Arc<dyn AckSink>, token: u64) -> Self {
        Acker {
            sink,
            token,
            attempt: 1,
        }
    }

    /// The same, for the `attempt`th delivery of its message (from 1).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Which delivery of its message this is, from 1 (see [`Delivery::attempt`]).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Acknowledges the delivery.
    pub async fn ack(self) -> Result<()> {
        self.sink.ack(self.token).await
    }

    /// Hands the delivery back (see [`Delivery::nack`]).
    pub async fn nack(self, retry_in: Duration, reason: impl Into<String>) -> Result<()> {
        self.sink.nack(self.token, self.attempt, retry_in, reason.into()).await
    }
}

impl Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acker")
            .field("token", &self.token)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// A message handed to a consumer, to be acknowledged once handled.
#[derive(Debug)]
pub struct Delivery<T> {
    message: T,
    acker: Acker,
}

impl<T> Delivery<T> {
    /// A delivery of `message` acknowledged through `acker` (for backends).
    pub fn new(message: T, acker: Acker) -> Self {
        Delivery { message, acker }
    }

    /// The message.
    pub fn message(&self) -> &T {
        &self.message
    }

    /// Which delivery of this message this is, from 1: how many times it was
    /// handed back ([`nack`](Self::nack)) in this subscription, plus one. A
    /// message that comes again to a new subscription counts from 1 there.
    pub fn attempt(&self) -> u32 {
        self.acker.attempt
    }

    /// Hands the delivery back: it comes again to this same subscription
    /// after `retry_in`, with [`attempt`](Self::attempt) one higher, while
    /// other messages go on being delivered meanwhile (on a stream whose order
    /// matters, the consumer chooses to wait or not). Past the bus's bound on
    /// deliveries ([`DEFAULT_MAX_DELIVERIES`] unless configured) it goes to
    /// the bus's dead letters with `reason` instead, and counts as done.
    pub async fn nack(self, retry_in: Duration, reason: impl Into<String>) -> Result<()> {
        self.acker.nack(retry_in, reason).await
    }

    /// Splits into the message and its acker, to ack after the work is done.
    pub fn into_parts(self) -> (T, Acker) {
        (self.message, self.acker)
    }

    /// Acknowledges the delivery.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }
}

/// A stream of deliveries from one subscription.
///
/// Dropping the stream ends the subscription; what it delivered but was not
/// acknowledged goes to the next subscriber.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::time::Duration;
/// use opamp_core::{Command, CommandBus, CommandKind, DeviceId, Subscription, SupervisorId, Timestamp};
/// use opamp_bus::memory::MemoryBus;
///
/// /// Handles commands until the subscription ends, acknowledging each once handled.
/// async fn serve(mut commands: Subscription<Command>) -> opamp_core::Result<usize> {
///     let mut handled = 0;
///     while let Some(delivery) = commands.next().await? {
///         // ... deliver it to the device and record the outcome, then:
///         delivery.ack().await?;
///         handled += 1;
///     }
///     Ok(handled)
/// }
///
/// let bus = MemoryBus::new();
/// let s1 = SupervisorId::new("s1")?;
/// let commands = bus.subscribe(&s1).await?;
/// let restart = Command::new(DeviceId::new("device-5")?, CommandKind::Restart, Timestamp::now(), Duration::from_secs(5));
/// bus.send(&s1, &restart).await?;
/// drop(bus); // the memory bus ends its subscriptions once drained
/// assert_eq!(serve(commands).await?, 1);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait MessageStream<T: Send>: Send + Debug {
    /// The next delivery; waits for one. `Ok(None)` once the subscription has
    /// ended (the bus closed, or a newer subscriber took the stream over).
    ///
    /// A subscription taken over may first yield deliveries it had already
    /// fetched (a broker-backed bus learns of the takeover late; the memory
    /// bus ends it at once); those go to the newer subscriber too.
    async fn next(&mut self) -> Result<Option<Delivery<T>>>;
}

/// A subscription, as returned by the bus traits.
pub type Subscription<T> = Box<dyn MessageStream<T>>;

/// A configuration change announced to every supervisor.
///
/// Supervisors answer it by pushing `config` to each connected device of
/// `config.agent_type` whose labels include every `selector` label (an empty
/// selector selects them all) and whose applied configuration differs.
///
/// On the `opamp.config-updates` topic it is one JSON object:
/// `{"agent_type": "fluentbit", "config_version": "v2", "selector": {"ring": "canary"},
///   "timestamp": "2026-01-27T10:30:00Z", "correlation_id": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConfigUpdate {
    /// The configuration to run.
    #[serde(flatten)]
    pub config: ConfigRef,
    /// Which devices of that agent type: those with all of these labels.
    #[serde(default)]
    pub selector: Labels,
    /// When it was issued.
    #[serde(rename = "timestamp")]
    pub issued_at: Timestamp,
    /// Ties the update to its rollout and audit trail.
    pub correlation_id: CorrelationId,
}

impl ConfigUpdate {
    /// An update to `config` for the devices matching `selector`, with a fresh correlation id.
    pub fn new(config: ConfigRef, selector: Labels, issued_at: Timestamp) -> Self {
        ConfigUpdate {
            config,
            selector,
            issued_at,
            correlation_id: CorrelationId::new(),
        }
    }

    /// Whether a device with `labels` is selected.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector.iter().all(|(key, value)| labels.get(key) == Some(value))
    }

    /// The JSON form.
    pub fn to_json(&self) -> Vec<u8> {
        // Validated names, strings and timestamps serialise infallibly.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the JSON form; errors name what was wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|err| Error::invalid_input(format!("config update JSON: {err}")))
    }
}

/// Commands to supervisors, and configuration broadcasts to all of them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::time::Duration;
/// use opamp_core::{Command, CommandBus, CommandKind, DeviceId, SupervisorId, Timestamp};
/// use opamp_bus::memory::MemoryBus;
///
/// let bus = MemoryBus::new();
/// let s3 = SupervisorId::new("supervisor-pod-3")?;
/// let mut commands = bus.subscribe(&s3).await?;
///
/// let toggle = CommandKind::SetEmission { state: true };
/// let cmd = Command::new(DeviceId::new("device-5")?, toggle, Timestamp::now(), Duration::from_secs(5));
/// bus.send(&s3, &cmd).await?;
///
/// let delivery = commands.next().await?.expect("one command");
/// assert_eq!(delivery.message(), &cmd);
/// delivery.ack().await?; // only after the device acknowledged it
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait CommandBus: Send + Sync + Debug + 'static {
    /// Queues `command` for `supervisor`. Commands for one device arrive in
    /// the order they were sent. May wait while the supervisor's queue is
    /// full (the memory bus does).
    async fn send(&self, supervisor: &SupervisorId, command: &Command) -> Result<()>;

    /// The commands for `supervisor`. A new subscription takes the stream over
    /// from an older one, and gets what the older one left unacknowledged.
    async fn subscribe(&self, supervisor: &SupervisorId) -> Result<Subscription<Command>>;

    /// Sends `update` to every supervisor.
    async fn broadcast(&self, update: &ConfigUpdate) -> Result<()>;

    /// The broadcasts for `supervisor`, from the time it first subscribed.
    /// As with [`subscribe`](Self::subscribe), a newer subscription takes the stream over.
    async fn subscribe_broadcasts(&self, supervisor: &SupervisorId) -> Result<Subscription<ConfigUpdate>>;

    /// Whether the bus still holds commands sent before now, acknowledged
    /// or not (a broker's retained log; for a bus in memory, whether any
    /// command was ever sent on it). Their records were written to a store:
    /// a store that has no [`StoreGeneration`](crate::StoreGeneration)
    /// while this is true lost them, with whatever else it held.
    async fn holds_history(&self) -> Result<bool>;
}

/// Device events, keyed by device, shared out among the members of consumer groups.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{DeviceEvent, DeviceId, EventBus, EventKind, GroupName, SupervisorId, Timestamp};
/// use opamp_bus::memory::MemoryBus;
///
/// let bus = MemoryBus::new();
/// let mut servers = bus.subscribe_events(&GroupName::new("servers")?).await?;
/// let connected = EventKind::Connected { supervisor: SupervisorId::new("s1")? };
/// bus.publish_event(&DeviceEvent::new(DeviceId::new("device-5")?, connected, Timestamp::now())).await?;
/// let delivery = servers.next().await?.expect("one event");
/// assert_eq!(delivery.message().device.as_str(), "device-5");
/// delivery.ack().await?;
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait EventBus: Send + Sync + Debug + 'static {
    /// Publishes `event`. Every group gets it; within a group, one member.
    /// Events of one device reach a group in the order they were published.
    async fn publish_event(&self, event: &DeviceEvent) -> Result<()>;

    /// Joins `group`: this subscription gets its share of the group's events.
    ///
    /// Joining and leaving (dropping the subscription) move shares of the
    /// events, by device, between members; what a member had not acknowledged
    /// of a share that moves goes to its new member. While membership stays
    /// the same, each event goes to exactly one member, and all of one
    /// device's events to the same one.
    async fn subscribe_events(&self, group: &GroupName) -> Result<Subscription<DeviceEvent>>;
}

/// A complete bus: commands, broadcasts and events. Implemented for every
/// type that implements both parts.
///
/// ```
/// use std::sync::Arc;
/// use opamp_core::{Bus, EventBus};
/// use opamp_bus::memory::MemoryBus;
///
/// let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
/// let events: Arc<dyn EventBus> = bus.clone();
/// # let _ = events;
/// ```
pub trait Bus: CommandBus + EventBus {}

impl<T: CommandBus + EventBus + ?Sized> Bus for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentType, ConfigVersion};

    #[test]
    fn config_update_json_and_selection() {
        let config = ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v2").unwrap());
        let selector = Labels::from([("ring".to_owned(), "canary".to_owned())]);
        let update = ConfigUpdate::new(config, selector, Timestamp::from_unix_seconds(1_769_509_800).unwrap());
        let value: serde_json::Value = serde_json::from_slice(&update.to_json()).unwrap();
        assert_eq!(value["agent_type"], "fluentbit");
        assert_eq!(value["config_version"], "v2");
        assert_eq!(value["selector"]["ring"], "canary");
        assert_eq!(value["timestamp"], "2026-01-27T10:30:00Z");
        assert_eq!(ConfigUpdate::from_json(&update.to_json()).unwrap(), update);

        let mut labels = Labels::from([("ring".to_owned(), "canary".to_owned())]);
        assert!(update.selects(&labels));
        labels.insert("ring".into(), "main".into());
        assert!(!update.selects(&labels));

        let mut bad = value.clone();
        bad["agent_type"] = "a:b".into();
        let err = ConfigUpdate::from_json(bad.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("agent type"), "{err}");
    }

    #[test]
    fn traits_are_object_safe() {
        fn assert_dyn(_: Option<&dyn Bus>, _: Option<Subscription<Command>>) {}
        assert_dyn(None, None);
    }
}
