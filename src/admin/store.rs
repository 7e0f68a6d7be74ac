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

/// A flag in the review queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewFlag {
    /// Flag id.
    pub id: String,
    /// The session.
    pub session_id: String,
    /// Turns recorded in the session before the flag.
    pub turn: i64,
    /// The agent item that was cut.
    pub item_id: String,
    /// The category that matched.
    pub category: String,
    /// The denied text.
    pub text: String,
    /// The moderation policy's version (`id@N`, `id@N+character-hash`, or the configured
    /// section's hash).
    pub policy_version: String,
    /// `agent` (a reply cut before it was spoken) or `user` (input kept from the model).
    pub source: String,
    /// When it was flagged.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// `open` or `resolved`.
    pub status: &'static str,
    /// Who resolved it (`key:<short id>` or `user:<id>`).
    pub resolved_by: Option<String>,
    /// The reviewer's note.
    pub resolution: Option<String>,
}

/// Which flags to list.
#[derive(Debug, Clone, Default)]
pub struct FlagFilter {
    /// `Some(true)`: resolved only; `Some(false)`: open only.
    pub resolved: Option<bool>,
    /// One category.
    pub category: Option<String>,
    /// One session.
    pub session_id: Option<String>,
    /// `agent` or `user`.
    pub source: Option<String>,
}

impl AdminStore {
    /// Flags matching `filter`, newest first, at most `limit`.
    pub async fn flags(&self, filter: &FlagFilter, limit: i64) -> Result<Vec<ReviewFlag>, StoreError> {
        let mut sql = String::from(
            "SELECT id, session_id, turn, item_id, category, text, policy_version, source, created_at, \
             resolved_at, resolved_by, resolution FROM moderation_flags WHERE 1 = 1",
        );
        match filter.resolved {
            Some(true) => sql.push_str(" AND resolved_at IS NOT NULL"),
            Some(false) => sql.push_str(" AND resolved_at IS NULL"),
            None => {}
        }
        let mut binds = Vec::new();
        let columns = [("category", &filter.category), ("session_id", &filter.session_id), ("source", &filter.source)];
        for (column, value) in columns {
            if let Some(v) = value {
                binds.push(v.clone());
                sql.push_str(&format!(" AND {column} = ${}", binds.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT ${}", binds.len() + 1));
        let mut query = sqlx::query(&sql);
        for b in &binds {
            query = query.bind(b);
        }
        let rows = query.bind(limit).fetch_all(&self.pool).await.map_err(query_err)?;
        rows.iter().map(flag_from_row).collect()
    }

    /// One flag by id.
    pub async fn flag(&self, id: &str) -> Result<Option<ReviewFlag>, StoreError> {
        let row = sqlx::query(
            "SELECT id, session_id, turn, item_id, category, text, policy_version, source, created_at, \
             resolved_at, resolved_by, resolution FROM moderation_flags WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        row.as_ref().map(flag_from_row).transpose()
    }

    /// Mark flag `id` resolved by `actor` with `resolution`; false when there is no such open flag.
    pub async fn resolve_flag(&self, id: &str, actor: &str, resolution: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE moderation_flags SET resolved_at = $1, resolved_by = $2, resolution = $3 \
             WHERE id = $4 AND resolved_at IS NULL",
        )
        .bind(to_ms(SystemTime::now()))
        .bind(actor)
        .bind(resolution)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }
}

fn flag_from_row(r: &sqlx::any::AnyRow) -> Result<ReviewFlag, StoreError> {
    let resolved_at: Option<i64> = r.try_get("resolved_at").map_err(query_err)?;
    Ok(ReviewFlag {
        id: r.try_get("id").map_err(query_err)?,
        session_id: r.try_get("session_id").map_err(query_err)?,
        turn: r.try_get("turn").map_err(query_err)?,
        item_id: r.try_get("item_id").map_err(query_err)?,
        category: r.try_get("category").map_err(query_err)?,
        text: r.try_get("text").map_err(query_err)?,
        policy_version: r.try_get("policy_version").map_err(query_err)?,
        source: r.try_get("source").map_err(query_err)?,
        created_at: from_ms(r.try_get("created_at").map_err(query_err)?),
        status: if resolved_at.is_some() { "resolved" } else { "open" },
        resolved_by: r.try_get("resolved_by").map_err(query_err)?,
        resolution: r.try_get("resolution").map_err(query_err)?,
    })
}

/// One stored version of a moderation policy (`moderation_policies`, migration 0008).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    /// Policy id.
    pub id: String,
    /// 1 on the first store, +1 on each later change.
    pub version: i64,
    /// The policy as JSON (`ModerationSettings`' shape); `None`: deleted in this version.
    pub spec: Option<String>,
    /// When this version was stored.
    pub created_at: SystemTime,
    /// Who stored it (`key:<short id>` or `user:<id>`).
    pub created_by: String,
}

fn policy_from_row(r: &sqlx::any::AnyRow) -> Result<PolicyRecord, StoreError> {
    Ok(PolicyRecord {
        id: r.try_get("id").map_err(query_err)?,
        version: r.try_get("version").map_err(query_err)?,
        spec: r.try_get("spec").map_err(query_err)?,
        created_at: from_ms(r.try_get("created_at").map_err(query_err)?),
        created_by: r.try_get("created_by").map_err(query_err)?,
    })
}

impl AdminStore {
    /// The newest version of every policy ever stored (deleted ones too), by id.
    pub async fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT p.id, p.version, p.spec, p.created_at, p.created_by FROM moderation_policies p \
             WHERE p.version = (SELECT MAX(q.version) FROM moderation_policies q WHERE q.id = p.id) ORDER BY p.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        rows.iter().map(policy_from_row).collect()
    }

    /// Every version of policy `id`, newest first (empty: never stored).
    pub async fn policy_versions(&self, id: &str) -> Result<Vec<PolicyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, version, spec, created_at, created_by FROM moderation_policies WHERE id = $1 \
             ORDER BY version DESC",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        rows.iter().map(policy_from_row).collect()
    }

    /// Store a new version of policy `id` (`spec` JSON, or `None`: deleted); returns its number.
    pub async fn put_policy(&self, id: &str, spec: Option<&str>, actor: &str) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO moderation_policies (id, version, spec, created_at, created_by) \
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4 FROM moderation_policies WHERE id = $1 \
             RETURNING version",
        )
        .bind(id)
        .bind(spec)
        .bind(to_ms(SystemTime::now()))
        .bind(actor)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err)?;
        row.try_get("version").map_err(query_err)
    }
}
