//! Session-token key settings (`[tokens]` of kotodama.toml, `KOTODAMA_TOKEN_*`) and their
//! loading into a [`TokenConfig`]: the configuration side of [`crate::token`].
//!
//! Unset, tokens are HS256 with the node's secret (`KOTODAMA_TOKEN_SECRET`, random per start when
//! unset). With `algorithm = "RS256"` or `"EdDSA"` the signing key is a PEM key pair with a
//! `kid`; `[[tokens.previous]]` lists keys still accepted during a rotation (RFC 7515 §4.1.4
//! `kid`). Checks that need no file run in [`TokenSettings::validate`] (at start, before any
//! socket); [`TokenSettings::load`] reads the PEM files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::token::{KeyMaterial, MIN_SECRET_LEN, TokenConfig, TokenConfigError, TokenKey, TokenKeys, TokenSecret};

/// Session-token signing keys (`[tokens]`). Unset: HS256 with the node's secret.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// `HS256` (default), `RS256` or `EdDSA` (`KOTODAMA_TOKEN_ALG`).
    pub algorithm: Option<String>,
    /// `kid` of the signing key (`KOTODAMA_TOKEN_KID`); required for RS256/EdDSA.
    pub kid: Option<String>,
    /// PEM private key for RS256/EdDSA (`KOTODAMA_TOKEN_PRIVATE_KEY_FILE`).
    pub private_key_file: Option<PathBuf>,
    /// PEM public key for RS256/EdDSA (`KOTODAMA_TOKEN_PUBLIC_KEY_FILE`).
    pub public_key_file: Option<PathBuf>,
    /// Keys still accepted for verification during a rotation.
    pub previous: Vec<PreviousTokenKey>,
}

/// A verify-only token key (`[[tokens.previous]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousTokenKey {
    /// Its `kid`.
    pub kid: String,
    /// `RS256`, `EdDSA` or `HS256`.
    pub algorithm: String,
    /// PEM public key (RS256/EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// The secret (HS256), >= [`MIN_SECRET_LEN`] bytes.
    pub secret: Option<String>,
}

/// A bad token setting: the key, what is wrong and the fix (the caller's configuration error
/// wraps it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}; {fix}")]
pub struct TokenSettingsError {
    /// The key (`KOTODAMA_TOKEN_ALG`, `tokens.previous`, ...).
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: &'static str,
}

/// Token keys that could not be loaded at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenLoadError {
    /// A PEM file could not be read.
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A setting the algorithm needs is missing (normally caught by [`TokenSettings::validate`]).
    #[error("{0} is required")]
    Missing(&'static str),
    /// A secret or key was refused.
    #[error("{key}: {source}")]
    Key {
        /// The setting it came from.
        key: &'static str,
        /// Why.
        source: TokenConfigError,
    },
}

fn bad(key: &'static str, problem: impl Into<String>, fix: &'static str) -> TokenSettingsError {
    TokenSettingsError { key, problem: problem.into(), fix }
}

impl TokenSettings {
    /// The signing algorithm (`HS256` when unset).
    pub fn algorithm(&self) -> &str {
        self.algorithm.as_deref().unwrap_or("HS256")
    }

    /// Apply `KOTODAMA_TOKEN_ALG`, `_KID`, `_PRIVATE_KEY_FILE`, `_PUBLIC_KEY_FILE` read through
    /// `get` (empty values are ignored).
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) {
        let value = |k: &str| get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(v) = value("KOTODAMA_TOKEN_ALG") {
            self.algorithm = Some(v);
        }
        if let Some(v) = value("KOTODAMA_TOKEN_KID") {
            self.kid = Some(v);
        }
        if let Some(v) = value("KOTODAMA_TOKEN_PRIVATE_KEY_FILE") {
            self.private_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = value("KOTODAMA_TOKEN_PUBLIC_KEY_FILE") {
            self.public_key_file = Some(PathBuf::from(v));
        }
    }

    /// Everything checkable without reading the key files.
    pub fn validate(&self) -> Result<(), TokenSettingsError> {
        let alg = self.algorithm();
        match alg {
            "HS256" if self.private_key_file.is_some() || self.public_key_file.is_some() => {
                return Err(bad(
                    "KOTODAMA_TOKEN_ALG",
                    "key files are set but the algorithm is HS256",
                    "set KOTODAMA_TOKEN_ALG=RS256 or EdDSA, or remove the key files",
                ));
            }
            "HS256" => {}
            "RS256" | "EdDSA" => self.validate_key_pair(alg)?,
            other => {
                return Err(bad(
                    "KOTODAMA_TOKEN_ALG",
                    format!("`{other}` is not supported"),
                    "use HS256 (default), RS256 or EdDSA",
                ));
            }
        }
        self.previous.iter().try_for_each(PreviousTokenKey::validate)
    }

    fn validate_key_pair(&self, alg: &str) -> Result<(), TokenSettingsError> {
        if self.private_key_file.is_none() || self.public_key_file.is_none() {
            return Err(bad(
                "KOTODAMA_TOKEN_PRIVATE_KEY_FILE",
                format!("{alg} needs a private and a public key file"),
                "set KOTODAMA_TOKEN_PRIVATE_KEY_FILE and KOTODAMA_TOKEN_PUBLIC_KEY_FILE (PEM)",
            ));
        }
        if self.kid.as_deref().is_none_or(str::is_empty) {
            return Err(bad(
                "KOTODAMA_TOKEN_KID",
                format!("{alg} keys need a kid (so they can be rotated)"),
                "set KOTODAMA_TOKEN_KID, e.g. 2026-11",
            ));
        }
        Ok(())
    }

    /// The token configuration: HS256 with `secret` (random when `None`), or the configured key
    /// set with its previous keys, read from their PEM files. `ttl`: a token's connect window;
    /// `manage_grace`: how long past `exp` it still manages its session.
    pub fn load(
        &self,
        secret: Option<&str>,
        ttl: Duration,
        manage_grace: Duration,
    ) -> Result<TokenConfig, TokenLoadError> {
        let secret = secret
            .map(|s| TokenSecret::new(s.as_bytes().to_vec()))
            .transpose()
            .map_err(|source| TokenLoadError::Key { key: "KOTODAMA_TOKEN_SECRET", source })?;
        let signing = match self.algorithm() {
            "RS256" | "EdDSA" => Some(self.signing_key_pair()?),
            _ if self.kid.is_some() || !self.previous.is_empty() => {
                let secret = secret.clone().unwrap_or_else(TokenSecret::random);
                Some(TokenKey { kid: self.kid.clone(), material: KeyMaterial::Hs256(secret) })
            }
            _ => None,
        };
        let keys = match signing {
            None => None,
            Some(signing) => {
                let previous = self.previous.iter().map(PreviousTokenKey::load).collect::<Result<_, _>>()?;
                Some(TokenKeys { signing, previous })
            }
        };
        Ok(TokenConfig { secret, keys, ttl, manage_grace })
    }

    fn signing_key_pair(&self) -> Result<TokenKey, TokenLoadError> {
        const PRIVATE: &str = "KOTODAMA_TOKEN_PRIVATE_KEY_FILE";
        const PUBLIC: &str = "KOTODAMA_TOKEN_PUBLIC_KEY_FILE";
        let private_pem =
            Some(read_pem(PRIVATE, self.private_key_file.as_deref().ok_or(TokenLoadError::Missing(PRIVATE))?)?);
        let public_pem = read_pem(PUBLIC, self.public_key_file.as_deref().ok_or(TokenLoadError::Missing(PUBLIC))?)?;
        let material = if self.algorithm() == "RS256" {
            KeyMaterial::Rs256 { private_pem, public_pem }
        } else {
            KeyMaterial::EdDsa { private_pem, public_pem }
        };
        Ok(TokenKey { kid: self.kid.clone(), material })
    }
}

impl PreviousTokenKey {
    fn validate(&self) -> Result<(), TokenSettingsError> {
        let ok = match self.algorithm.as_str() {
            "HS256" => self.secret.as_ref().is_some_and(|s| s.len() >= MIN_SECRET_LEN),
            "RS256" | "EdDSA" => self.public_key_file.is_some(),
            _ => false,
        };
        if !ok || self.kid.is_empty() {
            return Err(bad(
                "tokens.previous",
                format!(
                    "key `{}` needs a kid and, for its algorithm, a public_key_file (RS256/EdDSA) or a secret of >= 32 bytes (HS256)",
                    self.kid
                ),
                "fix or remove the entry",
            ));
        }
        Ok(())
    }

    fn load(&self) -> Result<TokenKey, TokenLoadError> {
        const KEY: &str = "tokens.previous";
        let material = match self.algorithm.as_str() {
            "HS256" => KeyMaterial::Hs256(
                TokenSecret::new(self.secret.clone().unwrap_or_default().into_bytes())
                    .map_err(|source| TokenLoadError::Key { key: KEY, source })?,
            ),
            alg => {
                let public_pem = read_pem(KEY, self.public_key_file.as_deref().ok_or(TokenLoadError::Missing(KEY))?)?;
                if alg == "RS256" {
                    KeyMaterial::Rs256 { private_pem: None, public_pem }
                } else {
                    KeyMaterial::EdDsa { private_pem: None, public_pem }
                }
            }
        };
        Ok(TokenKey { kid: Some(self.kid.clone()), material })
    }
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TokenLoadError> {
    std::fs::read(path).map_err(|source| TokenLoadError::Read { key, path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rs256_without_kid_or_files_names_the_missing_key() {
        let mut t = TokenSettings { algorithm: Some("RS256".into()), ..TokenSettings::default() };
        assert_eq!(t.validate().unwrap_err().key, "KOTODAMA_TOKEN_PRIVATE_KEY_FILE");
        t.private_key_file = Some("a.pem".into());
        t.public_key_file = Some("b.pem".into());
        assert_eq!(t.validate().unwrap_err().key, "KOTODAMA_TOKEN_KID");
        t.kid = Some("k1".into());
        t.validate().unwrap();
        let e = t.load(None, Duration::from_secs(1), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, TokenLoadError::Read { key: "KOTODAMA_TOKEN_PRIVATE_KEY_FILE", .. }), "{e}");
    }

    #[test]
    fn env_sets_the_algorithm_and_a_short_secret_is_refused_at_load() {
        let mut t = TokenSettings::default();
        t.apply_env(&|k| (k == "KOTODAMA_TOKEN_ALG").then(|| " EdDSA ".to_owned()));
        assert_eq!(t.algorithm(), "EdDSA");
        let e = TokenSettings::default().load(Some("short"), Duration::from_secs(1), Duration::ZERO).unwrap_err();
        assert!(matches!(e, TokenLoadError::Key { key: "KOTODAMA_TOKEN_SECRET", .. }), "{e}");
    }
}
