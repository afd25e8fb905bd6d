//! Statements with a deadline: the executor every pooled statement of the
//! store runs on.
//!
//! A connection can go silent without closing: a firewall or NAT that
//! forgets it, a host that vanished, a network partition. No byte and no
//! reset arrives, so a statement written to it waits for ever, and sqlx's
//! pool makes it worse: a connection handed back is first tested with a
//! round trip of its own, with no deadline either, and while that waits the
//! connection still counts against `max_connections`. A few silent
//! connections run the pool dry, and every call then fails at
//! `acquire_timeout` until the process restarts.
//!
//! [`Deadlined`] runs each statement on a connection of its own taking from
//! the pool, and gives the statement `timeout` to answer. A connection whose
//! statement did not finish (it ran out of time, or the caller dropped the
//! call) may have an answer still under way or never coming: it is detached
//! from the pool and closed without a word, so it never goes back and the
//! pool opens a fresh one in its place. Only a statement that finished hands
//! its connection back. The statement fails as unavailable, naming the wait.
//!
//! What remains: sqlx's test of a connection handed back has no deadline, so
//! a connection that goes silent in the instant between its statement's
//! answer and that test is held until the kernel gives up on it (unanswered
//! bytes are retried for about 15 minutes on Linux). That costs one
//! connection of the pool, not the pool.

use std::fmt;
use std::io;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Either, Execute, Executor, Postgres};

/// The pool, giving each statement at most `timeout` to answer.
#[derive(Clone)]
pub(super) struct Deadlined {
    pool: PgPool,
    timeout: Duration,
}

impl Deadlined {
    pub(super) fn new(pool: PgPool, timeout: Duration) -> Self {
        Deadlined { pool, timeout }
    }

    /// The pool underneath, for what takes its own connections (migrations, listeners).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How long a statement may take to be answered.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `statement` on a connection of the pool within the deadline.
    async fn run<T>(
        &self,
        statement: impl AsyncFnOnce(&mut PoolConnection<Postgres>) -> sqlx::Result<T>,
    ) -> sqlx::Result<T> {
        let mut checkout = Checkout(Some(self.pool.acquire().await?));
        let conn = checkout
            .0
            .as_mut()
            .expect("a checkout holds its connection until it ends");
        match tokio::time::timeout(self.timeout, statement(conn)).await {
            Ok(answer) => {
                checkout.hand_back();
                answer
            }
            // The checkout detaches the connection as it drops.
            Err(_) => Err(sqlx::Error::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer from PostgreSQL within {:?}; the connection was closed",
                    self.timeout
                ),
            ))),
        }
    }
}

impl fmt::Debug for Deadlined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadlined")
            .field("connections", &self.pool.size())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A connection taken from the pool for one statement. Unless the statement
/// finished ([`hand_back`](Self::hand_back)), dropping it detaches the
/// connection and closes its socket: no round trip, no runtime needed.
struct Checkout(Option<PoolConnection<Postgres>>);

impl Checkout {
    fn hand_back(mut self) {
        // Dropped as a pooled connection: back to the pool.
        drop(self.0.take());
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

impl<'d> Executor<'d> for &'_ Deadlined {
    type Database = Postgres;

    /// Every row is read within the deadline before the first is yielded:
    /// the store reads small results whole (`fetch_all`, `execute`).
    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, sqlx::Result<Either<PgQueryResult, PgRow>>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let this = self.clone();
        let everything = async move {
            this.run(async |conn| conn.fetch_many(query).try_collect::<Vec<_>>().await)
                .await
        };
        stream::once(everything)
            .map_ok(|items| stream::iter(items.into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, sqlx::Result<Option<PgRow>>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let this = self.clone();
        Box::pin(async move { this.run(async |conn| conn.fetch_optional(query).await).await })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, sqlx::Result<PgStatement<'q>>> {
        let this = self.clone();
        Box::pin(async move { this.run(async |conn| conn.prepare_with(sql, parameters).await).await })
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, sqlx::Result<Describe<Postgres>>> {
        let this = self.clone();
        Box::pin(async move { this.run(async |conn| conn.describe(sql).await).await })
    }
}
