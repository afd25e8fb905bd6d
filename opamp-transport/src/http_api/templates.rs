//! Configuration templates: versions of an agent type, one version, creating one, `latest`.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use opamp_core::{AgentType, ConfigBundle, ConfigHash, ConfigRef, ConfigTemplate, ConfigVersion, Timestamp};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::devices::parse;
use super::error::{ApiError, ApiJson, ApiPath, ApiResult};
use super::openapi::Doc;
use super::{Api, Routes, Verb};

/// The path segment that names the `latest` pointer rather than a version.
const LATEST: &str = "latest";

pub(super) fn routes() -> Routes {
    Routes::new()
        .add(
            Verb::Get,
            "/api/v1/templates/{agent_type}",
            Doc::read(
                "templates",
                "The stored versions of an agent type and its latest",
                "TemplateVersions",
            ),
            versions,
        )
        .add(
            Verb::Get,
            "/api/v1/templates/{agent_type}/latest",
            Doc::read("templates", "The template `latest` points at", "Template"),
            latest,
        )
        .add(
            Verb::Put,
            "/api/v1/templates/{agent_type}/latest",
            Doc::write(
                "templates",
                "Point `latest` at a stored version",
                Some("Latest"),
                200,
                "TemplateVersions",
            ),
            set_latest,
        )
        .add(
            Verb::Get,
            "/api/v1/templates/{agent_type}/{version}",
            Doc::read("templates", "One template version", "Template"),
            template,
        )
        .add(
            Verb::Put,
            "/api/v1/templates/{agent_type}/{version}",
            Doc::write(
                "templates",
                "Create a template version (versions are immutable: 409 if it exists)",
                Some("TemplateBody"),
                201,
                "Template",
            ),
            create,
        )
}

fn agent_type(text: &str) -> ApiResult<AgentType> {
    parse("agent type in the path", text)
}

fn config_ref(agent: &str, version: &str) -> ApiResult<ConfigRef> {
    Ok(ConfigRef::new(
        agent_type(agent)?,
        parse("config version in the path", version)?,
    ))
}

/// A template as the API shows it: the stored template and its content hash.
#[derive(Serialize)]
struct TemplateView {
    #[serde(flatten)]
    template: ConfigTemplate,
    hash: ConfigHash,
}

impl From<ConfigTemplate> for TemplateView {
    fn from(template: ConfigTemplate) -> Self {
        let hash = template.hash();
        TemplateView { template, hash }
    }
}

#[derive(Serialize)]
struct Versions {
    agent_type: AgentType,
    versions: Vec<ConfigVersion>,
    latest: Option<ConfigVersion>,
}

async fn versions_of(api: &Api, agent_type: AgentType) -> ApiResult<Versions> {
    let versions = api.control.template_versions(&agent_type).await?;
    let latest = api.control.store().latest(&agent_type).await?;
    Ok(Versions {
        agent_type,
        versions,
        latest,
    })
}

async fn versions(State(api): State<Api>, ApiPath(agent): ApiPath<String>) -> ApiResult<Json<Versions>> {
    Ok(Json(versions_of(&api, agent_type(&agent)?).await?))
}

async fn template(
    State(api): State<Api>,
    ApiPath((agent, version)): ApiPath<(String, String)>,
) -> ApiResult<Json<TemplateView>> {
    let config = config_ref(&agent, &version)?;
    let template = api
        .control
        .template(&config)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("config template {config} is not stored")))?;
    Ok(Json(template.into()))
}

async fn latest(State(api): State<Api>, ApiPath(agent): ApiPath<String>) -> ApiResult<Json<TemplateView>> {
    let agent_type = agent_type(&agent)?;
    let version = api
        .control
        .store()
        .latest(&agent_type)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("agent type {agent_type} has no latest config")))?;
    let config = ConfigRef::new(agent_type, version);
    let template = api
        .control
        .template(&config)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("config template {config}, the latest, is not stored")))?;
    Ok(Json(template.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LatestBody {
    pub(super) version: ConfigVersion,
}

async fn set_latest(
    State(api): State<Api>,
    ApiPath(agent): ApiPath<String>,
    ApiJson(body): ApiJson<LatestBody>,
) -> ApiResult<Json<Versions>> {
    let agent_type = agent_type(&agent)?;
    api.control
        .set_latest(&ConfigRef::new(agent_type, body.version))
        .await?;
    Ok(Json(versions_of(&api, agent_type).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TemplateBody {
    pub(super) bundle: ConfigBundle,
}

async fn create(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiPath((agent, version)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<TemplateBody>,
) -> ApiResult<(StatusCode, Json<TemplateView>)> {
    if version == LATEST {
        return Err(ApiError::invalid_input(
            "config version \"latest\" is reserved for the latest pointer; pick another name",
        ));
    }
    let config = config_ref(&agent, &version)?;
    let template = ConfigTemplate::new(config, body.bundle, principal.name.as_ref(), Timestamp::now());
    api.control.create_template(&template).await?;
    Ok((StatusCode::CREATED, Json(template.into())))
}
