//! Where state lives (top-level keys): `database_url` (SQLite or Postgres), `redis_url`,
//! `redis_prefix`.

use super::{Config, ConfigError, env, err, require_scheme};

/// The embedded default: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/kotodama.db";
/// Prefix of every Redis key and channel unless configured.
pub const DEFAULT_REDIS_PREFIX: &str = "kotodama:";

/// `KOTODAMA_DATABASE_URL`, `KOTODAMA_REDIS_URL`, `KOTODAMA_REDIS_PREFIX`.
pub fn apply_env(c: &mut Config, get: &dyn Fn(&str) -> Option<String>) {
    if let Some(v) = env::value(get, "KOTODAMA_DATABASE_URL") {
        c.database_url = v;
    }
    if let Some(v) = env::value(get, "KOTODAMA_REDIS_URL") {
        c.redis_url = Some(v);
    }
    if let Some(v) = env::value(get, "KOTODAMA_REDIS_PREFIX") {
        c.redis_prefix = v;
    }
}

/// Supported URL schemes only; a cluster (Redis) shares one token secret.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    let db = &c.database_url;
    require_scheme(db, &["sqlite:", "postgres://", "postgresql://"], || {
        let fix = "use sqlite://path/to/file.db or postgres://user@host/db";
        err("KOTODAMA_DATABASE_URL", format!("unsupported URL `{db}`"), fix)
    })?;
    if let Some(url) = &c.redis_url {
        require_scheme(url, &["redis://", "rediss://"], || {
            let fix = "use redis://host:6379 (or rediss:// for TLS), or unset it for a single node";
            err("KOTODAMA_REDIS_URL", format!("unsupported URL `{url}`"), fix)
        })?;
    }
    if c.redis_url.is_some() && c.token_secret.is_none() && c.tokens.algorithm() == "HS256" {
        return Err(err(
            "KOTODAMA_TOKEN_SECRET",
            "unset while KOTODAMA_REDIS_URL makes this node part of a cluster (a random secret per node \
             would make other nodes refuse its session tokens)",
            "set the same KOTODAMA_TOKEN_SECRET (>= 32 bytes, e.g. `openssl rand -hex 32`) on every node",
        ));
    }
    Ok(())
}
