//! `[local]`: the offline engines of the `local` provider (PocketSphinx, eSpeak NG).

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Section, err};

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

impl Section for LocalSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_decoders == 0 {
            return Err(err("local.max_decoders", "zero", "use at least 1"));
        }
        if self.token_budget < 200 {
            return Err(err("local.token_budget", "below 200 tokens", "use e.g. 2000"));
        }
        Ok(())
    }
}
