//! Versioned moderation policies: the node's catalog of the newest version of each policy, from
//! which every new session's [`Moderator`] is compiled.
//!
//! `default` is the `[moderation]` section (version label: a hash of it) until an admin stores a
//! replacement; other policies exist only as stored (`moderation_policies`, migration 0008, one
//! row per version, see [`crate::admin::store`]). The admin API replaces the catalog after each
//! change and every node reloads it every [`crate::admin::CATALOG_REFRESH`]: a new session uses
//! the newest version, a live session keeps the version it started with (its flags name it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use super::Moderator;
use crate::config::{Character, ModerationSettings};

/// The policy of characters that name none (the `[moderation]` section or its stored
/// replacement).
pub const DEFAULT_POLICY: &str = "default";

/// Most compiled moderators kept (one per policy version and character override).
const CACHE_CAPACITY: usize = 256;

/// Whether `id` may name a policy: 1-64 of `A-Z a-z 0-9 - _`.
pub fn valid_policy_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One stored policy's newest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    /// 1 on the first store, +1 on each later change.
    pub version: i64,
    /// The policy.
    pub settings: ModerationSettings,
}

/// The node's policies (see the module docs).
#[derive(Debug)]
pub struct Policies {
    configured: ModerationSettings,
    stored: RwLock<Arc<BTreeMap<String, PolicyVersion>>>,
    cache: Mutex<HashMap<String, Arc<Moderator>>>,
}

fn short_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl Policies {
    /// Only the configured `default` (validated at start).
    pub fn new(configured: ModerationSettings) -> Self {
        Self { configured, stored: RwLock::default(), cache: Mutex::default() }
    }

    /// The configured `[moderation]` section.
    pub fn configured(&self) -> &ModerationSettings {
        &self.configured
    }

    /// Replace the stored policies (the newest version of each one not deleted).
    pub fn replace(&self, stored: BTreeMap<String, PolicyVersion>) {
        let mut current = self.stored.write().unwrap_or_else(|e| e.into_inner());
        if **current != stored {
            *current = Arc::new(stored);
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Policy `id`'s version label (`id@N` when stored, the configured section's hash for an
    /// unreplaced `default`) and settings; `None`: no such policy.
    pub fn get(&self, id: &str) -> Option<(String, ModerationSettings)> {
        let stored = Arc::clone(&self.stored.read().unwrap_or_else(|e| e.into_inner()));
        match stored.get(id) {
            Some(p) => {
                let mut settings = p.settings.clone();
                // A stored endpoint has no key (never stored): the configured one's, same URL.
                if let (Some(e), Some(c)) = (settings.endpoint.as_mut(), self.configured.endpoint.as_ref())
                    && e.api_key.is_none()
                    && e.url == c.url
                {
                    e.api_key = c.api_key.clone();
                }
                Some((format!("{id}@{}", p.version), settings))
            }
            None if id == DEFAULT_POLICY => {
                let version = Moderator::new(&self.configured).map(|m| m.version().to_owned()).unwrap_or_default();
                Some((version, self.configured.clone()))
            }
            None => None,
        }
    }

    /// The moderator of a new session of `character`: the newest version of its policy (an
    /// unknown policy falls back to `default`, logged), with the character's additions.
    pub fn for_character(&self, character: &Character) -> Arc<Moderator> {
        let over = character.moderation.as_ref();
        let id = over.and_then(|m| m.policy.as_deref()).unwrap_or(DEFAULT_POLICY);
        let (mut label, mut settings) = self.get(id).unwrap_or_else(|| {
            tracing::warn!(character = %character.id, policy = id, "unknown moderation policy; using `default`");
            self.get(DEFAULT_POLICY).unwrap_or_else(|| (String::new(), self.configured.clone()))
        });
        let adds = |m: &&crate::config::CharacterModeration| {
            **m != crate::config::CharacterModeration { policy: m.policy.clone(), ..Default::default() }
        };
        if let Some(m) = over.filter(adds) {
            let json = serde_json::to_string(m).unwrap_or_default();
            label = format!("{label}+{}-{}", character.id, short_hash(&json));
            settings = m.apply(&settings);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(&label) {
            return Arc::clone(m);
        }
        let moderator = Moderator::with_version(&settings, label.clone()).unwrap_or_else(|e| {
            tracing::error!(character = %character.id, error = %e, "moderation policy does not compile; using the configured one");
            Moderator::new(&self.configured).unwrap_or_else(|_| Moderator::disabled())
        });
        let moderator = Arc::new(moderator);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(label, Arc::clone(&moderator));
        moderator
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CharacterModeration;

    #[test]
    fn a_stored_version_replaces_default_and_a_character_adds_to_its_policy() {
        let configured = ModerationSettings { deny: vec!["purple monkey".into()], ..Default::default() };
        let p = Policies::new(configured);
        let aiko = Character::builtin();
        let first = p.for_character(&aiko);
        assert_eq!(first.check("a purple monkey").unwrap().category, "deny");
        let stored = ModerationSettings { deny: vec!["green parrot".into()], ..Default::default() };
        let kids = ModerationSettings { deny: vec!["scary".into()], ..Default::default() };
        p.replace(BTreeMap::from([
            ("default".into(), PolicyVersion { version: 2, settings: stored }),
            ("kids".into(), PolicyVersion { version: 1, settings: kids }),
        ]));
        let second = p.for_character(&aiko);
        assert_eq!(second.version(), "default@2");
        assert!(second.check("a purple monkey").is_none() && second.check("a green parrot").is_some());
        assert!(first.check("a purple monkey").is_some(), "a live session keeps its version");

        let over = CharacterModeration {
            policy: Some("kids".into()),
            deny: vec!["homework".into()],
            fallback: Some("Let's play a game instead.".into()),
            check_user_input: Some(true),
            ..Default::default()
        };
        let kai = Character { id: "kai".into(), moderation: Some(over), ..Character::builtin() };
        let m = p.for_character(&kai);
        assert!(m.version().starts_with("kids@1+kai-"), "{}", m.version());
        assert!(m.check("so scary").is_some() && m.check("my homework").is_some() && m.check("green parrot").is_none());
        assert_eq!(m.fallback(), "Let's play a game instead.");
        assert!(m.checks_user_input() && !second.checks_user_input());
        let lost = Character {
            moderation: Some(CharacterModeration { policy: Some("gone".into()), ..Default::default() }),
            ..Character::builtin()
        };
        assert_eq!(p.for_character(&lost).version(), "default@2", "an unknown policy falls back to default");
    }
}
