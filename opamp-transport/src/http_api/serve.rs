//! Serving the API's router on a listener, with deadlines on what clients
//! send and a cap on connections.
//!
//! `axum::serve` has neither: a client that opens a connection and sends
//! nothing, half a header, or a body one byte a minute holds its connection
//! and its task for as long as it likes, and enough of them take every file
//! descriptor the process has. [`serve`] closes a connection whose request
//! head has not arrived whole within [`ServeConfig::header_timeout`] (which
//! also ends idle keep-alive connections), fails a request whose body has
//! not arrived whole within [`ServeConfig::body_timeout`] (408), and serves
//! at most [`ServeConfig::max_connections`] at once: more wait in the listen
//! backlog, costing the process nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt as _;
use tracing::{debug, warn};

use crate::net::PerAddress;
use crate::tls::{MaybeTls, Reloadable, ServerTls};

/// How [`serve`] treats connections.
///
/// ```
/// use std::time::Duration;
/// use opamp_transport::http_api::ServeConfig;
///
/// let config = ServeConfig::default().header_timeout(Duration::from_secs(5));
/// assert_eq!(config.max_connections, 10_000);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeConfig {
    /// A request's head (request line and headers) must arrive whole this
    /// soon after the connection opens or its previous request was
    /// answered; otherwise the connection is closed. Default 10 s.
    pub header_timeout: Duration,
    /// A request's body must arrive whole this soon after its head;
    /// otherwise the request is answered `408 request_timeout`. Default 30 s.
    pub body_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until
    /// one closes. Default 10,000.
    pub max_connections: usize,
    /// Connections one source address may have open; more are closed as
    /// they come, so that one client cannot take the others' share.
    /// 0 for no cap. Default 1,000.
    pub max_connections_per_address: usize,
    /// TLS (HTTPS), when set: the handshake must be done within
    /// `header_timeout`. Replace the certificate while serving with
    /// [`Reloadable::reload`] on [`tls_reloader`](Self::tls_reloader).
    pub tls: Option<Arc<Reloadable>>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            tls: None,
        }
    }
}

impl ServeConfig {
    /// Closes connections whose request head takes longer than `timeout`.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// Answers 408 to requests whose body takes longer than `timeout`.
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Serving HTTPS with `tls` (with client certificates required when it
    /// has a client CA). [`opamp_core::Error::InvalidInput`] if it does not load.
    pub fn tls(mut self, tls: &ServerTls) -> opamp_core::Result<Self> {
        self.tls = Some(Arc::new(Reloadable::new(tls, &[b"http/1.1"])?));
        Ok(self)
    }

    /// What replaces the certificate served, if serving HTTPS.
    pub fn tls_reloader(&self) -> Option<Arc<Reloadable>> {
        self.tls.clone()
    }

    /// Serves at most `max` connections at once from one address (0: no cap).
    pub fn max_connections_per_address(mut self, max: usize) -> Self {
        self.max_connections_per_address = max;
        self
    }

    /// Serves at most `max` connections at once (at least 1).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting, lets each connection finish the request it is on, and returns
/// once every connection has closed (bound the wait with a timeout of your
/// own). Each connection gets `TCP_NODELAY`: small answers go out at once.
pub async fn serve(listener: TcpListener, app: Router, config: ServeConfig, shutdown: impl Future<Output = ()> + Send) {
    let (stop, stopping) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let per_address = PerAddress::new(config.max_connections_per_address);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, usually: wait a little instead of spinning.
                    warn!(error = %err, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(from) = per_address.admit(peer) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let body_timeout = config.body_timeout;
        let mut stopping = stopping.clone();
        let header_timeout = config.header_timeout;
        let tls = config.tls.clone();
        tokio::spawn(async move {
            let _slot = (slot, from);
            let stream = match &tls {
                None => MaybeTls::Plain(stream),
                Some(tls) => match tls.handshake(stream, header_timeout).await {
                    Ok((stream, _)) => stream,
                    Err(err) => return debug!(%peer, error = %err, "an API TLS handshake failed"),
                },
            };
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let request = request.map(|body| Body::new(Deadline::new(body, body_timeout)));
                app.clone().oneshot(request)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(err) = served {
                        debug!(%peer, error = %err, "API connection ended");
                    }
                }
                // Cloned before the stop can be sent, so a stop after it is a change.
                _ = stopping.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    let _ = stop.send(true);
    // Every connection holds a slot until it closes: all back means all closed.
    let _ = slots.acquire_many(config.max_connections.max(1) as u32).await;
}

/// A request body that must arrive whole by a deadline.
struct Deadline {
    body: Incoming,
    timeout: Duration,
    /// Armed at the first poll: the clock starts when the handler reads.
    expires: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(body: Incoming, timeout: Duration) -> Self {
        Deadline {
            body,
            timeout,
            expires: None,
        }
    }
}

/// The error a body past its deadline ends with; the API answers it 408.
#[derive(Debug)]
pub(super) struct BodyTimedOut(Duration);

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body did not arrive whole within {:?}", self.0)
    }
}

impl std::error::Error for BodyTimedOut {}

impl hyper::body::Body for Deadline {
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let expires = this
            .expires
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        match expires.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
