//! The REST API, health probes, Prometheus metrics and the dashboard, as an
//! axum [`Router`] a host mounts in its own server.
//!
//! ```no_run
//! # async fn run(control: opamp_core::runtime::control_plane::ControlPlane) -> Result<(), Box<dyn std::error::Error>> {
//! use opamp_transport::http_api::{self, ApiConfig, ApiToken, RateLimit, Role, ServeConfig};
//!
//! // The host installs the Prometheus recorder itself; the API only renders it.
//! let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! let config = ApiConfig::new()
//!     .token(ApiToken::new("ops", "a-long-random-operator-secret", Role::Operator)?)
//!     .token(ApiToken::new("viewer", "a-long-random-read-only-secret", Role::ReadOnly)?)
//!     .rate_limit(RateLimit::new(20.0, 40)?)
//!     .metrics(metrics);
//! let app = http_api::router(control, config)?;
//! let listener = http_api::listen("127.0.0.1:8080".parse()?, http_api::DEFAULT_BACKLOG).await?;
//! // Idle and slow clients are cut off (see `ServeConfig`); serves until `stop` is sent on.
//! let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! http_api::serve(listener, app, ServeConfig::default(), async {
//!     let _ = stopping.await;
//! })
//! .await;
//! # Ok(()) }
//! ```
//!
//! | path | what |
//! |------|------|
//! | `/api/v1/...` | the API: devices, commands, templates, rollouts, supervisors (bearer token) |
//! | `/openapi.json` | an OpenAPI 3.1 document of every route |
//! | `/health/live`, `/health/ready` | liveness; readiness checks the store and the bus (503 with the reason) |
//! | `/metrics` | Prometheus text: the host's recorder plus `opamp_devices_online{supervisor}` |
//! | `/` | the dashboard: one self-contained page that calls the API |
//!
//! **Auth.** Every `/api/v1` request needs `Authorization: Bearer <secret>` of
//! a configured [`ApiToken`]: 401 `unauthorized` without a valid one, 403
//! `forbidden` for a [`Role::ReadOnly`] token on anything but `GET`/`HEAD`.
//! Each token has its own token bucket ([`RateLimit`]): past it, 429
//! `rate_limited` with `Retry-After`. Health, metrics, the OpenAPI document
//! and the dashboard page need no token, unless
//! [`ApiConfig::probes_need_token`] says so for health and metrics.
//!
//! **Errors** are `{"error":{"code":"…","message":"…"}}` with a stable `code`
//! (see `docs/rest-api.md`), for axum's own rejections too.

mod auth;
mod devices;
mod error;
#[cfg(feature = "testkit")]
pub(crate) mod fuzz;
mod openapi;
mod ops;
mod revocations;
mod rollouts;
mod serve;
mod templates;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{MethodFilter, on};
use metrics_exporter_prometheus::PrometheusHandle;
use opamp_core::Result;
use opamp_core::runtime::control_plane::ControlPlane;
use tokio::net::TcpListener;

pub use auth::{ApiToken, RateLimit, Role};
pub use serve::{ServeConfig, serve};

/// What the API serves with: tokens, rate limit, body size limit, metrics.
///
/// `Debug` lists token names and roles, never their secrets.
#[derive(Clone)]
#[non_exhaustive]
pub struct ApiConfig {
    /// The accepted tokens; at least one.
    pub tokens: Vec<ApiToken>,
    /// Each token's request rate; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// The largest request body accepted, in bytes (larger: 413 `payload_too_large`).
    pub body_limit: usize,
    /// The host's Prometheus recorder, rendered at `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Whether `/health/*` and `/metrics` need a token too (default: no, for probes and scrapers).
    pub probes_need_token: bool,
    /// The most device statuses one filtered listing reads before it
    /// returns a short page with a cursor (bounds the work of one request).
    pub scan_limit: usize,
}

impl ApiConfig {
    /// The default request body limit: 4 MiB, room for the control plane's
    /// largest template (3 MiB by default) sent as base64.
    pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

    /// No tokens yet (add one with [`token`](Self::token)), no rate limit, a 4 MiB body limit, no metrics.
    pub fn new() -> Self {
        ApiConfig {
            tokens: Vec::new(),
            rate_limit: None,
            body_limit: Self::DEFAULT_BODY_LIMIT,
            metrics: None,
            probes_need_token: false,
            scan_limit: 5_000,
        }
    }

    /// Accepts `token`.
    pub fn token(mut self, token: ApiToken) -> Self {
        self.tokens.push(token);
        self
    }

    /// Limits each token to `limit`.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Refuses request bodies over `bytes`.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Renders `handle` at `/metrics`.
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Reads at most `devices` statuses per filtered device listing (at least 1).
    pub fn scan_limit(mut self, devices: usize) -> Self {
        self.scan_limit = devices;
        self
    }

    /// Whether health and metrics need a token too.
    pub fn probes_need_token(mut self, yes: bool) -> Self {
        self.probes_need_token = yes;
        self
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("tokens", &self.tokens)
            .field("rate_limit", &self.rate_limit)
            .field("body_limit", &self.body_limit)
            .field("metrics", &self.metrics.is_some())
            .field("probes_need_token", &self.probes_need_token)
            .field("scan_limit", &self.scan_limit)
            .finish()
    }
}

/// What every handler shares.
#[derive(Clone)]
struct Api {
    control: ControlPlane,
    metrics: Option<PrometheusHandle>,
    scan_limit: usize,
    openapi: Arc<serde_json::Value>,
}

/// The HTTP methods the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Delete => "delete",
        }
    }
}

/// One route as the OpenAPI document describes it.
#[derive(Debug, Clone)]
struct RouteDoc {
    verb: Verb,
    path: &'static str,
    doc: openapi::Doc,
}

/// Routes added together with their documentation, so the OpenAPI document
/// is made from what the router serves.
struct Routes {
    router: Router<Api>,
    docs: Vec<RouteDoc>,
}

impl Routes {
    fn new() -> Self {
        Routes {
            router: Router::new(),
            docs: Vec::new(),
        }
    }

    fn add<H, T>(mut self, verb: Verb, path: &'static str, doc: openapi::Doc, handler: H) -> Self
    where
        H: Handler<T, Api>,
        T: 'static,
    {
        self.router = self.router.route(path, on(verb.filter(), handler));
        self.docs.push(RouteDoc { verb, path, doc });
        self
    }

    fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.docs.extend(other.docs);
        self
    }
}

/// Every route, the API's behind the token check.
fn assemble(tokens: Arc<auth::Tokens>, probes_need_token: bool) -> Routes {
    let auth = axum::middleware::from_fn_with_state(tokens, auth::authenticate);

    let mut api = devices::routes()
        .merge(templates::routes())
        .merge(rollouts::routes())
        .merge(revocations::routes())
        .merge(ops::api_routes());
    api.router = api.router.route_layer(auth.clone());

    let mut probes = ops::probe_routes();
    if probes_need_token {
        probes.router = probes.router.route_layer(auth);
        for route in &mut probes.docs {
            route.doc = route.doc.with_token();
        }
    }
    api.merge(probes).merge(ops::page_routes())
}

/// The listen backlog the example binaries ask [`listen`] for (the kernel
/// caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4096;

/// A listener for the API on `addr` that queues up to `backlog` connections
/// not yet accepted (capped by the kernel's `somaxconn`).
///
/// `tokio::net::TcpListener::bind` asks for 128, as the standard library
/// does. A burst of new clients while the server is busy overflows that, and
/// a client whose connection overflowed it sees the connection open but
/// gets no answer until TCP gives up. Serve the router on this one instead.
pub async fn listen(addr: SocketAddr, backlog: u32) -> Result<TcpListener> {
    crate::net::listen(addr, backlog)
}

/// Builds the router: the API under `/api/v1`, the probes, `/metrics`,
/// `/openapi.json` and the dashboard at `/`.
///
/// A configuration without tokens, or with two tokens of the same secret, is
/// an [`Error::InvalidInput`](opamp_core::Error::InvalidInput).
pub fn router(control: ControlPlane, config: ApiConfig) -> Result<Router> {
    let tokens = Arc::new(auth::Tokens::new(&config.tokens, config.rate_limit)?);
    let all = assemble(tokens, config.probes_need_token);
    let state = Api {
        control,
        metrics: config.metrics,
        scan_limit: config.scan_limit.max(1),
        openapi: Arc::new(openapi::document(&all.docs)),
    };
    Ok(all
        .router
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state))
}
