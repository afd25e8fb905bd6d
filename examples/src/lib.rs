//! What the example binaries share: backends opened from URLs, logging,
//! shutdown signals and command-line parsing helpers.
//!
//! | module       | what it holds |
//! |--------------|---------------|
//! | [`backend`]  | [`StoreUrl`] and [`BusUrl`], parsed from `memory://`, `redis://`, `redis+cluster://`, `redis+sentinel://`, `postgres://` and `kafka://` URLs, and opened into trait objects |
//! | [`logging`]  | `--log` / `RUST_LOG` and `--log-format text\|json` for `tracing` |
//! | [`cli`]      | flag parsers (durations, labels), PEM files, the fleet key from `OPAMP_FLEET_KEY`, Ctrl-C / SIGTERM |
//! | [`rest`]     | a client of `opamp-server`'s REST API |
//! | [`deployment`] | a local deployment of many processes on Redis and Kafka: servers, supervisors, device simulators |
//!
//! # Features
//!
//! All on by default; without one, its URL scheme is refused with
//! [`Error::Unsupported`](opamp_core::Error::Unsupported) naming the feature.
//!
//! | feature    | URLs it opens |
//! |------------|---------------|
//! | `redis`    | `redis://…`, `redis+cluster://…`, `redis+sentinel://…` (the Redis store) |
//! | `postgres` | `postgres://…`, `postgresql://…` (the PostgreSQL store) |
//! | `kafka`    | `kafka://…` (the Kafka bus; builds the bundled librdkafka) |

pub mod backend;
pub mod cli;
pub mod deployment;
pub mod logging;
pub mod rest;

pub use backend::{BusUrl, KafkaUrl, OpenBus, RedisSentinelUrl, StoreUrl, open_bus, open_store};
