//! Lookup lanes: a few connections kept out of the pool (detached from it, so
//! they come on top of its `max_connections`) for single-device lookups, each
//! used by one lookup at a time, in the caller's own task. The store uses
//! them when lookups cannot be pipelined (`pipeline`): the URL asks for TLS,
//! or pipelining is turned off.
//!
//! Why not the pool per lookup: sqlx tests every connection handed back to
//! its pool with a round trip of its own (a `Sync`), so a one-row lookup
//! through the pool costs two round trips and twice the server's wake-ups.
//! A lane keeps its connection, so a lookup is one round trip, with no
//! hand-off to another task on the way.
//!
//! A lookup takes the first free lane in order, or waits for one, so lanes
//! open their connections only as concurrent lookups need them: a store with
//! one lookup at a time keeps one lane connection. A lookup cancelled
//! mid-statement leaves its lane's connection with an answer still to read;
//! sqlx reads it off before the connection's next statement. If a lane's
//! statement fails, or goes unanswered for the store's response timeout (a
//! connection gone silent), its connection is closed (the lane takes a
//! fresh one next time) and the lookup runs through the pool instead, which
//! reports its own error. The store can be dropped anywhere, in a runtime or not.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opamp_core::{DeviceId, Result, SupervisorId, Timestamp};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use tokio::sync::{Mutex, MutexGuard};

use super::routing::{LOOKUP, stored_supervisor};
use super::rows::sql_time;

/// A lane's answer: `None` when the lane could not run the statement.
type Answer = Option<Result<Option<SupervisorId>>>;

/// A lane's connection, detached from the pool: it is never handed back, and
/// dropping a pooled connection would need a runtime to hand it back on.
type Lane = Mutex<Option<PgConnection>>;

/// The lookup lanes of one store.
pub(super) struct LookupLanes {
    pool: PgPool,
    /// How long a lookup may wait for its answer.
    deadline: Duration,
    lanes: Vec<Lane>,
    next: AtomicUsize,
}

impl LookupLanes {
    /// `count` lanes, each taking a connection from `pool` when it first needs one.
    pub(super) fn start(pool: &PgPool, count: usize, deadline: Duration) -> Self {
        LookupLanes {
            pool: pool.clone(),
            deadline,
            lanes: (0..count).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// How many lanes there are.
    pub(super) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// The owner of `device` at `now`, from a lane; `None` if no lane answered.
    pub(super) async fn lookup(&self, device: DeviceId, now: Timestamp) -> Answer {
        let mut lane = self.free_lane().await?;
        if lane.is_none() {
            *lane = self.pool.acquire().await.ok().map(|pooled| pooled.detach());
        }
        let conn = lane.as_mut()?;
        let statement = sqlx::query_scalar(LOOKUP)
            .bind(device.as_str())
            .bind(sql_time(now).ok()?)
            .fetch_optional(conn);
        let owner: Option<Option<String>> = tokio::time::timeout(self.deadline, statement)
            .await
            .ok()
            .and_then(|answer| answer.ok());
        match owner {
            Some(owner) => Some(
                owner
                    .map(|owner| stored_supervisor(device.as_str(), "supervisor_id", &owner))
                    .transpose(),
            ),
            None => {
                // The connection may be broken: close it; the lane opens another next time.
                *lane = None;
                None
            }
        }
    }

    /// The first lane nobody is using, or, if all are busy, the next one in turn once it is free.
    async fn free_lane(&self) -> Option<MutexGuard<'_, Option<PgConnection>>> {
        if let Some(lane) = self.lanes.iter().find_map(|lane| lane.try_lock().ok()) {
            return Some(lane);
        }
        let count = self.lanes.len();
        if count == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.lanes[turn % count].lock().await)
    }
}
