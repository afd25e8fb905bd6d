//! The OpenAPI 3.1 document, made from the routes the router serves.

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::{Api, RouteDoc, Verb};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Any bearer token.
    Read,
    /// An operator token.
    Write,
    /// No token.
    Public,
}

/// What the document says of one route.
#[derive(Debug, Clone, Copy)]
pub(super) struct Doc {
    tag: &'static str,
    summary: &'static str,
    access: Access,
    request: Option<&'static str>,
    status: u16,
    response: Response,
    query: &'static [(&'static str, &'static str)],
}

/// The body of a route's success answer.
#[derive(Debug, Clone, Copy)]
enum Response {
    /// JSON of a schema in `components.schemas`.
    Schema(&'static str),
    /// Any JSON (the OpenAPI document itself).
    AnyJson,
    /// A text type, e.g. `text/html`.
    Text(&'static str),
}

impl Doc {
    /// A route any token may read.
    pub(super) const fn read(tag: &'static str, summary: &'static str, response: &'static str) -> Self {
        Doc {
            tag,
            summary,
            access: Access::Read,
            request: None,
            status: 200,
            response: Response::Schema(response),
            query: &[],
        }
    }

    /// A route that needs an operator token, with a JSON body of schema `request` (if any).
    pub(super) const fn write(
        tag: &'static str,
        summary: &'static str,
        request: Option<&'static str>,
        status: u16,
        response: &'static str,
    ) -> Self {
        Doc {
            tag,
            summary,
            access: Access::Write,
            request,
            status,
            response: Response::Schema(response),
            query: &[],
        }
    }

    /// A route without a token answering JSON of schema `response`.
    pub(super) const fn public(tag: &'static str, summary: &'static str, response: &'static str) -> Self {
        Doc {
            access: Access::Public,
            ..Self::read(tag, summary, response)
        }
    }

    /// A route without a token answering `content_type` text.
    pub(super) const fn public_text(tag: &'static str, summary: &'static str, content_type: &'static str) -> Self {
        Doc {
            response: Response::Text(content_type),
            ..Self::public(tag, summary, "")
        }
    }

    /// A route without a token answering any JSON.
    pub(super) const fn public_any_json(tag: &'static str, summary: &'static str) -> Self {
        Doc {
            response: Response::AnyJson,
            ..Self::public(tag, summary, "")
        }
    }

    /// The same route with query parameters (name, description).
    pub(super) const fn query(self, query: &'static [(&'static str, &'static str)]) -> Self {
        Doc { query, ..self }
    }

    /// The same route behind a read token (for probes when the config asks for one).
    pub(super) const fn with_token(self) -> Self {
        match self.access {
            Access::Public => Doc {
                access: Access::Read,
                ..self
            },
            _ => self,
        }
    }
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn operation(verb: Verb, path: &str, doc: &Doc) -> Value {
    let mut parameters: Vec<Value> = path
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    parameters.extend(
        doc.query
            .iter()
            .map(|(name, description)| json!({ "name": name, "in": "query", "required": false, "description": description, "schema": { "type": "string" } })),
    );

    let body = match doc.response {
        Response::Schema(schema) => {
            json!({ "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } })
        }
        Response::AnyJson => json!({ "application/json": { "schema": {} } }),
        Response::Text(content_type) => json!({ content_type: { "schema": { "type": "string" } } }),
    };
    let mut responses = Map::new();
    responses.insert(
        doc.status.to_string(),
        json!({ "description": "success", "content": body }),
    );
    if !parameters.is_empty() || doc.request.is_some() {
        responses.insert(
            "400".into(),
            error_response("invalid input: names the parameter or field"),
        );
    }
    if doc.access != Access::Public {
        responses.insert("401".into(), error_response("no valid bearer token"));
        responses.insert(
            "429".into(),
            error_response("this token's rate limit; see `Retry-After`"),
        );
    }
    if doc.access == Access::Write {
        responses.insert("403".into(), error_response("a read-only token"));
    }
    if path.contains('{') {
        responses.insert("404".into(), error_response("not found"));
    }
    if doc.request.is_some() {
        responses.insert("413".into(), error_response("the body is over the limit"));
    }
    if path == "/health/ready" {
        responses.insert("503".into(), json!({ "description": "the store or the bus is unavailable", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Health" } } } }));
    }

    let mut op = json!({
        "operationId": format!("{}{}", verb.as_str(), path.replace(['/', '{', '}'], "_")),
        "summary": doc.summary,
        "tags": [doc.tag],
        "parameters": parameters,
        "responses": responses,
    });
    if let Some(schema) = doc.request {
        op["requestBody"] = json!({
            "required": true,
            "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
        });
    }
    if doc.access == Access::Public {
        op["security"] = json!([]);
    }
    op
}

/// The document for `routes`.
pub(super) fn document(routes: &[RouteDoc]) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let item = paths.entry(route.path).or_insert_with(|| json!({}));
        item[route.verb.as_str()] = operation(route.verb, route.path, &route.doc);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "opamp fleet REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Devices, commands, configuration templates, rollouts and supervisors of an opamp fleet. Errors are {\"error\":{\"code\",\"message\"}} with stable codes."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas(),
        },
        "security": [ { "bearer": [] } ],
        "paths": paths,
    })
}

/// Serves the document.
pub(super) async fn serve(State(api): State<Api>) -> Json<Value> {
    Json((*api.openapi).clone())
}

fn string() -> Value {
    json!({ "type": "string" })
}

fn nullable_string() -> Value {
    json!({ "type": ["string", "null"] })
}

fn labels() -> Value {
    json!({ "type": "object", "additionalProperties": { "type": "string" } })
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn page_of(item: &str) -> Value {
    json!({
        "type": "object",
        "required": ["items"],
        "properties": { "items": { "type": "array", "items": reference(item) }, "next": nullable_string() }
    })
}

fn schemas() -> Value {
    let config_ref = json!({
        "type": "object",
        "required": ["agent_type", "version"],
        "properties": { "agent_type": string(), "version": string() }
    });
    let mut all = json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": { "type": "string", "enum": super::error::CODES },
                    "message": string()
                }
            } }
        },
        "DeviceStatus": {
            "type": "object",
            "required": ["device_id", "status", "emission", "labels"],
            "properties": {
                "device_id": string(),
                "status": { "type": "string", "enum": ["online", "offline"] },
                "supervisor": nullable_string(),
                "emission": { "type": "boolean" },
                "config_version": nullable_string(),
                "config_hash": nullable_string(),
                "agent_type": nullable_string(),
                "last_seen": nullable_string(),
                "connected_at": nullable_string(),
                "labels": labels(),
                "last_error": nullable_string()
            }
        },
        "DevicePage": page_of("DeviceStatus"),
        "DeviceDetail": {
            "allOf": [ reference("DeviceStatus"), {
                "type": "object",
                "properties": {
                    "owner": nullable_string(),
                    "desired": { "oneOf": [ reference("ConfigRef"), { "type": "null" } ] },
                    "revoked": { "oneOf": [ reference("Revocation"), { "type": "null" } ] }
                }
            } ]
        },
        "Emission": {
            "type": "object",
            "required": ["on"],
            "properties": { "on": { "type": "boolean" } }
        },
        "ConfigRef": config_ref,
        "Target": {
            "description": "One device, or every device of an agent type whose labels include the given ones.",
            "oneOf": [
                { "type": "object", "required": ["device"], "properties": { "device": string() } },
                { "type": "object", "required": ["agent_type"], "properties": { "agent_type": string(), "labels": labels() } }
            ]
        },
        "ApplyConfig": {
            "type": "object",
            "required": ["target", "config"],
            "properties": { "target": reference("Target"), "config": reference("ConfigRef") }
        },
        "Issued": {
            "type": "object",
            "required": ["device", "correlation_id"],
            "properties": { "device": string(), "correlation_id": { "type": "string", "format": "uuid" } }
        },
        "IssuedList": {
            "type": "object",
            "required": ["issued"],
            "properties": { "issued": { "type": "array", "items": reference("Issued") } }
        },
        "CommandRecord": {
            "type": "object",
            "required": ["correlation_id", "device", "command", "state", "attempts"],
            "properties": {
                "correlation_id": { "type": "string", "format": "uuid" },
                "device": string(),
                "command": { "type": "object", "description": "the command as it went on the bus (the design's Appendix B JSON)" },
                "supervisor": string(),
                "state": { "type": "string", "enum": ["pending", "deferred", "acked", "failed", "timed_out", "device_offline", "unsupported"] },
                "attempts": { "type": "integer" },
                "completed_at": string(),
                "reason": string(),
                "initiated_by": { "type": "string", "description": "the name of the API token that issued it" }
            }
        }
    });
    // Two halves: one `json!` of all of them is past the macro recursion limit.
    let more = json!({
        "ConfigFile": {
            "type": "object",
            "properties": { "content_type": string(), "text": string(), "base64": string() },
            "description": "`text` for UTF-8 bodies, `base64` for others; exactly one."
        },
        "Bundle": { "type": "object", "additionalProperties": reference("ConfigFile") },
        "TemplateBody": {
            "type": "object",
            "required": ["bundle"],
            "properties": { "bundle": reference("Bundle") }
        },
        "Template": {
            "type": "object",
            "required": ["agent_type", "config_version", "bundle"],
            "properties": {
                "agent_type": string(),
                "config_version": string(),
                "bundle": reference("Bundle"),
                "created_by": string(),
                "created_at": string(),
                "hash": string()
            }
        },
        "TemplateVersions": {
            "type": "object",
            "required": ["agent_type", "versions"],
            "properties": {
                "agent_type": string(),
                "versions": { "type": "array", "items": string() },
                "latest": nullable_string()
            }
        },
        "Latest": {
            "type": "object",
            "required": ["version"],
            "properties": { "version": string() }
        },
        "RolloutRequest": {
            "type": "object",
            "required": ["config"],
            "description": "Rolls `config` out to every device of its agent type carrying `labels`, in waves: `canary` devices, then each wave `growth` times the last, at most `max_wave`; pauses when a wave's failures exceed `failure_threshold`.",
            "properties": {
                "config": reference("ConfigRef"),
                "labels": labels(),
                "canary": { "type": "integer", "minimum": 1 },
                "growth": { "type": "integer", "minimum": 1 },
                "max_wave": { "type": "integer", "minimum": 1 },
                "failure_threshold": { "type": "number", "minimum": 0, "maximum": 1 }
            }
        },
        "Tally": {
            "type": "object",
            "properties": {
                "pending": { "type": "integer" },
                "acked": { "type": "integer" },
                "deferred": { "type": "integer" },
                "failed": { "type": "integer" }
            }
        },
        "Rollout": {
            "type": "object",
            "required": ["id", "spec", "state", "waves", "totals"],
            "properties": {
                "id": { "type": "string", "format": "uuid" },
                "spec": { "type": "object", "description": "the config (`agent_type`, `config_version`), labels and wave settings" },
                "state": { "type": "string", "enum": ["running", "paused", "completed", "aborted"] },
                "reason": { "type": "string", "description": "why it is paused" },
                "revision": { "type": "integer" },
                "created_at": string(),
                "updated_at": string(),
                "waves": { "type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "number": { "type": "integer" },
                        "tally": reference("Tally"),
                        "started_at": string(),
                        "finished_at": string(),
                        "commands": { "type": "array", "items": reference("Issued") }
                    }
                } },
                "exhausted": { "type": "boolean" },
                "started_by": { "type": "string", "description": "the name of the API token that started it" },
                "totals": reference("Tally")
            }
        },
        "RolloutPage": page_of("Rollout"),
        "Revocation": {
            "type": "object",
            "required": ["device_id", "reason", "revoked_at"],
            "properties": {
                "device_id": string(),
                "reason": string(),
                "revoked_at": { "type": "string", "format": "date-time" },
                "revoked_by": { "type": "string", "description": "the name of the API token that revoked it" }
            }
        },
        "RevocationPage": page_of("Revocation"),
        "Revoke": {
            "type": "object",
            "properties": { "reason": { "type": "string", "maxLength": 1024, "description": "why, kept with the revocation (no control characters)" } }
        },
        "Revoked": {
            "type": "object",
            "required": ["revocation", "created"],
            "properties": {
                "revocation": reference("Revocation"),
                "created": { "type": "boolean", "description": "false: the device was revoked already, and the first revocation stays" },
                "disconnect": {
                    "oneOf": [ { "type": "string", "format": "uuid" }, { "type": "null" } ],
                    "description": "the command closing the device's session, when a supervisor held it"
                }
            }
        },
        "Supervisors": {
            "type": "object",
            "required": ["items"],
            "properties": { "items": { "type": "array", "items": {
                "type": "object",
                "required": ["supervisor", "devices"],
                "properties": { "supervisor": string(), "devices": { "type": "integer" } }
            } } }
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": { "status": { "type": "string", "enum": ["ok", "unavailable"] }, "reason": string() }
        }
    });
    if let (Some(all), Value::Object(more)) = (all.as_object_mut(), more) {
        all.extend(more);
    }
    all
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::super::assemble;
    use super::super::auth::{ApiToken, Role, Tokens};
    use super::*;

    fn routes(probes_need_token: bool) -> super::super::Routes {
        let token = ApiToken::new("ops", "operator-secret-0001", Role::Operator).unwrap();
        assemble(Arc::new(Tokens::new(&[token], None).unwrap()), probes_need_token)
    }

    /// Every `$ref` in `value`.
    fn refs(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    out.insert(target.clone());
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_route_is_documented_once_and_every_ref_resolves() {
        let routes = routes(false);
        let doc = document(&routes.docs);
        let mut served = BTreeSet::new();
        for route in &routes.docs {
            assert!(
                served.insert((route.path, route.verb)),
                "{} {} added twice",
                route.verb.as_str(),
                route.path
            );
            let op = &doc["paths"][route.path][route.verb.as_str()];
            assert!(
                op["summary"].is_string(),
                "{} {} is not in the document",
                route.verb.as_str(),
                route.path
            );
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(
            documented,
            served.len(),
            "the document has operations the router does not serve"
        );
        for path in [
            "/api/v1/devices",
            "/api/v1/rollouts/{id}/abort",
            "/health/ready",
            "/metrics",
            "/openapi.json",
            "/",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }

        let mut targets = BTreeSet::new();
        refs(&doc, &mut targets);
        for target in targets {
            let name = target.strip_prefix("#/components/schemas/").expect("a schema ref");
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{target} does not resolve"
            );
        }
    }

    #[test]
    fn access_is_documented() {
        let doc = document(&routes(false).docs);
        let emission = &doc["paths"]["/api/v1/devices/{device}/emission"]["post"];
        assert!(emission["responses"]["403"].is_object());
        assert!(emission["responses"]["401"].is_object());
        assert_eq!(emission["parameters"][0]["name"], "device");
        assert_eq!(doc["paths"]["/health/live"]["get"]["security"], json!([]));
        let guarded = document(&routes(true).docs);
        assert!(guarded["paths"]["/health/live"]["get"].get("security").is_none());
        assert!(guarded["paths"]["/metrics"]["get"]["responses"]["401"].is_object());
    }
}
