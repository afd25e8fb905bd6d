//! A PostgreSQL server of a test's own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Output};

use super::wait_for_port;

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster of a test's own, on a port of its own (so that
/// pausing or restarting it disturbs no other test), its data in a
/// throwaway folder kept across restarts. Stopped and deleted when dropped.
pub(crate) struct OwnPostgres {
    pub(crate) port: u16,
    dir: PathBuf,
}

impl OwnPostgres {
    /// Creates the cluster (`initdb`) and starts it.
    pub(crate) fn start(port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-own-postgres-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to `postgres`.
            run(Process::new("chown").arg("postgres:").arg(&dir));
        }
        let postgres = OwnPostgres { port, dir };
        run(postgres
            .as_owner("initdb")
            .arg("-D")
            .arg(postgres.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8"])
            .args(["--no-sync", "--no-instructions"]));
        run(&mut postgres.pg_ctl("start"));
        wait_for_port(port, true);
        postgres
    }

    /// The URL of database `postgres` through `addr` (the server, or a proxy in front of it).
    pub(crate) fn url_via(addr: SocketAddr) -> String {
        format!("postgres://postgres@{addr}/postgres")
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sends `signal` to every process of the cluster: the postmaster first
    /// (so that it forks no new backend meanwhile), then its children. A
    /// paused postmaster alone would still let the backends already open
    /// answer their queries; pausing the server is pausing them all.
    pub(crate) fn signal(&self, signal: &str) {
        let postmaster = self.postmaster();
        let status = Process::new("kill").args([signal, &postmaster]).status().unwrap();
        assert!(status.success(), "kill {signal} the postmaster");
        let children = Process::new("pgrep").args(["-P", &postmaster]).output().unwrap();
        for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            // A backend may have exited since pgrep listed it.
            let _ = Process::new("kill").args([signal, child]).status();
        }
    }

    /// `pg_ctl restart -m fast`: connections are cut, the data is kept.
    pub(crate) fn restart(&self) {
        run(self.pg_ctl("restart").args(["-m", "fast"]));
        wait_for_port(self.port, true);
    }

    /// The postmaster's pid, from the first line of `postmaster.pid`.
    fn postmaster(&self) -> String {
        let text =
            std::fs::read_to_string(self.data().join("postmaster.pid")).expect("the server wrote postmaster.pid");
        text.lines().next().unwrap_or_default().trim().to_owned()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self, action: &str) -> Process {
        let mut pg_ctl = self.as_owner("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "30", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c max_connections=100",
                self.port,
                self.dir.display()
            ))
            .arg(action);
        pg_ctl
    }

    fn as_owner(&self, program: &str) -> Process {
        let program = Path::new(BIN).join(program);
        if is_root() {
            let mut runuser = Process::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(program);
            runuser
        } else {
            Process::new(program)
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            // A paused server must be resumed to stop.
            self.signal("-CONT");
            let _ = self.pg_ctl("stop").args(["-m", "immediate"]).output();
        }
        wait_for_port(self.port, false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Process::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

#[track_caller]
fn run(command: &mut Process) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("running {command:?}: {err}; `scripts/services/postgres` installs PostgreSQL 15"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
