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

/// Connections open per source address, so that one address cannot take
/// every connection a listener serves: a connection past the cap is closed
/// as soon as it is accepted, before a byte is read.
#[derive(Debug)]
pub(crate) struct PerAddress {
    cap: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl PerAddress {
    /// At most `cap` connections from one address (0: no cap).
    pub(crate) fn new(cap: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(PerAddress {
            cap,
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// A place for a connection from `peer`, held until the guard drops;
    /// none when the address has its cap open already.
    pub(crate) fn admit(self: &std::sync::Arc<Self>, peer: SocketAddr) -> Option<AddressSlot> {
        if self.cap == 0 {
            return Some(AddressSlot(None));
        }
        let address = peer.ip();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= self.cap {
            tracing::debug!(%peer, cap = self.cap, "refusing a connection: its address has its cap open");
            return None;
        }
        *count += 1;
        Some(AddressSlot(Some((std::sync::Arc::clone(self), address))))
    }
}

/// A connection's place among its address's; given back when dropped.
#[derive(Debug)]
pub(crate) struct AddressSlot(Option<(std::sync::Arc<PerAddress>, std::net::IpAddr)>);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some((per_address, address)) = self.0.take() {
            let mut open = per_address.open.lock().unwrap_or_else(|p| p.into_inner());
            if let std::collections::hash_map::Entry::Occupied(mut count) = open.entry(address) {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                }
            }
        }
    }
}

/// Connections that have not yet proved a credential, capped: clients
/// without a valid one can hold at most so many connections (and their
/// buffers and handshakes), whatever the other caps. A connection past the
/// cap is closed as soon as it is accepted.
#[derive(Debug)]
pub(crate) struct Unverified {
    cap: usize,
    open: std::sync::atomic::AtomicUsize,
}

impl Unverified {
    /// At most `cap` unverified connections at once.
    pub(crate) fn new(cap: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Unverified {
            cap,
            open: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// A place for a connection just accepted, held until it is verified or
    /// dropped; none when the cap is reached.
    pub(crate) fn admit(self: &std::sync::Arc<Self>, peer: SocketAddr) -> Option<UnverifiedSlot> {
        use std::sync::atomic::Ordering;
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.open.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(%peer, cap = self.cap, "refusing a connection: the unverified ones are at their cap");
            return None;
        }
        Some(UnverifiedSlot {
            unverified: std::sync::Arc::clone(self),
            held: std::sync::atomic::AtomicBool::new(true),
        })
    }
}

/// A connection's place among the unverified ones: given back once it
/// proves a credential ([`verified`](Self::verified)), or when dropped.
#[derive(Debug)]
pub(crate) struct UnverifiedSlot {
    unverified: std::sync::Arc<Unverified>,
    held: std::sync::atomic::AtomicBool,
}

impl UnverifiedSlot {
    /// Whether the connection has proved a credential.
    pub(crate) fn is_verified(&self) -> bool {
        !self.held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The connection proved a credential: its place goes back (once).
    pub(crate) fn verified(&self) {
        use std::sync::atomic::Ordering;
        if self.held.swap(false, Ordering::AcqRel) {
            self.unverified.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for UnverifiedSlot {
    fn drop(&mut self) {
        self.verified();
    }
}
