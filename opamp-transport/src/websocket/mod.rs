//! OpAMP (the Open Agent Management Protocol of open-telemetry/opamp-spec)
//! over WebSocket and plain HTTP, on one port.
//!
//! The supervisor side is [`OpampTransport`], a
//! [`DeviceTransport`](opamp_core::DeviceTransport) that any OpAMP agent can
//! connect to (an OpenTelemetry Collector with its OpAMP extension, an OpAMP
//! client library); the device side is [`OpampConnector`], an
//! [`AgentConnector`](opamp_core::AgentConnector) speaking either transport.
//! The protocol is `proto/opamp/v1/*.proto` in this crate, generated into
//! [`proto`].
//!
//! # One endpoint, two transports
//!
//! The server listens on port 4320 (the spec's default, [`DEFAULT_PORT`]) at
//! `/v1/opamp` ([`DEFAULT_PATH`]):
//!
//! - **WebSocket**: a `GET` with `Upgrade: websocket`. Every binary message is
//!   a varint header (0) followed by an `AgentToServer` (up) or
//!   `ServerToAgent` (down); the server sends whenever it has something.
//!   Several agents may share one socket: each message names its agent by
//!   `instance_uid`.
//! - **Plain HTTP**: a `POST` with `Content-Type: application/x-protobuf`
//!   whose body is an `AgentToServer` (gzip accepted with
//!   `Content-Encoding: gzip`); the response body is the `ServerToAgent`
//!   (gzipped when the client sends `Accept-Encoding: gzip`). Messages for a
//!   polling agent wait in its queue until its next request.
//!
//! # Mapping onto the core's messages
//!
//! | OpAMP                                                       | core                                  |
//! |-------------------------------------------------------------|---------------------------------------|
//! | first `AgentToServer` of an `instance_uid` with its `agent_description` | register ([`DeviceHello`](opamp_core::transport::DeviceHello)), device id per [`DeviceIdSource`] |
//! | `ServerToAgent.remote_config` (`config_hash` = the bundle hash) | [`ToDevice::ConfigPush`](opamp_core::transport::ToDevice::ConfigPush) |
//! | `AgentToServer.remote_config_status`                        | [`FromDevice::ConfigAck`](opamp_core::transport::FromDevice::ConfigAck) (matched by hash) |
//! | `health` (`healthy`, `last_error`)                          | [`FromDevice::Status`](opamp_core::transport::FromDevice::Status) |
//! | custom message [`EMISSION_CAPABILITY`] `emission_state`     | [`FromDevice::Status`](opamp_core::transport::FromDevice::Status) `emission` |
//! | any `AgentToServer`                                         | [`FromDevice::Heartbeat`](opamp_core::transport::FromDevice::Heartbeat): keeps the lease |
//! | custom message [`EMISSION_CAPABILITY`] `set_emission` / `set_emission_result` | `SetEmission` command / its ack |
//! | `ServerToAgent.command` `Restart`                           | `Restart` command, acked once sent |
//! | custom message of any other capability                      | `Custom` command, acked once sent |
//!
//! The first reply to an agent carries the server's capabilities
//! ([`SERVER_CAPABILITIES`]) and custom capabilities; a `sequence_num` that
//! is not one more than the last is answered with `ReportFullState`, and so
//! is a first message without `agent_description`.
//!
//! # Credentials, limits, throttling
//!
//! Credentials are HTTP `Authorization` headers checked before the upgrade
//! (and on every plain HTTP request); a missing or wrong one is answered
//! `401`. See [`OpampAuth`] for what each kind proves.
//!
//! | what the agent did                              | WebSocket                                   | plain HTTP |
//! |-------------------------------------------------|---------------------------------------------|------------|
//! | no or a bad credential                          | `401` before the upgrade                    | `401`      |
//! | a bearer token for another device than it reports | `ErrorResponse` `BAD_REQUEST`, close 1008 | `401`      |
//! | a header that is not the varint 0, or bytes that are not an `AgentToServer` | `ErrorResponse` `BAD_REQUEST`, close 1002 / 1007 | `400` with the `ErrorResponse` |
//! | a message over the size limit (default 64 MiB, the spec's) | close 1009                       | `413`      |
//! | an `instance_uid` another connection is using   | `agent_identification.new_instance_uid`     | the same   |
//! | too many connections                            | `503` + `Retry-After` before the upgrade    | —          |
//! | too many registrations in flight, or the supervisor's accept queue is full | `ErrorResponse` `UNAVAILABLE` with `RetryInfo` | `429` / `503` + `Retry-After` |
//!
//! Each connection is judged alone: the others carry on.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use opamp_core::transport::{AgentConnector, DeviceHello, DeviceTransport, ToDevice};
//! use opamp_core::{DeviceId, SupervisorId};
//! use opamp_transport::auth::FleetKey;
//! use opamp_transport::websocket::{OpampAuth, OpampConnector, OpampConnectorConfig, OpampServerConfig, OpampTransport};
//!
//! let key = FleetKey::new(b"the fleet secret, 16+ bytes")?;
//! let transport = OpampTransport::bind(OpampServerConfig::new("127.0.0.1:0".parse().unwrap(), OpampAuth::FleetToken(key.clone()))).await?;
//! let url = format!("ws://{}/v1/opamp", transport.local_addr());
//!
//! // The device side, provisioned with its token.
//! let device = DeviceId::new("device-5")?;
//! let connector = OpampConnector::new(OpampConnectorConfig::new(url).token(key.token(&device)))?;
//! let connecting = tokio::spawn(async move { connector.connect(&DeviceHello::new(device)).await });
//!
//! // What a supervisor does with each session (the supervisor runtime does it for you).
//! let session = transport.accept().await?.expect("a device");
//! assert_eq!(session.hello.device.as_str(), "device-5");
//! session.outbound.try_send(ToDevice::Registered(Box::new(SupervisorId::new("s1")?))).expect("room");
//! let _agent = connecting.await.expect("not panicked")?;
//! # Ok(())
//! # }
//! ```

mod client;
mod convert;
mod frames;
#[cfg(feature = "testkit")]
pub(crate) mod fuzz;
mod http;
mod server;
mod wire;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use client::{ClientAuth, ClientTransport, OpampConnector, OpampConnectorConfig};
pub use server::OpampTransport;

use opamp_core::transport::DeviceLimits;

use crate::auth::FleetKey;

/// The generated protocol types (`opamp.proto.v1`), from
/// `proto/opamp/v1/opamp.proto` and `anyvalue.proto` in this crate.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.v1.rs"));
}

/// The spec's default port for OpAMP endpoints.
pub const DEFAULT_PORT: u16 = 4320;
/// The spec's default URL path.
pub const DEFAULT_PATH: &str = "/v1/opamp";
/// The default limit on one message, either way: the spec's recommended 64 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// The default WebSocket read buffer of an [`OpampConnector`]. tungstenite's
/// default is 128 KiB, allocated up front for every connection: at 15,000
/// agents in one load generator that alone is 1.9 GiB. An agent's messages
/// are small; a larger one is read in more chunks, not refused.
pub const DEFAULT_READ_BUFFER_SIZE: usize = 512;
/// The default WebSocket write buffer of an [`OpampConnector`]: 0 writes each
/// message out at once instead of gathering them (tungstenite's default
/// gathers up to 128 KiB).
pub const DEFAULT_WRITE_BUFFER_SIZE: usize = 0;
/// The default number of bytes the server asks for in one read from an
/// agent's WebSocket (at most 16 KiB; the rest of a larger frame is read in
/// place). The server holds no buffer for an idle connection (it keeps only
/// the bytes that have arrived, and frees them when every frame in them is
/// handled), so this sets how many reads a message takes, not what a
/// connection costs.
pub const DEFAULT_READ_CHUNK: usize = 4096;
/// The default time an agent has to be registered by the supervisor.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default largest message from a client not yet checked (see [`OpampServerConfig::max_unverified_message_size`]).
pub const DEFAULT_MAX_UNVERIFIED_MESSAGE_SIZE: usize = 1024 * 1024;
/// The default time a message has to arrive whole (see [`OpampServerConfig::message_timeout`]).
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default polling interval of a plain HTTP agent (the spec's 30 s).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// The default time after its last request that a plain HTTP agent counts as gone.
pub const DEFAULT_HTTP_SESSION_TIMEOUT: Duration = Duration::from_secs(120);
/// The default `Retry-After` / `RetryInfo` when throttling: the spec's recommended minimum.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The custom capability for telemetry emission (see `docs/data-model.md`).
///
/// Server → agent `set_emission`: JSON `{"correlation_id": "<uuid>", "enabled": true}`.
/// Agent → server `set_emission_result`: JSON `{"correlation_id": "<uuid>",
/// "outcome": "acked" | "failed" | "unsupported", "reason": "..."}`, and
/// `emission_state`: JSON `{"enabled": true}` whenever it changes.
/// `SetEmission` commands to an agent that does not list it fail as unsupported.
pub const EMISSION_CAPABILITY: &str = "io.opamp-fleet.emission";
/// The custom capability of this project's own agents: server → agent
/// `registered` (data: the supervisor id) in the first reply, and
/// `config_ref` (JSON `{"agent_type": "...", "version": "..."}`) beside each
/// `remote_config`, naming the template version the bundle is.
pub const FLEET_CAPABILITY: &str = "io.opamp-fleet.fleet";

/// What the server can do, advertised in its first reply to each agent:
/// `AcceptsStatus | OffersRemoteConfig | AcceptsEffectiveConfig`.
pub const SERVER_CAPABILITIES: u64 = proto::ServerCapabilities::AcceptsStatus as u64
    | proto::ServerCapabilities::OffersRemoteConfig as u64
    | proto::ServerCapabilities::AcceptsEffectiveConfig as u64;

/// How an agent's device id is derived from what it reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceIdSource {
    /// The string value of the identifying attribute `service.instance.id`
    /// in `agent_description` (the OpenTelemetry Collector sets it; this
    /// crate's connector sets it to the device id). An agent without it is
    /// refused with `BAD_REQUEST`.
    #[default]
    ServiceInstanceId,
    /// The 16-byte `instance_uid` as 32 lowercase hex digits.
    InstanceUidHex,
    /// The 16-byte `instance_uid` as UUID text (`8-4-4-4-12` lowercase hex).
    InstanceUidUuid,
}

/// How agents prove who they are, with the HTTP `Authorization` header.
#[derive(Clone)]
#[non_exhaustive]
pub enum OpampAuth {
    /// Fleet tokens ([`crate::auth`]), proving one device each, checked in
    /// full from the headers, before the upgrade or the body:
    /// `Authorization: Bearer <v2 token>` (which names its device) or
    /// `Authorization: Basic base64(<device id>:<token>)`; the device id the
    /// agent reports must be that one. An older `v1` bearer token names no
    /// device: it is checked against the device id the agent reports in its
    /// first message (before the upgrade too when the id comes from the
    /// `instance_uid`, sent in the `OpAMP-Instance-UID` header), and until
    /// then the client may send at most `max_unverified_message_size`.
    /// Several agents on one socket must all be that device.
    FleetToken(FleetKey),
    /// One user name and password for the whole fleet (`Authorization:
    /// Basic`), as OpenTelemetry's `basicauth` extension sends; any device id.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// A TLS client certificate, signed by the server's client CA
    /// ([`ServerTls::client_ca`](crate::tls::ServerTls::client_ca), required):
    /// its subject's Common Name is the device id, and the agent must report
    /// that device. The `Authorization` header is not looked at.
    ClientCertificate,
}

impl fmt::Debug for OpampAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpampAuth::FleetToken(key) => f.debug_tuple("FleetToken").field(key).finish(),
            OpampAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"..")
                .finish(),
            OpampAuth::ClientCertificate => f.write_str("ClientCertificate"),
        }
    }
}

/// How an [`OpampTransport`] listens and what it accepts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpampServerConfig {
    /// Where to listen; port 0 picks a free one (see [`OpampTransport::local_addr`]).
    pub listen: SocketAddr,
    /// The URL path of the endpoint, for both transports.
    pub path: String,
    /// How agents prove who they are.
    pub auth: OpampAuth,
    /// TLS (and mTLS with a client CA) on the listener, for WebSocket
    /// (`wss://`) and plain HTTP (`https://`) alike; plaintext when `None`.
    /// [`OpampTransport::reload_tls`] replaces it while serving.
    pub tls: Option<crate::tls::ServerTls>,
    /// How device ids are derived.
    pub device_id: DeviceIdSource,
    /// The largest message accepted or sent, in bytes, header included (after gzip, over HTTP).
    pub max_message_size: usize,
    /// The largest message from a client whose credential names no device
    /// (a `v1` bearer fleet token, which can only be checked against the
    /// device its first message reports), until it is checked: so an unchecked
    /// token costs the server at most this much per connection. Agents that
    /// send larger messages authenticate with Basic `device:token` or a
    /// client certificate, or this is raised. Default 1 MiB.
    pub max_unverified_message_size: usize,
    /// How many bytes one read from a WebSocket asks for. No buffer is held
    /// while a connection idles, and none for writing: each message is
    /// framed and written at once (see [`DEFAULT_READ_CHUNK`]).
    pub read_chunk: usize,
    /// How long the supervisor may take to register an agent.
    pub register_timeout: Duration,
    /// How long a message may take to arrive whole: a plain HTTP body from
    /// its head (`408` past it), and over a WebSocket the first message
    /// from the upgrade and any other from its first byte (the connection
    /// is closed past it, `1008`). A client that stalls thus holds neither
    /// its buffer nor its connection for long.
    pub message_timeout: Duration,
    /// A plain HTTP agent that has not polled for this long is disconnected.
    pub http_session_timeout: Duration,
    /// WebSocket connections open at once; more are refused with `503`.
    pub max_connections: usize,
    /// Connections (WebSocket or plain HTTP) one source address may have
    /// open; more are closed as they come. 0 (the default) for no cap:
    /// agents behind one NAT share an address. Set it where agents have
    /// addresses of their own.
    pub max_connections_per_address: usize,
    /// Connections open at once that have not yet had a request answered
    /// with success: still sending their headers, or a TLS handshake, or a
    /// body under a credential still to check. More are closed as they are
    /// accepted, before a byte is read, so that clients without a valid
    /// credential cannot hold more than this many connections (and their
    /// buffers) whatever the other caps. Default 10,000; raise it for a
    /// reconnection storm of more agents than that over TLS at once (they
    /// retry).
    pub max_unverified_connections: usize,
    /// Agents being registered at once; more are refused as throttled.
    pub max_pending_registrations: usize,
    /// What throttled agents are told to wait.
    pub retry_after: Duration,
    /// Messages queued for one agent before sends fail as full.
    pub device_queue: usize,
    /// Registered sessions waiting for the supervisor to accept them.
    pub accept_queue: usize,
    /// The listen backlog (capped by the kernel's `somaxconn`).
    pub backlog: u32,
    /// What an agent may say about itself: a description over these (too
    /// many or too long attributes, custom capabilities) is refused
    /// `BAD_REQUEST`, naming the field.
    pub device_limits: DeviceLimits,
}

impl OpampServerConfig {
    /// Listening on `listen` at [`DEFAULT_PATH`], checking credentials with
    /// `auth`, and the defaults for the rest.
    pub fn new(listen: SocketAddr, auth: OpampAuth) -> Self {
        OpampServerConfig {
            listen,
            path: DEFAULT_PATH.to_owned(),
            auth,
            tls: None,
            device_id: DeviceIdSource::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_unverified_message_size: DEFAULT_MAX_UNVERIFIED_MESSAGE_SIZE,
            read_chunk: DEFAULT_READ_CHUNK,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            http_session_timeout: DEFAULT_HTTP_SESSION_TIMEOUT,
            max_connections: 50_000,
            max_connections_per_address: 0,
            max_unverified_connections: 10_000,
            max_pending_registrations: 1024,
            retry_after: DEFAULT_RETRY_AFTER,
            device_queue: 16,
            accept_queue: 1024,
            backlog: 4096,
            device_limits: DeviceLimits::default(),
        }
    }

    /// With other bounds on what an agent may say about itself.
    pub fn device_limits(mut self, limits: DeviceLimits) -> Self {
        self.device_limits = limits;
        self
    }

    /// Serving at most `connections` at once from one address (0: no cap).
    pub fn max_connections_per_address(mut self, connections: usize) -> Self {
        self.max_connections_per_address = connections;
        self
    }

    /// Holding at most `connections` not yet past a successful request at once
    /// (see [`max_unverified_connections`](Self::max_unverified_connections)).
    pub fn max_unverified_connections(mut self, connections: usize) -> Self {
        self.max_unverified_connections = connections;
        self
    }

    /// With TLS (see [`tls`](Self::tls)).
    pub fn tls(mut self, tls: crate::tls::ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// At another URL path.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Deriving device ids another way.
    pub fn device_id(mut self, source: DeviceIdSource) -> Self {
        self.device_id = source;
        self
    }

    /// With another message size limit.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// With another limit on messages from clients not yet checked (see
    /// [`max_unverified_message_size`](Self::max_unverified_message_size)).
    pub fn max_unverified_message_size(mut self, bytes: usize) -> Self {
        self.max_unverified_message_size = bytes;
        self
    }

    /// The largest message a client with `credential` may send now.
    fn message_limit(&self, credential: &server::Credential) -> usize {
        match credential {
            server::Credential::Token(_) => self.max_unverified_message_size.min(self.max_message_size),
            server::Credential::Device(_) | server::Credential::Fleet => self.max_message_size,
        }
    }

    /// Reading WebSockets `bytes` at a time.
    pub fn read_chunk(mut self, bytes: usize) -> Self {
        self.read_chunk = bytes;
        self
    }

    /// With another register deadline.
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// Giving each message `timeout` to arrive whole.
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout = timeout;
        self
    }

    /// With another plain HTTP session timeout.
    pub fn http_session_timeout(mut self, timeout: Duration) -> Self {
        self.http_session_timeout = timeout;
        self
    }

    /// With other throttling limits.
    pub fn throttle(mut self, max_connections: usize, max_pending_registrations: usize, retry_after: Duration) -> Self {
        self.max_connections = max_connections;
        self.max_pending_registrations = max_pending_registrations;
        self.retry_after = retry_after;
        self
    }

    /// With another per-device queue length.
    pub fn device_queue(mut self, messages: usize) -> Self {
        self.device_queue = messages;
        self
    }

    fn validate(&self) -> opamp_core::Result<()> {
        use opamp_core::Error;
        if !self.path.starts_with('/') {
            return Err(Error::invalid_input(format!(
                "opamp path must start with '/', got {:?}",
                self.path
            )));
        }
        if matches!(self.auth, OpampAuth::ClientCertificate)
            && self.tls.as_ref().is_none_or(|tls| tls.client_ca_pem.is_none())
        {
            return Err(Error::invalid_input(
                "opamp client-certificate authentication needs TLS with a client CA",
            ));
        }
        if self.max_message_size < 1024 {
            return Err(Error::invalid_input(format!(
                "opamp max_message_size must be at least 1024 bytes, got {}",
                self.max_message_size
            )));
        }
        if self.read_chunk < 64 {
            return Err(Error::invalid_input(format!(
                "opamp read_chunk must be at least 64 bytes, got {}",
                self.read_chunk
            )));
        }
        if self.register_timeout.is_zero() || self.http_session_timeout.is_zero() || self.message_timeout.is_zero() {
            return Err(Error::invalid_input(
                "opamp register_timeout, message_timeout and http_session_timeout must be more than zero",
            ));
        }
        if self.device_queue == 0
            || self.accept_queue == 0
            || self.max_connections == 0
            || self.max_unverified_connections == 0
            || self.max_pending_registrations == 0
        {
            return Err(Error::invalid_input(
                "opamp device_queue, accept_queue, max_connections, max_unverified_connections and max_pending_registrations must be at least 1",
            ));
        }
        if let OpampAuth::Basic { username, password } = &self.auth {
            if username.is_empty() || username.contains(':') || password.is_empty() {
                return Err(Error::invalid_input(
                    "opamp basic auth needs a user name without ':' and a password",
                ));
            }
        }
        Ok(())
    }
}

/// The WebSocket settings of either side: small explicit buffers and the size limit.
fn ws_config(read_buffer_size: usize, write_buffer_size: usize, max_message_size: usize) -> tungstenite_config::Config {
    tungstenite_config::Config::default()
        .read_buffer_size(read_buffer_size.max(256))
        .write_buffer_size(write_buffer_size)
        .max_write_buffer_size(max_message_size.saturating_mul(2).max(write_buffer_size + 1))
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

mod tungstenite_config {
    pub(super) use tokio_tungstenite::tungstenite::protocol::WebSocketConfig as Config;
}

/// A WebSocket message: the varint header 0, then `message`.
fn frame(message: &impl prost::Message) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + message.encoded_len());
    bytes.push(0);
    message.encode_raw(&mut bytes);
    bytes
}

/// What was wrong with a WebSocket message, and the close code it earns.
#[derive(Debug, PartialEq, Eq)]
enum FrameProblem {
    /// The header is not a varint or not 0: a protocol error (1002).
    Header(String),
    /// The data is not the protobuf message: invalid payload (1007).
    Payload(String),
}

impl fmt::Display for FrameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameProblem::Header(text) | FrameProblem::Payload(text) => f.write_str(text),
        }
    }
}

/// The message in a WebSocket message: checks the varint header is 0.
fn unframe<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, FrameProblem> {
    let mut rest = bytes;
    let header = prost::encoding::decode_varint(&mut rest)
        .map_err(|err| FrameProblem::Header(format!("the message header is not a varint: {err}")))?;
    if header != 0 {
        return Err(FrameProblem::Header(format!(
            "the message header is {header}; this version of OpAMP only defines 0"
        )));
    }
    M::decode(rest).map_err(|err| {
        FrameProblem::Payload(format!(
            "the message is not a valid {}: {err}",
            std::any::type_name::<M>().rsplit("::").next().unwrap_or("message")
        ))
    })
}

/// The 16-byte instance id of a message, or what is wrong with it.
fn instance_uid(bytes: &[u8]) -> Result<[u8; 16], String> {
    bytes
        .try_into()
        .map_err(|_| format!("instance_uid must be 16 bytes, got {}", bytes.len()))
}

/// `uid` as UUID text, as the `OpAMP-Instance-UID` header carries it.
fn uuid_text(uid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uid).hyphenated().to_string()
}

/// A mutex's guard, even after a panic elsewhere poisoned it: what each
/// lock guards stays consistent between statements.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_a_zero_header_and_refuse_others() {
        let message = proto::ServerToAgent {
            instance_uid: vec![7; 16],
            ..Default::default()
        };
        let bytes = frame(&message);
        assert_eq!(bytes[0], 0);
        assert_eq!(unframe::<proto::ServerToAgent>(&bytes).unwrap(), message);
        // An empty message is valid: header only.
        assert_eq!(
            unframe::<proto::AgentToServer>(&[0]).unwrap(),
            proto::AgentToServer::default()
        );
        // A two-byte varint 0 is still 0.
        assert!(unframe::<proto::AgentToServer>(&[0x80, 0x00]).is_ok());
        assert!(matches!(
            unframe::<proto::AgentToServer>(&[1]),
            Err(FrameProblem::Header(text)) if text.contains("header is 1")
        ));
        assert!(matches!(
            unframe::<proto::AgentToServer>(&[]),
            Err(FrameProblem::Header(text)) if text.contains("not a varint")
        ));
        assert!(matches!(
            unframe::<proto::AgentToServer>(&[0, 0x0a, 0xff, 0x01]),
            Err(FrameProblem::Payload(text)) if text.contains("AgentToServer")
        ));
    }

    #[test]
    fn settings_are_checked_and_secrets_hidden() {
        let key = FleetKey::new([7u8; 32]).unwrap();
        let config = OpampServerConfig::new("127.0.0.1:0".parse().unwrap(), OpampAuth::FleetToken(key));
        assert!(config.validate().is_ok());
        assert!(config.clone().path("v1").validate().is_err());
        assert!(config.clone().max_message_size(10).validate().is_err());
        let basic = OpampAuth::Basic {
            username: "fleet".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{basic:?}").contains("hunter2"));
        let bad = OpampServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            OpampAuth::Basic {
                username: "a:b".into(),
                password: "p".into(),
            },
        );
        assert!(bad.validate().is_err());
        assert_eq!(uuid_text(&[0xab; 16]), "abababab-abab-abab-abab-abababababab");
        assert!(instance_uid(&[1, 2]).unwrap_err().contains("16 bytes, got 2"));
    }
}
