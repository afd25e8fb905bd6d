//! The device side: an OpAMP client over WebSocket or plain HTTP polling.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use opamp_core::transport::{
    AgentConnector, AgentSession, DeviceHello, FromDevice, Inbound, Outbound, Receiver, ToDevice,
};
use opamp_core::{CorrelationId, Error, Result, SupervisorId};
use prost::Message as _;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::debug;

use super::convert::{self, FromServer};
use super::http::{PROTOBUF, compress, decompress};
use super::proto::{self, AgentToServer, ServerToAgent};
use super::{
    DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_POLL_INTERVAL, DEFAULT_READ_BUFFER_SIZE, DEFAULT_REGISTER_TIMEOUT,
    DEFAULT_WRITE_BUFFER_SIZE, lock,
};
use crate::auth::DeviceToken;
use crate::tls::{ClientStream, MaybeTls};

/// Which OpAMP transport a connector speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientTransport {
    /// One WebSocket per agent; the server sends whenever it has something.
    WebSocket,
    /// A `POST` per report, and one at least every `poll_interval` to
    /// collect what the server holds for the agent.
    Http {
        /// The longest time between two requests.
        poll_interval: Duration,
    },
}

/// The credential a connector sends in its `Authorization` header.
#[derive(Clone)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `Authorization: Bearer <token>`: the device's fleet token.
    Bearer(DeviceToken),
    /// `Authorization: Basic`: a device id and its fleet token, or the fleet's shared user and password.
    Basic {
        /// The user name (a device id, for fleet tokens).
        username: String,
        /// The password (the device's fleet token, for fleet tokens).
        password: String,
    },
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAuth::Bearer(token) => f.debug_tuple("Bearer").field(token).finish(),
            ClientAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"..")
                .finish(),
        }
    }
}

impl ClientAuth {
    fn header(&self) -> String {
        match self {
            ClientAuth::Bearer(token) => format!("Bearer {}", token.as_str()),
            ClientAuth::Basic { username, password } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            ),
        }
    }
}

/// Where a device connects and how it proves who it is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpampConnectorConfig {
    /// The server's URL: `ws://host:port/v1/opamp` (`wss://` with TLS) for
    /// WebSocket, `http://host:port/v1/opamp` (`https://`) for plain HTTP.
    pub url: String,
    /// What a `wss://` or `https://` server must prove, and the client
    /// certificate to present; the public roots when `None`.
    pub tls: Option<crate::tls::ClientTls>,
    /// WebSocket or plain HTTP polling.
    pub transport: ClientTransport,
    /// The credential sent with the upgrade or every request.
    pub auth: Option<ClientAuth>,
    /// How long opening the connection may take.
    pub connect_timeout: Duration,
    /// How long the server may take to register the agent.
    pub register_timeout: Duration,
    /// The largest message sent or accepted, in bytes.
    pub max_message_size: usize,
    /// The WebSocket read buffer, in bytes.
    pub read_buffer_size: usize,
    /// The WebSocket write buffer, in bytes (0: write each message at once).
    pub write_buffer_size: usize,
    /// Gzip plain HTTP request bodies.
    pub gzip: bool,
    /// The local address to connect from (load generators spread devices over 127.0.0.x).
    pub local_address: Option<IpAddr>,
    /// Messages queued for the server before sends wait.
    pub queue: usize,
}

impl OpampConnectorConfig {
    /// Connecting over WebSocket to `url`, with the defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        OpampConnectorConfig {
            url: url.into(),
            tls: None,
            transport: ClientTransport::WebSocket,
            auth: None,
            connect_timeout: Duration::from_secs(5),
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            read_buffer_size: DEFAULT_READ_BUFFER_SIZE,
            write_buffer_size: DEFAULT_WRITE_BUFFER_SIZE,
            gzip: false,
            local_address: None,
            queue: 16,
        }
    }

    /// Over plain HTTP, polling at least every `poll_interval` (the spec's default is 30 s).
    pub fn http(mut self, poll_interval: Duration) -> Self {
        self.transport = ClientTransport::Http { poll_interval };
        self
    }

    /// Over plain HTTP at the spec's default polling interval.
    pub fn http_default(self) -> Self {
        self.http(DEFAULT_POLL_INTERVAL)
    }

    /// Presenting `token` as a bearer token.
    pub fn token(mut self, token: DeviceToken) -> Self {
        self.auth = Some(ClientAuth::Bearer(token));
        self
    }

    /// Presenting a user name and password with Basic authentication.
    pub fn basic(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some(ClientAuth::Basic {
            username: username.into(),
            password: password.into(),
        });
        self
    }

    /// Over TLS (a `wss://` or `https://` URL) with these settings.
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Gzipping plain HTTP request bodies.
    pub fn gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// Connecting from `address`.
    pub fn local_address(mut self, address: IpAddr) -> Self {
        self.local_address = Some(address);
        self
    }

    /// With another register deadline.
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// With another message size limit.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// With other WebSocket buffer sizes.
    pub fn buffers(mut self, read: usize, write: usize) -> Self {
        self.read_buffer_size = read;
        self.write_buffer_size = write;
        self
    }
}

/// The OpAMP [`AgentConnector`]: each [`connect`](AgentConnector::connect)
/// opens a connection (or, over plain HTTP, starts polling), sends the
/// agent's full status, and returns once the server has registered it.
///
/// The agent's `instance_uid` is a UUID v7 made when the connector is, kept
/// across reconnects, and replaced when the server offers a new one.
#[derive(Debug, Clone)]
pub struct OpampConnector {
    config: OpampConnectorConfig,
    uri: Uri,
    address: String,
    /// For a `wss://` or `https://` URL: how to open TLS, and the name the
    /// server's certificate must have.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    uid: Arc<Mutex<[u8; 16]>>,
}

impl OpampConnector {
    /// A connector; [`Error::InvalidInput`] if the URL is unusable.
    pub fn new(config: OpampConnectorConfig) -> Result<Self> {
        let invalid = |why: String| Error::invalid_input(format!("opamp connector url {:?}: {why}", config.url));
        let uri: Uri = config.url.parse().map_err(|err| invalid(format!("{err}")))?;
        let scheme = uri.scheme_str().unwrap_or("");
        let (plain, secure) = match config.transport {
            ClientTransport::WebSocket => ("ws", "wss"),
            ClientTransport::Http { poll_interval } => {
                if poll_interval.is_zero() {
                    return Err(invalid("the poll interval must be more than zero".into()));
                }
                ("http", "https")
            }
        };
        let host = uri.host().ok_or_else(|| invalid("it has no host".into()))?;
        let tls = if scheme == secure {
            let settings = config.tls.clone().unwrap_or_else(crate::tls::ClientTls::public_roots);
            let name = settings.domain.as_deref().unwrap_or(host.trim_matches(['[', ']']));
            let name = ServerName::try_from(name.to_owned())
                .map_err(|err| invalid(format!("the TLS server name {name:?}: {err}")))?;
            let rustls = settings.rustls(&[b"http/1.1"])?;
            Some((Arc::new(rustls), name))
        } else if scheme == plain {
            if config.tls.is_some() {
                return Err(invalid(format!(
                    "TLS settings are given, but the scheme is {plain}://: use {secure}://"
                )));
            }
            None
        } else {
            return Err(invalid(format!(
                "the scheme must be {plain}:// or {secure}:// for this transport"
            )));
        };
        let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        let address = format!("{host}:{port}");
        Ok(OpampConnector {
            config,
            uri,
            address,
            tls,
            uid: Arc::new(Mutex::new(*uuid::Uuid::now_v7().as_bytes())),
        })
    }

    /// The agent's `instance_uid` now.
    pub fn instance_uid(&self) -> [u8; 16] {
        *lock(&self.uid)
    }

    /// A connection to the server: TCP, with TLS over it for a secure URL.
    async fn open(&self) -> Result<ClientStream> {
        let tcp = self.tcp().await?;
        let Some((tls, name)) = &self.tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
        let handshake = tokio::time::timeout(self.config.connect_timeout, connector.connect(name.clone(), tcp));
        match handshake.await {
            Ok(Ok(stream)) => Ok(MaybeTls::Tls(Box::new(stream))),
            Ok(Err(err)) => Err(Error::Unavailable {
                message: format!("the TLS handshake with {}", self.config.url),
                source: Some(Box::new(err)),
            }),
            Err(_) => Err(Error::timeout(format!("the TLS handshake with {}", self.config.url))),
        }
    }

    async fn tcp(&self) -> Result<TcpStream> {
        let unavailable = |err: std::io::Error| Error::Unavailable {
            message: format!("connecting to {}", self.config.url),
            source: Some(Box::new(err)),
        };
        let connect = async {
            let mut last = None;
            for addr in tokio::net::lookup_host(&self.address).await? {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(local) = self.config.local_address {
                    socket.bind(SocketAddr::new(local, 0))?;
                }
                match socket.connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(err) => last = Some(err),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")))
        };
        let stream = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| Error::timeout(format!("connecting to {}", self.config.url)))?
            .map_err(unavailable)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn ws_config(&self) -> WebSocketConfig {
        super::ws_config(
            self.config.read_buffer_size,
            self.config.write_buffer_size,
            self.config.max_message_size,
        )
    }
}

/// What the client remembers about its agent between messages.
struct AgentState {
    hello: DeviceHello,
    uid: [u8; 16],
    shared_uid: Arc<Mutex<[u8; 16]>>,
    sequence: u64,
    emission_ids: Vec<CorrelationId>,
    last_config_status: Option<proto::RemoteConfigStatus>,
    last_health: Option<proto::ComponentHealth>,
}

impl AgentState {
    fn new(hello: &DeviceHello, shared_uid: &Arc<Mutex<[u8; 16]>>) -> Self {
        AgentState {
            hello: hello.clone(),
            uid: *lock(shared_uid),
            shared_uid: shared_uid.clone(),
            sequence: 0,
            emission_ids: Vec::new(),
            last_config_status: convert::initial_config_status(hello),
            last_health: None,
        }
    }

    /// The next message, with only what every message carries.
    fn next(&mut self) -> AgentToServer {
        self.sequence += 1;
        AgentToServer {
            instance_uid: self.uid.to_vec(),
            sequence_num: self.sequence,
            capabilities: convert::capability_bits(&self.hello),
            ..Default::default()
        }
    }

    /// The next message, with everything the agent reports.
    fn full(&mut self) -> AgentToServer {
        let mut message = self.next();
        message.agent_description = Some(convert::description(&self.hello));
        message.custom_capabilities = Some(convert::custom_capabilities(&self.hello));
        message.remote_config_status = self.last_config_status.clone();
        message.health = self.last_health.clone();
        message
    }

    /// The message carrying `report`, if it has anything to say over OpAMP.
    fn report(&mut self, report: &FromDevice) -> Option<AgentToServer> {
        let mut message = self.next();
        if !convert::to_server(report, &mut message, &mut self.emission_ids) {
            self.sequence -= 1;
            return None;
        }
        if message.remote_config_status.is_some() {
            self.last_config_status = message.remote_config_status.clone();
        }
        if message.health.is_some() {
            self.last_health = message.health.clone();
        }
        Some(message)
    }

    fn adopt(&mut self, uid: [u8; 16]) {
        debug!(device = %self.hello.device, uid = %super::uuid_text(&uid), "the server gave the agent a new instance_uid");
        self.uid = uid;
        *lock(&self.shared_uid) = uid;
    }

    /// What the agent answers a server message with, if anything.
    fn answer(&mut self, got: &FromServer) -> Option<AgentToServer> {
        if let Some(uid) = got.new_instance_uid {
            self.adopt(uid);
            return Some(self.full());
        }
        if let Some(refused) = &got.refused_config {
            self.last_config_status = Some(refused.clone());
            let mut message = self.next();
            message.remote_config_status = Some(refused.clone());
            return Some(message);
        }
        got.report_full_state.then(|| self.full())
    }
}

/// Messages from the server, starting with the registration.
#[derive(Debug)]
struct ServerInbound(mpsc::Receiver<Result<ToDevice>>);

impl Inbound<ToDevice> for ServerInbound {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<Option<ToDevice>>> {
        self.0.poll_recv(cx).map(Option::transpose)
    }
}

/// How many times registration may be answered with a new uid or a request for the full state.
const REGISTER_ROUNDS: usize = 4;

#[async_trait]
impl AgentConnector for OpampConnector {
    async fn connect(&self, hello: &DeviceHello) -> Result<AgentSession> {
        let doing = format!("registering {} at {}", hello.device, self.config.url);
        let (outbound, reports) = Outbound::channel(self.config.queue);
        let (inbound_tx, inbound) = mpsc::channel(self.config.queue.max(4));
        let mut state = AgentState::new(hello, &self.uid);
        let registering = async {
            let mut link = match self.config.transport {
                ClientTransport::WebSocket => {
                    Link::WebSocket(self.open_websocket(&state).await?, self.config.max_message_size)
                }
                ClientTransport::Http { poll_interval } => Link::Http(
                    Poster {
                        connector: self.clone(),
                        sender: None,
                    },
                    poll_interval,
                ),
            };
            let (registered, first) = register(&mut state, &doing, self.fallback_supervisor(), &mut link).await?;
            Ok::<_, Error>((link, registered, first))
        };
        let (pump, registered, first) = tokio::time::timeout(self.config.register_timeout, registering)
            .await
            .map_err(|_| Error::timeout(doing.clone()))??;
        let _ = inbound_tx.try_send(Ok(ToDevice::Registered(Box::new(registered))));
        for message in first {
            let _ = inbound_tx.try_send(Ok(message));
        }
        match pump {
            Link::WebSocket(ws, limit) => {
                tokio::spawn(pump_ws(ws, state, reports, inbound_tx, limit));
            }
            Link::Http(poster, poll_interval) => {
                tokio::spawn(pump_http(poster, state, reports, inbound_tx, poll_interval));
            }
        }
        Ok(AgentSession::new(Box::new(ServerInbound(inbound)), outbound))
    }
}

/// The connection a session runs over.
enum Link {
    WebSocket(WebSocketStream<ClientStream>, usize),
    Http(Poster, Duration),
}

impl Link {
    /// Sends `message` and waits for the server's reply (registration only:
    /// afterwards the pumps read replies as they come).
    async fn exchange(&mut self, message: AgentToServer) -> Result<ServerToAgent> {
        match self {
            Link::WebSocket(ws, limit) => exchange_ws(ws, message, *limit).await,
            Link::Http(poster, _) => poster.post(message).await,
        }
    }
}

impl Link {
    /// What an error answer to a registration means: a WebSocket server that
    /// refuses the device (its credential, or the device itself) follows its
    /// error response with a policy close, which makes it unauthenticated.
    async fn refusal(&mut self, err: Error) -> Error {
        let Link::WebSocket(ws, _) = self else {
            return err;
        };
        if !matches!(err, Error::InvalidInput { .. }) {
            return err;
        }
        match tokio::time::timeout(CLOSE_WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) if frame.code == CloseCode::Policy => match err {
                Error::InvalidInput { message } => Error::unauthenticated(message),
                other => other,
            },
            _ => err,
        }
    }
}

/// How long a refused registration waits for the server's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl OpampConnector {
    /// The supervisor a server of another project (which does not name it) is called by: its address.
    fn fallback_supervisor(&self) -> Option<SupervisorId> {
        SupervisorId::new(&self.address).ok()
    }

    async fn open_websocket(&self, state: &AgentState) -> Result<WebSocketStream<ClientStream>> {
        let url = &self.config.url;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|err| Error::invalid_input(format!("opamp connector url {url:?}: {err}")))?;
        let headers = request.headers_mut();
        if let Some(auth) = &self.config.auth {
            let value = HeaderValue::from_str(&auth.header())
                .map_err(|_| Error::invalid_input("the opamp credential is not a valid header value"))?;
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Ok(value) = HeaderValue::from_str(&super::uuid_text(&state.uid)) {
            headers.insert("OpAMP-Instance-UID", value);
        }
        let stream = self.open().await?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(self.ws_config()))
            .await
            .map_err(|err| match err {
                tungstenite::Error::Http(response) => {
                    let body = response
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    let retry = response
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    status_error(response.status(), &body, retry.as_deref(), &format!("upgrading {url}"))
                }
                other => Error::Unavailable {
                    message: format!("opening a WebSocket to {url}"),
                    source: Some(Box::new(other)),
                },
            })?;
        Ok(ws)
    }
}

/// The core error for an HTTP status the server refused with.
fn status_error(status: StatusCode, body: &str, retry_after: Option<&str>, doing: &str) -> Error {
    let mut message = format!("{doing}: {status}: {body}");
    if let Some(retry) = retry_after {
        message.push_str(&format!(" (Retry-After: {retry})"));
    }
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::unauthenticated(message),
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNSUPPORTED_MEDIA_TYPE
        | StatusCode::NOT_FOUND => Error::invalid_input(message),
        _ => Error::unavailable(message),
    }
}

/// Sends the agent's full state until the server registers it (answering
/// new uids and requests for the full state); the supervisor and any
/// messages the first reply carried.
async fn register(
    state: &mut AgentState,
    doing: &str,
    fallback: Option<SupervisorId>,
    link: &mut Link,
) -> Result<(SupervisorId, Vec<ToDevice>)> {
    let mut message = state.full();
    for _ in 0..REGISTER_ROUNDS {
        let reply = link.exchange(message).await?;
        let got = match convert::from_server(reply, &state.hello, &mut state.emission_ids) {
            Ok(got) => got,
            Err(err) => return Err(annotate(link.refusal(err).await, doing)),
        };
        if let Some(again) = state.answer(&got) {
            if got.new_instance_uid.is_some() || got.report_full_state {
                message = again;
                continue;
            }
        }
        let supervisor = got.registered.or(fallback).ok_or_else(|| {
            Error::invalid_input(format!(
                "{doing}: the server named no supervisor and its address is no valid id"
            ))
        })?;
        return Ok((supervisor, got.messages));
    }
    Err(Error::invalid_input(format!(
        "{doing}: the server kept asking for the agent's state or a new instance uid"
    )))
}

fn annotate(err: Error, doing: &str) -> Error {
    match err {
        Error::Unavailable { message, source } => Error::Unavailable {
            message: format!("{doing}: {message}"),
            source,
        },
        Error::InvalidInput { .. } => Error::invalid_input(format!("{doing}: {err}")),
        other => other,
    }
}

async fn exchange_ws(
    ws: &mut WebSocketStream<ClientStream>,
    message: AgentToServer,
    limit: usize,
) -> Result<ServerToAgent> {
    ws.send(Message::Binary(super::frame(&message).into()))
        .await
        .map_err(|err| ws_error(err, "sending to the OpAMP server"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                return super::unframe(&bytes)
                    .map_err(|problem| Error::invalid_input(format!("message from the OpAMP server: {problem}")));
            }
            Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                return Err(ws_error(
                    err,
                    &format!("reading from the OpAMP server (limit {limit} bytes)"),
                ));
            }
            None => return Err(Error::unavailable("the OpAMP server closed the connection")),
        }
    }
}

fn ws_error(err: tungstenite::Error, doing: &str) -> Error {
    match err {
        tungstenite::Error::Capacity(err) => Error::invalid_input(format!("{doing}: {err}")),
        other => Error::Unavailable {
            message: doing.to_owned(),
            source: Some(Box::new(other)),
        },
    }
}

/// The error of a connection the server closed, from its close frame.
fn closed(frame: Option<CloseFrame>) -> Error {
    match frame {
        Some(frame) => {
            let message = format!(
                "the OpAMP server closed the connection: {} ({})",
                frame.reason,
                u16::from(frame.code)
            );
            match frame.code {
                CloseCode::Policy => Error::unauthenticated(message),
                CloseCode::Protocol | CloseCode::Invalid | CloseCode::Size | CloseCode::Unsupported => {
                    Error::invalid_input(message)
                }
                _ => Error::unavailable(message),
            }
        }
        None => Error::unavailable("the OpAMP server closed the connection"),
    }
}

/// Carries the session over a WebSocket until either side ends it.
async fn pump_ws(
    mut ws: WebSocketStream<ClientStream>,
    mut state: AgentState,
    mut reports: Receiver<FromDevice>,
    inbound: mpsc::Sender<Result<ToDevice>>,
    limit: usize,
) {
    loop {
        let outgoing = tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    let got = super::unframe::<ServerToAgent>(&bytes)
                        .map_err(|problem| Error::invalid_input(format!("message from the OpAMP server: {problem}")))
                        .and_then(|reply| convert::from_server(reply, &state.hello, &mut state.emission_ids));
                    match got {
                        Ok(got) => {
                            let answer = state.answer(&got);
                            for message in got.messages {
                                if inbound.send(Ok(message)).await.is_err() {
                                    break;
                                }
                            }
                            answer
                        }
                        Err(err) => {
                            let _ = inbound.send(Err(err)).await;
                            let _ = ws.close(Some(CloseFrame { code: CloseCode::Invalid, reason: "bad message".into() })).await;
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let error = closed(frame);
                    if !matches!(error, Error::Unavailable { .. }) {
                        let _ = inbound.send(Err(error)).await;
                    }
                    return;
                }
                Some(Ok(_)) => None,
                Some(Err(err)) => {
                    if let tungstenite::Error::Capacity(_) = &err {
                        let _ = ws.close(Some(CloseFrame { code: CloseCode::Size, reason: "message too big".into() })).await;
                    }
                    let _ = inbound.send(Err(ws_error(err, &format!("reading from the OpAMP server (limit {limit} bytes)")))).await;
                    return;
                }
                None => return,
            },
            report = reports.recv() => match report {
                Some(report) => state.report(&report),
                None => {
                    // The agent ended the session: say goodbye, as the spec asks.
                    let mut bye = state.next();
                    bye.agent_disconnect = Some(proto::AgentDisconnect {});
                    let _ = ws.send(Message::Binary(super::frame(&bye).into())).await;
                    let _ = ws.close(None).await;
                    return;
                }
            },
            _ = inbound.closed() => {
                let _ = ws.close(None).await;
                return;
            }
        };
        if let Some(message) = outgoing {
            let bytes = super::frame(&message);
            if bytes.len() > limit {
                debug!(device = %state.hello.device, bytes = bytes.len(), limit, "not sending a report over the size limit");
                continue;
            }
            if let Err(err) = ws.send(Message::Binary(bytes.into())).await {
                let _ = inbound.send(Err(ws_error(err, "sending to the OpAMP server"))).await;
                return;
            }
        }
    }
}

/// Plain HTTP requests to the server over one kept-alive connection, reopened when it breaks.
struct Poster {
    connector: OpampConnector,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Poster {
    async fn post(&mut self, message: AgentToServer) -> Result<ServerToAgent> {
        post(&self.connector, &mut self.sender, message).await
    }
}

async fn post(
    connector: &OpampConnector,
    sender: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    message: AgentToServer,
) -> Result<ServerToAgent> {
    let config = &connector.config;
    if message.encoded_len() > config.max_message_size {
        return Err(Error::invalid_input(format!(
            "a report of {} bytes is over the limit of {} bytes",
            message.encoded_len(),
            config.max_message_size
        )));
    }
    // A kept-alive connection the server closed between polls fails the
    // send: the report is sent again once over a fresh connection.
    let reused = sender.as_ref().is_some_and(|s| !s.is_closed());
    match send_once(connector, sender, &message).await {
        Err(Retry::Fresh(_)) if reused => {}
        Err(Retry::Fresh(err) | Retry::Final(err)) => return Err(err),
        Ok(reply) => return Ok(reply),
    }
    send_once(connector, sender, &message)
        .await
        .map_err(|(Retry::Fresh(err) | Retry::Final(err))| err)
}

/// Why a request failed: before the server answered (worth one retry on a fresh connection) or after.
enum Retry {
    Fresh(Error),
    Final(Error),
}

async fn send_once(
    connector: &OpampConnector,
    sender: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    message: &AgentToServer,
) -> std::result::Result<ServerToAgent, Retry> {
    let config = &connector.config;
    let url = &config.url;
    let body = message.encode_to_vec();
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let stream = connector.open().await.map_err(Retry::Final)?;
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| {
                Retry::Final(Error::Unavailable {
                    message: format!("opening an HTTP connection to {url}"),
                    source: Some(Box::new(err)),
                })
            })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "OpAMP HTTP client connection ended");
            }
        });
        *sender = Some(send);
    }
    let Some(send) = sender.as_mut() else {
        return Err(Retry::Final(Error::unavailable(format!("no HTTP connection to {url}"))));
    };
    let (body, gzipped) = if config.gzip {
        (compress(&body), true)
    } else {
        (body, false)
    };
    let mut request = Request::post(connector.uri.clone())
        .header(header::HOST, connector.address.as_str())
        .header(header::CONTENT_TYPE, PROTOBUF)
        .header(header::ACCEPT_ENCODING, "gzip")
        .header(
            "OpAMP-Instance-UID",
            super::uuid_text(&super::instance_uid(&message.instance_uid).unwrap_or_default()),
        );
    if gzipped {
        request = request.header(header::CONTENT_ENCODING, "gzip");
    }
    if let Some(auth) = &config.auth {
        request = request.header(header::AUTHORIZATION, auth.header());
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|err| Retry::Final(Error::invalid_input(format!("building the request to {url}: {err}"))))?;
    let response = send.send_request(request).await.map_err(|err| {
        *sender = None;
        Retry::Fresh(Error::Unavailable {
            message: format!("posting to {url}"),
            source: Some(Box::new(err)),
        })
    })?;
    let status = response.status();
    let gzipped = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(response.into_body(), config.max_message_size)
        .collect()
        .await
        .map_err(|err| Retry::Final(Error::unavailable(format!("reading the response from {url}: {err}"))))?
        .to_bytes();
    let body: Bytes = if gzipped {
        decompress(&body, config.max_message_size)
            .map_err(|problem| {
                Retry::Final(Error::invalid_input(format!(
                    "the response from {url}: {}",
                    problem.unwrap_or_else(|| "larger than the limit after decompression".into())
                )))
            })?
            .into()
    } else {
        body
    };
    if status == StatusCode::OK || status == StatusCode::BAD_REQUEST {
        if let Ok(reply) = ServerToAgent::decode(body.clone()) {
            if status == StatusCode::OK || reply.error_response.is_some() {
                return Ok(reply);
            }
        }
    }
    if status == StatusCode::OK {
        return Err(Retry::Final(Error::invalid_input(format!(
            "the response from {url} is not a ServerToAgent"
        ))));
    }
    Err(Retry::Final(status_error(
        status,
        &String::from_utf8_lossy(&body),
        retry_after.as_deref(),
        &format!("posting to {url}"),
    )))
}

/// Carries the session over plain HTTP: a request per report and one every poll interval.
async fn pump_http(
    mut poster: Poster,
    mut state: AgentState,
    mut reports: Receiver<FromDevice>,
    inbound: mpsc::Sender<Result<ToDevice>>,
    poll_interval: Duration,
) {
    let mut poll = tokio::time::interval(poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut pending: Option<AgentToServer> = None;
    loop {
        let message = match pending.take() {
            Some(message) => message,
            None => tokio::select! {
                report = reports.recv() => match report {
                    Some(report) => match state.report(&report) {
                        Some(message) => message,
                        None => continue,
                    },
                    None => {
                        let mut bye = state.next();
                        bye.agent_disconnect = Some(proto::AgentDisconnect {});
                        let _ = poster.post(bye).await;
                        return;
                    }
                },
                _ = poll.tick() => state.next(),
                _ = inbound.closed() => return,
            },
        };
        let got = match poster.post(message).await {
            Ok(reply) => convert::from_server(reply, &state.hello, &mut state.emission_ids),
            Err(err) => Err(err),
        };
        let got = match got {
            Ok(got) => got,
            // The server ended the session or is overloaded: the session is
            // over, and the agent reconnects with its backoff.
            Err(Error::Unavailable { message, .. }) => {
                debug!(device = %state.hello.device, %message, "the OpAMP server ended the session");
                return;
            }
            Err(err) => {
                let _ = inbound.send(Err(err)).await;
                return;
            }
        };
        pending = state.answer(&got);
        let delivered = !got.messages.is_empty();
        for message in got.messages {
            if inbound.send(Ok(message)).await.is_err() {
                return;
            }
        }
        if delivered {
            // More may be waiting: the next poll goes out at once.
            poll.reset_immediately();
        } else {
            poll.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_match_the_transport() {
        assert!(OpampConnector::new(OpampConnectorConfig::new("ws://127.0.0.1:4320/v1/opamp")).is_ok());
        let err = OpampConnector::new(OpampConnectorConfig::new("http://127.0.0.1:4320/v1/opamp")).unwrap_err();
        assert!(err.to_string().contains("ws://"), "{err}");
        let http = OpampConnectorConfig::new("http://127.0.0.1:4320/v1/opamp").http(Duration::from_secs(1));
        assert!(OpampConnector::new(http).is_ok());
        let never = OpampConnectorConfig::new("http://127.0.0.1:4320/v1/opamp").http(Duration::ZERO);
        assert!(OpampConnector::new(never).is_err());
        assert!(OpampConnector::new(OpampConnectorConfig::new("not a url")).is_err());
        let basic = OpampConnectorConfig::new("ws://h/").basic("d1", "secret");
        assert!(!format!("{basic:?}").contains("secret"));
    }
}
