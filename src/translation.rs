//! Subtitles in the user's language (issue 15 item 5; seed 000's translation when the user's and
//! the character's languages differ).
//!
//! A character declares its `language` (BCP 47, `[[characters]] language`); the client names
//! the user's with api-v1 `session.update {language}` (N.E.K.O.: `language_update {language}`
//! or `start_session {language}`). When the primary subtags differ (`ja` vs `en-US`), every final
//! agent `transcript` is followed by a `transcript.translation {role, item_id, text, language}`
//! from an OpenAI-compatible chat endpoint (`POST {url}/v1/chat/completions`, streamed, through
//! the cascade's adapter [`OpenAiChat`]): `[translation]` or `KOTODAMA_TRANSLATION_URL`,
//! `_API_KEY`, `_MODEL`, `_TIMEOUT_MS`.
//!
//! Never on the audio path: a translation runs on a task of its own and its event is sent when it
//! arrives (the transcript itself is not held back). Bounded: at most [`MAX_IN_FLIGHT`]
//! translations per session (more are skipped and logged), [`MAX_TEXT_CHARS`] characters each,
//! a deadline of `timeout_ms` for the whole answer; a failed or late one is logged and skipped.
//! With no endpoint configured and languages that differ, the client gets one `error`
//! `translation_unavailable` and the log one line, and nothing is translated.
//!
//! With `user_text = true` (for a text-only model: the cascade's LLM) a typed user turn is
//! translated into the character's language before it reaches the model: the session task holds
//! that one `Text` command until its translation arrives (or fails or times out: then the
//! original goes), and keeps pacing audio meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use signaling::events::{Role, ServerEvent};
use tokio::sync::mpsc;

use crate::config::{ConfigError, Secret, Section, env, err};
use crate::providers::cascade::llm::{ChatMessage, ChatRequest, ChatRole, LanguageModel};
use crate::providers::cascade::openai::{Endpoint, OpenAiChat};

/// Translations of one session running at once; more are skipped.
pub const MAX_IN_FLIGHT: usize = 2;
/// Longest text translated (characters); longer text is cut there.
pub const MAX_TEXT_CHARS: usize = 2_000;
/// Longest answer read (bytes; a chattering endpoint is cut there).
const MAX_ANSWER_BYTES: usize = 16 * MAX_TEXT_CHARS;
/// Upper bound on the translation's tokens.
const MAX_TOKENS: u32 = 1_024;

/// `[translation]`: the OpenAI-compatible chat endpoint that translates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranslationSettings {
    /// Base URL (`KOTODAMA_TRANSLATION_URL`), e.g. `https://api.openai.com` or a local
    /// `http://127.0.0.1:11434`; unset: no translation.
    pub url: Option<String>,
    /// Sent as `Authorization: Bearer` (`KOTODAMA_TRANSLATION_API_KEY`); never logged.
    pub api_key: Option<Secret>,
    /// Chat model (`KOTODAMA_TRANSLATION_MODEL`, default `gpt-4o-mini`).
    pub model: String,
    /// Deadline of one translation, whole answer, milliseconds (`KOTODAMA_TRANSLATION_TIMEOUT_MS`,
    /// default 5000, 100..=60000).
    pub timeout_ms: u64,
    /// Also translate typed user text into the character's language before the model
    /// (`KOTODAMA_TRANSLATION_USER_TEXT`, default false): for text-only models.
    pub user_text: bool,
}

impl Default for TranslationSettings {
    fn default() -> Self {
        Self { url: None, api_key: None, model: "gpt-4o-mini".into(), timeout_ms: 5_000, user_text: false }
    }
}

impl Section for TranslationSettings {
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(url) = env::value(get, "KOTODAMA_TRANSLATION_URL") {
            self.url = Some(url);
        }
        if let Some(key) = env::value(get, "KOTODAMA_TRANSLATION_API_KEY") {
            self.api_key = Some(Secret::new(key));
        }
        if let Some(model) = env::value(get, "KOTODAMA_TRANSLATION_MODEL") {
            self.model = model;
        }
        let ms = "KOTODAMA_TRANSLATION_TIMEOUT_MS";
        if let Some(t) = env::parse(get, ms, "a number of milliseconds", "e.g. 5000")? {
            self.timeout_ms = t;
        }
        let user = "KOTODAMA_TRANSLATION_USER_TEXT";
        if let Some(on) = env::parse(get, user, "true or false", "e.g. true")? {
            self.user_text = on;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            crate::config::require_scheme(url, crate::config::HTTP_SCHEMES, || {
                let why = format!("`{url}` is not an http(s) URL");
                err("translation.url", why, "use e.g. https://api.openai.com (KOTODAMA_TRANSLATION_URL)")
            })?;
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            let why = format!("{} ms is outside 100..=60000", self.timeout_ms);
            return Err(err("translation.timeout_ms", why, "use e.g. 5000 (KOTODAMA_TRANSLATION_TIMEOUT_MS)"));
        }
        if self.url.is_some() && self.model.trim().is_empty() {
            return Err(err("translation.model", "empty", "name the chat model, e.g. gpt-4o-mini"));
        }
        Ok(())
    }
}

/// Why a translation failed (logged; the client just gets no translation).
#[derive(Debug, thiserror::Error)]
pub enum TranslationError {
    /// The endpoint failed (status, connection, unreadable answer).
    #[error("translation endpoint: {0}")]
    Endpoint(String),
    /// No complete answer within the deadline.
    #[error("no translation within {0:?}")]
    Timeout(Duration),
    /// The answer was empty.
    #[error("the translation was empty")]
    Empty,
}

/// Translates text through the configured chat endpoint (one per node, shared by sessions).
pub struct Translator {
    chat: OpenAiChat,
    timeout: Duration,
    user_text: bool,
}

impl Translator {
    /// The translator of `settings`; `None` when no URL is configured.
    pub fn new(settings: &TranslationSettings) -> Option<Arc<Self>> {
        let url = settings.url.as_deref()?;
        let mut endpoint = Endpoint::new(url, &settings.model);
        endpoint.api_key = settings.api_key.as_ref().map(|k| k.expose().to_owned());
        endpoint.timeout = Duration::from_millis(settings.timeout_ms);
        let chat = OpenAiChat::new(endpoint, crate::providers::cascade::openai::client());
        let timeout = Duration::from_millis(settings.timeout_ms);
        Some(Arc::new(Self { chat, timeout, user_text: settings.user_text }))
    }

    /// `text` (language `from`) in language `to` (BCP 47 tags). Errors: [`TranslationError`].
    pub async fn translate(&self, text: &str, from: &str, to: &str) -> Result<String, TranslationError> {
        let text: String = text.chars().take(MAX_TEXT_CHARS).collect();
        let system = format!(
            "Translate the user's message from the language tagged `{from}` into the language tagged `{to}`. \
             Answer with the translation only, no notes, no quotes."
        );
        let req = ChatRequest {
            messages: vec![
                ChatMessage { role: ChatRole::System, content: system },
                ChatMessage { role: ChatRole::User, content: text },
            ],
            character_name: String::new(),
            max_tokens: MAX_TOKENS,
        };
        let collect = async {
            let mut out = String::new();
            let mut stream = self.chat.stream(req);
            while let Some(delta) = stream.next().await {
                out.push_str(&delta.map_err(|e| TranslationError::Endpoint(e.to_string()))?);
                if out.len() > MAX_ANSWER_BYTES {
                    break;
                }
            }
            Ok::<_, TranslationError>(out)
        };
        let out = tokio::time::timeout(self.timeout, collect)
            .await
            .map_err(|_| TranslationError::Timeout(self.timeout))??;
        let out = out.trim();
        if out.is_empty() {
            return Err(TranslationError::Empty);
        }
        Ok(out.to_owned())
    }
}

/// Whether two BCP 47 tags name the same language (primary subtags, case-insensitive: `en-US`
/// and `en` are the same, `ja` and `en-US` are not).
pub fn same_language(a: &str, b: &str) -> bool {
    let primary = |t: &str| t.trim().split(['-', '_']).next().unwrap_or("").to_ascii_lowercase();
    primary(a) == primary(b)
}

/// A finished translation for the session task.
#[derive(Debug)]
pub enum Translated {
    /// Send to the client (`transcript.translation`).
    Event(ServerEvent),
    /// Hand to the model as the typed turn (translated, or the original when that failed).
    UserText(String),
}

/// One session's translation state: the languages, the running translations and their results.
pub struct SessionTranslation {
    translator: Option<Arc<Translator>>,
    session_id: String,
    character_language: String,
    user_language: Option<String>,
    /// The client was told that nothing is translated.
    told: bool,
    in_flight: Arc<AtomicUsize>,
    tx: mpsc::Sender<Translated>,
    rx: mpsc::Receiver<Translated>,
}

impl SessionTranslation {
    /// For a session whose character speaks `character_language`.
    pub fn new(translator: Option<Arc<Translator>>, session_id: &str, character_language: &str) -> Self {
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        Self {
            translator,
            session_id: session_id.to_owned(),
            character_language: character_language.to_owned(),
            user_language: None,
            told: false,
            in_flight: Arc::new(AtomicUsize::new(0)),
            tx,
            rx,
        }
    }

    /// The client named the user's language. Returns the one `error` `translation_unavailable`
    /// to send when it differs from the character's and no endpoint is configured.
    pub fn set_user_language(&mut self, language: &str) -> Option<ServerEvent> {
        let language: String = language.trim().chars().take(35).collect();
        let differs = !same_language(&language, &self.character_language);
        self.user_language = Some(language.clone());
        if !differs || self.translator.is_some() || std::mem::replace(&mut self.told, true) {
            return None;
        }
        tracing::info!(session_id = %self.session_id, user_language = %language,
            character_language = %self.character_language,
            "the user's language differs from the character's but no [translation] endpoint is configured");
        let message = format!(
            "the character speaks `{}`, not `{language}`, and this server has no translation endpoint \
             (KOTODAMA_TRANSLATION_URL): nothing is translated",
            self.character_language
        );
        Some(ServerEvent::Error { code: "translation_unavailable".into(), message })
    }

    /// An event on its way to the client: a final agent transcript starts its translation.
    pub fn on_event(&mut self, ev: &ServerEvent) {
        let ServerEvent::Transcript { role: Role::Agent, item_id, text, is_final: true } = ev else { return };
        let Some(to) = self.user_language.clone() else { return };
        let from = self.character_language.clone();
        let _ = self.spawn(text, item_id, from, to);
    }

    /// A typed user turn on its way to the model: `Ok` when it is being translated into the
    /// character's language (it comes back from [`Self::next`] as [`Translated::UserText`]),
    /// `Err(text)` to send it as it is (not configured, same language, too many running).
    pub fn user_text(&mut self, text: String) -> Result<(), String> {
        let Some(from) = self.user_language.clone() else { return Err(text) };
        if !self.translator.as_ref().is_some_and(|t| t.user_text) {
            return Err(text);
        }
        let to = self.character_language.clone();
        if self.spawn(&text, "", from, to) { Ok(()) } else { Err(text) }
    }

    /// Start translating `text` (an agent item's, or the user's when `item_id` is empty).
    fn spawn(&mut self, text: &str, item_id: &str, from: String, to: String) -> bool {
        let Some(translator) = &self.translator else { return false };
        if same_language(&from, &to) || text.trim().is_empty() {
            return false;
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            tracing::info!(session_id = %self.session_id, %item_id, "translation skipped: {MAX_IN_FLIGHT} running");
            return false;
        }
        let job = Job {
            translator: Arc::clone(translator),
            in_flight: Arc::clone(&self.in_flight),
            tx: self.tx.clone(),
            session_id: self.session_id.clone(),
            item_id: item_id.to_owned(),
            text: text.to_owned(),
            from,
            to,
        };
        tokio::spawn(job.run());
        true
    }

    /// The next finished translation (pending while none is).
    pub async fn next(&mut self) -> Translated {
        match self.rx.recv().await {
            Some(ev) => ev,
            None => std::future::pending().await,
        }
    }
}

/// One translation on its own task.
struct Job {
    translator: Arc<Translator>,
    in_flight: Arc<AtomicUsize>,
    tx: mpsc::Sender<Translated>,
    session_id: String,
    item_id: String,
    text: String,
    from: String,
    to: String,
}

impl Job {
    async fn run(self) {
        let result = self.translator.translate(&self.text, &self.from, &self.to).await;
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = &result {
            tracing::warn!(session_id = %self.session_id, item_id = %self.item_id, error = %e, "translation failed");
        }
        let done = match (self.item_id.is_empty(), result) {
            // The user's turn goes to the model either way (the original when translation failed).
            (true, result) => Translated::UserText(result.unwrap_or(self.text)),
            (false, Ok(text)) => Translated::Event(ServerEvent::TranscriptTranslation {
                role: Role::Agent,
                item_id: self.item_id,
                text,
                language: self.to,
            }),
            (false, Err(_)) => return,
        };
        // On this job's own task: waiting for room never holds up the session.
        let _ = self.tx.send(done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_compare_by_primary_subtag() {
        assert!(same_language("en-US", "en"));
        assert!(same_language("ja", "JA-jp"));
        assert!(!same_language("ja", "en-US"));
    }

    #[test]
    fn without_an_endpoint_a_differing_language_gets_one_notice() {
        let mut t = SessionTranslation::new(None, "s", "en-US");
        assert_eq!(t.set_user_language("en-GB"), None, "same language: nothing to say");
        let notice = t.set_user_language("ja").expect("one notice");
        assert!(matches!(notice, ServerEvent::Error { ref code, .. } if code == "translation_unavailable"));
        assert_eq!(t.set_user_language("de"), None, "told once");
    }

    #[test]
    fn settings_read_the_environment_and_name_bad_keys() {
        let mut s = TranslationSettings::default();
        let vars = [("KOTODAMA_TRANSLATION_URL", "http://127.0.0.1:9"), ("KOTODAMA_TRANSLATION_TIMEOUT_MS", "800")];
        s.apply_env(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap();
        assert_eq!((s.url.as_deref(), s.timeout_ms), (Some("http://127.0.0.1:9"), 800));
        assert!(s.validate().is_ok());
        s.url = Some("ftp://x".into());
        assert_eq!(s.validate().unwrap_err().key, "translation.url");
        let bad = s.apply_env(&|k| (k == "KOTODAMA_TRANSLATION_TIMEOUT_MS").then(|| "soon".to_owned()));
        assert_eq!(bad.unwrap_err().key, "KOTODAMA_TRANSLATION_TIMEOUT_MS");
    }
}
