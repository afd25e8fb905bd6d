//! The runtimes, generic over the store, bus and transport traits.
//!
//! - [`supervisor`]: holds device sessions, executes commands, keeps leases;
//! - [`control_plane`]: issues and tracks commands, manages templates, runs rollouts;
//! - [`agent`]: the device side, connecting, answering commands and applying configuration;
//! - `fluent_bit` (feature `fluent-bit`): the agent's applier for Fluent Bit, with hot reload.

pub mod agent;
pub mod control_plane;
#[cfg(feature = "fluent-bit")]
#[cfg_attr(docsrs, doc(cfg(feature = "fluent-bit")))]
pub mod fluent_bit;
mod generation;
pub mod supervisor;

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::time::Timestamp;
use crate::tracking::CommandRecord;

/// Counts a command that ended, `now`, in the metrics every runtime that
/// records outcomes shares.
fn count_outcome(record: &CommandRecord, now: Timestamp) {
    let kind = record.kind().wire_name();
    metrics::counter!("opamp_commands_total", "kind" => kind, "outcome" => record.state.as_str()).increment(1);
    let latency = now.duration_since(record.command.issued_at);
    metrics::histogram!("opamp_command_latency_seconds", "kind" => kind).record(latency.as_secs_f64());
}

/// Locks `mutex`, poisoned or not: every lock of the runtimes guards state
/// that a panic in its holder leaves consistent (single inserts, removes and
/// replacements).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
