//! `[[turn]]`: the STUN/TURN servers clients get in `ice_servers`, with TURN REST credentials
//! minted per session by `signaling::turn` (see `turn-config/README.md` for coturn's side).
//!
//! ```toml
//! [[turn]]
//! urls = ["turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349?transport=tcp"]
//! secrets = ["<new secret>", "<old secret>"]   # coturn static-auth-secret; the first signs
//! ttl_secs = 4200          # credential lifetime; default: session.max_duration_secs + token_ttl_secs
//! realm = "turn.example.com"   # coturn's realm (documentation; not part of the credential)
//! ```
//!
//! The environment sets the first entry: `KOTODAMA_TURN_URLS` (comma-separated),
//! `KOTODAMA_TURN_SECRET` (one secret, raw bytes), `KOTODAMA_TURN_TTL_SECS`,
//! `KOTODAMA_TURN_REALM`. Secrets are never logged (`Debug` is redacted).

use std::time::Duration;

use serde::Deserialize;
use signaling::turn::{IceServerSet, TurnSecret, TurnServer};

use crate::config::ConfigError;

/// One `[[turn]]` entry.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnEntry {
    /// `stun:`, `stuns:`, `turn:` or `turns:` URLs.
    pub urls: Vec<String>,
    /// Shared secrets (coturn `static-auth-secret`), raw bytes; the first signs.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Credential lifetime, seconds; default: the maximum session duration plus the connect window.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// coturn's `realm` for these URLs (reported at start; TURN REST credentials do not carry it).
    #[serde(default)]
    pub realm: Option<String>,
}

impl std::fmt::Debug for TurnEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnEntry")
            .field("urls", &self.urls)
            .field("secrets", &format_args!("<{} redacted>", self.secrets.len()))
            .field("ttl_secs", &self.ttl_secs)
            .field("realm", &self.realm)
            .finish()
    }
}

/// Every `[[turn]]` entry (empty: host candidates only, no STUN/TURN server handed out).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct TurnSettings(pub Vec<TurnEntry>);

impl TurnSettings {
    /// Apply `KOTODAMA_TURN_*` to the first entry (created when the file has none).
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let urls = non_empty("KOTODAMA_TURN_URLS");
        let secret = get("KOTODAMA_TURN_SECRET").filter(|v| !v.is_empty());
        let ttl = non_empty("KOTODAMA_TURN_TTL_SECS");
        let realm = non_empty("KOTODAMA_TURN_REALM");
        if urls.is_none() && secret.is_none() && ttl.is_none() && realm.is_none() {
            return Ok(());
        }
        if self.0.is_empty() {
            self.0.push(TurnEntry::default());
        }
        let first = &mut self.0[0];
        if let Some(v) = urls {
            first.urls = v.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
        }
        if let Some(v) = secret {
            // Raw bytes, as coturn reads static-auth-secret: no trimming.
            first.secrets = vec![v];
        }
        if let Some(v) = ttl {
            first.ttl_secs = Some(v.trim().parse().map_err(|_| {
                err("KOTODAMA_TURN_TTL_SECS", format!("`{v}` is not a number of seconds"), "use e.g. 4200")
            })?);
        }
        if let Some(v) = realm {
            first.realm = Some(v.trim().to_owned());
        }
        Ok(())
    }

    /// Check every entry; `max_session` is the longest a session may last (credentials must
    /// outlive it: coturn re-checks them on every allocation refresh).
    pub fn validate(&self, max_session: Duration, connect_window: Duration) -> Result<(), ConfigError> {
        self.ice_server_set(max_session, connect_window).map(|_| ())
    }

    /// The servers as `signaling` mints them. Errors name the entry's key and the fix.
    pub fn ice_server_set(&self, max_session: Duration, connect_window: Duration) -> Result<IceServerSet, ConfigError> {
        let mut servers = Vec::with_capacity(self.0.len());
        for (i, entry) in self.0.iter().enumerate() {
            let key = |field: &str| {
                if i == 0 {
                    format!("turn[0].{field} (KOTODAMA_TURN_{})", field.to_uppercase())
                } else {
                    format!("turn[{i}].{field}")
                }
            };
            let ttl = entry.ttl_secs.map(Duration::from_secs).unwrap_or(max_session + connect_window);
            if ttl < max_session {
                return Err(err(
                    &key("ttl_secs"),
                    format!(
                        "{} s is shorter than session.max_duration_secs ({} s)",
                        ttl.as_secs(),
                        max_session.as_secs()
                    ),
                    "coturn re-checks the expiry on every allocation refresh: leave it unset or make it longer",
                ));
            }
            if entry.realm.as_deref().is_some_and(|r| r.is_empty() || !r.bytes().all(|b| b.is_ascii_graphic())) {
                return Err(err(
                    &key("realm"),
                    "empty or not visible ASCII",
                    "use coturn's `realm`, e.g. turn.example.com",
                ));
            }
            let mut secrets = Vec::with_capacity(entry.secrets.len());
            for s in &entry.secrets {
                secrets.push(TurnSecret::new(s.as_bytes()).map_err(|e| {
                    err(&key("secret"), e.to_string(), "use a long random secret, e.g. `openssl rand -hex 32`")
                })?);
            }
            let server = TurnServer::new(entry.urls.clone(), secrets, ttl).map_err(|e| {
                let fix = "URLs look like turn:host:3478?transport=udp, turns:host:5349, stun:host:3478; \
                           TURN URLs need the coturn static-auth-secret";
                let field =
                    if matches!(e, signaling::turn::TurnConfigError::MissingSecret { .. }) { "secret" } else { "urls" };
                err(&key(field), e.to_string(), fix)
            })?;
            servers.push(server);
        }
        Ok(IceServerSet::new(servers))
    }
}

fn err(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), problem: problem.into(), fix: fix.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const TEN_MIN: Duration = Duration::from_secs(600);

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn environment_configures_the_first_server_with_a_default_lifetime_covering_a_session() {
        let mut t = TurnSettings::default();
        t.apply_env(&env(&[
            ("KOTODAMA_TURN_URLS", "turn:127.0.0.1:3478?transport=udp, stun:127.0.0.1:3478"),
            ("KOTODAMA_TURN_SECRET", " raw secret with spaces "),
        ]))
        .unwrap();
        assert_eq!(t.0[0].urls, ["turn:127.0.0.1:3478?transport=udp", "stun:127.0.0.1:3478"]);
        assert_eq!(t.0[0].secrets, [" raw secret with spaces "], "the secret is used as its raw bytes");
        let set = t.ice_server_set(HOUR, TEN_MIN).unwrap();
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ice = set.ice_servers("sess_1", now);
        assert_eq!(ice[0].username.as_deref(), Some("1004200:sess_1"));
        assert!(!format!("{t:?}").contains("raw secret"), "secret in Debug");
    }

    #[test]
    fn errors_name_the_key() {
        let mut t = TurnSettings::default();
        t.apply_env(&env(&[("KOTODAMA_TURN_URLS", "turn:h:3478")])).unwrap();
        let e = t.validate(HOUR, TEN_MIN).unwrap_err();
        assert_eq!(e.key, "turn[0].secret (KOTODAMA_TURN_SECRET)");
        t.apply_env(&env(&[("KOTODAMA_TURN_SECRET", "short")])).unwrap();
        assert_eq!(t.validate(HOUR, TEN_MIN).unwrap_err().key, "turn[0].secret (KOTODAMA_TURN_SECRET)");
        t.apply_env(&env(&[("KOTODAMA_TURN_SECRET", "long-enough-secret-123"), ("KOTODAMA_TURN_URLS", "http://h")]))
            .unwrap();
        assert_eq!(t.validate(HOUR, TEN_MIN).unwrap_err().key, "turn[0].urls (KOTODAMA_TURN_URLS)");
        t.apply_env(&env(&[("KOTODAMA_TURN_URLS", "turn:h"), ("KOTODAMA_TURN_TTL_SECS", "600")])).unwrap();
        let e = t.validate(HOUR, TEN_MIN).unwrap_err();
        assert_eq!(e.key, "turn[0].ttl_secs (KOTODAMA_TURN_TTL_SECS)");
        assert!(!e.to_string().contains("long-enough"), "secret in an error: {e}");
        assert_eq!(t.apply_env(&env(&[("KOTODAMA_TURN_TTL_SECS", "soon")])).unwrap_err().key, "KOTODAMA_TURN_TTL_SECS");
    }

    #[test]
    fn no_configuration_means_no_servers() {
        let mut t = TurnSettings::default();
        t.apply_env(&env(&[])).unwrap();
        assert!(t.ice_server_set(HOUR, TEN_MIN).unwrap().is_empty());
    }
}
