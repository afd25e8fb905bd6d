//! JSON errors with stable codes, and the extractors that produce them.
//!
//! Every error the API answers has the body
//! `{"error":{"code":"not_found","message":"device dev-9 is not known"}}`.
//! The `code` is stable and machine-readable; the `message` names what was
//! wrong for a human. axum's own rejections (bad JSON, a missing content
//! type, an oversized body, an unknown route) are turned into this shape too.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use opamp_core::Error;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every `code` an error body can carry; documented in the OpenAPI document and `docs/rest-api.md`.
pub(crate) const CODES: &[&str] = &[
    "not_found",
    "route_not_found",
    "method_not_allowed",
    "already_exists",
    "not_owner",
    "invalid_input",
    "invalid_query",
    "malformed_json",
    "malformed_body",
    "unsupported_media_type",
    "payload_too_large",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "unavailable",
    "timeout",
    "unsupported",
    "backend",
    "internal",
];

/// An error answered by the API: an HTTP status, a stable code and a message.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn rate_limited(retry_after_secs: u64) -> Self {
        let mut err = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests with this token; retry after {retry_after_secs} s"),
        );
        err.retry_after = Some(retry_after_secs);
        err
    }

    /// The message, for checks that every refusal says what was wrong.
    #[cfg(feature = "testkit")]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status.
    #[cfg(feature = "testkit")]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code, e.g. `not_found`.
    #[cfg(test)]
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The core error kinds, each with its status and stable code.
impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let (status, code) = match &err {
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Error::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists"),
            Error::NotOwner(_) => (StatusCode::CONFLICT, "not_owner"),
            Error::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "invalid_input"),
            Error::Unauthenticated { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Error::Unsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
            Error::DataLoss { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "data_loss"),
            Error::Backend { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "backend"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            // The cause may hold backend detail the client should not see; keep it in the log.
            tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "REST API request failed");
        }
        ApiError::new(status, code, err.to_string())
    }
}

/// The API's result type.
pub(crate) type ApiResult<T> = std::result::Result<T, ApiError>;

fn from_bytes_rejection(rejection: &BytesRejection) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(err) = cause {
        if let Some(late) = err.downcast_ref::<super::serve::BodyTimedOut>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", late.to_string());
        }
        cause = err.source();
    }
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this API accepts",
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            format!("the request body could not be read: {}", rejection.body_text()),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match &rejection {
            JsonRejection::JsonSyntaxError(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the request body is not valid JSON: {}", rejection.body_text()),
            ),
            // serde names the field and what was wrong with it (an invalid id, a missing field).
            JsonRejection::JsonDataError(_) => ApiError::invalid_input(rejection.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the request body must be JSON, sent with `Content-Type: application/json`",
            ),
            JsonRejection::BytesRejection(bytes) => from_bytes_rejection(bytes),
            _ => ApiError::new(rejection.status(), "malformed_body", rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rejection.body_text())
    }
}

/// A JSON body whose rejections are API errors.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(value)| ApiJson(value))
            .map_err(ApiError::from)
    }
}

/// Path parameters whose rejections (bad percent-encoding) are API errors.
#[derive(Debug, Clone)]
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection| ApiError::invalid_input(format!("path: {}", rejection.body_text())))
    }
}

/// The query string as `key=value` pairs (keys may repeat, e.g. `label`), rejections as API errors.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueryPairs(pub(crate) Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map(|query| QueryPairs(query.0))
            .map_err(ApiError::from)
    }
}

/// The answer for a path no route matches.
pub(crate) async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

/// The answer for a route that exists, asked with a method it does not serve.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_kinds_map_to_stable_codes() {
        let cases = [
            (Error::not_found("device d"), StatusCode::NOT_FOUND, "not_found"),
            (Error::already_exists("t"), StatusCode::CONFLICT, "already_exists"),
            (Error::invalid_input("x"), StatusCode::BAD_REQUEST, "invalid_input"),
            (Error::unauthenticated("x"), StatusCode::UNAUTHORIZED, "unauthorized"),
            (
                Error::unavailable("redis"),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (Error::timeout("claim"), StatusCode::GATEWAY_TIMEOUT, "timeout"),
            (Error::unsupported("x"), StatusCode::NOT_IMPLEMENTED, "unsupported"),
            (
                Error::backend("redis", "GET k", std::io::Error::other("boom")),
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend",
            ),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from(err);
            assert_eq!((api.status, api.code()), (status, code));
        }
    }

    #[test]
    fn rate_limited_carries_retry_after_and_401_a_challenge() {
        let response = ApiError::rate_limited(3).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let response = ApiError::unauthorized("no token").into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
