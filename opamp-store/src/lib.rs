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
//! | `redis`    | `redis`    | planned: leases, status and indexes in Redis |
//! | `postgres` | `postgres` | planned: templates, desired configuration and status in PostgreSQL |
//!
//! [`RoutingStore`]: opamp_core::RoutingStore
//! [`StatusStore`]: opamp_core::StatusStore
//! [`ConfigStore`]: opamp_core::ConfigStore

pub mod memory;

pub use memory::MemoryStore;
