//! The admin API's tables (`migrations/0002_admin.sql`) on the node's SQLite or Postgres pool:
//! character edits (with versions) and the audit log. Queries use `$n` placeholders and
//! portable types, like `store::sql`.

use std::time::SystemTime;

use serde::Serialize;
use sqlx::{AnyPool, Row as _};

use crate::store::{StoreError, from_ms, to_ms};

fn query_err(e: sqlx::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

/// One stored character edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharacterEdit {
    /// Character id.
    pub id: String,
    /// The character as JSON (`config::Character`'s shape); `None`: deleted.
    pub spec: Option<String>,
    /// 1 on the first edit, +1 on each later one.
    pub version: i64,
}

/// One audit record: who did what, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Record id.
    pub id: String,
    /// When (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// `key:<short id>` or `user:<user id>`.
    pub actor: String,
    /// e.g. `character.put`, `session.end`, `session.export`.
    pub action: String,
    /// What it acted on (a character, session or user id), if anything.
    pub target: Option<String>,
    /// Further facts (JSON), e.g. the new version.
    pub detail: Option<serde_json::Value>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let text = time::OffsetDateTime::from(*t)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

/// The admin tables.
#[derive(Debug, Clone)]
pub struct AdminStore {
    pool: AnyPool,
}

impl AdminStore {
    /// On the store's pool (the migrations have run).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Every character edit, by id.
    pub async fn character_edits(&self) -> Result<Vec<CharacterEdit>, StoreError> {
        let rows = sqlx::query("SELECT id, spec, version FROM character_edits ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?;
        rows.iter()
            .map(|r| {
                Ok(CharacterEdit {
                    id: r.try_get("id").map_err(query_err)?,
                    spec: r.try_get("spec").map_err(query_err)?,
                    version: r.try_get("version").map_err(query_err)?,
                })
            })
            .collect()
    }

    /// Store `spec` (JSON, or `None` to delete) for character `id`; returns the new version.
    pub async fn put_character(&self, id: &str, spec: Option<&str>, actor: &str) -> Result<i64, StoreError> {
        sqlx::query(
            "INSERT INTO character_edits (id, spec, version, updated_at, updated_by) VALUES ($1, $2, 1, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, version = character_edits.version + 1, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(id)
        .bind(spec)
        .bind(to_ms(SystemTime::now()))
        .bind(actor)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        let row = sqlx::query("SELECT version FROM character_edits WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err)?;
        row.try_get("version").map_err(query_err)
    }

    /// Append an audit record.
    pub async fn audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let detail = e.detail.as_ref().map(serde_json::Value::to_string);
        sqlx::query("INSERT INTO audit_log (id, at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&e.id)
            .bind(to_ms(e.at))
            .bind(&e.actor)
            .bind(&e.action)
            .bind(e.target.as_deref())
            .bind(detail)
            .execute(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(())
    }

    /// The newest `limit` audit records, newest first (ids sort by time, see `audit_id`).
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query("SELECT id, at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?;
        rows.iter()
            .map(|r| {
                let detail: Option<String> = r.try_get("detail").map_err(query_err)?;
                Ok(AuditEntry {
                    id: r.try_get("id").map_err(query_err)?,
                    at: from_ms(r.try_get("at").map_err(query_err)?),
                    actor: r.try_get("actor").map_err(query_err)?,
                    action: r.try_get("action").map_err(query_err)?,
                    target: r.try_get("target").map_err(query_err)?,
                    detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
                })
            })
            .collect()
    }

    /// Ids of every session not yet ended, on any node, oldest first.
    pub async fn open_session_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM sessions WHERE state <> 'ended' ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?;
        rows.iter().map(|r| r.try_get("id").map_err(query_err)).collect()
    }
}
