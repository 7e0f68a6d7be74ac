//! Configuration: `kotodama.toml` (optional) overridden by environment variables, validated at
//! start. Every error names the key and the fix; the defaults run offline on one machine.
//!
//! # One file per section
//!
//! Each section of the file owns, in its own module, its struct, its defaults, its environment
//! keys and its checks, in one shape:
//!
//! ```ignore
//! #[derive(Debug, Clone, Deserialize)]
//! #[serde(deny_unknown_fields, default)]
//! pub struct TurnSettings { /* fields, each with its unit and env key in the doc line */ }
//!
//! impl Default for TurnSettings { fn default() -> Self { /* offline defaults */ } }
//!
//! impl Section for TurnSettings {
//!     fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> { .. }
//!     fn validate(&self) -> Result<(), ConfigError> { .. }
//! }
//! ```
//!
//! A new section plugs in with a field on [`Config`] (`pub turn: TurnSettings`, default
//! `TurnSettings::default()`) and one line in each of `Config::sections` and
//! `Config::sections_mut` (`&self.turn`, `&mut self.turn`); nothing else here changes.
//! [`env::value`], [`env::parse`] and [`env::list`] read a variable (blank = unset) and turn a
//! bad value into a [`ConfigError`] naming the variable; [`require_scheme`] checks a URL key.
//! Checks that span sections (a UDP range that must hold `session.max_sessions`) live in
//! `Config::validate_across_sections`. A provider's own section is checked by its row of the
//! provider table ([`crate::providers::table`]) only when a session may use the provider; the row
//! also says when a node offers the provider and how to build it.
//!
//! The top-level keys (`bind`, `api_keys`, `database_url`, ...) stay top-level in the file and
//! are grouped by concern: [`node`] (addresses), [`auth`] (API keys and session tokens),
//! [`storage`] (SQL and Redis).

pub mod auth;
pub mod budget;
pub mod cascade;
pub mod characters;
pub mod cluster;
pub mod elsewhere;
pub mod env;
pub mod local;
pub mod media;
pub mod memory;
pub mod moderation;
pub mod node;
mod oidc;
pub mod openai;
pub mod recording;
pub mod resilience;
pub mod scripted;
pub mod session;
pub mod storage;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::cascade::{CascadeSettings, EndpointSettings};
pub use self::characters::Character;
pub use self::cluster::{ClusterSettings, Placement};
pub use self::local::LocalSettings;
pub use self::media::{MediaSettings, PeerDriver};
pub use self::memory::MemorySettings;
pub use self::moderation::{CharacterModeration, ModerationSettings};
pub use self::oidc::OidcSettings;
pub use self::recording::RecordingSettings;
pub use self::resilience::ResilienceSettings;
pub use self::scripted::ScriptedSettings;
pub use self::session::SessionLimits;
pub use crate::providers::openai::{OpenAiSettings, Secret};
pub use crate::providers::table::DEFAULT_PROVIDER;
pub use signaling::token_keys::{PreviousTokenKey, TokenSettings};

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

/// A [`ConfigError`] for `key`.
pub fn err(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), problem: problem.into(), fix: fix.into() }
}

impl ConfigError {
    /// The error for `key`: what is wrong and what to do (same as [`err`]).
    pub fn new(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        err(key, problem, fix)
    }
}

/// `http://` or `https://`.
pub const HTTP_SCHEMES: &[&str] = &["http://", "https://"];

/// `Ok` when `url` starts with one of `schemes`, else the error `error` makes.
pub fn require_scheme(url: &str, schemes: &[&str], error: impl FnOnce() -> ConfigError) -> Result<(), ConfigError> {
    if schemes.iter().any(|s| url.starts_with(s)) { Ok(()) } else { Err(error()) }
}

/// `Ok` when `value` lies in `range`, else the error for `key`: "`value` is out of range" and
/// `fix` (which says the range and why).
pub fn require_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    fix: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) { Ok(()) } else { Err(err(key, format!("{value} is out of range"), fix)) }
}

impl From<signaling::token_keys::TokenSettingsError> for ConfigError {
    fn from(e: signaling::token_keys::TokenSettingsError) -> Self {
        err(e.key, e.problem, e.fix)
    }
}

/// One section of the configuration: its environment overrides and its own checks.
pub trait Section {
    /// Apply this section's environment variables, read through `get` (the process environment
    /// at start, a table in tests). A bad value is an error naming the variable.
    fn apply_env(&mut self, _get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        Ok(())
    }
    /// Check what this section alone can check.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
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
    /// Directory of the store writer's journal (`KOTODAMA_JOURNAL_DIR`); default: `journal/`
    /// next to the SQLite file, or `data/journal` with Postgres ([`storage::journal_dir`]).
    pub journal_dir: Option<PathBuf>,
    /// Largest journal file in bytes (`KOTODAMA_JOURNAL_MAX_BYTES`, default 64 MiB).
    pub journal_max_bytes: u64,
    /// Store writes queued in memory before they spill to the journal (`KOTODAMA_STORE_QUEUE`,
    /// default 4096).
    pub store_queue: usize,
    /// The URL other nodes redirect clients to for this node's sessions
    /// (`KOTODAMA_ADVERTISE_URL`, e.g. `https://node-1.example.com`); default `http://<bind>`.
    pub advertise_url: Option<String>,
    /// This node's stable id in the store (`KOTODAMA_NODE_ID`); default: the advertised URL.
    /// A restarted node must keep its id so it can mark the sessions its crash left open.
    pub node_id: Option<String>,
    /// Directory of the web demo served at `/` (`KOTODAMA_WEB_DEMO_DIR`); unset: the demo built
    /// into the binary.
    pub web_demo_dir: Option<PathBuf>,
    /// Session limits.
    pub session: SessionLimits,
    /// Audio pipeline settings.
    pub media: MediaSettings,
    /// The scripted provider's settings.
    pub scripted: ScriptedSettings,
    /// The OpenAI Realtime provider's settings (`[openai]`, `OPENAI_*`).
    pub openai: OpenAiSettings,
    /// The Gemini Live provider's settings (`[gemini]`, `GEMINI_*`).
    pub gemini: crate::providers::gemini::GeminiSettings,
    /// The Amazon Nova Sonic provider's settings (`[nova_sonic]`; the AWS standard variables).
    pub nova_sonic: crate::providers::nova_sonic::NovaSonicSettings,
    /// Reconnect, recycling and failover of provider sessions.
    pub resilience: ResilienceSettings,
    /// The offline engines (provider `local`).
    pub local: LocalSettings,
    /// The HTTP cascade (provider `cascade`): OpenAI-compatible STT, LLM and TTS servers.
    pub cascade: CascadeSettings,
    /// Characters offered by `GET /v1/characters` (a built-in one when empty).
    pub characters: Vec<Character>,
    /// HTTP server limits (`[http]`, `KOTODAMA_HTTP_*`).
    pub http: crate::http_server::HttpSettings,
    /// STUN/TURN servers handed to clients (`[[turn]]`, `KOTODAMA_TURN_*`).
    pub turn: crate::turn_settings::TurnSettings,
    /// End-user sign-in with OpenID Connect (`[oidc]`, `KOTODAMA_OIDC_*`).
    pub oidc: OidcSettings,
    /// Moderation before speech (`[moderation]`, `KOTODAMA_MODERATION_DENY`).
    pub moderation: ModerationSettings,
    /// Long-term memory per user and character (`[memory]`, `KOTODAMA_MEMORY_*`).
    pub memory: MemorySettings,
    /// Budgets per session and per user per day (`[budget]`, `KOTODAMA_BUDGET_*`).
    pub budget: budget::BudgetLimits,
    /// Session recording for replay (`[recording]`, `KOTODAMA_RECORD`, `KOTODAMA_RECORDING_URL`).
    pub recording: RecordingSettings,
    /// Node heartbeats and placement of new sessions in a cluster (`[cluster]`, `KOTODAMA_CLUSTER_*`).
    pub cluster: ClusterSettings,
    /// Subtitles in the user's language (`[translation]`, `KOTODAMA_TRANSLATION_*`).
    pub translation: crate::translation::TranslationSettings,
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
            database_url: storage::DEFAULT_DATABASE_URL.into(),
            redis_url: None,
            redis_prefix: storage::DEFAULT_REDIS_PREFIX.into(),
            journal_dir: None,
            journal_max_bytes: crate::store::journal::DEFAULT_MAX_BYTES,
            store_queue: crate::store::writer::QUEUE_CAPACITY,
            advertise_url: None,
            node_id: None,
            web_demo_dir: None,
            session: SessionLimits::default(),
            media: MediaSettings::default(),
            scripted: ScriptedSettings::default(),
            openai: OpenAiSettings::default(),
            gemini: Default::default(),
            nova_sonic: Default::default(),
            resilience: ResilienceSettings::default(),
            local: LocalSettings::default(),
            cascade: CascadeSettings::default(),
            characters: Vec::new(),
            http: crate::http_server::HttpSettings::default(),
            turn: Default::default(),
            oidc: OidcSettings::default(),
            moderation: ModerationSettings::default(),
            memory: MemorySettings::default(),
            budget: budget::BudgetLimits::default(),
            recording: RecordingSettings::default(),
            cluster: ClusterSettings::default(),
            translation: Default::default(),
        }
    }
}

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

    /// The sections that validate themselves.
    fn sections(&self) -> Vec<&dyn Section> {
        vec![
            &self.media,
            &self.session,
            &self.scripted,
            &self.openai,
            &self.gemini,
            &self.nova_sonic,
            &self.resilience,
            &self.cascade,
            &self.local,
            &self.characters,
            &self.http,
            &self.oidc,
            &self.moderation,
            &self.memory,
            &self.budget,
            &self.recording,
            &self.cluster,
            &self.translation,
        ]
    }

    /// The sections that read their own environment variables (the same list as [`Self::sections`]).
    fn sections_mut(&mut self) -> Vec<&mut dyn Section> {
        vec![
            &mut self.media,
            &mut self.session,
            &mut self.scripted,
            &mut self.openai,
            &mut self.gemini,
            &mut self.nova_sonic,
            &mut self.resilience,
            &mut self.cascade,
            &mut self.local,
            &mut self.characters,
            &mut self.http,
            &mut self.oidc,
            &mut self.moderation,
            &mut self.memory,
            &mut self.budget,
            &mut self.recording,
            &mut self.cluster,
            &mut self.translation,
        ]
    }

    /// Apply `KOTODAMA_*` (and provider) environment overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        node::apply_env(self, &get)?;
        auth::apply_env(self, &get);
        storage::apply_env(self, &get)?;
        for section in self.sections_mut() {
            section.apply_env(&get)?;
        }
        crate::providers::table::select_from_env(self, &get);
        self.turn.apply_env(&get)?;
        crate::udp_mux::apply_env(&mut self.media, &get)?;
        Ok(())
    }

    /// Check everything that can be checked before binding sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        auth::validate(self)?;
        crate::providers::table::validate(self)?;
        storage::validate(self)?;
        node::validate(self)?;
        self.sections().into_iter().try_for_each(Section::validate)?;
        self.validate_across_sections()
    }

    /// Checks that need two sections.
    fn validate_across_sections(&self) -> Result<(), ConfigError> {
        // TURN credentials must outlive a session (coturn re-checks them on every refresh).
        self.turn.validate(self.session.max_duration(), self.session.token_ttl())?;
        crate::udp_mux::validate(self)?;
        if self.memory.enabled
            && self.memory.extractor() == memory::Extractor::Llm
            && self.memory.chat.is_none()
            && self.cascade.llm.is_empty()
        {
            return Err(err(
                "memory.extractor",
                "`llm` without a chat server",
                "set [memory.chat] (KOTODAMA_MEMORY_CHAT_URL) or a [[cascade.llm]] server, or use rules",
            ));
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
        Ok(())
    }

    /// Whether the OpenAI provider has what it needs to be offered (a key, or a non-OpenAI URL
    /// such as a self-hosted compatible server).
    pub fn openai_configured(&self) -> bool {
        self.openai.configured()
    }

    /// The media UDP port range, if configured.
    pub fn udp_port_range(&self) -> Result<Option<(u16, u16)>, ConfigError> {
        self.media.udp_port_range()
    }

    /// Whether new sessions or a character (its preferred provider or failover list) may use
    /// provider `name`.
    pub fn uses_provider(&self, name: &str) -> bool {
        self.provider.as_deref() == Some(name)
            || self
                .characters
                .iter()
                .any(|c| c.provider.as_deref() == Some(name) || c.providers.iter().any(|p| p == name))
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
        if self.characters.is_empty() { vec![Character::builtin()] } else { self.characters.clone() }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    /// The configuration of the README's example that starts at `marker` (up to the end of its
    /// code block), parsed and validated: the README's examples must work as printed.
    pub(crate) fn readme_example(marker: &str) -> Config {
        let readme = include_str!("../../README.md");
        let start = readme.find(marker).unwrap_or_else(|| panic!("README has the example `{marker}`"));
        let end = start + readme[start..].find("```").expect("the example block ends");
        let c = Config::from_toml(&readme[start..end]).unwrap_or_else(|e| panic!("README example: {e}"));
        c.validate().unwrap();
        c
    }

    /// The defaults with `pairs` applied as the environment.
    pub(crate) fn from_env(pairs: &'static [(&'static str, &'static str)]) -> Config {
        let mut c = Config::default();
        c.apply_env(env(pairs)).unwrap_or_else(|e| panic!("{e}"));
        c
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
    fn unknown_toml_key_is_named() {
        let e = Config::from_toml("bnid = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.problem.contains("bnid"), "{e}");
    }

    #[test]
    fn the_readme_example_configuration_parses_and_validates() {
        let c = readme_example("# kotodama.toml");
        assert_eq!(c.resilience.reply_timeout_ms, 15_000);
        assert_eq!(c.openai.turn_detection, crate::providers::openai::protocol::TurnDetection::ServerVad);
    }

    #[test]
    fn udp_port_range_is_parsed_and_must_hold_max_sessions() {
        let mut c = from_env(&[("KOTODAMA_UDP_PORTS", "40000-40999")]);
        assert_eq!(c.udp_port_range().unwrap(), Some((40000, 40999)));
        c.validate().unwrap();
        c.session.max_sessions = 5000;
        assert_eq!(c.validate().unwrap_err().key, "media.udp_ports");
        c.media.udp_ports = Some("9-1".into());
        assert_eq!(c.udp_port_range().unwrap_err().key, "media.udp_ports");
    }

    #[test]
    fn the_peer_driver_is_read_from_the_environment_and_the_loop_refuses_a_port_range() {
        assert_eq!(Config::default().media.peer_driver, PeerDriver::Task);
        let c = from_env(&[("KOTODAMA_PEER_DRIVER", "loop")]);
        assert_eq!(c.media.peer_driver, PeerDriver::Loop);
        c.validate().unwrap();
        let mut bad = Config::default();
        let e = bad.apply_env(env(&[("KOTODAMA_PEER_DRIVER", "threads")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_PEER_DRIVER");
        assert!(e.problem.contains("threads") && e.fix.contains("task or loop"), "{e:?}");
        let mut both = from_env(&[("KOTODAMA_PEER_DRIVER", "loop"), ("KOTODAMA_UDP_PORTS", "40000-40999")]);
        let e = both.validate().unwrap_err();
        assert!(e.key.contains("media.peer_driver") && e.key.contains("media.udp_ports"), "{e:?}");
        both.media.peer_driver = PeerDriver::Task;
        both.validate().unwrap();
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
