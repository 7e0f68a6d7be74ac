//! `[scripted]`: the scripted provider (a canned reply, for tests and load generation).

use serde::Deserialize;

use super::Section;

/// The scripted provider's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptedSettings {
    /// Simulated model time before a reply, ms.
    pub response_delay_ms: u64,
}

impl Default for ScriptedSettings {
    fn default() -> Self {
        Self { response_delay_ms: 150 }
    }
}

impl Section for ScriptedSettings {}
