//! Device transports for [`opamp_core`]'s runtimes, and the REST API.
//!
//! A transport implements [`DeviceTransport`](opamp_core::DeviceTransport) on
//! the supervisor side and [`AgentConnector`](opamp_core::AgentConnector) on
//! the device side, carrying the transport-neutral messages of
//! [`opamp_core::transport`]. A supervisor serves several at once.
//!
//! | module      | feature     | what it is |
//! |-------------|-------------|------------|
//! | [`channel`] | always      | in-process bounded channels: tests, demos, embedding agents in the supervisor's process |
//!
//! gRPC (the design's `ControlService`), OpAMP over WebSocket and plain HTTP,
//! and the REST API join this table behind features named after them.

pub use opamp_core::transport::channel;
