//! Settings of the `gemini` provider: `[gemini]` in kotodama.toml, `GEMINI_*` in the
//! environment, validated at start with the key and the fix.

use std::time::Duration;

use super::protocol::{Compression, SetupParams};
use crate::config::{ConfigError, require_range};
use crate::providers::openai::Secret;
use crate::providers::voices::Voices;
use crate::providers::{Capabilities, SessionConfig};

/// The Live API endpoint for API keys (ai.google.dev/api/live).
pub const DEFAULT_URL: &str = "wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
/// The endpoint for ephemeral tokens (`auth_tokens/...`), which only v1alpha accepts.
pub const TOKEN_URL: &str = "wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained";
/// Prebuilt voices of the Live API's native-audio models (ai.google.dev/gemini-api/docs/speech-generation#voices).
pub const GEMINI_VOICES: &[&str] = &[
    "Zephyr",
    "Puck",
    "Charon",
    "Kore",
    "Fenrir",
    "Leda",
    "Orus",
    "Aoede",
    "Callirrhoe",
    "Autonoe",
    "Enceladus",
    "Iapetus",
    "Umbriel",
    "Algieba",
    "Despina",
    "Erinome",
    "Algenib",
    "Rasalgethi",
    "Laomedeia",
    "Achernar",
    "Alnilam",
    "Schedar",
    "Gacrux",
    "Pulcherrima",
    "Achird",
    "Zubenelgenubi",
    "Vindemiatrix",
    "Sadachbia",
    "Sadaltager",
    "Sulafat",
];
/// [`GEMINI_VOICES`] with the default, `Kore`.
const VOICES: Voices = Voices { provider: "Gemini", names: GEMINI_VOICES, default: "Kore" };
/// An audio-only session without context compression ends after about 15 minutes.
const UNCOMPRESSED_LIMIT_SECS: u64 = 15 * 60;

/// Who detects the user's turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GeminiTurnDetection {
    /// The server's automatic activity detection.
    Server,
    /// Our VAD: `activityStart` / `activityEnd`.
    Local,
}

/// Settings of the `gemini` provider.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeminiSettings {
    /// API key (`GEMINI_API_KEY`), or an ephemeral token (`auth_tokens/...`).
    pub api_key: Option<Secret>,
    /// The full WebSocket URL (`GEMINI_LIVE_URL`); unset: Google's endpoint for the key kind.
    /// `key=` / `access_token=` is added when the URL has neither and a key is set.
    pub url: Option<String>,
    /// Model (`GEMINI_LIVE_MODEL`); `models/` is added when absent.
    pub model: String,
    /// Voice for every character; unset: the character's voice when Gemini has it, else `Kore`.
    pub voice: Option<String>,
    /// `languageCode` of the speech (unset: the model chooses; native-audio models pick it
    /// themselves).
    pub language: Option<String>,
    /// `server` (automatic activity detection) or `local` (our VAD).
    pub turn_detection: GeminiTurnDetection,
    /// Transcribe the user's audio.
    pub input_transcription: bool,
    /// Transcribe the model's audio.
    pub output_transcription: bool,
    /// Context window compression (sliding window): sessions are unbounded with it, ~15 min without.
    pub compression: bool,
    /// Tokens that trigger compression (unset: the server's default).
    pub compression_trigger_tokens: Option<u64>,
    /// Tokens the sliding window keeps (unset: the server's default).
    pub compression_target_tokens: Option<u64>,
    /// Without compression, recycle sessions before this many seconds (<= 900).
    pub max_session_secs: u64,
    /// Connect and setup timeout, ms.
    pub connect_timeout_ms: u64,
}

impl Default for GeminiSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            url: None,
            model: "gemini-2.5-flash-native-audio-preview-12-2025".into(),
            voice: None,
            language: None,
            turn_detection: GeminiTurnDetection::Server,
            input_transcription: true,
            output_transcription: true,
            compression: true,
            compression_trigger_tokens: None,
            compression_target_tokens: None,
            max_session_secs: 14 * 60,
            connect_timeout_ms: 10_000,
        }
    }
}

impl GeminiSettings {
    /// Apply `GEMINI_API_KEY`, `GEMINI_LIVE_URL`, `GEMINI_LIVE_MODEL` read through `get`.
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) {
        let non_empty = |k: &str| get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(v) = non_empty("GEMINI_API_KEY") {
            self.api_key = Some(Secret::new(v));
        }
        if let Some(v) = non_empty("GEMINI_LIVE_URL") {
            self.url = Some(v);
        }
        if let Some(v) = non_empty("GEMINI_LIVE_MODEL") {
            self.model = v;
        }
    }

    /// Whether the provider can be offered: a key, or a URL of another server (a proxy that
    /// adds credentials, or a test double).
    pub fn configured(&self) -> bool {
        self.key().is_some() || self.url.is_some()
    }

    fn key(&self) -> Option<&str> {
        self.api_key.as_ref().filter(|k| !k.is_empty()).map(|k| k.expose().trim())
    }

    /// Check the settings when the provider is used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.configured() {
            return Err(ConfigError::new(
                "GEMINI_API_KEY",
                "the gemini provider is selected but no API key is set",
                "set GEMINI_API_KEY (or gemini.api_key), or GEMINI_LIVE_URL for a proxy",
            ));
        }
        if let Some(u) = &self.url
            && !(u.starts_with("wss://") || u.starts_with("ws://"))
        {
            return Err(ConfigError::new(
                "GEMINI_LIVE_URL",
                format!("`{u}` is not a ws:// or wss:// URL"),
                "use the full WebSocket URL",
            ));
        }
        if self.model.trim().is_empty() {
            return Err(ConfigError::new(
                "gemini.model",
                "empty",
                "set a Live model, e.g. gemini-2.5-flash-native-audio-preview-12-2025",
            ));
        }
        VOICES.check("gemini.voice", self.voice.as_deref())?;
        require_range(
            "gemini.max_session_secs",
            self.max_session_secs,
            60..=UNCOMPRESSED_LIMIT_SECS,
            "use 60..=900 (Gemini ends uncompressed audio sessions at 15 min)",
        )?;
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::new("gemini.connect_timeout_ms", "0", "use e.g. 10000"));
        }
        Ok(())
    }

    /// The WebSocket URL with the credential in its query (never log it).
    pub fn ws_url(&self) -> Result<String, String> {
        let token = self.key().is_some_and(|k| k.starts_with("auth_tokens/"));
        let base = match &self.url {
            Some(u) => u.clone(),
            None if self.key().is_none() => return Err("no Gemini API key: set GEMINI_API_KEY".into()),
            None if token => TOKEN_URL.to_owned(),
            None => DEFAULT_URL.to_owned(),
        };
        let Some(key) = self.key() else { return Ok(base) };
        if base.contains("key=") || base.contains("access_token=") {
            return Ok(base);
        }
        let param = if token { "access_token" } else { "key" };
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(format!("{base}{sep}{param}={}", url_escape(key)))
    }

    /// The voice for a character: the setting, else the character's when Gemini has it, else Kore.
    pub fn voice_for(&self, character_voice: &str) -> String {
        VOICES.choose(self.voice.as_deref(), character_voice)
    }

    /// What this configuration can do: server VAD unless local, no truncation, transcripts as
    /// configured, tools, images (`realtimeInput.video`), and a limit only without compression.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            server_vad: self.turn_detection == GeminiTurnDetection::Server,
            truncation: false,
            user_transcripts: self.input_transcription,
            tools: true,
            images: true,
            max_session: (!self.compression).then(|| Duration::from_secs(self.max_session_secs)),
        }
    }

    /// `setup` for a session (resuming `handle` when given).
    pub fn setup_params(&self, cfg: &SessionConfig, handle: Option<String>) -> SetupParams {
        SetupParams {
            model: self.model.clone(),
            instructions: cfg.instructions.clone(),
            voice: self.voice_for(cfg.voice_for("gemini")),
            language: self.language.clone(),
            server_vad: self.turn_detection == GeminiTurnDetection::Server,
            input_transcription: self.input_transcription,
            output_transcription: self.output_transcription,
            tools: cfg.tools.specs(),
            resume_handle: handle,
            compression: self.compression.then_some(Compression {
                trigger_tokens: self.compression_trigger_tokens,
                target_tokens: self.compression_target_tokens,
            }),
        }
    }
}

/// Percent-encode a query value (keys are URL-safe in practice; tokens contain `/`).
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn key_alone_uses_googles_endpoint_and_never_shows_in_debug() {
        let mut s = GeminiSettings::default();
        assert!(!s.configured());
        assert_eq!(s.validate().unwrap_err().key, "GEMINI_API_KEY");
        s.apply_env(&env(&[("GEMINI_API_KEY", " AIza-secret ")]));
        assert!(s.configured());
        s.validate().unwrap();
        assert_eq!(s.ws_url().unwrap(), format!("{DEFAULT_URL}?key=AIza-secret"));
        assert!(!format!("{s:?}").contains("AIza-secret"));
    }

    #[test]
    fn ephemeral_tokens_and_url_overrides() {
        let mut s = GeminiSettings::default();
        s.apply_env(&env(&[("GEMINI_API_KEY", "auth_tokens/abc")]));
        assert_eq!(s.ws_url().unwrap(), format!("{TOKEN_URL}?access_token=auth_tokens%2Fabc"));
        let mut s = GeminiSettings::default();
        s.apply_env(&env(&[("GEMINI_LIVE_URL", "ws://127.0.0.1:9/live?x=1"), ("GEMINI_LIVE_MODEL", "m")]));
        assert_eq!(s.ws_url().unwrap(), "ws://127.0.0.1:9/live?x=1", "a proxy without a key");
        assert_eq!(s.model, "m");
        s.validate().unwrap();
        s.api_key = Some(Secret::new("k"));
        assert_eq!(s.ws_url().unwrap(), "ws://127.0.0.1:9/live?x=1&key=k");
        s.url = Some("http://x".into());
        assert_eq!(s.validate().unwrap_err().key, "GEMINI_LIVE_URL");
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = GeminiSettings { api_key: Some(Secret::new("k")), ..Default::default() };
        let e = GeminiSettings { voice: Some("nobody".into()), ..base.clone() }.validate().unwrap_err();
        assert_eq!(e.key, "gemini.voice");
        let e = GeminiSettings { max_session_secs: 3600, ..base.clone() }.validate().unwrap_err();
        assert_eq!(e.key, "gemini.max_session_secs");
        let e = GeminiSettings { model: " ".into(), ..base }.validate().unwrap_err();
        assert_eq!(e.key, "gemini.model");
    }

    #[test]
    fn voices_and_capabilities() {
        let s = GeminiSettings::default();
        assert_eq!(s.voice_for("aiko"), "Kore");
        assert_eq!(s.voice_for("puck"), "Puck");
        let s = GeminiSettings { voice: Some("charon".into()), ..Default::default() };
        assert_eq!(s.voice_for("Puck"), "Charon");
        let caps = GeminiSettings::default().capabilities();
        assert!(caps.server_vad && !caps.truncation && caps.user_transcripts && caps.tools);
        assert_eq!(caps.max_session, None, "compression makes sessions unbounded");
        let s = GeminiSettings { compression: false, turn_detection: GeminiTurnDetection::Local, ..Default::default() };
        assert_eq!(s.capabilities().max_session, Some(Duration::from_secs(840)));
        assert!(!s.capabilities().server_vad);
    }
}
