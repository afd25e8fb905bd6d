//! The runtimes under Redis faults, injected into a real Redis process and
//! real connections: each scenario runs a Redis of its own (on a port of its
//! own, so that pausing or restarting it disturbs no other test) behind a
//! TCP fault proxy ([`FaultProxy`]), and the fault suite's system over the
//! Redis store ([`FaultRig`], which checks the promises and prints the
//! scenario's row of the table in `docs/operations.md`; run with
//! `--nocapture`).
//!
//! Two scenarios run a primary with a replica under a Sentinel of their own
//! instead of the proxy: the store asks the Sentinel where the primary is.
//!
//! Needs `redis-server` and `redis-sentinel` (`scripts/services/redis` installs them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::faults::{FaultRig, FaultSystem, Losing, NetworkFault};
use opamp_core::testkit::proxy::FaultProxy;
use opamp_core::{Bus, Store};
use opamp_store::redis::{RedisSentinelConfig, RedisStore, RedisStoreConfig};
use support::{OwnRedis, OwnSentinelSet};

mod support;

/// The store's wait for a reply: a paused or blackholed Redis shows as a timeout this soon.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A Redis of the scenario's own on `port`, the proxy in front of it, and
/// the rig over the Redis store reached through the proxy.
async fn start(port: u16) -> (OwnRedis, FaultProxy, FaultRig) {
    support::init_tracing();
    let redis = OwnRedis::start(port);
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let rig = rig_on(RedisStoreConfig::standalone(format!("redis://{}/", proxy.addr()))).await;
    (redis, proxy, rig)
}

/// The Redis store `config` reaches, as every scenario sets it up.
async fn store_on(config: RedisStoreConfig) -> Arc<dyn Store> {
    let config = config.key_prefix("faults:").response_timeout(RESPONSE_TIMEOUT);
    Arc::new(RedisStore::connect(config).await.expect("the scenario's Redis answers"))
}

/// The rig over the Redis store `config` reaches.
async fn rig_on(config: RedisStoreConfig) -> FaultRig {
    let store = store_on(config).await;
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    FaultRig::start(store, bus.clone(), bus).await
}

/// The rig over the store `set`'s Sentinel names the primary of.
async fn under_sentinel(set: &OwnSentinelSet) -> FaultRig {
    support::init_tracing();
    rig_on(RedisStoreConfig::sentinel(
        [set.sentinel_url()],
        RedisSentinelConfig::new(&set.name),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_past_the_response_timeout() {
    let (redis, _proxy, rig) = start(6401).await;
    rig.survive(
        "Redis paused (SIGSTOP) 3 s",
        || redis.signal("-STOP"),
        || redis.signal("-CONT"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed_by_the_network() {
    let (_redis, proxy, rig) = start(6402).await;
    rig.survive_network("Redis", &proxy, NetworkFault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_reset_and_refused() {
    let (_redis, proxy, rig) = start(6403).await;
    rig.survive_network("Redis", &proxy, NetworkFault::ResetAndRefused)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_left_half_open() {
    let (_redis, proxy, rig) = start(6407).await;
    rig.survive_network("Redis", &proxy, NetworkFault::HalfOpen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_on_every_store_call() {
    let (_redis, proxy, rig) = start(6404).await;
    rig.survive_network("Redis", &proxy, NetworkFault::Latency(Duration::from_millis(200)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty() {
    let (redis, _proxy, rig) = start(6405).await;
    rig.survive_losing(
        "Redis restarted empty (down 3 s)",
        || redis.stop(),
        || redis.launch(),
        Losing::TheStore,
    )
    .await;
}

/// Only the supervisor loses Redis, for twice its lease: its devices stay
/// connected to it, the control plane sees their leases lapse (commands to
/// them meanwhile end `device_offline` at once), and once the network heals
/// the supervisor finds its leases gone and claims every device again
/// without closing a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_cut_off_from_redis_past_its_lease() {
    support::init_tracing();
    let redis = OwnRedis::start(6406);
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let lease = Duration::from_secs(3);
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let rig = FaultRig::start_with(FaultSystem {
        lease_ttl: lease,
        supervisor_store: store_on(RedisStoreConfig::standalone(format!("redis://{}/", proxy.addr()))).await,
        control_store: store_on(RedisStoreConfig::standalone(format!("redis://{}/", redis.addr()))).await,
        supervisor_bus: bus.clone(),
        control_bus: bus,
    })
    .await
    .lasting(lease * 2);
    rig.survive(
        "supervisor cut off from Redis 6 s, past its 3 s leases; devices stay connected",
        || proxy.blackhole(true),
        || proxy.blackhole(false),
    )
    .await;
}

/// The primary is killed (SIGKILL) and Sentinel promotes the replica; the
/// fault ends when Sentinel names the replica (it acts 1 s after the primary
/// stops answering). The replica has what the primary had passed on, so the
/// records of commands survive, unlike a Redis restarted empty, and every
/// promise is checked as in the other scenarios.
///
/// What cannot hold, and is not hidden here: replication is asynchronous, so
/// a write the primary acknowledged but had not yet sent to the replica dies
/// with it. A command whose record was written in that window would end
/// `NotFound` (counted as not ended), and a state change written in it would
/// be undone. On loopback the window is the time between Redis answering the
/// client and writing its replication stream, within one event-loop turn;
/// no run has hit it yet, and this test would fail, naming the command, if
/// one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_primary_killed_replica_promoted_by_sentinel() {
    let set = OwnSentinelSet::start(6417, 6418, 26417, "opamp-faults");
    let rig = under_sentinel(&set).await;
    let killed = Mutex::new(None);
    rig.survive(
        "Redis primary killed, replica promoted by Sentinel",
        || {
            set.primary.kill();
            *killed.lock().unwrap() = Some(Instant::now());
        },
        || {
            set.wait_for_primary(set.replica.port, Duration::from_secs(30));
            let killed = killed.lock().unwrap().expect("the primary was killed");
            println!(
                "Sentinel promoted the replica {:.2} s after the kill",
                killed.elapsed().as_secs_f64()
            );
        },
    )
    .await;
}

/// A planned failover (`SENTINEL FAILOVER`): the primary stays up, and
/// Sentinel does not stop it taking writes while it promotes the replica
/// (about a second before it announces the switch, `+switch-master`, and
/// seconds more before it demotes the old primary): without more, what the
/// old primary takes then is lost (in our runs 130–160 command records of
/// ~1,300, and 40 commands applied twice). With `min-replicas-to-write 1`
/// the old primary refuses writes (`NOREPLICAS`) from the moment its replica
/// leaves to be promoted; the store takes that as "ask Sentinel again", and
/// every promise holds, but for a window the guard cannot close: a write the
/// old primary applied and sent on after its replica had stopped reading
/// (promoted between the two) is acknowledged and lost. One run in about
/// seven here lost a few command records that way (3 of 244): they are
/// counted apart in the row ([`Losing::InTheFailoverWindow`]), not hidden.
/// Redis's `WAIT` after each record write would close the window, at a
/// round trip and a replication delay per write; it is not built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_primary_failed_over_by_sentinel_on_request() {
    let guarded = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"];
    let set = OwnSentinelSet::start_with(6412, 6413, 26412, "opamp-planned", &guarded);
    let rig = under_sentinel(&set).await;
    rig.survive_losing(
        "Redis primary failed over on request (SENTINEL FAILOVER, min-replicas-to-write 1)",
        || {
            set.sentinel.wait_for_cli(
                &["sentinel", "failover", &set.name],
                Duration::from_secs(10),
                "Sentinel started a failover",
                |reply| reply.trim() == "OK",
            );
        },
        || set.wait_for_primary(set.replica.port, Duration::from_secs(30)),
        Losing::InTheFailoverWindow,
    )
    .await;
}
