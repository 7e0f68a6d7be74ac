//! Sections whose structs live with the code they configure: `[http]` ([`crate::http_server`]),
//! `[gemini]` and `[nova_sonic]` (the speech-to-speech providers). The providers' structs live
//! with their providers ([`crate::providers::gemini`], [`crate::providers::nova_sonic`]); their
//! checks run through the provider table, only when a session may use the provider.

use super::{ConfigError, Section};
use crate::http_server::HttpSettings;
use crate::providers::gemini::GeminiSettings;
use crate::providers::nova_sonic::NovaSonicSettings;

impl Section for HttpSettings {
    /// `KOTODAMA_HTTP_MAX_CONNECTIONS`, `KOTODAMA_HTTP_HEADER_TIMEOUT_SECS`, `KOTODAMA_HTTP_IDLE_TIMEOUT_SECS`.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        HttpSettings::apply_env(self, get)
    }
    fn validate(&self) -> Result<(), ConfigError> {
        HttpSettings::validate(self)
    }
}

impl Section for super::OidcSettings {
    /// `KOTODAMA_OIDC_*`.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        super::OidcSettings::apply_env(self, &get)
    }
    fn validate(&self) -> Result<(), ConfigError> {
        super::OidcSettings::validate(self)
    }
}

impl Section for super::ModerationSettings {
    /// `KOTODAMA_MODERATION_DENY`.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        super::ModerationSettings::apply_env(self, &get)
    }
    fn validate(&self) -> Result<(), ConfigError> {
        super::ModerationSettings::validate(self)
    }
}

impl Section for GeminiSettings {
    /// `GEMINI_API_KEY`, `GEMINI_LIVE_URL`, `GEMINI_LIVE_MODEL`.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        GeminiSettings::apply_env(self, get);
        Ok(())
    }
}

impl Section for NovaSonicSettings {
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`); the rest of the AWS environment is the SDK's.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        NovaSonicSettings::apply_env(self, get);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::env;

    #[test]
    fn gemini_key_alone_selects_gemini_and_a_missing_key_is_named() {
        let mut c = Config::default();
        c.apply_env(env(&[("GEMINI_API_KEY", "AIza-test")])).unwrap();
        assert_eq!(c.provider.as_deref(), Some("gemini"));
        c.validate().unwrap();
        let mut c = Config::default();
        c.apply_env(env(&[("GEMINI_API_KEY", "AIza-test"), ("OPENAI_API_KEY", "sk-test")])).unwrap();
        assert_eq!(c.provider.as_deref(), Some("openai"), "OpenAI keeps its place when both keys are set");
        let mut c = Config::default();
        c.apply_env(env(&[("KOTODAMA_PROVIDER", "gemini")])).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "GEMINI_API_KEY");
        let mut c = Config::from_toml("[gemini]\napi_key = \"k\"\nvoice = \"Nobody\"\n").unwrap();
        c.provider = Some("gemini".into());
        assert_eq!(c.validate().unwrap_err().key, "gemini.voice");
    }

    #[test]
    fn a_voice_for_an_unknown_provider_is_named() {
        let c = Config::from_toml("[[characters]]\nid = \"a\"\nname = \"A\"\nvoices = { gemni = \"Puck\" }\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "characters.voices");
        let c =
            Config::from_toml("[[characters]]\nid = \"a\"\nname = \"A\"\nvoices = { gemini = \"Puck\" }\n").unwrap();
        assert_eq!(c.characters[0].voices["gemini"], "Puck");
    }
}
