//! Who may do what (top-level keys): `api_keys`, `admin_api_keys`, `token_secret`, and the
//! `[tokens]` key set (its struct, env keys and checks are [`signaling::token_keys`]).

use super::{Config, ConfigError, env, err};

/// `KOTODAMA_API_KEYS`, `KOTODAMA_ADMIN_API_KEYS`, `KOTODAMA_TOKEN_SECRET`, `KOTODAMA_TOKEN_*`.
pub fn apply_env(c: &mut Config, get: &dyn Fn(&str) -> Option<String>) {
    if let Some(keys) = env::list(get, "KOTODAMA_API_KEYS") {
        c.api_keys = keys;
    }
    if let Some(keys) = env::list(get, "KOTODAMA_ADMIN_API_KEYS") {
        c.admin_api_keys = keys;
    }
    // The secret is taken as given: surrounding spaces are part of it.
    if let Some(v) = get("KOTODAMA_TOKEN_SECRET").filter(|v| !v.trim().is_empty()) {
        c.token_secret = Some(v);
    }
    c.tokens.apply_env(get);
}

/// An open API only on loopback; keys long enough or digests; a sound token key set.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    if !c.bind.ip().is_loopback() && c.api_keys.is_empty() && !c.oidc.enabled() {
        return Err(err(
            "KOTODAMA_API_KEYS",
            format!("bind {} is not loopback and no API key is configured (anyone could open sessions)", c.bind),
            "set KOTODAMA_API_KEYS=<key>[,<key>...] or bind to 127.0.0.1",
        ));
    }
    for (key, list) in [("KOTODAMA_API_KEYS", &c.api_keys), ("KOTODAMA_ADMIN_API_KEYS", &c.admin_api_keys)] {
        if let Err(e) = signaling::ApiKeys::default().parse(signaling::KeyRole::User, list.iter()) {
            return Err(err(
                key,
                format!("entry {} is shorter than 16 characters and not sha256:<64 hex digits>", e.index + 1),
                "use long random keys (e.g. `openssl rand -hex 24`) or their digests \
                 (`printf %s KEY | sha256sum` -> sha256:<hex>)",
            ));
        }
    }
    c.tokens.validate()?;
    if let Some(s) = &c.token_secret
        && s.len() < signaling::token::MIN_SECRET_LEN
    {
        return Err(err(
            "KOTODAMA_TOKEN_SECRET",
            "shorter than 32 bytes",
            "use e.g. `openssl rand -hex 32`, or unset it for a random secret per start",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::from_env;

    #[test]
    fn public_bind_without_api_key_is_refused_naming_the_key() {
        let e = from_env(&[("KOTODAMA_BIND", "0.0.0.0:8080")]).validate().unwrap_err();
        assert_eq!(e.key, "KOTODAMA_API_KEYS");
        assert!(e.to_string().contains("KOTODAMA_API_KEYS="), "{e}");
    }
}
