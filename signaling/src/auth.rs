//! Credentials on requests: API keys and bearer tokens.
//!
//! API keys guard `POST /v1/sessions` (and, as an operator's alternative to the session token,
//! reading and ending sessions). With no key configured the API is open; the binary allows that
//! only on a loopback bind (API v1). Keys are compared in constant time over every configured
//! key, so timing reveals neither which key nor how much of one matched. `Debug` shows only
//! how many keys there are. Nothing here logs a credential.

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// The configured API keys.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    /// Keys from configuration (e.g. `KOTODAMA_API_KEYS` split on commas); surrounding
    /// whitespace is trimmed and empty entries are dropped.
    pub fn new<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ApiKeys {
            keys: keys.into_iter().map(|k| k.as_ref().trim().as_bytes().to_vec()).filter(|k| !k.is_empty()).collect(),
        }
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
        let presented = presented.as_bytes();
        let mut found = 0u8;
        for key in &self.keys {
            found |= u8::from(constant_time_eq(key, presented));
        }
        found == 1
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
