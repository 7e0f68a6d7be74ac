//! The provider table: every provider this build has, by name, with the checks of its settings
//! and its constructor. It is the one list of provider names: configuration checks
//! (`KOTODAMA_PROVIDER`, a character's `providers`), the default provider and the providers a
//! node offers all read it.
//!
//! A new provider is one [`ProviderEntry`] in [`PROVIDERS`] (and its settings section in
//! [`crate::config`]); nothing else names it.

use std::sync::Arc;
use std::time::Duration;

use super::RealtimeProvider;
use super::cascade::{CascadeConfig, CascadeProvider};
use super::scripted::{ScriptedConfig, ScriptedProvider};
use crate::config::{Config, ConfigError, EndpointSettings, err};

/// A built provider, or why it could not be built.
pub type BuildResult = Result<Arc<dyn RealtimeProvider>, ProviderSetupError>;

/// One provider: its API name, when a node offers it, the checks of its settings, its constructor.
pub struct ProviderEntry {
    /// The name in the API and the configuration (`scripted`, `openai`, ...).
    pub name: &'static str,
    /// Whether a node with this configuration offers the provider (a session may name it).
    pub offered: fn(&Config) -> bool,
    /// Checks of its settings, made when the provider is selected or a character lists it.
    pub validate: fn(&Config) -> Result<(), ConfigError>,
    /// Builds it; `built` holds what earlier rows made (the offline engines the HTTP cascade
    /// falls back to).
    pub build: fn(&Config, &mut Built) -> BuildResult,
}

/// What the rows built so far share with the next ones.
#[derive(Default)]
pub struct Built {
    /// The offline stages, once the `local` row has loaded them.
    pub local: Option<CascadeConfig>,
}

/// A provider that could not be built at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderSetupError {
    /// The provider refused its configuration.
    #[error("provider `{name}` ({keys}): {source}")]
    Provider {
        /// The provider.
        name: &'static str,
        /// The configuration keys it reads.
        keys: &'static str,
        /// Why.
        source: super::ProviderError,
    },
    /// The offline engines could not be loaded (a missing package or model).
    #[error("the offline engines (provider `local`; local.*): {0}")]
    Engines(#[from] super::cascade::error::StageError),
}

fn never(_: &Config) -> Result<(), ConfigError> {
    Ok(())
}

fn always(_: &Config) -> bool {
    true
}

/// Every provider of this build, in the order a node builds them.
pub const PROVIDERS: &[ProviderEntry] = &[
    ProviderEntry { name: "scripted", offered: always, validate: never, build: build_scripted },
    ProviderEntry {
        name: "openai",
        offered: |c| c.openai.configured(),
        validate: |c| c.openai.validate_selected(),
        build: |c, _| Ok(Arc::new(super::openai::OpenAiProvider::new(c.openai.clone()))),
    },
    ProviderEntry {
        name: "gemini",
        offered: |c| c.gemini.configured(),
        validate: |c| c.gemini.validate(),
        build: |c, _| Ok(Arc::new(super::gemini::GeminiProvider::new(c.gemini.clone()))),
    },
    // Built only where a session may use it: its constructor resolves AWS credentials.
    #[cfg(feature = "nova-sonic")]
    ProviderEntry {
        name: "nova_sonic",
        offered: |c| c.uses_provider("nova_sonic"),
        validate: |c| c.nova_sonic.validate(),
        build: |c, _| Ok(Arc::new(super::nova_sonic::NovaSonicProvider::new(c.nova_sonic.clone()))),
    },
    #[cfg(feature = "local")]
    ProviderEntry { name: "local", offered: always, validate: never, build: build_local },
    ProviderEntry {
        name: "cascade",
        offered: |c| c.cascade.configured() || c.provider_name() == "cascade",
        validate: |c| if c.provider_name() == "cascade" { c.cascade.validate_selected() } else { Ok(()) },
        build: build_http_cascade,
    },
];

/// Names of the providers this build knows, in table order.
pub fn known_names() -> Vec<&'static str> {
    PROVIDERS.iter().map(|p| p.name).collect()
}

/// The provider used when none is configured: the offline cascade when this build has it.
pub const DEFAULT_PROVIDER: &str = if cfg!(feature = "local") { "local" } else { "scripted" };

/// The row of `name`.
pub fn entry(name: &str) -> Option<&'static ProviderEntry> {
    PROVIDERS.iter().find(|p| p.name == name)
}

/// Environment that selects a provider when `KOTODAMA_PROVIDER` is unset: a cascade server
/// (`KOTODAMA_*_URL`) selects `cascade`, else `OPENAI_API_KEY` alone selects `openai` (the
/// contract), else `GEMINI_API_KEY` alone selects `gemini`. `KOTODAMA_PROVIDER` itself is read
/// here too.
pub fn select_from_env(c: &mut Config, get: &dyn Fn(&str) -> Option<String>) {
    if let Some(p) = crate::config::env::value(get, "KOTODAMA_PROVIDER") {
        c.provider = Some(p);
    }
    if c.provider.is_none() && c.cascade.configured() {
        c.provider = Some("cascade".into());
    }
    if c.provider.is_none() && crate::config::env::value(get, "OPENAI_API_KEY").is_some() {
        c.provider = Some("openai".into());
    }
    if c.provider.is_none() && crate::config::env::value(get, "GEMINI_API_KEY").is_some() {
        c.provider = Some("gemini".into());
    }
}

/// The configured provider exists in this build, and every provider a session may use has
/// valid settings.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    if let Some(p) = &c.provider
        && entry(p).is_none()
    {
        return Err(err(
            "KOTODAMA_PROVIDER",
            format!("provider `{p}` is not available in this build (known: {})", known_names().join(", ")),
            "set KOTODAMA_PROVIDER to one of the known providers",
        ));
    }
    PROVIDERS.iter().filter(|p| c.uses_provider(p.name)).try_for_each(|p| (p.validate)(c))
}

/// The providers a node with this configuration offers. The offline engines are loaded here,
/// before the server listens, so a missing model fails the start with the package to install.
pub fn build_all(c: &Config) -> Result<Vec<Arc<dyn RealtimeProvider>>, ProviderSetupError> {
    let mut built = Built::default();
    PROVIDERS.iter().filter(|p| (p.offered)(c)).map(|p| (p.build)(c, &mut built)).collect()
}

fn build_scripted(c: &Config, _: &mut Built) -> BuildResult {
    let mut script = ScriptedConfig::builtin().map_err(setup_error("scripted", "scripted.*"))?;
    script.response_delay = Duration::from_millis(c.scripted.response_delay_ms);
    if let Some(ms) = c.scripted.reply_ms {
        let len = Duration::from_millis(ms);
        script.replies = script.replies.into_iter().map(|r| r.truncated(len)).collect();
    }
    Ok(Arc::new(ScriptedProvider::new(script)))
}

#[cfg(feature = "local")]
fn build_local(c: &Config, built: &mut Built) -> BuildResult {
    use super::cascade::local;
    let settings =
        local::LocalSettings { sphinx_model_dir: c.local.sphinx_model_dir.clone(), max_decoders: c.local.max_decoders };
    let mut cascade = local::stages(&settings)?.cascade("local");
    cascade.token_budget = c.local.token_budget;
    let provider = CascadeProvider::new(cascade.clone_stages()).map_err(setup_error("local", "local.*"))?;
    built.local = Some(cascade);
    Ok(Arc::new(provider))
}

/// The `cascade` provider: the configured servers, then (local_fallback) the offline engines.
fn build_http_cascade(c: &Config, built: &mut Built) -> BuildResult {
    use super::cascade::openai::{OpenAiChat, OpenAiSpeech, OpenAiStt, client};
    let s = &c.cascade;
    let http = client();
    let endpoint = |e: &EndpointSettings| endpoint(e, Duration::from_millis(s.timeout_ms));
    let language = c.characters().first().map(|ch| ch.language.split('-').next().unwrap_or("en").to_owned());
    let mut cfg = CascadeConfig {
        name: "cascade".into(),
        stt: s.stt.iter().map(|e| Arc::new(OpenAiStt::new(endpoint(e), http.clone(), language.clone())) as _).collect(),
        llm: s.llm.iter().map(|e| Arc::new(OpenAiChat::new(endpoint(e), http.clone())) as _).collect(),
        tts: s.tts.iter().map(|e| Arc::new(OpenAiSpeech::new(endpoint(e), http.clone())) as _).collect(),
        token_budget: c.local.token_budget,
        max_reply_tokens: 300,
    };
    if s.local_fallback
        && let Some(l) = &built.local
    {
        cfg.stt.extend(l.stt.iter().cloned());
        cfg.llm.extend(l.llm.iter().cloned());
        cfg.tts.extend(l.tts.iter().cloned());
    }
    Ok(Arc::new(CascadeProvider::new(cfg).map_err(setup_error("cascade", "cascade.*"))?))
}

fn endpoint(e: &EndpointSettings, timeout: Duration) -> super::cascade::openai::Endpoint {
    let mut ep = super::cascade::openai::Endpoint::new(&e.base_url, &e.model);
    ep.api_key = e.api_key.as_ref().map(|k| k.expose().to_owned());
    ep.voice = e.voice.clone();
    ep.audio_format = e.format.clone().unwrap_or_else(|| "pcm".into());
    ep.pcm_rate_hz = e.sample_rate.unwrap_or(24_000);
    ep.timeout = timeout;
    ep
}

fn setup_error(name: &'static str, keys: &'static str) -> impl Fn(super::ProviderError) -> ProviderSetupError {
    move |source| ProviderSetupError::Provider { name, keys, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_provider_is_in_the_table() {
        let local = cfg!(feature = "local");
        assert_eq!(known_names().contains(&"local"), local, "`local` exactly when the build has the engines");
        assert!(entry(DEFAULT_PROVIDER).is_some(), "the default provider is in the table");
    }

    #[test]
    fn a_node_offers_scripted_always_and_openai_only_with_a_key() {
        let mut c = Config::default();
        let offered = |c: &Config| PROVIDERS.iter().filter(|p| (p.offered)(c)).map(|p| p.name).collect::<Vec<_>>();
        assert!(offered(&c).contains(&"scripted"));
        assert!(!offered(&c).contains(&"openai"));
        c.openai.api_key = Some(crate::config::Secret::new("k"));
        assert!(offered(&c).contains(&"openai"));
    }
}
