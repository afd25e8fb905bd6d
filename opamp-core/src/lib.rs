//! The core of an embeddable library for managing the configuration of
//! fleets of a million and more devices and agents over OpAMP.
//!
//! One question sits on every hot path: **which supervisor holds device X?**
//! Stateless control-plane servers answer it from a [`RoutingStore`], publish
//! the command on a [`CommandBus`] keyed by that supervisor, and the
//! supervisor, which holds long-lived sessions to its devices through a
//! [`DeviceTransport`], pushes it to the device, waits for its
//! acknowledgement and records the outcome.
//!
//! This crate holds what every part shares:
//!
//! | module        | what it holds |
//! |---------------|---------------|
//! | [`id`]        | validated names: [`DeviceId`], [`SupervisorId`], [`AgentType`], [`ConfigVersion`], [`GroupName`] |
//! | [`config`]    | [`ConfigBundle`] (OpAMP's `AgentConfigMap`), its [`ConfigHash`], [`ConfigTemplate`] |
//! | [`command`]   | [`Command`], [`CommandKind`], [`CommandOutcome`] and their JSON on the bus |
//! | [`event`]     | [`DeviceEvent`]s published by supervisors |
//! | [`status`]    | [`DeviceStatus`] and partial updates ([`StatusPatch`]) |
//! | [`store`]     | the store traits: [`RoutingStore`], [`StatusStore`], [`ConfigStore`], [`TrackingStore`] |
//! | [`bus`]       | the bus traits: [`CommandBus`], [`EventBus`] |
//! | [`transport`] | the device transport traits: [`DeviceTransport`], [`AgentConnector`], and an in-process transport |
//! | [`error`]     | the one [`Error`] type, by kind |
//! | [`time`]      | [`Timestamp`] and the [`Clock`] leases are judged by |
//! | [`tracking`]  | what control planes track: [`CommandRecord`]s and [`Rollout`]s |
//! | [`runtime`]   | the supervisor and agent runtimes, generic over the traits |
//!
//! Backends live in their own crates, one module each behind a feature named
//! after it: `opamp-store` (memory; Redis, PostgreSQL), `opamp-bus` (memory;
//! Kafka), `opamp-transport` (gRPC, OpAMP, the REST API).
//!
//! # Features
//!
//! | feature   | what it adds |
//! |-----------|--------------|
//! | `testkit` | [`testkit`]: the conformance suites every backend's tests run |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bus;
pub mod command;
pub mod config;
pub mod error;
pub mod event;
pub mod id;
pub mod revocation;
pub mod runtime;
pub mod status;
pub mod store;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod time;
pub mod tracking;
pub mod transport;

pub use bus::{
    AckSink, Acker, Bus, CommandBus, ConfigUpdate, DEFAULT_MAX_DELIVERIES, Delivery, EventBus, MessageStream,
    Subscription,
};
pub use command::{Command, CommandKind, CommandOutcome, CorrelationId, DEFAULT_COMMAND_TIMEOUT};
pub use config::{ConfigBundle, ConfigFile, ConfigHash, ConfigRef, ConfigTemplate};
pub use error::{BoxError, Error, OwnerMismatch, Result};
pub use event::{ConfigApplyState, DeviceEvent, EventKind};
pub use id::{AgentType, ConfigVersion, DeviceId, GroupName, SupervisorId};
pub use revocation::Revocation;
pub use status::{DeviceStatus, Labels, Presence, PresenceUpdate, StatusPatch};
pub use store::{
    Claim, ConfigStore, ConfigStoreExt, Cursor, DEFAULT_LEASE_TTL, Page, PageRequest, RevocationStore, RoutingStore,
    RoutingStoreExt, StatusStore, StatusStoreExt, Store, SupervisorLoad, TrackingStore,
};
pub use time::{Clock, CoarseClock, ManualClock, SystemClock, Timestamp};
pub use tracking::{
    CommandRecord, CommandState, Endings, EndingsSender, Issued, MAX_ATTEMPTS, Rollout, RolloutId, RolloutSpec,
    RolloutState, StoreGeneration, Target,
};
pub use transport::{AgentConnector, DeviceTransport};
