//! `[memory]`: long-term memory per user and character (see `crate::memory`):
//! `KOTODAMA_MEMORY_*`.
//!
//! Offline by default: the rule-based extractor and lexical recall (SQLite FTS5 / Postgres full
//! text). An OpenAI-compatible chat server (`[memory.chat]`, or the first `[[cascade.llm]]` with
//! `extractor = "llm"`) summarises sessions instead, and an OpenAI-compatible embeddings server
//! (`[memory.embeddings]`) ranks by meaning (pgvector on Postgres, blobs in SQLite).

use serde::Deserialize;

use super::{ConfigError, HTTP_SCHEMES, Secret, Section, env, err, require_range, require_scheme};

/// Who turns a finished session's heard transcript into memories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extractor {
    /// Sentence patterns ("my dog is called Miso", "I like tea", "I have to ..."): offline.
    Rules,
    /// An OpenAI-compatible chat server: `[memory.chat]`, else the first `[[cascade.llm]]`.
    Llm,
}

/// One OpenAI-compatible server (`base_url` without `/v1`; the path is appended).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryEndpoint {
    /// Base URL, e.g. `http://127.0.0.1:11434` or `https://api.openai.com`.
    pub base_url: String,
    /// Model name, e.g. `gpt-4o-mini` (chat) or `text-embedding-3-small` (embeddings).
    pub model: String,
    /// Sent as `Authorization: Bearer`; never logged (`Debug` shows `***`).
    pub api_key: Option<Secret>,
}

/// The `[memory]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySettings {
    /// Remember users across sessions (`KOTODAMA_MEMORY_ENABLED`, default true). Only sessions
    /// with a user (`user_id` in `POST /v1/sessions`, or the OIDC subject) are remembered.
    pub enabled: bool,
    /// `rules` or `llm` (`KOTODAMA_MEMORY_EXTRACTOR`); default `llm` when `[memory.chat]` is
    /// set, else `rules`.
    pub extractor: Option<Extractor>,
    /// The chat server of the `llm` extractor (`KOTODAMA_MEMORY_CHAT_URL`, `_MODEL`, `_API_KEY`).
    pub chat: Option<MemoryEndpoint>,
    /// The embeddings server (`POST /v1/embeddings`; `KOTODAMA_MEMORY_EMBEDDINGS_URL`, `_MODEL`,
    /// `_API_KEY`); unset: lexical ranking only.
    pub embeddings: Option<MemoryEndpoint>,
    /// Estimated tokens (4 characters each) of memories put into a session's instructions
    /// (`KOTODAMA_MEMORY_TOKEN_BUDGET`, default 300; 0 puts none in, `recall` still works).
    pub token_budget: usize,
    /// Memories kept per user and character, newest first (`KOTODAMA_MEMORY_MAX_PER_USER`,
    /// default 200); older ones are pruned after each session.
    pub max_per_user: usize,
    /// Memories older than this many days are pruned (`KOTODAMA_MEMORY_MAX_AGE_DAYS`, default
    /// 365; 0 = never by age).
    pub max_age_days: u64,
    /// Give the model the `recall` tool (`KOTODAMA_MEMORY_RECALL_TOOL`, default true).
    pub recall_tool: bool,
    /// Memories a `recall` call returns at most (default 5).
    pub recall_limit: usize,
    /// Deadline of one chat or embeddings request, ms (default 20000).
    pub timeout_ms: u64,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            extractor: None,
            chat: None,
            embeddings: None,
            token_budget: 300,
            max_per_user: 200,
            max_age_days: 365,
            recall_tool: true,
            recall_limit: 5,
            timeout_ms: 20_000,
        }
    }
}

impl MemorySettings {
    /// The extractor in force: the configured one, else `llm` when `[memory.chat]` is set.
    pub fn extractor(&self) -> Extractor {
        self.extractor.unwrap_or(if self.chat.is_some() { Extractor::Llm } else { Extractor::Rules })
    }
}

/// `KOTODAMA_MEMORY_{what}_URL` with `_MODEL` (required) and `_API_KEY`.
fn endpoint_env(
    get: &dyn Fn(&str) -> Option<String>,
    what: &str,
    example_model: &str,
) -> Result<Option<MemoryEndpoint>, ConfigError> {
    let Some(base_url) = env::value(get, &format!("KOTODAMA_MEMORY_{what}_URL")) else { return Ok(None) };
    let model_key = format!("KOTODAMA_MEMORY_{what}_MODEL");
    let model = env::value(get, &model_key).ok_or_else(|| {
        err(&model_key, "required with the URL", format!("set the model name, e.g. {model_key}={example_model}"))
    })?;
    let api_key = env::value(get, &format!("KOTODAMA_MEMORY_{what}_API_KEY")).map(Secret::new);
    Ok(Some(MemoryEndpoint { base_url, model, api_key }))
}

fn check_endpoint(key: &str, e: &MemoryEndpoint) -> Result<(), ConfigError> {
    require_scheme(&e.base_url, HTTP_SCHEMES, || {
        err(
            &format!("{key}.base_url"),
            format!("`{}` is not an http(s) URL", e.base_url),
            "use e.g. http://127.0.0.1:11434",
        )
    })?;
    if e.model.trim().is_empty() {
        return Err(err(&format!("{key}.model"), "empty", "name the model"));
    }
    Ok(())
}

impl Section for MemorySettings {
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env::parse(get, "KOTODAMA_MEMORY_ENABLED", "true or false", "KOTODAMA_MEMORY_ENABLED=false")? {
            self.enabled = v;
        }
        if let Some(v) = env::value(get, "KOTODAMA_MEMORY_EXTRACTOR") {
            self.extractor = Some(match v.as_str() {
                "rules" => Extractor::Rules,
                "llm" => Extractor::Llm,
                other => {
                    return Err(err(
                        "KOTODAMA_MEMORY_EXTRACTOR",
                        format!("`{other}` is not an extractor"),
                        "use rules or llm",
                    ));
                }
            });
        }
        if let Some(e) = endpoint_env(get, "CHAT", "gpt-4o-mini")? {
            self.chat = Some(e);
        }
        if let Some(e) = endpoint_env(get, "EMBEDDINGS", "text-embedding-3-small")? {
            self.embeddings = Some(e);
        }
        let n = |k: &str, fix: &str| env::parse::<usize>(get, k, "a whole number", fix);
        if let Some(v) = n("KOTODAMA_MEMORY_TOKEN_BUDGET", "KOTODAMA_MEMORY_TOKEN_BUDGET=300")? {
            self.token_budget = v;
        }
        if let Some(v) = n("KOTODAMA_MEMORY_MAX_PER_USER", "KOTODAMA_MEMORY_MAX_PER_USER=200")? {
            self.max_per_user = v;
        }
        if let Some(v) = env::parse(get, "KOTODAMA_MEMORY_MAX_AGE_DAYS", "a whole number of days", "=365")? {
            self.max_age_days = v;
        }
        if let Some(v) = env::parse(get, "KOTODAMA_MEMORY_RECALL_TOOL", "true or false", "=false")? {
            self.recall_tool = v;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.chat {
            check_endpoint("memory.chat", e)?;
        }
        if let Some(e) = &self.embeddings {
            check_endpoint("memory.embeddings", e)?;
        }
        if self.enabled && self.max_per_user == 0 {
            return Err(err(
                "memory.max_per_user",
                "0 would keep nothing",
                "set at least 1, or memory.enabled = false",
            ));
        }
        require_range("memory.recall_limit", self.recall_limit, 1..=50, "use 1..=50")?;
        if self.timeout_ms == 0 {
            return Err(err("memory.timeout_ms", "0", "give the servers time to answer, e.g. 20000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::readme_example;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_offline_rules_with_lexical_recall() {
        let c = Config::default();
        assert!(c.memory.enabled && c.memory.recall_tool);
        assert_eq!(c.memory.extractor(), Extractor::Rules);
        assert!(c.memory.embeddings.is_none());
        c.validate().unwrap();
    }

    #[test]
    fn env_configures_chat_and_embeddings_and_a_chat_server_selects_the_llm_extractor() {
        let mut m = MemorySettings::default();
        m.apply_env(&env_of(&[
            ("KOTODAMA_MEMORY_CHAT_URL", "http://127.0.0.1:9"),
            ("KOTODAMA_MEMORY_CHAT_MODEL", "m"),
            ("KOTODAMA_MEMORY_EMBEDDINGS_URL", "http://127.0.0.1:9"),
            ("KOTODAMA_MEMORY_EMBEDDINGS_MODEL", "e"),
            ("KOTODAMA_MEMORY_EMBEDDINGS_API_KEY", "sk-secret"),
            ("KOTODAMA_MEMORY_TOKEN_BUDGET", "120"),
        ]))
        .unwrap();
        assert_eq!(m.extractor(), Extractor::Llm);
        assert_eq!(m.token_budget, 120);
        let e = m.embeddings.as_ref().unwrap();
        assert_eq!((e.base_url.as_str(), e.model.as_str()), ("http://127.0.0.1:9", "e"));
        assert!(!format!("{m:?}").contains("sk-secret"), "keys are never printed");
        m.validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut m = MemorySettings::default();
        let e = m.apply_env(&env_of(&[("KOTODAMA_MEMORY_EMBEDDINGS_URL", "http://x")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_MEMORY_EMBEDDINGS_MODEL");
        let e = m.apply_env(&env_of(&[("KOTODAMA_MEMORY_EXTRACTOR", "magic")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_MEMORY_EXTRACTOR");
        let e = m.apply_env(&env_of(&[("KOTODAMA_MEMORY_MAX_PER_USER", "many")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_MEMORY_MAX_PER_USER");
        let c = Config::from_toml("[memory.chat]\nbase_url = \"ftp://x\"\nmodel = \"m\"\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "memory.chat.base_url");
        let c = Config::from_toml("[memory]\nmax_per_user = 0\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "memory.max_per_user");
    }

    #[test]
    fn the_readme_memory_example_parses_and_selects_the_llm_extractor() {
        let c = readme_example("[memory]\n");
        assert_eq!(c.memory.extractor(), Extractor::Llm);
        assert_eq!(c.memory.embeddings.as_ref().map(|e| e.model.as_str()), Some("nomic-embed-text"));
    }

    #[test]
    fn the_llm_extractor_without_any_chat_server_stops_the_start() {
        let c = Config::from_toml("[memory]\nextractor = \"llm\"\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "memory.extractor");
    }
}
