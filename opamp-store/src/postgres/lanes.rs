//! Lookup lanes: a few tasks, each holding one pooled connection, answering
//! the single-device lookups from one shared queue: whichever lane is free
//! takes everything waiting, and answers it in one statement.
//!
//! Why not the pool per lookup: sqlx tests every connection handed back to
//! its pool with a round trip of its own (a `Sync`), so a one-row lookup
//! through the pool costs two round trips and twice the server's wake-ups.
//! A lane keeps its connection, so a lookup is one round trip; and when
//! lookups arrive faster than the server answers, the ones queued meanwhile
//! go together in one `UNNEST` statement, each judged at its own `now`.
//!
//! A caller only waits for its answer, so cancelling a lookup never leaves a
//! connection mid-statement. If no lane can answer (the runtime the lanes
//! were spawned on has shut down, or the statement failed), the lookup runs
//! through the pool instead, which reports its own error.

use std::sync::Arc;

use opamp_core::{DeviceId, Result, SupervisorId, Timestamp};
use sqlx::PgConnection;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::routing::{LOOKUP, place_owners, stored_supervisor};
use super::rows::sql_time;

/// The most lookups one statement answers.
const MAX_BATCH: usize = 512;

/// How many lookups may wait for a lane before callers wait to queue.
const QUEUE: usize = 4_096;

/// The live owners among `$1`, each device judged at its own time in `$2`.
const LOOKUP_QUEUED: &str = "\
SELECT r.ord, l.supervisor_id
FROM UNNEST($1::text[], $2::timestamptz[]) WITH ORDINALITY AS r(device_id, now, ord)
JOIN device_lease AS l ON l.device_id = r.device_id AND l.expires_at > r.now";

/// A lane's answer: `None` when the lane could not run the statement.
type Answer = Option<Result<Option<SupervisorId>>>;

struct Job {
    device: DeviceId,
    now: Timestamp,
    reply: oneshot::Sender<Answer>,
}

/// The queue of the running lanes.
pub(super) struct LookupLanes {
    queue: Option<mpsc::Sender<Job>>,
    count: usize,
}

impl LookupLanes {
    /// Starts `count` lanes on the current tokio runtime, each taking a connection from `pool` when it first needs one.
    pub(super) fn start(pool: &PgPool, count: usize) -> Self {
        if count == 0 {
            return LookupLanes { queue: None, count };
        }
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..count {
            tokio::spawn(run_lane(pool.clone(), jobs.clone()));
        }
        LookupLanes {
            queue: Some(queue),
            count,
        }
    }

    /// How many lanes were started.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// The owner of `device` at `now`, from a lane; `None` if no lane answered.
    pub(super) async fn lookup(&self, device: DeviceId, now: Timestamp) -> Answer {
        let queue = self.queue.as_ref()?;
        let (reply, answer) = oneshot::channel();
        queue.send(Job { device, now, reply }).await.ok()?;
        answer.await.ok().flatten()
    }
}

async fn run_lane(pool: PgPool, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut connection: Option<PoolConnection<sqlx::Postgres>> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The free lane waits on the queue; the others are busy with a statement.
    while jobs.lock().await.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Callers that gave up need no answer.
        batch.retain(|job: &Job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if connection.is_none() {
            connection = pool.acquire().await.ok();
        }
        let answers = match connection.as_deref_mut() {
            Some(conn) => answer(conn, &batch).await,
            None => None,
        };
        match answers {
            Some(answers) => {
                for (job, answer) in batch.drain(..).zip(answers) {
                    let _ = job.reply.send(Some(answer));
                }
            }
            None => {
                // The connection may be broken: hand it back (the pool tests
                // it) and let every caller ask the pool itself.
                connection = None;
                for job in batch.drain(..) {
                    let _ = job.reply.send(None);
                }
            }
        }
    }
}

/// Answers `batch` in one statement, in its order; `None` if the statement failed.
async fn answer(conn: &mut PgConnection, batch: &[Job]) -> Option<Vec<Result<Option<SupervisorId>>>> {
    if let [job] = batch {
        let owner: Option<String> = sqlx::query_scalar(LOOKUP)
            .bind(job.device.as_str())
            .bind(sql_time(job.now).ok()?)
            .fetch_optional(conn)
            .await
            .ok()?;
        return Some(vec![
            owner
                .map(|owner| stored_supervisor(job.device.as_str(), "supervisor_id", &owner))
                .transpose(),
        ]);
    }
    let devices: Vec<&str> = batch.iter().map(|job| job.device.as_str()).collect();
    let nows: Vec<OffsetDateTime> = batch.iter().map(|job| sql_time(job.now)).collect::<Result<_>>().ok()?;
    let owners: Vec<(i64, String)> = sqlx::query_as(LOOKUP_QUEUED)
        .bind(&devices)
        .bind(&nows)
        .fetch_all(conn)
        .await
        .ok()?;
    Some(place_owners(&devices, owners))
}
