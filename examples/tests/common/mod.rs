//! What the tests of the binaries share: the binaries as child processes,
//! waiting with a deadline, and where the live services of `scripts/services/` are.

// Each test file uses a part of this.
#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as Process};
use tokio::time::{Instant, sleep, timeout};

/// The standalone Redis (`OPAMP_TEST_REDIS_URL`).
pub(crate) fn redis_url() -> String {
    std::env::var("OPAMP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390/".to_owned())
}

/// Some Redis Cluster nodes, `redis://…` URLs separated by commas (`OPAMP_TEST_REDIS_CLUSTER_URLS`).
pub(crate) fn redis_cluster_urls() -> String {
    std::env::var("OPAMP_TEST_REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| "redis://127.0.0.1:7301/,redis://127.0.0.1:7302/,redis://127.0.0.1:7303/".to_owned())
}

/// The Redis Sentinels, `redis://…` URLs separated by commas (`OPAMP_TEST_REDIS_SENTINEL_URLS`),
/// and the name they know the primary by (`OPAMP_TEST_REDIS_SENTINEL_MASTER`).
pub(crate) fn redis_sentinel() -> (String, String) {
    let urls =
        std::env::var("OPAMP_TEST_REDIS_SENTINEL_URLS").unwrap_or_else(|_| "redis://127.0.0.1:26410/".to_owned());
    let master = std::env::var("OPAMP_TEST_REDIS_SENTINEL_MASTER").unwrap_or_else(|_| "opamp-test".to_owned());
    (urls, master)
}

/// The PostgreSQL server (`OPAMP_TEST_POSTGRES_URL`).
pub(crate) fn postgres_url() -> String {
    std::env::var("OPAMP_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5440/postgres".to_owned())
}

/// The Kafka-protocol brokers, `host:port` separated by commas (`OPAMP_TEST_KAFKA_BROKERS`).
pub(crate) fn kafka_brokers() -> String {
    std::env::var("OPAMP_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9093".to_owned())
}

/// `host:port` of the first server a URL or a list names.
pub(crate) fn first_address(urls: &str) -> String {
    let first = urls.split(',').next().unwrap_or_default();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

/// One HTTP/1.1 request on its own connection, with `headers` (each line
/// ending in CRLF); the status and the body.
pub(crate) async fn http(address: &str, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|err| panic!("{address} accepts: {err}"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn reachable(address: &str) -> bool {
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .is_some_and(|address| TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok())
}

/// Whether every `(what, URL or list)` answers. Under CI a missing one fails
/// the test; locally the test is skipped, loudly.
pub(crate) fn services_present(services: &[(&str, String)]) -> bool {
    let missing: Vec<String> = services
        .iter()
        .map(|(what, urls)| (what, first_address(urls)))
        .filter(|(_, address)| !reachable(address))
        .map(|(what, address)| format!("{what} at {address}"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "no {}: start it with scripts/services/ (or run scripts/test), or point the OPAMP_TEST_* \
         variables at running servers",
        missing.join(", ")
    );
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED (not under CI): {message}");
    false
}

/// `opamp-server` on in-memory backends with a supervisor in the process,
/// its REST, gRPC and OpAMP listeners each on a free port.
pub(crate) struct OneProcess {
    pub(crate) proc: Proc,
    pub(crate) api: String,
    pub(crate) grpc: String,
    pub(crate) opamp: String,
}

/// Starts [`OneProcess`] accepting the operator `token`, with `extra` arguments.
pub(crate) async fn one_process(token: &str, fleet_key: &str, extra: &[&str]) -> OneProcess {
    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]
        .into_iter()
        .chain(["--opamp-listen", "127.0.0.1:0", "--tokens", token])
        .chain(extra.iter().copied())
        .map(String::from)
        .collect();
    let mut proc = Proc::spawn(
        "opamp-server",
        env!("CARGO_BIN_EXE_opamp-server"),
        &args,
        Some(fleet_key),
    );
    let line = proc.first_line().await;
    match line.split(' ').collect::<Vec<_>>().as_slice() {
        ["listening", api, "grpc", grpc, "opamp", opamp] => OneProcess {
            api: api.to_string(),
            grpc: grpc.to_string(),
            opamp: opamp.to_string(),
            proc,
        },
        _ => panic!("expected `listening ADDR grpc ADDR opamp ADDR`, got {line:?}"),
    }
}

/// How long anything expected may take (a loaded machine, a broker joining groups).
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// A child process whose stderr goes to a file, shown when the test fails; killed when dropped.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `binary` with `args`, and the fleet key in `OPAMP_FLEET_KEY` when given.
    pub(crate) fn spawn(name: &'static str, binary: &str, args: &[String], fleet_key: Option<&str>) -> Proc {
        let log = std::env::temp_dir().join(format!("opamp-examples-{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let mut command = Process::new(binary);
        match fleet_key {
            Some(key) => command.env("OPAMP_FLEET_KEY", key),
            None => command.env_remove("OPAMP_FLEET_KEY"),
        };
        let child = command
            .args(args)
            .env("RUST_LOG", "info,opamp_core=debug,librdkafka=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("a log file"))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {binary}: {err}"));
        Proc { name, child, log }
    }

    /// Its process id, while it runs.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first stdout line, which a supervisor prints once it serves devices.
    pub(crate) async fn first_line(&mut self) -> String {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let read = timeout(DEADLINE, BufReader::new(stdout).read_line(&mut line)).await;
        assert!(
            matches!(read, Ok(Ok(n)) if n > 0),
            "{} printed no line: {read:?}\n{}",
            self.name,
            self.logs()
        );
        line.trim().to_owned()
    }

    /// Waits until its log contains `text`.
    pub(crate) async fn wait_for_log(&self, text: &str) {
        wait_until(&format!("{} logs {text:?}", self.name), || async {
            self.logs().contains(text)
        })
        .await;
    }

    /// Waits for it to exit by itself; how it did.
    pub(crate) async fn exited(&mut self) -> std::process::ExitStatus {
        match timeout(DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            other => panic!("{} did not exit: {other:?}\n{}", self.name, self.logs()),
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub(crate) async fn terminate(&mut self) {
        let pid = self.child.id().expect("still running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid}");
        let status = timeout(DEADLINE, self.child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(status)) if status.success()),
            "{} did not exit cleanly on SIGTERM: {status:?}\n{}",
            self.name,
            self.logs()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Waits until `check` holds, polling, or fails with `what`.
pub(crate) async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        sleep(Duration::from_millis(50)).await;
    }
}
