//! `[oidc]`: end users signing in with an OpenID Connect identity provider (Keycloak, Auth0,
//! Entra ID, Google, Dex, ...). Unset issuer: only API keys are accepted.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, err};

/// Algorithms an issuer may sign with: asymmetric only, so a token can never be verified with
/// a key the client knows (HS/RS confusion). `none` is never accepted.
pub const ASYMMETRIC_ALGORITHMS: &[&str] =
    &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

/// Largest clock skew the verifier may allow (`oidc.max_skew_secs`).
pub const MAX_SKEW_LIMIT_SECS: u64 = 300;

/// The OpenID Connect settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OidcSettings {
    /// The issuer URL exactly as in the tokens' `iss` (`KOTODAMA_OIDC_ISSUER`), e.g.
    /// `https://id.example.com/realms/main`. Unset: OIDC off.
    pub issuer: Option<String>,
    /// Accepted `aud` values (`KOTODAMA_OIDC_AUDIENCE`, comma-separated): the client id(s) the
    /// provider issues tokens for. Required with an issuer.
    pub audience: Vec<String>,
    /// The JWKS URL (`KOTODAMA_OIDC_JWKS_URL`); unset: `jwks_uri` from
    /// `<issuer>/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4).
    pub jwks_url: Option<String>,
    /// Claim holding the user id (`KOTODAMA_OIDC_USER_CLAIM`, default `sub`; dotted paths
    /// such as `ext.uid` reach nested objects).
    pub user_claim: String,
    /// Claim holding the roles (`KOTODAMA_OIDC_ROLES_CLAIM`, default `roles`; Keycloak:
    /// `realm_access.roles`): an array of strings or one space-separated string.
    pub roles_claim: String,
    /// Role that opens the admin API (`KOTODAMA_OIDC_ADMIN_ROLE`, default `kotodama-admin`).
    pub admin_role: String,
    /// Allowed clock skew on `exp`/`nbf`/`iat`, seconds (`KOTODAMA_OIDC_MAX_SKEW_SECS`, default
    /// 60, at most 300).
    pub max_skew_secs: u64,
    /// Accepted signing algorithms (default RS256 and ES256); asymmetric ones only.
    pub algorithms: Vec<String>,
    /// The key set is fetched again after this long even when every `kid` is known (default 3600 s).
    pub jwks_refresh_secs: u64,
    /// An unknown `kid` triggers a fetch at most this often (default 10 s), so random `kid`s
    /// cannot make us hammer the provider.
    pub jwks_min_refetch_secs: u64,
    /// Timeout of a discovery or JWKS request, milliseconds (default 5000).
    pub http_timeout_ms: u64,
}

impl Default for OidcSettings {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: Vec::new(),
            jwks_url: None,
            user_claim: "sub".into(),
            roles_claim: "roles".into(),
            admin_role: "kotodama-admin".into(),
            max_skew_secs: 60,
            algorithms: vec!["RS256".into(), "ES256".into()],
            jwks_refresh_secs: 3600,
            jwks_min_refetch_secs: 10,
            http_timeout_ms: 5000,
        }
    }
}

impl OidcSettings {
    /// Whether an issuer is configured.
    pub fn enabled(&self) -> bool {
        self.issuer.is_some()
    }

    /// `KOTODAMA_OIDC_*` overrides.
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let non_empty = |k: &str| get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(v) = non_empty("KOTODAMA_OIDC_ISSUER") {
            self.issuer = Some(v);
        }
        if let Some(v) = non_empty("KOTODAMA_OIDC_AUDIENCE") {
            self.audience = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = non_empty("KOTODAMA_OIDC_JWKS_URL") {
            self.jwks_url = Some(v);
        }
        if let Some(v) = non_empty("KOTODAMA_OIDC_USER_CLAIM") {
            self.user_claim = v;
        }
        if let Some(v) = non_empty("KOTODAMA_OIDC_ROLES_CLAIM") {
            self.roles_claim = v;
        }
        if let Some(v) = non_empty("KOTODAMA_OIDC_ADMIN_ROLE") {
            self.admin_role = v;
        }
        if let Some(v) = non_empty("KOTODAMA_OIDC_MAX_SKEW_SECS") {
            self.max_skew_secs = v.parse().map_err(|_| {
                err("KOTODAMA_OIDC_MAX_SKEW_SECS", format!("`{v}` is not a number of seconds"), "use e.g. 60")
            })?;
        }
        Ok(())
    }

    /// Checks that make a bad setting fail the start, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(issuer) = &self.issuer else { return Ok(()) };
        check_url("KOTODAMA_OIDC_ISSUER", issuer)?;
        if let Some(url) = &self.jwks_url {
            check_url("KOTODAMA_OIDC_JWKS_URL", url)?;
        }
        if self.audience.is_empty() {
            return Err(err(
                "KOTODAMA_OIDC_AUDIENCE",
                "an issuer is set but no audience (tokens issued to any other application would be accepted)",
                "set KOTODAMA_OIDC_AUDIENCE to the client id the provider issues your tokens for",
            ));
        }
        if self.max_skew_secs > MAX_SKEW_LIMIT_SECS {
            return Err(err(
                "KOTODAMA_OIDC_MAX_SKEW_SECS",
                format!("{} s is more than the {MAX_SKEW_LIMIT_SECS} s allowed", self.max_skew_secs),
                "keep the clocks in sync (NTP) and use at most 300",
            ));
        }
        if self.algorithms.is_empty() || self.algorithms.iter().any(|a| !ASYMMETRIC_ALGORITHMS.contains(&a.as_str())) {
            return Err(err(
                "oidc.algorithms",
                format!("{:?} is empty or names a symmetric or unknown algorithm", self.algorithms),
                format!("use some of {ASYMMETRIC_ALGORITHMS:?}"),
            ));
        }
        if self.user_claim.is_empty() || self.roles_claim.is_empty() {
            return Err(err("KOTODAMA_OIDC_USER_CLAIM", "a claim name is empty", "use e.g. sub and roles"));
        }
        Ok(())
    }

    /// [`Self::max_skew_secs`] as a duration.
    pub fn max_skew(&self) -> Duration {
        Duration::from_secs(self.max_skew_secs)
    }
}

/// `https://`, or `http://` to a loopback host (a provider on the same machine, tests).
fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let loopback_http = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| url.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/'])));
    if url.starts_with("https://") || loopback_http {
        Ok(())
    } else {
        Err(err(
            key,
            format!("`{url}` is not an https URL"),
            "use the https URL of the identity provider (plain http only to 127.0.0.1/localhost)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<OidcSettings, ConfigError> {
        let mut s = OidcSettings::default();
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        s.apply_env(&|k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
        s.validate().map(|()| s)
    }

    #[test]
    fn off_by_default_and_an_issuer_needs_an_audience() {
        assert!(!with(&[]).unwrap().enabled());
        let e = with(&[("KOTODAMA_OIDC_ISSUER", "https://id.example.com")]).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_OIDC_AUDIENCE");
        let ok = with(&[("KOTODAMA_OIDC_ISSUER", "https://id.example.com"), ("KOTODAMA_OIDC_AUDIENCE", "a, b")]);
        assert_eq!(ok.unwrap().audience, ["a", "b"]);
    }

    #[test]
    fn plain_http_only_on_loopback_and_skew_is_bounded() {
        let base = [("KOTODAMA_OIDC_AUDIENCE", "app")];
        for (issuer, good) in [
            ("http://127.0.0.1:9000/realm", true),
            ("http://localhost", true),
            ("http://id.example.com", false),
            ("http://127.0.0.1.evil.example", false),
        ] {
            let r = with(&[base[0], ("KOTODAMA_OIDC_ISSUER", issuer)]);
            assert_eq!(r.is_ok(), good, "{issuer}");
        }
        let e = with(&[base[0], ("KOTODAMA_OIDC_ISSUER", "https://i"), ("KOTODAMA_OIDC_MAX_SKEW_SECS", "900")]);
        assert_eq!(e.unwrap_err().key, "KOTODAMA_OIDC_MAX_SKEW_SECS");
        let mut s = with(&[base[0], ("KOTODAMA_OIDC_ISSUER", "https://i")]).unwrap();
        s.algorithms = vec!["HS256".into()];
        assert_eq!(s.validate().unwrap_err().key, "oidc.algorithms");
    }
}
