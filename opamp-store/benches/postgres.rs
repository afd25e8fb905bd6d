//! The PostgreSQL store beside `pgbench` on the same server, in the same run.
//!
//! ```sh
//! scripts/services/postgres start /tmp/opamp-postgres
//! cargo bench -p opamp-store --features postgres --bench postgres
//! ```
//!
//! Rounds alternate: `pgbench -S -M prepared -c N -j N` (its select-only
//! script: one primary-key read of `pgbench_accounts`, 100,000 rows at scale
//! 1), then `N` tasks calling `PostgresStore::lookup` on a fleet of 100,000
//! leases for as long, on a runtime with N worker threads (pgbench's `-j N`):
//! once with the default lookup connection, once through the sqlx pool.
//! Then claims (batches of 1,000, every claim a
//! takeover) beside a pgbench script doing one single-row `UPDATE`, and
//! `renew` / `lookup_many` of 1,000 devices per statement. Latencies are per
//! call: pgbench's from its per-transaction log (`-l`), ours timed around
//! each call.
//!
//! Under `cargo bench` each round lasts 10 s and there are 3; under `cargo
//! test` (no `--bench` argument) one round of 0.5 s, to check that it works.
//! `OPAMP_BENCH_CLIENTS` sets N (default 8), `OPAMP_BENCH_LOOKUP_CONNECTIONS`
//! the store's lookup connections (default: the store's default),
//! `OPAMP_BENCH_WORKERS` the tokio worker threads (default: one per core),
//! `OPAMP_BENCH_ONLY=lookup`
//! skips the claims and batches, `OPAMP_TEST_POSTGRES_URL` names the server,
//! `OPAMP_PGBENCH` the pgbench binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opamp_core::{DeviceId, RoutingStore, SupervisorId};
use opamp_store::postgres::{PostgresConfig, PostgresStore};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::runtime::Runtime;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5440/postgres";
const PGBENCH_DB: &str = "opamp_pgbench";
/// The fleet: as many leases as pgbench has accounts at scale 1.
const FLEET: usize = 100_000;
const BATCH: usize = 1_000;
const TTL: Duration = Duration::from_secs(300);

struct Settings {
    clients: usize,
    lookup_connections: u32,
    only_lookups: bool,
    round: Duration,
    rounds: usize,
    url: String,
    pgbench: PathBuf,
}

impl Settings {
    fn from_env() -> Self {
        let full = std::env::args().any(|arg| arg == "--bench");
        let clients = std::env::var("OPAMP_BENCH_CLIENTS")
            .ok()
            .map(|text| text.parse().expect("OPAMP_BENCH_CLIENTS is a number"))
            .unwrap_or(8);
        let pgbench = std::env::var_os("OPAMP_PGBENCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin/pgbench"));
        assert!(
            pgbench.exists(),
            "pgbench not found at {} (set OPAMP_PGBENCH; scripts/services/postgres installs it)",
            pgbench.display()
        );
        let lookup_connections = std::env::var("OPAMP_BENCH_LOOKUP_CONNECTIONS")
            .ok()
            .map(|text| text.parse().expect("OPAMP_BENCH_LOOKUP_CONNECTIONS is a number"))
            .unwrap_or_else(|| PostgresConfig::new(DEFAULT_URL).lookup_connections);
        Settings {
            clients,
            lookup_connections,
            only_lookups: std::env::var("OPAMP_BENCH_ONLY").is_ok_and(|only| only == "lookup"),
            round: if full {
                Duration::from_secs(10)
            } else {
                Duration::from_millis(500)
            },
            rounds: if full { 3 } else { 1 },
            url: std::env::var("OPAMP_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned()),
            pgbench,
        }
    }
}

/// Throughput and latency of one round.
#[derive(Debug, Clone, Copy)]
struct Round {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU time the client spent per operation (user + system).
    client_cpu_us: f64,
}

/// CPU seconds (user + system) used so far by this process, or by its
/// children that have finished, from `/proc/self/stat` (ticks of 10 ms).
fn cpu_seconds(children: bool) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (in parentheses, which may hold
    // spaces) start at field 3: utime and stime are fields 14 and 15,
    // cutime and cstime 16 and 17.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let first = if children { 13 } else { 11 };
    let ticks: f64 = (first..first + 2)
        .filter_map(|i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn round_of(count: usize, elapsed: Duration, mut latencies_us: Vec<f64>) -> Round {
    latencies_us.sort_by(f64::total_cmp);
    Round {
        per_second: count as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies_us, 0.5),
        p99_us: percentile(&latencies_us, 0.99),
        client_cpu_us: f64::NAN,
    }
}

fn median(rounds: &[Round], field: fn(&Round) -> f64) -> f64 {
    let mut values: Vec<f64> = rounds.iter().map(field).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// pgbench against the database `PGBENCH_DB` on the store's server.
struct Pgbench {
    binary: PathBuf,
    options: PgConnectOptions,
    dir: PathBuf,
}

impl Pgbench {
    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(["-h", self.options.get_host()])
            .args(["-p", &self.options.get_port().to_string()])
            .args(["-U", self.options.get_username()])
            .current_dir(&self.dir);
        command
    }

    fn init(&self) {
        let output = self
            .command()
            .args(["-i", "-s", "1", "-q", PGBENCH_DB])
            .output()
            .expect("running pgbench -i");
        assert!(
            output.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// One timed run of `args`; its tps and the latencies from its transaction log.
    fn run(&self, args: &[&str], clients: usize, length: Duration) -> Round {
        for stale in std::fs::read_dir(&self.dir).expect("the pgbench folder").flatten() {
            let _ = std::fs::remove_file(stale.path());
        }
        let n = clients.to_string();
        let seconds = length.as_secs().max(1).to_string();
        let mut command = self.command();
        command
            .args(args)
            .args(["-c", &n, "-j", &n, "-n", "-l", "--log-prefix=tx"])
            .arg(PGBENCH_DB);
        // pgbench counts whole seconds; a sub-second round uses a transaction count instead.
        if length < Duration::from_secs(1) {
            command.args(["-t", "200"]);
        } else {
            command.args(["-T", &seconds]);
        }
        let cpu_before = cpu_seconds(true);
        let output = command.output().expect("running pgbench");
        let client_cpu = cpu_seconds(true) - cpu_before;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "pgbench failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let tps = stdout
            .lines()
            .find_map(|line| line.strip_prefix("tps = "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|tps| tps.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no tps in pgbench's output: {stdout}"));
        let mut latencies = Vec::new();
        for log in std::fs::read_dir(&self.dir).expect("the pgbench folder").flatten() {
            let text = std::fs::read_to_string(log.path()).expect("a pgbench log");
            // client_id transaction_no time(µs) script_no time_epoch time_us
            latencies.extend(
                text.lines()
                    .filter_map(|line| line.split_whitespace().nth(2)?.parse::<f64>().ok()),
            );
        }
        let transactions = latencies.len();
        let mut round = round_of(transactions, Duration::from_secs(1), latencies);
        round.per_second = tps;
        round.client_cpu_us = client_cpu * 1e6 / transactions.max(1) as f64;
        round
    }
}

fn device(n: usize) -> DeviceId {
    DeviceId::new(format!("device-{n:07}")).expect("valid device id")
}

/// The `n`th device number of a client's random walk over the fleet (splitmix64:
/// no dependency, no shared state, the same walk every run).
fn spread(client: usize, n: u64) -> usize {
    let mut z = ((client as u64) << 40 ^ n).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % FLEET as u64) as usize
}

/// `clients` tasks running `call` back to back for `length`; every call timed.
async fn drive<F, Fut>(clients: usize, length: Duration, per_call: usize, call: F) -> Round
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let cpu_before = cpu_seconds(false);
    let deadline = start + length;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let call = call.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let begun = Instant::now();
                call(client, n).await;
                latencies.push(begun.elapsed().as_secs_f64() * 1e6);
                n += 1;
            }
            latencies
        });
    }
    let latencies: Vec<f64> = tasks.join_all().await.into_iter().flatten().collect();
    let elapsed = start.elapsed();
    let calls = latencies.len();
    let mut round = round_of(calls * per_call, elapsed, latencies);
    round.client_cpu_us = (cpu_seconds(false) - cpu_before) * 1e6 / (calls * per_call).max(1) as f64;
    round
}

fn print_row(what: &str, rounds: &[Round], unit: &str, baseline: Option<f64>) {
    let tps: Vec<String> = rounds.iter().map(|r| format!("{:.0}", r.per_second)).collect();
    let med = median(rounds, |r| r.per_second);
    let ratio = baseline.map_or("—".to_owned(), |base| format!("{:.2}", med / base));
    println!(
        "| {what} | {} | **{med:.0} {unit}** | {:.0} µs | {:.0} µs | {:.1} µs | {ratio} |",
        tps.join(", "),
        median(rounds, |r| r.p50_us),
        median(rounds, |r| r.p99_us),
        median(rounds, |r| r.client_cpu_us),
    );
}

fn main() {
    let settings = Settings::from_env();
    // One worker thread per core, as a server embedding the store runs
    // tokio; `OPAMP_BENCH_WORKERS` sets another count (pgbench's `-j N`
    // threads block on their sockets, tokio's do not).
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let workers = std::env::var("OPAMP_BENCH_WORKERS")
        .ok()
        .map_or(cores, |text| text.parse().expect("OPAMP_BENCH_WORKERS is a number"));
    let runtime: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let options = PgConnectOptions::from_str(&settings.url).expect("a PostgreSQL URL");
    let dir = std::env::temp_dir().join(format!("opamp-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a folder for pgbench's logs");
    let pgbench = Pgbench {
        binary: settings.pgbench.clone(),
        options: options.clone(),
        dir: dir.clone(),
    };
    let schema = format!("bench_{}", std::process::id());

    let (store, pooled) = runtime.block_on(async {
        let mut admin = PgConnection::connect_with(&options).await.unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {}: {err}; start it with scripts/services/postgres start /tmp/opamp-postgres",
                settings.url
            )
        });
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(PGBENCH_DB)
            .fetch_one(&mut admin)
            .await
            .expect("checking for the pgbench database");
        if !exists {
            sqlx::raw_sql(&format!("CREATE DATABASE {PGBENCH_DB}"))
                .execute(&mut admin)
                .await
                .expect("creating the pgbench database");
        }
        let config = PostgresConfig::new(&settings.url)
            .with_schema(&schema)
            // Room for the lookup connections beside the clients' own.
            .with_max_connections(settings.clients as u32 + 2 * settings.lookup_connections)
            .with_lookup_connections(settings.lookup_connections);
        let store = PostgresStore::connect(&config).await.expect("connecting the store");
        store.migrate().await.expect("migrating the bench schema");
        // The fleet in one statement, then vacuumed and analysed as pgbench -i does its table.
        sqlx::query(
            "INSERT INTO device_lease (device_id, supervisor_id, expires_at)
             SELECT 'device-' || lpad(n::text, 7, '0'), 'supervisor-1', now() + interval '1 day'
             FROM generate_series(0, $1 - 1) AS n",
        )
        .bind(FLEET as i64)
        .execute(store.pool())
        .await
        .expect("loading the fleet");
        sqlx::raw_sql("VACUUM ANALYZE device_lease")
            .execute(store.pool())
            .await
            .expect("vacuuming the fleet");
        let pooled = PostgresStore::connect(&config.with_lookup_connections(0))
            .await
            .expect("connecting the store without lookup lanes");
        (Arc::new(store), Arc::new(pooled))
    });
    pgbench.init();

    let (clients, length) = (settings.clients, settings.round);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nPostgreSQL store vs pgbench: {clients} clients, {} rounds of {length:?}, server {}:{}, load average {}\n",
        settings.rounds,
        options.get_host(),
        options.get_port(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("| what | per round | median | p50 | p99 | client CPU per op | ratio |");
    println!("|---|---|---|---|---|---|---|");

    let mut baseline = Vec::new();
    let mut lanes = Vec::new();
    let mut through_pool = Vec::new();
    for _ in 0..settings.rounds {
        baseline.push(pgbench.run(&["-S", "-M", "prepared"], clients, length));
        for (store, rounds) in [(&store, &mut lanes), (&pooled, &mut through_pool)] {
            let store = store.clone();
            rounds.push(runtime.block_on(drive(clients, length, 1, move |client, n| {
                let store = store.clone();
                async move {
                    let d = device(spread(client, n));
                    std::hint::black_box(store.lookup(&d).await.expect("lookup"));
                }
            })));
        }
    }
    let base_tps = median(&baseline, |r| r.per_second);
    print_row("pgbench -S -M prepared (baseline)", &baseline, "tps", Some(base_tps));
    print_row(
        &format!(
            "PostgresStore::lookup ({} lookup connections)",
            settings.lookup_connections
        ),
        &lanes,
        "lookups/s",
        Some(base_tps),
    );
    print_row(
        "PostgresStore::lookup through the sqlx pool (0 lookup connections)",
        &through_pool,
        "lookups/s",
        Some(base_tps),
    );
    if settings.only_lookups {
        clean_up(&runtime, &store, &schema, &dir);
        return;
    }

    // Claims: batches of 1,000 devices, the batch's claims spread over the
    // clients; alternating supervisors make every claim a takeover.
    let update = dir.with_extension("update.sql");
    std::fs::write(
        &update,
        "\\set aid random(1, 100000)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n",
    )
    .expect("writing the pgbench update script");
    let mut baseline = Vec::new();
    let mut claims = Vec::new();
    let supervisors =
        [SupervisorId::new("supervisor-1"), SupervisorId::new("supervisor-2")].map(|s| s.expect("valid supervisor id"));
    // Claims take windows of 1,000 devices in the first half of the fleet, in
    // turn; each window goes to the supervisor that does not hold it.
    let windows = FLEET / 2 / BATCH;
    let mut holder = vec![0usize; windows];
    let mut batches = 0usize;
    let per_client = BATCH / clients;
    for _ in 0..settings.rounds {
        baseline.push(pgbench.run(&["-M", "prepared", "-f", path_str(&update)], clients, length));
        claims.push(runtime.block_on(async {
            let start = Instant::now();
            let cpu_before = cpu_seconds(false);
            let mut latencies = Vec::new();
            let mut claimed = 0;
            while start.elapsed() < length {
                let window = batches % windows;
                holder[window] = 1 - holder[window];
                let supervisor = supervisors[holder[window]];
                let begun = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for client in 0..clients {
                    let store = store.clone();
                    let first = window * BATCH + client * per_client;
                    tasks.spawn(async move {
                        for d in (first..first + per_client).map(device) {
                            let claim = store.claim(&d, &supervisor, TTL).await.expect("claim");
                            assert!(claim.previous_owner().is_some(), "{d}: every claim a takeover");
                        }
                    });
                }
                tasks.join_all().await;
                latencies.push(begun.elapsed().as_secs_f64() * 1e6);
                claimed += per_client * clients;
                batches += 1;
            }
            let mut round = round_of(claimed, start.elapsed(), latencies);
            round.client_cpu_us = (cpu_seconds(false) - cpu_before) * 1e6 / claimed.max(1) as f64;
            round
        }));
    }
    let base_tps = median(&baseline, |r| r.per_second);
    print_row("pgbench one-row UPDATE (baseline)", &baseline, "tps", Some(base_tps));
    print_row(
        "claim, batches of 1,000 (latency per batch)",
        &claims,
        "claims/s",
        Some(base_tps),
    );

    // One statement per 1,000 devices: renew (every lease held) and lookup_many.
    let mut renewals = Vec::new();
    let mut many = Vec::new();
    for _ in 0..settings.rounds {
        let store_renew = store.clone();
        renewals.push(runtime.block_on(drive(clients, length, BATCH, move |client, n| {
            let store = store_renew.clone();
            async move {
                // Windows of the second half, which no claim touches.
                let window = (client * 3 + n as usize % 3) % (FLEET / 2 / BATCH);
                let first = FLEET / 2 + window * BATCH;
                let batch: Vec<DeviceId> = (first..first + BATCH).map(device).collect();
                let lost = store
                    .renew(&SupervisorId::new("supervisor-1").expect("valid"), &batch, TTL)
                    .await;
                assert!(lost.expect("renew").is_empty(), "the bench's own leases");
            }
        })));
        let store_many = store.clone();
        many.push(runtime.block_on(drive(clients, length, BATCH, move |client, n| {
            let store = store_many.clone();
            async move {
                let batch: Vec<DeviceId> = (0..BATCH as u64).map(|i| device(spread(client, n << 10 | i))).collect();
                std::hint::black_box(store.lookup_many(&batch).await.expect("lookup_many"));
            }
        })));
    }
    print_row("renew of 1,000 (latency per statement)", &renewals, "devices/s", None);
    print_row("lookup_many of 1,000 (latency per statement)", &many, "devices/s", None);

    clean_up(&runtime, &store, &schema, &dir);
    let _ = std::fs::remove_file(&update);
}

/// Drops the bench's schema and pgbench's logs.
fn clean_up(runtime: &Runtime, store: &PostgresStore, schema: &str, dir: &Path) {
    runtime.block_on(async {
        sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(store.pool())
            .await
            .expect("dropping the bench schema");
    });
    let _ = std::fs::remove_dir_all(dir);
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}
