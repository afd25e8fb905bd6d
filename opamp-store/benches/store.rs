//! Memory store throughput on one core, beside a bare `RwLock<HashMap>` doing
//! the same lookups, so the ratio shows what the trait, the boxed future and
//! the lease clock cost.
//!
//! `cargo bench -p opamp-store --bench store`
#![allow(missing_docs, reason = "criterion_group! makes an undocumented pub fn")]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opamp_core::{Clock, CoarseClock, DeviceId, ManualClock, RoutingStore, SupervisorId};
use opamp_store::memory::MemoryStore;
use tokio::runtime::Runtime;

/// How many devices the fleet benchmarks spread over.
const FLEET: usize = 100_000;
/// Operations per measured iteration, so criterion's own overhead stays out of the figures.
const BATCH: usize = 1_000;
const TTL: Duration = Duration::from_secs(300);

/// A single-threaded runtime: every figure is for one core.
fn one_core() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime")
}

fn fleet() -> Vec<DeviceId> {
    (0..FLEET)
        .map(|n| DeviceId::new(format!("device-{n:07}")).expect("valid device id"))
        .collect()
}

/// The fleet in a random order (xorshift: no dependency, the same order every run).
fn shuffled(devices: &[DeviceId]) -> Vec<DeviceId> {
    let mut order = devices.to_vec();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..order.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
}

/// Hands out the index ranges of successive `BATCH`-sized slices of a fleet, wrapping around.
#[derive(Default)]
struct Batches {
    next: usize,
}

impl Batches {
    fn next(&mut self) -> std::ops::Range<usize> {
        if self.next + BATCH > FLEET {
            self.next = 0;
        }
        self.next += BATCH;
        self.next - BATCH..self.next
    }
}

fn lookups(c: &mut Criterion) {
    let runtime = one_core();
    let devices = fleet();
    let supervisor = SupervisorId::new("supervisor-1").expect("valid supervisor id");
    let store = MemoryStore::new();
    let mut baseline = HashMap::new();
    runtime.block_on(async {
        for d in &devices {
            store.claim(d, &supervisor, TTL).await.expect("claim");
            baseline.insert(*d, supervisor);
        }
    });
    let baseline = RwLock::new(baseline);
    let hot = devices[FLEET / 2];
    let order = &shuffled(&devices);
    let mut spread = Batches::default();

    let mut group = c.benchmark_group("lookup");
    group.throughput(Throughput::Elements(BATCH as u64));
    let store = &store;
    group.bench_function("memory, one hot device", |b| {
        b.to_async(&runtime).iter(|| async move {
            for _ in 0..BATCH {
                black_box(store.lookup(black_box(&hot)).await.expect("lookup"));
            }
        })
    });
    group.bench_function("baseline RwLock<HashMap>, one hot device", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(baseline.read().expect("lock").get(black_box(&hot)).copied());
            }
        })
    });
    // The same lookups with each clock the store can judge leases by: the
    // system clock (read on every lookup), a coarse clock (the wall clock read
    // from memory, what a host after throughput uses), and a manual clock
    // (never moves: the floor, with no clock cost at all).
    let coarse: Arc<dyn Clock> = Arc::new(CoarseClock::new(Duration::from_millis(1)).expect("a clock thread"));
    let manual: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    for (name, clock) in [("system", None), ("coarse", Some(coarse)), ("manual", Some(manual))] {
        let with_clock = clock.map(|clock| {
            let other = MemoryStore::with_clock(clock);
            runtime.block_on(async {
                for d in &devices {
                    other.claim(d, &supervisor, TTL).await.expect("claim");
                }
            });
            other
        });
        let store = with_clock.as_ref().unwrap_or(store);
        group.bench_function(format!("memory, {name} clock, 100k devices at random"), |b| {
            b.to_async(&runtime).iter(|| {
                let batch = &order[spread.next()];
                async move {
                    for d in batch {
                        black_box(store.lookup(d).await.expect("lookup"));
                    }
                }
            })
        });
    }
    group.bench_function("baseline RwLock<HashMap>, 100k devices at random", |b| {
        b.iter(|| {
            for d in &order[spread.next()] {
                black_box(baseline.read().expect("lock").get(d).copied());
            }
        })
    });
    group.bench_function("memory lookup_many of 1000, 100k devices at random", |b| {
        b.to_async(&runtime).iter(|| {
            let batch = &order[spread.next()];
            async move { black_box(store.lookup_many(batch).await.expect("lookup_many")) }
        })
    });
    group.finish();
}

fn claims(c: &mut Criterion) {
    let runtime = one_core();
    let devices = fleet();
    let supervisors = [SupervisorId::new("s1"), SupervisorId::new("s2")].map(|s| s.expect("valid supervisor id"));
    let store = MemoryStore::new();
    let order = &shuffled(&devices);
    let mut spread = Batches::default();
    let mut round = 0usize;
    let store = &store;

    let mut group = c.benchmark_group("claim");
    group.throughput(Throughput::Elements(BATCH as u64));
    // Alternating supervisors makes every claim after the first pass a takeover.
    group.bench_function("memory, 100k devices at random", |b| {
        b.to_async(&runtime).iter(|| {
            round += 1;
            let supervisor = supervisors[round % 2];
            let batch = &order[spread.next()];
            async move {
                for d in batch {
                    black_box(store.claim(d, &supervisor, TTL).await.expect("claim"));
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, lookups, claims);
criterion_main!(benches);
