//! `[cascade]`: the `cascade` provider's failover lists of OpenAI-compatible STT, LLM and TTS
//! servers (`[[cascade.stt]]`, `KOTODAMA_STT_URL`, ...).

use serde::Deserialize;

use super::{ConfigError, HTTP_SCHEMES, Secret, Section, env, err, require_scheme};

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

/// One OpenAI-compatible server (optional keys may be left out).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    /// Base URL, e.g. `http://127.0.0.1:11434` (Ollama) or `https://api.openai.com`.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Bearer key, if the server needs one (never logged: `Debug` shows `***`).
    pub api_key: Option<Secret>,
    /// TTS: voice (default: the character's voice).
    pub voice: Option<String>,
    /// TTS: `pcm` (raw s16le) or `wav`.
    pub format: Option<String>,
    /// TTS: sample rate of raw `pcm`, Hz (default 24000).
    pub sample_rate: Option<u32>,
}

impl CascadeSettings {
    /// Whether any server is configured.
    pub fn configured(&self) -> bool {
        !(self.stt.is_empty() && self.llm.is_empty() && self.tts.is_empty())
    }

    /// The three stages: (name, servers).
    pub fn stages(&self) -> [(&'static str, &[EndpointSettings]); 3] {
        [("stt", &self.stt), ("llm", &self.llm), ("tts", &self.tts)]
    }

    /// With `provider = "cascade"`: every stage has a server or the offline fallback.
    pub fn validate_selected(&self) -> Result<(), ConfigError> {
        let local = self.local_fallback && cfg!(feature = "local");
        match self.stages().into_iter().find(|(_, list)| list.is_empty() && !local) {
            Some((stage, _)) => Err(err(
                &format!("cascade.{stage}"),
                "no server configured and no offline fallback",
                format!("add a [[cascade.{stage}]] server (or KOTODAMA_{}_URL)", stage.to_uppercase()),
            )),
            None => Ok(()),
        }
    }
}

impl Section for CascadeSettings {
    /// `KOTODAMA_{STT,LLM,TTS}_URL` with `_MODEL` (required) and `_API_KEY`: a server put first
    /// in its stage's list.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for (stage, list) in [("STT", &mut self.stt), ("LLM", &mut self.llm), ("TTS", &mut self.tts)] {
            let Some(base_url) = env::value(get, &format!("KOTODAMA_{stage}_URL")) else { continue };
            let model = env::value(get, &format!("KOTODAMA_{stage}_MODEL")).ok_or_else(|| {
                err(
                    &format!("KOTODAMA_{stage}_MODEL"),
                    format!("KOTODAMA_{stage}_URL is set but no model"),
                    format!("set KOTODAMA_{stage}_MODEL to the server's model name"),
                )
            })?;
            // The key as given (only blank counts as unset).
            let api_key = get(&format!("KOTODAMA_{stage}_API_KEY")).filter(|v| !v.trim().is_empty()).map(Secret::new);
            let endpoint = EndpointSettings { base_url, model, api_key, voice: None, format: None, sample_rate: None };
            list.insert(0, endpoint);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (stage, list) in self.stages() {
            list.iter().try_for_each(|e| e.validate(stage))?;
        }
        if self.timeout_ms < 100 {
            return Err(err("cascade.timeout_ms", "below 100 ms", "use e.g. 10000"));
        }
        Ok(())
    }
}

impl EndpointSettings {
    fn validate(&self, stage: &str) -> Result<(), ConfigError> {
        require_scheme(&self.base_url, HTTP_SCHEMES, || {
            let problem = format!("`{}` is not an http(s) URL", self.base_url);
            err(&format!("cascade.{stage}.base_url"), problem, "use e.g. http://127.0.0.1:11434")
        })?;
        if self.model.trim().is_empty() {
            return Err(err(&format!("cascade.{stage}.model"), "empty", "name the server's model"));
        }
        if let Some(f) = &self.format
            && f != "pcm"
            && f != "wav"
        {
            return Err(err(&format!("cascade.{stage}.format"), format!("`{f}`"), "use pcm or wav"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::{env, from_env};
    use super::*;

    #[test]
    fn llm_url_selects_the_cascade_and_needs_a_model() {
        let url_only = env(&[("KOTODAMA_LLM_URL", "http://127.0.0.1:11434")]);
        assert_eq!(Config::default().apply_env(url_only).unwrap_err().key, "KOTODAMA_LLM_MODEL");
        let mut c = from_env(&[("KOTODAMA_LLM_URL", "http://127.0.0.1:11434"), ("KOTODAMA_LLM_MODEL", "llama3")]);
        assert_eq!(c.provider_name(), "cascade");
        assert_eq!(c.cascade.llm[0].model, "llama3");
        c.validate().unwrap();
        c.cascade.llm[0].base_url = "ftp://x".into();
        assert_eq!(c.validate().unwrap_err().key, "cascade.llm.base_url");
        assert!(
            !format!("{:?}", EndpointSettings { api_key: Some(Secret::new("sk-x")), ..c.cascade.llm[0].clone() })
                .contains("sk-x")
        );
    }
}
