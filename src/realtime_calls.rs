//! OpenAI Realtime's WebRTC call surface, so the unchanged OpenAI Agents SDK
//! (`@openai/agents-realtime`, `OpenAIRealtimeWebRTC` with `baseUrl`) and openai-node
//! (`realtime.calls.create`) talk with a kotodama character (`../shared/docs/protocols.md`,
//! "OpenAI Realtime over WebRTC"; shapes from developers.openai.com/api/reference/resources/
//! realtime/client-secrets and .../calls).
//!
//! - `POST /v1/realtime/client_secrets` (API key; open on a loopback bind without keys, like
//!   `POST /v1/sessions`): JSON `{expires_after?: {anchor: "created_at", seconds: 10..=7200
//!   (600)}, session?: {type: "realtime", model?, instructions?, audio?: {output?: {voice?}}}}` ->
//!   200 `{value: "ek_...", expires_at (Unix s), session}`. The key is an ephemeral,
//!   single-use credential for one new call; it is kept in this node's memory (at most
//!   [`MAX_SECRETS`] live ones), so in a cluster the call must reach the node that minted it.
//! - `POST /v1/realtime/calls` (`Authorization: Bearer ek_...` or an API key): body
//!   `application/sdp` (the Agents SDK: the raw offer, no candidates) or `multipart/form-data`
//!   with parts `sdp` and `session` (openai-node). A new session is created and answered: 201,
//!   `Content-Type: application/sdp`, the answer with all of the server's candidates (the client
//!   trickles nothing: its address is learnt from its STUN checks, peer-reflexive), `Location:
//!   /v1/realtime/calls/{call_id}`. The call id is the kotodama session id, so
//!   `GET /v1/sessions/{id}` and `/transcript` work with an API key. Its data channel
//!   `oai-events` speaks [`crate::session::oai_events`].
//! - `POST /v1/realtime/calls/{call_id}/hangup` (API key; open like above): 200, the session ends.
//!
//! The session's `model` names a character when it is one's id (else the default character);
//! `instructions` are added to the character's persona (the character stays itself); `voice`
//! is taken when the session's provider is `openai` (OpenAI's voice names) or it is one of the
//! character's voices. CORS: every response allows any origin and exposes `Location`; the
//! preflight names `Authorization`, `Content-Type` and `X-OpenAI-Agents-SDK` explicitly (a `*`
//! does not cover `Authorization`, Fetch standard §3.2.5).
//!
//! Minting a secret, and placing a call with an API key (or on the open API), count in the
//! caller's (or client IP's) sessions-per-minute bucket, as `POST /v1/sessions` does. Errors are
//! problem+json: 400 bad JSON / SDP / expiry, 401 missing or unknown key or expired client
//! secret, 404 unknown call, 413, 415, 422 offers kotodama cannot answer, 429, 503.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use signaling::api::{ApiState, ClientIp};
use signaling::identity::Caller;
use signaling::problem::ApiError;
use signaling::sdp::APPLICATION_SDP;
use time::OffsetDateTime;

use crate::config::Character;
use crate::session::oai_events::{OaiEventsCodec, OaiSession};
use crate::session::{CreateOptions, EndReason, SessionManager};

/// Shortest client-secret lifetime, seconds (OpenAI's bound).
pub const MIN_SECRET_SECS: u64 = 10;
/// Longest client-secret lifetime, seconds (OpenAI's bound).
pub const MAX_SECRET_SECS: u64 = 7200;
/// Client-secret lifetime when the request names none, seconds (OpenAI's default).
pub const DEFAULT_SECRET_SECS: u64 = 600;
/// Live client secrets one node keeps (a full table is 503 + `Retry-After`).
pub const MAX_SECRETS: usize = 10_000;
/// Largest `session.instructions` accepted, bytes.
pub const MAX_INSTRUCTIONS: usize = 16 * 1024;
/// Headers a preflight allows, named one by one.
const ALLOW_HEADERS: &str = "Authorization, Content-Type, X-OpenAI-Agents-SDK, Accept, OpenAI-Beta";

/// What a call is created with (from a client secret's `session` or the multipart `session`).
#[derive(Debug, Clone, Default)]
struct CallSpec {
    /// The model name the client gave.
    model: Option<String>,
    /// Instructions added to the character's persona.
    instructions: Option<String>,
    /// The voice asked for.
    voice: Option<String>,
    /// The API key that minted the secret (short id).
    api_key_id: Option<String>,
}

impl CallSpec {
    /// Read an OpenAI `session` object (`realtime` type). Errors name the field.
    fn parse(v: &Value) -> Result<Self, ApiError> {
        let bad = |code: &'static str, detail: String| ApiError::bad_request(code, detail);
        if v.is_null() {
            return Ok(Self::default());
        }
        if !v.is_object() {
            return Err(bad("invalid_session", "`session` must be a JSON object".into()));
        }
        match v["type"].as_str() {
            None | Some("realtime") => {}
            Some(other) => {
                return Err(bad(
                    "invalid_session",
                    format!("session.type `{other}` is not supported (use `realtime`)"),
                ));
            }
        }
        let text = |field: &Value, name: &str| -> Result<Option<String>, ApiError> {
            match field {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(bad("invalid_session", format!("session.{name} must be a string"))),
            }
        };
        let instructions = text(&v["instructions"], "instructions")?;
        if instructions.as_ref().is_some_and(|i| i.len() > MAX_INSTRUCTIONS) {
            return Err(bad("invalid_session", format!("session.instructions exceeds {MAX_INSTRUCTIONS} bytes")));
        }
        let voice = match text(&v["audio"]["output"]["voice"], "audio.output.voice")? {
            Some(v) => Some(v),
            None => text(&v["voice"], "voice")?,
        };
        if voice.as_ref().is_some_and(|v| v.is_empty() || v.len() > 64) {
            return Err(bad("invalid_session", "session voice must be 1..=64 bytes".into()));
        }
        Ok(Self { model: text(&v["model"], "model")?, instructions, voice, api_key_id: None })
    }
}

/// A minted client secret.
#[derive(Debug, Clone)]
struct Secret {
    expires: Instant,
    spec: CallSpec,
}

#[derive(Clone)]
struct CallsState {
    api: ApiState,
    manager: Arc<SessionManager>,
    /// Live client secrets by value (`ek_...`).
    secrets: Arc<Mutex<HashMap<String, Secret>>>,
}

impl CallsState {
    fn secrets(&self) -> std::sync::MutexGuard<'_, HashMap<String, Secret>> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The OpenAI Realtime call routes, for merging into the app.
pub fn routes(api: ApiState, manager: Arc<SessionManager>) -> Router {
    let state = CallsState { api, manager, secrets: Arc::default() };
    Router::new()
        .route("/v1/realtime/client_secrets", post(client_secrets).options(preflight))
        .route("/v1/realtime/calls", post(create_call).options(preflight))
        .route("/v1/realtime/calls/{call_id}/hangup", post(hangup).options(preflight))
        .method_not_allowed_fallback(signaling::api::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(cors))
}

/// CORS on every response of these routes (errors too, so a page can read them).
async fn cors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Location"));
    res
}

/// `OPTIONS`: the CORS preflight (Fetch standard §3.2.3), 204.
async fn preflight() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    res
}

/// The caller's API key id, when keys are configured (`Ok(None)`: the API is open).
async fn api_caller(st: &CallsState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(caller_id(signaling::api::authenticate(&st.api, headers).await?.as_ref()))
}

fn caller_id(caller: Option<&Caller>) -> Option<String> {
    match caller? {
        Caller::Key(k) => Some(k.id.clone()),
        Caller::User(u) => Some(format!("user:{}", u.user_id)),
    }
}

/// Authenticate a request that will make a session and admit it like `POST /v1/sessions`
/// ([`signaling::api::admit_creation`]: 503 while draining, 429 past the caller's, or on an open
/// API the client IP's, sessions per minute).
async fn creating_caller(st: &CallsState, headers: &HeaderMap, ip: Option<IpAddr>) -> Result<Option<String>, ApiError> {
    let caller = signaling::api::authenticate(&st.api, headers).await?;
    signaling::api::admit_creation(&st.api, caller.as_ref(), ip).await?;
    Ok(caller_id(caller.as_ref()))
}

fn media_type(headers: &HeaderMap) -> String {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// The whole body, 413 beyond `limit` bytes.
async fn body_bytes(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::payload_too_large(limit))
}

/// `POST /v1/realtime/client_secrets`.
async fn client_secrets(
    State(st): State<CallsState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key_id = creating_caller(&st, &headers, ip).await?;
    let bytes = body_bytes(body, &headers, st.api.limits.max_json_bytes).await?;
    let request: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        if media_type(&headers) != "application/json" {
            return Err(ApiError::unsupported_media_type("application/json"));
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("bad_json", format!("invalid JSON: {e}")))?
    };
    if !request.is_object() {
        return Err(ApiError::bad_request("bad_json", "the body must be a JSON object"));
    }
    let expires_after = &request["expires_after"];
    if !expires_after.is_null() && expires_after["anchor"].as_str().is_some_and(|a| a != "created_at") {
        return Err(ApiError::bad_request("invalid_expires_after", "expires_after.anchor must be `created_at`"));
    }
    let secs = match &expires_after["seconds"] {
        Value::Null => DEFAULT_SECRET_SECS,
        v => v.as_u64().filter(|s| (MIN_SECRET_SECS..=MAX_SECRET_SECS).contains(s)).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_expires_after",
                format!("expires_after.seconds must be an integer from {MIN_SECRET_SECS} to {MAX_SECRET_SECS}"),
            )
        })?,
    };
    let mut spec = CallSpec::parse(&request["session"])?;
    spec.api_key_id = key_id;
    let (character, session) = effective(&st.manager, &spec, None);
    let value = format!("ek_{}", signaling::id::new_id(""));
    let expires_at = OffsetDateTime::now_utc().unix_timestamp() + secs as i64;
    {
        let mut secrets = st.secrets();
        let now = Instant::now();
        secrets.retain(|_, s| s.expires > now);
        if secrets.len() >= MAX_SECRETS {
            return Err(ApiError::unavailable("too many live client secrets on this node", Duration::from_secs(10)));
        }
        secrets.insert(value.clone(), Secret { expires: now + Duration::from_secs(secs), spec });
    }
    let mut session_json = session_json(&session, &character);
    session_json["expires_at"] = expires_at.into();
    let mut res = Json(json!({"value": value, "expires_at": expires_at, "session": session_json})).into_response();
    no_store(&mut res);
    Ok(res)
}

/// A JSON response.
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0.to_string()).into_response()
    }
}

fn no_store(res: &mut Response) {
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The `realtime.session` object a client is shown.
fn session_json(session: &OaiSession, character: &Character) -> Value {
    json!({
        "type": "realtime",
        "object": "realtime.session",
        "model": session.model,
        "instructions": session.instructions,
        "output_modalities": ["audio"],
        "audio": {"output": {"voice": session.voice}},
        "kotodama": {"character": character.id},
    })
}

/// The character a call speaks as (`model` naming a character, else the default) with the
/// spec applied where allowed, and the session shown to the client.
fn effective(manager: &SessionManager, spec: &CallSpec, provider: Option<&str>) -> (Character, OaiSession) {
    let catalog = manager.characters();
    let mut character = spec
        .model
        .as_deref()
        .and_then(|m| catalog.iter().find(|c| c.id == m))
        .or_else(|| catalog.first())
        .cloned()
        .unwrap_or_default();
    apply(&mut character, spec, provider);
    let session = OaiSession {
        model: spec.model.clone().unwrap_or_else(|| character.id.clone()),
        instructions: character.persona.clone(),
        voice: character.voice.clone(),
    };
    (character, session)
}

/// The spec's instructions and voice on `character` (see the module docs for what is allowed).
fn apply(character: &mut Character, spec: &CallSpec, provider: Option<&str>) {
    if let Some(extra) = spec.instructions.as_deref().map(str::trim).filter(|i| !i.is_empty()) {
        character.persona = if character.persona.trim().is_empty() {
            extra.to_owned()
        } else {
            format!("{}\n\n{extra}", character.persona.trim_end())
        };
    }
    if let Some(voice) = &spec.voice {
        let own = character.voice == *voice || character.voices.values().any(|v| v == voice);
        if own || provider == Some("openai") {
            character.voice = voice.clone();
            if let Some(p) = provider {
                character.voices.remove(p);
            }
        }
    }
}

/// Who may place a call: a live client secret (consumed) or an API key / the open API.
enum Credential {
    Secret(String, Secret),
    Key(Option<String>),
}

async fn call_credential(st: &CallsState, headers: &HeaderMap, ip: Option<IpAddr>) -> Result<Credential, ApiError> {
    if let Some(presented) = signaling::auth::bearer(headers).filter(|b| b.starts_with("ek_")) {
        // Minting the secret counted against the rate limit; a draining node still refuses.
        signaling::api::admit_creation(&st.api, None, None).await?;
        let secret = st.secrets().remove(presented);
        return match secret {
            Some(s) if s.expires > Instant::now() => Ok(Credential::Secret(presented.to_owned(), s)),
            Some(_) => Err(ApiError::unauthorized("client_secret_expired", "the client secret has expired")),
            None => Err(ApiError::unauthorized(
                "invalid_client_secret",
                "unknown or already used client secret (mint one with POST /v1/realtime/client_secrets)",
            )),
        };
    }
    Ok(Credential::Key(creating_caller(st, headers, ip).await?))
}

/// The parts `sdp` and `session` of a `multipart/form-data` body (RFC 7578).
fn multipart(headers: &HeaderMap, body: &[u8]) -> Result<(Vec<u8>, Option<Value>), ApiError> {
    let bad = |detail: &str| ApiError::bad_request("bad_multipart", detail.to_owned());
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let boundary = ct
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| bad("multipart/form-data needs a boundary parameter"))?;
    let delimiter = format!("--{boundary}");
    let text = std::str::from_utf8(body).map_err(|_| bad("the multipart body is not UTF-8"))?;
    let (mut sdp, mut session) = (None, None);
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.strip_prefix("\r\n").or_else(|| part.strip_prefix('\n')).unwrap_or(part);
        let (head, content) = part
            .split_once("\r\n\r\n")
            .or_else(|| part.split_once("\n\n"))
            .ok_or_else(|| bad("a multipart part has no header/body separator"))?;
        let content = content.strip_suffix("\r\n").or_else(|| content.strip_suffix('\n')).unwrap_or(content);
        let name = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .flat_map(|l| l.split(';'))
            .filter_map(|p| p.trim().strip_prefix("name="))
            .map(|n| n.trim_matches('"'))
            .next();
        match name {
            Some("sdp") => sdp = Some(content.as_bytes().to_vec()),
            Some("session") => {
                let v = serde_json::from_str(content)
                    .map_err(|e| ApiError::bad_request("invalid_session", format!("the `session` part: {e}")))?;
                session = Some(v);
            }
            _ => {}
        }
    }
    Ok((sdp.ok_or_else(|| bad("the multipart body has no `sdp` part"))?, session))
}

/// `POST /v1/realtime/calls`.
async fn create_call(
    State(st): State<CallsState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let credential = call_credential(&st, &headers, ip).await?;
    let result = place_call(&st, &headers, body, &credential).await;
    if result.is_err()
        && let Credential::Secret(value, secret) = credential
    {
        // The call did not happen: the secret may be used again (a corrected offer, a retry).
        st.secrets().insert(value, secret);
    }
    result
}

async fn place_call(
    st: &CallsState,
    headers: &HeaderMap,
    body: Body,
    credential: &Credential,
) -> Result<Response, ApiError> {
    let limits = &st.api.limits;
    let (sdp, session) = match media_type(headers).as_str() {
        APPLICATION_SDP => (body_bytes(body, headers, limits.max_offer_bytes).await?.to_vec(), None),
        "multipart/form-data" => {
            let bytes = body_bytes(body, headers, limits.max_offer_bytes + limits.max_json_bytes).await?;
            multipart(headers, &bytes)?
        }
        _ => return Err(ApiError::unsupported_media_type("application/sdp or multipart/form-data")),
    };
    let offer = signaling::sdp::validate_offer(&sdp)?;
    let mut spec = match credential {
        Credential::Secret(_, s) => s.spec.clone(),
        Credential::Key(id) => CallSpec { api_key_id: id.clone(), ..Default::default() },
    };
    if let Some(session) = &session {
        // The call's own session refines the secret's.
        let more = CallSpec::parse(session)?;
        spec.model = more.model.or(spec.model);
        spec.instructions = more.instructions.or(spec.instructions);
        spec.voice = more.voice.or(spec.voice);
    }
    let (character, _) = effective(&st.manager, &spec, None);
    let options = CreateOptions {
        character: Some(character.id.clone()),
        api_key_id: spec.api_key_id.clone(),
        ..Default::default()
    };
    let shared = st.manager.create(options).await.map_err(crate::http::to_api)?;
    let (_, session) = effective(&st.manager, &spec, Some(&shared.provider));
    let codec = OaiEventsCodec::new(shared.id.clone(), session);
    let provider = shared.provider.clone();
    let answered = st.manager.offer_with(&shared.id, offer, codec, |c| apply(c, &spec, Some(&provider))).await;
    let (answer, _, _) = match answered {
        Ok(a) => a,
        Err(e) => {
            // No half-made call is left behind.
            let _ = st.manager.end(&shared.id, None, EndReason::InternalError).await;
            return Err(crate::http::to_api(e));
        }
    };
    let mut res = (StatusCode::CREATED, answer).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(APPLICATION_SDP));
    let location = HeaderValue::from_str(&format!("/v1/realtime/calls/{}", shared.id))
        .map_err(|_| ApiError::internal("session id is not a header value"))?;
    h.insert(header::LOCATION, location);
    no_store(&mut res);
    tracing::info!(session_id = %shared.id, character = %shared.character, "OpenAI Realtime call answered");
    Ok(res)
}

/// `POST /v1/realtime/calls/{call_id}/hangup`.
async fn hangup(
    State(st): State<CallsState>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api_caller(&st, &headers).await?;
    if !signaling::id::is_valid_id(&call_id) || st.manager.get(&call_id).is_none() {
        return Err(ApiError::not_found("unknown_call", "no such call on this server"));
    }
    st.manager.end(&call_id, None, EndReason::ClientRequest).await.map_err(crate::http::to_api)?;
    Ok(StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_yields_the_sdp_and_session_parts() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("multipart/form-data; boundary=XyZ"));
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\nv=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n\r\n\
                    --XyZ\r\nContent-Disposition: form-data; name=\"session\"\r\nContent-Type: application/json\r\n\r\n\
                    {\"type\":\"realtime\",\"instructions\":\"Be brief.\"}\r\n--XyZ--\r\n";
        let (sdp, session) = multipart(&headers, body.as_bytes()).unwrap();
        assert_eq!(sdp, b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n");
        let spec = CallSpec::parse(&session.unwrap()).unwrap();
        assert_eq!(spec.instructions.as_deref(), Some("Be brief."));
        let no_sdp = "--XyZ\r\nContent-Disposition: form-data; name=\"session\"\r\n\r\n{}\r\n--XyZ--\r\n";
        assert_eq!(multipart(&headers, no_sdp.as_bytes()).unwrap_err().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn instructions_join_the_persona_and_only_allowed_voices_apply() {
        let mut c =
            Character { id: "aiko".into(), persona: "You are Aiko.".into(), voice: "v1".into(), ..Default::default() };
        let spec =
            CallSpec { instructions: Some("Be brief.".into()), voice: Some("alloy".into()), ..Default::default() };
        apply(&mut c, &spec, Some("scripted"));
        assert_eq!(c.persona, "You are Aiko.\n\nBe brief.");
        assert_eq!(c.voice, "v1", "not one of the character's voices, not OpenAI");
        apply(&mut c, &CallSpec { voice: Some("alloy".into()), ..Default::default() }, Some("openai"));
        assert_eq!(c.voice, "alloy");
        let bad = CallSpec::parse(&json!({"type": "transcription"})).unwrap_err();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    }
}
