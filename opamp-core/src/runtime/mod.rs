//! The runtimes, generic over the store, bus and transport traits.
//!
//! - [`supervisor`]: holds device sessions, executes commands, keeps leases;
//! - [`agent`]: the device side, connecting, answering commands and applying configuration.

pub mod agent;
pub mod supervisor;
