//! Moderation before speech: a policy of denied categories (phrases and regular expressions),
//! an allow list, and the safe fallback line the character says instead.
//!
//! The session core ([`crate::session::conversation`]) holds agent text back to sentence
//! boundaries and checks each released stretch with [`Moderator::check`] before the words are
//! timed to the audio, so no event the client receives (partial transcripts included) carries
//! denied text. A flagged reply is cut with the barge-in mechanism (playout cleared, the provider
//! told `Cancel` + `Truncate` with what was heard), the client gets a `moderation` event naming
//! the category, the character says the fallback line, and the flag (with the denied text and the
//! policy version) is stored for review (`GET /v1/admin/flags`).
//!
//! Policies are versioned ([`policies`]): `default` is the `[moderation]` section until an admin
//! stores a replacement (`PUT /v1/admin/policies/default`), other named policies are stored
//! only; a character names its policy and adds to it ([`crate::config::CharacterModeration`]).
//! Each session is built with the newest version of its character's policy and keeps it until it
//! ends. With an endpoint on a speech-to-speech session, [`guard`] holds the provider's
//! transcripts back until the endpoint has checked them.
//!
//! Matching is local and allocation-light: one compiled case-insensitive regex per category
//! (phrases become `\b`-bounded literals). Allow-listed phrases are blanked out before the
//! categories are checked.

pub mod guard;
pub mod policies;

use regex::Regex;
use sha2::{Digest, Sha256};

use crate::config::ModerationSettings;
use crate::config::moderation::EndpointSettings;

/// The built-in category: credentials a model might leak (API keys, private keys).
pub const BUILTIN_CREDENTIALS: &[&str] =
    &[r"\bsk-[A-Za-z0-9_-]{20,}", r"\bAKIA[0-9A-Z]{16}\b", r"-----BEGIN [A-Z ]*PRIVATE KEY-----"];

/// A pattern that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("category `{category}`: pattern `{pattern}` does not compile: {message}")]
pub struct PatternError {
    /// The category.
    pub category: String,
    /// The pattern.
    pub pattern: String,
    /// Why.
    pub message: String,
}

/// Why text was flagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The category that matched (`deny` for `KOTODAMA_MODERATION_DENY`).
    pub category: String,
}

/// Whose text was flagged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The character's reply (checked before it is spoken).
    #[default]
    Agent,
    /// The user's text, typed or transcribed (checked before it reaches the model).
    User,
}

impl Source {
    /// `agent` or `user` (the `moderation` event's `source`, the flag's `source`).
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Agent => "agent",
            Source::User => "user",
        }
    }
}

/// A compiled policy. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Moderator {
    categories: Vec<(String, Regex)>,
    allow: Option<Regex>,
    fallback: String,
    version: String,
    endpoint: Option<(EndpointSettings, reqwest::Client)>,
    check_user_input: bool,
    settings: ModerationSettings,
}

/// Category of text flagged because a fail-closed endpoint could not check it.
pub const UNAVAILABLE: &str = "moderation_unavailable";

/// `phrase` as a case-insensitive literal, `\b`-bounded where its ends are word characters.
fn phrase_pattern(phrase: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut p = String::new();
    if word(phrase.chars().next()) {
        p.push_str(r"\b");
    }
    p.push_str(&regex::escape(phrase.trim()));
    if word(phrase.chars().last()) {
        p.push_str(r"\b");
    }
    p
}

fn compile(category: &str, patterns: &[String]) -> Result<Option<Regex>, PatternError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    for p in patterns {
        Regex::new(p).map_err(|e| PatternError {
            category: category.into(),
            pattern: p.clone(),
            message: e.to_string(),
        })?;
    }
    let joined = patterns.iter().map(|p| format!("(?:{p})")).collect::<Vec<_>>().join("|");
    Regex::new(&format!("(?i){joined}")).map(Some).map_err(|e| PatternError {
        category: category.into(),
        pattern: joined,
        message: e.to_string(),
    })
}

impl Moderator {
    /// Compile `settings`. With `enabled = false` nothing is ever flagged.
    pub fn new(settings: &ModerationSettings) -> Result<Self, PatternError> {
        let mut categories = Vec::new();
        let mut add = |name: &str, patterns: Vec<String>| -> Result<(), PatternError> {
            if let Some(re) = compile(name, &patterns)? {
                categories.push((name.to_owned(), re));
            }
            Ok(())
        };
        if settings.enabled {
            if settings.builtin {
                add("credentials", BUILTIN_CREDENTIALS.iter().map(|p| (*p).to_owned()).collect())?;
            }
            for (name, c) in &settings.categories {
                let mut patterns: Vec<String> = c.phrases.iter().map(|p| phrase_pattern(p)).collect();
                patterns.extend(c.patterns.iter().cloned());
                add(name, patterns)?;
            }
            add("deny", settings.deny.iter().map(|p| phrase_pattern(p)).collect())?;
        }
        let allow = compile("allow", &settings.allow.iter().map(|p| phrase_pattern(p)).collect::<Vec<_>>())?;
        let policy = serde_json::to_string(settings).unwrap_or_default();
        let version = Sha256::digest(policy.as_bytes())[..6].iter().map(|b| format!("{b:02x}")).collect();
        let endpoint = settings.endpoint.clone().filter(|_| settings.enabled).map(|e| (e, reqwest::Client::new()));
        Ok(Self {
            categories,
            allow,
            fallback: settings.fallback.trim().to_owned(),
            version,
            endpoint,
            check_user_input: settings.enabled && settings.check_user_input,
            settings: settings.clone(),
        })
    }

    /// A moderator that flags nothing (`enabled = false`).
    pub fn disabled() -> Self {
        let off = ModerationSettings { enabled: false, ..Default::default() };
        Self {
            categories: Vec::new(),
            allow: None,
            fallback: off.fallback.clone(),
            version: "disabled".into(),
            endpoint: None,
            check_user_input: false,
            settings: off,
        }
    }

    /// [`Self::new`], with `version` as the policy's version (a stored policy's `id@N`).
    pub fn with_version(settings: &ModerationSettings, version: String) -> Result<Self, PatternError> {
        Ok(Self { version, ..Self::new(settings)? })
    }

    /// Whether user text is checked too (the policy's `check_user_input`).
    pub fn checks_user_input(&self) -> bool {
        self.check_user_input
    }

    /// Whether an OpenAI-compatible moderation endpoint is asked after the local lists.
    pub fn has_endpoint(&self) -> bool {
        self.endpoint.is_some()
    }

    /// The settings this moderator was compiled from (recorded with a session for replay).
    pub fn settings(&self) -> &ModerationSettings {
        &self.settings
    }

    /// [`Self::check`], then (when configured and the lists pass) the moderation endpoint,
    /// within its deadline; a failure follows the endpoint's `fail_closed` choice.
    pub async fn check_with_endpoint(&self, text: &str) -> Option<Verdict> {
        if let Some(v) = self.check(text) {
            return Some(v);
        }
        self.check_endpoint(text).await
    }

    /// Only the moderation endpoint (none configured: `None`), within its `timeout_ms`; a failure
    /// or a missed deadline flags the text as [`UNAVAILABLE`] when the policy is fail-closed.
    pub async fn check_endpoint(&self, text: &str) -> Option<Verdict> {
        let (endpoint, http) = self.endpoint.as_ref()?;
        let deadline = std::time::Duration::from_millis(endpoint.timeout_ms);
        let failure = match tokio::time::timeout(deadline, ask(endpoint, http, text)).await {
            Ok(Ok(verdict)) => return verdict,
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {deadline:?}"),
        };
        metrics::counter!(crate::telemetry::MODERATION_ENDPOINT_FAILURES).increment(1);
        tracing::warn!(error = %failure, fail_closed = endpoint.fail_closed, "moderation endpoint failed");
        endpoint.fail_closed.then(|| Verdict { category: UNAVAILABLE.into() })
    }

    /// The first category `text` falls in, if any (allow-listed phrases are ignored).
    pub fn check(&self, text: &str) -> Option<Verdict> {
        if self.categories.is_empty() {
            return None;
        }
        let cleaned;
        let text = match &self.allow {
            Some(allow) if allow.is_match(text) => {
                cleaned = allow.replace_all(text, " ");
                cleaned.as_ref()
            }
            _ => text,
        };
        self.categories.iter().find(|(_, re)| re.is_match(text)).map(|(name, _)| Verdict { category: name.clone() })
    }

    /// The line the character says instead of a flagged reply.
    pub fn fallback(&self) -> &str {
        &self.fallback
    }

    /// A short id of the policy (stored with each flag, so a review knows which rules applied).
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// `POST {url}/v1/moderations` `{"model","input"}`: the first category marked true of a
/// flagged result (`flagged` when none is named).
async fn ask(endpoint: &EndpointSettings, http: &reqwest::Client, text: &str) -> Result<Option<Verdict>, String> {
    let url = format!("{}/v1/moderations", endpoint.url.trim_end_matches('/'));
    let mut req = http.post(&url).json(&serde_json::json!({"model": endpoint.model, "input": text}));
    if let Some(key) = &endpoint.api_key {
        req = req.bearer_auth(key.expose());
    }
    let response = req.send().await.map_err(|e| format!("POST {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("POST {url}: HTTP {}", response.status()));
    }
    let body: serde_json::Value = response.json().await.map_err(|e| format!("POST {url}: unreadable JSON: {e}"))?;
    let result = body["results"].get(0).ok_or_else(|| format!("POST {url}: no results"))?;
    if result["flagged"] != true {
        return Ok(None);
    }
    let named =
        result["categories"].as_object().and_then(|c| c.iter().find(|(_, v)| **v == true).map(|(k, _)| k.clone()));
    Ok(Some(Verdict { category: named.unwrap_or_else(|| "flagged".into()) }))
}

/// The end of the last complete sentence in `text` (byte index after its terminator), if any:
/// text is checked and released sentence by sentence.
pub fn sentence_end(text: &str) -> Option<usize> {
    let mut end = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let terminal = matches!(c, '.' | '!' | '?' | '\n' | '。' | '！' | '？');
        let next_is_break = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
        if terminal && (next_is_break || !c.is_ascii()) {
            end = Some(i + c.len_utf8());
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::moderation::CategorySettings;

    fn policy() -> Moderator {
        let mut s = ModerationSettings { deny: vec!["purple monkey".into()], ..Default::default() };
        s.categories.insert(
            "violence".into(),
            CategorySettings { phrases: vec!["kill".into()], patterns: vec![r"blow\s+up".into()] },
        );
        s.allow = vec!["kill time".into()];
        Moderator::new(&s).unwrap()
    }

    #[test]
    fn phrases_match_whole_words_case_insensitively_and_the_allow_list_wins() {
        let m = policy();
        let cat = |t: &str| m.check(t).map(|v| v.category);
        assert_eq!(cat("I will KILL the lights."), Some("violence".into()));
        assert_eq!(cat("Let's blow   up balloons"), Some("violence".into()));
        assert_eq!(cat("That is a Purple Monkey dishwasher."), Some("deny".into()));
        assert_eq!(cat("My skills are killer."), None, "not whole words");
        assert_eq!(cat("We could kill time at the park."), None, "allow-listed phrase");
        assert_eq!(cat("We could kill time, then kill it."), Some("violence".into()), "allow removes only itself");
        assert_eq!(cat("here is a key sk-abcdefghijklmnopqrstuvwxyz"), Some("credentials".into()), "built in");
        assert_eq!(cat("Hello there."), None);
    }

    #[test]
    fn a_bad_pattern_names_its_category_and_the_version_follows_the_policy() {
        let mut s = ModerationSettings::default();
        s.categories.insert("x".into(), CategorySettings { phrases: vec![], patterns: vec!["(".into()] });
        assert_eq!(Moderator::new(&s).unwrap_err().category, "x");
        let a = Moderator::new(&ModerationSettings::default()).unwrap();
        let b = Moderator::new(&ModerationSettings { deny: vec!["x".into()], ..Default::default() }).unwrap();
        assert_ne!(a.version(), b.version());
        let off = Moderator::new(&ModerationSettings { enabled: false, deny: vec!["x".into()], ..Default::default() });
        assert_eq!(off.unwrap().check("x"), None);
    }

    #[test]
    fn sentences_end_at_terminators_followed_by_a_break() {
        assert_eq!(sentence_end("Hello there. How are"), Some(12));
        assert_eq!(sentence_end("It costs 3.50 dollars"), None);
        assert_eq!(sentence_end("Done!"), Some(5));
        assert_eq!(sentence_end("こんにちは。元気"), Some("こんにちは。".len()));
        assert_eq!(sentence_end("no end"), None);
    }
}
