//! The connections the gRPC server takes: at most so many at once, each
//! with its TLS handshake done here (so that a renewed certificate can be
//! served without a restart), and each must begin to speak within a deadline.
//!
//! tonic has no deadline for a connection's first bytes: one that never sends
//! the HTTP/2 preface (or TLS hello) is held for ever, so silent
//! connections by the thousand would cost a supervisor its file
//! descriptors. Here each accepted socket must deliver its first
//! [`OPENING_BYTES`] within the deadline or its reads fail, which ends the
//! connection, and one on which no device has registered within twice the
//! deadline after that is closed too (a refused client could otherwise keep
//! it, answering pings, for ever); and no more than `max_connections` are
//! served at once (the rest wait in the listen backlog, as a flood should),
//! nor more than `max_connections_per_address` from one address, nor more
//! than `max_unverified_connections` on which no device has registered yet
//! (the rest are closed).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::net::{AddressSlot, PerAddress, Unverified, UnverifiedSlot};
use crate::tls::{Certified, MaybeTls, Reloadable, ServerStream};

/// The HTTP/2 client preface is 24 bytes, and a TLS ClientHello is longer:
/// a client that has sent this much has begun its handshake for real.
const OPENING_BYTES: usize = 24;

/// The accepted connections of `listener`, with TLS when `tls`: each
/// handshake and each [`Opening`] within `deadline`, at most
/// `max_connections` open at once.
pub(super) fn incoming(
    listener: TcpListener,
    max_connections: usize,
    deadline: Duration,
    tls: Option<Arc<Reloadable>>,
    per_address: Arc<PerAddress>,
    unverified: Arc<Unverified>,
) -> ReceiverStream<io::Result<Opening>> {
    let (connections, incoming) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            // Waiting for a slot before accepting leaves the surplus in the
            // kernel's backlog rather than in this process.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                _ = connections.closed() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = connections.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, mostly: pause rather than spin.
                    debug!(error = %err, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(from) = per_address.admit(peer) else {
                continue;
            };
            let Some(unverified) = unverified.admit(peer) else {
                continue;
            };
            let slot = Slots {
                _served: slot,
                _from: from,
                unverified: Arc::new(unverified),
            };
            let _ = stream.set_nodelay(true);
            let Some(tls) = &tls else {
                let opening = Opening::new(MaybeTls::Plain(stream), None, peer, slot, deadline);
                if connections.send(Ok(opening)).await.is_err() {
                    return;
                }
                continue;
            };
            // Handshakes run side by side: a slow one holds up no other.
            let (tls, connections) = (Arc::clone(tls), connections.clone());
            tokio::spawn(async move {
                match tls.handshake(stream, deadline).await {
                    Ok((stream, certified)) => {
                        let opening = Opening::new(stream, certified, peer, slot, deadline);
                        let _ = connections.send(Ok(opening)).await;
                    }
                    Err(err) => debug!(%peer, error = %err, "a gRPC TLS handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// What the service learns of a connection (in each request's extensions).
#[derive(Debug, Clone)]
pub(super) struct ConnectionInfo {
    pub(super) peer: SocketAddr,
    /// The device its client certificate names, if it presented one.
    pub(super) certified: Certified,
    /// Its place among the unverified connections, given back once a
    /// device registers on it.
    pub(super) unverified: Arc<UnverifiedSlot>,
}

/// A connection's places: among those served, its address's, and the unverified ones.
struct Slots {
    _served: OwnedSemaphorePermit,
    _from: AddressSlot,
    unverified: Arc<UnverifiedSlot>,
}

/// An accepted socket whose reads fail once its deadline passes before it
/// sent [`OPENING_BYTES`] and a device registered on it; it holds its slot
/// among the connections served.
pub(super) struct Opening {
    stream: ServerStream,
    info: ConnectionInfo,
    /// Until the opening bytes arrive, then until a device registers.
    deadline: Option<Pin<Box<Sleep>>>,
    heard: usize,
    /// How long a device has to register once the connection has begun:
    /// twice the registration deadline, so that a stream's own deadline
    /// answers it first (`DEADLINE_EXCEEDED`) and this one only cuts a
    /// connection that stays without a device.
    register_within: Duration,
    /// Its places among the connections served, its address's and the unverified ones.
    _slots: Slots,
}

impl Opening {
    fn new(stream: ServerStream, certified: Certified, peer: SocketAddr, slots: Slots, deadline: Duration) -> Self {
        Opening {
            stream,
            info: ConnectionInfo {
                peer,
                certified,
                unverified: Arc::clone(&slots.unverified),
            },
            deadline: Some(Box::pin(tokio::time::sleep(deadline))),
            heard: 0,
            register_within: deadline.saturating_mul(2),
            _slots: slots,
        }
    }
}

impl AsyncRead for Opening {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.deadline.is_some() {
            let was = this.heard;
            this.heard += buf.filled().len() - before;
            if was < OPENING_BYTES && this.heard >= OPENING_BYTES {
                if let Some(deadline) = this.deadline.as_mut() {
                    deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + this.register_within);
                }
            }
            // Until a device registers on it, not only until it begins: one
            // whose registration was refused would otherwise hold its place
            // among the unverified connections for as long as it answers pings.
            if this.heard >= OPENING_BYTES && this._slots.unverified.is_verified() {
                this.deadline = None;
            } else if read.is_pending() && this.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()) {
                let what = if this.heard < OPENING_BYTES {
                    "the connection sent no handshake within its deadline"
                } else {
                    "no device registered on the connection within its deadline"
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
            }
        }
        read
    }
}

impl AsyncWrite for Opening {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Opening {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}
