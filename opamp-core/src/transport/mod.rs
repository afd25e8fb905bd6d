//! Device transports: how supervisors and device agents exchange messages.
//!
//! A transport carries the transport-neutral messages below over its own
//! wire (gRPC, OpAMP over WebSocket or HTTP, or in-process channels):
//!
//! | message                    | direction            | gRPC `Envelope` field |
//! |----------------------------|----------------------|-----------------------|
//! | [`DeviceHello`] (register) | device → supervisor  | `register = 1`        |
//! | [`ToDevice::Command`]      | supervisor → device  | `command = 2`         |
//! | [`FromDevice::Status`]     | device → supervisor  | `event = 3`           |
//! | [`ToDevice::ConfigPush`]   | supervisor → device  | `config_push = 4`     |
//! | [`FromDevice::ConfigAck`]  | device → supervisor  | `config_ack = 5`      |
//!
//! plus [`FromDevice::CommandAck`], [`FromDevice::Heartbeat`],
//! [`ToDevice::Registered`] and [`ToDevice::Refused`].
//!
//! The supervisor side is a [`DeviceTransport`], which accepts
//! [`DeviceSession`]s; the device side is an [`AgentConnector`]. Each session
//! has the identity the device proved when it connected, an [`Inbound`]
//! stream, and an [`Outbound`] sender with a bounded queue, so a slow device
//! fills its own queue and nobody else's.

pub mod channel;
pub mod limits;
pub mod queue;

pub use limits::{DeviceLimits, ReportBucket};
pub use queue::{Receiver, TryRecvError};

use std::fmt::{self, Debug};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::command::{Command, CommandOutcome, CorrelationId};
use crate::config::{ConfigBundle, ConfigHash, ConfigRef};
use crate::error::Result;
use crate::event::ConfigApplyState;
use crate::id::{AgentType, ConfigVersion, DeviceId, SupervisorId};
use crate::status::Labels;

/// What a device can do, as it told the supervisor when it registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Capabilities {
    /// It accepts [`CommandKind::SetEmission`](crate::CommandKind::SetEmission).
    pub emission: bool,
    /// It accepts configuration pushes.
    pub remote_config: bool,
    /// It accepts [`CommandKind::Restart`](crate::CommandKind::Restart).
    pub restart: bool,
    /// The custom capabilities it accepts messages for.
    pub custom: Vec<String>,
}

impl Capabilities {
    /// Everything the built-in commands need: emission, remote config and restart.
    pub fn all_builtin() -> Self {
        Capabilities {
            emission: true,
            remote_config: true,
            restart: true,
            custom: Vec::new(),
        }
    }
}

/// Who a device is and what it runs, as proven and reported when it connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeviceHello {
    /// The device id, proven by the transport's credential check.
    pub device: DeviceId,
    /// The kind of agent it runs.
    #[serde(default)]
    pub agent_type: Option<AgentType>,
    /// The configuration version it runs.
    #[serde(default)]
    pub config_version: Option<ConfigVersion>,
    /// The hash of the configuration it runs.
    #[serde(default)]
    pub config_hash: Option<ConfigHash>,
    /// Its labels.
    #[serde(default)]
    pub labels: Labels,
    /// What it can do.
    #[serde(default)]
    pub capabilities: Capabilities,
}

impl DeviceHello {
    /// A hello from `device` that reports nothing else yet.
    pub fn new(device: DeviceId) -> Self {
        DeviceHello {
            device,
            agent_type: None,
            config_version: None,
            config_hash: None,
            labels: Labels::new(),
            capabilities: Capabilities::default(),
        }
    }
}

/// A configuration sent to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigPush {
    /// The command that asked for it, if one did (reconciliation pushes have none).
    pub correlation_id: Option<CorrelationId>,
    /// Which template version it is.
    pub config: ConfigRef,
    /// The bundle's content hash, which the device echoes in its [`ConfigAck`].
    pub hash: ConfigHash,
    /// The files.
    pub bundle: ConfigBundle,
}

impl ConfigPush {
    /// A push of `bundle` as `config`, with its hash computed.
    pub fn new(correlation_id: Option<CorrelationId>, config: ConfigRef, bundle: ConfigBundle) -> Self {
        ConfigPush {
            correlation_id,
            config,
            hash: bundle.hash(),
            bundle,
        }
    }
}

/// A message from a supervisor to a device.
///
/// Payloads are boxed or shared so that a queued message is two words: a
/// supervisor keeps a queue per device, and pushes one bundle to thousands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToDevice {
    /// Do something; answer with [`FromDevice::CommandAck`].
    Command(Box<Command>),
    /// Apply this configuration; answer with [`FromDevice::ConfigAck`].
    ConfigPush(Arc<ConfigPush>),
    /// The device is registered: its lease is claimed by this supervisor. The
    /// first message of every session; needs no answer.
    Registered(Box<SupervisorId>),
    /// The device is not registered, and why: sent instead of
    /// [`Registered`](Self::Registered), and the session ends after it.
    Refused(Box<Refused>),
}

/// Why a supervisor did not register a device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refused {
    /// Why, for the device's log.
    pub reason: String,
    /// The device itself is denied (revoked, say): its credential will not
    /// do until an operator acts, and transports answer as they answer a bad
    /// credential. Otherwise the refusal passes (the store did not answer)
    /// and the device should try again later.
    pub denied: bool,
}

impl Refused {
    /// The refusal of a registration that failed with `err`: denied when the
    /// error is [`Error::Unauthenticated`](crate::Error::Unauthenticated).
    pub fn of(err: &crate::Error) -> Self {
        Refused {
            reason: err.to_string(),
            denied: matches!(err, crate::Error::Unauthenticated { .. }),
        }
    }
}

/// A device's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandAck {
    /// The command answered.
    pub correlation_id: CorrelationId,
    /// `Acked`, `Failed` or `Unsupported`.
    pub outcome: CommandOutcome,
}

impl CommandAck {
    /// An answer to the command `correlation_id`.
    pub fn new(correlation_id: CorrelationId, outcome: CommandOutcome) -> Self {
        CommandAck {
            correlation_id,
            outcome,
        }
    }
}

/// A device's report on a configuration it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigAck {
    /// The command that asked for it, echoed from the [`ConfigPush`].
    pub correlation_id: Option<CorrelationId>,
    /// The hash of the configuration reported on.
    pub hash: ConfigHash,
    /// Where applying it stands.
    pub state: ConfigApplyState,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

impl ConfigAck {
    /// A report on the configuration `hash`.
    pub fn new(
        correlation_id: Option<CorrelationId>,
        hash: ConfigHash,
        state: ConfigApplyState,
        error: Option<String>,
    ) -> Self {
        ConfigAck {
            correlation_id,
            hash,
            state,
            error,
        }
    }
}

/// A device's unprompted report of its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusReport {
    /// Whether it emits telemetry.
    pub emission: Option<bool>,
    /// Whether it is healthy.
    pub healthy: Option<bool>,
    /// Its last error, if any.
    pub last_error: Option<String>,
}

/// A message from a device to its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FromDevice {
    /// An answer to a command.
    CommandAck(CommandAck),
    /// A report on a configuration push.
    ConfigAck(Box<ConfigAck>),
    /// A report of its state.
    Status(StatusReport),
    /// It is alive; keeps its lease.
    Heartbeat,
}

/// The receiving half of a session.
///
/// Transports implement it over their wire; an [`Outbound`] queue's
/// [`Receiver`] is one, and so is a tokio `mpsc::Receiver`.
///
/// It is polled, like a stream, rather than awaited: whoever holds a session
/// may wait on it with [`recv`](trait.Inbound.html#method.recv), or, as the
/// supervisor does, register a waker of its own and hold no task while the
/// device is idle.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::transport::{FromDevice, Inbound, Outbound};
///
/// let (outbound, receiver) = Outbound::channel(4);
/// let mut inbound: Box<dyn Inbound<FromDevice>> = Box::new(receiver);
/// outbound.try_send(FromDevice::Heartbeat).expect("room");
/// drop(outbound);
/// assert_eq!(inbound.recv().await?, Some(FromDevice::Heartbeat));
/// assert_eq!(inbound.recv().await?, None, "every sender is gone: the session ended");
/// # Ok(())
/// # }
/// ```
pub trait Inbound<T: Send>: Send + Debug {
    /// The next message if there is one; `Ready(Ok(None))` once the peer has
    /// closed the session. When it returns `Pending`, `cx`'s waker is woken
    /// when there is more to read.
    ///
    /// An error means the peer sent something malformed or the connection
    /// broke; the session is over either way.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<T>>>;
}

impl<T: Send> dyn Inbound<T> + '_ {
    /// Waits for the next message: [`poll_recv`](Inbound::poll_recv) as a future.
    pub fn recv(&mut self) -> impl Future<Output = Result<Option<T>>> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }
}

impl<T: Send + Debug> Inbound<T> for mpsc::Receiver<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<T>>> {
        mpsc::Receiver::poll_recv(self, cx).map(Ok)
    }
}

/// Why [`Outbound::try_send`] did not send; the message is handed back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError<T> {
    /// The peer's queue is full: it is slow or stuck.
    #[error("the peer's queue is full")]
    Full(T),
    /// The session has ended.
    #[error("the session has ended")]
    Closed(T),
}

/// The sending half of a session: a bounded queue the transport drains onto
/// the wire through its [`Receiver`].
///
/// An idle queue costs one small allocation and reserves no slots (see
/// [`queue`]); clones share it, and the session's receiving side sees the
/// end once every clone is dropped.
pub struct Outbound<T> {
    shared: Arc<queue::Shared<T>>,
}

impl<T> Debug for Outbound<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Outbound").field(&self.shared).finish()
    }
}

impl<T: Send> Outbound<T> {
    /// A queue of `capacity` messages (at least 1): the sender, and the receiver the transport drains.
    pub fn channel(capacity: usize) -> (Outbound<T>, Receiver<T>) {
        let shared = queue::Shared::new(capacity);
        (
            Outbound {
                shared: Arc::clone(&shared),
            },
            Receiver::new(shared),
        )
    }

    /// Queues `message` if there is room, without waiting.
    pub fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        self.shared.try_send(message)
    }

    /// Queues `message`, waiting for room; hands it back if the session has ended.
    pub async fn send(&self, message: T) -> Result<(), T> {
        self.shared.send(message).await
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Waits until the session has ended.
    pub async fn closed(&self) {
        self.shared.closed().await
    }
}

impl<T: Send> Inbound<T> for Receiver<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<T>>> {
        Receiver::poll_recv(self, cx).map(Ok)
    }
}

/// A device connected to a supervisor.
#[non_exhaustive]
pub struct DeviceSession {
    /// Who the device proved to be, and what it reported.
    pub hello: DeviceHello,
    /// Where it connected from, for logs (e.g. `grpc 127.0.0.1:40123`).
    pub peer: String,
    /// Messages from the device.
    pub inbound: Box<dyn Inbound<FromDevice>>,
    /// Messages to the device. Dropping every clone ends the session.
    pub outbound: Outbound<ToDevice>,
}

impl DeviceSession {
    /// A session (for transports).
    pub fn new(
        hello: DeviceHello,
        peer: impl Into<String>,
        inbound: Box<dyn Inbound<FromDevice>>,
        outbound: Outbound<ToDevice>,
    ) -> Self {
        DeviceSession {
            hello,
            peer: peer.into(),
            inbound,
            outbound,
        }
    }
}

impl Debug for DeviceSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSession")
            .field("device", &self.hello.device)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The supervisor side of a transport: accepts device sessions.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::transport::{channel, AgentConnector, DeviceHello, DeviceTransport, FromDevice};
/// use opamp_core::DeviceId;
///
/// let (transport, connector) = channel::pair(channel::ChannelConfig::default());
/// let mut agent = connector.connect(&DeviceHello::new(DeviceId::new("device-5")?)).await?;
///
/// let mut session = transport.accept().await?.expect("a device");
/// assert_eq!(session.hello.device.as_str(), "device-5");
/// agent.outbound.send(FromDevice::Heartbeat).await.expect("open");
/// assert_eq!(session.inbound.recv().await?, Some(FromDevice::Heartbeat));
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait DeviceTransport: Send + Sync + Debug + 'static {
    /// A short name for logs and metrics: `grpc`, `opamp`, `channel`.
    fn name(&self) -> &'static str;

    /// The next device that connected and proved its identity; `Ok(None)`
    /// once the transport has shut down.
    async fn accept(&self) -> Result<Option<DeviceSession>>;
}

/// A device's session with its supervisor, from the device's side.
#[non_exhaustive]
pub struct AgentSession {
    /// Messages from the supervisor.
    pub inbound: Box<dyn Inbound<ToDevice>>,
    /// Messages to the supervisor.
    pub outbound: Outbound<FromDevice>,
}

impl AgentSession {
    /// A session (for transports).
    pub fn new(inbound: Box<dyn Inbound<ToDevice>>, outbound: Outbound<FromDevice>) -> Self {
        AgentSession { inbound, outbound }
    }
}

impl Debug for AgentSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSession").finish_non_exhaustive()
    }
}

/// The device side of a transport: connects to a supervisor and registers.
///
/// The connector holds the device's credential; `hello` says who it claims to
/// be and what it runs.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::sync::Arc;
/// use opamp_core::transport::{channel, AgentConnector, DeviceHello, FailoverConnector};
/// use opamp_core::DeviceId;
///
/// // A device that knows two supervisors; the first is down.
/// let (down, to_down) = channel::pair(channel::ChannelConfig::default());
/// drop(down);
/// let (_up, to_up) = channel::pair(channel::ChannelConfig::default());
/// let connector: Arc<dyn AgentConnector> = Arc::new(FailoverConnector::new(vec![Arc::new(to_down), Arc::new(to_up)])?);
/// let session = connector.connect(&DeviceHello::new(DeviceId::new("device-5")?)).await?;
/// # let _ = session;
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait AgentConnector: Send + Sync + Debug + 'static {
    /// Connects and registers as `hello.device`.
    async fn connect(&self, hello: &DeviceHello) -> Result<AgentSession>;
}

/// Connects through the first of several connectors that answers: a device's
/// list of supervisors, so that it re-homes when its supervisor dies.
///
/// Two orders:
/// - [`FailoverConnector::new`]: in turn. Each attempt starts one past the
///   connector that last succeeded, so a device tries the others before
///   returning to the one that dropped it.
/// - [`FailoverConnector::spread`]: each device in an order of its own,
///   ranked by rendezvous hashing of its id with each connector's position
///   (every process with the same list agrees). A fleet given the same list
///   spreads evenly over it, and when one supervisor dies its devices spread
///   evenly over the rest while the other devices stay where they are; the
///   placement a consistent-hashing connection balancer would make, without
///   one.
#[derive(Debug)]
pub struct FailoverConnector {
    connectors: Vec<Arc<dyn AgentConnector>>,
    /// `Some` in turn (where the next attempt starts), `None` when spread.
    next: Option<std::sync::atomic::AtomicUsize>,
}

impl FailoverConnector {
    /// Tries `connectors` in turn; [`Error::InvalidInput`](crate::Error::InvalidInput) if there are none.
    pub fn new(connectors: Vec<Arc<dyn AgentConnector>>) -> Result<Self> {
        Self::check(&connectors)?;
        Ok(FailoverConnector {
            connectors,
            next: Some(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// Tries `connectors` in each device's own order (see the type's
    /// documentation); [`Error::InvalidInput`](crate::Error::InvalidInput) if there are none.
    pub fn spread(connectors: Vec<Arc<dyn AgentConnector>>) -> Result<Self> {
        Self::check(&connectors)?;
        Ok(FailoverConnector { connectors, next: None })
    }

    fn check(connectors: &[Arc<dyn AgentConnector>]) -> Result<()> {
        if connectors.is_empty() {
            return Err(crate::Error::invalid_input(
                "a failover connector needs at least one connector",
            ));
        }
        Ok(())
    }

    /// The positions of the connectors in the order `device` tries them.
    pub fn order(&self, device: &crate::DeviceId) -> Vec<usize> {
        use std::sync::atomic::Ordering;
        let count = self.connectors.len();
        match &self.next {
            Some(next) => {
                let start = next.load(Ordering::Relaxed);
                (0..count).map(|offset| (start + offset) % count).collect()
            }
            None => {
                let mut order: Vec<usize> = (0..count).collect();
                order.sort_by_key(|&index| std::cmp::Reverse(rendezvous_score(device.as_str(), index)));
                order
            }
        }
    }
}

/// A device's score for the connector at `index`: FNV-1a of the id, then the
/// index mixed in with SplitMix64's finaliser. Fixed here (not std's hasher,
/// which may change between Rust releases) so every build agrees.
fn rendezvous_score(device: &str, index: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in device.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut mixed = hash ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

#[async_trait]
impl AgentConnector for FailoverConnector {
    async fn connect(&self, hello: &DeviceHello) -> Result<AgentSession> {
        let mut last_error = None;
        for index in self.order(&hello.device) {
            match self.connectors[index].connect(hello).await {
                Ok(session) => {
                    if let Some(next) = &self.next {
                        next.store(index + 1, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Ok(session);
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| crate::Error::unavailable("no connector answered")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_messages_stay_small() {
        assert!(
            std::mem::size_of::<ToDevice>() <= 16,
            "{}",
            std::mem::size_of::<ToDevice>()
        );
    }

    #[tokio::test]
    async fn failover_tries_the_next_connector() {
        let (dead, dead_connector) = channel::pair(channel::ChannelConfig::default());
        drop(dead);
        let (live, live_connector) = channel::pair(channel::ChannelConfig::default());
        let failover = FailoverConnector::new(vec![Arc::new(dead_connector), Arc::new(live_connector)]).unwrap();
        let hello = DeviceHello::new(crate::DeviceId::new("d1").unwrap());
        failover.connect(&hello).await.unwrap();
        assert_eq!(live.accept().await.unwrap().unwrap().hello, hello);
        assert!(FailoverConnector::new(Vec::new()).is_err());
    }

    #[test]
    fn spread_places_devices_evenly_and_rehomes_them_evenly() {
        let connectors: Vec<Arc<dyn AgentConnector>> = (0..5)
            .map(|_| Arc::new(channel::pair(channel::ChannelConfig::default()).1) as Arc<dyn AgentConnector>)
            .collect();
        let spread = FailoverConnector::spread(connectors).unwrap();
        let (mut first, mut second) = ([0usize; 5], [0usize; 5]);
        for n in 0..10_000 {
            let device = crate::DeviceId::new(format!("dev-{n:06}")).unwrap();
            let order = spread.order(&device);
            assert_eq!(order, spread.order(&device), "the same order every time");
            first[order[0]] += 1;
            if order[0] == 2 {
                // Supervisor 2 died: where its devices go next.
                second[order[1]] += 1;
            }
        }
        assert!(first.iter().all(|&n| (1_800..=2_200).contains(&n)), "{first:?}");
        assert_eq!(second[2], 0);
        let moved: usize = second.iter().sum();
        assert!(
            second
                .iter()
                .enumerate()
                .all(|(i, &n)| i == 2 || n * 4 > moved * 8 / 10),
            "{second:?}"
        );
    }

    #[tokio::test]
    async fn outbound_reports_full_and_closed() {
        let (out, mut rx) = Outbound::channel(1);
        out.try_send(1).unwrap();
        assert_eq!(out.try_send(2), Err(TrySendError::Full(2)));
        assert_eq!(rx.recv().await, Some(1));
        drop(rx);
        assert!(out.is_closed());
        assert_eq!(out.try_send(3), Err(TrySendError::Closed(3)));
        assert_eq!(out.send(4).await, Err(4));
    }
}
