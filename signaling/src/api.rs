//! The axum router for HTTP API v1 (`/work/shared/docs/api-v1.md` is the contract).
//!
//! | route | auth | success |
//! |---|---|---|
//! | `GET /healthz` | none | 200 |
//! | `GET /readyz` | none | 200, or 503 problem + `Retry-After` while not accepting |
//! | `GET /v1/characters` | none | 200 JSON array |
//! | `POST /v1/sessions` | API key when configured | 201 JSON + `Location` |
//! | `POST /v1/sessions/{id}/offer` | session token (connect) | 201 `application/sdp` + `Location` + `ETag` |
//! | `PATCH /v1/sessions/{id}/peers/{peer_id}` | session token (manage) | 204, or 200 sdpfrag + `ETag` (ICE restart) |
//! | `DELETE /v1/sessions/{id}/peers/{peer_id}`, `DELETE /v1/sessions/{id}` | session token (manage) or API key | 200 JSON |
//! | `GET /v1/sessions/{id}` | session token (manage) or API key | 200 JSON |
//! | `GET /v1/sessions/{id}/transcript` | session token (manage) or API key | 200 JSON array |
//!
//! Checks run in this order, so the first failing one decides the status: path ids (404 for
//! ids that cannot be ours), credentials (401), `Content-Type` (415), `If-Match` (428), body
//! size (413, read with our own limit so it is a problem+json), body syntax (400), the
//! session's existence (404), semantic checks (422), then the host (404/409/412/422/503).
//! Unknown routes are 404 and wrong methods 405, both problem+json. Every error is an
//! [`ApiError`]. Responses that carry a token or session data are `Cache-Control: no-store`.
//! Nothing here logs headers, bodies or tokens.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MATCH, LOCATION};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Serialize;
use time::OffsetDateTime;

use crate::auth::{ApiKeys, bearer};
use crate::host::{IfMatch, SessionHost, SessionState, TrickleOutcome, TrickleRequest};
use crate::ice::IceServer;
use crate::id::is_valid_id;
use crate::problem::{ApiError, Reason};
use crate::sdp::{
    APPLICATION_SDP, MAX_OFFER_BYTES, MAX_SDPFRAG_BYTES, TRICKLE_ICE_SDPFRAG, parse_trickle_sdpfrag, validate_offer,
};
use crate::token::{TokenError, TokenIssuer, VerifyMode};

/// Largest `POST /v1/sessions` JSON body (16 KiB).
pub const MAX_JSON_BYTES: usize = 16 * 1024;

/// Size limits and back-off hints of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest SDP offer (default 64 KiB, the contract's 413 threshold).
    pub max_offer_bytes: usize,
    /// Largest trickle-ICE sdpfrag.
    pub max_sdpfrag_bytes: usize,
    /// Largest JSON request body.
    pub max_json_bytes: usize,
    /// `Retry-After` when not accepting sessions (readyz, POST /v1/sessions).
    pub retry_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_offer_bytes: MAX_OFFER_BYTES,
            max_sdpfrag_bytes: MAX_SDPFRAG_BYTES,
            max_json_bytes: MAX_JSON_BYTES,
            retry_after: Duration::from_secs(5),
        }
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Whoever hosts sessions.
    pub host: Arc<dyn SessionHost>,
    /// Issues and verifies session tokens.
    pub tokens: Arc<TokenIssuer>,
    /// Configured API keys (empty = open).
    pub api_keys: Arc<ApiKeys>,
    /// Limits.
    pub limits: Limits,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("tokens", &self.tokens)
            .field("api_keys", &self.api_keys)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// State with no API keys and default limits.
    pub fn new(host: Arc<dyn SessionHost>, tokens: TokenIssuer) -> Self {
        ApiState { host, tokens: Arc::new(tokens), api_keys: Arc::new(ApiKeys::default()), limits: Limits::default() }
    }

    /// With these API keys.
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Arc::new(keys);
        self
    }

    /// With these limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// The API v1 routes without fallbacks, for merging into a larger app (which then owns the
/// fallbacks; use [`not_found`] and [`method_not_allowed`] to keep them problem+json).
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/characters", get(characters))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/offer", post(offer))
        .route("/v1/sessions/{id}/transcript", get(transcript))
        .route("/v1/sessions/{id}/peers/{peer_id}", patch(trickle).delete(delete_peer))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The complete API v1 router: [`routes`] plus problem+json 404 and 405 fallbacks.
pub fn router(state: ApiState) -> Router {
    routes(state).fallback(not_found)
}

/// Fallback for unknown routes: 404 problem+json.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no_route", "no such route")
}

/// Fallback for a known route with another method: 405 problem+json (axum adds `Allow`).
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed(Reason::new("method_not_allowed", "method not allowed on this route"))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

async fn readyz(State(st): State<ApiState>) -> Result<Response, ApiError> {
    if !st.host.accepting() {
        return Err(ApiError::unavailable("not accepting sessions (draining or starting)", st.limits.retry_after));
    }
    Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})))
}

async fn characters(State(st): State<ApiState>) -> Response {
    json_response(StatusCode::OK, &st.host.characters().await)
}

/// `201` body of `POST /v1/sessions`.
#[derive(Debug, Serialize)]
struct CreateSessionResponse {
    session_id: String,
    token: crate::token::SessionToken,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    ice_servers: Vec<IceServer>,
    offer_url: String,
}

async fn create_session(State(st): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    require_api_key(&st, &headers)?;
    if !st.host.accepting() {
        return Err(ApiError::unavailable("not accepting new sessions (draining)", st.limits.retry_after));
    }
    let bytes = read_body(body, &headers, st.limits.max_json_bytes).await?;
    let request = if bytes.iter().all(u8::is_ascii_whitespace) {
        Default::default()
    } else {
        if !is_json(&headers) {
            return Err(ApiError::unsupported_media_type("application/json"));
        }
        parse_session_request(&bytes)?
    };
    let created = st.host.create_session(request).await?;
    if !is_valid_id(&created.session_id) {
        return Err(ApiError::internal("host returned a session id that is not URL safe"));
    }
    let issued = st.tokens.issue(&created.session_id).map_err(ApiError::internal)?;
    let location = format!("/v1/sessions/{}", created.session_id);
    let body = CreateSessionResponse {
        offer_url: format!("{location}/offer"),
        session_id: created.session_id,
        token: issued.token,
        expires_at: issued.expires_at,
        ice_servers: created.ice_servers,
    };
    let mut response = json_response(StatusCode::CREATED, &body);
    insert_header(&mut response, LOCATION, &location)?;
    no_store(&mut response);
    Ok(response)
}

/// A JSON object only: serde would also accept a struct written as an array.
fn parse_session_request(bytes: &[u8]) -> Result<crate::host::CreateSessionRequest, ApiError> {
    let bad = |detail: String| ApiError::bad_request("bad_json", detail);
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid session request: {e}")))?;
    if !value.is_object() {
        return Err(bad("session request must be a JSON object".to_owned()));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("invalid session request: {e}")))
}

async fn offer(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = session_id(path)?;
    authorize_token(&st, &headers, &id, VerifyMode::Connect)?;
    require_content_type(&headers, APPLICATION_SDP)?;
    let bytes = read_body(body, &headers, st.limits.max_offer_bytes).await?;
    // Existence first: no point telling a client to fix the SDP of a session that is gone.
    let session = st.host.session(&id).await?;
    if session.state == SessionState::Ended {
        return Err(ApiError::offer_after_end());
    }
    let offer = validate_offer(&bytes)?;
    let answer = st.host.offer(&id, offer).await?;
    if !is_valid_id(&answer.peer_id) {
        return Err(ApiError::internal("host returned a peer id that is not URL safe"));
    }
    let mut response = (StatusCode::CREATED, answer.sdp).into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(APPLICATION_SDP));
    insert_header(&mut response, LOCATION, &format!("/v1/sessions/{id}/peers/{}", answer.peer_id))?;
    insert_header(&mut response, ETAG, &answer.etag.header_value())?;
    no_store(&mut response);
    Ok(response)
}

async fn trickle(
    State(st): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, peer_id) = peer_path(path)?;
    authorize_token(&st, &headers, &id, VerifyMode::Manage)?;
    require_content_type(&headers, TRICKLE_ICE_SDPFRAG)?;
    let if_match = match headers.get(IF_MATCH) {
        None => {
            return Err(ApiError::PreconditionRequired(Reason::new(
                "if_match_required",
                "PATCH requires If-Match with the peer's ETag (or \"*\" for an ICE restart)",
            )));
        }
        Some(value) => IfMatch::parse(
            value.to_str().map_err(|_| ApiError::bad_request("bad_if_match", "If-Match is not visible ASCII"))?,
        ),
    };
    let bytes = read_body(body, &headers, st.limits.max_sdpfrag_bytes).await?;
    let frag = parse_trickle_sdpfrag(&bytes)?;
    let request = if if_match == IfMatch::Any && frag.has_credentials() {
        TrickleRequest::IceRestart { frag }
    } else {
        TrickleRequest::Candidates { if_match, frag }
    };
    match st.host.trickle(&id, &peer_id, request).await? {
        TrickleOutcome::Added => Ok(StatusCode::NO_CONTENT.into_response()),
        TrickleOutcome::Restarted { sdpfrag, etag } => {
            let mut response = (StatusCode::OK, sdpfrag).into_response();
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(TRICKLE_ICE_SDPFRAG));
            insert_header(&mut response, ETAG, &etag.header_value())?;
            no_store(&mut response);
            Ok(response)
        }
    }
}

async fn delete_session(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(path)?;
    authorize_token_or_key(&st, &headers, &id)?;
    st.host.end(&id, None).await?;
    Ok(ended_response(&id))
}

async fn delete_peer(
    State(st): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (id, peer_id) = peer_path(path)?;
    authorize_token_or_key(&st, &headers, &id)?;
    st.host.end(&id, Some(&peer_id)).await?;
    Ok(ended_response(&id))
}

fn ended_response(id: &str) -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"session_id": id, "state": SessionState::Ended}))
}

async fn get_session(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(path)?;
    authorize_token_or_key(&st, &headers, &id)?;
    let info = st.host.session(&id).await?;
    let mut response = json_response(StatusCode::OK, &info);
    no_store(&mut response);
    Ok(response)
}

async fn transcript(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(path)?;
    authorize_token_or_key(&st, &headers, &id)?;
    let entries = st.host.transcript(&id).await?;
    let mut response = json_response(StatusCode::OK, &entries);
    no_store(&mut response);
    Ok(response)
}

// ---- helpers -------------------------------------------------------------------------------

fn session_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) if is_valid_id(&id) => Ok(id),
        _ => Err(ApiError::unknown_session()),
    }
}

fn peer_path(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    match path {
        Ok(Path((id, peer))) if is_valid_id(&id) => {
            if is_valid_id(&peer) {
                Ok((id, peer))
            } else {
                Err(ApiError::unknown_peer())
            }
        }
        _ => Err(ApiError::unknown_session()),
    }
}

fn require_api_key(st: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    if st.api_keys.is_empty() {
        return Ok(());
    }
    match bearer(headers) {
        None => Err(ApiError::unauthorized("api_key_missing", "an API key is required (Authorization: Bearer <key>)")),
        Some(key) if st.api_keys.contains(key) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("api_key_invalid", "invalid API key")),
    }
}

fn authorize_token(st: &ApiState, headers: &HeaderMap, session_id: &str, mode: VerifyMode) -> Result<(), ApiError> {
    let token = bearer(headers).ok_or(TokenError::Missing)?;
    st.tokens.verify(token, session_id, mode)?;
    Ok(())
}

/// The session's own token, or (for operators) an API key. With no API keys configured only
/// the token works: open mode opens session creation, not other sessions' data.
fn authorize_token_or_key(st: &ApiState, headers: &HeaderMap, session_id: &str) -> Result<(), ApiError> {
    let credentials = bearer(headers).ok_or(TokenError::Missing)?;
    if !st.api_keys.is_empty() && st.api_keys.contains(credentials) {
        return Ok(());
    }
    st.tokens.verify(credentials, session_id, VerifyMode::Manage)?;
    Ok(())
}

/// The media type of `Content-Type` without parameters, lowercased.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next()?.trim();
    Some(essence.to_ascii_lowercase())
}

fn require_content_type(headers: &HeaderMap, expected: &'static str) -> Result<(), ApiError> {
    if media_type(headers).as_deref() == Some(expected) {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(expected))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    media_type(headers)
        .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")))
}

/// Read the whole body, refusing (413) as soon as it would exceed `limit`, without trusting
/// `Content-Length` to be honest (but using it to refuse early).
async fn read_body(mut body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|_| ApiError::bad_request("body_unreadable", "could not read the request body"))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ApiError::payload_too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = (status, body).into_response();
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => ApiError::internal(format!("response serialisation failed: {e}")).into_response(),
    }
}

fn insert_header(response: &mut Response, name: http::HeaderName, value: &str) -> Result<(), ApiError> {
    let value = HeaderValue::from_str(value)
        .map_err(|_| ApiError::internal(format!("invalid {name} header value from host")))?;
    response.headers_mut().insert(name, value);
    Ok(())
}

fn no_store(response: &mut Response) {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
