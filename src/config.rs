//! Configuration: `kotodama.toml` (optional) overridden by environment variables, validated at
//! start. Every error names the key and the fix; the defaults run offline on one machine.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::providers::openai::{OpenAiSettings, Secret};

pub mod moderation;
mod oidc;
pub use moderation::ModerationSettings;
pub use oidc::OidcSettings;

/// A configuration error: names the key and says how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {key}: {problem}; {fix}")]
pub struct ConfigError {
    /// The key (`bind`, `KOTODAMA_BIND`, `media.vad_mode`, ...).
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

fn err(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), problem: problem.into(), fix: fix.into() }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP bind address (`KOTODAMA_BIND`).
    pub bind: SocketAddr,
    /// Address advertised in ICE candidates (`KOTODAMA_PUBLIC_IP`); default: the bind address.
    pub public_ip: Option<IpAddr>,
    /// API keys that may create sessions (`KOTODAMA_API_KEYS`, comma-separated): each a key
    /// (>= 16 characters, hashed at start) or `sha256:<64 hex>` of one.
    pub api_keys: Vec<String>,
    /// Admin API keys (`KOTODAMA_ADMIN_API_KEYS`), same forms: also every user's data.
    pub admin_api_keys: Vec<String>,
    /// Session-token keys beyond the default HS256 secret.
    pub tokens: TokenSettings,
    /// Provider for new sessions (`KOTODAMA_PROVIDER`).
    pub provider: Option<String>,
    /// Secret for session tokens (`KOTODAMA_TOKEN_SECRET`); random per start when unset.
    pub token_secret: Option<String>,
    /// Storage URL (`KOTODAMA_DATABASE_URL`).
    pub database_url: String,
    /// Redis URL (`KOTODAMA_REDIS_URL`); unset: single node.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel (`KOTODAMA_REDIS_PREFIX`), so several deployments
    /// (or test runs) can share one Redis.
    pub redis_prefix: String,
    /// The URL other nodes redirect clients to for this node's sessions
    /// (`KOTODAMA_ADVERTISE_URL`, e.g. `https://node-1.example.com`); default `http://<bind>`.
    pub advertise_url: Option<String>,
    /// This node's stable id in the store (`KOTODAMA_NODE_ID`); default: the advertised URL.
    /// A restarted node must keep its id so it can mark the sessions its crash left open.
    pub node_id: Option<String>,
    /// Directory of the web demo served at `/`.
    pub web_demo_dir: PathBuf,
    /// Session limits.
    pub session: SessionLimits,
    /// Audio pipeline settings.
    pub media: MediaSettings,
    /// The scripted provider's settings.
    pub scripted: ScriptedSettings,
    /// The OpenAI Realtime provider's settings (`[openai]`, `OPENAI_*`).
    pub openai: OpenAiSettings,
    /// Reconnect, recycling and failover of provider sessions.
    pub resilience: ResilienceSettings,
    /// The offline engines (provider `local`).
    pub local: LocalSettings,
    /// The HTTP cascade (provider `cascade`): OpenAI-compatible STT, LLM and TTS servers.
    pub cascade: CascadeSettings,
    /// Characters offered by `GET /v1/characters` (a built-in one when empty).
    pub characters: Vec<Character>,
    /// End-user sign-in with OpenID Connect (`[oidc]`, `KOTODAMA_OIDC_*`).
    pub oidc: OidcSettings,
    /// Moderation before speech (`[moderation]`, `KOTODAMA_MODERATION_DENY`).
    pub moderation: ModerationSettings,
}

/// Session-token signing keys (`[tokens]`). Unset: HS256 with `token_secret`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// `HS256` (default), `RS256` or `EdDSA` (`KOTODAMA_TOKEN_ALG`).
    pub algorithm: Option<String>,
    /// `kid` of the signing key (`KOTODAMA_TOKEN_KID`); required for RS256/EdDSA.
    pub kid: Option<String>,
    /// PEM private key for RS256/EdDSA (`KOTODAMA_TOKEN_PRIVATE_KEY_FILE`).
    pub private_key_file: Option<PathBuf>,
    /// PEM public key for RS256/EdDSA (`KOTODAMA_TOKEN_PUBLIC_KEY_FILE`).
    pub public_key_file: Option<PathBuf>,
    /// Keys still accepted for verification during a rotation.
    pub previous: Vec<PreviousTokenKey>,
}

/// A verify-only token key (`[[tokens.previous]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousTokenKey {
    /// Its `kid`.
    pub kid: String,
    /// `RS256`, `EdDSA` or `HS256`.
    pub algorithm: String,
    /// PEM public key (RS256/EdDSA).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// The secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
}

/// Limits on sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionLimits {
    /// Time a session token allows to connect, seconds.
    pub token_ttl_secs: u64,
    /// Maximum length of one session, seconds.
    pub max_duration_secs: u64,
    /// Maximum concurrent sessions on this node (each holds one UDP socket).
    pub max_sessions: usize,
    /// How long a session may wait for its offer after creation, seconds.
    pub connect_timeout_secs: u64,
    /// Grace given to live sessions on shutdown, seconds.
    pub drain_grace_secs: u64,
    /// A peer silent this long (no ICE traffic; consent lost) ends its session, seconds (>= 6).
    pub peer_timeout_secs: u64,
    /// A live session with no user speech, client message or agent audio for this long ends
    /// (`idle_timeout`), seconds; 0: never.
    pub idle_timeout_secs: u64,
    /// Sessions one API key may create per minute (0: no limit).
    pub create_per_minute_per_key: u32,
    /// Sessions one client IP may create per minute when the API is open (0: no limit).
    pub create_per_minute_per_ip: u32,
}

/// Audio pipeline settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSettings {
    /// webrtc-vad aggressiveness 0..=3.
    pub vad_mode: u8,
    /// Minimum speech before a speech start is reported, ms.
    pub min_speech_ms: u64,
    /// Silence that ends an utterance, ms.
    pub min_silence_ms: u64,
    /// Opus bitrate of the character's voice, bits/s.
    pub opus_bitrate: u32,
    /// Opus encoder complexity 0..=10.
    pub opus_complexity: u8,
    /// UDP port range for media, `"40000-40999"` (`KOTODAMA_UDP_PORTS`); unset: ephemeral ports.
    pub udp_ports: Option<String>,
}

/// The scripted provider's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptedSettings {
    /// Simulated model time before a reply, ms.
    pub response_delay_ms: u64,
}

/// Reconnect, recycling and failover of provider sessions (`[resilience]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceSettings {
    /// Connect attempts per provider before failing over to the next one.
    pub attempts_per_provider: u32,
    /// First reconnect delay, ms (doubled per attempt, jittered).
    pub backoff_base_ms: u64,
    /// Longest reconnect delay, ms.
    pub backoff_max_ms: u64,
    /// User audio kept while reconnecting, ms.
    pub gap_buffer_ms: u64,
    /// Recycle every provider session after this long, ms (unset: each provider's own limit,
    /// e.g. `openai.max_session_secs`).
    pub max_session_ms: Option<u64>,
    /// Open the next session this long before the limit, ms.
    pub recycle_lead_ms: u64,
    /// Silence from the user required for a recycle swap, ms.
    pub quiet_ms: u64,
    /// A requested reply (greeting, typed text) that does not start within this is given up, ms.
    pub reply_timeout_ms: u64,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        Self {
            attempts_per_provider: 3,
            backoff_base_ms: 250,
            backoff_max_ms: 5_000,
            gap_buffer_ms: 5_000,
            max_session_ms: None,
            recycle_lead_ms: 60_000,
            quiet_ms: 1_500,
            reply_timeout_ms: 15_000,
        }
    }
}

/// The offline engines of the `local` provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalSettings {
    /// PocketSphinx model directory (Debian's `pocketsphinx-en-us`).
    pub sphinx_model_dir: PathBuf,
    /// Most PocketSphinx decoders alive at once (each ~30 MB; concurrent user turns beyond this wait).
    pub max_decoders: usize,
    /// Prompt budget per reply, estimated tokens (persona + memory summary + recent turns).
    pub token_budget: usize,
}

impl Default for LocalSettings {
    fn default() -> Self {
        Self {
            sphinx_model_dir: PathBuf::from("/usr/share/pocketsphinx/model/en-us"),
            max_decoders: 4,
            token_budget: 2000,
        }
    }
}

impl ResilienceSettings {
    /// The policy the provider wrapper applies.
    pub fn policy(&self) -> crate::providers::resilient::ResiliencePolicy {
        crate::providers::resilient::ResiliencePolicy {
            attempts_per_provider: self.attempts_per_provider.max(1),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            gap_buffer: Duration::from_millis(self.gap_buffer_ms),
            max_session: self.max_session_ms.map(Duration::from_millis),
            recycle_lead: Duration::from_millis(self.recycle_lead_ms),
            quiet_for: Duration::from_millis(self.quiet_ms),
            reply_timeout: Duration::from_millis(self.reply_timeout_ms.max(1)),
        }
    }
}

/// The `cascade` provider: failover lists of OpenAI-compatible servers per stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeSettings {
    /// Speech-to-text servers (`POST /v1/audio/transcriptions`), in order of preference.
    pub stt: Vec<EndpointSettings>,
    /// Chat models (`POST /v1/chat/completions`, streamed), in order of preference.
    pub llm: Vec<EndpointSettings>,
    /// Text-to-speech servers (`POST /v1/audio/speech`, streamed), in order of preference.
    pub tts: Vec<EndpointSettings>,
    /// Append the offline engines to every list (last resort; and the stage's only adapter
    /// when its list is empty).
    pub local_fallback: bool,
    /// Deadline for a response head and between streamed chunks, ms.
    pub timeout_ms: u64,
}

impl Default for CascadeSettings {
    fn default() -> Self {
        Self { stt: Vec::new(), llm: Vec::new(), tts: Vec::new(), local_fallback: true, timeout_ms: 10_000 }
    }
}

impl CascadeSettings {
    /// Whether any server is configured.
    pub fn configured(&self) -> bool {
        !(self.stt.is_empty() && self.llm.is_empty() && self.tts.is_empty())
    }
}

/// One OpenAI-compatible server.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    /// Base URL, e.g. `http://127.0.0.1:11434` (Ollama) or `https://api.openai.com`.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Bearer key, if the server needs one (never logged).
    #[serde(default)]
    pub api_key: Option<String>,
    /// TTS: voice (default: the character's voice).
    #[serde(default)]
    pub voice: Option<String>,
    /// TTS: `pcm` (raw s16le) or `wav`.
    #[serde(default)]
    pub format: Option<String>,
    /// TTS: sample rate of raw `pcm` (default 24000).
    #[serde(default)]
    pub sample_rate: Option<u32>,
}

impl std::fmt::Debug for EndpointSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A character.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Character {
    /// Stable id used in the API.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Language tag.
    #[serde(default = "default_language")]
    pub language: String,
    /// Voice name (provider-specific).
    #[serde(default = "default_voice")]
    pub voice: String,
    /// Persona: the system instructions.
    #[serde(default)]
    pub persona: String,
    /// Avatar expression per emotion (`happy = "grin"`), for clients that render this character;
    /// served in `GET /v1/characters`. Keys are emotions of the documented set.
    #[serde(default)]
    pub expressions: std::collections::BTreeMap<String, String>,
    /// Instructions for a first reply spoken on connect (unset: the character waits for the user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greeting: Option<String>,
    /// Providers in order of preference (failover); empty: the session's provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
    /// Tools the model may call (unset: every built-in tool; `[]`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
    /// Per-avatar viseme overrides: eSpeak phoneme -> viseme name (`{ "h" = "sil" }`).
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub visemes: std::collections::HashMap<String, String>,
    /// Avatar mapping for clients (a model or image id), listed in `GET /v1/characters`.
    #[serde(default)]
    pub avatar: Option<String>,
    /// Provider this character prefers when a session names none.
    #[serde(default)]
    pub provider: Option<String>,
}

fn default_language() -> String {
    "en-US".into()
}
fn default_voice() -> String {
    "aiko".into()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_ip: None,
            api_keys: Vec::new(),
            admin_api_keys: Vec::new(),
            tokens: TokenSettings::default(),
            provider: None,
            token_secret: None,
            database_url: "sqlite://data/kotodama.db".into(),
            redis_url: None,
            redis_prefix: "kotodama:".into(),
            advertise_url: None,
            node_id: None,
            web_demo_dir: PathBuf::from("web-demo"),
            session: SessionLimits::default(),
            media: MediaSettings::default(),
            scripted: ScriptedSettings::default(),
            openai: OpenAiSettings::default(),
            resilience: ResilienceSettings::default(),
            local: LocalSettings::default(),
            cascade: CascadeSettings::default(),
            characters: Vec::new(),
            oidc: OidcSettings::default(),
            moderation: ModerationSettings::default(),
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            token_ttl_secs: 600,
            max_duration_secs: 3600,
            max_sessions: 500,
            connect_timeout_secs: 600,
            drain_grace_secs: 10,
            peer_timeout_secs: 15,
            idle_timeout_secs: 300,
            create_per_minute_per_key: 600,
            create_per_minute_per_ip: 120,
        }
    }
}

impl Default for MediaSettings {
    fn default() -> Self {
        Self {
            vad_mode: 2,
            min_speech_ms: 100,
            min_silence_ms: 500,
            opus_bitrate: 32_000,
            opus_complexity: 1,
            udp_ports: None,
        }
    }
}

impl Default for ScriptedSettings {
    fn default() -> Self {
        Self { response_delay_ms: 150 }
    }
}

impl SessionLimits {
    /// The token lifetime.
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
    /// The maximum session duration.
    pub fn max_duration(&self) -> Duration {
        Duration::from_secs(self.max_duration_secs)
    }
}

/// Names of the providers this build knows.
#[cfg(feature = "local")]
pub const KNOWN_PROVIDERS: &[&str] = &["local", "cascade", "scripted", "openai"];
/// Names of the providers this build knows.
#[cfg(not(feature = "local"))]
pub const KNOWN_PROVIDERS: &[&str] = &["cascade", "scripted", "openai"];

/// The provider used when none is configured: the offline cascade when this build has it.
pub const DEFAULT_PROVIDER: &str = if cfg!(feature = "local") { "local" } else { "scripted" };

impl Config {
    /// Load `path` (or `kotodama.toml` when present), apply environment overrides, validate.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let default_path = Path::new("kotodama.toml");
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None if default_path.exists() => Some(default_path.to_path_buf()),
            None => None,
        };
        let mut cfg = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    err("--config", format!("cannot read {}: {e}", p.display()), "pass a readable TOML file")
                })?;
                Self::from_toml(&text)?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse a TOML document (no environment, no validation).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            err("kotodama.toml", e.message().to_owned(), "fix the key named above (see README, Configuration)")
        })
    }

    /// Apply `KOTODAMA_*` (and provider) environment overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = non_empty("KOTODAMA_BIND") {
            self.bind = v.trim().parse().map_err(|_| {
                err("KOTODAMA_BIND", format!("`{v}` is not host:port"), "use e.g. 127.0.0.1:8080 or 0.0.0.0:8080")
            })?;
        }
        if let Some(v) = non_empty("KOTODAMA_PUBLIC_IP") {
            self.public_ip = Some(v.trim().parse().map_err(|_| {
                err(
                    "KOTODAMA_PUBLIC_IP",
                    format!("`{v}` is not an IP address"),
                    "use the address clients reach, e.g. 203.0.113.7",
                )
            })?);
        }
        self.oidc.apply_env(&get)?;
        self.moderation.apply_env(&get)?;
        if let Some(v) = non_empty("KOTODAMA_API_KEYS") {
            self.api_keys = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = non_empty("KOTODAMA_ADMIN_API_KEYS") {
            self.admin_api_keys = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = non_empty("KOTODAMA_TOKEN_ALG") {
            self.tokens.algorithm = Some(v.trim().to_owned());
        }
        if let Some(v) = non_empty("KOTODAMA_TOKEN_KID") {
            self.tokens.kid = Some(v.trim().to_owned());
        }
        if let Some(v) = non_empty("KOTODAMA_TOKEN_PRIVATE_KEY_FILE") {
            self.tokens.private_key_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = non_empty("KOTODAMA_TOKEN_PUBLIC_KEY_FILE") {
            self.tokens.public_key_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = non_empty("KOTODAMA_PROVIDER") {
            self.provider = Some(v.trim().to_owned());
        }
        if let Some(v) = non_empty("KOTODAMA_TOKEN_SECRET") {
            self.token_secret = Some(v);
        }
        if let Some(v) = non_empty("KOTODAMA_DATABASE_URL") {
            self.database_url = v.trim().to_owned();
        }
        if let Some(v) = non_empty("KOTODAMA_UDP_PORTS") {
            self.media.udp_ports = Some(v.trim().to_owned());
        }
        if let Some(v) = non_empty("KOTODAMA_REDIS_URL") {
            self.redis_url = Some(v.trim().to_owned());
        }
        if let Some(v) = non_empty("OPENAI_API_KEY") {
            self.openai.api_key = Some(Secret::new(v.trim()));
        }
        if let Some(v) = non_empty("OPENAI_REALTIME_URL") {
            self.openai.url = v.trim().to_owned();
        }
        if let Some(v) = non_empty("OPENAI_REALTIME_MODEL") {
            self.openai.model = v.trim().to_owned();
        }
        for (stage, list) in
            [("STT", &mut self.cascade.stt), ("LLM", &mut self.cascade.llm), ("TTS", &mut self.cascade.tts)]
        {
            if let Some(url) = non_empty(&format!("KOTODAMA_{stage}_URL")) {
                let model = non_empty(&format!("KOTODAMA_{stage}_MODEL")).ok_or_else(|| {
                    err(
                        &format!("KOTODAMA_{stage}_MODEL"),
                        format!("KOTODAMA_{stage}_URL is set but no model"),
                        format!("set KOTODAMA_{stage}_MODEL to the server's model name"),
                    )
                })?;
                list.insert(
                    0,
                    EndpointSettings {
                        base_url: url.trim().to_owned(),
                        model: model.trim().to_owned(),
                        api_key: non_empty(&format!("KOTODAMA_{stage}_API_KEY")),
                        voice: None,
                        format: None,
                        sample_rate: None,
                    },
                );
            }
        }
        if self.provider.is_none() && self.cascade.configured() {
            self.provider = Some("cascade".into());
        }
        if let Some(v) = non_empty("KOTODAMA_REDIS_PREFIX") {
            self.redis_prefix = v.trim().to_owned();
        }
        if let Some(v) = non_empty("KOTODAMA_ADVERTISE_URL") {
            self.advertise_url = Some(v.trim().trim_end_matches('/').to_owned());
        }
        if let Some(v) = non_empty("KOTODAMA_NODE_ID") {
            self.node_id = Some(v.trim().to_owned());
        }
        if self.provider.is_none() && non_empty("OPENAI_API_KEY").is_some() {
            // The contract: OPENAI_API_KEY alone selects OpenAI Realtime for new sessions.
            self.provider = Some("openai".into());
        }
        Ok(())
    }

    /// Check everything that can be checked before binding sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.oidc.validate()?;
        self.moderation.validate()?;
        if !self.bind.ip().is_loopback() && self.api_keys.is_empty() && !self.oidc.enabled() {
            return Err(err(
                "KOTODAMA_API_KEYS",
                format!("bind {} is not loopback and no API key is configured (anyone could open sessions)", self.bind),
                "set KOTODAMA_API_KEYS=<key>[,<key>...] or bind to 127.0.0.1",
            ));
        }
        for (key, list) in [("KOTODAMA_API_KEYS", &self.api_keys), ("KOTODAMA_ADMIN_API_KEYS", &self.admin_api_keys)] {
            if let Err(e) = signaling::ApiKeys::default().parse(signaling::KeyRole::User, list.iter()) {
                return Err(err(
                    key,
                    format!("entry {} is shorter than 16 characters and not sha256:<64 hex digits>", e.index + 1),
                    "use long random keys (e.g. `openssl rand -hex 24`) or their digests \
                     (`printf %s KEY | sha256sum` -> sha256:<hex>)",
                ));
            }
        }
        let alg = self.tokens.algorithm.as_deref().unwrap_or("HS256");
        match alg {
            "HS256" => {
                if self.tokens.private_key_file.is_some() || self.tokens.public_key_file.is_some() {
                    return Err(err(
                        "KOTODAMA_TOKEN_ALG",
                        "key files are set but the algorithm is HS256",
                        "set KOTODAMA_TOKEN_ALG=RS256 or EdDSA, or remove the key files",
                    ));
                }
            }
            "RS256" | "EdDSA" => {
                if self.tokens.private_key_file.is_none() || self.tokens.public_key_file.is_none() {
                    return Err(err(
                        "KOTODAMA_TOKEN_PRIVATE_KEY_FILE",
                        format!("{alg} needs a private and a public key file"),
                        "set KOTODAMA_TOKEN_PRIVATE_KEY_FILE and KOTODAMA_TOKEN_PUBLIC_KEY_FILE (PEM)",
                    ));
                }
                if self.tokens.kid.as_deref().is_none_or(str::is_empty) {
                    return Err(err(
                        "KOTODAMA_TOKEN_KID",
                        format!("{alg} keys need a kid (so they can be rotated)"),
                        "set KOTODAMA_TOKEN_KID, e.g. 2026-11",
                    ));
                }
            }
            other => {
                return Err(err(
                    "KOTODAMA_TOKEN_ALG",
                    format!("`{other}` is not supported"),
                    "use HS256 (default), RS256 or EdDSA",
                ));
            }
        }
        for p in &self.tokens.previous {
            let ok = match p.algorithm.as_str() {
                "HS256" => p.secret.as_ref().is_some_and(|s| s.len() >= 32),
                "RS256" | "EdDSA" => p.public_key_file.is_some(),
                _ => false,
            };
            if !ok || p.kid.is_empty() {
                return Err(err(
                    "tokens.previous",
                    format!(
                        "key `{}` needs a kid and, for its algorithm, a public_key_file (RS256/EdDSA) or a secret of >= 32 bytes (HS256)",
                        p.kid
                    ),
                    "fix or remove the entry",
                ));
            }
        }
        if let Some(s) = &self.token_secret
            && s.len() < 32
        {
            return Err(err(
                "KOTODAMA_TOKEN_SECRET",
                "shorter than 32 bytes",
                "use e.g. `openssl rand -hex 32`, or unset it for a random secret per start",
            ));
        }
        if let Some(p) = &self.provider
            && !KNOWN_PROVIDERS.contains(&p.as_str())
        {
            return Err(err(
                "KOTODAMA_PROVIDER",
                format!("provider `{p}` is not available in this build (known: {})", KNOWN_PROVIDERS.join(", ")),
                "set KOTODAMA_PROVIDER to one of the known providers",
            ));
        }
        let uses_openai = self.provider.as_deref() == Some("openai")
            || self.characters.iter().any(|c| c.providers.iter().any(|p| p == "openai"));
        if uses_openai {
            self.validate_openai()?;
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(err(
                "KOTODAMA_DATABASE_URL",
                format!("unsupported URL `{}`", self.database_url),
                "use sqlite://path/to/file.db or postgres://user@host/db",
            ));
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(err(
                "KOTODAMA_REDIS_URL",
                format!("unsupported URL `{url}`"),
                "use redis://host:6379 (or rediss:// for TLS), or unset it for a single node",
            ));
        }
        if self.redis_url.is_some() && self.token_secret.is_none() && alg == "HS256" {
            return Err(err(
                "KOTODAMA_TOKEN_SECRET",
                "unset while KOTODAMA_REDIS_URL makes this node part of a cluster (a random secret per node \
                 would make other nodes refuse its session tokens)",
                "set the same KOTODAMA_TOKEN_SECRET (>= 32 bytes, e.g. `openssl rand -hex 32`) on every node",
            ));
        }
        if let Some(url) = &self.advertise_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(err(
                "KOTODAMA_ADVERTISE_URL",
                format!("`{url}` is not an http(s) URL"),
                "use the URL clients reach this node at, e.g. https://node-1.example.com",
            ));
        }
        if self.node_id.as_ref().is_some_and(|n| n.is_empty() || n.len() > 200) {
            return Err(err("KOTODAMA_NODE_ID", "empty or longer than 200 characters", "use a short stable name"));
        }
        if self.media.vad_mode > 3 {
            return Err(err(
                "media.vad_mode",
                format!("{} is out of range", self.media.vad_mode),
                "use 0 (quality) .. 3 (very aggressive)",
            ));
        }
        if self.media.opus_complexity > 10 {
            return Err(err("media.opus_complexity", "out of range", "use 0..=10"));
        }
        if !(6_000..=510_000).contains(&self.media.opus_bitrate) {
            return Err(err("media.opus_bitrate", "out of range", "use 6000..=510000 bits/s"));
        }
        if self.media.min_speech_ms < 10 || self.media.min_silence_ms < 10 {
            return Err(err("media.min_speech_ms", "below one 10 ms VAD frame", "use at least 10"));
        }
        if let Some((min, max)) = self.udp_port_range()? {
            let size = usize::from(max - min) + 1;
            if size < self.session.max_sessions {
                return Err(err(
                    "media.udp_ports",
                    format!("{size} ports for session.max_sessions = {}", self.session.max_sessions),
                    "widen the range (one UDP port per live session) or lower session.max_sessions",
                ));
            }
        }
        if self.session.peer_timeout_secs < 6 {
            return Err(err(
                "session.peer_timeout_secs",
                "below 6 s",
                "use 6 or more (ICE declares a peer disconnected after 5 s)",
            ));
        }
        if self.session.max_sessions == 0 {
            return Err(err("session.max_sessions", "zero", "use a positive number"));
        }
        if self.session.token_ttl_secs == 0 || self.session.max_duration_secs == 0 {
            return Err(err("session.token_ttl_secs", "zero", "use a positive number of seconds"));
        }
        for (stage, list) in [("stt", &self.cascade.stt), ("llm", &self.cascade.llm), ("tts", &self.cascade.tts)] {
            for e in list {
                if !(e.base_url.starts_with("http://") || e.base_url.starts_with("https://")) {
                    return Err(err(
                        &format!("cascade.{stage}.base_url"),
                        format!("`{}` is not an http(s) URL", e.base_url),
                        "use e.g. http://127.0.0.1:11434",
                    ));
                }
                if e.model.trim().is_empty() {
                    return Err(err(&format!("cascade.{stage}.model"), "empty", "name the server's model"));
                }
                if let Some(f) = &e.format
                    && f != "pcm"
                    && f != "wav"
                {
                    return Err(err(&format!("cascade.{stage}.format"), format!("`{f}`"), "use pcm or wav"));
                }
            }
            let local = self.cascade.local_fallback && cfg!(feature = "local");
            if self.provider.as_deref() == Some("cascade") && list.is_empty() && !local {
                return Err(err(
                    &format!("cascade.{stage}"),
                    "no server configured and no offline fallback",
                    format!("add a [[cascade.{stage}]] server (or KOTODAMA_{}_URL)", stage.to_uppercase()),
                ));
            }
        }
        if self.cascade.timeout_ms < 100 {
            return Err(err("cascade.timeout_ms", "below 100 ms", "use e.g. 10000"));
        }
        if self.local.max_decoders == 0 {
            return Err(err("local.max_decoders", "zero", "use at least 1"));
        }
        if self.local.token_budget < 200 {
            return Err(err("local.token_budget", "below 200 tokens", "use e.g. 2000"));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.characters {
            let builtin = crate::providers::tools::ToolRegistry::builtin();
            if let Some(t) = c.tools.iter().flatten().find(|t| !builtin.contains(t)) {
                return Err(err(
                    "characters.tools",
                    format!("character `{}` lists unknown tool `{t}`", c.id),
                    format!("use tools from: {}", builtin.names().join(", ")),
                ));
            }
            if let Some(p) = c.providers.iter().find(|p| !KNOWN_PROVIDERS.contains(&p.as_str())) {
                return Err(err(
                    "characters.providers",
                    format!("character `{}` lists unknown provider `{p}`", c.id),
                    format!("use providers from: {}", KNOWN_PROVIDERS.join(", ")),
                ));
            }
            if let Err(problem) = crate::providers::cascade::viseme_overrides(&c.visemes) {
                return Err(err(&format!("characters.{}.visemes", c.id), problem, "fix the viseme name"));
            }
            if c.id.is_empty() || !c.id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
                return Err(err(
                    "characters.id",
                    format!("`{}` is not a valid id", c.id),
                    "use letters, digits, - and _",
                ));
            }
            for emotion in c.expressions.keys() {
                if !signaling::events::Emotion::KNOWN.iter().any(|e| e.as_str() == emotion) {
                    return Err(err(
                        "characters.expressions",
                        format!("`{emotion}` (character `{}`) is not an emotion of the documented set", c.id),
                        "use neutral, happy, sad, angry, surprised, fearful, disgusted, thinking or relaxed",
                    ));
                }
            }
            if let Some(p) = &c.provider
                && !KNOWN_PROVIDERS.contains(&p.as_str())
            {
                return Err(err(
                    "characters.provider",
                    format!("character `{}` prefers provider `{p}`, which this build does not have", c.id),
                    format!("use one of: {}", KNOWN_PROVIDERS.join(", ")),
                ));
            }
            if !seen.insert(c.id.clone()) {
                return Err(err(
                    "characters.id",
                    format!("`{}` appears twice", c.id),
                    "give each character its own id",
                ));
            }
        }
        Ok(())
    }

    /// Whether the OpenAI provider has what it needs to be offered (a key, or a non-OpenAI URL
    /// such as a self-hosted compatible server).
    pub fn openai_configured(&self) -> bool {
        self.openai.api_key.as_ref().is_some_and(|k| !k.is_empty()) || !self.openai.url.contains("api.openai.com")
    }

    fn validate_openai(&self) -> Result<(), ConfigError> {
        let o = &self.openai;
        if !(o.url.starts_with("wss://") || o.url.starts_with("ws://")) {
            return Err(err(
                "openai.url",
                format!("`{}` is not a WebSocket URL", o.url),
                "use wss://host/path (OPENAI_REALTIME_URL)",
            ));
        }
        if !self.openai_configured() {
            return Err(err(
                "OPENAI_API_KEY",
                "the openai provider is selected but no API key is set",
                "set OPENAI_API_KEY (or openai.api_key), or KOTODAMA_PROVIDER=scripted",
            ));
        }
        if o.model.trim().is_empty() {
            return Err(err(
                "openai.model",
                "empty",
                "set a realtime model, e.g. gpt-realtime (OPENAI_REALTIME_MODEL)",
            ));
        }
        if !matches!(o.input_rate_hz, 16_000 | 24_000) {
            return Err(err(
                "openai.input_rate_hz",
                format!("{} Hz", o.input_rate_hz),
                "use 24000 (OpenAI) or 16000 (Qwen-Omni)",
            ));
        }
        if o.max_session_secs < 60 {
            return Err(err("openai.max_session_secs", "below 60 s", "use 60..=3600 (OpenAI ends sessions at 60 min)"));
        }
        Ok(())
    }

    /// The media UDP port range, if configured.
    pub fn udp_port_range(&self) -> Result<Option<(u16, u16)>, ConfigError> {
        let Some(spec) = &self.media.udp_ports else { return Ok(None) };
        let bad =
            || err("media.udp_ports", format!("`{spec}` is not a range"), "use e.g. 40000-40999 (KOTODAMA_UDP_PORTS)");
        let (a, b) = spec.split_once('-').ok_or_else(bad)?;
        let (min, max): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(Some((min, max)))
    }

    /// The provider for new sessions.
    pub fn provider_name(&self) -> &str {
        self.provider.as_deref().unwrap_or(DEFAULT_PROVIDER)
    }

    /// The address put in ICE candidates.
    pub fn advertised_ip(&self) -> IpAddr {
        match self.public_ip {
            Some(ip) => ip,
            None if self.bind.ip().is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            None => self.bind.ip(),
        }
    }

    /// Configured characters, or the built-in one.
    pub fn characters(&self) -> Vec<Character> {
        if !self.characters.is_empty() {
            return self.characters.clone();
        }
        vec![Character {
            id: "aiko".into(),
            name: "Aiko".into(),
            language: default_language(),
            voice: default_voice(),
            persona: "You are Aiko, a cheerful and curious companion. Speak briefly and warmly.".into(),
            expressions: Default::default(),
            greeting: None,
            providers: Vec::new(),
            tools: None,
            visemes: Default::default(),
            avatar: None,
            provider: None,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn defaults_validate_and_run_offline_on_loopback() {
        let c = Config::default();
        c.validate().expect("defaults must be valid");
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.provider_name(), DEFAULT_PROVIDER);
        assert_eq!(DEFAULT_PROVIDER, if cfg!(feature = "local") { "local" } else { "scripted" });
        assert_eq!(c.advertised_ip().to_string(), "127.0.0.1");
    }

    #[test]
    fn public_bind_without_api_key_is_refused_naming_the_key() {
        let mut c = Config::default();
        c.apply_env(env(&[("KOTODAMA_BIND", "0.0.0.0:8080")])).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "KOTODAMA_API_KEYS");
        assert!(e.to_string().contains("KOTODAMA_API_KEYS="), "{e}");
    }

    #[test]
    fn bad_bind_names_the_variable() {
        let mut c = Config::default();
        let e = c.apply_env(env(&[("KOTODAMA_BIND", "localhost")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_BIND");
    }

    #[test]
    fn unknown_toml_key_is_named() {
        let e = Config::from_toml("bnid = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.problem.contains("bnid"), "{e}");
    }

    #[test]
    fn openai_key_alone_selects_openai() {
        let mut c = Config::default();
        c.apply_env(env(&[("OPENAI_API_KEY", "sk-test")])).unwrap();
        assert_eq!(c.provider.as_deref(), Some("openai"));
        c.validate().unwrap();
        assert_eq!(c.openai.api_key.as_ref().map(Secret::expose), Some("sk-test"));
        assert!(!format!("{c:?}").contains("sk-test"), "the key never shows in Debug output");
        assert_eq!(c.openai.full_url(), "wss://api.openai.com/v1/realtime?model=gpt-realtime");
    }

    #[test]
    fn openai_env_overrides_url_and_model() {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("OPENAI_API_KEY", "k"),
            ("OPENAI_REALTIME_URL", "wss://example.test/v1/realtime"),
            ("OPENAI_REALTIME_MODEL", "gpt-realtime-mini"),
        ]))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.openai.full_url(), "wss://example.test/v1/realtime?model=gpt-realtime-mini");
    }

    #[test]
    fn openai_selected_without_key_names_the_variable() {
        let mut c = Config::default();
        c.apply_env(env(&[("KOTODAMA_PROVIDER", "openai")])).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "OPENAI_API_KEY");
        let mut c = Config::from_toml("[openai]\napi_key = \"k\"\ninput_rate_hz = 44100\n").unwrap();
        c.provider = Some("openai".into());
        assert_eq!(c.validate().unwrap_err().key, "openai.input_rate_hz");
        let c = Config::from_toml("[openai]\ndialect = \"beta\"\nturn_detection = \"semantic_vad\"\n").unwrap();
        assert_eq!(c.openai.dialect, crate::providers::openai::protocol::Dialect::Beta);
        assert!(Config::from_toml("[openai]\nturn_detection = \"magic\"\n").is_err());
    }

    #[test]
    fn the_readme_example_configuration_parses_and_validates() {
        let readme = include_str!("../README.md");
        let start = readme.find("# kotodama.toml").expect("README has the example");
        let end = start + readme[start..].find("```").expect("the example block ends");
        let c = Config::from_toml(&readme[start..end]).unwrap_or_else(|e| panic!("README example: {e}"));
        c.validate().unwrap();
        assert_eq!(c.resilience.reply_timeout_ms, 15_000);
        assert_eq!(c.openai.turn_detection, crate::providers::openai::protocol::TurnDetection::ServerVad);
    }

    #[test]
    fn character_provider_lists_must_name_known_providers() {
        let c = Config::from_toml("[[characters]]\nid = \"a\"\nname = \"A\"\nproviders = [\"scripted\", \"nope\"]\n")
            .unwrap();
        assert_eq!(c.validate().unwrap_err().key, "characters.providers");
        let c =
            Config::from_toml("[[characters]]\nid = \"a\"\nname = \"A\"\ntools = [\"get_time\", \"nuke\"]\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "characters.tools");
    }

    #[test]
    fn udp_port_range_is_parsed_and_must_hold_max_sessions() {
        let mut c = Config::default();
        c.apply_env(env(&[("KOTODAMA_UDP_PORTS", "40000-40999")])).unwrap();
        assert_eq!(c.udp_port_range().unwrap(), Some((40000, 40999)));
        c.validate().unwrap();
        c.session.max_sessions = 5000;
        assert_eq!(c.validate().unwrap_err().key, "media.udp_ports");
        c.media.udp_ports = Some("9-1".into());
        assert_eq!(c.udp_port_range().unwrap_err().key, "media.udp_ports");
    }

    #[test]
    fn character_expressions_must_name_documented_emotions() {
        let ok = "[[characters]]\nid = \"mika\"\nname = \"Mika\"\nexpressions = { happy = \"grin\", sad = \"pout\" }\n";
        let c = Config::from_toml(ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.characters()[0].expressions["happy"], "grin");
        let bad = "[[characters]]\nid = \"mika\"\nname = \"Mika\"\nexpressions = { hungry = \"x\" }\n";
        let e = Config::from_toml(bad).unwrap().validate().unwrap_err();
        assert_eq!(e.key, "characters.expressions");
        assert!(e.to_string().contains("hungry"), "{e}");
    }

    #[test]
    fn bad_viseme_override_names_the_character() {
        let c = Config::from_toml(
            "[[characters]]\nid = \"mio\"\nname = \"Mio\"\nvisemes = { h = \"sil\", p = \"lips\" }\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "characters.mio.visemes");
        assert!(e.problem.contains("lips"), "{e}");
    }

    #[test]
    fn llm_url_selects_the_cascade_and_needs_a_model() {
        let mut c = Config::default();
        let e = c.apply_env(env(&[("KOTODAMA_LLM_URL", "http://127.0.0.1:11434")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_LLM_MODEL");
        let mut c = Config::default();
        c.apply_env(env(&[("KOTODAMA_LLM_URL", "http://127.0.0.1:11434"), ("KOTODAMA_LLM_MODEL", "llama3")])).unwrap();
        assert_eq!(c.provider_name(), "cascade");
        assert_eq!(c.cascade.llm[0].model, "llama3");
        c.validate().unwrap();
        c.cascade.llm[0].base_url = "ftp://x".into();
        assert_eq!(c.validate().unwrap_err().key, "cascade.llm.base_url");
        assert!(
            !format!("{:?}", EndpointSettings { api_key: Some("sk-x".into()), ..c.cascade.llm[0].clone() })
                .contains("sk-x")
        );
    }

    #[test]
    fn env_overrides_toml() {
        let mut c = Config::from_toml("bind = \"127.0.0.1:9000\"\n[media]\nvad_mode = 3\n").unwrap();
        c.apply_env(env(&[("KOTODAMA_BIND", "127.0.0.1:9100")])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.bind.port(), 9100);
        assert_eq!(c.media.vad_mode, 3);
    }
}
