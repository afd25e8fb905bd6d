//! The Redis store against a real Redis, a real three-master Redis Cluster
//! and a real primary with a replica under Sentinel, on loopback
//! (`scripts/services/redis start DIR` starts them all): the store
//! conformance suite on each, and what only this backend has: the design's
//! keys as `redis-cli` sees them, bad data, pipelining, reconciliation,
//! recovery after Redis restarts empty, and following a Sentinel failover.
//!
//! Where the servers are: `OPAMP_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6390/`), `OPAMP_TEST_REDIS_CLUSTER_URLS`
//! (comma-separated, default ports 7301–7303) and
//! `OPAMP_TEST_REDIS_SENTINEL_URLS` (comma-separated, default
//! `redis://127.0.0.1:26410/`) with `OPAMP_TEST_REDIS_SENTINEL_MASTER`
//! (default `opamp-test`). A test that cannot reach them fails, saying how
//! to start them.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::supervisor::{Supervisor, SupervisorConfig};
use opamp_core::testkit::eventually;
use opamp_core::testkit::store::StoreFixture;
use opamp_core::transport::channel::{self, ChannelConfig};
use opamp_core::transport::{AgentConnector, Capabilities, DeviceHello, FromDevice, StatusReport, ToDevice};
use opamp_core::{
    AgentType, Bus, Claim, Clock, ConfigBundle, ConfigFile, ConfigHash, ConfigRef, ConfigStore, ConfigTemplate,
    ConfigVersion, DeviceId, Error, ManualClock, PageRequest, RoutingStore, StatusPatch, StatusStore, Store,
    SupervisorId, Timestamp,
};
use opamp_store::redis::{RedisSentinelConfig, RedisStore, RedisStoreConfig};
use support::{OwnRedis, OwnSentinelSet};

mod support;

const HOW_TO_START: &str = "start the test servers with `scripts/services/redis start /tmp/opamp-redis` \
     (or point OPAMP_TEST_REDIS_URL / OPAMP_TEST_REDIS_CLUSTER_URLS / OPAMP_TEST_REDIS_SENTINEL_URLS at running ones)";

fn standalone_url() -> String {
    std::env::var("OPAMP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390/".to_owned())
}

fn cluster_urls() -> Vec<String> {
    urls_from_env(
        "OPAMP_TEST_REDIS_CLUSTER_URLS",
        "redis://127.0.0.1:7301/,redis://127.0.0.1:7302/,redis://127.0.0.1:7303/",
    )
}

fn sentinel_urls() -> Vec<String> {
    urls_from_env("OPAMP_TEST_REDIS_SENTINEL_URLS", "redis://127.0.0.1:26410/")
}

/// The comma-separated URLs in the variable `name`, or in `default`.
fn urls_from_env(name: &str, default: &str) -> Vec<String> {
    let urls = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    urls.split(',').map(str::to_owned).collect()
}

fn sentinel_master() -> String {
    std::env::var("OPAMP_TEST_REDIS_SENTINEL_MASTER").unwrap_or_else(|_| "opamp-test".to_owned())
}

/// A key prefix no other test (or earlier run) uses.
fn unique_prefix(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "test:{what}:{}:{started}:{}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(cluster: bool, what: &str) -> RedisStoreConfig {
    let config = if cluster {
        RedisStoreConfig::cluster(cluster_urls())
    } else {
        RedisStoreConfig::standalone(standalone_url())
    };
    config.key_prefix(unique_prefix(what))
}

async fn connect(config: RedisStoreConfig, clock: Option<Arc<ManualClock>>) -> RedisStore {
    let described = format!("{config:?}");
    let store = match clock {
        Some(clock) => RedisStore::connect_with_clock(config, clock).await,
        None => RedisStore::connect(config).await,
    };
    store.unwrap_or_else(|err| panic!("cannot reach Redis ({described}): {err}; {HOW_TO_START}"))
}

async fn fixture_on(cluster: bool) -> StoreFixture {
    fixture_with(config(cluster, "conformance")).await
}

async fn fixture_with(config: RedisStoreConfig) -> StoreFixture {
    let clock = Arc::new(ManualClock::starting_now());
    let store = connect(config, Some(clock.clone())).await;
    StoreFixture::new(Arc::new(store), clock)
}

/// The rollout and runtime scenarios' bus: the store is what they test.
async fn memory_bus() -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new())
}

mod standalone {
    use super::*;

    async fn fixture() -> StoreFixture {
        fixture_on(false).await
    }

    opamp_core::store_conformance!(fixture);
    opamp_core::rollout_scenarios!(fixture, memory_bus);
    opamp_core::runtime_scenarios!(fixture, memory_bus);
}

mod cluster {
    use super::*;

    async fn fixture() -> StoreFixture {
        fixture_on(true).await
    }

    opamp_core::store_conformance!(fixture);
    opamp_core::rollout_scenarios!(fixture, memory_bus);
    opamp_core::runtime_scenarios!(fixture, memory_bus);
}

/// The primary the shared Sentinel watches (the conformance suite never kills
/// it: the failover test below has a set of its own).
mod sentinel {
    use super::*;

    async fn fixture() -> StoreFixture {
        let config = RedisStoreConfig::sentinel(sentinel_urls(), RedisSentinelConfig::new(sentinel_master()));
        fixture_with(config.key_prefix(unique_prefix("conformance"))).await
    }

    opamp_core::store_conformance!(fixture);
    opamp_core::rollout_scenarios!(fixture, memory_bus);
}

/// Runs the case `$case(cluster: bool)` as two tests, `$case::standalone` and `$case::cluster`.
macro_rules! on_both {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                super::$case(false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$case(true).await;
            }
        }
    };
}

/// A plain client on the same server, to look at and tamper with the keys as an operator would.
async fn raw(cluster: bool) -> Raw {
    if cluster {
        let client = redis::cluster::ClusterClient::new(cluster_urls()).expect("cluster URLs");
        Raw::Cluster(client.get_async_connection().await.expect(HOW_TO_START))
    } else {
        let client = redis::Client::open(standalone_url()).expect("standalone URL");
        Raw::Standalone(client.get_multiplexed_async_connection().await.expect(HOW_TO_START))
    }
}

enum Raw {
    Standalone(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        match self {
            Raw::Standalone(conn) => cmd.query_async(conn).await,
            Raw::Cluster(conn) => cmd.query_async(conn).await,
        }
        .unwrap_or_else(|err| panic!("{cmd:?}: {err}"))
    }

    async fn set(&mut self, key: &str, value: &str) {
        let () = self.query(redis::cmd("SET").arg(key).arg(value)).await;
    }
}

fn did(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn sid(name: &str) -> SupervisorId {
    SupervisorId::new(name).unwrap()
}

fn fluentbit(version: &str) -> ConfigRef {
    ConfigRef::new(
        AgentType::new("fluentbit").unwrap(),
        ConfigVersion::new(version).unwrap(),
    )
}

fn template(config: ConfigRef, body: &str) -> ConfigTemplate {
    let bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", body))
        .unwrap();
    ConfigTemplate::new(
        config,
        bundle,
        "alice",
        Timestamp::from_unix_seconds(1_706_356_800).unwrap(),
    )
}

/// The design's keys, as `redis-cli` shows them, for one device online under one supervisor.
async fn keys_are_the_designs(cluster: bool) {
    let config = config(cluster, "model");
    let p = config.key_prefix.clone();
    let store = connect(config, None).await;
    let mut raw = raw(cluster).await;
    let (d5, s3) = (did("device-5"), sid("supervisor-pod-3"));
    let connected = Timestamp::from_unix_seconds(1_706_350_000).unwrap();
    let seen = Timestamp::from_unix_millis(1_706_356_800_250).unwrap();

    assert_eq!(
        store.claim(&d5, &s3, Duration::from_secs(300)).await.unwrap(),
        Claim::Acquired
    );
    let patch = StatusPatch::new()
        .online(s3, connected)
        .emission(true)
        .config(ConfigVersion::new("v1.2.3").unwrap(), None)
        .agent_type(AgentType::new("fluentbit").unwrap())
        .last_seen(seen);
    store.update_status(&d5, &patch).await.unwrap();
    let v123 = fluentbit("v1.2.3");
    store
        .put_template(&template(v123, "[SERVICE]\n    hot_reload On\n"))
        .await
        .unwrap();
    store.set_latest(&v123).await.unwrap();
    store.set_desired(&d5, &v123).await.unwrap();

    let routing = format!("{p}device:{{device-5}}:supervisor");
    let owner: String = raw.query(redis::cmd("GET").arg(&routing)).await;
    assert_eq!(owner, "supervisor-pod-3");
    let ttl: i64 = raw.query(redis::cmd("PTTL").arg(&routing)).await;
    assert!(
        (299_000..=300_000).contains(&ttl),
        "the key's TTL is the lease: {ttl} ms"
    );

    let hash: std::collections::HashMap<String, String> = raw
        .query(redis::cmd("HGETALL").arg(format!("{p}device:{{device-5}}")))
        .await;
    let expected = [
        ("status", "online"),
        ("emission", "true"),
        ("config_version", "v1.2.3"),
        ("agent_type", "fluentbit"),
        ("last_seen", "1706356800.250"),
        ("connected_at", "1706350000"),
        ("supervisor", "supervisor-pod-3"),
    ];
    for (field, value) in expected {
        assert_eq!(
            hash.get(field).map(String::as_str),
            Some(value),
            "field {field} of {hash:?}"
        );
    }
    assert_eq!(hash.len(), expected.len(), "{hash:?}");

    let online: Vec<String> = raw
        .query(redis::cmd("SMEMBERS").arg(format!("{p}devices:online")))
        .await;
    assert_eq!(online, vec!["device-5"]);
    let under: Vec<String> = raw
        .query(redis::cmd("SMEMBERS").arg(format!("{p}supervisor:{{supervisor-pod-3}}:devices")))
        .await;
    assert_eq!(under, vec!["device-5"]);
    let strings = [
        ("supervisor:{supervisor-pod-3}:device_count", "1"),
        ("config:{fluentbit}:latest", "v1.2.3"),
        ("device:{device-5}:desired", "fluentbit/v1.2.3"),
    ];
    for (key, value) in strings {
        let stored: String = raw.query(redis::cmd("GET").arg(format!("{p}{key}"))).await;
        assert_eq!(stored, value, "GET {key}");
    }
    let stored: String = raw
        .query(redis::cmd("GET").arg(format!("{p}config:{{fluentbit}}:v1.2.3")))
        .await;
    assert!(
        stored.contains(r#""text":"[SERVICE]\n    hot_reload On\n""#),
        "{stored}"
    );
    let lock: bool = raw
        .query(redis::cmd("EXISTS").arg(format!("{p}device:{{device-5}}:indexing")))
        .await;
    assert!(!lock, "the index lock is let go");

    // What an operator writes by hand reads back.
    raw.set(&format!("{p}device:{{device-6}}:supervisor"), "supervisor-pod-3")
        .await;
    assert_eq!(store.lookup(&did("device-6")).await.unwrap(), Some(s3));
    let () = raw
        .query(
            redis::cmd("HSET")
                .arg(format!("{p}device:{{device-6}}"))
                .arg(&["status", "online", "emission", "false"]),
        )
        .await;
    assert!(store.status(&did("device-6")).await.unwrap().unwrap().is_online());
}

on_both!(keys_are_the_designs);

/// Bad data of every kind is an error naming the key (and the field), never a panic.
async fn bad_data_is_named(cluster: bool) {
    let config = config(cluster, "bad");
    let p = config.key_prefix.clone();
    let store = connect(config, None).await;
    let mut raw = raw(cluster).await;
    let d = did("d1");
    let hash = format!("{p}device:{{d1}}");

    async fn expect_named<T: std::fmt::Debug>(result: opamp_core::Result<T>, needles: &[&str]) {
        let err = result.expect_err("bad data must be an error");
        let text = err.to_string();
        for needle in needles {
            assert!(text.contains(needle), "{text:?} should name {needle:?}");
        }
    }

    let garbles: [(&[&str], &[&str]); 5] = [
        (&["status", "online"], &["emission", "missing"]),
        (&["emission", "maybe"], &["emission", "maybe"]),
        (
            &["emission", "true", "last_seen", "yesterday"],
            &["last_seen", "yesterday"],
        ),
        (&["last_seen", "1", "labels", "[1,2]"], &["labels"]),
        (&["labels", "{}", "supervisor", "no spaces allowed"], &["supervisor"]),
    ];
    for (fields, named) in garbles {
        let () = raw.query(redis::cmd("HSET").arg(&hash).arg(fields)).await;
        let needles: Vec<&str> = std::iter::once(hash.as_str()).chain(named.iter().copied()).collect();
        expect_named(store.status(&d).await, &needles).await;
    }
    expect_named(
        store
            .update_status(&d, &StatusPatch::new().emission(true).fenced_by(sid("s1")))
            .await,
        &[&hash, "supervisor"],
    )
    .await;

    // A key of the wrong type.
    let routing = format!("{p}device:{{d2}}:supervisor");
    let () = raw.query(redis::cmd("HSET").arg(&routing).arg(&["a", "b"])).await;
    expect_named(store.lookup(&did("d2")).await, &[&routing]).await;
    expect_named(store.lookup_many(&[did("d1"), did("d2")]).await, &[&routing]).await;
    expect_named(
        store.claim(&did("d2"), &sid("s1"), Duration::from_secs(1)).await,
        &[&routing],
    )
    .await;
    expect_named(
        store.renew(&sid("s1"), &[did("d2")], Duration::from_secs(1)).await,
        &[&routing],
    )
    .await;
    let status2 = format!("{p}device:{{d2}}");
    raw.set(&status2, "a string").await;
    expect_named(store.status(&did("d2")).await, &[&status2]).await;
    expect_named(
        store
            .update_status(&did("d2"), &StatusPatch::new().emission(true))
            .await,
        &[&status2],
    )
    .await;

    // A routing key naming no valid supervisor.
    let routing3 = format!("{p}device:{{d3}}:supervisor");
    raw.set(&routing3, "not a supervisor!").await;
    expect_named(store.lookup(&did("d3")).await, &[&routing3, "not a supervisor!"]).await;

    // Sets, counters and configuration.
    let online = format!("{p}devices:online");
    let () = raw.query(redis::cmd("SADD").arg(&online).arg("bad id")).await;
    expect_named(
        store.online_devices(&PageRequest::first(10)).await,
        &[&online, "bad id"],
    )
    .await;
    let () = raw
        .query(redis::cmd("SADD").arg(format!("{p}supervisors")).arg("s9"))
        .await;
    let count = format!("{p}supervisor:{{s9}}:device_count");
    raw.set(&count, "many").await;
    expect_named(store.device_counts().await, &[&count, "many"]).await;
    let v1 = fluentbit("v1");
    let stored = format!("{p}config:{{fluentbit}}:v1");
    raw.set(&stored, "{not json").await;
    expect_named(store.template(&v1).await, &[&stored]).await;
    expect_named(store.put_template(&template(v1, "x")).await, &[&stored]).await;
    raw.set(
        &stored,
        &serde_json::to_string(&template(fluentbit("v2"), "x")).unwrap(),
    )
    .await;
    expect_named(store.template(&v1).await, &[&stored, "fluentbit/v2"]).await;
    let latest = format!("{p}config:{{otelcol}}:latest");
    raw.set(&latest, "v 1").await;
    expect_named(store.latest(&AgentType::new("otelcol").unwrap()).await, &[&latest]).await;
    let desired = format!("{p}device:{{d1}}:desired");
    raw.set(&desired, "fluentbit").await;
    expect_named(store.desired(&d).await, &[&desired]).await;

    let err = store
        .put_template(&template(fluentbit("latest"), "x"))
        .await
        .expect_err("the version `latest` is the pointer's name");
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
}

on_both!(bad_data_is_named);

/// Renewing or looking up 1,000 devices costs one request per node.
async fn batches_cost_one_round_trip_per_node(cluster: bool) {
    let nodes = if cluster { 3 } else { 1 };
    let store = connect(config(cluster, "batch"), None).await;
    let s1 = sid("s1");
    let devices: Vec<DeviceId> = (0..1_000).map(|n| did(&format!("device-{n}"))).collect();
    for d in &devices {
        store.claim(d, &s1, Duration::from_secs(60)).await.unwrap();
    }
    let before = store.requests_sent();
    let owners = store.lookup_many(&devices).await.unwrap();
    assert_eq!(store.requests_sent() - before, nodes, "lookup_many of 1,000");
    assert!(owners.iter().all(|owner| *owner == Some(s1)));

    let before = store.requests_sent();
    let lost = store.renew(&s1, &devices, Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.requests_sent() - before, nodes, "renew of 1,000");
    assert!(lost.is_empty(), "{lost:?}");
}

on_both!(batches_cost_one_round_trip_per_node);

/// `reconcile` marks offline the devices whose lease lapsed, and repairs indexes and counts that drifted.
async fn reconcile_repairs_the_indexes(cluster: bool) {
    let clock = Arc::new(ManualClock::starting_now());
    let config = config(cluster, "reconcile");
    let p = config.key_prefix.clone();
    let store = connect(config, Some(clock.clone())).await;
    let mut raw = raw(cluster).await;
    let (s1, s2) = (sid("s1"), sid("s2"));
    let (kept, lapsed, stray, gone) = (did("kept"), did("lapsed"), did("stray"), did("gone"));
    let at = clock.now();
    for (d, ttl) in [(kept, 60), (lapsed, 10)] {
        store.claim(&d, &s1, Duration::from_secs(ttl)).await.unwrap();
        store
            .update_status(&d, &StatusPatch::new().online(s1, at))
            .await
            .unwrap();
    }
    store.claim(&stray, &s2, Duration::from_secs(60)).await.unwrap();
    store
        .update_status(&stray, &StatusPatch::new().online(s2, at))
        .await
        .unwrap();
    // Drift, as a writer dying half-way or an operator would leave it.
    let () = raw
        .query(
            redis::cmd("SADD")
                .arg(format!("{p}supervisor:{{s1}}:devices"))
                .arg("stray"),
        )
        .await;
    let () = raw
        .query(redis::cmd("SADD").arg(format!("{p}devices:online")).arg("gone"))
        .await;
    raw.set(&format!("{p}supervisor:{{s2}}:device_count"), "7").await;
    clock.advance(Duration::from_secs(10));

    let report = store.reconcile().await.unwrap();
    assert_eq!(report.lapsed, 1, "{report:?}");
    assert_eq!(report.reindexed, 2, "stray under s1 and gone: {report:?}");
    assert_eq!(report.recounted, 2, "s1 (the stray came uncounted) and s2: {report:?}");
    assert_eq!(report.busy, 0);

    assert!(!store.status(&lapsed).await.unwrap().unwrap().is_online());
    let mut online = store.online_devices(&PageRequest::first(10)).await.unwrap().items;
    online.sort();
    assert_eq!(online, vec![kept, stray]);
    assert_eq!(
        store
            .supervisor_devices(&s1, &PageRequest::first(10))
            .await
            .unwrap()
            .items,
        vec![kept]
    );
    assert_eq!(
        store
            .supervisor_devices(&s2, &PageRequest::first(10))
            .await
            .unwrap()
            .items,
        vec![stray]
    );
    let mut counts: Vec<(SupervisorId, u64)> = store
        .device_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.supervisor, l.devices))
        .collect();
    counts.sort();
    assert_eq!(counts, vec![(s1, 1), (s2, 1)]);
    assert_eq!(store.status(&gone).await.unwrap(), None);

    let again = store.reconcile().await.unwrap();
    assert_eq!((again.lapsed, again.reindexed, again.recounted), (0, 0, 0), "{again:?}");
}

on_both!(reconcile_repairs_the_indexes);

/// With the wall clock, a lookup is a plain GET and Redis drops the lapsed lease itself.
#[tokio::test]
async fn with_the_wall_clock_redis_expires_leases() {
    let store = Arc::new(connect(config(false, "wall"), None).await);
    let (d1, s1) = (did("d1"), sid("s1"));
    store.claim(&d1, &s1, Duration::from_millis(200)).await.unwrap();
    assert_eq!(store.lookup(&d1).await.unwrap(), Some(s1));
    let started = Instant::now();
    eventually("the lease lapses", Duration::from_secs(5), || {
        let store = store.clone();
        async move { store.lookup(&d1).await.unwrap().is_none() }
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(150), "not before its end");
    assert_eq!(
        store.claim(&d1, &s1, Duration::from_secs(1)).await.unwrap(),
        Claim::Acquired
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let config = RedisStoreConfig::standalone("redis://:secret@127.0.0.1:1/").response_timeout(Duration::from_secs(1));
    let err = RedisStore::connect(config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1") && !text.contains("secret"), "{text}");
    let bad = RedisStore::connect(RedisStoreConfig::standalone(standalone_url()).key_prefix("a{b")).await;
    assert!(matches!(bad, Err(Error::InvalidInput { .. })), "{bad:?}");
}

#[tokio::test]
async fn unreachable_sentinels_are_unavailable_and_keep_their_secrets() {
    let sentinel = RedisSentinelConfig::new("fleet").credentials(Some("opamp"), "hunter2");
    let config = RedisStoreConfig::sentinel(["redis://:secret@127.0.0.1:1/"], sentinel);
    assert!(!format!("{config:?}").contains("hunter2") && !format!("{config:?}").contains("secret"));
    let err = RedisStore::connect(config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(text.contains("127.0.0.1:1") && text.contains("fleet"), "{text}");
    assert!(!text.contains("secret") && !text.contains("hunter2"), "{text}");

    let mut both = RedisStoreConfig::cluster(cluster_urls());
    both.sentinel = Some(RedisSentinelConfig::new(sentinel_master()));
    let both = RedisStore::connect(both).await;
    assert!(matches!(both, Err(Error::InvalidInput { .. })), "{both:?}");
    let unknown = RedisStoreConfig::sentinel(sentinel_urls(), RedisSentinelConfig::new("no-such-primary"));
    let unknown = RedisStore::connect(unknown).await;
    assert!(matches!(&unknown, Err(err) if err.is_retryable()), "{unknown:?}");
}

/// The primary is killed (SIGKILL) and Sentinel promotes the replica: the
/// same store object, never reconnected by hand, answers again once the
/// replica is promoted, with what was written before, and takes writes
/// again. Until then every call fails as unavailable or timed out, both
/// retryable. On a set of the test's own: killing the shared primary would
/// break the conformance tests running beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_a_sentinel_failover_without_a_restart() {
    let set = OwnSentinelSet::start(6415, 6416, 26415, "opamp-failover");
    let config = RedisStoreConfig::sentinel([set.sentinel_url()], RedisSentinelConfig::new(&set.name))
        .key_prefix(unique_prefix("failover"))
        .response_timeout(Duration::from_secs(1));
    let prefix = config.key_prefix.clone();
    let store = connect(config, None).await;
    let (before, after, s1) = (did("written-before"), did("written-after"), sid("s1"));
    assert_eq!(
        store.claim(&before, &s1, Duration::from_secs(600)).await.unwrap(),
        Claim::Acquired
    );
    store.put_template(&template(fluentbit("1.0"), "before")).await.unwrap();
    // Replication is asynchronous: only what the replica has survives the kill.
    set.wait_replicated();

    set.primary.kill();
    let killed = Instant::now();
    let found = through_a_failover(killed, "the primary was killed", || store.lookup(&before)).await;
    assert_eq!(found, Some(s1), "the replica had the lease");
    set.wait_for_primary(set.replica.port, Duration::ZERO);
    let kept = store.template(&fluentbit("1.0")).await.unwrap();
    assert!(
        kept.is_some_and(|kept| kept.same_content(&template(fluentbit("1.0"), "before"))),
        "the replica had the template"
    );
    assert_eq!(
        store.claim(&after, &s1, Duration::from_secs(600)).await.unwrap(),
        Claim::Acquired,
        "the promoted replica takes writes"
    );
    assert_eq!(
        store
            .renew(&s1, &[before, after], Duration::from_secs(600))
            .await
            .unwrap(),
        Vec::<DeviceId>::new(),
        "a batch reaches the new primary too"
    );
    assert_eq!(set.replica.cli(&["role"]).lines().next(), Some("master"));

    // A planned failover back: the old primary, started again (empty),
    // becomes a replica of the new one and catches up; SENTINEL FAILOVER then
    // promotes it and demotes the node the store is connected to, which stays
    // up. The store leaves it all the same.
    set.primary.launch();
    set.primary.wait_for_cli(
        &["info", "replication"],
        Duration::from_secs(30),
        "the old primary rejoined as a replica and caught up",
        |info| info.contains("role:slave") && info.contains("master_link_status:up"),
    );
    // Refused (NOGOODSLAVE) until Sentinel has seen the rejoined replica healthy.
    set.sentinel.wait_for_cli(
        &["sentinel", "failover", &set.name],
        Duration::from_secs(30),
        "Sentinel started a failover",
        |reply| reply.trim() == "OK",
    );
    let failing_over = Instant::now();
    // Until Sentinel switches (`+switch-master`) the old primary still takes
    // writes, and for seconds after it too, until Sentinel demotes it (those
    // writes are lost when it resyncs). The store leaves it when the switch
    // is announced: wait for the switch, then write until a write lands on
    // the new primary; only the few the announcement was still on its way
    // for may land on the old one.
    set.wait_for_primary(set.primary.port, Duration::from_secs(30));
    let switched = Instant::now();
    let mut astray = Vec::new();
    loop {
        let device = did(&format!("written-after-the-switch-{}", astray.len()));
        let claimed = through_a_failover(failing_over, "SENTINEL FAILOVER", || {
            store.claim(&device, &s1, Duration::from_secs(600))
        })
        .await;
        assert_eq!(claimed, Claim::Acquired);
        let key = format!("{prefix}device:{{{device}}}:supervisor");
        if set.primary.cli(&["get", &key]).trim() == s1.as_str() {
            break;
        }
        astray.push(device);
        assert!(
            switched.elapsed() < Duration::from_secs(2),
            "2 s after the switch the store still writes to the demoted node ({} writes, which says it is {:?})",
            astray.len(),
            set.replica.cli(&["role"]).lines().next(),
        );
    }
    eprintln!(
        "{} writes went to the demoted node after the switch, {:?} after it",
        astray.len(),
        switched.elapsed()
    );
    assert_eq!(
        store.lookup(&after).await.unwrap(),
        Some(s1),
        "the rejoined replica had the lease written after the first failover"
    );
}

/// Calls `call` until it succeeds (within 30 s of `started`), each failure
/// on the way being `Unavailable` or `Timeout`; prints how long it took.
async fn through_a_failover<T, F, Fut>(started: Instant, since: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = opamp_core::Result<T>>,
{
    let mut failures = 0;
    loop {
        match call().await {
            Ok(answer) => {
                eprintln!(
                    "the store answered {:?} after {since} ({failures} calls failed before)",
                    started.elapsed()
                );
                return answer;
            }
            Err(err) => {
                assert!(
                    matches!(err, Error::Unavailable { .. } | Error::Timeout { .. }),
                    "during the failover: {err:?}"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no answer 30 s after {since}: {err}"
                );
                failures += 1;
                // Each failed call already waited through the store's retries; this only paces the loop.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Redis restarts empty: the supervisor finds its leases gone at its next
/// renewal and claims them again, so every device is routable within one
/// renew period (a third of the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisors_reassert_leases_after_redis_restarts_empty() {
    const LEASE: Duration = Duration::from_secs(3);
    let redis = OwnRedis::start(6391);
    let config = RedisStoreConfig::standalone(format!("redis://127.0.0.1:{}/", redis.port)).key_prefix("restart:");
    let store = Arc::new(connect(config, None).await);
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let (transport, connector) = channel::pair(ChannelConfig::default());
    let supervisor = Supervisor::new(
        SupervisorConfig::new(sid("s1")).lease_ttl(LEASE),
        store.clone() as Arc<dyn Store>,
        bus,
    )
    .start(vec![Arc::new(transport)])
    .await
    .unwrap();
    let devices: Vec<DeviceId> = (0..20).map(|n| did(&format!("device-{n}"))).collect();
    let mut sessions = Vec::new();
    for d in &devices {
        let mut hello = DeviceHello::new(*d);
        hello.capabilities = Capabilities::all_builtin();
        sessions.push(connector.connect(&hello).await.unwrap());
    }
    let all_owned = |store: Arc<RedisStore>, devices: Vec<DeviceId>| async move {
        matches!(store.lookup_many(&devices).await, Ok(owners) if owners.iter().all(|o| *o == Some(sid("s1"))))
    };
    eventually("every device leased", Duration::from_secs(10), || {
        all_owned(store.clone(), devices.clone())
    })
    .await;

    let run_id = || {
        let info = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "info", "server"])
            .output();
        let info = String::from_utf8_lossy(&info.expect("redis-cli").stdout).into_owned();
        info.lines().find(|line| line.starts_with("run_id:")).map(str::to_owned)
    };
    let before = run_id();
    redis.stop();
    redis.launch();
    assert_ne!(run_id(), before, "a new, empty Redis (no persistence)");
    let restarted = Instant::now();
    eventually(
        "every lease re-asserted",
        LEASE / 3 + Duration::from_millis(500),
        || all_owned(store.clone(), devices.clone()),
    )
    .await;
    // Each device's status is written right after its claim, several devices at once.
    eventually("every status written again", Duration::from_secs(5), || {
        let store = store.clone();
        let count = devices.len();
        async move {
            matches!(store.online_devices(&PageRequest::first(100)).await, Ok(online) if online.items.len() == count)
        }
    })
    .await;
    eprintln!(
        "re-asserted {} leases {:?} after the restart",
        devices.len(),
        restarted.elapsed()
    );
    supervisor.shutdown().await;
    drop(sessions);
}

/// A set too large to read whole is listed by `SSCAN`: while devices come and
/// go between pages, every device online throughout is listed, and nothing
/// that was never online (the suite's churn case runs on a small set).
async fn large_sets_page_through_churn(cluster: bool) {
    let store = connect(config(cluster, "scan"), None).await;
    let (s1, at) = (sid("s1"), Timestamp::now());
    let stable: Vec<DeviceId> = (0..1_500).map(|n| did(&format!("stable-{n:05}"))).collect();
    let churning: Vec<DeviceId> = (0..300).map(|n| did(&format!("churning-{n:05}"))).collect();
    for d in stable.iter().chain(&churning) {
        store
            .update_status(d, &StatusPatch::new().online(s1, at))
            .await
            .unwrap();
    }
    let mut listed = std::collections::BTreeSet::new();
    let mut request = PageRequest::first(25);
    let mut online = vec![true; churning.len()];
    let mut toggle = 0;
    for page_number in 0.. {
        assert!(page_number < 10_000, "paging did not end");
        let page = store.supervisor_devices(&s1, &request).await.unwrap();
        assert!(page.items.len() <= 25, "a page of {}", page.items.len());
        listed.extend(page.items);
        let Some(cursor) = page.next else { break };
        request = PageRequest::after(cursor, 25);
        for _ in 0..7 {
            toggle = (toggle + 37) % churning.len();
            let patch = if online[toggle] {
                StatusPatch::new().offline()
            } else {
                StatusPatch::new().online(s1, at)
            };
            online[toggle] = !online[toggle];
            store.update_status(&churning[toggle], &patch).await.unwrap();
        }
    }
    let missing: Vec<&DeviceId> = stable.iter().filter(|d| !listed.contains(*d)).collect();
    assert!(missing.is_empty(), "online throughout but not listed: {missing:?}");
    let strays: Vec<&DeviceId> = listed
        .iter()
        .filter(|d| !stable.contains(d) && !churning.contains(d))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
}

on_both!(large_sets_page_through_churn);

/// The store loses its data while devices are connected, as when Redis
/// restarts empty (here: this test's keys, and only those, are deleted; the
/// server is shared). The first status write to find no status makes the
/// supervisor claim every device again at once (its next renewal is 100 s
/// away) and write each one's whole status from its session; no session is
/// closed.
async fn lost_keys_are_claimed_again_at_once_without_closing_sessions(cluster: bool) {
    let prefix = unique_prefix("store-loss");
    let base = if cluster {
        RedisStoreConfig::cluster(cluster_urls())
    } else {
        RedisStoreConfig::standalone(standalone_url())
    };
    let store = Arc::new(connect(base.key_prefix(prefix.clone()), None).await);
    let (transport, connector) = channel::pair(ChannelConfig::default());
    let supervisor = Supervisor::new(
        SupervisorConfig::new(sid("s1")),
        store.clone() as Arc<dyn Store>,
        Arc::new(MemoryBus::new()) as Arc<dyn Bus>,
    )
    .start(vec![Arc::new(transport)])
    .await
    .unwrap();
    let hello = |n: usize| {
        let mut hello = DeviceHello::new(did(&format!("device-{n}")));
        hello.capabilities = Capabilities::all_builtin();
        hello.agent_type = Some(AgentType::new("fluentbit").unwrap());
        hello.labels = [("site".to_owned(), "lab".to_owned())].into();
        hello.config_version = Some(ConfigVersion::new("v7").unwrap());
        hello.config_hash = Some(ConfigHash::from_slice(&[7; 32]).unwrap());
        hello
    };
    let mut sessions = Vec::new();
    for n in 0..5 {
        let mut session = connector.connect(&hello(n)).await.unwrap();
        let registered = session.inbound.recv().await.unwrap();
        assert!(matches!(registered, Some(ToDevice::Registered(_))), "{registered:?}");
        sessions.push(session);
    }
    let mut before = Vec::new();
    for n in 0..5 {
        before.push(store.status(&hello(n).device).await.unwrap().expect("registered"));
    }

    let mut raw = raw(cluster).await;
    let shared = [
        "devices:online",
        "devices",
        "supervisors",
        "supervisor:{s1}:devices",
        "supervisor:{s1}:device_count",
    ];
    let mut keys: Vec<String> = shared.iter().map(|key| format!("{prefix}{key}")).collect();
    for n in 0..5 {
        for suffix in ["", ":supervisor", ":desired", ":indexing"] {
            keys.push(format!("{prefix}device:{{device-{n}}}{suffix}"));
        }
    }
    for key in &keys {
        let _: i64 = raw.query(redis::cmd("DEL").arg(key)).await;
    }
    assert_eq!(
        store.status(&hello(0).device).await.unwrap(),
        None,
        "the status is gone"
    );

    let mut report = StatusReport::default();
    report.emission = Some(true);
    sessions[0].outbound.send(FromDevice::Status(report)).await.unwrap();

    for (n, expected) in before.iter().enumerate() {
        let (store, device) = (store.clone(), hello(n).device);
        eventually(
            &format!("{device} claimed again with its whole status"),
            Duration::from_secs(10),
            || {
                let store = store.clone();
                async move {
                    let status = store.status(&device).await.unwrap();
                    store.lookup(&device).await.unwrap() == Some(sid("s1"))
                        && status.is_some_and(|status| {
                            status.is_online()
                                && status.supervisor == Some(sid("s1"))
                                && status.connected_at == expected.connected_at
                                && status.agent_type == expected.agent_type
                                && status.labels == expected.labels
                                && status.config_version == expected.config_version
                                && status.config_hash == expected.config_hash
                        })
                }
            },
        )
        .await;
    }
    assert!(
        store.status(&hello(0).device).await.unwrap().unwrap().emission,
        "the report that noticed"
    );
    let online = store.online_devices(&PageRequest::first(100)).await.unwrap();
    assert_eq!(online.items.len(), 5, "the indexes are back too");
    for session in &mut sessions {
        let polled = session
            .inbound
            .poll_recv(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        assert!(polled.is_pending(), "no session closed: {polled:?}");
    }
    assert_eq!(supervisor.connected_devices(), 5);
    supervisor.shutdown().await;
}

on_both!(lost_keys_are_claimed_again_at_once_without_closing_sessions);
