//! Settings of the `nova_sonic` provider: `[nova_sonic]` in kotodama.toml; the AWS standard
//! variables (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`) are read by the AWS
//! SDK's own loader at start. Validated at start with the key and the fix.

use std::time::Duration;

use super::protocol::Sensitivity;
use crate::config::{ConfigError, require_range};
use crate::providers::voices::Voices;

/// Nova 2 Sonic voices (docs.aws.amazon.com/nova/latest/nova2-userguide/sonic-language-support).
pub const NOVA_VOICES: &[&str] = &[
    "tiffany", "matthew", "amy", "olivia", "kiara", "arjun", "ambre", "florian", "beatrice", "lorenzo", "tina",
    "lennart", "lupe", "carlos", "carolina", "leo",
];
/// [`NOVA_VOICES`] with the default, `tiffany`.
const VOICES: Voices = Voices { provider: "Nova Sonic", names: NOVA_VOICES, default: "tiffany" };
/// Bedrock ends a bidirectional stream after about 8 minutes.
pub const CONNECTION_LIMIT_SECS: u64 = 8 * 60;

/// Settings of the `nova_sonic` provider.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NovaSonicSettings {
    /// Region (unset: the SDK's chain: `AWS_REGION`, the profile; else `us-east-1`).
    pub region: Option<String>,
    /// Model id.
    pub model: String,
    /// Voice for every character; unset: the character's voice when Nova has it, else `tiffany`.
    pub voice: Option<String>,
    /// `endpointingSensitivity`: HIGH, MEDIUM or LOW.
    pub endpointing_sensitivity: Sensitivity,
    /// `maxTokens`.
    pub max_tokens: u32,
    /// `temperature`.
    pub temperature: f32,
    /// `topP`.
    pub top_p: f32,
    /// Renew the stream before this many seconds (Bedrock ends it at ~8 min).
    pub max_session_secs: u64,
    /// Temporary credentials are treated as expiring this much earlier (the stream is renewed
    /// before they expire).
    pub credential_margin_secs: u64,
    /// A `generate_reply` (greeting, typed text) that shows nothing within this is an error.
    pub reply_timeout_ms: u64,
    /// Opening the stream may take this long.
    pub connect_timeout_ms: u64,
}

impl Default for NovaSonicSettings {
    fn default() -> Self {
        Self {
            region: None,
            model: "amazon.nova-2-sonic-v1:0".into(),
            voice: None,
            endpointing_sensitivity: Sensitivity::Medium,
            max_tokens: 1024,
            temperature: 0.7,
            top_p: 0.9,
            max_session_secs: 7 * 60,
            credential_margin_secs: 180,
            reply_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
        }
    }
}

impl NovaSonicSettings {
    /// Apply `AWS_REGION` (or `AWS_DEFAULT_REGION`) read through `get`; the rest of the AWS
    /// environment is the SDK's.
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) {
        let non_empty = |k: &str| get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(r) = non_empty("AWS_REGION").or_else(|| non_empty("AWS_DEFAULT_REGION")) {
            self.region = Some(r);
        }
    }

    /// Check the settings when the provider is used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model == "amazon.nova-sonic-v1:0" {
            return Err(ConfigError::new(
                "nova_sonic.model",
                "Nova Sonic v1 reached its end of life",
                "use amazon.nova-2-sonic-v1:0",
            ));
        }
        if self.model.trim().is_empty() {
            return Err(ConfigError::new("nova_sonic.model", "empty", "use amazon.nova-2-sonic-v1:0"));
        }
        if let Some(r) = &self.region
            && !r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ConfigError::new("AWS_REGION", format!("`{r}` is not a region name"), "use e.g. us-east-1"));
        }
        VOICES.check("nova_sonic.voice", self.voice.as_deref())?;
        require_range(
            "nova_sonic.max_session_secs",
            self.max_session_secs,
            10..=CONNECTION_LIMIT_SECS,
            "use 10..=480 (Bedrock ends streams at ~8 min)",
        )?;
        if !(0.0..=1.0).contains(&self.temperature) || !(0.0..=1.0).contains(&self.top_p) {
            return Err(ConfigError::new(
                "nova_sonic.temperature",
                "temperature and top_p must be within 0..=1",
                "use e.g. 0.7 and 0.9",
            ));
        }
        if self.reply_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(ConfigError::new("nova_sonic.reply_timeout_ms", "a timeout of 0", "use e.g. 10000"));
        }
        Ok(())
    }

    /// The voice for a character: the setting, else the character's when Nova has it, else tiffany.
    pub fn voice_for(&self, character_voice: &str) -> String {
        VOICES.choose(self.voice.as_deref(), character_voice)
    }

    /// How long a stream may live when the credentials expire `to_expiry` from now: the shorter of
    /// the stream limit and the time to expiry minus the margin, never below 10 s (seed 002).
    pub fn lifetime(&self, to_expiry: Option<Duration>) -> Duration {
        let limit = Duration::from_secs(self.max_session_secs);
        let by_credentials =
            to_expiry.map(|t| t.saturating_sub(Duration::from_secs(self.credential_margin_secs))).unwrap_or(limit);
        limit.min(by_credentials).max(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_is_the_limit_or_the_credentials_minus_the_margin_never_below_ten_seconds() {
        let s = NovaSonicSettings::default();
        assert_eq!(s.lifetime(None), Duration::from_secs(420));
        assert_eq!(s.lifetime(Some(Duration::from_secs(3600))), Duration::from_secs(420));
        assert_eq!(s.lifetime(Some(Duration::from_secs(300))), Duration::from_secs(120));
        assert_eq!(s.lifetime(Some(Duration::from_secs(100))), Duration::from_secs(10));
    }

    #[test]
    fn bad_values_name_their_key_and_voices_fall_back() {
        assert_eq!(
            NovaSonicSettings { model: "amazon.nova-sonic-v1:0".into(), ..Default::default() }
                .validate()
                .unwrap_err()
                .key,
            "nova_sonic.model"
        );
        assert_eq!(
            NovaSonicSettings { voice: Some("bob".into()), ..Default::default() }.validate().unwrap_err().key,
            "nova_sonic.voice"
        );
        assert_eq!(
            NovaSonicSettings { max_session_secs: 900, ..Default::default() }.validate().unwrap_err().key,
            "nova_sonic.max_session_secs"
        );
        assert_eq!(
            NovaSonicSettings { region: Some("US East".into()), ..Default::default() }.validate().unwrap_err().key,
            "AWS_REGION"
        );
        NovaSonicSettings::default().validate().unwrap();
        let mut s = NovaSonicSettings::default();
        s.apply_env(&|k| (k == "AWS_DEFAULT_REGION").then(|| "eu-north-1".to_owned()));
        assert_eq!(s.region.as_deref(), Some("eu-north-1"));
        assert_eq!(s.voice_for("Matthew"), "matthew");
        assert_eq!(s.voice_for("aiko"), "tiffany");
    }
}
