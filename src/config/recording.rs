//! `[recording]`: which sessions are recorded (audio and the conversation core's inputs and
//! outputs, for deterministic replay: `crate::recording`, `kotodama replay`), where recordings are
//! kept and for how long.

use serde::Deserialize;

use super::{ConfigError, Section, env, err};

/// The default store: a directory beside the default SQLite database.
pub const DEFAULT_RECORDING_URL: &str = "data/recordings";

/// Recording settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingSettings {
    /// Record every session (`KOTODAMA_RECORD=1`). Default false: a session is recorded only when
    /// its character is listed in `characters` or its `POST /v1/sessions` body says `"record": true`.
    pub enabled: bool,
    /// Character ids whose sessions are always recorded (`KOTODAMA_RECORD_CHARACTERS`, comma-separated).
    pub characters: Vec<String>,
    /// Where recordings go (`KOTODAMA_RECORDING_URL`): a directory path or `file:///abs/dir` (default
    /// `data/recordings`), or an S3-compatible bucket `s3://bucket/prefix` (credentials, region and
    /// endpoint from the standard `AWS_*` variables, read by the `object_store` crate).
    pub url: String,
    /// Recordings older than this are deleted, days (`KOTODAMA_RECORDING_RETENTION_DAYS`); 0 keeps
    /// them forever. Default 30.
    pub retention_days: u64,
    /// Most bytes one recording may take (event log and both audio files,
    /// `KOTODAMA_RECORDING_MAX_BYTES`); past it the recording stops and is marked truncated.
    /// Default 256 MiB (about an hour of a talkative session).
    pub max_bytes: u64,
}

impl Default for RecordingSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            characters: Vec::new(),
            url: DEFAULT_RECORDING_URL.to_owned(),
            retention_days: 30,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl RecordingSettings {
    /// Whether a session of `character` is recorded when its creation did not say (`record`
    /// absent from the body).
    pub fn records_character(&self, character: &str) -> bool {
        self.enabled || self.characters.iter().any(|c| c == character)
    }
}

impl Section for RecordingSettings {
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env::value(get, "KOTODAMA_RECORD") {
            self.enabled = match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => return Err(err("KOTODAMA_RECORD", format!("`{v}` is not a boolean"), "use 1 or 0")),
            };
        }
        if let Some(v) = env::list(get, "KOTODAMA_RECORD_CHARACTERS") {
            self.characters = v;
        }
        if let Some(v) = env::value(get, "KOTODAMA_RECORDING_URL") {
            self.url = v;
        }
        let days = "a number of days";
        if let Some(v) = env::parse(get, "KOTODAMA_RECORDING_RETENTION_DAYS", days, "e.g. 30 (0 keeps forever)")? {
            self.retention_days = v;
        }
        if let Some(v) = env::parse(get, "KOTODAMA_RECORDING_MAX_BYTES", "a number of bytes", "e.g. 268435456")? {
            self.max_bytes = v;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.url.trim().is_empty() {
            return Err(err("recording.url", "empty", "use a directory (data/recordings) or s3://bucket/prefix"));
        }
        if let Some((scheme, _)) = self.url.split_once("://")
            && !matches!(scheme, "file" | "s3")
        {
            return Err(err(
                "KOTODAMA_RECORDING_URL",
                format!("unsupported scheme `{scheme}://`"),
                "use a directory path, file:///abs/dir or s3://bucket/prefix",
            ));
        }
        if self.max_bytes < 64 * 1024 {
            return Err(err("recording.max_bytes", "below 64 KiB", "use at least 65536 (default 268435456)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn environment_turns_recording_on_and_names_bad_values() {
        let mut s = RecordingSettings::default();
        assert!(!s.records_character("aiko"), "off by default");
        s.apply_env(&env(&[("KOTODAMA_RECORD_CHARACTERS", "aiko, kenji")])).unwrap();
        assert!(s.records_character("kenji") && !s.records_character("mio"));
        s.apply_env(&env(&[("KOTODAMA_RECORD", "1"), ("KOTODAMA_RECORDING_RETENTION_DAYS", "7")])).unwrap();
        assert!(s.records_character("mio"));
        assert_eq!(s.retention_days, 7);
        let e = s.apply_env(&env(&[("KOTODAMA_RECORD", "maybe")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_RECORD");
        let e = s.apply_env(&env(&[("KOTODAMA_RECORDING_MAX_BYTES", "lots")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_RECORDING_MAX_BYTES");
    }

    #[test]
    fn only_directories_and_s3_are_stores() {
        let mut s = RecordingSettings { url: "gs://bucket".into(), ..Default::default() };
        assert_eq!(s.validate().unwrap_err().key, "KOTODAMA_RECORDING_URL");
        for ok in ["data/recordings", "file:///var/lib/kotodama/rec", "s3://bucket/prefix"] {
            s.url = ok.into();
            s.validate().unwrap();
        }
        s.max_bytes = 10;
        assert_eq!(s.validate().unwrap_err().key, "recording.max_bytes");
    }
}
