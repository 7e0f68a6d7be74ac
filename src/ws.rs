//! `GET /v1/sessions/{id}/ws`: the WebSocket transport of a created session (api-v1's "other
//! transports"; framing in [`crate::session::ws_link`]).
//!
//! Checks, in order, each a problem+json before any upgrade: the path id (404), the session
//! token (401; from `?token=` because browsers cannot set headers on a WebSocket, or from
//! `Authorization: Bearer`), that it is a WebSocket upgrade (400 `websocket_upgrade_required`),
//! the session (404 unknown, 409 ended or already connected), the token's single use (401
//! `token_replayed`, as for the offer), then the model provider (503). The token is never logged
//! (this module logs no URL or header).

use std::sync::Arc;
use std::time::Duration;

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
use time::OffsetDateTime;

use crate::session::SessionManager;
use crate::session::link::ApiV1;
use crate::session::ws_link::{MAX_READ_BYTES, WsLink};

#[derive(Clone)]
struct WsState {
    api: ApiState,
    manager: Arc<SessionManager>,
}

/// The WebSocket routes, for merging into the app.
pub fn routes(api: ApiState, manager: Arc<SessionManager>) -> Router {
    Router::new().route("/v1/sessions/{id}/ws", get(session_ws)).with_state(WsState { api, manager })
}

/// The session token: `?token=` first, else `Authorization: Bearer`.
fn token<'a>(query: Option<&'a str>, headers: &'a HeaderMap) -> Option<std::borrow::Cow<'a, str>> {
    let from_query = query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token" && !v.is_empty()).then(|| percent_decode(v))
    });
    from_query.or_else(|| signaling::auth::bearer(headers).map(std::borrow::Cow::Borrowed))
}

/// `%XX` and `+` decoding of a query value (a JWT needs none; a client may still encode it).
fn percent_decode(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut out = Vec::with_capacity(v.len());
    let mut bytes = v.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                match std::str::from_utf8(&hex).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => out.push(x),
                    None => out.extend_from_slice(b"%"),
                }
            }
            b => out.push(b),
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
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
    let upgrade = upgrade
        .map_err(|e| ApiError::bad_request("websocket_upgrade_required", format!("this route is a WebSocket: {e}")))?;
    let Some(shared) = st.manager.get(&id) else {
        return Err(ApiError::unknown_session());
    };
    match shared.phase() {
        crate::session::SessionState::Ended => return Err(ApiError::offer_after_end()),
        crate::session::SessionState::Created => {}
        _ => return Err(ApiError::already_connected()),
    }
    claim_token(&st.api, &claims).await?;
    let (link, pump) = WsLink::new(ApiV1);
    st.manager.connect_link(&id, link).await.map_err(crate::http::to_api)?;
    Ok(upgrade
        .max_message_size(MAX_READ_BYTES)
        .max_frame_size(MAX_READ_BYTES)
        .on_upgrade(move |socket| pump.run(socket))
        .into_response())
}

/// Single use, as for the offer: the token's `jti` is claimed until it expires.
async fn claim_token(api: &ApiState, claims: &signaling::token::Claims) -> Result<(), ApiError> {
    let key = format!("jti:{}", claims.jti);
    let left = claims.exp.saturating_sub(OffsetDateTime::now_utc().unix_timestamp()).max(0) as u64;
    let ttl = Duration::from_secs(left) + signaling::token::NBF_LEEWAY;
    match api.short_term.set_nx(&key, b"1", ttl).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(TokenError::Replayed.into()),
        Err(e) => {
            tracing::error!(error = %e, "short-term store unavailable");
            Err(ApiError::unavailable("session registry unavailable", Duration::from_secs(5)))
        }
    }
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
