//! Stores and buses chosen by URL, as `--store` and `--bus` take them.
//!
//! Parse a [`StoreUrl`] or a [`BusUrl`] (both implement [`FromStr`], so clap
//! parses them straight from a flag), then open it with [`open_store`] or
//! [`open_bus`]. A URL with an unknown scheme, a malformed address or an
//! unknown parameter is an [`Error::InvalidInput`] naming what was wrong;
//! error messages and `Debug` never show a password.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use opamp_examples::{BusUrl, StoreUrl, open_bus, open_store};
//!
//! let store = open_store(&"memory://".parse::<StoreUrl>()?).await?;
//! let bus = open_bus(&"memory://".parse::<BusUrl>()?).await?;
//! # let _ = (store, bus);
//!
//! let redis: StoreUrl = "redis://:hunter2@10.0.0.5:6390/2?prefix=fleet-a:".parse()?;
//! assert!(!format!("{redis:?}").contains("hunter2"));
//! let err = "mongodb://db:27017".parse::<StoreUrl>().unwrap_err();
//! assert!(err.to_string().contains("mongodb"), "{err}");
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::time::duration_text;
use opamp_core::{Bus, Error, Result, Store};
use opamp_store::memory::MemoryStore;

/// The default port of a Redis node.
pub const REDIS_PORT: u16 = 6379;
/// The default port of a Redis Sentinel.
pub const SENTINEL_PORT: u16 = 26379;
/// The default port of a Kafka broker.
pub const KAFKA_PORT: u16 = 9092;

/// Where the routing, status and configuration store is.
///
/// | URL | store |
/// |-----|-------|
/// | `memory://` | in this process (lost on exit; other processes cannot see it) |
/// | `redis://[user[:password]@]host[:port][/db][?prefix=P&response_timeout=5s]` | one Redis server |
/// | `redis+cluster://[user[:password]@]host[:port],host[:port]…[?prefix=P&response_timeout=5s]` | a Redis Cluster, reached through some of its nodes |
/// | `redis+sentinel://[user[:password]@]host[:port],host[:port]…/master-name[/db][?prefix=P&response_timeout=5s&sentinel_username=U&sentinel_password=S]` | the primary the Sentinels at those hosts (port 26379 by default) know as `master-name`, followed across failovers; the user and password are the primary's, `sentinel_…` the Sentinels' own |
/// | `postgres://user[:password]@host[:port]/database[?schema=S&max_connections=N&…]` | PostgreSQL (also `postgresql://`); its tables are made or migrated when opened |
///
/// `prefix` goes before every Redis key, so several fleets (or tests) share
/// one Redis. Passwords, in the user part or in a `…password` parameter, are
/// shown as `***` in errors and `Debug`. PostgreSQL parameters other than `schema` and `max_connections`
/// (`sslmode`, …) go to the driver as they are.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// `memory://`: the in-process store.
    Memory,
    /// `redis://` or `redis+cluster://`.
    Redis {
        /// One `redis://…` URL per node given (exactly one unless `cluster`).
        nodes: Vec<String>,
        /// Whether the nodes are Redis Cluster nodes.
        cluster: bool,
        /// Put before every key.
        key_prefix: String,
        /// How long to wait for an answer, when not the store's default.
        response_timeout: Option<Duration>,
    },
    /// `redis+sentinel://`.
    RedisSentinel(RedisSentinelUrl),
    /// `postgres://` or `postgresql://`.
    Postgres {
        /// The driver's URL: the one given without the store's own parameters.
        url: String,
        /// The schema holding the tables, when not the store's default (`opamp`).
        schema: Option<String>,
        /// The most pooled connections, when not the store's default.
        max_connections: Option<u32>,
    },
}

/// A `redis+sentinel://` store URL, taken apart.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisSentinelUrl {
    /// One `redis://…` URL per Sentinel, with the Sentinels' credentials, if any.
    pub sentinels: Vec<String>,
    /// The name the Sentinels know the primary by.
    pub master_name: String,
    /// The user on the primary and its replicas.
    pub username: Option<String>,
    /// Their password.
    pub password: Option<String>,
    /// The database on them.
    pub db: u32,
    /// Put before every key.
    pub key_prefix: String,
    /// How long to wait for an answer, when not the store's default.
    pub response_timeout: Option<Duration>,
}

impl fmt::Debug for RedisSentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSentinelUrl")
            .field(
                "sentinels",
                &self.sentinels.iter().map(|url| redact(url)).collect::<Vec<_>>(),
            )
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("key_prefix", &self.key_prefix)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

impl StoreUrl {
    /// The URL scheme's backend: `memory`, `redis` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            StoreUrl::Memory => "memory",
            StoreUrl::Redis { .. } | StoreUrl::RedisSentinel(_) => "redis",
            StoreUrl::Postgres { .. } => "postgres",
        }
    }
}

impl FromStr for StoreUrl {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let url = UrlParts::split(text, "store", "redis://host:port")?;
        match url.scheme.as_str() {
            "memory" => {
                url.expect_empty()?;
                Ok(StoreUrl::Memory)
            }
            "redis" | "redis+cluster" => {
                let cluster = url.scheme == "redis+cluster";
                let (user_info, hosts) = url.user_info_and_hosts();
                let nodes = parse_hosts(&url, hosts, REDIS_PORT)?;
                if !cluster && nodes.len() > 1 {
                    return Err(url.invalid(
                        "names several hosts: a redis:// URL is one server; use redis+cluster:// for a Redis Cluster",
                    ));
                }
                let db = parse_db(&url, url.path.trim_start_matches('/'))?;
                if cluster && db != 0 {
                    return Err(url.invalid(&format!("names database {db}: a Redis Cluster has only database 0")));
                }
                let mut params = url.params();
                let key_prefix = params.take("prefix")?.unwrap_or_default();
                let response_timeout = params.take_with("response_timeout", duration_text::parse)?;
                params.finish()?;
                let user_info = user_info.map(|info| format!("{info}@")).unwrap_or_default();
                let nodes = nodes
                    .iter()
                    .map(|node| format!("redis://{user_info}{node}/{db}"))
                    .collect();
                Ok(StoreUrl::Redis {
                    nodes,
                    cluster,
                    key_prefix,
                    response_timeout,
                })
            }
            "redis+sentinel" => {
                let (user_info, hosts) = url.user_info_and_hosts();
                let hosts = parse_hosts(&url, hosts, SENTINEL_PORT)?;
                let mut path = url.path.trim_start_matches('/').split('/');
                let master_name = match path.next() {
                    Some(name) if !name.is_empty() => name.to_owned(),
                    _ => {
                        return Err(
                            url.invalid("names no primary: write redis+sentinel://host:port,host:port/master-name")
                        );
                    }
                };
                let db = parse_db(&url, path.next().unwrap_or_default())?;
                if path.next().is_some() {
                    return Err(url.invalid("has more in its path than the primary's name and a database"));
                }
                let mut params = url.params();
                let key_prefix = params.take("prefix")?.unwrap_or_default();
                let response_timeout = params.take_with("response_timeout", duration_text::parse)?;
                let sentinel_username = params.take("sentinel_username")?;
                let sentinel_password = params.take("sentinel_password")?;
                params.finish()?;
                let sentinel_user_info = match (&sentinel_username, &sentinel_password) {
                    (None, None) => String::new(),
                    (user, None) => format!("{}@", encode(user.as_deref().unwrap_or_default())),
                    (user, Some(password)) => {
                        format!("{}:{}@", encode(user.as_deref().unwrap_or_default()), encode(password))
                    }
                };
                let (username, password) = match user_info {
                    None => (None, None),
                    Some(info) => {
                        let (user, password) = info.split_once(':').map_or((info, None), |(u, p)| (u, Some(p)));
                        (Some(decode(user)).filter(|user| !user.is_empty()), password.map(decode))
                    }
                };
                Ok(StoreUrl::RedisSentinel(RedisSentinelUrl {
                    sentinels: hosts
                        .iter()
                        .map(|host| format!("redis://{sentinel_user_info}{host}/"))
                        .collect(),
                    master_name,
                    username,
                    password,
                    db,
                    key_prefix,
                    response_timeout,
                }))
            }
            "postgres" | "postgresql" => {
                if url.authority.is_empty() {
                    return Err(url.invalid("has no host"));
                }
                let mut params = url.params();
                let schema = params.take("schema")?;
                let max_connections = params.take_with("max_connections", positive::<u32>)?;
                let rest = params.into_rest();
                let mut driver_url = format!("{}://{}{}", url.scheme, url.authority, url.path);
                if !rest.is_empty() {
                    let query = form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(rest)
                        .finish();
                    driver_url = format!("{driver_url}?{query}");
                }
                Ok(StoreUrl::Postgres {
                    url: driver_url,
                    schema,
                    max_connections,
                })
            }
            other => Err(Error::invalid_input(format!(
                "store URL {}: unknown scheme `{other}`; expected memory://, redis://, redis+cluster://, redis+sentinel:// or postgres://",
                url.redacted
            ))),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("Memory"),
            StoreUrl::Redis {
                nodes,
                cluster,
                key_prefix,
                response_timeout,
            } => f
                .debug_struct("Redis")
                .field("nodes", &nodes.iter().map(|node| redact(node)).collect::<Vec<_>>())
                .field("cluster", cluster)
                .field("key_prefix", key_prefix)
                .field("response_timeout", response_timeout)
                .finish(),
            StoreUrl::RedisSentinel(url) => f.debug_tuple("RedisSentinel").field(url).finish(),
            StoreUrl::Postgres {
                url,
                schema,
                max_connections,
            } => f
                .debug_struct("Postgres")
                .field("url", &redact(url))
                .field("schema", schema)
                .field("max_connections", max_connections)
                .finish(),
        }
    }
}

/// Where the command bus is.
///
/// | URL | bus |
/// |-----|-----|
/// | `memory://` | in this process: only this process can send commands to its supervisors |
/// | `kafka://host[:port][,host[:port]…][?…]` | a Kafka-protocol broker, see [`KafkaUrl`] for the parameters |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusUrl {
    /// `memory://`: the in-process bus.
    Memory,
    /// `kafka://`.
    Kafka(KafkaUrl),
}

impl BusUrl {
    /// The URL scheme's backend: `memory` or `kafka`.
    pub fn backend(&self) -> &'static str {
        match self {
            BusUrl::Memory => "memory",
            BusUrl::Kafka(_) => "kafka",
        }
    }
}

/// A `kafka://` bus URL, taken apart.
///
/// `kafka://host[:port][,host[:port]…][?parameters]`, the port 9092 by default. Parameters:
///
/// | parameter | meaning | default |
/// |-----------|---------|---------|
/// | `topic_prefix` | the topics are `{prefix}commands`, `{prefix}events`, `{prefix}config-updates`, `{prefix}dead-letters`; consumer groups start with it too | `opamp.` |
/// | `commands_partitions`, `events_partitions` | partitions of the topics made | 64 |
/// | `replication` | replicas of the topics made (1 for a single broker) | 3 |
/// | `create_topics` | `true`: make the missing topics when opened; `false`: expect them | `true` |
/// | `background_fetch_wait` | how long fetches of events and config updates wait (no command waits on them), e.g. `100ms` | as every consumer |
/// | any name with a dot, e.g. `security.protocol` | a librdkafka property for every client | |
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaUrl {
    /// The bootstrap brokers, `host:port,host:port`.
    pub brokers: String,
    /// The prefix of topic and consumer group names, when not `opamp.`.
    pub topic_prefix: Option<String>,
    /// Partitions of the commands topic, when made.
    pub commands_partitions: Option<i32>,
    /// Partitions of the events topic, when made.
    pub events_partitions: Option<i32>,
    /// Replicas of each topic, when made.
    pub replication: Option<i32>,
    /// Whether opening the bus makes the topics that are missing.
    pub create_topics: bool,
    /// The fetch wait of the event and config-update consumers, when set.
    pub background_fetch_wait: Option<Duration>,
    /// Further librdkafka properties.
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaUrl")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("commands_partitions", &self.commands_partitions)
            .field("events_partitions", &self.events_partitions)
            .field("replication", &self.replication)
            .field("create_topics", &self.create_topics)
            .field("background_fetch_wait", &self.background_fetch_wait)
            // Property values may be credentials (sasl.password): names only.
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl FromStr for BusUrl {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let url = UrlParts::split(text, "bus", "kafka://host:port")?;
        match url.scheme.as_str() {
            "memory" => {
                url.expect_empty()?;
                Ok(BusUrl::Memory)
            }
            "kafka" => {
                let (user_info, hosts) = url.user_info_and_hosts();
                if user_info.is_some() {
                    return Err(
                        url.invalid("has user credentials: pass them as sasl.username and sasl.password parameters")
                    );
                }
                if !url.path.trim_start_matches('/').is_empty() {
                    return Err(url.invalid(&format!("has path {:?}: a kafka:// URL names brokers only", url.path)));
                }
                let brokers = parse_hosts(&url, hosts, KAFKA_PORT)?.join(",");
                let mut params = url.params();
                let topic_prefix = params.take("topic_prefix")?;
                let commands_partitions = params.take_with("commands_partitions", positive::<i32>)?;
                let events_partitions = params.take_with("events_partitions", positive::<i32>)?;
                let replication = params.take_with("replication", positive::<i32>)?;
                let create_topics = params.take_with("create_topics", boolean)?.unwrap_or(true);
                let background_fetch_wait = params.take_with("background_fetch_wait", duration_text::parse)?;
                let properties = params.take_dotted();
                params.finish()?;
                Ok(BusUrl::Kafka(KafkaUrl {
                    brokers,
                    topic_prefix,
                    commands_partitions,
                    events_partitions,
                    replication,
                    create_topics,
                    background_fetch_wait,
                    properties,
                }))
            }
            other => Err(Error::invalid_input(format!(
                "bus URL {}: unknown scheme `{other}`; expected memory:// or kafka://",
                url.redacted
            ))),
        }
    }
}

/// Opens the store `url` names: connects, and for PostgreSQL applies the migrations.
///
/// [`Error::Unavailable`] when it cannot be reached, [`Error::Unsupported`]
/// when this build lacks the backend's feature.
pub async fn open_store(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    match url {
        StoreUrl::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreUrl::Redis { .. } | StoreUrl::RedisSentinel(_) => open_redis(url).await,
        StoreUrl::Postgres {
            url,
            schema,
            max_connections,
        } => open_postgres(url, schema.as_deref(), *max_connections).await,
    }
}

/// Opens a `redis://`, `redis+cluster://` or `redis+sentinel://` store.
#[cfg(feature = "redis")]
async fn open_redis(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    use opamp_store::redis::{RedisSentinelConfig, RedisStore, RedisStoreConfig};
    let (config, key_prefix, response_timeout) = match url {
        StoreUrl::Redis {
            nodes,
            cluster,
            key_prefix,
            response_timeout,
        } => {
            let config = if *cluster {
                RedisStoreConfig::cluster(nodes.iter().cloned())
            } else {
                RedisStoreConfig::standalone(nodes.first().cloned().unwrap_or_default())
            };
            (config, key_prefix, response_timeout)
        }
        StoreUrl::RedisSentinel(url) => {
            let mut sentinel = RedisSentinelConfig::new(&url.master_name).db(i64::from(url.db));
            sentinel.username = url.username.clone();
            sentinel.password = url.password.clone();
            let config = RedisStoreConfig::sentinel(url.sentinels.iter().cloned(), sentinel);
            (config, &url.key_prefix, &url.response_timeout)
        }
        other => return Err(Error::invalid_input(format!("{other:?} is not a Redis store URL"))),
    };
    let mut config = config.key_prefix(key_prefix);
    if let Some(timeout) = response_timeout {
        config = config.response_timeout(*timeout);
    }
    Ok(Arc::new(RedisStore::connect(config).await?))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_: &StoreUrl) -> Result<Arc<dyn Store>> {
    Err(not_built("redis", "redis:// store URLs"))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str, schema: Option<&str>, max_connections: Option<u32>) -> Result<Arc<dyn Store>> {
    use opamp_store::postgres::{PostgresConfig, PostgresStore};
    let mut config = PostgresConfig::new(url);
    if let Some(schema) = schema {
        config = config.with_schema(schema);
    }
    if let Some(max) = max_connections {
        config = config.with_max_connections(max);
    }
    let store = PostgresStore::connect(&config).await?;
    store.migrate().await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_: &str, _: Option<&str>, _: Option<u32>) -> Result<Arc<dyn Store>> {
    Err(not_built("postgres", "postgres:// store URLs"))
}

/// An open bus, and what shutting it down gracefully needs.
#[derive(Debug, Clone)]
pub struct OpenBus {
    bus: Arc<dyn Bus>,
    #[cfg(feature = "kafka")]
    kafka: Option<Arc<opamp_bus::kafka::KafkaBus>>,
}

impl OpenBus {
    /// The bus.
    pub fn bus(&self) -> Arc<dyn Bus> {
        Arc::clone(&self.bus)
    }

    /// Ends the subscriptions gracefully: the Kafka bus lets subscribers
    /// acknowledge what they had fetched (for up to `grace`), commits and
    /// flushes its producer. The memory bus keeps nothing outside this
    /// process, so it has nothing to hand over.
    pub async fn shutdown(&self, grace: Duration) -> Result<()> {
        #[cfg(feature = "kafka")]
        if let Some(kafka) = &self.kafka {
            return kafka.shutdown(grace).await;
        }
        let _ = grace;
        Ok(())
    }
}

/// Opens the bus `url` names; for Kafka, makes the missing topics unless
/// `create_topics=false`.
///
/// [`Error::Unsupported`] when this build lacks the backend's feature.
pub async fn open_bus(url: &BusUrl) -> Result<OpenBus> {
    match url {
        BusUrl::Memory => Ok(OpenBus {
            bus: Arc::new(MemoryBus::new()),
            #[cfg(feature = "kafka")]
            kafka: None,
        }),
        BusUrl::Kafka(kafka) => open_kafka(kafka).await,
    }
}

#[cfg(feature = "kafka")]
async fn open_kafka(url: &KafkaUrl) -> Result<OpenBus> {
    use opamp_bus::kafka::{KafkaBus, KafkaBusConfig};
    let mut config = KafkaBusConfig::new(url.brokers.clone());
    if let Some(prefix) = &url.topic_prefix {
        config = config.with_topic_prefix(prefix);
    }
    config.commands_partitions = url.commands_partitions.unwrap_or(config.commands_partitions);
    config.events_partitions = url.events_partitions.unwrap_or(config.events_partitions);
    if let Some(replication) = url.replication {
        config = config.with_replication(replication);
    }
    if let Some(wait) = url.background_fetch_wait {
        config = config.with_background_fetch_wait(wait);
    }
    for (name, value) in &url.properties {
        config = config.with_property(name.clone(), value.clone());
    }
    let kafka = Arc::new(KafkaBus::new(config)?);
    if url.create_topics {
        kafka.ensure_topics().await?;
    }
    Ok(OpenBus {
        bus: kafka.clone(),
        kafka: Some(kafka),
    })
}

#[cfg(not(feature = "kafka"))]
async fn open_kafka(_url: &KafkaUrl) -> Result<OpenBus> {
    Err(not_built("kafka", "kafka:// bus URLs"))
}

#[cfg(not(all(feature = "redis", feature = "postgres", feature = "kafka")))]
fn not_built(feature: &str, what: &str) -> Error {
    Error::unsupported(format!(
        "{what}: this build of opamp-examples lacks the `{feature}` feature (build with --features {feature})"
    ))
}

/// A URL cut into its parts, and its text with any password hidden (for errors).
struct UrlParts {
    what: &'static str,
    redacted: String,
    scheme: String,
    authority: String,
    path: String,
    query: String,
}

impl UrlParts {
    /// `what` is `store` or `bus`; `example` a URL of that kind, for the message of a URL without a scheme.
    fn split(text: &str, what: &'static str, example: &str) -> Result<Self> {
        let redacted = redact(text);
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(Error::invalid_input(format!(
                "{what} URL {redacted:?} has no scheme: write it like memory:// or {example}"
            )));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        Ok(UrlParts {
            what,
            redacted,
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
        })
    }

    fn invalid(&self, why: &str) -> Error {
        Error::invalid_input(format!("{} URL {} {why}", self.what, self.redacted))
    }

    /// For `memory://`, which takes nothing after the scheme.
    fn expect_empty(&self) -> Result<()> {
        if self.authority.is_empty() && self.path.trim_start_matches('/').is_empty() && self.query.is_empty() {
            Ok(())
        } else {
            Err(self.invalid("has more than the scheme: write just memory://"))
        }
    }

    /// `user:password` (if any) and the comma-separated hosts.
    fn user_info_and_hosts(&self) -> (Option<&str>, &str) {
        match self.authority.rsplit_once('@') {
            Some((user_info, hosts)) => (Some(user_info), hosts),
            None => (None, &self.authority),
        }
    }

    fn params(&self) -> Params<'_> {
        Params {
            url: self,
            pairs: form_urlencoded::parse(self.query.as_bytes()).into_owned().collect(),
        }
    }
}

/// `host[:port]` items separated by commas, each checked, with `default_port` filled in.
fn parse_hosts(url: &UrlParts, hosts: &str, default_port: u16) -> Result<Vec<String>> {
    if hosts.is_empty() {
        return Err(url.invalid("has no host"));
    }
    hosts
        .split(',')
        .map(|item| {
            let (host, port) = match item.strip_prefix('[') {
                // [v6 address]:port
                Some(bracketed) => {
                    let (address, after) = bracketed
                        .split_once(']')
                        .ok_or_else(|| url.invalid(&format!("has host {item:?} with no closing `]`")))?;
                    (format!("[{address}]"), after.strip_prefix(':'))
                }
                None => match item.split_once(':') {
                    Some((host, port)) => (host.to_owned(), Some(port)),
                    None => (item.to_owned(), None),
                },
            };
            let well_formed = host.len() > 2 && host.starts_with('[')
                || !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if !well_formed {
                return Err(url.invalid(&format!("has host {item:?}: expected host or host:port")));
            }
            let port = match port {
                None => default_port,
                Some(port) => port
                    .parse::<u16>()
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| url.invalid(&format!("has port {port:?} in {item:?}: expected 1 to 65535")))?,
            };
            Ok(format!("{host}:{port}"))
        })
        .collect()
}

/// Query parameters, taken one by one so that what is left over can be refused by name.
struct Params<'a> {
    url: &'a UrlParts,
    pairs: Vec<(String, String)>,
}

impl Params<'_> {
    fn take(&mut self, name: &str) -> Result<Option<String>> {
        let mut found = None;
        for (key, value) in std::mem::take(&mut self.pairs) {
            if key != name {
                self.pairs.push((key, value));
            } else if found.replace(value).is_some() {
                return Err(self.url.invalid(&format!("has parameter `{name}` more than once")));
            }
        }
        Ok(found)
    }

    fn take_with<T>(&mut self, name: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Option<T>> {
        match self.take(name)? {
            Some(text) => parse(&text)
                .map(Some)
                .map_err(|err| self.url.invalid(&format!("has parameter `{name}={text}`: {err}"))),
            None => Ok(None),
        }
    }

    /// The parameters whose names have a dot: librdkafka properties.
    fn take_dotted(&mut self) -> BTreeMap<String, String> {
        let (dotted, rest) = std::mem::take(&mut self.pairs)
            .into_iter()
            .partition(|(key, _)| key.contains('.'));
        self.pairs = rest;
        dotted.into_iter().collect()
    }

    /// What is left, for a driver that takes parameters of its own.
    fn into_rest(self) -> Vec<(String, String)> {
        self.pairs
    }

    /// Refuses any parameter not taken.
    fn finish(self) -> Result<()> {
        match self.pairs.first() {
            None => Ok(()),
            Some((name, _)) => Err(self.url.invalid(&format!("has unknown parameter `{name}`"))),
        }
    }
}

/// A Redis database number from a URL's path (`""` is 0).
fn parse_db(url: &UrlParts, text: &str) -> Result<u32> {
    match text {
        "" => Ok(0),
        db => db
            .parse::<u32>()
            .map_err(|_| url.invalid(&format!("has database {db:?}: it must be a number"))),
    }
}

/// `text` percent-encoded for the user part of a URL.
fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The user part of a URL, percent-decoded.
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn positive<T: FromStr + Default + PartialOrd>(text: &str) -> Result<T> {
    text.parse::<T>()
        .ok()
        .filter(|value| *value > T::default())
        .ok_or_else(|| Error::invalid_input("expected a whole number of at least 1"))
}

fn boolean(text: &str) -> Result<bool> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::invalid_input("expected true or false")),
    }
}

/// `scheme://user:secret@host…?x_password=secret` → `scheme://user:***@host…?x_password=***`.
fn redact(url: &str) -> String {
    let (url, query) = url
        .split_once('?')
        .map_or((url, None), |(url, query)| (url, Some(query)));
    let mut redacted = match url.split_once("://") {
        None => url.to_owned(),
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rsplit_once('@') {
                Some((user_info, hosts)) => {
                    let user = user_info.split_once(':').map_or(user_info, |(user, _)| user);
                    format!("{scheme}://{user}:***@{hosts}{}", &rest[authority_end..])
                }
                None => url.to_owned(),
            }
        }
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.ends_with("password") => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        redacted = format!("{redacted}?{}", pairs.join("&"));
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_error(text: &str) -> String {
        let err = text.parse::<StoreUrl>().expect_err(text);
        assert!(matches!(err, Error::InvalidInput { .. }), "{text}: {err:?}");
        err.to_string()
    }

    fn bus_error(text: &str) -> String {
        let err = text.parse::<BusUrl>().expect_err(text);
        assert!(matches!(err, Error::InvalidInput { .. }), "{text}: {err:?}");
        err.to_string()
    }

    #[test]
    fn memory_urls() {
        assert_eq!("memory://".parse::<StoreUrl>().unwrap(), StoreUrl::Memory);
        assert_eq!("memory:///".parse::<BusUrl>().unwrap(), BusUrl::Memory);
        assert!(store_error("memory://somewhere").contains("write just memory://"));
        assert!(bus_error("memory://?x=1").contains("memory://?x=1"));
    }

    #[test]
    fn redis_urls() {
        let url: StoreUrl = "redis://:pw@127.0.0.1:6390/3?prefix=fleet-a:&response_timeout=2s"
            .parse()
            .unwrap();
        assert_eq!(
            url,
            StoreUrl::Redis {
                nodes: vec!["redis://:pw@127.0.0.1:6390/3".into()],
                cluster: false,
                key_prefix: "fleet-a:".into(),
                response_timeout: Some(Duration::from_secs(2)),
            }
        );
        let debug = format!("{url:?}");
        assert!(!debug.contains("pw"), "{debug}");

        let url: StoreUrl = "redis+cluster://a,b:7302,[::1]:7303".parse().unwrap();
        let StoreUrl::Redis { nodes, cluster, .. } = url else {
            panic!("a redis url")
        };
        assert!(cluster);
        assert_eq!(nodes, ["redis://a:6379/0", "redis://b:7302/0", "redis://[::1]:7303/0"]);
    }

    #[test]
    fn redis_sentinel_urls() {
        let url: StoreUrl = "redis+sentinel://op%40s:pw@s1,s2:26380/fleet/2?prefix=f:&sentinel_password=sp%2F1"
            .parse()
            .unwrap();
        assert_eq!(
            url,
            StoreUrl::RedisSentinel(RedisSentinelUrl {
                sentinels: vec!["redis://:sp%2F1@s1:26379/".into(), "redis://:sp%2F1@s2:26380/".into()],
                master_name: "fleet".into(),
                username: Some("op@s".into()),
                password: Some("pw".into()),
                db: 2,
                key_prefix: "f:".into(),
                response_timeout: None,
            })
        );
        assert_eq!(url.backend(), "redis");
        let debug = format!("{url:?}");
        assert!(!debug.contains("pw") && !debug.contains("sp%2F1"), "{debug}");

        let plain: StoreUrl = "redis+sentinel://10.0.0.7/fleet".parse().unwrap();
        let StoreUrl::RedisSentinel(plain) = plain else {
            panic!("a sentinel url")
        };
        assert_eq!(plain.sentinels, ["redis://10.0.0.7:26379/"]);
        assert_eq!((plain.username, plain.password), (None, None));

        assert!(store_error("redis+sentinel://s1").contains("names no primary"));
        assert!(store_error("redis+sentinel://s1/fleet/x").contains("database \"x\""));
        assert!(store_error("redis+sentinel://s1/fleet/0/more").contains("more in its path"));
        let err = store_error("redis+sentinel://u:hunter2@s1/fleet?sentinel_password=hunter3&bad=1");
        assert!(err.contains("unknown parameter `bad`"), "{err}");
        assert!(!err.contains("hunter2") && !err.contains("hunter3"), "{err}");
        let err = bus_error("kafka://k1?sasl.password=hunter4&bad=1");
        assert!(!err.contains("hunter4") && err.contains("sasl.password=***"), "{err}");
    }

    #[test]
    fn malformed_redis_urls_name_the_problem() {
        assert!(store_error("redis://").contains("has no host"));
        assert!(store_error("redis://h:0").contains("has port \"0\""));
        assert!(store_error("redis://h:99999").contains("has port \"99999\""));
        assert!(store_error("redis://h:port").contains("has port \"port\""));
        assert!(store_error("redis://a,b").contains("redis+cluster://"));
        assert!(store_error("redis://h/x").contains("database \"x\""));
        assert!(store_error("redis+cluster://h/2").contains("only database 0"));
        assert!(store_error("redis://h?prefx=a").contains("unknown parameter `prefx`"));
        assert!(store_error("redis://h?prefix=a&prefix=b").contains("`prefix` more than once"));
        assert!(store_error("redis://h?response_timeout=soon").contains("response_timeout=soon"));
        assert!(store_error("redis://h%20x").contains("has host"));
        let err = store_error("redis://user:hunter2@h:1?bad=1");
        assert!(!err.contains("hunter2") && err.contains("user:***@h:1"), "{err}");
    }

    #[test]
    fn postgres_urls_keep_driver_parameters() {
        let url: StoreUrl = "postgresql://u:pw@db:5440/fleet?schema=eu&sslmode=require&max_connections=4"
            .parse()
            .unwrap();
        assert_eq!(
            url,
            StoreUrl::Postgres {
                url: "postgresql://u:pw@db:5440/fleet?sslmode=require".into(),
                schema: Some("eu".into()),
                max_connections: Some(4),
            }
        );
        assert!(!format!("{url:?}").contains("pw"));
        assert!(store_error("postgres:///fleet").contains("has no host"));
        assert!(store_error("postgres://db/fleet?max_connections=0").contains("at least 1"));
    }

    #[test]
    fn unknown_and_missing_schemes_are_named() {
        let err = store_error("mongodb://db:27017");
        assert!(
            err.contains("unknown scheme `mongodb`") && err.contains("redis://"),
            "{err}"
        );
        let err = bus_error("nats://n:4222");
        assert!(
            err.contains("unknown scheme `nats`") && err.contains("kafka://"),
            "{err}"
        );
        assert!(store_error("127.0.0.1:6379").contains("has no scheme"));
        assert!(bus_error("").contains("has no scheme"));
    }

    #[test]
    fn kafka_urls() {
        let url: BusUrl = "kafka://k1,k2:9093?topic_prefix=t1.&replication=1&commands_partitions=3\
                           &create_topics=false&background_fetch_wait=100ms&sasl.password=hunter2"
            .parse()
            .unwrap();
        let BusUrl::Kafka(kafka) = &url else {
            panic!("a kafka url")
        };
        assert_eq!(kafka.brokers, "k1:9092,k2:9093");
        assert_eq!(kafka.topic_prefix.as_deref(), Some("t1."));
        assert_eq!(kafka.replication, Some(1));
        assert_eq!(kafka.commands_partitions, Some(3));
        assert_eq!(kafka.events_partitions, None);
        assert!(!kafka.create_topics);
        assert_eq!(kafka.background_fetch_wait, Some(Duration::from_millis(100)));
        assert_eq!(kafka.properties["sasl.password"], "hunter2");
        assert!(!format!("{url:?}").contains("hunter2"));

        assert!(bus_error("kafka://").contains("has no host"));
        assert!(bus_error("kafka://k:1,").contains("has host \"\""));
        assert!(bus_error("kafka://k:1/topic").contains("names brokers only"));
        assert!(bus_error("kafka://u:p@k:1").contains("sasl.username"));
        assert!(bus_error("kafka://k?replication=-1").contains("replication=-1"));
        assert!(bus_error("kafka://k?create_topics=yes").contains("true or false"));
        assert!(bus_error("kafka://k?background_fetch_wait=soon").contains("duration \"soon\""));
        assert!(bus_error("kafka://k?topic=x").contains("unknown parameter `topic`"));
    }

    #[tokio::test]
    async fn memory_backends_open() {
        let store = open_store(&StoreUrl::Memory).await.unwrap();
        let device = opamp_core::DeviceId::new("device-1").unwrap();
        assert_eq!(store.lookup(&device).await.unwrap(), None);
        let bus = open_bus(&BusUrl::Memory).await.unwrap();
        bus.shutdown(Duration::from_millis(10)).await.unwrap();
    }
}
