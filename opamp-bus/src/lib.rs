//! Buses for `opamp-core`: where commands to supervisors, configuration
//! broadcasts and device events travel.
//!
//! Each backend is one module implementing [`CommandBus`](opamp_core::CommandBus)
//! and [`EventBus`](opamp_core::EventBus), and passes the conformance suite in
//! `opamp_core::testkit::bus` unchanged.
//!
//! # Features
//!
//! | feature  | module     | backend |
//! |----------|------------|---------|
//! | (always) | [`memory`] | bounded queues in process memory, at-least-once with acknowledgements |
//! | `kafka`  | `kafka`    | a Kafka-protocol broker (librdkafka, bundled): durable topics, at-least-once with committed acknowledgements, back-pressure, dead letters, graceful shutdown |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use std::sync::Arc;
//! use opamp_bus::memory::MemoryBus;
//! use opamp_core::Bus;
//!
//! let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
//! # let _ = bus;
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod memory;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
