//! The conformance cases of [`RevocationStore`](crate::RevocationStore).

use std::collections::BTreeSet;
use std::time::Duration;

use super::{StoreFixture, device, numbered_devices};
use crate::revocation::Revocation;
use crate::store::PageRequest;
use crate::time::{Clock, Timestamp};

fn revocation(f: &StoreFixture, name: &str, reason: &str) -> Revocation {
    Revocation::new(device(name), reason, f.clock.now()).expect("the suite's reasons are valid")
}

/// A revocation reads back whole; the first one stays; reinstating lifts it once.
pub async fn revocations_round_trip(f: &StoreFixture) {
    let s = &f.store;
    let d1 = device("d1");
    assert_eq!(s.revocation(&d1).await.unwrap(), None, "nothing is revoked at first");
    assert!(!s.reinstate(&d1).await.unwrap(), "reinstating a device never revoked");

    let first = revocation(f, "d1", "token leaked: ticket #4711, naïve").by("ops");
    assert!(s.revoke(&first).await.unwrap(), "a first revocation is stored");
    assert_eq!(s.revocation(&d1).await.unwrap(), Some(first.clone()));

    f.clock.advance(Duration::from_secs(60));
    let second = revocation(f, "d1", "again");
    assert!(!s.revoke(&second).await.unwrap(), "a device revoked already");
    assert_eq!(
        s.revocation(&d1).await.unwrap(),
        Some(first),
        "the first revocation stays"
    );

    let unnamed = revocation(f, "d2", "");
    assert!(s.revoke(&unnamed).await.unwrap());
    assert_eq!(
        s.revocation(&device("d2")).await.unwrap(),
        Some(unnamed),
        "an empty reason, nobody named"
    );

    assert!(s.reinstate(&d1).await.unwrap(), "reinstated");
    assert_eq!(s.revocation(&d1).await.unwrap(), None);
    assert!(!s.reinstate(&d1).await.unwrap(), "reinstated once only");
    assert!(
        s.revoke(&second).await.unwrap(),
        "a reinstated device may be revoked again"
    );
    assert_eq!(s.revocation(&d1).await.unwrap().map(|r| r.reason), Some("again".into()));
}

/// Paging lists each revoked device once, with its revocation, and no reinstated one.
pub async fn revocations_are_listed_once(f: &StoreFixture) {
    let s = &f.store;
    let empty = s.revocations(&PageRequest::first(10)).await.unwrap();
    assert!(
        empty.items.is_empty() && empty.next.is_none(),
        "no revocations: {empty:?}"
    );

    let devices = numbered_devices("revoked", 250);
    for d in &devices {
        s.revoke(&revocation(f, d.as_str(), &format!("reason of {d}")))
            .await
            .unwrap();
    }
    for d in devices.iter().step_by(5) {
        s.reinstate(d).await.unwrap();
    }
    let expected: BTreeSet<_> = devices
        .iter()
        .enumerate()
        .filter(|(n, _)| n % 5 != 0)
        .map(|(_, d)| *d)
        .collect();

    let mut seen = Vec::new();
    let mut request = PageRequest::first(37);
    for _ in 0..100 {
        let page = s.revocations(&request).await.unwrap();
        assert!(
            page.items.len() <= 37,
            "a page of {} for a limit of 37",
            page.items.len()
        );
        for revoked in &page.items {
            assert_eq!(revoked.reason, format!("reason of {}", revoked.device), "listed whole");
        }
        seen.extend(page.items.iter().map(|r| r.device));
        match page.next {
            Some(next) => request = PageRequest::after(next, 37),
            None => break,
        }
    }
    let listed: BTreeSet<_> = seen.iter().copied().collect();
    assert_eq!(seen.len(), listed.len(), "a revoked device listed twice");
    assert_eq!(listed, expected);
}

/// Revoking is a record, not an action on the device's lease or status: the
/// runtimes act on it.
pub async fn revocations_leave_leases_and_statuses_alone(f: &StoreFixture) {
    let s = &f.store;
    let (d1, s1) = (device("d1"), super::supervisor("s1"));
    s.claim(&d1, &s1, super::TTL).await.unwrap();
    s.update_status(&d1, &crate::StatusPatch::new().online(s1, f.clock.now()))
        .await
        .unwrap();
    s.revoke(&revocation(f, "d1", "gone rogue")).await.unwrap();
    assert_eq!(s.lookup(&d1).await.unwrap(), Some(s1));
    assert!(s.status(&d1).await.unwrap().is_some());
    s.revoke(&revocation(f, "never-seen", "leaked before it ever connected"))
        .await
        .unwrap();
    assert_eq!(
        s.status(&device("never-seen")).await.unwrap(),
        None,
        "revoking creates no status"
    );
    assert_eq!(
        s.revocation(&device("never-seen")).await.unwrap().map(|r| r.revoked_at),
        Some(Timestamp::from_unix_millis(f.clock.now().unix_millis()).unwrap())
    );
}
