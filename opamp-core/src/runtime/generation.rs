//! Telling that the store lost its data, so that it never vanishes silently.
//!
//! Routing and status come back by themselves when a store is emptied: the
//! supervisors claim their devices again from their sessions. Templates,
//! desired configs, command records and rollouts do not: nothing else holds
//! them. A store keeps a [`StoreGeneration`], made by the first control
//! plane to use it; its absence tells an empty store, and the bus tells
//! whether that store is new or lost what it had:
//!
//! - **At start**, a store with no generation on a bus that still holds
//!   commands sent before ([`CommandBus::holds_history`]) lost the records of
//!   those commands and whatever else it held. The control plane refuses to
//!   start ([`Error::DataLoss`]) unless told to accept the loss
//!   ([`ControlPlaneConfig::accept_store_loss`]): an operator restores the
//!   store, or starts once accepting it. On a new store and a new bus it
//!   begins the first generation.
//! - **While running**, the generation is read every
//!   [`retry_grace`](ControlPlaneConfig::retry_grace); one that is gone or
//!   another than the one read at start means the store was emptied or
//!   replaced under a running fleet. The loss is logged at `error`, with what
//!   was lost and since when, and counted (`opamp_store_losses_total`); the
//!   control plane then begins (or adopts) the next generation and carries
//!   on, since the fleet is being served and refusing would turn a loss of
//!   history into an outage.
//!
//! [`CommandBus::holds_history`]: crate::CommandBus::holds_history
//! [`ControlPlaneConfig::accept_store_loss`]: super::control_plane::ControlPlaneConfig::accept_store_loss
//! [`ControlPlaneConfig`]: super::control_plane::ControlPlaneConfig

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{error, info, warn};

use super::lock;
use crate::bus::Bus;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::tracking::StoreGeneration;

/// What a store that lost its data lost, for the log and the refusal.
const LOST: &str = "templates, desired configs, command records and rollouts";

/// The generation a control plane works in, and the losses it saw.
#[derive(Debug)]
pub(crate) struct Generation {
    current: Mutex<StoreGeneration>,
    losses: AtomicU64,
}

impl Generation {
    /// The store's generation, begun now if the store has none and the bus
    /// says it is new (or `accept_loss`); [`Error::DataLoss`] if the bus says
    /// the store lost its data and the loss is not accepted.
    pub(crate) async fn open(store: &dyn Store, bus: &dyn Bus, accept_loss: bool) -> Result<Generation> {
        let current = match store.generation().await? {
            Some(generation) => generation,
            None => {
                if bus.holds_history().await? {
                    if !accept_loss {
                        return Err(Error::data_loss(format!(
                            "the store has no generation, but the bus holds commands sent before: the store lost \
                             their records and whatever else it held ({LOST}). Restore it from a backup, or start \
                             once accepting the loss (--accept-store-loss, ControlPlaneConfig::accept_store_loss)"
                        )));
                    }
                    warn!(
                        lost = LOST,
                        "the store has no generation but the bus holds commands sent before; accepting the loss \
                         and beginning a new generation"
                    );
                }
                let generation = store.begin_generation(&StoreGeneration::new()).await?;
                info!(generation = %generation, "the store's generation begins");
                generation
            }
        };
        Ok(Generation {
            current: Mutex::new(current),
            losses: AtomicU64::new(0),
        })
    }

    /// Reads the store's generation and, if it is gone or another, reports
    /// the loss and moves to the store's next generation. Errors reading it
    /// are the caller's to log: they say nothing of a loss.
    pub(crate) async fn check(&self, store: &dyn Store) -> Result<()> {
        let known = lock(&self.current).clone();
        let found = store.generation().await?;
        if found.as_ref() == Some(&known) {
            return Ok(());
        }
        let next = match found {
            Some(other) => {
                error!(
                    was = %known,
                    now = %other,
                    lost = LOST,
                    "the store's generation changed under this control plane: it was replaced or restored from \
                     another backup, and what was written since that backup is lost"
                );
                other
            }
            None => {
                error!(
                    was = %known,
                    lost = LOST,
                    "the store lost its data: its generation is gone, and with it everything written since it \
                     began; devices are claimed again by their supervisors"
                );
                store.begin_generation(&StoreGeneration::new()).await?
            }
        };
        metrics::counter!("opamp_store_losses_total").increment(1);
        self.losses.fetch_add(1, Ordering::Relaxed);
        *lock(&self.current) = next;
        Ok(())
    }

    /// The generation this control plane works in.
    pub(crate) fn current(&self) -> StoreGeneration {
        lock(&self.current).clone()
    }

    /// The losses seen since start.
    pub(crate) fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }
}
