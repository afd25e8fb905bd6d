//! What the transport tests share: a fleet (store, bus, clock, events) and
//! the end-to-end scenarios every transport must pass unchanged.

// Each test crate uses the parts its transport needs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::agent::MemoryApplier;
use opamp_core::runtime::fluent_bit::{FluentBitApplier, FluentBitConfig};
use opamp_core::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use opamp_core::testkit::fluent_bit::ReloadStandIn;
use opamp_core::testkit::{eventually, spawn_agent};
use opamp_core::transport::{
    AgentConnector, AgentSession, Capabilities, DeviceHello, DeviceTransport, FailoverConnector, ToDevice,
};
use opamp_core::{
    AgentType, Bus, Clock, Command, CommandBus, CommandKind, CommandOutcome, ConfigBundle, ConfigFile, ConfigRef,
    ConfigStore, ConfigTemplate, ConfigVersion, CorrelationId, DeviceEvent, DeviceId, EventBus, EventKind, GroupName,
    ManualClock, RoutingStore, StatusStore, Store, Subscription, SupervisorId, Timestamp,
};
use opamp_store::memory::MemoryStore;
use opamp_transport::auth::FleetKey;

pub(crate) const WAIT: Duration = Duration::from_secs(10);

pub(crate) fn key() -> FleetKey {
    FleetKey::new(b"integration-test fleet secret").unwrap()
}

pub(crate) fn did(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

pub(crate) fn sid(id: &str) -> SupervisorId {
    SupervisorId::new(id).unwrap()
}

pub(crate) fn hello(device: &str) -> DeviceHello {
    let mut hello = DeviceHello::new(did(device));
    hello.capabilities = Capabilities::all_builtin();
    hello.agent_type = Some(AgentType::new("fluentbit").unwrap());
    hello
}

pub(crate) fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A transport under test: how a supervisor serves it and a device reaches it.
#[async_trait]
pub(crate) trait Wire: Send + Sync + 'static {
    /// The server side.
    type Transport: DeviceTransport;

    /// A transport on a free loopback port, and the URL devices use.
    async fn bind(&self) -> (Arc<Self::Transport>, String);

    /// Stops the transport, as when its process dies.
    async fn stop(transport: &Self::Transport);

    /// The connector of `device`, holding its credential.
    fn connector(&self, url: &str, device: &str) -> Arc<dyn AgentConnector>;
}

/// A store, a bus, and an event subscription to watch outcomes on.
pub(crate) struct Fleet {
    pub(crate) store: Arc<MemoryStore>,
    pub(crate) bus: Arc<MemoryBus>,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) events: Subscription<DeviceEvent>,
}

impl Fleet {
    pub(crate) async fn new() -> Self {
        let clock = Arc::new(ManualClock::starting_now());
        let bus = Arc::new(MemoryBus::new());
        let events = bus.subscribe_events(&GroupName::new("test").unwrap()).await.unwrap();
        Fleet {
            store: Arc::new(MemoryStore::with_clock(clock.clone())),
            bus,
            clock,
            events,
        }
    }

    /// A supervisor `id` serving `transports`.
    pub(crate) async fn start(
        &self,
        id: &str,
        transports: Vec<Arc<dyn DeviceTransport>>,
        supervisor: impl FnOnce(SupervisorConfig) -> SupervisorConfig,
    ) -> RunningSupervisor {
        let store: Arc<dyn Store> = self.store.clone();
        let bus: Arc<dyn Bus> = self.bus.clone();
        Supervisor::new(supervisor(SupervisorConfig::new(sid(id))), store, bus)
            .with_clock(self.clock.clone())
            .start(transports)
            .await
            .unwrap()
    }

    /// A supervisor `id` serving `wire` on a free port.
    pub(crate) async fn serve<W: Wire>(&self, wire: &W, id: &str) -> (RunningSupervisor, Arc<W::Transport>, String) {
        let (transport, url) = wire.bind().await;
        let running = self
            .start(id, vec![transport.clone() as Arc<dyn DeviceTransport>], |c| c)
            .await;
        (running, transport, url)
    }

    pub(crate) async fn send(&self, to: &str, device: &str, kind: CommandKind) -> CorrelationId {
        let command = Command::new(did(device), kind, self.clock.now(), WAIT);
        self.bus.send(&sid(to), &command).await.unwrap();
        command.correlation_id
    }

    pub(crate) async fn outcome(&mut self, id: CorrelationId) -> CommandOutcome {
        self.outcomes(&[id]).await.remove(0)
    }

    /// The outcomes of the commands `ids`, in that order, whichever completes first.
    pub(crate) async fn outcomes(&mut self, ids: &[CorrelationId]) -> Vec<CommandOutcome> {
        let mut found: Vec<Option<CommandOutcome>> = vec![None; ids.len()];
        let waited = tokio::time::timeout(WAIT, async {
            while found.iter().any(Option::is_none) {
                let delivery = self.events.next().await.unwrap().expect("event stream open");
                if let EventKind::CommandCompleted {
                    correlation_id,
                    outcome,
                } = &delivery.message().kind
                {
                    if let Some(at) = ids.iter().position(|id| id == correlation_id) {
                        found[at] = Some(outcome.clone());
                    }
                }
                delivery.ack().await.unwrap();
            }
        })
        .await;
        waited.expect("the commands' outcomes within the deadline");
        found.into_iter().flatten().collect()
    }

    pub(crate) async fn owner_is(&self, device: &str, owner: Option<&str>) {
        let (store, device, owner) = (self.store.clone(), did(device), owner.map(sid));
        eventually(&format!("{device} owned by {owner:?}"), WAIT, || {
            let store = store.clone();
            async move { store.lookup(&device).await.unwrap() == owner }
        })
        .await;
    }
}

/// A device that registers and then only does what the test says.
pub(crate) async fn raw_device(connector: &dyn AgentConnector, device: &str) -> AgentSession {
    let mut session = connector.connect(&hello(device)).await.unwrap();
    let first = session.inbound.recv().await.unwrap();
    assert!(matches!(first, Some(ToDevice::Registered(_))), "{first:?}");
    session
}

/// A CA, a server certificate for `localhost`, and client certificates by Common Name.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "opamp test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki {
            ca_pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate and key (PEM) for `common_name`, valid for the host `localhost`.
    pub(crate) fn issue(&self, common_name: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// One [`Pki`] and a `localhost` server certificate for every test of a binary.
pub(crate) fn shared_pki() -> &'static (Pki, (String, String)) {
    static PKI: std::sync::OnceLock<(Pki, (String, String))> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let pki = Pki::new();
        let server = pki.issue("supervisor");
        (pki, server)
    })
}

pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("opamp-transport-{name}-{}", CorrelationId::new()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the scenarios ----

/// Emission and configuration reach a Fluent Bit agent: bus → supervisor →
/// transport → agent runtime → Fluent Bit reload → ack → store → event.
pub(crate) async fn emission_and_config_reach_a_fluent_bit_agent<W: Wire>(wire: &W) {
    let mut fleet = Fleet::new().await;
    let (s1, _transport, url) = fleet.serve(wire, "s1").await;
    let dir = TempDir::new("e2e");
    let fluent_bit = ReloadStandIn::start(dir.0.join("fluent-bit.conf")).await.unwrap();
    let applier = FluentBitApplier::new(FluentBitConfig::new(&dir.0).reload_url(fluent_bit.url())).unwrap();
    let (agent, _stop) = spawn_agent(wire.connector(&url, "edge-1"), hello("edge-1"), Arc::new(applier));
    fleet.owner_is("edge-1", Some("s1")).await;

    let toggle = fleet
        .send("s1", "edge-1", CommandKind::SetEmission { state: true })
        .await;
    assert_eq!(fleet.outcome(toggle).await, CommandOutcome::Acked);
    assert!(*agent.emission().borrow());
    let store = fleet.store.clone();
    eventually("emission recorded", WAIT, || {
        let store = store.clone();
        async move { store.status(&did("edge-1")).await.unwrap().is_some_and(|s| s.emission) }
    })
    .await;

    let config = ConfigRef::new(AgentType::new("fluentbit").unwrap(), ConfigVersion::new("v2").unwrap());
    let text = "[SERVICE]\n    flush 1\n[OUTPUT]\n    name stdout\n";
    let bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", text))
        .unwrap();
    let template = ConfigTemplate::new(config, bundle.clone(), "test", Timestamp::now());
    fleet.store.put_template(&template).await.unwrap();
    let apply = CommandKind::ApplyConfig {
        agent_type: config.agent_type,
        version: config.version,
    };
    let id = fleet.send("s1", "edge-1", apply).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    assert_eq!(
        fluent_bit.reloads(),
        vec![text.to_owned()],
        "Fluent Bit reloaded the pushed file"
    );
    let status = fleet.store.status(&did("edge-1")).await.unwrap().unwrap();
    assert_eq!(status.config_version, Some(config.version));
    assert_eq!(status.config_hash, Some(bundle.hash()));

    // A config Fluent Bit refuses fails with its reason, and the file is restored.
    let broken = ConfigRef::new(config.agent_type, ConfigVersion::new("v3").unwrap());
    let bad = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[BROKEN"))
        .unwrap();
    let template = ConfigTemplate::new(broken, bad, "test", Timestamp::now());
    fleet.store.put_template(&template).await.unwrap();
    let apply = CommandKind::ApplyConfig {
        agent_type: broken.agent_type,
        version: broken.version,
    };
    let id = fleet.send("s1", "edge-1", apply).await;
    match fleet.outcome(id).await {
        CommandOutcome::Failed { reason } => assert!(reason.contains("refused"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(dir.0.join("fluent-bit.conf")).unwrap(), text);
    let status = fleet.store.status(&did("edge-1")).await.unwrap().unwrap();
    assert_eq!(status.config_version, Some(config.version), "still the applied one");
    assert!(status.last_error.is_some_and(|e| e.contains("refused")));
    s1.shutdown().await;
}

/// A device that comes back through another supervisor: the old one closes
/// its stale session, and its release is fenced off.
pub(crate) async fn a_takeover_closes_the_stale_session_and_fences_its_release<W: Wire>(wire: &W) {
    let fleet = Fleet::new().await;
    let (s1, _t1, url1) = fleet.serve(wire, "s1").await;
    let (s2, _t2, url2) = fleet.serve(wire, "s2").await;
    let mut old = raw_device(&*wire.connector(&url1, "d1"), "d1").await;
    fleet.owner_is("d1", Some("s1")).await;

    // The device comes back through s2 while its old session with s1 lingers.
    let _new = raw_device(&*wire.connector(&url2, "d1"), "d1").await;
    fleet.owner_is("d1", Some("s2")).await;
    s1.renew_leases().await;
    let ended = tokio::time::timeout(WAIT, old.inbound.recv())
        .await
        .expect("closed in time");
    assert!(matches!(ended, Ok(None)), "s1 closed the stale session: {ended:?}");
    eventually("s1 dropped d1", WAIT, || async { !s1.is_connected(&did("d1")) }).await;
    fleet.owner_is("d1", Some("s2")).await;
    let status = fleet.store.status(&did("d1")).await.unwrap().unwrap();
    assert_eq!(status.supervisor, Some(sid("s2")), "s1's offline mark was fenced off");
    assert!(s2.is_connected(&did("d1")));
    s2.shutdown().await;
    s1.shutdown().await;
}

/// A supervisor dies: its leases lapse and its device re-homes to another.
pub(crate) async fn a_dead_supervisors_leases_lapse_and_the_device_rehomes<W: Wire>(wire: &W) {
    let fleet = Fleet::new().await;
    let (s1, t1, url1) = fleet.serve(wire, "s1").await;
    let (s2, _t2, url2) = fleet.serve(wire, "s2").await;
    let failover = FailoverConnector::new(vec![wire.connector(&url1, "d1"), wire.connector(&url2, "d1")]).unwrap();
    let (agent, _stop) = spawn_agent(Arc::new(failover), hello("d1"), Arc::new(MemoryApplier::new()));
    fleet.owner_is("d1", Some("s1")).await;

    // s1 dies without releasing anything; its lease is still there until it lapses.
    s1.abort();
    W::stop(&t1).await;
    fleet.clock.advance(Duration::from_secs(300));
    // The agent reconnects through s2, whose claim finds the lapsed lease.
    fleet.owner_is("d1", Some("s2")).await;
    eventually("agent connected", WAIT, || async { *agent.connected().borrow() }).await;

    // Devices that stay away: their leases lapse and lookups say nobody holds them.
    let (s3, t3, url3) = fleet.serve(wire, "s3").await;
    let away = raw_device(&*wire.connector(&url3, "d2"), "d2").await;
    fleet.owner_is("d2", Some("s3")).await;
    s3.abort();
    W::stop(&t3).await;
    drop(away);
    fleet.clock.advance(Duration::from_secs(300));
    assert_eq!(fleet.store.lookup(&did("d2")).await.unwrap(), None);
    let _back = raw_device(&*wire.connector(&url2, "d2"), "d2").await;
    fleet.owner_is("d2", Some("s2")).await;
    s2.shutdown().await;
}

/// A revoked device is disconnected (a `disconnect` to its supervisor) and
/// refused at its next registration with an error that names the
/// revocation, as the transport answers a bad credential; reinstated, it
/// registers again.
pub(crate) async fn a_revoked_device_is_refused_naming_its_revocation<W: Wire>(wire: &W) {
    use opamp_core::{Revocation, RevocationStore};
    let mut fleet = Fleet::new().await;
    let (s1, _transport, url) = fleet.serve(wire, "s1").await;
    let connector = wire.connector(&url, "r1");
    let mut session = raw_device(&*connector, "r1").await;
    fleet.owner_is("r1", Some("s1")).await;

    let revocation = Revocation::new(did("r1"), "token stolen", Timestamp::now()).unwrap();
    assert!(fleet.store.revoke(&revocation).await.unwrap());
    let reason = "revoked".to_owned();
    let id = fleet.send("s1", "r1", CommandKind::Disconnect { reason }).await;
    assert_eq!(fleet.outcome(id).await, CommandOutcome::Acked);
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match session.inbound.recv().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("closed in time");
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");

    let refused = match connector.connect(&hello("r1")).await {
        Ok(_) => panic!("a revoked device registered"),
        Err(err) => err,
    };
    assert!(
        matches!(refused, opamp_core::Error::Unauthenticated { .. }),
        "refused as a bad credential is: {refused:?}"
    );
    let text = refused.to_string();
    assert!(
        text.contains("r1 was revoked at") && text.contains("token stolen"),
        "{text}"
    );
    fleet.owner_is("r1", None).await;

    assert!(fleet.store.reinstate(&did("r1")).await.unwrap());
    let _back = raw_device(&*connector, "r1").await;
    fleet.owner_is("r1", Some("s1")).await;
    s1.shutdown().await;
}
