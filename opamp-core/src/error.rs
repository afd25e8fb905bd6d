//! The one public error type, organised by what the caller can do about it.

use std::error::Error as StdError;

use crate::id::{DeviceId, SupervisorId};

/// A boxed error from a backend or a transport, kept as the `source()` of an [`Error`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The result type used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, by kind.
///
/// Backends keep their own private error types and map them into one of these
/// kinds, so callers never see a `redis`, `sqlx`, `rdkafka` or `tonic` type.
/// [`Error::is_retryable`] tells whether the same call may succeed later.
///
/// `Display` prints this error's own message only; the underlying cause, where
/// there is one, is returned by [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The thing asked for does not exist (a template, a device, a lease).
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for, e.g. `config template fluentbit/v1.2.3`.
        what: String,
    },

    /// The thing to create exists already, with other content.
    #[error("already exists: {what}")]
    AlreadyExists {
        /// What collided, e.g. `config template fluentbit/v1.2.3`.
        what: String,
    },

    /// A supervisor acted on a device it does not own (any more).
    ///
    /// This is the fencing error: a stale supervisor can never overwrite what
    /// the current owner wrote. (Boxed, to keep every `Result` small.)
    #[error("device {} is not owned by {} (current owner: {})", .0.device, .0.supervisor, owner_name(&.0.owner))]
    NotOwner(Box<OwnerMismatch>),

    /// The input was malformed; the message names what was wrong.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// What was wrong, naming the field, key or value.
        message: String,
    },

    /// A credential was missing or did not prove the identity it came with
    /// (a device token for another device, an untrusted certificate).
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// What was presented and why it was refused; never the secret itself.
        message: String,
    },

    /// A backend or peer cannot be reached right now; retrying may succeed.
    #[error("unavailable: {message}")]
    Unavailable {
        /// What was unavailable.
        message: String,
        /// The underlying cause, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// An operation did not finish within its deadline.
    #[error("timed out: {operation}")]
    Timeout {
        /// What timed out.
        operation: String,
    },

    /// The backend, transport or device does not support this operation.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },

    /// A store lost data it held and no one can give back (it came back
    /// empty, or from an older backup): templates, desired configs, command
    /// records, rollouts. Not retryable: an operator restores the store or
    /// accepts the loss.
    #[error("data loss: {message}")]
    DataLoss {
        /// What was lost, how it was told, and how to go on.
        message: String,
    },

    /// A backend failed in a way that does not fit the other kinds.
    #[error("{backend} backend error: {message}")]
    Backend {
        /// The backend's name, e.g. `redis`.
        backend: &'static str,
        /// What the library was doing when it failed, naming the key or row.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<BoxError>,
    },
}

/// Who tried to act on a device, and who owns it: the details of [`Error::NotOwner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerMismatch {
    /// The device acted on.
    pub device: DeviceId,
    /// The supervisor that tried to act.
    pub supervisor: SupervisorId,
    /// Who owns the device now, if anyone.
    pub owner: Option<SupervisorId>,
}

fn owner_name(owner: &Option<SupervisorId>) -> &str {
    owner.as_ref().map_or("none", SupervisorId::as_str)
}

impl Error {
    /// Whether the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    /// A [`Error::NotFound`] naming `what`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    /// An [`Error::AlreadyExists`] naming `what`.
    pub fn already_exists(what: impl Into<String>) -> Self {
        Error::AlreadyExists { what: what.into() }
    }

    /// An [`Error::NotOwner`]: `supervisor` acted on `device`, which `owner` holds.
    pub fn not_owner(device: DeviceId, supervisor: SupervisorId, owner: Option<SupervisorId>) -> Self {
        Error::NotOwner(Box::new(OwnerMismatch {
            device,
            supervisor,
            owner,
        }))
    }

    /// The [`Error::NotFound`] of a fenced status write on a device that has
    /// no status at all: nobody owns what is not there, so it is not
    /// [`Error::NotOwner`] (see [`StatusPatch`](crate::StatusPatch)).
    pub fn status_not_found(device: DeviceId) -> Self {
        Error::not_found(format!("status of device {device}"))
    }

    /// An [`Error::InvalidInput`] with a message that names what was wrong.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::InvalidInput {
            message: message.into(),
        }
    }

    /// An [`Error::Unauthenticated`] saying why the credential was refused.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Error::Unauthenticated {
            message: message.into(),
        }
    }

    /// An [`Error::Unavailable`] without an underlying cause.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Timeout`] naming the operation.
    pub fn timeout(operation: impl Into<String>) -> Self {
        Error::Timeout {
            operation: operation.into(),
        }
    }

    /// An [`Error::Unsupported`] naming what is not supported.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }

    /// An [`Error::DataLoss`] saying what was lost and how to go on.
    pub fn data_loss(message: impl Into<String>) -> Self {
        Error::DataLoss {
            message: message.into(),
        }
    }

    /// An [`Error::Backend`] wrapping a backend's own error.
    pub fn backend(backend: &'static str, message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

/// Shortens untrusted text before it is echoed in an error message.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 80;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_kinds() {
        assert!(Error::unavailable("redis").is_retryable());
        assert!(Error::timeout("claim").is_retryable());
        assert!(!Error::not_found("x").is_retryable());
        assert!(!Error::invalid_input("x").is_retryable());
        assert!(!Error::unauthenticated("token for another device").is_retryable());
        assert!(!Error::backend("redis", "GET k", std::io::Error::other("boom")).is_retryable());
    }

    #[test]
    fn results_stay_small() {
        assert!(std::mem::size_of::<Error>() <= 64, "{}", std::mem::size_of::<Error>());
    }

    #[test]
    fn source_is_returned_not_printed() {
        let err = Error::backend("redis", "GET device:a:supervisor", std::io::Error::other("boom"));
        assert_eq!(err.to_string(), "redis backend error: GET device:a:supervisor");
        assert_eq!(err.source().map(ToString::to_string).as_deref(), Some("boom"));
    }

    #[test]
    fn not_owner_names_everyone() {
        let err = Error::not_owner(
            DeviceId::new("d1").unwrap(),
            SupervisorId::new("s1").unwrap(),
            Some(SupervisorId::new("s2").unwrap()),
        );
        assert_eq!(err.to_string(), "device d1 is not owned by s1 (current owner: s2)");
    }

    #[test]
    fn excerpt_truncates_on_char_boundary() {
        let long = "é".repeat(100);
        let short = excerpt(&long);
        assert!(short.ends_with("(200 bytes)"));
        assert_eq!(excerpt("abc"), "\"abc\"");
    }
}
