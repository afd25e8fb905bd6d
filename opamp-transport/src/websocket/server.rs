//! The supervisor side: one HTTP/1.1 listener serving OpAMP over WebSocket
//! and plain HTTP, whose registered agents become device sessions.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opamp_core::transport::{
    DeviceLimits, DeviceSession, DeviceTransport, FromDevice, Inbound, Outbound, Receiver, ReportBucket, ToDevice,
};
use opamp_core::{DeviceId, Error, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::convert::{self, LastConfigStatus};
use super::frames::{self, Incoming};
use super::proto::{AgentToServer, ServerToAgent, ServerToAgentFlags};
use super::wire::Upgraded;
use super::{DeviceIdSource, FrameProblem, OpampAuth, OpampServerConfig, SERVER_CAPABILITIES, http, lock};
use crate::net::{AddressSlot, PerAddress};
use crate::tls::{MaybeTls, ServerStream};

/// The OpAMP [`DeviceTransport`]: serves OpAMP over WebSocket and plain HTTP
/// on one port, and hands each agent that registered with a valid
/// credential to the supervisor.
///
/// Bound and serving from [`bind`](Self::bind) on; sessions wait (up to the
/// accept queue) until [`accept`](DeviceTransport::accept) takes them.
/// [`shutdown`](Self::shutdown) stops it gracefully; dropping it does too,
/// without waiting.
#[derive(Debug)]
pub struct OpampTransport {
    local_addr: SocketAddr,
    sessions: crate::net::Accepted,
    stopping: watch::Sender<bool>,
    active: watch::Receiver<usize>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    tls: Option<Arc<crate::tls::Reloadable>>,
}

impl OpampTransport {
    /// Listens on `config.listen` and starts serving.
    ///
    /// [`Error::InvalidInput`] for a setting out of range or TLS material
    /// that does not load; [`Error::Unavailable`] if the address cannot be bound.
    pub async fn bind(config: OpampServerConfig) -> Result<Self> {
        config.validate()?;
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(crate::tls::Reloadable::new(tls, &[b"http/1.1"])?)),
            None => None,
        };
        let listener = crate::net::listen(config.listen, config.backlog)?;
        let local_addr = crate::net::local_addr(&listener, config.listen)?;
        let (sessions, accepted) = mpsc::channel(config.accept_queue);
        let (stopping, stop) = watch::channel(false);
        let (active_tx, active) = watch::channel(0usize);
        info!(%local_addr, path = %config.path, auth = ?config.auth, device_id = ?config.device_id, tls = tls.is_some(), "OpAMP device transport listening");
        let shared = Arc::new(Shared::new(config, tls.clone(), sessions, stop, active_tx));
        let server = tokio::spawn(accept_loop(shared.clone(), listener));
        let reaper = tokio::spawn(http::reap(shared));
        Ok(OpampTransport {
            local_addr,
            sessions: crate::net::Accepted::new(accepted),
            stopping,
            active,
            tasks: Mutex::new(vec![server, reaper]),
            tls,
        })
    }

    /// Serves `tls` (a renewed certificate, another client CA) to
    /// connections from now on; open connections keep theirs.
    ///
    /// [`Error::InvalidInput`] if it does not load (the old one stays), or
    /// if the transport was bound without TLS.
    pub fn reload_tls(&self, tls: &crate::tls::ServerTls) -> Result<()> {
        match &self.tls {
            Some(reloadable) => reloadable.reload(tls),
            None => Err(Error::invalid_input(
                "the OpAMP listener was bound without TLS: TLS cannot be added while it serves",
            )),
        }
    }

    /// The address it listens on (with the port picked, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections, closes WebSockets with 1001 (going away)
    /// and ends plain HTTP sessions, waiting up to `grace` for connections to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        let mut active = self.active.clone();
        let drained = tokio::time::timeout(grace, async move {
            for task in tasks {
                let _ = task.await;
            }
            let _ = active.wait_for(|n| *n == 0).await.map(drop);
        })
        .await;
        if drained.is_err() {
            warn!(local_addr = %self.local_addr, "OpAMP connections still open after the grace period; dropping them");
        }
    }
}

impl Drop for OpampTransport {
    fn drop(&mut self) {
        self.stopping.send_replace(true);
    }
}

#[async_trait]
impl DeviceTransport for OpampTransport {
    fn name(&self) -> &'static str {
        "opamp"
    }

    async fn accept(&self) -> Result<Option<DeviceSession>> {
        self.sessions.next(&self.stopping).await
    }
}

/// Waits until the transport is stopping.
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across other awaits: it is not `Send`.
    let _ = stop.wait_for(|stop| *stop).await.map(drop);
}

/// The owner of plain HTTP agents in the live registry; WebSocket connections count up from 1.
pub(super) const HTTP_OWNER: u64 = 0;

/// What every connection of one transport shares.
pub(super) struct Shared {
    pub(super) config: OpampServerConfig,
    per_address: Arc<PerAddress>,
    /// The WebSocket connections' places among their addresses' (with a
    /// cap), by owner: given back when the connection ends.
    address_slots: Mutex<HashMap<u64, Arc<AddressSlot>>>,
    tls: Option<Arc<crate::tls::Reloadable>>,
    sessions: mpsc::Sender<DeviceSession>,
    /// Instance uids with a registered agent, and which connection has each.
    live: Mutex<HashMap<[u8; 16], u64>>,
    connections: AtomicUsize,
    /// Connections not yet past a successful request.
    unverified: Arc<crate::net::Unverified>,
    pending: AtomicUsize,
    next_owner: AtomicU64,
    pub(super) http_agents: Mutex<HashMap<[u8; 16], Arc<tokio::sync::Mutex<http::HttpAgent>>>>,
    pub(super) stop: watch::Receiver<bool>,
    /// The WebSocket connections, by owner: the way a stop reaches those that are idle.
    sockets: Mutex<HashMap<u64, Arc<Socket>>>,
    /// Where connections run while they have something to do.
    runtime: tokio::runtime::Handle,
    active: watch::Sender<usize>,
}

impl Shared {
    fn new(
        config: OpampServerConfig,
        tls: Option<Arc<crate::tls::Reloadable>>,
        sessions: mpsc::Sender<DeviceSession>,
        stop: watch::Receiver<bool>,
        active: watch::Sender<usize>,
    ) -> Self {
        Shared {
            per_address: PerAddress::new(config.max_connections_per_address),
            unverified: crate::net::Unverified::new(config.max_unverified_connections),
            address_slots: Mutex::new(HashMap::new()),
            config,
            tls,
            sessions,
            live: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),

            pending: AtomicUsize::new(0),
            next_owner: AtomicU64::new(HTTP_OWNER + 1),
            http_agents: Mutex::new(HashMap::new()),
            stop,
            sockets: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            active,
        }
    }
}

/// Counts a connection task for [`OpampTransport::shutdown`] while it lives.
struct Active(Arc<Shared>);

impl Active {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.active.send_modify(|n| *n += 1);
        Active(shared.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n -= 1);
    }
}

/// TCP keepalive on every connection: probes after 60 s of silence, every
/// 10 s, 3 unanswered ones drop it (a dead agent goes after about 90 s).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, usually: wait a little instead of spinning.
                    warn!(error = %err, "accepting an OpAMP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => {
                // Idle WebSocket connections have no task to notice: wake each.
                let sockets: Vec<_> = lock(&shared.sockets).values().cloned().collect();
                for socket in sockets {
                    socket.wake_by_ref();
                }
                return;
            }
        };
        // Its place among its address's, shared with its WebSocket if it
        // becomes one (which outlives this task); none without a cap.
        let from = match shared.per_address.admit(peer) {
            Some(slot) if shared.config.max_connections_per_address > 0 => Some(Arc::new(slot)),
            Some(_) => None,
            None => continue,
        };
        let Some(unverified) = shared.unverified.admit(peer) else {
            continue;
        };
        let unverified = Arc::new(unverified);
        let _ = stream.set_nodelay(true);
        // The kernel finds dead peers (a half-open connection would keep its
        // agent's lease alive forever), at no memory cost to the process.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _active = Active::new(&shared);
            let Some((wire, certified)) = handshake(&shared, stream, peer).await else {
                return;
            };
            let certified = Arc::new(certified);
            let service = hyper::service::service_fn({
                let shared = shared.clone();
                move |request| {
                    let shared = shared.clone();
                    let certified = certified.clone();
                    let from = from.clone();
                    let unverified = unverified.clone();
                    async move {
                        let reply = route(&shared, peer, &certified, from, request).await;
                        if reply.status().is_success() || reply.status() == StatusCode::SWITCHING_PROTOCOLS {
                            unverified.verified();
                        }
                        Ok::<_, Infallible>(reply)
                    }
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(shared.config.register_timeout)
                .serve_connection(TokioIo::new(wire), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let mut stop = shared.stop.clone();
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(err) = served {
                        debug!(%peer, error = %err, "OpAMP HTTP connection ended");
                    }
                }
                _ = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

pub(super) use crate::tls::Certified;

/// The connection as hyper is to serve it: for TLS, once the handshake is
/// done (within `register_timeout`), with the device its client
/// certificate names. `None` if the handshake failed.
async fn handshake(shared: &Shared, stream: TcpStream, peer: SocketAddr) -> Option<(ServerStream, Certified)> {
    let Some(tls) = &shared.tls else {
        return Some((MaybeTls::Plain(stream), None));
    };
    match tls.handshake(stream, shared.config.register_timeout).await {
        Ok(served) => Some(served),
        Err(err) => {
            debug!(%peer, error = %err, "an OpAMP TLS handshake failed");
            None
        }
    }
}

pub(super) type Reply = Response<Full<Bytes>>;

pub(super) fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

pub(super) fn retry_later(status: StatusCode, message: String, retry_after: Duration) -> Reply {
    let mut response = reply(status, message);
    let seconds = retry_after.as_secs().max(1).to_string();
    if let Ok(value) = HeaderValue::from_str(&seconds) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

pub(super) fn unauthorized(message: String) -> Reply {
    let mut response = reply(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"opamp\", Basic realm=\"opamp\""),
    );
    response
}

async fn route(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    certified: &Certified,
    from: Option<Arc<AddressSlot>>,
    request: Request<hyper::body::Incoming>,
) -> Reply {
    if request.uri().path() != shared.config.path {
        return reply(
            StatusCode::NOT_FOUND,
            format!("the OpAMP endpoint is {}", shared.config.path),
        );
    }
    if is_upgrade(request.headers()) {
        if request.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "a WebSocket upgrade is a GET");
        }
        return upgrade(shared, peer, certified, from, request);
    }
    if request.method() == Method::POST {
        return http::post(shared, peer, certified, request).await;
    }
    reply(
        StatusCode::METHOD_NOT_ALLOWED,
        "OpAMP takes a WebSocket upgrade (GET) or a POST of application/x-protobuf",
    )
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|part| part.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

fn upgrade(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    certified: &Certified,
    from: Option<Arc<AddressSlot>>,
    mut request: Request<hyper::body::Incoming>,
) -> Reply {
    let credential = match credential(shared, request.headers(), certified) {
        Ok(credential) => credential,
        Err(problem) => return unauthorized(problem),
    };
    let version_ok = request
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return reply(
            StatusCode::BAD_REQUEST,
            "the WebSocket upgrade has no Sec-WebSocket-Key",
        );
    };
    if !version_ok {
        let mut response = reply(StatusCode::UPGRADE_REQUIRED, "only WebSocket version 13 is supported");
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let config = &shared.config;
    let open = shared.connections.fetch_add(1, Ordering::AcqRel);
    let slot = ConnectionSlot(shared.clone());
    if open >= config.max_connections {
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server has its limit of {} OpAMP connections open",
                config.max_connections
            ),
            config.retry_after,
        );
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut request);
    let shared = shared.clone();
    let counted = Counted::new(slot);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // Served as the stream hyper was given: the connection reads its own frames.
                let Ok(hyper::upgrade::Parts { io, read_buf, .. }) = upgraded.downcast::<TokioIo<ServerStream>>()
                else {
                    warn!(%peer, "an upgraded OpAMP connection is not the stream it was served on; closing it");
                    return;
                };
                let mut reader = frames::Reader::new(shared.config.message_limit(&credential));
                // Bytes the client sent right after its upgrade request. Copied
                // out: they share hyper's 8 KiB read buffer, which goes with them.
                reader.extend(&read_buf);
                drop(read_buf);
                let owner = shared.next_owner.fetch_add(1, Ordering::Relaxed);
                let connection = Connection {
                    shared,
                    stream: super::wire::upgraded(io.into_inner()),
                    reader,
                    owner,
                    credential,
                    agents: Vec::new(),
                    due_by: None,
                    _counted: counted,
                };
                // Held beside the connection, not in it (an idle one stays
                // small), and let go with it.
                if let Some(from) = from {
                    lock(&connection.shared.address_slots).insert(owner, from);
                }
                // Its own task, holding only the connection, while it has
                // something to do: this one, with the upgrade's state, ends here.
                Socket::open(connection);
            }
            Err(err) => debug!(%peer, error = %err, "the WebSocket upgrade failed"),
        }
    });
    let mut response = reply(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Counts an open WebSocket connection against `max_connections`.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A served WebSocket connection's counts while it lives: its slot, and
/// [`Active`]'s count for [`OpampTransport::shutdown`], in one handle (one
/// `Arc`, not two) to keep an idle connection small.
struct Counted(ConnectionSlot);

impl Counted {
    fn new(slot: ConnectionSlot) -> Self {
        slot.0.active.send_modify(|n| *n += 1);
        Counted(slot)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.0.active.send_modify(|n| *n -= 1);
    }
}

// ---- credentials ----

/// What a request's credential proved.
#[derive(Debug, Clone)]
pub(super) enum Credential {
    /// This device, and only it.
    Device(DeviceId),
    /// A bearer fleet token, to check against the device an agent reports.
    Token(String),
    /// The fleet's shared credential: any device.
    Fleet,
}

/// The credential in `headers`, checked as far as it can be before the agent reports.
pub(super) fn credential(
    shared: &Shared,
    headers: &HeaderMap,
    certified: &Certified,
) -> std::result::Result<Credential, String> {
    if let OpampAuth::ClientCertificate = shared.config.auth {
        return match certified {
            Some(Ok(device)) => Ok(Credential::Device(*device)),
            Some(Err(problem)) => Err(problem.clone()),
            None => Err("a client certificate is required".into()),
        };
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("an Authorization header is required")?
        .to_str()
        .map_err(|_| "the Authorization header is not text")?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    match (&shared.config.auth, scheme.to_ascii_lowercase().as_str()) {
        (OpampAuth::FleetToken(key), "basic") => {
            let (user, token) = basic(rest)?;
            let device = DeviceId::new(&user).map_err(|err| format!("the Basic user name: {err}"))?;
            key.verify(&device, &token).map_err(|err| err.to_string())?;
            Ok(Credential::Device(device))
        }
        (OpampAuth::FleetToken(key), "bearer") => {
            if rest.is_empty() {
                return Err("the bearer token is empty".into());
            }
            // When the id comes from the instance uid it is known now.
            let early = match shared.config.device_id {
                DeviceIdSource::ServiceInstanceId => None,
                source => headers
                    .get("opamp-instance-uid")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|text| uuid::Uuid::parse_str(text).ok())
                    .and_then(|uid| convert::device_id(source, uid.as_bytes(), None).ok()),
            };
            match early {
                Some(device) => key
                    .verify(&device, rest)
                    .map(|()| Credential::Device(device))
                    .map_err(|err| err.to_string()),
                // A v2 token names its device: checked in full now, before
                // the upgrade or a byte of the body, so a bad one costs nothing.
                None if !rest.starts_with("v1.") => key
                    .device_of(rest)
                    .map(Credential::Device)
                    .map_err(|err| err.to_string()),
                // A v1 token names no device: checked against the first message.
                None => Ok(Credential::Token(rest.to_owned())),
            }
        }
        (OpampAuth::Basic { username, password }, "basic") => {
            let (user, pass) = basic(rest)?;
            if constant_time_eq(user.as_bytes(), username.as_bytes())
                & constant_time_eq(pass.as_bytes(), password.as_bytes())
            {
                Ok(Credential::Fleet)
            } else {
                Err("the Basic user name or password is wrong".into())
            }
        }
        (OpampAuth::FleetToken(_), other) => Err(format!(
            "the Authorization scheme {other:?} is not accepted: use Bearer or Basic with a fleet token"
        )),
        (OpampAuth::Basic { .. }, other) => {
            Err(format!("the Authorization scheme {other:?} is not accepted: use Basic"))
        }
        (OpampAuth::ClientCertificate, _) => unreachable!("answered from the certificate above"),
    }
}

fn basic(encoded: &str) -> std::result::Result<(String, String), String> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|err| format!("the Basic credential is not base64: {err}"))?;
    let text = String::from_utf8(decoded).map_err(|_| "the Basic credential is not UTF-8")?;
    let (user, pass) = text
        .split_once(':')
        .ok_or("the Basic credential has no ':' between user name and password")?;
    Ok((user.to_owned(), pass.to_owned()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Credential {
    /// Whether this credential lets an agent be `device`; why not if it does not.
    pub(super) fn admits(&self, shared: &Shared, device: &DeviceId) -> std::result::Result<(), String> {
        match (self, &shared.config.auth) {
            (Credential::Fleet, _) => Ok(()),
            (Credential::Device(proven), _) if proven == device => Ok(()),
            (Credential::Device(proven), _) => Err(format!(
                "the credential is for device {proven}, but the agent reports device {device}"
            )),
            (Credential::Token(token), OpampAuth::FleetToken(key)) => {
                key.verify(device, token).map_err(|err| err.to_string())
            }
            (Credential::Token(_), _) => Err("a bearer token is not accepted here".into()),
        }
    }
}

// ---- registration and reports, shared by both transports ----

/// Why an agent was not registered, and how to answer it.
pub(super) enum Refusal {
    /// Its first message lacked the description: ask for everything.
    FullState,
    /// Another connection has its instance uid: offer it this one.
    NewUid([u8; 16]),
    /// Something it sent was wrong.
    BadRequest(String),
    /// Its credential does not admit the device it reports.
    Unauthenticated(String),
    /// The server is overloaded; `too_many` says the agents are (429), not the server (503).
    Throttled { message: String, too_many: bool },
}

/// What became of a report.
pub(super) enum Reported {
    /// Passed on to the supervisor; the reply (boxed: it is large, the other is not).
    Passed(Box<ServerToAgent>),
    /// Held back: the agent sends more than its allowance.
    Throttled { wait: Duration, why: String },
}

impl Reported {
    /// The reply's flags (none when throttled).
    pub(super) fn flags(&self) -> u64 {
        match self {
            Reported::Passed(reply) => reply.flags,
            Reported::Throttled { .. } => 0,
        }
    }
}

/// A registered agent: its session's sending half towards the supervisor.
pub(super) struct Link {
    pub(super) device: DeviceId,
    pub(super) fleet: bool,
    inbound: Outbound<Result<FromDevice>>,
    reports: Reports,
    /// How many more reports it may send now.
    allowance: ReportBucket,
    /// Its instance uid, held in the live registry while the link lives.
    live: LiveUid,
}

/// What a session remembers of an agent's reports: the sequence number, to
/// spot gaps, and the last config status, so a repeat is not reported twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reports {
    pub(super) last_seq: u64,
    pub(super) last_config: LastConfigStatus,
}

impl Reports {
    /// After the agent's first report, numbered `sequence_num`.
    pub(super) fn new(sequence_num: u64) -> Self {
        Reports {
            last_seq: sequence_num,
            last_config: None,
        }
    }

    /// The reply flags and core messages of the next report, or what was
    /// wrong with it; a refused report changes nothing.
    pub(super) fn read(
        &mut self,
        message: &AgentToServer,
        check_sequence: bool,
    ) -> std::result::Result<(u64, Vec<FromDevice>), String> {
        let mut flags = 0;
        if check_sequence && message.sequence_num != self.last_seq.wrapping_add(1) {
            flags |= ServerToAgentFlags::ReportFullState as u64;
        }
        let mut last_config = self.last_config.clone();
        let reports = convert::from_agent(message, &mut last_config)?;
        self.last_seq = message.sequence_num;
        self.last_config = last_config;
        Ok((flags, reports))
    }
}

impl Link {
    /// The agent's instance uid.
    pub(super) fn uid(&self) -> &[u8; 16] {
        &self.live.uid
    }

    /// Hands a report's messages to the supervisor; the reply to send, or
    /// what was wrong with the report. With `limits` (every report after
    /// the first) its sequence is checked and, unless it answers the
    /// server (a command's or a configuration's outcome, never held back),
    /// it takes one of the agent's allowance of reports: with none left it
    /// is not passed on, and its sequence number is left unseen, so that
    /// the next report's gap asks the agent for its full state.
    pub(super) async fn report(
        &mut self,
        message: &AgentToServer,
        limits: Option<&DeviceLimits>,
    ) -> std::result::Result<Reported, String> {
        let last_seq = self.reports.last_seq;
        let (flags, reports) = self.reports.read(message, limits.is_some())?;
        let answers = reports
            .iter()
            .any(|report| matches!(report, FromDevice::CommandAck(_) | FromDevice::ConfigAck(_)));
        if let (Some(limits), false) = (limits, answers) {
            if let Err(wait) = self.allowance.take(limits, std::time::Instant::now()) {
                self.reports.last_seq = last_seq;
                debug!(device = %self.device, ?wait, "throttling an agent's reports");
                let why = format!(
                    "device {} sends more than {} reports a minute (bursts of {}): try again in {} ms",
                    self.device,
                    limits.max_reports_per_minute,
                    limits.max_report_burst,
                    wait.as_millis()
                );
                return Ok(Reported::Throttled { wait, why });
            }
        }
        if flags != 0 {
            debug!(device = %self.device, got = message.sequence_num, "sequence gap; asking for the full state");
        }
        let reply = ServerToAgent {
            instance_uid: self.uid().to_vec(),
            flags,
            ..Default::default()
        };
        for report in reports {
            // A closed session is the supervisor's doing: the queue's end tells the connection.
            if self.inbound.send(Ok(report)).await.is_err() {
                break;
            }
        }
        Ok(Reported::Passed(Box::new(reply)))
    }

    /// Tells the supervisor something the transport reports for the device.
    pub(super) async fn tell(&self, message: FromDevice) {
        let _ = self.inbound.send(Ok(message)).await;
    }

    /// Ends the session with `problem`, for the supervisor's log.
    pub(super) fn fail(&self, problem: &str) {
        let _ = self
            .inbound
            .try_send(Err(Error::invalid_input(format!("device {}: {problem}", self.device))));
    }
}

/// An instance uid's entry in the live registry, removed when the agent goes.
struct LiveUid {
    shared: Arc<Shared>,
    uid: [u8; 16],
    owner: u64,
}

impl Drop for LiveUid {
    fn drop(&mut self) {
        let mut live = lock(&self.shared.live);
        if live.get(&self.uid) == Some(&self.owner) {
            live.remove(&self.uid);
        }
    }
}

/// Counts a registration in flight against `max_pending_registrations`.
struct Pending(Arc<Shared>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Registers the agent `uid`, whose first message is `message`, with the
/// supervisor: the link, its queue, and the first reply.
pub(super) async fn register(
    shared: &Arc<Shared>,
    owner: u64,
    credential: &Credential,
    uid: [u8; 16],
    message: &AgentToServer,
    peer: &str,
) -> std::result::Result<(Link, Receiver<ToDevice>, ServerToAgent), Refusal> {
    let config = &shared.config;
    if message.agent_description.is_none() {
        return Err(Refusal::FullState);
    }
    let device =
        convert::device_id(config.device_id, &uid, message.agent_description.as_ref()).map_err(Refusal::BadRequest)?;
    credential.admits(shared, &device).map_err(Refusal::Unauthenticated)?;
    let live = {
        let mut live = lock(&shared.live);
        if live.contains_key(&uid) {
            let fresh = *uuid::Uuid::now_v7().as_bytes();
            info!(%device, uid = %super::uuid_text(&uid), new_uid = %super::uuid_text(&fresh), "duplicate instance_uid; offering a new one");
            return Err(Refusal::NewUid(fresh));
        }
        live.insert(uid, owner);
        LiveUid {
            shared: shared.clone(),
            uid,
            owner,
        }
    };
    let in_flight = shared.pending.fetch_add(1, Ordering::AcqRel);
    let _pending = Pending(shared.clone());
    if in_flight >= config.max_pending_registrations {
        return Err(Refusal::Throttled {
            message: format!(
                "{} agents are being registered already; try again later",
                config.max_pending_registrations
            ),
            too_many: true,
        });
    }
    let hello = convert::hello(device, message);
    config
        .device_limits
        .check_hello(&hello)
        .map_err(|err| Refusal::BadRequest(err.to_string()))?;
    let fleet = convert::speaks_fleet(&hello);
    let (outbound, mut queue) = Outbound::channel(config.device_queue);
    let (inbound, received) = Outbound::channel(config.device_queue);
    let session = DeviceSession::new(hello, peer, Box::new(AgentInbound(received)), outbound);
    match shared.sessions.try_send(session) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Err(Refusal::Throttled {
                message: "the supervisor is not keeping up with registrations; try again later".into(),
                too_many: false,
            });
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Err(Refusal::Throttled {
                message: "the server is shutting down".into(),
                too_many: false,
            });
        }
    }
    let unavailable = |why: &str| Refusal::Throttled {
        message: format!("device {device} was not registered: {why}"),
        too_many: false,
    };
    let first = match tokio::time::timeout(config.register_timeout, queue.recv()).await {
        Ok(Some(registered @ ToDevice::Registered(_))) => convert::to_agent(&registered, &uid, fleet).message,
        Ok(Some(ToDevice::Refused(refused))) if refused.denied => return Err(Refusal::Unauthenticated(refused.reason)),
        Ok(Some(ToDevice::Refused(refused))) => return Err(unavailable(&refused.reason)),
        Ok(Some(_)) => return Err(unavailable("the supervisor sent something before registering it")),
        Ok(None) => return Err(unavailable("the supervisor closed its session")),
        Err(_) => return Err(unavailable("the supervisor did not register it in time")),
    };
    debug!(%device, %peer, "agent registered");
    let link = Link {
        device,
        fleet,
        inbound,
        reports: Reports::new(message.sequence_num),
        allowance: shared.config.device_limits.report_bucket(),
        live,
    };
    Ok((link, queue, first))
}

/// The reply that answers a refused registration; `None` for a credential
/// that does not admit the device, which the transport answers its own way.
pub(super) fn refusal_reply(shared: &Shared, uid: &[u8; 16], refusal: &Refusal) -> Option<ServerToAgent> {
    let mut reply = ServerToAgent {
        instance_uid: uid.to_vec(),
        capabilities: SERVER_CAPABILITIES,
        ..Default::default()
    };
    match refusal {
        Refusal::FullState => reply.flags = ServerToAgentFlags::ReportFullState as u64,
        Refusal::NewUid(fresh) => {
            reply.agent_identification = Some(super::proto::AgentIdentification {
                new_instance_uid: fresh.to_vec(),
            })
        }
        Refusal::BadRequest(problem) => return Some(convert::error_response(uid, problem.clone(), None)),
        Refusal::Throttled { message, .. } => {
            return Some(convert::error_response(
                uid,
                message.clone(),
                Some(shared.config.retry_after),
            ));
        }
        Refusal::Unauthenticated(_) => return None,
    }
    Some(reply)
}

/// Messages from one agent, as the supervisor reads them.
#[derive(Debug)]
struct AgentInbound(Receiver<Result<FromDevice>>);

impl Inbound<FromDevice> for AgentInbound {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<FromDevice>>> {
        self.0.poll_recv(cx).map(Option::transpose)
    }
}

// ---- WebSocket connections ----

/// One WebSocket connection and the agents registered over it.
///
/// It runs in a task only while it has something to do: bytes from the
/// socket, a message in one of its agents' queues, or the server stopping.
/// In between it rests in its [`Socket`], whose waker its socket's readiness
/// and its agents' queues keep; so an idle connection is this struct, with
/// no task, buffer or channel slots.
struct Connection {
    shared: Arc<Shared>,
    stream: Upgraded,
    reader: frames::Reader,
    owner: u64,
    credential: Credential,
    agents: Vec<Agent>,
    /// When the message awaited must have arrived whole: armed while the
    /// connection has no agent yet or a message partway, none otherwise.
    due_by: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts it for [`OpampTransport::shutdown`] and against `max_connections` while it lives.
    _counted: Counted,
}

/// Where a [`Connection`] rests between its tasks.
///
/// The transport's registry of connections holds it (a stop wakes each), and
/// so do the waits the connection left, with the socket as their waker: a
/// wake while it rests spawns its task again.
struct Socket {
    phase: Mutex<Phase>,
}

// Resting in place is the point: a boxed connection would be one more allocation.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// No task: the connection waits for a wake.
    Resting(Connection),
    /// In its task; `woken` by something that came while it ran.
    Running { woken: bool },
    /// Closed.
    Ended,
}

impl Socket {
    /// Registers `connection` and starts its first task.
    fn open(connection: Connection) {
        let shared = Arc::clone(&connection.shared);
        let socket = Arc::new(Socket {
            phase: Mutex::new(Phase::Running { woken: false }),
        });
        lock(&shared.sockets).insert(connection.owner, Arc::clone(&socket));
        shared.runtime.spawn(socket.run(connection));
    }

    /// Serves `connection` until it has nothing to do (it rests here) or ends.
    // Not an `async fn`: its arguments would be stored twice in the future,
    // once as arguments and once as the locals they are moved to.
    #[allow(clippy::manual_async_fn)]
    fn run(self: Arc<Self>, mut connection: Connection) -> impl std::future::Future<Output = ()> + Send {
        async move {
            // Ends the socket however the task ends, even dropped unfinished
            // (its runtime shutting down), unless the connection is resting.
            let mut ending = Ending {
                socket: Some(Arc::clone(&self)),
                owner: connection.owner,
                shared: Arc::clone(&connection.shared),
            };
            let waker = Waker::from(Arc::clone(&self));
            loop {
                // Polled with the socket as the waker, not this task's: the
                // waits must outlive the task.
                let polled = connection.poll_due(&mut Context::from_waker(&waker));
                let Poll::Ready(due) = polled else {
                    match self.rest(connection) {
                        None => {
                            ending.socket = None;
                            return;
                        }
                        Some(woken) => {
                            // Woken since that look: look again, after a yield
                            // (the wake may be this task's budget running out).
                            connection = woken;
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                };
                if !Box::pin(connection.on_due(due)).await {
                    return;
                }
            }
        }
    }

    /// Leaves `connection` to rest here, unless it was woken since its last
    /// look: then it is handed back.
    fn rest(&self, connection: Connection) -> Option<Connection> {
        let mut phase = lock(&self.phase);
        if let Phase::Running { woken: true } = *phase {
            *phase = Phase::Running { woken: false };
            return Some(connection);
        }
        *phase = Phase::Resting(connection);
        None
    }
}

impl Wake for Socket {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut phase = lock(&self.phase);
        match std::mem::replace(&mut *phase, Phase::Running { woken: false }) {
            Phase::Resting(connection) => {
                drop(phase);
                let runtime = connection.shared.runtime.clone();
                runtime.spawn(Arc::clone(self).run(connection));
            }
            Phase::Running { .. } => *phase = Phase::Running { woken: true },
            Phase::Ended => *phase = Phase::Ended,
        }
    }
}

/// Marks a socket ended and takes it out of the registry when its task ends
/// without leaving the connection to rest.
struct Ending {
    socket: Option<Arc<Socket>>,
    /// The connection's key in the registry.
    owner: u64,
    shared: Arc<Shared>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            *lock(&socket.phase) = Phase::Ended;
            lock(&self.shared.sockets).remove(&self.owner);
            lock(&self.shared.address_slots).remove(&self.owner);
        }
    }
}

/// An agent registered over a WebSocket: its link to the supervisor and the
/// queue of what the supervisor sends it.
struct Agent {
    link: Link,
    queue: Receiver<ToDevice>,
}

/// The largest read through the stack (a larger `read_chunk` reads this much at a time).
const SCRATCH: usize = 16 * 1024;

/// What one read got.
enum Read {
    /// The client closed the connection.
    Closed,
    /// Bytes; `more` when the read was full, so more may be waiting.
    Some { more: bool },
}

/// What a connection has to do next.
enum Due {
    Readable,
    /// The agent at this index has a message, or its session was closed (`None`).
    Queued(usize, Option<ToDevice>),
    /// The message awaited did not arrive whole in time.
    Late,
    Stop,
}

impl Connection {
    /// The client's address, for logs: asked of the socket rather than kept
    /// in every connection.
    fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map_or_else(|err| format!("(peer unknown: {err})"), |peer| peer.to_string())
    }

    /// What the connection has to do next, if anything; the waits it leaves
    /// wake `cx`.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<Due> {
        if *self.shared.stop.borrow() {
            return Poll::Ready(Due::Stop);
        }
        // An error is read by the next read, so it counts as readable.
        if self.stream.poll_read_ready(cx).is_ready() {
            return Poll::Ready(Due::Readable);
        }
        for (at, agent) in self.agents.iter_mut().enumerate() {
            if let Poll::Ready(message) = agent.queue.poll_recv(cx) {
                return Poll::Ready(Due::Queued(at, message));
            }
        }
        if self.agents.is_empty() || self.reader.is_partway() {
            let timeout = self.shared.config.message_timeout;
            let due_by = self.due_by.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if due_by.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Due::Late);
            }
        } else {
            self.due_by = None;
        }
        Poll::Pending
    }

    /// Does what woke the connection; false once it has closed.
    async fn on_due(&mut self, due: Due) -> bool {
        match due {
            Due::Readable => self.on_readable().await,
            Due::Queued(at, Some(message)) => self.deliver(at, message).await,
            Due::Queued(at, None) => {
                self.agents.swap_remove(at);
                if self.agents.is_empty() {
                    self.close(frames::close::NORMAL, "the supervisor closed the session")
                        .await;
                    false
                } else {
                    true
                }
            }
            Due::Late => {
                let problem = format!(
                    "no whole message within {} (message_timeout)",
                    opamp_core::time::duration_text::format(self.shared.config.message_timeout)
                );
                self.refuse(frames::close::POLICY, &problem).await;
                false
            }
            Due::Stop => {
                self.close(frames::close::GOING_AWAY, "the server is shutting down")
                    .await;
                false
            }
        }
    }

    /// Reads what the client sent and handles every whole message in it;
    /// false once the connection is to close.
    async fn on_readable(&mut self) -> bool {
        loop {
            let more = match self.read() {
                Ok(Read::Closed) => {
                    if self.reader.is_partway() {
                        debug!(peer = %self.peer(), "OpAMP WebSocket closed in the middle of a message");
                    }
                    return false;
                }
                Ok(Read::Some { more }) => more,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(err) => {
                    debug!(peer = %self.peer(), error = %err, "reading an OpAMP WebSocket failed");
                    return false;
                }
            };
            loop {
                match self.reader.next() {
                    Ok(Some(incoming)) => {
                        // A whole message: the next has its own time.
                        self.due_by = None;
                        // Boxed: a registration's state is large, and a storm of them is all in flight at once.
                        if !Box::pin(self.on_incoming(incoming)).await {
                            return false;
                        }
                    }
                    Ok(None) => break,
                    Err(problem) => {
                        self.refuse(problem.close_code(), &problem.to_string()).await;
                        return false;
                    }
                }
            }
            self.reader.settle();
            if !more {
                return true;
            }
        }
    }

    /// One read from the socket into the reader: through a scratch buffer
    /// on the stack, so that what the heap holds is exactly what arrived,
    /// or straight into place for the rest of a large frame.
    fn read(&mut self) -> std::io::Result<Read> {
        let chunk = self.shared.config.read_chunk.min(SCRATCH);
        if let Some(buffer) = self.reader.rest_of_large_frame(chunk) {
            let room = buffer.capacity() - buffer.len();
            return match self.stream.try_read_buf(buffer)? {
                0 => Ok(Read::Closed),
                read => Ok(Read::Some { more: read == room }),
            };
        }
        let mut scratch = [0u8; SCRATCH];
        match self.stream.try_read(&mut scratch[..chunk])? {
            0 => Ok(Read::Closed),
            read => {
                self.reader.extend(&scratch[..read]);
                Ok(Read::Some { more: read == chunk })
            }
        }
    }

    async fn on_incoming(&mut self, incoming: Incoming) -> bool {
        match incoming {
            Incoming::Binary(bytes) => self.on_message(&bytes).await,
            Incoming::Text => {
                self.refuse(frames::close::UNSUPPORTED, "OpAMP uses binary WebSocket messages")
                    .await;
                false
            }
            Incoming::Ping(payload) => self.write(&frames::pong(&payload)).await,
            Incoming::Pong => true,
            Incoming::Close(code) => {
                // Answered with the same code (section 5.5.1), then the connection ends.
                let code = code.unwrap_or(frames::close::NORMAL);
                let _ = self.write(&frames::close_frame(code, "")).await;
                false
            }
        }
    }

    /// Handles one binary message; false once the connection is to close.
    async fn on_message(&mut self, bytes: &[u8]) -> bool {
        let message: AgentToServer = match super::unframe(bytes) {
            Ok(message) => message,
            Err(problem) => {
                let code = match problem {
                    FrameProblem::Header(_) => frames::close::PROTOCOL,
                    FrameProblem::Payload(_) => frames::close::INVALID,
                };
                self.refuse(code, &problem.to_string()).await;
                return false;
            }
        };
        let uid = match super::instance_uid(&message.instance_uid) {
            Ok(uid) => uid,
            Err(problem) => {
                self.refuse(frames::close::INVALID, &problem).await;
                return false;
            }
        };
        if let Some(at) = self.agents.iter().position(|agent| *agent.link.uid() == uid) {
            let limits = &self.shared.config.device_limits;
            match self.agents[at].link.report(&message, Some(limits)).await {
                Ok(Reported::Throttled { wait, why }) => {
                    return self.send(&convert::error_response(&uid, why, Some(wait))).await;
                }
                Ok(Reported::Passed(reply)) => {
                    if message.agent_disconnect.is_some() {
                        self.agents.swap_remove(at);
                    }
                    return self.send(&reply).await;
                }
                Err(problem) => {
                    self.agents[at].link.fail(&problem);
                    let _ = self.send(&convert::error_response(&uid, problem.clone(), None)).await;
                    self.close(frames::close::INVALID, &problem).await;
                    return false;
                }
            }
        }
        let peer = format!("opamp-ws {}", self.peer());
        let registered = register(&self.shared, self.owner, &self.credential, uid, &message, &peer).await;
        match registered {
            Ok((mut link, queue, mut first)) => {
                match link.report(&message, None).await {
                    Ok(reply) => first.flags |= reply.flags(),
                    Err(problem) => {
                        link.fail(&problem);
                        return self.send(&convert::error_response(&uid, problem, None)).await;
                    }
                }
                // A bearer token proves one device: now that it is known, keep
                // that instead of the token (its heap text goes).
                if let Credential::Token(_) = self.credential {
                    self.credential = Credential::Device(link.device);
                    // Checked now: the connection may send messages of any size allowed.
                    self.reader.set_limit(self.shared.config.max_message_size);
                }
                // Most connections carry one agent: no room is kept for more.
                self.agents.reserve_exact(1);
                self.agents.push(Agent { link, queue });
                self.send(&first).await
            }
            Err(Refusal::Unauthenticated(problem)) => {
                let _ = self.send(&convert::error_response(&uid, problem.clone(), None)).await;
                self.close(frames::close::POLICY, &problem).await;
                false
            }
            Err(refusal) => match refusal_reply(&self.shared, &uid, &refusal) {
                Some(reply) => self.send(&reply).await,
                None => false,
            },
        }
    }

    /// Sends a queued message to its agent; false once the connection is to close.
    async fn deliver(&mut self, at: usize, message: ToDevice) -> bool {
        if matches!(message, ToDevice::Registered(_)) {
            return true;
        }
        let link = &self.agents[at].link;
        let outgoing = convert::to_agent(&message, link.uid(), link.fleet);
        let size = 1 + prost::Message::encoded_len(&outgoing.message);
        let limit = self.shared.config.max_message_size;
        if size > limit {
            warn!(device = %link.device, bytes = size, limit, "not sending a message over the OpAMP size limit");
            if let Some(refused) = outgoing.on_refused {
                link.tell(refused).await;
            }
            return true;
        }
        if !self.write(&frames::message(&outgoing.message)).await {
            return false;
        }
        if let Some(sent) = outgoing.on_sent {
            self.agents[at].link.tell(sent).await;
        }
        true
    }

    async fn send(&mut self, message: &ServerToAgent) -> bool {
        self.write(&frames::message(message)).await
    }

    async fn write(&mut self, bytes: &[u8]) -> bool {
        match self.stream.write_all(bytes).await {
            Ok(()) => true,
            Err(err) => {
                debug!(peer = %self.peer(), error = %err, "writing to an OpAMP WebSocket failed");
                false
            }
        }
    }

    /// Closes the connection over bad input: every agent on it is told why.
    async fn refuse(&mut self, code: u16, problem: &str) {
        warn!(peer = %self.peer(), %problem, "closing an OpAMP WebSocket over bad input");
        for agent in &self.agents {
            agent.link.fail(problem);
        }
        if code != frames::close::TOO_BIG {
            let _ = self.send(&convert::error_response(&[], problem.to_owned(), None)).await;
        }
        self.close(code, problem).await;
    }

    /// Sends a close frame and ends the connection, giving the client a
    /// second to read it.
    async fn close(&mut self, code: u16, reason: &str) {
        let frame = frames::close_frame(code, reason);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if self.stream.write_all(&frame).await.is_ok() && self.stream.shutdown().await.is_ok() {
                // Read until the client closes too, so that what it still sends
                // does not make the kernel reset the connection under the close frame.
                let mut rest = [0u8; 256];
                while matches!(self.stream.read(&mut rest).await, Ok(1..)) {}
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection is its socket: one allocation, with no task.
    /// This fails when it grows.
    #[tokio::test]
    async fn an_idle_connection_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let config = OpampServerConfig::new(
            addr,
            OpampAuth::Basic {
                username: "user".into(),
                password: "secret".into(),
            },
        );
        let (sessions, _accepted) = mpsc::channel(1);
        let (_stopping, stop) = watch::channel(false);
        let (active, _counted) = watch::channel(0usize);
        let shared = Arc::new(Shared::new(config, None, sessions, stop, active));
        let connection = Connection {
            shared: shared.clone(),
            stream: Upgraded::Plain(stream),
            reader: frames::Reader::new(1024),
            owner: 1,
            credential: Credential::Fleet,
            agents: Vec::new(),
            due_by: None,
            _counted: Counted::new(ConnectionSlot(shared.clone())),
        };
        let socket = Socket {
            phase: Mutex::new(Phase::Resting(connection)),
        };
        // The allocation of an `Arc<Socket>`: two counts and the socket.
        let size = 2 * std::mem::size_of::<usize>() + std::mem::size_of_val(&socket);
        assert!(size <= 256, "an idle connection is {size} bytes");
    }
}
