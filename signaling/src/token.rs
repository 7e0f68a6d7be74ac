//! Session tokens: short-lived JWTs scoped to one session (HS256 by default; RS256 or EdDSA
//! with configured keys, identified by `kid` so keys can be rotated).
//!
//! `POST /v1/sessions` issues one; every later call about that session presents it as
//! `Authorization: Bearer <token>`. Claims: `sub` = session id, `scope` = `"session"`, `iat`,
//! `nbf`, `exp` (default 10 minutes after issue) and a random `jti`.
//!
//! Keys: one signing key and any number of verify-only keys (the previous ones, during a
//! rotation), each with its own algorithm and an optional `kid`. Verification reads the header
//! itself before any crypto, picks the key by `kid` (no `kid`: the key configured without
//! one) and requires the header's `alg` to be exactly that key's algorithm: `alg: none`, an
//! HS256 token presented against an RSA key (the HS/RS key-confusion attack: the public key
//! used as an HMAC secret) and anything else are [`TokenError::BadAlgorithm`]; an unknown `kid`
//! is [`TokenError::UnknownKey`]. Then the signature, `scope`, `sub` (must equal the session id
//! in the path), `nbf` (5 s clock-skew leeway for multi-node clocks) and `exp`:
//!
//! * [`VerifyMode::Connect`] (`POST .../offer`): `exp` is strict, no leeway. The token is a
//!   ticket to connect within its TTL.
//! * [`VerifyMode::Manage`] (PATCH, DELETE, GET of a session that already exists): the token is
//!   accepted up to `manage_grace` (default 1 h, the maximum session duration) past `exp`. A
//!   conversation outlives the 10-minute connect window, and the client must still be able to
//!   end it, restart ICE or read its transcript with the only credential it has. Once the
//!   session has ended, the host answers 404 anyway, so the grace grants nothing beyond the
//!   session's own lifetime.
//!
//! Tokens never appear in `Debug` output or logs: [`SessionToken`] and [`TokenSecret`] redact.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::id::new_id;

/// The only `scope` claim value a session token carries.
pub const SESSION_SCOPE: &str = "session";
/// Default time a token stays valid for connecting: 10 minutes.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(10 * 60);
/// Default grace past `exp` for [`VerifyMode::Manage`]: 1 hour, the maximum session duration.
pub const DEFAULT_MANAGE_GRACE: Duration = Duration::from_secs(60 * 60);
/// Leeway on `nbf` for clock skew between nodes.
pub const NBF_LEEWAY: Duration = Duration::from_secs(5);
/// Shortest HS256 secret accepted from configuration (256 bits).
pub const MIN_SECRET_LEN: usize = 32;

/// The HMAC secret. `Debug` never shows it.
#[derive(Clone)]
pub struct TokenSecret(Vec<u8>);

impl TokenSecret {
    /// A secret from configuration; at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, TokenConfigError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(TokenConfigError::SecretTooShort { len: bytes.len(), min: MIN_SECRET_LEN });
        }
        Ok(TokenSecret(bytes))
    }

    /// 32 random bytes from a CSPRNG. Tokens then die with the process (fine for one node;
    /// a cluster must configure a shared secret).
    pub fn random() -> Self {
        let mut bytes = vec![0u8; MIN_SECRET_LEN];
        rand::rng().fill_bytes(&mut bytes);
        TokenSecret(bytes)
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// Key material of one token key. `Debug` redacts secrets and private keys.
#[derive(Clone)]
#[non_exhaustive]
pub enum KeyMaterial {
    /// HS256 with a shared secret.
    Hs256(TokenSecret),
    /// RS256: PEM public key, and the PEM private key (PKCS#1 or PKCS#8) when it signs.
    Rs256 {
        /// Private key PEM (signing key only).
        private_pem: Option<Vec<u8>>,
        /// Public key PEM.
        public_pem: Vec<u8>,
    },
    /// EdDSA (Ed25519): PEM public key, and the PKCS#8 PEM private key when it signs.
    EdDsa {
        /// Private key PEM (signing key only).
        private_pem: Option<Vec<u8>>,
        /// Public key PEM.
        public_pem: Vec<u8>,
    },
}

impl KeyMaterial {
    fn algorithm(&self) -> Algorithm {
        match self {
            KeyMaterial::Hs256(_) => Algorithm::HS256,
            KeyMaterial::Rs256 { .. } => Algorithm::RS256,
            KeyMaterial::EdDsa { .. } => Algorithm::EdDSA,
        }
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyMaterial::Hs256(_) => f.write_str("Hs256(<redacted>)"),
            KeyMaterial::Rs256 { .. } => f.write_str("Rs256(<redacted>)"),
            KeyMaterial::EdDsa { .. } => f.write_str("EdDsa(<redacted>)"),
        }
    }
}

/// One token key: its `kid` (put in the header of tokens it signs) and material.
#[derive(Debug, Clone)]
pub struct TokenKey {
    /// Key id; `None` only for a single un-rotated key.
    pub kid: Option<String>,
    /// The key.
    pub material: KeyMaterial,
}

/// A key set: the current signing key and the verify-only keys still accepted.
#[derive(Debug, Clone)]
pub struct TokenKeys {
    /// Signs new tokens (needs its private key) and verifies them.
    pub signing: TokenKey,
    /// Verify only: tokens signed by previous keys stay valid until they expire.
    pub previous: Vec<TokenKey>,
}

/// Token settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// HS256 signing secret when `keys` is `None`; `None` = [`TokenSecret::random`].
    pub secret: Option<TokenSecret>,
    /// An explicit key set (RS256/EdDSA/HS256 with `kid`s); overrides `secret`.
    pub keys: Option<TokenKeys>,
    /// Lifetime of a token for connecting (`exp - iat`).
    pub ttl: Duration,
    /// How long past `exp` a token still works in [`VerifyMode::Manage`].
    pub manage_grace: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig { secret: None, keys: None, ttl: DEFAULT_TOKEN_TTL, manage_grace: DEFAULT_MANAGE_GRACE }
    }
}

/// A bad token configuration, found at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenConfigError {
    /// The configured secret is too short for HS256.
    #[error("token secret is {len} bytes; it must be at least {min} bytes (or leave it unset for a random one)")]
    SecretTooShort {
        /// Bytes given.
        len: usize,
        /// Bytes required.
        min: usize,
    },
    /// TTL of zero or too large to represent.
    #[error("token ttl must be between 1 second and 1 year")]
    BadTtl,
    /// A key could not be loaded.
    #[error("token key {kid}: {reason}")]
    BadKey {
        /// The key's `kid` (or `(none)`).
        kid: String,
        /// What is wrong.
        reason: String,
    },
    /// Two keys share a `kid` (or two keys have none).
    #[error("two token keys have the kid {0}")]
    DuplicateKid(String),
}

/// An encoded session token. `Debug` redacts it; read it with [`SessionToken::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// Wrap a token string (e.g. from an `Authorization` header).
    pub fn new(token: impl Into<String>) -> Self {
        SessionToken(token.into())
    }

    /// The token itself, for the response body or a header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

impl Serialize for SessionToken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The JWT.
    pub token: SessionToken,
    /// When it stops working for [`VerifyMode::Connect`].
    pub expires_at: OffsetDateTime,
    /// Its unique id (`jti`), e.g. for revocation lists.
    pub jti: String,
}

/// What a verification is for; decides how `exp` is enforced (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Connecting (POST offer): `exp` strictly.
    Connect,
    /// Managing an existing session (PATCH, DELETE, GET): `exp` + `manage_grace`.
    Manage,
}

/// The claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Session id.
    pub sub: String,
    /// Always [`SESSION_SCOPE`].
    pub scope: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Not before, unix seconds.
    pub nbf: i64,
    /// Expires, unix seconds.
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
}

/// Why a token was refused. All of them are 401 on the wire; the variant is for logs and the
/// problem detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No bearer token was presented.
    #[error("no bearer token")]
    Missing,
    /// Not a compact JWS, bad base64/JSON, or missing claims.
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify with our key.
    #[error("bad token signature")]
    BadSignature,
    /// Past `exp` (plus the grace in manage mode).
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// `sub` is another session.
    #[error("token is for another session")]
    WrongSession,
    /// `scope` is not `session`.
    #[error("token has the wrong scope")]
    WrongScope,
    /// `alg` is not the algorithm of the key it names (`none`, HS256 against an RSA key, ...).
    #[error("token algorithm not accepted")]
    BadAlgorithm,
    /// `kid` names no configured key.
    #[error("token signed by an unknown key")]
    UnknownKey,
    /// The token's single-use offer was already made (`jti` seen before).
    #[error("token already used to connect")]
    Replayed,
}

impl TokenError {
    /// Short machine-readable code, used as the problem `code`.
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Malformed => "token_malformed",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongSession => "token_wrong_session",
            TokenError::WrongScope => "token_wrong_scope",
            TokenError::BadAlgorithm => "token_bad_algorithm",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::Replayed => "token_replayed",
        }
    }
}

/// A key that verifies.
#[derive(Clone)]
struct Verifier {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Issues and verifies session tokens. `Debug` redacts the keys.
#[derive(Clone)]
pub struct TokenIssuer {
    encoding: EncodingKey,
    sign_alg: Algorithm,
    sign_kid: Option<String>,
    verifiers: Vec<Verifier>,
    ttl: Duration,
    manage_grace: Duration,
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("key", &"<redacted>")
            .field("alg", &self.sign_alg)
            .field("kid", &self.sign_kid)
            .field("verify_keys", &self.verifiers.len())
            .field("ttl", &self.ttl)
            .field("manage_grace", &self.manage_grace)
            .finish()
    }
}

fn bad_key(kid: &Option<String>, reason: impl fmt::Display) -> TokenConfigError {
    TokenConfigError::BadKey { kid: kid.clone().unwrap_or_else(|| "(none)".into()), reason: reason.to_string() }
}

fn decoding_key(key: &TokenKey) -> Result<DecodingKey, TokenConfigError> {
    match &key.material {
        KeyMaterial::Hs256(secret) => Ok(DecodingKey::from_secret(&secret.0)),
        KeyMaterial::Rs256 { public_pem, .. } => {
            DecodingKey::from_rsa_pem(public_pem).map_err(|e| bad_key(&key.kid, format!("RSA public key: {e}")))
        }
        KeyMaterial::EdDsa { public_pem, .. } => {
            DecodingKey::from_ed_pem(public_pem).map_err(|e| bad_key(&key.kid, format!("Ed25519 public key: {e}")))
        }
    }
}

fn encoding_key(key: &TokenKey) -> Result<EncodingKey, TokenConfigError> {
    let missing = || bad_key(&key.kid, "the signing key needs its private key");
    match &key.material {
        KeyMaterial::Hs256(secret) => Ok(EncodingKey::from_secret(&secret.0)),
        KeyMaterial::Rs256 { private_pem, .. } => {
            EncodingKey::from_rsa_pem(private_pem.as_deref().ok_or_else(missing)?)
                .map_err(|e| bad_key(&key.kid, format!("RSA private key: {e}")))
        }
        KeyMaterial::EdDsa { private_pem, .. } => EncodingKey::from_ed_pem(private_pem.as_deref().ok_or_else(missing)?)
            .map_err(|e| bad_key(&key.kid, format!("Ed25519 private key: {e}"))),
    }
}

impl TokenIssuer {
    /// Build from configuration; a missing secret becomes a random one.
    pub fn new(config: TokenConfig) -> Result<Self, TokenConfigError> {
        const ONE_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        if config.ttl.is_zero() || config.ttl > ONE_YEAR || config.manage_grace > ONE_YEAR {
            return Err(TokenConfigError::BadTtl);
        }
        let Some(keys) = config.keys else {
            let secret = config.secret.unwrap_or_else(TokenSecret::random);
            return Ok(Self::from_parts(&secret, config.ttl, config.manage_grace));
        };
        let encoding = encoding_key(&keys.signing)?;
        let mut verifiers: Vec<Verifier> = Vec::new();
        for key in std::iter::once(&keys.signing).chain(&keys.previous) {
            if verifiers.iter().any(|v| v.kid == key.kid) {
                return Err(TokenConfigError::DuplicateKid(key.kid.clone().unwrap_or_else(|| "(none)".into())));
            }
            verifiers.push(Verifier { kid: key.kid.clone(), alg: key.material.algorithm(), key: decoding_key(key)? });
        }
        let issuer = TokenIssuer {
            encoding,
            sign_alg: keys.signing.material.algorithm(),
            sign_kid: keys.signing.kid.clone(),
            verifiers,
            ttl: config.ttl,
            manage_grace: config.manage_grace,
        };
        // The private and public halves must belong together: sign and verify once.
        let probe = issuer.issue("probe").map_err(|_| bad_key(&keys.signing.kid, "cannot sign"))?;
        issuer
            .verify(probe.token.expose(), "probe", VerifyMode::Connect)
            .map_err(|_| bad_key(&keys.signing.kid, "the public key does not match the private key"))?;
        Ok(issuer)
    }

    /// Defaults ([`DEFAULT_TOKEN_TTL`], [`DEFAULT_MANAGE_GRACE`]) with a random secret.
    pub fn random() -> Self {
        Self::from_parts(&TokenSecret::random(), DEFAULT_TOKEN_TTL, DEFAULT_MANAGE_GRACE)
    }

    fn from_parts(secret: &TokenSecret, ttl: Duration, manage_grace: Duration) -> Self {
        TokenIssuer {
            encoding: EncodingKey::from_secret(&secret.0),
            sign_alg: Algorithm::HS256,
            sign_kid: None,
            verifiers: vec![Verifier { kid: None, alg: Algorithm::HS256, key: DecodingKey::from_secret(&secret.0) }],
            ttl,
            manage_grace,
        }
    }

    /// Lifetime of new tokens.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issue a token for `session_id`, valid from now for [`TokenConfig::ttl`].
    pub fn issue(&self, session_id: &str) -> Result<IssuedToken, TokenIssueError> {
        self.issue_at(session_id, OffsetDateTime::now_utc())
    }

    /// [`TokenIssuer::issue`] at an explicit `now` (tests, virtual time).
    pub fn issue_at(&self, session_id: &str, now: OffsetDateTime) -> Result<IssuedToken, TokenIssueError> {
        let iat = now.unix_timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).map_err(|_| TokenIssueError)?;
        let exp = iat.checked_add(ttl).ok_or(TokenIssueError)?;
        let claims =
            Claims { sub: session_id.to_owned(), scope: SESSION_SCOPE.to_owned(), iat, nbf: iat, exp, jti: new_id("") };
        self.sign(&claims).map(|token| IssuedToken {
            token,
            expires_at: OffsetDateTime::from_unix_timestamp(exp).unwrap_or(now),
            jti: claims.jti,
        })
    }

    /// Sign arbitrary claims with this issuer's key (tests use it to craft bad tokens).
    pub fn sign(&self, claims: &Claims) -> Result<SessionToken, TokenIssueError> {
        let mut header = Header::new(self.sign_alg);
        header.kid = self.sign_kid.clone();
        jsonwebtoken::encode(&header, claims, &self.encoding).map(SessionToken).map_err(|_| TokenIssueError)
    }

    /// Verify `token` for the session `expected_session_id`.
    pub fn verify(&self, token: &str, expected_session_id: &str, mode: VerifyMode) -> Result<Claims, TokenError> {
        self.verify_at(token, expected_session_id, mode, OffsetDateTime::now_utc())
    }

    /// [`TokenIssuer::verify`] at an explicit `now`.
    pub fn verify_at(
        &self,
        token: &str,
        expected_session_id: &str,
        mode: VerifyMode,
        now: OffsetDateTime,
    ) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let (alg, kid) = check_header(token)?;
        let verifier = self.verifiers.iter().find(|v| v.kid == kid).ok_or(TokenError::UnknownKey)?;
        if alg != alg_name(verifier.alg) {
            return Err(TokenError::BadAlgorithm);
        }

        // Signature (and shape) only: time and subject are checked below against our own
        // clock and mode, which the library cannot express.
        let mut validation = Validation::new(verifier.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, &verifier.key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm | ErrorKind::InvalidAlgorithmName => {
                TokenError::BadAlgorithm
            }
            _ => TokenError::Malformed,
        })?;
        let claims = data.claims;

        if claims.scope != SESSION_SCOPE {
            return Err(TokenError::WrongScope);
        }
        if claims.sub != expected_session_id {
            return Err(TokenError::WrongSession);
        }
        let now = now.unix_timestamp();
        let leeway = secs(NBF_LEEWAY);
        if claims.nbf > now.saturating_add(leeway) {
            return Err(TokenError::NotYetValid);
        }
        let deadline = match mode {
            VerifyMode::Connect => claims.exp,
            VerifyMode::Manage => claims.exp.saturating_add(secs(self.manage_grace)),
        };
        if now >= deadline {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Signing failed (cannot happen with an HMAC key and these claims; typed anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("could not sign the session token")]
pub struct TokenIssueError;

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::RS256 => "RS256",
        Algorithm::EdDSA => "EdDSA",
        _ => "HS256",
    }
}

/// Read the JOSE header ourselves so that the algorithm decision never depends on what the
/// library knows how to parse: returns `alg` (a string; the caller compares it with the key's)
/// and `kid`; no `crit` extensions.
fn check_header(token: &str) -> Result<(String, Option<String>), TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenError::Malformed)?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    let object = header.as_object().ok_or(TokenError::Malformed)?;
    let alg = match object.get("alg") {
        Some(serde_json::Value::String(alg)) if ["HS256", "RS256", "EdDSA"].contains(&alg.as_str()) => alg.clone(),
        Some(_) => return Err(TokenError::BadAlgorithm),
        None => return Err(TokenError::Malformed),
    };
    let kid = match object.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    if object.contains_key("crit") {
        return Err(TokenError::Malformed);
    }
    Ok((alg, kid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    const SID: &str = "sess_test";

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(TokenConfig {
            secret: Some(TokenSecret::new(vec![7u8; 32]).expect("32 bytes is enough")),
            ..TokenConfig::default()
        })
        .expect("valid config")
    }

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn claims_json(now: i64) -> String {
        format!(r#"{{"sub":"{SID}","scope":"session","iat":{now},"nbf":{now},"exp":{},"jti":"j"}}"#, now + 600)
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn issued_token_verifies_for_its_session() {
        let i = issuer();
        let t = i.issue(SID).expect("issue");
        let claims = i.verify(t.token.expose(), SID, VerifyMode::Connect).expect("fresh token must verify");
        assert_eq!(claims.sub, SID);
        assert_eq!(claims.scope, "session");
        assert_eq!(claims.exp - claims.iat, 600, "default ttl is 10 minutes");
        assert_eq!(claims.jti, t.jti);
        assert_eq!(t.expires_at.unix_timestamp(), claims.exp);
        assert!(t.jti.len() >= 22, "jti carries 128 random bits");
    }

    #[test]
    fn missing_token_is_missing() {
        assert_eq!(issuer().verify("", SID, VerifyMode::Connect), Err(TokenError::Missing));
    }

    #[test]
    fn garbage_is_malformed() {
        let i = issuer();
        for bad in ["abc", "a.b", "a.b.c", "a.b.c.d.e", "!!!.???.***", "e30.e30.e30"] {
            assert_eq!(i.verify(bad, SID, VerifyMode::Connect), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn token_from_another_key_has_bad_signature() {
        let other = TokenIssuer::new(TokenConfig::default()).expect("random key");
        let t = other.issue(SID).expect("issue");
        assert_eq!(issuer().verify(t.token.expose(), SID, VerifyMode::Connect), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_payload_has_bad_signature() {
        let i = issuer();
        let t = i.issue(SID).expect("issue");
        let mut parts: Vec<String> = t.token.expose().split('.').map(str::to_owned).collect();
        parts[1] = b64(&claims_json(now().unix_timestamp()).replace(SID, "sess_other"));
        let forged = parts.join(".");
        assert_eq!(i.verify(&forged, "sess_other", VerifyMode::Connect), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_is_rejected() {
        let n = now().unix_timestamp();
        for header in [r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#, r#"{"alg":"HS256 "}"#] {
            let token = format!("{}.{}.", b64(header), b64(&claims_json(n)));
            assert_eq!(issuer().verify(&token, SID, VerifyMode::Connect), Err(TokenError::BadAlgorithm), "{header}");
        }
    }

    #[test]
    fn rs256_and_other_algorithms_are_rejected_before_any_crypto() {
        let i = issuer();
        let n = now().unix_timestamp();
        for alg in ["RS256", "ES256", "HS384", "HS512", "PS256", "EdDSA"] {
            let header = b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            let payload = b64(&claims_json(n));
            // A signature that would be valid if the HMAC key were (mis)used for this alg.
            let token = format!("{header}.{payload}.{}", b64("sig"));
            assert_eq!(i.verify(&token, SID, VerifyMode::Connect), Err(TokenError::BadAlgorithm), "{alg}");
        }
        let numeric = format!("{}.{}.x", b64(r#"{"alg":256}"#), b64(&claims_json(n)));
        assert_eq!(i.verify(&numeric, SID, VerifyMode::Connect), Err(TokenError::BadAlgorithm));
    }

    #[test]
    fn crit_header_is_rejected() {
        let token =
            format!("{}.{}.x", b64(r#"{"alg":"HS256","crit":["exp"]}"#), b64(&claims_json(now().unix_timestamp())));
        assert_eq!(issuer().verify(&token, SID, VerifyMode::Connect), Err(TokenError::Malformed));
    }

    #[test]
    fn standard_base64_header_is_malformed() {
        // `+`/`/`/`=` are not base64url.
        let header = STANDARD.encode(r#"{"alg":"HS256","typ":"JWT","x":"??>>"}"#);
        let token = format!("{header}.e30.x");
        assert_eq!(issuer().verify(&token, SID, VerifyMode::Connect), Err(TokenError::Malformed));
    }

    #[test]
    fn token_for_another_session_is_wrong_session() {
        let i = issuer();
        let t = i.issue("sess_other").expect("issue");
        assert_eq!(i.verify(t.token.expose(), SID, VerifyMode::Manage), Err(TokenError::WrongSession));
    }

    #[test]
    fn wrong_scope_is_rejected() {
        let i = issuer();
        let n = now().unix_timestamp();
        let t = i
            .sign(&Claims { sub: SID.into(), scope: "admin".into(), iat: n, nbf: n, exp: n + 600, jti: "j".into() })
            .expect("sign");
        assert_eq!(i.verify(t.expose(), SID, VerifyMode::Connect), Err(TokenError::WrongScope));
    }

    #[test]
    fn missing_claims_are_malformed() {
        let i = issuer();
        #[derive(Serialize)]
        struct Partial<'a> {
            sub: &'a str,
            exp: i64,
        }
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Partial { sub: SID, exp: now().unix_timestamp() + 60 },
            &i.encoding,
        )
        .expect("sign");
        assert_eq!(i.verify(&token, SID, VerifyMode::Connect), Err(TokenError::Malformed));
    }

    #[test]
    fn expiry_is_strict_for_connect_and_graceful_for_manage() {
        let i = issuer();
        let issued_at = now() - time::Duration::minutes(11);
        let t = i.issue_at(SID, issued_at).expect("issue");
        assert_eq!(
            i.verify(t.token.expose(), SID, VerifyMode::Connect),
            Err(TokenError::Expired),
            "an 11-minute-old token must not connect"
        );
        assert!(
            i.verify(t.token.expose(), SID, VerifyMode::Manage).is_ok(),
            "an 11-minute-old token must still manage its session"
        );
        let exp = t.expires_at;
        assert_eq!(
            i.verify_at(t.token.expose(), SID, VerifyMode::Connect, exp),
            Err(TokenError::Expired),
            "exp itself is already expired"
        );
        assert!(i.verify_at(t.token.expose(), SID, VerifyMode::Connect, exp - time::Duration::seconds(1)).is_ok());
        let end_of_grace = exp + time::Duration::hours(1);
        assert_eq!(
            i.verify_at(t.token.expose(), SID, VerifyMode::Manage, end_of_grace),
            Err(TokenError::Expired),
            "manage grace ends after one hour"
        );
    }

    #[test]
    fn future_nbf_is_not_yet_valid() {
        let i = issuer();
        let future = now() + time::Duration::minutes(5);
        let t = i.issue_at(SID, future).expect("issue");
        assert_eq!(i.verify(t.token.expose(), SID, VerifyMode::Connect), Err(TokenError::NotYetValid));
        let slightly = i.issue_at(SID, now() + time::Duration::seconds(2)).expect("issue");
        assert!(
            i.verify(slightly.token.expose(), SID, VerifyMode::Connect).is_ok(),
            "2 s of clock skew is within the nbf leeway"
        );
    }

    #[test]
    fn debug_output_never_contains_the_token_or_key() {
        let i = issuer();
        let t = i.issue(SID).expect("issue");
        let debug = format!("{t:?} {i:?} {:?}", TokenSecret::new(vec![b'k'; 32]));
        assert!(!debug.contains(t.token.expose()), "token leaked: {debug}");
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains("kkkk"), "secret leaked: {debug}");
    }

    const RSA_A: &[u8] = include_bytes!("../tests/fixtures/keys/rsa_a.pem");
    const RSA_A_PUB: &[u8] = include_bytes!("../tests/fixtures/keys/rsa_a.pub.pem");
    const RSA_B: &[u8] = include_bytes!("../tests/fixtures/keys/rsa_b.pem");
    const RSA_B_PUB: &[u8] = include_bytes!("../tests/fixtures/keys/rsa_b.pub.pem");
    const ED_A: &[u8] = include_bytes!("../tests/fixtures/keys/ed_a.pem");
    const ED_A_PUB: &[u8] = include_bytes!("../tests/fixtures/keys/ed_a.pub.pem");

    fn rsa(kid: &str, private: &[u8], public: &[u8]) -> TokenKey {
        TokenKey {
            kid: Some(kid.into()),
            material: KeyMaterial::Rs256 { private_pem: Some(private.to_vec()), public_pem: public.to_vec() },
        }
    }

    fn keyed(signing: TokenKey, previous: Vec<TokenKey>) -> TokenIssuer {
        TokenIssuer::new(TokenConfig { keys: Some(TokenKeys { signing, previous }), ..TokenConfig::default() })
            .expect("valid key set")
    }

    fn header_of(token: &str) -> serde_json::Value {
        let h = token.split('.').next().unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
    }

    #[test]
    fn rs256_and_eddsa_tokens_carry_their_kid_and_verify() {
        let r = keyed(rsa("r1", RSA_A, RSA_A_PUB), vec![]);
        let t = r.issue(SID).expect("issue");
        assert_eq!(header_of(t.token.expose())["alg"], "RS256");
        assert_eq!(header_of(t.token.expose())["kid"], "r1");
        assert!(r.verify(t.token.expose(), SID, VerifyMode::Connect).is_ok());

        let ed = TokenKey {
            kid: Some("e1".into()),
            material: KeyMaterial::EdDsa { private_pem: Some(ED_A.to_vec()), public_pem: ED_A_PUB.to_vec() },
        };
        let e = keyed(ed, vec![]);
        let t = e.issue(SID).expect("issue");
        assert_eq!(header_of(t.token.expose())["alg"], "EdDSA");
        assert!(e.verify(t.token.expose(), SID, VerifyMode::Connect).is_ok());
        assert_eq!(r.verify(t.token.expose(), SID, VerifyMode::Connect), Err(TokenError::UnknownKey));
    }

    #[test]
    fn rotation_keeps_previous_keys_valid_and_refuses_unknown_kids() {
        let old = keyed(rsa("2026-10", RSA_A, RSA_A_PUB), vec![]);
        let old_token = old.issue(SID).expect("issue");
        let previous = TokenKey {
            kid: Some("2026-10".into()),
            material: KeyMaterial::Rs256 { private_pem: None, public_pem: RSA_A_PUB.to_vec() },
        };
        let new = keyed(rsa("2026-11", RSA_B, RSA_B_PUB), vec![previous]);
        assert!(new.verify(old_token.token.expose(), SID, VerifyMode::Connect).is_ok(), "old tokens stay valid");
        let new_token = new.issue(SID).expect("issue");
        assert_eq!(header_of(new_token.token.expose())["kid"], "2026-11", "new tokens use the new key");
        assert_eq!(
            old.verify(new_token.token.expose(), SID, VerifyMode::Connect),
            Err(TokenError::UnknownKey),
            "a node that does not know the new kid refuses"
        );
        // Key b claiming to be key a: signature fails.
        let impostor = keyed(rsa("2026-10", RSA_B, RSA_B_PUB), vec![]);
        let forged = impostor.issue(SID).expect("issue");
        assert_eq!(new.verify(forged.token.expose(), SID, VerifyMode::Connect), Err(TokenError::BadSignature));
        // A token without kid when every key has one.
        assert_eq!(
            new.verify(issuer().issue(SID).unwrap().token.expose(), SID, VerifyMode::Connect),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        // The classic confusion: the attacker knows the public key and signs HS256 with it.
        let r = keyed(rsa("r1", RSA_A, RSA_A_PUB), vec![]);
        let n = now().unix_timestamp();
        let claims =
            Claims { sub: SID.into(), scope: SESSION_SCOPE.into(), iat: n, nbf: n, exp: n + 600, jti: "j".into() };
        for kid in [Some("r1".to_owned()), None] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = kid.clone();
            let forged = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(RSA_A_PUB)).unwrap();
            let expected = if kid.is_some() { TokenError::BadAlgorithm } else { TokenError::UnknownKey };
            assert_eq!(r.verify(&forged, SID, VerifyMode::Connect), Err(expected), "kid {kid:?}");
        }
        // And the other way round: an RS256 header against the HS256 default key.
        let hs = issuer();
        let rs_token = r.issue(SID).unwrap();
        let mut parts: Vec<&str> = rs_token.token.expose().split('.').collect();
        let no_kid = b64(r#"{"alg":"RS256","typ":"JWT"}"#);
        parts[0] = &no_kid;
        assert_eq!(hs.verify(&parts.join("."), SID, VerifyMode::Connect), Err(TokenError::BadAlgorithm));
    }

    #[test]
    fn mismatched_or_missing_key_halves_are_refused_at_start() {
        let mismatched = TokenIssuer::new(TokenConfig {
            keys: Some(TokenKeys { signing: rsa("x", RSA_A, RSA_B_PUB), previous: vec![] }),
            ..TokenConfig::default()
        });
        assert!(matches!(mismatched, Err(TokenConfigError::BadKey { .. })), "{mismatched:?}");
        let no_private = TokenKey {
            kid: Some("x".into()),
            material: KeyMaterial::Rs256 { private_pem: None, public_pem: RSA_A_PUB.to_vec() },
        };
        let r = TokenIssuer::new(TokenConfig {
            keys: Some(TokenKeys { signing: no_private, previous: vec![] }),
            ..TokenConfig::default()
        });
        assert!(matches!(r, Err(TokenConfigError::BadKey { .. })));
        let dup = TokenIssuer::new(TokenConfig {
            keys: Some(TokenKeys { signing: rsa("x", RSA_A, RSA_A_PUB), previous: vec![rsa("x", RSA_B, RSA_B_PUB)] }),
            ..TokenConfig::default()
        });
        assert!(matches!(dup, Err(TokenConfigError::DuplicateKid(_))));
        let garbage = TokenIssuer::new(TokenConfig {
            keys: Some(TokenKeys { signing: rsa("x", b"not a pem", RSA_A_PUB), previous: vec![] }),
            ..TokenConfig::default()
        });
        assert!(matches!(garbage, Err(TokenConfigError::BadKey { .. })));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(
            TokenSecret::new(b"short".to_vec()).map(|_| ()),
            Err(TokenConfigError::SecretTooShort { len: 5, min: 32 })
        );
    }
}
