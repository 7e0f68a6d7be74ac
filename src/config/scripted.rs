//! `[scripted]`: the scripted provider (a canned reply, for tests and load generation).

use serde::Deserialize;

use super::{ConfigError, Section, require_range};

/// The scripted provider's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptedSettings {
    /// Simulated model time before a reply, ms.
    pub response_delay_ms: u64,
    /// Speak only the first this-many ms of the built-in 7.5 s reply, its transcript cut to the
    /// words in that share of the audio (unset: the whole reply). Load profiles use it for a
    /// reply of a given length (issue 14's profile: 2,200 ms). 100 ..= 60,000.
    pub reply_ms: Option<u64>,
}

impl Default for ScriptedSettings {
    fn default() -> Self {
        Self { response_delay_ms: 150, reply_ms: None }
    }
}

impl Section for ScriptedSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(ms) = self.reply_ms {
            require_range("scripted.reply_ms", ms, 100..=60_000, "use 100 ..= 60000 ms, or leave it unset")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn reply_ms_is_checked_and_names_its_key() {
        let ok = Config::from_toml("provider = \"scripted\"\n[scripted]\nreply_ms = 2200\n").unwrap();
        assert_eq!(ok.scripted.reply_ms, Some(2200));
        ok.validate().unwrap();
        for bad in [0, 99, 60_001] {
            let c = Config::from_toml(&format!("provider = \"scripted\"\n[scripted]\nreply_ms = {bad}\n")).unwrap();
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "scripted.reply_ms", "{bad}");
            assert!(e.problem.contains(&bad.to_string()), "{}", e.problem);
        }
    }
}
