//! The store conformance suite: what every [`Store`] backend must do.
//!
//! Each case is a plain async function taking a [`StoreFixture`]: a fresh,
//! empty store and the [`ManualClock`] it judges leases by. Cases move time
//! with [`ManualClock::advance`] and never sleep. [`routing_model`] and
//! [`status_model`] drive random operation sequences against a small
//! reference model. [`store_conformance!`](crate::store_conformance) turns all
//! of them into tests: the one line a backend's test file needs.
//!
//! The lease boundary every backend keeps: a lease claimed (or renewed) at
//! `t` for `ttl` is held at every time before `t + ttl` and lapsed from
//! `t + ttl` on. Listings are compared as sets; their order is the backend's.
//!
//! A new case is a `pub async fn` here and a line in the macro's list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

mod revocation;

pub use revocation::*;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::command::{Command, CommandKind, CommandOutcome, CorrelationId};
use crate::config::{ConfigBundle, ConfigFile, ConfigRef, ConfigTemplate};
use crate::error::{Error, Result};
use crate::id::{AgentType, ConfigVersion, DeviceId, SupervisorId};
use crate::status::{DeviceStatus, Labels, StatusPatch};
use crate::store::Cursor;
use crate::store::{
    Claim, ConfigStoreExt, MAX_LEASE_TTL, MIN_LEASE_TTL, Page, PageRequest, RoutingStoreExt, StatusStoreExt, Store,
    SupervisorLoad,
};
use crate::time::{Clock, ManualClock, Timestamp};
use crate::tracking::{CommandRecord, CommandState, Rollout, RolloutSpec, RolloutState};

/// What each case runs against: a fresh, empty store and its clock.
#[derive(Debug, Clone)]
pub struct StoreFixture {
    /// The store under test; empty, and not shared with any other fixture.
    pub store: Arc<dyn Store>,
    /// The clock `store` judges lease expiry by.
    pub clock: Arc<ManualClock>,
}

impl StoreFixture {
    /// A fixture for `store`, which must judge leases by `clock`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Self {
        StoreFixture { store, clock }
    }
}

/// Expands into one test per conformance case, plus the model-based tests.
///
/// `$fixture` names an `async fn() -> StoreFixture` that makes a fresh, empty
/// store each time it is called (its own key prefix or schema for a shared
/// server: the tests run in parallel). The tests land in a module named
/// `store_conformance` that glob-imports the calling module, so `$fixture`
/// may be a plain name or a `crate::` path (not `super::`). The calling crate
/// needs `tokio` with the `macros` and `rt-multi-thread` features among its
/// dev-dependencies.
///
/// ```no_run
/// async fn fixture() -> opamp_core::testkit::store::StoreFixture {
///     let clock = std::sync::Arc::new(opamp_core::ManualClock::starting_now());
///     let store = opamp_store::memory::MemoryStore::with_clock(clock.clone());
///     opamp_core::testkit::store::StoreFixture::new(std::sync::Arc::new(store), clock)
/// }
///
/// opamp_core::store_conformance!(fixture);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! store_conformance {
    ($fixture:path) => {
        $crate::store_conformance!(@cases $fixture;
            claim_acquires_a_free_device,
            claim_by_the_holder_renews,
            claim_by_another_takes_over,
            lease_lapses_after_its_ttl,
            claim_after_lapse_is_acquired,
            invalid_ttls_are_rejected,
            renew_extends_own_leases,
            renew_reports_lost_leases_and_leaves_them_alone,
            release_frees_own_lease,
            release_is_fenced,
            lookup_many_answers_in_order,
            concurrent_claims_of_one_device_have_one_winner,
            concurrent_claims_of_distinct_devices,
            renew_racing_a_takeover_never_overwrites_it,
            status_of_an_unknown_device_is_none,
            first_patch_creates_the_status,
            patches_change_only_the_fields_they_set,
            fenced_patches_of_a_device_without_status_are_not_found,
            fenced_patches_apply_only_for_the_named_supervisor,
            leased_patches_apply_only_for_the_lease_holder,
            leased_writes_racing_claims_end_naming_the_holder,
            presence_moves_the_device_between_indexes,
            paging_lists_every_device_exactly_once,
            paging_while_the_set_changes,
            concurrent_presence_changes_keep_the_indexes_consistent,
            put_template_is_idempotent,
            put_template_refuses_other_content,
            templates_round_trip,
            template_versions_are_oldest_first,
            latest_points_at_stored_templates,
            desired_config_names_stored_templates,
            devices_do_not_interfere,
            every_device_that_was_online_is_listed,
            command_records_round_trip,
            command_ids_are_recorded_once,
            command_records_change_only_while_pending,
            watches_are_told_of_commands_ending,
            overdue_commands_are_the_pending_ones_past_their_deadline,
            concurrent_completions_have_one_winner,
            rollout_writes_follow_revisions,
            rollouts_are_listed_newest_first,
            listing_cursors_from_elsewhere_are_refused,
            rollout_driver_leases_have_one_holder,
            concurrent_rollout_driver_claims_have_one_winner,
            the_first_generation_begun_stays,
            concurrent_generations_have_one_winner,
            revocations_round_trip,
            revocations_are_listed_once,
            revocations_leave_leases_and_statuses_alone,
        );
    };
    (@cases $fixture:path; $($case:ident),+ $(,)?) => {
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = $fixture().await;
                    $crate::testkit::store::$case(&f).await;
                }
            )+

            #[test]
            fn routing_model() {
                $crate::testkit::store::routing_model($fixture);
            }

            #[test]
            fn status_model() {
                $crate::testkit::store::status_model($fixture);
            }
        }
    };
}

/// The TTL the cases claim with unless they say otherwise.
const TTL: Duration = Duration::from_secs(10);
const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).expect("the suite's device ids are valid")
}

fn supervisor(name: &str) -> SupervisorId {
    SupervisorId::new(name).expect("the suite's supervisor ids are valid")
}

fn numbered_devices(prefix: &str, count: usize) -> Vec<DeviceId> {
    (0..count).map(|n| device(&format!("{prefix}-{n:05}"))).collect()
}

fn numbered_supervisors(count: usize) -> Vec<SupervisorId> {
    (0..count).map(|n| supervisor(&format!("s{n}"))).collect()
}

#[track_caller]
fn expect_err<T: Debug>(result: Result<T>, what: &str) -> Error {
    match result {
        Ok(value) => panic!("{what}: expected an error, got Ok({value:?})"),
        Err(err) => err,
    }
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

/// A claim of a device nobody holds is `Acquired`, and lookups then name the claimant.
pub async fn claim_acquires_a_free_device(f: &StoreFixture) {
    let (d1, s1) = (device("d1"), supervisor("s1"));
    assert_eq!(f.store.lookup(&d1).await.unwrap(), None);
    assert_eq!(f.store.claim(&d1, &s1, TTL).await.unwrap(), Claim::Acquired);
    assert_eq!(f.store.lookup(&d1).await.unwrap(), Some(s1));
    assert_eq!(f.store.lookup_many(&[d1]).await.unwrap(), vec![Some(s1)]);
    assert_eq!(f.store.owner(&d1).await.unwrap(), s1);
}

/// A claim by the holder is `Renewed` and sets the lease to `ttl` from now, longer or shorter.
pub async fn claim_by_the_holder_renews(f: &StoreFixture) {
    let (d1, s1) = (device("d1"), supervisor("s1"));
    assert_eq!(f.store.claim(&d1, &s1, TTL).await.unwrap(), Claim::Acquired);
    f.clock.advance(TTL - SECOND);
    assert_eq!(f.store.claim(&d1, &s1, TTL).await.unwrap(), Claim::Renewed);
    f.clock.advance(TTL - MS);
    assert_eq!(
        f.store.lookup(&d1).await.unwrap(),
        Some(s1),
        "held past the first lease's end"
    );

    assert_eq!(f.store.claim(&d1, &s1, SECOND).await.unwrap(), Claim::Renewed);
    f.clock.advance(SECOND);
    assert_eq!(
        f.store.lookup(&d1).await.unwrap(),
        None,
        "a shorter claim shortens the lease"
    );
}

/// A claim of a device another supervisor holds is `TakenOver`, naming it; the new lease runs from the takeover.
pub async fn claim_by_another_takes_over(f: &StoreFixture) {
    let (d1, s1, s2) = (device("d1"), supervisor("s1"), supervisor("s2"));
    f.store.claim(&d1, &s1, TTL).await.unwrap();
    f.clock.advance(SECOND * 5);
    let claim = f.store.claim(&d1, &s2, TTL).await.unwrap();
    assert_eq!(claim, Claim::TakenOver { previous: s1 });
    assert_eq!(claim.previous_owner(), Some(&s1));
    assert_eq!(f.store.lookup(&d1).await.unwrap(), Some(s2));

    f.clock.advance(TTL - MS);
    assert_eq!(
        f.store.lookup(&d1).await.unwrap(),
        Some(s2),
        "s2's lease is its own, not s1's"
    );
    assert_eq!(
        f.store.claim(&d1, &s1, TTL).await.unwrap(),
        Claim::TakenOver { previous: s2 }
    );
}

/// A lease is held until `ttl` after its claim and lapsed from then on: lookups never return it.
pub async fn lease_lapses_after_its_ttl(f: &StoreFixture) {
    let (d1, d2, s1) = (device("d1"), device("d2"), supervisor("s1"));
    f.store.claim(&d1, &s1, TTL).await.unwrap();
    f.store.claim(&d2, &s1, TTL * 2).await.unwrap();

    f.clock.advance(TTL - MS);
    assert_eq!(f.store.lookup(&d1).await.unwrap(), Some(s1), "held 1 ms before the end");
    f.clock.advance(MS);
    assert_eq!(f.store.lookup(&d1).await.unwrap(), None, "lapsed at the end");
    assert_eq!(f.store.lookup_many(&[d1, d2]).await.unwrap(), vec![None, Some(s1)]);
    assert!(matches!(f.store.owner(&d1).await, Err(Error::NotFound { .. })));

    f.clock.advance(TTL * 100);
    assert_eq!(f.store.lookup_many(&[d1, d2]).await.unwrap(), vec![None, None]);
}

/// A claim after the lease lapsed is `Acquired`, whoever held it: a lapsed lease owns nothing.
pub async fn claim_after_lapse_is_acquired(f: &StoreFixture) {
    let (d1, d2, s1, s2) = (device("d1"), device("d2"), supervisor("s1"), supervisor("s2"));
    f.store.claim(&d1, &s1, TTL).await.unwrap();
    f.store.claim(&d2, &s1, TTL).await.unwrap();
    f.clock.advance(TTL);
    assert_eq!(f.store.claim(&d1, &s2, TTL).await.unwrap(), Claim::Acquired);
    assert_eq!(f.store.claim(&d2, &s1, TTL).await.unwrap(), Claim::Acquired);
    assert_eq!(f.store.lookup_many(&[d1, d2]).await.unwrap(), vec![Some(s2), Some(s1)]);
}

/// TTLs outside `MIN_LEASE_TTL..=MAX_LEASE_TTL` are `InvalidInput` for claim and renew, and change nothing.
pub async fn invalid_ttls_are_rejected(f: &StoreFixture) {
    let (d1, d2, s1, s2) = (device("d1"), device("d2"), supervisor("s1"), supervisor("s2"));
    f.store.claim(&d2, &s1, TTL).await.unwrap();
    for ttl in [Duration::ZERO, MAX_LEASE_TTL + MS, Duration::MAX] {
        let err = expect_err(f.store.claim(&d1, &s1, ttl).await, "claim with an invalid TTL");
        assert!(matches!(err, Error::InvalidInput { .. }), "claim with {ttl:?}: {err:?}");
        let err = expect_err(f.store.claim(&d2, &s2, ttl).await, "takeover with an invalid TTL");
        assert!(
            matches!(err, Error::InvalidInput { .. }),
            "takeover with {ttl:?}: {err:?}"
        );
        let err = expect_err(f.store.renew(&s1, &[d2], ttl).await, "renew with an invalid TTL");
        assert!(matches!(err, Error::InvalidInput { .. }), "renew with {ttl:?}: {err:?}");
    }
    assert_eq!(f.store.lookup(&d1).await.unwrap(), None);
    f.clock.advance(TTL - MS);
    assert_eq!(f.store.lookup(&d2).await.unwrap(), Some(s1), "the lease is as it was");

    assert_eq!(f.store.claim(&d1, &s1, MIN_LEASE_TTL).await.unwrap(), Claim::Acquired);
    assert_eq!(f.store.claim(&d1, &s1, MAX_LEASE_TTL).await.unwrap(), Claim::Renewed);
    f.clock.advance(MAX_LEASE_TTL - MS);
    assert_eq!(
        f.store.lookup(&d1).await.unwrap(),
        Some(s1),
        "the longest lease is kept whole"
    );
}

/// `renew` extends every lease the supervisor holds to `ttl` from now and reports none lost.
pub async fn renew_extends_own_leases(f: &StoreFixture) {
    let s1 = supervisor("s1");
    let devices = numbered_devices("d", 50);
    for d in &devices {
        f.store.claim(d, &s1, TTL).await.unwrap();
    }
    assert_eq!(f.store.renew(&s1, &[], TTL).await.unwrap(), Vec::<DeviceId>::new());

    f.clock.advance(TTL - SECOND);
    assert_eq!(f.store.renew(&s1, &devices, TTL).await.unwrap(), Vec::<DeviceId>::new());
    f.clock.advance(TTL - MS);
    let owners = f.store.lookup_many(&devices).await.unwrap();
    assert!(owners.iter().all(|owner| *owner == Some(s1)), "{owners:?}");
    f.clock.advance(MS);
    let owners = f.store.lookup_many(&devices).await.unwrap();
    assert!(
        owners.iter().all(Option::is_none),
        "renewed leases lapse too: {owners:?}"
    );
}

/// `renew` reports the devices the supervisor no longer holds (taken over,
/// lapsed, released, never claimed) and leaves their leases as they are.
pub async fn renew_reports_lost_leases_and_leaves_them_alone(f: &StoreFixture) {
    let (s1, s2) = (supervisor("s1"), supervisor("s2"));
    let [kept, taken, never, lapsed, released] = ["kept", "taken", "never", "lapsed", "released"].map(device);
    f.store.claim(&kept, &s1, TTL).await.unwrap();
    f.store.claim(&taken, &s1, TTL).await.unwrap();
    f.store.claim(&lapsed, &s1, SECOND).await.unwrap();
    f.store.claim(&released, &s1, TTL).await.unwrap();
    f.store.claim(&taken, &s2, TTL).await.unwrap();
    assert!(f.store.release(&released, &s1).await.unwrap());
    f.clock.advance(SECOND * 2);

    let all = [kept, taken, never, lapsed, released];
    let lost = f.store.renew(&s1, &all, TTL).await.unwrap();
    assert_eq!(sorted(lost), sorted(vec![taken, never, lapsed, released]));
    assert_eq!(
        f.store.lookup_many(&all).await.unwrap(),
        vec![Some(s1), Some(s2), None, None, None],
        "renew took nothing it had lost"
    );

    // Renewing another's lease leaves it alone: s2 tries to renew `kept`.
    assert_eq!(f.store.renew(&s2, &[kept], TTL * 10).await.unwrap(), vec![kept]);
    f.clock.advance(TTL - SECOND * 2);
    assert_eq!(
        f.store.lookup(&taken).await.unwrap(),
        None,
        "s1's renew did not extend s2's lease"
    );
    assert_eq!(f.store.lookup(&kept).await.unwrap(), Some(s1));
    f.clock.advance(SECOND * 2);
    assert_eq!(
        f.store.lookup(&kept).await.unwrap(),
        None,
        "s2's renew did not extend s1's lease"
    );
}

/// `release` frees the holder's lease (`true`); the device is then free, and releasing again is `false`.
pub async fn release_frees_own_lease(f: &StoreFixture) {
    let (d1, s1, s2) = (device("d1"), supervisor("s1"), supervisor("s2"));
    f.store.claim(&d1, &s1, TTL).await.unwrap();
    assert!(f.store.release(&d1, &s1).await.unwrap());
    assert_eq!(f.store.lookup(&d1).await.unwrap(), None);
    assert!(!f.store.release(&d1, &s1).await.unwrap());
    assert_eq!(f.store.claim(&d1, &s2, TTL).await.unwrap(), Claim::Acquired);
}

/// `release` is fenced: another's lease, nobody's and the caller's own lapsed lease are left alone (`false`).
pub async fn release_is_fenced(f: &StoreFixture) {
    let (d1, d2, d3, s1, s2) = (
        device("d1"),
        device("d2"),
        device("d3"),
        supervisor("s1"),
        supervisor("s2"),
    );
    f.store.claim(&d1, &s1, TTL).await.unwrap();
    f.store.claim(&d1, &s2, TTL).await.unwrap();
    assert!(!f.store.release(&d1, &s1).await.unwrap(), "s1 lost d1 to s2");
    assert_eq!(f.store.lookup(&d1).await.unwrap(), Some(s2));
    assert!(!f.store.release(&d2, &s1).await.unwrap(), "nobody holds d2");

    f.store.claim(&d3, &s1, SECOND).await.unwrap();
    f.clock.advance(SECOND);
    assert!(!f.store.release(&d3, &s1).await.unwrap(), "s1's lease on d3 lapsed");
    assert_eq!(f.store.claim(&d3, &s1, TTL).await.unwrap(), Claim::Acquired);
}

/// `lookup_many` answers in input order, once per entry (repeats included), with
/// `None` for unknown and lapsed devices, and nothing for no input.
pub async fn lookup_many_answers_in_order(f: &StoreFixture) {
    let (s1, s2) = (supervisor("s1"), supervisor("s2"));
    let [a, b, c, unknown] = ["a", "b", "c", "unknown"].map(device);
    f.store.claim(&a, &s1, TTL).await.unwrap();
    f.store.claim(&b, &s2, TTL).await.unwrap();
    f.store.claim(&c, &s1, SECOND).await.unwrap();
    f.clock.advance(SECOND);

    assert_eq!(
        f.store.lookup_many(&[]).await.unwrap(),
        Vec::<Option<SupervisorId>>::new()
    );
    assert_eq!(
        f.store.lookup_many(&[b, unknown, a, c, b, a]).await.unwrap(),
        vec![Some(s2), None, Some(s1), None, Some(s2), Some(s1)]
    );
    assert_eq!(f.store.lookup(&unknown).await.unwrap(), None);
}

/// Sixteen supervisors claiming one device at once: one `Acquired`, fifteen
/// `TakenOver` forming one chain (each claimant replaced exactly one other),
/// and lookups agree on the last claimant.
pub async fn concurrent_claims_of_one_device_have_one_winner(f: &StoreFixture) {
    const CLAIMANTS: usize = 16;
    let d1 = device("contended");
    let supervisors = numbered_supervisors(CLAIMANTS);
    let start = Arc::new(Barrier::new(CLAIMANTS));
    let mut tasks = JoinSet::new();
    for s in supervisors.clone() {
        let (store, start) = (f.store.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            store.claim(&d1, &s, TTL).await.map(|claim| (s, claim))
        });
    }
    let mut acquired = 0;
    let mut replaced = BTreeSet::new();
    for claim in tasks.join_all().await {
        match claim.unwrap() {
            (_, Claim::Acquired) => acquired += 1,
            (s, Claim::TakenOver { previous }) => {
                assert_ne!(previous, s);
                assert!(replaced.insert(previous), "{previous} was taken over twice");
            }
            (s, Claim::Renewed) => panic!("{s} claimed once but renewed"),
        }
    }
    assert_eq!(acquired, 1);
    let owner = f.store.lookup(&d1).await.unwrap().expect("someone holds the device");
    assert!(!replaced.contains(&owner), "the owner {owner} was replaced");
    assert_eq!(replaced.len(), CLAIMANTS - 1);
    assert_eq!(f.store.lookup_many(&[d1, d1]).await.unwrap(), vec![Some(owner); 2]);
}

/// Sixteen supervisors claiming their own 64 devices at once: every claim is
/// `Acquired`, every lease is its claimant's, and renewing them loses none.
pub async fn concurrent_claims_of_distinct_devices(f: &StoreFixture) {
    const CLAIMANTS: usize = 16;
    let start = Arc::new(Barrier::new(CLAIMANTS));
    let mut tasks = JoinSet::new();
    for s in numbered_supervisors(CLAIMANTS) {
        let (store, start) = (f.store.clone(), start.clone());
        tasks.spawn(async move {
            let devices = numbered_devices(&format!("of-{s}"), 64);
            start.wait().await;
            for d in &devices {
                assert_eq!(store.claim(d, &s, TTL).await?, Claim::Acquired, "{d}");
            }
            Ok::<_, Error>((s, devices))
        });
    }
    for claimed in tasks.join_all().await {
        let (s, devices) = claimed.unwrap();
        let owners = f.store.lookup_many(&devices).await.unwrap();
        assert!(owners.iter().all(|owner| *owner == Some(s)), "{s}: {owners:?}");
        assert_eq!(f.store.renew(&s, &devices, TTL).await.unwrap(), Vec::<DeviceId>::new());
    }
}

/// A supervisor renewing a device while another takes it over, 64 times: every
/// takeover stands (renew never writes over it) and renew reports only taken devices.
pub async fn renew_racing_a_takeover_never_overwrites_it(f: &StoreFixture) {
    const ROUNDS: usize = 64;
    let (s1, s2) = (supervisor("s1"), supervisor("s2"));
    let (taken, kept) = (numbered_devices("taken", ROUNDS), numbered_devices("kept", ROUNDS));
    for d in taken.iter().chain(&kept) {
        f.store.claim(d, &s1, TTL).await.unwrap();
    }
    let round = Arc::new(AtomicUsize::new(0));
    let renewals = Arc::new(AtomicUsize::new(0));

    let renewer = {
        let (store, round, renewals) = (f.store.clone(), round.clone(), renewals.clone());
        let (taken, kept) = (taken.clone(), kept.clone());
        tokio::spawn(async move {
            let mut lost = BTreeSet::new();
            loop {
                let r = round.load(Ordering::SeqCst);
                if r == ROUNDS {
                    return Ok::<_, Error>(lost);
                }
                lost.extend(store.renew(&s1, &[taken[r], kept[r]], TTL).await?);
                renewals.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    for (r, d) in taken.iter().enumerate() {
        // Take the device over while the renewer is busy renewing it.
        let seen = renewals.load(Ordering::SeqCst);
        while renewals.load(Ordering::SeqCst) == seen && !renewer.is_finished() {
            tokio::task::yield_now().await;
        }
        let claim = f.store.claim(d, &s2, TTL).await;
        round.store(r + 1, Ordering::SeqCst);
        assert_eq!(claim.unwrap(), Claim::TakenOver { previous: s1 }, "{d}");
    }
    round.store(ROUNDS, Ordering::SeqCst);
    let lost = renewer.await.unwrap().unwrap();

    let taken_set: BTreeSet<DeviceId> = taken.iter().copied().collect();
    assert!(lost.is_subset(&taken_set), "renew lost devices nobody took: {lost:?}");
    let owners = f.store.lookup_many(&taken).await.unwrap();
    assert!(
        owners.iter().all(|owner| *owner == Some(s2)),
        "takeovers overwritten: {owners:?}"
    );
    let owners = f.store.lookup_many(&kept).await.unwrap();
    assert!(owners.iter().all(|owner| *owner == Some(s1)), "{owners:?}");
}

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

/// A device nothing was recorded for has no status, and is in no listing.
pub async fn status_of_an_unknown_device_is_none(f: &StoreFixture) {
    assert_eq!(f.store.status(&device("d1")).await.unwrap(), None);
    assert_eq!(listed(f, None, 10).await, Vec::<DeviceId>::new());
    assert_eq!(listed(f, Some(&supervisor("s1")), 10).await, Vec::<DeviceId>::new());
    assert_eq!(counts(f).await, BTreeMap::new());
}

/// The first patch creates the status: offline, no emission, and what the patch set.
pub async fn first_patch_creates_the_status(f: &StoreFixture) {
    let (d1, d2) = (device("d1"), device("d2"));
    f.store
        .update_status(&d1, &StatusPatch::new().emission(true))
        .await
        .unwrap();
    let mut expected = DeviceStatus::new(d1);
    expected.emission = true;
    assert_eq!(f.store.status(&d1).await.unwrap(), Some(expected));
    assert_eq!(f.store.status(&d2).await.unwrap(), None);
    assert_eq!(listed(f, None, 10).await, Vec::<DeviceId>::new(), "created offline");
}

/// A patch changes only the fields it sets, and every field reads back as written.
pub async fn patches_change_only_the_fields_they_set(f: &StoreFixture) {
    let (d1, s1) = (device("d1"), supervisor("s1"));
    let t1 = f.clock.now();
    let t2 = t1.saturating_add(Duration::from_millis(1_234));
    let hash = ConfigBundle::new().hash();
    let labels: Labels = [("site", "berlin-2"), ("ring", "canary")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let patches = [
        StatusPatch::new()
            .online(s1, t1)
            .emission(true)
            .config(version("v1.2.3"), Some(hash))
            .agent_type(agent("fluentbit"))
            .last_seen(t1)
            .labels(labels)
            .last_error(Some("config rejected: line 3".to_owned())),
        StatusPatch::new().last_seen(t2).last_error(None),
        StatusPatch::new().config(version("v1.2.4"), None).emission(false),
        StatusPatch::new().labels(Labels::new()),
        StatusPatch::new().offline(),
    ];
    let mut expected = DeviceStatus::new(d1);
    for (step, patch) in patches.iter().enumerate() {
        f.store.update_status(&d1, patch).await.unwrap();
        expected.apply(patch);
        assert_eq!(
            f.store.status(&d1).await.unwrap().as_ref(),
            Some(&expected),
            "after patch {step}"
        );
    }
    assert_eq!(expected.supervisor, Some(s1), "offline keeps the last supervisor");
    assert_eq!(expected.connected_at, Some(t1));
    assert_eq!(expected.agent_type, Some(agent("fluentbit")));
}

/// A fenced patch of a device that has no status at all (never recorded, or
/// lost with the store's data) is `NotFound` naming the device, not
/// `NotOwner`: nobody else owns it, and a supervisor must tell the two apart.
/// It creates nothing; a status that names nobody is still `NotOwner`.
pub async fn fenced_patches_of_a_device_without_status_are_not_found(f: &StoreFixture) {
    let (unknown, nameless, s1) = (device("unknown"), device("nameless"), supervisor("s1"));
    let err = expect_err(
        f.store
            .update_status(&unknown, &StatusPatch::new().emission(true).fenced_by(s1))
            .await,
        "fenced patch of a device without status",
    );
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("device unknown")),
        "{err:?}"
    );
    assert_eq!(
        f.store.status(&unknown).await.unwrap(),
        None,
        "a refused patch creates nothing"
    );
    assert!(
        !f.store.mark_offline(&unknown, &s1).await.unwrap(),
        "nothing to mark offline"
    );
    assert_eq!(f.store.status(&unknown).await.unwrap(), None);

    f.store
        .update_status(&nameless, &StatusPatch::new().emission(true))
        .await
        .unwrap();
    let err = expect_err(
        f.store
            .update_status(&nameless, &StatusPatch::new().emission(false).fenced_by(s1))
            .await,
        "fenced patch of a status that names no supervisor",
    );
    assert!(
        matches!(&err, Error::NotOwner(m) if m.device == nameless && m.supervisor == s1 && m.owner.is_none()),
        "{err:?}"
    );
}

/// A fenced patch applies while the status names the fence's supervisor (online
/// or not); otherwise it is `NotOwner` naming the owner, and nothing changes.
pub async fn fenced_patches_apply_only_for_the_named_supervisor(f: &StoreFixture) {
    let (d1, s1, s2) = (device("d1"), supervisor("s1"), supervisor("s2"));
    let at = f.clock.now();

    f.store
        .update_status(&d1, &StatusPatch::new().online(s2, at))
        .await
        .unwrap();
    let before = f.store.status(&d1).await.unwrap();
    let err = expect_err(
        f.store
            .update_status(&d1, &StatusPatch::new().offline().emission(true).fenced_by(s1))
            .await,
        "patch fenced by a supervisor that does not hold the device",
    );
    assert!(
        matches!(&err, Error::NotOwner(m) if m.device == d1 && m.supervisor == s1 && m.owner == Some(s2)),
        "{err:?}"
    );
    assert_eq!(f.store.status(&d1).await.unwrap(), before, "nothing changed");
    assert_eq!(listed(f, Some(&s2), 10).await, vec![d1], "nor the indexes");
    assert!(!f.store.mark_offline(&d1, &s1).await.unwrap());

    f.store
        .update_status(&d1, &StatusPatch::new().emission(true).fenced_by(s2))
        .await
        .unwrap();
    assert!(f.store.status(&d1).await.unwrap().unwrap().emission);
    assert!(f.store.mark_offline(&d1, &s2).await.unwrap());
    assert!(!f.store.status(&d1).await.unwrap().unwrap().is_online());

    // Offline, the status still names s2: s2's fence holds, s1's does not.
    f.store
        .update_status(&d1, &StatusPatch::new().emission(false).fenced_by(s2))
        .await
        .unwrap();
    let err = expect_err(
        f.store
            .update_status(&d1, &StatusPatch::new().online(s1, at).fenced_by(s1))
            .await,
        "patch fenced by s1 while the status names s2",
    );
    assert!(matches!(&err, Error::NotOwner(m) if m.owner == Some(s2)), "{err:?}");
    assert_eq!(listed(f, None, 10).await, Vec::<DeviceId>::new());
}

/// A patch conditional on the lease applies only while its supervisor holds
/// the device's lease (whatever the status names), creating the status if
/// there is none; otherwise it is `NotOwner` naming the lease's holder and
/// nothing changes. A patch may not carry a fence too.
pub async fn leased_patches_apply_only_for_the_lease_holder(f: &StoreFixture) {
    let (d1, s1, s2) = (device("d1"), supervisor("s1"), supervisor("s2"));
    let at = f.clock.now();
    let online = |s: SupervisorId| StatusPatch::new().online(s, at).leased_by(s);

    let err = expect_err(
        f.store.update_status(&d1, &online(s1)).await,
        "leased patch of a device nobody holds",
    );
    assert!(
        matches!(&err, Error::NotOwner(m) if m.device == d1 && m.supervisor == s1 && m.owner.is_none()),
        "{err:?}"
    );
    assert_eq!(
        f.store.status(&d1).await.unwrap(),
        None,
        "a refused patch creates nothing"
    );

    f.store.claim(&d1, &s1, TTL).await.unwrap();
    f.store.update_status(&d1, &online(s1)).await.unwrap();
    assert_indexes(f, &[(d1, s1)], &[s1, s2]).await;

    // s2 takes the lease: s1's condition fails, s2's holds although the status names s1.
    f.store.claim(&d1, &s2, TTL).await.unwrap();
    let before = f.store.status(&d1).await.unwrap();
    let err = expect_err(
        f.store
            .update_status(&d1, &StatusPatch::new().emission(true).leased_by(s1))
            .await,
        "leased patch of a supervisor that lost the lease",
    );
    assert!(matches!(&err, Error::NotOwner(m) if m.owner == Some(s2)), "{err:?}");
    assert_eq!(f.store.status(&d1).await.unwrap(), before, "nothing changed");
    f.store.update_status(&d1, &online(s2)).await.unwrap();
    assert_indexes(f, &[(d1, s2)], &[s1, s2]).await;

    // A lapsed lease holds nothing.
    f.clock.advance(TTL);
    let err = expect_err(
        f.store
            .update_status(&d1, &StatusPatch::new().emission(true).leased_by(s2))
            .await,
        "leased patch after the lease lapsed",
    );
    assert!(matches!(&err, Error::NotOwner(m) if m.owner.is_none()), "{err:?}");

    let both = StatusPatch::new().emission(true).fenced_by(s2).leased_by(s2);
    let err = expect_err(f.store.update_status(&d1, &both).await, "fenced and leased patch");
    assert!(
        matches!(&err, Error::InvalidInput { message } if message.contains("device d1")),
        "{err:?}"
    );
}

/// Supervisors registering one device at once, each claiming it and then
/// marking it online conditional on its lease: however the calls interleave,
/// the status ends up naming the supervisor that holds the lease.
pub async fn leased_writes_racing_claims_end_naming_the_holder(f: &StoreFixture) {
    const CLAIMANTS: usize = 4;
    let supervisors = numbered_supervisors(CLAIMANTS);
    let mut held = Vec::new();
    for round in 0..16 {
        let d = device(&format!("raced-{round}"));
        let start = Arc::new(Barrier::new(CLAIMANTS));
        let mut tasks = JoinSet::new();
        for s in supervisors.clone() {
            let (store, start, at) = (f.store.clone(), start.clone(), f.clock.now());
            tasks.spawn(async move {
                start.wait().await;
                store.claim(&d, &s, TTL).await?;
                match store
                    .update_status(&d, &StatusPatch::new().online(s, at).leased_by(s))
                    .await
                {
                    Ok(()) | Err(Error::NotOwner(_)) => Ok(()),
                    Err(err) => Err(err),
                }
            });
        }
        for result in tasks.join_all().await {
            result.unwrap();
        }
        let holder = f.store.lookup(&d).await.unwrap().expect("someone holds the device");
        let status = f.store.status(&d).await.unwrap().expect("the last claimant wrote");
        assert_eq!(status.supervisor, Some(holder), "round {round}");
        held.push((d, holder));
    }
    assert_indexes(f, &held, &supervisors).await;
}

/// Online under S, a device is in the online set and S's set only; online under
/// S2, it leaves S1's set; offline, it is in neither; other patches leave the
/// indexes be. `device_counts` follows.
pub async fn presence_moves_the_device_between_indexes(f: &StoreFixture) {
    let (d1, d2, s1, s2) = (device("d1"), device("d2"), supervisor("s1"), supervisor("s2"));
    let at = f.clock.now();
    let update = |d: DeviceId, patch: StatusPatch| async move { f.store.update_status(&d, &patch).await.unwrap() };

    update(d1, StatusPatch::new().online(s1, at)).await;
    assert_indexes(f, &[(d1, s1)], &[s1, s2]).await;

    update(d1, StatusPatch::new().emission(true).last_seen(at)).await;
    assert_indexes(f, &[(d1, s1)], &[s1, s2]).await;

    update(d1, StatusPatch::new().online(s2, at)).await;
    assert_indexes(f, &[(d1, s2)], &[s1, s2]).await;

    update(d2, StatusPatch::new().online(s1, at)).await;
    assert_indexes(f, &[(d1, s2), (d2, s1)], &[s1, s2]).await;

    update(d1, StatusPatch::new().offline()).await;
    assert_indexes(f, &[(d2, s1)], &[s1, s2]).await;
    update(d1, StatusPatch::new().offline()).await;
    assert_indexes(f, &[(d2, s1)], &[s1, s2]).await;

    update(d2, StatusPatch::new().online(s1, at)).await;
    update(d1, StatusPatch::new().online(s1, at)).await;
    assert_indexes(f, &[(d1, s1), (d2, s1)], &[s1, s2]).await;
    let mut paged = listed(f, Some(&s1), 1).await;
    paged.sort();
    assert_eq!(
        paged,
        vec![d1, d2],
        "one device per page, each once (in the backend's order)"
    );
}

/// 2,500 online devices under two supervisors, listed with pages of 7 to
/// `MAX_LIMIT`: every device exactly once, no page over its limit, the last
/// page without a cursor, and a listing resumed from any cursor finishing it.
pub async fn paging_lists_every_device_exactly_once(f: &StoreFixture) {
    const DEVICES: usize = 2_500;
    let (s1, s2, s3) = (supervisor("s1"), supervisor("s2"), supervisor("s3"));
    let all = numbered_devices("paged", DEVICES);
    let at = f.clock.now();
    let mut writers = JoinSet::new();
    for (part, chunk) in all.chunks(DEVICES / 8 + 1).enumerate() {
        let (store, chunk) = (f.store.clone(), chunk.to_vec());
        writers.spawn(async move {
            for (n, d) in chunk.iter().enumerate() {
                let under = if (part + n) % 2 == 0 { s1 } else { s2 };
                store.update_status(d, &StatusPatch::new().online(under, at)).await?;
            }
            Ok::<_, Error>(())
        });
    }
    writers.join_all().await.into_iter().collect::<Result<()>>().unwrap();

    let mut under_s1 = BTreeSet::new();
    for d in &all {
        if f.store.status(d).await.unwrap().unwrap().supervisor == Some(s1) {
            under_s1.insert(*d);
        }
    }
    let under_s2: BTreeSet<DeviceId> = all.iter().copied().filter(|d| !under_s1.contains(d)).collect();
    let all: BTreeSet<DeviceId> = all.into_iter().collect();

    for limit in [7, 100, 1_000, PageRequest::MAX_LIMIT] {
        assert_listed_once(&listed(f, None, limit).await, &all, "online devices");
        assert_listed_once(&listed(f, Some(&s1), limit).await, &under_s1, "s1's devices");
        assert_listed_once(&listed(f, Some(&s2), limit).await, &under_s2, "s2's devices");
    }
    assert_eq!(listed(f, Some(&s3), 7).await, Vec::<DeviceId>::new());
    assert_eq!(
        counts(f).await,
        BTreeMap::from([(s1, under_s1.len() as u64), (s2, under_s2.len() as u64)])
    );

    // Resuming from a cursor continues where that page ended, as often as asked.
    let mut head = Vec::new();
    let mut request = PageRequest::first(100);
    for _ in 0..5 {
        let page = list_page(f, None, &request).await;
        head.extend(page.items);
        request = PageRequest::after(page.next.expect("more pages follow"), 100);
    }
    for _ in 0..2 {
        let mut resumed = head.clone();
        resumed.extend(list_from(f, None, request.clone()).await);
        assert_listed_once(&resumed, &all, "online devices, resumed");
    }
}

/// While devices come and go between pages, every device online throughout is
/// listed at least once, and no device that was never online is listed.
pub async fn paging_while_the_set_changes(f: &StoreFixture) {
    let (s1, s2) = (supervisor("s1"), supervisor("s2"));
    let all = numbered_devices("churned", 500);
    let never_online = numbered_devices("churned-offline", 50);
    let at = f.clock.now();
    for d in &never_online {
        f.store
            .update_status(d, &StatusPatch::new().emission(true))
            .await
            .unwrap();
    }
    // Every fifth device comes and goes; the others stay online, some moving to s2.
    let churning: Vec<DeviceId> = all.iter().step_by(5).copied().collect();
    let stable: BTreeSet<DeviceId> = all.iter().copied().filter(|d| !churning.contains(d)).collect();
    for d in &stable {
        f.store
            .update_status(d, &StatusPatch::new().online(s1, at))
            .await
            .unwrap();
    }
    let mut online = vec![false; churning.len()];
    let mut next_toggle = 0;

    let mut listed = Vec::new();
    let mut request = PageRequest::first(25);
    for page_number in 0..MAX_PAGES {
        let page = list_page(f, None, &request).await;
        assert!(page.items.len() <= request.limit, "page of {} items", page.items.len());
        listed.extend(page.items);
        let Some(cursor) = page.next else { break };
        assert!(page_number + 1 < MAX_PAGES, "paging did not end");
        request = PageRequest::after(cursor, 25);

        for _ in 0..10 {
            // A stride coprime to the count spreads the toggles over the id range.
            next_toggle = (next_toggle + 37) % churning.len();
            let patch = if online[next_toggle] {
                StatusPatch::new().offline()
            } else {
                StatusPatch::new().online(s2, at)
            };
            online[next_toggle] = !online[next_toggle];
            f.store.update_status(&churning[next_toggle], &patch).await.unwrap();
        }
        for d in stable.iter().skip(page_number * 7).take(5) {
            f.store
                .update_status(d, &StatusPatch::new().online(s2, at))
                .await
                .unwrap();
        }
    }
    let listed: BTreeSet<DeviceId> = listed.into_iter().collect();
    let missing: Vec<&DeviceId> = stable.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "devices online throughout were not listed: {missing:?}"
    );
    let all: BTreeSet<DeviceId> = all.into_iter().collect();
    let strays: Vec<&DeviceId> = listed.difference(&all).collect();
    assert!(strays.is_empty(), "listed devices that were never online: {strays:?}");
}

/// Four supervisors at a time marking one device online, or (fenced) offline,
/// at once, a hundred times over: after each burst the indexes agree with the
/// stored status.
pub async fn concurrent_presence_changes_keep_the_indexes_consistent(f: &StoreFixture) {
    const WRITERS: usize = 4;
    let d1 = device("flapping");
    let supervisors = numbered_supervisors(WRITERS);
    let at = f.clock.now();
    for burst in 0..100 {
        let start = Arc::new(Barrier::new(WRITERS));
        let mut writers = JoinSet::new();
        for (n, s) in supervisors.iter().copied().enumerate() {
            let (store, start) = (f.store.clone(), start.clone());
            writers.spawn(async move {
                start.wait().await;
                if (n + burst) % 3 == 0 {
                    store.mark_offline(&d1, &s).await.map(drop)
                } else {
                    store.update_status(&d1, &StatusPatch::new().online(s, at)).await
                }
            });
        }
        writers.join_all().await.into_iter().collect::<Result<()>>().unwrap();

        let status = f.store.status(&d1).await.unwrap().expect("the device has a status");
        let expected: Vec<(DeviceId, SupervisorId)> = match status.supervisor {
            Some(s) if status.is_online() => vec![(d1, s)],
            _ => vec![],
        };
        assert_indexes(f, &expected, &supervisors).await;
    }
}

/// Asserts the online set, each of `supervisors`' sets and `device_counts` hold exactly `online`.
async fn assert_indexes(f: &StoreFixture, online: &[(DeviceId, SupervisorId)], supervisors: &[SupervisorId]) {
    let all: BTreeSet<DeviceId> = online.iter().map(|(d, _)| *d).collect();
    assert_listed_once(&listed(f, None, 10).await, &all, "online devices");
    let mut expected_counts = BTreeMap::new();
    for s in supervisors {
        let under: BTreeSet<DeviceId> = online.iter().filter(|(_, by)| by == s).map(|(d, _)| *d).collect();
        assert_listed_once(&listed(f, Some(s), 10).await, &under, &format!("{s}'s devices"));
        if !under.is_empty() {
            expected_counts.insert(*s, under.len() as u64);
        }
    }
    assert_eq!(counts(f).await, expected_counts, "device counts");
}

#[track_caller]
fn assert_listed_once(listed: &[DeviceId], expected: &BTreeSet<DeviceId>, what: &str) {
    let mut seen = BTreeSet::new();
    let repeated: Vec<&DeviceId> = listed.iter().filter(|d| !seen.insert(**d)).collect();
    assert!(repeated.is_empty(), "{what}: listed more than once: {repeated:?}");
    let missing: Vec<&DeviceId> = expected.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{what}: missing {} devices: {missing:?}",
        missing.len()
    );
    let extra: Vec<&DeviceId> = seen.difference(expected).collect();
    assert!(extra.is_empty(), "{what}: unexpected devices: {extra:?}");
}

/// More pages than any listing in the suite needs: a store that never ends one fails.
const MAX_PAGES: usize = 10_000;

/// The online devices (`None`) or those under a supervisor, following every cursor.
async fn listed(f: &StoreFixture, under: Option<&SupervisorId>, limit: usize) -> Vec<DeviceId> {
    list_from(f, under, PageRequest::first(limit)).await
}

async fn list_from(f: &StoreFixture, under: Option<&SupervisorId>, mut request: PageRequest) -> Vec<DeviceId> {
    let mut listed = Vec::new();
    for _ in 0..MAX_PAGES {
        let page = list_page(f, under, &request).await;
        assert!(
            page.items.len() <= request.limit,
            "a page of {} items for a limit of {}",
            page.items.len(),
            request.limit
        );
        listed.extend(page.items);
        match page.next {
            Some(cursor) => request = PageRequest::after(cursor, request.limit),
            None => return listed,
        }
    }
    panic!("listing did not end within {MAX_PAGES} pages");
}

async fn list_page(f: &StoreFixture, under: Option<&SupervisorId>, request: &PageRequest) -> Page<DeviceId> {
    match under {
        None => f.store.online_devices(request).await,
        Some(s) => f.store.supervisor_devices(s, request).await,
    }
    .unwrap()
}

/// `device_counts` without the supervisors holding none (which a store may leave out).
async fn counts(f: &StoreFixture) -> BTreeMap<SupervisorId, u64> {
    let loads: Vec<SupervisorLoad> = f.store.device_counts().await.unwrap();
    let mut counts = BTreeMap::new();
    for load in loads.into_iter().filter(|load| load.devices > 0) {
        assert!(
            counts.insert(load.supervisor, load.devices).is_none(),
            "{} counted twice",
            load.supervisor
        );
    }
    counts
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

fn agent(name: &str) -> AgentType {
    AgentType::new(name).expect("the suite's agent types are valid")
}

fn version(name: &str) -> ConfigVersion {
    ConfigVersion::new(name).expect("the suite's versions are valid")
}

fn template(agent_type: &str, v: &str, body: &str, created_at: Timestamp) -> ConfigTemplate {
    let bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", body))
        .expect("the suite's file names are valid");
    ConfigTemplate::new(
        ConfigRef::new(agent(agent_type), version(v)),
        bundle,
        "alice",
        created_at,
    )
}

/// Storing a template version again with the same content is accepted, keeps
/// the first one stored and lists the version once.
pub async fn put_template_is_idempotent(f: &StoreFixture) {
    let first = template("fluentbit", "v1", "[SERVICE]\n", f.clock.now());
    f.store.put_template(&first).await.unwrap();
    f.store.put_template(&first).await.unwrap();
    f.clock.advance(SECOND);
    let mut again = template("fluentbit", "v1", "[SERVICE]\n", f.clock.now());
    again.created_by = "bob".to_owned();
    f.store.put_template(&again).await.unwrap();

    assert_eq!(f.store.template(&first.reference()).await.unwrap(), Some(first));
    assert_eq!(
        f.store.template_versions(&agent("fluentbit")).await.unwrap(),
        vec![version("v1")]
    );
}

/// Storing a template version again with other content is `AlreadyExists`, and the stored one stays.
pub async fn put_template_refuses_other_content(f: &StoreFixture) {
    let first = template("fluentbit", "v1", "[SERVICE]\n", f.clock.now());
    f.store.put_template(&first).await.unwrap();
    let other = template("fluentbit", "v1", "[SERVICE]\n    flush 5\n", f.clock.now());
    let err = expect_err(f.store.put_template(&other).await, "a second v1 with other content");
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(f.store.template(&first.reference()).await.unwrap(), Some(first));
    assert_eq!(
        f.store.template_versions(&agent("fluentbit")).await.unwrap(),
        vec![version("v1")]
    );
}

/// A stored template reads back whole: several files, binary bodies, an empty
/// file name and content type; an unknown one is `None`.
pub async fn templates_round_trip(f: &StoreFixture) {
    let mut bundle = ConfigBundle::new();
    let files: [(&str, &str, &[u8]); 3] = [
        ("fluent-bit.conf", "text/plain", b"[SERVICE]\n    flush 1\n"),
        ("parsers.yaml", "text/yaml", b"parsers: []\n"),
        ("", "", &[0, 0x9f, 0x92, 0x96, 0xff]),
    ];
    for (name, content_type, body) in files {
        bundle
            .insert(name, ConfigFile::new(content_type, body))
            .expect("the suite's file names are valid");
    }
    let reference = ConfigRef::new(agent("fluentbit"), version("v1.2.3+build.7"));
    let stored = ConfigTemplate::new(reference, bundle, "ci:pipeline-42", f.clock.now());
    f.store.put_template(&stored).await.unwrap();

    let read = f.store.template(&reference).await.unwrap().expect("stored");
    assert_eq!(read, stored);
    assert_eq!(read.hash(), stored.hash());
    let unknown_version = ConfigRef::new(agent("fluentbit"), version("v9"));
    let unknown_agent = ConfigRef::new(agent("otelcol"), reference.version);
    assert_eq!(f.store.template(&unknown_version).await.unwrap(), None);
    assert_eq!(f.store.template(&unknown_agent).await.unwrap(), None);
}

/// `template_versions` lists an agent type's versions oldest first (not by
/// name), each once, and nothing of other agent types.
pub async fn template_versions_are_oldest_first(f: &StoreFixture) {
    for v in ["v10", "v2", "v9", "v1"] {
        f.store
            .put_template(&template("fluentbit", v, v, f.clock.now()))
            .await
            .unwrap();
        f.clock.advance(SECOND);
    }
    f.store
        .put_template(&template("otelcol", "v5", "otel", f.clock.now()))
        .await
        .unwrap();
    f.store
        .put_template(&template("fluentbit", "v2", "v2", f.clock.now()))
        .await
        .unwrap();

    let versions = f.store.template_versions(&agent("fluentbit")).await.unwrap();
    assert_eq!(versions, ["v10", "v2", "v9", "v1"].map(version).to_vec());
    assert_eq!(
        f.store.template_versions(&agent("otelcol")).await.unwrap(),
        vec![version("v5")]
    );
    assert_eq!(
        f.store.template_versions(&agent("vector")).await.unwrap(),
        Vec::<ConfigVersion>::new()
    );
}

/// `latest` follows `set_latest`, which refuses (`NotFound`) templates not stored and then changes nothing.
pub async fn latest_points_at_stored_templates(f: &StoreFixture) {
    let fluentbit = agent("fluentbit");
    let (v1, v2) = (
        template("fluentbit", "v1", "one", f.clock.now()),
        template("fluentbit", "v2", "two", f.clock.now()),
    );
    assert_eq!(f.store.latest(&fluentbit).await.unwrap(), None);
    let err = expect_err(
        f.store.set_latest(&v1.reference()).await,
        "latest of a missing template",
    );
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(f.store.latest(&fluentbit).await.unwrap(), None);

    f.store.put_template(&v1).await.unwrap();
    f.store.put_template(&v2).await.unwrap();
    f.store.set_latest(&v1.reference()).await.unwrap();
    assert_eq!(f.store.latest(&fluentbit).await.unwrap(), Some(v1.version));
    f.store.set_latest(&v2.reference()).await.unwrap();
    assert_eq!(f.store.latest(&fluentbit).await.unwrap(), Some(v2.version));
    assert_eq!(f.store.latest_template(&fluentbit).await.unwrap(), Some(v2.clone()));

    let missing = ConfigRef::new(fluentbit, version("v3"));
    let err = expect_err(f.store.set_latest(&missing).await, "latest of a missing version");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(f.store.latest(&fluentbit).await.unwrap(), Some(v2.version));
    assert_eq!(f.store.latest(&agent("otelcol")).await.unwrap(), None);
}

/// `set_desired` names only stored templates (else `NotFound`, changing
/// nothing), replaces what was set, and `clear_desired` forgets it once.
pub async fn desired_config_names_stored_templates(f: &StoreFixture) {
    let d1 = device("d1");
    let (v1, v2) = (
        template("fluentbit", "v1", "one", f.clock.now()),
        template("fluentbit", "v2", "two", f.clock.now()),
    );
    assert_eq!(f.store.desired(&d1).await.unwrap(), None);
    let err = expect_err(
        f.store.set_desired(&d1, &v1.reference()).await,
        "desired missing template",
    );
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(f.store.desired(&d1).await.unwrap(), None);

    f.store.put_template(&v1).await.unwrap();
    f.store.put_template(&v2).await.unwrap();
    f.store.set_desired(&d1, &v1.reference()).await.unwrap();
    assert_eq!(f.store.desired(&d1).await.unwrap(), Some(v1.reference()));
    f.store.set_desired(&d1, &v2.reference()).await.unwrap();
    assert_eq!(f.store.desired(&d1).await.unwrap(), Some(v2.reference()));
    assert_eq!(f.store.desired_template(&d1).await.unwrap(), Some(v2.clone()));

    let missing = ConfigRef::new(agent("fluentbit"), version("v3"));
    let err = expect_err(f.store.set_desired(&d1, &missing).await, "desired missing version");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(f.store.desired(&d1).await.unwrap(), Some(v2.reference()));

    assert!(f.store.clear_desired(&d1).await.unwrap());
    assert_eq!(f.store.desired(&d1).await.unwrap(), None);
    assert!(!f.store.clear_desired(&d1).await.unwrap());
}

// ---------------------------------------------------------------------------
// Everything at once
// ---------------------------------------------------------------------------

/// Devices whose ids share prefixes, case or separators never see each other's
/// lease, status or desired configuration.
pub async fn devices_do_not_interfere(f: &StoreFixture) {
    let ids = ["d1", "d10", "D1", "d1:supervisor", "d1.x", "d1-"].map(device);
    let at = f.clock.now();
    let mut refs = Vec::new();
    for (n, d) in ids.iter().enumerate() {
        let s = supervisor(&format!("s{n}"));
        let stored = template("fluentbit", &format!("v{n}"), d.as_str(), at);
        f.store.put_template(&stored).await.unwrap();
        f.store.claim(d, &s, TTL).await.unwrap();
        let labels = Labels::from([("n".to_owned(), n.to_string())]);
        f.store
            .update_status(d, &StatusPatch::new().online(s, at).labels(labels))
            .await
            .unwrap();
        f.store.set_desired(d, &stored.reference()).await.unwrap();
        refs.push(stored.reference());
    }

    let refs = &refs;
    let verify = |released: usize| async move {
        let owners = f.store.lookup_many(&ids).await.unwrap();
        for (n, d) in ids.iter().enumerate() {
            let s = supervisor(&format!("s{n}"));
            let expected = (n != released).then_some(s);
            assert_eq!(owners[n], expected, "owner of {d}");
            let status = f.store.status(d).await.unwrap().expect("status");
            assert_eq!(
                status.labels.get("n").map(String::as_str),
                Some(n.to_string().as_str()),
                "{d}"
            );
            let expected = (n != released).then_some(refs[n]);
            assert_eq!(f.store.desired(d).await.unwrap(), expected, "desired of {d}");
            let under = f.store.supervisor_devices(&s, &PageRequest::first(10)).await.unwrap();
            let expected: Vec<DeviceId> = if n == released { vec![] } else { vec![*d] };
            assert_eq!(under.items, expected, "devices under {s}");
        }
    };
    verify(usize::MAX).await;

    let (first, s0) = (ids[0], supervisor("s0"));
    assert!(f.store.release(&first, &s0).await.unwrap());
    assert!(f.store.clear_desired(&first).await.unwrap());
    assert!(f.store.mark_offline(&first, &s0).await.unwrap());
    verify(0).await;
}

// ---------------------------------------------------------------------------
// Model-based tests
// ---------------------------------------------------------------------------

const MODEL_DEVICES: usize = 4;
const MODEL_SUPERVISORS: usize = 3;

fn model_runner() -> (TestRunner, tokio::runtime::Runtime) {
    let config = ProptestConfig {
        cases: 64,
        // The runner has no source file to keep regressions beside.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the model test");
    (TestRunner::new(config), runtime)
}

fn check<T>(result: Result<T>, op: &dyn Debug) -> Result<T, TestCaseError> {
    result.map_err(|err| TestCaseError::fail(format!("{op:?} failed: {err}")))
}

/// One step of [`routing_model`]; devices and supervisors are indexes.
#[derive(Debug, Clone)]
enum RoutingOp {
    Claim {
        device: usize,
        supervisor: usize,
        ttl_ms: u64,
    },
    Renew {
        supervisor: usize,
        devices: Vec<usize>,
        ttl_ms: u64,
    },
    Release {
        device: usize,
        supervisor: usize,
    },
    Lookup {
        device: usize,
    },
    LookupMany {
        devices: Vec<usize>,
    },
    Advance {
        ms: u64,
    },
}

fn routing_op() -> impl Strategy<Value = RoutingOp> {
    let device = 0..MODEL_DEVICES;
    let supervisor = 0..MODEL_SUPERVISORS;
    // Round TTLs and advances make leases end exactly on a step now and then.
    let ttl_ms = prop_oneof![Just(1_000u64), Just(5_000), 1..10_000u64];
    let advance_ms = prop_oneof![Just(1u64), Just(1_000), Just(4_000), 1..2_000u64, 5_000..12_000u64];
    prop_oneof![
        3 => (device.clone(), supervisor.clone(), ttl_ms.clone())
            .prop_map(|(device, supervisor, ttl_ms)| RoutingOp::Claim { device, supervisor, ttl_ms }),
        2 => (supervisor.clone(), proptest::sample::subsequence((0..MODEL_DEVICES).collect::<Vec<_>>(), 0..=MODEL_DEVICES), ttl_ms)
            .prop_map(|(supervisor, devices, ttl_ms)| RoutingOp::Renew { supervisor, devices, ttl_ms }),
        2 => (device.clone(), supervisor)
            .prop_map(|(device, supervisor)| RoutingOp::Release { device, supervisor }),
        1 => device.clone().prop_map(|device| RoutingOp::Lookup { device }),
        1 => proptest::collection::vec(device, 0..6).prop_map(|devices| RoutingOp::LookupMany { devices }),
        3 => advance_ms.prop_map(|ms| RoutingOp::Advance { ms }),
    ]
}

/// Random sequences of claim, renew, release, lookups and clock advances,
/// checked step by step against a reference model of the leases.
///
/// Runs 64 sequences of up to 40 operations over 4 devices and 3 supervisors,
/// each on a fresh fixture from `make`, on its own tokio runtime: call it from
/// a plain `#[test]`. Panics with the shortest failing sequence found.
pub fn routing_model<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = StoreFixture>,
{
    let (mut runner, runtime) = model_runner();
    let ops = proptest::collection::vec(routing_op(), 1..=40);
    if let Err(failure) = runner.run(&ops, |ops| runtime.block_on(run_routing(make(), ops))) {
        panic!("routing model: {failure}");
    }
}

async fn run_routing(fixture: impl Future<Output = StoreFixture>, ops: Vec<RoutingOp>) -> Result<(), TestCaseError> {
    let f = fixture.await;
    let devices: Vec<DeviceId> = (0..MODEL_DEVICES).map(|n| device(&format!("m{n}"))).collect();
    let supervisors = numbered_supervisors(MODEL_SUPERVISORS);
    // device → (owner, expiry); an entry past its expiry owns nothing.
    let mut leases: HashMap<usize, (usize, Timestamp)> = HashMap::new();
    let owner = |leases: &HashMap<usize, (usize, Timestamp)>, d: usize, now: Timestamp| {
        leases
            .get(&d)
            .filter(|(_, expires)| now < *expires)
            .map(|(s, _)| supervisors[*s])
    };

    for op in &ops {
        let now = f.clock.now();
        match op {
            RoutingOp::Claim {
                device,
                supervisor,
                ttl_ms,
            } => {
                let ttl = Duration::from_millis(*ttl_ms);
                let got = check(
                    f.store.claim(&devices[*device], &supervisors[*supervisor], ttl).await,
                    op,
                )?;
                let expected = match owner(&leases, *device, now) {
                    None => Claim::Acquired,
                    Some(previous) if previous == supervisors[*supervisor] => Claim::Renewed,
                    Some(previous) => Claim::TakenOver { previous },
                };
                prop_assert_eq!(got, expected, "{:?}", op);
                leases.insert(*device, (*supervisor, now.saturating_add(ttl)));
            }
            RoutingOp::Renew {
                supervisor,
                devices: renewed,
                ttl_ms,
            } => {
                let ttl = Duration::from_millis(*ttl_ms);
                let asked: Vec<DeviceId> = renewed.iter().map(|d| devices[*d]).collect();
                let lost = check(f.store.renew(&supervisors[*supervisor], &asked, ttl).await, op)?;
                let mut expected_lost = Vec::new();
                for d in renewed {
                    if owner(&leases, *d, now) == Some(supervisors[*supervisor]) {
                        leases.insert(*d, (*supervisor, now.saturating_add(ttl)));
                    } else {
                        expected_lost.push(devices[*d]);
                    }
                }
                prop_assert_eq!(sorted(lost), sorted(expected_lost), "{:?}", op);
            }
            RoutingOp::Release { device, supervisor } => {
                let got = check(f.store.release(&devices[*device], &supervisors[*supervisor]).await, op)?;
                let held = owner(&leases, *device, now) == Some(supervisors[*supervisor]);
                if held {
                    leases.remove(device);
                }
                prop_assert_eq!(got, held, "{:?}", op);
            }
            RoutingOp::Lookup { device } => {
                let got = check(f.store.lookup(&devices[*device]).await, op)?;
                prop_assert_eq!(got, owner(&leases, *device, now), "{:?}", op);
            }
            RoutingOp::LookupMany { devices: asked } => {
                let ids: Vec<DeviceId> = asked.iter().map(|d| devices[*d]).collect();
                let got = check(f.store.lookup_many(&ids).await, op)?;
                let expected: Vec<Option<SupervisorId>> = asked.iter().map(|d| owner(&leases, *d, now)).collect();
                prop_assert_eq!(got, expected, "{:?}", op);
            }
            RoutingOp::Advance { ms } => f.clock.advance(Duration::from_millis(*ms)),
        }
        // After every step, the whole table agrees with the model.
        let now = f.clock.now();
        let got = check(f.store.lookup_many(&devices).await, &"lookup_many of every device")?;
        let expected: Vec<Option<SupervisorId>> = (0..MODEL_DEVICES).map(|d| owner(&leases, d, now)).collect();
        prop_assert_eq!(got, expected, "owners after {:?}", op);
    }
    Ok(())
}

/// One step of [`status_model`]; devices and supervisors are indexes.
#[derive(Debug, Clone)]
enum StatusOp {
    Online {
        device: usize,
        supervisor: usize,
        fence: Option<usize>,
    },
    Offline {
        device: usize,
        fence: Option<usize>,
    },
    Emission {
        device: usize,
        on: bool,
        fence: Option<usize>,
    },
}

fn status_op() -> impl Strategy<Value = StatusOp> {
    let device = 0..MODEL_DEVICES;
    let supervisor = 0..MODEL_SUPERVISORS;
    let fence = proptest::option::of(0..MODEL_SUPERVISORS);
    prop_oneof![
        (device.clone(), supervisor, fence.clone()).prop_map(|(device, supervisor, fence)| StatusOp::Online {
            device,
            supervisor,
            fence
        }),
        (device.clone(), fence.clone()).prop_map(|(device, fence)| StatusOp::Offline { device, fence }),
        (device, any::<bool>(), fence).prop_map(|(device, on, fence)| StatusOp::Emission { device, on, fence }),
    ]
}

/// Random sequences of fenced and unfenced presence and field updates, with
/// the status, the online and per-supervisor listings and `device_counts`
/// checked after every step against a reference model built with
/// [`DeviceStatus::apply`] and the fence rule.
///
/// Runs 64 sequences of up to 40 operations over 4 devices and 3 supervisors,
/// each on a fresh fixture from `make`: call it from a plain `#[test]`.
pub fn status_model<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = StoreFixture>,
{
    let (mut runner, runtime) = model_runner();
    let ops = proptest::collection::vec(status_op(), 1..=40);
    if let Err(failure) = runner.run(&ops, |ops| runtime.block_on(run_status(make(), ops))) {
        panic!("status model: {failure}");
    }
}

async fn run_status(fixture: impl Future<Output = StoreFixture>, ops: Vec<StatusOp>) -> Result<(), TestCaseError> {
    let f = fixture.await;
    let devices: Vec<DeviceId> = (0..MODEL_DEVICES).map(|n| device(&format!("m{n}"))).collect();
    let supervisors = numbered_supervisors(MODEL_SUPERVISORS);
    let mut model: HashMap<DeviceId, DeviceStatus> = HashMap::new();

    for (step, op) in ops.iter().enumerate() {
        // A distinct time per step, so a stale `connected_at` shows.
        let at = f.clock.now().saturating_add(Duration::from_secs(step as u64));
        let (d, patch, fence) = match *op {
            StatusOp::Online {
                device,
                supervisor,
                fence,
            } => (
                devices[device],
                StatusPatch::new().online(supervisors[supervisor], at),
                fence,
            ),
            StatusOp::Offline { device, fence } => (devices[device], StatusPatch::new().offline(), fence),
            StatusOp::Emission { device, on, fence } => (devices[device], StatusPatch::new().emission(on), fence),
        };
        let patch = match fence {
            Some(s) => patch.fenced_by(supervisors[s]),
            None => patch,
        };
        let result = f.store.update_status(&d, &patch).await;
        let named = model.get(&d).and_then(|status| status.supervisor);
        match patch.fence {
            Some(_) if !model.contains_key(&d) => match result {
                Err(Error::NotFound { what }) if what.contains(d.as_str()) => {}
                other => return Err(TestCaseError::fail(format!("{op:?}: expected NotFound, got {other:?}"))),
            },
            Some(fence) if named != Some(fence) => match result {
                Err(Error::NotOwner(m)) => {
                    prop_assert_eq!((m.device, m.supervisor, m.owner), (d, fence, named), "{:?}", op);
                }
                other => return Err(TestCaseError::fail(format!("{op:?}: expected NotOwner, got {other:?}"))),
            },
            _ => {
                check(result, op)?;
                model.entry(d).or_insert_with(|| DeviceStatus::new(d)).apply(&patch);
            }
        }

        for d in &devices {
            let got = check(f.store.status(d).await, &"status")?;
            prop_assert_eq!(got.as_ref(), model.get(d), "status of {} after {:?}", d, op);
        }
        let online_under = |s: Option<&SupervisorId>| -> Vec<DeviceId> {
            sorted(
                model
                    .values()
                    .filter(|status| status.is_online() && s.is_none_or(|s| status.supervisor == Some(*s)))
                    .map(|status| status.device)
                    .collect(),
            )
        };
        prop_assert_eq!(
            sorted(listed(&f, None, 2).await),
            online_under(None),
            "online after {:?}",
            op
        );
        let mut expected_counts = BTreeMap::new();
        for s in &supervisors {
            let expected = online_under(Some(s));
            prop_assert_eq!(
                sorted(listed(&f, Some(s), 2).await),
                expected.clone(),
                "{} after {:?}",
                s,
                op
            );
            if !expected.is_empty() {
                expected_counts.insert(*s, expected.len() as u64);
            }
        }
        prop_assert_eq!(counts(&f).await, expected_counts, "device counts after {:?}", op);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The fleet listing and what control planes track.

/// `devices` lists every device that has been online, offline now or not,
/// and none that never was.
pub async fn every_device_that_was_online_is_listed(f: &StoreFixture) {
    let (s1, at) = (supervisor("s1"), f.clock.now());
    let stay = numbered_devices("known-online", 30);
    let left = numbered_devices("known-left", 20);
    let never = numbered_devices("known-never", 5);
    for d in stay.iter().chain(&left) {
        f.store
            .update_status(d, &StatusPatch::new().online(s1, at))
            .await
            .unwrap();
    }
    for d in &left {
        f.store.update_status(d, &StatusPatch::new().offline()).await.unwrap();
    }
    for d in &never {
        f.store
            .update_status(d, &StatusPatch::new().emission(true))
            .await
            .unwrap();
    }
    let expected: BTreeSet<DeviceId> = stay.iter().chain(&left).copied().collect();
    for limit in [1, 7, 100] {
        let mut listed = Vec::new();
        let mut request = PageRequest::first(limit);
        for _ in 0..MAX_PAGES {
            let page = f.store.devices(&request).await.unwrap();
            assert!(
                page.items.len() <= limit,
                "a page of {} for a limit of {limit}",
                page.items.len()
            );
            listed.extend(page.items);
            match page.next {
                Some(cursor) => request = PageRequest::after(cursor, limit),
                None => break,
            }
        }
        assert_listed_once(&listed, &expected, "every device that was online");
    }
}

fn pending_record(device_name: &str, kind: CommandKind, at: Timestamp) -> CommandRecord {
    let command = Command::new(device(device_name), kind, at, Duration::from_secs(30));
    CommandRecord::new(command, Some(supervisor("s1")), CommandState::Pending)
}

/// A command's record reads back as written, with its outcome once it has one.
pub async fn command_records_round_trip(f: &StoreFixture) {
    let at = f.clock.now();
    let kinds = [
        CommandKind::SetEmission { state: true },
        CommandKind::ApplyConfig {
            agent_type: agent("fluentbit"),
            version: version("v2"),
        },
        CommandKind::Restart,
    ];
    for (n, kind) in kinds.into_iter().enumerate() {
        let mut record = pending_record(&format!("rec-{n}"), kind, at);
        record.initiated_by = (n == 0).then(|| "ops".to_owned());
        f.store.insert_command(&record).await.unwrap();
        assert_eq!(
            f.store.command_record(&record.correlation_id()).await.unwrap(),
            Some(record.clone())
        );

        record.complete(
            &CommandOutcome::Failed {
                reason: format!("reason {n}"),
            },
            at,
        );
        assert!(f.store.update_command(&record).await.unwrap());
        let stored = f.store.command_record(&record.correlation_id()).await.unwrap().unwrap();
        assert_eq!(stored.state, CommandState::Failed);
        assert_eq!(stored.reason.as_deref(), Some(format!("reason {n}").as_str()));
        assert_eq!(stored.command, record.command);
        assert_eq!(stored.initiated_by, record.initiated_by);
    }
    let deferred = CommandRecord::new(
        Command::new(
            device("rec-deferred"),
            CommandKind::Restart,
            at,
            Duration::from_secs(30),
        ),
        None,
        CommandState::Deferred,
    );
    f.store.insert_command(&deferred).await.unwrap();
    let stored = f
        .store
        .command_record(&deferred.correlation_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.state, stored.supervisor, stored.attempts),
        (CommandState::Deferred, None, 0)
    );
    assert_eq!(f.store.command_record(&CorrelationId::new()).await.unwrap(), None);
}

/// A correlation id is recorded once. The same record again (a write sent
/// again after its reply was lost) is success and changes nothing; a record
/// that differs in anything is `AlreadyExists`, naming the command and what
/// differs, and the first record stands.
pub async fn command_ids_are_recorded_once(f: &StoreFixture) {
    let record = pending_record("once", CommandKind::Restart, f.clock.now());
    f.store.insert_command(&record).await.unwrap();
    f.store
        .insert_command(&record)
        .await
        .expect("the same record again is success");
    let stored = f.store.command_record(&record.correlation_id()).await.unwrap();
    assert_eq!(stored.as_ref(), Some(&record), "an insert again changes nothing");
    assert_eq!(
        f.store.overdue_commands(record.command.deadline, 10).await.unwrap(),
        vec![record.correlation_id()],
        "indexed once, at its deadline"
    );

    let mut acked = record.clone();
    acked.state = CommandState::Acked;
    let mut later = record.clone();
    later.command.deadline = record.command.deadline.saturating_add(Duration::from_secs(60));
    let mut elsewhere = record.clone();
    elsewhere.command.device = device("not-once");
    let mut by_other = record.clone();
    by_other.initiated_by = Some("someone else".to_owned());
    for (again, differs) in [
        (acked, "state"),
        (later, "deadline"),
        (elsewhere, "device"),
        (by_other, "initiated_by"),
    ] {
        let err = expect_err(f.store.insert_command(&again).await, "an insert with other content");
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&record.correlation_id().to_string()), "{message}");
        assert!(
            message.contains(differs),
            "the message should name {differs}: {message}"
        );
    }
    let stored = f.store.command_record(&record.correlation_id()).await.unwrap();
    assert_eq!(stored.as_ref(), Some(&record), "the first record stands");
    assert_eq!(
        f.store.overdue_commands(record.command.deadline, 10).await.unwrap(),
        vec![record.correlation_id()],
        "a refused insert leaves the pending index as the first record has it"
    );

    // Once it ended, the record as first inserted is not what is stored: that is other content.
    let mut ended = record.clone();
    ended.complete(&CommandOutcome::Acked, f.clock.now());
    assert!(f.store.update_command(&ended).await.unwrap());
    let err = expect_err(f.store.insert_command(&record).await, "an insert over an ended record");
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(
        f.store.overdue_commands(record.command.deadline, 10).await.unwrap(),
        Vec::new(),
        "a refused insert does not put an ended command back in the pending index"
    );
}

/// A pending record may be replaced (a retry), an ended one never; an unknown one is `NotFound`.
pub async fn command_records_change_only_while_pending(f: &StoreFixture) {
    let at = f.clock.now();
    let mut record = pending_record("retried", CommandKind::SetEmission { state: false }, at);
    f.store.insert_command(&record).await.unwrap();

    record.attempts = 2;
    record.supervisor = Some(supervisor("s2"));
    record.command.deadline = at.saturating_add(Duration::from_secs(60));
    assert!(
        f.store.update_command(&record).await.unwrap(),
        "a retry replaces a pending record"
    );
    let stored = f.store.command_record(&record.correlation_id()).await.unwrap().unwrap();
    assert_eq!((stored.attempts, stored.supervisor), (2, Some(supervisor("s2"))));
    assert_eq!(stored.command.deadline, record.command.deadline);

    record.complete(&CommandOutcome::Acked, at);
    assert!(f.store.update_command(&record).await.unwrap());
    let mut late = record.clone();
    late.complete(&CommandOutcome::TimedOut, at);
    assert!(
        !f.store.update_command(&late).await.unwrap(),
        "an ended command stays as it ended"
    );
    let stored = f.store.command_record(&record.correlation_id()).await.unwrap().unwrap();
    assert_eq!(stored.state, CommandState::Acked);

    let unknown = pending_record("unknown", CommandKind::Restart, at);
    let err = expect_err(f.store.update_command(&unknown).await, "updating an unknown command");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

/// Every watch hears of each command whose update ends it, in order, and
/// of nothing else: not a retry, not an update refused because the command
/// had ended already. A dropped watch leaves the store working.
pub async fn watches_are_told_of_commands_ending(f: &StoreFixture) {
    async fn next(watch: &mut crate::Endings, what: &str) -> Option<CorrelationId> {
        tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap_or_else(|_| panic!("no notice of {what} within 5 s"))
    }
    let at = f.clock.now();
    let mut first = f.store.watch_endings().await.unwrap();
    let mut second = f.store.watch_endings().await.unwrap();
    let mut acked = pending_record("told-acked", CommandKind::Restart, at);
    let mut failed = pending_record("told-failed", CommandKind::SetEmission { state: true }, at);
    f.store.insert_command(&acked).await.unwrap();
    f.store.insert_command(&failed).await.unwrap();

    acked.attempts = 2;
    assert!(f.store.update_command(&acked).await.unwrap(), "a retry");
    acked.complete(&CommandOutcome::Acked, at);
    assert!(f.store.update_command(&acked).await.unwrap());
    failed.complete(&CommandOutcome::Failed { reason: "no".into() }, at);
    assert!(f.store.update_command(&failed).await.unwrap());
    let mut late = acked.clone();
    late.complete(&CommandOutcome::TimedOut, at);
    assert!(!f.store.update_command(&late).await.unwrap(), "already ended");

    for watch in [&mut first, &mut second] {
        assert_eq!(next(watch, "the acked command").await, Some(acked.correlation_id()));
        assert_eq!(next(watch, "the failed command").await, Some(failed.correlation_id()));
        let more = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
        assert!(more.is_err(), "told of something else: {more:?}");
    }

    drop(first);
    let mut third = pending_record("told-after-a-watch-went", CommandKind::Restart, at);
    f.store.insert_command(&third).await.unwrap();
    third.complete(&CommandOutcome::Acked, at);
    assert!(f.store.update_command(&third).await.unwrap());
    assert_eq!(
        next(&mut second, "the third command").await,
        Some(third.correlation_id())
    );
}

/// Commands still pending past their deadline are listed, earliest first;
/// ended, deferred and not yet due ones are not; a retry moves its deadline.
pub async fn overdue_commands_are_the_pending_ones_past_their_deadline(f: &StoreFixture) {
    let at = f.clock.now();
    let due = |n: u64| at.saturating_add(Duration::from_secs(n));
    let with_deadline = |name: &str, deadline: Timestamp| {
        let mut record = pending_record(name, CommandKind::Restart, at);
        record.command.deadline = deadline;
        record
    };
    let (late, later, ended, future) = (
        with_deadline("late", due(5)),
        with_deadline("later", due(7)),
        with_deadline("ended", due(6)),
        with_deadline("future", due(100)),
    );
    let mut deferred = with_deadline("deferred", due(1));
    deferred.state = CommandState::Deferred;
    // Inserted out of order: the listing orders by deadline.
    for record in [&later, &future, &ended, &late, &deferred] {
        f.store.insert_command(record).await.unwrap();
    }
    let mut done = ended.clone();
    done.complete(&CommandOutcome::Acked, at);
    assert!(f.store.update_command(&done).await.unwrap());

    let ids = |records: &[&CommandRecord]| records.iter().map(|r| r.correlation_id()).collect::<Vec<_>>();
    assert_eq!(
        f.store.overdue_commands(at, 10).await.unwrap(),
        Vec::new(),
        "nothing is due yet"
    );
    assert_eq!(
        f.store.overdue_commands(due(10), 10).await.unwrap(),
        ids(&[&late, &later])
    );
    assert_eq!(
        f.store.overdue_commands(due(10), 1).await.unwrap(),
        ids(&[&late]),
        "at most the limit"
    );
    assert_eq!(
        f.store.overdue_commands(due(5), 10).await.unwrap(),
        ids(&[&late]),
        "a deadline at `before` counts"
    );

    // A retry gives `late` a new deadline; then it ends.
    let mut retried = late.clone();
    retried.attempts = 2;
    retried.command.deadline = due(50);
    assert!(f.store.update_command(&retried).await.unwrap());
    assert_eq!(f.store.overdue_commands(due(10), 10).await.unwrap(), ids(&[&later]));
    assert_eq!(
        f.store.overdue_commands(due(60), 10).await.unwrap(),
        ids(&[&later, &retried])
    );
    retried.complete(&CommandOutcome::TimedOut, at);
    assert!(f.store.update_command(&retried).await.unwrap());
    assert_eq!(
        f.store.overdue_commands(due(1000), 10).await.unwrap(),
        ids(&[&later, &future])
    );
}

/// Control planes racing to end one command: exactly one write wins.
pub async fn concurrent_completions_have_one_winner(f: &StoreFixture) {
    const RACERS: usize = 8;
    let record = pending_record("raced", CommandKind::Restart, f.clock.now());
    f.store.insert_command(&record).await.unwrap();
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut racers = JoinSet::new();
    for n in 0..RACERS {
        let (store, barrier, mut mine) = (f.store.clone(), barrier.clone(), record.clone());
        let at = f.clock.now();
        racers.spawn(async move {
            mine.complete(
                &CommandOutcome::Failed {
                    reason: format!("racer {n}"),
                },
                at,
            );
            barrier.wait().await;
            store.update_command(&mine).await.map(|won| won.then_some(n))
        });
    }
    let winners: Vec<usize> = racers.join_all().await.into_iter().filter_map(Result::unwrap).collect();
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored = f.store.command_record(&record.correlation_id()).await.unwrap().unwrap();
    assert_eq!(stored.reason, Some(format!("racer {}", winners[0])));
}

fn rollout_of(v: &str, at: Timestamp) -> Rollout {
    Rollout::new(RolloutSpec::new(ConfigRef::new(agent("fluentbit"), version(v))), at)
}

/// A rollout is written only on top of the revision it was read at.
pub async fn rollout_writes_follow_revisions(f: &StoreFixture) {
    let at = f.clock.now();
    let mut rollout = rollout_of("v1", at);
    assert!(f.store.put_rollout(&rollout).await.unwrap(), "the first write");
    assert!(!f.store.put_rollout(&rollout).await.unwrap(), "revision 1 again");
    assert_eq!(f.store.rollout(&rollout.id).await.unwrap(), Some(rollout.clone()));

    let stale = rollout.clone();
    rollout.revision = 2;
    rollout.state = RolloutState::Paused {
        reason: "operator".into(),
    };
    assert!(f.store.put_rollout(&rollout).await.unwrap());
    let mut skipping = rollout.clone();
    skipping.revision = 4;
    assert!(
        !f.store.put_rollout(&skipping).await.unwrap(),
        "a revision may not be skipped"
    );
    let mut racing = stale;
    racing.revision = 2;
    racing.state = RolloutState::Aborted;
    assert!(
        !f.store.put_rollout(&racing).await.unwrap(),
        "a writer that read revision 1 lost"
    );
    assert_eq!(f.store.rollout(&rollout.id).await.unwrap(), Some(rollout));
    assert_eq!(f.store.rollout(&rollout_of("v9", at).id).await.unwrap(), None);
}

/// Rollouts are listed newest first, a page at a time, each once.
pub async fn rollouts_are_listed_newest_first(f: &StoreFixture) {
    let at = f.clock.now();
    let mut ids = Vec::new();
    for n in 0..7 {
        let rollout = rollout_of(&format!("v{n}"), at);
        assert!(f.store.put_rollout(&rollout).await.unwrap());
        ids.push(rollout.id);
    }
    ids.reverse();
    for limit in [1, 3, 7, 100] {
        let mut listed = Vec::new();
        let mut request = PageRequest::first(limit);
        for _ in 0..MAX_PAGES {
            let page = f.store.rollouts(&request).await.unwrap();
            assert!(page.items.len() <= limit);
            listed.extend(page.items);
            match page.next {
                Some(cursor) => request = PageRequest::after(cursor, limit),
                None => break,
            }
        }
        assert_eq!(listed, ids, "newest first with pages of {limit}");
    }
}

/// One driver holds a rollout's lease at a time: another's claim is refused
/// while it is live; its holder renews it; it lapses `ttl` after it was last
/// claimed, and then anyone may take it. Only the holder releases it.
pub async fn rollout_driver_leases_have_one_holder(f: &StoreFixture) {
    let at = f.clock.now();
    let (one, other) = (rollout_of("v1", at), rollout_of("v2", at));
    for rollout in [&one, &other] {
        assert!(f.store.put_rollout(rollout).await.unwrap());
    }
    let (id, a, b) = (one.id, "control-a#1", "control-b#1");
    assert!(f.store.claim_rollout_driver(&id, a, TTL).await.unwrap(), "a free lease");
    assert!(
        !f.store.claim_rollout_driver(&id, b, TTL).await.unwrap(),
        "held by another"
    );
    assert!(
        f.store.claim_rollout_driver(&other.id, b, TTL).await.unwrap(),
        "another rollout's lease is another lease"
    );

    f.clock.advance(TTL - SECOND);
    assert!(
        f.store.claim_rollout_driver(&id, a, TTL).await.unwrap(),
        "renewed by its holder"
    );
    f.clock.advance(TTL - MS);
    assert!(
        !f.store.claim_rollout_driver(&id, b, TTL).await.unwrap(),
        "held until the renewal's TTL is up"
    );
    f.clock.advance(MS);
    assert!(
        f.store.claim_rollout_driver(&id, b, TTL).await.unwrap(),
        "lapsed: anyone may take it"
    );
    assert!(
        !f.store.claim_rollout_driver(&id, a, TTL).await.unwrap(),
        "the lapsed holder cannot take it back"
    );
    assert!(
        !f.store.release_rollout_driver(&id, a).await.unwrap(),
        "only the holder releases"
    );
    assert!(f.store.release_rollout_driver(&id, b).await.unwrap());
    assert!(
        !f.store.release_rollout_driver(&id, b).await.unwrap(),
        "released already"
    );
    assert!(
        f.store.claim_rollout_driver(&id, a, TTL).await.unwrap(),
        "free again once released"
    );

    f.clock.advance(TTL);
    assert!(
        !f.store.release_rollout_driver(&other.id, b).await.unwrap(),
        "a lapsed lease is not released: nobody held it"
    );
    let err = expect_err(f.store.claim_rollout_driver(&id, a, Duration::ZERO).await, "a zero TTL");
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
}

/// Drivers racing for a free rollout: exactly one gets it.
pub async fn concurrent_rollout_driver_claims_have_one_winner(f: &StoreFixture) {
    const RACERS: usize = 8;
    let rollout = rollout_of("v1", f.clock.now());
    assert!(f.store.put_rollout(&rollout).await.unwrap());
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut racers = JoinSet::new();
    for n in 0..RACERS {
        let (store, barrier) = (f.store.clone(), barrier.clone());
        racers.spawn(async move {
            barrier.wait().await;
            let driver = format!("racer-{n}");
            store
                .claim_rollout_driver(&rollout.id, &driver, TTL)
                .await
                .map(|won| won.then_some(n))
        });
    }
    let winners: Vec<usize> = racers.join_all().await.into_iter().filter_map(Result::unwrap).collect();
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
}

/// An empty store has no generation; the first one begun is kept, and every
/// later attempt answers with it.
pub async fn the_first_generation_begun_stays(f: &StoreFixture) {
    assert_eq!(f.store.generation().await.unwrap(), None, "an empty store has none");
    let first = crate::StoreGeneration::new();
    assert_eq!(f.store.begin_generation(&first).await.unwrap(), first);
    assert_eq!(f.store.generation().await.unwrap(), Some(first.clone()));
    let second = crate::StoreGeneration::new();
    assert_ne!(first, second);
    assert_eq!(
        f.store.begin_generation(&second).await.unwrap(),
        first,
        "a second generation does not replace the first"
    );
    assert_eq!(f.store.generation().await.unwrap(), Some(first));
}

/// Control planes starting at once on an empty store agree on one generation.
pub async fn concurrent_generations_have_one_winner(f: &StoreFixture) {
    const RACERS: usize = 8;
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut racers = JoinSet::new();
    for _ in 0..RACERS {
        let (store, barrier) = (f.store.clone(), barrier.clone());
        racers.spawn(async move {
            let mine = crate::StoreGeneration::new();
            barrier.wait().await;
            store.begin_generation(&mine).await
        });
    }
    let kept: Vec<_> = racers.join_all().await.into_iter().map(Result::unwrap).collect();
    assert!(kept.iter().all(|generation| *generation == kept[0]), "{kept:?}");
    assert_eq!(f.store.generation().await.unwrap(), Some(kept[0].clone()));
}

/// A cursor the store did not make is `InvalidInput`, naming it.
pub async fn listing_cursors_from_elsewhere_are_refused(f: &StoreFixture) {
    let bogus = PageRequest::after(Cursor::new("not-a-rollout"), 10);
    let err = expect_err(f.store.rollouts(&bogus).await, "listing rollouts after a bogus cursor");
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert!(err.to_string().contains("not-a-rollout"), "{err}");
}
