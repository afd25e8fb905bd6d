//! The runtimes under Redis faults, injected into a real Redis process and
//! real connections: each scenario runs a Redis of its own (on a port of its
//! own, so that pausing or restarting it disturbs no other test) behind a
//! TCP fault proxy ([`FaultProxy`]), and the fault suite's system over the
//! Redis store ([`FaultRig`], which checks the promises and prints the
//! scenario's row of the table in `docs/operations.md`; run with
//! `--nocapture`).
//!
//! Needs `redis-server` (`scripts/services/redis` installs it).

use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::faults::{FaultRig, NetworkFault};
use opamp_core::testkit::proxy::FaultProxy;
use opamp_core::{Bus, Store};
use opamp_store::redis::{RedisStore, RedisStoreConfig};
use support::OwnRedis;

mod support;

/// The store's wait for a reply: a paused or blackholed Redis shows as a timeout this soon.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A Redis of the scenario's own on `port`, the proxy in front of it, and
/// the rig over the Redis store reached through the proxy.
async fn start(port: u16) -> (OwnRedis, FaultProxy, FaultRig) {
    support::init_tracing();
    let redis = OwnRedis::start(port);
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let config = RedisStoreConfig::standalone(format!("redis://{}/", proxy.addr()))
        .key_prefix("faults:")
        .response_timeout(RESPONSE_TIMEOUT);
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(config).await.expect("the scenario's Redis answers"));
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let rig = FaultRig::start(store, bus.clone(), bus).await;
    (redis, proxy, rig)
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
        true,
    )
    .await;
}
