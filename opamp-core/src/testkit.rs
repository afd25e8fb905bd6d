//! Conformance suites: what every backend must do, written once.
//!
//! Each suite is a set of plain async functions taking a fixture, plus a
//! macro that expands into one test per function, so a backend's test file is
//! a single line naming how to make a fixture:
//!
//! ```no_run
//! use std::sync::Arc;
//! use opamp_core::ManualClock;
//! use opamp_core::testkit::store::StoreFixture;
//! use opamp_store::memory::MemoryStore;
//!
//! /// A fresh store for every test; the suite moves its clock.
//! async fn fixture() -> StoreFixture {
//!     let clock = Arc::new(ManualClock::starting_now());
//!     StoreFixture::new(Arc::new(MemoryStore::with_clock(clock.clone())), clock)
//! }
//!
//! opamp_core::store_conformance!(fixture);
//! # fn main() {}
//! ```
//!
//! A backend is done when it passes every suite unchanged. Fixtures must be
//! independent (their own key prefix, schema or topic names), because the
//! tests run in parallel. A store runs the [`rollout`] scenarios too
//! ([`rollout_scenarios!`](crate::rollout_scenarios)): the control plane
//! driving rollouts on it, which leans on its cursors and leases.

pub mod bus;
pub mod failing;
pub mod faults;
#[cfg(feature = "fluent-bit")]
#[cfg_attr(docsrs, doc(cfg(feature = "fluent-bit")))]
pub mod fluent_bit;
pub mod fuzz;
pub mod proxy;
pub mod rollout;
pub mod runtime;
pub mod store;

use std::future::Future;
use std::time::{Duration, Instant};

/// Waits until `condition` holds, checking every few milliseconds; panics
/// with `what` if it does not hold within `within`. For conditions that
/// become true asynchronously: never sleep-and-hope.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not true within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs an agent for `hello` on its own task, reconnecting quickly (10 ms to
/// 200 ms backoff), until the returned sender fires or is dropped.
pub fn spawn_agent(
    connector: std::sync::Arc<dyn crate::AgentConnector>,
    hello: crate::transport::DeviceHello,
    applier: std::sync::Arc<dyn crate::runtime::agent::ConfigApplier>,
) -> (
    std::sync::Arc<crate::runtime::agent::Agent>,
    tokio::sync::oneshot::Sender<()>,
) {
    use crate::runtime::agent::{Agent, AgentConfig};
    let config = AgentConfig::new(hello).backoff(Duration::from_millis(10), Duration::from_millis(200));
    let agent = std::sync::Arc::new(Agent::new(config, connector, applier));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = std::sync::Arc::clone(&agent);
    tokio::spawn(async move {
        running
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (agent, stop)
}

/// A Fluent Bit configuration template of one file, `fluent-bit.conf`, whose
/// text names `version` (so that each version hashes apart), made `at`: the
/// template the runtime and rollout scenarios push.
pub fn fluent_bit_template(version: &str, at: crate::Timestamp) -> crate::ConfigTemplate {
    let agent_type = crate::AgentType::new("fluentbit").expect("a valid literal agent type");
    let version_id = crate::ConfigVersion::new(version).expect("a valid version for a test template");
    let bundle = crate::ConfigBundle::new()
        .with_file(
            "fluent-bit.conf",
            crate::ConfigFile::new("text/plain", format!("[SERVICE]\n    # {version}\n")),
        )
        .expect("a valid file name");
    crate::ConfigTemplate::new(crate::ConfigRef::new(agent_type, version_id), bundle, "test", at)
}
