//! `POST /v1/sessions/{id}/agent-results`: an external agent's result for a live session (seed
//! 000's agent callbacks): `{"text", "source", "status", "speak_now"?}` -> 202. The client gets
//! `agent_notification {text, source, status}`; the result goes into the model's context before
//! the user's next turn, or is spoken at once with `"speak_now": true`, for every provider.
//!
//! Authorization: with API keys configured, an API key or the session's token
//! (`Authorization: Bearer`); on a loopback bind without keys the route is open, like session
//! creation. Errors are problem+json: 401, 404 unknown session, 409 ended or not connected yet,
//! 413 (> 16 KiB), 415 (not JSON), 400 (bad body), 503 (the session's control queue is full).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use signaling::api::{ApiState, MAX_JSON_BYTES};
use signaling::problem::ApiError;
use signaling::token::{TokenError, VerifyMode};

use crate::session::SessionManager;
use crate::session::conversation::AgentResult;

/// Longest result text accepted (characters).
pub const MAX_RESULT_CHARS: usize = 8_000;

#[derive(Clone)]
struct AgentState {
    api: ApiState,
    manager: Arc<SessionManager>,
}

/// The route, for merging into the app.
pub fn routes(api: ApiState, manager: Arc<SessionManager>) -> Router {
    Router::new().route("/v1/sessions/{id}/agent-results", post(agent_results)).with_state(AgentState { api, manager })
}

fn authorize(api: &ApiState, headers: &HeaderMap, id: &str) -> Result<(), ApiError> {
    if api.api_keys.is_empty() {
        return Ok(());
    }
    let presented = signaling::auth::bearer(headers).ok_or(TokenError::Missing)?;
    if api.api_keys.contains(presented) {
        return Ok(());
    }
    api.tokens.verify(presented, id, VerifyMode::Manage)?;
    Ok(())
}

async fn agent_results(
    State(st): State<AgentState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !signaling::id::is_valid_id(&id) {
        return Err(ApiError::unknown_session());
    }
    authorize(&st.api, &headers, &id)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if !json {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    if body.len() > MAX_JSON_BYTES {
        return Err(ApiError::payload_too_large(MAX_JSON_BYTES));
    }
    let result: AgentResult = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("bad_agent_result", format!("expected {{text, source, status, speak_now?}}: {e}"))
    })?;
    if result.text.trim().is_empty() || result.text.chars().count() > MAX_RESULT_CHARS {
        return Err(ApiError::bad_request(
            "bad_agent_result",
            format!("text must be 1..={MAX_RESULT_CHARS} characters"),
        ));
    }
    st.manager.agent_result(&id, result).map_err(crate::http::to_api)?;
    Ok((StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], r#"{"status":"accepted"}"#).into_response())
}
