//! Closed voice lists (Gemini Live's prebuilt voices, Nova Sonic's voices): a configured voice is
//! checked against the list at start, and a session's voice is chosen from the setting, the
//! character's voice and the provider's default. Names compare with ASCII case ignored and are
//! sent spelt as the list spells them.

use crate::config::ConfigError;

/// One provider's voices.
#[derive(Debug, Clone, Copy)]
pub struct Voices {
    /// The provider as people name it (`Gemini`, `Nova Sonic`), for error messages.
    pub provider: &'static str,
    /// Every voice, spelt as the provider's API wants it.
    pub names: &'static [&'static str],
    /// The voice when neither the setting nor the character's voice is in `names`.
    pub default: &'static str,
}

impl Voices {
    /// The voice of the list named `name` (ASCII case ignored), spelt as the list spells it.
    pub fn find(&self, name: &str) -> Option<&'static str> {
        self.names.iter().find(|n| n.eq_ignore_ascii_case(name)).copied()
    }

    /// `Ok` when `configured` is unset or in the list; else the error for `key` (e.g.
    /// `gemini.voice`) that names every voice.
    pub fn check(&self, key: &str, configured: Option<&str>) -> Result<(), ConfigError> {
        match configured {
            Some(v) if self.find(v).is_none() => Err(ConfigError::new(
                key,
                format!("`{v}` is not a {} voice", self.provider),
                format!("use one of {}", self.names.join(", ")),
            )),
            _ => Ok(()),
        }
    }

    /// The voice for a session: `configured` when the list has it, else `character_voice` when
    /// the list has it, else the default.
    pub fn choose(&self, configured: Option<&str>, character_voice: &str) -> String {
        configured.and_then(|v| self.find(v)).or_else(|| self.find(character_voice)).unwrap_or(self.default).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Voices = Voices { provider: "Test", names: &["Kore", "puck"], default: "Kore" };

    #[test]
    fn names_match_without_case_and_are_sent_as_listed() {
        assert_eq!(V.find("KORE"), Some("Kore"));
        assert_eq!(V.find("Puck"), Some("puck"));
        assert_eq!(V.find("nope"), None);
        assert_eq!(V.choose(Some("PUCK"), "kore"), "puck");
        assert_eq!(V.choose(Some("nope"), "kore"), "Kore", "an unknown setting falls to the character's");
        assert_eq!(V.choose(None, "nope"), "Kore", "then to the default");
        V.check("test.voice", None).unwrap();
        V.check("test.voice", Some("pUcK")).unwrap();
        let e = V.check("test.voice", Some("nope")).unwrap_err();
        assert_eq!(e.key, "test.voice");
        assert!(e.problem.contains("`nope` is not a Test voice"), "{e}");
    }
}
