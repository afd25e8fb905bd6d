//! Pipelined lookups: a few connections of the store's own, opened with
//! `tokio-postgres`, whose client writes each query as soon as it is made
//! without waiting for the answers to those before, and reads the answers in
//! order. Concurrent lookups thus share round trips, system calls and
//! wake-ups on both sides: the server reads many lookups in one `recv` and
//! answers them in one `send`. Each lookup is its own statement execution
//! (of one statement prepared per connection), so one failing lookup fails
//! alone.
//!
//! Why not sqlx's connections: one of those runs one statement at a time,
//! so a lookup in flight holds a whole connection (see `lanes`, which the
//! store uses when these cannot be).
//!
//! These connections speak plaintext TCP or a Unix socket, authenticated as
//! the server asks (trust, password, MD5, SCRAM-SHA-256 with the server's
//! proof checked). A URL that wants TLS (`sslmode` `require`, `verify-ca`,
//! `verify-full`, or `prefer` against a server that offers it) is
//! [`Answer::Unsupported`]: the store then uses lanes of sqlx connections,
//! which speak TLS, instead.
//!
//! Any other failure answers [`Answer::Failed`] and the lookup goes through
//! the pool, which reports the error in full. So does a connection gone
//! silent: a lookup that waits the store's deadline for its answer closes
//! its connection, and every lookup in flight on it fails over at once. A
//! connection that could not be opened is not tried again for a second;
//! one whose statement failed (the table altered under it, say) is closed,
//! and the next lookup opens a fresh one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use opamp_core::{DeviceId, Timestamp};
use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::task::AbortHandle;
use tokio_postgres::tls::{MakeTlsConnect, NoTlsStream, TlsConnect};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::routing::LOOKUP;
use super::rows::sql_time;

/// A lookup goes to the first connection with fewer lookups than this in
/// flight (or the least busy one): connections open only as concurrent
/// lookups need them, and each carries several at once.
const DEPTH: usize = 8;
/// Lookups in flight, at most, on one connection; past it on all of them,
/// a lookup goes through the pool.
const MAX_IN_FLIGHT: usize = 256;
/// After a connection could not be opened, lookups use the pool this long
/// before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where and how the lookup connections connect.
#[derive(Clone)]
pub(super) struct Target {
    config: tokio_postgres::Config,
    /// Ask for TLS first (`sslmode=prefer`): if the server offers it, a
    /// lookup connection would have to use it, which it cannot.
    ask_tls: bool,
    /// How long opening a connection may take.
    timeout: Duration,
    /// How long a lookup may wait for its answer.
    deadline: Duration,
}

impl Target {
    /// The target of the pool's `options`, or `None` when they need TLS.
    pub(super) fn of(options: &PgConnectOptions, timeout: Duration, deadline: Duration) -> Option<Target> {
        let ask_tls = match options.get_ssl_mode() {
            PgSslMode::Disable | PgSslMode::Allow => false,
            PgSslMode::Prefer => true,
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull => return None,
        };
        let mut config = tokio_postgres::Config::new();
        match options.get_socket() {
            // sqlx names the socket's directory; libpq-style configs name it too.
            Some(dir) => {
                #[cfg(unix)]
                config.host_path(dir);
                #[cfg(not(unix))]
                return {
                    let _ = dir;
                    None
                };
            }
            None => {
                config.host(options.get_host());
            }
        }
        config.port(options.get_port());
        config.user(options.get_username());
        // The password as sqlx resolved it: from the URL, PGPASSWORD or the passfile.
        if let Some(encoded) = options.to_url_lossy().password() {
            config.password(
                percent_encoding::percent_decode_str(encoded)
                    .decode_utf8_lossy()
                    .as_bytes(),
            );
        }
        if let Some(database) = options.get_database() {
            config.dbname(database);
        }
        if let Some(name) = options.get_application_name() {
            config.application_name(name);
        }
        if let Some(startup) = options.get_options() {
            config.options(startup);
        }
        config.ssl_mode(if ask_tls {
            tokio_postgres::config::SslMode::Prefer
        } else {
            tokio_postgres::config::SslMode::Disable
        });
        config.connect_timeout(timeout);
        Some(Target {
            config,
            ask_tls,
            timeout,
            deadline,
        })
    }
}

/// A lookup's answer from a pipelined connection.
pub(super) enum Answer {
    /// The owner column's text, if a live lease was found.
    Owner(Option<String>),
    /// This lookup could not be answered here; the pool can try.
    Failed,
    /// These connections cannot work with this server or URL at all.
    Unsupported,
}

/// The pipelined lookup connections of one store.
pub(super) struct Pipes {
    slots: Vec<SlotCell>,
    /// Why these connections cannot be used, once found out.
    unsupported: OnceLock<String>,
    target: Target,
}

#[derive(Default)]
struct SlotCell {
    /// Lookups sent to this connection and not yet answered or given up.
    load: AtomicUsize,
    /// Held while the connection is looked at or opened, never across a lookup.
    state: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    open: Option<Arc<Open>>,
    /// No new connection before this, after one could not be opened.
    quiet_until: Option<Instant>,
}

/// An open connection: its client, the lookup prepared on it, and its task.
struct Open {
    client: Client,
    lookup: Statement,
    /// Aborting the connection's task closes its socket: every lookup in
    /// flight on it ends at once.
    task: AbortHandle,
}

impl Open {
    fn close(&self) {
        self.task.abort();
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.close();
    }
}

impl Pipes {
    /// `count` connections to `target` (at least one), each opened by the first lookup it gets.
    pub(super) fn new(target: Target, count: usize) -> Self {
        Pipes {
            slots: (0..count.max(1)).map(|_| SlotCell::default()).collect(),
            unsupported: OnceLock::new(),
            target,
        }
    }

    /// The owner's text for `device` at `now`.
    pub(super) async fn lookup(&self, device: DeviceId, now: Timestamp) -> Answer {
        if self.unsupported.get().is_some() {
            return Answer::Unsupported;
        }
        let Some((cell, _load)) = self.pick() else {
            return Answer::Failed;
        };
        let Some(open) = self.connection(cell).await else {
            return self.failed();
        };
        let Ok(at) = sql_time(now) else {
            return Answer::Failed;
        };
        let id = device.as_str();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &at];
        let query = open.client.query_opt(&open.lookup, &params);
        match tokio::time::timeout(self.target.deadline, query).await {
            Ok(Ok(row)) => match row.map(|row| row.try_get::<_, String>(0)).transpose() {
                Ok(owner) => Answer::Owner(owner),
                Err(err) => {
                    tracing::debug!(error = %err, "a pipelined lookup's answer did not read; lookups use the pool");
                    Answer::Failed
                }
            },
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "a pipelined lookup failed; its connection is closed");
                self.discard(cell, &open).await;
                Answer::Failed
            }
            Err(_) => {
                tracing::debug!(deadline = ?self.target.deadline, "a pipelined lookup went unanswered; its connection is closed");
                self.discard(cell, &open).await;
                Answer::Failed
            }
        }
    }

    /// How the pipelined connections stand, for `Debug`.
    pub(super) fn state(&self) -> String {
        if let Some(why) = self.unsupported.get() {
            return format!("not used: {why}");
        }
        let open = (self.slots.iter())
            .filter(|cell| {
                cell.state.try_lock().map_or(true, |slot| {
                    slot.open.as_ref().is_some_and(|open| !open.client.is_closed())
                })
            })
            .count();
        format!("{open} of {} connections open", self.slots.len())
    }

    fn failed(&self) -> Answer {
        if self.unsupported.get().is_some() {
            Answer::Unsupported
        } else {
            Answer::Failed
        }
    }

    /// The first connection with room (see [`DEPTH`]), or else the least
    /// busy one, and the lookup's place in its load; `None` when every one
    /// carries [`MAX_IN_FLIGHT`].
    fn pick(&self) -> Option<(&SlotCell, Load<'_>)> {
        let loads = self.slots.iter().map(|cell| cell.load.load(Ordering::Relaxed));
        let turn = loads
            .clone()
            .position(|load| load < DEPTH)
            .or_else(|| loads.enumerate().min_by_key(|(_, load)| *load).map(|(turn, _)| turn))?;
        let cell = &self.slots[turn];
        if cell.load.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
            cell.load.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some((cell, Load(&cell.load)))
    }

    /// The cell's open connection, opening it if it has none (unless one
    /// could not be opened a moment ago).
    async fn connection(&self, cell: &SlotCell) -> Option<Arc<Open>> {
        let mut slot = cell.state.lock().await;
        if let Some(open) = slot.open.as_ref().filter(|open| !open.client.is_closed()) {
            return Some(Arc::clone(open));
        }
        slot.open = None;
        if slot.quiet_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        match self.open().await {
            Ok(open) => {
                let open = Arc::new(open);
                slot.open = Some(Arc::clone(&open));
                slot.quiet_until = None;
                Some(open)
            }
            Err(Setup::Unsupported(why)) => {
                if self.unsupported.set(why.clone()).is_ok() {
                    tracing::info!(
                        reason = %why,
                        "PostgreSQL lookups are not pipelined; they use one connection per lookup in flight"
                    );
                }
                None
            }
            Err(Setup::Failed(err)) => {
                slot.quiet_until = Some(Instant::now() + RETRY_AFTER);
                tracing::debug!(error = %err, "a PostgreSQL lookup connection could not be opened; lookups use the pool");
                None
            }
        }
    }

    /// Closes `open` and forgets it, unless the cell moved on to another connection meanwhile.
    async fn discard(&self, cell: &SlotCell, open: &Arc<Open>) {
        open.close();
        let mut slot = cell.state.lock().await;
        if slot.open.as_ref().is_some_and(|current| Arc::ptr_eq(current, open)) {
            slot.open = None;
        }
    }

    /// Opens a connection and prepares the lookup on it, within the
    /// store's time to open a connection.
    async fn open(&self) -> Result<Open, Setup> {
        let connecting = self.target.config.connect(RefuseTls);
        let (client, connection) = match tokio::time::timeout(self.target.timeout, connecting).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) if self.target.ask_tls && refused_tls(&err) => {
                return Err(Setup::Unsupported(
                    "the server offers TLS (sslmode=prefer), which pipelined lookups do not speak".into(),
                ));
            }
            Ok(Err(err)) => return Err(Setup::Failed(err.to_string())),
            Err(_) => return Err(Setup::Failed("opening the connection timed out".into())),
        };
        let task = tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "a PostgreSQL lookup connection ended; the next lookup opens another");
            }
        })
        .abort_handle();
        let preparing = client.prepare_typed(LOOKUP, &[Type::TEXT, Type::TIMESTAMPTZ]);
        match tokio::time::timeout(self.target.deadline, preparing).await {
            Ok(Ok(lookup)) => Ok(Open { client, lookup, task }),
            failed => {
                task.abort();
                Err(Setup::Failed(match failed {
                    Ok(Err(err)) => format!("preparing the lookup: {err}"),
                    _ => "preparing the lookup timed out".into(),
                }))
            }
        }
    }
}

/// Why a connection could not be set up.
enum Setup {
    /// Not with these connections at all: TLS.
    Unsupported(String),
    /// This time: the server is down, the password is wrong, the table is missing.
    Failed(String),
}

/// A TLS connector that takes no TLS. Under `sslmode=prefer` the client
/// asks the server for TLS first; a server that offers it gets this
/// refusal, which sends the store to its lanes (whose connections speak TLS).
/// A server that declines goes on in plaintext, as the URL allows.
#[derive(Debug, Clone, Copy)]
struct RefuseTls;

/// The error [`RefuseTls`] answers a server offering TLS with.
#[derive(Debug)]
struct RefusedTls;

impl std::fmt::Display for RefusedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pipelined lookups do not speak TLS")
    }
}

impl std::error::Error for RefusedTls {}

impl<S> MakeTlsConnect<S> for RefuseTls {
    type Stream = NoTlsStream;
    type TlsConnect = RefuseTls;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<RefuseTls, Self::Error> {
        Ok(RefuseTls)
    }
}

impl<S> TlsConnect<S> for RefuseTls {
    type Stream = NoTlsStream;
    type Error = RefusedTls;
    type Future = std::future::Ready<Result<NoTlsStream, RefusedTls>>;

    fn connect(self, _stream: S) -> Self::Future {
        std::future::ready(Err(RefusedTls))
    }
}

/// Whether `err` is [`RefuseTls`] refusing a server's offer of TLS.
fn refused_tls(err: &tokio_postgres::Error) -> bool {
    std::error::Error::source(err).is_some_and(|source| source.is::<RefusedTls>())
}

/// One lookup counted in a connection's load, until it is answered or dropped.
struct Load<'a>(&'a AtomicUsize);

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tokio_postgres::config::Host;

    use super::*;

    fn target(url: &str) -> Option<Target> {
        Target::of(
            &PgConnectOptions::from_str(url).unwrap(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn a_url_wanting_tls_is_not_pipelined() {
        for mode in ["require", "verify-ca", "verify-full"] {
            assert!(target(&format!("postgres://u@h/db?sslmode={mode}")).is_none(), "{mode}");
        }
        assert!(target("postgres://u@h/db?sslmode=prefer").unwrap().ask_tls);
        assert!(!target("postgres://u@h/db?sslmode=disable").unwrap().ask_tls);
    }

    #[test]
    fn the_target_is_read_from_the_url() {
        let target = target("postgres://alice:an%20open%3Asecret@db.example:6543/fleet?application_name=x").unwrap();
        let config = &target.config;
        assert_eq!(config.get_password(), Some(&b"an open:secret"[..]));
        assert_eq!(config.get_user(), Some("alice"));
        assert_eq!(config.get_dbname(), Some("fleet"));
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_hosts(), &[Host::Tcp("db.example".into())]);
        assert_eq!(config.get_ports(), &[6543]);
        #[cfg(unix)]
        {
            let local = super::tests::target("postgres://alice@%2Fvar%2Frun%2Fpostgresql:5433/fleet").unwrap();
            assert_eq!(
                local.config.get_hosts(),
                &[Host::Unix("/var/run/postgresql".into())],
                "a host that is a path is a Unix socket's directory"
            );
            assert_eq!(local.config.get_ports(), &[5433]);
        }
    }
}
