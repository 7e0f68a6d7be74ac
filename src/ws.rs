//! `GET /v1/sessions/{id}/ws`: the WebSocket transport of a created session (api-v1's "other
//! transports"; framing in [`crate::session::ws_link`]).
//!
//! Checks, in order, each a problem+json before any upgrade: the path id (404), the session
//! token (401; from `?token=` because browsers cannot set headers on a WebSocket, or from
//! `Authorization: Bearer`), that it is a WebSocket upgrade (400 `websocket_upgrade_required`),
//! the session (404 unknown, 409 ended or already connected), the token's single use (401
//! `token_replayed`, as for the offer), then the model provider (503). The token is never logged
//! (this module logs no URL or header).
//!
//! `GET /ws/{character}`: the N.E.K.O. dialect ([`crate::session::neko`]) for N.E.K.O. frontends.
//! N.E.K.O. itself has no authentication; here, when API keys are configured (always on a
//! non-loopback bind) the frontend passes one as `?token=<api key>` in its WebSocket URL (or
//! `Authorization: Bearer`); on a loopback bind without keys the route is open, like session
//! creation. The session starts at `start_session` (`session_preparing`, then `session_started`
//! once the model is up; `session_failed` + `status` when it cannot start). Only the newest
//! socket per character and API key is live: an older one gets `session_ended_by_server` and is
//! closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use signaling::api::ApiState;
use signaling::problem::ApiError;
use signaling::token::{TokenError, VerifyMode};

use crate::session::SessionManager;
use crate::session::link::ApiV1;
use crate::session::neko::{NekoCodec, status};
use crate::session::ws_link::{
    CLOSE_TIMEOUT, FORMAT_TIMEOUT, MAX_MESSAGE_BYTES, MAX_MESSAGES_PER_SEC, MAX_READ_BYTES, WsLink, close_msg, drain,
    read_error,
};
use crate::session::{CreateOptions, EndReason};

#[derive(Clone)]
struct WsState {
    api: ApiState,
    manager: Arc<SessionManager>,
    /// N.E.K.O.: the live session of each (character, API key id).
    neko_live: Arc<Mutex<HashMap<String, String>>>,
}

/// The WebSocket routes, for merging into the app.
pub fn routes(api: ApiState, manager: Arc<SessionManager>) -> Router {
    let state = WsState { api, manager, neko_live: Arc::default() };
    Router::new()
        .route("/v1/sessions/{id}/ws", get(session_ws))
        .route("/ws/{character}", get(neko_ws))
        .with_state(state)
        .layer(axum::middleware::from_fn(signaling::api::redirect_location))
}

/// The session token: `?token=` first (form-urlencoded, RFC 3986 percent-decoding), else
/// `Authorization: Bearer`.
fn token<'a>(query: Option<&'a str>, headers: &'a HeaderMap) -> Option<std::borrow::Cow<'a, str>> {
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "token" && !v.is_empty()).then_some(v))
    });
    from_query.or_else(|| signaling::auth::bearer(headers).map(std::borrow::Cow::Borrowed))
}

async fn session_ws(
    State(st): State<WsState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if !signaling::id::is_valid_id(&id) {
        return Err(ApiError::unknown_session());
    }
    let token = token(query.as_deref(), &headers).ok_or(TokenError::Missing)?;
    let claims = st.api.tokens.verify(&token, &id, VerifyMode::Connect)?;
    let upgrade = limited(upgrade)?;
    let Some(shared) = st.manager.get(&id) else {
        // Live on another node: 307 there (a WebSocket client that follows redirects gets there;
        // browsers do not follow them on a WebSocket handshake and see the failure); else 404/409.
        return Err(crate::http::to_api(st.manager.not_here(&id).await));
    };
    match shared.phase() {
        crate::session::SessionState::Ended => return Err(ApiError::offer_after_end()),
        crate::session::SessionState::Created => {}
        _ => return Err(ApiError::already_connected()),
    }
    // Single use, as for the offer.
    signaling::api::claim_token(&st.api, &claims).await?;
    let (link, pump) = WsLink::new(ApiV1);
    st.manager.connect_link(&id, link).await.map_err(crate::http::to_api)?;
    Ok(upgrade.on_upgrade(move |socket| pump.run(socket)).into_response())
}

async fn neko_ws(
    State(st): State<WsState>,
    Path(character): Path<String>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let caller = if st.api.api_keys.is_empty() {
        None
    } else {
        let presented = token(query.as_deref(), &headers).ok_or(TokenError::Missing)?;
        let key = st.api.api_keys.identify(&presented);
        Some(key.ok_or_else(|| ApiError::unauthorized("invalid_api_key", "not one of this server's API keys"))?)
    };
    let key_id = caller.as_ref().map_or_else(|| "open".to_owned(), |k| k.id.clone());
    // Draining and the creation limits as for `POST /v1/sessions`, before the upgrade.
    let caller = caller.map(signaling::Caller::Key);
    signaling::api::admit_creation(&st.api, caller.as_ref(), peer.map(|p| p.0.0.ip())).await?;
    let wanted = character.to_lowercase();
    let catalog = st.manager.characters();
    let found = catalog.iter().find(|c| c.id == character || c.name.to_lowercase() == wanted);
    let character = found.ok_or_else(|| ApiError::unknown_character(&character))?.id.clone();
    let upgrade = limited(upgrade)?;
    let live_key = format!("{character}\u{0}{key_id}");
    Ok(upgrade.on_upgrade(move |socket| neko_socket(st, socket, character, live_key)).into_response())
}

/// A N.E.K.O. socket: wait for `start_session`, start the session, then run it.
async fn neko_socket(st: WsState, mut socket: WebSocket, character: String, live_key: String) {
    let (rate_hz, language) = match neko_start(&mut socket).await {
        Ok(start) => start,
        Err(Some((code, reason))) => return refuse(socket, code, &reason).await,
        Err(None) => return,
    };
    let _ = socket.send(Message::Text(r#"{"type":"session_preparing","input_mode":"audio"}"#.into())).await;
    let options = CreateOptions { character: Some(character), ..Default::default() };
    let shared = match st.manager.create(options).await {
        Ok(s) => s,
        Err(e) => return neko_failed(socket, &e.to_string()).await,
    };
    let older = st.neko_live.lock().unwrap_or_else(|p| p.into_inner()).insert(live_key.clone(), shared.id.clone());
    if let Some(older) = older {
        let _ = st.manager.end(&older, None, EndReason::ClientRequest).await;
    }
    let (link, pump) = WsLink::new_neko(NekoCodec::default());
    if let Err(e) = st.manager.connect_link(&shared.id, link).await {
        let _ = st.manager.end(&shared.id, None, EndReason::ProviderError).await;
        return neko_failed(socket, &e.to_string()).await;
    }
    pump.run_neko(socket, rate_hz, language).await;
    // The socket is gone: forget it unless a newer one took its place meanwhile.
    let mut live = st.neko_live.lock().unwrap_or_else(|p| p.into_inner());
    if live.get(&live_key) == Some(&shared.id) {
        live.remove(&live_key);
    }
}

/// Why a N.E.K.O. socket closes before its session: the close frame to send (none if the client
/// is gone).
type Refused = Option<(u16, String)>;

/// Read until `start_session` (answering `ping`): the client's audio rate and the user's
/// language (`language`, for translated subtitles) if it names them. Before
/// it: binary closes with 1003, malformed JSON with 1007, a message over 64 KiB with 1009, more
/// than 400 messages or no `start_session` within 10 s with 1008.
async fn neko_start(socket: &mut WebSocket) -> Result<(Option<u32>, Option<String>), Refused> {
    let deadline = tokio::time::Instant::now() + FORMAT_TIMEOUT;
    for _ in 0..MAX_MESSAGES_PER_SEC {
        let Ok(msg) = tokio::time::timeout_at(deadline, socket.recv()).await else {
            return Err(Some((1008, "no start_session in time".into())));
        };
        let text = match msg {
            None => return Err(None),
            Some(Err(e)) => return Err(read_error(&e)),
            Some(Ok(Message::Text(t))) if t.len() <= MAX_MESSAGE_BYTES => t,
            Some(Ok(Message::Text(t))) => {
                return Err(Some((1009, format!("message of {} bytes is too large", t.len()))));
            }
            Some(Ok(Message::Binary(_))) => return Err(Some((1003, "binary before start_session".into()))),
            Some(Ok(Message::Close(_))) => return Err(None),
            Some(Ok(_)) => continue,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| Some((1007, "malformed JSON ends the session".to_owned())))?;
        match v["action"].as_str() {
            Some("start_session") => {
                let rate = v["audio_format"]["sample_rate"].as_u64().or(v["sample_rate"].as_u64());
                let rate = rate.and_then(|r| u32::try_from(r).ok()).filter(|r| [16_000, 24_000, 48_000].contains(r));
                return Ok((rate, v["language"].as_str().map(str::to_owned)));
            }
            Some("ping") => {
                let _ = socket.send(Message::Text(r#"{"type":"pong"}"#.into())).await;
            }
            _ => {
                let _ =
                    socket.send(Message::Text(status("SESSION_NOT_STARTED", "send start_session first").into())).await;
            }
        }
    }
    Err(Some((1008, format!("more than {MAX_MESSAGES_PER_SEC} messages before start_session"))))
}

/// Close with `code` and finish the closing handshake (bounded), so unread input does not turn
/// the close into a reset.
async fn refuse(socket: WebSocket, code: u16, reason: &str) {
    use futures::{SinkExt, StreamExt};
    let (mut sink, stream) = socket.split();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(close_msg(code, reason))).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain(stream)).await;
}

async fn neko_failed(mut socket: WebSocket, why: &str) {
    let _ = socket.send(Message::Text(status("SESSION_FAILED", why).into())).await;
    let _ = socket.send(Message::Text(r#"{"type":"session_failed"}"#.into())).await;
    refuse(socket, 1011, "the session could not start").await;
}

/// The upgrade with the read limits of [`crate::session::ws_link`], or 400 for a plain request.
fn limited(upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> Result<WebSocketUpgrade, ApiError> {
    let upgrade = upgrade
        .map_err(|e| ApiError::bad_request("websocket_upgrade_required", format!("this route is a WebSocket: {e}")))?;
    Ok(upgrade.max_message_size(MAX_READ_BYTES).max_frame_size(MAX_READ_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_query_or_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(token(Some("a=1&token=abc.def"), &h).as_deref(), Some("abc.def"));
        assert_eq!(token(Some("token=a%2Eb"), &h).as_deref(), Some("a.b"));
        assert_eq!(token(Some("token="), &h), None);
        h.insert(axum::http::header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(token(None, &h).as_deref(), Some("xyz"));
        assert_eq!(token(Some("token=q"), &h).as_deref(), Some("q"), "the query wins");
    }
}
