//! What the REST API tests share: a fleet (memory store and bus, a supervisor,
//! in-process agents, a control plane) and the API served on loopback.

#![allow(dead_code)] // each test binary uses its own part of this module

pub(crate) mod http;
pub(crate) mod webdriver;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::MemoryBus;
use opamp_core::runtime::agent::{Agent, MemoryApplier};
use opamp_core::runtime::control_plane::{ControlPlane, ControlPlaneConfig};
use opamp_core::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use opamp_core::testkit::{eventually, spawn_agent};
use opamp_core::transport::channel::{self, ChannelConnector};
use opamp_core::transport::{Capabilities, DeviceHello};
use opamp_core::{AgentType, Bus, DeviceId, Labels, Store, SupervisorId};
use opamp_store::memory::MemoryStore;
use opamp_transport::http_api::{self, ApiConfig, ApiToken, Role, ServeConfig};

pub(crate) const WAIT: Duration = Duration::from_secs(15);
pub(crate) const OPERATOR: &str = "operator-secret-for-tests-0001";
pub(crate) const READER: &str = "read-only-secret-for-tests-0001";

pub(crate) fn did(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// Tokens for an operator (`ops`) and a reader (`viewer`).
pub(crate) fn api_config() -> ApiConfig {
    ApiConfig::new()
        .token(ApiToken::new("ops", OPERATOR, Role::Operator).unwrap())
        .token(ApiToken::new("viewer", READER, Role::ReadOnly).unwrap())
}

/// A running fleet on the memory backends.
pub(crate) struct Fleet {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) control: ControlPlane,
    pub(crate) supervisor: Option<RunningSupervisor>,
    pub(crate) connector: ChannelConnector,
    pub(crate) agents: Vec<(Arc<Agent>, tokio::sync::oneshot::Sender<()>)>,
    /// Each agent's applier, in the order the devices were given.
    pub(crate) appliers: Vec<Arc<MemoryApplier>>,
}

/// A device of the fleet: its id and labels; agent type `fluentbit`.
pub(crate) fn hello(device: &str, labels: &[(&str, &str)]) -> DeviceHello {
    let mut hello = DeviceHello::new(did(device));
    hello.capabilities = Capabilities::all_builtin();
    hello.agent_type = Some(AgentType::new("fluentbit").unwrap());
    hello.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<Labels>();
    hello
}

impl Fleet {
    /// A supervisor `s1` and one agent per hello, all online.
    pub(crate) async fn start(devices: Vec<DeviceHello>) -> Fleet {
        Self::start_on(Arc::new(MemoryStore::new()), Arc::new(MemoryBus::new()), devices).await
    }

    /// As [`start`](Self::start), on the given store and bus.
    pub(crate) async fn start_on(store: Arc<dyn Store>, bus: Arc<dyn Bus>, devices: Vec<DeviceHello>) -> Fleet {
        let (transport, connector) = channel::pair(channel::ChannelConfig::default());
        let supervisor = Supervisor::new(
            SupervisorConfig::new(SupervisorId::new("s1").unwrap()),
            store.clone(),
            bus.clone(),
        )
        .start(vec![Arc::new(transport)])
        .await
        .expect("supervisor starts");
        let control = ControlPlane::start(ControlPlaneConfig::default(), store.clone(), bus.clone())
            .await
            .expect("control plane starts");
        let mut fleet = Fleet {
            store,
            bus,
            control,
            supervisor: Some(supervisor),
            connector,
            agents: Vec::new(),
            appliers: Vec::new(),
        };
        for hello in devices {
            let device = hello.device;
            let applier = Arc::new(MemoryApplier::new());
            fleet.appliers.push(applier.clone());
            fleet
                .agents
                .push(spawn_agent(Arc::new(fleet.connector.clone()), hello, applier));
            let store = fleet.store.clone();
            eventually(&format!("{device} online"), WAIT, || {
                let store = store.clone();
                async move { matches!(store.status(&device).await, Ok(Some(s)) if s.is_online()) }
            })
            .await;
        }
        fleet
    }

    /// Serves the API with `config` on a free loopback port.
    pub(crate) async fn serve(&self, config: ApiConfig) -> SocketAddr {
        self.serve_with(config, ServeConfig::default()).await
    }

    /// The API served with `serve` settings until the test ends.
    pub(crate) async fn serve_with(&self, config: ApiConfig, serve: ServeConfig) -> SocketAddr {
        let app = http_api::router(self.control.clone(), config).expect("router");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(http_api::serve(listener, app, serve, std::future::pending()));
        addr
    }
}
