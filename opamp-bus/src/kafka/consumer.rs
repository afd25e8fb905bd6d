//! One subscription: a librdkafka consumer on a thread of its own, feeding a
//! stream of deliveries, committing what was acknowledged.
//!
//! The thread polls the consumer, decodes each message and hands it to the
//! stream through a channel. Everything it handed over and that is not
//! acknowledged yet is *in flight*; a partition with too much in flight is
//! paused at the broker (not buffered), and resumed as acknowledgements come.
//! Every `commit_interval` the thread commits, per partition, the oldest
//! offset still in flight (the contiguous acknowledged prefix).
//!
//! A delivery handed back (`nack`) stays in flight: the subscription keeps
//! the bytes of every message in flight, and the thread decodes and delivers
//! them again once the delay is over, or, past `max_deliveries`, copies them
//! to the dead-letter topic, after which the offset counts as done.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opamp_core::{AckSink, Acker, Delivery, Error, MessageStream, Result, Subscription};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};

use super::error::{KafkaBusError, client_error};
use super::offsets::PartitionOffsets;
use super::partitioner::key_partition;

/// How long one poll of the consumer waits for a message: how quickly the
/// thread notices a stop, a drain or a due commit while nothing arrives.
const POLL: Duration = Duration::from_millis(20);
/// The first and the longest wait before a consumer is made again after a failure.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often a subscription that places its partitions itself (commands,
/// broadcasts) reads the topic's partition count again: partitions added to
/// the topic are read from then on, as producers send to them once their
/// own metadata shows them.
const PARTITIONS_CHECK: Duration = Duration::from_secs(5);

/// What became of a message read from the topic.
pub(super) enum Decoded<T> {
    /// A message for this subscription.
    Message(T),
    /// Not for this subscription (another supervisor's command sharing the partition).
    NotOurs,
    /// Undecodable: copied to the dead-letter topic and skipped. Says why.
    Poison(String),
}

/// Reads a message's key and value.
pub(super) type Decoder<T> = Box<dyn Fn(Option<&[u8]>, Option<&[u8]>) -> Decoded<T> + Send>;

/// Which partitions a subscription reads.
pub(super) enum Placement {
    /// The one partition `key` maps to; a new group starts at the beginning (commands).
    KeyPartition(Vec<u8>),
    /// Every partition; a new group starts at the end, as of subscribing (broadcasts).
    AllFromNow,
    /// The group's share, assigned by the broker's group protocol; a new
    /// group starts at the beginning (events).
    Group,
}

impl Placement {
    /// The partitions to read of a topic of `count` partitions (none for
    /// [`Placement::Group`], whose share the broker assigns).
    fn partitions(&self, count: i32) -> Vec<i32> {
        match self {
            Placement::KeyPartition(key) => vec![key_partition(key, count)],
            Placement::AllFromNow => (0..count).collect(),
            Placement::Group => Vec::new(),
        }
    }
}

/// What one subscription reads.
pub(super) struct Spec<T> {
    /// For logs and errors, e.g. `commands for supervisor-3`.
    pub(super) what: String,
    /// The topic.
    pub(super) topic: String,
    /// The consumer group whose committed offsets it keeps.
    pub(super) group: String,
    /// Which partitions.
    pub(super) placement: Placement,
    /// How messages are read.
    pub(super) decode: Decoder<T>,
    /// Its `fetch.wait.max.ms`, when not the bus's.
    pub(super) fetch_wait: Option<std::time::Duration>,
}

/// What every subscription of a bus shares.
pub(super) struct Env {
    /// librdkafka settings common to every consumer (brokers, user properties).
    pub(super) consumer: ClientConfig,
    /// The most messages in flight in one partition before it is paused.
    pub(super) max_in_flight_per_partition: usize,
    /// The most messages in flight in one subscription before all its partitions are paused.
    pub(super) max_in_flight: usize,
    /// How many times a message handed back is delivered before it is dead-lettered.
    pub(super) max_deliveries: u32,
    /// How often acknowledged offsets are committed.
    pub(super) commit_interval: Duration,
    /// How long a request to the broker may take (metadata, offsets, sends).
    pub(super) request_timeout: Duration,
    /// Where undecodable messages are copied to.
    pub(super) dead_letter_topic: String,
    /// The bus's producer, for the dead-letter copies.
    pub(super) producer: FutureProducer<Logs>,
    /// Counters for [`KafkaBus::stats`](super::KafkaBus::stats).
    pub(super) counters: Counters,
}

/// Running totals of a bus, over all its subscriptions.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) dead_lettered: AtomicU64,
    pub(super) consumer_restarts: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) offset_gaps: AtomicU64,
}

/// How a subscription's thread is told to end.
#[derive(Debug)]
pub(super) struct Control {
    mode: AtomicU8,
    drain_until: Mutex<Option<Instant>>,
    done: watch::Sender<bool>,
    shared: Arc<Shared>,
    /// What was still in flight when the subscription ended.
    left: AtomicUsize,
}

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const STOP: u8 = 2;

impl Control {
    /// Ends the subscription now: what it delivered and was not acknowledged
    /// comes again to the next subscriber.
    pub(super) fn stop(&self) {
        self.mode.store(STOP, Relaxed);
    }

    /// Ends the subscription gracefully: it reads nothing more, lets the
    /// consumer take and acknowledge what was fetched already (until
    /// `deadline`), commits, and closes.
    pub(super) fn drain(&self, deadline: Instant) {
        *lock(&self.drain_until) = Some(deadline);
        let _ = self.mode.compare_exchange(RUN, DRAIN, Relaxed, Relaxed);
    }

    /// Waits until the subscription's thread has committed and closed its consumer.
    pub(super) async fn finished(&self) {
        let mut done = self.done.subscribe();
        // The sender lives in `self`: it cannot be dropped while this waits.
        let _ = done.wait_for(|done| *done).await;
    }

    /// Whether the subscription was told to end (it may still be committing).
    pub(super) fn is_ending(&self) -> bool {
        self.mode.load(Relaxed) != RUN
    }

    /// Whether the thread has finished.
    pub(super) fn is_finished(&self) -> bool {
        *self.done.borrow()
    }

    /// What was still in flight when the subscription ended (it comes again
    /// to the next subscriber).
    pub(super) fn left_in_flight(&self) -> usize {
        self.left.load(Relaxed)
    }

    /// Messages delivered (or being dead-lettered) and not yet done.
    pub(super) fn in_flight(&self) -> usize {
        self.shared.state().in_flight()
    }

    /// Partitions paused for back-pressure.
    pub(super) fn paused(&self) -> usize {
        self.shared.state().parts.values().filter(|part| part.paused).count()
    }
}

/// Starts a subscription: its thread, and the stream it feeds. Returns once
/// the consumer reads its partitions (for a group: once it was first assigned
/// its share), so that what is sent afterwards reaches it.
pub(super) async fn subscribe<T: Send + 'static>(
    env: Arc<Env>,
    spec: Spec<T>,
) -> Result<(Subscription<T>, Arc<Control>)> {
    let what = spec.what.clone();
    let shared = Arc::new(Shared {
        what: what.clone(),
        max_deliveries: env.max_deliveries,
        state: Mutex::default(),
    });
    let control = Arc::new(Control {
        mode: AtomicU8::new(RUN),
        drain_until: Mutex::new(None),
        done: watch::Sender::new(false),
        shared: Arc::clone(&shared),
        left: AtomicUsize::new(0),
    });
    let (ready, is_ready) = oneshot::channel();
    lock(&shared.state).ready = Some(ready);
    let (deliveries, receiver) = mpsc::unbounded_channel();
    let wait = env.request_timeout.saturating_mul(3);
    let worker = Worker {
        env,
        spec,
        shared: Arc::clone(&shared),
        deliveries,
        control: Arc::clone(&control),
        runtime: Handle::current(),
    };
    std::thread::Builder::new()
        .name("opamp-kafka-consumer".into())
        .spawn(move || worker.run())
        .map_err(|err| Error::backend("kafka", format!("starting the consumer thread for {what}"), err))?;

    let failed = match tokio::time::timeout(wait, is_ready).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(err))) => Some(err),
        Ok(Err(_)) => Some(Error::unavailable(format!(
            "the consumer for {what} ended while starting"
        ))),
        Err(_) => Some(Error::timeout(format!("subscribing to {what}"))),
    };
    if let Some(err) = failed {
        control.stop();
        return Err(err);
    }
    let stream = Stream {
        receiver,
        shared,
        control: Arc::clone(&control),
    };
    Ok((Box::new(stream), control))
}

/// A message on its way to the stream.
struct Item<T> {
    message: T,
    token: u64,
    partition: i32,
    epoch: u64,
    /// Which delivery of the message this is, from 1.
    attempt: u32,
}

/// The stream side of a subscription.
struct Stream<T> {
    receiver: mpsc::UnboundedReceiver<Item<T>>,
    shared: Arc<Shared>,
    control: Arc<Control>,
}

impl<T> fmt::Debug for Stream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscription")
            .field("what", &self.shared.what)
            .finish()
    }
}

#[async_trait]
impl<T: Send> MessageStream<T> for Stream<T> {
    async fn next(&mut self) -> Result<Option<Delivery<T>>> {
        while let Some(item) = self.receiver.recv().await {
            // A message of a partition that moved to another member since it
            // was read is that member's now.
            if self.shared.state().is_current(item.partition, item.epoch) {
                let acker =
                    Acker::new(Arc::clone(&self.shared) as Arc<dyn AckSink>, item.token).with_attempt(item.attempt);
                return Ok(Some(Delivery::new(item.message, acker)));
            }
        }
        Ok(None)
    }
}

impl<T> Drop for Stream<T> {
    fn drop(&mut self) {
        self.control.stop();
    }
}

/// The state a subscription's thread, its stream and its ackers share.
pub(super) struct Shared {
    what: String,
    max_deliveries: u32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Once ended: acknowledgements have no effect.
    closed: bool,
    parts: BTreeMap<i32, Part>,
    /// Delivery tokens → the message in flight.
    tokens: HashMap<u64, Taken>,
    /// Deliveries handed back, to be delivered again when due.
    retries: Vec<(Instant, Taken)>,
    /// Deliveries handed back too often, to be dead-lettered, with why.
    dead: Vec<(Taken, String)>,
    next_token: u64,
    next_epoch: u64,
    /// An error the consumer reported that calls for making it again.
    failed: Option<KafkaError>,
    /// Told once the subscription reads its partitions.
    ready: Option<oneshot::Sender<Result<()>>>,
}

/// One partition this subscription reads.
struct Part {
    /// Which assignment of the partition this is (bumped when it moves away and back).
    epoch: u64,
    offsets: PartitionOffsets,
    paused: bool,
}

#[derive(Clone, Copy)]
struct Origin {
    partition: i32,
    offset: i64,
    epoch: u64,
}

/// A message delivered and not yet done: where it came from, which delivery
/// it is, and its bytes, to deliver it again or dead-letter it.
struct Taken {
    origin: Origin,
    attempt: u32,
    key: Option<Box<[u8]>>,
    value: Option<Box<[u8]>>,
}

impl Taken {
    /// `message`, read in assignment `epoch` of its partition, as delivery number `attempt`.
    fn of(message: &BorrowedMessage<'_>, epoch: u64, attempt: u32) -> Self {
        Taken {
            origin: Origin {
                partition: message.partition(),
                offset: message.offset(),
                epoch,
            },
            attempt,
            key: message.key().map(Box::from),
            value: message.payload().map(Box::from),
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl AckSink for Shared {
    async fn ack(&self, token: u64) -> Result<()> {
        let mut state = self.state();
        if !state.closed
            && let Some(taken) = state.tokens.remove(&token)
        {
            state.finish(taken.origin);
        }
        Ok(())
    }

    async fn nack(&self, token: u64, attempt: u32, retry_in: Duration, reason: String) -> Result<()> {
        let mut state = self.state();
        if state.closed {
            return Ok(());
        }
        if let Some(mut taken) = state.tokens.remove(&token) {
            taken.attempt = attempt;
            if attempt >= self.max_deliveries {
                state.dead.push((taken, reason));
            } else {
                taken.attempt += 1;
                state.retries.push((Instant::now() + retry_in, taken));
            }
        }
        Ok(())
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn ready(&self, result: Result<()>) {
        if let Some(ready) = self.state().ready.take() {
            let _ = ready.send(result);
        }
    }
}

impl State {
    fn is_current(&self, partition: i32, epoch: u64) -> bool {
        !self.closed && self.parts.get(&partition).is_some_and(|part| part.epoch == epoch)
    }

    fn finish(&mut self, origin: Origin) {
        if let Some(part) = self.parts.get_mut(&origin.partition)
            && part.epoch == origin.epoch
        {
            part.offsets.finish(origin.offset);
        }
    }

    fn in_flight(&self) -> usize {
        self.parts.values().map(|part| part.offsets.in_flight()).sum()
    }

    /// Starts reading `partition` (again), from `start` if known.
    fn add(&mut self, partition: i32, start: Option<i64>) {
        self.next_epoch += 1;
        let part = Part {
            epoch: self.next_epoch,
            offsets: PartitionOffsets::starting_at(start),
            paused: false,
        };
        self.parts.insert(partition, part);
    }

    /// Stops reading `partitions`: forgets them and their deliveries.
    fn remove(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.parts.remove(partition);
        }
        self.tokens
            .retain(|_, taken| !partitions.contains(&taken.origin.partition));
        self.retries
            .retain(|(_, taken)| !partitions.contains(&taken.origin.partition));
        self.dead
            .retain(|(taken, _)| !partitions.contains(&taken.origin.partition));
    }

    /// The offsets to commit now for `partitions` (all if `None`) of `topic`.
    fn take_commit(&mut self, topic: &str, partitions: Option<&[i32]>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (partition, part) in &mut self.parts {
            if partitions.is_none_or(|only| only.contains(partition))
                && let Some(offset) = part.offsets.take_commit()
            {
                // Only fails for an offset librdkafka cannot represent; never ours.
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(offset));
            }
        }
        list
    }

    /// Forgets the commits of `list`, which failed, so that the next round tries again.
    fn commit_failed(&mut self, list: &TopicPartitionList) {
        for element in list.elements() {
            if let (Some(part), Offset::Offset(offset)) = (self.parts.get_mut(&element.partition()), element.offset()) {
                part.offsets.commit_failed(offset);
            }
        }
    }

    /// Where each partition is read from: after the last message taken, or
    /// where it started (the beginning, when nothing was committed).
    fn assignment(&self, topic: &str) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (partition, part) in &self.parts {
            let offset = part.offsets.next().map_or(Offset::Beginning, Offset::Offset);
            let _ = list.add_partition_offset(topic, *partition, offset);
        }
        list
    }
}

/// The consumer's callbacks: rebalances, commit results, logs.
struct Context {
    shared: Arc<Shared>,
    topic: String,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(subscription = %self.shared.what, %error, reason, "kafka consumer error");
        if needs_restart(&error) {
            self.shared.state().failed = Some(error);
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions = partitions_of(list);
            // What was acknowledged is committed while the partitions are
            // still ours; what was not goes to their next owner.
            let commit = self.shared.state().take_commit(&self.topic, Some(&partitions));
            if commit.count() > 0
                && let Err(error) = consumer.commit(&commit, CommitMode::Sync)
            {
                tracing::warn!(subscription = %self.shared.what, %error, "committing revoked partitions failed");
            }
            self.shared.state().remove(&partitions);
            tracing::debug!(subscription = %self.shared.what, ?partitions, "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list);
                {
                    let mut state = self.shared.state();
                    for partition in &partitions {
                        state.add(*partition, None);
                    }
                }
                tracing::debug!(subscription = %self.shared.what, ?partitions, "partitions assigned");
                self.shared.ready(Ok(()));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(subscription = %self.shared.what, %error, "rebalance failed");
            }
        }
    }
}

/// The bus's producer's callbacks: logs only.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Logs;

impl ClientContext for Logs {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka producer error");
    }
}

/// librdkafka's log lines, into `tracing`.
fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|element| element.partition()).collect()
}

/// A subscription's thread.
struct Worker<T> {
    env: Arc<Env>,
    spec: Spec<T>,
    shared: Arc<Shared>,
    deliveries: mpsc::UnboundedSender<Item<T>>,
    control: Arc<Control>,
    runtime: Handle,
}

impl<T: Send + 'static> Worker<T> {
    fn run(self) {
        let first = self.connect(true);
        let mut consumer = match first {
            Ok(consumer) => {
                if !matches!(self.spec.placement, Placement::Group) {
                    self.shared.ready(Ok(()));
                }
                Some(consumer)
            }
            Err(err) => {
                self.shared.ready(Err(err));
                None
            }
        };
        if consumer.is_some() {
            self.serve(&mut consumer);
        }
        // Frozen first, so that the last commit holds every acknowledgement that counts.
        {
            let mut state = self.shared.state();
            state.closed = true;
            self.control.left.store(state.in_flight(), Relaxed);
        }
        if let Some(consumer) = &consumer {
            self.last_commit(consumer);
        }
        // Closing a group member leaves the group (its revocation commits nothing new).
        drop(consumer);
        drop(self.deliveries);
        self.control.done.send_replace(true);
        tracing::debug!(subscription = %self.shared.what, "subscription ended");
    }

    /// Polls, delivers and commits until told to end, making the consumer
    /// again when it fails.
    fn serve(&self, consumer: &mut Option<BaseConsumer<Context>>) {
        let mut backoff = RESTART_BACKOFF.0;
        let mut last_commit = Instant::now();
        let mut last_check = Instant::now();
        loop {
            let draining = match self.control.mode.load(Relaxed) {
                RUN => false,
                DRAIN => true,
                _ => return,
            };
            if self.deliveries.is_closed() {
                return;
            }
            if draining {
                let past = lock(&self.control.drain_until).is_none_or(|until| Instant::now() >= until);
                if past || self.shared.state().in_flight() == 0 {
                    return;
                }
            }
            let Some(current) = consumer.as_ref() else {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RESTART_BACKOFF.1);
                match self.connect(false) {
                    Ok(made) => {
                        // What the old consumer reported while closing is not about this one.
                        self.shared.state().failed = None;
                        *consumer = Some(made);
                    }
                    Err(error) => {
                        tracing::warn!(subscription = %self.shared.what, %error, "making the consumer again failed");
                    }
                }
                continue;
            };
            if last_check.elapsed() >= PARTITIONS_CHECK {
                last_check = Instant::now();
                if let Err(error) = self.follow_partitions(current) {
                    tracing::info!(subscription = %self.shared.what, %error, "checking the topic's partitions failed; will try again");
                }
            }
            self.flow(current, draining);
            self.hand_back_due();
            if last_commit.elapsed() >= self.env.commit_interval {
                let _ = self.commit(current);
                last_commit = Instant::now();
            }
            // Errors come from the poll, or through the error callback.
            let reported = self.shared.state().failed.take();
            let error = match current.poll(POLL) {
                Some(Ok(message)) => {
                    backoff = RESTART_BACKOFF.0;
                    self.take(current, &message);
                    reported
                }
                Some(Err(error)) => reported.or(Some(error)),
                None => reported,
            };
            match error {
                Some(error) if needs_restart(&error) => {
                    tracing::warn!(subscription = %self.shared.what, %error, "kafka consumer failed; making it again");
                    self.env.counters.consumer_restarts.fetch_add(1, Relaxed);
                    *consumer = None;
                }
                Some(error) => {
                    tracing::info!(subscription = %self.shared.what, %error, "kafka consumer reported an error");
                }
                None => {}
            }
        }
    }

    /// Makes the consumer and gives it its partitions: the first time from
    /// the committed offsets (or the start rule of the placement), later from
    /// where the previous consumer left off.
    fn connect(&self, first: bool) -> Result<BaseConsumer<Context>> {
        let what = &self.shared.what;
        let topic = &self.spec.topic;
        let context = Context {
            shared: Arc::clone(&self.shared),
            topic: topic.clone(),
        };
        let mut config = self.env.consumer.clone();
        config.set("group.id", &self.spec.group);
        if let Some(wait) = self.spec.fetch_wait {
            config.set("fetch.wait.max.ms", wait.as_millis().to_string());
            // librdkafka wants its request deadline a second above the fetch wait.
            let deadline = self.env.request_timeout.max(wait + Duration::from_secs(1));
            config.set("socket.timeout.ms", deadline.as_millis().to_string());
        }
        let consumer: BaseConsumer<Context> = config
            .create_with_context(context)
            .map_err(|err| client_error(format!("making the consumer for {what}"), err))?;
        let timeout = self.env.request_timeout;
        let partitions = match &self.spec.placement {
            Placement::Group => {
                // A restarted member rejoins; its old share was revoked on close.
                consumer
                    .subscribe(&[topic])
                    .map_err(|err| client_error(format!("subscribing to {what}"), err))?;
                return Ok(consumer);
            }
            _ if !first => None,
            placement => Some(placement.partitions(partition_count(&consumer, topic, timeout)?)),
        };
        if let Some(partitions) = partitions {
            let starts = self.start_offsets(&consumer, &partitions)?;
            let mut state = self.shared.state();
            for (partition, start) in partitions.into_iter().zip(starts) {
                state.add(partition, start);
            }
        }
        let assignment = self.shared.state().assignment(topic);
        consumer
            .assign(&assignment)
            .map_err(|err| client_error(format!("assigning {assignment:?} for {what}"), err))?;
        Ok(consumer)
    }

    /// Reads, for a subscription that places its partitions itself, the
    /// partitions to read now: the key's partition under the topic's current
    /// partition count (commands), or every partition (broadcasts). Those not
    /// read yet are added, from the group's committed offset or else the
    /// beginning (everything in a partition added since came after it was);
    /// those read already stay, for what was sent to them before producers
    /// saw the new count.
    fn follow_partitions(&self, consumer: &BaseConsumer<Context>) -> Result<()> {
        let (topic, timeout) = (&self.spec.topic, self.env.request_timeout);
        if matches!(self.spec.placement, Placement::Group) {
            return Ok(());
        }
        let count = partition_count(consumer, topic, timeout)?;
        let added: Vec<i32> = {
            let state = self.shared.state();
            self.spec
                .placement
                .partitions(count)
                .into_iter()
                .filter(|partition| !state.parts.contains_key(partition))
                .collect()
        };
        if added.is_empty() {
            return Ok(());
        }
        let starts = self.committed_offsets(consumer, &added)?;
        let assignment = {
            let mut state = self.shared.state();
            for (partition, start) in added.iter().zip(starts) {
                state.add(*partition, start);
            }
            // A new assignment resumes every partition: pausing starts afresh.
            state.parts.values_mut().for_each(|part| part.paused = false);
            state.assignment(topic)
        };
        consumer
            .assign(&assignment)
            .map_err(|err| client_error(format!("assigning {assignment:?} for {}", self.shared.what), err))?;
        tracing::info!(subscription = %self.shared.what, partitions = ?added, "the topic has new partitions; reading them too");
        Ok(())
    }

    /// The group's committed offset in each of `partitions`, if any.
    fn committed_offsets(&self, consumer: &BaseConsumer<Context>, partitions: &[i32]) -> Result<Vec<Option<i64>>> {
        let (what, topic, timeout) = (&self.shared.what, &self.spec.topic, self.env.request_timeout);
        let mut asked = TopicPartitionList::new();
        for partition in partitions {
            asked.add_partition(topic, *partition);
        }
        let committed = consumer
            .committed_offsets(asked, timeout)
            .map_err(|err| client_error(format!("reading the committed offsets of {what}"), err))?;
        Ok(partitions
            .iter()
            .map(|partition| {
                committed
                    .find_partition(topic, *partition)
                    .and_then(|element| element.offset().to_raw())
                    .filter(|offset| *offset >= 0)
            })
            .collect())
    }

    /// Where a new subscription starts in each of `partitions`: at the
    /// group's committed offset; without one, at the beginning
    /// ([`Placement::KeyPartition`]) or at the end as of now
    /// ([`Placement::AllFromNow`], committed at once so that a restart
    /// resumes there).
    fn start_offsets(&self, consumer: &BaseConsumer<Context>, partitions: &[i32]) -> Result<Vec<Option<i64>>> {
        let (what, topic, timeout) = (&self.shared.what, &self.spec.topic, self.env.request_timeout);
        let committed = self.committed_offsets(consumer, partitions)?;
        let mut starts = Vec::with_capacity(partitions.len());
        let mut now_committed = TopicPartitionList::new();
        for (partition, offset) in partitions.iter().zip(committed) {
            let start = match (offset, &self.spec.placement) {
                (Some(offset), _) => Some(offset),
                (None, Placement::AllFromNow) => {
                    let (_, high) = consumer
                        .fetch_watermarks(topic, *partition, timeout)
                        .map_err(|err| client_error(format!("reading the end of {topic}/{partition}"), err))?;
                    let _ = now_committed.add_partition_offset(topic, *partition, Offset::Offset(high));
                    Some(high)
                }
                (None, _) => None,
            };
            starts.push(start);
        }
        if now_committed.count() > 0 {
            consumer
                .commit(&now_committed, CommitMode::Sync)
                .map_err(|err| client_error(format!("committing where {what} starts"), err))?;
        }
        Ok(starts)
    }

    /// Pauses the partitions with too much in flight (all of them while
    /// draining) and resumes the others.
    fn flow(&self, consumer: &BaseConsumer<Context>, draining: bool) {
        let topic = &self.spec.topic;
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        {
            let mut state = self.shared.state();
            let all = draining || state.in_flight() >= self.env.max_in_flight;
            for (partition, part) in &mut state.parts {
                let paused = all || part.offsets.in_flight() >= self.env.max_in_flight_per_partition;
                if paused != part.paused {
                    part.paused = paused;
                    let list = if paused { &mut pause } else { &mut resume };
                    list.add_partition(topic, *partition);
                }
            }
        }
        for (list, verb) in [(pause, "pausing"), (resume, "resuming")] {
            if list.count() > 0
                && let Err(error) = if verb == "pausing" {
                    consumer.pause(&list)
                } else {
                    consumer.resume(&list)
                }
            {
                tracing::warn!(subscription = %self.shared.what, %error, "{verb} partitions failed");
            }
        }
    }

    /// Commits the acknowledged prefix of every partition, and waits for the
    /// broker's answer: one commit at a time, since two in flight could be
    /// applied out of order, the older offset last. Returns whether it
    /// succeeded; a failed commit is tried again by the next call.
    fn commit(&self, consumer: &BaseConsumer<Context>) -> bool {
        let list = self.shared.state().take_commit(&self.spec.topic, None);
        if list.count() == 0 {
            return true;
        }
        match consumer.commit(&list, CommitMode::Sync) {
            Ok(()) => true,
            Err(error) => {
                tracing::info!(subscription = %self.shared.what, %error, "committing offsets failed; will try again");
                self.shared.state().commit_failed(&list);
                false
            }
        }
    }

    /// The last commit of the subscription, tried again for up to a request
    /// timeout (a group coordinator that moved or restarted answers again soon).
    fn last_commit(&self, consumer: &BaseConsumer<Context>) {
        let deadline = Instant::now() + self.env.request_timeout;
        while !self.commit(consumer) {
            if Instant::now() >= deadline {
                tracing::warn!(
                    subscription = %self.shared.what,
                    "the last commit failed: what was acknowledged since the one before comes again"
                );
                return;
            }
            std::thread::sleep(RESTART_BACKOFF.0);
        }
    }

    /// Handles one message: delivers it, skips it, or dead-letters it.
    fn take(&self, consumer: &BaseConsumer<Context>, message: &BorrowedMessage<'_>) {
        let (partition, offset) = (message.partition(), message.offset());
        let mut state = self.shared.state();
        let Some(part) = state.parts.get_mut(&partition) else {
            return;
        };
        if part.offsets.in_flight() >= self.env.max_in_flight_per_partition {
            // Read before the pause took effect: read it again after the resume.
            drop(state);
            if let Err(error) = consumer.seek(&self.spec.topic, partition, Offset::Offset(offset), Duration::ZERO) {
                tracing::warn!(subscription = %self.shared.what, %error, "seeking back over a full partition failed");
            }
            return;
        }
        if let Some(from) = part.offsets.unread_gap(offset) {
            // A broker may skip a batch it has not finished storing (tansu
            // 0.6.0 raises the high watermark first): read from the gap again
            // once rather than lose what it held. (A seek with no timeout
            // only asks the consumer's thread; nothing calls back here.)
            match consumer.seek(&self.spec.topic, partition, Offset::Offset(from), Duration::ZERO) {
                Ok(()) => {
                    self.env.counters.offset_gaps.fetch_add(1, Relaxed);
                    tracing::warn!(
                        subscription = %self.shared.what,
                        partition,
                        from,
                        to = offset,
                        "the broker skipped offsets; reading them again"
                    );
                    return;
                }
                // Not read again, then: what came is taken rather than dropped too.
                Err(error) => tracing::warn!(
                    subscription = %self.shared.what,
                    partition,
                    from,
                    to = offset,
                    %error,
                    "the broker skipped offsets, and seeking back to them failed; going on"
                ),
            }
        }
        let epoch = part.epoch;
        match (self.spec.decode)(message.key(), message.payload()) {
            Decoded::NotOurs => {
                part.offsets.take(offset, false);
                self.env.counters.skipped.fetch_add(1, Relaxed);
            }
            Decoded::Message(decoded) => {
                part.offsets.take(offset, true);
                let taken = Taken::of(message, epoch, 1);
                self.deliver(&mut state, decoded, taken);
            }
            Decoded::Poison(reason) => {
                part.offsets.take(offset, true);
                drop(state);
                self.dead_letter(Taken::of(message, epoch, 0), reason);
            }
        }
    }

    /// Hands `message` to the stream, keeping `taken` until it is done.
    fn deliver(&self, state: &mut State, message: T, taken: Taken) {
        let Origin { partition, epoch, .. } = taken.origin;
        let attempt = taken.attempt;
        state.next_token += 1;
        let token = state.next_token;
        state.tokens.insert(token, taken);
        let item = Item {
            message,
            token,
            partition,
            epoch,
            attempt,
        };
        // A closed channel means the stream was dropped: the loop ends next.
        let _ = self.deliveries.send(item);
    }

    /// Delivers again what was handed back and is due, and dead-letters what
    /// was handed back too often. Those of a partition that moved away since
    /// are its new owner's now.
    fn hand_back_due(&self) {
        let mut state = self.shared.state();
        if state.retries.is_empty() && state.dead.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.retries)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        state.retries = waiting;
        for (_, taken) in due {
            let Origin { partition, epoch, .. } = taken.origin;
            if !state.is_current(partition, epoch) {
                continue;
            }
            // It decoded the first time, so it does again; should it not, it is dead-lettered.
            match (self.spec.decode)(taken.key.as_deref(), taken.value.as_deref()) {
                Decoded::Message(message) => self.deliver(&mut state, message, taken),
                Decoded::NotOurs => state.finish(taken.origin),
                Decoded::Poison(reason) => state.dead.push((taken, reason)),
            }
        }
        let dead = std::mem::take(&mut state.dead);
        drop(state);
        for (taken, reason) in dead {
            self.dead_letter(taken, reason);
        }
    }

    /// Copies a message that is undecodable (`attempt` 0) or was handed back
    /// too often to the dead-letter topic, with headers saying where it came
    /// from and why; once the copy is stored, its offset counts as done.
    /// Tries until it succeeds or the subscription ends.
    fn dead_letter(&self, taken: Taken, reason: String) {
        let topic = &self.spec.topic;
        let Taken {
            origin,
            attempt,
            key,
            value,
        } = taken;
        if attempt == 0 {
            tracing::warn!(
                subscription = %self.shared.what,
                topic, partition = origin.partition, offset = origin.offset, %reason,
                "undecodable message: copied to the dead-letter topic and skipped"
            );
        } else {
            tracing::warn!(
                subscription = %self.shared.what,
                topic, partition = origin.partition, offset = origin.offset, deliveries = attempt, %reason,
                "a message handed back too often: copied to the dead-letter topic and skipped"
            );
        }
        let headers = [
            ("opamp.source.topic", topic.clone()),
            ("opamp.source.partition", origin.partition.to_string()),
            ("opamp.source.offset", origin.offset.to_string()),
            ("opamp.consumer.group", self.spec.group.clone()),
            ("opamp.deliveries", attempt.to_string()),
            ("opamp.error", reason),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        });
        let env = Arc::clone(&self.env);
        let shared = Arc::clone(&self.shared);
        self.runtime.spawn(async move {
            let mut backoff = RESTART_BACKOFF.0;
            loop {
                let mut record = FutureRecord::<[u8], [u8]>::to(&env.dead_letter_topic).headers(headers.clone());
                if let Some(key) = &key {
                    record = record.key(key);
                }
                if let Some(value) = &value {
                    record = record.payload(value);
                }
                match env.producer.send(record, env.request_timeout).await {
                    Ok(_) => {
                        env.counters.dead_lettered.fetch_add(1, Relaxed);
                        shared.state().finish(origin);
                        return;
                    }
                    Err((error, _)) => {
                        if !shared.state().is_current(origin.partition, origin.epoch) {
                            return;
                        }
                        tracing::warn!(subscription = %shared.what, %error, "copying to the dead-letter topic failed; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RESTART_BACKOFF.1);
                    }
                }
            }
        });
    }
}

/// Whether a consumer error means making the consumer again: a fatal error
/// (the instance is unusable), or every broker connection lost.
fn needs_restart(error: &KafkaError) -> bool {
    matches!(error, KafkaError::MessageConsumptionFatal(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
}

/// How many partitions `topic` has; a missing topic is named.
fn partition_count(consumer: &BaseConsumer<Context>, topic: &str, timeout: Duration) -> Result<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|err| client_error(format!("reading the metadata of topic {topic}"), err))?;
    let count = metadata
        .topics()
        .iter()
        .find(|found| found.name() == topic && found.error().is_none())
        .map_or(0, |found| found.partitions().len());
    match i32::try_from(count) {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(KafkaBusError::MissingTopic { topic: topic.into() }.into()),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grown_topic_moves_a_key_and_adds_partitions_to_read() {
        // A key that maps away from partition 0 once the topic has 4 partitions.
        let key = (0u32..)
            .map(|n| format!("supervisor-{n}").into_bytes())
            .find(|key| key_partition(key, 4) != 0)
            .unwrap();
        let commands = Placement::KeyPartition(key.clone());
        assert_eq!(commands.partitions(1), vec![0]);
        assert_eq!(commands.partitions(4), vec![key_partition(&key, 4)]);
        assert_eq!(Placement::AllFromNow.partitions(3), vec![0, 1, 2]);
        assert!(Placement::Group.partitions(3).is_empty());
    }
}
