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
//! | [`auth`]    | always      | fleet tokens: per-device credentials checked without a lookup |
//! | `grpc`      | `grpc`      | the design's `ControlService` over gRPC (tonic), with TLS and mTLS (rustls) |
//! | `http_api`  | `http-api`  | the REST API over the control plane, health, Prometheus metrics, the dashboard (axum) |
//!
//! OpAMP over WebSocket and plain HTTP join this table behind features named
//! after them.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub mod grpc;
#[cfg(feature = "http-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-api")))]
pub mod http_api;

pub use opamp_core::transport::channel;
