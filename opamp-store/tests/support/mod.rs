//! What the tests of live servers share: a Redis or a PostgreSQL server of a
//! test's own, and the log output.

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
}

impl OwnRedis {
    pub(crate) fn start(port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-own-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let redis = OwnRedis { port, dir };
        redis.launch();
        redis
    }

    pub(crate) fn launch(&self) {
        let status = Process::new("redis-server")
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
            .arg(self.dir.join("redis.log"))
            .status()
            .unwrap_or_else(|err| {
                panic!("running redis-server: {err}; `scripts/services/redis start DIR` installs it")
            });
        assert!(status.success(), "redis-server on port {} did not start", self.port);
        self.wait_until(true);
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

    pub(crate) fn stop(&self) {
        if self.dir.join("redis.pid").exists() {
            // A paused server must be resumed to die.
            let _ = Process::new("kill").args(["-CONT", &self.pid()]).status();
            let _ = Process::new("kill").arg(self.pid()).status();
        }
        self.wait_until(false);
    }

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
