//! One shared connection to a standalone Redis, a Redis Cluster or the
//! primary Sentinel names, with batches grouped by node, scripts reloaded
//! when Redis forgot them, and a few retries when a connection drops (or the
//! primary moved).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError as ClientError, Script, Value};
use tokio::task::JoinSet;

use super::RedisStoreConfig;
use super::error::RedisError;
use super::node::NodeLink;
use super::scripts::Scripts;
use super::sentinel::SentinelLink;

/// How often a request is tried when its connection drops, and how long to
/// wait before each retry: enough to ride out a Redis restart's reconnect.
/// A Sentinel failover takes longer (Sentinel waits `down-after-milliseconds`
/// before it acts): calls in between fail as unavailable, for the caller to retry.
const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(1_000),
];

/// How often a batch is re-sent to the node its slots moved to.
const MAX_REDIRECTS: usize = 3;

/// What one node answered to its pipeline, and which requests those were.
type Sent = (Result<Vec<Value>, ClientError>, Vec<usize>);

/// One command of a batch: its cluster slot and the command.
pub(super) struct Request {
    pub(super) slot: u16,
    pub(super) cmd: Cmd,
}

#[derive(Clone)]
enum Link {
    Standalone(Arc<StandaloneLink>),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelLink>),
}

/// The connection to a standalone Redis, made again after it failed or went silent.
struct StandaloneLink {
    client: redis::Client,
    config: AsyncConnectionConfig,
    node: NodeLink,
}

impl StandaloneLink {
    async fn connect(&self) -> Result<MultiplexedConnection, ClientError> {
        self.client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
    }

    async fn command(&self, cmd: &Cmd) -> Result<Value, ClientError> {
        self.node.command(|| self.connect(), cmd).await
    }

    async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, ClientError> {
        self.node.pipeline(|| self.connect(), pipe).await
    }

    async fn load(&self, script: &Script) -> Result<String, ClientError> {
        self.node.load(|| self.connect(), script).await
    }
}

/// Where a pub/sub connection goes: any node of a cluster (it forwards every
/// publication to all of them), the one server, or the primary Sentinel
/// names at the time (a replica hears what its primary publishes, but the
/// primary may be a different node after a failover).
#[derive(Clone)]
pub(super) enum PubSubNode {
    Url(String),
    Sentinel(Arc<SentinelLink>),
}

impl PubSubNode {
    pub(super) async fn client(&self) -> Result<redis::Client, ClientError> {
        match self {
            PubSubNode::Url(url) => redis::Client::open(url.as_str()),
            PubSubNode::Sentinel(link) => link.primary().await,
        }
    }
}

/// The connection the store shares among all its calls.
pub(super) struct Connection {
    link: Link,
    pubsub: PubSubNode,
    scripts: Scripts,
    /// Slot ranges to node numbers, for grouping a batch by node (cluster only).
    slots: RwLock<Arc<SlotMap>>,
    requests: AtomicU64,
}

impl Connection {
    pub(super) async fn open(config: &RedisStoreConfig, scripts: Scripts) -> Result<Self, RedisError> {
        let connect = |err| RedisError::command(format!("connecting to {}", config.redacted_target()), err);
        let link = if let Some(sentinel) = &config.sentinel {
            if config.cluster {
                return Err(RedisError::Config(
                    "Sentinel watches a primary and its replicas, not a Redis Cluster: set `cluster` or `sentinel`, not both".into(),
                ));
            }
            if config.urls.is_empty() {
                return Err(RedisError::Config(
                    "Sentinel mode needs the URL of at least one Sentinel".into(),
                ));
            }
            let link = SentinelLink::new(&config.urls, sentinel, config.connect_timeout, config.response_timeout)
                .map_err(connect)?;
            let link = Arc::new(link);
            link.watch_switches();
            Link::Sentinel(link)
        } else if config.cluster {
            let client = ClusterClient::builder(config.urls.iter().map(String::as_str))
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout)
                .build()
                .map_err(connect)?;
            Link::Cluster(client.get_async_connection().await.map_err(connect)?)
        } else {
            let url = match config.urls.as_slice() {
                [url] => url,
                _ => {
                    return Err(RedisError::Config(format!(
                        "a standalone Redis needs exactly one URL, got {}",
                        config.urls.len()
                    )));
                }
            };
            let link = StandaloneLink {
                client: redis::Client::open(url.as_str()).map_err(connect)?,
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.response_timeout)),
                node: NodeLink::default(),
            };
            // Connect now, so that a wrong address is told at once.
            link.command(&redis::cmd("PING")).await.map_err(connect)?;
            Link::Standalone(Arc::new(link))
        };
        let pubsub = match &link {
            Link::Sentinel(link) => PubSubNode::Sentinel(Arc::clone(link)),
            _ => PubSubNode::Url(config.urls.first().cloned().unwrap_or_default()),
        };
        let connection = Connection {
            link,
            pubsub,
            scripts,
            slots: RwLock::new(Arc::new(SlotMap::default())),
            requests: AtomicU64::new(0),
        };
        connection.load_scripts().await.map_err(|err| match err {
            RedisError::Command { source, .. } => connect(source),
            other => other,
        })?;
        connection.refresh_slots().await?;
        Ok(connection)
    }

    /// Requests sent so far: each one a round trip to one node.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Where `watch_endings` subscribes.
    pub(super) fn pubsub_node(&self) -> PubSubNode {
        self.pubsub.clone()
    }

    pub(super) fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// Sends one command (routed by its key); `what` names it in errors.
    pub(super) async fn one(&self, what: impl Fn() -> String, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut retries = RETRY_DELAYS.iter();
        let mut reloaded = false;
        loop {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let result = match self.link.clone() {
                Link::Standalone(link) => link.command(cmd).await,
                Link::Cluster(mut conn) => conn.req_packed_command(cmd).await,
                Link::Sentinel(link) => link.command(cmd).await,
            };
            let err = match result.and_then(server_error) {
                Ok(value) => return Ok(value),
                Err(err) => RedisError::command(what(), err),
            };
            if err.is_no_script() && !reloaded {
                reloaded = true;
                self.load_scripts().await?;
                continue;
            }
            match retries.next() {
                Some(delay) if err.is_connection() => tokio::time::sleep(*delay).await,
                _ => return Err(err),
            }
        }
    }

    /// Sends `requests` as one pipeline per node, all nodes at once, and
    /// returns each reply in order (a command's own failure as
    /// `Value::ServerError`, for the caller to name).
    pub(super) async fn batch(&self, requests: Vec<Request>) -> Result<Vec<Value>, RedisError> {
        let mut replies: Vec<Option<Value>> = vec![None; requests.len()];
        let mut pending: Vec<usize> = (0..requests.len()).collect();
        let (mut redirects, mut reloaded, mut retries) = (0, false, RETRY_DELAYS.iter());
        while !pending.is_empty() {
            let slots = self.slot_map();
            let mut by_node: HashMap<usize, Vec<usize>> = HashMap::new();
            for index in pending.drain(..) {
                by_node.entry(slots.node(requests[index].slot)).or_default().push(index);
            }
            let mut groups = Vec::with_capacity(by_node.len());
            for (_, indexes) in by_node {
                let mut pipe = Pipeline::with_capacity(indexes.len());
                for index in &indexes {
                    pipe.add_command(requests[*index].cmd.clone());
                }
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::new(requests[indexes[0]].slot, SlotAddr::Master));
                groups.push((pipe, route, indexes));
            }
            let (mut stale, mut forgotten, mut dropped) = (false, false, None);
            let mut demoted = None;
            for (result, indexes) in self.send_all(groups).await? {
                match result {
                    Ok(values) if values.len() == indexes.len() => {
                        for (index, value) in indexes.into_iter().zip(values) {
                            if let Value::ServerError(err) = &value {
                                let err = RedisError::command("a pipelined batch", ClientError::from(err.clone()));
                                // A replica's READONLY: the primary moved (the
                                // link asks Sentinel again), so send it anew.
                                if err.is_connection() {
                                    pending.push(index);
                                    demoted = Some(err);
                                    continue;
                                }
                                if err.is_redirect() || err.is_no_script() {
                                    stale |= err.is_redirect();
                                    forgotten |= err.is_no_script();
                                    pending.push(index);
                                    continue;
                                }
                            }
                            replies[index] = Some(value);
                        }
                    }
                    Ok(values) => return Err(RedisError::reply("a pipeline", &Value::Array(values))),
                    Err(err) => {
                        pending.extend(indexes);
                        dropped = Some(err);
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            if let Some(err) = dropped
                .map(|err| RedisError::command("a pipelined batch", err))
                .or(demoted)
            {
                match retries.next() {
                    Some(delay) if err.is_connection() || err.is_redirect() => tokio::time::sleep(*delay).await,
                    _ => return Err(err),
                }
            }
            if forgotten {
                if reloaded {
                    return Err(RedisError::Unavailable(
                        "Redis keeps forgetting the store's scripts".into(),
                    ));
                }
                reloaded = true;
                self.load_scripts().await?;
            }
            if stale {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(RedisError::Unavailable(format!(
                        "cluster slots kept moving: {} commands redirected {MAX_REDIRECTS} times",
                        pending.len()
                    )));
                }
                self.refresh_slots().await?;
            }
        }
        Ok(replies.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Sends each pipeline to its node, all at once; one node's inline.
    async fn send_all(
        &self,
        mut groups: Vec<(Pipeline, SingleNodeRoutingInfo, Vec<usize>)>,
    ) -> Result<Vec<Sent>, RedisError> {
        self.requests.fetch_add(groups.len() as u64, Ordering::Relaxed);
        if groups.len() == 1 {
            if let Some((pipe, route, indexes)) = groups.pop() {
                return Ok(vec![(send_pipeline(self.link.clone(), pipe, route).await, indexes)]);
            }
        }
        let mut sent = JoinSet::new();
        for (pipe, route, indexes) in groups {
            let link = self.link.clone();
            sent.spawn(async move { (send_pipeline(link, pipe, route).await, indexes) });
        }
        let mut results = Vec::with_capacity(sent.len());
        while let Some(joined) = sent.join_next().await {
            results.push(joined.map_err(|_| RedisError::Unavailable("a pipeline task panicked".into()))?);
        }
        Ok(results)
    }

    /// Loads every script (on every primary of a cluster).
    async fn load_scripts(&self) -> Result<(), RedisError> {
        for script in self.scripts.all() {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let result = match self.link.clone() {
                Link::Standalone(link) => link.load(script).await,
                Link::Cluster(mut conn) => script.prepare_invoke().load_async(&mut conn).await,
                Link::Sentinel(link) => link.load(script).await,
            };
            result.map_err(|err| RedisError::command("SCRIPT LOAD", err))?;
        }
        Ok(())
    }

    fn slot_map(&self) -> Arc<SlotMap> {
        Arc::clone(&self.slots.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads which node serves which slots (`CLUSTER SLOTS`); a standalone
    /// server serves them all.
    async fn refresh_slots(&self) -> Result<(), RedisError> {
        if !self.is_cluster() {
            return Ok(());
        }
        let reply = self
            .one(
                || "CLUSTER SLOTS".to_owned(),
                &redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
            )
            .await?;
        let map = SlotMap::parse(&reply).ok_or_else(|| RedisError::reply("CLUSTER SLOTS", &reply))?;
        *self.slots.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
        Ok(())
    }
}

async fn send_pipeline(link: Link, pipe: Pipeline, route: SingleNodeRoutingInfo) -> Result<Vec<Value>, ClientError> {
    let count = pipe.len();
    match link {
        Link::Standalone(link) => link.pipeline(&pipe).await,
        Link::Cluster(mut conn) => conn.route_pipeline(pipe, 0, count, route).await,
        Link::Sentinel(link) => link.pipeline(&pipe).await,
    }
}

/// A reply that is a server error, as an error.
fn server_error(value: Value) -> Result<Value, ClientError> {
    match value {
        Value::ServerError(err) => Err(err.into()),
        value => Ok(value),
    }
}

/// Which node serves each slot: sorted, non-overlapping ranges.
#[derive(Debug, Default)]
struct SlotMap {
    /// `(first slot, last slot, node number)`; node numbers are dense from 0.
    ranges: Vec<(u16, u16, usize)>,
}

impl SlotMap {
    fn parse(reply: &Value) -> Option<Self> {
        let Value::Array(entries) = reply else { return None };
        let mut nodes: HashMap<(Vec<u8>, i64), usize> = HashMap::new();
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(parts) = entry else { return None };
            let [Value::Int(first), Value::Int(last), Value::Array(primary), ..] = parts.as_slice() else {
                return None;
            };
            let [Value::BulkString(host), Value::Int(port), ..] = primary.as_slice() else {
                return None;
            };
            let next = nodes.len();
            let node = *nodes.entry((host.clone(), *port)).or_insert(next);
            ranges.push((u16::try_from(*first).ok()?, u16::try_from(*last).ok()?, node));
        }
        ranges.sort_unstable();
        Some(SlotMap { ranges })
    }

    /// The node serving `slot`; 0 for a standalone server or an unknown slot
    /// (the node asked will redirect, and the map be read again).
    fn node(&self, slot: u16) -> usize {
        let after = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        match after.checked_sub(1).map(|at| self.ranges[at]) {
            Some((_, last, node)) if slot <= last => node,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_map_groups_ranges_by_node() {
        let node = |host: &str, port| Value::Array(vec![Value::BulkString(host.into()), Value::Int(port)]);
        let range = |first, last, primary| Value::Array(vec![Value::Int(first), Value::Int(last), primary]);
        let reply = Value::Array(vec![
            range(5461, 10922, node("127.0.0.1", 7302)),
            range(0, 5460, node("127.0.0.1", 7301)),
            range(10923, 16383, node("127.0.0.1", 7301)),
        ]);
        let map = SlotMap::parse(&reply).unwrap();
        assert_eq!(map.node(0), map.node(16383), "one node, two ranges");
        assert_ne!(map.node(5460), map.node(5461));
        assert_eq!(map.node(10922), map.node(5461));
        assert!(SlotMap::parse(&Value::Array(vec![Value::Int(1)])).is_none());
    }
}
