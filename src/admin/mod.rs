//! The admin API under `/v1/admin/`: characters (persona tuning) stored in the database and
//! used by the next session without a restart, live sessions (list, end), conversation export
//! (JSON or plain text) per session and per user, and the audit log.
//!
//! | route | success |
//! |---|---|
//! | `GET /v1/admin/characters` | 200 `[{...character, "version", "source": "config"|"admin"}]` |
//! | `GET /v1/admin/characters/{id}` | 200 one of those |
//! | `PUT /v1/admin/characters/{id}` | 200 the stored character with its new `version` (body: a character as in `[[characters]]`, JSON; `id` optional) |
//! | `DELETE /v1/admin/characters/{id}` | 200; new sessions can no longer use it (also a configured one) |
//! | `GET /v1/admin/sessions` | 200 `[{"session_id","node","provider","character","user_id","state","agent_state"?,"created_at"}]`: every session not ended, on any node |
//! | `DELETE /v1/admin/sessions/{id}` | 200; the session ends wherever it runs |
//! | `GET /v1/admin/sessions/{id}/export?format=json|text` | 200 the session and its transcript |
//! | `GET /v1/admin/sessions/{id}/recording` | 200 the session, its transcript and its recording's files (see [`recording`]) |
//! | `GET /v1/admin/sessions/{id}/recording/{file}` | 200 one file of the recording (`events.jsonl`, `user.opus`, `agent.opus`) |
//! | `GET /v1/admin/users/{user_id}/export?format=json|text` | 200 every session of the user with transcripts |
//! | `GET /v1/admin/audit?limit=N` | 200 the newest N (default 100, at most 1000) audit records |
//! | `GET /v1/admin/flags?status=open|resolved|all&category=&session_id=&source=agent|user&limit=` | 200 the moderation review queue, newest first (default: open) |
//! | `POST /v1/admin/flags/{id}/resolve` | 200; body `{"resolution": "..."}` (a reviewer's note, optional); 409 when already resolved |
//! | `/v1/admin/policies[/{id}[/versions\|/lists/{allow\|deny}]]` | moderation policies and their lists, versioned (see `admin::policies`) |
//!
//! Who: an admin API key (`KOTODAMA_ADMIN_API_KEYS`) or an end user whose OIDC token carries
//! the admin role; no credential is 401, any other credential 403 `admin_role_required` (also
//! when the API is otherwise open). Every handler starts with the `Admin` extractor, which
//! checks this before anything else is read. Every action is written to the audit log (who, what, when)
//! *before* it runs: an action whose record cannot be stored is not performed (503).
//!
//! Character edits are rows laid over the configured characters (`character_edits`): the node
//! that takes an edit applies it at once; other nodes sharing the database pick it up within
//! [`CATALOG_REFRESH`]; a restarted node starts with them.

mod policies;
mod recording;
pub mod store;

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use signaling::identity::Caller;
use signaling::problem::ApiError;

use crate::config::{Character, Config};
use crate::session::{SessionManager, SessionState};
use crate::store::{SessionWithTurns, StoreError, StoredSession, StoredState, UserData};
use store::{AdminStore, AuditEntry, CharacterEdit, FlagFilter};

/// How often a node reloads character edits made on other nodes.
pub const CATALOG_REFRESH: Duration = Duration::from_secs(10);
/// Largest character body (64 KiB: personas are long, not that long).
pub const MAX_CHARACTER_BYTES: usize = 64 * 1024;
/// Most audit records one request returns.
pub const MAX_AUDIT_LIMIT: i64 = 1000;

#[derive(Clone)]
struct AdminState {
    api: signaling::ApiState,
    manager: Arc<SessionManager>,
    store: AdminStore,
    configured: Arc<Vec<Character>>,
}

/// The admin routes, after applying the stored character edits to `manager`'s catalog (and
/// starting the task that reloads them every [`CATALOG_REFRESH`]).
pub async fn start(
    api: signaling::ApiState,
    manager: Arc<SessionManager>,
    store: AdminStore,
    configured: Vec<Character>,
) -> Result<Router, StoreError> {
    let st = AdminState { api, manager, store, configured: Arc::new(configured) };
    st.reload().await?;
    policies::reload(&st.manager, &st.store).await?;
    tokio::spawn(refresh_loop(Arc::downgrade(&st.manager), st.store.clone(), Arc::clone(&st.configured)));
    Ok(Router::new()
        .route("/v1/admin/characters", get(list_characters))
        .route("/v1/admin/characters/{id}", get(get_character).put(put_character).delete(delete_character))
        .route("/v1/admin/sessions", get(list_sessions))
        .route("/v1/admin/sessions/{id}", axum::routing::delete(end_session))
        .route("/v1/admin/sessions/{id}/export", get(export_session))
        .route("/v1/admin/sessions/{id}/recording", get(recording::recording))
        .route("/v1/admin/sessions/{id}/recording/{file}", get(recording::recording_file))
        .route("/v1/admin/users/{user_id}/export", get(export_user))
        .route("/v1/admin/audit", get(audit_log))
        .route("/v1/admin/flags", get(list_flags))
        .route("/v1/admin/flags/{id}/resolve", axum::routing::post(resolve_flag))
        .route("/v1/admin/policies", get(policies::list))
        .route("/v1/admin/policies/{id}", get(policies::get).put(policies::put).delete(policies::delete))
        .route("/v1/admin/policies/{id}/versions", get(policies::versions))
        .route("/v1/admin/policies/{id}/lists/{list}", get(policies::get_list).put(policies::put_list))
        .with_state(st))
}

async fn refresh_loop(manager: Weak<SessionManager>, store: AdminStore, configured: Arc<Vec<Character>>) {
    let mut tick = tokio::time::interval(CATALOG_REFRESH);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(manager) = manager.upgrade() else { break };
        match store.character_edits().await {
            Ok(edits) => manager.set_characters(merge(&configured, &edits)),
            Err(e) => tracing::warn!(error = %e, "character edits not reloaded"),
        }
        if let Err(e) = policies::reload(&manager, &store).await {
            tracing::warn!(error = %e, "moderation policies not reloaded");
        }
    }
}

/// The configured characters with `edits` applied: an edit replaces its character in place or
/// (spec `None`) removes it; edits of new ids follow, by id.
pub fn merge(configured: &[Character], edits: &[CharacterEdit]) -> Vec<Character> {
    let parsed = |e: &CharacterEdit| -> Option<Character> {
        let spec = e.spec.as_deref()?;
        serde_json::from_str(spec)
            .map_err(|err| tracing::warn!(character = %e.id, error = %err, "stored character unreadable; skipped"))
            .ok()
    };
    let mut out: Vec<Character> = configured
        .iter()
        .filter_map(|c| match edits.iter().find(|e| e.id == c.id) {
            Some(e) => parsed(e),
            None => Some(c.clone()),
        })
        .collect();
    out.extend(edits.iter().filter(|e| !configured.iter().any(|c| c.id == e.id)).filter_map(parsed));
    out
}

/// A store failure as the API's 503 (logged; the cause is not sent to the client).
pub(crate) fn storage(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "admin storage unavailable");
    ApiError::unavailable("storage is unavailable", Duration::from_secs(5))
}

impl AdminState {
    async fn reload(&self) -> Result<Vec<CharacterEdit>, StoreError> {
        let edits = self.store.character_edits().await?;
        self.manager.set_characters(merge(&self.configured, &edits));
        Ok(edits)
    }

    /// The caller, if it may use the admin API: 401 without a valid credential, else 403
    /// without the admin role.
    async fn admin(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = signaling::api::authenticate(&self.api, headers).await?.ok_or_else(|| {
            ApiError::unauthorized("api_key_missing", "the admin API needs an admin key or identity token")
        })?;
        if !caller.is_admin() {
            tracing::warn!(actor = %caller.audit_name(), "admin API refused: not an admin");
            return Err(ApiError::forbidden("admin_role_required", "this credential does not have the admin role"));
        }
        Ok(caller)
    }

    /// Store the audit record of `caller` doing `action` (503 when it cannot be stored: then
    /// the action must not run).
    async fn record(
        &self,
        caller: &Caller,
        action: &str,
        target: Option<&str>,
        detail: Option<Value>,
    ) -> Result<(), ApiError> {
        let entry = AuditEntry {
            id: audit_id(),
            at: SystemTime::now(),
            actor: caller.audit_name(),
            action: action.to_owned(),
            target: target.map(str::to_owned),
            detail,
        };
        self.store.audit(&entry).await.map_err(storage)?;
        tracing::info!(actor = %entry.actor, action, target = ?target, "admin action");
        Ok(())
    }
}

/// An admin request: the admin API's state and a caller that may use it. The extractor every
/// admin route starts with (401 without a valid credential, 403 `admin_role_required` without
/// the admin role), so nothing else of the request is read before that check.
struct Admin {
    st: AdminState,
    caller: Caller,
}

impl FromRequestParts<AdminState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AdminState) -> Result<Self, ApiError> {
        let caller = st.admin(&parts.headers).await?;
        Ok(Admin { st: st.clone(), caller })
    }
}

/// `path_id_extractor!(/// doc \n vis Name = check)` declares the extractor `Name(String)`: the
/// route's one path segment after `check` (a `fn(Result<Path<String>, PathRejection>) ->
/// Result<String, ApiError>`), so the handler gets a checked id and a bad one is the route's
/// 404 before the handler runs. Place it after [`Admin`] in a handler's arguments.
macro_rules! path_id_extractor {
    ($(#[$doc:meta])* $vis:vis $name:ident = $check:path) => {
        $(#[$doc])*
        $vis struct $name(String);

        impl axum::extract::FromRequestParts<$crate::admin::AdminState> for $name {
            type Rejection = signaling::problem::ApiError;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                st: &$crate::admin::AdminState,
            ) -> Result<Self, Self::Rejection> {
                $check(axum::extract::Path::from_request_parts(parts, st).await).map(Self)
            }
        }
    };
}
use path_id_extractor;

path_id_extractor!(
    /// A character id (404 `unknown_character` when malformed).
    CharacterId = character_id
);
path_id_extractor!(
    /// A session id (404 `unknown_session` when malformed).
    SessionId = session_path
);

/// A JSON body of at most `limit` bytes (`None`: empty). With `typed`, `Content-Type` must be
/// `application/json` (415 otherwise); 413 when larger, 400 `bad_json` when unreadable.
async fn json_body(headers: &HeaderMap, body: Body, limit: usize, typed: bool) -> Result<Option<Value>, ApiError> {
    let is_json =
        headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if typed && !is_json {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::payload_too_large(limit))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request("bad_json", format!("invalid JSON: {e}")))
}

/// An id in a path: 1-64 of `A-Z a-z 0-9 - _` (else `not_found`).
fn path_id(path: Result<Path<String>, PathRejection>, not_found: fn(&str) -> ApiError) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) if crate::moderation::policies::valid_policy_id(&id) => Ok(id),
        Ok(Path(id)) => Err(not_found(&id)),
        Err(_) => Err(not_found("")),
    }
}

/// A new audit record id that sorts in creation order on this node (microseconds since the
/// epoch and a counter, fixed-width hex), then a random part so nodes never collide.
fn audit_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let micros = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{micros:016x}{n:08x}-{}", signaling::id::new_id("a"))
}

fn character_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path_id(path, |_| ApiError::not_found("unknown_character", "no such character"))
}

/// A character as listed: its fields, `version` (0: as configured) and `source`.
fn listed(c: &Character, edits: &[CharacterEdit]) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    let version = edits.iter().find(|e| e.id == c.id).map_or(0, |e| e.version);
    v["version"] = json!(version);
    v["source"] = json!(if version == 0 { "config" } else { "admin" });
    v
}

async fn list_characters(Admin { st, caller }: Admin) -> Result<Response, ApiError> {
    st.record(&caller, "character.list", None, None).await?;
    let edits = st.reload().await.map_err(storage)?;
    let all: Vec<Value> = st.manager.characters().iter().map(|c| listed(c, &edits)).collect();
    Ok(json_response(StatusCode::OK, &all))
}

async fn get_character(Admin { st, caller }: Admin, CharacterId(id): CharacterId) -> Result<Response, ApiError> {
    st.record(&caller, "character.get", Some(&id), None).await?;
    let edits = st.reload().await.map_err(storage)?;
    let catalog = st.manager.characters();
    let c = catalog.iter().find(|c| c.id == id).ok_or_else(|| ApiError::unknown_character(&id))?;
    Ok(json_response(StatusCode::OK, &listed(c, &edits)))
}

/// The body as a character with the path's id, validated like a configured one.
async fn parse_character(st: &AdminState, id: &str, headers: &HeaderMap, body: Body) -> Result<Character, ApiError> {
    let mut value = json_body(headers, body, MAX_CHARACTER_BYTES, true)
        .await?
        .ok_or_else(|| ApiError::bad_request("bad_json", "invalid character: empty body"))?;
    let object =
        value.as_object_mut().ok_or_else(|| ApiError::bad_request("bad_json", "a character is a JSON object"))?;
    match object.get("id") {
        Some(Value::String(body_id)) if body_id != id => {
            return Err(ApiError::unprocessable("id_mismatch", "the body's id differs from the path's"));
        }
        _ => {
            object.insert("id".into(), json!(id));
        }
    }
    let character: Character =
        serde_json::from_value(value).map_err(|e| ApiError::unprocessable("bad_character", e.to_string()))?;
    if character.name.trim().is_empty() {
        return Err(ApiError::unprocessable("bad_character", "name is empty"));
    }
    // The same checks as a configured character (tools, providers, visemes, expressions).
    Config { characters: vec![character.clone()], ..Config::default() }
        .validate()
        .map_err(|e| ApiError::unprocessable("bad_character", e.to_string()))?;
    if let Some(p) = character.moderation.as_ref().and_then(|m| m.policy.as_deref())
        && st.manager.policies().get(p).is_none()
    {
        return Err(ApiError::unprocessable("unknown_policy", format!("no moderation policy `{p}`")));
    }
    Ok(character)
}

async fn put_character(
    Admin { st, caller }: Admin,
    CharacterId(id): CharacterId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let character = parse_character(&st, &id, &headers, body).await?;
    let detail = json!({"name": character.name, "voice": character.voice, "language": character.language});
    st.record(&caller, "character.put", Some(&id), Some(detail)).await?;
    let spec = serde_json::to_string(&character).map_err(ApiError::internal)?;
    st.store.put_character(&id, Some(&spec), &caller.audit_name()).await.map_err(storage)?;
    let edits = st.reload().await.map_err(storage)?;
    Ok(json_response(StatusCode::OK, &listed(&character, &edits)))
}

async fn delete_character(Admin { st, caller }: Admin, CharacterId(id): CharacterId) -> Result<Response, ApiError> {
    let catalog = st.manager.characters();
    if !catalog.iter().any(|c| c.id == id) {
        return Err(ApiError::unknown_character(&id));
    }
    if catalog.len() == 1 {
        return Err(ApiError::conflict("last_character", "the last character cannot be deleted"));
    }
    st.record(&caller, "character.delete", Some(&id), None).await?;
    let version = st.store.put_character(&id, None, &caller.audit_name()).await.map_err(storage)?;
    st.reload().await.map_err(storage)?;
    Ok(json_response(StatusCode::OK, &json!({"id": id, "deleted": true, "version": version})))
}

async fn list_sessions(Admin { st, caller }: Admin) -> Result<Response, ApiError> {
    st.record(&caller, "session.list", None, None).await?;
    let mut out = Vec::new();
    for id in st.store.open_session_ids().await.map_err(storage)? {
        let Some(s) = st.manager.store().session(&id).await.map_err(storage)? else { continue };
        let mut v = json!({
            "session_id": s.id, "node": s.node_id, "provider": s.provider, "character": s.character,
            "user_id": s.user_id, "state": s.state, "created_at": rfc3339(s.created_at),
        });
        if let Some(live) = st.manager.get(&id) {
            v["agent_state"] = json!(live.agent_state());
        }
        out.push(v);
    }
    Ok(json_response(StatusCode::OK, &out))
}

fn session_path(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) if signaling::id::is_valid_id(&id) => Ok(id),
        _ => Err(ApiError::unknown_session()),
    }
}

async fn stored_session(st: &AdminState, id: &str) -> Result<StoredSession, ApiError> {
    st.manager.store().session(id).await.map_err(storage)?.ok_or_else(ApiError::unknown_session)
}

async fn end_session(Admin { st, caller }: Admin, SessionId(id): SessionId) -> Result<Response, ApiError> {
    let session = stored_session(&st, &id).await?;
    // The stored record lags the session by the store writer's queue: a session this node holds
    // answers for itself.
    let ended_here = st.manager.get(&id).is_some_and(|s| s.phase() == SessionState::Ended);
    if session.state == StoredState::Ended || ended_here {
        return Err(ApiError::session_already_ended());
    }
    st.record(&caller, "session.end", Some(&id), Some(json!({"node": session.node_id}))).await?;
    st.manager.end_everywhere(std::slice::from_ref(&session)).await.map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, &json!({"session_id": id, "ended": true})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    format: Option<String>,
}

/// `json` (default) or `text`.
fn text_format(q: Result<Query<ExportQuery>, QueryRejection>) -> Result<bool, ApiError> {
    let bad = || ApiError::bad_request("bad_format", "format must be json or text");
    match q.map_err(|_| bad())?.0.format.as_deref() {
        None | Some("json") => Ok(false),
        Some("text") => Ok(true),
        Some(_) => Err(bad()),
    }
}

async fn export_session(
    Admin { st, caller }: Admin,
    SessionId(id): SessionId,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let text = text_format(query)?;
    let detail = json!({"format": if text { "text" } else { "json" }});
    st.record(&caller, "session.export", Some(&id), Some(detail)).await?;
    st.manager.writer().flush().await;
    let session = stored_session(&st, &id).await?;
    let turns = match st.manager.get(&id) {
        // Live: what was said so far, including turns the writer has not stored yet.
        Some(live) if live.phase() != signaling::host::SessionState::Ended => live.turns(),
        _ => st.manager.store().turns(&id).await.map_err(storage)?,
    };
    let export = SessionWithTurns { session, turns };
    if text {
        return Ok(text_response(transcript_text(&export)));
    }
    Ok(json_response(StatusCode::OK, &export))
}

async fn export_user(
    Admin { st, caller }: Admin,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let user_id = match path {
        Ok(Path(u)) if !u.is_empty() && u.len() <= signaling::api::MAX_USER_ID_LEN => u,
        _ => return Err(ApiError::not_found("no_user_data", "no data for this user")),
    };
    let text = text_format(query)?;
    st.record(&caller, "user.export", Some(&user_id), None).await?;
    st.manager.writer().flush().await;
    let data: UserData = st.manager.store().user_data(&user_id, None).await.map_err(storage)?;
    if data.sessions.is_empty() {
        return Err(ApiError::not_found("no_user_data", "no data for this user"));
    }
    if text {
        return Ok(text_response(data.sessions.iter().map(transcript_text).collect::<Vec<_>>().join("\n")));
    }
    Ok(json_response(StatusCode::OK, &data))
}

/// A list's `limit`: 100 when absent, else 1..=[`MAX_AUDIT_LIMIT`] (400 `bad_limit`).
fn list_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(100);
    if !(1..=MAX_AUDIT_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("bad_limit", format!("limit must be 1..={MAX_AUDIT_LIMIT}")));
    }
    Ok(limit)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn audit_log(
    Admin { st, caller }: Admin,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let limit = list_limit(query.map_err(|_| ApiError::bad_request("bad_limit", "limit must be a number"))?.0.limit)?;
    st.record(&caller, "audit.read", None, Some(json!({"limit": limit}))).await?;
    let entries = st.store.audit_log(limit).await.map_err(storage)?;
    Ok(json_response(StatusCode::OK, &entries))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagQuery {
    status: Option<String>,
    category: Option<String>,
    session_id: Option<String>,
    source: Option<String>,
    limit: Option<i64>,
}

async fn list_flags(
    Admin { st, caller }: Admin,
    query: Result<Query<FlagQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let bad = |what: &str| ApiError::bad_request("bad_query", what.to_owned());
    let q = query.map_err(|e| bad(&format!("status, category, session_id, source, limit: {e}")))?.0;
    let resolved = match q.status.as_deref() {
        None | Some("open") => Some(false),
        Some("resolved") => Some(true),
        Some("all") => None,
        Some(_) => return Err(bad("status must be open, resolved or all")),
    };
    let limit = list_limit(q.limit)?;
    if q.source.as_deref().is_some_and(|s| s != "agent" && s != "user") {
        return Err(bad("source must be agent or user"));
    }
    let filter = FlagFilter { resolved, category: q.category, session_id: q.session_id, source: q.source };
    let detail = json!({"status": q.status, "category": filter.category, "session_id": filter.session_id});
    st.record(&caller, "flag.list", None, Some(detail)).await?;
    Ok(json_response(StatusCode::OK, &st.store.flags(&filter, limit).await.map_err(storage)?))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    resolution: Option<String>,
}

async fn resolve_flag(
    Admin { st, caller }: Admin,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = session_path(path).map_err(|_| ApiError::not_found("unknown_flag", "no such flag"))?;
    let request: ResolveRequest = match json_body(&headers, body, 4096, false).await? {
        None => ResolveRequest::default(),
        Some(v) => serde_json::from_value(v)
            .map_err(|e| ApiError::bad_request("bad_json", format!("expected {{\"resolution\"?: \"...\"}}: {e}")))?,
    };
    let resolution = request.resolution.unwrap_or_else(|| "reviewed".into());
    st.record(&caller, "flag.resolve", Some(&id), Some(json!({"resolution": resolution}))).await?;
    if !st.store.resolve_flag(&id, &caller.audit_name(), &resolution).await.map_err(storage)? {
        return Err(match st.store.flag(&id).await.map_err(storage)? {
            Some(_) => ApiError::conflict("flag_resolved", "this flag is already resolved"),
            None => ApiError::not_found("unknown_flag", "no such flag"),
        });
    }
    Ok(json_response(StatusCode::OK, &json!({"id": id, "status": "resolved", "resolution": resolution})))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A session as plain text: a header line, then `<time> <role>: <text>` per turn
/// (`[interrupted]` marks an agent turn cut by barge-in: its text is what was heard).
pub fn transcript_text(s: &SessionWithTurns) -> String {
    let session = &s.session;
    let mut out = format!(
        "session {} character {} provider {} user {} created {}\n",
        session.id,
        session.character,
        session.provider,
        session.user_id.as_deref().unwrap_or("-"),
        rfc3339(session.created_at),
    );
    for t in &s.turns {
        let role = serde_json::to_value(t.role).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let cut = if t.interrupted { " [interrupted]" } else { "" };
        out.push_str(&format!("{} {role}: {}{cut}\n", rfc3339(t.ended_at), t.text));
    }
    out
}

/// `value` as a JSON response that no cache keeps (`Cache-Control: no-store`): every admin and
/// user-data answer.
pub(crate) fn json_response<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut r = (status, body).into_response();
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

fn text_response(text: String) -> Response {
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
