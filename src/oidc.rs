//! End-user sign-in with OpenID Connect: verifying ID or access tokens (JWTs) of one configured
//! issuer on `POST /v1/sessions` and the admin API.
//!
//! A token is accepted when (in this order, the first failure decides the answer):
//! 1. its header parses and names an allowed asymmetric algorithm (`alg: none` and every HMAC
//!    algorithm are refused, so a token "signed" with a public key cannot pass: RFC 8725 §3.1);
//! 2. it names a `kid` found in the issuer's JWKS (RFC 7517), whose key type matches the
//!    algorithm and whose own `alg`, when given, is the token's (RFC 7517 §4.4), and whose `use`
//!    is not `enc`;
//! 3. the signature verifies and `iss` is the configured issuer, `aud` holds a configured
//!    audience, `exp` (required) and `nbf` hold within the configured skew (RFC 7519 §4.1,
//!    OpenID Connect Core 1.0 §3.1.3.7);
//! 4. the user-id claim is a string of 1..=128 visible ASCII characters.
//!
//! The key set comes from `jwks_url`, or from the issuer's discovery document
//! (`<issuer>/.well-known/openid-configuration`, OpenID Connect Discovery 1.0 §4; its `issuer`
//! must equal ours, §4.3). It is cached and fetched again when older than `jwks_refresh_secs`,
//! or when a token names an unknown `kid` (key rotation), at most once per
//! `jwks_min_refetch_secs` so random `kid`s cannot turn us into a flood of requests to the
//! provider. A failed refresh keeps serving the keys already held.
//!
//! Library choice: `jsonwebtoken` (already used for session tokens) does the JWS/JWK work;
//! fetching and caching the key set is the ~100 lines here. The `openidconnect` crate targets
//! relying parties running the authorization-code flow and would add an OAuth2 client stack
//! for a job this server does not do (it only verifies tokens that clients already hold).
//!
//! Tokens are never logged; errors name the reason, never the token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::Value;
use signaling::identity::{EndUser, EndUserVerifier};
use signaling::problem::ApiError;
use tokio::sync::{Mutex, OnceCell, RwLock};

use crate::config::OidcSettings;

/// Why a token was refused or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// Not a JWT, or a header we cannot read (`alg: none` included).
    #[error("the token is not a well-formed signed JWT")]
    Malformed,
    /// The header's algorithm is not one we accept.
    #[error("signing algorithm {0} is not accepted")]
    Algorithm(String),
    /// The header names no `kid`.
    #[error("the token names no key (kid)")]
    NoKeyId,
    /// The `kid` is not in the issuer's key set (even after fetching it again).
    #[error("the token's key is not one of the issuer's keys")]
    UnknownKey,
    /// The key exists but cannot verify this algorithm (type, `alg` or `use` mismatch).
    #[error("the issuer's key does not fit the token's algorithm")]
    KeyMismatch,
    /// Signature, issuer, audience or validity period check failed.
    #[error("the token was refused: {0}")]
    Rejected(&'static str),
    /// The user-id claim is missing or not a usable id.
    #[error("the token's `{0}` claim is missing or not a user id (1..=128 visible ASCII)")]
    NoUserId(String),
    /// Discovery or the key set could not be fetched or read.
    #[error("the identity provider's keys are unavailable: {0}")]
    Jwks(String),
}

impl OidcError {
    /// The problem `code` this error is answered with.
    pub fn code(&self) -> &'static str {
        match self {
            OidcError::Jwks(_) => "identity_provider_unavailable",
            OidcError::Rejected("expired") => "id_token_expired",
            _ => "id_token_invalid",
        }
    }
}

impl From<OidcError> for ApiError {
    fn from(e: OidcError) -> Self {
        match &e {
            OidcError::Jwks(_) => {
                tracing::warn!(error = %e, "identity provider unavailable");
                ApiError::unavailable(e.to_string(), Duration::from_secs(5))
            }
            _ => ApiError::unauthorized(e.code(), e.to_string()),
        }
    }
}

/// The cached key set.
#[derive(Default)]
struct KeyCache {
    set: JwkSet,
    /// Last successful fetch.
    fetched: Option<Instant>,
    /// Last fetch attempt, successful or not.
    attempted: Option<Instant>,
}

/// Verifies tokens of one issuer. Cheap to share (`Arc`); one fetch at a time.
pub struct OidcVerifier {
    settings: OidcSettings,
    issuer: String,
    algorithms: Vec<Algorithm>,
    http: reqwest::Client,
    jwks_url: OnceCell<String>,
    cache: RwLock<KeyCache>,
    fetching: Mutex<()>,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

impl OidcVerifier {
    /// A verifier for validated `settings`; `None` when no issuer is configured.
    pub fn new(settings: &OidcSettings) -> Option<Arc<Self>> {
        let issuer = settings.issuer.clone()?;
        let algorithms = settings.algorithms.iter().filter_map(|a| a.parse().ok()).collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.http_timeout_ms))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Some(Arc::new(Self {
            settings: settings.clone(),
            issuer,
            algorithms,
            http,
            jwks_url: OnceCell::new(),
            cache: RwLock::new(KeyCache::default()),
            fetching: Mutex::new(()),
        }))
    }

    /// The user a token belongs to (see the module docs for the checks, in order).
    pub async fn verify_token(&self, token: &str) -> Result<EndUser, OidcError> {
        let header = decode_header(token).map_err(|_| OidcError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(OidcError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(OidcError::NoKeyId)?;
        let jwk = self.key(&kid).await?;
        let key = decoding_key(&jwk, header.alg)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.settings.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.settings.max_skew_secs;
        let data = decode::<Value>(token, &key, &validation).map_err(|e| OidcError::Rejected(reason(e.kind())))?;
        self.end_user(&data.claims)
    }

    fn end_user(&self, claims: &Value) -> Result<EndUser, OidcError> {
        let user_id = claim(claims, &self.settings.user_claim)
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| (0x21..=0x7e).contains(&b)))
            .ok_or_else(|| OidcError::NoUserId(self.settings.user_claim.clone()))?
            .to_owned();
        let roles: Vec<String> = match claim(claims, &self.settings.roles_claim) {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let admin = roles.contains(&self.settings.admin_role);
        Ok(EndUser { user_id, roles, admin })
    }

    /// The key `kid`, from the cache or a fresh fetch.
    async fn key(&self, kid: &str) -> Result<Jwk, OidcError> {
        let refresh = Duration::from_secs(self.settings.jwks_refresh_secs);
        let min_refetch = Duration::from_secs(self.settings.jwks_min_refetch_secs);
        {
            let cache = self.cache.read().await;
            let fresh = cache.fetched.is_some_and(|t| t.elapsed() < refresh);
            match cache.set.find(kid) {
                Some(k) if fresh => return Ok(k.clone()),
                None if cache.attempted.is_some_and(|t| t.elapsed() < min_refetch) => {
                    return Err(OidcError::UnknownKey);
                }
                _ => {}
            }
        }
        let _one_fetch = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let cache = self.cache.read().await;
        let recent = cache.attempted.is_some_and(|t| t.elapsed() < min_refetch);
        let fresh = cache.fetched.is_some_and(|t| t.elapsed() < refresh);
        if recent || (fresh && cache.set.find(kid).is_some()) {
            return cache.set.find(kid).cloned().ok_or(OidcError::UnknownKey);
        }
        drop(cache);
        let fetched = self.fetch_jwks().await;
        let mut cache = self.cache.write().await;
        cache.attempted = Some(Instant::now());
        match fetched {
            Ok(set) => {
                tracing::info!(keys = set.keys.len(), "identity provider keys fetched");
                cache.set = set;
                cache.fetched = cache.attempted;
            }
            // Keep serving the keys we have; without the key asked for, say why.
            Err(e) if cache.set.find(kid).is_none() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "identity provider keys not refreshed; keeping the cached ones"),
        }
        cache.set.find(kid).cloned().ok_or(OidcError::UnknownKey)
    }

    async fn fetch_jwks(&self) -> Result<JwkSet, OidcError> {
        let url = self.jwks_url.get_or_try_init(|| self.discover()).await?;
        self.get_json(url).await
    }

    /// `jwks_url`, or `jwks_uri` of the discovery document (whose `issuer` must be ours).
    async fn discover(&self) -> Result<String, OidcError> {
        if let Some(url) = &self.settings.jwks_url {
            return Ok(url.clone());
        }
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer.trim_end_matches('/'));
        let doc: Discovery = self.get_json(&url).await?;
        if doc.issuer != self.issuer {
            return Err(OidcError::Jwks(format!("discovery names issuer `{}`, not the configured one", doc.issuer)));
        }
        Ok(doc.jwks_uri)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let response = self.http.get(url).send().await.map_err(|e| OidcError::Jwks(format!("GET {url}: {e}")))?;
        if !response.status().is_success() {
            return Err(OidcError::Jwks(format!("GET {url}: HTTP {}", response.status())));
        }
        response.json().await.map_err(|e| OidcError::Jwks(format!("GET {url}: unreadable JSON: {e}")))
    }
}

#[async_trait]
impl EndUserVerifier for OidcVerifier {
    async fn verify(&self, token: &str) -> Result<EndUser, ApiError> {
        Ok(self.verify_token(token).await?)
    }
}

/// The key of `jwk` for `alg`: asymmetric, of `alg`'s family, `alg` matching when stated, not
/// an encryption key.
fn decoding_key(jwk: &Jwk, alg: Algorithm) -> Result<DecodingKey, OidcError> {
    use Algorithm::*;
    let family_fits = matches!(
        (&jwk.algorithm, alg),
        (AlgorithmParameters::RSA(_), RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
            | (AlgorithmParameters::EllipticCurve(_), ES256 | ES384)
            | (AlgorithmParameters::OctetKeyPair(_), EdDSA)
    );
    let alg_fits = jwk.common.key_algorithm.is_none_or(|k| format!("{k:?}") == format!("{alg:?}"));
    let use_fits = !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
    if !(family_fits && alg_fits && use_fits) {
        return Err(OidcError::KeyMismatch);
    }
    DecodingKey::from_jwk(jwk).map_err(|_| OidcError::KeyMismatch)
}

/// The claim at a dotted path (`realm_access.roles`).
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

fn reason(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not yet valid (nbf)",
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::InvalidSignature => "bad signature",
        K::MissingRequiredClaim(_) => "a required claim (exp, iss, aud) is missing",
        K::InvalidAlgorithm => "algorithm does not match the key",
        _ => "malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_found_by_dotted_path_and_roles_in_both_shapes() {
        let mut s = OidcSettings { issuer: Some("https://i".into()), ..OidcSettings::default() };
        s.roles_claim = "realm_access.roles".into();
        let v = OidcVerifier::new(&s).unwrap();
        let claims = serde_json::json!({"sub": "u-1", "realm_access": {"roles": ["kotodama-admin", "x"]}});
        let user = v.end_user(&claims).unwrap();
        assert_eq!((user.user_id.as_str(), user.admin), ("u-1", true));
        s.roles_claim = "scope".into();
        let v = OidcVerifier::new(&s).unwrap();
        let user = v.end_user(&serde_json::json!({"sub": "u-2", "scope": "openid profile"})).unwrap();
        assert_eq!(user.roles, ["openid", "profile"]);
        assert!(!user.admin);
        for bad in [serde_json::json!({}), serde_json::json!({"sub": 7}), serde_json::json!({"sub": "a b"})] {
            assert_eq!(v.end_user(&bad), Err(OidcError::NoUserId("sub".into())), "{bad}");
        }
    }
}
