//! The Kafka bus against a real Kafka-protocol broker on loopback.
//!
//! The broker is the one `scripts/services/kafka start DIR` runs
//! (127.0.0.1:9093), or the one at `OPAMP_TEST_KAFKA_BROKERS`. Every test
//! makes topics and groups of its own (a fresh topic prefix), so they run in
//! parallel. The broker-restart test runs a broker of its own (same script,
//! port 9094 or `OPAMP_TEST_KAFKA_RESTART_PORT`), so that stopping it
//! disturbs no other test.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use opamp_bus::kafka::{KafkaBus, KafkaBusConfig, key_partition};
use opamp_core::testkit::bus::BusFixture;
use opamp_core::testkit::eventually;
use opamp_core::{
    AgentType, Command, CommandBus, CommandKind, CommandOutcome, ConfigRef, ConfigUpdate, ConfigVersion, CorrelationId,
    Delivery, DeviceEvent, DeviceId, Error, EventBus, EventKind, GroupName, Labels, Subscription, SupervisorId,
    Timestamp,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::{OwnBroker, config_on};
use tokio::time::timeout;

mod support;

const DEFAULT_BROKERS: &str = "127.0.0.1:9093";
const DEADLINE: Duration = Duration::from_secs(20);
/// How long something that must not happen is waited for.
const STAYS_QUIET: Duration = Duration::from_millis(1500);

fn brokers() -> String {
    std::env::var("OPAMP_TEST_KAFKA_BROKERS").unwrap_or_else(|_| DEFAULT_BROKERS.to_owned())
}

/// Fails, saying how to start the broker, unless one listens at `brokers`.
fn require_broker(brokers: &str) {
    let first = brokers.split(',').next().unwrap_or_default();
    let reachable = first
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .is_some_and(|address| TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "no Kafka-protocol broker at {brokers}: start one with `scripts/services/kafka start /tmp/opamp-kafka` \
         (or run scripts/test), or point OPAMP_TEST_KAFKA_BROKERS at one"
    );
}

fn config() -> KafkaBusConfig {
    config_on(&brokers())
}

/// A bus with `config`, its topics made.
async fn bus_with(config: KafkaBusConfig) -> KafkaBus {
    support::init_tracing();
    require_broker(&config.brokers);
    let bus = KafkaBus::new(config).expect("a valid config");
    bus.ensure_topics().await.expect("making the test's topics");
    bus
}

async fn fixture() -> BusFixture {
    BusFixture::new(Arc::new(bus_with(config()).await))
}

opamp_core::bus_conformance!(fixture);

/// The runtime scenarios' store: the bus is what they test here.
async fn memory_store() -> opamp_core::testkit::store::StoreFixture {
    let clock = Arc::new(opamp_core::ManualClock::starting_now());
    let store = opamp_store::memory::MemoryStore::with_clock(clock.clone());
    opamp_core::testkit::store::StoreFixture::new(Arc::new(store), clock)
}

/// A Kafka bus with topics of its own.
async fn kafka_bus() -> Arc<dyn opamp_core::Bus> {
    Arc::new(bus_with(config()).await)
}

opamp_core::runtime_scenarios!(memory_store, kafka_bus);

fn supervisor(name: &str) -> SupervisorId {
    SupervisorId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn commands(device: DeviceId, count: usize) -> Vec<Command> {
    (0..count)
        .map(|i| {
            let kind = CommandKind::SetEmission { state: i % 2 == 0 };
            Command::new(device, kind, Timestamp::now(), Duration::from_secs(30))
        })
        .collect()
}

fn completed(device: DeviceId) -> DeviceEvent {
    let kind = EventKind::CommandCompleted {
        correlation_id: CorrelationId::new(),
        outcome: CommandOutcome::Acked,
    };
    DeviceEvent::new(device, kind, Timestamp::now())
}

fn update(version: &str) -> ConfigUpdate {
    let config = ConfigRef::new(
        AgentType::new("fluentbit").unwrap(),
        ConfigVersion::new(version).unwrap(),
    );
    ConfigUpdate::new(config, Labels::new(), Timestamp::now())
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
}

async fn next<T: Send + std::fmt::Debug>(stream: &mut Subscription<T>, what: &str) -> Delivery<T> {
    within(what, stream.next())
        .await
        .unwrap_or_else(|err| panic!("{what}: {err}"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
}

/// Asserts that nothing comes on `stream` for a while.
async fn stays_quiet<T: Send + std::fmt::Debug>(stream: &mut Subscription<T>, why: &str) {
    if let Ok(result) = timeout(STAYS_QUIET, stream.next()).await {
        panic!("{why}, yet got {result:?}");
    }
}

async fn send_all(bus: &KafkaBus, supervisor: &SupervisorId, commands: &[Command]) {
    for command in commands {
        within("a send", bus.send(supervisor, command)).await.expect("a send");
    }
}

/// Takes `expected` from `stream` in order, acknowledging each.
async fn expect_commands(stream: &mut Subscription<Command>, expected: &[Command], why: &str) {
    for command in expected {
        let delivery = next(stream, why).await;
        assert_eq!(delivery.message(), command, "{why}");
        delivery.ack().await.unwrap();
    }
}

/// Subscribes to `supervisor` afresh and sends a marker: it must come first,
/// as everything before it was acknowledged and committed.
async fn nothing_comes_again(bus: &KafkaBus, supervisor: &SupervisorId, why: &str) {
    let mut stream = bus.subscribe(supervisor).await.unwrap();
    let marker = commands(device("device-5"), 1);
    send_all(bus, supervisor, &marker).await;
    expect_commands(&mut stream, &marker, why).await;
}

/// A raw producer with the bus's own settings, for messages the bus would never write.
fn raw_producer(config: &KafkaBusConfig) -> FutureProducer {
    let mut client = ClientConfig::new();
    for (name, value) in config.producer_properties() {
        client.set(name, value);
    }
    client.create().expect("a raw producer")
}

async fn produce_raw(producer: &FutureProducer, topic: &str, key: &str, value: &[u8]) -> (i32, i64) {
    let record = FutureRecord::to(topic).key(key).payload(value);
    let delivered = within("a raw send", producer.send(record, DEADLINE)).await;
    let delivered = delivered.unwrap_or_else(|(err, _)| panic!("a raw send: {err}"));
    (delivered.partition, delivered.offset)
}

/// Supervisor ids, made fresh, whose commands share one partition of `partitions`.
fn supervisors_sharing_a_partition(count: usize, partitions: i32) -> Vec<SupervisorId> {
    let first = supervisor("shared");
    let target = key_partition(first.as_str().as_bytes(), partitions);
    let mut found = vec![first];
    while found.len() < count {
        let candidate = supervisor("shared");
        if key_partition(candidate.as_str().as_bytes(), partitions) == target {
            found.push(candidate);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_places_keys_where_the_consumers_look() {
    let config = config();
    let _bus = bus_with(config.clone()).await;
    let producer = raw_producer(&config);
    for i in 0..24 {
        let key = format!("supervisor-{i}");
        let (partition, _) = produce_raw(&producer, &config.commands_topic, &key, b"{}").await;
        assert_eq!(
            partition,
            key_partition(key.as_bytes(), config.commands_partitions),
            "librdkafka's murmur2_random and key_partition disagree on {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisors_sharing_a_partition_get_disjoint_streams() {
    let config = config();
    let bus = bus_with(config.clone()).await;
    let supervisors = supervisors_sharing_a_partition(2, config.commands_partitions);
    let mut streams = Vec::new();
    for supervisor in &supervisors {
        streams.push(bus.subscribe(supervisor).await.unwrap());
    }
    let sent: Vec<Vec<Command>> = (0..2).map(|_| commands(device("device-5"), 10)).collect();
    for i in 0..10 {
        for (supervisor, commands) in supervisors.iter().zip(&sent) {
            bus.send(supervisor, &commands[i]).await.unwrap();
        }
    }
    for (stream, commands) in streams.iter_mut().zip(&sent) {
        expect_commands(
            stream,
            commands,
            "each supervisor gets exactly its own commands, in order",
        )
        .await;
        stays_quiet(stream, "the other supervisor's commands must be skipped").await;
    }
    assert_eq!(bus.stats().skipped, 20, "each skipped the other's ten");
}

/// A consumer that dies before acknowledging: another process (another
/// `KafkaBus` on the same topics) gets what it left, from the broker's
/// committed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_commands_come_again_to_another_process() {
    let config = config();
    let s1 = supervisor("s1");
    let sent = commands(device("device-5"), 5);
    {
        let bus = bus_with(config.clone()).await;
        let mut stream = bus.subscribe(&s1).await.unwrap();
        send_all(&bus, &s1, &sent).await;
        expect_commands(&mut stream, &sent[..2], "the first two").await;
        let held = next(&mut stream, "the third").await;
        assert_eq!(held.message(), &sent[2]);
        // The process dies: the third is never acknowledged.
        drop(stream);
        drop(held);
    }
    let bus = bus_with(config).await;
    let mut stream = bus.subscribe(&s1).await.unwrap();
    expect_commands(
        &mut stream,
        &sent[2..],
        "the unacknowledged ones, in order, and only they",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_command_goes_to_the_dead_letter_topic_and_is_skipped() {
    let config = config();
    let bus = bus_with(config.clone()).await;
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let producer = raw_producer(&config);
    let poison = br#"{"device_id": "bad id", "command": "toggle_emission", "payload": {"state": true},
        "timestamp": "2026-01-27T10:30:00Z", "correlation_id": "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10"}"#;
    let (partition, offset) = produce_raw(&producer, &config.commands_topic, s1.as_str(), poison).await;
    let good = commands(device("device-5"), 1);
    send_all(&bus, &s1, &good).await;

    expect_commands(
        &mut stream,
        &good,
        "the poison message is skipped, the next one delivered",
    )
    .await;
    eventually("the copy to be stored", DEADLINE, || async {
        bus.stats().dead_lettered == 1
    })
    .await;

    let (key, value, headers) = read_one(&config, &config.dead_letter_topic).await;
    assert_eq!(key.as_deref(), Some(s1.as_str().as_bytes()), "the key is kept");
    assert_eq!(value.as_deref(), Some(&poison[..]), "the value is kept byte for byte");
    assert_eq!(headers["opamp.source.topic"], config.commands_topic);
    assert_eq!(headers["opamp.source.partition"], partition.to_string());
    assert_eq!(headers["opamp.source.offset"], offset.to_string());
    assert!(
        headers["opamp.error"].contains("device_id"),
        "the reason names the member: {}",
        headers["opamp.error"]
    );

    // Committed past: the next subscription starts after both.
    drop(stream);
    nothing_comes_again(&bus, &s1, "neither the poison nor the acknowledged command came again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_handed_back_too_often_goes_to_the_dead_letter_topic_with_its_reason() {
    let config = config().with_max_deliveries(2);
    let bus = bus_with(config.clone()).await;
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let doomed = commands(device("device-5"), 1);
    send_all(&bus, &s1, &doomed).await;
    for attempt in 1..=2 {
        let delivery = next(&mut stream, "the command handed back").await;
        assert_eq!((delivery.message(), delivery.attempt()), (&doomed[0], attempt));
        delivery
            .nack(Duration::from_millis(10), format!("the store refused it ({attempt})"))
            .await
            .unwrap();
    }
    eventually("the copy to be stored", DEADLINE, || async {
        bus.stats().dead_lettered == 1
    })
    .await;
    let (key, value, headers) = read_one(&config, &config.dead_letter_topic).await;
    assert_eq!(key.as_deref(), Some(s1.as_str().as_bytes()), "the key is kept");
    assert_eq!(value, Some(doomed[0].to_json()), "the value is kept byte for byte");
    assert_eq!(headers["opamp.source.topic"], config.commands_topic);
    assert_eq!(headers["opamp.deliveries"], "2");
    assert_eq!(headers["opamp.error"], "the store refused it (2)");

    drop(stream);
    nothing_comes_again(&bus, &s1, "a dead-lettered command came again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_key_is_not_its_device_is_dead_lettered() {
    let config = config();
    let bus = bus_with(config.clone()).await;
    let group = GroupName::new("servers").unwrap();
    let mut stream = bus.subscribe_events(&group).await.unwrap();
    let producer = raw_producer(&config);
    let event = completed(device("device-5"));
    produce_raw(&producer, &config.events_topic, "device-6", &event.to_json()).await;
    produce_raw(&producer, &config.events_topic, "device-6", b"\xff not json").await;
    let good = completed(device("device-6"));
    bus.publish_event(&good).await.unwrap();
    let delivery = next(&mut stream, "the good event").await;
    assert_eq!(delivery.message(), &good, "both bad events were skipped");
    delivery.ack().await.unwrap();
    eventually("both copies to be stored", DEADLINE, || async {
        bus.stats().dead_lettered == 2
    })
    .await;
}

/// Reads the first message of partition 0 of `topic`: key, value, headers.
async fn read_one(
    config: &KafkaBusConfig,
    topic: &str,
) -> (Option<Vec<u8>>, Option<Vec<u8>>, BTreeMap<String, String>) {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    client.set("group.id", format!("{}reader", config.group_prefix));
    client.set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().expect("a raw consumer");
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&assignment).unwrap();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + DEADLINE;
        while std::time::Instant::now() < deadline {
            if let Some(result) = consumer.poll(Duration::from_millis(100)) {
                let message = result.expect("reading the dead-letter topic");
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                return (
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                    headers,
                );
            }
        }
        panic!("nothing on {topic} within {DEADLINE:?}");
    })
    .await
    .unwrap()
}

/// Back-pressure: a partition with as much in flight as allowed is paused
/// (nothing more is delivered, though more is waiting), and resumed by
/// acknowledgements; each device's commands still arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_partition_is_paused_until_acknowledgements_come() {
    let bus = bus_with(config().with_max_in_flight(4, 100)).await;
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let devices = ["device-1", "device-2", "device-3"];
    let mut sent: BTreeMap<DeviceId, Vec<CorrelationId>> = BTreeMap::new();
    for _ in 0..8 {
        for name in devices {
            let command = commands(device(name), 1).remove(0);
            sent.entry(command.device).or_default().push(command.correlation_id);
            bus.send(&s1, &command).await.unwrap();
        }
    }

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut stream, "one of the first four").await);
    }
    stays_quiet(&mut stream, "four are in flight, the most allowed").await;
    assert_eq!(
        bus.stats().paused_partitions,
        1,
        "the partition is paused at the broker"
    );
    assert_eq!(bus.stats().in_flight, 4);

    let mut received: BTreeMap<DeviceId, Vec<CorrelationId>> = BTreeMap::new();
    let mut record = |delivery: &Delivery<Command>| {
        let command = delivery.message();
        received.entry(command.device).or_default().push(command.correlation_id);
    };
    for delivery in held.drain(..) {
        record(&delivery);
        delivery.ack().await.unwrap();
    }
    for _ in 4..24 {
        let delivery = next(&mut stream, "a command after the resume").await;
        record(&delivery);
        delivery.ack().await.unwrap();
    }
    assert_eq!(received, sent, "every command once, each device's in order");
    eventually("the partition to be resumed", DEADLINE, || async {
        bus.stats().paused_partitions == 0
    })
    .await;
}

/// Parallelism across partitions: one device's events held unacknowledged
/// (its partition paused) do not hold up another device's, in another partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_holds_up_no_other() {
    let config = config().with_max_in_flight(2, 100);
    let partitions = config.events_partitions;
    let bus = bus_with(config).await;
    let mut stream = bus.subscribe_events(&GroupName::new("servers").unwrap()).await.unwrap();
    let names: Vec<String> = (0..).map(|i| format!("device-{i}")).take(50).collect();
    let slow = device(&names[0]);
    let fast = names
        .iter()
        .map(|name| device(name))
        .find(|candidate| {
            key_partition(candidate.as_str().as_bytes(), partitions)
                != key_partition(slow.as_str().as_bytes(), partitions)
        })
        .expect("a device in another partition");
    for _ in 0..5 {
        bus.publish_event(&completed(slow)).await.unwrap();
    }
    let fast_events: Vec<DeviceEvent> = (0..5).map(|_| completed(fast)).collect();
    for event in &fast_events {
        bus.publish_event(event).await.unwrap();
    }

    let mut held = Vec::new();
    let mut fast_received = Vec::new();
    while fast_received.len() < fast_events.len() {
        let delivery = next(&mut stream, "the fast device's events, past the slow one's").await;
        if delivery.message().device == slow {
            held.push(delivery);
            assert!(held.len() <= 2, "the slow partition delivered beyond its bound");
        } else {
            fast_received.push(delivery.message().clone());
            delivery.ack().await.unwrap();
        }
    }
    assert_eq!(fast_received, fast_events, "the fast device's events, in order");
    for delivery in held {
        delivery.ack().await.unwrap();
    }
}

/// Graceful shutdown: fetching stops, what was fetched is still delivered
/// and acknowledged, then committed; the stream ends; nothing acknowledged
/// comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_what_was_fetched_then_commits() {
    let config = config();
    let bus = bus_with(config.clone()).await;
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let sent = commands(device("device-5"), 10);
    send_all(&bus, &s1, &sent).await;
    // Three handled; all ten fetched.
    expect_commands(&mut stream, &sent[..3], "the first three").await;
    eventually("all ten to be fetched", DEADLINE, || async {
        bus.stats().in_flight == 7
    })
    .await;

    let shutdown = tokio::spawn({
        let bus = bus.clone();
        async move { bus.shutdown(DEADLINE).await }
    });
    expect_commands(
        &mut stream,
        &sent[3..],
        "the fetched ones are still delivered during the drain",
    )
    .await;
    let ended = within("the stream to end", stream.next()).await.unwrap();
    assert!(ended.is_none(), "the stream ends once drained");
    within("the shutdown", shutdown).await.unwrap().expect("a clean drain");
    assert!(
        matches!(bus.send(&s1, &sent[0]).await, Err(Error::Unavailable { .. })),
        "a shut-down bus sends nothing"
    );

    nothing_comes_again(&bus_with(config).await, &s1, "everything drained was committed").await;
}

/// A drain that runs out of time says so, and what was left unacknowledged
/// comes again to the next subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_grace_leaves_the_rest_to_the_next_subscriber() {
    let config = config();
    let bus = bus_with(config.clone()).await;
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let sent = commands(device("device-5"), 3);
    send_all(&bus, &s1, &sent).await;
    expect_commands(&mut stream, &sent[..1], "the first").await;
    let held = next(&mut stream, "the second").await;
    eventually("the third to be fetched", DEADLINE, || async {
        bus.stats().in_flight == 2
    })
    .await;
    let err = bus.shutdown(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("2 deliveries"), "{err}");
    drop(held);

    let bus = bus_with(config).await;
    let mut stream = bus.subscribe(&s1).await.unwrap();
    expect_commands(&mut stream, &sent[1..], "the two left unacknowledged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_every_supervisor_of_every_process() {
    // Config updates are fetched with a wait of their own, as a deployment sets it.
    let config = config().with_background_fetch_wait(Duration::from_millis(50));
    let buses = [bus_with(config.clone()).await, bus_with(config).await];
    let mut streams = Vec::new();
    for i in 0..4 {
        let bus = &buses[i % 2];
        streams.push(bus.subscribe_broadcasts(&supervisor("s")).await.unwrap());
    }
    let updates = [update("v1"), update("v2")];
    for update in &updates {
        buses[0].broadcast(update).await.unwrap();
    }
    for stream in &mut streams {
        for update in &updates {
            let delivery = next(stream, "a broadcast").await;
            assert_eq!(
                delivery.message(),
                update,
                "every supervisor gets every broadcast, in order"
            );
            delivery.ack().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_and_unreachable_brokers_are_errors_not_hangs() {
    require_broker(&brokers());
    let bus = KafkaBus::new(config()).unwrap();
    let err = bus.subscribe(&supervisor("s1")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(&bus.config().commands_topic), "{err}");

    let nowhere = KafkaBusConfig::new("127.0.0.1:1").with_request_timeout(Duration::from_secs(1));
    let bus = KafkaBus::new(nowhere).unwrap();
    let err = within("subscribing without a broker", bus.subscribe(&supervisor("s1")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable { .. } | Error::Timeout { .. }),
        "{err:?}"
    );

    let err = KafkaBus::new(config().with_property("enable.idempotence", "false")).unwrap_err();
    assert!(err.to_string().contains("enable.idempotence"), "{err}");
}

/// The port of the broker-restart test's own broker.
fn restart_port() -> u16 {
    std::env::var("OPAMP_TEST_KAFKA_RESTART_PORT").map_or(9094, |port| port.parse().expect("a port number"))
}

/// The broker stops and starts again on its own data: the consumer is made
/// again by itself, every command whose send succeeded is delivered, in
/// order, and what was acknowledged does not come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_command_is_lost_when_the_broker_restarts() {
    let broker = tokio::task::spawn_blocking(|| OwnBroker::start(restart_port()))
        .await
        .unwrap();
    let bus = bus_with(config_on(&broker.brokers())).await;
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let before = commands(device("device-5"), 10);
    send_all(&bus, &s1, &before).await;
    expect_commands(&mut stream, &before[..5], "the first five").await;

    let broker = tokio::task::spawn_blocking(move || {
        broker.run("stop");
        broker.run("start");
        broker
    })
    .await
    .unwrap();
    eventually("the consumer to be made again", DEADLINE, || async {
        bus.stats().consumer_restarts >= 1
    })
    .await;

    let after = commands(device("device-5"), 5);
    send_all(&bus, &s1, &after).await;
    let rest: Vec<Command> = before[5..].iter().chain(&after).cloned().collect();
    expect_commands(&mut stream, &rest, "every command sent, in order, across the restart").await;

    drop(stream);
    nothing_comes_again(&bus, &s1, "acknowledged commands came again after the restart").await;
    drop(bus);
    tokio::task::spawn_blocking(move || drop(broker)).await.unwrap();
}
