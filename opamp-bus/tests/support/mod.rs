//! What the Kafka tests share: a broker of a test's own, topics of a test's
//! own, and the log output.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use opamp_bus::kafka::KafkaBusConfig;

/// A configuration of topics and groups of this test's own, on `brokers`.
pub(crate) fn config_on(brokers: &str) -> KafkaBusConfig {
    KafkaBusConfig::new(brokers)
        .with_topic_prefix(&format!("t{}.", uuid::Uuid::new_v4().simple()))
        .with_partitions(3, 3, 2)
        .with_replication(1)
        // Group members notice a rebalance sooner (a test setting, not a broker quirk).
        .with_property("heartbeat.interval.ms", "500")
}

/// The bus's logs, shown with a failing test's output (RUST_LOG to choose).
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("opamp_bus=info,librdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A broker of a test's own on `port`, run by the service script with its
/// sqlite storage in a folder of its own (kept across [`run`](Self::run)
/// `stop` and `start`, removed when dropped). Stopped when dropped.
pub(crate) struct OwnBroker {
    script: PathBuf,
    dir: PathBuf,
    port: u16,
    advertised: u16,
}

impl OwnBroker {
    /// A broker telling clients to connect to it directly.
    pub(crate) fn start(port: u16) -> Self {
        Self::start_advertising(port, port)
    }

    /// A broker on `port` telling clients to connect to `advertised` (a
    /// proxy in front of it): the address clients bootstrap from is not
    /// the one they use after the first metadata answer.
    pub(crate) fn start_advertising(port: u16, advertised: u16) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/services/kafka");
        let dir = std::env::temp_dir().join(format!("opamp-own-kafka-{}", uuid::Uuid::new_v4().simple()));
        let broker = OwnBroker {
            script,
            dir,
            port,
            advertised,
        };
        broker.run("start");
        broker
    }

    /// `start` or `stop`, waiting until it answers or its port is closed.
    pub(crate) fn run(&self, action: &str) {
        let status = Process::new(&self.script)
            .arg(action)
            .arg(&self.dir)
            .env("OPAMP_KAFKA_PORT", self.port.to_string())
            .env("OPAMP_KAFKA_ADVERTISED_PORT", self.advertised.to_string())
            .status()
            .unwrap_or_else(|err| panic!("running {}: {err}", self.script.display()));
        assert!(status.success(), "`{} {action}` failed", self.script.display());
    }

    /// Kills it (`SIGKILL`), as a crash or an orchestrator's hard stop
    /// would, and waits until its port is closed; [`run`](Self::run)
    /// `start` starts it again on its data. tansu 0.6.0 stopped gracefully
    /// while groups and idempotent producers are live can leave its sqlite
    /// storage without a producer's row; after the restart its storage task
    /// panics on that producer's next batch ("more or less than one row")
    /// and answers every produce and metadata request with an unknown error.
    pub(crate) fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("tansu.pid")).expect("the script wrote tansu's pid");
        let status = Process::new("kill").args(["-KILL", pid.trim()]).status().unwrap();
        assert!(status.success(), "kill -KILL tansu");
        let deadline = Instant::now() + Duration::from_secs(10);
        // A killed process lingers as a zombie here: wait for the port, not the pid.
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "tansu's port {} never closed", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.dir.join("tansu.pid"));
    }

    /// Where it listens.
    pub(crate) fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Process::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .env("OPAMP_KAFKA_PORT", self.port.to_string())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
