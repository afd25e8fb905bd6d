//! Pipelined lookups: a few connections of the store's own, each driven by
//! one task that writes every lookup queued for it as soon as it comes
//! (`Bind`, `Execute`, `Sync` of a statement prepared once) without waiting
//! for the answers to those before, and reads the answers in order.
//!
//! Concurrent lookups thus share round trips, system calls and wake-ups on
//! both sides: the server reads many lookups in one `recv` and answers them
//! in one `send`. Each lookup keeps its own `Sync`, so one failing statement
//! fails that lookup alone.
//!
//! These connections speak the protocol themselves (`wire`), so they cover
//! what sqlx's connection does not let them: plaintext TCP or a Unix socket,
//! with trust, password, MD5 or SCRAM-SHA-256 authentication. A URL that
//! wants TLS (`sslmode` `require`, `verify-ca`, `verify-full`, or `prefer`
//! against a server that offers it), or a server asking for another kind of
//! authentication, is [`Answer::Unsupported`]: the store then uses lanes of
//! sqlx connections instead.
//!
//! Any other failure answers [`Answer::Failed`] and the lookup goes through
//! the pool, which reports the error in full. So does a connection gone
//! silent: once its oldest lookup has waited the store's deadline for an
//! answer, the connection is closed and every lookup on it fails over. A connection that could not
//! be opened is not tried again for a second; one whose statement failed
//! (the table altered under it, say) is closed once its other answers are
//! in, and the next lookup opens a fresh one.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use opamp_core::{DeviceId, Timestamp};
use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::routing::LOOKUP;
use super::wire::{self, AuthRequest, Scram, WireError};

/// The name of the prepared lookup statement on each connection.
const STATEMENT: &str = "opamp_lookup";
/// Lookups written and not yet answered, at most, per connection. Their
/// bytes (about 90 each way) stay far below the socket buffers, so writing
/// never waits on the server writing answers we are not reading.
const MAX_IN_FLIGHT: usize = 256;
/// Lookups waiting to be written, at most, per connection.
const QUEUE: usize = 1024;
/// A lookup goes to the first connection with fewer lookups than this in
/// flight (or the least busy one): connections open only as concurrent
/// lookups need them, and each carries several at once.
const DEPTH: usize = 8;
/// After a connection could not be opened, lookups use the pool this long
/// before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Where and how the lookup connections connect.
#[derive(Clone)]
pub(super) struct Target {
    address: Address,
    user: String,
    password: Option<String>,
    database: Option<String>,
    application_name: Option<String>,
    /// Startup `options` (`-c search_path=…` and any from the URL).
    options: Option<String>,
    /// Ask for TLS first (`sslmode=prefer`): if the server offers it, a
    /// lookup connection would have to use it, which it cannot.
    ask_tls: bool,
    /// How long opening a connection may take.
    timeout: Duration,
    /// How long a lookup may wait for its answer.
    deadline: Duration,
}

#[derive(Clone)]
enum Address {
    Tcp(String, u16),
    #[cfg(unix)]
    Unix(PathBuf),
}

impl Target {
    /// The target of the pool's `options`, or `None` when they need TLS.
    pub(super) fn of(options: &PgConnectOptions, timeout: Duration, deadline: Duration) -> Option<Target> {
        let ask_tls = match options.get_ssl_mode() {
            PgSslMode::Disable | PgSslMode::Allow => false,
            PgSslMode::Prefer => true,
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull => return None,
        };
        let address = match options.get_socket() {
            #[cfg(unix)]
            Some(dir) => Address::Unix(dir.join(format!(".s.PGSQL.{}", options.get_port()))),
            #[cfg(not(unix))]
            Some(_) => return None,
            None => Address::Tcp(options.get_host().to_owned(), options.get_port()),
        };
        // The password as sqlx resolved it: from the URL, PGPASSWORD or the passfile.
        let password = options.to_url_lossy().password().map(|encoded| {
            percent_encoding::percent_decode_str(encoded)
                .decode_utf8_lossy()
                .into_owned()
        });
        Some(Target {
            address,
            user: options.get_username().to_owned(),
            password,
            database: options.get_database().map(str::to_owned),
            application_name: options.get_application_name().map(str::to_owned),
            options: options.get_options().map(str::to_owned),
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

/// A queued lookup.
struct Request {
    device: DeviceId,
    micros: i64,
    reply: oneshot::Sender<Reply>,
}

/// The owner's text, or what failed.
type Reply = Result<Option<String>, WireError>;

/// The pipelined lookup connections of one store.
pub(super) struct Pipes {
    shared: Arc<Shared>,
    target: Target,
}

struct Shared {
    slots: Vec<SlotCell>,
    /// Why these connections cannot be used, once found out.
    unsupported: OnceLock<String>,
}

#[derive(Default)]
struct SlotCell {
    /// Lookups sent to this connection and not yet answered or given up.
    load: AtomicUsize,
    state: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The queue of the connection's task, while it runs.
    queue: Option<mpsc::Sender<Request>>,
    /// No new connection before this, after one could not be opened.
    quiet_until: Option<Instant>,
}

impl Pipes {
    /// `count` connections to `target` (at least one), each opened by the first lookup it gets.
    pub(super) fn new(target: Target, count: usize) -> Self {
        Pipes {
            shared: Arc::new(Shared {
                slots: (0..count.max(1)).map(|_| SlotCell::default()).collect(),
                unsupported: OnceLock::new(),
            }),
            target,
        }
    }

    /// The owner's text for `device` at `now`.
    pub(super) async fn lookup(&self, device: DeviceId, now: Timestamp) -> Answer {
        if self.shared.unsupported.get().is_some() {
            return Answer::Unsupported;
        }
        let Some((queue, _load)) = self.queue() else {
            return Answer::Failed;
        };
        let micros = now
            .unix_millis()
            .saturating_mul(1000)
            .saturating_sub(POSTGRES_EPOCH_MICROS);
        let (reply, answer) = oneshot::channel();
        if queue.send(Request { device, micros, reply }).await.is_err() {
            return self.failed();
        }
        match answer.await {
            Ok(Ok(owner)) => Answer::Owner(owner),
            Ok(Err(_)) | Err(_) => self.failed(),
        }
    }

    /// How the pipelined connections stand, for `Debug`.
    pub(super) fn state(&self) -> String {
        if let Some(why) = self.shared.unsupported.get() {
            return format!("not used: {why}");
        }
        let open = (self.shared.slots.iter())
            .filter(|cell| lock(&cell.state).queue.as_ref().is_some_and(|queue| !queue.is_closed()))
            .count();
        format!("{open} of {} connections open", self.shared.slots.len())
    }

    fn failed(&self) -> Answer {
        if self.shared.unsupported.get().is_some() {
            Answer::Unsupported
        } else {
            Answer::Failed
        }
    }

    /// The queue of the first connection with room (see [`DEPTH`]), or
    /// else the least busy one, starting its task if it has none; and the
    /// lookup's place in its load.
    fn queue(&self) -> Option<(mpsc::Sender<Request>, Load<'_>)> {
        let slots = &self.shared.slots;
        let loads = slots.iter().map(|cell| cell.load.load(Ordering::Relaxed));
        let turn = loads
            .clone()
            .position(|load| load < DEPTH)
            .or_else(|| loads.enumerate().min_by_key(|(_, load)| *load).map(|(turn, _)| turn))?;
        let cell = &slots[turn];
        cell.load.fetch_add(1, Ordering::Relaxed);
        let load = Load(&cell.load);
        let mut slot = lock(&cell.state);
        if let Some(queue) = slot.queue.as_ref().filter(|queue| !queue.is_closed()) {
            return Some((queue.clone(), load));
        }
        if slot.quiet_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let (queue, requests) = mpsc::channel(QUEUE);
        slot.queue = Some(queue.clone());
        slot.quiet_until = None;
        let target = self.target.clone();
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(run(target, shared, turn, requests));
        Some((queue, load))
    }
}

/// One lookup counted in a connection's load, until it is answered or dropped.
struct Load<'a>(&'a AtomicUsize);

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a connection could not be set up.
enum Setup {
    /// Not with these connections at all: TLS, or an authentication they do not speak.
    Unsupported(String),
    /// This time: the server is down, the password is wrong, the table is missing.
    Failed(WireError),
}

impl From<WireError> for Setup {
    fn from(err: WireError) -> Self {
        Setup::Failed(err)
    }
}

impl From<std::io::Error> for Setup {
    fn from(err: std::io::Error) -> Self {
        Setup::Failed(err.into())
    }
}

/// One connection's task: opens it, then answers lookups until the store
/// is gone or the connection fails. Lookups still queued when it ends are
/// dropped, and their callers go to the pool.
async fn run(target: Target, shared: Weak<Shared>, slot: usize, requests: mpsc::Receiver<Request>) {
    let opened = tokio::time::timeout(target.timeout, open(&target))
        .await
        .unwrap_or_else(|_| Err(Setup::Failed(WireError("opening the connection timed out".into()))));
    let failure = match opened {
        Ok(Opened::Tcp(stream)) => {
            let (reader, writer) = stream.into_split();
            serve(reader, writer, requests, target.deadline).await.err()
        }
        #[cfg(unix)]
        Ok(Opened::Unix(stream)) => {
            let (reader, writer) = stream.into_split();
            serve(reader, writer, requests, target.deadline).await.err()
        }
        Err(Setup::Unsupported(why)) => {
            if let Some(shared) = shared.upgrade() {
                if shared.unsupported.set(why.clone()).is_ok() {
                    tracing::info!(
                        reason = %why,
                        "PostgreSQL lookups are not pipelined; they use one connection per lookup in flight"
                    );
                }
            }
            return;
        }
        Err(Setup::Failed(err)) => {
            if let Some(shared) = shared.upgrade() {
                lock(&shared.slots[slot].state).quiet_until = Some(Instant::now() + RETRY_AFTER);
            }
            tracing::debug!(error = %err, "a PostgreSQL lookup connection could not be opened; lookups use the pool");
            return;
        }
    };
    if let Some(err) = failure {
        tracing::debug!(error = %err, "a PostgreSQL lookup connection ended; the next lookup opens another");
    }
}

enum Opened {
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

async fn open(target: &Target) -> Result<Opened, Setup> {
    match &target.address {
        Address::Tcp(host, port) => {
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            if target.ask_tls {
                let mut out = BytesMut::new();
                wire::ssl_request(&mut out);
                stream.write_all(&out).await?;
                match stream.read_u8().await? {
                    b'N' => {}
                    b'S' => {
                        return Err(Setup::Unsupported(
                            "the server offers TLS (sslmode=prefer), which pipelined lookups do not speak".into(),
                        ));
                    }
                    other => {
                        return Err(Setup::Failed(WireError(format!(
                            "the server answered the TLS request with {other:#04x}"
                        ))));
                    }
                }
            }
            prepare(&mut stream, target).await?;
            Ok(Opened::Tcp(stream))
        }
        #[cfg(unix)]
        Address::Unix(path) => {
            let mut stream = tokio::net::UnixStream::connect(path).await?;
            prepare(&mut stream, target).await?;
            Ok(Opened::Unix(stream))
        }
    }
}

/// Starts the session, authenticates, and prepares the lookup statement.
async fn prepare<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, target: &Target) -> Result<(), Setup> {
    let mut out = BytesMut::with_capacity(256);
    let mut params = vec![("user", target.user.as_str()), ("client_encoding", "UTF8")];
    if let Some(database) = &target.database {
        params.push(("database", database));
    }
    if let Some(name) = &target.application_name {
        params.push(("application_name", name));
    }
    if let Some(options) = &target.options {
        params.push(("options", options));
    }
    wire::startup(&mut out, &params);
    stream.write_all(&out).await?;
    out.clear();

    let mut input = BytesMut::with_capacity(1024);
    let mut scram = None;
    loop {
        let message = read_message(stream, &mut input).await?;
        match message.tag {
            b'R' => {
                let password = || {
                    target.password.as_deref().ok_or_else(|| {
                        Setup::Unsupported("the server asks for a password and the URL gives none".into())
                    })
                };
                match wire::auth_request(message.body)? {
                    AuthRequest::Ok => {}
                    AuthRequest::Cleartext => wire::password_message(&mut out, password()?),
                    AuthRequest::Md5 { salt } => {
                        wire::password_message(&mut out, &wire::md5_password(&target.user, password()?, salt))
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|name| name == wire::SCRAM_SHA_256) {
                            return Err(Setup::Unsupported(format!(
                                "the server offers SASL mechanisms {mechanisms:?}, not {}",
                                wire::SCRAM_SHA_256
                            )));
                        }
                        password()?;
                        let started = Scram::new(nonce());
                        wire::sasl_initial_response(&mut out, wire::SCRAM_SHA_256, started.client_first().as_bytes());
                        scram = Some(started);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let exchange = scram
                            .as_mut()
                            .ok_or_else(|| WireError("SASL data before SASL began".into()))?;
                        let answer = exchange.client_final(password()?, &data)?;
                        wire::sasl_response(&mut out, answer.as_bytes());
                    }
                    AuthRequest::SaslFinal(data) => scram
                        .as_ref()
                        .ok_or_else(|| WireError("SASL data before SASL began".into()))?
                        .verify_server(&data)?,
                    AuthRequest::Other(code) => {
                        return Err(Setup::Unsupported(format!(
                            "the server asks for authentication method {code} (Kerberos, GSSAPI or SSPI)"
                        )));
                    }
                }
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    out.clear();
                }
            }
            b'E' => return Err(Setup::Failed(WireError(wire::error_text(&message.body)))),
            // Parameter status, the cancel key, notices: not needed here.
            b'S' | b'K' | b'N' => {}
            b'Z' => break,
            other => return Err(Setup::Failed(unexpected(other))),
        }
    }

    wire::parse(&mut out, STATEMENT, LOOKUP, &[wire::TEXT_OID, wire::TIMESTAMPTZ_OID]);
    wire::sync(&mut out);
    stream.write_all(&out).await?;
    let mut failed = None;
    loop {
        let message = read_message(stream, &mut input).await?;
        match message.tag {
            b'1' | b'S' | b'N' => {}
            b'E' => failed = Some(WireError(wire::error_text(&message.body))),
            b'Z' => break,
            other => return Err(Setup::Failed(unexpected(other))),
        }
    }
    match failed {
        None if input.is_empty() => Ok(()),
        None => Err(Setup::Failed(WireError(
            "bytes after the statement was prepared".into(),
        ))),
        Some(err) => Err(Setup::Failed(err)),
    }
}

async fn read_message<S: AsyncRead + Unpin>(stream: &mut S, input: &mut BytesMut) -> Result<wire::Message, WireError> {
    loop {
        if let Some(message) = wire::next_message(input)? {
            return Ok(message);
        }
        if stream.read_buf(input).await? == 0 {
            return Err(WireError("the server closed the connection".into()));
        }
    }
}

fn unexpected(tag: u8) -> WireError {
    WireError(format!("unexpected message {:?} from the server", char::from(tag)))
}

/// 18 random bytes, base64: the client's SCRAM nonce.
fn nonce() -> String {
    let mut bytes = [0u8; 18];
    // Without an OS random source, a clock-derived nonce still differs per exchange.
    if getrandom::getrandom(&mut bytes).is_err() {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes[..16].copy_from_slice(&clock.to_le_bytes());
    }
    BASE64.encode(bytes)
}

/// A lookup written and not yet answered.
struct InFlight {
    reply: oneshot::Sender<Reply>,
    /// When it was written: its answer is due within the deadline.
    written: tokio::time::Instant,
    owner: Option<String>,
    error: Option<WireError>,
}

/// Writes queued lookups as they come and answers them as their results
/// arrive, until the queue closes (the store is gone) and every answer is
/// in, or a statement failed and every answer is in, or the connection fails
/// or leaves its oldest lookup unanswered for `deadline`.
async fn serve<R, W>(
    mut reader: R,
    mut writer: W,
    mut requests: mpsc::Receiver<Request>,
    deadline: Duration,
) -> Result<(), WireError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(8 * 1024);
    let mut out = BytesMut::with_capacity(8 * 1024);
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut batch = Vec::with_capacity(64);
    let mut taking = true;
    let mut retiring = false;
    // Reset only when the oldest lookup changes, not on every turn.
    let silence = tokio::time::sleep(deadline);
    tokio::pin!(silence);
    let result = loop {
        if (!taking || retiring) && in_flight.is_empty() {
            break Ok(());
        }
        let room = MAX_IN_FLIGHT - in_flight.len();
        // A connection gone silent (no byte, no reset) would hold its lookups for ever.
        let due = in_flight.front().map(|oldest| oldest.written + deadline);
        if let Some(due) = due.filter(|&due| due != silence.deadline()) {
            silence.as_mut().reset(due);
        }
        tokio::select! {
            biased;
            read = reader.read_buf(&mut input) => {
                match read {
                    Ok(0) => break Err(WireError("the server closed the connection".into())),
                    Ok(_) => {}
                    Err(err) => break Err(err.into()),
                }
                if let Err(err) = answer(&mut input, &mut in_flight, &mut retiring) {
                    break Err(err);
                }
            }
            taken = requests.recv_many(&mut batch, room), if taking && !retiring && room > 0 => {
                if taken == 0 {
                    taking = false;
                    continue;
                }
                let written = tokio::time::Instant::now();
                for request in batch.drain(..) {
                    wire::bind_execute_sync(&mut out, STATEMENT, request.device.as_str(), request.micros);
                    in_flight.push_back(InFlight { reply: request.reply, written, owner: None, error: None });
                }
                if let Err(err) = writer.write_all(&out).await {
                    break Err(err.into());
                }
                out.clear();
            }
            () = &mut silence, if due.is_some() => {
                break Err(WireError(format!("no answer from PostgreSQL within {deadline:?}")));
            }
        }
    };
    if result.is_ok() {
        wire::terminate(&mut out);
        // The server drops the session either way; this only spares it a log line.
        let _ = writer.write_all(&out).await;
    }
    result
}

/// Reads the whole messages in `input`, answering lookups as their `ReadyForQuery` arrives.
fn answer(input: &mut BytesMut, in_flight: &mut VecDeque<InFlight>, retiring: &mut bool) -> Result<(), WireError> {
    while let Some(message) = wire::next_message(input)? {
        match message.tag {
            // BindComplete, CommandComplete, notices, parameter changes, notifications.
            b'2' | b'C' | b'N' | b'S' | b'A' => {}
            b'D' => {
                let lookup = in_flight.front_mut().ok_or_else(|| unexpected(b'D'))?;
                let column = wire::first_column(message.body)?;
                lookup.owner = column
                    .map(|text| String::from_utf8(text.to_vec()))
                    .transpose()
                    .map_err(|_| WireError("a supervisor id that is not UTF-8".into()))?;
            }
            b'E' => {
                let lookup = in_flight.front_mut().ok_or_else(|| unexpected(b'E'))?;
                lookup.error = Some(WireError(wire::error_text(&message.body)));
                // The statement may be stale (its table altered): start afresh.
                *retiring = true;
            }
            b'Z' => {
                let lookup = in_flight.pop_front().ok_or_else(|| unexpected(b'Z'))?;
                let reply = match lookup.error {
                    Some(err) => Err(err),
                    None => Ok(lookup.owner),
                };
                // The caller may have given up waiting: nothing to do then.
                let _ = lookup.reply.send(reply);
            }
            other => return Err(unexpected(other)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

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
        assert_eq!(target.password.as_deref(), Some("an open:secret"));
        assert_eq!(target.user, "alice");
        assert_eq!(target.database.as_deref(), Some("fleet"));
        assert_eq!(target.application_name.as_deref(), Some("x"));
        assert!(matches!(&target.address, Address::Tcp(host, 6543) if host == "db.example"));
        #[cfg(unix)]
        {
            let local = super::tests::target("postgres://alice@%2Fvar%2Frun%2Fpostgresql:5433/fleet").unwrap();
            assert!(
                matches!(&local.address, Address::Unix(path) if path.ends_with("postgresql/.s.PGSQL.5433")),
                "a host that is a path is a Unix socket's directory"
            );
        }
    }
}
