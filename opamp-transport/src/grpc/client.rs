//! The device side: connects to a supervisor's `ControlService` and registers.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use opamp_core::transport::{
    AgentConnector, AgentSession, DeviceHello, FromDevice, Inbound, Outbound, Receiver, ToDevice,
};
use opamp_core::{Error, Result};
use tokio_stream::{Stream as _, StreamExt as _};
use tonic::Streaming;
use tonic::transport::Endpoint;

use super::proto::Envelope;
use super::proto::control_service_client::ControlServiceClient;
use super::{
    ClientTls, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REGISTER_TIMEOUT, convert, error_of,
};
use crate::auth::DeviceToken;

/// Where a device connects and how it proves who it is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrpcConnectorConfig {
    /// The supervisor's URL: `http://host:port`, or `https://host:port` with [`tls`](Self::tls).
    pub url: String,
    /// The device's fleet token, for [`DeviceAuth::FleetToken`](super::DeviceAuth::FleetToken) supervisors.
    pub token: Option<DeviceToken>,
    /// TLS, and the client certificate for [`DeviceAuth::ClientCertificate`](super::DeviceAuth::ClientCertificate).
    pub tls: Option<ClientTls>,
    /// How long opening the connection may take.
    pub connect_timeout: Duration,
    /// How long the supervisor may take to answer `register` with `registered`.
    pub register_timeout: Duration,
    /// HTTP/2 keepalive pings at this interval, even while idle.
    pub keepalive_interval: Duration,
    /// The connection is dropped when a ping goes unanswered this long.
    pub keepalive_timeout: Duration,
    /// The largest message sent or accepted, in bytes.
    pub max_message_size: usize,
    /// The local address to connect from (load generators spread devices over 127.0.0.x).
    pub local_address: Option<IpAddr>,
    /// Messages queued for the supervisor before sends wait.
    pub queue: usize,
}

impl GrpcConnectorConfig {
    /// Connecting to `url`, with the defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        GrpcConnectorConfig {
            url: url.into(),
            token: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            local_address: None,
            queue: 16,
        }
    }

    /// Presenting `token` in `register`.
    pub fn token(mut self, token: DeviceToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Over TLS.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
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
}

/// The gRPC [`AgentConnector`]: each [`connect`](AgentConnector::connect)
/// opens a fresh HTTP/2 connection, sends `register`, and returns once the
/// supervisor has answered `registered`.
#[derive(Debug, Clone)]
pub struct GrpcConnector {
    config: GrpcConnectorConfig,
    endpoint: Endpoint,
}

impl GrpcConnector {
    /// A connector; [`Error::InvalidInput`] if the URL or the TLS material is unusable.
    pub fn new(config: GrpcConnectorConfig) -> Result<Self> {
        let invalid = |what: &str, err: &dyn std::fmt::Display| {
            Error::invalid_input(format!("grpc connector {what} ({}): {err}", config.url))
        };
        let mut endpoint = Endpoint::from_shared(config.url.clone())
            .map_err(|err| invalid("url", &err))?
            .connect_timeout(config.connect_timeout)
            .http2_keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .local_address(config.local_address);
        if let Some(tls) = &config.tls {
            endpoint = endpoint
                .tls_config(super::tls::client(tls))
                .map_err(|err| invalid("TLS settings", &err))?;
        }
        Ok(GrpcConnector { config, endpoint })
    }
}

#[async_trait]
impl AgentConnector for GrpcConnector {
    async fn connect(&self, hello: &DeviceHello) -> Result<AgentSession> {
        let config = &self.config;
        let url = &config.url;
        let channel = self.endpoint.connect().await.map_err(|err| Error::Unavailable {
            message: format!("connecting to {url}"),
            source: Some(Box::new(err)),
        })?;
        let mut client = ControlServiceClient::new(channel)
            .max_decoding_message_size(config.max_message_size)
            .max_encoding_message_size(config.max_message_size);

        let (outbound, queue) = Outbound::channel(config.queue);
        let token = config.token.as_ref().map_or("", DeviceToken::as_str);
        let requests = tokio_stream::once(convert::register(hello, token))
            .chain(QueueStream(queue).map(|message: FromDevice| convert::from_device_message(&message)));

        let doing = format!("registering {} at {url}", hello.device);
        let registering = async {
            let mut stream = client
                .control(requests)
                .await
                .map_err(|status| error_of(&status, &doing))?
                .into_inner();
            match stream.message().await {
                Ok(Some(envelope)) => match convert::from_supervisor(envelope) {
                    Ok(registered @ ToDevice::Registered(_)) => Ok((stream, registered)),
                    Ok(_) => Err(Error::invalid_input(format!(
                        "{doing}: the supervisor's first message was not registered"
                    ))),
                    Err(problem) => Err(Error::invalid_input(format!("{doing}: {problem}"))),
                },
                Ok(None) => Err(Error::unavailable(format!(
                    "{doing}: the supervisor closed the stream before registering the device"
                ))),
                Err(status) => Err(error_of(&status, &doing)),
            }
        };
        let (stream, registered) = tokio::time::timeout(config.register_timeout, registering)
            .await
            .map_err(|_| Error::timeout(doing.clone()))??;
        let inbound = SupervisorInbound {
            stream,
            registered: Some(registered),
        };
        Ok(AgentSession::new(Box::new(inbound), outbound))
    }
}

/// Messages from the supervisor, starting with its `registered`.
struct SupervisorInbound {
    stream: Streaming<Envelope>,
    registered: Option<ToDevice>,
}

impl std::fmt::Debug for SupervisorInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorInbound").finish_non_exhaustive()
    }
}

impl Inbound<ToDevice> for SupervisorInbound {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<ToDevice>>> {
        if let Some(registered) = self.registered.take() {
            return Poll::Ready(Ok(Some(registered)));
        }
        let next = std::task::ready!(Pin::new(&mut self.stream).poll_next(cx));
        Poll::Ready(match next {
            Some(Ok(envelope)) => convert::from_supervisor(envelope)
                .map(Some)
                .map_err(|problem| Error::invalid_input(format!("message from the supervisor: {problem}"))),
            None => Ok(None),
            Some(Err(status)) => Err(error_of(&status, "reading from the supervisor")),
        })
    }
}

/// The device's queue, as the stream of requests after the registration.
struct QueueStream(Receiver<FromDevice>);

impl tokio_stream::Stream for QueueStream {
    type Item = FromDevice;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FromDevice>> {
        self.0.poll_recv(cx)
    }
}
