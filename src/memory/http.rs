//! The user's own view of what characters remember (api-v1 extension):
//!
//! | route | success |
//! |---|---|
//! | `GET /v1/users/{user_id}/memories[?character=<id>]` | 200 `{"user_id", "memories": [{"id", "character", "kind", "text", "session_id", "created_at"}]}`, newest first |
//! | `DELETE /v1/users/{user_id}/memories` | 200 `{"user_id", "deleted": n}` |
//! | `DELETE /v1/users/{user_id}/memories/{memory_id}` | 200 `{"user_id", "deleted": 1}`; 404 `unknown_memory` |
//!
//! Authorization follows `GET /v1/users/{user_id}/data`: an API key (an admin key sees every
//! memory of the user, a user key only those learnt in sessions it created), or a signed-in end
//! user (OIDC) for their own id only (403 `user_id_mismatch` for another). With no credential
//! configured (open loopback mode) the routes are closed (401): opening session creation does
//! not open users' data. Responses are `Cache-Control: no-store`.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{delete, get};
use serde_json::json;
use signaling::api::{ApiState, MAX_USER_ID_LEN};
use signaling::auth::KeyRole;
use signaling::identity::Caller;
use signaling::problem::ApiError;

use crate::admin::storage;
use crate::session::SessionManager;

#[derive(Clone)]
struct MemoryApi {
    api: ApiState,
    manager: Arc<SessionManager>,
}

/// The routes, for merging into the app.
pub fn routes(api: ApiState, manager: Arc<SessionManager>) -> Router {
    Router::new()
        .route("/v1/users/{user_id}/memories", get(list).delete(delete_all))
        .route("/v1/users/{user_id}/memories/{memory_id}", delete(delete_one))
        .with_state(MemoryApi { api, manager })
}

#[derive(serde::Deserialize)]
struct ListQuery {
    character: Option<String>,
}

/// The caller's scope over `user_id`'s memories: `None` all, `Some(key id)` only what that key
/// created.
async fn scope(st: &MemoryApi, headers: &HeaderMap, user_id: &str) -> Result<Option<String>, ApiError> {
    match signaling::api::authenticate(&st.api, headers).await? {
        None => Err(ApiError::unauthorized(
            "api_key_missing",
            "an API key or identity token is required (Authorization: Bearer)",
        )),
        Some(Caller::Key(k)) if k.role == KeyRole::Admin => Ok(None),
        Some(Caller::Key(k)) => Ok(Some(k.id)),
        Some(Caller::User(u)) if u.user_id == user_id || u.admin => Ok(None),
        Some(Caller::User(_)) => Err(ApiError::forbidden("user_id_mismatch", "these are another user's memories")),
    }
}

/// The path's user id: 404 when it cannot be one (empty, too long, not decodable).
fn user_id(raw: &str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.len() > MAX_USER_ID_LEN {
        return Err(ApiError::not_found("no_user_data", "no data for this user"));
    }
    Ok(raw.to_owned())
}

fn bad_path(_: PathRejection) -> ApiError {
    ApiError::not_found("no_user_data", "no data for this user")
}

fn no_store(status: StatusCode, body: serde_json::Value) -> Response {
    crate::admin::json_response(status, &body)
}

async fn list(
    State(st): State<MemoryApi>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = user_id(&path.map_err(bad_path)?.0)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let key = scope(&st, &headers, &user).await?;
    let mut memories = st.manager.memory().store().list(&user, key.as_deref()).await.map_err(storage)?;
    if let Some(c) = &q.character {
        memories.retain(|m| &m.character == c);
    }
    Ok(no_store(StatusCode::OK, json!({"user_id": user, "memories": memories})))
}

async fn delete_all(
    State(st): State<MemoryApi>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = user_id(&path.map_err(bad_path)?.0)?;
    let key = scope(&st, &headers, &user).await?;
    let deleted = st.manager.memory().store().delete(&user, key.as_deref(), None).await.map_err(storage)?;
    tracing::info!(deleted, "memories deleted by request");
    Ok(no_store(StatusCode::OK, json!({"user_id": user, "deleted": deleted})))
}

async fn delete_one(
    State(st): State<MemoryApi>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((raw, memory_id)) = path.map_err(bad_path)?;
    let user = user_id(&raw)?;
    let key = scope(&st, &headers, &user).await?;
    let deleted = st.manager.memory().store().delete(&user, key.as_deref(), Some(&memory_id)).await.map_err(storage)?;
    if deleted == 0 {
        return Err(ApiError::not_found("unknown_memory", "no such memory for this user"));
    }
    Ok(no_store(StatusCode::OK, json!({"user_id": user, "deleted": deleted})))
}
