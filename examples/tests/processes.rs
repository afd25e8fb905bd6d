//! opamp-supervisor and opamp-agent as real processes, on the live Redis and
//! Kafka-protocol broker (`scripts/services/redis` and `scripts/services/kafka`,
//! or `OPAMP_TEST_REDIS_URL` and `OPAMP_TEST_KAFKA_BROKERS`).
//!
//! The test runs the stateless control plane (`ControlPlane`) on the same
//! store and bus URLs, opened through `opamp_examples`: it sends a toggle and
//! a configuration and tracks them to their outcome; a broadcast config
//! update goes straight on the bus. Keys and topics are the test's
//! own (a fresh prefix), so it runs beside the other tests.

use base64::Engine as _;
use opamp_core::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use opamp_core::testkit::fluent_bit::ReloadStandIn;
use opamp_core::{
    AgentType, Bus, Command, CommandKind, CommandState, ConfigApplyState, ConfigBundle, ConfigFile, ConfigRef,
    ConfigTemplate, ConfigUpdate, ConfigVersion, DeviceEvent, DeviceId, EventKind, GroupName, Labels, Presence, Store,
    Subscription, SupervisorId, Target, Timestamp,
};
use opamp_examples::{BusUrl, StoreUrl, open_bus, open_store};
use tokio::time::{Instant, timeout};

mod common;
use common::{DEADLINE, Proc, kafka_brokers, redis_url, services_present, wait_until};

/// The configurations pushed to the agent; a stand-in reload accepts them (they start with `[SERVICE]`).
const FLUENT_BIT_V1: &str = "[SERVICE]\n    flush 1\n";
const FLUENT_BIT_V2: &str = "[SERVICE]\n    flush 2\n";

/// A template of one file, `fluent-bit.conf`.
fn template(config: ConfigRef, conf: &str) -> ConfigTemplate {
    let bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", conf))
        .unwrap();
    ConfigTemplate::new(config, bundle, "test", Timestamp::now())
}

/// The next event of `device` that `pick` accepts, acknowledging every event read.
async fn next_event<T>(
    events: &mut Subscription<DeviceEvent>,
    device: &DeviceId,
    mut pick: impl FnMut(&EventKind) -> Option<T>,
) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let delivery = timeout(left, events.next())
            .await
            .expect("an event before the deadline")
            .expect("reading events")
            .expect("the event stream is open");
        let (event, acker) = delivery.into_parts();
        acker.ack().await.expect("acknowledging an event");
        if &event.device == device {
            if let Some(found) = pick(&event.kind) {
                return found;
            }
        }
    }
}

/// A run id, and store and bus URLs of the run's own (a fresh key prefix and
/// topic prefix) on the live Redis and broker; `None` if they are not there.
fn fresh_urls() -> Option<(String, String, String)> {
    if !services_present(&[("Redis", redis_url()), ("Kafka-protocol broker", kafka_brokers())]) {
        return None;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let redis = redis_url();
    let separator = if redis.contains('?') { '&' } else { '?' };
    let store_url = format!("{redis}{separator}prefix=t{run}:");
    let bus_url = format!(
        "kafka://{}?topic_prefix=t{run}.&replication=1&commands_partitions=2&events_partitions=2",
        kafka_brokers()
    );
    Some((run, store_url, bus_url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_through_the_supervisor_and_a_toggle_and_a_fluent_bit_config_reach_it() {
    let Some((run, store_url, bus_url)) = fresh_urls() else {
        return;
    };
    // The control side opens the same URLs the processes are given; this makes the topics.
    let store: std::sync::Arc<dyn Store> = open_store(&store_url.parse::<StoreUrl>().unwrap()).await.unwrap();
    let open = open_bus(&bus_url.parse::<BusUrl>().unwrap()).await.unwrap();
    let bus: std::sync::Arc<dyn Bus> = open.bus();
    let mut events = bus
        .subscribe_events(&GroupName::new(format!("test-{run}")).unwrap())
        .await
        .unwrap();
    let control = ControlPlane::start(
        ControlPlaneConfig::default().event_group(GroupName::new(format!("control-{run}")).unwrap()),
        store.clone(),
        bus.clone(),
    )
    .await
    .unwrap();

    let key = base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes().repeat(2));
    let supervisor = SupervisorId::new(format!("s-{run}")).unwrap();
    let device = DeviceId::new(format!("d-{run}")).unwrap();

    let mut supervisor_proc = Proc::spawn(
        "opamp-supervisor",
        env!("CARGO_BIN_EXE_opamp-supervisor"),
        &[
            "--id".into(),
            supervisor.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--store".into(),
            store_url.clone(),
            "--bus".into(),
            bus_url.clone(),
            "--lease-ttl".into(),
            "30s".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ],
        Some(&key),
    );
    let line = supervisor_proc.first_line().await;
    let (address, metrics_address) = match line.split(' ').collect::<Vec<_>>().as_slice() {
        ["listening", grpc, "metrics", metrics] => (grpc.to_string(), metrics.to_string()),
        _ => panic!("expected `listening ADDR metrics ADDR`, got {line:?}"),
    };

    // The agent applies configuration with the Fluent Bit applier, reloading a stand-in.
    let config_dir = std::env::temp_dir().join(format!("opamp-examples-fluent-bit-{run}"));
    std::fs::create_dir_all(&config_dir).unwrap();
    let fluent_bit = ReloadStandIn::start(config_dir.join("fluent-bit.conf")).await.unwrap();
    let mut agent_proc = Proc::spawn(
        "opamp-agent",
        env!("CARGO_BIN_EXE_opamp-agent"),
        &[
            "--server".into(),
            format!("http://{address}"),
            "--device".into(),
            device.to_string(),
            "--agent-type".into(),
            "fluentbit".into(),
            "--label".into(),
            "ring=canary".into(),
            "--fluent-bit-config-dir".into(),
            config_dir.display().to_string(),
            "--fluent-bit-reload-url".into(),
            fluent_bit.url().to_owned(),
        ],
        Some(&key),
    );

    // Registration: the lease names the supervisor and the status is online, with the hello's labels.
    wait_until("the device is online under the supervisor", || {
        let (store, device) = (store.clone(), device);
        async move {
            let owner = store.lookup(&device).await.unwrap();
            let status = store.status(&device).await.unwrap();
            owner == Some(supervisor) && status.is_some_and(|status| status.status == Presence::Online)
        }
    })
    .await;
    let status = store.status(&device).await.unwrap().unwrap();
    assert_eq!(status.labels.get("ring").map(String::as_str), Some("canary"));
    assert!(!status.emission);

    // A toggle through the control plane: owner looked up, command on the bus, outcome tracked.
    let toggle = control.set_emission(&device, true).await.unwrap();
    let record = control.wait(&toggle, DEADLINE).await.unwrap();
    assert_eq!(record.state, CommandState::Acked, "{record:?}");
    assert_eq!(record.supervisor, Some(supervisor));
    assert!(store.status(&device).await.unwrap().unwrap().emission);

    // A configuration for the devices of a selector, through the control plane.
    let fluentbit = AgentType::new("fluentbit").unwrap();
    let v1 = ConfigRef::new(fluentbit, ConfigVersion::new("v1").unwrap());
    control.create_template(&template(v1, FLUENT_BIT_V1)).await.unwrap();
    let canary = Labels::from([("ring".to_owned(), "canary".to_owned())]);
    let selector = Target::Selector {
        agent_type: fluentbit,
        labels: canary.clone(),
    };
    let issued = control.apply_config(&selector, &v1).await.unwrap();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0].device, device);
    let record = control.wait(&issued[0].correlation_id, DEADLINE).await.unwrap();
    assert_eq!(record.state, CommandState::Acked, "{record:?}");
    let conf = config_dir.join("fluent-bit.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), FLUENT_BIT_V1);
    assert_eq!(fluent_bit.reloads(), [FLUENT_BIT_V1]);

    // The supervisor recorded both outcomes, and counted them where it serves its metrics.
    let (status, metrics) = common::http(&metrics_address, "GET", "/metrics", "", "").await;
    assert_eq!(status, 200);
    for kind in ["toggle_emission", "apply_config"] {
        let counted = format!("opamp_commands_total{{kind=\"{kind}\",outcome=\"acked\"}} 1");
        assert!(metrics.contains(&counted), "{counted} in {metrics}");
    }
    assert_eq!(
        common::http(&metrics_address, "GET", "/health/live", "", "").await,
        (200, "ok".to_owned())
    );

    // A broadcast config update on the bus reaches the supervisor's process too.
    let v2 = ConfigRef::new(fluentbit, ConfigVersion::new("v2").unwrap());
    control.create_template(&template(v2, FLUENT_BIT_V2)).await.unwrap();
    bus.broadcast(&ConfigUpdate::new(v2, canary, Timestamp::now()))
        .await
        .unwrap();
    next_event(&mut events, &device, |kind| match kind {
        EventKind::ConfigAck { state, error, .. } => match state {
            ConfigApplyState::Applied => Some(()),
            ConfigApplyState::Failed => panic!("the config push failed: {error:?}"),
            ConfigApplyState::Applying => None,
        },
        _ => None,
    })
    .await;
    wait_until("the store has the version applied last", || {
        let store = store.clone();
        async move {
            let status = store.status(&device).await.unwrap().unwrap();
            status.config_version == Some(v2.version)
        }
    })
    .await;
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), FLUENT_BIT_V2);
    assert_eq!(fluent_bit.reloads(), [FLUENT_BIT_V1, FLUENT_BIT_V2]);

    // A graceful stop releases the lease and marks the device offline.
    supervisor_proc.terminate().await;
    assert_eq!(store.lookup(&device).await.unwrap(), None);
    let status = store.status(&device).await.unwrap().unwrap();
    assert_eq!(status.status, Presence::Offline);
    // ... and says so on the bus; nothing of the device's comes after it.
    let from = next_event(&mut events, &device, |kind| match kind {
        EventKind::Disconnected { supervisor } => Some(*supervisor),
        _ => None,
    })
    .await;
    assert_eq!(from, supervisor);

    agent_proc.terminate().await;
    let agent_log = agent_proc.logs();
    assert!(agent_log.contains("emission set"), "{agent_log}");
    assert!(agent_log.contains("config applied"), "{agent_log}");
    // The test read and acknowledged every event of its group. The control
    // plane's group may still be reading the last ones: the bus drains them
    // into it while it runs, so the control plane stops after the bus.
    drop(events);
    open.shutdown(DEADLINE).await.unwrap();
    control.shutdown().await;
    std::fs::remove_dir_all(&config_dir).unwrap();
}

/// An operator starts `opamp-server` on a store that lost its data (its
/// generation is gone; here a fresh prefix stands for a Redis restarted
/// empty) while the broker still holds commands sent before: the server
/// refuses to start, saying what was lost and how to go on; started once
/// with `--accept-store-loss` it begins a new generation, and starts plainly
/// from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_server_refuses_a_store_that_lost_its_data_until_the_loss_is_accepted() {
    let Some((_, store_url, bus_url)) = fresh_urls() else {
        return;
    };
    // What the fleet sent before the store lost its data.
    let open = open_bus(&bus_url.parse::<BusUrl>().unwrap()).await.unwrap();
    let earlier = Command::new(
        DeviceId::new("device-1").unwrap(),
        CommandKind::SetEmission { state: true },
        Timestamp::now(),
        std::time::Duration::from_secs(30),
    );
    open.bus()
        .send(&SupervisorId::new("s1").unwrap(), &earlier)
        .await
        .unwrap();
    open.shutdown(DEADLINE).await.unwrap();

    let server = |extra: &[&str]| {
        // A token of its own: a made-up one is printed after the first line.
        let tokens = "test:operator:0123456789abcdef0123";
        let fixed = [
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store_url,
            "--bus",
            &bus_url,
            "--tokens",
            tokens,
        ];
        let mut args: Vec<String> = fixed.iter().map(|arg| arg.to_string()).collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        Proc::spawn("opamp-server", env!("CARGO_BIN_EXE_opamp-server"), &args, None)
    };
    let mut refused = server(&[]);
    let status = refused.exited().await;
    let said = refused.logs();
    assert!(!status.success(), "{said}");
    assert!(said.contains("data loss"), "{said}");
    assert!(said.contains("--accept-store-loss"), "{said}");

    let store = open_store(&store_url.parse::<StoreUrl>().unwrap()).await.unwrap();
    assert_eq!(store.generation().await.unwrap(), None, "a refusal marks nothing");
    let mut accepted = server(&["--accept-store-loss"]);
    let line = accepted.first_line().await;
    assert!(line.starts_with("listening "), "{line}");
    accepted.terminate().await;
    let generation = store.generation().await.unwrap().expect("a generation begun");

    let mut again = server(&[]);
    let line = again.first_line().await;
    assert!(line.starts_with("listening "), "{line}");
    again.terminate().await;
    assert_eq!(store.generation().await.unwrap(), Some(generation), "kept");
}
