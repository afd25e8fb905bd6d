//! Devices (list, detail, emission, config), applying configs and commands.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use opamp_core::time::duration_text;
use opamp_core::{
    AgentType, CommandRecord, ConfigRef, ConfigVersion, CorrelationId, Cursor, DeviceId, DeviceStatus, Issued, Labels,
    Page, PageRequest, Revocation, Store, SupervisorId, Target,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::auth::Principal;
use super::error::{ApiError, ApiJson, ApiPath, ApiResult, QueryPairs};
use super::openapi::Doc;
use super::{Api, Routes, Verb};

/// The default and the largest page of a device listing.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1_000;

const LIST_QUERY: &[(&str, &str)] = &[
    ("online", "`true`: online devices only; `false`: offline ones only"),
    ("supervisor", "devices whose (current or last) supervisor is this one"),
    ("agent_type", "devices of this agent type"),
    ("label", "`key=value`; repeat for several, all must match"),
    ("q", "devices whose id contains this text"),
    (
        "limit",
        "page size, 1-1000 (default 50); a filtered page may be shorter, follow `next`",
    ),
    ("after", "the `next` cursor of the previous page"),
];

pub(super) fn routes() -> Routes {
    Routes::new()
        .add(
            Verb::Get,
            "/api/v1/devices",
            Doc::read("devices", "Devices, a page at a time, with filters", "DevicePage").query(LIST_QUERY),
            list,
        )
        .add(
            Verb::Get,
            "/api/v1/devices/{device}",
            Doc::read(
                "devices",
                "One device: its status, owner and desired config",
                "DeviceDetail",
            ),
            detail,
        )
        .add(
            Verb::Post,
            "/api/v1/devices/{device}/emission",
            Doc::write(
                "devices",
                "Turn a device's emission on or off (202 with the command's id; with wait, 200 with its record)",
                Some("Emission"),
                202,
                "Issued",
            )
            .query(&[(
                "wait",
                "wait up to this long (e.g. 5s; at most 60s) for the command to end, and answer 200 with its record",
            )]),
            emission,
        )
        .add(
            Verb::Post,
            "/api/v1/devices/{device}/config",
            Doc::write(
                "devices",
                "Apply a stored config template to a device",
                Some("ConfigRef"),
                202,
                "IssuedList",
            ),
            device_config,
        )
        .add(
            Verb::Post,
            "/api/v1/configs/apply",
            Doc::write(
                "devices",
                "Apply a stored config template to a device or a selection of devices",
                Some("ApplyConfig"),
                202,
                "IssuedList",
            ),
            apply,
        )
        .add(
            Verb::Get,
            "/api/v1/commands/{correlation_id}",
            Doc::read("commands", "A command's record, by correlation id", "CommandRecord").query(&[(
                "wait",
                "wait up to this long (e.g. 500ms, 5s; at most 60s) for the command to end before answering",
            )]),
            command,
        )
}

/// The page a listing's `limit` (1 to `max`, `default` when absent) and
/// `after` (the previous page's `next`) ask for; any other parameter is refused.
pub(super) fn page_request(pairs: Vec<(String, String)>, default: usize, max: usize) -> ApiResult<PageRequest> {
    let mut limit = default;
    let mut after = None;
    for (key, value) in pairs {
        match key.as_str() {
            "limit" => {
                limit = value.parse().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("limit must be 1-{max}, not {value:?}"),
                    )
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
    Ok(match after {
        Some(cursor) => PageRequest::after(cursor, limit),
        None => PageRequest::first(limit),
    })
}

/// Parses a path or body value with the core's validation, naming the parameter.
pub(super) fn parse<T: std::str::FromStr<Err = opamp_core::Error>>(what: &str, text: &str) -> ApiResult<T> {
    text.parse().map_err(|err| match err {
        opamp_core::Error::InvalidInput { message } => ApiError::invalid_input(format!("{what}: {message}")),
        other => other.into(),
    })
}

/// The filters of a device listing.
#[derive(Debug, Default)]
struct Filter {
    online: Option<bool>,
    supervisor: Option<SupervisorId>,
    agent_type: Option<AgentType>,
    labels: Labels,
    contains: Option<String>,
    limit: usize,
    after: Option<Cursor>,
}

impl Filter {
    fn from_query(pairs: Vec<(String, String)>) -> ApiResult<Self> {
        let mut filter = Filter {
            limit: DEFAULT_LIMIT,
            ..Filter::default()
        };
        let invalid = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message);
        for (key, value) in pairs {
            match key.as_str() {
                "online" => {
                    filter.online = Some(match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid(format!("online must be true or false, not {value:?}"))),
                    })
                }
                "supervisor" => filter.supervisor = Some(parse("query parameter supervisor", &value)?),
                "agent_type" => filter.agent_type = Some(parse("query parameter agent_type", &value)?),
                "label" => {
                    let (k, v) = value
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| invalid(format!("label must be key=value, not {value:?}")))?;
                    filter.labels.insert(k.to_owned(), v.to_owned());
                }
                "q" => filter.contains = Some(value).filter(|q| !q.is_empty()),
                "limit" => {
                    filter.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| invalid(format!("limit must be 1-{MAX_LIMIT}, not {value:?}")))?
                }
                "after" => filter.after = Some(Cursor::new(value)).filter(|c| !c.as_str().is_empty()),
                other => {
                    return Err(invalid(format!(
                        "unknown query parameter {other:?}; expected online, supervisor, agent_type, label, q, limit or after"
                    )));
                }
            }
        }
        Ok(filter)
    }

    fn admits(&self, status: &DeviceStatus) -> bool {
        self.online.is_none_or(|online| status.is_online() == online)
            && self.supervisor.is_none_or(|s| status.supervisor == Some(s))
            && self.agent_type.is_none_or(|t| status.agent_type == Some(t))
            && self.labels.iter().all(|(k, v)| status.labels.get(k) == Some(v))
            && self
                .contains
                .as_deref()
                .is_none_or(|q| status.device.as_str().contains(q))
    }
}

#[derive(Serialize)]
struct DevicePage {
    items: Vec<DeviceStatus>,
    next: Option<Cursor>,
}

/// Lists from the narrowest index the filters allow, reading each listed
/// device's status and keeping those the filters admit, until the page is
/// full, the listing ends, or `scan_limit` devices were read.
async fn list(State(api): State<Api>, QueryPairs(pairs): QueryPairs) -> ApiResult<Json<DevicePage>> {
    let filter = Filter::from_query(pairs)?;
    let store = api.control.store();
    let mut items = Vec::with_capacity(filter.limit);
    let mut cursor = filter.after.clone();
    let mut scanned = 0;
    loop {
        // Never more than the page has room for, nor than the scan allows, so the cursor stays exact.
        let want = (filter.limit - items.len()).min(api.scan_limit - scanned);
        let request = match cursor.take() {
            Some(after) => PageRequest::after(after, want),
            None => PageRequest::first(want),
        };
        let page: Page<DeviceId> = match (filter.online, filter.supervisor) {
            (Some(true), Some(supervisor)) => store.supervisor_devices(&supervisor, &request).await?,
            (Some(true), None) => store.online_devices(&request).await?,
            _ => store.devices(&request).await?,
        };
        scanned += page.items.len();
        for status in statuses(store, &page.items).await?.into_iter().flatten() {
            if filter.admits(&status) {
                items.push(status);
            }
        }
        cursor = page.next;
        if items.len() >= filter.limit || cursor.is_none() || scanned >= api.scan_limit {
            break;
        }
    }
    Ok(Json(DevicePage { items, next: cursor }))
}

/// How many status reads a listing has in flight at once.
const READS_IN_FLIGHT: usize = 16;

/// The statuses of `devices`, in their order, read a few at a time
/// (one round trip each on a networked store).
async fn statuses(store: &Arc<dyn Store>, devices: &[DeviceId]) -> ApiResult<Vec<Option<DeviceStatus>>> {
    let mut out = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(READS_IN_FLIGHT) {
        let mut reads = JoinSet::new();
        for (i, device) in chunk.iter().enumerate() {
            let (store, device) = (Arc::clone(store), *device);
            reads.spawn(async move { (i, store.status(&device).await) });
        }
        let mut read = vec![None; chunk.len()];
        while let Some(joined) = reads.join_next().await {
            let (i, status) = joined.map_err(|err| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("a status read failed: {err}"),
                )
            })?;
            read[i] = status?;
        }
        out.extend(read);
    }
    Ok(out)
}

/// The device's status, or 404 naming it.
async fn known(api: &Api, device: &DeviceId) -> ApiResult<DeviceStatus> {
    api.control
        .store()
        .status(device)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {device} is not known")))
}

fn device_id(text: &str) -> ApiResult<DeviceId> {
    parse("device id in the path", text)
}

#[derive(Serialize)]
struct DeviceDetail {
    #[serde(flatten)]
    status: DeviceStatus,
    owner: Option<SupervisorId>,
    desired: Option<ConfigRefBody>,
    revoked: Option<Revocation>,
}

async fn detail(State(api): State<Api>, ApiPath(device): ApiPath<String>) -> ApiResult<Json<DeviceDetail>> {
    let device = device_id(&device)?;
    let status = known(&api, &device).await?;
    let store = api.control.store();
    let owner = store.lookup(&device).await?;
    let desired = store.desired(&device).await?.map(ConfigRefBody::from);
    let revoked = store.revocation(&device).await?;
    Ok(Json(DeviceDetail {
        status,
        owner,
        desired,
        revoked,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EmissionBody {
    pub(super) on: bool,
}

#[derive(Serialize)]
struct IssuedList {
    issued: Vec<Issued>,
}

/// 202 with the command's id; with `?wait=5s`, 200 with its record once it
/// has ended (or as it stands when the wait runs out).
async fn emission(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiPath(device): ApiPath<String>,
    QueryPairs(pairs): QueryPairs,
    ApiJson(body): ApiJson<EmissionBody>,
) -> ApiResult<Response> {
    let wait = wait_param(pairs)?;
    let device = device_id(&device)?;
    // An unknown device is a 404 from `set_emission` itself: no store read here.
    let correlation_id = api
        .control
        .acting_as(&*principal.name)
        .set_emission(&device, body.on)
        .await
        .map_err(|err| match err {
            opamp_core::Error::NotFound { what } => ApiError::not_found(what),
            other => other.into(),
        })?;
    if wait.is_zero() {
        return Ok((StatusCode::ACCEPTED, Json(Issued { device, correlation_id })).into_response());
    }
    let record = api.control.wait(&correlation_id, wait).await?;
    Ok(Json(CommandView {
        correlation_id,
        device,
        record,
    })
    .into_response())
}

/// A config as the API names it: `{"agent_type": "fluentbit", "version": "v2"}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigRefBody {
    agent_type: AgentType,
    version: ConfigVersion,
}

impl From<ConfigRefBody> for ConfigRef {
    fn from(body: ConfigRefBody) -> Self {
        ConfigRef::new(body.agent_type, body.version)
    }
}

impl From<ConfigRef> for ConfigRefBody {
    fn from(config: ConfigRef) -> Self {
        ConfigRefBody {
            agent_type: config.agent_type,
            version: config.version,
        }
    }
}

async fn device_config(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiPath(device): ApiPath<String>,
    ApiJson(body): ApiJson<ConfigRefBody>,
) -> ApiResult<(StatusCode, Json<IssuedList>)> {
    let device = device_id(&device)?;
    known(&api, &device).await?;
    issue(&api, &principal, &Target::Device(device), body.into()).await
}

/// A target as the API names it: `{"device": "d1"}` or `{"agent_type": "fluentbit", "labels": {...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetBody {
    #[serde(default)]
    device: Option<DeviceId>,
    #[serde(default)]
    agent_type: Option<AgentType>,
    #[serde(default)]
    labels: Option<Labels>,
}

impl TargetBody {
    pub(super) fn into_target(self) -> ApiResult<Target> {
        match (self.device, self.agent_type, self.labels) {
            (Some(device), None, None) => Ok(Target::Device(device)),
            (None, Some(agent_type), labels) => Ok(Target::Selector {
                agent_type,
                labels: labels.unwrap_or_default(),
            }),
            (Some(_), _, _) => Err(ApiError::invalid_input(
                "target: give either `device`, or `agent_type` with optional `labels`, not both",
            )),
            (None, None, _) => Err(ApiError::invalid_input(
                "target: needs `device`, or `agent_type` with optional `labels`",
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApplyBody {
    pub(super) target: TargetBody,
    pub(super) config: ConfigRefBody,
}

async fn apply(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<ApplyBody>,
) -> ApiResult<(StatusCode, Json<IssuedList>)> {
    let target = body.target.into_target()?;
    if let Target::Device(device) = &target {
        known(&api, device).await?;
    }
    issue(&api, &principal, &target, body.config.into()).await
}

async fn issue(
    api: &Api,
    principal: &Principal,
    target: &Target,
    config: ConfigRef,
) -> ApiResult<(StatusCode, Json<IssuedList>)> {
    let issued = api
        .control
        .acting_as(&*principal.name)
        .apply_config(target, &config)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(IssuedList { issued })))
}

/// A command record with its id and device at the top, beside the command as it went on the bus.
#[derive(Serialize)]
struct CommandView {
    correlation_id: CorrelationId,
    device: DeviceId,
    #[serde(flatten)]
    record: CommandRecord,
}

/// The longest `wait` a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The `wait` query parameter (none: zero), the only one these routes take.
fn wait_param(pairs: Vec<(String, String)>) -> ApiResult<Duration> {
    let mut wait = Duration::ZERO;
    for (key, value) in pairs {
        match key.as_str() {
            "wait" => {
                wait = duration_text::parse(&value)
                    .ok()
                    .filter(|wait| *wait <= MAX_WAIT)
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_query",
                            format!("wait must be a duration like 500ms or 5s, at most 60s, not {value:?}"),
                        )
                    })?;
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("unknown query parameter {other:?}; expected wait"),
                ));
            }
        }
    }
    Ok(wait)
}

async fn command(
    State(api): State<Api>,
    ApiPath(id): ApiPath<String>,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<CommandView>> {
    let id: CorrelationId = parse("correlation id in the path", &id)?;
    let wait = wait_param(pairs)?;
    let record = if wait.is_zero() {
        api.control.command(&id).await?
    } else {
        match api.control.wait(&id, wait).await {
            Ok(record) => Some(record),
            Err(opamp_core::Error::NotFound { .. }) => None,
            Err(err) => return Err(err.into()),
        }
    }
    .ok_or_else(|| ApiError::not_found(format!("command {id} is not known")))?;
    Ok(Json(CommandView {
        correlation_id: record.correlation_id(),
        device: record.device(),
        record,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn filters_parse_and_name_bad_values() {
        let filter = Filter::from_query(pairs(&[
            ("online", "true"),
            ("label", "ring=canary"),
            ("label", "site=a=b"),
            ("limit", "10"),
        ]))
        .unwrap();
        assert_eq!(filter.online, Some(true));
        assert_eq!(filter.labels.get("site").map(String::as_str), Some("a=b"));
        assert_eq!(filter.limit, 10);
        for (query, needle) in [
            (("online", "yes"), "online must be"),
            (("limit", "0"), "limit must be"),
            (("limit", "x"), "limit must be"),
            (("label", "=v"), "label must be"),
            (("agent_type", "a:b"), "agent_type"),
            (("colour", "red"), "unknown query parameter"),
        ] {
            let err = Filter::from_query(pairs(&[query])).unwrap_err();
            assert!(format!("{err:?}").contains(needle), "{query:?}: {err:?}");
        }
    }

    #[test]
    fn targets_need_exactly_one_form() {
        let body: TargetBody = serde_json::from_str(r#"{"device":"d1"}"#).unwrap();
        assert!(matches!(body.into_target(), Ok(Target::Device(_))));
        let body: TargetBody = serde_json::from_str(r#"{"agent_type":"fb","labels":{"a":"b"}}"#).unwrap();
        assert!(matches!(body.into_target(), Ok(Target::Selector { .. })));
        let body: TargetBody = serde_json::from_str(r#"{"device":"d1","agent_type":"fb"}"#).unwrap();
        assert!(body.into_target().is_err());
        let body: TargetBody = serde_json::from_str(r#"{}"#).unwrap();
        assert!(body.into_target().is_err());
        assert!(serde_json::from_str::<TargetBody>(r#"{"device":"bad id"}"#).is_err());
    }
}
