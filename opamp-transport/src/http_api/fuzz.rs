//! The check behind the `rest_bodies` fuzz target (see [`crate::testkit::fuzz`]).

use axum::Json;
use axum::http::StatusCode;
use opamp_core::ConfigRef;
use serde::de::DeserializeOwned;

use super::devices::{ApplyBody, ConfigRefBody, EmissionBody};
use super::error::ApiError;
use super::rollouts::StartBody;
use super::templates::{LatestBody, TemplateBody};

/// A REST API request body through the deserialiser and the checks its
/// handler applies: the first byte picks the body (emission, device config,
/// apply, rollout start, latest version, template), the rest is the JSON.
///
/// What is refused is a 4xx naming what was wrong; what is accepted and has
/// a JSON form reads back the same from it.
pub fn rest_bodies(data: &[u8]) {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => drop(read::<EmissionBody>(json).map(|body| body.on)),
        1 => {
            if let Some(body) = read::<ConfigRefBody>(json) {
                let again: ConfigRefBody = read(&serde_json::to_vec(&body).expect("a config ref encodes"))
                    .expect("an encoded config ref reads");
                assert_eq!(
                    ConfigRef::from(again),
                    ConfigRef::from(body),
                    "a config ref survives the trip"
                );
            }
        }
        2 => {
            if let Some(body) = read::<ApplyBody>(json) {
                if let Err(error) = body.target.into_target() {
                    refused(&error);
                }
                let _config: ConfigRef = body.config.into();
            }
        }
        3 => {
            if let Some(body) = read::<StartBody>(json) {
                let spec = body.into_spec();
                if let Err(error) = spec.validate() {
                    refused(&ApiError::from(error));
                }
            }
        }
        4 => drop(read::<LatestBody>(json).map(|body| body.version)),
        _ => {
            if let Some(body) = read::<TemplateBody>(json) {
                let again: TemplateBody =
                    read(&serde_json::to_vec(&serde_json::json!({ "bundle": body.bundle })).expect("a bundle encodes"))
                        .expect("an encoded bundle reads");
                assert_eq!(again.bundle, body.bundle, "a bundle survives the trip");
                assert_eq!(again.bundle.hash(), body.bundle.hash(), "and so does its hash");
            }
        }
    }
}

/// The body as the handler's `ApiJson` extractor reads it, or `None` after
/// checking the refusal.
fn read<T: DeserializeOwned>(json: &[u8]) -> Option<T> {
    match Json::<T>::from_bytes(json) {
        Ok(Json(body)) => Some(body),
        Err(rejection) => {
            refused(&ApiError::from(rejection));
            None
        }
    }
}

fn refused(error: &ApiError) {
    assert!(
        matches!(
            error.status(),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
        ),
        "a bad body is a client error, got {} ({})",
        error.status(),
        error.message()
    );
    assert!(!error.message().is_empty(), "a refusal names what was wrong");
}

/// The request bodies of docs/rest-api.md's examples, and broken ones, for the seed corpus.
pub(crate) fn seeds() -> Vec<crate::testkit::fuzz::Seed> {
    let bodies: [(&str, u8, &str); 12] = [
        ("emission", 0, r#"{"on": true}"#),
        ("emission-unknown-field", 0, r#"{"on": true, "now": 1}"#),
        ("device-config", 1, r#"{"agent_type": "fluentbit", "version": "v2"}"#),
        (
            "apply-device",
            2,
            r#"{"target": {"device": "ap-17:eth0"}, "config": {"agent_type": "fluentbit", "version": "v2"}}"#,
        ),
        (
            "apply-selector",
            2,
            r#"{"target": {"agent_type": "fluentbit", "labels": {"site": "berlin"}}, "config": {"agent_type": "fluentbit", "version": "v2"}}"#,
        ),
        (
            "apply-both",
            2,
            r#"{"target": {"device": "d1", "agent_type": "fluentbit"}, "config": {"agent_type": "fluentbit", "version": "v2"}}"#,
        ),
        (
            "rollout",
            3,
            r#"{"config": {"agent_type": "fluentbit", "version": "v3"}, "labels": {"site": "berlin"}, "canary": 5, "growth": 4, "max_wave": 1000, "failure_threshold": 0.05}"#,
        ),
        (
            "rollout-bad-threshold",
            3,
            r#"{"config": {"agent_type": "fluentbit", "version": "v3"}, "failure_threshold": 1.5}"#,
        ),
        ("latest", 4, r#"{"version": "v3"}"#),
        (
            "template",
            5,
            r#"{"bundle": {"fluent-bit.conf": {"content_type": "text/plain", "text": "[SERVICE]\n    hot_reload On\n"}, "cert.der": {"content_type": "application/octet-stream", "base64": "MIIB"}}}"#,
        ),
        (
            "template-bad-name",
            5,
            r#"{"bundle": {"../etc/passwd": {"content_type": "text/plain", "text": ""}}}"#,
        ),
        ("not-json", 3, r#"{"config": "#),
    ];
    bodies
        .into_iter()
        .map(|(name, which, json)| {
            let mut bytes = vec![which];
            bytes.extend_from_slice(json.as_bytes());
            ("rest_bodies", name, bytes)
        })
        .collect()
}
