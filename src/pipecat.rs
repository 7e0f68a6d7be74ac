//! Pipecat's signalling for `@pipecat-ai/small-webrtc-transport` (`../shared/docs/protocols.md`,
//! "Pipecat client ... and RTVI", read from the transport's 1.10 source): the offer and trickle
//! routes Pipecat servers mount, answering with a session whose data channel speaks RTVI
//! ([`crate::session::rtvi`]).
//!
//! | route | auth | body | success |
//! |---|---|---|---|
//! | `POST /api/offer` | as `POST /v1/sessions`: API key or user identity token when configured (open on a loopback server without keys), same rate limits | `{sdp, type:"offer", pc_id, restart_pc, requestData?:{character?, provider?}}` | 200 `{sdp, type:"answer", pc_id}`: a new session |
//! | `POST /v1/sessions/{id}/api/offer` | the session's token, or an API key | same | 200 as above, for session `{id}` (the transport's `startBot` flow with `offerUrlTemplate`) |
//! | `PATCH` either route | as its `POST` | `{pc_id, candidates:[{candidate, sdp_mid, sdp_mline_index}]}` | 200 `{"status":"success"}` |
//!
//! CORS: `OPTIONS` preflights are answered and every response carries
//! `Access-Control-Allow-Origin: *` (a page on another origin may call these routes).
//!
//! `pc_id` names the peer connection: `<session id>.<peer id>.<etag>` (all `[A-Za-z0-9_-]`), so
//! a trickle PATCH finds its session without server-side state. A new offer with `restart_pc:true`
//! and the `pc_id` of a live session (the transport recreates its peer connection after ICE
//! fails) ends that session and answers with a new one that continues its conversation: the
//! model opens with the old session's turns as prior history (same API key or user only).
//!
//! The offer goes through the same checks as `POST /v1/sessions/{id}/offer`
//! ([`signaling::sdp::validate_offer`]): Pipecat's three m-lines (audio `sendrecv`, video
//! `sendrecv`, video `sendonly`) are answered with the voice on the audio m-line and both video
//! m-lines rejected (port 0, RFC 3264 §6). Errors are problem+json with the API's codes: a 4xx
//! makes the transport give up at once instead of retrying (its `isOfferRefused`). A session
//! created for an offer that is refused is ended (`never_connected`), not left behind.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use signaling::api::{ApiState, ClientIp};
use signaling::identity::Caller;
use signaling::problem::ApiError;
use signaling::token::VerifyMode;
use webrtc::peer_connection::RTCIceCandidateInit;

use crate::session::rtvi::RtviCodec;
use crate::session::{CreateOptions, EndReason, SessionManager, SessionState};

/// Largest offer request: an SDP of [`signaling::sdp::MAX_OFFER_BYTES`] grows by JSON escaping
/// (`\r\n` -> 4 bytes), plus the other fields (bytes).
pub const MAX_OFFER_REQUEST_BYTES: usize = 2 * signaling::sdp::MAX_OFFER_BYTES;
/// Largest trickle request (bytes).
pub const MAX_TRICKLE_REQUEST_BYTES: usize = 64 * 1024;
/// Most candidates one PATCH may carry (the transport sends what gathered in 200 ms).
pub const MAX_TRICKLE_CANDIDATES: usize = 64;

#[derive(Clone)]
struct PipecatState {
    api: ApiState,
    manager: Arc<SessionManager>,
}

/// The Pipecat routes (see the module docs).
pub fn routes(api: ApiState, manager: Arc<SessionManager>) -> Router {
    Router::new()
        .route("/api/offer", post(offer).patch(trickle).options(preflight))
        .route("/v1/sessions/{id}/api/offer", post(session_offer).patch(session_trickle).options(preflight))
        .method_not_allowed_fallback(signaling::api::method_not_allowed)
        .with_state(PipecatState { api, manager })
        // 307 answers (placement, a session on another node) carry `Location`.
        .layer(axum::middleware::from_fn(signaling::api::redirect_location))
        .layer(axum::middleware::map_response(allow_origin))
}

/// CORS preflight (Fetch standard §3.2): Pipecat apps often serve their page from another origin
/// (a dev server); the transport posts JSON, with `Authorization` when the app adds a key. `*`
/// does not cover `Authorization` in `Access-Control-Allow-Headers`, so it is named.
async fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("POST, PATCH, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, header::HeaderValue::from_static("Authorization, Content-Type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
    response
}

/// Every response of these routes may be read by a page of any origin (credentials are bearer
/// tokens, never cookies).
async fn allow_origin(mut response: Response) -> Response {
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
    response
}

/// `POST <endpoint>` body (small-webrtc-transport `negotiate()`).
#[derive(Debug, Deserialize)]
struct OfferRequest {
    sdp: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    pc_id: Option<String>,
    #[serde(default)]
    restart_pc: bool,
    #[serde(default, rename = "requestData")]
    request_data: Option<Value>,
}

/// `PATCH <endpoint>` body (small-webrtc-transport `flushIceCandidates()`).
#[derive(Debug, Deserialize)]
struct TrickleRequest {
    pc_id: Option<String>,
    candidates: Vec<Candidate>,
}

#[derive(Debug, Deserialize)]
struct Candidate {
    candidate: String,
    #[serde(default)]
    sdp_mid: Option<String>,
    #[serde(default)]
    sdp_mline_index: Option<u16>,
}

/// A peer connection's name: (session id, peer id, ETag without quotes).
struct PcId {
    session: String,
    peer: String,
    etag: String,
}

impl PcId {
    fn format(session: &str, peer: &str, etag: &str) -> String {
        format!("{session}.{peer}.{}", etag.trim_matches('"'))
    }

    fn parse(pc_id: &str) -> Option<Self> {
        let mut parts = pc_id.split('.');
        let (session, peer, etag) = (parts.next()?, parts.next()?, parts.next()?);
        let valid = |s: &str| signaling::id::is_valid_id(s);
        (parts.next().is_none() && valid(session) && valid(peer) && valid(etag)).then(|| PcId {
            session: session.to_owned(),
            peer: peer.to_owned(),
            etag: etag.to_owned(),
        })
    }
}

fn unknown_pc() -> ApiError {
    ApiError::not_found("unknown_pc_id", "pc_id names no live peer connection of this server")
}

async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::payload_too_large(limit))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("bad_json", format!("invalid request: {e}")))
}

/// The caller as for `POST /v1/sessions`: an API key, an end user's identity token, or nobody
/// when the API is open.
async fn caller(st: &PipecatState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    signaling::api::authenticate(&st.api, headers).await
}

/// The session's own token (its claims, for single use) or an API key (`None`).
fn authorize_session(
    st: &PipecatState,
    headers: &HeaderMap,
    id: &str,
    mode: VerifyMode,
) -> Result<Option<signaling::token::Claims>, ApiError> {
    let credentials = signaling::auth::bearer(headers).ok_or(signaling::token::TokenError::Missing)?;
    if st.api.api_keys.contains(credentials) {
        return Ok(None);
    }
    Ok(Some(st.api.tokens.verify(credentials, id, mode)?))
}

/// Validate the request's SDP (400 for what is not an offer, 422 for one we cannot serve).
fn valid_offer(request: &OfferRequest) -> Result<signaling::sdp::ValidOffer, ApiError> {
    if request.kind != "offer" {
        return Err(ApiError::bad_request("not_an_offer", format!("type must be \"offer\", not {:?}", request.kind)));
    }
    Ok(signaling::sdp::validate_offer(request.sdp.as_bytes())?)
}

/// Answer `offer` on session `id` with an RTVI data channel.
async fn answer(st: &PipecatState, id: &str, offer: signaling::sdp::ValidOffer) -> Result<Response, ApiError> {
    let (sdp, peer, etag) =
        st.manager.offer_with(id, offer, RtviCodec::new(), |_| {}).await.map_err(crate::http::to_api)?;
    let body = json!({"sdp": sdp, "type": "answer", "pc_id": PcId::format(id, &peer, &etag)});
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `restart_pc` with the `pc_id` of a live session: that peer connection is being replaced, and
/// the session is ended. Returns it when the `pc_id` named its current peer (and so it ended).
async fn end_replaced(
    st: &PipecatState,
    request: &OfferRequest,
    session: Option<&str>,
) -> Option<Arc<crate::session::SessionShared>> {
    let old = request.pc_id.as_deref().filter(|_| request.restart_pc).and_then(PcId::parse)?;
    if session.is_some_and(|s| s != old.session) {
        return None;
    }
    st.manager.end(&old.session, Some(&old.peer), EndReason::ClientRequest).await.ok()?;
    st.manager.get(&old.session)
}

async fn offer(
    State(st): State<PipecatState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller(&st, &headers).await?;
    let request: OfferRequest = read_json(&headers, body, MAX_OFFER_REQUEST_BYTES).await?;
    // A restart goes where the replaced session is, whose conversation it continues (307 to the
    // node holding it); anything else is placed as `POST /v1/sessions` is (307 to the same route
    // on a less loaded node).
    match request.pc_id.as_deref().filter(|_| request.restart_pc).and_then(PcId::parse) {
        Some(old) if st.manager.get(&old.session).is_some() => {}
        Some(old) => {
            st.manager.locate(&old.session).await.map_err(crate::http::to_api)?;
            st.manager.place().await.map_err(crate::http::to_api)?;
        }
        None => st.manager.place().await.map_err(crate::http::to_api)?,
    }
    // Draining and the creation limits as for `POST /v1/sessions` (per API key or user, else per
    // client IP).
    signaling::api::admit_creation(&st.api, caller.as_ref(), ip).await?;
    let offer = valid_offer(&request)?;
    let (api_key_id, user_id) = match caller {
        Some(Caller::Key(k)) => (Some(k.id), None),
        Some(Caller::User(u)) => (None, Some(u.user_id)),
        None => (None, None),
    };
    let data = request.request_data.as_ref();
    let field = |k: &str| data.and_then(|d| d.get(k)).and_then(Value::as_str).map(str::to_owned);
    let options = CreateOptions {
        character: field("character"),
        provider: field("provider"),
        user_id,
        api_key_id,
        record: data.and_then(|d| d.get("record")).and_then(Value::as_bool),
        continues: Vec::new(),
    };
    // The new session continues the replaced one's conversation (Pipecat's own server keeps its
    // bot, and so the conversation, across `restart_pc`), for the same API key or user only.
    let continues = end_replaced(&st, &request, None)
        .await
        .filter(|old| (&old.api_key_id, &old.user_id) == (&options.api_key_id, &options.user_id))
        .map(|old| old.conversation())
        .unwrap_or_default();
    let shared = st.manager.create(CreateOptions { continues, ..options }).await.map_err(crate::http::to_api)?;
    let result = answer(&st, &shared.id, offer).await;
    if result.is_err() {
        // Nobody else knows this session: do not leave it waiting for a connect timeout.
        let _ = st.manager.end(&shared.id, None, EndReason::NeverConnected).await;
    }
    result
}

/// A per-session request the credentials may make: the session id, the token's claims (`None`
/// for an API key) and the JSON body.
type SessionRequest<T> = (String, Option<signaling::token::Claims>, T);

async fn session_request<T: serde::de::DeserializeOwned>(
    st: &PipecatState,
    path: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Body,
    (mode, limit): (VerifyMode, usize),
) -> Result<SessionRequest<T>, ApiError> {
    let id = match path {
        Ok(Path(id)) if signaling::id::is_valid_id(&id) => id,
        _ => return Err(ApiError::unknown_session()),
    };
    let claims = authorize_session(st, headers, &id, mode)?;
    Ok((id, claims, read_json(headers, body, limit).await?))
}

async fn session_offer(
    State(st): State<PipecatState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, claims, request): SessionRequest<OfferRequest> =
        session_request(&st, path, &headers, body, (VerifyMode::Connect, MAX_OFFER_REQUEST_BYTES)).await?;
    let shared = held_here(&st, &id).await?;
    end_replaced(&st, &request, Some(&id)).await;
    match shared.phase() {
        SessionState::Ended => return Err(ApiError::offer_after_end()),
        SessionState::Created => {}
        _ => return Err(ApiError::already_connected()),
    }
    let offer = valid_offer(&request)?;
    // Single use, as `POST /v1/sessions/{id}/offer`: the token's `jti` is claimed.
    if let Some(claims) = &claims {
        signaling::api::claim_token(&st.api, claims).await?;
    }
    let result = answer(&st, &id, offer).await;
    if let (Err(e), Some(claims)) = (&result, &claims)
        && !matches!(e, ApiError::Conflict(_))
    {
        // The offer did not take: the token may try again.
        signaling::api::release_token(&st.api, claims).await;
    }
    result
}

/// Session `id` as this node holds it; a session live on another node of the cluster is 307 to
/// the same route there (the client's endpoint stays the node it first reached, so its offer and
/// trickle for a session placed elsewhere land here), anything else 404 `unknown_session`.
async fn held_here(st: &PipecatState, id: &str) -> Result<Arc<crate::session::SessionShared>, ApiError> {
    if let Some(shared) = st.manager.get(id) {
        return Ok(shared);
    }
    st.manager.locate(id).await.map_err(crate::http::to_api)?;
    Err(ApiError::unknown_session())
}

/// Hand the candidates of `request` to its peer connection.
async fn add_candidates(
    st: &PipecatState,
    request: TrickleRequest,
    session: Option<&str>,
) -> Result<Response, ApiError> {
    if request.candidates.len() > MAX_TRICKLE_CANDIDATES {
        return Err(ApiError::bad_request(
            "too_many_candidates",
            format!("at most {MAX_TRICKLE_CANDIDATES} candidates per request"),
        ));
    }
    let pc = request.pc_id.as_deref().and_then(PcId::parse).ok_or_else(unknown_pc)?;
    if session.is_some_and(|s| s != pc.session) {
        return Err(unknown_pc());
    }
    let inits: Vec<RTCIceCandidateInit> = request
        .candidates
        .into_iter()
        // An empty candidate is the end-of-candidates marker.
        .filter(|c| !c.candidate.trim().is_empty())
        .map(|c| RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_mline_index,
            ..Default::default()
        })
        .collect();
    held_here(st, &pc.session).await.map_err(|e| if matches!(e, ApiError::Elsewhere(_)) { e } else { unknown_pc() })?;
    let tag = format!("\"{}\"", pc.etag);
    st.manager.trickle(&pc.session, &pc.peer, &tag, inits).await.map_err(|e| match e {
        crate::session::SessionError::NotFound
        | crate::session::SessionError::UnknownPeer
        | crate::session::SessionError::StaleEtag => unknown_pc(),
        other => crate::http::to_api(other),
    })?;
    Ok(axum::Json(json!({"status": "success"})).into_response())
}

async fn trickle(State(st): State<PipecatState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    caller(&st, &headers).await?;
    let request: TrickleRequest = read_json(&headers, body, MAX_TRICKLE_REQUEST_BYTES).await?;
    add_candidates(&st, request, None).await
}

async fn session_trickle(
    State(st): State<PipecatState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, _, request): SessionRequest<TrickleRequest> =
        session_request(&st, path, &headers, body, (VerifyMode::Manage, MAX_TRICKLE_REQUEST_BYTES)).await?;
    add_candidates(&st, request, Some(&id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pc_id_round_trips_and_refuses_anything_else() {
        let id = PcId::format("sess_abc", "peer_def", "\"e_123\"");
        assert_eq!(id, "sess_abc.peer_def.e_123");
        let pc = PcId::parse(&id).unwrap();
        assert_eq!((pc.session.as_str(), pc.peer.as_str(), pc.etag.as_str()), ("sess_abc", "peer_def", "e_123"));
        for bad in ["", "sess_abc", "sess_abc.peer_def", "a.b.c.d", "sess/x.peer.e", "sess..e"] {
            assert!(PcId::parse(bad).is_none(), "{bad:?}");
        }
    }
}
