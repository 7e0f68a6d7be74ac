//! `[session]`: limits on sessions.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Section, env, err};

/// Limits on sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionLimits {
    /// Time a session token allows to connect, seconds.
    pub token_ttl_secs: u64,
    /// Maximum length of one session, seconds.
    pub max_duration_secs: u64,
    /// Maximum concurrent sessions on this node (each holds one UDP socket).
    pub max_sessions: usize,
    /// How long a session may wait for its offer after creation, seconds
    /// (`KOTODAMA_SESSION_CONNECT_TIMEOUT_SECS`; default 30): a session never offered ends
    /// `never_connected` and frees its slot.
    pub connect_timeout_secs: u64,
    /// Grace given to live sessions on shutdown, seconds.
    pub drain_grace_secs: u64,
    /// A peer silent this long (no ICE traffic; consent lost) ends its session, seconds (>= 6).
    pub peer_timeout_secs: u64,
    /// A live session with no user speech, client message or agent audio for this long ends
    /// (`idle_timeout`), seconds; 0: never.
    pub idle_timeout_secs: u64,
    /// Sessions one API key may create per minute (0: no limit).
    pub create_per_minute_per_key: u32,
    /// Sessions one client IP may create per minute when the API is open (0: no limit).
    pub create_per_minute_per_ip: u32,
    /// Sessions one API key may hold not yet connected (`created`), beyond which creating is
    /// 429 `too_many_pending_sessions` (`KOTODAMA_SESSION_MAX_PENDING_PER_KEY`; 0: no limit).
    pub max_pending_per_key: usize,
    /// Sessions one API key may hold not yet ended (pending and live), beyond which creating is
    /// 429 `too_many_live_sessions` (`KOTODAMA_SESSION_MAX_LIVE_PER_KEY`; 0: only
    /// `max_sessions`).
    pub max_live_per_key: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            token_ttl_secs: 600,
            max_duration_secs: 3600,
            max_sessions: 500,
            connect_timeout_secs: 30,
            drain_grace_secs: 10,
            peer_timeout_secs: 15,
            idle_timeout_secs: 300,
            create_per_minute_per_key: 600,
            create_per_minute_per_ip: 120,
            max_pending_per_key: 20,
            max_live_per_key: 250,
        }
    }
}

impl SessionLimits {
    /// The token lifetime.
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
    /// The maximum session duration.
    pub fn max_duration(&self) -> Duration {
        Duration::from_secs(self.max_duration_secs)
    }
    /// How long a created session waits for its offer.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

impl Section for SessionLimits {
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let secs = |key| env::parse::<u64>(get, key, "a number of seconds", "e.g. 30");
        let count = |key| env::parse::<usize>(get, key, "a count of sessions", "e.g. 20, or 0 for no limit");
        if let Some(v) = secs("KOTODAMA_SESSION_CONNECT_TIMEOUT_SECS")? {
            self.connect_timeout_secs = v;
        }
        if let Some(v) = count("KOTODAMA_SESSION_MAX_PENDING_PER_KEY")? {
            self.max_pending_per_key = v;
        }
        if let Some(v) = count("KOTODAMA_SESSION_MAX_LIVE_PER_KEY")? {
            self.max_live_per_key = v;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.peer_timeout_secs < 6 {
            return Err(err(
                "session.peer_timeout_secs",
                "below 6 s",
                "use 6 or more (ICE declares a peer disconnected after 5 s)",
            ));
        }
        if self.max_sessions == 0 {
            return Err(err("session.max_sessions", "zero", "use a positive number"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(err(
                "session.connect_timeout_secs",
                "zero",
                "use a positive number of seconds (e.g. 30: a client offers within a second or two)",
            ));
        }
        if self.token_ttl_secs == 0 || self.max_duration_secs == 0 {
            return Err(err("session.token_ttl_secs", "zero", "use a positive number of seconds"));
        }
        Ok(())
    }
}
