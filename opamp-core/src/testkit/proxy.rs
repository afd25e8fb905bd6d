//! A TCP fault proxy for tests: it stands between a client and a real server
//! on loopback and injects what networks do to connections: added latency,
//! a blackhole (bytes are held, as by a partition that TCP retransmits
//! across once it heals), connection resets, refused connections, and
//! connections left half-open (the far side gone without a FIN or a reset,
//! as after a NAT forgot the connection or its host died: no byte passes
//! again, and nothing says so).
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use std::time::Duration;
//! use opamp_core::testkit::proxy::FaultProxy;
//!
//! let proxy = FaultProxy::start("127.0.0.1:6390".parse().unwrap()).await?;
//! // Point the client at `proxy.addr()`, then:
//! proxy.blackhole(true);
//! tokio::time::sleep(Duration::from_secs(3)).await;
//! proxy.blackhole(false);
//! proxy.reset(); // every connection through it is cut
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Faults {
    /// Hold every byte until cleared.
    blackhole: bool,
    /// Close new connections at once.
    refuse: bool,
    /// Wait this long before forwarding each read.
    latency: Duration,
    /// Bumped by [`FaultProxy::reset`]: connections older than it are cut.
    resets: u64,
    /// Bumped by [`FaultProxy::half_open`]: connections older than it pass
    /// nothing more and stay open.
    strandings: u64,
}

/// A running proxy; dropping it stops it and cuts every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    faults: watch::Sender<Faults>,
    accepted: Arc<AtomicU64>,
    _tasks: JoinSet<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (faults, watching) = watch::channel(Faults::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(listener, upstream, watching, Arc::clone(&accepted)));
        Ok(FaultProxy {
            addr,
            faults,
            accepted,
            _tasks: tasks,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Holds every byte in both directions (`true`) or lets them through again.
    pub fn blackhole(&self, on: bool) {
        self.faults.send_modify(|faults| faults.blackhole = on);
    }

    /// Closes new connections at once (`true`), as a server that is down.
    pub fn refuse(&self, on: bool) {
        self.faults.send_modify(|faults| faults.refuse = on);
    }

    /// Delays every read by `latency` before forwarding it.
    pub fn latency(&self, latency: Duration) {
        self.faults.send_modify(|faults| faults.latency = latency);
    }

    /// Cuts every connection open now; new ones go through.
    pub fn reset(&self) {
        self.faults.send_modify(|faults| faults.resets += 1);
    }

    /// Leaves every connection open now half-open: no byte passes either way
    /// again, and neither end is closed or told (until the proxy is
    /// dropped); new connections go through.
    pub fn half_open(&self) {
        self.faults.send_modify(|faults| faults.strandings += 1);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    accepted: Arc<AtomicU64>,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: let some close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        while connections.try_join_next().is_some() {}
        if faults.borrow().refuse {
            drop(client);
            continue;
        }
        connections.spawn(connect(client, upstream, faults.clone()));
    }
}

/// Forwards one connection until either side closes it or a reset cuts it;
/// one left half-open holds both sockets, silent, until the proxy stops.
async fn connect(client: TcpStream, upstream: SocketAddr, faults: watch::Receiver<Faults>) {
    let (born, stranding) = {
        let now = faults.borrow();
        (now.resets, now.strandings)
    };
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut cut, mut stranded) = (faults.clone(), faults.clone());
    let half_open = tokio::select! {
        _ = pump(&mut client_read, &mut server_write, faults.clone()) => false,
        _ = pump(&mut server_read, &mut client_write, faults.clone()) => false,
        _ = cut.wait_for(|faults| faults.resets != born) => false,
        _ = stranded.wait_for(|faults| faults.strandings != stranding) => true,
    };
    if half_open {
        // Keep every half: dropping one would send a FIN.
        let _held = (client_read, client_write, server_read, server_write);
        std::future::pending::<()>().await;
    }
    // Dropping both halves of both sockets closes them.
}

/// Copies `from` to `to`, holding bytes while blackholed and delaying them by the latency.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let latency = faults.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if faults.wait_for(|faults| !faults.blackhole).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
