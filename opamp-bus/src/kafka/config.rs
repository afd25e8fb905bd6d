//! How a [`KafkaBus`](super::KafkaBus) is set up.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use opamp_core::time::duration_text;
use opamp_core::{Error, Result};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// librdkafka properties the bus sets itself: its guarantees depend on them.
const RESERVED: [&str; 12] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "partitioner",
    "max.in.flight.requests.per.connection",
];

/// Words in a property name whose value is a secret, left out of `Debug`.
const SECRET_WORDS: [&str; 5] = ["password", "secret", "token", "key", "jaas"];

/// How a [`KafkaBus`](super::KafkaBus) reaches the broker, names its topics
/// and paces its consumers.
///
/// ```
/// use std::time::Duration;
/// use opamp_bus::kafka::KafkaBusConfig;
///
/// let config: KafkaBusConfig = serde_json::from_str(r#"{
///     "brokers": "kafka-1:9092,kafka-2:9092",
///     "commands_partitions": 64,
///     "commit_interval": "250ms",
///     "background_fetch_wait": "100ms",
///     "properties": {"security.protocol": "sasl_ssl", "sasl.password": "hunter2"}
/// }"#)?;
/// assert_eq!(config.commands_topic, "opamp.commands");
/// assert_eq!(config.commit_interval, Duration::from_millis(250));
/// assert_eq!(config.background_fetch_wait, Some(Duration::from_millis(100)));
/// assert!(!format!("{config:?}").contains("hunter2"), "secrets stay out of Debug");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub struct KafkaBusConfig {
    /// The bootstrap brokers, `host:port` separated by commas.
    pub brokers: String,
    /// Commands to supervisors, keyed by supervisor id. Default `opamp.commands`.
    pub commands_topic: String,
    /// Device events, keyed by device id. Default `opamp.events`.
    pub events_topic: String,
    /// Configuration broadcasts, keyed by agent type. Default `opamp.config-updates`.
    pub config_updates_topic: String,
    /// Undecodable messages, and those handed back more than `max_deliveries`
    /// times, copied out of the other topics. Default `opamp.dead-letters`.
    pub dead_letter_topic: String,
    /// Partitions of the commands topic, made by [`ensure_topics`](super::KafkaBus::ensure_topics). Default 64.
    pub commands_partitions: i32,
    /// Partitions of the events topic: at most this many members of one group share the events. Default 64.
    pub events_partitions: i32,
    /// Partitions of the config-updates topic. Default 1.
    pub config_updates_partitions: i32,
    /// Partitions of the dead-letter topic. Default 1.
    pub dead_letter_partitions: i32,
    /// Replicas of each topic made. Default 3 (the design's); 1 for a single broker.
    pub replication: i32,
    /// How long the broker keeps messages of the topics made (`retention.ms`). Default 7 days.
    #[serde(with = "duration_text")]
    pub retention: Duration,
    /// Prepended to every consumer group id: `{prefix}commands.{supervisor}`,
    /// `{prefix}config-updates.{supervisor}`, `{prefix}events.{group}`. Default `opamp.`.
    pub group_prefix: String,
    /// The most messages of one partition delivered and not yet acknowledged
    /// before the partition is paused. Default 1,000.
    pub max_in_flight_per_partition: usize,
    /// The most messages of one subscription delivered and not yet
    /// acknowledged before all its partitions are paused. Default 10,000.
    pub max_in_flight: usize,
    /// How many times a message that its consumer hands back
    /// ([`Delivery::nack`](opamp_core::Delivery::nack)) is delivered before
    /// it is copied to the dead-letter topic instead. Default 10.
    pub max_deliveries: u32,
    /// How often acknowledged offsets are committed. Default 100 ms.
    #[serde(with = "duration_text")]
    pub commit_interval: Duration,
    /// How long the producer waits to batch messages (`linger.ms`). Default 5 ms.
    #[serde(with = "duration_text")]
    pub linger: Duration,
    /// How long a send may take until every in-sync replica has the message
    /// (`message.timeout.ms`), retries included. Default 30 s.
    #[serde(with = "duration_text")]
    pub send_timeout: Duration,
    /// How long one request to the broker may take (metadata, offsets, topic
    /// creation; librdkafka's `socket.timeout.ms` for every request, after
    /// which the connection is closed and made again). Default 10 s.
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// How long a fetch of the consumers no command waits on (device events
    /// and config updates) may wait for messages (their `fetch.wait.max.ms`).
    /// Supervisors record command outcomes themselves, so events only bring
    /// what the control plane retries; a long wait here spares the broker
    /// most of their fetches while command consumers keep a short one. Default:
    /// none, the same as every consumer (librdkafka's 500 ms, or
    /// `fetch.wait.max.ms` among the `properties`).
    #[serde(default, with = "optional_duration_text")]
    pub background_fetch_wait: Option<Duration>,
    /// Further librdkafka properties for every client (security, tuning),
    /// e.g. `security.protocol`, `sasl.username`. Those the bus sets itself
    /// (`group.id`, `acks`, `enable.idempotence`, `partitioner`, offset
    /// handling, …) are refused.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaBusConfig {
    fn default() -> Self {
        KafkaBusConfig {
            brokers: "localhost:9092".into(),
            commands_topic: "opamp.commands".into(),
            events_topic: "opamp.events".into(),
            config_updates_topic: "opamp.config-updates".into(),
            dead_letter_topic: "opamp.dead-letters".into(),
            commands_partitions: 64,
            events_partitions: 64,
            config_updates_partitions: 1,
            dead_letter_partitions: 1,
            replication: 3,
            retention: Duration::from_secs(7 * 24 * 3600),
            group_prefix: "opamp.".into(),
            max_in_flight_per_partition: 1000,
            max_in_flight: 10_000,
            max_deliveries: opamp_core::DEFAULT_MAX_DELIVERIES,
            commit_interval: Duration::from_millis(100),
            linger: Duration::from_millis(5),
            send_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            background_fetch_wait: None,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaBusConfig {
    /// The defaults, with the bootstrap `brokers` (`host:port,host:port`).
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaBusConfig {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// The same with the four topics named `{prefix}commands`, `{prefix}events`,
    /// `{prefix}config-updates` and `{prefix}dead-letters` (the defaults are
    /// prefix `opamp.`), and consumer groups prefixed alike.
    pub fn with_topic_prefix(mut self, prefix: &str) -> Self {
        self.commands_topic = format!("{prefix}commands");
        self.events_topic = format!("{prefix}events");
        self.config_updates_topic = format!("{prefix}config-updates");
        self.dead_letter_topic = format!("{prefix}dead-letters");
        self.group_prefix = prefix.to_owned();
        self
    }

    /// The same with these partition counts for the topics made.
    pub fn with_partitions(mut self, commands: i32, events: i32, config_updates: i32) -> Self {
        self.commands_partitions = commands;
        self.events_partitions = events;
        self.config_updates_partitions = config_updates;
        self
    }

    /// The same with `replication` replicas of each topic made.
    pub fn with_replication(mut self, replication: i32) -> Self {
        self.replication = replication;
        self
    }

    /// The same with these back-pressure bounds.
    pub fn with_max_in_flight(mut self, per_partition: usize, per_subscription: usize) -> Self {
        self.max_in_flight_per_partition = per_partition;
        self.max_in_flight = per_subscription;
        self
    }

    /// The same, delivering a message handed back at most `deliveries` times.
    pub fn with_max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries;
        self
    }

    /// The same, committing acknowledged offsets every `interval`.
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// The same, with the consumers of events and config updates fetching
    /// with `wait` (see [`background_fetch_wait`](Self::background_fetch_wait)).
    pub fn with_background_fetch_wait(mut self, wait: Duration) -> Self {
        self.background_fetch_wait = Some(wait);
        self
    }

    /// The same, batching sends for up to `linger`.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The same, giving each request to the broker up to `timeout`.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The same with a further librdkafka property for every client.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Every setting in range, or an [`Error::InvalidInput`] naming the one that is not.
    pub(super) fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::invalid_input(format!("kafka bus config: {message}")));
        if self.brokers.trim().is_empty() {
            return invalid("`brokers` is empty".into());
        }
        let topics = self.topics();
        for (field, (topic, partitions)) in ["commands", "events", "config_updates", "dead_letter"]
            .iter()
            .zip(&topics)
        {
            if topic.is_empty()
                || topic.len() > 249
                || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return invalid(format!(
                    "`{field}_topic` {topic:?} is not a Kafka topic name (1 to 249 of [A-Za-z0-9._-])"
                ));
            }
            if *partitions < 1 {
                return invalid(format!("`{field}_partitions` is {partitions}; it must be at least 1"));
            }
        }
        for (i, (topic, _)) in topics.iter().enumerate() {
            if topics[..i].iter().any(|(other, _)| other == topic) {
                return invalid(format!("topic {topic:?} is named twice; each stream needs its own"));
            }
        }
        if self.replication < 1 {
            return invalid(format!("`replication` is {}; it must be at least 1", self.replication));
        }
        if self.max_in_flight_per_partition == 0 || self.max_in_flight == 0 {
            return invalid("`max_in_flight_per_partition` and `max_in_flight` must be at least 1".into());
        }
        if self.max_deliveries == 0 {
            return invalid("`max_deliveries` must be at least 1".into());
        }
        for (field, duration) in [
            ("commit_interval", self.commit_interval),
            ("send_timeout", self.send_timeout),
            ("request_timeout", self.request_timeout),
            ("retention", self.retention),
        ] {
            if duration < Duration::from_millis(1) {
                return invalid(format!("`{field}` must be at least 1ms"));
            }
        }
        if self.linger > Duration::from_secs(900) {
            return invalid("`linger` must be at most 900s (librdkafka's limit)".into());
        }
        if let Some(wait) = self.background_fetch_wait
            && !(Duration::from_millis(1)..=Duration::from_secs(300)).contains(&wait)
        {
            return invalid("`background_fetch_wait` must be between 1ms and 300s".into());
        }
        if let Some(name) = self.properties.keys().find(|name| RESERVED.contains(&name.as_str())) {
            return invalid(format!(
                "property `{name}` is set by the bus itself (its delivery guarantees depend on it)"
            ));
        }
        Ok(())
    }

    /// Each topic with the partitions it is made with.
    pub(super) fn topics(&self) -> [(&str, i32); 4] {
        [
            (&self.commands_topic, self.commands_partitions),
            (&self.events_topic, self.events_partitions),
            (&self.config_updates_topic, self.config_updates_partitions),
            (&self.dead_letter_topic, self.dead_letter_partitions),
        ]
    }

    /// What every client shares (the brokers, the request deadline), then
    /// `settings`, then the user's properties.
    fn client_properties(&self, settings: Vec<(&str, String)>) -> Vec<(String, String)> {
        [
            ("bootstrap.servers", self.brokers.clone()),
            ("client.id", "opamp-bus".into()),
            // librdkafka's own deadline on a request (60 s by default); one
            // that passes it closes the connection (`socket.max.fails`), so a
            // connection gone silent is replaced this soon, not after a
            // minute, well within a send's `message.timeout.ms`.
            ("socket.timeout.ms", self.request_timeout.as_millis().to_string()),
        ]
        .into_iter()
        .chain(settings)
        .map(|(name, value)| (name.to_owned(), value))
        .chain(
            self.properties
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        )
        .collect()
    }

    /// The librdkafka properties of the bus's producer, in the order applied:
    /// idempotent, every in-sync replica acknowledges, murmur2 partitioning.
    /// (For a baseline with the same settings, or to check a deployment.)
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        self.client_properties(vec![
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("partitioner", "murmur2_random".into()),
            ("linger.ms", self.linger.as_millis().to_string()),
            ("message.timeout.ms", self.send_timeout.as_millis().to_string()),
            ("request.timeout.ms", self.request_timeout.as_millis().to_string()),
        ])
    }

    /// The librdkafka properties of every consumer of the bus, in the order
    /// applied (each subscription adds its `group.id`): offsets are committed
    /// by the bus alone, for what was acknowledged.
    pub fn consumer_properties(&self) -> Vec<(String, String)> {
        self.client_properties(vec![
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            ("enable.partition.eof", "false".into()),
            // librdkafka's own prefetch buffer, bounded (its default is 64 MiB per consumer).
            ("queued.max.messages.kbytes", "4096".into()),
        ])
    }

    /// The producer's client configuration.
    pub(super) fn producer_config(&self) -> ClientConfig {
        client_config(self.producer_properties())
    }

    /// Every consumer's client configuration, but its group id.
    pub(super) fn consumer_config(&self) -> ClientConfig {
        client_config(self.consumer_properties())
    }

    /// The admin client that makes topics.
    pub(super) fn admin_config(&self) -> ClientConfig {
        client_config(self.client_properties(Vec::new()))
    }
}

/// `Option<Duration>` written as [`duration_text`] (none: absent), for `#[serde(with = "…")]`.
mod optional_duration_text {
    use std::borrow::Cow;
    use std::time::Duration;

    use opamp_core::time::duration_text;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => duration_text::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        Option::<Cow<'de, str>>::deserialize(deserializer)?
            .map(|text| duration_text::parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn client_config(properties: Vec<(String, String)>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (name, value) in properties {
        config.set(name, value);
    }
    config
}

impl fmt::Debug for KafkaBusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(name, value)| {
                let secret = SECRET_WORDS.iter().any(|word| name.to_ascii_lowercase().contains(word));
                (name.as_str(), if secret { "<redacted>" } else { value.as_str() })
            })
            .collect();
        f.debug_struct("KafkaBusConfig")
            .field("brokers", &self.brokers)
            .field("commands_topic", &self.commands_topic)
            .field("events_topic", &self.events_topic)
            .field("config_updates_topic", &self.config_updates_topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("commands_partitions", &self.commands_partitions)
            .field("events_partitions", &self.events_partitions)
            .field("config_updates_partitions", &self.config_updates_partitions)
            .field("dead_letter_partitions", &self.dead_letter_partitions)
            .field("replication", &self.replication)
            .field("retention", &self.retention)
            .field("group_prefix", &self.group_prefix)
            .field("max_in_flight_per_partition", &self.max_in_flight_per_partition)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_deliveries", &self.max_deliveries)
            .field("commit_interval", &self.commit_interval)
            .field("linger", &self.linger)
            .field("send_timeout", &self.send_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("background_fetch_wait", &self.background_fetch_wait)
            .field("properties", &properties)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(config: KafkaBusConfig, naming: &str) {
        let err = config.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
        assert!(err.to_string().contains(naming), "{err} should name {naming}");
    }

    #[test]
    fn settings_out_of_range_are_named() {
        assert!(KafkaBusConfig::default().validate().is_ok());
        rejected(KafkaBusConfig::new(" "), "brokers");
        rejected(
            KafkaBusConfig::default().with_partitions(0, 1, 1),
            "commands_partitions",
        );
        rejected(KafkaBusConfig::default().with_replication(0), "replication");
        rejected(KafkaBusConfig::default().with_max_in_flight(0, 1), "max_in_flight");
        rejected(
            KafkaBusConfig::default().with_commit_interval(Duration::ZERO),
            "commit_interval",
        );
        rejected(
            KafkaBusConfig::default().with_linger(Duration::from_secs(901)),
            "linger",
        );
        rejected(
            KafkaBusConfig::default().with_background_fetch_wait(Duration::ZERO),
            "background_fetch_wait",
        );
        rejected(KafkaBusConfig::default().with_topic_prefix("a b."), "commands_topic");
        let mut twice = KafkaBusConfig::default();
        twice.events_topic = twice.commands_topic.clone();
        rejected(twice, "named twice");
        rejected(KafkaBusConfig::default().with_property("acks", "1"), "`acks`");
        rejected(KafkaBusConfig::default().with_property("group.id", "x"), "`group.id`");
    }

    #[test]
    fn prefix_names_topics_and_groups() {
        let config = KafkaBusConfig::default().with_topic_prefix("t1.");
        let names: Vec<&str> = config.topics().iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            ["t1.commands", "t1.events", "t1.config-updates", "t1.dead-letters"]
        );
        assert_eq!(config.group_prefix, "t1.");
        assert_eq!(
            KafkaBusConfig::default().with_topic_prefix("opamp."),
            KafkaBusConfig::default()
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let config = KafkaBusConfig::default()
            .with_property("sasl.password", "hunter2")
            .with_property("ssl.key.pem", "-----BEGIN")
            .with_property("security.protocol", "sasl_ssl");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("BEGIN"), "{shown}");
        assert!(shown.contains("sasl_ssl"), "{shown}");
    }

    #[test]
    fn the_producer_keeps_the_guarantees() {
        let config = KafkaBusConfig::new("b:9092").with_property("linger.ms", "50");
        let producer = config.producer_config();
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("partitioner"), Some("murmur2_random"));
        assert_eq!(producer.get("linger.ms"), Some("50"), "user properties come last");
        let consumer = config.consumer_config();
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("bootstrap.servers"), Some("b:9092"));
    }
}
