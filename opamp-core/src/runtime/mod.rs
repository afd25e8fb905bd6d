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
pub mod supervisor;
