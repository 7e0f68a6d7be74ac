//! Durable storage of characters, sessions and transcripts, behind one trait ([`Store`]).
//!
//! One implementation, [`sql::SqlStore`], speaks to SQLite (the embedded default, a WAL file
//! under `./data`) or Postgres (`KOTODAMA_DATABASE_URL=postgres://...`) through sqlx's `Any`
//! driver, with one migration set (`migrations/`) and one set of queries: portable types only
//! (TEXT, BIGINT), times as unix milliseconds.
//!
//! ## What is written when
//!
//! * A session row is inserted when `POST /v1/sessions` creates it (state `created`), before
//!   the 201 goes out: a session the client knows about always exists in the store.
//! * `connected`, every final utterance ([`StoredTurn`], idempotent by `(session_id, seq)`) and
//!   `ended` are written as they happen by the node's [`writer::StoreWriter`], so the session
//!   task never waits on the database (see the writer for its queue policy). They are first
//!   appended to the node's fsync'd [`journal`], which holds them through outages beyond the
//!   queue and is replayed at start after a crash; a final transcript reaches the client only
//!   once its turn is journaled (or the client gets `error` `transcript_not_durable`).
//! * At start a node marks the sessions it left `created`/`connected` (a crash: no drain ran)
//!   as ended with reason `crash` ([`Store::end_orphans`]), at its last heartbeat when Redis
//!   holds one. In a cluster on a shared store, the node that finds another dead (its heartbeat
//!   expired) marks that node's sessions ended `node_lost` at its last heartbeat
//!   ([`Store::end_lost_node`], see [`crate::cluster`]).
//!
//! Invariants: a turn is never updated to a different text once written (the writer's
//! `INSERT ... ON CONFLICT DO NOTHING` makes rewrites after a crash or overflow harmless);
//! `ended` is terminal (an `ended` row is never moved back).

pub mod journal;
pub mod redis;
pub mod sql;
pub mod writer;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use signaling::events::Role;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database (or Redis) could not be reached or opened.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Applying the migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(String),
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(String),
    /// A row holds a value this build does not understand.
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether trying again later may succeed (connection trouble, lock timeouts).
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Connect(_) | StoreError::Query(_))
    }
}

/// Lifecycle of a stored session: `created -> connected -> ended`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredState {
    /// Created, no media yet.
    Created,
    /// Media flowed.
    Connected,
    /// Over; `end_reason` says why.
    Ended,
}

impl StoredState {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            StoredState::Created => "created",
            StoredState::Connected => "connected",
            StoredState::Ended => "ended",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "created" => Ok(StoredState::Created),
            "connected" => Ok(StoredState::Connected),
            "ended" => Ok(StoredState::Ended),
            other => Err(StoreError::Corrupt(format!("session state `{other}`"))),
        }
    }
}

// --- the one place where store rows become the API's types ---

impl From<StoredState> for signaling::host::SessionState {
    fn from(s: StoredState) -> Self {
        match s {
            StoredState::Created => Self::Created,
            StoredState::Connected => Self::Connected,
            StoredState::Ended => Self::Ended,
        }
    }
}

impl From<StoredSession> for signaling::host::SessionInfo {
    /// An unknown stored `end_reason` (from a newer version) is dropped, not invented.
    fn from(s: StoredSession) -> Self {
        Self {
            session_id: s.id,
            state: s.state.into(),
            character: s.character,
            provider: s.provider,
            created_at: s.created_at.into(),
            ended_at: s.ended_at.map(Into::into),
            end_reason: s.end_reason.as_deref().and_then(|r| r.parse().ok()),
        }
    }
}

impl From<StoredTurn> for signaling::host::TranscriptEntry {
    fn from(t: StoredTurn) -> Self {
        Self { seq: t.seq, role: t.role, text: t.text, interrupted: t.interrupted, at: t.ended_at.into() }
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredSession {
    /// Session id.
    pub id: String,
    /// Character id.
    pub character: String,
    /// Provider name.
    pub provider: String,
    /// The application's user id given at creation, if any (privacy export/delete key).
    pub user_id: Option<String>,
    /// Short id of the API key that created it (never the key), if any.
    pub api_key_id: Option<String>,
    /// The node that hosts (hosted) it.
    pub node_id: String,
    /// Lifecycle state.
    pub state: StoredState,
    /// The API's `end_reason` (`client_request`, `crash`, ...) once ended.
    pub end_reason: Option<String>,
    /// Creation time.
    #[serde(with = "ms_serde")]
    pub created_at: SystemTime,
    /// When media first flowed.
    #[serde(with = "ms_serde::option")]
    pub connected_at: Option<SystemTime>,
    /// End time.
    #[serde(with = "ms_serde::option")]
    pub ended_at: Option<SystemTime>,
}

/// One final utterance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredTurn {
    /// Session id.
    pub session_id: String,
    /// Position in the session, unique per session.
    pub seq: u64,
    /// Who spoke.
    pub role: Role,
    /// What was said (for an interrupted agent turn: what was heard).
    pub text: String,
    /// Barge-in cut it.
    pub interrupted: bool,
    /// When the utterance started, when known.
    #[serde(with = "ms_serde::option")]
    pub started_at: Option<SystemTime>,
    /// When it ended (was final).
    #[serde(with = "ms_serde")]
    pub ended_at: SystemTime,
    /// Tool calls made in this turn (JSON), if any.
    pub tool_calls: Option<serde_json::Value>,
}

/// A character as stored (the configured ones are upserted at start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredCharacter {
    /// Id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Language tag.
    pub language: String,
    /// Voice name.
    pub voice: String,
    /// Persona (system instructions).
    pub persona: String,
    /// Avatar mapping (e.g. a model or image id), if any.
    pub avatar: Option<String>,
    /// Preferred provider, if any.
    pub provider: Option<String>,
}

/// Text moderation flagged (agent reply or user input), for the review queue (`moderation_flags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredFlag {
    /// Flag id.
    pub id: String,
    /// The session.
    pub session_id: String,
    /// Turns recorded in the session before the flag.
    pub turn: u64,
    /// The agent item that was cut.
    pub item_id: String,
    /// The category that matched.
    pub category: String,
    /// The denied text.
    pub text: String,
    /// The moderation policy's version.
    pub policy_version: String,
    /// Whose text it was.
    pub source: crate::moderation::Source,
    /// When.
    #[serde(with = "ms_serde")]
    pub created_at: SystemTime,
}

/// What one session used ([`crate::session::budget`]), stored when it ends (`session_usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUsage {
    /// The session.
    pub session_id: String,
    /// Its user id, if any (daily budgets sum per user).
    pub user_id: Option<String>,
    /// Its character.
    pub character: String,
    /// What it used.
    pub usage: crate::session::budget::SessionUsage,
    /// When it ended.
    pub ended_at: SystemTime,
}

/// Everything held about one user: their sessions, each with its transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserData {
    /// The user id.
    pub user_id: String,
    /// Their sessions, oldest first, with transcripts.
    pub sessions: Vec<SessionWithTurns>,
}

/// A session and its transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionWithTurns {
    /// The session.
    #[serde(flatten)]
    pub session: StoredSession,
    /// Its turns in `seq` order.
    pub turns: Vec<StoredTurn>,
}

/// Durable storage. Object safe (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which backend (`sqlite`, `postgres`), for logs.
    fn backend(&self) -> &'static str;

    /// Store a moderation flag (a second write of the same id changes nothing). Stores without
    /// a review queue drop it.
    async fn put_flag(&self, flag: &StoredFlag) -> Result<(), StoreError> {
        let _ = flag;
        Ok(())
    }

    /// Store a session's usage (a second write for the same session changes nothing). Stores
    /// without budgets drop it.
    async fn put_usage(&self, usage: &StoredUsage) -> Result<(), StoreError> {
        let _ = usage;
        Ok(())
    }

    /// A session's stored usage, if it ended and was stored.
    async fn usage(&self, session_id: &str) -> Result<Option<StoredUsage>, StoreError> {
        let _ = session_id;
        Ok(None)
    }

    /// What `user_id`'s sessions that ended at or after `since` used, summed.
    async fn usage_since(
        &self,
        user_id: &str,
        since: SystemTime,
    ) -> Result<crate::session::budget::UsageTotals, StoreError> {
        let _ = (user_id, since);
        Ok(Default::default())
    }

    /// Insert or update the configured characters.
    async fn upsert_characters(&self, characters: &[StoredCharacter]) -> Result<(), StoreError>;

    /// Insert a new session (state `created`).
    async fn create_session(&self, session: &StoredSession) -> Result<(), StoreError>;

    /// `created -> connected` (no effect on an ended session).
    async fn mark_connected(&self, id: &str, at: SystemTime) -> Result<(), StoreError>;

    /// `-> ended` with `reason` (no effect on an already ended session: the first end wins).
    async fn mark_ended(&self, id: &str, at: SystemTime, reason: &str) -> Result<(), StoreError>;

    /// Store a final utterance; a second write of the same `(session_id, seq)` changes nothing.
    async fn put_turn(&self, turn: &StoredTurn) -> Result<(), StoreError>;

    /// A session by id.
    async fn session(&self, id: &str) -> Result<Option<StoredSession>, StoreError>;

    /// A session's turns in `seq` order.
    async fn turns(&self, session_id: &str) -> Result<Vec<StoredTurn>, StoreError>;

    /// Mark every session of `node_id` not yet ended as ended with `reason` (`crash` at start);
    /// returns their ids.
    async fn end_orphans(&self, node_id: &str, at: SystemTime, reason: &str) -> Result<Vec<String>, StoreError>;

    /// Mark the sessions of dead node `node_id` not yet ended and created before
    /// `created_before` (when it was found dead: sessions of a restarted node are not the dead
    /// one's) as ended `node_lost` at `last_seen` (its last heartbeat; never before a session's
    /// creation); returns their ids. Default: [`Self::end_orphans`] with reason `node_lost`.
    async fn end_lost_node(
        &self,
        node_id: &str,
        last_seen: SystemTime,
        created_before: SystemTime,
    ) -> Result<Vec<String>, StoreError> {
        let _ = created_before;
        self.end_orphans(node_id, last_seen, "node_lost").await
    }

    /// Everything held for `user_id`; with `api_key_id`, only what that key created.
    async fn user_data(&self, user_id: &str, api_key_id: Option<&str>) -> Result<UserData, StoreError>;

    /// Hard-delete everything held for `user_id` (sessions and turns); with `api_key_id`, only
    /// what that key created. Returns the deleted session ids.
    async fn delete_user(&self, user_id: &str, api_key_id: Option<&str>) -> Result<Vec<String>, StoreError>;
}

/// Unix milliseconds of `t` (0 before the epoch).
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// The time `ms` unix milliseconds.
pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Serialize [`SystemTime`] as RFC 3339 (API output of exports).
mod ms_serde {
    use std::time::SystemTime;

    use serde::Serializer;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let text = OffsetDateTime::from(*t).format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub mod option {
        use std::time::SystemTime;

        use serde::Serializer;

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }
    }
}
