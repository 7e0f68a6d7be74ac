//! TURN REST credentials: time-limited TURN usernames and passwords minted from a secret shared
//! with the TURN server, so no per-user account exists on it.
//!
//! The scheme is the one of draft-uberti-behave-turn-rest-00 §2.2 as coturn implements it with
//! `use-auth-secret` + `static-auth-secret` (coturn 4.6.1, `turnserver.conf` comments and
//! `../shared/docs/protocols.md`):
//!
//! - `username = "<unix expiry, seconds>:<session id>"`;
//! - `credential = base64(HMAC-SHA1(secret, username))`, the secret taken as its raw bytes.
//!
//! coturn checks the expiry only when an allocation is created or refreshed, so credentials must
//! outlive the session (the default lifetime covers the maximum session duration) and an ICE
//! restart gets fresh ones ([`IceServerSet::ice_servers`] again).
//!
//! Secrets rotate: each server has a list of accepted secrets and the first one signs. Give coturn
//! every secret of the list (one `static-auth-secret` line each) during a rotation, then drop the
//! old one from both. Secrets are never logged, serialised or returned: [`TurnSecret`]'s `Debug`
//! is redacted and only credentials derived from it leave this module.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};

use crate::ice::IceServer;

/// Shortest secret accepted, bytes (coturn accepts any; a short one can be guessed offline from
/// one issued credential).
pub const MIN_SECRET_BYTES: usize = 16;
/// Shortest credential lifetime accepted.
pub const MIN_TTL: Duration = Duration::from_secs(60);

/// A TURN REST shared secret (raw bytes, as coturn's `static-auth-secret`). `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnSecret(Vec<u8>);

impl TurnSecret {
    /// A secret from its raw bytes. Errors: [`TurnConfigError::ShortSecret`] below
    /// [`MIN_SECRET_BYTES`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, TurnConfigError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(TurnConfigError::ShortSecret { len: bytes.len() });
        }
        Ok(TurnSecret(bytes))
    }
}

impl std::fmt::Debug for TurnSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TurnSecret(<redacted>)")
    }
}

/// Why a STUN/TURN server configuration is unusable. Each names the URL or value at fault and
/// is reported at start by the server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TurnConfigError {
    /// A server entry without URLs.
    #[error("no URLs")]
    NoUrls,
    /// A URL that is not `stun:`, `stuns:`, `turn:` or `turns:` `host[:port][?transport=udp|tcp]`
    /// (RFC 7064 §3.1, RFC 7065 §3.1).
    #[error("`{url}` is not a STUN/TURN URL: {reason}")]
    BadUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `turn:`/`turns:` URLs need a shared secret to mint credentials.
    #[error("`{url}` is a TURN URL but no shared secret is configured")]
    MissingSecret {
        /// The first TURN URL of the entry.
        url: String,
    },
    /// A secret shorter than [`MIN_SECRET_BYTES`].
    #[error("a shared secret of {len} bytes is too short (at least {MIN_SECRET_BYTES})")]
    ShortSecret {
        /// Its length, bytes.
        len: usize,
    },
    /// A credential lifetime below [`MIN_TTL`].
    #[error("credential lifetime {secs} s is below {} s", MIN_TTL.as_secs())]
    ShortTtl {
        /// The configured lifetime, seconds.
        secs: u64,
    },
}

/// The kind of a STUN/TURN URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlKind {
    /// `stun:` / `stuns:`: no credentials.
    Stun,
    /// `turn:` / `turns:`: needs credentials.
    Turn,
}

/// Check one URL: scheme `stun`/`stuns`/`turn`/`turns`, a host (name, IPv4 or `[IPv6]`), an
/// optional port 1..=65535 and, for TURN only, an optional `?transport=udp|tcp`
/// (RFC 7064 §3.1, RFC 7065 §3.1).
pub fn check_url(url: &str) -> Result<UrlKind, TurnConfigError> {
    let bad = |reason| TurnConfigError::BadUrl { url: url.to_owned(), reason };
    let (scheme, rest) = url.split_once(':').ok_or_else(|| bad("no scheme"))?;
    let kind = match scheme {
        "stun" | "stuns" => UrlKind::Stun,
        "turn" | "turns" => UrlKind::Turn,
        _ => return Err(bad("the scheme must be stun, stuns, turn or turns")),
    };
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    match (kind, query) {
        (_, None) => {}
        (UrlKind::Turn, Some("transport=udp" | "transport=tcp")) => {}
        (UrlKind::Turn, Some(_)) => return Err(bad("the only query allowed is ?transport=udp or ?transport=tcp")),
        (UrlKind::Stun, Some(_)) => return Err(bad("a STUN URL takes no query")),
    }
    if authority.starts_with("//") || authority.contains('@') || authority.contains('/') {
        return Err(bad("write scheme:host[:port], without // or a path"));
    }
    let (host, port) = split_host_port(authority).ok_or_else(|| bad("the host is missing or malformed"))?;
    if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c)) {
        return Err(bad("the host is missing or malformed"));
    }
    if let Some(port) = port
        && port.parse::<u16>().ok().filter(|p| *p > 0).is_none()
    {
        return Err(bad("the port must be 1..=65535"));
    }
    Ok(kind)
}

/// `host[:port]` or `[v6][:port]` into its parts.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    Some(match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    })
}

/// One configured STUN/TURN server entry: its URLs, its accepted secrets (the first signs) and
/// the lifetime of the credentials it gets.
#[derive(Debug, Clone)]
pub struct TurnServer {
    urls: Vec<String>,
    secrets: Vec<TurnSecret>,
    ttl: Duration,
}

impl TurnServer {
    /// An entry. `secrets` may be empty only when every URL is `stun:`/`stuns:`.
    /// Errors: [`TurnConfigError`] naming the URL or value at fault.
    pub fn new(urls: Vec<String>, secrets: Vec<TurnSecret>, ttl: Duration) -> Result<Self, TurnConfigError> {
        if urls.is_empty() {
            return Err(TurnConfigError::NoUrls);
        }
        for url in &urls {
            if check_url(url)? == UrlKind::Turn && secrets.is_empty() {
                return Err(TurnConfigError::MissingSecret { url: url.clone() });
            }
        }
        if ttl < MIN_TTL {
            return Err(TurnConfigError::ShortTtl { secs: ttl.as_secs() });
        }
        Ok(TurnServer { urls, secrets, ttl })
    }

    /// The `RTCIceServer` entry for `session_id` at `now`: with minted credentials when this
    /// entry has a secret, bare URLs otherwise.
    pub fn ice_server(&self, session_id: &str, now: SystemTime) -> IceServer {
        let Some(signing) = self.secrets.first() else {
            return IceServer { urls: self.urls.clone(), username: None, credential: None };
        };
        let expiry = now.duration_since(UNIX_EPOCH).unwrap_or_default() + self.ttl;
        let username = format!("{}:{session_id}", expiry.as_secs());
        let credential = credential(signing, &username);
        IceServer::turn(self.urls.clone(), username, credential)
    }

    /// Whether `credential` is valid for `username` at `now` under one of the accepted secrets
    /// (what coturn checks at allocation time).
    pub fn accepts(&self, username: &str, credential_b64: &str, now: SystemTime) -> bool {
        let Some(expiry) = username.split(':').next().and_then(|e| e.parse::<u64>().ok()) else {
            return false;
        };
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        expiry > now && self.secrets.iter().any(|s| credential(s, username) == credential_b64)
    }
}

/// `base64(HMAC-SHA1(secret, username))`, the TURN REST password for `username`.
pub fn credential(secret: &TurnSecret, username: &str) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&secret.0).expect("HMAC accepts any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Every configured STUN/TURN server; mints what `POST /v1/sessions` returns in `ice_servers`
/// and what an ICE restart announces in `Link` headers.
#[derive(Debug, Clone, Default)]
pub struct IceServerSet {
    servers: Vec<TurnServer>,
}

impl IceServerSet {
    /// A set of entries (may be empty: no STUN/TURN server, host candidates only).
    pub fn new(servers: Vec<TurnServer>) -> Self {
        IceServerSet { servers }
    }

    /// No server configured.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The entries, in configuration order.
    pub fn servers(&self) -> &[TurnServer] {
        &self.servers
    }

    /// `ice_servers` for `session_id`, minted at `now`.
    pub fn ice_servers(&self, session_id: &str, now: SystemTime) -> Vec<IceServer> {
        self.servers.iter().map(|s| s.ice_server(session_id, now)).collect()
    }

    /// `Link` header values announcing `servers` (RFC 9725 §4.6): one per URL,
    /// `<url>; rel="ice-server"` plus `username`, `credential` and
    /// `credential-type="password"` when it has credentials.
    pub fn link_values(servers: &[IceServer]) -> Vec<String> {
        let mut out = Vec::new();
        for server in servers {
            for url in &server.urls {
                let mut value = format!("<{url}>; rel=\"ice-server\"");
                if let (Some(u), Some(c)) = (&server.username, &server.credential) {
                    value.push_str(&format!("; username=\"{u}\"; credential=\"{c}\"; credential-type=\"password\""));
                }
                out.push(value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> TurnSecret {
        TurnSecret::new(s.as_bytes()).expect("long enough")
    }

    #[test]
    fn credential_is_base64_hmac_sha1_of_the_username() {
        // Reference value computed independently:
        // printf '1700000000:sess_x' | openssl dgst -sha1 -hmac 'north-secret-0123456789' -binary | base64
        let c = credential(&secret("north-secret-0123456789"), "1700000000:sess_x");
        assert_eq!(c, "6uY/tEOSduzMvELMUagvrrQ/h1U=");
    }

    #[test]
    fn username_is_expiry_then_session_and_the_first_secret_signs() {
        let server = TurnServer::new(
            vec!["turn:turn.example.org:3478?transport=udp".into(), "turns:turn.example.org:5349".into()],
            vec![secret("new-secret-0123456789"), secret("old-secret-0123456789")],
            Duration::from_secs(3600),
        )
        .unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ice = server.ice_server("sess_x", now);
        assert_eq!(ice.urls.len(), 2);
        let username = ice.username.clone().unwrap();
        assert_eq!(username, "1700003600:sess_x");
        assert_eq!(ice.credential.as_deref(), Some(credential(&secret("new-secret-0123456789"), &username).as_str()));
        assert!(server.accepts(&username, ice.credential.as_deref().unwrap(), now));
        // The old secret's credential is still accepted during the rotation; expiry is not.
        let old = credential(&secret("old-secret-0123456789"), &username);
        assert!(server.accepts(&username, &old, now));
        assert!(!server.accepts(&username, &old, now + Duration::from_secs(3600)));
        assert!(!server.accepts(&username, "AAAA", now));
    }

    #[test]
    fn stun_only_entries_carry_no_credentials_and_turn_needs_a_secret() {
        let stun = TurnServer::new(vec!["stun:stun.example.org".into()], vec![], Duration::from_secs(600)).unwrap();
        let json = serde_json::to_string(&stun.ice_server("s", SystemTime::now())).unwrap();
        assert_eq!(json, r#"{"urls":["stun:stun.example.org"]}"#);
        let e = TurnServer::new(vec!["turn:t.example.org".into()], vec![], Duration::from_secs(600)).unwrap_err();
        assert_eq!(e, TurnConfigError::MissingSecret { url: "turn:t.example.org".into() });
        let e = TurnServer::new(vec!["stun:s".into()], vec![], Duration::from_secs(5)).unwrap_err();
        assert_eq!(e, TurnConfigError::ShortTtl { secs: 5 });
        assert_eq!(TurnSecret::new("short").unwrap_err(), TurnConfigError::ShortSecret { len: 5 });
    }

    #[test]
    fn urls_are_checked() {
        for good in [
            "stun:stun.l.google.com:19302",
            "turn:10.0.0.1?transport=tcp",
            "turns:turn.example.org:443?transport=tcp",
            "turn:[2001:db8::1]:3478",
            "stuns:[::1]",
        ] {
            assert!(check_url(good).is_ok(), "{good}");
        }
        for bad in [
            "http://x",
            "turn://host:3478",
            "turn:",
            "turn:host:0",
            "turn:host:99999",
            "stun:host?transport=udp",
            "turn:host?transport=sctp",
            "turn:user@host",
            "turn:[::1",
        ] {
            assert!(matches!(check_url(bad), Err(TurnConfigError::BadUrl { .. })), "{bad}");
        }
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let server =
            TurnServer::new(vec!["turn:t".into()], vec![secret("do-not-print-me-0123")], Duration::from_secs(600))
                .unwrap();
        let set = IceServerSet::new(vec![server]);
        let shown = format!("{set:?}");
        assert!(!shown.contains("do-not-print-me"), "{shown}");
        let ice = set.ice_servers("s", SystemTime::now());
        assert!(!format!("{ice:?}").contains(ice[0].credential.as_deref().unwrap()));
    }

    #[test]
    fn link_values_follow_rfc_9725() {
        let servers = vec![
            IceServer::stun("stun:s.example.org"),
            IceServer::turn(vec!["turn:t.example.org?transport=udp".into()], "1:s", "c="),
        ];
        assert_eq!(
            IceServerSet::link_values(&servers),
            vec![
                r#"<stun:s.example.org>; rel="ice-server""#.to_owned(),
                r#"<turn:t.example.org?transport=udp>; rel="ice-server"; username="1:s"; credential="c="; credential-type="password""#
                    .to_owned(),
            ]
        );
    }
}
