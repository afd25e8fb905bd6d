//! The design's `ControlService` over gRPC: one bidirectional stream per device.
//!
//! The supervisor side is [`GrpcTransport`], a
//! [`DeviceTransport`](opamp_core::DeviceTransport) that serves the protocol
//! with tonic; the device side is [`GrpcConnector`], an
//! [`AgentConnector`](opamp_core::AgentConnector). The protocol is
//! `proto/opamp/control/v1/control.proto` in this crate (generated into
//! [`proto`]); fields 1–5 of its `Envelope` are the design's Appendix A.
//!
//! # A session
//!
//! 1. The device opens `Control` and sends `register` (its [`EdgeIdentity`])
//!    within the register deadline (default 10 s).
//! 2. The supervisor checks the credential: a fleet token
//!    ([`DeviceAuth::FleetToken`], see [`crate::auth`]) or the TLS client
//!    certificate ([`DeviceAuth::ClientCertificate`]). A device can only
//!    register as the device its credential names.
//! 3. Once the supervisor has claimed the device's lease it sends
//!    `registered`; the connector's [`connect`](opamp_core::AgentConnector::connect) returns then.
//! 4. Commands and config pushes flow down, acknowledgements, status events
//!    and heartbeats flow up.
//!
//! # Bad input
//!
//! Each stream is judged alone: a stream that sends something malformed or
//! out of place is closed with a status naming the problem, and every other
//! device carries on.
//!
//! | what the device did                               | status              |
//! |---------------------------------------------------|---------------------|
//! | no `register` within the deadline                 | `DEADLINE_EXCEEDED` |
//! | a first message other than `register`             | `INVALID_ARGUMENT`  |
//! | a credential that does not prove the claimed id   | `UNAUTHENTICATED`   |
//! | bytes that are not an `Envelope`, a bad field, `register` twice, a message only supervisors send | `INVALID_ARGUMENT` |
//! | a message over the size limit (default 4 MiB)     | `RESOURCE_EXHAUSTED`|
//!
//! [`EdgeIdentity`]: proto::EdgeIdentity
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use opamp_core::transport::{AgentConnector, DeviceHello, DeviceTransport, ToDevice};
//! use opamp_core::{DeviceId, SupervisorId};
//! use opamp_transport::auth::FleetKey;
//! use opamp_transport::grpc::{DeviceAuth, GrpcConnector, GrpcConnectorConfig, GrpcServerConfig, GrpcTransport};
//!
//! let key = FleetKey::new(b"the fleet secret, 16+ bytes")?;
//! let transport = GrpcTransport::bind(GrpcServerConfig::new("127.0.0.1:0".parse().unwrap(), DeviceAuth::FleetToken(key.clone()))).await?;
//! let url = format!("http://{}", transport.local_addr());
//!
//! // The device side, provisioned with its token.
//! let device = DeviceId::new("device-5")?;
//! let connector = GrpcConnector::new(GrpcConnectorConfig::new(url).token(key.token(&device)))?;
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
mod codec;
mod convert;
#[cfg(feature = "testkit")]
pub(crate) mod fuzz;
mod incoming;
mod server;
mod tls;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use crate::tls::{ClientTls, ServerTls};
pub use client::{GrpcConnector, GrpcConnectorConfig};
pub use server::GrpcTransport;

use opamp_core::transport::DeviceLimits;

use crate::auth::FleetKey;

/// The generated protocol types and tonic service (`opamp.control.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("opamp.control.v1");
}

/// The default limit on one message, either way: 4 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// The default time a device has to send `register` after opening its stream.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default interval of HTTP/2 keepalive pings on idle connections.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// The default time to wait for a keepalive ping's answer before dropping the connection.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How devices prove who they are.
#[derive(Clone)]
#[non_exhaustive]
pub enum DeviceAuth {
    /// The `token` in `register` must be the fleet token of its `device_id`.
    FleetToken(FleetKey),
    /// The device id is the Common Name of the TLS client certificate, which
    /// the server's [`ServerTls::client_ca_pem`] must have signed. A
    /// `register` naming another device is refused; one with an empty
    /// `device_id` takes the certificate's.
    ClientCertificate,
}

impl fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceAuth::FleetToken(key) => f.debug_tuple("FleetToken").field(key).finish(),
            DeviceAuth::ClientCertificate => f.write_str("ClientCertificate"),
        }
    }
}

/// How a [`GrpcTransport`] listens and what it accepts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrpcServerConfig {
    /// Where to listen; port 0 picks a free one (see [`GrpcTransport::local_addr`]).
    pub listen: SocketAddr,
    /// How devices prove who they are.
    pub auth: DeviceAuth,
    /// TLS, required for [`DeviceAuth::ClientCertificate`]; plaintext HTTP/2 when `None`.
    pub tls: Option<ServerTls>,
    /// The largest message accepted or sent, in bytes.
    pub max_message_size: usize,
    /// How long a device has to send `register` after opening its stream;
    /// also how long a connection has to begin its handshake (HTTP/2
    /// preface or TLS hello) before it is closed.
    pub register_timeout: Duration,
    /// HTTP/2 keepalive pings on every connection at this interval.
    pub keepalive_interval: Duration,
    /// A connection whose ping goes unanswered this long is dropped.
    pub keepalive_timeout: Duration,
    /// Messages queued for one device before its sends fail as full.
    pub device_queue: usize,
    /// Registered sessions waiting for the supervisor to accept them.
    pub accept_queue: usize,
    /// The listen backlog (capped by the kernel's `somaxconn`).
    pub backlog: u32,
    /// Streams one connection may have open at once (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`); a client's further streams wait
    /// for one to end. A device uses one; a few allow a reconnect to
    /// overlap the stream it replaces. Default 4.
    pub max_streams_per_connection: u32,
    /// Connections served at once; more wait in the listen backlog until
    /// one closes. Default 50,000.
    pub max_connections: usize,
    /// Connections one source address may have open; more are closed as
    /// they come. 0 (the default) for no cap: devices behind one NAT share
    /// an address. Set it where devices have addresses of their own.
    pub max_connections_per_address: usize,
    /// Connections open at once on which no device has registered yet
    /// (in their TLS handshake, their HTTP/2 preface, or a first stream
    /// whose register message has not come or did not authenticate). More
    /// are closed as they are accepted, so that clients without a valid
    /// credential hold at most this many; and one on which no device has
    /// registered within twice `register_timeout` of its handshake is
    /// closed, so that none holds its place for long. Default 10,000.
    pub max_unverified_connections: usize,
    /// What a device may say about itself: a register message over these
    /// is refused `INVALID_ARGUMENT`, naming the field.
    pub device_limits: DeviceLimits,
}

impl GrpcServerConfig {
    /// Listening on `listen`, checking credentials with `auth`, and the defaults for the rest.
    pub fn new(listen: SocketAddr, auth: DeviceAuth) -> Self {
        GrpcServerConfig {
            listen,
            auth,
            tls: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            device_queue: 16,
            accept_queue: 1024,
            backlog: 4096,
            max_streams_per_connection: 4,
            max_connections: 50_000,
            max_connections_per_address: 0,
            max_unverified_connections: 10_000,
            device_limits: DeviceLimits::default(),
        }
    }

    /// With other bounds on what a device may say about itself.
    pub fn device_limits(mut self, limits: DeviceLimits) -> Self {
        self.device_limits = limits;
        self
    }

    /// Letting one connection have `streams` open at once (at least 1).
    pub fn max_streams_per_connection(mut self, streams: u32) -> Self {
        self.max_streams_per_connection = streams.max(1);
        self
    }

    /// Serving at most `connections` at once (at least 1).
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Serving at most `connections` at once from one address (0: no cap).
    pub fn max_connections_per_address(mut self, connections: usize) -> Self {
        self.max_connections_per_address = connections;
        self
    }

    /// Holding at most `connections` on which no device has registered yet (at least 1).
    pub fn max_unverified_connections(mut self, connections: usize) -> Self {
        self.max_unverified_connections = connections.max(1);
        self
    }

    /// With TLS.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// With another message size limit.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// With another register deadline.
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// With other keepalive timings.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }

    /// With another per-device queue length.
    pub fn device_queue(mut self, messages: usize) -> Self {
        self.device_queue = messages;
        self
    }

    fn validate(&self) -> opamp_core::Result<()> {
        use opamp_core::Error;
        if self.max_message_size < 1024 {
            return Err(Error::invalid_input(format!(
                "grpc max_message_size must be at least 1024 bytes, got {}",
                self.max_message_size
            )));
        }
        if self.register_timeout.is_zero() || self.keepalive_interval.is_zero() || self.keepalive_timeout.is_zero() {
            return Err(Error::invalid_input(
                "grpc register_timeout, keepalive_interval and keepalive_timeout must be more than zero",
            ));
        }
        if self.device_queue == 0 || self.accept_queue == 0 {
            return Err(Error::invalid_input(
                "grpc device_queue and accept_queue must be at least 1",
            ));
        }
        if matches!(self.auth, DeviceAuth::ClientCertificate)
            && self.tls.as_ref().is_none_or(|tls| tls.client_ca_pem.is_none())
        {
            return Err(Error::invalid_input(
                "grpc DeviceAuth::ClientCertificate needs TLS with a client_ca_pem to verify certificates against",
            ));
        }
        Ok(())
    }
}

/// Maps a gRPC status from the peer into the core error, by what the caller can do about it.
fn error_of(status: &tonic::Status, doing: &str) -> opamp_core::Error {
    use opamp_core::Error;
    use tonic::Code;
    let message = format!("{doing}: {} ({:?})", status.message(), status.code());
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Error::unauthenticated(message),
        Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange | Code::FailedPrecondition => {
            Error::invalid_input(message)
        }
        Code::DeadlineExceeded => Error::timeout(message),
        Code::Unimplemented => Error::unsupported(message),
        _ => Error::Unavailable {
            message,
            source: Some(Box::new(status.clone())),
        },
    }
}
