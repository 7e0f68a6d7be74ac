//! Where state lives (top-level keys): `database_url` (SQLite or Postgres), `redis_url`,
//! `redis_prefix`, `journal_dir`, `journal_max_bytes`.

use std::path::PathBuf;

use super::{Config, ConfigError, env, err, require_scheme};

/// The smallest journal bound accepted (64 KiB).
pub const MIN_JOURNAL_BYTES: u64 = 64 * 1024;

/// Where the store writer's journal lives: `journal_dir`, else `journal/` next to the SQLite
/// file, else `data/journal` (relative to the working directory).
pub fn journal_dir(c: &Config) -> PathBuf {
    if let Some(dir) = &c.journal_dir {
        return dir.clone();
    }
    let sqlite = c.database_url.strip_prefix("sqlite://").or_else(|| c.database_url.strip_prefix("sqlite:"));
    match sqlite.map(|p| p.split('?').next().unwrap_or(p)).filter(|p| !p.is_empty() && !p.contains(":memory:")) {
        Some(file) => PathBuf::from(file).parent().map_or_else(|| PathBuf::from("journal"), |d| d.join("journal")),
        None => PathBuf::from("data/journal"),
    }
}

/// The embedded default: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/kotodama.db";
/// Prefix of every Redis key and channel unless configured.
pub const DEFAULT_REDIS_PREFIX: &str = "kotodama:";

/// `KOTODAMA_DATABASE_URL`, `KOTODAMA_REDIS_URL`, `KOTODAMA_REDIS_PREFIX`,
/// `KOTODAMA_JOURNAL_DIR`, `KOTODAMA_JOURNAL_MAX_BYTES`.
pub fn apply_env(c: &mut Config, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    if let Some(v) = env::value(get, "KOTODAMA_DATABASE_URL") {
        c.database_url = v;
    }
    if let Some(v) = env::value(get, "KOTODAMA_REDIS_URL") {
        c.redis_url = Some(v);
    }
    if let Some(v) = env::value(get, "KOTODAMA_REDIS_PREFIX") {
        c.redis_prefix = v;
    }
    if let Some(v) = env::value(get, "KOTODAMA_JOURNAL_DIR") {
        c.journal_dir = Some(PathBuf::from(v));
    }
    let fix = "use a byte count, e.g. 67108864 (64 MiB)";
    if let Some(v) = env::parse(get, "KOTODAMA_JOURNAL_MAX_BYTES", "a byte count", fix)? {
        c.journal_max_bytes = v;
    }
    if let Some(v) = env::parse(get, "KOTODAMA_STORE_QUEUE", "a count of writes", "use e.g. 4096")? {
        c.store_queue = v;
    }
    Ok(())
}

/// Supported URL schemes only; a cluster (Redis) shares one token secret.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    let db = &c.database_url;
    require_scheme(db, &["sqlite:", "postgres://", "postgresql://"], || {
        let fix = "use sqlite://path/to/file.db or postgres://user@host/db";
        err("KOTODAMA_DATABASE_URL", format!("unsupported URL `{db}`"), fix)
    })?;
    if c.journal_max_bytes < MIN_JOURNAL_BYTES {
        return Err(err(
            "KOTODAMA_JOURNAL_MAX_BYTES",
            format!("{} bytes is too small for the store journal", c.journal_max_bytes),
            format!("use at least {MIN_JOURNAL_BYTES} (the default is 67108864)"),
        ));
    }
    if c.store_queue == 0 {
        return Err(err("KOTODAMA_STORE_QUEUE", "0 leaves no room for store writes", "use at least 1 (default 4096)"));
    }
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
