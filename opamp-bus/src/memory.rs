//! A bus in process memory: bounded queues with acknowledgements.
//!
//! For tests, demos, benchmarks and deployments that run in one process. It
//! keeps the promises of [`CommandBus`] and [`EventBus`] the way a log-based
//! broker does, so code tested against it behaves the same against Kafka:
//!
//! - Every queue is a **partition**: messages wait in order; a delivered one
//!   stays *in flight* until it is acknowledged. Acknowledgements may come in
//!   any order. When a subscription ends (dropped, or taken over by a newer
//!   one) or a partition moves to another member of a group, what it had not
//!   acknowledged goes back to the front of the queue, in its original order,
//!   so the next owner gets it first. Acknowledgements from an ended
//!   subscription have no effect.
//! - **Commands**: one partition per supervisor, kept from the first `send`
//!   to that supervisor, so commands sent before it subscribes wait for it.
//! - **Broadcasts**: one partition per supervisor, made when it first
//!   subscribes to broadcasts; a broadcast goes to every such partition at
//!   once (or, if the call is cancelled while waiting for room, to none).
//! - **Events**: each consumer group has [`MemoryBusConfig::event_partitions`]
//!   partitions; an event goes to the partition chosen by a hash of its device
//!   id, in every group at once. A group's partitions are shared out among its
//!   current members as evenly as possible, moving as few as possible when a
//!   member joins or leaves; a group with more members than partitions leaves
//!   the extra members idle.
//!
//! # Bounds and back-pressure
//!
//! A partition holds at most [`MemoryBusConfig::capacity`] messages: those
//! queued plus those delivered from the oldest unacknowledged one on (like the
//! span of a Kafka partition between the committed offset and the end). While
//! it is full, `send`, `broadcast` and `publish_event` wait. They are
//! cancel-safe: dropping one while it waits sends nothing.
//!
//! # What is particular to the memory bus
//!
//! - Nothing survives the process.
//! - **Events published while no consumer group exists are dropped.** A group
//!   exists from its first `subscribe_events` on, and keeps its partitions
//!   while it has no members, so a restarting member loses nothing.
//! - Supervisors and groups are never forgotten: one that never consumes
//!   again eventually makes senders to it wait (for a broadcast or an event:
//!   senders to everyone).
//! - When the last clone of a [`MemoryBus`] is dropped, each subscription
//!   delivers what is still queued for it and then ends with `Ok(None)`.
//! - A delivery handed back ([`Delivery::nack`](opamp_core::Delivery::nack))
//!   stays in flight and comes again to the same subscription once its delay
//!   is over; past [`MemoryBusConfig::max_deliveries`] it is taken out and
//!   kept in [`MemoryBus::dead_letters`], with the reason, instead.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use opamp_bus::memory::{MemoryBus, MemoryBusConfig};
//!
//! let bus = MemoryBus::with_config(MemoryBusConfig::default().with_capacity(256).with_event_partitions(4))?;
//! assert_eq!(bus.config().capacity, 256);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::{self, Debug};
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use async_trait::async_trait;
use opamp_core::{
    AckSink, Acker, Command, CommandBus, ConfigUpdate, DEFAULT_MAX_DELIVERIES, Delivery, DeviceEvent, DeviceId, Error,
    EventBus, GroupName, MessageStream, Result, Subscription, SupervisorId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::coop;
use tokio::time::Instant;

/// Bits of an acknowledgement token that name the partition; the rest hold
/// the delivery's sequence number within it.
const PARTITION_BITS: u32 = 16;
/// Sequence numbers wrap at 2^48, far beyond any number of messages in flight.
const SEQ_MASK: u64 = (1 << (64 - PARTITION_BITS)) - 1;

/// How a [`MemoryBus`] is sized.
///
/// ```
/// use opamp_bus::memory::MemoryBusConfig;
///
/// let config: MemoryBusConfig = serde_json::from_str(r#"{"capacity": 1024}"#)?;
/// assert_eq!(config, MemoryBusConfig::default().with_capacity(1024));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryBusConfig {
    /// The most messages one partition holds, queued and delivered but not yet
    /// acknowledged together; senders wait beyond it. At least 1.
    pub capacity: usize,
    /// How many partitions each consumer group's events are spread over, so
    /// at most how many members of one group share its events. 1 to 65 536.
    pub event_partitions: usize,
    /// How many times a message handed back is delivered before it goes to
    /// the dead letters instead. At least 1.
    pub max_deliveries: u32,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        MemoryBusConfig {
            capacity: 4096,
            event_partitions: 8,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

impl MemoryBusConfig {
    /// The same, holding at most `capacity` messages per partition.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// The same, spreading each group's events over `partitions` partitions.
    pub fn with_event_partitions(mut self, partitions: usize) -> Self {
        self.event_partitions = partitions;
        self
    }

    /// The same, delivering a message handed back at most `deliveries` times.
    pub fn with_max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::invalid_input("memory bus `capacity` must be at least 1"));
        }
        if self.max_deliveries == 0 {
            return Err(Error::invalid_input("memory bus `max_deliveries` must be at least 1"));
        }
        let most = 1 << PARTITION_BITS;
        if !(1..=most).contains(&self.event_partitions) {
            return Err(Error::invalid_input(format!(
                "memory bus `event_partitions` is {}; it must be from 1 to {most}",
                self.event_partitions
            )));
        }
        Ok(())
    }
}

/// A [`CommandBus`] and [`EventBus`] in process memory. Clones share the same queues.
///
/// See the [module documentation](self) for how it behaves.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: MemoryBusConfig,
    /// Whether any command was ever sent (for `holds_history`).
    sent: std::sync::atomic::AtomicBool,
    dead_letters: Arc<DeadLetters>,
    commands: RwLock<HashMap<SupervisorId, Arc<Group<Command>>, BuildHasherDefault<WordHash>>>,
    broadcasts: RwLock<BTreeMap<SupervisorId, Arc<Group<ConfigUpdate>>>>,
    events: RwLock<BTreeMap<GroupName, Arc<Group<DeviceEvent>>>>,
}

impl MemoryBus {
    /// A bus with the default configuration: 4096 messages per partition, 8 event partitions per group.
    pub fn new() -> Self {
        Self::build(MemoryBusConfig::default())
    }

    /// A bus with `config`; an [`Error::InvalidInput`] names a setting out of range.
    pub fn with_config(config: MemoryBusConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(config: MemoryBusConfig) -> Self {
        MemoryBus {
            inner: Arc::new(Inner {
                config,
                sent: std::sync::atomic::AtomicBool::new(false),
                dead_letters: Arc::default(),
                commands: RwLock::default(),
                broadcasts: RwLock::default(),
                events: RwLock::default(),
            }),
        }
    }

    /// The configuration the bus was made with.
    pub fn config(&self) -> &MemoryBusConfig {
        &self.inner.config
    }

    /// The messages handed back more often than
    /// [`MemoryBusConfig::max_deliveries`] allows, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock_plain(&self.inner.dead_letters.0).clone()
    }

    /// The event partition that `device`'s events go to in every group
    /// (stable: a hash of the id, modulo [`MemoryBusConfig::event_partitions`]).
    pub fn event_partition(&self, device: &DeviceId) -> usize {
        let mut hasher = WordHash::default();
        hasher.write(device.as_str().as_bytes());
        // Mixes the high bits in (the last multiplication leaves the low ones
        // weak); the remainder is below `event_partitions`, a `usize`.
        let hash = hasher.finish();
        ((hash ^ (hash >> 32)) % self.inner.config.event_partitions as u64) as usize
    }

    fn command_group(&self, supervisor: &SupervisorId) -> Arc<Group<Command>> {
        if let Some(group) = read(&self.inner.commands).get(supervisor) {
            return Arc::clone(group);
        }
        write(&self.inner.commands)
            .entry(*supervisor)
            .or_insert_with(|| Group::new(format!("commands for {supervisor}"), Mode::Exclusive, 1, &self.inner))
            .clone()
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("config", &self.inner.config)
            .field("supervisors", &read(&self.inner.commands).len())
            .field("broadcast_subscribers", &read(&self.inner.broadcasts).len())
            .field("event_groups", &read(&self.inner.events).len())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        fn close_all<'a, T: 'a>(groups: impl Iterator<Item = &'a Arc<Group<T>>>) {
            groups.for_each(|group| group.close());
        }
        close_all(self.commands.get_mut().unwrap_or_else(PoisonError::into_inner).values());
        close_all(
            self.broadcasts
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .values(),
        );
        close_all(self.events.get_mut().unwrap_or_else(PoisonError::into_inner).values());
    }
}

#[async_trait]
impl CommandBus for MemoryBus {
    async fn send(&self, supervisor: &SupervisorId, command: &Command) -> Result<()> {
        // Like tokio's own channels, a task that never has to wait still
        // yields now and then, so that it cannot starve the others.
        coop::consume_budget().await;
        // Read first: after the first send the flag's cache line stays shared.
        if !self.inner.sent.load(std::sync::atomic::Ordering::Relaxed) {
            self.inner.sent.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Most sends find room at once: those need neither a wait nor a
        // reference of their own to the supervisor's queue.
        if let Some(inbox) = read(&self.inner.commands)
            .get(supervisor)
            .and_then(|group| group.partitions.first())
            && inbox.try_put(command)
        {
            return Ok(());
        }
        // Boxed, so that the future of every send is not as large as this rare path's.
        Box::pin(async {
            let group = self.command_group(supervisor);
            put_all(&[(group, 0)], command).await;
        })
        .await;
        Ok(())
    }

    async fn subscribe(&self, supervisor: &SupervisorId) -> Result<Subscription<Command>> {
        Ok(Group::subscribe(self.command_group(supervisor)))
    }

    async fn broadcast(&self, update: &ConfigUpdate) -> Result<()> {
        coop::consume_budget().await;
        let targets: Vec<_> = read(&self.inner.broadcasts)
            .values()
            .map(|group| (Arc::clone(group), 0))
            .collect();
        put_all(&targets, update).await;
        Ok(())
    }

    async fn subscribe_broadcasts(&self, supervisor: &SupervisorId) -> Result<Subscription<ConfigUpdate>> {
        let group = write(&self.inner.broadcasts)
            .entry(*supervisor)
            .or_insert_with(|| Group::new(format!("broadcasts for {supervisor}"), Mode::Exclusive, 1, &self.inner))
            .clone();
        Ok(Group::subscribe(group))
    }

    async fn holds_history(&self) -> Result<bool> {
        Ok(self.inner.sent.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish_event(&self, event: &DeviceEvent) -> Result<()> {
        coop::consume_budget().await;
        let partition = self.event_partition(&event.device);
        let targets: Vec<_> = read(&self.inner.events)
            .values()
            .map(|group| (Arc::clone(group), partition))
            .collect();
        put_all(&targets, event).await;
        Ok(())
    }

    async fn subscribe_events(&self, group: &GroupName) -> Result<Subscription<DeviceEvent>> {
        let group = write(&self.inner.events)
            .entry(*group)
            .or_insert_with(|| {
                Group::new(
                    format!("events for group {group}"),
                    Mode::Shared,
                    self.inner.config.event_partitions,
                    &self.inner,
                )
            })
            .clone();
        Ok(Group::subscribe(group))
    }
}

/// Puts `message` into one partition of each target group, waiting while
/// any of them is full. Room is reserved in all of them before the message
/// goes into any, so a call cancelled while it waits has sent nothing.
async fn put_all<T: Clone>(targets: &[(Arc<Group<T>>, usize)], message: &T) {
    let inbox = |i: usize| {
        targets
            .get(i)
            .and_then(|(group, partition)| group.partitions.get(*partition))
    };
    // The target that was full last time: wait for room there, but only after
    // registering for the wake-up and trying again, so that none is missed.
    let mut waiting_on = None;
    loop {
        let mut room = pin!(waiting_on.and_then(inbox).map(|inbox| inbox.room.notified()));
        if let Some(room) = room.as_mut().as_pin_mut() {
            room.enable();
        }
        // Failing to reserve room notes, in that inbox, that a sender waits.
        let full = (0..targets.len()).find(|&i| {
            let reserved = inbox(i).is_none_or(Inbox::try_reserve);
            if !reserved {
                (0..i).filter_map(inbox).for_each(|inbox| inbox.release(1));
            }
            !reserved
        });
        match (full, room.as_pin_mut()) {
            (None, _) => break,
            (Some(full), Some(room)) if Some(full) == waiting_on => {
                // Acknowledgements from now on give room back at once; this
                // takes back what earlier ones freed but kept.
                if let Some((group, partition)) = targets.get(full) {
                    group.flush(*partition);
                }
                room.await;
            }
            (Some(full), _) => waiting_on = Some(full),
        }
    }
    (0..targets.len())
        .filter_map(inbox)
        .for_each(|inbox| inbox.put_reserved(message));
}

/// How a group shares its partitions among subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One subscription at a time: a newer one takes the stream over.
    Exclusive,
    /// Every subscription is a member with its share of the partitions.
    Shared,
}

/// A set of partitions consumed together: a supervisor's commands or
/// broadcasts, or one consumer group's events.
///
/// Each partition is split in two halves with a lock each, so that senders
/// and the consumer seldom wait for one another: senders append to its
/// [`Inbox`]; the consumer side ([`Consumers`]) takes the inbox's messages
/// over in bulk when it has delivered all it held, and tracks deliveries and
/// acknowledgements on its own. Room is counted under the inbox's lock; the
/// consumer side gives back what acknowledgements free in batches, and at
/// once when a sender waits. The consumer side's lock is taken before an
/// inbox's, never after.
struct Group<T> {
    label: String,
    mode: Mode,
    consumers: CacheAligned<Mutex<Consumers<T>>>,
    partitions: Box<[Inbox<T>]>,
    max_deliveries: u32,
    dead_letters: Arc<DeadLetters>,
}

/// A message handed back more often than the bus delivers one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Where it was consumed, e.g. `commands for supervisor-3`.
    pub stream: String,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// Why its consumer handed it back the last time.
    pub reason: String,
    /// The message, in its `Debug` form.
    pub message: String,
}

/// The bus's dead letters, shared by its groups.
#[derive(Debug, Default)]
struct DeadLetters(Mutex<Vec<DeadLetter>>);

/// Keeps what two threads write apart from each other's cache lines.
#[repr(align(128))]
struct CacheAligned<T>(T);

impl<T> std::ops::Deref for CacheAligned<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// The sending half of a partition. Senders write `queue`; acknowledgements
/// read the rest: each on cache lines of its own.
struct Inbox<T> {
    queue: CacheAligned<Mutex<InboxQueue<T>>>,
    capacity: usize,
    /// How much freed room the consumer side collects before giving it back.
    release_batch: usize,
    /// Set (under the queue's lock) by a sender that found no room; whoever
    /// gives room back then wakes it. Acknowledgements read it without that lock.
    senders_waiting: AtomicBool,
    room: Notify,
}

struct InboxQueue<T> {
    /// `Some` always: the consumer side appends them to its own slots.
    messages: VecDeque<Option<T>>,
    /// Messages in the partition: here, ready or in flight, and the room
    /// reserved for messages on their way here.
    len: usize,
    /// The consumer waiting for this partition, if any.
    consumer: Option<Waker>,
}

/// The consuming half of every partition of a group, and the group's members.
struct Consumers<T> {
    partitions: Box<[Window<T>]>,
    /// In the order they joined: older members keep the larger shares.
    members: Vec<Member>,
    next_member: u64,
    closed: bool,
}

/// The consumer's side of one partition: what it delivered and what is ready.
struct Window<T> {
    /// The first `delivered` slots are in flight, in delivery order (`None`
    /// once acknowledged); the rest are ready to deliver. The first has
    /// sequence number `base`.
    slots: VecDeque<Option<T>>,
    delivered: usize,
    base: u64,
    /// Acknowledged messages let go of, whose room senders do not have back yet.
    unreleased: usize,
    /// The member consuming this partition.
    owner: Option<u64>,
    /// Deliveries handed back at least once, by sequence number: empty
    /// unless a consumer hands some back, so a map beside the slots costs
    /// nothing on the usual path.
    retries: BTreeMap<u64, Retry>,
}

/// A delivery that was handed back.
struct Retry {
    /// The number of its next or current delivery.
    attempt: u32,
    /// When it is to be delivered again; `None` once it was.
    due: Option<Instant>,
}

struct Member {
    id: u64,
    /// The partitions this member consumes, and where it looks first next
    /// time, so that a busy partition does not starve the others.
    owned: Vec<usize>,
    cursor: usize,
    /// Set while the member waits for a message.
    waker: Option<Waker>,
}

/// What to do once the consumer side's lock is released.
#[derive(Default)]
struct Wakes {
    consumers: Vec<Waker>,
    /// (partition, messages that left it).
    released: Vec<(usize, usize)>,
}

impl Wakes {
    fn run<T>(self, group: &Group<T>) {
        self.consumers.into_iter().for_each(Waker::wake);
        for (partition, count) in self.released {
            if let Some(inbox) = group.partitions.get(partition) {
                inbox.release(count);
            }
        }
    }
}

impl<T> Group<T> {
    fn new(label: String, mode: Mode, partitions: usize, bus: &Inner) -> Arc<Self> {
        let config = &bus.config;
        Arc::new(Group {
            label,
            mode,
            max_deliveries: config.max_deliveries,
            dead_letters: Arc::clone(&bus.dead_letters),
            consumers: CacheAligned(Mutex::new(Consumers {
                partitions: (0..partitions).map(|_| Window::new()).collect(),
                members: Vec::new(),
                next_member: 1,
                closed: false,
            })),
            partitions: (0..partitions).map(|_| Inbox::new(config.capacity)).collect(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Consumers<T>> {
        // No code panics while holding the lock, and a poisoned queue is still consistent.
        self.consumers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        let wakes = self.lock().close();
        wakes.run(self);
    }

    /// The next message for `member`, with its acknowledgement token and
    /// which delivery of it this is; `Ready(None)` once the member is gone,
    /// or the bus closed and its partitions are empty.
    fn poll_next(&self, member: u64, cx: &mut Context<'_>) -> Poll<Option<(T, u64, u32)>>
    where
        T: Clone,
    {
        let mut consumers = self.lock();
        let Consumers {
            partitions,
            members,
            closed,
            ..
        } = &mut *consumers;
        let Some(member) = members.iter_mut().find(|m| m.id == member) else {
            return Poll::Ready(None);
        };
        let owned = member.owned.len();
        for step in 0..owned {
            let index = (member.cursor + step) % owned;
            let partition = member.owned[index];
            let (Some(window), Some(inbox)) = (partitions.get_mut(partition), self.partitions.get(partition)) else {
                continue;
            };
            if let Some((message, seq, attempt)) = window.deliver_again() {
                member.cursor = index + 1;
                return Poll::Ready(Some((message, (seq << PARTITION_BITS) | partition as u64, attempt)));
            }
            if window.slots.len() == window.delivered {
                let mut queue = inbox.lock();
                if queue.messages.is_empty() {
                    register(&mut queue.consumer, cx);
                    continue;
                }
                if window.slots.is_empty() {
                    // Nothing in flight (the usual case when each delivery is
                    // acknowledged before the next is asked for): no copying.
                    std::mem::swap(&mut window.slots, &mut queue.messages);
                } else {
                    window.slots.append(&mut queue.messages);
                }
            }
            if let Some((message, seq)) = window.deliver() {
                member.cursor = index + 1;
                return Poll::Ready(Some((message, (seq << PARTITION_BITS) | partition as u64, 1)));
            }
        }
        if *closed {
            return Poll::Ready(None);
        }
        register(&mut member.waker, cx);
        Poll::Pending
    }

    /// Records an acknowledgement. An unknown or stale token (its
    /// subscription ended) is ignored: that message is delivered again,
    /// which at-least-once allows.
    fn ack(&self, token: u64) {
        let partition = (token & ((1 << PARTITION_BITS) - 1)) as usize;
        let Some(inbox) = self.partitions.get(partition) else {
            return;
        };
        let released = {
            let mut consumers = self.lock();
            let Some(window) = consumers.partitions.get_mut(partition) else {
                return;
            };
            window.unreleased += window.ack(token >> PARTITION_BITS);
            // Room goes back to senders in batches, sparing them a contended
            // counter per message, and at once when one waits (see `flush`).
            if window.unreleased >= inbox.release_batch || inbox.senders_waiting.load(Relaxed) {
                std::mem::take(&mut window.unreleased)
            } else {
                0
            }
        };
        if released > 0 {
            inbox.release(released);
        }
    }

    /// Hands delivery `token` (its `attempt`th) back: delivered again after
    /// `retry_in`, or past the bound a dead letter, acknowledged. An unknown
    /// or stale token is ignored, as for [`ack`](Self::ack).
    fn nack(self: &Arc<Self>, token: u64, attempt: u32, retry_in: Duration, reason: String)
    where
        T: Debug + Send + 'static,
    {
        let partition = (token & ((1 << PARTITION_BITS) - 1)) as usize;
        let seq = token >> PARTITION_BITS;
        if attempt >= self.max_deliveries {
            let message = {
                let consumers = self.lock();
                consumers
                    .partitions
                    .get(partition)
                    .and_then(|window| window.in_flight(seq))
                    .map(|message| format!("{message:?}"))
            };
            let Some(message) = message else { return };
            tracing::warn!(stream = %self.label, deliveries = attempt, %reason, "a message handed back too often goes to the dead letters");
            lock_plain(&self.dead_letters.0).push(DeadLetter {
                stream: self.label.clone(),
                deliveries: attempt,
                reason,
                message,
            });
            return self.ack(token);
        }
        let due = Instant::now() + retry_in;
        let handed_back = self
            .lock()
            .partitions
            .get_mut(partition)
            .is_some_and(|window| window.hand_back(seq, attempt + 1, due));
        if handed_back {
            let group = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep_until(due).await;
                let wakers: Vec<Waker> = group.lock().members.iter_mut().filter_map(|m| m.waker.take()).collect();
                wakers.into_iter().for_each(Waker::wake);
            });
        }
    }

    /// Gives senders the room that acknowledgements in `partition` freed but
    /// did not give back yet. A sender calls it after announcing that it
    /// waits: acknowledgements after that see the announcement (the lock
    /// orders them) and give room back at once.
    fn flush(&self, partition: usize) {
        let released = self
            .lock()
            .partitions
            .get_mut(partition)
            .map_or(0, |window| std::mem::take(&mut window.unreleased));
        if let Some(inbox) = self.partitions.get(partition).filter(|_| released > 0) {
            inbox.release(released);
        }
    }
}

impl<T: Clone + Debug + Send + 'static> Group<T> {
    fn subscribe(group: Arc<Self>) -> Subscription<T> {
        let (member, wakes) = group.lock().join(group.mode);
        wakes.run(&group);
        let sink: Arc<dyn AckSink> = Arc::new(AckTo(Arc::clone(&group)));
        Box::new(MemoryStream { group, sink, member })
    }
}

/// Keeps `cx`'s waker in `slot`, cloning it only when it is another.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

impl<T> Inbox<T> {
    fn new(capacity: usize) -> Self {
        Inbox {
            queue: CacheAligned(Mutex::new(InboxQueue {
                messages: VecDeque::new(),
                len: 0,
                consumer: None,
            })),
            capacity,
            release_batch: (capacity / 8).clamp(1, 64),
            senders_waiting: AtomicBool::new(false),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxQueue<T>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a copy of `message` if there is room; otherwise notes that a sender waits.
    fn try_put(&self, message: &T) -> bool
    where
        T: Clone,
    {
        let consumer = {
            let mut queue = self.lock();
            if !self.take_room(&mut queue) {
                return false;
            }
            // Cloned straight into the queue: one copy of a large message fewer.
            queue.messages.push_back(Some(message.clone()));
            queue.consumer.take()
        };
        if let Some(consumer) = consumer {
            consumer.wake();
        }
        true
    }

    /// Reserves room for one message if there is any; otherwise notes that a sender waits.
    fn try_reserve(&self) -> bool {
        self.take_room(&mut self.lock())
    }

    fn take_room(&self, queue: &mut InboxQueue<T>) -> bool {
        if queue.len < self.capacity {
            queue.len += 1;
            return true;
        }
        // Relaxed is enough: the queue's lock orders this for senders and
        // givers of room, and the consumer side's lock (see `Group::flush`)
        // orders it for acknowledgements.
        self.senders_waiting.store(true, Relaxed);
        false
    }

    /// Gives back room for `count` messages and wakes the senders waiting for it.
    fn release(&self, count: usize) {
        let waiting = {
            let mut queue = self.lock();
            debug_assert!(queue.len >= count, "gives back more room than was taken");
            queue.len = queue.len.saturating_sub(count);
            self.senders_waiting.swap(false, Relaxed)
        };
        if waiting {
            self.room.notify_waiters();
        }
    }

    /// Queues a copy of `message`, for which room was reserved.
    fn put_reserved(&self, message: &T)
    where
        T: Clone,
    {
        let consumer = {
            let mut queue = self.lock();
            queue.messages.push_back(Some(message.clone()));
            queue.consumer.take()
        };
        if let Some(consumer) = consumer {
            consumer.wake();
        }
    }
}

impl<T> Window<T> {
    fn new() -> Self {
        Window {
            slots: VecDeque::new(),
            delivered: 0,
            base: 0,
            unreleased: 0,
            owner: None,
            retries: BTreeMap::new(),
        }
    }

    /// The message of delivery `seq`, if it is in flight.
    fn in_flight(&self, seq: u64) -> Option<&T> {
        let offset = seq.wrapping_sub(self.base) & SEQ_MASK;
        let index = usize::try_from(offset).ok().filter(|&index| index < self.delivered)?;
        self.slots.get(index)?.as_ref()
    }

    /// Marks delivery `seq`, in flight, to be delivered again at `due` as
    /// delivery number `attempt`; false if it is not in flight.
    fn hand_back(&mut self, seq: u64, attempt: u32, due: Instant) -> bool {
        if self.in_flight(seq).is_none() {
            return false;
        }
        self.retries.insert(
            seq,
            Retry {
                attempt,
                due: Some(due),
            },
        );
        true
    }

    /// Delivers again a message handed back whose delay is over, if any;
    /// returns it with its sequence number and which delivery this is.
    fn deliver_again(&mut self) -> Option<(T, u64, u32)>
    where
        T: Clone,
    {
        if self.retries.is_empty() {
            return None;
        }
        let now = Instant::now();
        let (seq, retry) = self
            .retries
            .iter_mut()
            .find(|(_, retry)| retry.due.is_some_and(|due| due <= now))?;
        retry.due = None;
        let (seq, attempt) = (*seq, retry.attempt);
        Some((self.in_flight(seq)?.clone(), seq, attempt))
    }

    /// Delivers the next ready message, keeping it in flight; returns it with its sequence number.
    fn deliver(&mut self) -> Option<(T, u64)>
    where
        T: Clone,
    {
        let message = self.slots.get(self.delivered)?.as_ref()?.clone();
        let seq = self.base.wrapping_add(self.delivered as u64) & SEQ_MASK;
        self.delivered += 1;
        Some((message, seq))
    }

    /// Marks delivery `seq` acknowledged; returns how many messages that let
    /// go (those acknowledged up to the oldest one still in flight).
    fn ack(&mut self, seq: u64) -> usize {
        let offset = seq.wrapping_sub(self.base) & SEQ_MASK;
        let Some(index) = usize::try_from(offset).ok().filter(|&index| index < self.delivered) else {
            return 0;
        };
        match self.slots.get_mut(index) {
            // Dropped in place: moving a large message out just to drop it costs.
            Some(slot @ Some(_)) => *slot = None,
            _ => return 0,
        }
        if !self.retries.is_empty() {
            self.retries.remove(&seq);
        }
        if index != 0 {
            return 0;
        }
        // Ready slots are never `None`, so this stops within the delivered ones.
        let released = self.slots.iter().take_while(|slot| slot.is_none()).count();
        self.slots.drain(..released);
        self.delivered -= released;
        self.base = self.base.wrapping_add(released as u64) & SEQ_MASK;
        released
    }

    /// Makes what is in flight and unacknowledged ready again, first and in
    /// order; later deliveries get fresh sequence numbers, so acknowledgements
    /// of the old ones are ignored. Returns how many acknowledged messages that let go.
    fn requeue(&mut self) -> usize {
        let delivered = self.delivered;
        let mut kept = 0;
        for index in 0..delivered {
            if self.slots[index].is_some() {
                self.slots.swap(kept, index);
                kept += 1;
            }
        }
        self.slots.drain(kept..delivered);
        // A new subscription counts deliveries afresh.
        self.retries.clear();
        self.delivered = 0;
        self.base = self.base.wrapping_add(delivered as u64) & SEQ_MASK;
        delivered - kept
    }
}

impl<T> Consumers<T> {
    /// Adds a member (first removing the current one, in exclusive mode) and shares the partitions out again.
    fn join(&mut self, mode: Mode) -> (u64, Wakes) {
        let mut wakes = Wakes::default();
        if mode == Mode::Exclusive {
            // The older subscription ends: wake it so that it sees it is gone.
            wakes.consumers.extend(self.members.drain(..).filter_map(|m| m.waker));
        }
        let id = self.next_member;
        self.next_member += 1;
        self.members.push(Member {
            id,
            owned: Vec::new(),
            cursor: 0,
            waker: None,
        });
        self.rebalance(&mut wakes);
        (id, wakes)
    }

    /// Removes a member, if it is still one, and shares its partitions out.
    fn leave(&mut self, member: u64) -> Wakes {
        let mut wakes = Wakes::default();
        let before = self.members.len();
        self.members.retain(|m| m.id != member);
        if self.members.len() != before {
            self.rebalance(&mut wakes);
        }
        wakes
    }

    /// Gives every partition an owner, keeping each where it is as far as an
    /// even share allows. A partition that changes owner makes what it had in
    /// flight ready again, for the new owner.
    fn rebalance(&mut self, wakes: &mut Wakes) {
        let members = self.members.len();
        let count = self.partitions.len();
        // The first `count % members` members (the oldest) get one more.
        let quota = |member: usize| count / members + usize::from(member < count % members);
        let mut owners: Vec<Option<usize>> = vec![None; count];
        if members > 0 {
            let mut shares = vec![0; members];
            for (owner, window) in owners.iter_mut().zip(self.partitions.iter()) {
                let current = window.owner.and_then(|id| self.members.iter().position(|m| m.id == id));
                if let Some(member) = current.filter(|&member| shares[member] < quota(member)) {
                    shares[member] += 1;
                    *owner = Some(member);
                }
            }
            // The quotas add up to the number of partitions, so every one finds an owner.
            let mut member = 0;
            for owner in owners.iter_mut().filter(|owner| owner.is_none()) {
                while member < members && shares[member] >= quota(member) {
                    member += 1;
                }
                if member < members {
                    shares[member] += 1;
                    *owner = Some(member);
                }
            }
        }
        for member in &mut self.members {
            member.owned.clear();
            member.cursor = 0;
        }
        for (partition, (window, owner)) in self.partitions.iter_mut().zip(owners).enumerate() {
            let id = owner.and_then(|member| self.members.get_mut(member)).map(|member| {
                member.owned.push(partition);
                member.id
            });
            if window.owner != id {
                window.owner = id;
                let released = window.requeue();
                if released > 0 {
                    wakes.released.push((partition, released));
                }
            }
        }
        // Waiting members look again: they may have partitions with messages
        // now, and must register with those partitions' inboxes.
        wakes
            .consumers
            .extend(self.members.iter_mut().filter_map(|m| m.waker.take()));
    }

    /// Ends every subscription once it has drained its partitions.
    fn close(&mut self) -> Wakes {
        self.closed = true;
        Wakes {
            consumers: self.members.iter_mut().filter_map(|m| m.waker.take()).collect(),
            released: Vec::new(),
        }
    }
}

impl<T> fmt::Debug for Group<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("label", &self.label)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Where a subscription's deliveries are acknowledged: an object of its own,
/// so that counting references to it per delivery does not touch the cache
/// lines that senders use.
struct AckTo<T>(Arc<Group<T>>);

impl<T> fmt::Debug for AckTo<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AckTo").field(&self.0.label).finish()
    }
}

#[async_trait]
impl<T: Debug + Send + 'static> AckSink for AckTo<T> {
    async fn ack(&self, token: u64) -> Result<()> {
        self.0.ack(token);
        Ok(())
    }

    async fn nack(&self, token: u64, attempt: u32, retry_in: Duration, reason: String) -> Result<()> {
        self.0.nack(token, attempt, retry_in, reason);
        Ok(())
    }
}

/// A subscription: one member of a group.
struct MemoryStream<T> {
    group: Arc<Group<T>>,
    sink: Arc<dyn AckSink>,
    member: u64,
}

impl<T> fmt::Debug for MemoryStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStream")
            .field("group", &self.group.label)
            .field("member", &self.member)
            .finish()
    }
}

#[async_trait]
impl<T: Clone + Debug + Send + 'static> MessageStream<T> for MemoryStream<T> {
    async fn next(&mut self) -> Result<Option<Delivery<T>>> {
        let next = poll_fn(|cx| {
            // A consumer that always finds messages yields now and then all the same.
            let budget = ready!(coop::poll_proceed(cx));
            // Made here, so that the message is moved as few times as may be.
            let delivery = |(message, token, attempt)| {
                Delivery::new(message, Acker::new(Arc::clone(&self.sink), token).with_attempt(attempt))
            };
            let next = self.group.poll_next(self.member, cx).map(|next| next.map(delivery));
            if next.is_ready() {
                budget.made_progress();
            }
            next
        });
        Ok(next.await)
    }
}

impl<T> Drop for MemoryStream<T> {
    fn drop(&mut self) {
        let wakes = self.group.lock().leave(self.member);
        wakes.run(&self.group);
    }
}

fn lock_plain<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A fast hash that is the same in every process, for partitioning events
/// by device and for the supervisor map: a word at a time, like the Rust
/// compiler's FxHash. Not proof against chosen keys, which is fine for
/// validated ids from the same deployment.
#[derive(Default)]
struct WordHash(u64);

impl Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0; 8];
            buf.copy_from_slice(word);
            self.add(u64::from_le_bytes(buf));
        }
        let mut rest = [0; 8];
        rest[..words.remainder().len()].copy_from_slice(words.remainder());
        self.add(u64::from_le_bytes(rest) ^ words.remainder().len() as u64);
    }
}

impl WordHash {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}
