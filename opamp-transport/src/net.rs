//! Listening sockets, shared by the network transports.

use std::net::SocketAddr;

use opamp_core::transport::DeviceSession;
use opamp_core::{Error, Result};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};

/// The sessions a network transport registered, waiting for the supervisor's
/// [`accept`](opamp_core::DeviceTransport::accept).
#[derive(Debug)]
pub(crate) struct Accepted(tokio::sync::Mutex<mpsc::Receiver<DeviceSession>>);

impl Accepted {
    pub(crate) fn new(sessions: mpsc::Receiver<DeviceSession>) -> Self {
        Accepted(tokio::sync::Mutex::new(sessions))
    }

    /// The next session; none once the transport is stopping (or its server is gone).
    pub(crate) async fn next(&self, stopping: &watch::Sender<bool>) -> Result<Option<DeviceSession>> {
        let mut stopping = stopping.subscribe();
        let mut sessions = self.0.lock().await;
        tokio::select! {
            session = sessions.recv() => Ok(session),
            _ = stopping.wait_for(|stop| *stop) => Ok(None),
        }
    }
}

/// `Error::Unavailable` for an I/O error while `doing`.
pub(crate) fn unavailable(doing: String, err: std::io::Error) -> Error {
    Error::Unavailable {
        message: doing,
        source: Some(Box::new(err)),
    }
}

/// A listener on `addr` with `backlog` (capped by the kernel's `somaxconn`):
/// connection storms need more than the 128 that `TcpListener::bind` asks for.
pub(crate) fn listen(addr: SocketAddr, backlog: u32) -> Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bind().map_err(|err| unavailable(format!("listening on {addr}"), err))
}

/// The address `listener` is bound to.
pub(crate) fn local_addr(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|err| unavailable(format!("reading the address of {asked}"), err))
}
