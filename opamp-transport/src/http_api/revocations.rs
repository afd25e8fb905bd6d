//! Revoked devices: revoke (which closes the device's session), list, one,
//! reinstate. Revoking and reinstating need an operator token.

use axum::Json;
use axum::extract::{Extension, State};
use opamp_core::runtime::control_plane::Revoked;
use opamp_core::{Cursor, DeviceId, Revocation};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::devices::{page_request, parse};
use super::error::{ApiError, ApiJson, ApiPath, ApiResult, QueryPairs};
use super::openapi::Doc;
use super::{Api, Routes, Verb};

const LIST_QUERY: &[(&str, &str)] = &[
    ("limit", "page size, 1-1000 (default 100)"),
    ("after", "the `next` cursor of the previous page"),
];

pub(super) fn routes() -> Routes {
    Routes::new()
        .add(
            Verb::Get,
            "/api/v1/revocations",
            Doc::read("revocations", "Revoked devices, a page at a time", "RevocationPage").query(LIST_QUERY),
            list,
        )
        .add(
            Verb::Get,
            "/api/v1/revocations/{device}",
            Doc::read("revocations", "One device's revocation (404: not revoked)", "Revocation"),
            one,
        )
        .add(
            Verb::Put,
            "/api/v1/revocations/{device}",
            Doc::write(
                "revocations",
                "Revoke a device: it is refused at every registration until reinstated, and its open session is closed (the first revocation stays)",
                Some("Revoke"),
                200,
                "Revoked",
            ),
            revoke,
        )
        .add(
            Verb::Delete,
            "/api/v1/revocations/{device}",
            Doc::write(
                "revocations",
                "Reinstate a revoked device (404: not revoked)",
                None,
                200,
                "Revocation",
            ),
            reinstate,
        )
}

fn device_id(text: &str) -> ApiResult<DeviceId> {
    parse("device id in the path", text)
}

#[derive(Serialize)]
struct RevocationPage {
    items: Vec<Revocation>,
    next: Option<Cursor>,
}

async fn list(State(api): State<Api>, QueryPairs(pairs): QueryPairs) -> ApiResult<Json<RevocationPage>> {
    let page = api.control.revocations(&page_request(pairs, 100, 1_000)?).await?;
    Ok(Json(RevocationPage {
        items: page.items,
        next: page.next,
    }))
}

fn not_revoked(device: &DeviceId) -> ApiError {
    ApiError::not_found(format!("device {device} is not revoked"))
}

async fn one(State(api): State<Api>, ApiPath(device): ApiPath<String>) -> ApiResult<Json<Revocation>> {
    let device = device_id(&device)?;
    let revocation = api.control.revocation(&device).await?;
    Ok(Json(revocation.ok_or_else(|| not_revoked(&device))?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: String,
}

async fn revoke(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiPath(device): ApiPath<String>,
    ApiJson(body): ApiJson<RevokeBody>,
) -> ApiResult<Json<Revoked>> {
    let device = device_id(&device)?;
    let revoked = api
        .control
        .acting_as(&*principal.name)
        .revoke(&device, &body.reason)
        .await?;
    Ok(Json(revoked))
}

/// Answers the revocation lifted, so the caller sees what it undid.
async fn reinstate(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiPath(device): ApiPath<String>,
) -> ApiResult<Json<Revocation>> {
    let device = device_id(&device)?;
    let control = api.control.acting_as(&*principal.name);
    let revocation = control.revocation(&device).await?.ok_or_else(|| not_revoked(&device))?;
    if !control.reinstate(&device).await? {
        // Reinstated by someone else in between.
        return Err(not_revoked(&device));
    }
    Ok(Json(revocation))
}
