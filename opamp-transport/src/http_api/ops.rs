//! Health probes, `/metrics`, supervisors, the OpenAPI document and the dashboard page.

use std::fmt::Write as _;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use opamp_core::SupervisorLoad;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::error::ApiResult;
use super::openapi::{self, Doc};
use super::{Api, Routes, Verb};

const DASHBOARD: &str = include_str!("dashboard.html");

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/api/v1/supervisors`.
pub(super) fn api_routes() -> Routes {
    Routes::new().add(
        Verb::Get,
        "/api/v1/supervisors",
        Doc::read(
            "supervisors",
            "Supervisors and how many devices are online under each",
            "Supervisors",
        ),
        supervisors,
    )
}

/// `/health/*` and `/metrics`.
pub(super) fn probe_routes() -> Routes {
    Routes::new()
        .add(
            Verb::Get,
            "/health/live",
            Doc::public("health", "Liveness: the process serves requests", "Health"),
            live,
        )
        .add(
            Verb::Get,
            "/health/ready",
            Doc::public(
                "health",
                "Readiness: the store and the bus answer (503 with the reason if not)",
                "Health",
            ),
            ready,
        )
        .add(
            Verb::Get,
            "/metrics",
            Doc::public_text("health", "Prometheus metrics", "text/plain"),
            metrics,
        )
}

/// `/` and `/openapi.json`.
pub(super) fn page_routes() -> Routes {
    Routes::new()
        .add(
            Verb::Get,
            "/",
            Doc::public_text("dashboard", "The dashboard page", "text/html"),
            dashboard,
        )
        .add(
            Verb::Get,
            "/openapi.json",
            Doc::public_any_json("meta", "This OpenAPI document"),
            openapi::serve,
        )
}

#[derive(Serialize)]
struct Supervisors {
    items: Vec<SupervisorLoad>,
}

async fn supervisors(State(api): State<Api>) -> ApiResult<Json<Supervisors>> {
    let mut items = api.control.store().device_counts().await?;
    items.sort_by_key(|load| load.supervisor);
    Ok(Json(Supervisors { items }))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(api): State<Api>) -> Response {
    match api.control.check().await {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "reason": err.to_string() })),
        )
            .into_response(),
    }
}

/// The host's recorder, then `opamp_devices_online{supervisor}` read from the store now,
/// so a supervisor that left does not linger as a stale series.
async fn metrics(State(api): State<Api>) -> Response {
    let mut text = api.metrics.as_ref().map(|handle| handle.render()).unwrap_or_default();
    match api.control.store().device_counts().await {
        Ok(counts) => append_devices_online(&mut text, &counts),
        Err(err) => tracing::warn!(error = %err, "/metrics: could not read the device counts"),
    }
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

fn append_devices_online(text: &mut String, counts: &[SupervisorLoad]) {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# HELP opamp_devices_online Devices online under each supervisor.\n");
    text.push_str("# TYPE opamp_devices_online gauge\n");
    for load in counts {
        // Supervisor ids are [A-Za-z0-9._:-]: nothing to escape in a label value.
        let _ = writeln!(
            text,
            "opamp_devices_online{{supervisor=\"{}\"}} {}",
            load.supervisor, load.devices
        );
    }
}

/// The page, with a Content-Security-Policy that lets only its own inline
/// script and style run (by hash) and talk only to this origin: an injected
/// script could not read the token kept in the tab.
async fn dashboard() -> Response {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| content_security_policy(DASHBOARD));
    (
        [
            (header::CONTENT_SECURITY_POLICY, policy.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(DASHBOARD),
    )
        .into_response()
}

/// The policy for `page`: the SHA-256 of each inline `<script>` and `<style>`.
fn content_security_policy(page: &str) -> String {
    let hashes = |tag: &str| -> String {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let mut out = String::new();
        let mut rest = page;
        while let Some(start) = rest.find(&open) {
            let body = &rest[start + open.len()..];
            let Some(end) = body.find(&close) else { break };
            let digest = Sha256::digest(&body.as_bytes()[..end]);
            let _ = write!(out, " 'sha256-{}'", BASE64.encode(digest));
            rest = &body[end + close.len()..];
        }
        out
    };
    format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

#[cfg(test)]
mod tests {
    use opamp_core::SupervisorId;

    use super::*;

    #[test]
    fn the_page_policy_names_its_script_and_style() {
        let policy = content_security_policy("<style>a{}</style><script>x()</script><script>y()</script>");
        let sha = |text: &str| BASE64.encode(Sha256::digest(text.as_bytes()));
        assert!(
            policy.contains(&format!("script-src 'sha256-{}' 'sha256-{}';", sha("x()"), sha("y()"))),
            "{policy}"
        );
        assert!(
            policy.contains(&format!("style-src 'sha256-{}';", sha("a{}"))),
            "{policy}"
        );
        let real = content_security_policy(DASHBOARD);
        assert_eq!(real.matches("'sha256-").count(), 2, "one script and one style: {real}");
    }

    #[test]
    fn devices_online_is_prometheus_text() {
        let mut text = String::from("# TYPE x counter\nx 1");
        let counts = [SupervisorLoad {
            supervisor: SupervisorId::new("s-1").unwrap(),
            devices: 3,
        }];
        append_devices_online(&mut text, &counts);
        assert!(text.contains("x 1\n# HELP opamp_devices_online"), "{text}");
        assert!(text.ends_with("opamp_devices_online{supervisor=\"s-1\"} 3\n"), "{text}");
    }
}
