//! What the tests of live servers share: a Redis or a PostgreSQL server of a
//! test's own, a Redis primary with a replica under a Sentinel of a test's
//! own, and the log output.

#![allow(dead_code)] // each test binary uses its own part of this module

pub(crate) mod postgres;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command as Process;
use std::time::{Duration, Instant};

/// A Redis of a test's own, on a port of its own (so that pausing or
/// restarting it disturbs no other test), without persistence: restarted,
/// it comes back empty. Stopped when dropped.
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    dir: PathBuf,
    role: Role,
    /// More `redis-server` settings, e.g. `--min-replicas-to-write 1`.
    settings: Vec<String>,
}

/// What an [`OwnRedis`] is started as.
enum Role {
    Primary,
    /// A replica of the server on this port.
    Replica(u16),
    /// A Sentinel watching, under this name, the primary on this port.
    Sentinel(String, u16),
}

impl OwnRedis {
    pub(crate) fn start(port: u16) -> Self {
        Self::start_as(port, Role::Primary, &[])
    }

    fn start_as(port: u16, role: Role, settings: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-own-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings = settings.iter().map(|setting| (*setting).to_owned()).collect();
        let redis = OwnRedis {
            port,
            dir,
            role,
            settings,
        };
        redis.launch();
        redis
    }

    pub(crate) fn launch(&self) {
        let mut command = match &self.role {
            Role::Sentinel(name, primary) => {
                // Sentinel rewrites its file as it learns and fails over: a fresh one each start,
                // with timings short enough for a failover to take seconds, not minutes.
                let file = self.dir.join("sentinel.conf");
                let settings = [
                    format!("port {}", self.port),
                    "bind 127.0.0.1".to_owned(),
                    "daemonize yes".to_owned(),
                    format!("dir {}", self.dir.display()),
                    format!("pidfile {}", self.dir.join("redis.pid").display()),
                    format!("logfile {}", self.dir.join("redis.log").display()),
                    format!("sentinel monitor {name} 127.0.0.1 {primary} 1"),
                    format!("sentinel down-after-milliseconds {name} 1000"),
                    format!("sentinel failover-timeout {name} 5000"),
                ];
                std::fs::write(&file, settings.join("\n") + "\n").unwrap();
                let mut command = Process::new("redis-sentinel");
                command.arg(file);
                command
            }
            role => {
                let mut command = Process::new("redis-server");
                command
                    .args([
                        "--port",
                        &self.port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--daemonize",
                        "yes",
                    ])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&self.dir)
                    .arg("--pidfile")
                    .arg(self.dir.join("redis.pid"))
                    .arg("--logfile")
                    .arg(self.dir.join("redis.log"));
                if let Role::Replica(primary) = role {
                    command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
                }
                command.args(&self.settings);
                command
            }
        };
        let status = command
            .status()
            .unwrap_or_else(|err| panic!("running {command:?}: {err}; `scripts/services/redis start DIR` installs it"));
        assert!(status.success(), "{command:?} (port {}) did not start", self.port);
        self.wait_until(true);
    }

    /// What `redis-cli -p PORT ARGS…` prints.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let output = Process::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("running redis-cli: {err}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits up to `within` for `redis-cli ARGS…` to print something `holds` accepts.
    pub(crate) fn wait_for_cli(&self, args: &[&str], within: Duration, what: &str, holds: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let printed = self.cli(args);
            if holds(&printed) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "port {}: {what} not within {within:?}; `redis-cli {}` printed {printed:?}",
                self.port,
                args.join(" ")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.pid"))
            .expect("redis-server wrote its pid")
            .trim()
            .to_owned()
    }

    pub(crate) fn signal(&self, signal: &str) {
        let status = Process::new("kill").args([signal, &self.pid()]).status().unwrap();
        assert!(status.success(), "kill {signal} redis-server");
    }

    /// Kills the server at once (SIGKILL: no goodbye to its clients or
    /// replicas), and waits for its port to close.
    pub(crate) fn kill(&self) {
        self.signal("-KILL");
        self.wait_until(false);
        // Its pid may be another process's soon: `stop` must not signal it.
        let _ = std::fs::remove_file(self.dir.join("redis.pid"));
    }

    pub(crate) fn stop(&self) {
        if self.dir.join("redis.pid").exists() {
            // A paused server must be resumed to die.
            let _ = Process::new("kill").args(["-CONT", &self.pid()]).status();
            let _ = Process::new("kill").arg(self.pid()).status();
        }
        self.wait_until(false);
    }

    /// Waits for the port to open, or close (a killed server lingers as a zombie here).
    fn wait_until(&self, open: bool) {
        wait_for_port(self.port, open);
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, its replica and one Sentinel watching them as `name`, of a
/// test's own: killing the primary fails over to the replica in a few
/// seconds (Sentinel acts 1 s after the primary stops answering). Stopped
/// when dropped, the Sentinel first.
pub(crate) struct OwnSentinelSet {
    pub(crate) sentinel: OwnRedis,
    pub(crate) replica: OwnRedis,
    pub(crate) primary: OwnRedis,
    pub(crate) name: String,
}

impl OwnSentinelSet {
    /// Starts them, and returns once the replica has caught up and the
    /// Sentinel knows it (else it could not promote it).
    pub(crate) fn start(primary: u16, replica: u16, sentinel: u16, name: &str) -> Self {
        Self::start_with(primary, replica, sentinel, name, &[])
    }

    /// The same, both servers started with `settings` as well.
    pub(crate) fn start_with(primary: u16, replica: u16, sentinel: u16, name: &str, settings: &[&str]) -> Self {
        let primary_port = primary;
        let primary = OwnRedis::start_as(primary, Role::Primary, settings);
        let replica = OwnRedis::start_as(replica, Role::Replica(primary_port), settings);
        replica.wait_for_cli(
            &["info", "replication"],
            Duration::from_secs(20),
            "the replica caught up",
            |info| info.contains("master_link_status:up"),
        );
        let sentinel = OwnRedis::start_as(sentinel, Role::Sentinel(name.to_owned(), primary_port), &[]);
        let replica_port = format!("{}", replica.port);
        sentinel.wait_for_cli(
            &["sentinel", "replicas", name],
            Duration::from_secs(20),
            "the Sentinel found the replica",
            |replicas| replicas.lines().any(|line| line.trim() == replica_port),
        );
        OwnSentinelSet {
            sentinel,
            replica,
            primary,
            name: name.to_owned(),
        }
    }

    /// The Sentinel's URL, for the store.
    pub(crate) fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.sentinel.port)
    }

    /// Waits until the primary has passed everything written so far to the replica.
    pub(crate) fn wait_replicated(&self) {
        self.primary.wait_for_cli(
            &["wait", "1", "5000"],
            Duration::from_secs(10),
            "the replica acknowledged every write",
            |replicas| replicas.trim() == "1",
        );
    }

    /// Waits until the Sentinel has switched to the server on `port` as the
    /// primary (`SENTINEL MASTER`, what clients ask; `get-master-addr-by-name`
    /// names the new one earlier, while the failover is still in progress).
    pub(crate) fn wait_for_primary(&self, port: u16, within: Duration) {
        let port = port.to_string();
        self.sentinel.wait_for_cli(
            &["sentinel", "master", &self.name],
            within,
            &format!("the Sentinel switched to port {port} as the primary"),
            |fields| {
                // Field names and values on alternate lines.
                let lines: Vec<&str> = fields.lines().map(str::trim).collect();
                lines.chunks(2).any(|pair| pair == ["port", port.as_str()])
            },
        );
    }
}

/// Waits for a loopback port to open, or close (a killed server lingers as a zombie here).
pub(crate) fn wait_for_port(port: u16, open: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() != open {
        assert!(
            Instant::now() < deadline,
            "port {port} never {}",
            if open { "opened" } else { "closed" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Logs at `RUST_LOG` (default `warn`) into the test's output.
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
