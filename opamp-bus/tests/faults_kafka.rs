//! The runtimes under broker faults: commands travel on the Kafka bus
//! between a control plane and a supervisor (over a memory store: the bus is
//! what is under test), through a tansu broker of the scenario's own (ports
//! 9110–9112, sqlite storage in a folder of its own), and the fault suite's
//! system checks the promises ([`FaultRig`], which prints the scenario's row
//! of the table in `docs/operations.md`; run with `--nocapture`).
//!
//! Needs tansu 0.6.0 (`scripts/services/kafka` builds it once).
#![cfg(feature = "kafka")]

use std::sync::Arc;
use std::time::Duration;

use opamp_bus::kafka::KafkaBus;
use opamp_core::testkit::faults::{FaultRig, NetworkFault};
use opamp_core::testkit::proxy::FaultProxy;
use opamp_core::{Bus, Store};
use opamp_store::memory::MemoryStore;
use support::{OwnBroker, config_on};

mod support;

/// A supervisor's bus and a control plane's (two clients, as in two
/// processes), on topics of their own at `brokers`, the topics made; the
/// rig over them.
async fn rig(brokers: &str) -> FaultRig {
    support::init_tracing();
    // As the store suites shorten their timeouts to 1 s: a connection gone
    // silent is given up well within a command's deadline (the default,
    // 10 s, outlasts it, and the commands sent meanwhile time out).
    let config = config_on(brokers).with_request_timeout(Duration::from_secs(2));
    let control = KafkaBus::new(config.clone()).expect("a valid config");
    control.ensure_topics().await.expect("making the scenario's topics");
    let supervisor: Arc<dyn Bus> = Arc::new(KafkaBus::new(config).expect("a valid config"));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    FaultRig::start(store, supervisor, Arc::new(control)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarts_on_its_data() {
    let broker = tokio::task::spawn_blocking(|| OwnBroker::start(9110)).await.unwrap();
    let rig = rig(&broker.brokers()).await;
    rig.survive(
        "Kafka broker (tansu) killed and started again on its data (down 3 s)",
        || broker.kill(),
        || broker.run("start"),
    )
    .await;
    tokio::task::spawn_blocking(move || drop(broker)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_to_the_broker_are_blackholed() {
    survive_network_fault(9111, NetworkFault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_to_the_broker_are_left_half_open() {
    survive_network_fault(9112, NetworkFault::HalfOpen).await;
}

/// `fault` between both clients and a broker of the scenario's own on `port`.
async fn survive_network_fault(port: u16, fault: NetworkFault) {
    // Clients connect where the broker says it is, whatever address they
    // bootstrapped from: with one advertised address the supervisor's and
    // the control plane's connections both go through the proxy, and the
    // fault holds both.
    let proxy = FaultProxy::start(([127, 0, 0, 1], port).into()).await.unwrap();
    let advertised = proxy.addr().port();
    let broker = tokio::task::spawn_blocking(move || OwnBroker::start_advertising(port, advertised))
        .await
        .unwrap();
    let rig = rig(&proxy.addr().to_string()).await;
    rig.survive_network("the Kafka broker", &proxy, fault).await;
    tokio::task::spawn_blocking(move || drop(broker)).await.unwrap();
}
