//! Conformance suites: what every backend must do, written once.
//!
//! Each suite is a set of plain async functions taking a fixture, plus a
//! macro that expands into one test per function, so a backend's test file is
//! a single line naming how to make a fixture:
//!
//! ```ignore
//! async fn fixture() -> opamp_core::testkit::store::StoreFixture { /* a fresh store */ }
//! opamp_core::store_conformance!(fixture);
//! ```
//!
//! A backend is done when it passes every suite unchanged. Fixtures must be
//! independent (their own key prefix, schema or topic names), because the
//! tests run in parallel.

pub mod bus;
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
