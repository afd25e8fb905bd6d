//! A store in Redis, standalone, Redis Cluster or a primary with replicas
//! under Sentinel: the design's data model (§4.3).
//!
//! [`RedisStore`] implements every store trait over the design's keys, so
//! operators can read and repair the fleet with `redis-cli`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `device:{id}:supervisor` | string | the supervisor holding the device; the key's expiry time is the lease's end |
//! | `device:{id}` | hash | the status: `status`, `emission`, `config_version`, `agent_type`, `last_seen`, `connected_at`, `supervisor`, `config_hash`, `labels`, `last_error` |
//! | `devices:online` | set | the online devices |
//! | `supervisor:{id}:devices` | set | the devices online under a supervisor |
//! | `supervisor:{id}:device_count` | string | that set's size |
//! | `config:{type}:{version}` | string | a template, as JSON |
//! | `config:{type}:latest` | string | the version `latest` points at |
//!
//! and a few of its own (`device:{id}:desired`, `config:{type}`,
//! `supervisors`, `devices`, `device:{id}:indexing`, the revocations
//! `device:{id}:revoked` and `devices:revoked`, and the control plane's
//! `command:{id}`, `rollout:{rollouts}:id`, `rollouts:{rollouts}`); `docs/data-model.md` describes
//! each key and field. The braces are literal: they are Redis Cluster hash
//! tags, keeping a device's keys (and a supervisor's, and an agent type's) in
//! one slot so each Lua script touches one slot only. An optional key prefix
//! lets several deployments share one Redis.
//!
//! # Leases and clocks
//!
//! The routing key is the source of truth. Claim, renew and release are Lua
//! compare-and-set scripts on that one key; the expiry time is set with
//! `PXAT` to the lease's end, and the scripts compare `PEXPIRETIME` with the
//! time of the store's [`Clock`], so a lease lapses exactly when that clock
//! says. With the wall clock ([`RedisStore::connect`]) a lookup is a plain
//! `GET`, as in the design: Redis drops the key at the lease's end itself.
//! With another clock ([`RedisStore::connect_with_clock`], e.g. a
//! [`ManualClock`](opamp_core::ManualClock) in tests) lookups run a script
//! that judges by that clock, and keys are kept in Redis a margin past their
//! lease so that Redis never drops a lease the clock still counts as held.
//!
//! # Indexes
//!
//! The sets and counters are secondary indexes. A status update changes the
//! hash atomically; when presence changed, the writer then moves the device
//! between the sets under a short per-device lock, so concurrent writers
//! leave the indexes agreeing with the hash. If a writer dies half-way, the
//! next presence change of that device, or [`RedisStore::reconcile`], repairs
//! them; `reconcile` also marks offline the devices whose lease lapsed.
//!
//! # Batches and connections
//!
//! `renew` and `lookup_many` send one pipeline per node (on a cluster, the
//! store groups the keys by the node serving their slot), so renewing or
//! looking up 1,000 devices costs one round trip per node. One multiplexed
//! connection (one per node on a cluster) is shared by every call; it
//! reconnects by itself, and a call that meets a dropped connection is tried
//! again. Scripts are reloaded when Redis restarted and forgot them.
//!
//! # Sentinel
//!
//! With [`RedisStoreConfig::sentinel`] the store asks the Sentinels where the
//! primary is, and asks again whenever its connection drops, times out or
//! meets a replica (`READONLY`), or a Sentinel announces it switched to
//! another primary (`+switch-master`, which a planned failover needs: the
//! old primary stays up and takes writes for seconds after the switch):
//! after a failover, calls reach the promoted replica without a restart. While Sentinel has not promoted one yet, calls
//! fail with [`Error::Unavailable`] or [`Error::Timeout`] (both retryable).
//! Replication is asynchronous: a write the old primary acknowledged but had
//! not yet passed to the replica is lost with it.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use opamp_core::{DeviceId, RoutingStore, SupervisorId, DEFAULT_LEASE_TTL};
//! use opamp_store::redis::{RedisStore, RedisStoreConfig};
//!
//! let store = RedisStore::connect(RedisStoreConfig::standalone("redis://127.0.0.1:6379/").key_prefix("fleet-a:")).await?;
//! let (d5, s3) = (DeviceId::new("device-5")?, SupervisorId::new("supervisor-pod-3")?);
//! store.claim(&d5, &s3, DEFAULT_LEASE_TTL).await?;
//! // redis-cli GET 'fleet-a:device:{device-5}:supervisor'  →  "supervisor-pod-3"
//! assert_eq!(store.lookup(&d5).await?, Some(s3));
//! # Ok(())
//! # }
//! ```

mod codec;
mod conn;
mod error;
#[cfg(feature = "testkit")]
pub(crate) mod fuzz;
mod keys;
mod node;
mod revocation;
mod scripts;
mod sentinel;
mod tracking;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use opamp_core::store::validate_ttl;
use opamp_core::time::duration_text;
use opamp_core::{
    AgentType, Claim, Clock, ConfigRef, ConfigStore, ConfigTemplate, ConfigVersion, Cursor, DeviceId, DeviceStatus,
    Error, Page, PageRequest, Result, RoutingStore, StatusPatch, StatusStore, SupervisorId, SupervisorLoad,
    SystemClock, Timestamp,
};
use redis::Value;
use serde::{Deserialize, Serialize};

use self::codec::{HashChanges, field};
use self::conn::{Connection, Request};
use self::error::RedisError;
use self::keys::{Keys, slot};
use self::scripts::{Scripts, eval};

/// Where the store's Redis is and how to use it.
///
/// Read from a file with serde; durations are written `5s`, `1h`:
///
/// ```
/// use opamp_store::redis::RedisStoreConfig;
///
/// let config: RedisStoreConfig = serde_json::from_str(
///     r#"{"urls": ["redis://:hunter2@10.0.0.5:6379/"], "key_prefix": "fleet-a:", "response_timeout": "2s"}"#,
/// )?;
/// assert!(!format!("{config:?}").contains("hunter2"), "Debug hides the password");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStoreConfig {
    /// `redis://[user][:password@]host:port[/db]` of a standalone server
    /// (exactly one), of some nodes of a cluster (the rest are found), or of
    /// the Sentinels (with their own credentials, if any) when `sentinel` is set.
    pub urls: Vec<String>,
    /// Whether `urls` are Redis Cluster nodes.
    #[serde(default)]
    pub cluster: bool,
    /// When set, `urls` are Redis Sentinels and this says which primary they
    /// watch and how to log in to it: the store follows it across failovers.
    #[serde(default)]
    pub sentinel: Option<RedisSentinelConfig>,
    /// Put before every key, e.g. `fleet-a:`, so several deployments (or
    /// tests) share one Redis; printable ASCII without spaces or braces.
    #[serde(default)]
    pub key_prefix: String,
    /// How long to wait for a connection.
    #[serde(default = "defaults::connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// How long to wait for an answer.
    #[serde(default = "defaults::response_timeout", with = "duration_text")]
    pub response_timeout: Duration,
    /// With a clock other than the wall clock, how long past its lease's end
    /// a routing key is kept in Redis (which expires keys by its own clock),
    /// so that Redis never drops a lease the store's clock still counts as
    /// held. The store's clock must not run behind Redis's by more than this.
    #[serde(default = "defaults::custom_clock_margin", with = "duration_text")]
    pub custom_clock_margin: Duration,
    /// How long a writer may hold a device's index lock before another may
    /// take over (a writer that died leaves it behind).
    #[serde(default = "defaults::index_lock_ttl", with = "duration_text")]
    pub index_lock_ttl: Duration,
    /// How long a command's record is kept after it was issued (its key's expiry).
    #[serde(default = "defaults::command_retention", with = "duration_text")]
    pub command_retention: Duration,
}

mod defaults {
    use std::time::Duration;

    pub(super) fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn response_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn custom_clock_margin() -> Duration {
        Duration::from_secs(3600)
    }
    pub(super) fn index_lock_ttl() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn command_retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
}

impl RedisStoreConfig {
    /// One standalone Redis at `url`, no key prefix, the default timeouts.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self::with_urls(vec![url.into()], false)
    }

    /// A Redis Cluster reached through `urls` (some of its primaries).
    pub fn cluster(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::with_urls(urls.into_iter().map(Into::into).collect(), true)
    }

    /// The primary `sentinel` names, found through the Sentinels at `urls`
    /// (`redis://[user:password@]host:port/`), and found again after a failover.
    pub fn sentinel(urls: impl IntoIterator<Item = impl Into<String>>, sentinel: RedisSentinelConfig) -> Self {
        let mut config = Self::with_urls(urls.into_iter().map(Into::into).collect(), false);
        config.sentinel = Some(sentinel);
        config
    }

    fn with_urls(urls: Vec<String>, cluster: bool) -> Self {
        RedisStoreConfig {
            urls,
            cluster,
            sentinel: None,
            key_prefix: String::new(),
            connect_timeout: defaults::connect_timeout(),
            response_timeout: defaults::response_timeout(),
            custom_clock_margin: defaults::custom_clock_margin(),
            index_lock_ttl: defaults::index_lock_ttl(),
            command_retention: defaults::command_retention(),
        }
    }

    /// Puts `prefix` before every key.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets the response timeout.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The URLs with their passwords replaced by `***`.
    fn redacted_urls(&self) -> String {
        self.urls.iter().map(|url| redact(url)).collect::<Vec<_>>().join(", ")
    }

    /// What the store connects to, for errors: the URLs, or the primary and its Sentinels.
    fn redacted_target(&self) -> String {
        match &self.sentinel {
            Some(sentinel) => format!(
                "the primary {:?} through the Sentinels at {}",
                sentinel.master_name,
                self.redacted_urls()
            ),
            None => self.redacted_urls(),
        }
    }
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreConfig")
            .field("urls", &self.redacted_urls())
            .field("cluster", &self.cluster)
            .field("sentinel", &self.sentinel)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("custom_clock_margin", &self.custom_clock_margin)
            .field("index_lock_ttl", &self.index_lock_ttl)
            .finish()
    }
}

/// The primary a Redis Sentinel deployment watches, and how to log in to it
/// and its replicas (the Sentinels' own credentials go in their URLs).
///
/// ```
/// use opamp_store::redis::{RedisSentinelConfig, RedisStoreConfig};
///
/// let config = RedisStoreConfig::sentinel(
///     ["redis://10.0.0.7:26379/", "redis://10.0.0.8:26379/"],
///     RedisSentinelConfig::new("fleet").credentials(Some("opamp"), "hunter2"),
/// );
/// assert!(!format!("{config:?}").contains("hunter2"), "Debug hides the password");
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisSentinelConfig {
    /// The name the Sentinels know the primary by (`sentinel monitor NAME …`).
    pub master_name: String,
    /// The user on the primary and its replicas, if they use ACL users.
    #[serde(default)]
    pub username: Option<String>,
    /// Their password, if they ask for one.
    #[serde(default)]
    pub password: Option<String>,
    /// The database number on them.
    #[serde(default)]
    pub db: i64,
}

impl RedisSentinelConfig {
    /// The primary the Sentinels call `master_name`, no credentials, database 0.
    pub fn new(master_name: impl Into<String>) -> Self {
        RedisSentinelConfig {
            master_name: master_name.into(),
            username: None,
            password: None,
            db: 0,
        }
    }

    /// Logs in to the primary and replicas as `username` (the default user
    /// if `None`) with `password`.
    pub fn credentials(mut self, username: Option<&str>, password: impl Into<String>) -> Self {
        self.username = username.map(str::to_owned);
        self.password = Some(password.into());
        self
    }

    /// Uses database `db` on the primary.
    pub fn db(mut self, db: i64) -> Self {
        self.db = db;
        self
    }
}

impl fmt::Debug for RedisSentinelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSentinelConfig")
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

/// `redis://user:secret@host/` → `redis://user:***@host/`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// What [`RedisStore::reconcile`] found and repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct Reconciliation {
    /// Index entries looked at.
    pub checked: u64,
    /// Devices listed online under a supervisor whose lease had lapsed (or
    /// gone to another): marked offline, and so dropped from the indexes.
    pub lapsed: u64,
    /// Devices whose index entries disagreed with their status, moved to agree.
    pub reindexed: u64,
    /// Devices skipped because a writer held their index lock; the writer repairs them.
    pub busy: u64,
    /// Supervisors whose device count was wrong, recounted.
    pub recounted: u64,
}

/// The routing, status and configuration store in Redis.
///
/// Cheap to share: wrap it in an [`Arc`] and hand it out as `Arc<dyn Store>`.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStore {
    conn: Connection,
    keys: Keys,
    clock: Arc<dyn Clock>,
    /// Lookups judge by the store's clock in a script, rather than by Redis's expiry.
    exact_lookups: bool,
    /// How long past the lease's end a routing key stays in Redis, in ms.
    margin_ms: i64,
    lock_ttl_ms: u64,
    retention_ms: u64,
    token_base: u64,
    tokens: AtomicU64,
    /// How long `watch_endings` may take to subscribe.
    connect_timeout: Duration,
}

impl RedisStore {
    /// Connects, judging leases by the wall clock: lookups are plain `GET`s
    /// and Redis drops a lapsed lease itself.
    ///
    /// Fails with [`Error::Unavailable`] if Redis cannot be reached, and
    /// [`Error::InvalidInput`] for a bad key prefix or URL.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self> {
        Self::open(config, Arc::new(SystemClock), false).await
    }

    /// Connects, judging leases by `clock` (a
    /// [`ManualClock`](opamp_core::ManualClock) in tests): lookups run a
    /// script comparing each lease's end with `clock`, and routing keys stay
    /// in Redis [`custom_clock_margin`](RedisStoreConfig::custom_clock_margin)
    /// past their lease.
    pub async fn connect_with_clock(config: RedisStoreConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        Self::open(config, clock, true).await
    }

    async fn open(config: RedisStoreConfig, clock: Arc<dyn Clock>, custom_clock: bool) -> Result<Self> {
        let keys = Keys::new(&config.key_prefix)?;
        let conn = Connection::open(&config, Scripts::new()).await?;
        let margin = if custom_clock {
            config.custom_clock_margin
        } else {
            Duration::ZERO
        };
        Ok(RedisStore {
            conn,
            keys,
            clock,
            exact_lookups: custom_clock,
            margin_ms: millis(margin),
            lock_ttl_ms: millis(config.index_lock_ttl).max(1) as u64,
            retention_ms: millis(config.command_retention).max(1) as u64,
            token_base: RandomState::new().hash_one(std::process::id()),
            tokens: AtomicU64::new(0),
            connect_timeout: config.connect_timeout,
        })
    }

    /// The requests this store has sent, each one round trip to one node: a
    /// command, a script, or a pipeline (a batch costs one per node). For
    /// monitoring, and to see that batches are pipelined.
    pub fn requests_sent(&self) -> u64 {
        self.conn.requests()
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// Repairs the secondary indexes: walks every supervisor's device set and
    /// the online set, marks offline (fenced by the supervisor) every device
    /// listed under a supervisor whose lease on it lapsed or went to another,
    /// moves entries that disagree with the device's status, and recounts the
    /// per-supervisor counters.
    ///
    /// Safe to run at any time, from any process, while the fleet is busy;
    /// a host runs it on a timer (every few lease periods) and after Redis lost data.
    pub async fn reconcile(&self) -> Result<Reconciliation> {
        let mut report = Reconciliation::default();
        for supervisor in self.registered_supervisors().await? {
            let set = self.keys.supervisor_devices(&supervisor);
            self.reconcile_set(&set, Some(supervisor), &mut report).await?;
            let recount = eval(
                &self.conn_scripts().supervisor_recount,
                &[&set, &self.keys.device_count(&supervisor)],
                Vec::<String>::new(),
            );
            let before = self.counted(&supervisor).await?;
            let size = as_int(&self.one(|| format!("recounting {set}"), &recount).await?, &set)?;
            if before != size {
                report.recounted += 1;
            }
        }
        self.reconcile_set(&self.keys.online(), None, &mut report).await?;
        Ok(report)
    }

    fn conn_scripts(&self) -> &Scripts {
        self.conn.scripts()
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().unix_millis()
    }

    /// When a lease taken at `now` for `ttl` expires in Redis (Unix ms, for
    /// `PXAT`): later by the margin when the store judges by its own clock.
    fn lease_expiry_ms(&self, now: Timestamp, ttl: Duration) -> i64 {
        now.saturating_add(ttl).unix_millis().saturating_add(self.margin_ms)
    }

    fn token(&self) -> String {
        format!(
            "{:x}.{:x}",
            self.token_base,
            self.tokens.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn one(&self, what: impl Fn() -> String, cmd: &redis::Cmd) -> Result<Value> {
        Ok(self.conn.one(what, cmd).await?)
    }

    /// `command key`, for the commands that take nothing but a key.
    async fn on_key(&self, command: &str, key: &str) -> Result<Value> {
        self.one(|| format!("{command} {key}"), redis::cmd(command).arg(key))
            .await
    }

    /// `GET key` as text.
    async fn get(&self, key: &str) -> Result<Option<String>> {
        text(self.on_key("GET", key).await?, key)
    }

    /// Runs one request per key (`make` builds it from the key) as a batch,
    /// and hands each reply to `read` with its key.
    async fn batch<T>(
        &self,
        keys: Vec<String>,
        make: impl Fn(&str) -> redis::Cmd,
        read: impl Fn(&str, Value) -> Result<T>,
    ) -> Result<Vec<T>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let requests = keys
            .iter()
            .map(|key| Request {
                slot: slot(key),
                cmd: make(key),
            })
            .collect();
        let replies = self.conn.batch(requests).await?;
        keys.iter().zip(replies).map(|(key, reply)| read(key, reply)).collect()
    }

    fn lookup_cmd(&self, key: &str) -> redis::Cmd {
        if self.exact_lookups {
            eval(&self.conn_scripts().lookup, &[key], (self.now_ms(), self.margin_ms))
        } else {
            let mut get = redis::cmd("GET");
            get.arg(key);
            get
        }
    }

    /// Brings `device`'s index entries in step with its status while this
    /// caller holds the index lock (`token`): moves it from the indexes of
    /// `from` to those of `to`, and again while the status moved on meanwhile.
    async fn sync_indexes(
        &self,
        device: &DeviceId,
        token: &str,
        mut from: Option<SupervisorId>,
        mut to: Option<SupervisorId>,
    ) -> Result<()> {
        let (hash, lock) = (self.keys.status(device), self.keys.index_lock(device));
        // Each round follows a status change made while the lock was held; a
        // bound keeps a pathological flapper from holding a caller forever.
        for _ in 0..64 {
            if let Err(err) = self.move_indexes(device, from, to).await {
                let abandon = eval(&self.conn_scripts().index_abandon, &[&lock], token);
                let _ = self.one(|| format!("releasing {lock}"), &abandon).await;
                return Err(err);
            }
            let applied = to.as_ref().map_or("", SupervisorId::as_str);
            let done = eval(
                &self.conn_scripts().index_done,
                &[&hash, &lock],
                (applied, token, self.lock_ttl_ms),
            );
            let reply = words(
                self.one(|| format!("recording the indexes of {hash}"), &done).await?,
                &hash,
            )?;
            match reply.as_slice() {
                [done] if done == "done" || done == "lost" => return Ok(()),
                [again, target] if again == "again" => {
                    from = to;
                    to = parse_supervisor(&hash, field::SUPERVISOR, target)?;
                }
                _ => return Err(RedisError::garbled(&hash, None, format!("index step answered {reply:?}")).into()),
            }
        }
        Err(Error::unavailable(format!(
            "the indexes of {hash} did not settle: its presence kept changing"
        )))
    }

    /// Removes `device` from `from`'s set (unless it is `to`) and puts it in
    /// `to`'s set and the online set (or takes it out of the online set).
    async fn move_indexes(
        &self,
        device: &DeviceId,
        from: Option<SupervisorId>,
        to: Option<SupervisorId>,
    ) -> Result<()> {
        let scripts = self.conn_scripts();
        let mut requests: Vec<(String, redis::Cmd)> = Vec::with_capacity(4);
        let member = device.as_str();
        if let Some(from) = from.filter(|from| Some(*from) != to) {
            let (set, count) = (self.keys.supervisor_devices(&from), self.keys.device_count(&from));
            requests.push((set.clone(), eval(&scripts.supervisor_remove, &[&set, &count], member)));
        }
        let online = self.keys.online();
        match to {
            Some(to) => {
                let (set, count) = (self.keys.supervisor_devices(&to), self.keys.device_count(&to));
                requests.push((set.clone(), eval(&scripts.supervisor_add, &[&set, &count], member)));
                let registry = self.keys.supervisors();
                requests.push((
                    registry.clone(),
                    redis::cmd("SADD").arg(&registry).arg(to.as_str()).to_owned(),
                ));
                requests.push((online.clone(), redis::cmd("SADD").arg(&online).arg(member).to_owned()));
                let known = self.keys.known();
                requests.push((known.clone(), redis::cmd("SADD").arg(&known).arg(member).to_owned()));
            }
            None => requests.push((online.clone(), redis::cmd("SREM").arg(&online).arg(member).to_owned())),
        }
        let (keys, cmds): (Vec<String>, Vec<redis::Cmd>) = requests.into_iter().unzip();
        let cmds = std::sync::Mutex::new(cmds.into_iter());
        self.batch(
            keys,
            |_| cmds.lock().ok().and_then(|mut cmds| cmds.next()).unwrap_or_default(),
            |key, reply| checked(key, reply).map(drop),
        )
        .await?;
        Ok(())
    }

    /// The supervisors that ever held a device here (the `supervisors` set).
    async fn registered_supervisors(&self) -> Result<Vec<SupervisorId>> {
        let key = self.keys.supervisors();
        let reply = self.on_key("SMEMBERS", &key).await?;
        strings(reply, &key)?
            .iter()
            .map(|member| SupervisorId::new(member).map_err(|_| garbled_member(&key, member)))
            .collect()
    }

    async fn counted(&self, supervisor: &SupervisorId) -> Result<i64> {
        let key = self.keys.device_count(supervisor);
        count(&key, self.on_key("GET", &key).await?)
    }

    /// One page of a set of device ids.
    ///
    /// A set of at most [`SMALL_SET`] members when the listing starts is
    /// listed in id order: each page reads the whole set (`SMEMBERS`) and takes
    /// the ids after the cursor's (`=last`).
    ///
    /// A larger set is listed with `SSCAN`, which follows its own cursor and
    /// may return more than asked or fewer. Each scan batch is sorted and the
    /// page takes its smallest ids; what is left of the batch goes into the
    /// page cursor, after the scan position to continue from (`pos+id,id`),
    /// so the scan itself is never repeated. Only when the batch ran to the
    /// end of the set does the cursor say "scan from `pos` again and take the
    /// ids after `last`" (`pos:last`): a repeated scan from there covers no
    /// more than it did, so nothing in the set throughout is skipped.
    ///
    /// Either way a device in the set throughout is listed, and a set that
    /// does not change lists each device once.
    async fn list_set(&self, key: &str, page: &PageRequest) -> Result<Page<DeviceId>> {
        let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
        let cursor = match &page.after {
            Some(cursor) => ListCursor::parse(cursor)?,
            None => {
                let size = as_int(&self.on_key("SCARD", key).await?, key)?;
                ListCursor {
                    whole: size <= SMALL_SET,
                    ..ListCursor::default()
                }
            }
        };
        if cursor.whole {
            return self.list_whole_set(key, limit, cursor.after).await;
        }
        let ListCursor {
            mut position,
            mut after,
            carried,
            ..
        } = cursor;
        if carried.len() > limit {
            let next = ListCursor::carrying(position, &carried[limit..]);
            return Ok(Page {
                items: carried[..limit].to_vec(),
                next: Some(next),
            });
        }
        let mut items = carried;
        loop {
            if items.len() == limit {
                return Ok(Page {
                    items,
                    next: Some(ListCursor::carrying(position, &[])),
                });
            }
            let scan = redis::cmd("SSCAN")
                .arg(key)
                .arg(position)
                .arg("COUNT")
                .arg(limit)
                .to_owned();
            let reply = self.one(|| format!("SSCAN {key}"), &scan).await?;
            let (next, members) = scan_reply(reply, key)?;
            let mut batch = members
                .iter()
                .map(|member| DeviceId::new(member).map_err(|_| garbled_member(key, member)))
                .collect::<Result<Vec<_>>>()?;
            batch.sort_unstable();
            batch.dedup();
            if let Some(after) = after.take() {
                batch.retain(|device| *device > after);
            }
            let room = limit - items.len();
            if batch.len() > room {
                let rest = batch.split_off(room);
                items.extend(batch);
                let cursor = match (next, items.last()) {
                    (0, Some(last)) => Cursor::new(format!("{position}:{last}")),
                    _ => ListCursor::carrying(next, &rest),
                };
                return Ok(Page {
                    items,
                    next: Some(cursor),
                });
            }
            items.extend(batch);
            if next == 0 {
                return Ok(Page { items, next: None });
            }
            position = next;
        }
    }

    /// One page of a small set, in id order: the ids after `after`.
    async fn list_whole_set(&self, key: &str, limit: usize, after: Option<DeviceId>) -> Result<Page<DeviceId>> {
        let mut members = strings(self.on_key("SMEMBERS", key).await?, key)?
            .iter()
            .map(|member| DeviceId::new(member).map_err(|_| garbled_member(key, member)))
            .filter(|device| match (device, &after) {
                (Ok(device), Some(after)) => device > after,
                _ => true,
            })
            .collect::<Result<Vec<_>>>()?;
        members.sort_unstable();
        let next = (members.len() > limit).then(|| Cursor::new(format!("={}", members[limit - 1])));
        members.truncate(limit);
        Ok(Page { items: members, next })
    }

    /// Checks every device in `set` (a supervisor's, or the online set).
    async fn reconcile_set(&self, set: &str, under: Option<SupervisorId>, report: &mut Reconciliation) -> Result<()> {
        let mut request = PageRequest::first(1_000);
        loop {
            let page = self.list_set(set, &request).await?;
            let owners = match under {
                Some(_) => self.lookup_many(&page.items).await?,
                None => vec![None; page.items.len()],
            };
            let targets = self.index_targets(&page.items).await?;
            for ((device, owner), target) in page.items.iter().zip(owners).zip(targets) {
                report.checked += 1;
                match under {
                    Some(supervisor) if target == Some(supervisor) && owner != Some(supervisor) => {
                        // Online here by its status, but its lease here lapsed: it is not served here.
                        let offline = StatusPatch::new().offline().fenced_by(supervisor);
                        match self.update_status(device, &offline).await {
                            Ok(()) => report.lapsed += 1,
                            // Taken over, or gone, meanwhile: nothing to mark.
                            Err(Error::NotOwner(_) | Error::NotFound { .. }) => {}
                            Err(err) => return Err(err),
                        }
                    }
                    Some(supervisor) if target != Some(supervisor) => {
                        self.reindex(device, Some(supervisor), report).await?
                    }
                    None if target.is_none() => self.reindex(device, None, report).await?,
                    _ => {}
                }
            }
            match page.next {
                Some(cursor) => request = PageRequest::after(cursor, 1_000),
                None => return Ok(()),
            }
        }
    }

    /// Where each device's status says its index entries belong.
    async fn index_targets(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>> {
        let keys = devices.iter().map(|device| self.keys.status(device)).collect();
        self.batch(
            keys,
            |key| {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(field::STATUS)
                    .arg(field::SUPERVISOR)
                    .to_owned()
            },
            |key, reply| {
                let reply = checked(key, reply)?;
                match &reply {
                    Value::Array(values) => match values.as_slice() {
                        [Value::BulkString(status), Value::BulkString(supervisor)] if status == b"online" => {
                            let supervisor = String::from_utf8_lossy(supervisor);
                            parse_supervisor(key, field::SUPERVISOR, &supervisor)
                        }
                        [_, _] => Ok(None),
                        _ => Err(RedisError::reply(format!("HMGET {key}"), &reply).into()),
                    },
                    _ => Err(RedisError::reply(format!("HMGET {key}"), &reply).into()),
                }
            },
        )
        .await
    }

    /// Takes `device`'s index lock and moves its entries to where its status
    /// says, from `stray`'s set where it was found (or from nowhere).
    async fn reindex(&self, device: &DeviceId, stray: Option<SupervisorId>, report: &mut Reconciliation) -> Result<()> {
        let (hash, lock, token) = (self.keys.status(device), self.keys.index_lock(device), self.token());
        let begin = eval(
            &self.conn_scripts().index_begin,
            &[&hash, &lock],
            (&token, self.lock_ttl_ms),
        );
        let reply = words(
            self.one(|| format!("locking the indexes of {hash}"), &begin).await?,
            &hash,
        )?;
        match reply.as_slice() {
            [busy] if busy == "busy" => report.busy += 1,
            [sync, target] if sync == "sync" => {
                let target = parse_supervisor(&hash, field::SUPERVISOR, target)?;
                self.sync_indexes(device, &token, stray, target).await?;
                report.reindexed += 1;
            }
            _ => return Err(RedisError::garbled(&hash, None, format!("index lock answered {reply:?}")).into()),
        }
        Ok(())
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.conn.is_cluster())
            .field("key_prefix", &self.keys.prefix())
            .field("clock", &self.clock)
            .field("exact_lookups", &self.exact_lookups)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RoutingStore for RedisStore {
    async fn claim(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Result<Claim> {
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let expires_at = self.lease_expiry_ms(now, ttl);
        let key = self.keys.lease(device);
        let claim = eval(
            &self.conn_scripts().claim,
            &[&key],
            (supervisor.as_str(), now.unix_millis(), expires_at, self.margin_ms),
        );
        let previous = owner(&key, self.one(|| format!("claiming {key}"), &claim).await?)?;
        Ok(match previous {
            None => Claim::Acquired,
            Some(previous) if previous == *supervisor => Claim::Renewed,
            Some(previous) => Claim::TakenOver { previous },
        })
    }

    async fn renew(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Result<Vec<DeviceId>> {
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let expires_at = self.lease_expiry_ms(now, ttl);
        let args = (supervisor.as_str(), now.unix_millis(), expires_at, self.margin_ms);
        let keys = devices.iter().map(|device| self.keys.lease(device)).collect();
        let renewed = self
            .batch(
                keys,
                |key| eval(&self.conn_scripts().renew, &[key], args),
                |key, reply| Ok(as_int(&checked(key, reply)?, key)? == 1),
            )
            .await?;
        Ok(devices
            .iter()
            .zip(renewed)
            .filter(|(_, renewed)| !renewed)
            .map(|(device, _)| *device)
            .collect())
    }

    async fn release(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool> {
        let key = self.keys.lease(device);
        let release = eval(
            &self.conn_scripts().release,
            &[&key],
            (supervisor.as_str(), self.now_ms(), self.margin_ms),
        );
        Ok(as_int(&self.one(|| format!("releasing {key}"), &release).await?, &key)? == 1)
    }

    async fn lookup(&self, device: &DeviceId) -> Result<Option<SupervisorId>> {
        let key = self.keys.lease(device);
        owner(
            &key,
            self.one(|| format!("looking up {key}"), &self.lookup_cmd(&key)).await?,
        )
    }

    async fn lookup_many(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>> {
        let keys = devices.iter().map(|device| self.keys.lease(device)).collect();
        self.batch(keys, |key| self.lookup_cmd(key), owner).await
    }
}

#[async_trait]
impl StatusStore for RedisStore {
    async fn update_status(&self, device: &DeviceId, patch: &StatusPatch) -> Result<()> {
        patch.check_conditions(device)?;
        let (hash, lock, token) = (self.keys.status(device), self.keys.index_lock(device), self.token());
        let lease = self.keys.lease(device);
        let changes = HashChanges::of(patch);
        let fence = patch.fence.as_ref().map_or("", SupervisorId::as_str);
        let holder = patch.lease.as_ref().map_or("", SupervisorId::as_str);
        let mut update = eval(
            &self.conn_scripts().update_status,
            &[&hash, &lock, &lease],
            (
                fence,
                holder,
                self.now_ms(),
                self.margin_ms,
                &token,
                self.lock_ttl_ms,
                changes.set.len(),
            ),
        );
        for (name, value) in &changes.set {
            update.arg(*name).arg(value);
        }
        update.arg(&changes.delete);
        let reply = words(self.one(|| format!("updating {hash}"), &update).await?, &hash)?;
        match reply.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            [missing] if missing == "missing" && patch.fence.is_some() => Err(Error::status_not_found(*device)),
            [unleased, owner] if unleased == "unleased" => match patch.lease {
                Some(holder) => Err(Error::not_owner(
                    *device,
                    holder,
                    parse_supervisor(&lease, "owner", owner)?,
                )),
                None => {
                    Err(RedisError::reply(format!("updating {hash}"), &Value::SimpleString("unleased".into())).into())
                }
            },
            [fenced, named] if fenced == "fenced" => {
                let named = parse_supervisor(&hash, field::SUPERVISOR, named)?;
                match patch.fence {
                    Some(fence) => Err(Error::not_owner(*device, fence, named)),
                    None => {
                        Err(RedisError::reply(format!("updating {hash}"), &Value::SimpleString("fenced".into())).into())
                    }
                }
            }
            [sync, before, target] if sync == "sync" => {
                let before = parse_supervisor(&hash, field::SUPERVISOR, before)?;
                let target = parse_supervisor(&hash, field::SUPERVISOR, target)?;
                self.sync_indexes(device, &token, before, target).await
            }
            _ => Err(RedisError::garbled(&hash, None, format!("status update answered {reply:?}")).into()),
        }
    }

    async fn status(&self, device: &DeviceId) -> Result<Option<DeviceStatus>> {
        let key = self.keys.status(device);
        let reply = self.on_key("HGETALL", &key).await?;
        let fields = field_pairs(reply, &key)?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(codec::decode_status(&key, *device, fields)?))
    }

    async fn online_devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        self.list_set(&self.keys.online(), page).await
    }

    async fn devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        self.list_set(&self.keys.known(), page).await
    }

    async fn supervisor_devices(&self, supervisor: &SupervisorId, page: &PageRequest) -> Result<Page<DeviceId>> {
        self.list_set(&self.keys.supervisor_devices(supervisor), page).await
    }

    async fn device_counts(&self) -> Result<Vec<SupervisorLoad>> {
        let supervisors = self.registered_supervisors().await?;
        let keys = supervisors.iter().map(|s| self.keys.device_count(s)).collect();
        let counts = self
            .batch(keys, |key| redis::cmd("GET").arg(key).to_owned(), count)
            .await?;
        Ok(supervisors
            .into_iter()
            .zip(counts)
            .filter(|(_, devices)| *devices > 0)
            .map(|(supervisor, devices)| SupervisorLoad {
                supervisor,
                devices: devices as u64,
            })
            .collect())
    }
}

#[async_trait]
impl ConfigStore for RedisStore {
    async fn put_template(&self, template: &ConfigTemplate) -> Result<()> {
        let config = template.reference();
        if config.version.as_str() == keys::LATEST {
            return Err(Error::invalid_input(format!(
                "config version {:?} of {}: the Redis store keeps the `latest` pointer under that name",
                keys::LATEST,
                config.agent_type
            )));
        }
        let (key, versions) = (self.keys.template(&config), self.keys.versions(&config.agent_type));
        let put = eval(
            &self.conn_scripts().put_template,
            &[&key, &versions],
            (codec::encode_template(template), config.version.as_str()),
        );
        match text(self.one(|| format!("storing {key}"), &put).await?, &key)? {
            None => Ok(()),
            Some(stored) if codec::decode_template(&key, &config, &stored)?.same_content(template) => Ok(()),
            Some(_) => Err(Error::already_exists(format!(
                "config template {config} with other content ({key})"
            ))),
        }
    }

    async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>> {
        let key = self.keys.template(config);
        match self.get(&key).await? {
            Some(stored) => Ok(Some(codec::decode_template(&key, config, &stored)?)),
            None => Ok(None),
        }
    }

    async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>> {
        let key = self.keys.versions(agent_type);
        let reply = self
            .one(
                || format!("LRANGE {key}"),
                redis::cmd("LRANGE").arg(&key).arg(0).arg(-1),
            )
            .await?;
        strings(reply, &key)?
            .iter()
            .map(|version| ConfigVersion::new(version).map_err(|_| garbled_member(&key, version)))
            .collect()
    }

    async fn set_latest(&self, config: &ConfigRef) -> Result<()> {
        let (key, latest) = (self.keys.template(config), self.keys.latest(&config.agent_type));
        let set = eval(
            &self.conn_scripts().set_latest,
            &[&key, &latest],
            config.version.as_str(),
        );
        if as_int(&self.one(|| format!("setting {latest}"), &set).await?, &latest)? == 0 {
            return Err(Error::not_found(format!(
                "config template {config}, to be the latest of {}",
                config.agent_type
            )));
        }
        Ok(())
    }

    async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>> {
        let key = self.keys.latest(agent_type);
        match self.get(&key).await? {
            Some(version) => Ok(Some(
                ConfigVersion::new(&version).map_err(|_| garbled_member(&key, &version))?,
            )),
            None => Ok(None),
        }
    }

    async fn set_desired(&self, device: &DeviceId, config: &ConfigRef) -> Result<()> {
        // Templates are never deleted, so one seen stored here stays stored.
        let template = self.keys.template(config);
        let exists = self.on_key("EXISTS", &template).await?;
        if as_int(&exists, &template)? == 0 {
            return Err(Error::not_found(format!(
                "config template {config}, to be the desired config of device {device}"
            )));
        }
        let key = self.keys.desired(device);
        let set = redis::cmd("SET").arg(&key).arg(codec::format_ref(config)).to_owned();
        checked(&key, self.one(|| format!("SET {key}"), &set).await?)?;
        Ok(())
    }

    async fn desired(&self, device: &DeviceId) -> Result<Option<ConfigRef>> {
        let key = self.keys.desired(device);
        match self.get(&key).await? {
            Some(stored) => Ok(Some(codec::parse_ref(&key, &stored)?)),
            None => Ok(None),
        }
    }

    async fn clear_desired(&self, device: &DeviceId) -> Result<bool> {
        let key = self.keys.desired(device);
        Ok(as_int(&self.on_key("DEL", &key).await?, &key)? == 1)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A reply, or the command's own failure as an error naming `key`.
fn checked(key: &str, reply: Value) -> Result<Value> {
    match reply {
        Value::ServerError(err) => Err(RedisError::command(format!("command on {key}"), err.into()).into()),
        reply => Ok(reply),
    }
}

fn as_int(reply: &Value, key: &str) -> Result<i64> {
    match reply {
        Value::Int(n) => Ok(*n),
        other => Err(RedisError::reply(format!("command on {key}"), other).into()),
    }
}

/// A string reply (`None` for nil); text that is not UTF-8 is an error naming `key`.
fn text(reply: Value, key: &str) -> Result<Option<String>> {
    match checked(key, reply)? {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| RedisError::garbled(key, None, "the value is not UTF-8".into()).into()),
        Value::SimpleString(text) => Ok(Some(text)),
        other => Err(RedisError::reply(format!("command on {key}"), &other).into()),
    }
}

/// The supervisor a lease names, if any.
fn owner(key: &str, reply: Value) -> Result<Option<SupervisorId>> {
    match text(reply, key)? {
        Some(name) => SupervisorId::new(&name)
            .map(Some)
            .map_err(|_| garbled_member(key, &name)),
        None => Ok(None),
    }
}

/// A counter, absent as 0.
fn count(key: &str, reply: Value) -> Result<i64> {
    match text(reply, key)? {
        Some(number) => number
            .parse()
            .map_err(|_| RedisError::garbled(key, None, format!("{} is not a count", codec::excerpt(&number))).into()),
        None => Ok(0),
    }
}

/// A supervisor named in a field; empty for none.
fn parse_supervisor(key: &str, field: &str, name: &str) -> Result<Option<SupervisorId>> {
    if name.is_empty() {
        return Ok(None);
    }
    SupervisorId::new(name).map(Some).map_err(|_| {
        RedisError::garbled(
            key,
            Some(field),
            format!("{} is not a supervisor id", codec::excerpt(name)),
        )
        .into()
    })
}

fn garbled_member(key: &str, value: &str) -> Error {
    RedisError::garbled(
        key,
        None,
        format!("holds {}, which is not a valid name here", codec::excerpt(value)),
    )
    .into()
}

/// An array of strings (a script's answer, a set's members, a list).
fn strings(reply: Value, key: &str) -> Result<Vec<String>> {
    let items = match checked(key, reply)? {
        Value::Array(items) | Value::Set(items) => items,
        other => return Err(RedisError::reply(format!("command on {key}"), &other).into()),
    };
    items
        .into_iter()
        .map(|item| text(item, key).map(Option::unwrap_or_default))
        .collect()
}

fn words(reply: Value, key: &str) -> Result<Vec<String>> {
    strings(reply, key)
}

/// `HGETALL`'s field/value pairs (an array in RESP2, a map in RESP3).
fn field_pairs(reply: Value, key: &str) -> Result<Vec<(String, String)>> {
    let pairs: Vec<(Value, Value)> = match checked(key, reply)? {
        Value::Map(pairs) => pairs,
        Value::Array(flat) if flat.len() % 2 == 0 => {
            let mut flat = flat.into_iter();
            std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
        }
        other => return Err(RedisError::reply(format!("HGETALL {key}"), &other).into()),
    };
    pairs
        .into_iter()
        .map(|(name, value)| {
            let name = text(name, key)?.unwrap_or_default();
            let value = text(value, key)
                .map_err(|_| Error::from(RedisError::garbled(key, Some(&name), "the value is not UTF-8".into())))?;
            Ok((name, value.unwrap_or_default()))
        })
        .collect()
}

/// `SSCAN`'s next position and members.
fn scan_reply(reply: Value, key: &str) -> Result<(u64, Vec<String>)> {
    let unexpected = |reply: &Value| Error::from(RedisError::reply(format!("SSCAN {key}"), reply));
    match checked(key, reply)? {
        Value::Array(parts) if parts.len() == 2 => {
            let mut parts = parts.into_iter();
            let (position, members) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let next = text(position.clone(), key)?
                .and_then(|position| position.parse().ok())
                .ok_or_else(|| unexpected(&position))?;
            Ok((next, strings(members, key)?))
        }
        other => Err(unexpected(&other)),
    }
}

/// Sets up to this size are listed in id order, a whole read per page.
const SMALL_SET: i64 = 1_000;

/// Where a listing continues (see `RedisStore::list_set`): `=` and the last
/// id listed of a small set; or the scan position, then either `:` and the
/// last id taken from a batch that is to be scanned again, or `+` and the ids
/// of the last batch still to be listed.
#[derive(Debug, Default, PartialEq)]
struct ListCursor {
    whole: bool,
    position: u64,
    after: Option<DeviceId>,
    carried: Vec<DeviceId>,
}

impl ListCursor {
    fn carrying(position: u64, carried: &[DeviceId]) -> Cursor {
        let mut text = position.to_string();
        if !carried.is_empty() {
            text.push('+');
            text.push_str(&carried.iter().map(DeviceId::as_str).collect::<Vec<_>>().join(","));
        }
        Cursor::new(text)
    }

    fn parse(cursor: &Cursor) -> Result<Self> {
        let text = cursor.as_str();
        let foreign = || Error::invalid_input(format!("page cursor {text:?} is not this store's"));
        let device = |id: &str| DeviceId::new(id).map_err(|_| foreign());
        if let Some(last) = text.strip_prefix('=') {
            return Ok(ListCursor {
                whole: true,
                after: Some(device(last)?),
                ..ListCursor::default()
            });
        }
        let end = text.find([':', '+']).unwrap_or(text.len());
        let mut parsed = ListCursor {
            position: text[..end].parse().map_err(|_| foreign())?,
            ..ListCursor::default()
        };
        match text[end..].split_at_checked(1) {
            Some((":", last)) => parsed.after = Some(device(last)?),
            Some(("+", carried)) => parsed.carried = carried.split(',').map(device).collect::<Result<_>>()?,
            _ => {}
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:hunter2@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(redact("redis://alice:hunter2@host/"), "redis://alice:***@host/");
        assert_eq!(redact("redis://host:6379/"), "redis://host:6379/");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_named() {
        let (a, b) = (DeviceId::new("d1:x").unwrap(), DeviceId::new("d2").unwrap());
        let carrying = ListCursor::parse(&ListCursor::carrying(42, &[a, b])).unwrap();
        assert_eq!((carrying.position, carrying.carried), (42, vec![a, b]));
        assert_eq!(ListCursor::parse(&ListCursor::carrying(7, &[])).unwrap().position, 7);
        let rescan = ListCursor::parse(&Cursor::new("0:d1:x")).unwrap();
        assert_eq!((rescan.position, rescan.after), (0, Some(a)));
        let whole = ListCursor::parse(&Cursor::new("=d1:x")).unwrap();
        assert_eq!((whole.whole, whole.after), (true, Some(a)));
        for bad in ["", "x", "1:bad id", "-1", "1+a,,b", "1:", "=", "=bad id"] {
            let err = ListCursor::parse(&Cursor::new(bad)).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn config_reads_with_defaults_and_refuses_unknown_fields() {
        let config: RedisStoreConfig = serde_json::from_str(r#"{"urls": ["redis://h/"]}"#).unwrap();
        assert_eq!(config.response_timeout, Duration::from_secs(5));
        assert!(!config.cluster);
        assert!(serde_json::from_str::<RedisStoreConfig>(r#"{"urls": [], "bogus": 1}"#).is_err());
    }
}
