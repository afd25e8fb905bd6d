//! A small client of `opamp-server`'s REST API, for the load generator and
//! the system tests: keep-alive HTTP/1.1, a bearer token, JSON bodies.

use std::sync::Arc;

use http_body_util::BodyExt as _;
use serde_json::{Value, json};

/// A client of one server's REST API. Cheap to clone: clones share their connections.
#[derive(Clone)]
pub struct RestClient {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: Arc<str>,
    bearer: Arc<str>,
}

impl std::fmt::Debug for RestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bearer token is a credential: left out.
        f.debug_struct("RestClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// What a call answered: the status and the body, or why there was no answer.
pub type Answer = Result<(u16, Vec<u8>), String>;

impl RestClient {
    /// A client of the server at `address` (`host:port`), with the API token `secret`.
    pub fn new(address: &str, secret: &str) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            // One write per request: with headers and body written apart, a
            // kept-alive connection met delayed ACKs (40 ms stalls).
            .http1_writev(false)
            .build(connector);
        RestClient {
            client,
            base: format!("http://{address}").into(),
            bearer: format!("Bearer {secret}").into(),
        }
    }

    /// The server's base URL, `http://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request: the status and the body.
    pub async fn call(&self, method: hyper::Method, path: &str, body: Option<String>) -> Answer {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", &*self.bearer)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.unwrap_or_default())))
            .map_err(|err| err.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| format!("{path}: {err}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("{path}: {err}"))?
            .to_bytes();
        Ok((status, body.to_vec()))
    }

    /// A request whose answer must have status `expected` and a JSON body.
    pub async fn json(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Value>,
        expected: u16,
    ) -> Result<Value, String> {
        let (status, bytes) = self
            .call(method.clone(), path, body.map(|body| body.to_string()))
            .await?;
        if status != expected {
            return Err(format!("{method} {path}: {status} {}", String::from_utf8_lossy(&bytes)));
        }
        serde_json::from_slice(&bytes)
            .map_err(|err| format!("{method} {path}: {err} in {}", String::from_utf8_lossy(&bytes)))
    }

    /// Turns `device`'s emission on or off and waits for the outcome
    /// (`?wait=`: one request, answered once the outcome is recorded); the
    /// command's record.
    pub async fn toggle_and_wait(&self, device: &str, on: bool) -> Result<Value, String> {
        let path = format!("/api/v1/devices/{device}/emission?wait=10s");
        self.json(hyper::Method::POST, &path, Some(json!({ "on": on })), 200)
            .await
    }

    /// Turns `device`'s emission on or off; the correlation id, at once.
    pub async fn toggle(&self, device: &str, on: bool) -> Result<String, String> {
        let path = format!("/api/v1/devices/{device}/emission");
        let issued = self
            .json(hyper::Method::POST, &path, Some(json!({ "on": on })), 202)
            .await?;
        correlation_id(&issued)
    }

    /// Stores a template of one file, `fluent-bit.conf`, holding `text`.
    pub async fn create_template(&self, agent_type: &str, version: &str, text: &str) -> Result<(), String> {
        let path = format!("/api/v1/templates/{agent_type}/{version}");
        let body = json!({ "bundle": { "fluent-bit.conf": { "content_type": "text/plain", "text": text } } });
        self.json(hyper::Method::PUT, &path, Some(body), 201).await.map(drop)
    }

    /// Applies a stored template to `device`; the correlation id, at once.
    pub async fn apply_config(&self, device: &str, agent_type: &str, version: &str) -> Result<String, String> {
        let path = format!("/api/v1/devices/{device}/config");
        let body = json!({ "agent_type": agent_type, "version": version });
        let issued = self.json(hyper::Method::POST, &path, Some(body), 202).await?;
        issued["issued"]
            .get(0)
            .ok_or_else(|| format!("POST {path}: nothing issued: {issued}"))
            .and_then(correlation_id)
    }

    /// A command's record, waiting up to `wait` (e.g. `5s`) for it to end.
    pub async fn command(&self, correlation_id: &str, wait: &str) -> Result<Value, String> {
        let path = format!("/api/v1/commands/{correlation_id}?wait={wait}");
        self.json(hyper::Method::GET, &path, None, 200).await
    }
}

fn correlation_id(issued: &Value) -> Result<String, String> {
    issued["correlation_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no correlation_id in {issued}"))
}
