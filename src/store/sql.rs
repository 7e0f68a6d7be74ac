//! [`Store`] on SQLite or Postgres through sqlx's `Any` driver: one migration set, one set of
//! queries (`$n` placeholders work on both), portable column types.
//!
//! SQLite: the file (and its directory) is created when missing, the journal is WAL (readers
//! never block the writer; a killed process loses nothing that was committed) with
//! `synchronous = NORMAL` (an OS crash may lose the last transactions, a process crash cannot)
//! and a 5 s busy timeout so two connections wait for each other instead of failing.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use signaling::events::Role;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor as _, Row as _};

use super::{
    SessionWithTurns, Store, StoreError, StoredCharacter, StoredFlag, StoredSession, StoredState, StoredTurn,
    StoredUsage, UserData, from_ms, to_ms,
};
use crate::session::budget::{Kind as BudgetKind, SessionUsage, UsageTotals};

/// The migrations, embedded: the binary needs no files at run time.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (2, "admin", include_str!("../../migrations/0002_admin.sql")),
    (3, "moderation", include_str!("../../migrations/0003_moderation.sql")),
    (7, "budget_usage", include_str!("../../migrations/0007_budget_usage.sql")),
    (8, "moderation_policies", include_str!("../../migrations/0008_moderation_policies.sql")),
];

/// Migrations whose SQL differs per backend (full-text search): (version, description, SQLite
/// SQL, Postgres SQL). Each database records only its own twin.
const BACKEND_MIGRATIONS: &[(i64, &str, &str, &str)] = &[(
    4,
    "memory",
    include_str!("../../migrations/0004_memory.sqlite.sql"),
    include_str!("../../migrations/0004_memory.postgres.sql"),
)];

/// Connections per pool: the writer plus a few HTTP readers.
const MAX_CONNECTIONS: u32 = 8;
/// How long to wait for a connection from the pool.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite or Postgres.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
}

/// A failed query, classified: the database being unreachable, restarting or shutting down is
/// [`StoreError::Connect`] (the writer waits for it to come back), anything else
/// [`StoreError::Query`].
fn query_err(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // SQLSTATE class 08: connection exception; 57P01..57P03: shutting down / cannot connect now.
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    };
    if unavailable { StoreError::Connect(e.to_string()) } else { StoreError::Query(e.to_string()) }
}

/// The `id` column of `rows` (an `UPDATE ... RETURNING id`), sorted.
fn sorted_ids(rows: &[AnyRow]) -> Result<Vec<String>, StoreError> {
    let mut ids: Vec<String> =
        rows.iter().map(|r| r.try_get::<String, _>("id")).collect::<Result<_, _>>().map_err(query_err)?;
    ids.sort();
    Ok(ids)
}

impl SqlStore {
    /// Open `url` (`sqlite://path`, `postgres://...`) and apply the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            (Backend::Sqlite, sqlite_url(rest)?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::Connect("the URL must start with sqlite: or postgres://".into()));
        };
        // One direct connection first: its error says why (refused, auth, no such database),
        // where the pool would only report a timeout after ACQUIRE_TIMEOUT.
        let probe = tokio::time::timeout(ACQUIRE_TIMEOUT, <sqlx::AnyConnection as sqlx::Connection>::connect(&url))
            .await
            .map_err(|_| StoreError::Connect(format!("no answer within {ACQUIRE_TIMEOUT:?}")))?
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        let _ = sqlx::Connection::close(probe).await;
        let mut options = AnyPoolOptions::new().max_connections(MAX_CONNECTIONS).acquire_timeout(ACQUIRE_TIMEOUT);
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await.map_err(|e| StoreError::Connect(e.to_string()))?;
        if backend == Backend::Sqlite {
            // WAL is a property of the file: once set, every later connection uses it.
            sqlx::query("PRAGMA journal_mode = WAL").fetch_all(&pool).await.map_err(query_err)?;
        }
        let twins = BACKEND_MIGRATIONS
            .iter()
            .map(|(v, d, sqlite, postgres)| (v, d, if backend == Backend::Sqlite { sqlite } else { postgres }));
        let mut migrations: Vec<Migration> = MIGRATIONS
            .iter()
            .map(|(v, d, sql)| (v, d, sql))
            .chain(twins)
            .map(|(v, d, sql)| Migration::new(*v, Cow::Borrowed(*d), MigrationType::Simple, Cow::Borrowed(*sql), false))
            .collect();
        migrations.sort_by_key(|m| m.version);
        let migrator = Migrator { migrations: Cow::Owned(migrations), ..Migrator::DEFAULT };
        migrator.run(&pool).await.map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(SqlStore { pool, backend })
    }

    /// The pool (tests inspect the database directly).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Close every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A write transaction on `pool`. SQLite (`sqlite`): `BEGIN IMMEDIATE` takes the write lock at
/// the start, where the busy timeout waits for another writer; a deferred `BEGIN` fails at once
/// with `SQLITE_BUSY_SNAPSHOT` (517, "database is locked") when another connection (the store
/// writer) commits between the transaction's first read and its first write. Postgres: `BEGIN`.
pub(crate) async fn begin_write(pool: &AnyPool, sqlite: bool) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Any>> {
    if sqlite { pool.begin_with("BEGIN IMMEDIATE").await } else { pool.begin().await }
}

/// `sqlite:` URL with the file's directory created and `mode=rwc` (create when missing).
fn sqlite_url(rest: &str) -> Result<String, StoreError> {
    let path_and_query = rest.trim_start_matches("//");
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Connect(
            "an in-memory SQLite database would lose everything at exit; give a file, e.g. sqlite://data/kotodama.db"
                .into(),
        ));
    }
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Connect(format!("cannot create the directory {}: {e}", dir.display())))?;
    }
    let query = match query {
        Some(q) if q.contains("mode=") => q.to_owned(),
        Some(q) => format!("{q}&mode=rwc"),
        None => "mode=rwc".to_owned(),
    };
    Ok(format!("sqlite://{path}?{query}"))
}

fn role_str(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        _ => "agent",
    }
}

fn parse_role(s: &str) -> Result<Role, StoreError> {
    match s {
        "user" => Ok(Role::User),
        "agent" => Ok(Role::Agent),
        other => Err(StoreError::Corrupt(format!("turn role `{other}`"))),
    }
}

fn opt_ms(t: Option<SystemTime>) -> Option<i64> {
    t.map(to_ms)
}

fn session_from_row(row: &AnyRow) -> Result<StoredSession, StoreError> {
    let get_s = |c: &str| row.try_get::<String, _>(c).map_err(query_err);
    let get_os = |c: &str| row.try_get::<Option<String>, _>(c).map_err(query_err);
    let get_oi = |c: &str| row.try_get::<Option<i64>, _>(c).map_err(query_err);
    Ok(StoredSession {
        id: get_s("id")?,
        character: get_s("character_id")?,
        provider: get_s("provider")?,
        user_id: get_os("user_id")?,
        api_key_id: get_os("api_key_id")?,
        node_id: get_s("node_id")?,
        state: StoredState::parse(&get_s("state")?)?,
        end_reason: get_os("end_reason")?,
        created_at: from_ms(row.try_get::<i64, _>("created_at").map_err(query_err)?),
        connected_at: get_oi("connected_at")?.map(from_ms),
        ended_at: get_oi("ended_at")?.map(from_ms),
    })
}

fn turn_from_row(row: &AnyRow) -> Result<StoredTurn, StoreError> {
    let tool_calls: Option<String> = row.try_get("tool_calls").map_err(query_err)?;
    Ok(StoredTurn {
        session_id: row.try_get("session_id").map_err(query_err)?,
        seq: u64::try_from(row.try_get::<i64, _>("seq").map_err(query_err)?)
            .map_err(|_| StoreError::Corrupt("negative seq".into()))?,
        role: parse_role(&row.try_get::<String, _>("role").map_err(query_err)?)?,
        text: row.try_get("text").map_err(query_err)?,
        interrupted: row.try_get::<i64, _>("interrupted").map_err(query_err)? != 0,
        started_at: row.try_get::<Option<i64>, _>("started_at").map_err(query_err)?.map(from_ms),
        ended_at: from_ms(row.try_get::<i64, _>("ended_at").map_err(query_err)?),
        tool_calls: tool_calls
            .map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("tool_calls: {e}"))))
            .transpose()?,
    })
}

const SESSION_COLUMNS: &str =
    "id, character_id, provider, user_id, api_key_id, node_id, state, end_reason, created_at, connected_at, ended_at";
const TURN_COLUMNS: &str = "session_id, seq, role, text, interrupted, started_at, ended_at, tool_calls";

impl SqlStore {
    async fn user_sessions(&self, user_id: &str, api_key_id: Option<&str>) -> Result<Vec<StoredSession>, StoreError> {
        let rows = match api_key_id {
            None => {
                sqlx::query(&format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 ORDER BY created_at, id"
                ))
                .bind(user_id)
                .fetch_all(&self.pool)
                .await
            }
            Some(key) => {
                sqlx::query(&format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND api_key_id = $2 \
                     ORDER BY created_at, id"
                ))
                .bind(user_id)
                .bind(key)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(query_err)?;
        rows.iter().map(session_from_row).collect()
    }
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn put_flag(&self, f: &StoredFlag) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO moderation_flags (id, session_id, turn, item_id, category, text, policy_version, created_at, \
             source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&f.id)
        .bind(&f.session_id)
        .bind(i64::try_from(f.turn).unwrap_or(i64::MAX))
        .bind(&f.item_id)
        .bind(&f.category)
        .bind(&f.text)
        .bind(&f.policy_version)
        .bind(to_ms(f.created_at))
        .bind(f.source.as_str())
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn put_usage(&self, u: &StoredUsage) -> Result<(), StoreError> {
        let t = &u.usage.totals;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO session_usage (session_id, user_id, character, tokens, tokens_reported, duration_ms, \
             tool_calls, exceeded, ended_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(&u.session_id)
        .bind(u.user_id.as_deref())
        .bind(&u.character)
        .bind(n(t.tokens))
        .bind(i64::from(u.usage.tokens_reported))
        .bind(n(t.duration_ms))
        .bind(n(t.tool_calls))
        .bind(u.usage.exceeded.map(|k| k.as_str()))
        .bind(to_ms(u.ended_at))
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn usage(&self, session_id: &str) -> Result<Option<StoredUsage>, StoreError> {
        let row = sqlx::query(
            "SELECT session_id, user_id, character, tokens, tokens_reported, duration_ms, tool_calls, exceeded, \
             ended_at FROM session_usage WHERE session_id = $1",
        )
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        let Some(row) = row else { return Ok(None) };
        let n = |c: &str| row.try_get::<i64, _>(c).map(|v| u64::try_from(v).unwrap_or(0)).map_err(query_err);
        let exceeded: Option<String> = row.try_get("exceeded").map_err(query_err)?;
        let exceeded = match exceeded.as_deref() {
            None => None,
            Some("tokens") => Some(BudgetKind::Tokens),
            Some("minutes") => Some(BudgetKind::Minutes),
            Some("tool_calls") => Some(BudgetKind::ToolCalls),
            Some(other) => return Err(StoreError::Corrupt(format!("budget kind `{other}`"))),
        };
        Ok(Some(StoredUsage {
            session_id: row.try_get("session_id").map_err(query_err)?,
            user_id: row.try_get("user_id").map_err(query_err)?,
            character: row.try_get("character").map_err(query_err)?,
            usage: SessionUsage {
                totals: UsageTotals {
                    tokens: n("tokens")?,
                    duration_ms: n("duration_ms")?,
                    tool_calls: n("tool_calls")?,
                },
                tokens_reported: n("tokens_reported")? != 0,
                exceeded,
            },
            ended_at: from_ms(row.try_get::<i64, _>("ended_at").map_err(query_err)?),
        }))
    }

    async fn usage_since(&self, user_id: &str, since: SystemTime) -> Result<UsageTotals, StoreError> {
        // CAST: Postgres sums BIGINT into NUMERIC, which the Any driver does not decode.
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) AS tokens, \
             CAST(COALESCE(SUM(duration_ms), 0) AS BIGINT) AS duration_ms, \
             CAST(COALESCE(SUM(tool_calls), 0) AS BIGINT) AS tool_calls \
             FROM session_usage WHERE user_id = $1 AND ended_at >= $2",
        )
        .bind(user_id)
        .bind(to_ms(since))
        .fetch_one(&self.pool)
        .await
        .map_err(query_err)?;
        let n = |c: &str| row.try_get::<i64, _>(c).map(|v| u64::try_from(v).unwrap_or(0)).map_err(query_err);
        Ok(UsageTotals { tokens: n("tokens")?, duration_ms: n("duration_ms")?, tool_calls: n("tool_calls")? })
    }

    async fn upsert_characters(&self, characters: &[StoredCharacter]) -> Result<(), StoreError> {
        let now = to_ms(SystemTime::now());
        for c in characters {
            sqlx::query(
                "INSERT INTO characters (id, name, language, voice, persona, avatar, provider, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, language = excluded.language, \
                 voice = excluded.voice, persona = excluded.persona, avatar = excluded.avatar, \
                 provider = excluded.provider, updated_at = excluded.updated_at",
            )
            .bind(&c.id)
            .bind(&c.name)
            .bind(&c.language)
            .bind(&c.voice)
            .bind(&c.persona)
            .bind(c.avatar.as_deref())
            .bind(c.provider.as_deref())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(query_err)?;
        }
        Ok(())
    }

    async fn create_session(&self, s: &StoredSession) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&s.id)
        .bind(&s.character)
        .bind(&s.provider)
        .bind(s.user_id.as_deref())
        .bind(s.api_key_id.as_deref())
        .bind(&s.node_id)
        .bind(s.state.as_str())
        .bind(s.end_reason.as_deref())
        .bind(to_ms(s.created_at))
        .bind(opt_ms(s.connected_at))
        .bind(opt_ms(s.ended_at))
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn mark_connected(&self, id: &str, at: SystemTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET state = 'connected', connected_at = $2 WHERE id = $1 AND state = 'created'")
            .bind(id)
            .bind(to_ms(at))
            .execute(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(())
    }

    async fn mark_ended(&self, id: &str, at: SystemTime, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET state = 'ended', ended_at = $2, end_reason = $3 WHERE id = $1 AND state <> 'ended'",
        )
        .bind(id)
        .bind(to_ms(at))
        .bind(reason)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn put_turn(&self, t: &StoredTurn) -> Result<(), StoreError> {
        let seq = i64::try_from(t.seq).map_err(|_| StoreError::Corrupt("seq out of range".into()))?;
        let tool_calls = t.tool_calls.as_ref().map(|v| v.to_string());
        sqlx::query(&format!(
            "INSERT INTO turns ({TURN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (session_id, seq) DO NOTHING"
        ))
        .bind(&t.session_id)
        .bind(seq)
        .bind(role_str(t.role))
        .bind(&t.text)
        .bind(i64::from(t.interrupted))
        .bind(opt_ms(t.started_at))
        .bind(to_ms(t.ended_at))
        .bind(tool_calls)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<StoredSession>, StoreError> {
        let row = sqlx::query(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn turns(&self, session_id: &str) -> Result<Vec<StoredTurn>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {TURN_COLUMNS} FROM turns WHERE session_id = $1 ORDER BY seq"))
            .bind(session_id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?;
        rows.iter().map(turn_from_row).collect()
    }

    async fn end_orphans(&self, node_id: &str, at: SystemTime, reason: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE sessions SET state = 'ended', ended_at = $2, end_reason = $3 \
             WHERE node_id = $1 AND state <> 'ended' RETURNING id",
        )
        .bind(node_id)
        .bind(to_ms(at))
        .bind(reason)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        sorted_ids(&rows)
    }

    async fn end_lost_node(
        &self,
        node_id: &str,
        last_seen: SystemTime,
        created_before: SystemTime,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE sessions SET state = 'ended', end_reason = 'node_lost', \
             ended_at = CASE WHEN created_at > $2 THEN created_at ELSE $2 END \
             WHERE node_id = $1 AND state <> 'ended' AND created_at < $3 RETURNING id",
        )
        .bind(node_id)
        .bind(to_ms(last_seen))
        .bind(to_ms(created_before))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        sorted_ids(&rows)
    }

    async fn user_data(&self, user_id: &str, api_key_id: Option<&str>) -> Result<UserData, StoreError> {
        let mut sessions = Vec::new();
        for session in self.user_sessions(user_id, api_key_id).await? {
            let turns = self.turns(&session.id).await?;
            sessions.push(SessionWithTurns { session, turns });
        }
        Ok(UserData { user_id: user_id.to_owned(), sessions })
    }

    async fn delete_user(&self, user_id: &str, api_key_id: Option<&str>) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = self.user_sessions(user_id, api_key_id).await?.into_iter().map(|s| s.id).collect();
        let mut tx = begin_write(&self.pool, self.backend == Backend::Sqlite).await.map_err(query_err)?;
        for id in &ids {
            sqlx::query("DELETE FROM turns WHERE session_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
            sqlx::query("DELETE FROM session_usage WHERE session_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
            sqlx::query("DELETE FROM sessions WHERE id = $1").bind(id).execute(&mut *tx).await.map_err(query_err)?;
        }
        tx.commit().await.map_err(query_err)?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = std::env::temp_dir().join(format!("kotodama-url-{}", std::process::id()));
        let file = dir.join("k.db");
        let url = sqlite_url(&format!("//{}", file.display())).expect("valid");
        assert_eq!(url, format!("sqlite://{}?mode=rwc", file.display()));
        assert!(dir.is_dir(), "the directory is created");
        assert_eq!(sqlite_url("//x.db?mode=ro").expect("valid"), "sqlite://x.db?mode=ro");
        assert!(sqlite_url(":memory:").is_err(), "in-memory databases are refused");
        let _ = std::fs::remove_dir_all(dir);
    }
}
