//! Bearer tokens with roles, checked in constant time, and a token bucket per token.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use opamp_core::{Error, Result};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Reads only: `GET` and `HEAD`. A write answers 403 `forbidden`.
    ReadOnly,
    /// Reads and writes: toggles emission, pushes configs, creates templates, runs rollouts.
    Operator,
}

impl Role {
    /// `read_only` or `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read_only",
            Role::Operator => "operator",
        }
    }
}

/// One API token: a name (for logs and `created_by`), the secret a client
/// sends as `Authorization: Bearer <secret>`, and its role.
///
/// `Debug` shows the name and role, never the secret.
#[derive(Clone)]
pub struct ApiToken {
    name: String,
    secret: String,
    role: Role,
}

impl ApiToken {
    /// The shortest secret accepted, in bytes: guessing it must be hopeless.
    pub const MIN_SECRET_LEN: usize = 16;

    /// A token named `name` with `secret` and `role`.
    ///
    /// The secret must be at least [`MIN_SECRET_LEN`](Self::MIN_SECRET_LEN)
    /// visible ASCII characters (it travels in a header); the name must not
    /// be empty. Either is an [`Error::InvalidInput`] naming the token.
    pub fn new(name: impl Into<String>, secret: impl Into<String>, role: Role) -> Result<Self> {
        let name = name.into();
        let secret = secret.into();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(Error::invalid_input(
                "API token name must be 1-64 bytes without control characters",
            ));
        }
        if secret.len() < Self::MIN_SECRET_LEN {
            return Err(Error::invalid_input(format!(
                "API token {name:?}: the secret is {} bytes; at least {} are needed",
                secret.len(),
                Self::MIN_SECRET_LEN
            )));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid_input(format!(
                "API token {name:?}: the secret must be visible ASCII characters only"
            )));
        }
        Ok(ApiToken { name, secret, role })
    }

    /// The token's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token's role.
    pub fn role(&self) -> Role {
        self.role
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("role", &self.role)
            .finish()
    }
}

/// Requests per second and burst, per token: a token bucket holding up to
/// `burst` requests, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests that may arrive at once after a quiet spell.
    pub burst: u32,
}

impl RateLimit {
    /// `per_second` sustained with bursts of `burst`; both must be positive
    /// (and `per_second` finite), else an [`Error::InvalidInput`].
    pub fn new(per_second: f64, burst: u32) -> Result<Self> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(Error::invalid_input(format!(
                "rate limit of {per_second} requests/s must be a positive number"
            )));
        }
        if burst == 0 {
            return Err(Error::invalid_input("rate limit burst must be at least 1"));
        }
        Ok(RateLimit { per_second, burst })
    }
}

/// Who made a request, put in the request's extensions by [`authenticate`].
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub(crate) name: Arc<str>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// Takes one request's worth, or says how long until one is there.
    fn take(&mut self, limit: RateLimit, now: Instant) -> std::result::Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / limit.per_second))
        }
    }
}

#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    name: Arc<str>,
    role: Role,
    bucket: Mutex<Bucket>,
}

/// The configured tokens, kept only as SHA-256 digests.
#[derive(Debug)]
pub(crate) struct Tokens {
    entries: Vec<Entry>,
    rate_limit: Option<RateLimit>,
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    pub(crate) fn new(tokens: &[ApiToken], rate_limit: Option<RateLimit>) -> Result<Self> {
        if tokens.is_empty() {
            return Err(Error::invalid_input(
                "the REST API needs at least one API token (ApiConfig::token)",
            ));
        }
        let now = Instant::now();
        let mut entries: Vec<Entry> = Vec::with_capacity(tokens.len());
        for token in tokens {
            let digest: [u8; 32] = Sha256::digest(token.secret.as_bytes()).into();
            if let Some(other) = entries.iter().find(|e| same_digest(&e.digest, &digest)) {
                return Err(Error::invalid_input(format!(
                    "API tokens {:?} and {:?} have the same secret",
                    other.name, token.name
                )));
            }
            entries.push(Entry {
                digest,
                name: token.name.as_str().into(),
                role: token.role,
                bucket: Mutex::new(Bucket {
                    tokens: rate_limit.map_or(0.0, |l| f64::from(l.burst)),
                    refilled: now,
                }),
            });
        }
        Ok(Tokens { entries, rate_limit })
    }

    /// The entry whose secret is `presented`; every entry is compared, matching or not.
    fn find(&self, presented: &str) -> Option<&Entry> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if same_digest(&entry.digest, &digest) {
                found = Some(entry);
            }
        }
        found
    }

    /// Checks the bearer token, the rate limit and the role for a request.
    fn admit(
        &self,
        authorization: Option<&[u8]>,
        method: &Method,
        now: Instant,
    ) -> std::result::Result<Principal, ApiError> {
        let Some(header) = authorization else {
            return Err(ApiError::unauthorized(
                "this request needs an `Authorization: Bearer <token>` header",
            ));
        };
        let presented = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let entry = self
            .find(presented)
            .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid"))?;
        if let Some(limit) = self.rate_limit {
            // A poisoned lock only means another request panicked mid-update; the bucket is still usable.
            let mut bucket = entry.bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(wait) = bucket.take(limit, now) {
                return Err(ApiError::rate_limited(wait.as_secs_f64().ceil().max(1.0) as u64));
            }
        }
        let reads = method == Method::GET || method == Method::HEAD;
        if !reads && entry.role != Role::Operator {
            return Err(ApiError::forbidden(format!(
                "token {:?} is {}; {method} needs an operator token",
                entry.name,
                entry.role.as_str()
            )));
        }
        Ok(Principal {
            name: entry.name.clone(),
        })
    }
}

/// Middleware: admits a request with a valid token within its rate, and the right role.
pub(crate) async fn authenticate(State(tokens): State<Arc<Tokens>>, mut request: Request, next: Next) -> Response {
    let admitted = tokens.admit(
        request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()),
        request.method(),
        Instant::now(),
    );
    match admitted {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(err) => axum::response::IntoResponse::into_response(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(limit: Option<RateLimit>) -> Tokens {
        Tokens::new(
            &[
                ApiToken::new("viewer", "read-only-secret-0001", Role::ReadOnly).unwrap(),
                ApiToken::new("ops", "operator-secret-0001", Role::Operator).unwrap(),
            ],
            limit,
        )
        .unwrap()
    }

    #[test]
    fn tokens_are_checked_and_roles_enforced() {
        let t = tokens(None);
        let now = Instant::now();
        let code = |r: std::result::Result<Principal, ApiError>| r.map(|p| p.name.to_string()).map_err(|e| e.code());
        assert_eq!(code(t.admit(None, &Method::GET, now)), Err("unauthorized"));
        assert_eq!(
            code(t.admit(Some(b"Basic abc"), &Method::GET, now)),
            Err("unauthorized")
        );
        assert_eq!(
            code(t.admit(Some(b"Bearer wrong-secret-000000"), &Method::GET, now)),
            Err("unauthorized")
        );
        assert_eq!(
            code(t.admit(Some(b"Bearer read-only-secret-0001"), &Method::GET, now)),
            Ok("viewer".into())
        );
        assert_eq!(
            code(t.admit(Some(b"Bearer read-only-secret-0001"), &Method::POST, now)),
            Err("forbidden")
        );
        assert_eq!(
            code(t.admit(Some(b"Bearer operator-secret-0001"), &Method::PUT, now)),
            Ok("ops".into())
        );
        assert_eq!(
            code(t.admit(Some(b"Bearer \xff\xfe"), &Method::GET, now)),
            Err("unauthorized")
        );
    }

    #[test]
    fn buckets_are_per_token_and_refill() {
        let t = tokens(Some(RateLimit::new(2.0, 3).unwrap()));
        let start = Instant::now();
        let ops = Some(b"Bearer operator-secret-0001".as_slice());
        for _ in 0..3 {
            assert!(t.admit(ops, &Method::GET, start).is_ok());
        }
        let err = t.admit(ops, &Method::GET, start).unwrap_err();
        assert_eq!(err.code(), "rate_limited");
        // The other token has its own bucket.
        assert!(
            t.admit(Some(b"Bearer read-only-secret-0001"), &Method::GET, start)
                .is_ok()
        );
        // Half a second at 2/s refills one request.
        assert!(t.admit(ops, &Method::GET, start + Duration::from_millis(500)).is_ok());
        assert!(t.admit(ops, &Method::GET, start + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn bad_configuration_is_refused_and_secrets_hidden() {
        assert!(ApiToken::new("x", "short", Role::Operator).is_err());
        assert!(ApiToken::new("", "long-enough-secret-1", Role::Operator).is_err());
        assert!(ApiToken::new("x", "long enough secret 1", Role::Operator).is_err());
        assert!(RateLimit::new(0.0, 1).is_err());
        assert!(RateLimit::new(f64::NAN, 1).is_err());
        assert!(RateLimit::new(1.0, 0).is_err());
        assert!(Tokens::new(&[], None).is_err());
        let a = ApiToken::new("a", "same-secret-00000001", Role::Operator).unwrap();
        let b = ApiToken::new("b", "same-secret-00000001", Role::ReadOnly).unwrap();
        let err = Tokens::new(&[a.clone(), b], None).unwrap_err().to_string();
        assert!(err.contains("same secret"), "{err}");
        let debug = format!("{a:?}");
        assert!(!debug.contains("same-secret"), "{debug}");
    }
}
