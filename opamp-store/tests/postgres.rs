//! The PostgreSQL store against the store conformance suite, and what only it
//! has: the audit log, migrations, concurrency beyond the suite, bad rows.
//!
//! Needs a PostgreSQL server: `scripts/services/postgres start /tmp/opamp-postgres`
//! (127.0.0.1:5440), or `OPAMP_TEST_POSTGRES_URL`. Every fixture migrates a
//! schema of its own, so the tests run in parallel on one server.
#![cfg(feature = "postgres")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::store::StoreFixture;
use opamp_core::{
    AgentType, Bus, Claim, Clock, Command, CommandKind, CommandOutcome, ConfigBundle, ConfigFile, ConfigRef,
    ConfigStore, ConfigStoreExt, ConfigTemplate, ConfigVersion, CorrelationId, Cursor, DeviceId, Error, ManualClock,
    PageRequest, RoutingStore, StatusPatch, StatusStore, SupervisorId, Timestamp,
};
use opamp_store::postgres::{PostgresConfig, PostgresStore};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5440/postgres";
const TTL: Duration = Duration::from_secs(10);

fn url() -> String {
    std::env::var("OPAMP_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A schema name no other fixture, in this run or an earlier one, has used.
fn fresh_schema() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "t_{}_{}_{}",
        std::process::id(),
        started.as_millis() % 100_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(schema: &str, clock: Arc<dyn Clock>) -> PostgresStore {
    let config = PostgresConfig::new(url()).with_schema(schema).with_max_connections(8);
    connect_with(config, clock).await
}

async fn connect_with(config: PostgresConfig, clock: Arc<dyn Clock>) -> PostgresStore {
    let url = url();
    PostgresStore::connect_with_clock(&config, clock)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {url}: {err} ({:?}).\nStart it with \
             `scripts/services/postgres start /tmp/opamp-postgres`, or point OPAMP_TEST_POSTGRES_URL at a server.",
                std::error::Error::source(&err)
            )
        })
}

/// A migrated store in a fresh schema, judging leases by `clock`.
async fn store_with(clock: Arc<ManualClock>) -> PostgresStore {
    let store = connect(&fresh_schema(), clock).await;
    store.migrate().await.expect("migrating a fresh schema");
    store
}

async fn fixture() -> StoreFixture {
    let clock = Arc::new(ManualClock::starting_now());
    StoreFixture::new(Arc::new(store_with(clock.clone()).await), clock)
}

opamp_core::store_conformance!(fixture);

/// The rollout and runtime scenarios' bus: the store is what they test.
async fn memory_bus() -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new())
}

opamp_core::rollout_scenarios!(fixture, memory_bus);
opamp_core::runtime_scenarios!(fixture, memory_bus);

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn supervisor(name: &str) -> SupervisorId {
    SupervisorId::new(name).unwrap()
}

/// Runs `sql` against the store's schema, as an operator editing rows by hand would.
async fn by_hand(store: &PostgresStore, sql: &str) {
    sqlx::query(sql)
        .execute(store.pool())
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
}

#[track_caller]
fn assert_names(err: &Error, parts: &[&str]) {
    let text = err.to_string();
    for part in parts {
        assert!(text.contains(part), "{text:?} should name {part:?}");
    }
}

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// Two stores (two supervisor processes) claiming the same fresh devices at
/// once, eight claimants per device: per device one `Acquired`, the others a
/// chain of takeovers each naming a distinct predecessor, and the last
/// claimant is the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_of_new_devices_each_learn_the_truth() {
    const DEVICES: usize = 40;
    const CLAIMANTS: usize = 8;
    let clock = Arc::new(ManualClock::starting_now());
    let first = Arc::new(store_with(clock.clone()).await);
    let second = Arc::new(connect(first.schema(), clock.clone()).await);
    for n in 0..DEVICES {
        let d = device(&format!("raced-{n}"));
        let start = Arc::new(Barrier::new(CLAIMANTS));
        let mut tasks = JoinSet::new();
        for c in 0..CLAIMANTS {
            let store = if c % 2 == 0 { first.clone() } else { second.clone() };
            let (s, start) = (supervisor(&format!("s{c}")), start.clone());
            tasks.spawn(async move {
                start.wait().await;
                (s, store.claim(&d, &s, TTL).await.unwrap())
            });
        }
        let mut acquired = 0;
        let mut replaced = BTreeSet::new();
        for (s, claim) in tasks.join_all().await {
            match claim {
                Claim::Acquired => acquired += 1,
                Claim::TakenOver { previous } => {
                    assert_ne!(previous, s, "{d}");
                    assert!(replaced.insert(previous), "{d}: {previous} was replaced twice");
                }
                Claim::Renewed => panic!("{d}: {s} claimed once but renewed"),
            }
        }
        assert_eq!(acquired, 1, "{d}: exactly one claimant found it free");
        let owner = first.lookup(&d).await.unwrap().expect("someone holds it");
        assert!(!replaced.contains(&owner), "{d}: the owner {owner} was replaced");
        assert_eq!(replaced.len(), CLAIMANTS - 1, "{d}");
    }
}

/// A batch renewal of 1,000 leases races takeovers of half of them from
/// another store: no takeover is overwritten, and renew reports exactly the
/// devices taken before it ran or none it still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_renewal_never_overwrites_a_concurrent_takeover() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(store_with(clock.clone()).await);
    let other = Arc::new(connect(store.schema(), clock.clone()).await);
    let (s1, s2) = (supervisor("s1"), supervisor("s2"));
    let devices: Vec<DeviceId> = (0..1_000).map(|n| device(&format!("batch-{n:04}"))).collect();
    for d in &devices {
        store.claim(d, &s1, TTL).await.unwrap();
    }
    let taken: Vec<DeviceId> = devices.iter().step_by(2).copied().collect();
    let taker = {
        let (other, taken) = (other.clone(), taken.clone());
        tokio::spawn(async move {
            for d in &taken {
                assert_eq!(
                    other.claim(d, &s2, TTL).await.unwrap(),
                    Claim::TakenOver { previous: s1 }
                );
            }
        })
    };
    let mut lost = BTreeSet::new();
    while !taker.is_finished() {
        lost.extend(store.renew(&s1, &devices, TTL).await.unwrap());
    }
    taker.await.unwrap();
    lost.extend(store.renew(&s1, &devices, TTL).await.unwrap());

    let taken_set: BTreeSet<DeviceId> = taken.iter().copied().collect();
    assert_eq!(lost, taken_set, "renew reports every taken device and no other");
    let owners = store.lookup_many(&devices).await.unwrap();
    for (d, owner) in devices.iter().zip(owners) {
        let expected = if taken_set.contains(d) { s2 } else { s1 };
        assert_eq!(owner, Some(expected), "{d}");
    }
}

/// Hundreds of lookups at once, many of them abandoned half way (leaving an
/// answer unread on a lane's connection): the lanes answer each with its
/// device's owner at its own time, and the store with no lanes (every lookup
/// through the pool) answers alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_abandoned_lookups_are_answered_each_its_own() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(store_with(clock.clone()).await);
    let pooled = Arc::new(
        connect_with(
            PostgresConfig::new(url())
                .with_schema(store.schema())
                .with_lookup_connections(0),
            clock.clone(),
        )
        .await,
    );
    let devices: Vec<DeviceId> = (0..300).map(|n| device(&format!("looked-{n}"))).collect();
    for (n, d) in devices.iter().enumerate() {
        // Every third device is never claimed; every fifth lapses at once.
        match n % 15 {
            0 | 3 | 6 | 9 | 12 => {}
            5 | 10 => store
                .claim(d, &supervisor(&format!("s{}", n % 4)), Duration::from_millis(1))
                .await
                .map(drop)
                .unwrap(),
            _ => store
                .claim(d, &supervisor(&format!("s{}", n % 4)), TTL)
                .await
                .map(drop)
                .unwrap(),
        }
    }
    clock.advance(Duration::from_millis(1));
    let expected = store.lookup_many(&devices).await.unwrap();
    for round in 0..4 {
        let mut tasks = JoinSet::new();
        for (n, d) in devices.iter().copied().enumerate() {
            let store = if (n + round) % 7 == 0 {
                pooled.clone()
            } else {
                store.clone()
            };
            let handle = tasks.spawn(async move { (n, store.lookup(&d).await.unwrap()) });
            // Abandon every tenth lookup, in whatever state it is.
            if n % 10 == round {
                handle.abort();
            }
        }
        let mut answered = 0;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((n, owner)) => {
                    assert_eq!(owner, expected[n], "{}", devices[n]);
                    answered += 1;
                }
                Err(err) => assert!(err.is_cancelled(), "{err}"),
            }
        }
        assert!(answered >= devices.len() * 9 / 10, "{answered} answered");
    }
    // Lookups started and dropped before their answer leave the lanes working.
    for d in &devices[..50] {
        let lookup = store.lookup(d);
        drop(tokio::time::timeout(Duration::from_micros(1), lookup).await);
    }
    assert_eq!(store.lookup_many(&devices).await.unwrap(), expected);
    for (n, d) in devices.iter().enumerate().step_by(11) {
        assert_eq!(store.lookup(d).await.unwrap(), expected[n], "{d}");
    }
}

#[tokio::test]
async fn purge_expired_deletes_only_lapsed_rows() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = store_with(clock.clone()).await;
    let s1 = supervisor("s1");
    for n in 0..30 {
        let ttl = if n < 20 { TTL } else { TTL * 6 };
        store.claim(&device(&format!("p{n}")), &s1, ttl).await.unwrap();
    }
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    clock.advance(TTL);
    assert_eq!(store.purge_expired().await.unwrap(), 20);
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    assert_eq!(store.lookup(&device("p25")).await.unwrap(), Some(s1));
    assert_eq!(store.claim(&device("p1"), &s1, TTL).await.unwrap(), Claim::Acquired);
}

// ---------------------------------------------------------------------------
// Schema and connection
// ---------------------------------------------------------------------------

#[tokio::test]
async fn migrate_is_idempotent_and_schemas_are_isolated() {
    let clock = Arc::new(ManualClock::starting_now());
    let a = store_with(clock.clone()).await;
    a.migrate().await.expect("migrating twice changes nothing");
    let b = store_with(clock.clone()).await;
    let (d1, s1) = (device("d1"), supervisor("s1"));
    a.claim(&d1, &s1, TTL).await.unwrap();
    a.update_status(&d1, &StatusPatch::new().online(s1, clock.now()))
        .await
        .unwrap();
    assert_eq!(b.lookup(&d1).await.unwrap(), None);
    assert_eq!(b.status(&d1).await.unwrap(), None);
    assert_eq!(b.claim(&d1, &supervisor("s2"), TTL).await.unwrap(), Claim::Acquired);
    assert_eq!(a.lookup(&d1).await.unwrap(), Some(s1));

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(a.pool())
        .await
        .unwrap();
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count() as i64;
    assert_eq!(applied, shipped, "sqlx's bookkeeping lives in the store's schema");
}

#[tokio::test]
async fn a_schema_never_migrated_says_so() {
    let store = connect(&fresh_schema(), Arc::new(ManualClock::starting_now())).await;
    let err = store.lookup(&device("d1")).await.unwrap_err();
    assert_names(&err, &["lookup of device d1", "has PostgresStore::migrate run"]);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_the_password_stays_hidden() {
    let config =
        PostgresConfig::new("postgres://u:hunter2@127.0.0.1:1/db").with_acquire_timeout(Duration::from_secs(2));
    let err = PostgresStore::connect(&config).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_names(&err, &["127.0.0.1:1"]);
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");

    for bad in ["mysql://x", "postgres://h:port/db"] {
        let err = PostgresStore::connect(&PostgresConfig::new(bad)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err:?}");
        assert_names(&err, &["postgres url"]);
    }
    let err = PostgresStore::connect(&PostgresConfig::new(url()).with_schema("Bad-Name"))
        .await
        .unwrap_err();
    assert_names(&err, &["postgres schema \"Bad-Name\""]);
}

// ---------------------------------------------------------------------------
// Bad data: rows edited by hand
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_lease_edited_into_an_invalid_supervisor_id_names_the_row() {
    let store = store_with(Arc::new(ManualClock::starting_now())).await;
    let (d1, d2, s1) = (device("d1"), device("d2"), supervisor("s1"));
    store.claim(&d1, &s1, TTL).await.unwrap();
    store.claim(&d2, &s1, TTL).await.unwrap();
    by_hand(
        &store,
        "UPDATE device_lease SET supervisor_id = 'not a supervisor' WHERE device_id = 'd1'",
    )
    .await;

    let err = store.lookup(&d1).await.unwrap_err();
    assert_names(
        &err,
        &[
            "device_lease row device_id=\"d1\"",
            "column supervisor_id",
            "\"not a supervisor\"",
        ],
    );
    let pooled = connect_with(
        PostgresConfig::new(url())
            .with_schema(store.schema())
            .with_lookup_connections(0),
        Arc::new(ManualClock::starting_now()),
    )
    .await;
    let err = pooled.lookup(&d1).await.unwrap_err();
    assert_names(&err, &["device_lease row device_id=\"d1\"", "column supervisor_id"]);
    let err = store.lookup_many(&[d2, d1]).await.unwrap_err();
    assert_names(&err, &["device_lease row device_id=\"d1\"", "column supervisor_id"]);
    let err = store.claim(&d1, &supervisor("s2"), TTL).await.unwrap_err();
    assert_names(&err, &["device_lease row device_id=\"d1\"", "column claimed_from"]);
    assert_eq!(store.lookup(&d2).await.unwrap(), Some(s1), "other rows still read");
}

#[tokio::test]
async fn a_status_row_edited_into_bad_values_names_the_row_and_column() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = store_with(clock.clone()).await;
    let s1 = supervisor("s1");
    for d in ["d1", "d2", "d3", "d4"] {
        store
            .update_status(&device(d), &StatusPatch::new().online(s1, clock.now()))
            .await
            .unwrap();
    }
    by_hand(
        &store,
        "UPDATE device_registry SET device_id = 'bad id' WHERE device_id = 'd2'",
    )
    .await;
    by_hand(
        &store,
        "UPDATE device_registry SET status = 'sideways' WHERE device_id = 'd3'",
    )
    .await;
    by_hand(
        &store,
        "UPDATE device_registry SET labels = '[1, 2]' WHERE device_id = 'd4'",
    )
    .await;

    let err = store.online_devices(&PageRequest::first(10)).await.unwrap_err();
    assert_names(&err, &["device_registry row device_id=\"bad id\"", "column device_id"]);
    let err = store.status(&device("d3")).await.unwrap_err();
    assert_names(
        &err,
        &["device_registry row device_id=\"d3\"", "column status", "\"sideways\""],
    );
    let err = store.status(&device("d4")).await.unwrap_err();
    assert_names(&err, &["device_registry row device_id=\"d4\"", "column labels"]);
    assert!(store.status(&device("d1")).await.unwrap().is_some());
}

#[tokio::test]
async fn templates_edited_or_missing_are_errors_naming_them() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = store_with(clock.clone()).await;
    let bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[SERVICE]\n"))
        .unwrap();
    let v1 = ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v1").unwrap());
    let v2 = ConfigRef::new(v1.agent_type, ConfigVersion::new("v2").unwrap());
    for v in [v1, v2] {
        store
            .put_template(&ConfigTemplate::new(v, bundle.clone(), "alice", clock.now()))
            .await
            .unwrap();
    }

    // A missing template: the errors name the template and the device.
    let missing = ConfigRef::new(v1.agent_type, ConfigVersion::new("v9").unwrap());
    let err = store.set_desired(&device("d1"), &missing).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_names(&err, &["fluentbit/v9", "device d1"]);
    let err = store.set_latest(&missing).await.unwrap_err();
    assert_names(&err, &["fluentbit/v9", "latest of fluentbit"]);

    // Content edited by hand no longer matches its hash; text that is not JSON is named too.
    by_hand(
        &store,
        r#"UPDATE config_templates SET config_data = '{"x": {"text": "edited"}}' WHERE version = 'v1'"#,
    )
    .await;
    let err = store.template(&v1).await.unwrap_err();
    assert_names(
        &err,
        &[
            "config_templates row template_id=\"fluentbit/v1\"",
            "column config_data",
            "hashes to",
        ],
    );
    by_hand(
        &store,
        "UPDATE config_templates SET config_data = 'not json' WHERE version = 'v1'",
    )
    .await;
    let err = store.template(&v1).await.unwrap_err();
    assert_names(&err, &["template_id=\"fluentbit/v1\"", "column config_data", "JSON"]);

    // A desired config whose template was deleted behind the foreign key's back.
    store.set_desired(&device("d1"), &v2).await.unwrap();
    by_hand(
        &store,
        "ALTER TABLE device_desired_config DROP CONSTRAINT device_desired_config_agent_type_version_fkey",
    )
    .await;
    by_hand(&store, "DELETE FROM config_templates WHERE version = 'v2'").await;
    let err = store.desired_template(&device("d1")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_names(&err, &["fluentbit/v2", "device d1"]);
    by_hand(
        &store,
        "UPDATE device_desired_config SET version = 'v 2' WHERE device_id = 'd1'",
    )
    .await;
    let err = store.desired(&device("d1")).await.unwrap_err();
    assert_names(&err, &["device_desired_config row device_id=\"d1\"", "column version"]);
}

// ---------------------------------------------------------------------------
// The command audit log
// ---------------------------------------------------------------------------

fn command(d: &str, at: Timestamp) -> Command {
    Command::new(
        device(d),
        CommandKind::SetEmission { state: true },
        at,
        Duration::from_secs(30),
    )
}

#[tokio::test]
async fn commands_and_outcomes_are_recorded_once() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = store_with(clock.clone()).await;
    let s1 = supervisor("s1");
    let issued = clock.now();
    let sent = command("device-5", issued);
    assert!(store.record_command(&sent, Some(&s1), "alice").await.unwrap());
    assert!(
        !store.record_command(&sent, Some(&s1), "alice").await.unwrap(),
        "a redelivery"
    );

    let entry = store
        .audit_entry(&sent.correlation_id)
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(entry.command, sent);
    assert_eq!(entry.supervisor, Some(s1));
    assert_eq!(entry.initiated_by, "alice");
    assert_eq!(entry.outcome, None, "pending");
    assert_eq!(entry.created_at, issued);
    assert_eq!(entry.completed_at, None);

    clock.advance(Duration::from_millis(1_250));
    let failed = CommandOutcome::Failed {
        reason: "reload returned 1".into(),
    };
    assert!(store.record_outcome(&sent.correlation_id, &failed).await.unwrap());
    assert!(
        !store
            .record_outcome(&sent.correlation_id, &CommandOutcome::Acked)
            .await
            .unwrap(),
        "the first outcome stands"
    );
    let entry = store.audit_entry(&sent.correlation_id).await.unwrap().unwrap();
    assert_eq!(entry.outcome, Some(failed));
    assert_eq!(entry.completed_at, Some(clock.now()));

    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_message FROM command_audit WHERE id = $1")
            .bind(entry.id)
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), error.as_deref()),
        ("failed", Some("reload returned 1"))
    );
    let kind: String = sqlx::query_scalar("SELECT payload->>'command' FROM command_audit WHERE id = $1")
        .bind(entry.id)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(kind, "toggle_emission", "the payload is the Appendix B JSON, as JSONB");

    let unknown = CorrelationId::new();
    let err = store
        .record_outcome(&unknown, &CommandOutcome::Acked)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_names(&err, &[&unknown.to_string()]);
    assert_eq!(store.audit_entry(&unknown).await.unwrap(), None);

    let err = store
        .record_command(&command("device-5", issued), None, &"x".repeat(65))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert_names(&err, &["device device-5", "character varying(64)"]);
}

#[tokio::test]
async fn the_audit_log_pages_by_device_and_by_time() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = store_with(clock.clone()).await;
    let start = clock.now();
    let mut sent = Vec::new();
    for n in 0..60 {
        // Two commands per millisecond: the keyset must order ties by id.
        let at = start.saturating_add(Duration::from_millis(n / 2));
        let cmd = command(if n % 3 == 0 { "other" } else { "device-5" }, at);
        store.record_command(&cmd, None, "ci").await.unwrap();
        sent.push(cmd);
    }
    let of_device: Vec<CorrelationId> = sent
        .iter()
        .filter(|c| c.device.as_str() == "device-5")
        .map(|c| c.correlation_id)
        .collect();

    for limit in [1, 7, 40, 1_000] {
        let mut listed = Vec::new();
        let mut request = PageRequest::first(limit);
        loop {
            let page = store.audit_by_device(&device("device-5"), &request).await.unwrap();
            assert!(page.items.len() <= limit);
            listed.extend(page.items.iter().map(|e| e.command.correlation_id));
            match page.next {
                Some(cursor) => request = PageRequest::after(cursor, limit),
                None => break,
            }
        }
        assert_eq!(listed, of_device, "pages of {limit}, oldest first");
    }

    // [start + 5 ms, start + 20 ms): commands 10..40.
    let (from, to) = (
        start.saturating_add(Duration::from_millis(5)),
        start.saturating_add(Duration::from_millis(20)),
    );
    let mut listed = Vec::new();
    let mut request = PageRequest::first(8);
    loop {
        let page = store.audit_between(from, to, &request).await.unwrap();
        listed.extend(page.items.iter().map(|e| e.command.correlation_id));
        match page.next {
            Some(cursor) => request = PageRequest::after(cursor, 8),
            None => break,
        }
    }
    let expected: Vec<CorrelationId> = sent[10..40].iter().map(|c| c.correlation_id).collect();
    assert_eq!(listed, expected);

    let err = store
        .audit_by_device(&device("device-5"), &PageRequest::after(Cursor::new("yesterday"), 5))
        .await
        .unwrap_err();
    assert_names(&err, &["page cursor \"yesterday\""]);
}

#[tokio::test]
async fn an_audit_row_edited_by_hand_names_itself() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = store_with(clock.clone()).await;
    let sent = command("device-5", clock.now());
    store.record_command(&sent, None, "alice").await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT id FROM command_audit")
        .fetch_one(store.pool())
        .await
        .unwrap();

    by_hand(
        &store,
        r#"UPDATE command_audit SET payload = jsonb_set(payload, '{device_id}', '"bad id"')"#,
    )
    .await;
    let err = store.audit_entry(&sent.correlation_id).await.unwrap_err();
    assert_names(
        &err,
        &[&format!("command_audit row id={id}"), "column payload", "device_id"],
    );

    by_hand(&store, "UPDATE command_audit SET payload = NULL, status = 'exploded'").await;
    let err = store
        .audit_by_device(&device("device-5"), &PageRequest::first(5))
        .await
        .unwrap_err();
    assert_names(&err, &[&format!("command_audit row id={id}"), "column payload"]);
}

/// A store whose lookup lanes hold connections can be dropped after its
/// runtime is gone (a pooled connection would need the runtime to go back to
/// its pool).
#[test]
fn a_store_with_busy_lanes_drops_outside_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let store = runtime.block_on(async {
        let store = store_with(Arc::new(ManualClock::starting_now())).await;
        let device = DeviceId::new("lane-holder").unwrap();
        assert_eq!(store.lookup(&device).await.unwrap(), None);
        store
    });
    drop(runtime);
    drop(store);
}

/// A store whose connections name themselves `schema`, so tests can find
/// its lookup connections in `pg_stat_activity`.
async fn named_store(schema: &str, pipelined: bool) -> Arc<PostgresStore> {
    let separator = if url().contains('?') { '&' } else { '?' };
    let config = PostgresConfig::new(format!("{}{separator}application_name={schema}", url()))
        .with_schema(schema)
        .with_max_connections(16)
        .with_lookup_connections(8)
        .with_pipelined_lookups(pipelined);
    let store = Arc::new(connect_with(config, Arc::new(ManualClock::starting_now())).await);
    store.migrate().await.expect("migrating a fresh schema");
    store
}

/// How many of the store's connections last ran the lookup statement.
async fn lookup_connections(store: &PostgresStore) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
         AND query LIKE 'SELECT supervisor_id FROM device_lease WHERE device_id = $1 %'",
    )
    .bind(store.schema())
    .fetch_one(store.pool())
    .await
    .expect("counting the lookup connections")
}

/// `tasks` tasks, each making 100 lookups one after the other.
async fn concurrent_lookups(store: &Arc<PostgresStore>, tasks: usize) {
    let mut lookups = JoinSet::new();
    for task in 0..tasks {
        let store = store.clone();
        lookups.spawn(async move {
            for n in 0..100 {
                store.lookup(&device(&format!("device-{task}-{n}"))).await.unwrap();
            }
        });
    }
    while let Some(done) = lookups.join_next().await {
        done.expect("a lookup task");
    }
}

/// One lookup at a time keeps one lookup connection, and `tasks` at once
/// open a few more, never more than configured; `Debug` says `state`.
async fn lookup_connections_open_as_needed(pipelined: bool, tasks: usize, state: &str) {
    let store = named_store(&fresh_schema(), pipelined).await;
    for n in 0..50 {
        assert_eq!(store.lookup(&device(&format!("device-{n}"))).await.unwrap(), None);
    }
    assert_eq!(
        lookup_connections(&store).await,
        1,
        "one lookup at a time uses one connection"
    );
    assert!(format!("{store:?}").contains(state), "{store:?}");

    concurrent_lookups(&store, tasks).await;
    let open = lookup_connections(&store).await;
    assert!(
        (2..=8).contains(&open),
        "{open} connections open after {tasks} concurrent lookups"
    );
}

/// A pipelined connection carries several lookups at once, so it takes
/// more than 8 at once to open a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_lookup_connections_open_as_concurrency_needs_them() {
    lookup_connections_open_as_needed(true, 64, "1 of 8 connections open").await;
}

/// With pipelining off, lookup lanes (sqlx connections) carry one lookup
/// at a time each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_lanes_open_as_concurrency_needs_them() {
    lookup_connections_open_as_needed(false, 16, "not used: turned off").await;
}

/// A pipelined connection killed under load: the lookups it had in flight
/// go through the pool, none fails or answers wrong, and the next lookups
/// open a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_survive_their_connection_being_killed() {
    let store = named_store(&fresh_schema(), true).await;
    let owner = supervisor("s1");
    let devices: Vec<DeviceId> = (0..200).map(|n| device(&format!("device-{n}"))).collect();
    for d in &devices {
        store.claim(d, &owner, TTL).await.unwrap();
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut lookups = JoinSet::new();
    for task in 0..16 {
        let (store, devices, done) = (store.clone(), devices.clone(), done.clone());
        lookups.spawn(async move {
            let mut n = task;
            while !done.load(Ordering::Relaxed) {
                let d = &devices[n % devices.len()];
                assert_eq!(store.lookup(d).await.expect("a lookup"), Some(owner), "{d}");
                n += 7;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Only the pipelined connections have run the lookup yet (the pool ran the
    // claims): the pool's connections, which answer for them now, live on.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 \
         AND query LIKE 'SELECT supervisor_id FROM device_lease%' AND pid <> pg_backend_pid()",
    )
    .bind(store.schema())
    .fetch_all(store.pool())
    .await
    .expect("terminating the lookup connections");
    assert!(!killed.is_empty() && killed.iter().all(|k| *k), "{killed:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    done.store(true, Ordering::Relaxed);
    while let Some(finished) = lookups.join_next().await {
        finished.expect("a lookup task");
    }
    assert_eq!(store.lookup(&devices[0]).await.unwrap(), Some(owner));
    assert!(format!("{store:?}").contains("connections open"), "{store:?}");
    assert!(lookup_connections(&store).await >= 1);
}

/// A lookup before the tables exist fails naming the missing table; once
/// they do, lookups work (through the pool for the second after the failed
/// attempt, then pipelined again).
#[tokio::test]
async fn a_lookup_before_migrating_names_the_missing_table() {
    let schema = fresh_schema();
    let separator = if url().contains('?') { '&' } else { '?' };
    let config = PostgresConfig::new(format!("{}{separator}application_name={schema}", url()))
        .with_schema(&schema)
        .with_max_connections(8);
    let store = connect_with(config, Arc::new(ManualClock::starting_now())).await;
    let err = store.lookup(&device("device-1")).await.unwrap_err();
    assert_names(&err, &["device_lease", "device-1"]);

    store.migrate().await.unwrap();
    assert_eq!(store.lookup(&device("device-1")).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(store.lookup(&device("device-1")).await.unwrap(), None);
    // Four lookup connections: at most half the pool's eight.
    assert!(format!("{store:?}").contains("1 of 4 connections open"), "{store:?}");
}

/// Pipelined connections authenticate as the server asks: SCRAM-SHA-256,
/// MD5 and a cleartext password (the roles `scripts/services/postgres`
/// names in pg_hba.conf), with the password percent-decoded from the URL.
/// Against another server (`OPAMP_TEST_POSTGRES_URL`) this test needs
/// those pg_hba.conf lines too, so it only runs against the default one.
#[tokio::test]
async fn pipelined_lookups_authenticate_by_scram_md5_and_password() {
    if std::env::var("OPAMP_TEST_POSTGRES_URL").is_ok() {
        return;
    }
    let admin = store_with(Arc::new(ManualClock::starting_now())).await;
    let owner = supervisor("s1");
    admin.claim(&device("device-1"), &owner, TTL).await.unwrap();
    for (role, encryption) in [
        ("opamp_scram", "scram-sha-256"),
        ("opamp_md5", "md5"),
        ("opamp_cleartext", "scram-sha-256"),
    ] {
        // Roles are the cluster's, shared by every run: made once, their password reset each time.
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(admin.pool())
            .await
            .unwrap();
        if !exists {
            // Two test runs at once may race here; the loser's error says the role exists.
            let _ = sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
                .execute(admin.pool())
                .await;
        }
        let mut tx = admin.pool().begin().await.unwrap();
        sqlx::query(&format!("SET LOCAL password_encryption = '{encryption}'"))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(&format!("ALTER ROLE {role} PASSWORD 'an open secret'"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        for grant in [
            format!("GRANT USAGE ON SCHEMA {} TO {role}", admin.schema()),
            format!("GRANT SELECT ON {}.device_lease TO {role}", admin.schema()),
        ] {
            by_hand(&admin, &grant).await;
        }

        let config = PostgresConfig::new(format!("postgres://{role}:an%20open%20secret@127.0.0.1:5440/postgres"))
            .with_schema(admin.schema())
            .with_max_connections(2)
            .with_lookup_connections(1);
        let store = connect_with(config, Arc::new(ManualClock::starting_now())).await;
        assert_eq!(store.lookup(&device("device-1")).await.unwrap(), Some(owner), "{role}");
        assert!(
            format!("{store:?}").contains("1 of 1 connections open"),
            "{role}: the lookup went through the pool: {store:?}"
        );
    }
}

/// The connection listening for command endings is left half-open (no byte
/// passes, and no FIN or reset comes): within a few response timeouts the
/// store notices, listens on a fresh connection, and endings are announced
/// again (those announced meanwhile are missed). A silent listener used to
/// stay silent for good: the control plane fell back to reading each
/// waited-for record every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endings_are_announced_again_after_the_listening_connection_goes_silent() {
    use opamp_core::testkit::proxy::FaultProxy;
    use opamp_core::{CommandRecord, CommandState, TrackingStore};
    if std::env::var("OPAMP_TEST_POSTGRES_URL").is_ok() {
        return;
    }
    let proxy = FaultProxy::start("127.0.0.1:5440".parse().unwrap()).await.unwrap();
    let config = PostgresConfig::new(format!("postgres://postgres@{}/postgres", proxy.addr()))
        .with_schema(fresh_schema())
        .with_max_connections(4)
        .with_acquire_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_millis(500));
    let store = connect_with(config, Arc::new(ManualClock::starting_now())).await;
    store.migrate().await.unwrap();
    let mut endings = store.watch_endings().await.unwrap();
    let ends = |name: &str| {
        let command = Command::new(
            device(name),
            CommandKind::Restart,
            Timestamp::now(),
            Duration::from_secs(30),
        );
        let record = CommandRecord::new(command, Some(supervisor("s1")), CommandState::Pending);
        let mut ended = record.clone();
        ended.complete(&CommandOutcome::Acked, Timestamp::now());
        (record, ended)
    };
    let (before, ended) = ends("before");
    store.insert_command(&before).await.unwrap();
    store.update_command(&ended).await.unwrap();
    let told = tokio::time::timeout(Duration::from_secs(5), endings.next()).await;
    assert_eq!(told.ok().flatten(), Some(before.correlation_id()));

    proxy.half_open();
    // Ends announced while the listener is silent are missed; keep ending
    // commands until one is told, through fresh connections (the pool's went
    // silent too: each write waits its deadline, then goes through another).
    let started = std::time::Instant::now();
    let mut told_again = None;
    for n in 0..40 {
        let (after, ended) = ends(&format!("after-{n}"));
        if store.insert_command(&after).await.is_err() || store.update_command(&ended).await.is_err() {
            continue;
        }
        if let Ok(Some(id)) = tokio::time::timeout(Duration::from_millis(500), endings.next()).await {
            assert_eq!(id, after.correlation_id(), "only this end is announced");
            told_again = Some(started.elapsed());
            break;
        }
    }
    let took = told_again.expect("endings announced again after the listener went silent");
    assert!(took < Duration::from_secs(10), "announced again after {took:?}");
}
