//! Recording export through the admin API (admin role, audit-logged like every admin action):
//!
//! | route | success |
//! |---|---|
//! | `GET /v1/admin/sessions/{id}/recording` | 200 `{"session_id", "session", "transcript": [turns], "files": [{"name", "bytes", "url"}]}` |
//! | `GET /v1/admin/sessions/{id}/recording/{file}` | 200 the file: `events.jsonl` (`application/x-ndjson`), `user.opus` / `agent.opus` (`audio/ogg`) |
//!
//! 404 `no_recording` when the session was not recorded (or its recording is past retention),
//! 404 `no_such_file` for another file name; 503 when the recording store is unreachable.

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use signaling::problem::ApiError;

use super::{Admin, AdminState, SessionId, json_response, stored_session};
use crate::recording::RecordingError;
use crate::recording::format::{EVENTS_FILE, FILES};

fn no_recording() -> ApiError {
    ApiError::not_found("no_recording", "this session has no recording (not recorded, or past retention)")
}

fn store_error(e: RecordingError) -> ApiError {
    tracing::error!(error = %e, "recording store unavailable");
    ApiError::unavailable("the recording store is unavailable", std::time::Duration::from_secs(5))
}

fn recordings(st: &AdminState) -> Result<&std::sync::Arc<crate::recording::Recordings>, ApiError> {
    st.manager.recordings().ok_or_else(no_recording)
}

/// `GET /v1/admin/sessions/{id}/recording`: the session, its transcript and its recording's files.
pub(super) async fn recording(Admin { st, caller }: Admin, SessionId(id): SessionId) -> Result<Response, ApiError> {
    st.record(&caller, "session.recording.export", Some(&id), None).await?;
    let files = recordings(&st)?.files(&id).await.map_err(store_error)?;
    if files.is_empty() {
        return Err(no_recording());
    }
    st.manager.writer().flush().await;
    let session = stored_session(&st, &id).await?;
    let transcript = match st.manager.get(&id) {
        Some(live) if live.phase() != signaling::host::SessionState::Ended => live.turns(),
        _ => st.manager.store().turns(&id).await.map_err(super::storage)?,
    };
    let files: Vec<_> = files
        .into_iter()
        .map(|(name, bytes)| {
            let url = format!("/v1/admin/sessions/{id}/recording/{name}");
            json!({"name": name, "bytes": bytes, "url": url})
        })
        .collect();
    let body = json!({"session_id": id, "session": session, "transcript": transcript, "files": files});
    Ok(json_response(StatusCode::OK, &body))
}

/// `GET /v1/admin/sessions/{id}/recording/{file}`: one file of the recording, as stored.
pub(super) async fn recording_file(
    Admin { st, caller }: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (id, name) = match path {
        Ok(Path((id, name))) if signaling::id::is_valid_id(&id) => (id, name),
        _ => return Err(ApiError::unknown_session()),
    };
    if !FILES.contains(&name.as_str()) {
        return Err(ApiError::not_found("no_such_file", format!("a recording holds only {}", FILES.join(", "))));
    }
    st.record(&caller, "session.recording.download", Some(&id), Some(json!({"file": name}))).await?;
    let bytes = recordings(&st)?.read(&id, &name).await.map_err(store_error)?.ok_or_else(no_recording)?;
    let content_type = if name == EVENTS_FILE { "application/x-ndjson" } else { "audio/ogg" };
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{id}-{name}\"")) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    Ok(r)
}
