//! What an OpAMP connection runs over: plain TCP, or TLS over it.
//!
//! Two shapes, one per phase. While hyper serves the HTTP request (a POST, or
//! the WebSocket upgrade), a connection is a [`ServerStream`], read and
//! written as a tokio stream. Once upgraded, a WebSocket connection rests without a task
//! between messages, woken by its socket's readiness (see `server.rs`), so
//! it is a [`Upgraded`]: the TCP stream, and for TLS the rustls session driven
//! by hand over it, which keeps the plain connection exactly as small as it
//! was and gives the TLS one nothing more than its session.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::tls::{MaybeTls, ServerStream};

/// The connection hyper served, with nothing of hyper's around it, to read frames from.
pub(super) fn upgraded(stream: ServerStream) -> Upgraded {
    match stream {
        MaybeTls::Plain(tcp) => Upgraded::Plain(tcp),
        MaybeTls::Tls(tls) => {
            let (tcp, session) = tls.into_inner();
            Upgraded::Tls(Box::new(TlsSession { tcp, session }))
        }
    }
}

/// An upgraded WebSocket connection: read when its socket is ready, without
/// a task waiting on it.
pub(super) enum Upgraded {
    Plain(TcpStream),
    Tls(Box<TlsSession>),
}

/// A TLS session over a TCP stream, driven by hand.
pub(super) struct TlsSession {
    tcp: TcpStream,
    session: rustls::ServerConnection,
}

impl Upgraded {
    pub(super) fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Upgraded::Plain(tcp) => tcp,
            Upgraded::Tls(tls) => &tls.tcp,
        }
    }

    /// Ready when a read would not wait: bytes (or an error, or the end)
    /// from the socket, or, for TLS, plaintext the session holds already.
    pub(super) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Upgraded::Plain(tcp) => tcp.poll_read_ready(cx),
            Upgraded::Tls(tls) => {
                if tls.has_plaintext() {
                    return Poll::Ready(Ok(()));
                }
                tls.tcp.poll_read_ready(cx)
            }
        }
    }

    /// Reads what is there without waiting: `WouldBlock` if nothing, 0 at the end.
    pub(super) fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Upgraded::Plain(tcp) => tcp.try_read(buf),
            Upgraded::Tls(tls) => tls.try_read(buf),
        }
    }

    /// [`try_read`](Self::try_read) into `buffer`'s spare capacity.
    pub(super) fn try_read_buf(&mut self, buffer: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Upgraded::Plain(tcp) => tcp.try_read_buf(buffer),
            Upgraded::Tls(tls) => {
                let start = buffer.len();
                buffer.resize(buffer.capacity(), 0);
                let read = tls.try_read(&mut buffer[start..]);
                buffer.truncate(start + *read.as_ref().unwrap_or(&0));
                read
            }
        }
    }

    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Upgraded::Plain(tcp) => tcp.write_all(bytes).await,
            Upgraded::Tls(tls) => {
                tls.session.writer().write_all(bytes)?;
                tls.flush().await
            }
        }
    }

    /// Ends the sending side (for TLS, after a `close_notify`).
    pub(super) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Upgraded::Plain(tcp) => tcp.shutdown().await,
            Upgraded::Tls(tls) => {
                tls.session.send_close_notify();
                tls.flush().await?;
                tls.tcp.shutdown().await
            }
        }
    }

    /// Waits for something to read, then reads it.
    pub(super) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Upgraded::Plain(tcp) => tcp.read(buf).await,
            Upgraded::Tls(tls) => loop {
                match tls.try_read(buf) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => tls.tcp.readable().await?,
                    read => return read,
                }
            },
        }
    }
}

impl TlsSession {
    /// Whether the session holds plaintext (or the peer's close) not yet read.
    fn has_plaintext(&mut self) -> bool {
        match self.session.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            // The error is read by the next read.
            Err(_) => true,
        }
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.session.reader().read(buf) {
                Ok(read) => return Ok(read),
                // The peer went without its close_notify: the end all the same.
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
            // No plaintext held: feed the session what the socket has.
            let read = self.session.read_tls(&mut NonBlocking(&self.tcp))?;
            let state = self
                .session
                .process_new_packets()
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
            if read == 0 && state.plaintext_bytes_to_read() == 0 {
                return Ok(0);
            }
            // What the session must answer (a key update, a ticket): best
            // effort now, the rest with the next write.
            while self.session.wants_write() {
                match self.session.write_tls(&mut NonBlocking(&self.tcp)) {
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }

    /// Writes out everything the session has to send.
    async fn flush(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            match self.session.write_tls(&mut NonBlocking(&self.tcp)) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.tcp.writable().await?,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// A TCP stream as the blocking `Read`/`Write` rustls drives, never blocking:
/// `WouldBlock` when the socket has nothing (which clears its readiness).
struct NonBlocking<'a>(&'a TcpStream);

impl io::Read for NonBlocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
