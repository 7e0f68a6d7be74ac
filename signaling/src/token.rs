//! Session tokens: short-lived HS256 JWTs scoped to one session.
//!
//! `POST /v1/sessions` issues one; every later call about that session presents it as
//! `Authorization: Bearer <token>`. Claims: `sub` = session id, `scope` = `"session"`, `iat`,
//! `nbf`, `exp` (default 10 minutes after issue) and a random `jti`.
//!
//! Verification pins the algorithm to HS256 by reading the header itself before any crypto:
//! `alg: none`, RS256/ES256 (the HS/RS key-confusion attack) and anything else are
//! [`TokenError::BadAlgorithm`]. Then the signature, `scope`, `sub` (must equal the session id
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

/// Token settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Signing secret; `None` = [`TokenSecret::random`].
    pub secret: Option<TokenSecret>,
    /// Lifetime of a token for connecting (`exp - iat`).
    pub ttl: Duration,
    /// How long past `exp` a token still works in [`VerifyMode::Manage`].
    pub manage_grace: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig { secret: None, ttl: DEFAULT_TOKEN_TTL, manage_grace: DEFAULT_MANAGE_GRACE }
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
    /// `alg` is not HS256 (`none`, RS256, ...).
    #[error("token algorithm not accepted")]
    BadAlgorithm,
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
        }
    }
}

/// Issues and verifies session tokens. `Debug` redacts the key.
#[derive(Clone)]
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    manage_grace: Duration,
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("key", &"<redacted>")
            .field("ttl", &self.ttl)
            .field("manage_grace", &self.manage_grace)
            .finish()
    }
}

impl TokenIssuer {
    /// Build from configuration; a missing secret becomes a random one.
    pub fn new(config: TokenConfig) -> Result<Self, TokenConfigError> {
        const ONE_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        if config.ttl.is_zero() || config.ttl > ONE_YEAR || config.manage_grace > ONE_YEAR {
            return Err(TokenConfigError::BadTtl);
        }
        let secret = config.secret.unwrap_or_else(TokenSecret::random);
        Ok(Self::from_parts(&secret, config.ttl, config.manage_grace))
    }

    /// Defaults ([`DEFAULT_TOKEN_TTL`], [`DEFAULT_MANAGE_GRACE`]) with a random secret.
    pub fn random() -> Self {
        Self::from_parts(&TokenSecret::random(), DEFAULT_TOKEN_TTL, DEFAULT_MANAGE_GRACE)
    }

    fn from_parts(secret: &TokenSecret, ttl: Duration, manage_grace: Duration) -> Self {
        TokenIssuer {
            encoding: EncodingKey::from_secret(&secret.0),
            decoding: DecodingKey::from_secret(&secret.0),
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
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map(SessionToken)
            .map_err(|_| TokenIssueError)
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
        check_header(token)?;

        // Signature (and shape) only: time and subject are checked below against our own
        // clock and mode, which the library cannot express.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(|e| match e.kind() {
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

/// Read the JOSE header ourselves so that the algorithm decision never depends on what the
/// library knows how to parse: `alg` must be exactly `HS256`, and no `crit` extensions.
fn check_header(token: &str) -> Result<(), TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenError::Malformed)?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    let object = header.as_object().ok_or(TokenError::Malformed)?;
    match object.get("alg") {
        Some(serde_json::Value::String(alg)) if alg == "HS256" => {}
        Some(_) => return Err(TokenError::BadAlgorithm),
        None => return Err(TokenError::Malformed),
    }
    if object.contains_key("crit") {
        return Err(TokenError::Malformed);
    }
    Ok(())
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

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(
            TokenSecret::new(b"short".to_vec()).map(|_| ()),
            Err(TokenConfigError::SecretTooShort { len: 5, min: 32 })
        );
    }
}
