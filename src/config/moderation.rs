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

/// An OpenAI-compatible moderation endpoint (`POST {url}/v1/moderations`, OpenAI API
/// reference "Moderations"), asked after the local lists pass. Used where text is checked
/// asynchronously: the cascade, before TTS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    /// Base URL, e.g. `https://api.openai.com`.
    pub url: String,
    /// Sent as `Authorization: Bearer`; never logged (and not part of the policy version).
    #[serde(default, skip_serializing)]
    pub api_key: Option<super::Secret>,
    /// Model (default `omni-moderation-latest`).
    #[serde(default = "default_model")]
    pub model: String,
    /// Deadline of one check, milliseconds (default 1500).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// When the endpoint fails or misses the deadline: `true` treats the text as flagged
    /// (category `moderation_unavailable`: nothing unchecked is spoken), `false` (default) speaks
    /// it (availability over strictness; each failure is logged and counted).
    #[serde(default)]
    pub fail_closed: bool,
}

fn default_model() -> String {
    "omni-moderation-latest".into()
}

fn default_timeout_ms() -> u64 {
    1500
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
    /// An OpenAI-compatible `/v1/moderations` endpoint (`[moderation.endpoint]`), optional.
    pub endpoint: Option<EndpointSettings>,
    /// Check the user's text too (typed, and transcribed: the cascade's STT, a speech-to-speech
    /// provider's input transcript) before it reaches the model (default false). A flagged user
    /// turn never reaches the model (speech-to-speech: the model heard the audio, so its reply is
    /// cancelled and replaced), the client gets `moderation` with `source: "user"`.
    pub check_user_input: bool,
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
            endpoint: None,
            check_user_input: false,
        }
    }
}

/// A character's moderation (`[characters.moderation]`, or `"moderation"` in
/// `PUT /v1/admin/characters/{id}`): the policy it uses and what it adds to it. Applied to the
/// character's next session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CharacterModeration {
    /// The policy (`PUT /v1/admin/policies/{id}`); unset: `default` (the `[moderation]` section or
    /// its stored replacement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Categories added to the policy's (a category of the same name is replaced).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, CategorySettings>,
    /// Phrases added to the policy's `deny` list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Phrases added to the policy's allow list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// The character's own safe fallback line (unset: the policy's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Overrides the policy's `check_user_input`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_user_input: Option<bool>,
}

impl CharacterModeration {
    /// `policy` with this character's additions.
    pub fn apply(&self, policy: &ModerationSettings) -> ModerationSettings {
        let mut out = policy.clone();
        out.categories.extend(self.categories.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.deny.extend(self.deny.iter().cloned());
        out.allow.extend(self.allow.iter().cloned());
        if let Some(f) = self.fallback.as_ref().filter(|f| !f.trim().is_empty()) {
            out.fallback = f.clone();
        }
        if let Some(c) = self.check_user_input {
            out.check_user_input = c;
        }
        out
    }

    /// The additions compile (`key` names the character's section in errors).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        self.apply(&ModerationSettings::default())
            .validate()
            .map_err(|e| ConfigError { key: format!("{key}.{}", e.key.trim_start_matches("moderation.")), ..e })?;
        if let Some(p) = &self.policy
            && !crate::moderation::policies::valid_policy_id(p)
        {
            return Err(err(
                &format!("{key}.policy"),
                format!("`{p}` is not a policy id"),
                "use 1-64 of A-Z a-z 0-9 - _",
            ));
        }
        Ok(())
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
        if let Some(e) = &self.endpoint
            && !(e.url.starts_with("http://") || e.url.starts_with("https://"))
        {
            return Err(err(
                "moderation.endpoint.url",
                format!("`{}` is not an http(s) URL", e.url),
                "use e.g. https://api.openai.com",
            ));
        }
        if self.enabled && self.fallback.trim().is_empty() {
            return Err(err("moderation.fallback", "empty", "give the line the character says instead"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::readme_example;
    use crate::moderation::Moderator;

    #[test]
    fn the_readme_moderation_example_parses_and_flags_what_it_says() {
        let c = readme_example("[moderation]\n");
        let m = Moderator::new(&c.moderation).unwrap();
        assert_eq!(m.check("They will blow up the bridge.").map(|v| v.category).as_deref(), Some("violence"));
        assert_eq!(m.check("We could kill time here.").map(|v| v.category), None, "allow-listed");
        assert_eq!(m.check("Stop shooting!").map(|v| v.category).as_deref(), Some("violence"));
    }

    #[test]
    fn a_bad_pattern_stops_the_start_naming_its_category() {
        let c = Config::from_toml("[moderation.categories.x]\npatterns = ['(']\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "moderation.categories.x.patterns");
        let mut c = Config::default();
        c.apply_env(|k| (k == "KOTODAMA_MODERATION_DENY").then(|| " a , b ,".to_owned())).unwrap();
        assert_eq!(c.moderation.deny, ["a", "b"]);
    }
}
