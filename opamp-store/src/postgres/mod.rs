//! A PostgreSQL store: the design's Appendix C schema, for users whose
//! system of record is SQL.
//!
//! [`PostgresStore`] implements every store trait over a pool of connections
//! (sqlx, tokio, rustls), and keeps the command audit log
//! ([`record_command`](PostgresStore::record_command),
//! [`record_outcome`](PostgresStore::record_outcome), and queries by device
//! and by time range, paged).
//!
//! # Schema
//!
//! The migrations are embedded in the library and applied by
//! [`PostgresStore::migrate`] into the configured schema (every connection
//! sets `search_path` to it, so two stores with different schemas share a
//! database without seeing each other). The tables, column by column, are in
//! `docs/data-model.md`.
//!
//! # Leases in single statements
//!
//! Every lease operation is one statement, with `now` taken from the store's
//! [`Clock`] and passed as a parameter (never `now()` in SQL), so tests can
//! move time with a [`ManualClock`](opamp_core::ManualClock):
//!
//! - `claim` is one `INSERT … ON CONFLICT (device_id) DO UPDATE`. Its `SET`
//!   reads the row it locked (the newest version, even one committed after
//!   the statement began) and writes the owner it replaces into
//!   `claimed_from`, which `RETURNING` hands back. Concurrent claims of one
//!   device, new or not, queue on that row lock, and each learns whom it
//!   took the device from.
//! - `renew` is one `UPDATE … FROM UNNEST($devices)` fenced by owner and
//!   expiry; `lookup_many` one `SELECT … FROM UNNEST($devices) WITH ORDINALITY`.
//! - `release` is one `DELETE` fenced by owner and expiry.
//!
//! A lapsed row owns nothing: every statement compares `expires_at` with
//! `now`. [`PostgresStore::purge_expired`] deletes lapsed rows.
//!
//! # Lookups
//!
//! `lookup` is the hot path. Through sqlx's pool it would cost two round
//! trips (the pool tests every connection handed back to it with one of its
//! own), and one lookup per connection at a time leaves the server a wake-up
//! per lookup. So the store keeps a few connections of its own for lookups
//! ([`PostgresConfig::lookup_connections`], at most 8 by default) and
//! pipelines them: each is a `tokio-postgres` client, which writes lookups
//! as they come, without waiting for the answers before them, and hands the
//! answers back in order, so concurrent lookups share round trips and
//! system calls on both sides. Connections open as concurrent lookups need
//! them (a connection carries up to 8 before the next opens). They are
//! plaintext or a Unix socket (trust, password, MD5 or SCRAM-SHA-256 with
//! the server's proof checked): when the URL asks for TLS, or pipelining is
//! turned off, lookups use lanes of sqlx connections instead, one lookup at
//! a time each.
//! A lookup neither can answer goes through the pool, which reports any
//! error in full.
//!
//! # Connections that go silent
//!
//! A connection a firewall forgot, or one to a host that vanished, neither
//! answers nor closes. Every statement, on the pool, a lane or a pipelined
//! connection, therefore has [`PostgresConfig::response_timeout`] to be
//! answered; past it the call fails as [`Error::Unavailable`] and the
//! connection is closed instead of going back to the pool, so the pool
//! opens fresh ones and never runs dry. Notices of commands ending
//! (`LISTEN`) arrive on a connection of their own, which is asked a
//! `SELECT 1` after four deadlines without a notice and replaced if it
//! does not answer in time; notices sent meanwhile are missed, and waits
//! for an outcome read the record every second until they come again.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> opamp_core::Result<()> {
//! use opamp_core::{DeviceId, RoutingStore, SupervisorId, DEFAULT_LEASE_TTL};
//! use opamp_store::postgres::{PostgresConfig, PostgresStore};
//!
//! let config = PostgresConfig::new("postgres://opamp@db.example:5432/fleet").with_schema("opamp");
//! let store = PostgresStore::connect(&config).await?;
//! store.migrate().await?;
//!
//! let (d5, s1) = (DeviceId::new("device-5")?, SupervisorId::new("s1")?);
//! store.claim(&d5, &s1, DEFAULT_LEASE_TTL).await?;
//! assert_eq!(store.lookup(&d5).await?, Some(s1));
//! # Ok(())
//! # }
//! ```

mod audit;
mod config;
mod deadline;
mod error;
mod lanes;
mod pipeline;
mod revocation;
mod routing;
mod rows;
mod status;
mod tracking;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use opamp_core::time::duration_text;
use opamp_core::{Clock, Error, Result, SystemClock};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use audit::AuditEntry;
use deadline::Deadlined;
use error::PgError;
use lanes::LookupLanes;
use pipeline::{Pipes, Target};

/// The migrations, embedded at build time.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// How to reach the database, and which schema to use.
///
/// Reads from a configuration file with defaults for everything but `url`:
///
/// ```
/// use opamp_store::postgres::PostgresConfig;
///
/// let config: PostgresConfig = serde_json::from_str(r#"{
///     "url": "postgres://opamp:secret@db.example/fleet",
///     "schema": "fleet_eu",
///     "acquire_timeout": "5s"
/// }"#)?;
/// assert_eq!(config.max_connections, 16);
/// assert!(!format!("{config:?}").contains("secret"), "Debug hides the password");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// A libpq-style URL, `postgres://user:password@host:port/database?sslmode=require`.
    pub url: String,
    /// The schema holding the tables: 1–63 characters of `[a-z0-9_]`, not
    /// starting with a digit. Default `opamp`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The most connections the pool opens. Default 16.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long a call waits for a free connection before it fails as
    /// unavailable. Default `10s`.
    #[serde(default = "default_acquire_timeout", with = "duration_text")]
    pub acquire_timeout: Duration,
    /// How long a statement may wait for its answer before the call fails
    /// as unavailable and its connection is closed (see [connections that
    /// go silent](self#connections-that-go-silent)). Longer than any
    /// statement the store runs takes on a healthy server. Default `5s`.
    #[serde(default = "default_response_timeout", with = "duration_text")]
    pub response_timeout: Duration,
    /// How many connections at most are kept out of the pool for
    /// single-device lookups, on top of the pool's `max_connections` (at most
    /// half as many; 0 sends each lookup through the pool). They open as
    /// concurrent lookups need them, so a quiet store keeps one. A pipelined
    /// connection carries up to 8 lookups at once before the next one opens;
    /// a lane (when pipelining is off) one. Default 8.
    #[serde(default = "default_lookup_connections")]
    pub lookup_connections: u32,
    /// Whether lookup connections pipeline: write each lookup as it comes,
    /// without waiting for the answers before it (see the module
    /// documentation). Default `true`; it needs a plaintext connection (or a
    /// Unix socket), and lookups use lanes of sqlx connections instead when
    /// the URL asks for TLS. Turn it off behind a pooler that does not keep
    /// named prepared statements (PgBouncer in transaction mode before 1.21).
    #[serde(default = "default_pipelined_lookups")]
    pub pipelined_lookups: bool,
}

fn default_pipelined_lookups() -> bool {
    true
}

fn default_lookup_connections() -> u32 {
    8
}

fn default_schema() -> String {
    "opamp".to_owned()
}

fn default_max_connections() -> u32 {
    16
}

fn default_acquire_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_response_timeout() -> Duration {
    Duration::from_secs(5)
}

impl PostgresConfig {
    /// The defaults, for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: default_schema(),
            max_connections: default_max_connections(),
            acquire_timeout: default_acquire_timeout(),
            response_timeout: default_response_timeout(),
            lookup_connections: default_lookup_connections(),
            pipelined_lookups: default_pipelined_lookups(),
        }
    }

    /// Pipelines lookups on their connections, or not (see [`pipelined_lookups`](Self::pipelined_lookups)).
    pub fn with_pipelined_lookups(mut self, pipelined: bool) -> Self {
        self.pipelined_lookups = pipelined;
        self
    }

    /// Keeps `count` connections answering lookups (see [`lookup_connections`](Self::lookup_connections)).
    pub fn with_lookup_connections(mut self, count: u32) -> Self {
        self.lookup_connections = count;
        self
    }

    /// Uses `schema` for the tables.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Opens at most `max` connections.
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// Waits at most `timeout` for a free connection.
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Gives each statement at most `timeout` to answer.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Checks the schema name and the pool size; errors name the field.
    fn validate(&self) -> Result<()> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(Error::invalid_input(format!(
                "postgres url {} must start with postgres:// or postgresql://",
                redact_url(&self.url)
            )));
        }
        validate_schema(&self.schema)?;
        if self.max_connections == 0 {
            return Err(Error::invalid_input("postgres max_connections must be at least 1"));
        }
        if self.response_timeout.is_zero() {
            return Err(Error::invalid_input("postgres response_timeout must be more than 0s"));
        }
        Ok(())
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("lookup_connections", &self.lookup_connections)
            .field("pipelined_lookups", &self.pipelined_lookups)
            .finish()
    }
}

/// A schema name that needs no quoting anywhere: `search_path`, `CREATE SCHEMA`.
fn validate_schema(schema: &str) -> Result<()> {
    let valid = (1..=63).contains(&schema.len())
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "postgres schema {schema:?} must be 1–63 characters of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

/// The URL with its password (in the user part or a `password=` parameter) replaced by `***`.
fn redact_url(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                let start = scheme_end + 3 + colon + 1;
                redacted.replace_range(start..scheme_end + 3 + at, "***");
            }
        }
    }
    if let Some(query_start) = redacted.find('?') {
        let (base, query) = redacted.split_at(query_start + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        redacted = format!("{base}{}", query.join("&"));
    }
    redacted
}

/// A store in a PostgreSQL database.
///
/// Cheap to share: it holds a connection pool; wrap it in an [`Arc`] and hand
/// it out as `Arc<dyn Store>`. Run [`migrate`](Self::migrate) once before use
/// (it is idempotent).
pub struct PostgresStore {
    /// The pool, each statement on it given the response timeout.
    db: Deadlined,
    /// Pipelined lookup connections, unless the URL wants TLS.
    pipes: Option<Pipes>,
    /// Lookup connections through sqlx, for when pipelining cannot be used.
    lanes: LookupLanes,
    clock: Arc<dyn Clock>,
    schema: String,
}

impl PostgresStore {
    /// Connects, judging leases by the system clock.
    ///
    /// Fails with [`Error::InvalidInput`] for a bad URL or schema name and
    /// [`Error::Unavailable`] if the database cannot be reached.
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        Self::connect_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Connects, judging leases by `clock` (a [`ManualClock`](opamp_core::ManualClock) in tests).
    pub async fn connect_with_clock(config: &PostgresConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate()?;
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|err| Error::invalid_input(format!("postgres url {}: {err}", redact_url(&config.url))))?
            // A startup parameter: no extra round trip per connection.
            .options([("search_path", config.schema.as_str())]);
        let target = (config.pipelined_lookups)
            .then(|| Target::of(&options, config.acquire_timeout, config.response_timeout))
            .flatten();
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            // A ping before every query would double the round trips; a dead
            // connection fails its query as `Unavailable` instead, and the
            // pool replaces it.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|source| Error::Unavailable {
                message: format!("connecting to PostgreSQL at {}", redact_url(&config.url)),
                source: Some(Box::new(source)),
            })?;
        let lanes = config.lookup_connections.min(config.max_connections / 2) as usize;
        Ok(PostgresStore {
            pipes: target.filter(|_| lanes > 0).map(|target| Pipes::new(target, lanes)),
            lanes: LookupLanes::start(&pool, lanes, config.response_timeout),
            db: Deadlined::new(pool, config.response_timeout),
            clock,
            schema: config.schema.clone(),
        })
    }

    /// Creates the schema if it is missing and applies every migration not yet applied.
    ///
    /// Idempotent, and safe to run from several processes at once (sqlx
    /// serialises migrations with an advisory lock). sqlx's bookkeeping table
    /// `_sqlx_migrations` lands in the same schema.
    pub async fn migrate(&self) -> Result<()> {
        // The name was validated: it needs no quoting, and quoting keeps it so.
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("creating schema {}", self.schema)))?;
        MIGRATOR.run(self.db.pool()).await.map_err(|source| {
            Error::from(PgError::Migrate {
                schema: self.schema.clone(),
                source,
            })
        })
    }

    /// The schema holding this store's tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection pool, for queries of the host's own against the same tables.
    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .field("clock", &self.clock)
            .field("connections", &self.db.pool().size())
            .field(
                "pipelined_lookups",
                &match &self.pipes {
                    Some(pipes) => pipes.state(),
                    None if self.lanes.len() == 0 => "not used: no lookup connections".to_owned(),
                    None => "not used: turned off, or the URL asks for TLS".to_owned(),
                },
            )
            .field("lookup_lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for good in ["opamp", "t_1", "_x", &"a".repeat(63)] {
            assert!(validate_schema(good).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "Opamp", "a-b", "a b", "x\"y", &"a".repeat(64)] {
            let err = validate_schema(bad).unwrap_err().to_string();
            assert!(err.contains("postgres schema"), "{bad}: {err}");
        }
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5/db?sslmode=require"),
            "postgres://u:***@h:5/db?sslmode=require"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=pw&x=1"),
            "postgres://h/db?user=u&password=***&x=1"
        );
        assert_eq!(redact_url("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        let config = PostgresConfig::new("postgres://u:hunter2@h/db");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = PostgresConfig::new("mysql://u:pw@h/db")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres url mysql://u:***@h/db"), "{err}");
        let err = PostgresConfig::new("postgres://h/db")
            .with_max_connections(0)
            .validate();
        assert!(err.unwrap_err().to_string().contains("max_connections"));
        let err = PostgresConfig::new("postgres://h/db")
            .with_response_timeout(Duration::ZERO)
            .validate();
        assert!(err.unwrap_err().to_string().contains("response_timeout"));
        let err = serde_json::from_str::<PostgresConfig>(r#"{"url": "x", "acquire_timeout": "soon"}"#);
        assert!(err.unwrap_err().to_string().contains("duration"));
    }
}
