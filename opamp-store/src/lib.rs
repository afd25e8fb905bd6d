//! Routing, status and configuration stores for [`opamp_core`].
//!
//! Each backend is one module implementing [`RoutingStore`], [`StatusStore`]
//! and [`ConfigStore`], so it can be handed out as `Arc<dyn Store>`. Every
//! backend passes the same conformance suite,
//! `opamp_core::testkit::store` (the `testkit` feature of `opamp-core`).
//!
//! # Backends and features
//!
//! | module     | feature    | what it is |
//! |------------|------------|------------|
//! | [`memory`] | always on  | sharded maps in this process; for tests, a single server, and as the reference |
//! | `redis`    | `redis`    | the design's Redis data model (§4.3): leases, status, indexes and templates, on one Redis, a Redis Cluster, or a primary with replicas under Sentinel |
//! | `postgres` | `postgres` | the design's Appendix C schema in PostgreSQL (sqlx, tokio, rustls): leases, status, templates, desired configuration, and the command audit log |
//! | `testkit`  | `testkit`  | the checks behind the fuzz targets (`fuzz/`), for the corpus replay |
//!
//! [`RoutingStore`]: opamp_core::RoutingStore
//! [`StatusStore`]: opamp_core::StatusStore
//! [`ConfigStore`]: opamp_core::ConfigStore

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{PostgresConfig, PostgresStore};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisSentinelConfig, RedisStore, RedisStoreConfig};
pub use memory::MemoryStore;
