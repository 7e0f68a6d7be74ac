//! `[openai]` (struct: [`OpenAiSettings`], beside its provider): the `OPENAI_*` environment and
//! the checks made when a session may use the `openai` provider.

use super::{ConfigError, Section, env, err, require_scheme};
use crate::providers::openai::{OpenAiSettings, Secret};

impl OpenAiSettings {
    /// Whether the provider has what it needs to be offered (a key, or a non-OpenAI URL such as a
    /// self-hosted compatible server).
    pub fn configured(&self) -> bool {
        self.api_key.as_ref().is_some_and(|k| !k.is_empty()) || !self.url.contains("api.openai.com")
    }

    /// The checks made when the provider is selected or listed by a character.
    pub fn validate_selected(&self) -> Result<(), ConfigError> {
        require_scheme(&self.url, &["wss://", "ws://"], || {
            let problem = format!("`{}` is not a WebSocket URL", self.url);
            err("openai.url", problem, "use wss://host/path (OPENAI_REALTIME_URL)")
        })?;
        if !self.configured() {
            return Err(err(
                "OPENAI_API_KEY",
                "the openai provider is selected but no API key is set",
                "set OPENAI_API_KEY (or openai.api_key), or KOTODAMA_PROVIDER=scripted",
            ));
        }
        if self.model.trim().is_empty() {
            return Err(err(
                "openai.model",
                "empty",
                "set a realtime model, e.g. gpt-realtime (OPENAI_REALTIME_MODEL)",
            ));
        }
        if !matches!(self.input_rate_hz, 16_000 | 24_000) {
            return Err(err(
                "openai.input_rate_hz",
                format!("{} Hz", self.input_rate_hz),
                "use 24000 (OpenAI) or 16000 (Qwen-Omni)",
            ));
        }
        if self.max_session_secs < 60 {
            return Err(err("openai.max_session_secs", "below 60 s", "use 60..=3600 (OpenAI ends sessions at 60 min)"));
        }
        Ok(())
    }
}

/// Nothing is checked unless a session may use the provider ([`OpenAiSettings::validate_selected`]).
impl Section for OpenAiSettings {
    /// `OPENAI_API_KEY`, `OPENAI_REALTIME_URL`, `OPENAI_REALTIME_MODEL`.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env::value(get, "OPENAI_API_KEY") {
            self.api_key = Some(Secret::new(v));
        }
        if let Some(v) = env::value(get, "OPENAI_REALTIME_URL") {
            self.url = v;
        }
        if let Some(v) = env::value(get, "OPENAI_REALTIME_MODEL") {
            self.model = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::from_env;
    use super::*;

    #[test]
    fn openai_key_alone_selects_openai() {
        let c = from_env(&[("OPENAI_API_KEY", "sk-test")]);
        assert_eq!(c.provider.as_deref(), Some("openai"));
        c.validate().unwrap();
        assert_eq!(c.openai.api_key.as_ref().map(Secret::expose), Some("sk-test"));
        assert!(!format!("{c:?}").contains("sk-test"), "the key never shows in Debug output");
        assert_eq!(c.openai.full_url(), "wss://api.openai.com/v1/realtime?model=gpt-realtime");
    }

    #[test]
    fn openai_env_overrides_url_and_model() {
        let c = from_env(&[
            ("OPENAI_API_KEY", "k"),
            ("OPENAI_REALTIME_URL", "wss://example.test/v1/realtime"),
            ("OPENAI_REALTIME_MODEL", "gpt-realtime-mini"),
        ]);
        c.validate().unwrap();
        assert_eq!(c.openai.full_url(), "wss://example.test/v1/realtime?model=gpt-realtime-mini");
    }

    #[test]
    fn openai_selected_without_key_names_the_variable() {
        assert_eq!(from_env(&[("KOTODAMA_PROVIDER", "openai")]).validate().unwrap_err().key, "OPENAI_API_KEY");
        let mut c = Config::from_toml("[openai]\napi_key = \"k\"\ninput_rate_hz = 44100\n").unwrap();
        c.provider = Some("openai".into());
        assert_eq!(c.validate().unwrap_err().key, "openai.input_rate_hz");
        let c = Config::from_toml("[openai]\ndialect = \"beta\"\nturn_detection = \"semantic_vad\"\n").unwrap();
        assert_eq!(c.openai.dialect, crate::providers::openai::protocol::Dialect::Beta);
        assert!(Config::from_toml("[openai]\nturn_detection = \"magic\"\n").is_err());
    }
}
