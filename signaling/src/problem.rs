//! HTTP errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Every error response of API v1 is an [`ApiError`] turned into a [`Problem`] body
//! `{"type","title","status","detail","code"}`. `type` is `about:blank` (the status says what
//! kind of problem it is), `title` the status phrase, `detail` a human explanation, and `code`
//! an extension member with a stable machine-readable reason (`no_audio`, `token_expired`...).
//! 401 adds `WWW-Authenticate: Bearer`; 429 and 503 add `Retry-After` (seconds). A 500 never
//! shows its cause to the client: the cause is logged and the body says "internal error".

use std::borrow::Cow;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::token::TokenError;

/// `Content-Type` of problem bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem+json body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Problem type URI; `about:blank`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The status phrase, e.g. `Not Found`.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for humans.
    pub detail: String,
    /// Stable machine-readable reason (extension member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Why a request failed: a stable `code` and a human `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// Machine-readable, snake_case.
    pub code: Cow<'static, str>,
    /// Human-readable.
    pub detail: Cow<'static, str>,
}

impl Reason {
    /// A reason from a code and a detail.
    pub fn new(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        Reason { code: code.into(), detail: detail.into() }
    }
}

/// An error of the HTTP API: one variant per status the contract uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: unparsable request (bad JSON, unparsable SDP or sdpfrag).
    #[error("400 bad request: {}", .0.detail)]
    BadRequest(Reason),
    /// 401: missing or invalid API key or session token.
    #[error("401 unauthorized: {}", .0.detail)]
    Unauthorized(Reason),
    /// 403: authenticated, but the credential's role may not do this (a user key or a
    /// signed-in user without the admin role on `/v1/admin/`).
    #[error("403 forbidden: {}", .0.detail)]
    Forbidden(Reason),
    /// 404: unknown route, session, peer or character; or the session already ended.
    #[error("404 not found: {}", .0.detail)]
    NotFound(Reason),
    /// 405: the route exists, the method does not.
    #[error("405 method not allowed: {}", .0.detail)]
    MethodNotAllowed(Reason),
    /// 409: the session is already connected or ended.
    #[error("409 conflict: {}", .0.detail)]
    Conflict(Reason),
    /// 412: `If-Match` does not match the peer's current ETag.
    #[error("412 precondition failed: {}", .0.detail)]
    PreconditionFailed(Reason),
    /// 413: body over the limit.
    #[error("413 payload too large: {}", .0.detail)]
    PayloadTooLarge(Reason),
    /// 415: wrong `Content-Type`.
    #[error("415 unsupported media type: {}", .0.detail)]
    UnsupportedMediaType(Reason),
    /// 422: well-formed but unacceptable (offer without audio, data channel, fingerprint...).
    #[error("422 unprocessable: {}", .0.detail)]
    Unprocessable(Reason),
    /// 428: `If-Match` required.
    #[error("428 precondition required: {}", .0.detail)]
    PreconditionRequired(Reason),
    /// 429: slow down; retry after the given time.
    #[error("429 too many requests: {}", reason.detail)]
    TooManyRequests {
        /// Why.
        reason: Reason,
        /// Sent as `Retry-After` (whole seconds, at least 1).
        retry_after: Duration,
    },
    /// 503: draining or not ready; retry after the given time.
    #[error("503 unavailable: {}", reason.detail)]
    Unavailable {
        /// Why.
        reason: Reason,
        /// Sent as `Retry-After` (whole seconds, at least 1).
        retry_after: Duration,
    },
    /// 500: a bug or an unexpected failure. The detail is logged, never sent.
    #[error("500 internal error: {0}")]
    Internal(String),
    /// 307: the session lives on another node; the router sends the client to the same path
    /// under this base URL (`Location`), method and body preserved.
    #[error("307 session hosted elsewhere: {0}")]
    Elsewhere(String),
}

/// Response extension carrying an [`ApiError::Elsewhere`] base URL to the router's middleware,
/// which knows the request path and writes `Location`.
#[derive(Debug, Clone)]
pub struct RedirectBase(pub String);

impl ApiError {
    /// 400.
    pub fn bad_request(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        ApiError::BadRequest(Reason::new(code, detail))
    }

    /// 401.
    pub fn unauthorized(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        ApiError::Unauthorized(Reason::new(code, detail))
    }

    /// 403.
    pub fn forbidden(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        ApiError::Forbidden(Reason::new(code, detail))
    }

    /// 404.
    pub fn not_found(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        ApiError::NotFound(Reason::new(code, detail))
    }

    /// 404 for a session id the host does not know.
    pub fn unknown_session() -> Self {
        Self::not_found("unknown_session", "no such session")
    }

    /// 404 for a session that has ended (e.g. a second DELETE).
    pub fn session_already_ended() -> Self {
        Self::not_found("session_ended", "session already ended")
    }

    /// 404 for a peer id the session does not know.
    pub fn unknown_peer() -> Self {
        Self::not_found("unknown_peer", "no such peer")
    }

    /// 404 for a character id the host does not know.
    pub fn unknown_character(id: &str) -> Self {
        Self::not_found("unknown_character", format!("no character {id:?}"))
    }

    /// 409.
    pub fn conflict(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        ApiError::Conflict(Reason::new(code, detail))
    }

    /// 409: the session already has a connected peer.
    pub fn already_connected() -> Self {
        Self::conflict("already_connected", "session already connected")
    }

    /// 409: an offer for a session that has ended.
    pub fn offer_after_end() -> Self {
        Self::conflict("session_ended", "session already ended")
    }

    /// 422 from a host that cannot restart ICE (the contract allows it).
    pub fn ice_restart_unsupported() -> Self {
        Self::unprocessable(
            "ice_restart_unsupported",
            "If-Match: \"*\" is an ICE restart: send the new a=ice-ufrag and a=ice-pwd (RFC 9725 §4.3.2)",
        )
    }

    /// 412 for a stale `If-Match`.
    pub fn stale_etag() -> Self {
        ApiError::PreconditionFailed(Reason::new(
            "etag_mismatch",
            "If-Match does not match the current ETag of this peer",
        ))
    }

    /// 413.
    pub fn payload_too_large(limit: usize) -> Self {
        ApiError::PayloadTooLarge(Reason::new("body_too_large", format!("request body exceeds {limit} bytes")))
    }

    /// 415.
    pub fn unsupported_media_type(expected: &str) -> Self {
        ApiError::UnsupportedMediaType(Reason::new(
            "unsupported_media_type",
            format!("Content-Type must be {expected}"),
        ))
    }

    /// 422.
    pub fn unprocessable(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        ApiError::Unprocessable(Reason::new(code, detail))
    }

    /// 503 + `Retry-After`.
    pub fn unavailable(detail: impl Into<Cow<'static, str>>, retry_after: Duration) -> Self {
        ApiError::Unavailable { reason: Reason::new("unavailable", detail), retry_after }
    }

    /// 429 + `Retry-After`.
    pub fn too_many_requests(detail: impl Into<Cow<'static, str>>, retry_after: Duration) -> Self {
        ApiError::TooManyRequests { reason: Reason::new("rate_limited", detail), retry_after }
    }

    /// 307 to the node at `base_url` (e.g. `http://10.0.0.2:8080`).
    pub fn elsewhere(base_url: impl Into<String>) -> Self {
        ApiError::Elsewhere(base_url.into())
    }

    /// 500; `cause` is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        ApiError::Internal(cause.to_string())
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PreconditionRequired(_) => StatusCode::PRECONDITION_REQUIRED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Elsewhere(_) => StatusCode::TEMPORARY_REDIRECT,
        }
    }

    /// The problem body this error is sent as.
    pub fn to_problem(&self) -> Problem {
        let status = self.status();
        let (code, detail): (&str, &str) = match self {
            ApiError::BadRequest(r)
            | ApiError::Unauthorized(r)
            | ApiError::Forbidden(r)
            | ApiError::NotFound(r)
            | ApiError::MethodNotAllowed(r)
            | ApiError::Conflict(r)
            | ApiError::PreconditionFailed(r)
            | ApiError::PayloadTooLarge(r)
            | ApiError::UnsupportedMediaType(r)
            | ApiError::Unprocessable(r)
            | ApiError::PreconditionRequired(r)
            | ApiError::TooManyRequests { reason: r, .. }
            | ApiError::Unavailable { reason: r, .. } => (&r.code, &r.detail),
            ApiError::Internal(_) => ("internal", "internal error"),
            ApiError::Elsewhere(_) => ("session_elsewhere", "this session is hosted by another node; follow Location"),
        };
        Problem {
            type_: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.to_owned(),
            code: Some(code.to_owned()),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        ApiError::unauthorized(e.code(), e.to_string())
    }
}

fn retry_after_value(d: Duration) -> HeaderValue {
    let secs = d.as_secs().max(1) + u64::from(d.subsec_nanos() > 0 && d.as_secs() >= 1);
    HeaderValue::from(secs)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.to_problem();
        match &self {
            ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
            other => {
                tracing::debug!(status = problem.status, code = ?problem.code, "request failed: {}", other)
            }
        }
        let body = serde_json::to_vec(&problem)
            .unwrap_or_else(|_| br#"{"type":"about:blank","title":"Internal Server Error","status":500}"#.to_vec());
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManyRequests { retry_after, .. } | ApiError::Unavailable { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_after_value(*retry_after));
            }
            ApiError::Elsewhere(base) => {
                response.extensions_mut().insert(RedirectBase(base.clone()));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_millis(200)), "1");
        assert_eq!(retry_after_value(Duration::from_secs(5)), "5");
        assert_eq!(retry_after_value(Duration::from_millis(5_500)), "6");
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let p = ApiError::internal("db password is hunter2").to_problem();
        assert_eq!(p.status, 500);
        assert!(!p.detail.contains("hunter2"), "{p:?}");
    }

    #[test]
    fn problem_has_the_rfc9457_members() {
        let p = ApiError::unprocessable("no_audio", "no audio").to_problem();
        let json = serde_json::to_value(&p).expect("problem serialises");
        assert_eq!(json["type"], "about:blank");
        assert_eq!(json["title"], "Unprocessable Entity");
        assert_eq!(json["status"], 422);
        assert_eq!(json["detail"], "no audio");
        assert_eq!(json["code"], "no_audio");
    }
}
