//! A local deployment of the design's Phase 3, every role a process of its
//! own on loopback: a Redis, a Kafka-protocol broker (tansu), `opamp-server`s,
//! `opamp-supervisor`s and device simulators (`opamp-loadgen fleet`, agents
//! over gRPC, spread over the supervisors by rendezvous hashing and moving
//! to their next choice when theirs dies).
//!
//! `scripts/deployment` starts one and keeps it up; the system tests
//! (`examples/tests/deployment.rs`) and the benchmark (`opamp-loadgen
//! deployment`) start their own and kill parts of it.
//!
//! The Redis keeps nothing on disk, so restarting it empties it; the broker
//! keeps its log in its folder, so restarting it keeps every acknowledged
//! message. Every process logs to `DIR/NAME.log`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use opamp_core::runtime::supervisor::OutcomeEvents;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::rest::RestClient;

/// Why a deployment could not do what it was asked.
#[derive(Debug)]
pub struct DeploymentError(String);

impl std::fmt::Display for DeploymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeploymentError {}

type Result<T> = std::result::Result<T, DeploymentError>;

fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(DeploymentError(message.into()))
}

/// What to start, and with what settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeploymentConfig {
    /// Where the logs and the broker's data go.
    pub dir: PathBuf,
    /// Where `opamp-server`, `opamp-supervisor` and `opamp-loadgen` are.
    pub bin_dir: PathBuf,
    /// How many `opamp-server` processes.
    pub servers: usize,
    /// How many `opamp-supervisor` processes.
    pub supervisors: usize,
    /// How many simulated devices, in all.
    pub devices: usize,
    /// How many simulator processes share them.
    pub simulators: usize,
    /// The supervisors' lease (renewed every third of it).
    pub lease_ttl: Duration,
    /// How long a device has to acknowledge a command.
    pub command_timeout: Duration,
    /// Seconds between a simulated device's heartbeats.
    pub heartbeat: Duration,
    /// How long a simulated device waits on a supervisor that does not
    /// answer before moving to another (`opamp-loadgen fleet --patience`),
    /// when not the gRPC connector's own limits.
    pub patience: Option<Duration>,
    /// The `redis-server` program.
    pub redis_server: PathBuf,
    /// The tansu broker program.
    pub tansu: PathBuf,
    /// Where the broker keeps its log.
    pub broker_storage: BrokerStorage,
    /// Which command outcomes the supervisors publish as events: only those
    /// the servers act on, by default (nothing else reads the events here).
    pub outcome_events: OutcomeEvents,
    /// How long fetches of commands wait (`fetch.wait.max.ms`): tansu
    /// 0.6.0 holds every fetch that long, data or not, so a command waits
    /// up to twice this in the broker; shorter costs it more idle fetches.
    pub commands_fetch_wait: Duration,
    /// How long fetches of events and config updates wait (no command waits
    /// on them).
    pub background_fetch_wait: Duration,
    /// Partitions of the commands topic (16 by default; events have 8).
    /// tansu 0.6.0 lists every batch of a partition to serve a fetch from
    /// memory, so more partitions make each fetch cheaper there; from sqlite
    /// each partition of each fetch costs an SQL statement, so fewer do.
    pub commands_partitions: u32,
    /// Tokio worker threads of each process but Redis: servers,
    /// supervisors, simulators and the broker (`TOKIO_WORKER_THREADS`), when
    /// not one per core. A dozen processes sharing a few cores switch
    /// threads less with fewer each; a broker on one thread also stores one
    /// produce at a time, and so did not serve a later batch before an
    /// earlier one was stored in our runs (see `opamp_bus::kafka`, **Gaps**).
    pub worker_threads: Option<usize>,
    /// `RUST_LOG` of every process.
    pub log: String,
}

/// Where the tansu broker keeps its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerStorage {
    /// A sqlite file in the broker's directory, kept across a restart (the default).
    #[default]
    Sqlite,
    /// The broker's memory: lost when it stops, so
    /// [`Deployment::restart_broker`] refuses. Far cheaper to serve: tansu
    /// 0.6.0 parses and plans an SQL statement for each partition of each
    /// fetch from sqlite, which here took 1.1 cores of 2 with no command in
    /// flight (0.3 from memory).
    Memory,
}

impl BrokerStorage {
    fn engine(self) -> &'static str {
        match self {
            BrokerStorage::Sqlite => "sqlite://tansu.db",
            BrokerStorage::Memory => "memory://tansu/",
        }
    }
}

impl DeploymentConfig {
    /// The design's Phase 3: 3 servers, 5 supervisors, 10,000 devices in 2
    /// simulators; 30 s leases, 10 s command timeout; supervisors publishing
    /// only the outcomes the servers act on, and events and config updates
    /// fetched with a 100 ms wait (commands with 5 ms); one tokio worker
    /// thread in each process. `redis-server` from
    /// `PATH`; tansu where `scripts/services/kafka` builds it (`OPAMP_TANSU`
    /// overrides).
    pub fn new(dir: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> Self {
        let tansu = std::env::var_os("OPAMP_TANSU").map(PathBuf::from).unwrap_or_else(|| {
            let cache = std::env::var_os("OPAMP_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/opamp"));
            cache.join("tansu-0.6.0/bin/tansu")
        });
        DeploymentConfig {
            dir: dir.into(),
            bin_dir: bin_dir.into(),
            servers: 3,
            supervisors: 5,
            devices: 10_000,
            simulators: 2,
            lease_ttl: Duration::from_secs(30),
            command_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(30),
            patience: None,
            redis_server: PathBuf::from("redis-server"),
            tansu,
            broker_storage: BrokerStorage::default(),
            outcome_events: OutcomeEvents::Unrecorded,
            commands_fetch_wait: Duration::from_millis(5),
            background_fetch_wait: Duration::from_millis(100),
            commands_partitions: 16,
            worker_threads: Some(1),
            log: "warn".to_owned(),
        }
    }

    /// With the broker keeping its log in `storage`.
    pub fn broker_storage(mut self, storage: BrokerStorage) -> Self {
        self.broker_storage = storage;
        self
    }

    /// With commands fetched with a `wait` of their own (at least 1 ms).
    pub fn commands_fetch_wait(mut self, wait: Duration) -> Self {
        self.commands_fetch_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// With `threads` tokio worker threads in each process but Redis
    /// (`None`: one per core, tokio's default).
    pub fn worker_threads(mut self, threads: Option<usize>) -> Self {
        self.worker_threads = threads.map(|threads| threads.max(1));
        self
    }

    /// `TOKIO_WORKER_THREADS` for the processes started, when set.
    fn worker_threads_env(&self) -> Option<(&'static str, String)> {
        self.worker_threads
            .map(|threads| ("TOKIO_WORKER_THREADS", threads.to_string()))
    }

    /// With events and config updates fetched with a `wait` of their own.
    pub fn background_fetch_wait(mut self, wait: Duration) -> Self {
        self.background_fetch_wait = wait;
        self
    }

    /// With `partitions` partitions of the commands topic.
    pub fn commands_partitions(mut self, partitions: u32) -> Self {
        self.commands_partitions = partitions.max(1);
        self
    }

    /// With the supervisors publishing `events` of command outcomes.
    pub fn outcome_events(mut self, events: OutcomeEvents) -> Self {
        self.outcome_events = events;
        self
    }

    /// With `servers` servers, `supervisors` supervisors and `devices` devices in `simulators` processes.
    pub fn size(mut self, servers: usize, supervisors: usize, devices: usize, simulators: usize) -> Self {
        self.servers = servers.max(1);
        self.supervisors = supervisors.max(1);
        self.devices = devices;
        self.simulators = simulators.max(1);
        self
    }

    /// With simulated devices that wait `patience` on a silent supervisor.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = Some(patience);
        self
    }

    /// With other leases and command timeouts.
    pub fn timings(mut self, lease_ttl: Duration, command_timeout: Duration) -> Self {
        self.lease_ttl = lease_ttl;
        self.command_timeout = command_timeout;
        self
    }
}

/// A running process of the deployment, killed when dropped.
#[derive(Debug)]
struct Member {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Member {
    fn spawn(name: &str, program: &Path, args: &[String], env: &[(&str, String)], dir: &Path) -> Result<Member> {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .or_else(|err| fail(format!("{}: {err}", log_path.display())))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .or_else(|err| fail(format!("starting {name} ({}): {err}", program.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (send, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Member {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
        })
    }

    /// The next line it prints, within `limit`.
    async fn line(&mut self, limit: Duration) -> Result<String> {
        match tokio::time::timeout(limit, self.lines.recv()).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => fail(format!(
                "{} exited before printing what was expected (see {}.log)",
                self.name, self.name
            )),
            Err(_) => fail(format!(
                "{} printed nothing within {limit:?} (see {}.log)",
                self.name, self.name
            )),
        }
    }

    /// The address in its `listening ADDRESS …` line.
    async fn listening(&mut self) -> Result<SocketAddr> {
        let line = self.line(Duration::from_secs(60)).await?;
        line.split(' ')
            .nth(1)
            .filter(|_| line.starts_with("listening "))
            .and_then(|address| address.parse().ok())
            .map_or_else(
                || fail(format!("{}: expected `listening ADDRESS`, got {line:?}", self.name)),
                Ok,
            )
    }

    /// `kill -9`, and waits for it to be gone.
    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`.
    async fn terminate(&mut self, grace: Duration) {
        if self.signal("-TERM").is_ok() && tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return;
        }
        self.kill().await;
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-TERM`) with `kill`.
    fn signal(&self, signal: &str) -> Result<()> {
        let Some(pid) = self.child.id() else {
            return fail(format!("{} has exited", self.name));
        };
        match std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
        {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => fail(format!("kill {signal} {} ({}): {status}", pid, self.name)),
            Err(err) => fail(format!("running kill {signal} for {}: {err}", self.name)),
        }
    }
}

/// A free loopback port (free when asked; the deployment binds it soon after).
fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .or_else(|err| fail(format!("finding a free port: {err}")))
}

/// Waits until `ready` says yes, polling every 50 ms, for at most `limit`.
async fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() > deadline {
            return fail(format!("{what} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The body of a `GET` of `path` on a loopback `port`, when it answers 200.
async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("an answer with no end of headers"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!("the answer was {status:?}")));
    }
    Ok(body.to_owned())
}

/// Whether a Redis answers `PING` on `port`.
fn redis_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A fresh random fleet key, base64 (what `OPAMP_FLEET_KEY` holds).
fn random_fleet_key() -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..2).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The deployment's parts, running. Dropping it kills every process.
#[derive(Debug)]
pub struct Deployment {
    config: DeploymentConfig,
    fleet_key: String,
    secret: String,
    redis_port: u16,
    broker_port: u16,
    redis: Member,
    broker: Member,
    /// `None` once killed.
    servers: Vec<Option<(Member, SocketAddr)>>,
    supervisors: Vec<Option<(Member, SocketAddr)>>,
    /// Where each supervisor serves `/metrics`, by number.
    supervisor_metrics: Vec<u16>,
    simulators: Vec<Member>,
    /// How long the devices took to connect, from the simulators' start.
    pub connected_in: Duration,
}

impl Deployment {
    /// Starts every part, in order, and returns once every device has had a session.
    pub async fn start(config: DeploymentConfig) -> Result<Deployment> {
        std::fs::create_dir_all(config.dir.join("broker"))
            .or_else(|err| fail(format!("{}: {err}", config.dir.display())))?;
        for program in ["opamp-server", "opamp-supervisor", "opamp-loadgen"] {
            if !config.bin_dir.join(program).is_file() {
                return fail(format!(
                    "no {program} in {} (build the examples first)",
                    config.bin_dir.display()
                ));
            }
        }
        if !config.tansu.is_file() {
            return fail(format!(
                "no tansu broker at {} (scripts/services/kafka builds it; or set OPAMP_TANSU)",
                config.tansu.display()
            ));
        }
        let (redis_port, broker_port) = (free_port()?, free_port()?);
        let redis = Self::start_redis(&config, redis_port).await?;
        let broker = Self::start_broker(&config, broker_port).await?;
        let mut deployment = Deployment {
            fleet_key: random_fleet_key(),
            secret: uuid::Uuid::new_v4().simple().to_string(),
            redis_port,
            broker_port,
            redis,
            broker,
            servers: Vec::new(),
            supervisors: Vec::new(),
            supervisor_metrics: Vec::new(),
            simulators: Vec::new(),
            connected_in: Duration::ZERO,
            config,
        };
        // The first server makes the topics; the rest start once they exist.
        for n in 0..deployment.config.servers {
            let server = deployment.start_server(n).await?;
            deployment.servers.push(Some(server));
        }
        for n in 0..deployment.config.supervisors {
            let metrics = free_port()?;
            let supervisor = deployment.start_supervisor(n, metrics).await?;
            deployment.supervisors.push(Some(supervisor));
            deployment.supervisor_metrics.push(metrics);
        }
        deployment.start_simulators().await?;
        Ok(deployment)
    }

    async fn start_redis(config: &DeploymentConfig, port: u16) -> Result<Member> {
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(str::to_owned)
        .into();
        let redis = Member::spawn("redis", &config.redis_server, &args, &[], &config.dir)?;
        wait_for("redis answering PING", Duration::from_secs(20), || redis_answers(port)).await?;
        Ok(redis)
    }

    async fn start_broker(config: &DeploymentConfig, port: u16) -> Result<Member> {
        let listener = format!("tcp://127.0.0.1:{port}");
        let args = [
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &listener,
            "--storage-engine",
            config.broker_storage.engine(),
        ]
        .map(str::to_owned);
        let env: Vec<_> = config.worker_threads_env().into_iter().collect();
        let broker = Member::spawn("broker", &config.tansu, &args, &env, &config.dir.join("broker"))?;
        wait_for("the broker listening", Duration::from_secs(30), || port_open(port)).await?;
        Ok(broker)
    }

    /// The store URL every process uses.
    pub fn store_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.redis_port)
    }

    /// The bus URL every process uses: a single broker (one replica), more
    /// command partitions than supervisors, short fetch waits (tansu answers
    /// a fetch only when its wait has passed), and a 10 s group session.
    ///
    /// The session is what lets the servers' event group form again after a
    /// server or the broker died: tansu 0.6.0 keeps a dead member in a group
    /// until its session lapses, and a joining server waits for it (at
    /// librdkafka's default 45 s, longer than a joining server waits). A 6 s
    /// session was too short: tansu, busy on the same cores, answered
    /// heartbeats late under load and the group kept rebalancing.
    pub fn bus_url(&self) -> String {
        format!(
            "kafka://127.0.0.1:{}?commands_partitions={}&events_partitions=8&replication=1\
             &fetch.wait.max.ms={}&background_fetch_wait={}ms&linger.ms=1&session.timeout.ms=10000\
             &heartbeat.interval.ms=2000",
            self.broker_port,
            self.config.commands_partitions,
            self.config.commands_fetch_wait.as_millis(),
            self.config.background_fetch_wait.as_millis()
        )
    }

    async fn start_server(&self, n: usize) -> Result<(Member, SocketAddr)> {
        let args = [
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--store".to_owned(),
            self.store_url(),
            "--bus".to_owned(),
            self.bus_url(),
            "--tokens".to_owned(),
            format!("deployment:operator:{}", self.secret),
            "--rate".to_owned(),
            "1000000".to_owned(),
            "--command-timeout".to_owned(),
            format!("{}ms", self.config.command_timeout.as_millis()),
        ];
        let mut server = Member::spawn(
            &format!("server-{n}"),
            &self.config.bin_dir.join("opamp-server"),
            &args,
            &self.env(false),
            &self.config.dir,
        )?;
        let address = server.listening().await?;
        Ok((server, address))
    }

    /// The environment of our processes: their log filter, their tokio
    /// worker threads when set, and the fleet's key for those that need it.
    fn env(&self, fleet_key: bool) -> Vec<(&'static str, String)> {
        let mut env = vec![("RUST_LOG", self.config.log.clone())];
        env.extend(self.config.worker_threads_env());
        if fleet_key {
            env.push(("OPAMP_FLEET_KEY", self.fleet_key.clone()));
        }
        env
    }

    /// The id of supervisor `n`.
    pub fn supervisor_id(n: usize) -> String {
        format!("supervisor-{n}")
    }

    async fn start_supervisor(&self, n: usize, metrics_port: u16) -> Result<(Member, SocketAddr)> {
        let args = [
            "--id".to_owned(),
            Self::supervisor_id(n),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--store".to_owned(),
            self.store_url(),
            "--bus".to_owned(),
            self.bus_url(),
            "--lease-ttl".to_owned(),
            format!("{}ms", self.config.lease_ttl.as_millis()),
            "--outcome-events".to_owned(),
            self.config.outcome_events.to_string(),
            "--metrics-listen".to_owned(),
            format!("127.0.0.1:{metrics_port}"),
        ];
        let mut supervisor = Member::spawn(
            &Self::supervisor_id(n),
            &self.config.bin_dir.join("opamp-supervisor"),
            &args,
            &self.env(true),
            &self.config.dir,
        )?;
        let address = supervisor.listening().await?;
        Ok((supervisor, address))
    }

    async fn start_simulators(&mut self) -> Result<()> {
        let urls: Vec<String> = self
            .supervisors
            .iter()
            .flatten()
            .map(|(_, address)| format!("http://{address}"))
            .collect();
        let started = Instant::now();
        let (count, per) = (
            self.config.devices,
            self.config.devices.div_ceil(self.config.simulators),
        );
        let mut first = 0;
        for n in 0..self.config.simulators {
            let these = per.min(count - first);
            let mut args = vec![
                "fleet".to_owned(),
                "--supervisors".to_owned(),
                urls.join(","),
                "--count".to_owned(),
                these.to_string(),
                "--first".to_owned(),
                first.to_string(),
                "--heartbeat".to_owned(),
                self.config.heartbeat.as_secs_f64().to_string(),
            ];
            if let Some(patience) = self.config.patience {
                args.extend(["--patience".to_owned(), patience.as_secs_f64().to_string()]);
            }
            self.simulators.push(Member::spawn(
                &format!("simulator-{n}"),
                &self.config.bin_dir.join("opamp-loadgen"),
                &args,
                &self.env(true),
                &self.config.dir,
            )?);
            first += these;
        }
        let limit = Duration::from_secs(60) + Duration::from_millis(10 * count as u64);
        for simulator in &mut self.simulators {
            let line = simulator.line(limit).await?;
            if !line.starts_with("connected ") {
                return fail(format!(
                    "{}: expected `connected N in T ms`, got {line:?}",
                    simulator.name
                ));
            }
        }
        self.connected_in = started.elapsed();
        Ok(())
    }

    /// The simulated devices' ids, `dev-000000` on.
    pub fn devices(&self) -> Vec<String> {
        (0..self.config.devices).map(|n| format!("dev-{n:06}")).collect()
    }

    /// The API token (an operator's).
    pub fn api_secret(&self) -> &str {
        &self.secret
    }

    /// A REST client of server `n`; `None` once it was killed.
    pub fn server(&self, n: usize) -> Option<RestClient> {
        let (_, address) = self.servers.get(n)?.as_ref()?;
        Some(RestClient::new(&address.to_string(), &self.secret))
    }

    /// REST clients of every live server.
    pub fn live_servers(&self) -> Vec<RestClient> {
        (0..self.servers.len()).filter_map(|n| self.server(n)).collect()
    }

    /// The ids of the supervisors still running.
    pub fn live_supervisors(&self) -> Vec<String> {
        (0..self.supervisors.len())
            .filter(|&n| self.supervisors[n].is_some())
            .map(Self::supervisor_id)
            .collect()
    }

    /// What supervisor `n` serves on `/metrics` (Prometheus text); `None`
    /// once it was killed.
    pub async fn supervisor_metrics(&self, n: usize) -> Option<Result<String>> {
        self.supervisors.get(n)?.as_ref()?;
        let port = self.supervisor_metrics[n];
        Some(
            http_get(port, "/metrics")
                .await
                .or_else(|err| fail(format!("reading {}'s metrics: {err}", Self::supervisor_id(n)))),
        )
    }

    /// `kill -9` of server `n`.
    pub async fn kill_server(&mut self, n: usize) -> Result<()> {
        kill_one(&mut self.servers, n, || format!("server-{n}")).await
    }

    /// Starts server `n` again after it was killed (on a new port).
    pub async fn restart_server(&mut self, n: usize) -> Result<()> {
        if self.servers.get(n).is_none_or(Option::is_some) {
            return fail(format!("server-{n} is not a killed server"));
        }
        let server = self.start_server(n).await?;
        self.servers[n] = Some(server);
        Ok(())
    }

    /// `kill -9` of supervisor `n`.
    pub async fn kill_supervisor(&mut self, n: usize) -> Result<()> {
        kill_one(&mut self.supervisors, n, || Self::supervisor_id(n)).await
    }

    /// Pauses supervisor `n` (SIGSTOP): its connections stay open, nothing
    /// answers on them, and its timers stand still until
    /// [`resume_supervisor`](Self::resume_supervisor).
    pub fn pause_supervisor(&self, n: usize) -> Result<()> {
        self.running_supervisor(n)?.signal("-STOP")
    }

    /// Resumes supervisor `n` after [`pause_supervisor`](Self::pause_supervisor) (SIGCONT).
    pub fn resume_supervisor(&self, n: usize) -> Result<()> {
        self.running_supervisor(n)?.signal("-CONT")
    }

    fn running_supervisor(&self, n: usize) -> Result<&Member> {
        match self.supervisors.get(n) {
            Some(Some((member, _))) => Ok(member),
            _ => fail(format!("no running {}", Self::supervisor_id(n))),
        }
    }

    /// Kills the Redis and starts it again, empty, on the same port.
    pub async fn restart_redis_empty(&mut self) -> Result<()> {
        self.redis.kill().await;
        self.redis = Self::start_redis(&self.config, self.redis_port).await?;
        Ok(())
    }

    /// `kill -9` of the broker, and a new one on the same port and data.
    ///
    /// A crash, not a graceful stop: tansu 0.6.0, stopped with SIGTERM while
    /// consumer groups are live, panicked in its group coordinator here
    /// (`update_group`), before and after its restart, and the control
    /// planes' event group never formed again; after `kill -9` it recovers.
    ///
    /// Refused when the broker keeps its log in memory: the new one would
    /// have lost every topic.
    pub async fn restart_broker(&mut self) -> Result<()> {
        if self.config.broker_storage == BrokerStorage::Memory {
            return fail("restart_broker: the broker keeps its log in memory, so a new one would have no topics");
        }
        self.broker.kill().await;
        wait_for("the broker's port closing", Duration::from_secs(10), || {
            !port_open(self.broker_port)
        })
        .await?;
        self.broker = Self::start_broker(&self.config, self.broker_port).await?;
        Ok(())
    }

    /// Stops the simulators (each prints what its devices did: the returned
    /// lines), then everything else.
    pub async fn stop(mut self) -> Result<Vec<String>> {
        let mut reports = Vec::new();
        for simulator in &mut self.simulators {
            drop(simulator.stdin.take());
            let line = simulator.line(Duration::from_secs(30)).await?;
            reports.push(line);
        }
        for (member, _) in self.servers.iter_mut().chain(self.supervisors.iter_mut()).flatten() {
            member.terminate(Duration::from_secs(10)).await;
        }
        self.broker.terminate(Duration::from_secs(10)).await;
        self.redis.kill().await;
        Ok(reports)
    }
}

/// `kill -9` of member `n` of `members`, which is then `None`; `name` names it in the error.
async fn kill_one(members: &mut [Option<(Member, SocketAddr)>], n: usize, name: impl Fn() -> String) -> Result<()> {
    match members.get_mut(n).and_then(Option::take) {
        Some((mut member, _)) => {
            member.kill().await;
            Ok(())
        }
        None => fail(format!("no running {}", name())),
    }
}

/// What a simulator's closing line says: `(devices, connected, configs applied, repeats answered)`.
pub fn parse_fleet_report(line: &str) -> Option<(usize, usize, usize, usize)> {
    // fleet: N devices, C connected at the end, A configs applied, R repeats answered without acting
    let rest = line.strip_prefix("fleet: ")?;
    let numbers: Vec<usize> = rest
        .split(", ")
        .map(|part| part.split(' ').next().and_then(|n| n.parse().ok()))
        .collect::<Option<_>>()?;
    match numbers.as_slice() {
        &[devices, connected, applied, repeats] => Some((devices, connected, applied, repeats)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_report_parses() {
        let line =
            "fleet: 300 devices, 298 connected at the end, 12 configs applied, 3 repeats answered without acting";
        assert_eq!(parse_fleet_report(line), Some((300, 298, 12, 3)));
        assert_eq!(parse_fleet_report("connected 300 in 12 ms"), None);
    }
}
