//! Random identifiers for sessions, peers, ETags and token ids.
//!
//! An id is `<prefix>_<22 base64url chars>`: 128 bits from a CSPRNG (`rand::rng()`, a ChaCha
//! generator seeded and periodically reseeded from the operating system), safe in URLs and
//! headers without escaping. Session and peer URLs are capabilities-by-obscurity as WHIP
//! (RFC 9725) requires, so they must not be guessable.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;

/// Prefix for session ids.
pub const SESSION_PREFIX: &str = "sess";
/// Prefix for peer ids.
pub const PEER_PREFIX: &str = "peer";

/// Longest id accepted from a URL path.
pub const MAX_ID_LEN: usize = 128;

/// A new random id: `<prefix>_<128 random bits, base64url>`, or just the random part when
/// `prefix` is empty.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let random = URL_SAFE_NO_PAD.encode(bytes);
    if prefix.is_empty() { random } else { format!("{prefix}_{random}") }
}

/// A new session id (`sess_...`).
pub fn new_session_id() -> String {
    new_id(SESSION_PREFIX)
}

/// A new peer id (`peer_...`).
pub fn new_peer_id() -> String {
    new_id(PEER_PREFIX)
}

/// Whether `id` could be one of ours: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9_-]`.
///
/// The router answers 404 for anything else without asking the host, and refuses (500) to hand
/// out a host-chosen id that would not survive a URL unescaped.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_url_safe_and_carry_128_bits() {
        let id = new_id("sess");
        let random = id.strip_prefix("sess_").expect("prefix and underscore");
        assert_eq!(random.len(), 22, "16 bytes in unpadded base64url: {id}");
        assert!(is_valid_id(&id), "{id} must be URL safe");
        assert_ne!(new_session_id(), new_session_id());
        assert_eq!(new_id("").len(), 22);
    }

    #[test]
    fn id_validation_rejects_junk() {
        for bad in ["", "a/b", "a b", "é", "a%2F", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(!is_valid_id(bad), "{bad:?} must be rejected");
        }
    }
}
