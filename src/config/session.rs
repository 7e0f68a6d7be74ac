//! `[session]`: limits on sessions.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Section, err};

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
    /// How long a session may wait for its offer after creation, seconds.
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
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            token_ttl_secs: 600,
            max_duration_secs: 3600,
            max_sessions: 500,
            connect_timeout_secs: 600,
            drain_grace_secs: 10,
            peer_timeout_secs: 15,
            idle_timeout_secs: 300,
            create_per_minute_per_key: 600,
            create_per_minute_per_ip: 120,
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
}

impl Section for SessionLimits {
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
        if self.token_ttl_secs == 0 || self.max_duration_secs == 0 {
            return Err(err("session.token_ttl_secs", "zero", "use a positive number of seconds"));
        }
        Ok(())
    }
}
