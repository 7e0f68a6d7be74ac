//! `[moderation]`: what the character must not say, checked before it is spoken
//! (see `crate::moderation`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ConfigError, err};

/// One category of denied content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CategorySettings {
    /// Words or phrases, matched case-insensitively on word boundaries.
    pub phrases: Vec<String>,
    /// Regular expressions (Rust `regex` syntax), matched case-insensitively.
    pub patterns: Vec<String>,
}

/// The moderation policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModerationSettings {
    /// Check agent text before it is spoken (default true; the built-in policy only denies
    /// credentials the model might leak).
    pub enabled: bool,
    /// Categories by name (`[moderation.categories.violence] phrases = [...]`). The built-in
    /// `credentials` category is always there unless `builtin = false`.
    pub categories: BTreeMap<String, CategorySettings>,
    /// Phrases from `KOTODAMA_MODERATION_DENY` (comma-separated): the category `deny`.
    pub deny: Vec<String>,
    /// Phrases that are fine even where a category matches them (e.g. `"skills"` against a
    /// pattern `"kill"`): removed from the text before the categories are checked.
    pub allow: Vec<String>,
    /// Keep the built-in categories.
    pub builtin: bool,
    /// What the character says instead of a flagged reply.
    pub fallback: String,
}

impl Default for ModerationSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            categories: BTreeMap::new(),
            deny: Vec::new(),
            allow: Vec::new(),
            builtin: true,
            fallback: "Sorry, I can't talk about that. Let's talk about something else.".into(),
        }
    }
}

impl ModerationSettings {
    /// `KOTODAMA_MODERATION_DENY` (comma-separated phrases: the category `deny`).
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("KOTODAMA_MODERATION_DENY").filter(|v| !v.trim().is_empty()) {
            self.deny = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        }
        Ok(())
    }

    /// Every pattern compiles; the fallback is not empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::moderation::Moderator::new(self).map(|_| ()).map_err(|e| {
            err(&format!("moderation.categories.{}.patterns", e.category), e.to_string(), "fix the regular expression")
        })?;
        if self.enabled && self.fallback.trim().is_empty() {
            return Err(err("moderation.fallback", "empty", "give the line the character says instead"));
        }
        Ok(())
    }
}
