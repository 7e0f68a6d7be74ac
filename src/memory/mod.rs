//! Long-term memory per user and character: what a character remembers of a returning user.
//!
//! ## Lifecycle
//!
//! * **Who.** A session has a user when `POST /v1/sessions` carried `user_id` (API key) or the
//!   caller signed in with OpenID Connect (the subject). No user, no memory: nothing is read or
//!   written for anonymous sessions.
//! * **Learn (session end).** When a live session ends, its *heard* transcript (agent turns cut by
//!   barge-in hold only what the user heard) goes to the extractor off the session task:
//!   [`extract::rules`] offline, or an OpenAI-compatible chat model ([`extract::llm`], falling
//!   back to the rules when it fails). Each memory is a [`Kind`] and one third-person sentence;
//!   with an embeddings server each also gets a vector ([`embed::Embedder`]). Then the owner's
//!   memories are pruned by age and count.
//! * **Use (session start).** The owner's newest memories that fit `memory.token_budget`
//!   (estimated at 4 characters per token) become the memory slot of the character's
//!   instructions ([`instructions_block`]): the speech-to-speech providers get them in their
//!   session instructions and the cascade in its system prompt.
//! * **Recall (mid-conversation).** The `recall` tool ([`Memory::recall_tool`]) searches the
//!   owner's memories for the model: by embedding when configured (pgvector / SQLite blobs),
//!   else lexically (FTS5 / Postgres full text).
//! * **Privacy.** Memories are part of the user's privacy export and are removed by the privacy
//!   delete; `GET/DELETE /v1/users/{user_id}/memories` ([`http`]) list and delete them.
//!
//! Failures of the extractor, the embeddings server or the database never affect a session: they
//! are logged and counted (`kotodama_memory_total{result}`) and the session goes on without.

pub mod embed;
pub mod extract;
pub mod http;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

use self::embed::Embedder;
use self::store::MemoryStore;
use crate::config::Config;
use crate::config::memory::{Extractor, MemorySettings};
use crate::providers::cascade::llm::LanguageModel;
use crate::providers::tools::{DEFAULT_TOOL_TIMEOUT, Tool, ToolOutput, ToolSpec};
use crate::store::{StoreError, StoredTurn};

/// Counter of memory work by `result` (`learnt`, `extract_failed`, `embed_failed`,
/// `store_failed`, `recalled`).
pub const MEMORY_TOTAL: &str = "kotodama_memory_total";

/// What a memory records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Something true about the user ("The user's dog is called Miso.").
    Fact,
    /// A like or dislike ("The user loves jazz.").
    Preference,
    /// Something the user means to do or come back to ("The user has to call their sister.").
    Thread,
}

impl Kind {
    /// The stored and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fact => "fact",
            Kind::Preference => "preference",
            Kind::Thread => "thread",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "fact" => Ok(Kind::Fact),
            "preference" => Ok(Kind::Preference),
            "thread" => Ok(Kind::Thread),
            _ => Err(()),
        }
    }
}

/// Whose memories: one user with one character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The application's user id (or OIDC subject).
    pub user_id: String,
    /// The character id.
    pub character: String,
}

/// One stored memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryRecord {
    /// Memory id (`mem_...`).
    pub id: String,
    /// The user.
    pub user_id: String,
    /// The character that learnt it.
    pub character: String,
    /// What it records.
    pub kind: Kind,
    /// One sentence about the user, third person.
    pub text: String,
    /// The session it was learnt in.
    pub session_id: Option<String>,
    /// Short id of the API key that created that session (privacy scope); never the key.
    #[serde(skip)]
    pub api_key_id: Option<String>,
    /// When it was learnt.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
}

/// `t` as RFC 3339 (UTC).
fn rfc3339_text(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_text(*t))
}

/// Estimated tokens of `s` (4 characters each, the cascade prompt's estimate).
fn estimate_tokens(s: &str) -> usize {
    crate::providers::cascade::prompt::estimate_tokens(s)
}

/// The memory slot of a character's instructions: empty without memories, else a heading and
/// one line per memory.
pub fn instructions_block(memories: &[MemoryRecord]) -> String {
    if memories.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n\nWhat you remember about this user from earlier conversations (use it naturally, do not recite it; \
         call `recall` to look up more):\n",
    );
    for m in memories {
        s.push_str("- ");
        s.push_str(&m.text);
        s.push('\n');
    }
    s
}

/// The first of `memories` (best first) whose lines fit in `budget` estimated tokens.
pub fn fit_budget(memories: Vec<MemoryRecord>, budget: usize) -> Vec<MemoryRecord> {
    let mut used = 0;
    let mut out = Vec::new();
    for m in memories {
        let cost = estimate_tokens(&m.text) + 2;
        if used + cost > budget {
            break;
        }
        used += cost;
        out.push(m);
    }
    out
}

/// A finished session, as the extractor needs it.
#[derive(Debug, Clone)]
pub struct EndedSession {
    /// Session id.
    pub session_id: String,
    /// Whose.
    pub owner: Owner,
    /// The character's display name (for the LLM's transcript).
    pub character_name: String,
    /// Short id of the API key that created it.
    pub api_key_id: Option<String>,
    /// The heard transcript.
    pub turns: Vec<StoredTurn>,
}

/// The node's memory: settings, the table, and the optional chat model and embeddings server.
pub struct Memory {
    settings: MemorySettings,
    store: MemoryStore,
    summarizer: Option<Arc<dyn LanguageModel>>,
    embedder: Option<Embedder>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("enabled", &self.settings.enabled)
            .field("llm", &self.summarizer.as_ref().map(|m| m.name().to_owned()))
            .field("embedder", &self.embedder)
            .finish()
    }
}

impl Memory {
    /// The memory of a node with `config` on its SQL `pool` (`backend` as
    /// [`crate::store::Store::backend`] names it). The table is always there (privacy export and
    /// delete work with `memory.enabled = false`); the chat model is the `[memory.chat]` server,
    /// else the first `[[cascade.llm]]`, when the extractor is `llm`.
    pub async fn new(config: &Config, pool: sqlx::AnyPool, backend: &str) -> Result<Arc<Self>, StoreError> {
        let settings = config.memory.clone();
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client = crate::providers::cascade::openai::client();
        let store = MemoryStore::new(pool, backend, settings.enabled && settings.embeddings.is_some()).await?;
        let summarizer: Option<Arc<dyn LanguageModel>> = match settings.extractor() {
            Extractor::Rules => None,
            Extractor::Llm => {
                let server = match (&settings.chat, config.cascade.llm.first()) {
                    (Some(c), _) => Some((&c.base_url, &c.model, &c.api_key)),
                    (None, Some(l)) => Some((&l.base_url, &l.model, &l.api_key)),
                    (None, None) => None,
                };
                server.map(|(url, model, key)| {
                    let mut ep = crate::providers::cascade::openai::Endpoint::new(url, model);
                    ep.api_key = key.as_ref().map(|k| k.expose().to_owned());
                    ep.timeout = timeout;
                    Arc::new(crate::providers::cascade::openai::OpenAiChat::new(ep, client.clone()))
                        as Arc<dyn LanguageModel>
                })
            }
        };
        let embedder = settings.embeddings.as_ref().map(|e| Embedder::new(e, client, timeout));
        Ok(Arc::new(Self { settings, store, summarizer, embedder }))
    }

    /// Whether sessions are remembered and given memories.
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// The table (list, delete, search).
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// The memories a new session of `owner` starts with: newest first, within the token
    /// budget. A database failure is logged and gives none (the session starts anyway).
    pub async fn for_session(&self, owner: &Owner) -> Vec<MemoryRecord> {
        if !self.enabled() || self.settings.token_budget == 0 {
            return Vec::new();
        }
        // Each memory costs at least 3 estimated tokens: no more can fit.
        let limit = (self.settings.token_budget / 3 + 1).min(self.settings.max_per_user);
        match self.store.newest(owner, limit).await {
            Ok(all) => fit_budget(all, self.settings.token_budget),
            Err(e) => {
                tracing::warn!(error = %e, "memories unavailable; the session starts without them");
                Vec::new()
            }
        }
    }

    /// Search `owner`'s memories for `query`, best first: by embedding when an embeddings
    /// server is configured (lexical when it fails or finds nothing), else lexically.
    pub async fn recall(&self, owner: &Owner, query: &str) -> Result<Vec<MemoryRecord>, StoreError> {
        let limit = self.settings.recall_limit;
        if let Some(embedder) = &self.embedder {
            match embedder.embed(&[query.to_owned()]).await {
                Ok(v) => {
                    let found = self.store.search_vector(owner, &v[0], limit).await?;
                    if !found.is_empty() {
                        return Ok(found);
                    }
                }
                Err(e) => {
                    metrics::counter!(MEMORY_TOTAL, "result" => "embed_failed").increment(1);
                    tracing::warn!(error = %e, "embedding the recall query failed; searching lexically");
                }
            }
        }
        self.store.search_lexical(owner, query, limit).await
    }

    /// The `recall` tool for `owner`: `{"query": string}` -> `{"memories": [{"kind", "text",
    /// "learnt_at"}]}` (at most `memory.recall_limit`).
    pub fn recall_tool(self: &Arc<Self>, owner: Owner) -> Tool {
        let memory = Arc::clone(self);
        let owner = Arc::new(owner);
        Tool {
            spec: ToolSpec {
                name: "recall".into(),
                description: "Search what you remember about this user from earlier conversations \
                              (facts, preferences, plans). Use before saying you do not know something \
                              the user told you before."
                    .into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "what to look for, in a few words"}},
                    "required": ["query"],
                }),
            },
            handler: Arc::new(move |args: Value| {
                let memory = Arc::clone(&memory);
                let owner = Arc::clone(&owner);
                Box::pin(async move {
                    let query = args.get("query").and_then(Value::as_str).map(str::trim).unwrap_or_default();
                    if query.is_empty() || query.len() > 1000 {
                        return Err("`query` must be 1..=1000 bytes of text".to_owned());
                    }
                    let found = memory.recall(&owner, query).await.map_err(|e| {
                        tracing::warn!(error = %e, "recall failed");
                        "memory is unavailable right now".to_owned()
                    })?;
                    metrics::counter!(MEMORY_TOTAL, "result" => "recalled").increment(found.len() as u64);
                    let items: Vec<Value> = found
                        .iter()
                        .map(|m| json!({"kind": m.kind, "text": m.text, "learnt_at": rfc3339_text(m.created_at)}))
                        .collect();
                    Ok(ToolOutput { output: json!({"memories": items}), effects: vec![] })
                })
            }),
            timeout: DEFAULT_TOOL_TIMEOUT.max(Duration::from_millis(self.settings.timeout_ms)),
        }
    }

    /// Whether sessions of this node offer the `recall` tool.
    pub fn offers_recall(&self) -> bool {
        self.enabled() && self.settings.recall_tool
    }

    /// Learn from an ended session: extract, embed, store, prune. Returns how many memories were
    /// stored. Never fails: each problem is logged and counted.
    pub async fn remember(&self, ended: EndedSession) -> usize {
        if !self.enabled() || ended.turns.is_empty() {
            return 0;
        }
        let items = match &self.summarizer {
            Some(model) => {
                let timeout = Duration::from_millis(self.settings.timeout_ms);
                match extract::llm(model.as_ref(), &ended.turns, &ended.character_name, timeout).await {
                    Ok(items) => items,
                    Err(e) => {
                        metrics::counter!(MEMORY_TOTAL, "result" => "extract_failed").increment(1);
                        tracing::warn!(session_id = %ended.session_id, error = %e, "memory LLM failed; using the rules");
                        extract::rules(&ended.turns)
                    }
                }
            }
            None => extract::rules(&ended.turns),
        };
        if items.is_empty() {
            return 0;
        }
        let vectors: Vec<Option<Vec<f32>>> = match &self.embedder {
            Some(embedder) => {
                let texts: Vec<String> = items.iter().map(|(_, t)| t.clone()).collect();
                match embedder.embed(&texts).await {
                    Ok(v) => v.into_iter().map(Some).collect(),
                    Err(e) => {
                        metrics::counter!(MEMORY_TOTAL, "result" => "embed_failed").increment(1);
                        tracing::warn!(session_id = %ended.session_id, error = %e, "embedding memories failed; stored without vectors");
                        vec![None; items.len()]
                    }
                }
            }
            None => vec![None; items.len()],
        };
        let rows: Vec<(Kind, String, Option<Vec<f32>>)> =
            items.into_iter().zip(vectors).map(|((k, t), v)| (k, t, v)).collect();
        let stored = match self.store.insert(&ended.owner, &ended.session_id, ended.api_key_id.as_deref(), &rows).await
        {
            Ok(n) => n,
            Err(e) => {
                metrics::counter!(MEMORY_TOTAL, "result" => "store_failed").increment(1);
                tracing::warn!(session_id = %ended.session_id, error = %e, "memories not stored");
                return 0;
            }
        };
        metrics::counter!(MEMORY_TOTAL, "result" => "learnt").increment(stored as u64);
        let max_age = (self.settings.max_age_days > 0)
            .then(|| SystemTime::now() - Duration::from_secs(self.settings.max_age_days.saturating_mul(86_400)));
        match self.store.prune(&ended.owner, self.settings.max_per_user, max_age).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "old memories pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning memories failed"),
        }
        tracing::info!(session_id = %ended.session_id, stored, "memories learnt");
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> MemoryRecord {
        MemoryRecord {
            id: "mem_1".into(),
            user_id: "u".into(),
            character: "c".into(),
            kind: Kind::Fact,
            text: text.into(),
            session_id: None,
            api_key_id: Some("k".into()),
            created_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_budget_keeps_the_best_memories_that_fit() {
        let all = vec![record(&"a".repeat(40)), record(&"b".repeat(40)), record("c")];
        // 40 chars = 10 tokens + 2 per line: two lines need 24.
        assert_eq!(fit_budget(all.clone(), 24).len(), 2);
        assert_eq!(fit_budget(all.clone(), 23).len(), 1);
        assert!(fit_budget(all, 0).is_empty());
    }

    #[test]
    fn the_instructions_block_lists_memories_and_is_empty_without() {
        assert_eq!(instructions_block(&[]), "");
        let b = instructions_block(&[record("The user's dog is called Miso.")]);
        assert!(b.contains("What you remember about this user") && b.ends_with("- The user's dog is called Miso.\n"));
    }

    #[test]
    fn records_serialize_without_the_key_id() {
        let v = serde_json::to_value(record("x")).unwrap();
        assert_eq!(v["kind"], "fact");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00Z");
        assert!(v.get("api_key_id").is_none());
    }
}
