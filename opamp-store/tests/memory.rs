//! The memory store against the store conformance suite and the rollout
//! and runtime scenarios, and what only it has.

use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::store::StoreFixture;
use opamp_core::{Bus, DeviceId, ManualClock, RoutingStore, SupervisorId};
use opamp_store::memory::MemoryStore;

async fn fixture() -> StoreFixture {
    let clock = Arc::new(ManualClock::starting_now());
    StoreFixture::new(Arc::new(MemoryStore::with_clock(clock.clone())), clock)
}

opamp_core::store_conformance!(fixture);

async fn bus() -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new())
}

opamp_core::rollout_scenarios!(fixture, bus);
opamp_core::runtime_scenarios!(fixture, bus);

#[tokio::test]
async fn purge_expired_drops_only_lapsed_leases() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = MemoryStore::with_clock(clock.clone());
    let s1 = SupervisorId::new("s1").unwrap();
    let short: Vec<DeviceId> = (0..100).map(|n| DeviceId::new(format!("short-{n}")).unwrap()).collect();
    let long: Vec<DeviceId> = (0..10).map(|n| DeviceId::new(format!("long-{n}")).unwrap()).collect();
    for d in &short {
        store.claim(d, &s1, Duration::from_secs(10)).await.unwrap();
    }
    for d in &long {
        store.claim(d, &s1, Duration::from_secs(60)).await.unwrap();
    }
    assert_eq!(store.purge_expired(), 0, "nothing has lapsed yet");

    clock.advance(Duration::from_secs(10));
    // Touching a lapsed lease reclaims it on the spot.
    assert!(!store.release(&short[0], &s1).await.unwrap());
    assert_eq!(
        store.renew(&s1, &short[1..2], Duration::from_secs(10)).await.unwrap(),
        vec![short[1]]
    );
    assert_eq!(store.purge_expired(), 98);
    assert_eq!(store.purge_expired(), 0);

    let owners = store.lookup_many(&long).await.unwrap();
    assert!(owners.iter().all(|owner| *owner == Some(s1)), "{owners:?}");
}
