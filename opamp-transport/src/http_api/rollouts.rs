//! Rollouts: start, list, one, pause, resume, abort.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use opamp_core::tracking::Tally;
use opamp_core::{ConfigRef, Cursor, Labels, Rollout, RolloutId, RolloutSpec};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::devices::{ConfigRefBody, page_request, parse};
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
            Doc::write(
                "rollouts",
                "Start a staged rollout",
                Some("RolloutRequest"),
                201,
                "Rollout",
            ),
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

/// A rollout to start: the config, the labels its devices must carry (none: every device
/// of the config's agent type), and optionally the waves.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    config: ConfigRefBody,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    canary: Option<u32>,
    #[serde(default)]
    growth: Option<u32>,
    #[serde(default)]
    max_wave: Option<u32>,
    #[serde(default)]
    failure_threshold: Option<f64>,
}

impl StartBody {
    /// The spec, with the defaults for what the body leaves out.
    pub(super) fn into_spec(self) -> RolloutSpec {
        let defaults = RolloutSpec::new(ConfigRef::from(self.config));
        defaults
            .clone()
            .with_labels(self.labels)
            .with_waves(
                self.canary.unwrap_or(defaults.canary),
                self.growth.unwrap_or(defaults.growth),
                self.max_wave.unwrap_or(defaults.max_wave),
            )
            .with_failure_threshold(self.failure_threshold.unwrap_or(defaults.failure_threshold))
    }
}

/// A rollout with its totals over every wave, for progress bars.
#[derive(Serialize)]
struct RolloutView {
    #[serde(flatten)]
    rollout: Rollout,
    totals: Tally,
}

impl From<Rollout> for RolloutView {
    fn from(rollout: Rollout) -> Self {
        RolloutView {
            totals: rollout.totals(),
            rollout,
        }
    }
}

async fn start(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<StartBody>,
) -> ApiResult<(StatusCode, Json<RolloutView>)> {
    let rollout = api
        .control
        .acting_as(&*principal.name)
        .start_rollout(body.into_spec())
        .await?;
    Ok((StatusCode::CREATED, Json(rollout.into())))
}

#[derive(Serialize)]
struct RolloutPage {
    items: Vec<RolloutView>,
    next: Option<Cursor>,
}

async fn list(State(api): State<Api>, QueryPairs(pairs): QueryPairs) -> ApiResult<Json<RolloutPage>> {
    let request = page_request(pairs, 20, 100)?;
    let page = api.control.rollouts(&request).await?;
    Ok(Json(RolloutPage {
        items: page.items.into_iter().map(RolloutView::from).collect(),
        next: page.next,
    }))
}

fn rollout_id(text: &str) -> ApiResult<RolloutId> {
    parse("rollout id in the path", text)
}

async fn one(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<RolloutView>> {
    let id = rollout_id(&id)?;
    let rollout = api
        .control
        .rollout(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("rollout {id} is not known")))?;
    Ok(Json(rollout.into()))
}

async fn pause(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<RolloutView>> {
    Ok(Json(api.control.pause_rollout(&rollout_id(&id)?).await?.into()))
}

async fn resume(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<RolloutView>> {
    Ok(Json(api.control.resume_rollout(&rollout_id(&id)?).await?.into()))
}

async fn abort(State(api): State<Api>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<RolloutView>> {
    Ok(Json(api.control.abort_rollout(&rollout_id(&id)?).await?.into()))
}
