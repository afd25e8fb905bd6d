//! Rollouts: start, list, one, pause, resume, abort.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use opamp_core::runtime::control_plane::{Rollout, RolloutId, RolloutSpec};
use opamp_core::{Cursor, PageRequest};
use serde::{Deserialize, Serialize};

use super::devices::{ConfigRefBody, TargetBody, parse};
use super::error::{ApiError, ApiJson, ApiPath, ApiResult, QueryPairs};
use super::openapi::Doc;
use super::{Api, Routes, Verb};

const LIST_QUERY: &[(&str, &str)] = &[
    ("limit", "page size, 1-100 (default 20)"),
    ("after", "the `next` cursor of the previous page"),
];

pub(super) fn routes() -> Routes {
    Routes::new()
        .add(
            Verb::Get,
            "/api/v1/rollouts",
            Doc::read("rollouts", "Rollouts, a page at a time", "RolloutPage").query(LIST_QUERY),
            list,
        )
        .add(
            Verb::Post,
            "/api/v1/rollouts",
            Doc::write("rollouts", "Start a staged rollout", Some("RolloutRequest"), 201, "Rollout"),
            start,
        )
        .add(
            Verb::Get,
            "/api/v1/rollouts/{id}",
            Doc::read("rollouts", "One rollout and its progress", "Rollout"),
            one,
        )
        .add(
            Verb::Post,
            "/api/v1/rollouts/{id}/pause",
            Doc::write("rollouts", "Pause a rollout", None, 200, "Rollout"),
            pause,
        )
        .add(
            Verb::Post,
            "/api/v1/rollouts/{id}/resume",
            Doc::write("rollouts", "Resume a paused rollout", None, 200, "Rollout"),
            resume,
        )
        .add(
            Verb::Post,
            "/api/v1/rollouts/{id}/abort",
            Doc::write("rollouts", "Abort a rollout", None, 200, "Rollout"),
            abort,
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    target: TargetBody,
    config: ConfigRefBody,
    #[serde(default)]
    canary: Option<usize>,
    #[serde(default)]
    growth: Option<f64>,
    #[serde(default)]
    failure_threshold: Option<f64>,
}

async fn start(State(api): State<Api>, ApiJson(body): ApiJson<StartBody>) -> ApiResult<(StatusCode, Json<Rollout>)> {
    let mut spec = RolloutSpec::new(body.target.into_target()?, body.config.into());
    if let Some(canary) = body.canary {
        spec.canary = canary;
    }
    if let Some(growth) = body.growth {
        spec.growth = growth;
    }
    if let Some(threshold) = body.failure_threshold {
        spec.failure_threshold = threshold;
    }
    let rollout = api.control.start_rollout(spec).await?;
    Ok((StatusCode::CREATED, Json(rollout)))
}

#[derive(Serialize)]
struct RolloutPage {
    items: Vec<Rollout>,
    next: Option<Cursor>,
}

async fn list(State(api): State<Api>, QueryPairs(pairs): QueryPairs) -> ApiResult<Json<RolloutPage>> {
    let mut limit = 20;
    let mut after = None;
    for (key, value) in pairs {
        match key.as_str() {
            "limit" => {
                limit = value.parse().ok().filter(|n| (1..=100).contains(n)).ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("limit must be 1-100, not {value:?}"))
                })?
            }
            "after" => after = Some(Cursor::new(value)).filter(|c| !c.as_str().is_empty()),
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("unknown query parameter {other:?}; expected limit or after"),
                ));
            }
        }
    }
    let request = match after {
        Some(cursor) => PageRequest::after(cursor, limit),
        None => PageRequest::first(limit),
    };
    let page = api.control.rollouts(&request).await?;
    Ok(Json(RolloutPage {
        items: page.items,
        next: page.next,
    }))
}

fn rollout_id(text: &str) -> ApiResult<RolloutId> {
    parse("rollout id in the path", text)
}

async fn one(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Rollout>> {
    let id = rollout_id(&id)?;
    let rollout = api
        .control
        .rollout(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("rollout {id} is not known")))?;
    Ok(Json(rollout))
}

async fn pause(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Rollout>> {
    Ok(Json(api.control.pause_rollout(&rollout_id(&id)?).await?))
}

async fn resume(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Rollout>> {
    Ok(Json(api.control.resume_rollout(&rollout_id(&id)?).await?))
}

async fn abort(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Rollout>> {
    Ok(Json(api.control.abort_rollout(&rollout_id(&id)?).await?))
}
