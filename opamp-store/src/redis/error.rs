//! The Redis backend's own errors, mapped into [`opamp_core::Error`] by kind.

use std::fmt;

use opamp_core::Error;
use redis::{ErrorKind, RedisError as ClientError};

const BACKEND: &str = "redis";

/// What went wrong talking to Redis or reading what it holds.
#[derive(Debug)]
pub(super) enum RedisError {
    /// A command failed; `what` names the operation and the key.
    Command { what: String, source: ClientError },
    /// A key holds something this store did not write, or could not have.
    Garbled {
        key: String,
        field: Option<String>,
        problem: String,
    },
    /// Redis answered with a reply of a shape the command never gives.
    Reply { what: String, reply: String },
    /// The store was configured wrongly (the message says how).
    Config(String),
    /// Redis could not do what was asked for now (the message says why).
    Unavailable(String),
}

impl RedisError {
    pub(super) fn command(what: impl Into<String>, source: ClientError) -> Self {
        RedisError::Command {
            what: what.into(),
            source,
        }
    }

    pub(super) fn garbled(key: &str, field: Option<&str>, problem: String) -> Self {
        RedisError::Garbled {
            key: key.to_owned(),
            field: field.map(str::to_owned),
            problem,
        }
    }

    pub(super) fn reply(what: impl Into<String>, reply: &redis::Value) -> Self {
        let mut reply = format!("{reply:?}");
        reply.truncate(200);
        RedisError::Reply {
            what: what.into(),
            reply,
        }
    }

    /// Whether trying again on a fresh connection is the remedy (see [`is_connection`]).
    pub(super) fn is_connection(&self) -> bool {
        matches!(self, RedisError::Command { source, .. } if is_connection(source))
    }

    /// Whether Redis no longer knew a script (it restarted, or `SCRIPT FLUSH`).
    pub(super) fn is_no_script(&self) -> bool {
        matches!(self, RedisError::Command { source, .. } if source.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript))
    }

    /// Whether a cluster node sent the command elsewhere (`MOVED`, `ASK`) or
    /// could not serve the slot yet: the slot map is out of date.
    pub(super) fn is_redirect(&self) -> bool {
        matches!(self, RedisError::Command { source, .. } if matches!(
            source.kind(),
            ErrorKind::Server(
                redis::ServerErrorKind::Moved
                    | redis::ServerErrorKind::Ask
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
            )
        ))
    }
}

/// Whether reconnecting (to wherever the primary is now) is the remedy: the
/// command never reached Redis or its answer was lost, the node answered as
/// a replica (`READONLY`: a failover demoted it), a primary set to write only
/// with replicas had none (`NOREPLICAS`: its replica was just promoted, or
/// is away), or the Sentinels named no primary that answers as one (they
/// have not promoted a replica yet).
fn is_connection(err: &ClientError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.code() == Some("NOREPLICAS")
        || matches!(
            err.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly) | ErrorKind::MasterNameNotFoundBySentinel
        )
}

/// Whether a connection to a primary found through Sentinel should be
/// dropped and the Sentinels asked again: as [`is_connection`], or no answer
/// in time (a primary cut off from the network is replaced too).
pub(super) fn is_failover(err: &ClientError) -> bool {
    is_connection(err) || err.is_timeout()
}

impl fmt::Display for RedisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisError::Command { what, .. } => f.write_str(what),
            RedisError::Garbled {
                key,
                field: Some(field),
                problem,
            } => write!(f, "key {key}, field {field}: {problem}"),
            RedisError::Garbled {
                key,
                field: None,
                problem,
            } => write!(f, "key {key}: {problem}"),
            RedisError::Reply { what, reply } => write!(f, "{what}: unexpected reply {reply}"),
            RedisError::Config(message) | RedisError::Unavailable(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for RedisError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisError::Command { source, .. } => Some(source),
            RedisError::Garbled { .. }
            | RedisError::Reply { .. }
            | RedisError::Config(_)
            | RedisError::Unavailable(_) => None,
        }
    }
}

impl From<RedisError> for Error {
    fn from(err: RedisError) -> Self {
        match err {
            RedisError::Command { what, source } if source.is_timeout() => Error::timeout(format!("redis: {what}")),
            RedisError::Command { what, source } if is_connection(&source) => Error::Unavailable {
                message: format!("redis: {what}"),
                source: Some(Box::new(source)),
            },
            RedisError::Command { what, source } => Error::backend(BACKEND, what, source),
            RedisError::Config(message) => Error::invalid_input(format!("redis store: {message}")),
            RedisError::Unavailable(message) => Error::unavailable(format!("redis: {message}")),
            other => Error::Backend {
                backend: BACKEND,
                message: other.to_string(),
                source: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_what_a_caller_can_do() {
        let io = ClientError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        let err = Error::from(RedisError::command("GET device:{d1}:supervisor", io));
        assert!(err.is_retryable(), "{err:?}");
        assert!(err.to_string().contains("device:{d1}:supervisor"), "{err}");

        let reply = redis::parse_redis_value(b"-READONLY You can't write against a read only replica.\r\n");
        let Ok(redis::Value::ServerError(read_only)) = reply else {
            panic!("an error reply: {reply:?}")
        };
        let err = RedisError::command("SET device:{d1}:supervisor", read_only.into());
        assert!(err.is_connection(), "a demoted primary is reconnected to: {err:?}");
        assert!(Error::from(err).is_retryable());
        let reply = redis::parse_redis_value(b"-NOREPLICAS Not enough good replicas to write.\r\n");
        let Ok(redis::Value::ServerError(no_replicas)) = reply else {
            panic!("an error reply: {reply:?}")
        };
        let err = RedisError::command("SET device:{d1}:supervisor", no_replicas.into());
        assert!(
            err.is_connection(),
            "a primary without its replica is asked for again: {err:?}"
        );

        let garbled = Error::from(RedisError::garbled(
            "device:{d1}",
            Some("emission"),
            "\"maybe\" is not a bool".into(),
        ));
        assert!(
            matches!(garbled, Error::Backend { backend: "redis", .. }),
            "{garbled:?}"
        );
        assert_eq!(
            garbled.to_string(),
            "redis backend error: key device:{d1}, field emission: \"maybe\" is not a bool"
        );
    }
}
