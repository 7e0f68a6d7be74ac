//! Configuration: `kotodama.toml` (optional) overridden by environment variables, validated at
//! start. Every error names the key and the fix; the defaults run offline on one machine.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    /// Characters offered by `GET /v1/characters` (a built-in one when empty).
    pub characters: Vec<Character>,
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

/// A character.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
            characters: Vec::new(),
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
            opus_complexity: 5,
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
pub const KNOWN_PROVIDERS: &[&str] = &["scripted"];

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
            // The contract says OPENAI_API_KEY alone selects OpenAI Realtime. That provider is not in
            // this build yet, so say so plainly rather than silently answering with another one.
            self.provider = Some("openai".into());
        }
        Ok(())
    }

    /// Check everything that can be checked before binding sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.bind.ip().is_loopback() && self.api_keys.is_empty() {
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
                "set KOTODAMA_PROVIDER=scripted (or unset OPENAI_API_KEY until the OpenAI provider lands)",
            ));
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
        let mut seen = std::collections::HashSet::new();
        for c in &self.characters {
            if c.id.is_empty() || !c.id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
                return Err(err(
                    "characters.id",
                    format!("`{}` is not a valid id", c.id),
                    "use letters, digits, - and _",
                ));
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
        self.provider.as_deref().unwrap_or("scripted")
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
        assert_eq!(c.provider_name(), "scripted");
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
    fn openai_key_alone_selects_openai_which_this_build_reports_missing() {
        let mut c = Config::default();
        c.apply_env(env(&[("OPENAI_API_KEY", "sk-test")])).unwrap();
        assert_eq!(c.provider.as_deref(), Some("openai"));
        assert_eq!(c.validate().unwrap_err().key, "KOTODAMA_PROVIDER");
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
    fn env_overrides_toml() {
        let mut c = Config::from_toml("bind = \"127.0.0.1:9000\"\n[media]\nvad_mode = 3\n").unwrap();
        c.apply_env(env(&[("KOTODAMA_BIND", "127.0.0.1:9100")])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.bind.port(), 9100);
        assert_eq!(c.media.vad_mode, 3);
    }
}
