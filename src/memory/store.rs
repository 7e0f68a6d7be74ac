//! The `memories` table (migration 0004, one twin per backend) on the node's SQL pool.
//!
//! Lexical ranking: SQLite FTS5 `bm25()` over `memories_fts` (porter stemming), Postgres
//! `ts_rank` over the generated `tsv` column (English configuration). Query words are reduced to
//! letters and digits and OR-ed, so user text can never inject query syntax.
//!
//! Vectors: on Postgres a pgvector column `embedding vector` (added here at start when an
//! embeddings server is configured) ranked by cosine distance `<=>` in the database; on SQLite a
//! BLOB of little-endian f32 ranked by cosine here (a user and character hold at most
//! `memory.max_per_user` rows, so the scan is bounded).
//!
//! A memory is only inserted while the session it was learnt in still exists
//! (`INSERT ... SELECT ... WHERE EXISTS`, the session row share-locked on Postgres; SQLite has
//! one writer): a privacy delete that removed the session first wins over an extraction still
//! running, and one that comes after removes the memory too.

use std::time::SystemTime;

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row as _};

use super::{Kind, MemoryRecord, Owner};
use crate::store::{StoreError, from_ms, to_ms};

/// Rows a lexical or vector search considers at most.
const MAX_CANDIDATES: i64 = 200;

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The memories of every user on SQLite or Postgres.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    pool: AnyPool,
    backend: Backend,
    /// Postgres has the pgvector `embedding` column.
    pgvector: bool,
}

fn query_err(e: sqlx::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

const COLUMNS: &str = "id, user_id, character_id, kind, text, session_id, api_key_id, created_at";

fn record_from_row(row: &AnyRow) -> Result<MemoryRecord, StoreError> {
    let kind: String = row.try_get("kind").map_err(query_err)?;
    Ok(MemoryRecord {
        id: row.try_get("id").map_err(query_err)?,
        user_id: row.try_get("user_id").map_err(query_err)?,
        character: row.try_get("character_id").map_err(query_err)?,
        kind: kind.parse().map_err(|_| StoreError::Corrupt(format!("memory kind `{kind}`")))?,
        text: row.try_get("text").map_err(query_err)?,
        session_id: row.try_get("session_id").map_err(query_err)?,
        api_key_id: row.try_get("api_key_id").map_err(query_err)?,
        created_at: from_ms(row.try_get::<i64, _>("created_at").map_err(query_err)?),
    })
}

/// Words of `query` worth searching for: letters and digits only, lowercased, no stop words,
/// at most 16.
pub fn query_terms(query: &str) -> Vec<String> {
    const STOP: &[&str] = &[
        "a", "an", "and", "are", "about", "did", "do", "does", "for", "i", "in", "is", "it", "me", "my", "of", "on",
        "or", "the", "their", "to", "user", "user's", "was", "what", "who", "with", "you", "your",
    ];
    let mut out: Vec<String> = Vec::new();
    for w in query.split(|c: char| !c.is_alphanumeric()) {
        let w = w.to_lowercase();
        if w.is_empty() || STOP.contains(&w.as_str()) || out.contains(&w) {
            continue;
        }
        out.push(w);
        if out.len() == 16 {
            break;
        }
    }
    out
}

/// An embedding as pgvector's text input: `[0.1,0.2,...]`.
fn vector_literal(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 10 + 2);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        // Non-finite values are not valid pgvector input.
        s.push_str(&if x.is_finite() { x.to_string() } else { "0".to_owned() });
    }
    s.push(']');
    s
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Cosine similarity in -1..=1 (0 for mismatched or zero vectors).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na.sqrt() * nb.sqrt()) }
}

impl MemoryStore {
    /// The store on `pool` of `backend` (`sqlite`/`postgres`, [`crate::store::Store::backend`]).
    /// With `vectors` on Postgres, pgvector is enabled and the `embedding` column added; a
    /// server without the extension is [`StoreError::Migrate`] saying how to install it.
    pub async fn new(pool: AnyPool, backend: &str, vectors: bool) -> Result<Self, StoreError> {
        let backend = if backend == "postgres" { Backend::Postgres } else { Backend::Sqlite };
        let pgvector = backend == Backend::Postgres && vectors;
        if pgvector {
            let fix = "install pgvector on the Postgres server (Debian: postgresql-15-pgvector) and run \
                       CREATE EXTENSION vector as a superuser, or unset KOTODAMA_MEMORY_EMBEDDINGS_URL";
            sqlx::query("CREATE EXTENSION IF NOT EXISTS vector")
                .execute(&pool)
                .await
                .map_err(|e| StoreError::Migrate(format!("pgvector: {e}; {fix}")))?;
            sqlx::query("ALTER TABLE memories ADD COLUMN IF NOT EXISTS embedding vector")
                .execute(&pool)
                .await
                .map_err(|e| StoreError::Migrate(format!("pgvector column: {e}; {fix}")))?;
        }
        Ok(Self { pool, backend, pgvector })
    }

    /// Store `items` learnt in `session_id` for `owner`, each with its embedding when there is
    /// one; a text the owner already has (case-insensitive) is skipped, and nothing is stored
    /// once the session is gone (privacy delete). One transaction: a reader sees all of a
    /// session's memories or none. Returns how many were stored.
    pub async fn insert(
        &self,
        owner: &Owner,
        session_id: &str,
        api_key_id: Option<&str>,
        items: &[(Kind, String, Option<Vec<f32>>)],
    ) -> Result<usize, StoreError> {
        let mut stored = 0;
        let now = to_ms(SystemTime::now());
        // IMMEDIATE on SQLite: the session's own `ended` write may commit meanwhile (seen: its
        // memories lost to "database is locked", 1 run in 8).
        let mut tx =
            crate::store::sql::begin_write(&self.pool, self.backend == Backend::Sqlite).await.map_err(query_err)?;
        for (i, (kind, text, embedding)) in items.iter().enumerate() {
            let id = signaling::id::new_id("mem");
            // SQLite keeps a blob column; Postgres a pgvector one only when vectors are on.
            let (column, value) = match self.backend {
                Backend::Sqlite => (", embedding", ", $9"),
                Backend::Postgres if self.pgvector => (", embedding", ", $9::vector"),
                Backend::Postgres => ("", ""),
            };
            // Postgres: the session row is share-locked until commit, so a privacy delete of the
            // session waits for these rows and its memory delete that follows sees them.
            let lock = if self.backend == Backend::Postgres { " FOR SHARE" } else { "" };
            let sql = format!(
                "INSERT INTO memories ({COLUMNS}{column}) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8{value} \
                 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $6{lock}) \
                 AND NOT EXISTS (SELECT 1 FROM memories WHERE user_id = $2 AND character_id = $3 \
                 AND lower(text) = lower($5))"
            );
            let q = sqlx::query(&sql)
                .bind(&id)
                .bind(&owner.user_id)
                .bind(&owner.character)
                .bind(kind.as_str())
                .bind(text)
                .bind(session_id)
                .bind(api_key_id)
                // Later items of one session sort after earlier ones.
                .bind(now + i64::try_from(i).unwrap_or(0));
            let q = match (self.backend, embedding) {
                (Backend::Sqlite, Some(v)) => q.bind(to_blob(v)),
                (Backend::Sqlite, None) => q.bind(None::<Vec<u8>>),
                (Backend::Postgres, Some(v)) if self.pgvector => q.bind(vector_literal(v)),
                (Backend::Postgres, None) if self.pgvector => q.bind(None::<String>),
                (Backend::Postgres, _) => q,
            };
            stored += q.execute(&mut *tx).await.map_err(query_err)?.rows_affected() as usize;
        }
        tx.commit().await.map_err(query_err)?;
        Ok(stored)
    }

    /// `owner`'s newest memories, at most `limit`.
    pub async fn newest(&self, owner: &Owner, limit: usize) -> Result<Vec<MemoryRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM memories WHERE user_id = $1 AND character_id = $2 \
             ORDER BY created_at DESC, id LIMIT $3"
        ))
        .bind(&owner.user_id)
        .bind(&owner.character)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        rows.iter().map(record_from_row).collect()
    }

    /// `owner`'s memories that share words with `query`, best first, at most `limit`.
    pub async fn search_lexical(
        &self,
        owner: &Owner,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryRecord>, StoreError> {
        let terms = query_terms(query);
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(MAX_CANDIDATES).min(MAX_CANDIDATES);
        let rows = match self.backend {
            Backend::Sqlite => {
                // Each term quoted: FTS5 treats it as a string, never as an operator.
                let fts: Vec<String> = terms.iter().map(|t| format!("\"{t}\"")).collect();
                let cols = COLUMNS.split(", ").map(|c| format!("m.{c}")).collect::<Vec<_>>().join(", ");
                sqlx::query(&format!(
                    "SELECT {cols} FROM memories_fts f JOIN memories m ON m.id = f.id \
                     WHERE memories_fts MATCH $1 AND m.user_id = $2 AND m.character_id = $3 \
                     ORDER BY bm25(memories_fts), m.created_at DESC LIMIT $4"
                ))
                .bind(fts.join(" OR "))
                .bind(&owner.user_id)
                .bind(&owner.character)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            Backend::Postgres => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM memories, to_tsquery('english', $1) q \
                     WHERE user_id = $2 AND character_id = $3 AND tsv @@ q \
                     ORDER BY ts_rank(tsv, q) DESC, created_at DESC LIMIT $4"
                ))
                .bind(terms.join(" | "))
                .bind(&owner.user_id)
                .bind(&owner.character)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(query_err)?;
        rows.iter().map(record_from_row).collect()
    }

    /// `owner`'s memories nearest to `embedding` by cosine, best first, at most `limit`
    /// (memories stored without an embedding are not considered).
    pub async fn search_vector(
        &self,
        owner: &Owner,
        embedding: &[f32],
        limit: usize,
    ) -> Result<Vec<MemoryRecord>, StoreError> {
        let limit_i = i64::try_from(limit).unwrap_or(MAX_CANDIDATES).min(MAX_CANDIDATES);
        match self.backend {
            Backend::Postgres if self.pgvector => {
                let rows = sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM memories WHERE user_id = $1 AND character_id = $2 \
                     AND embedding IS NOT NULL AND vector_dims(embedding) = $4 \
                     ORDER BY embedding <=> $3::vector LIMIT $5"
                ))
                .bind(&owner.user_id)
                .bind(&owner.character)
                .bind(vector_literal(embedding))
                .bind(i32::try_from(embedding.len()).unwrap_or(i32::MAX))
                .bind(limit_i)
                .fetch_all(&self.pool)
                .await
                .map_err(query_err)?;
                rows.iter().map(record_from_row).collect()
            }
            Backend::Postgres => Ok(Vec::new()),
            Backend::Sqlite => {
                let rows = sqlx::query(&format!(
                    "SELECT {COLUMNS}, embedding FROM memories WHERE user_id = $1 AND character_id = $2 \
                     AND embedding IS NOT NULL ORDER BY created_at DESC LIMIT $3"
                ))
                .bind(&owner.user_id)
                .bind(&owner.character)
                .bind(MAX_CANDIDATES)
                .fetch_all(&self.pool)
                .await
                .map_err(query_err)?;
                let mut scored: Vec<(f32, MemoryRecord)> = Vec::with_capacity(rows.len());
                for row in &rows {
                    let blob: Vec<u8> = row.try_get("embedding").map_err(query_err)?;
                    scored.push((cosine(embedding, &from_blob(&blob)), record_from_row(row)?));
                }
                scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                Ok(scored.into_iter().take(limit).map(|(_, r)| r).collect())
            }
        }
    }

    /// Every memory of `user_id` (only those learnt in sessions of API key `key`, when given),
    /// newest first.
    pub async fn list(&self, user_id: &str, key: Option<&str>) -> Result<Vec<MemoryRecord>, StoreError> {
        let rows = match key {
            None => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM memories WHERE user_id = $1 ORDER BY created_at DESC, id"))
                    .bind(user_id)
                    .fetch_all(&self.pool)
                    .await
            }
            Some(k) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM memories WHERE user_id = $1 AND api_key_id = $2 \
                     ORDER BY created_at DESC, id"
                ))
                .bind(user_id)
                .bind(k)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(query_err)?;
        rows.iter().map(record_from_row).collect()
    }

    /// Delete `user_id`'s memories (scoped like [`Self::list`]), or only memory `id`.
    /// Returns how many were deleted.
    pub async fn delete(&self, user_id: &str, key: Option<&str>, id: Option<&str>) -> Result<u64, StoreError> {
        let mut sql = "DELETE FROM memories WHERE user_id = $1".to_owned();
        let mut n = 1;
        if key.is_some() {
            n += 1;
            sql.push_str(&format!(" AND api_key_id = ${n}"));
        }
        if id.is_some() {
            n += 1;
            sql.push_str(&format!(" AND id = ${n}"));
        }
        let mut q = sqlx::query(&sql).bind(user_id);
        if let Some(k) = key {
            q = q.bind(k);
        }
        if let Some(id) = id {
            q = q.bind(id);
        }
        Ok(q.execute(&self.pool).await.map_err(query_err)?.rows_affected())
    }

    /// Keep `owner`'s newest `max_count` memories, none created before `older_than` (when
    /// given). Returns how many were deleted.
    pub async fn prune(
        &self,
        owner: &Owner,
        max_count: usize,
        older_than: Option<SystemTime>,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        if let Some(t) = older_than {
            deleted += sqlx::query("DELETE FROM memories WHERE user_id = $1 AND character_id = $2 AND created_at < $3")
                .bind(&owner.user_id)
                .bind(&owner.character)
                .bind(to_ms(t))
                .execute(&self.pool)
                .await
                .map_err(query_err)?
                .rows_affected();
        }
        deleted += sqlx::query(
            "DELETE FROM memories WHERE user_id = $1 AND character_id = $2 AND id NOT IN \
             (SELECT id FROM memories WHERE user_id = $1 AND character_id = $2 \
              ORDER BY created_at DESC, id LIMIT $3)",
        )
        .bind(&owner.user_id)
        .bind(&owner.character)
        .bind(i64::try_from(max_count).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(query_err)?
        .rows_affected();
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_terms_keep_words_and_drop_syntax_and_stop_words() {
        assert_eq!(query_terms("What is my dog's name?"), ["dog", "s", "name"]);
        assert_eq!(query_terms("\" OR 1=1 -- NEAR(x"), ["1", "near", "x"]);
        assert!(query_terms("what is it").is_empty());
    }

    #[test]
    fn blobs_round_trip_and_cosine_ranks_direction() {
        let v = [0.5f32, -1.25, 3.0];
        assert_eq!(from_blob(&to_blob(&v)), v);
        assert!((cosine(&v, &v) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0, "mismatched dimensions never match");
        assert_eq!(vector_literal(&[1.0, f32::NAN, -0.5]), "[1,0,-0.5]");
    }
}
