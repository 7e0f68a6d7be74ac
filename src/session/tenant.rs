//! Per-API-key session limits (issue 12, kind 9): one tenant cannot take the node.
//!
//! Without them one key that creates sessions and never offers holds every slot of
//! `session.max_sessions` until the connect timeout, and every other key gets 503. Each key may
//! hold at most `session.max_pending_per_key` sessions not yet connected (`created` or
//! `connecting`) and `session.max_live_per_key` not yet ended; beyond that creating is 429 with
//! `Retry-After` (when the key's oldest pending session times out, for the pending limit).
//! Sessions created without a key (an open API) are limited per client IP by the create rate
//! and by `max_sessions` only.
//!
//! Counting and reserving happen under the manager's session-map lock, and a creation in flight
//! (its store write awaited) holds a [`Reservation`], so concurrent creations cannot overshoot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use signaling::host::SessionState;

use super::{SessionError, SessionShared};
use crate::config::SessionLimits;

/// Retry-After when the key must wait for one of its live sessions to end (unknowable: a hint).
const LIVE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Which per-key limit refused a creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLimit {
    /// `session.max_pending_per_key`: sessions created and not yet connected.
    Pending,
    /// `session.max_live_per_key`: sessions not yet ended.
    Live,
}

impl KeyLimit {
    /// The problem+json `code` of the 429.
    pub fn code(self) -> &'static str {
        match self {
            KeyLimit::Pending => "too_many_pending_sessions",
            KeyLimit::Live => "too_many_live_sessions",
        }
    }
}

/// The limits and the creations in flight, per key.
pub(crate) struct KeyLimits {
    max_pending: usize,
    max_live: usize,
    connect_timeout: Duration,
    /// Creations in flight per key (reserved, not yet in the session map).
    creating: Mutex<HashMap<String, usize>>,
}

/// One creation in flight for a key; released when dropped (created or failed).
pub(crate) struct Reservation<'a> {
    limits: &'a KeyLimits,
    key: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut creating = self.limits.creating();
        if let Some(n) = creating.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                creating.remove(&self.key);
            }
        }
    }
}

impl KeyLimits {
    pub(crate) fn new(cfg: &SessionLimits) -> Self {
        KeyLimits {
            max_pending: cfg.max_pending_per_key,
            max_live: cfg.max_live_per_key,
            connect_timeout: cfg.connect_timeout(),
            creating: Mutex::new(HashMap::new()),
        }
    }

    fn creating(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve a creation for `key` against its sessions in `sessions` (the manager's map, locked
    /// by the caller). Errors: [`SessionError::KeyLimit`] with the limit hit, its value and when
    /// to retry.
    pub(crate) fn reserve<'a>(
        &'a self,
        key: &str,
        sessions: &HashMap<String, Arc<SessionShared>>,
    ) -> Result<Reservation<'a>, SessionError> {
        let (mut pending, mut live) = (0usize, 0usize);
        // The soonest a pending session of this key times out.
        let mut soonest: Option<Duration> = None;
        for s in sessions.values().filter(|s| s.api_key_id.as_deref() == Some(key)) {
            let phase = s.lock().phase;
            match phase {
                SessionState::Ended => continue,
                SessionState::Created | SessionState::Connecting => {
                    pending += 1;
                    if phase == SessionState::Created {
                        let left = self.connect_timeout.saturating_sub(s.created_instant.elapsed());
                        soonest = Some(soonest.map_or(left, |t| t.min(left)));
                    }
                }
                _ => {}
            }
            live += 1;
        }
        let mut creating = self.creating();
        let in_flight = creating.get(key).copied().unwrap_or(0);
        let (pending, live) = (pending + in_flight, live + in_flight);
        if self.max_pending > 0 && pending >= self.max_pending {
            // The sweep runs every 5 s: the slot frees up to that much after the timeout. Sessions
            // still being created (or connecting) have the whole timeout ahead of them.
            let retry_after = soonest.unwrap_or(self.connect_timeout) + Duration::from_secs(5);
            return Err(SessionError::KeyLimit { limit: KeyLimit::Pending, max: self.max_pending, retry_after });
        }
        if self.max_live > 0 && live >= self.max_live {
            return Err(SessionError::KeyLimit {
                limit: KeyLimit::Live,
                max: self.max_live,
                retry_after: LIVE_RETRY_AFTER,
            });
        }
        *creating.entry(key.to_owned()).or_default() += 1;
        Ok(Reservation { limits: self, key: key.to_owned() })
    }
}
