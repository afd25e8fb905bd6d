//! The `supervisor_session` check: a device's session, scripted by the
//! fuzzer, against a real supervisor over the in-process transport.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use async_trait::async_trait;

use crate::runtime::supervisor::{RunningSupervisor, Supervisor, SupervisorConfig};
use crate::transport::channel::{self, ChannelConnector, ChannelTransport};
use crate::transport::{
    AgentConnector, AgentSession, CommandAck, ConfigAck, DeviceHello, DeviceSession, DeviceTransport, FromDevice,
    Inbound, StatusReport, ToDevice,
};
use crate::{
    AgentType, Bus, Command, CommandKind, CommandOutcome, ConfigApplyState, ConfigBundle, ConfigFile, ConfigHash,
    ConfigRef, ConfigTemplate, ConfigVersion, CorrelationId, DeviceId, DeviceStatus, Error, Presence, Result,
    StatusPatch, Store, SupervisorId, Timestamp,
};

/// The devices of the fleet; a script picks its own from them.
const DEVICES: [&str; 3] = ["dev-1", "dev-2", "other-1"];
/// How long anything the supervisor does may take before the session counts as stuck.
const STUCK: Duration = Duration::from_secs(10);

/// A device's side of one session.
#[derive(Debug, Arbitrary)]
struct Script {
    device: u8,
    agent_type: Option<bool>,
    /// The hash the device says it runs: the desired template's, or another.
    runs_desired: Option<bool>,
    labels: Vec<(u8, u8)>,
    emission: bool,
    remote_config: bool,
    restart: bool,
    steps: Vec<Step>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    Heartbeat,
    Status {
        emission: Option<bool>,
        healthy: Option<bool>,
        last_error: Option<String>,
    },
    /// A command for the device from the bus: emission, restart, apply v1 or v2 (v2 has no template), custom.
    Command(u8),
    /// An answer to the last command the device got (or to one it never got).
    CommandAck {
        to_last: bool,
        outcome: u8,
        reason: String,
    },
    /// An answer to the last config pushed (or to another hash).
    ConfigAck {
        to_last: bool,
        state: u8,
        error: Option<String>,
    },
    /// A frame the transport cannot read: it refuses it, which ends the session.
    Malformed,
    Disconnect,
}

/// Feeds a scripted session from arbitrary bytes to a real supervisor over
/// the in-process transport, on `store` and `bus` (fresh, empty: the memory
/// backends in the fuzz target and the replay test).
///
/// Another supervisor owns `other-1` and `dev-2` has a status but no owner
/// when the session starts. Invariants: the session's device is routed to
/// this supervisor once registered, and while the session lasts; a refused
/// frame ends the session, releasing the route and marking the device
/// offline; no other device's route or status changes; the session ends
/// registered or closed within a deadline, never stuck; after shutdown no
/// route names this supervisor.
pub fn supervisor_session(data: &[u8], store: Arc<dyn Store>, bus: Arc<dyn Bus>) {
    let Ok(script) = Script::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(script, store, bus));
}

async fn run(script: Script, store: Arc<dyn Store>, bus: Arc<dyn Bus>) {
    let me = SupervisorId::new("supervisor-fuzz").expect("a valid id");
    let other = SupervisorId::new("supervisor-other").expect("a valid id");
    let ids = DEVICES.map(|id| DeviceId::new(id).expect("a valid id"));
    let device = ids[usize::from(script.device) % ids.len()];
    let fluentbit = AgentType::new("fluentbit").expect("a valid agent type");
    let desired = ConfigRef::new(fluentbit, ConfigVersion::new("v1").expect("a valid version"));
    let bundle = ConfigBundle::new()
        .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[SERVICE]\n"))
        .expect("a valid name");
    let now = Timestamp::now();

    // The fleet before the session.
    store
        .put_template(&ConfigTemplate::new(desired, bundle.clone(), "fuzz", now))
        .await
        .expect("a template");
    store.set_desired(&ids[0], &desired).await.expect("a desired config");
    store
        .claim(&ids[2], &other, crate::store::DEFAULT_LEASE_TTL)
        .await
        .expect("a claim");
    let mut offline = StatusPatch::new();
    offline.emission = Some(true);
    store.update_status(&ids[1], &offline).await.expect("a status");
    let before = fleet(&*store, &ids).await;

    let (transport, connector) = channel::pair(channel::ChannelConfig::default());
    let refuse_at = Arc::new(AtomicUsize::new(usize::MAX));
    let transport = Refusing {
        inner: transport,
        refuse_at: Arc::clone(&refuse_at),
    };
    let config = SupervisorConfig::new(me).shutdown_grace(Duration::from_millis(50));
    let running = Supervisor::new(config, Arc::clone(&store), Arc::clone(&bus))
        .start(vec![Arc::new(transport)])
        .await
        .expect("a supervisor starts");

    let mut hello = DeviceHello::new(device);
    hello.agent_type = script.agent_type.map(|fluent| {
        if fluent {
            fluentbit
        } else {
            AgentType::new("otelcol").expect("a valid agent type")
        }
    });
    hello.config_hash = script.runs_desired.map(|desired| {
        if desired {
            bundle.hash()
        } else {
            ConfigHash::from_slice(&[7; 32]).expect("32 bytes")
        }
    });
    for (key, value) in &script.labels {
        hello.labels.insert(format!("k{}", key % 4), format!("v{value}"));
    }
    hello.capabilities.emission = script.emission;
    hello.capabilities.remote_config = script.remote_config;
    hello.capabilities.restart = script.restart;

    let mut device_side = Device::connect(&connector, &hello).await;
    let ended = device_side
        .play(&script.steps, &*bus, &me, &refuse_at, &running, &*store)
        .await;

    if ended {
        until("the ended session releases its device", || async {
            !running.is_connected(&device) && store.lookup(&device).await.expect("a lookup").is_none()
        })
        .await;
        let status = store
            .status(&device)
            .await
            .expect("a status")
            .expect("a device once online has a status");
        assert_eq!(
            status.status,
            Presence::Offline,
            "a closed session leaves its device offline"
        );
    } else {
        assert!(running.is_connected(&device), "a session not ended is still registered");
        assert_eq!(
            store.lookup(&device).await.expect("a lookup"),
            Some(me),
            "and routed here"
        );
    }
    let mut after = fleet(&*store, &ids).await;
    let mut unchanged = before.clone();
    let at = ids.iter().position(|id| *id == device).expect("one of the fleet");
    after.remove(at);
    unchanged.remove(at);
    assert_eq!(after, unchanged, "no other device's route or status changed");

    drop(device_side);
    tokio::time::timeout(STUCK, running.shutdown())
        .await
        .expect("the supervisor shuts down");
    for id in &ids {
        assert_ne!(
            store.lookup(id).await.expect("a lookup"),
            Some(me),
            "{id} is released at shutdown"
        );
    }
}

type Snapshot = Vec<(Option<SupervisorId>, Option<DeviceStatus>)>;

async fn fleet(store: &dyn Store, ids: &[DeviceId]) -> Snapshot {
    let mut snapshot = Vec::new();
    for id in ids {
        snapshot.push((
            store.lookup(id).await.expect("a lookup"),
            store.status(id).await.expect("a status"),
        ));
    }
    snapshot
}

/// Waits for `condition` by yielding to the supervisor's tasks; panics when
/// it does not hold within [`STUCK`].
async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STUCK;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {STUCK:?}, the session is stuck"
        );
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

/// The device end of the session, and what it has been sent.
struct Device {
    /// `None` once the device hung up.
    session: Option<AgentSession>,
    device: DeviceId,
    last_command: Option<CorrelationId>,
    last_push: Option<(Option<CorrelationId>, ConfigHash)>,
    sent: usize,
}

impl Device {
    async fn connect(connector: &ChannelConnector, hello: &DeviceHello) -> Self {
        let mut session = connector
            .connect(hello)
            .await
            .expect("the in-process transport connects");
        let first = tokio::time::timeout(STUCK, session.inbound.recv())
            .await
            .expect("registered in time")
            .expect("the channel reads");
        assert!(
            matches!(first, Some(ToDevice::Registered(_))),
            "the first message to a device registers it, got {first:?}"
        );
        Device {
            session: Some(session),
            device: hello.device,
            last_command: None,
            last_push: None,
            sent: 0,
        }
    }

    /// Plays `steps`; true when the session ended (refused or disconnected).
    async fn play(
        &mut self,
        steps: &[Step],
        bus: &dyn Bus,
        me: &SupervisorId,
        refuse_at: &AtomicUsize,
        running: &RunningSupervisor,
        store: &dyn Store,
    ) -> bool {
        for step in steps {
            assert_eq!(
                store.lookup(&self.device).await.expect("a lookup"),
                Some(*me),
                "a registered device is routed to its session's supervisor"
            );
            let message = match step {
                Step::Heartbeat => FromDevice::Heartbeat,
                Step::Status {
                    emission,
                    healthy,
                    last_error,
                } => FromDevice::Status(StatusReport {
                    emission: *emission,
                    healthy: *healthy,
                    last_error: last_error.clone(),
                }),
                Step::Command(kind) => {
                    let kind = match kind % 5 {
                        0 => CommandKind::SetEmission { state: kind % 2 == 0 },
                        1 => CommandKind::Restart,
                        2 | 3 => CommandKind::ApplyConfig {
                            agent_type: AgentType::new("fluentbit").expect("a valid agent type"),
                            version: ConfigVersion::new(if kind % 5 == 2 { "v1" } else { "v2" })
                                .expect("a valid version"),
                        },
                        _ => CommandKind::Custom {
                            capability: "com.example.diag".into(),
                            message_type: "dump".into(),
                            data: vec![*kind],
                        },
                    };
                    let command = Command::new(self.device, kind, Timestamp::now(), Duration::from_millis(200));
                    bus.send(me, &command).await.expect("the memory bus takes a command");
                    self.read_a_little().await;
                    continue;
                }
                Step::CommandAck {
                    to_last,
                    outcome,
                    reason,
                } => {
                    let id = self.last_command.filter(|_| *to_last).unwrap_or_default();
                    let outcome = match outcome % 3 {
                        0 => CommandOutcome::Acked,
                        1 => CommandOutcome::Failed { reason: reason.clone() },
                        _ => CommandOutcome::Unsupported { reason: reason.clone() },
                    };
                    FromDevice::CommandAck(CommandAck::new(id, outcome))
                }
                Step::ConfigAck { to_last, state, error } => {
                    let (id, hash) = self
                        .last_push
                        .filter(|_| *to_last)
                        .unwrap_or((None, ConfigHash::from_slice(&[9; 32]).expect("32 bytes")));
                    let state = match state % 3 {
                        0 => ConfigApplyState::Applied,
                        1 => ConfigApplyState::Applying,
                        _ => ConfigApplyState::Failed,
                    };
                    FromDevice::ConfigAck(Box::new(ConfigAck::new(id, hash, state, error.clone())))
                }
                Step::Malformed => {
                    refuse_at.store(self.sent + 1, Ordering::SeqCst);
                    self.send(FromDevice::Heartbeat).await;
                    return true;
                }
                Step::Disconnect => {
                    self.session = None;
                    return true;
                }
            };
            self.send(message).await;
            self.read_a_little().await;
        }
        // Whatever the steps did, the session is still there.
        until("the session is registered", || async {
            running.is_connected(&self.device)
        })
        .await;
        false
    }

    async fn send(&mut self, message: FromDevice) {
        let session = self.session.as_ref().expect("a device sends only while connected");
        tokio::time::timeout(STUCK, session.outbound.send(message))
            .await
            .expect("the supervisor reads its device in time")
            .expect("the session is open");
        self.sent += 1;
    }

    /// Lets the supervisor act, and notes what reached the device.
    async fn read_a_little(&mut self) {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        let Some(session) = self.session.as_mut() else {
            return;
        };
        // A zero timeout still polls the (cancel-safe) receive once.
        while let Ok(Ok(Some(message))) = tokio::time::timeout(Duration::ZERO, session.inbound.recv()).await {
            match message {
                ToDevice::Command(command) => self.last_command = Some(command.correlation_id),
                ToDevice::ConfigPush(push) => self.last_push = Some((push.correlation_id, push.hash)),
                _ => {}
            }
        }
    }
}

/// The in-process transport, with a way to make the session's n-th frame
/// one the transport cannot read (as a gRPC or OpAMP server refuses bytes).
#[derive(Debug)]
struct Refusing {
    inner: ChannelTransport,
    refuse_at: Arc<AtomicUsize>,
}

#[async_trait]
impl DeviceTransport for Refusing {
    fn name(&self) -> &'static str {
        "fuzz"
    }

    async fn accept(&self) -> Result<Option<DeviceSession>> {
        Ok(self.inner.accept().await?.map(|session| {
            let inbound = Counted {
                inner: session.inbound,
                read: 0,
                refuse_at: Arc::clone(&self.refuse_at),
            };
            DeviceSession::new(session.hello, session.peer, Box::new(inbound), session.outbound)
        }))
    }
}

#[derive(Debug)]
struct Counted {
    inner: Box<dyn Inbound<FromDevice>>,
    read: usize,
    refuse_at: Arc<AtomicUsize>,
}

impl Inbound<FromDevice> for Counted {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<Option<FromDevice>>> {
        let message = std::task::ready!(self.inner.poll_recv(cx))?;
        if message.is_some() {
            self.read += 1;
            if self.read == self.refuse_at.load(Ordering::SeqCst) {
                return std::task::Poll::Ready(Err(Error::invalid_input(format!(
                    "frame {}: not a message",
                    self.read
                ))));
            }
        }
        std::task::Poll::Ready(Ok(message))
    }
}
