//! The axum router for HTTP API v1 (the contract: the team's `api-v1.md`, summarised in the README).
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
//! | `POST /v1/sessions/{id}/messages` | session token (manage) or API key | 202: `{"text"}` handed to the live session as a user turn |
//! | `GET /v1/users/{user_id}/data` | API key (admin: any user; user key: what it created) | 200 JSON export |
//! | `DELETE /v1/users/{user_id}/data` | API key (as above) | 200 JSON: what was deleted |
//!
//! Beyond the contract (extensions): the offer is single-use per token (a second offer with a
//! token whose `jti` already connected is 401 `token_replayed`, after the 404/409 checks of the
//! session's own state, so a sequential second offer still gets the contract's 409 and the
//! replay guard decides only races and hosts that would accept again); `Idempotency-Key` on
//! `POST /v1/sessions` (same key and body: the same 201 again; another body: 409); rate limits
//! on session creation per API key, or per client IP when open (429 + `Retry-After`); and a
//! host may answer that a session lives on another node, which becomes `307` to the same path
//! there (the WHIP rule), with the method and body preserved.
//!
//! Checks run in this order, so the first failing one decides the status: path ids (404 for
//! ids that cannot be ours), credentials (401), `Content-Type` (415), `If-Match` (428), body
//! size (413, read with our own limit so it is a problem+json), body syntax (400), the
//! session's existence (404), semantic checks (422), then the host (404/409/412/422/503).
//! Unknown routes are 404 and wrong methods 405, both problem+json. Every error is an
//! [`ApiError`]. Responses that carry a token or session data are `Cache-Control: no-store`.
//! Nothing here logs headers, bodies or tokens.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MATCH, LOCATION};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Serialize;
use sha2::Digest as _;
use time::OffsetDateTime;

use crate::auth::{ApiKeyIdentity, ApiKeys, KeyRole, bearer};
use crate::host::{IfMatch, SessionHost, SessionState, TrickleOutcome, TrickleRequest, UserScope};
use crate::ice::IceServer;
use crate::id::is_valid_id;
use crate::identity::{Caller, EndUserVerifier};
use crate::problem::RedirectBase;
use crate::problem::{ApiError, Reason};
use crate::sdp::{
    APPLICATION_SDP, MAX_OFFER_BYTES, MAX_SDPFRAG_BYTES, TRICKLE_ICE_SDPFRAG, parse_trickle_sdpfrag, validate_offer,
};
use crate::short_term::{MemoryShortTerm, ShortTermError, ShortTermStore};
use crate::token::{TokenError, TokenIssuer, VerifyMode};
use crate::turn::IceServerSet;

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
    /// Sessions one API key may create per minute (0: unlimited).
    pub sessions_per_minute_per_key: u32,
    /// Sessions one client IP may create per minute without an API key (0: unlimited).
    pub sessions_per_minute_per_ip: u32,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_offer_bytes: MAX_OFFER_BYTES,
            max_sdpfrag_bytes: MAX_SDPFRAG_BYTES,
            max_json_bytes: MAX_JSON_BYTES,
            retry_after: Duration::from_secs(5),
            sessions_per_minute_per_key: 600,
            sessions_per_minute_per_ip: 120,
            idempotency_ttl: Duration::from_secs(600),
        }
    }
}

/// Largest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Largest `user_id` accepted.
pub const MAX_USER_ID_LEN: usize = 128;

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
    /// Used token ids, idempotency records, rate-limit counters.
    pub short_term: Arc<dyn ShortTermStore>,
    /// STUN/TURN servers: minted into `ice_servers` of every new session and into the `Link`
    /// headers of an ICE restart's 200 (fresh TURN REST credentials).
    pub turn: Arc<IceServerSet>,
    /// End-user identity tokens (OpenID Connect), accepted beside API keys; `None`: keys only.
    pub end_users: Option<Arc<dyn EndUserVerifier>>,
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
        ApiState {
            host,
            tokens: Arc::new(tokens),
            api_keys: Arc::new(ApiKeys::default()),
            limits: Limits::default(),
            short_term: Arc::new(MemoryShortTerm::new()),
            turn: Arc::new(IceServerSet::default()),
            end_users: None,
        }
    }

    /// With these STUN/TURN servers (TURN REST credentials minted per session).
    pub fn with_turn(mut self, turn: IceServerSet) -> Self {
        self.turn = Arc::new(turn);
        self
    }

    /// Also accepting end-user identity tokens verified by `verifier` (then creating a session
    /// always needs a credential, even on loopback).
    pub fn with_end_users(mut self, verifier: Arc<dyn EndUserVerifier>) -> Self {
        self.end_users = Some(verifier);
        self
    }

    /// With this short-term store (Redis for a cluster).
    pub fn with_short_term(mut self, store: Arc<dyn ShortTermStore>) -> Self {
        self.short_term = store;
        self
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
        .route("/v1/sessions/{id}/messages", post(inject))
        .route("/v1/users/{user_id}/data", get(export_user).delete(delete_user))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(redirect_location))
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

/// 200 `{"status":"ready", ...}` or 503 problem + `Retry-After`; both carry the host's
/// [`SessionHost::readiness`] members (e.g. `store`, `queued`, `journal_bytes`).
async fn readyz(State(st): State<ApiState>) -> Response {
    let extra = st.host.readiness();
    if !st.host.accepting() {
        let err = ApiError::unavailable(
            "not accepting sessions (draining, starting or store unavailable)",
            st.limits.retry_after,
        );
        let mut body = serde_json::to_value(err.to_problem()).unwrap_or_default();
        if let Some(obj) = body.as_object_mut() {
            obj.extend(extra);
        }
        let (mut parts, _) = err.into_response().into_parts();
        parts.headers.remove(CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from(serde_json::to_vec(&body).unwrap_or_default()));
    }
    let mut body = serde_json::Map::new();
    body.insert("status".into(), "ready".into());
    body.extend(extra);
    json_response(StatusCode::OK, &body)
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

/// Middleware writing `Location` for an [`ApiError::Elsewhere`] answer (307): the owner's base URL
/// plus this request's path and query. Layer it on every router whose handlers can answer
/// `Elsewhere`.
pub async fn redirect_location(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let mut response = next.run(request).await;
    if let Some(RedirectBase(base)) = response.extensions_mut().remove::<RedirectBase>()
        && let Ok(value) = HeaderValue::from_str(&format!("{}{path}", base.trim_end_matches('/')))
    {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

fn short_term_error(e: ShortTermError) -> ApiError {
    tracing::error!(error = %e, "short-term state unavailable");
    ApiError::unavailable("session state is unavailable; retry shortly", Duration::from_secs(2))
}

/// Admission of a request that creates a session, the one check every creating route makes
/// (`POST /v1/sessions`, Pipecat's `POST /api/offer`, `POST /v1/realtime/client_secrets` and
/// `/v1/realtime/calls`, `POST /v1/characters/{id}/whip`):
///
/// * a node that is draining or still starting answers 503 `unavailable` + `Retry-After`
///   ([`Limits::retry_after`]);
/// * past the sessions-per-minute limit of the request's bucket (its API key or signed-in user,
///   else its client IP `ip`) it answers 429 `rate_limited` + `Retry-After` (the seconds left in
///   the bucket's minute). Both `caller` and `ip` `None` counts nothing (a call placed with a
///   client secret: the secret's minting was counted).
///
/// Errors: those two, or 503 when the short-term store (Redis) is unreachable.
pub async fn admit_creation(st: &ApiState, caller: Option<&Caller>, ip: Option<IpAddr>) -> Result<(), ApiError> {
    if !st.host.accepting() {
        return Err(ApiError::unavailable("not accepting new sessions (draining)", st.limits.retry_after));
    }
    rate_limit(st, caller, ip).await
}

/// The rate-limit bucket of a creation request: its API key or signed-in user, else its client IP.
/// 429 + `Retry-After` past the configured sessions per minute.
async fn rate_limit(st: &ApiState, caller: Option<&Caller>, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let (bucket, limit) = match (caller, ip) {
        (Some(c), _) => (format!("rl:{}", c.audit_name()), st.limits.sessions_per_minute_per_key),
        (None, Some(ip)) => (format!("rl:ip:{ip}"), st.limits.sessions_per_minute_per_ip),
        (None, None) => return Ok(()),
    };
    if limit == 0 {
        return Ok(());
    }
    let (count, left) = st.short_term.hit(&bucket, Duration::from_secs(60)).await.map_err(short_term_error)?;
    if count > u64::from(limit) {
        return Err(ApiError::too_many_requests(
            format!("at most {limit} sessions per minute; retry later"),
            left.max(Duration::from_secs(1)),
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an `Idempotency-Key` record holds: `P<fingerprint>` while the first request runs,
/// `D<fingerprint>\n<Location>\n<body>` once it answered 201.
enum Idempotent {
    /// First use: go ahead, then record under this key.
    Fresh { key: String, fingerprint: String },
    /// Same key, same body, already answered: answer the same.
    Replay(Response),
}

async fn idempotency(
    st: &ApiState,
    headers: &HeaderMap,
    scope: &str,
    body: &[u8],
) -> Result<Option<Idempotent>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key =
        value.to_str().ok().map(str::trim).filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_LEN).ok_or_else(
            || {
                ApiError::bad_request(
                    "bad_idempotency_key",
                    format!("Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
                )
            },
        )?;
    let fingerprint = hex(&sha2::Sha256::digest(body));
    let record_key = format!("idem:{scope}:{}", hex(&sha2::Sha256::digest(key.as_bytes())));
    let pending = format!("P{fingerprint}");
    match st.short_term.set_nx(&record_key, pending.as_bytes(), st.limits.idempotency_ttl).await {
        Err(e) => Err(short_term_error(e)),
        Ok(None) => Ok(Some(Idempotent::Fresh { key: record_key, fingerprint })),
        Ok(Some(existing)) => {
            let existing = String::from_utf8_lossy(&existing).into_owned();
            let reused = || {
                ApiError::conflict(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request body",
                )
            };
            if let Some(fp) = existing.strip_prefix('P') {
                if fp != fingerprint {
                    return Err(reused());
                }
                return Err(ApiError::conflict(
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                ));
            }
            let rest = existing.strip_prefix('D').ok_or_else(|| ApiError::internal("bad idempotency record"))?;
            let mut parts = rest.splitn(3, '\n');
            let (Some(fp), Some(location), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(ApiError::internal("bad idempotency record"));
            };
            if fp != fingerprint {
                return Err(reused());
            }
            let mut response = (StatusCode::CREATED, body.to_owned()).into_response();
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            insert_header(&mut response, LOCATION, location)?;
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            no_store(&mut response);
            Ok(Some(Idempotent::Replay(response)))
        }
    }
}

async fn create_session(
    State(st): State<ApiState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = authenticate(&st, &headers).await?;
    let bytes = read_body(body, &headers, st.limits.max_json_bytes).await?;
    let mut request: crate::host::CreateSessionRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        Default::default()
    } else {
        if !is_json(&headers) {
            return Err(ApiError::unsupported_media_type("application/json"));
        }
        parse_session_request(&bytes)?
    };
    if let Some(user_id) = &request.user_id
        && (user_id.is_empty()
            || user_id.len() > MAX_USER_ID_LEN
            || !user_id.bytes().all(|b| (0x21..=0x7e).contains(&b)))
    {
        return Err(ApiError::bad_request(
            "bad_user_id",
            format!("user_id must be 1..={MAX_USER_ID_LEN} visible ASCII characters"),
        ));
    }
    if let Some(Caller::User(user)) = &caller {
        // A signed-in user's sessions are theirs: the id comes from the token, not the body.
        if request.user_id.as_ref().is_some_and(|id| *id != user.user_id) {
            return Err(ApiError::forbidden("user_id_mismatch", "user_id differs from the signed-in user's id"));
        }
        request.user_id = Some(user.user_id.clone());
    }
    st.host.place_new_session().await?;
    let scope = match (&caller, ip) {
        (Some(c), _) => c.audit_name(),
        (None, Some(ip)) => format!("ip:{ip}"),
        (None, None) => "open".to_owned(),
    };
    let idem = match idempotency(&st, &headers, &scope, &bytes).await? {
        Some(Idempotent::Replay(response)) => return Ok(response),
        Some(Idempotent::Fresh { key, fingerprint }) => Some((key, fingerprint)),
        None => None,
    };
    // A replayed request does not count against the limit (and is answered while draining: the
    // session exists); a fresh one does.
    let outcome = async {
        admit_creation(&st, caller.as_ref(), ip).await?;
        request.api_key_id = match &caller {
            Some(Caller::Key(k)) => Some(k.id.clone()),
            _ => None,
        };
        create_and_issue(&st, request).await
    }
    .await;
    match (outcome, idem) {
        (Ok((response, location, body)), Some((key, fingerprint))) => {
            let record = format!("D{fingerprint}\n{location}\n{body}");
            st.short_term.set(&key, record.as_bytes(), st.limits.idempotency_ttl).await.map_err(short_term_error)?;
            Ok(response)
        }
        (Ok((response, ..)), None) => Ok(response),
        (Err(e), idem) => {
            if let Some((key, _)) = idem {
                // Nothing was created: the client may retry with the same key.
                let _ = st.short_term.delete(&key).await;
            }
            Err(e)
        }
    }
}

/// Create the session and issue its token: (response, Location, body).
async fn create_and_issue(
    st: &ApiState,
    request: crate::host::CreateSessionRequest,
) -> Result<(Response, String, String), ApiError> {
    let created = st.host.create_session(request).await?;
    if !is_valid_id(&created.session_id) {
        return Err(ApiError::internal("host returned a session id that is not URL safe"));
    }
    let issued = st.tokens.issue(&created.session_id).map_err(ApiError::internal)?;
    let location = format!("/v1/sessions/{}", created.session_id);
    let mut ice_servers = created.ice_servers;
    ice_servers.extend(st.turn.ice_servers(&created.session_id, std::time::SystemTime::now()));
    let body = CreateSessionResponse {
        offer_url: format!("{location}/offer"),
        session_id: created.session_id,
        token: issued.token,
        expires_at: issued.expires_at,
        ice_servers,
    };
    let body = serde_json::to_string(&body).map_err(|e| ApiError::internal(format!("serialising: {e}")))?;
    let mut response = (StatusCode::CREATED, body.clone()).into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    insert_header(&mut response, LOCATION, &location)?;
    no_store(&mut response);
    Ok((response, location, body))
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
    let claims = authorize_token(&st, &headers, &id, VerifyMode::Connect)?;
    require_content_type(&headers, APPLICATION_SDP)?;
    let bytes = read_body(body, &headers, st.limits.max_offer_bytes).await?;
    // Existence first: no point telling a client to fix the SDP of a session that is gone.
    let session = st.host.session(&id).await?;
    match session.state {
        SessionState::Ended => return Err(ApiError::offer_after_end()),
        SessionState::Connecting | SessionState::Connected => return Err(ApiError::already_connected()),
        _ => {}
    }
    let offer = validate_offer(&bytes)?;
    claim_token(&st, &claims).await?;
    let answer = match st.host.offer(&id, offer).await {
        Ok(a) => a,
        Err(e) => {
            // The offer did not take: the token may try again (a corrected offer, a retry after
            // 503). A 409 means another offer won; the claim stays.
            if !matches!(e, ApiError::Conflict(_)) {
                release_token(&st, &claims).await;
            }
            return Err(e);
        }
    };
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
            // Fresh TURN credentials: coturn checks expiry at allocation, and a restart on a
            // new network allocates again (RFC 9725 §4.6 `Link` headers).
            let servers = st.turn.ice_servers(&id, std::time::SystemTime::now());
            for link in IceServerSet::link_values(&servers) {
                let value = HeaderValue::from_str(&link).map_err(|_| ApiError::internal("invalid ICE server URL"))?;
                response.headers_mut().append(http::header::LINK, value);
            }
            no_store(&mut response);
            Ok(response)
        }
    }
}

async fn delete_session(
    State(st): State<ApiState>,
    AuthorizedSession(id): AuthorizedSession,
) -> Result<Response, ApiError> {
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
    AuthorizedSession(id): AuthorizedSession,
) -> Result<Response, ApiError> {
    Ok(no_store_json(&st.host.session(&id).await?))
}

async fn transcript(
    State(st): State<ApiState>,
    AuthorizedSession(id): AuthorizedSession,
) -> Result<Response, ApiError> {
    Ok(no_store_json(&st.host.transcript(&id).await?))
}

// ---- helpers -------------------------------------------------------------------------------

/// The client's IP address when the server records connections (served with
/// `into_make_service_with_connect_info::<SocketAddr>`), else `None`: what the creation limits
/// fall back to for a caller without a key or user ([`admit_creation`]). Never rejects.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0.ip())))
    }
}

/// The session id of the path (`/v1/sessions/{id}`...), once the request's session token (or an
/// API key, see [`authorize_token_or_key`]) may act on it: the extractor every route on one
/// session starts with. Rejections: 404 `unknown_session` for a malformed id, then 401 for a
/// missing or wrong credential.
struct AuthorizedSession(String);

impl FromRequestParts<ApiState> for AuthorizedSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, st: &ApiState) -> Result<Self, ApiError> {
        let id = session_id(Path::from_request_parts(parts, st).await)?;
        authorize_token_or_key(st, &parts.headers, &id)?;
        Ok(Self(id))
    }
}

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

/// The caller of a request: one of the API keys, or (with an end-user verifier) a user whose
/// identity token verifies. `Ok(None)` only when the API is open: no key and no verifier
/// configured. A credential that is neither a key nor a JWT is 401 `api_key_invalid`.
pub async fn authenticate(st: &ApiState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    if st.api_keys.is_empty() && st.end_users.is_none() {
        return Ok(None);
    }
    let credentials = bearer(headers).ok_or_else(|| {
        ApiError::unauthorized("api_key_missing", "an API key or identity token is required (Authorization: Bearer)")
    })?;
    if let Some(key) = st.api_keys.identify(credentials) {
        return Ok(Some(Caller::Key(key)));
    }
    match &st.end_users {
        // A JWT is three dot-separated parts; anything else was meant as a key.
        Some(verifier) if credentials.split('.').count() == 3 => {
            verifier.verify(credentials).await.map(|u| Some(Caller::User(u)))
        }
        _ => Err(ApiError::unauthorized("api_key_invalid", "invalid API key")),
    }
}

/// An API key, whether or not the API is open.
fn strict_api_key(st: &ApiState, headers: &HeaderMap) -> Result<ApiKeyIdentity, ApiError> {
    match bearer(headers) {
        None => Err(ApiError::unauthorized("api_key_missing", "an API key is required (Authorization: Bearer <key>)")),
        Some(key) => {
            st.api_keys.identify(key).ok_or_else(|| ApiError::unauthorized("api_key_invalid", "invalid API key"))
        }
    }
}

/// Single use of a session token: claim its `jti` until the token expires (plus the clock
/// leeway), in the short-term store shared by the cluster. Every route that connects a session
/// with its token claims it (the offer, Pipecat's per-session offer, the WebSocket).
/// Errors: 401 `token_replayed` when it was claimed before, 503 when the store is unreachable.
pub async fn claim_token(st: &ApiState, claims: &crate::token::Claims) -> Result<(), ApiError> {
    let left = claims.exp.saturating_sub(OffsetDateTime::now_utc().unix_timestamp()).max(0) as u64;
    let ttl = Duration::from_secs(left) + crate::token::NBF_LEEWAY;
    let key = format!("jti:{}", claims.jti);
    if st.short_term.set_nx(&key, b"1", ttl).await.map_err(short_term_error)?.is_some() {
        return Err(TokenError::Replayed.into());
    }
    Ok(())
}

/// Give a claimed token back (its connection did not happen: the client may try again).
pub async fn release_token(st: &ApiState, claims: &crate::token::Claims) {
    let _ = st.short_term.delete(&format!("jti:{}", claims.jti)).await;
}

fn authorize_token(
    st: &ApiState,
    headers: &HeaderMap,
    session_id: &str,
    mode: VerifyMode,
) -> Result<crate::token::Claims, ApiError> {
    let token = bearer(headers).ok_or(TokenError::Missing)?;
    Ok(st.tokens.verify(token, session_id, mode)?)
}

/// Largest injected text.
pub const MAX_INJECT_TEXT: usize = 4096;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectRequest {
    text: String,
}

async fn inject(
    State(st): State<ApiState>,
    AuthorizedSession(id): AuthorizedSession,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !is_json(&headers) {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    let bytes = read_body(body, &headers, st.limits.max_json_bytes).await?;
    let request: InjectRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("bad_json", format!("expected {{\"text\": \"...\"}}: {e}")))?;
    let text = request.text.trim();
    if text.is_empty() || text.len() > MAX_INJECT_TEXT {
        return Err(ApiError::unprocessable("bad_text", format!("text must be 1..={MAX_INJECT_TEXT} bytes")));
    }
    st.host.inject(&id, text.to_owned()).await?;
    Ok(json_response(StatusCode::ACCEPTED, &serde_json::json!({"session_id": id, "accepted": true})))
}

fn user_scope(identity: &ApiKeyIdentity) -> UserScope {
    match identity.role {
        KeyRole::Admin => UserScope::All,
        _ => UserScope::CreatedBy(identity.id.clone()),
    }
}

/// The user of the path (`/v1/users/{user_id}`...) and what the request's API key may see of
/// that user's data: the extractor of the user-data routes. Rejections: 401 without a valid API
/// key (even when the API is otherwise open), then 404 `no_user_data` for an empty or longer
/// than [`MAX_USER_ID_LEN`] user id.
struct ScopedUser {
    user_id: String,
    scope: UserScope,
}

impl FromRequestParts<ApiState> for ScopedUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, st: &ApiState) -> Result<Self, ApiError> {
        let identity = strict_api_key(st, &parts.headers)?;
        match Path::<String>::from_request_parts(parts, st).await {
            Ok(Path(user_id)) if !user_id.is_empty() && user_id.len() <= MAX_USER_ID_LEN => {
                Ok(Self { user_id, scope: user_scope(&identity) })
            }
            _ => Err(ApiError::not_found("no_user_data", "no data for this user")),
        }
    }
}

async fn export_user(State(st): State<ApiState>, user: ScopedUser) -> Result<Response, ApiError> {
    Ok(no_store_json(&st.host.export_user(&user.user_id, user.scope).await?))
}

async fn delete_user(State(st): State<ApiState>, user: ScopedUser) -> Result<Response, ApiError> {
    let report = st.host.delete_user(&user.user_id, user.scope).await?;
    Ok(json_response(StatusCode::OK, &report))
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

/// 200 with `value` as JSON, never cached (it reports live state).
fn no_store_json<T: Serialize + ?Sized>(value: &T) -> Response {
    let mut response = json_response(StatusCode::OK, value);
    no_store(&mut response);
    response
}

fn no_store(response: &mut Response) {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
