//! The Redis store beside `redis-benchmark`, against one Redis of its own
//! started for the run (Debian's `redis-server`, installed by
//! `scripts/services/redis`):
//!
//! 1. memory: loads a fleet through the store API (lease, status hash, set
//!    memberships) and reports `used_memory` per device;
//! 2. lookups: `lookup` and `lookup_many` of 16 from 50 concurrent tasks on
//!    one core, and `redis-benchmark -c 50` doing `GET` of the same routing
//!    keys unpipelined and at `-P 16`, alternating, three rounds each.
//!
//! `cargo bench -p opamp-store --features redis --bench redis` measures a
//! fleet of 1,000,000; run as a test (`cargo test --bench redis`) it checks
//! the same steps on 2,000 devices in a second or two.
#![allow(missing_docs, reason = "a benchmark binary")]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opamp_core::{
    AgentType, ConfigVersion, DeviceId, RoutingStore, StatusPatch, StatusStore, SupervisorId, SystemClock, Timestamp,
};
use opamp_store::redis::{RedisStore, RedisStoreConfig};
use tokio::task::JoinSet;

/// The bench's own Redis, so nothing else is in its memory or on its core.
const PORT: u16 = 6392;
/// Requests in flight: redis-benchmark's default `-c`.
const CONCURRENCY: usize = 50;
const PIPELINE: usize = 16;
const SUPERVISORS: usize = 50;

struct Scale {
    fleet: usize,
    lookups: usize,
    rounds: usize,
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --bench` does not.
    let full = std::env::args().any(|arg| arg == "--bench");
    let scale = if full {
        Scale {
            fleet: 1_000_000,
            lookups: 1_000_000,
            rounds: 3,
        }
    } else {
        Scale {
            fleet: 2_000,
            lookups: 4_000,
            rounds: 1,
        }
    };
    let redis = OwnRedis::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(&scale, &redis));
}

async fn run(scale: &Scale, redis: &OwnRedis) {
    let url = format!("redis://127.0.0.1:{PORT}/");
    let store = Arc::new(
        RedisStore::connect(RedisStoreConfig::standalone(&url))
            .await
            .expect("connect"),
    );
    let devices: Arc<Vec<DeviceId>> = Arc::new((0..scale.fleet).map(device).collect());

    let empty = redis.used_memory();
    let loading = Instant::now();
    load(&store, &devices, |store, d, s| async move {
        store.claim(&d, &s, Duration::from_secs(3_600)).await.map(drop)
    })
    .await;
    let leased = redis.used_memory();
    load(&store, &devices, |store, d, s| async move {
        let now = Timestamp::now();
        let patch = StatusPatch::new()
            .online(s, now)
            .emission(true)
            .config(ConfigVersion::new("v1.2.3").expect("version"), None)
            .agent_type(AgentType::new("fluentbit").expect("agent type"))
            .last_seen(now);
        store.update_status(&d, &patch).await
    })
    .await;
    let loaded = redis.used_memory();
    let loading = loading.elapsed();
    let per = |bytes: u64| bytes as f64 / scale.fleet as f64;
    println!(
        "memory, {} devices on {SUPERVISORS} supervisors (loaded in {loading:.1?}; `used_memory` {} → {} bytes):",
        scale.fleet, empty, loaded
    );
    println!(
        "  routing key                 {:>7.1} bytes/device",
        per(leased - empty)
    );
    println!(
        "  status hash + set entries   {:>7.1} bytes/device",
        per(loaded - leased)
    );
    println!(
        "  total                       {:>7.1} bytes/device",
        per(loaded - empty)
    );

    // The same leases judged in a script by a clock of the store's own (the
    // wall clock here, so no margin: the keys were written without one).
    let mut exact_config = RedisStoreConfig::standalone(&url);
    exact_config.custom_clock_margin = Duration::ZERO;
    let exact = Arc::new(
        RedisStore::connect_with_clock(exact_config, Arc::new(SystemClock))
            .await
            .expect("connect"),
    );
    // `redis-benchmark -t get` reads `key:__rand_int__`: give those keys the
    // same kind of value, so that its GETs find what ours find.
    fill_benchmark_keys(&url, scale.fleet).await;
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("lookup (GET)", vec![]),
        ("lookup, exact (script)", vec![]),
        ("redis-benchmark GET device:{…}:supervisor, -P 1", vec![]),
        ("redis-benchmark -t get, -P 1", vec![]),
        ("lookup_many of 16 (pipelined GETs)", vec![]),
        ("redis-benchmark GET device:{…}:supervisor, -P 16", vec![]),
        ("redis-benchmark -t get, -P 16", vec![]),
    ];
    for _ in 0..scale.rounds {
        rows[0].1.push(lookups(&store, &devices, scale.lookups, 1).await);
        rows[2].1.push(redis_benchmark(scale, 1, true));
        rows[1].1.push(lookups(&exact, &devices, scale.lookups, 1).await);
        rows[3].1.push(redis_benchmark(scale, 1, false));
        rows[4].1.push(lookups(&store, &devices, scale.lookups, PIPELINE).await);
        rows[5].1.push(redis_benchmark(scale, PIPELINE, true));
        rows[6].1.push(redis_benchmark(scale, PIPELINE, false));
    }
    println!(
        "\nlookups of {} random devices, {CONCURRENCY} in flight, medians of {} rounds (keys/s):",
        scale.fleet, scale.rounds
    );
    let medians: Vec<f64> = rows.iter_mut().map(|(_, runs)| median(runs)).collect();
    for (n, (name, runs)) in rows.iter().enumerate() {
        let ratio = match n {
            0 | 1 => format!("  {:.2}× / {:.2}×", medians[n] / medians[2], medians[n] / medians[3]),
            4 => format!("  {:.2}× / {:.2}×", medians[4] / medians[5], medians[4] / medians[6]),
            _ => String::new(),
        };
        println!("  {name:<50} {:>10.0}{ratio:<20} runs: {runs:.0?}", medians[n]);
    }
    println!("  (ratios: to redis-benchmark GET of the same routing keys / to redis-benchmark -t get)");

    // The baseline for memory: the design's own commands (§4.3) for the same fleet.
    let stored = loaded - empty;
    redis.flush_all();
    let empty = redis.used_memory();
    design_literal(&url, scale.fleet).await;
    let literal = redis.used_memory() - empty;
    println!(
        "\nmemory of the design's own commands (SET+EXPIRE, HSET of its six fields, SADD ×2, INCR), same fleet: \
         {:.1} bytes/device; this store: {:.1} ({:.2}×)",
        per(literal),
        per(stored),
        stored as f64 / literal as f64
    );
}

/// `SET key:<n> supervisor-pod-<n % 50>` for the fleet: what `redis-benchmark -t get` reads.
async fn fill_benchmark_keys(url: &str, fleet: usize) {
    pipelined(url, fleet, |pipe, n, _, supervisor| {
        pipe.cmd("SET").arg(format!("key:{n:012}")).arg(supervisor).ignore();
    })
    .await;
}

/// Loads the fleet with the design's commands verbatim (§4.3).
async fn design_literal(url: &str, fleet: usize) {
    pipelined(url, fleet, |pipe, _, d, s| {
        pipe.cmd("SET").arg(format!("device:{d}:supervisor")).arg(s).ignore();
        pipe.cmd("EXPIRE")
            .arg(format!("device:{d}:supervisor"))
            .arg(300)
            .ignore();
        pipe.cmd("HSET")
            .arg(format!("device:{d}"))
            .arg(&["status", "online", "emission", "true", "config_version", "v1.2.3"])
            .arg(&[
                "agent_type",
                "fluentbit",
                "last_seen",
                "1706356800",
                "connected_at",
                "1706350000",
            ])
            .ignore();
        pipe.cmd("SADD").arg("devices:online").arg(d).ignore();
        pipe.cmd("SADD").arg(format!("supervisor:{s}:devices")).arg(d).ignore();
        pipe.cmd("INCR").arg(format!("supervisor:{s}:device_count")).ignore();
    })
    .await;
}

/// Sends what `add` puts in a pipeline for each device `n` (with its id and
/// supervisor), 1,000 devices per pipeline, on a plain connection.
async fn pipelined(url: &str, fleet: usize, add: impl Fn(&mut redis::Pipeline, usize, &str, &str)) {
    let client = redis::Client::open(url).expect("URL");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    for chunk in (0..fleet).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for n in chunk {
            add(
                &mut pipe,
                *n,
                &format!("{n:012}"),
                &format!("supervisor-pod-{}", n % SUPERVISORS),
            );
        }
        let () = pipe.query_async(&mut conn).await.expect("a pipeline of plain commands");
    }
}

/// Runs `op` for every device, `CONCURRENCY * 8` at a time, supervisors in turn.
async fn load<F, Fut>(store: &Arc<RedisStore>, devices: &Arc<Vec<DeviceId>>, op: F)
where
    F: Fn(Arc<RedisStore>, DeviceId, SupervisorId) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = opamp_core::Result<()>> + Send,
{
    let workers = CONCURRENCY * 8;
    let mut tasks = JoinSet::new();
    for worker in 0..workers {
        let (store, devices, op) = (store.clone(), devices.clone(), op.clone());
        tasks.spawn(async move {
            for n in (worker..devices.len()).step_by(workers) {
                let supervisor = SupervisorId::new(format!("supervisor-pod-{}", n % SUPERVISORS)).expect("id");
                op(store.clone(), devices[n], supervisor)
                    .await
                    .expect("loading the fleet");
            }
        });
    }
    tasks.join_all().await;
}

/// Keys looked up per second: `CONCURRENCY` tasks, each doing `per_call` devices per call.
async fn lookups(store: &Arc<RedisStore>, devices: &Arc<Vec<DeviceId>>, total: usize, per_call: usize) -> f64 {
    let calls = total / per_call / CONCURRENCY;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for task in 0..CONCURRENCY {
        let (store, devices) = (store.clone(), devices.clone());
        tasks.spawn(async move {
            let mut random = Random(0x9e37_79b9_7f4a_7c15 ^ task as u64);
            let mut batch = Vec::with_capacity(per_call);
            for _ in 0..calls {
                batch.clear();
                batch.extend((0..per_call).map(|_| devices[random.below(devices.len())]));
                let owners = if per_call == 1 {
                    vec![store.lookup(&batch[0]).await.expect("lookup")]
                } else {
                    store.lookup_many(&batch).await.expect("lookup_many")
                };
                assert!(owners.iter().all(Option::is_some), "every device is leased");
            }
        });
    }
    tasks.join_all().await;
    (calls * per_call * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

/// `redis-benchmark` GETs per second: of the fleet's routing keys, or its own `-t get`.
fn redis_benchmark(scale: &Scale, pipeline: usize, our_keys: bool) -> f64 {
    let mut command = Command::new("redis-benchmark");
    command.args(["-p", &PORT.to_string(), "-q", "--csv"]);
    command.args(["-c", &CONCURRENCY.to_string(), "-P", &pipeline.to_string()]);
    command.args(["-n", &scale.lookups.to_string(), "-r", &scale.fleet.to_string()]);
    if our_keys {
        command.args(["GET", "device:{__rand_int__}:supervisor"]);
    } else {
        command.args(["-t", "get"]);
    }
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("running redis-benchmark: {err} (apt-get install redis-tools)"));
    let text = String::from_utf8_lossy(&output.stdout);
    // `"test","rps",…` then one row per test: the rps is the second column.
    text.lines()
        .nth(1)
        .and_then(|row| row.split(',').nth(1))
        .and_then(|rps| rps.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("redis-benchmark printed {text:?}"))
}

/// Device `n`, named as redis-benchmark's `__rand_int__` (twelve digits) so it GETs the same keys.
fn device(n: usize) -> DeviceId {
    DeviceId::new(format!("{n:012}")).expect("valid device id")
}

fn median(runs: &mut [f64]) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// xorshift: no dependency, the same sequence every run.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A `redis-server` on [`PORT`], data in a temporary folder, stopped on drop.
struct OwnRedis {
    dir: PathBuf,
}

impl OwnRedis {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-redis-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let status = Command::new("redis-server")
            .args(["--port", &PORT.to_string(), "--bind", "127.0.0.1", "--daemonize", "yes"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--pidfile")
            .arg(dir.join("redis.pid"))
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .status()
            .unwrap_or_else(|err| {
                panic!("running redis-server: {err}; `scripts/services/redis start DIR` installs it")
            });
        assert!(status.success(), "redis-server on port {PORT} did not start");
        let redis = OwnRedis { dir };
        redis.wait_until(true);
        redis
    }

    fn used_memory(&self) -> u64 {
        let output = Command::new("redis-cli")
            .args(["-p", &PORT.to_string(), "info", "memory"])
            .output()
            .expect("redis-cli");
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|bytes| bytes.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO memory printed {text:?}"))
    }

    fn flush_all(&self) {
        let output = Command::new("redis-cli")
            .args(["-p", &PORT.to_string(), "flushall"])
            .output()
            .expect("redis-cli");
        assert!(output.stdout.starts_with(b"OK"), "FLUSHALL: {output:?}");
    }

    fn wait_until(&self, open: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", PORT)).is_ok() != open {
            assert!(Instant::now() < deadline, "port {PORT} did not open or close");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("redis.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        self.wait_until(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
