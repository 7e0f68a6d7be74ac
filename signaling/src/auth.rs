//! Credentials on requests: API keys and bearer tokens.
//!
//! API keys guard `POST /v1/sessions` (and, as an operator's alternative to the session token,
//! reading and ending sessions, and the privacy API). With no key configured the API is open;
//! the binary allows that only on a loopback bind (API v1).
//!
//! Keys are held only as SHA-256 digests: configuration may give a key itself (hashed at once,
//! the plaintext dropped) or its digest as `sha256:<64 hex>`, so a config file need not hold
//! usable secrets. A presented key is hashed and compared in constant time against every
//! digest, so timing reveals neither which key nor how much of one matched. Each key has a
//! [`KeyRole`]: `user` keys create and manage sessions and reach the user data they created;
//! `admin` keys also reach every user's data and cross-node control. A key is named in
//! records and logs only by its [`ApiKeyIdentity::id`] (the first 12 hex digits of its digest).
//! `Debug` shows only how many keys there are. Nothing here logs a credential.

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyRole {
    /// Create and manage sessions; export/delete the user data this key created.
    User,
    /// Everything a user key may, for every user's data and every session.
    Admin,
}

/// Who a presented key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyIdentity {
    /// First 12 hex digits of the key's SHA-256: safe to store and log.
    pub id: String,
    /// What it may do.
    pub role: KeyRole,
}

/// A key entry that is neither a usable key nor a `sha256:` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("API key entry {index} is not a key of >= 16 characters nor `sha256:<64 hex digits>`")]
pub struct ApiKeyError {
    /// Position of the bad entry (from 0) in its list.
    pub index: usize,
}

#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    role: KeyRole,
}

/// The configured API keys, as digests.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Entry>,
}

/// SHA-256 of `key`.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_digest(hex_digits: &str) -> Option<[u8; 32]> {
    if hex_digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex_digits.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// User keys from configuration (e.g. `KOTODAMA_API_KEYS` split on commas); surrounding
    /// whitespace is trimmed and empty entries are dropped. Entries `sha256:<hex>` are digests;
    /// a malformed digest entry is kept as a plain key (use [`ApiKeys::parse`] to refuse it).
    pub fn new<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = ApiKeys::default();
        for k in keys {
            let k = k.as_ref().trim();
            if k.is_empty() {
                continue;
            }
            let digest = k.strip_prefix("sha256:").and_then(parse_digest).unwrap_or_else(|| key_digest(k));
            out.keys.push(Entry { digest, role: KeyRole::User });
        }
        out
    }

    /// Keys of `role`, strictly: each entry is a key of at least 16 characters or
    /// `sha256:<64 hex digits>`.
    pub fn parse<I, S>(mut self, role: KeyRole, entries: I) -> Result<Self, ApiKeyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for (index, k) in entries.into_iter().enumerate() {
            let k = k.as_ref().trim();
            let digest = match k.strip_prefix("sha256:") {
                Some(h) => parse_digest(h).ok_or(ApiKeyError { index })?,
                None if k.len() >= 16 => key_digest(k),
                None => return Err(ApiKeyError { index }),
            };
            self.keys.push(Entry { digest, role });
        }
        Ok(self)
    }

    /// No key configured: `POST /v1/sessions` is open.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether `presented` is one of the keys, in time independent of where it differs.
    pub fn contains(&self, presented: &str) -> bool {
        self.identify(presented).is_some()
    }

    /// The identity of `presented`, if it is one of the keys. Every digest is compared, in
    /// constant time each.
    pub fn identify(&self, presented: &str) -> Option<ApiKeyIdentity> {
        let digest = key_digest(presented);
        let mut found: Option<KeyRole> = None;
        for key in &self.keys {
            if constant_time_eq(&key.digest, &digest) {
                // The same key listed as user and admin counts as admin.
                found = Some(match (found, key.role) {
                    (Some(KeyRole::Admin), _) | (_, KeyRole::Admin) => KeyRole::Admin,
                    _ => KeyRole::User,
                });
            }
        }
        found.map(|role| ApiKeyIdentity { id: hex(&digest[..6]), role })
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} configured, <redacted>)", self.keys.len())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The credentials of `Authorization: Bearer <credentials>` (scheme case-insensitive), or
/// `None` when the header is absent, not UTF-8, another scheme, or empty.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, credentials) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let credentials = credentials.trim();
    (!credentials.is_empty()).then_some(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new([" k1 ", "", "key-two"]);
        assert_eq!(keys.len(), 2);
        assert!(keys.contains("k1"));
        assert!(keys.contains("key-two"));
        for wrong in ["", "k", "k12", "key-twO", "key-two "] {
            assert!(!keys.contains(wrong), "{wrong:?} must not match");
        }
        assert!(!ApiKeys::default().contains(""), "no keys means nothing matches");
        assert!(!format!("{keys:?}").contains("k1"), "Debug leaked a key");
    }

    #[test]
    fn keys_are_held_as_digests_with_roles() {
        let digest = hex(&key_digest("admin-key-0123456789"));
        let keys = ApiKeys::default()
            .parse(KeyRole::User, ["user-key-0123456789"])
            .unwrap()
            .parse(KeyRole::Admin, [format!("sha256:{digest}")])
            .unwrap();
        let user = keys.identify("user-key-0123456789").expect("user key");
        assert_eq!(user.role, KeyRole::User);
        assert_eq!(user.id, hex(&key_digest("user-key-0123456789"))[..12]);
        let admin = keys.identify("admin-key-0123456789").expect("the key whose digest is configured");
        assert_eq!(admin.role, KeyRole::Admin);
        assert_eq!(keys.identify(&format!("sha256:{digest}")), None, "the digest itself is not a key");
        assert_eq!(keys.identify("user-key-012345678"), None);
        assert_eq!(ApiKeys::default().parse(KeyRole::User, ["short"]).map(|_| ()), Err(ApiKeyError { index: 0 }));
        assert_eq!(ApiKeys::default().parse(KeyRole::Admin, ["sha256:abc"]).map(|_| ()), Err(ApiKeyError { index: 0 }));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for (value, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer   abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearer", None),
        ] {
            h.insert(AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(bearer(&h), expected, "{value:?}");
        }
    }
}
