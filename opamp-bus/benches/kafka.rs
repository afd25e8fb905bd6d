//! The Kafka bus beside a raw rdkafka producer and consumer with the same
//! settings, against the same broker, in one run.
//!
//! ```text
//! scripts/services/kafka start /tmp/opamp-kafka
//! cargo bench -p opamp-bus --features kafka --bench kafka
//! ```
//!
//! - **send throughput**: `SENDERS` tasks send `MESSAGES` commands in all,
//!   each send waiting for the broker's acknowledgement (`acks=all`,
//!   idempotent, the same `linger.ms`). The bus serialises each command to
//!   its Appendix B JSON; the raw producer sends bytes serialised once.
//! - **end-to-end latency**: one command at a time, from the start of the
//!   send to its delivery to the subscriber (the bus's `next`, the raw
//!   consumer's `recv`), acknowledged (bus) or its offset committed every
//!   100 ms (raw) like the bus does.
//!
//! Rounds alternate between the two so that both see the same broker and
//! the same noise. Under `cargo test --bench kafka` it runs one small round.

use std::time::{Duration, Instant};

use opamp_bus::kafka::{KafkaBus, KafkaBusConfig};
use opamp_core::{Command, CommandBus, CommandKind, DeviceId, SupervisorId, Timestamp};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const SENDERS: usize = 64;

struct Plan {
    rounds: usize,
    messages: usize,
    pings: usize,
}

fn main() {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let plan = if measuring {
        Plan {
            rounds: 5,
            messages: 6_400,
            pings: 200,
        }
    } else {
        Plan {
            rounds: 1,
            messages: 128,
            pings: 10,
        }
    };
    let brokers = std::env::var("OPAMP_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9093".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run(&brokers, &plan));
}

async fn run(brokers: &str, plan: &Plan) {
    let prefix = format!("bench{}.", uuid::Uuid::new_v4().simple());
    let config = KafkaBusConfig::new(brokers)
        .with_topic_prefix(&prefix)
        .with_partitions(1, 1, 1)
        .with_replication(1)
        // tansu answers a fetch only once `fetch.wait.max.ms` (500 by default)
        // has passed, data or not; Kafka answers as soon as there is data.
        // Both sides get the same setting.
        .with_property("fetch.wait.max.ms", "5");
    let bus = KafkaBus::new(config.clone()).expect("a bus");
    let hint =
        "is the broker running? `scripts/services/kafka start /tmp/opamp-kafka`, or set OPAMP_TEST_KAFKA_BROKERS";
    bus.ensure_topics().await.unwrap_or_else(|err| panic!("{err}: {hint}"));
    // The raw side gets topics of its own, made the same way.
    let raw_config = config.clone().with_topic_prefix(&format!("{prefix}raw."));
    KafkaBus::new(raw_config.clone())
        .expect("a bus")
        .ensure_topics()
        .await
        .expect("the raw topics");
    let raw = Raw::new(&config, &raw_config.commands_topic);

    let supervisor = SupervisorId::new("supervisor-pod-3").unwrap();
    let command = Command::new(
        DeviceId::new("device-000042").unwrap(),
        CommandKind::SetEmission { state: true },
        Timestamp::now(),
        Duration::from_secs(30),
    );

    let mut stream = bus.subscribe(&supervisor).await.expect("a subscription");
    let (mut bus_rates, mut raw_rates) = (Vec::new(), Vec::new());
    let (mut bus_latency, mut raw_latency) = (Vec::new(), Vec::new());
    // A first small round of each warms connections and metadata up.
    bus_throughput(&bus, &supervisor, &command, SENDERS).await;
    raw.throughput(&command.to_json(), SENDERS).await;
    drain(&mut stream, SENDERS).await;
    raw.drain(SENDERS).await;
    for _ in 0..plan.rounds {
        bus_rates.push(bus_throughput(&bus, &supervisor, &command, plan.messages).await);
        drain(&mut stream, plan.messages).await;
        raw_rates.push(raw.throughput(&command.to_json(), plan.messages).await);
        raw.drain(plan.messages).await;
        bus_latency.extend(bus_pings(&bus, &mut stream, &supervisor, &command, plan.pings).await);
        raw_latency.extend(raw.pings(&command.to_json(), plan.pings).await);
    }

    let (bus_rate, raw_rate) = (median(&mut bus_rates), median(&mut raw_rates));
    let (bus_p50, raw_p50) = (percentile(&mut bus_latency, 50.0), percentile(&mut raw_latency, 50.0));
    let (bus_p99, raw_p99) = (percentile(&mut bus_latency, 99.0), percentile(&mut raw_latency, 99.0));
    println!(
        "\nKafka bus vs raw rdkafka: {} rounds, {} sends ({SENDERS} senders) and {} pings per round\n",
        plan.rounds, plan.messages, plan.pings
    );
    println!("| measure | KafkaBus | raw rdkafka | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| send throughput (median of rounds) | {bus_rate:.0} commands/s | {raw_rate:.0} msg/s | {:.2}× |",
        bus_rate / raw_rate
    );
    println!(
        "| end-to-end latency p50 | {:.2} ms | {:.2} ms | {:.2}× |",
        ms(bus_p50),
        ms(raw_p50),
        ms(bus_p50) / ms(raw_p50)
    );
    println!(
        "| end-to-end latency p99 | {:.2} ms | {:.2} ms | {:.2}× |",
        ms(bus_p99),
        ms(raw_p99),
        ms(bus_p99) / ms(raw_p99)
    );
    drop(stream);
    bus.shutdown(Duration::from_secs(5)).await.expect("a clean shutdown");
}

/// Sends `messages` commands from `SENDERS` tasks; commands per second.
async fn bus_throughput(bus: &KafkaBus, supervisor: &SupervisorId, command: &Command, messages: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (bus, supervisor, command) = (bus.clone(), *supervisor, command.clone());
            let count = share(messages, sender);
            tokio::spawn(async move {
                for _ in 0..count {
                    bus.send(&supervisor, &command).await.expect("a send");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a sender");
    }
    messages as f64 / started.elapsed().as_secs_f64()
}

/// Takes and acknowledges `count` deliveries.
async fn drain(stream: &mut opamp_core::Subscription<Command>, count: usize) {
    for _ in 0..count {
        let delivery = stream.next().await.expect("a delivery").expect("the stream goes on");
        delivery.ack().await.expect("an ack");
    }
}

/// One command at a time: send → delivered to the subscriber.
async fn bus_pings(
    bus: &KafkaBus,
    stream: &mut opamp_core::Subscription<Command>,
    supervisor: &SupervisorId,
    command: &Command,
    pings: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(pings);
    for _ in 0..pings {
        let started = Instant::now();
        bus.send(supervisor, command).await.expect("a send");
        let delivery = stream.next().await.expect("a delivery").expect("the stream goes on");
        samples.push(started.elapsed());
        delivery.ack().await.expect("an ack");
    }
    samples
}

/// A raw producer and consumer with the bus's own librdkafka settings.
struct Raw {
    producer: FutureProducer,
    consumer: StreamConsumer,
    topic: String,
}

impl Raw {
    fn new(config: &KafkaBusConfig, topic: &str) -> Self {
        let mut producer = ClientConfig::new();
        for (name, value) in config.producer_properties() {
            producer.set(name, value);
        }
        let mut consumer = ClientConfig::new();
        for (name, value) in config.consumer_properties() {
            consumer.set(name, value);
        }
        consumer.set("group.id", format!("{topic}.raw"));
        let consumer: StreamConsumer = consumer.create().expect("a raw consumer");
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&assignment).expect("assigning the raw partition");
        Raw {
            producer: producer.create().expect("a raw producer"),
            consumer,
            topic: topic.to_owned(),
        }
    }

    async fn send(producer: &FutureProducer, topic: &str, value: &[u8]) {
        let record = FutureRecord::to(topic).key("supervisor-pod-3").payload(value);
        if let Err((err, _)) = producer.send(record, Duration::from_secs(30)).await {
            panic!("a raw send: {err}");
        }
    }

    /// Sends `messages` from `SENDERS` tasks; messages per second.
    async fn throughput(&self, value: &[u8], messages: usize) -> f64 {
        let started = Instant::now();
        let tasks: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let (producer, topic, value) = (self.producer.clone(), self.topic.clone(), value.to_vec());
                let count = share(messages, sender);
                tokio::spawn(async move {
                    for _ in 0..count {
                        Raw::send(&producer, &topic, &value).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a raw sender");
        }
        messages as f64 / started.elapsed().as_secs_f64()
    }

    async fn drain(&self, count: usize) {
        let mut last_commit = Instant::now();
        for _ in 0..count {
            let message = self.consumer.recv().await.expect("a raw message");
            self.commit_now_and_then(&message, &mut last_commit);
        }
    }

    async fn pings(&self, value: &[u8], pings: usize) -> Vec<Duration> {
        let mut samples = Vec::with_capacity(pings);
        let mut last_commit = Instant::now();
        for _ in 0..pings {
            let started = Instant::now();
            Raw::send(&self.producer, &self.topic, value).await;
            let message = self.consumer.recv().await.expect("a raw message");
            samples.push(started.elapsed());
            self.commit_now_and_then(&message, &mut last_commit);
        }
        samples
    }

    /// Commits like the bus: every 100 ms, asynchronously.
    fn commit_now_and_then(&self, message: &rdkafka::message::BorrowedMessage<'_>, last_commit: &mut Instant) {
        if last_commit.elapsed() >= Duration::from_millis(100) {
            let _ = self.consumer.commit_message(message, CommitMode::Async);
            *last_commit = Instant::now();
        }
    }
}

/// How many of `messages` sender `index` of `SENDERS` sends.
fn share(messages: usize, index: usize) -> usize {
    messages / SENDERS + usize::from(index < messages % SENDERS)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(samples: &mut [Duration], pct: f64) -> Duration {
    samples.sort();
    let rank = ((pct / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
