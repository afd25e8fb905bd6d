//! The design's Phase 3 as real processes (issue #10): a Redis, a
//! Kafka-protocol broker, 3 `opamp-server`s, 3 `opamp-supervisor`s and a
//! device simulator (`opamp-loadgen fleet`), all on loopback
//! ([`opamp_examples::deployment`]); each test breaks one part and checks
//! that no command is lost. A smaller fleet than the benchmark's
//! (`opamp-loadgen deployment`), and shorter leases and timeouts, so each test
//! runs in seconds.
//!
//! Needs `redis-server` and the tansu broker (`scripts/services/redis` and
//! `scripts/services/kafka` install them). The tests take turns: each
//! deployment is a dozen processes on a 2-core machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opamp_core::{DeviceId, Store, SupervisorId};
use opamp_examples::StoreUrl;
use opamp_examples::deployment::{BrokerStorage, Deployment, DeploymentConfig, parse_fleet_report};
use opamp_examples::rest::RestClient;
use serde_json::Value;

const SERVERS: usize = 3;
const SUPERVISORS: usize = 3;
const DEVICES: usize = 240;
const LEASE: Duration = Duration::from_secs(6);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// One deployment at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh deployment in a folder of its own, or `None` (locally, loudly) when
/// Redis or the broker is not installed. Under CI a missing one fails.
async fn deploy(name: &str) -> Option<Deployment> {
    deploy_with(name, |config| config).await
}

/// [`deploy`], with the test's settings changed by `configure`.
async fn deploy_with(name: &str, configure: impl FnOnce(DeploymentConfig) -> DeploymentConfig) -> Option<Deployment> {
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_opamp-server"))
        .parent()
        .expect("binaries live in a folder")
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("opamp-deployment-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = configure(
        DeploymentConfig::new(&dir, bin_dir)
            .size(SERVERS, SUPERVISORS, DEVICES, 1)
            .timings(LEASE, COMMAND_TIMEOUT),
    );
    let missing: Vec<String> = [&config.tansu, &config.redis_server]
        .into_iter()
        .filter(|program| which(program).is_none())
        .map(|program| program.display().to_string())
        .collect();
    if !missing.is_empty() {
        let message = format!(
            "{} not installed: run scripts/test, or scripts/services/redis and scripts/services/kafka",
            missing.join(" and ")
        );
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("SKIPPED (not under CI): {message}");
        return None;
    }
    match Deployment::start(config).await {
        Ok(deployment) => Some(deployment),
        Err(err) => panic!("starting the deployment in {}: {err}", dir.display()),
    }
}

/// `program` if it is a path to a file, or found on `PATH`.
fn which(program: &std::path::Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

async fn store(deployment: &Deployment) -> Arc<dyn Store> {
    let url: StoreUrl = deployment.store_url().parse().unwrap();
    opamp_examples::open_store(&url).await.unwrap()
}

fn ids(deployment: &Deployment) -> Vec<DeviceId> {
    deployment
        .devices()
        .iter()
        .map(|device| DeviceId::new(device.as_str()).unwrap())
        .collect()
}

/// Waits until every device is routed to a live supervisor (and its status
/// says online there); how long that took.
async fn every_device_routable(deployment: &Deployment, limit: Duration) -> Duration {
    let (store, devices, live) = (store(deployment).await, ids(deployment), deployment.live_supervisors());
    let start = Instant::now();
    loop {
        let owners = store.lookup_many(&devices).await;
        let unrouted = match &owners {
            Ok(owners) => owners
                .iter()
                .filter(|owner| !owner.as_ref().is_some_and(|owner| live.contains(&owner.to_string())))
                .count(),
            Err(_) => devices.len(),
        };
        if unrouted == 0 {
            let mut offline = 0;
            for device in &devices {
                let status = store.status(device).await.ok().flatten();
                if !status.is_some_and(|status| status.is_online()) {
                    offline += 1;
                }
            }
            if offline == 0 {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < limit,
            "{unrouted} of {} devices still not routed to a live supervisor after {limit:?} ({owners:?})",
            devices.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every device is routable, stores the template `fluentbit/v1`
/// through the first server, and returns clients of every server.
async fn ready_with_template(deployment: &Deployment) -> Vec<RestClient> {
    every_device_routable(deployment, Duration::from_secs(30)).await;
    let servers = deployment.live_servers();
    servers[0]
        .create_template("fluentbit", "v1", "[SERVICE]\n    Flush 1\n")
        .await
        .unwrap();
    servers
}

/// The final record of every command, read from `server` (waiting for each to end).
async fn outcomes(server: &RestClient, ids: &[String]) -> Vec<Value> {
    outcomes_within(server, ids, "30s").await
}

/// [`outcomes`], waiting up to `wait` (e.g. `60s`) for each.
async fn outcomes_within(server: &RestClient, ids: &[String], wait: &str) -> Vec<Value> {
    let mut records = Vec::new();
    for id in ids {
        let record = server.command(id, wait).await.unwrap();
        assert_ne!(record["state"], "pending", "command {id} never ended: {record}");
        records.push(record);
    }
    records
}

/// Sends `device` (the `n`th) the config `fluentbit/v1` and a toggle, through
/// two servers in turn; the commands' ids.
async fn config_and_toggle(servers: &[RestClient], n: usize, device: &str) -> (String, String) {
    let config = servers[n % SERVERS]
        .apply_config(device, "fluentbit", "v1")
        .await
        .unwrap();
    let toggle = servers[(n + 1) % SERVERS].toggle(device, true).await.unwrap();
    (config, toggle)
}

/// Every record ended with a definite outcome: acked, or a failure that says what happened.
fn assert_all_definite(records: &[Value]) {
    for record in records {
        let state = record["state"].as_str().unwrap();
        assert!(
            ["acked", "failed", "timed_out", "device_offline"].contains(&state),
            "{record}"
        );
    }
}

/// No device applied its config twice, whatever was retried: at most one
/// application per device, and at least one per acknowledged push.
fn assert_applied_once(applied: usize, acked_configs: usize, repeats: usize) {
    assert!(
        (acked_configs..=DEVICES).contains(&applied),
        "applied {applied}, acked {acked_configs} (repeats answered {repeats})"
    );
}

fn count(records: &[Value], state: &str) -> usize {
    records.iter().filter(|record| record["state"] == state).count()
}

/// The simulator's closing report: (configs applied, repeats answered).
async fn stop(deployment: Deployment) -> (usize, usize) {
    let reports = deployment.stop().await.unwrap();
    let (mut applied, mut repeats) = (0, 0);
    for report in reports {
        let (devices, _, a, r) = parse_fleet_report(&report).unwrap_or_else(|| panic!("report {report:?}"));
        assert_eq!(devices, DEVICES);
        applied += a;
        repeats += r;
    }
    (applied, repeats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_to_any_server_reach_their_device_and_end_acked() {
    let _turn = TURN.lock().await;
    let Some(deployment) = deploy("commands").await else {
        return;
    };
    let servers = ready_with_template(&deployment).await;

    let store = store(&deployment).await;
    let mut configs = Vec::new();
    for (n, device) in deployment.devices().iter().enumerate() {
        // A toggle through one server, waited for; a config through the next.
        let record = servers[n % SERVERS].toggle_and_wait(device, true).await.unwrap();
        assert_eq!(record["state"], "acked", "{record}");
        let owner = store
            .lookup(&DeviceId::new(device.as_str()).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            record["supervisor"],
            owner.to_string(),
            "delivered by the device's owner: {record}"
        );
        configs.push(
            servers[(n + 1) % SERVERS]
                .apply_config(device, "fluentbit", "v1")
                .await
                .unwrap(),
        );
    }
    let records = outcomes(&servers[2], &configs).await;
    assert_eq!(count(&records, "acked"), DEVICES, "{records:?}");
    let status = store
        .status(&DeviceId::new("dev-000007").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(status.emission, "{status:?}");
    assert_eq!(status.config_version.map(|v| v.to_string()).as_deref(), Some("v1"));
    // Every supervisor took some toggles from the bus, and says how long they took to come.
    for n in 0..SUPERVISORS {
        let metrics = deployment.supervisor_metrics(n).await.expect("alive").unwrap();
        assert!(
            metrics.contains("opamp_command_pickup_seconds_count{kind=\"toggle_emission\"}"),
            "supervisor {n}: {metrics}"
        );
    }

    let (applied, _) = stop(deployment).await;
    assert_eq!(applied, DEVICES, "each device applied its config once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_killed_under_load_loses_no_command_and_applies_none_twice() {
    let _turn = TURN.lock().await;
    let Some(mut deployment) = deploy("kill-supervisor").await else {
        return;
    };
    let servers = ready_with_template(&deployment).await;

    // Load: every device gets a config and a toggle, in turn, through the
    // servers in turn; supervisor 0 dies a third of the way through.
    let (mut toggles, mut configs) = (Vec::new(), Vec::new());
    for (n, device) in deployment.devices().iter().enumerate() {
        if n == DEVICES / 3 {
            deployment.kill_supervisor(0).await.unwrap();
        }
        let (config, toggle) = config_and_toggle(&servers, n, device).await;
        configs.push(config);
        toggles.push(toggle);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved = every_device_routable(&deployment, Duration::from_secs(30)).await;
    eprintln!("every device routable again {moved:?} after the load ended");

    let toggled = outcomes(&servers[1], &toggles).await;
    let configured = outcomes(&servers[2], &configs).await;
    assert_all_definite(&toggled);
    assert_all_definite(&configured);
    let acked_configs = count(&configured, "acked");
    assert!(acked_configs > DEVICES * 2 / 3, "most configs acked: {acked_configs}");
    let (applied, repeats) = stop(deployment).await;
    assert_applied_once(applied, acked_configs, repeats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_leaves_its_commands_queryable_from_the_others() {
    let _turn = TURN.lock().await;
    let Some(mut deployment) = deploy("kill-server").await else {
        return;
    };
    every_device_routable(&deployment, Duration::from_secs(30)).await;
    let servers = deployment.live_servers();
    let mut issued = Vec::new();
    for device in deployment.devices().iter().take(60) {
        issued.push(servers[0].toggle(device, true).await.unwrap());
    }
    deployment.kill_server(0).await.unwrap();
    assert!(
        servers[0].toggle("dev-000000", false).await.is_err(),
        "server 0 is gone"
    );
    // Its commands are tracked in the store: the others answer for them at once.
    for id in &issued {
        servers[1 + id.len() % 2].command(id, "1ms").await.unwrap();
    }
    // The event partitions it held move when the group rebalances: against
    // Kafka once its group session lapses; tansu 0.6.0 keeps a dead member
    // in its groups until a member joins, so here its replacement does that,
    // as an orchestrator restarting the process would.
    tokio::time::sleep(Duration::from_secs(8)).await;
    deployment.restart_server(0).await.unwrap();
    let records = outcomes(&servers[1], &issued).await;
    assert_eq!(count(&records, "acked"), issued.len(), "{records:?}");
    let records = outcomes(&servers[2], &issued[..10]).await;
    assert_eq!(count(&records, "acked"), 10);
    // And the others carry on.
    for (n, device) in deployment.devices().iter().enumerate().take(30) {
        let record = servers[1 + n % 2].toggle_and_wait(device, false).await.unwrap();
        assert_eq!(record["state"], "acked", "{record}");
    }
    stop(deployment).await;
}

/// A supervisor paused (SIGSTOP, as by a stalled VM or a long GC pause) for
/// more than twice its lease: its devices notice the silence (a 1 s HTTP/2
/// ping), move to the others, which take their leases over; when it wakes it
/// is a zombie, its timers and queues running on state that is no longer
/// true. It must not write: no lease or status of a device that moved names
/// it afterwards, the devices stay where they went, and every command ends
/// with a definite outcome, none applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_paused_past_its_lease_writes_nothing_when_it_wakes() {
    let _turn = TURN.lock().await;
    let Some(deployment) = deploy_with("pause-supervisor", |config| config.patience(Duration::from_secs(1))).await
    else {
        return;
    };
    let servers = ready_with_template(&deployment).await;
    let (store, devices) = (store(&deployment).await, ids(&deployment));
    let paused = SupervisorId::new(Deployment::supervisor_id(0)).unwrap();
    let owners = store.lookup_many(&devices).await.unwrap();
    let held: Vec<DeviceId> = devices
        .iter()
        .zip(&owners)
        .filter(|(_, owner)| owner.as_ref() == Some(&paused))
        .map(|(device, _)| *device)
        .collect();
    assert!(!held.is_empty(), "supervisor 0 holds devices: {owners:?}");

    // Every device gets a config and a toggle while it sleeps, spread over
    // the pause (commands to its devices first meet it asleep, then, once
    // they moved, their new supervisor).
    deployment.pause_supervisor(0).unwrap();
    let paused_at = Instant::now();
    let (mut toggles, mut configs) = (Vec::new(), Vec::new());
    for (n, device) in deployment.devices().iter().enumerate() {
        let (config, toggle) = config_and_toggle(&servers, n, device).await;
        configs.push(config);
        toggles.push(toggle);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let pause = LEASE * 2 + Duration::from_secs(2);
    tokio::time::sleep(pause.saturating_sub(paused_at.elapsed())).await;
    let moved = store.lookup_many(&held).await.unwrap();
    assert!(
        moved
            .iter()
            .all(|owner| owner.as_ref().is_some_and(|owner| *owner != paused)),
        "every device of the paused supervisor moved while it slept: {moved:?}"
    );
    deployment.resume_supervisor(0).unwrap();
    eprintln!("supervisor 0 paused {:?}, then resumed", paused_at.elapsed());

    // Give the zombie its renewals, heartbeats and queued work, then look:
    // the devices that moved are still where they went, and what the store
    // says of each is what its lease says.
    tokio::time::sleep(LEASE).await;
    let after = store.lookup_many(&held).await.unwrap();
    assert_eq!(after, moved, "the woken supervisor took no device back");
    for device in &devices {
        let owner = store.lookup(device).await.unwrap();
        let status = store.status(device).await.unwrap().expect("every device has a status");
        assert!(status.is_online(), "{device} online: {status:?}");
        assert_eq!(status.supervisor, owner, "{device}'s status names its lease's holder");
    }

    let configured = outcomes(&servers[1], &configs).await;
    let toggled = outcomes(&servers[2], &toggles).await;
    assert_all_definite(&configured);
    assert_all_definite(&toggled);
    // Not wedged: the woken supervisor and the others take commands.
    for (n, device) in deployment.devices().iter().enumerate().take(30) {
        let record = servers[n % SERVERS].toggle_and_wait(device, false).await.unwrap();
        assert_eq!(record["state"], "acked", "{record}");
    }
    let acked_configs = count(&configured, "acked");
    let (applied, repeats) = stop(deployment).await;
    eprintln!(
        "{} devices moved off the paused supervisor; configs acked {acked_configs}, applied {applied}, toggles acked {}",
        held.len(),
        count(&toggled, "acked")
    );
    assert_applied_once(applied, acked_configs, repeats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_rebuilt_within_one_renew_period() {
    let _turn = TURN.lock().await;
    let Some(mut deployment) = deploy("restart-redis").await else {
        return;
    };
    every_device_routable(&deployment, Duration::from_secs(30)).await;
    deployment.restart_redis_empty().await.unwrap();
    let owners = store(&deployment).await.lookup_many(&ids(&deployment)).await.unwrap();
    assert!(owners.iter().all(Option::is_none), "the new Redis starts empty");
    // Supervisors renew every third of the lease; a renewal that finds a
    // lease gone claims it again. The deadline leaves the loaded machine a
    // second renewal; the time it took is printed, and measured at full size
    // by `opamp-loadgen deployment`.
    let renew_period = LEASE / 3;
    let rebuilt = every_device_routable(&deployment, renew_period * 2 + Duration::from_secs(2)).await;
    eprintln!("routing and status rebuilt {rebuilt:?} after Redis came back empty (renew period {renew_period:?})");
    let servers = deployment.live_servers();
    let record = servers[1].toggle_and_wait("dev-000003", true).await.unwrap();
    assert_eq!(record["state"], "acked", "{record}");
    stop(deployment).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_acknowledged_command() {
    let _turn = TURN.lock().await;
    let Some(mut deployment) = deploy_with("restart-broker", |config| {
        config.timings(LEASE, Duration::from_secs(20))
    })
    .await
    else {
        return;
    };
    every_device_routable(&deployment, Duration::from_secs(30)).await;
    let servers = deployment.live_servers();
    // Acknowledged before the crash: the broker has the commands and their outcome events.
    let mut before = Vec::new();
    for device in deployment.devices().iter().take(40) {
        before.push(servers[0].toggle(device, true).await.unwrap());
    }
    let records = outcomes(&servers[0], &before).await;
    assert_eq!(count(&records, "acked"), before.len(), "{records:?}");

    deployment.restart_broker().await.unwrap();
    // Sent while the broker comes back: a 202 means the broker has it.
    let mut during = Vec::new();
    for device in deployment.devices().iter().skip(40).take(40) {
        if let Ok(id) = servers[1].toggle(device, true).await {
            during.push(id);
        }
    }
    // Nothing acknowledged is lost with the crash, and every command accepted
    // around it ends: acked, or (if the servers' event group forms again only
    // after its retry's deadline, which tansu 0.6.0 sometimes takes that long
    // to do) timed out; none stays pending. A command that met the broker's
    // absence is retried after its 20 s deadline and the grace: up to a minute.
    let records = outcomes(&servers[2], &before).await;
    assert_eq!(count(&records, "acked"), before.len(), "{records:?}");
    let records = outcomes_within(&servers[2], &during, "60s").await;
    let (acked, timed_out) = (count(&records, "acked"), count(&records, "timed_out"));
    assert_eq!(acked + timed_out, during.len(), "{records:?}");
    eprintln!("sent around the broker's restart: {acked} acked, {timed_out} timed out");
    // After the restart the bus carries commands to their end again (given
    // the same time as above for the event group to form again).
    let id = servers[0].toggle("dev-000001", false).await.unwrap();
    let record = outcomes_within(&servers[0], &[id], "60s").await.remove(0);
    assert_eq!(record["state"], "acked", "{record}");
    stop(deployment).await;
}

/// With the broker's log in memory, commands through every server end acked
/// just the same, and a broker restart is refused rather than losing the topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_its_log_in_memory_carries_commands_and_refuses_a_restart() {
    let _turn = TURN.lock().await;
    let Some(mut deployment) =
        deploy_with("memory-broker", |config| config.broker_storage(BrokerStorage::Memory)).await
    else {
        return;
    };
    every_device_routable(&deployment, Duration::from_secs(30)).await;
    let servers = deployment.live_servers();
    for (n, device) in deployment.devices().iter().enumerate().take(60) {
        let record = servers[n % servers.len()].toggle_and_wait(device, true).await.unwrap();
        assert_eq!(record["state"], "acked", "{record}");
    }
    let err = deployment.restart_broker().await.unwrap_err();
    assert!(err.to_string().contains("in memory"), "{err}");
    stop(deployment).await;
}
