//! `[[characters]]`: the one character type, checked at start, and its conversions to the
//! store's row ([`StoredCharacter`]) and the API's listing ([`CharacterInfo`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use signaling::CharacterInfo;
use signaling::events::Emotion;

use super::{ConfigError, Section, err};
use crate::providers::table;
use crate::providers::tools::ToolRegistry;
use crate::store::StoredCharacter;

/// A character.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Character {
    /// Stable id used in the API.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Language tag.
    #[serde(default = "default_language")]
    pub language: String,
    /// Voice name (provider-specific).
    #[serde(default = "default_voice")]
    pub voice: String,
    /// Voice per provider (`voices = { gemini = "Puck", nova_sonic = "matthew" }`); a provider
    /// not listed uses `voice`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub voices: BTreeMap<String, String>,
    /// Persona: the system instructions.
    #[serde(default)]
    pub persona: String,
    /// Avatar expression per emotion (`happy = "grin"`), for clients that render this character;
    /// served in `GET /v1/characters`. Keys are emotions of the documented set.
    #[serde(default)]
    pub expressions: BTreeMap<String, String>,
    /// Instructions for a first reply spoken on connect (unset: the character waits for the user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greeting: Option<String>,
    /// Providers in order of preference (failover); empty: the session's provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
    /// Tools the model may call (unset: every built-in tool; `[]`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
    /// Per-avatar viseme overrides: eSpeak phoneme -> viseme name (`{ "h" = "sil" }`).
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub visemes: HashMap<String, String>,
    /// Avatar mapping for clients (a model or image id), listed in `GET /v1/characters`.
    #[serde(default)]
    pub avatar: Option<String>,
    /// Provider this character prefers when a session names none.
    #[serde(default)]
    pub provider: Option<String>,
    /// Budget overrides (`[characters.budget]`): set limits replace the global `[budget]` ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<super::budget::BudgetLimits>,
    /// Moderation overrides (`[characters.moderation]`): the policy this character uses, the
    /// categories, deny and allow phrases it adds, its own safe fallback line and
    /// `check_user_input` (see [`super::moderation::CharacterModeration`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<super::moderation::CharacterModeration>,
}

fn default_language() -> String {
    "en-US".into()
}
fn default_voice() -> String {
    "aiko".into()
}

impl Character {
    /// The character offered when none is configured.
    pub fn builtin() -> Self {
        Character {
            id: "aiko".into(),
            name: "Aiko".into(),
            language: default_language(),
            voice: default_voice(),
            persona: "You are Aiko, a cheerful and curious companion. Speak briefly and warmly.".into(),
            ..Character::default()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = &self.moderation {
            m.validate(&format!("characters.{}.moderation", self.id))?;
        }
        if let Some(b) = &self.budget {
            b.check(&format!("characters.{}.budget", self.id))?;
        }
        let builtin = ToolRegistry::builtin();
        if let Some(t) = self.tools.iter().flatten().find(|t| !builtin.contains(t)) {
            return Err(err(
                "characters.tools",
                format!("character `{}` lists unknown tool `{t}`", self.id),
                format!("use tools from: {}", builtin.names().join(", ")),
            ));
        }
        if let Some(p) = self.voices.keys().find(|p| table::entry(p).is_none()) {
            return Err(err(
                "characters.voices",
                format!("character `{}` has a voice for unknown provider `{p}`", self.id),
                format!("use providers from: {}", table::known_names().join(", ")),
            ));
        }
        if let Some(p) = self.providers.iter().find(|p| table::entry(p).is_none()) {
            return Err(err(
                "characters.providers",
                format!("character `{}` lists unknown provider `{p}`", self.id),
                format!("use providers from: {}", table::known_names().join(", ")),
            ));
        }
        if let Err(problem) = crate::providers::cascade::viseme_overrides(&self.visemes) {
            return Err(err(&format!("characters.{}.visemes", self.id), problem, "fix the viseme name"));
        }
        if self.id.is_empty() || !self.id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
            return Err(err(
                "characters.id",
                format!("`{}` is not a valid id", self.id),
                "use letters, digits, - and _",
            ));
        }
        if let Some(emotion) = self.expressions.keys().find(|e| !Emotion::is_known(e)) {
            return Err(err(
                "characters.expressions",
                format!("`{emotion}` (character `{}`) is not an emotion of the documented set", self.id),
                format!("use one of: {}", Emotion::known_names().join(", ")),
            ));
        }
        if let Some(p) = &self.provider
            && table::entry(p).is_none()
        {
            return Err(err(
                "characters.provider",
                format!("character `{}` prefers provider `{p}`, which this build does not have", self.id),
                format!("use one of: {}", table::known_names().join(", ")),
            ));
        }
        Ok(())
    }
}

/// Each character valid, ids unique.
impl Section for Vec<Character> {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for c in self {
            c.validate()?;
            if !seen.insert(c.id.as_str()) {
                return Err(err(
                    "characters.id",
                    format!("`{}` appears twice", c.id),
                    "give each character its own id",
                ));
            }
        }
        Ok(())
    }
}

impl From<&Character> for StoredCharacter {
    fn from(c: &Character) -> Self {
        StoredCharacter {
            id: c.id.clone(),
            name: c.name.clone(),
            language: c.language.clone(),
            voice: c.voice.clone(),
            persona: c.persona.clone(),
            avatar: c.avatar.clone(),
            provider: c.provider.clone(),
        }
    }
}

/// `GET /v1/characters`: id, name, language, voice, and `avatar` / `expressions` when set.
impl From<&Character> for CharacterInfo {
    fn from(c: &Character) -> Self {
        let mut extra = serde_json::Map::new();
        if let Some(a) = &c.avatar {
            extra.insert("avatar".into(), serde_json::Value::String(a.clone()));
        }
        if !c.expressions.is_empty() {
            extra.insert("expressions".into(), serde_json::json!(c.expressions));
        }
        CharacterInfo {
            id: c.id.clone(),
            name: c.name.clone(),
            language: c.language.clone(),
            voice: c.voice.clone(),
            extra,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn character_provider_lists_must_name_known_providers() {
        let c = Config::from_toml("[[characters]]\nid = \"a\"\nname = \"A\"\nproviders = [\"scripted\", \"nope\"]\n")
            .unwrap();
        assert_eq!(c.validate().unwrap_err().key, "characters.providers");
        let c =
            Config::from_toml("[[characters]]\nid = \"a\"\nname = \"A\"\ntools = [\"get_time\", \"nuke\"]\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "characters.tools");
    }

    #[test]
    fn character_expressions_must_name_documented_emotions() {
        let ok = "[[characters]]\nid = \"mika\"\nname = \"Mika\"\nexpressions = { happy = \"grin\", sad = \"pout\" }\n";
        let c = Config::from_toml(ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.characters()[0].expressions["happy"], "grin");
        let bad = "[[characters]]\nid = \"mika\"\nname = \"Mika\"\nexpressions = { hungry = \"x\" }\n";
        let e = Config::from_toml(bad).unwrap().validate().unwrap_err();
        assert_eq!(e.key, "characters.expressions");
        assert!(e.to_string().contains("hungry"), "{e}");
    }

    #[test]
    fn bad_viseme_override_names_the_character() {
        let c = Config::from_toml(
            "[[characters]]\nid = \"mio\"\nname = \"Mio\"\nvisemes = { h = \"sil\", p = \"lips\" }\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "characters.mio.visemes");
        assert!(e.problem.contains("lips"), "{e}");
    }

    #[test]
    fn one_character_converts_to_the_stored_row_and_the_api_listing() {
        let c = Character { avatar: Some("a.vrm".into()), provider: Some("scripted".into()), ..Character::builtin() };
        let row = StoredCharacter::from(&c);
        assert_eq!(
            (row.id.as_str(), row.avatar.as_deref(), row.provider.as_deref()),
            ("aiko", Some("a.vrm"), Some("scripted"))
        );
        let info = CharacterInfo::from(&c);
        assert_eq!((info.name.as_str(), info.extra["avatar"].as_str()), ("Aiko", Some("a.vrm")));
        assert!(!info.extra.contains_key("expressions"), "no empty expressions listed");
    }
}
