//! One shared connection to one Redis node (a standalone server, or the
//! primary Sentinel names), made when first needed and made again after it
//! failed or went silent.
//!
//! The redis crate's `ConnectionManager` reconnects only when a connection
//! reports an I/O error. A connection whose far side vanished without a FIN
//! or a reset (a NAT that forgot it, a host that died, a partition) reports
//! nothing: every request on it times out, for as long as the process runs
//! (measured by the fault suite's "connections to Redis left half-open",
//! which wedged the store for good). Here a request that times out lets the
//! connection go too, and the next request connects again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError as ClientError, Script, ServerErrorKind, Value};

use super::error::is_failover;

/// The connection in use, numbered so that a failure seen on an old one does
/// not drop its replacement.
#[derive(Default)]
pub(super) struct NodeLink {
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting, so that the calls that all found the connection
    /// gone make one between them, not one each.
    connecting: tokio::sync::Mutex<()>,
    connections: AtomicU64,
}

impl NodeLink {
    /// Sends one command; `connect` makes a connection if there is none.
    pub(super) async fn command<F, Fut>(&self, connect: F, cmd: &Cmd) -> Result<Value, ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MultiplexedConnection, ClientError>>,
    {
        let (number, mut conn) = self.connection(connect).await?;
        let result = conn.req_packed_command(cmd).await;
        if result.as_ref().map_or_else(is_failover, replied_read_only) {
            self.forget(number);
        }
        result
    }

    /// Sends a pipeline; `connect` makes a connection if there is none.
    pub(super) async fn pipeline<F, Fut>(&self, connect: F, pipe: &Pipeline) -> Result<Vec<Value>, ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MultiplexedConnection, ClientError>>,
    {
        let (number, mut conn) = self.connection(connect).await?;
        let result = conn.req_packed_commands(pipe, 0, pipe.len()).await;
        let failed = match &result {
            Ok(values) => values.iter().any(replied_read_only),
            Err(err) => is_failover(err),
        };
        if failed {
            self.forget(number);
        }
        result
    }

    /// Loads `script` into the node's script cache; its SHA1.
    pub(super) async fn load<F, Fut>(&self, connect: F, script: &Script) -> Result<String, ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MultiplexedConnection, ClientError>>,
    {
        let (number, mut conn) = self.connection(connect).await?;
        let result = script.prepare_invoke().load_async(&mut conn).await;
        if result.as_ref().err().is_some_and(is_failover) {
            self.forget(number);
        }
        result
    }

    /// Lets the connection in use go, whichever it is: the next request connects again.
    pub(super) fn forget_current(&self) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The connection in use, or a new one from `connect`.
    async fn connection<F, Fut>(&self, connect: F) -> Result<(u64, MultiplexedConnection), ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MultiplexedConnection, ClientError>>,
    {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let _connecting = self.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let conn = connect().await?;
        let number = self.connections.fetch_add(1, Ordering::Relaxed);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some((number, conn.clone()));
        Ok((number, conn))
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Drops connection `number`, unless another already replaced it.
    fn forget(&self, number: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|(current, _)| *current == number) {
            tracing::info!("the connection to Redis failed or went silent; connecting again");
            *current = None;
        }
    }
}

/// Whether a node answered as a replica (the primary it was has been
/// demoted), or as a primary without the replicas it needs to take writes.
fn replied_read_only(value: &Value) -> bool {
    matches!(value, Value::ServerError(err)
        if err.kind() == Some(ServerErrorKind::ReadOnly) || err.code() == "NOREPLICAS")
}
