//! WHIP ingest and WHEP egress (RFC 9725; WHEP is its egress twin, draft-ietf-wish-whep): a
//! publisher sends its microphone to a character, players pull the character's voice.
//!
//! | route | auth | success |
//! |---|---|---|
//! | `OPTIONS /v1/characters/{id}/whip`, `/v1/sessions/{id}/whep` | none | 204, CORS, `Accept-Post: application/sdp`, `Link` ICE servers |
//! | `POST /v1/characters/{id}/whip` | API key when configured (Bearer) | 201 `application/sdp` answer, `Location: /v1/sessions/{session}`, `ETag`, `Link` |
//! | `PATCH /v1/sessions/{session}` (a WHIP session) | the publisher's Bearer, an API key or the session token | 204 trickle; 200 sdpfrag + new `ETag` for an ICE restart (`If-Match: *`) |
//! | `DELETE /v1/sessions/{session}` (a WHIP session) | as PATCH | 200 JSON, the session ends |
//! | `POST /v1/sessions/{session}/whep` | as PATCH | 201 answer, `Location: /v1/sessions/{session}/whep/{player}`, `ETag` |
//! | `PATCH`/`DELETE /v1/sessions/{session}/whep/{player}` | as PATCH | 204 trickle / 200 (the player leaves) |
//! | `GET /v1/sessions/{session}/events` | as PATCH | 200 `text/event-stream`: the session's api-v1 events (see [`events`]) |
//!
//! Facts of the real clients this follows (`docs/protocols.md` §WHIP): they publish send-only
//! media without a data channel; `@eyevinn/whip-web-client` probes with `OPTIONS` and trickles
//! only when `Access-Control-Allow-Methods` lists `PATCH`, and sends its ETag in an `ETag:`
//! request header instead of `If-Match` (both are accepted here); GStreamer's `simple-whip-client`
//! needs exactly 201, `Content-Type: application/sdp` and an answer that starts `v=0\r\n` with
//! CRLF line ends (the answer is normalised to CRLF), and sends Bearer on every request. The
//! publisher's DTLS certificate may be RSA (GStreamer) or ECDSA (browsers): the stack accepts
//! both, the offer only has to carry its fingerprint.
//!
//! The WHIP resource is the session itself (`/v1/sessions/{id}`), so `GET` on it and its
//! `/transcript` work as for any session, and a WHEP player finds it from the `Location`. `PATCH`,
//! `DELETE` and `OPTIONS` on it are answered here ([`resource_requests`], a layer over the app)
//! because a WHIP client authenticates them with the Bearer it published with, which the API v1
//! routes do not know; other sessions pass through untouched. In open mode (loopback, no API
//! keys) the session id itself is the capability (128 random bits), as for the publisher's POST.
//!
//! Events: a WHEP player that opens an `events` data channel gets the session's api-v1 events on
//! it ([`crate::session::whip_link`]); an application without media (the publisher's control
//! panel, a moderation tool) reads them as Server-Sent Events from `GET /v1/sessions/{id}/events`
//! with the publisher's credentials (a WHIP session has no session token and no client of the
//! `/ws` transport). A WHEP player whose connection failed or closed frees its slot (of
//! [`MAX_PLAYERS`]) for the next one. Every response carries CORS headers
//! (`Access-Control-Allow-Origin: *`, the methods and the request headers named explicitly:
//! `*` does not cover `Authorization`), and exposes `Location`, `ETag`, `Link` and `Accept-Post`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{options, patch};
use sha2::Digest as _;
use signaling::api::{ApiState, ClientIp};
use signaling::problem::{ApiError, Reason};
use signaling::sdp::{APPLICATION_SDP, MAX_OFFER_BYTES, MAX_SDPFRAG_BYTES, TRICKLE_ICE_SDPFRAG};
use signaling::token::VerifyMode;
use signaling::turn::IceServerSet;
use signaling::whip::{WhipRole, validate_whip_offer};
use tokio::sync::mpsc;

use crate::session::whip_link::{MAX_PLAYERS, MAX_WATCHERS, PlayerCmd, WATCHER_QUEUE};
use crate::session::{CreateOptions, EndReason, SessionManager, SessionState};

/// Methods a WHIP/WHEP endpoint or resource takes (`Access-Control-Allow-Methods`; Eyevinn's
/// client trickles only when `PATCH` is listed).
const ALLOW_METHODS: &str = "POST, PATCH, DELETE, OPTIONS";
/// Request headers a cross-origin page may send (named: `*` does not cover `Authorization`).
const ALLOW_HEADERS: &str = "Authorization, Content-Type, If-Match, ETag";
/// Response headers a cross-origin page may read. `Access-Control-Allow-Methods` too: Eyevinn's
/// client reads it from its own `OPTIONS` request to decide whether to trickle, and a page sees
/// only exposed headers of a cross-origin response.
const EXPOSE_HEADERS: &str = "Location, ETag, Link, Accept-Post, Accept-Patch, Access-Control-Allow-Methods";

/// One WHIP session's HTTP-side state.
struct Entry {
    /// SHA-256 of the Bearer the publisher posted with (`None`: open mode, no Bearer).
    bearer: Option<[u8; 32]>,
    /// The publisher's peer id in the session registry (trickle, ICE restart).
    peer_id: String,
    /// Where WHEP players are handed to the running link.
    players: mpsc::Sender<PlayerCmd>,
    /// Attached players and their ETags (`"..."`).
    player_etags: HashMap<String, String>,
}

/// The WHIP/WHEP endpoints' state: the API's (keys, tokens, TURN) and the sessions they made.
#[derive(Clone)]
pub struct Whip {
    api: ApiState,
    manager: Arc<SessionManager>,
    sessions: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Whip {
    /// Endpoints over `manager`, authenticating with `api`'s keys and tokens.
    pub fn new(api: ApiState, manager: Arc<SessionManager>) -> Self {
        Self { api, manager, sessions: Arc::default() }
    }

    /// The WHIP/WHEP routes, for merging into the app (the WHIP resource's own requests are
    /// [`resource_requests`], a layer).
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/v1/characters/{id}/whip", options(preflight).post(publish))
            .route("/v1/sessions/{id}/whep", options(preflight).post(play))
            .route("/v1/sessions/{id}/whep/{player}", patch(player_patch).delete(player_delete).options(preflight))
            .route("/v1/sessions/{id}/events", axum::routing::get(events).options(preflight))
            // 307 answers (placement, a session on another node) carry `Location`.
            .layer(axum::middleware::from_fn(signaling::api::redirect_location))
            .layer(axum::middleware::map_response(with_cors))
            .with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget sessions that have ended (their players' channel is closed).
    fn sweep(&self) {
        self.lock().retain(|_, e| !e.players.is_closed());
    }

    /// May this request act on WHIP session `id`: the publisher's own Bearer, any API key, or
    /// the session's token (manage); in open mode (the publisher had no Bearer) anyone with the id.
    fn authorize(&self, id: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = signaling::auth::bearer(headers);
        let owner = self.lock().get(id).map(|e| e.bearer).ok_or_else(ApiError::unknown_session)?;
        let Some(owner) = owner else { return Ok(()) };
        let Some(presented) = presented else {
            return Err(ApiError::unauthorized("token_missing", "Authorization: Bearer is required"));
        };
        if digest(presented) == owner || self.api.api_keys.contains(presented) {
            return Ok(());
        }
        self.api.tokens.verify(presented, id, VerifyMode::Manage)?;
        Ok(())
    }

    /// `Link: <url>; rel="ice-server"...` headers with TURN credentials for `session_id`
    /// (RFC 9725 §4.6), when TURN servers are configured.
    fn link_headers(&self, session_id: &str, response: &mut Response) {
        let servers = self.api.turn.ice_servers(session_id, SystemTime::now());
        for link in IceServerSet::link_values(&servers) {
            if let Ok(v) = HeaderValue::from_str(&link) {
                response.headers_mut().append(header::LINK, v);
            }
        }
    }
}

fn digest(credential: &str) -> [u8; 32] {
    sha2::Sha256::digest(credential.as_bytes()).into()
}

/// CORS headers on every WHIP/WHEP response (errors too, so a page can read them).
async fn with_cors(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
    response
}

/// `OPTIONS`: 204 with `Accept-Post` (RFC 9725 §4.2) and, on an endpoint, the ICE servers a
/// client may use before it posts (`Link`, minted for a fresh id: no session exists yet).
async fn preflight(State(w): State<Whip>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(HeaderName::from_static("accept-post"), HeaderValue::from_static(APPLICATION_SDP));
    w.link_headers(&signaling::id::new_id("whip"), &mut response);
    response
}

/// `POST /v1/characters/{id}/whip`: a new session for `id` fed by this publisher.
async fn publish(
    State(w): State<Whip>,
    Path(character): Path<String>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = signaling::api::authenticate(&w.api, &headers).await?;
    // Placement as for `POST /v1/sessions`: 307 to this route on a less loaded node (a WHIP client
    // follows it, RFC 9725 §4.5).
    w.manager.place().await.map_err(crate::http::to_api)?;
    // Draining and the creation limits as for `POST /v1/sessions`.
    signaling::api::admit_creation(&w.api, caller.as_ref(), ip).await?;
    require_content_type(&headers, APPLICATION_SDP)?;
    let bytes = read_body(body, MAX_OFFER_BYTES).await?;
    let offer = validate_whip_offer(&bytes, WhipRole::Publish)?;
    if !w.manager.characters().iter().any(|c| c.id == character) {
        return Err(ApiError::unknown_character(&character));
    }
    let options = CreateOptions {
        character: Some(character),
        provider: None,
        user_id: match &caller {
            Some(signaling::Caller::User(u)) => Some(u.user_id.clone()),
            _ => None,
        },
        api_key_id: match &caller {
            Some(signaling::Caller::Key(k)) => Some(k.id.clone()),
            _ => None,
        },
        record: None,
        continues: Vec::new(),
    };
    w.sweep();
    let started = w.manager.whip_publish(options, offer).await.map_err(crate::http::to_api)?;
    let id = started.session_id.clone();
    w.lock().insert(
        id.clone(),
        Entry {
            bearer: caller.is_some().then(|| signaling::auth::bearer(&headers).map(digest)).flatten(),
            peer_id: started.peer_id,
            players: started.players,
            player_etags: HashMap::new(),
        },
    );
    tracing::info!(session_id = %id, "WHIP publisher connected");
    let mut response = sdp_created(&started.answer, &format!("/v1/sessions/{id}"), &started.etag)?;
    w.link_headers(&id, &mut response);
    Ok(response)
}

/// `POST /v1/sessions/{id}/whep`: a player pulls the character's voice of WHIP session `id`.
async fn play(
    State(w): State<Whip>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let players = whip_session(&w, &id, &headers).await?;
    require_content_type(&headers, APPLICATION_SDP)?;
    let bytes = read_body(body, MAX_OFFER_BYTES).await?;
    let offer = validate_whip_offer(&bytes, WhipRole::Play)?;
    // A player whose connection failed or closed has left the link: its slot is free again.
    let (reply, live) = tokio::sync::oneshot::channel();
    if players.send(PlayerCmd::Live { reply }).await.is_err() {
        return Err(ApiError::session_already_ended());
    }
    let live = live.await.map_err(|_| ApiError::session_already_ended())?;
    if let Some(e) = w.lock().get_mut(&id) {
        e.player_etags.retain(|p, _| live.contains(p));
    }
    if w.lock().get(&id).is_some_and(|e| e.player_etags.len() >= MAX_PLAYERS) {
        return Err(ApiError::unavailable(
            format!("this session already has {MAX_PLAYERS} WHEP players"),
            std::time::Duration::from_secs(5),
        ));
    }
    let (answer, player) = w.manager.whep_player(&players, &offer).await.map_err(crate::http::to_api)?;
    let etag = format!("\"{}\"", signaling::id::new_id("e"));
    if let Some(e) = w.lock().get_mut(&id) {
        e.player_etags.insert(player.clone(), etag.clone());
    }
    let mut response = sdp_created(&answer, &format!("/v1/sessions/{id}/whep/{player}"), &etag)?;
    w.link_headers(&id, &mut response);
    Ok(response)
}

/// A WHIP session this request may act on, live: its players' sender. 307 to the same route on
/// the node holding it when that is another node of the cluster (players and watchers are sent
/// to the node the publisher first reached, and placement may have put the session elsewhere;
/// that node checks the credentials), 404 for ids that are not WHIP sessions, 401 for the wrong
/// credentials, 404 `session_ended` once it has ended.
async fn whip_session(w: &Whip, id: &str, headers: &HeaderMap) -> Result<mpsc::Sender<PlayerCmd>, ApiError> {
    if !signaling::id::is_valid_id(id) {
        return Err(ApiError::unknown_session());
    }
    if !w.lock().contains_key(id) && w.manager.get(id).is_none() {
        w.manager.locate(id).await.map_err(crate::http::to_api)?;
    }
    w.authorize(id, headers)?;
    let players = w.lock().get(id).map(|e| e.players.clone()).ok_or_else(ApiError::unknown_session)?;
    let ended = w.manager.get(id).is_none_or(|s| s.phase() == SessionState::Ended);
    if ended || players.is_closed() {
        return Err(ApiError::session_already_ended());
    }
    Ok(players)
}

/// `PATCH /v1/sessions/{id}/whep/{player}`: trickled candidates for a player (no ICE restart).
async fn player_patch(
    State(w): State<Whip>,
    Path((id, player)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let players = whip_session(&w, &id, &headers).await?;
    require_content_type(&headers, TRICKLE_ICE_SDPFRAG)?;
    let if_match = if_match(&headers)?;
    let etag =
        w.lock().get(&id).and_then(|e| e.player_etags.get(&player).cloned()).ok_or_else(ApiError::unknown_peer)?;
    let bytes = read_body(body, MAX_SDPFRAG_BYTES).await?;
    let frag = signaling::sdp::parse_trickle_sdpfrag(&bytes)?;
    if if_match.trim() == "*" {
        return Err(ApiError::ice_restart_unsupported());
    }
    if !etag_matches(&if_match, &etag) {
        return Err(ApiError::stale_etag());
    }
    for candidate in crate::http::candidate_inits(&frag).into_iter().take(MAX_CANDIDATES) {
        if players.try_send(PlayerCmd::Trickle { id: player.clone(), candidate }).is_err() {
            break;
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /v1/sessions/{id}/whep/{player}`: the player leaves; the session goes on.
async fn player_delete(
    State(w): State<Whip>,
    Path((id, player)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let players = whip_session(&w, &id, &headers).await?;
    w.lock().get_mut(&id).and_then(|e| e.player_etags.remove(&player)).ok_or_else(ApiError::unknown_peer)?;
    let _ = players.send(PlayerCmd::Detach { id: player.clone() }).await;
    Ok(json(StatusCode::OK, serde_json::json!({ "session_id": id, "player_id": player, "state": "ended" })))
}

/// `GET /v1/sessions/{id}/events`: the WHIP session's api-v1 events as Server-Sent Events
/// (`text/event-stream`, one `data:` line of JSON per event, from the last `session.ready` and
/// `state` on; a comment every 15 s keeps proxies from closing it). Credentials as for PATCH
/// (`Authorization: Bearer`: the publisher's own, an API key; open mode: none). The stream ends
/// with the session (after `session.ended`). 404/401 as for PATCH; 503 + `Retry-After` when the
/// session already has [`MAX_WATCHERS`] watchers.
async fn events(State(w): State<Whip>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let players = whip_session(&w, &id, &headers).await?;
    let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
    let (reply, live) = tokio::sync::oneshot::channel();
    let watch = players.send(PlayerCmd::Watch { tx }).await.and(players.send(PlayerCmd::Live { reply }).await);
    if watch.is_err() || live.await.is_err() {
        return Err(ApiError::session_already_ended());
    }
    if rx.is_closed() {
        let detail = format!("this session already has {MAX_WATCHERS} event watchers");
        return Err(ApiError::unavailable(detail, std::time::Duration::from_secs(5)));
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let msg = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(Event::default().data(msg)), rx))
    });
    let keep_alive = KeepAlive::new().interval(std::time::Duration::from_secs(15));
    let mut response = Sse::new(stream).keep_alive(keep_alive).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Most candidates one PATCH hands on (as for API v1 trickle).
const MAX_CANDIDATES: usize = 32;

/// The layer that answers `PATCH`, `DELETE` and `OPTIONS` on a WHIP session's resource
/// (`/v1/sessions/{id}`) with WHIP's rules; every other request passes through.
pub async fn resource_requests(State(w): State<Whip>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if !matches!(method, Method::PATCH | Method::DELETE | Method::OPTIONS) {
        return next.run(request).await;
    }
    let Some(id) = request.uri().path().strip_prefix("/v1/sessions/").filter(|s| !s.contains('/')).map(str::to_owned)
    else {
        return next.run(request).await;
    };
    if !w.lock().contains_key(&id) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let result = match method {
        Method::OPTIONS => Ok(preflight(State(w)).await),
        Method::DELETE => resource_delete(&w, &id, &parts.headers).await,
        _ => resource_patch(&w, &id, &parts.headers, body).await,
    };
    with_cors(result.unwrap_or_else(IntoResponse::into_response)).await
}

/// `DELETE /v1/sessions/{id}` of a WHIP session: 200, the session ends (RFC 9725 §4.2).
async fn resource_delete(w: &Whip, id: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    w.authorize(id, headers)?;
    w.manager.end(id, None, EndReason::ClientRequest).await.map_err(crate::http::to_api)?;
    Ok(json(StatusCode::OK, serde_json::json!({ "session_id": id, "state": SessionState::Ended })))
}

/// `PATCH /v1/sessions/{id}` of a WHIP session: trickle (204) or ICE restart (200 sdpfrag).
async fn resource_patch(w: &Whip, id: &str, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    w.authorize(id, headers)?;
    require_content_type(headers, TRICKLE_ICE_SDPFRAG)?;
    let if_match = if_match(headers)?;
    let bytes = read_body(body, MAX_SDPFRAG_BYTES).await?;
    let frag = signaling::sdp::parse_trickle_sdpfrag(&bytes)?;
    let peer_id = w.lock().get(id).map(|e| e.peer_id.clone()).ok_or_else(ApiError::unknown_session)?;
    if if_match.trim() == "*" {
        let (Some(ufrag), Some(pwd)) = (frag.ice_ufrag.clone(), frag.ice_pwd.clone()) else {
            return Err(ApiError::unprocessable(
                "ice_restart_without_credentials",
                "an ICE restart (If-Match: *) must carry the new a=ice-ufrag and a=ice-pwd",
            ));
        };
        let restart = crate::peer::IceRestart { ufrag, pwd, candidates: crate::http::candidate_inits(&frag) };
        let (sdpfrag, etag) = w.manager.restart_ice(id, &peer_id, restart).await.map_err(crate::http::to_api)?;
        let mut response = (StatusCode::OK, sdpfrag).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(TRICKLE_ICE_SDPFRAG));
        insert(&mut response, header::ETAG, &etag)?;
        // Fresh TURN credentials: coturn checks expiry at allocation (RFC 9725 §4.6).
        w.link_headers(id, &mut response);
        return Ok(response);
    }
    let candidates = crate::http::candidate_inits(&frag);
    w.manager.trickle(id, &peer_id, &if_match, candidates).await.map_err(crate::http::to_api)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The client's ETag: `If-Match` (RFC 9725 §4.3.1), else the `ETag:` request header
/// `@eyevinn/whip-web-client` sends. Neither: 428.
fn if_match(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers.get(header::IF_MATCH).or_else(|| headers.get(header::ETAG)).ok_or_else(|| {
        ApiError::PreconditionRequired(Reason::new(
            "if_match_required",
            "PATCH requires If-Match (or ETag) with the resource's ETag, or \"*\" for an ICE restart",
        ))
    })?;
    value
        .to_str()
        .map(str::to_owned)
        .map_err(|_| ApiError::bad_request("bad_if_match", "If-Match is not visible ASCII"))
}

/// `If-Match` may list several ETags, weak or strong.
fn etag_matches(if_match: &str, etag: &str) -> bool {
    if_match.split(',').map(|t| t.trim().trim_start_matches("W/")).any(|t| t == etag)
}

fn require_content_type(headers: &HeaderMap, expected: &'static str) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if essence.as_deref() == Some(expected) { Ok(()) } else { Err(ApiError::unsupported_media_type(expected)) }
}

/// The whole body, or 413 beyond `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::payload_too_large(limit))
}

/// 201 with the answer as `application/sdp` (every line CRLF-terminated: `simple-whip-client`
/// wants `v=0\r\n`), `Location`, `ETag` and `Cache-Control: no-store`.
fn sdp_created(answer: &str, location: &str, etag: &str) -> Result<Response, ApiError> {
    let mut response = (StatusCode::CREATED, crlf(answer)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(APPLICATION_SDP));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    insert(&mut response, header::LOCATION, location)?;
    insert(&mut response, header::ETAG, etag)?;
    Ok(response)
}

/// `sdp` with every line ending in CRLF (RFC 8866 §5).
fn crlf(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len() + 64);
    for line in sdp.lines() {
        out.push_str(line.trim_end_matches('\r'));
        out.push_str("\r\n");
    }
    out
}

fn insert(response: &mut Response, name: HeaderName, value: &str) -> Result<(), ApiError> {
    let value = HeaderValue::from_str(value).map_err(|_| ApiError::internal(format!("invalid {name} value")))?;
    response.headers_mut().insert(name, value);
    Ok(())
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_out_with_crlf_line_ends() {
        assert_eq!(crlf("v=0\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\n"), "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n");
    }

    #[test]
    fn the_etag_request_header_counts_as_if_match() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).unwrap_err().status(), StatusCode::PRECONDITION_REQUIRED);
        h.insert(header::ETAG, HeaderValue::from_static("\"e_1\""));
        assert_eq!(if_match(&h).unwrap(), "\"e_1\"");
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(if_match(&h).unwrap(), "*", "If-Match wins");
        assert!(etag_matches("W/\"a\", \"e_1\"", "\"e_1\""));
        assert!(!etag_matches("\"e_2\"", "\"e_1\""));
    }
}
