//! A user's data across the node's store and the cluster: export and delete (privacy requests).

use super::{SessionError, SessionManager};
use crate::store::StoredSession;

fn storage(e: crate::store::StoreError) -> SessionError {
    SessionError::Storage(e.to_string())
}

impl SessionManager {
    /// Everything kept about `user_id` (only sessions created with API key `key`, when given):
    /// stored sessions and transcripts, the recent-turns windows of live ones where Redis keeps
    /// them, and the memories characters keep of the user (`memories`, learnt in those
    /// sessions). `NoUserData` when there is nothing.
    pub async fn export_user(&self, user_id: &str, key: Option<&str>) -> Result<serde_json::Value, SessionError> {
        // Everything queued so far is in the export.
        self.writer().flush().await;
        let data = self.store().user_data(user_id, key).await.map_err(storage)?;
        let memories = self.memory().store().list(user_id, key).await.map_err(storage)?;
        if data.sessions.is_empty() && memories.is_empty() {
            return Err(SessionError::NoUserData);
        }
        let mut value = serde_json::to_value(&data).map_err(|e| SessionError::Internal(e.to_string()))?;
        if let Some(redis) = self.redis() {
            for s in value["sessions"].as_array_mut().into_iter().flatten() {
                let id = s["id"].as_str().unwrap_or_default().to_owned();
                if s["state"] != "ended" {
                    s["recent_turns"] = serde_json::Value::Array(redis.recent(&id).await.unwrap_or_default());
                }
            }
        }
        value["memories"] = serde_json::to_value(&memories).map_err(|e| SessionError::Internal(e.to_string()))?;
        Ok(value)
    }

    /// Delete everything kept about `user_id` (scoped like [`Self::export_user`]). Live sessions
    /// end first, so no write lands after the delete; sessions live on other nodes are told to end
    /// and the call answers `LiveElsewhere` (retry). The user's memories (same scope) go after the
    /// sessions, so an extraction still running for one of them stores nothing. Returns the
    /// deleted session ids.
    pub async fn delete_user(&self, user_id: &str, key: Option<&str>) -> Result<Vec<String>, SessionError> {
        let data = self.store().user_data(user_id, key).await.map_err(storage)?;
        if data.sessions.is_empty() && self.memory().store().list(user_id, key).await.map_err(storage)?.is_empty() {
            return Err(SessionError::NoUserData);
        }
        let sessions: Vec<StoredSession> = data.sessions.into_iter().map(|s| s.session).collect();
        self.end_everywhere(&sessions).await?;
        self.writer().flush().await;
        let deleted = self.store().delete_user(user_id, key).await.map_err(storage)?;
        let memories = self.memory().store().delete(user_id, key, None).await.map_err(storage)?;
        self.forget_everywhere(&deleted).await;
        tracing::info!(sessions = deleted.len(), memories, "user data deleted");
        Ok(deleted)
    }
}
