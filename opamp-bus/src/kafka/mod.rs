//! A bus on a Kafka-protocol broker: durable commands, broadcasts and events.
//!
//! The design's topics (§4.4, Appendix B), each value the JSON of
//! `docs/data-model.md`:
//!
//! | topic (default name)      | key            | read by |
//! |---------------------------|----------------|---------|
//! | `opamp.commands`          | supervisor id  | each supervisor: only the partition its id maps to |
//! | `opamp.events`            | device id      | each consumer group (`GroupName`): its members share the partitions |
//! | `opamp.config-updates`    | agent type     | every supervisor: all partitions, a consumer group of its own |
//! | `opamp.dead-letters`      | as the source  | operators: undecodable messages, with headers saying where from and why |
//!
//! [`KafkaBus::ensure_topics`] creates the missing ones with the configured
//! partitions, replication and retention.
//!
//! # Delivery
//!
//! - **Sending** uses an idempotent producer with `acks=all`: `send` returns
//!   once every in-sync replica has the command, and retries cannot reorder or
//!   duplicate it, so one device's commands (one supervisor's, even) stay in
//!   order.
//! - **Partitioning**: the producer's partitioner is `murmur2_random` (the
//!   Java client's default: murmur2 of the key, modulo the partition count;
//!   see [`key_partition`]). A supervisor's subscription computes the same
//!   and is *assigned* that one partition (no group membership, so a
//!   supervisor joining or leaving rebalances nobody), skipping the commands
//!   of other supervisors that share it. Its committed offsets live in the
//!   consumer group `{group_prefix}commands.{supervisor}`. A new supervisor
//!   starts at the beginning of its partition, so commands sent before it
//!   first subscribed wait for it. Partitions added to a topic are
//!   followed: every 5 s a subscription reads the partition count again and
//!   also reads the partition its key maps to now (or, for broadcasts, every
//!   new partition, from its beginning), keeping the old one for what
//!   producers sent before their metadata showed the new count. A supervisor
//!   that restarts later reads only the partition its key maps to then, so
//!   let the old one drain before restarting supervisors.
//! - **Broadcasts**: each supervisor reads every partition of the
//!   config-updates topic as the group `{group_prefix}config-updates.{supervisor}`;
//!   its first subscription starts at the end as of that moment, committed at
//!   once, so restarts resume there. Broadcasts are keyed by agent type: those
//!   for one agent type stay in order.
//! - **Events**: a consumer group `{group_prefix}events.{group}` per
//!   [`GroupName`], joined with the broker's group protocol; a new group
//!   starts at the beginning of the retained events.
//! - **Acknowledgements** (at-least-once): offsets are committed only for
//!   what was acknowledged: per partition, up to the oldest delivery not yet
//!   acknowledged, every `commit_interval` and when a subscription ends or a
//!   partition is revoked. Each commit waits for the broker's answer before
//!   the next is sent (two in flight could land out of order, the older
//!   offset last); the last one is retried for up to `request_timeout`. What
//!   was not acknowledged comes again to the next subscriber.
//! - **Takeover**: a newer subscription for the same supervisor in the same
//!   `KafkaBus` stops the older one, waits for its last commit, then starts
//!   where it left off. (Across processes Kafka has no fencing for assigned
//!   partitions: run one process per supervisor id.) Likewise a new member of
//!   an event group waits until the members of that group in the same
//!   `KafkaBus` that are leaving have committed and left.
//!
//! # Consumers
//!
//! Each subscription runs a librdkafka consumer on a thread of its own:
//!
//! - **Back-pressure**: at most [`KafkaBusConfig::max_in_flight_per_partition`]
//!   messages of a partition are delivered and unacknowledged at once, and
//!   [`KafkaBusConfig::max_in_flight`] in all; beyond that the partition
//!   (or all of them) is *paused* at the broker and resumed as
//!   acknowledgements come, instead of buffering without limit.
//! - **Order and parallelism**: a partition's messages are delivered in
//!   order; a partition that is paused holds up no other.
//! - **Restart**: after a fatal consumer error, or when every broker
//!   connection is lost, the consumer is made again (with backoff) and goes
//!   on from where it was; [`KafkaBusStats::consumer_restarts`] counts it.
//! - **Gaps**: a message whose offset is past the one expected next is not
//!   taken: the partition is read again from the gap, once. tansu 0.6.0
//!   can serve a later batch before an earlier one is stored (it raises the
//!   high watermark first), and a consumer that moved on would never see
//!   the earlier one. A gap that is still there when read again is taken as
//!   it is (transaction markers and compaction leave gaps too).
//!   [`KafkaBusStats::offset_gaps`] counts them, and each is logged.
//! - **Poison messages**: a message that does not decode is logged, copied
//!   to the dead-letter topic (with headers `opamp.source.topic`,
//!   `opamp.source.partition`, `opamp.source.offset`, `opamp.consumer.group`
//!   and `opamp.error`), and skipped: committed past once the copy is stored.
//! - **Graceful shutdown**: [`KafkaBus::shutdown`] stops fetching, lets each
//!   subscriber take and acknowledge what was already fetched, commits, and
//!   closes.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use std::time::Duration;
//! use opamp_bus::kafka::{KafkaBus, KafkaBusConfig};
//! use opamp_core::{Command, CommandBus, CommandKind, DeviceId, SupervisorId, Timestamp};
//!
//! let bus = KafkaBus::new(KafkaBusConfig::new("kafka-1:9092,kafka-2:9092"))?;
//! bus.ensure_topics().await?;
//! let s3 = SupervisorId::new("supervisor-pod-3")?;
//! let mut commands = bus.subscribe(&s3).await?;
//! let toggle = CommandKind::SetEmission { state: true };
//! bus.send(&s3, &Command::new(DeviceId::new("device-5")?, toggle, Timestamp::now(), Duration::from_secs(5))).await?;
//! if let Some(delivery) = commands.next().await? {
//!     // ... have the device apply it, then:
//!     delivery.ack().await?;
//! }
//! bus.shutdown(Duration::from_secs(10)).await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod consumer;
mod error;
mod offsets;
mod partitioner;

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opamp_core::{
    Command, CommandBus, ConfigUpdate, DeviceEvent, Error, EventBus, GroupName, Result, Subscription, SupervisorId,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

pub use self::config::KafkaBusConfig;
use self::consumer::{Control, Counters, Decoded, Env, Logs, Placement, Spec};
use self::error::client_error;
pub use self::partitioner::{key_partition, murmur2};

/// A [`CommandBus`] and [`EventBus`] on a Kafka-protocol broker. Clones share
/// the producer and the subscriptions' bookkeeping.
///
/// See the [module documentation](self) for how it behaves.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaBusConfig,
    env: Arc<Env>,
    registry: Mutex<Registry>,
    /// Held while a subscription starts, so that two cannot both take over.
    subscribing: tokio::sync::Mutex<()>,
    shut_down: AtomicBool,
}

/// The subscriptions of a bus not known to have ended, each with its consumer group.
#[derive(Default)]
struct Registry {
    members: Vec<(String, Arc<Control>)>,
}

/// What a bus is doing, over all its subscriptions: for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub struct KafkaBusStats {
    /// Subscriptions running.
    pub subscriptions: usize,
    /// Messages delivered (or being dead-lettered) and not yet acknowledged.
    pub in_flight: usize,
    /// Partitions paused because too much of them is in flight.
    pub paused_partitions: usize,
    /// Undecodable messages copied to the dead-letter topic and skipped.
    pub dead_lettered: u64,
    /// Consumers made again after a failure.
    pub consumer_restarts: u64,
    /// Messages of other supervisors skipped in a shared commands partition.
    pub skipped: u64,
    /// Gaps in a partition's offsets, each read again once (the module's
    /// **Gaps**).
    pub offset_gaps: u64,
}

impl KafkaBus {
    /// A bus with `config`. Connects lazily: nothing is sent to the broker
    /// until the first call. An [`Error::InvalidInput`] names a bad setting.
    pub fn new(config: KafkaBusConfig) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer<Logs> = config
            .producer_config()
            .create_with_context(Logs)
            .map_err(|err| client_error("making the kafka producer", err))?;
        let env = Env {
            consumer: config.consumer_config(),
            max_in_flight_per_partition: config.max_in_flight_per_partition,
            max_in_flight: config.max_in_flight,
            max_deliveries: config.max_deliveries,
            commit_interval: config.commit_interval,
            request_timeout: config.request_timeout,
            dead_letter_topic: config.dead_letter_topic.clone(),
            producer,
            counters: Counters::default(),
        };
        Ok(KafkaBus {
            inner: Arc::new(Inner {
                config,
                env: Arc::new(env),
                registry: Mutex::default(),
                subscribing: tokio::sync::Mutex::new(()),
                shut_down: AtomicBool::new(false),
            }),
        })
    }

    /// The configuration the bus was made with.
    pub fn config(&self) -> &KafkaBusConfig {
        &self.inner.config
    }

    /// Creates the topics that do not exist yet (commands, events, config
    /// updates, dead letters) with the configured partitions, replication and
    /// retention, and waits until the broker reports them all. Topics that
    /// exist are left as they are.
    pub async fn ensure_topics(&self) -> Result<()> {
        let config = &self.inner.config;
        let admin: AdminClient<Logs> = config
            .admin_config()
            .create_with_context(Logs)
            .map_err(|err| client_error("making the kafka admin client", err))?;
        let retention = config.retention.as_millis().to_string();
        let wanted = config.topics();
        let topics: Vec<NewTopic<'_>> = wanted
            .iter()
            .map(|(name, partitions)| {
                NewTopic::new(name, *partitions, TopicReplication::Fixed(config.replication))
                    .set("retention.ms", &retention)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(config.request_timeout));
        let results = admin
            .create_topics(&topics, &options)
            .await
            .map_err(|err| client_error("creating the bus's topics", err))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(client_error(
                        format!("creating topic {name}"),
                        KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        // The controller answers before every broker knows the new topics.
        let names: Vec<String> = wanted.into_iter().map(|(name, _)| name.to_owned()).collect();
        let timeout = config.request_timeout;
        tokio::task::spawn_blocking(move || wait_for_topics(&admin, &names, timeout))
            .await
            .map_err(|err| Error::backend("kafka", "waiting for the new topics", err))?
    }

    /// Ends every subscription gracefully and flushes the producer. Each
    /// subscription stops fetching, goes on delivering what it had fetched
    /// already until it is all acknowledged or `grace` has passed, commits,
    /// closes, and then its stream ends (`Ok(None)`). Afterwards sending and
    /// subscribing fail with [`Error::Unavailable`].
    ///
    /// An [`Error::Timeout`] says how many deliveries were still
    /// unacknowledged after `grace`; they come again to the next subscriber.
    pub async fn shutdown(&self, grace: Duration) -> Result<()> {
        self.inner.shut_down.store(true, Relaxed);
        let deadline = Instant::now() + grace;
        let subscriptions: Vec<Arc<Control>> = self
            .registry()
            .members
            .iter()
            .map(|(_, control)| Arc::clone(control))
            .collect();
        for subscription in &subscriptions {
            subscription.drain(deadline);
        }
        // Past the grace, the last commits and closing still take a round trip.
        let wait = grace + self.inner.config.request_timeout;
        let all_ended = async {
            for subscription in &subscriptions {
                subscription.finished().await;
            }
        };
        if tokio::time::timeout(wait, all_ended).await.is_err() {
            return Err(Error::timeout("closing the kafka bus's consumers"));
        }
        let producer = self.inner.env.producer.clone();
        let timeout = self.inner.config.request_timeout;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|err| Error::backend("kafka", "flushing the producer", err))?
            .map_err(|err| client_error("flushing the kafka producer", err))?;
        let left: usize = subscriptions
            .iter()
            .map(|subscription| subscription.left_in_flight())
            .sum();
        if left > 0 {
            return Err(Error::timeout(format!(
                "draining the kafka bus: {left} deliveries were not acknowledged within {grace:?}; they come again to the next subscriber"
            )));
        }
        Ok(())
    }

    /// What the bus is doing now.
    pub fn stats(&self) -> KafkaBusStats {
        let mut registry = self.registry();
        registry.members.retain(|(_, control)| !control.is_finished());
        let controls = || registry.members.iter().map(|(_, control)| control);
        let counters = &self.inner.env.counters;
        KafkaBusStats {
            subscriptions: registry.members.len(),
            in_flight: controls().map(|control| control.in_flight()).sum(),
            paused_partitions: controls().map(|control| control.paused()).sum(),
            dead_lettered: counters.dead_lettered.load(Relaxed),
            consumer_restarts: counters.consumer_restarts.load(Relaxed),
            skipped: counters.skipped.load(Relaxed),
            offset_gaps: counters.offset_gaps.load(Relaxed),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.shut_down.load(Relaxed) {
            return Err(Error::unavailable("the kafka bus was shut down"));
        }
        Ok(())
    }

    /// Produces one message and waits until every in-sync replica has it.
    async fn produce(&self, topic: &str, key: &[u8], value: &[u8], what: impl FnOnce() -> String) -> Result<()> {
        self.check_open()?;
        let record = FutureRecord::to(topic).key(key).payload(value);
        match self
            .inner
            .env
            .producer
            .send(record, self.inner.config.send_timeout)
            .await
        {
            Ok(_) => Ok(()),
            Err((err, _)) => Err(client_error(what(), err)),
        }
    }

    /// Starts a subscription and keeps track of it. Members of its consumer
    /// group in this bus that are ending finish first (their last commit and
    /// leaving the group come before the new member reads); an `exclusive`
    /// subscription (a supervisor's) also ends the one it takes over.
    async fn start<T: Send + 'static>(&self, spec: Spec<T>, exclusive: bool) -> Result<Subscription<T>> {
        self.check_open()?;
        let _one_at_a_time = self.inner.subscribing.lock().await;
        let before: Vec<Arc<Control>> = self
            .registry()
            .members
            .iter()
            .filter(|(group, control)| *group == spec.group && (exclusive || control.is_ending()))
            .map(|(_, control)| Arc::clone(control))
            .collect();
        let wait = self.inner.config.request_timeout.saturating_mul(3);
        for older in before {
            older.stop();
            tokio::time::timeout(wait, older.finished())
                .await
                .map_err(|_| Error::timeout(format!("ending the older subscription to {}", spec.what)))?;
        }
        let group = spec.group.clone();
        let (stream, control) = consumer::subscribe(Arc::clone(&self.inner.env), spec).await?;
        let mut registry = self.registry();
        registry.members.retain(|(_, control)| !control.is_finished());
        registry.members.push((group, control));
        Ok(stream)
    }

    fn group(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}.{name}", self.inner.config.group_prefix)
    }
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

#[async_trait]
impl CommandBus for KafkaBus {
    async fn send(&self, supervisor: &SupervisorId, command: &Command) -> Result<()> {
        let topic = &self.inner.config.commands_topic;
        let what = || format!("sending command {} to {supervisor} on {topic}", command.correlation_id);
        self.produce(topic, supervisor.as_str().as_bytes(), &command.to_json(), what)
            .await
    }

    async fn subscribe(&self, supervisor: &SupervisorId) -> Result<Subscription<Command>> {
        let key = supervisor.as_str().as_bytes().to_vec();
        let ours = key.clone();
        let spec = Spec {
            what: format!("commands for {supervisor}"),
            topic: self.inner.config.commands_topic.clone(),
            group: self.group("commands", supervisor.as_str()),
            placement: Placement::KeyPartition(key),
            decode: Box::new(move |key, value| {
                if key != Some(ours.as_slice()) {
                    return Decoded::NotOurs;
                }
                decode_json(value, Command::from_json)
            }),
            fetch_wait: None,
        };
        self.start(spec, true).await
    }

    async fn broadcast(&self, update: &ConfigUpdate) -> Result<()> {
        let topic = &self.inner.config.config_updates_topic;
        let agent_type = update.config.agent_type.as_str();
        let what = || format!("broadcasting config update {} on {topic}", update.correlation_id);
        self.produce(topic, agent_type.as_bytes(), &update.to_json(), what)
            .await
    }

    /// Whether any partition of the commands topic holds a message (its
    /// high watermark above its low one): one metadata request and one
    /// offsets request per partition.
    async fn holds_history(&self) -> Result<bool> {
        let producer = self.inner.env.producer.clone();
        let (topic, timeout) = (
            self.inner.config.commands_topic.clone(),
            self.inner.config.request_timeout,
        );
        tokio::task::spawn_blocking(move || topic_holds_messages(producer.client(), &topic, timeout))
            .await
            .map_err(|err| Error::backend("kafka", "reading the commands topic's offsets", err))?
    }

    async fn subscribe_broadcasts(&self, supervisor: &SupervisorId) -> Result<Subscription<ConfigUpdate>> {
        let spec = Spec {
            what: format!("config updates for {supervisor}"),
            topic: self.inner.config.config_updates_topic.clone(),
            group: self.group("config-updates", supervisor.as_str()),
            placement: Placement::AllFromNow,
            decode: Box::new(|_, value| decode_json(value, ConfigUpdate::from_json)),
            fetch_wait: self.inner.config.background_fetch_wait,
        };
        self.start(spec, true).await
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish_event(&self, event: &DeviceEvent) -> Result<()> {
        let topic = &self.inner.config.events_topic;
        let device = event.device.as_str();
        let what = || format!("publishing an event of {device} on {topic}");
        self.produce(topic, device.as_bytes(), &event.to_json(), what).await
    }

    async fn subscribe_events(&self, group: &GroupName) -> Result<Subscription<DeviceEvent>> {
        let spec = Spec {
            what: format!("events for group {group}"),
            topic: self.inner.config.events_topic.clone(),
            group: self.group("events", group.as_str()),
            placement: Placement::Group,
            decode: Box::new(|key, value| match decode_json(value, DeviceEvent::from_json) {
                Decoded::Message(event) if key.is_some_and(|key| key != event.device.as_str().as_bytes()) => {
                    Decoded::Poison(format!(
                        "the key {:?} is not the event's device {}",
                        String::from_utf8_lossy(key.unwrap_or_default()),
                        event.device
                    ))
                }
                decoded => decoded,
            }),
            fetch_wait: self.inner.config.background_fetch_wait,
        };
        self.start(spec, false).await
    }
}

/// Reads a message value with `parse`; what cannot be read is poison, and
/// the reason names what was wrong.
fn decode_json<T>(value: Option<&[u8]>, parse: fn(&[u8]) -> Result<T>) -> Decoded<T> {
    match value.map(parse) {
        Some(Ok(message)) => Decoded::Message(message),
        Some(Err(err)) => Decoded::Poison(err.to_string()),
        None => Decoded::Poison("the message has no value".into()),
    }
}

/// Whether any partition of `topic` holds a message.
fn topic_holds_messages<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<bool> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|err| client_error(format!("reading the metadata of topic {topic}"), err))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic && found.error().is_none())
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
        .collect();
    for partition in partitions {
        let (low, high) = client
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|err| client_error(format!("reading the offsets of {topic}/{partition}"), err))?;
        if high > low {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Waits until the broker's metadata shows every topic of `names` with partitions.
fn wait_for_topics(admin: &AdminClient<Logs>, names: &[String], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for name in names {
        loop {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(name), timeout)
                .map_err(|err| client_error(format!("reading the metadata of topic {name}"), err))?;
            let known = metadata
                .topics()
                .iter()
                .any(|topic| topic.name() == name && topic.error().is_none() && !topic.partitions().is_empty());
            if known {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!("waiting for the broker to report topic {name}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
