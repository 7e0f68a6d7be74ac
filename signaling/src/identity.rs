//! End-user identity on API requests: who is calling, when the caller is a person signed in
//! with an identity provider rather than a server holding an API key.
//!
//! The router knows nothing of OpenID Connect: it hands a bearer credential that is not one of
//! the API keys to an [`EndUserVerifier`] (the binary implements one for a configured OIDC
//! issuer) and gets back an [`EndUser`], or the [`ApiError`] to answer with (401 for a bad
//! token, 503 when the issuer's keys cannot be fetched). Credentials are never logged.

use async_trait::async_trait;

use crate::auth::{ApiKeyIdentity, KeyRole};
use crate::problem::ApiError;

/// A verified end user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndUser {
    /// The user id taken from the token's configured claim (default `sub`): what privacy
    /// export/delete and memory use. 1..=128 visible ASCII characters.
    pub user_id: String,
    /// Roles taken from the token's configured roles claim (may be empty).
    pub roles: Vec<String>,
    /// Whether one of `roles` is the configured admin role.
    pub admin: bool,
}

/// Verifies end-user bearer tokens (OIDC ID or access tokens).
#[async_trait]
pub trait EndUserVerifier: Send + Sync + 'static {
    /// The user `token` belongs to. Errors are what the router answers: 401 `id_token_invalid`
    /// (with the reason in the detail) or 503 when the issuer cannot be reached.
    async fn verify(&self, token: &str) -> Result<EndUser, ApiError>;
}

/// Who made a request: a server with an API key, or a signed-in end user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An API key.
    Key(ApiKeyIdentity),
    /// An end user with a verified identity token.
    User(EndUser),
}

impl Caller {
    /// Whether this caller may use the admin API: an admin key, or a user with the admin role.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Key(k) => k.role == KeyRole::Admin,
            Caller::User(u) => u.admin,
        }
    }

    /// A name for audit records: `key:<short id>` or `user:<user id>` (never a credential).
    pub fn audit_name(&self) -> String {
        match self {
            Caller::Key(k) => format!("key:{}", k.id),
            Caller::User(u) => format!("user:{}", u.user_id),
        }
    }
}
