//! The supervisor side: a tonic server whose registered streams become device sessions.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use opamp_core::transport::{
    DeviceLimits, DeviceSession, DeviceTransport, FromDevice, Inbound, Outbound, Receiver, ReportBucket, ToDevice,
};
use opamp_core::{DeviceId, Error, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info};

use super::incoming::ConnectionInfo;
use super::proto::control_service_server::{ControlService, ControlServiceServer};
use super::proto::{Envelope, envelope::Body};
use super::{DeviceAuth, GrpcServerConfig, convert};

/// The gRPC [`DeviceTransport`]: serves `ControlService` and hands each
/// device that registered with a valid credential to the supervisor.
///
/// Bound and serving from [`bind`](Self::bind) on; sessions wait (up to the
/// accept queue) until [`accept`](DeviceTransport::accept) takes them.
/// [`shutdown`](Self::shutdown) stops it gracefully; dropping it does too,
/// without waiting.
#[derive(Debug)]
pub struct GrpcTransport {
    local_addr: SocketAddr,
    sessions: crate::net::Accepted,
    stopping: watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
    tls: Option<Arc<crate::tls::Reloadable>>,
}

impl GrpcTransport {
    /// Listens on `config.listen` and starts serving.
    ///
    /// [`Error::InvalidInput`] for a setting out of range or TLS material that
    /// does not load; [`Error::Unavailable`] if the address cannot be bound.
    pub async fn bind(config: GrpcServerConfig) -> Result<Self> {
        config.validate()?;
        let listener = crate::net::listen(config.listen, config.backlog)?;
        let local_addr = crate::net::local_addr(&listener, config.listen)?;
        // A connection must begin its handshake within the time a device
        // has to register: silent ones are closed rather than held.
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(crate::tls::Reloadable::new(tls, &[b"h2"])?)),
            None => None,
        };
        let incoming = super::incoming::incoming(
            listener,
            config.max_connections,
            config.register_timeout,
            tls.clone(),
            crate::net::PerAddress::new(config.max_connections_per_address),
            crate::net::Unverified::new(config.max_unverified_connections),
        );

        let (sessions, accepted) = mpsc::channel(config.accept_queue);
        let handler = Handler {
            shared: Arc::new(Shared {
                auth: config.auth.clone(),
                register_timeout: config.register_timeout,
                device_queue: config.device_queue,
                max_message_size: config.max_message_size,
                device_limits: Arc::new(config.device_limits.clone()),
                sessions,
            }),
        };
        let service = ControlServiceServer::new(handler)
            .max_decoding_message_size(config.max_message_size)
            .max_encoding_message_size(config.max_message_size);
        let mut builder = tonic::transport::Server::builder()
            // A device needs one stream; without a bound a connection could
            // open hundreds, each buffering up to a message before it registers.
            .max_concurrent_streams(config.max_streams_per_connection)
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .tcp_nodelay(true);

        let (stopping, mut stop) = watch::channel(false);
        let router = builder.add_service(service);
        let server = tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|stop| *stop).await.map(drop);
            };
            if let Err(err) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!(%local_addr, error = %err, "the gRPC server stopped");
            }
        });
        info!(%local_addr, auth = ?config.auth, tls = config.tls.is_some(), "gRPC device transport listening");
        Ok(GrpcTransport {
            local_addr,
            sessions: crate::net::Accepted::new(accepted),
            stopping,
            server: Mutex::new(Some(server)),
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
                "the gRPC listener was bound without TLS: TLS cannot be added while it serves",
            )),
        }
    }

    /// The address it listens on (with the port picked, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections and waits up to `grace` for open streams
    /// to end (the supervisor ends them when it shuts down), then drops the rest.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping.send_replace(true);
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut server) = server {
            if tokio::time::timeout(grace, &mut server).await.is_err() {
                server.abort();
            }
        }
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        self.stopping.send_replace(true);
    }
}

#[async_trait]
impl DeviceTransport for GrpcTransport {
    fn name(&self) -> &'static str {
        "grpc"
    }

    async fn accept(&self) -> Result<Option<DeviceSession>> {
        self.sessions.next(&self.stopping).await
    }
}

struct Shared {
    auth: DeviceAuth,
    register_timeout: Duration,
    device_queue: usize,
    max_message_size: usize,
    /// Shared by every device's inbound half, which checks its report rate.
    device_limits: Arc<DeviceLimits>,
    sessions: mpsc::Sender<DeviceSession>,
}

struct Handler {
    shared: Arc<Shared>,
}

#[async_trait]
impl ControlService for Handler {
    type ControlStream = ToDeviceStream;

    async fn control(&self, request: Request<Streaming<Envelope>>) -> Result<Response<ToDeviceStream>, Status> {
        let shared = &self.shared;
        let connection = request.extensions().get::<ConnectionInfo>();
        let peer = connection.map_or_else(|| "grpc".to_owned(), |info| format!("grpc {}", info.peer));
        let certified = match shared.auth {
            DeviceAuth::ClientCertificate => Some(certified_device(connection)?),
            DeviceAuth::FleetToken(_) => None,
        };
        let unverified = connection.map(|info| Arc::clone(&info.unverified));
        let mut stream = request.into_inner();

        let first = tokio::time::timeout(shared.register_timeout, stream.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no register message within {}",
                    opamp_core::time::duration_text::format(shared.register_timeout)
                ))
            })?
            .map_err(|status| refusal(&status, shared.max_message_size))?
            .ok_or_else(|| Status::invalid_argument("the stream ended before register"))?;
        let identity = match first.body {
            Some(Body::Register(identity)) => identity,
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first message must be register, got {}",
                    convert::body_name(&other)
                )));
            }
        };
        let claimed = convert::claimed_device(&identity).map_err(Status::invalid_argument)?;
        let device = authenticate(&shared.auth, claimed, certified, &identity.token)?;
        if let Some(unverified) = unverified {
            unverified.verified();
        }
        let hello = convert::hello(device, identity).map_err(Status::invalid_argument)?;
        shared
            .device_limits
            .check_hello(&hello)
            .map_err(|err| Status::invalid_argument(format!("register: {err}")))?;

        let (outbound, queue) = Outbound::channel(shared.device_queue);
        let (abort, aborted) = oneshot::channel();
        let inbound = DeviceInbound {
            device,
            stream,
            abort: Some(abort),
            max_message_size: shared.max_message_size,
            allowance: shared.device_limits.report_bucket(),
            limits: shared.device_limits.clone(),
        };
        let session = DeviceSession::new(hello, peer, Box::new(inbound), outbound);
        debug!(%device, "device authenticated; handing its session to the supervisor");
        shared
            .sessions
            .send(session)
            .await
            .map_err(|_| Status::unavailable("the supervisor is shutting down"))?;
        Ok(Response::new(ToDeviceStream {
            aborted: Some(aborted),
            queue,
        }))
    }
}

/// The device id the connection's verified client certificate names.
fn certified_device(connection: Option<&ConnectionInfo>) -> Result<DeviceId, Status> {
    match connection.and_then(|info| info.certified.as_ref()) {
        Some(Ok(device)) => Ok(*device),
        Some(Err(problem)) => Err(Status::unauthenticated(problem.clone())),
        None => Err(Status::unauthenticated("a client certificate is required")),
    }
}

/// The device a register message proves, or why it proves nothing.
fn authenticate(
    auth: &DeviceAuth,
    claimed: Option<DeviceId>,
    certified: Option<DeviceId>,
    token: &str,
) -> Result<DeviceId, Status> {
    match (auth, claimed, certified) {
        (DeviceAuth::FleetToken(key), Some(device), _) => key
            .verify(&device, token)
            .map(|()| device)
            .map_err(|err| Status::unauthenticated(err.to_string())),
        (DeviceAuth::FleetToken(_), None, _) => Err(Status::invalid_argument("register.device_id is empty")),
        (DeviceAuth::ClientCertificate, claimed, Some(certified)) => match claimed {
            Some(claimed) if claimed != certified => Err(Status::unauthenticated(format!(
                "the client certificate is for device {certified}, not {claimed}"
            ))),
            _ => Ok(certified),
        },
        (DeviceAuth::ClientCertificate, _, None) => Err(Status::unauthenticated("a client certificate is required")),
    }
}

/// The status that closes a stream whose bytes could not be read as a message.
fn refusal(status: &Status, limit: usize) -> Status {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Status::resource_exhausted(format!(
            "message larger than the limit of {limit} bytes: {}",
            status.message()
        )),
        Code::Internal => Status::invalid_argument(format!("malformed message: {}", status.message())),
        _ => status.clone(),
    }
}

/// Messages from one device; the first bad one ends its stream with a status naming it.
struct DeviceInbound {
    device: DeviceId,
    stream: Streaming<Envelope>,
    abort: Option<oneshot::Sender<Status>>,
    max_message_size: usize,
    /// How many more messages the device may send now.
    allowance: ReportBucket,
    limits: Arc<DeviceLimits>,
}

impl std::fmt::Debug for DeviceInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceInbound")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceInbound {
    fn close_with(&mut self, status: Status) -> Error {
        let error = Error::invalid_input(format!("device {}: {}", self.device, status.message()));
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(status);
        }
        error
    }
}

impl Inbound<FromDevice> for DeviceInbound {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<FromDevice>>> {
        let next = std::task::ready!(Pin::new(&mut self.stream).poll_next(cx));
        Poll::Ready(match next {
            Some(Ok(envelope)) => match convert::from_device(envelope) {
                // Answers to the server (outcomes) are never held back.
                Ok(message @ (FromDevice::CommandAck(_) | FromDevice::ConfigAck(_))) => Ok(Some(message)),
                Ok(message) => match self.allowance.take(&self.limits, std::time::Instant::now()) {
                    Ok(()) => Ok(Some(message)),
                    // Over its rate: the stream ends, and the device comes
                    // back after its backoff (tonic clients retry on it).
                    Err(wait) => Err(self.close_with(Status::resource_exhausted(format!(
                        "more than {} messages a minute (bursts of {}): come back in {} ms",
                        self.limits.max_reports_per_minute,
                        self.limits.max_report_burst,
                        wait.as_millis()
                    )))),
                },
                Err(problem) => Err(self.close_with(Status::invalid_argument(problem))),
            },
            None => Ok(None),
            Some(Err(status)) => match status.code() {
                Code::OutOfRange | Code::ResourceExhausted | Code::Internal => {
                    let refused = refusal(&status, self.max_message_size);
                    Err(self.close_with(refused))
                }
                // The connection broke or the device reset its stream: it is gone.
                _ => {
                    debug!(device = %self.device, status = %status.message(), "device stream ended");
                    Ok(None)
                }
            },
        })
    }
}

/// The response stream: the device's queue, ended early by a refusal status.
struct ToDeviceStream {
    aborted: Option<oneshot::Receiver<Status>>,
    queue: Receiver<ToDevice>,
}

impl Stream for ToDeviceStream {
    type Item = Result<Envelope, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(aborted) = self.aborted.as_mut() {
            match Pin::new(aborted).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.aborted = None;
                    self.queue.close();
                    return Poll::Ready(Some(Err(status)));
                }
                // The inbound side ended without a refusal: nothing more to watch for.
                Poll::Ready(Err(_)) => self.aborted = None,
                Poll::Pending => {}
            }
        }
        match self.queue.poll_recv(cx) {
            // The supervisor did not register the device: the stream ends with why.
            Poll::Ready(Some(ToDevice::Refused(refused))) => {
                self.queue.close();
                Poll::Ready(Some(Err(if refused.denied {
                    Status::permission_denied(refused.reason)
                } else {
                    Status::unavailable(refused.reason)
                })))
            }
            Poll::Ready(Some(message)) => Poll::Ready(Some(Ok(convert::to_device(&message)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
