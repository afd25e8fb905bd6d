//! The runtimes under PostgreSQL faults: each scenario runs a PostgreSQL
//! cluster of its own (on a port of its own, so that pausing or restarting
//! it disturbs no other test) behind a TCP fault proxy ([`FaultProxy`]), and
//! the fault suite's system over the PostgreSQL store ([`FaultRig`], which
//! checks the promises and prints the scenario's row of the table in
//! `docs/operations.md`; run with `--nocapture`).
//!
//! Needs PostgreSQL 15 in `/usr/lib/postgresql/15/bin`
//! (`scripts/services/postgres` installs it); ports 5450–5455.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::faults::{FaultRig, NetworkFault};
use opamp_core::testkit::proxy::FaultProxy;
use opamp_core::{Bus, Store};
use opamp_store::postgres::{PostgresConfig, PostgresStore};
use support::postgres::OwnPostgres;

mod support;

/// The store's wait for a connection, and for an answer: a server that
/// accepts none, or a connection gone silent, shows as unavailable this soon.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A PostgreSQL of the scenario's own on `port`, the proxy in front of it,
/// and the rig over the PostgreSQL store reached through the proxy.
async fn start(port: u16) -> (OwnPostgres, FaultProxy, FaultRig) {
    support::init_tracing();
    let postgres = OwnPostgres::start(port);
    let proxy = FaultProxy::start(postgres.addr()).await.unwrap();
    let config = PostgresConfig::new(OwnPostgres::url_via(proxy.addr()))
        .with_schema("faults")
        .with_max_connections(8)
        .with_acquire_timeout(TIMEOUT)
        .with_response_timeout(TIMEOUT);
    let store = PostgresStore::connect(&config)
        .await
        .expect("the scenario's PostgreSQL answers");
    store.migrate().await.expect("migrating the scenario's schema");
    let store: Arc<dyn Store> = Arc::new(store);
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let rig = FaultRig::start(store, bus.clone(), bus).await;
    (postgres, proxy, rig)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_postmaster_and_backends() {
    let (postgres, _proxy, rig) = start(5450).await;
    rig.survive(
        "PostgreSQL paused (SIGSTOP, postmaster and backends) 3 s",
        || postgres.signal("-STOP"),
        || postgres.signal("-CONT"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_blackholed_by_the_network() {
    let (_postgres, proxy, rig) = start(5451).await;
    rig.survive_network("PostgreSQL", &proxy, NetworkFault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_reset_and_refused() {
    let (_postgres, proxy, rig) = start(5452).await;
    rig.survive_network("PostgreSQL", &proxy, NetworkFault::ResetAndRefused)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_left_half_open() {
    let (_postgres, proxy, rig) = start(5455).await;
    rig.survive_network("PostgreSQL", &proxy, NetworkFault::HalfOpen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_on_every_postgres_call() {
    let (_postgres, proxy, rig) = start(5453).await;
    rig.survive_network("PostgreSQL", &proxy, NetworkFault::Latency(Duration::from_millis(200)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart_keeping_its_data() {
    let (postgres, _proxy, rig) = start(5454).await;
    rig.survive(
        "PostgreSQL restarted (pg_ctl restart -m fast, data kept)",
        || postgres.restart(),
        || {},
    )
    .await;
}
