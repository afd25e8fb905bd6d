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
//! | `websocket` | `websocket` | OpAMP over WebSocket and plain HTTP on one port, for any OpAMP agent |
//! | `tls`       | `grpc`, `websocket` or `http-api` | TLS settings for listeners and connectors (rustls), shared by every listener |
//! | `testkit`   | `testkit`   | the checks behind the fuzz targets (`fuzz/`), for the corpus replay |

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub mod grpc;
#[cfg(feature = "http-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-api")))]
pub mod http_api;
#[cfg(any(feature = "grpc", feature = "websocket", feature = "http-api"))]
mod net;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
#[cfg(any(feature = "grpc", feature = "websocket", feature = "http-api"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "grpc", feature = "websocket", feature = "http-api"))))]
pub mod tls;
#[cfg(feature = "websocket")]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub mod websocket;

pub use opamp_core::transport::channel;
