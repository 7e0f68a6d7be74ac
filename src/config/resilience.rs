//! `[resilience]`: reconnect, recycling and failover of provider sessions, for every provider.

use std::time::Duration;

use serde::Deserialize;

use super::Section;
use crate::providers::resilient::ResiliencePolicy;

/// Reconnect, recycling and failover of provider sessions (`[resilience]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceSettings {
    /// Connect attempts per provider before failing over to the next one.
    pub attempts_per_provider: u32,
    /// First reconnect delay, ms (doubled per attempt, jittered).
    pub backoff_base_ms: u64,
    /// Longest reconnect delay, ms.
    pub backoff_max_ms: u64,
    /// User audio kept while reconnecting, ms.
    pub gap_buffer_ms: u64,
    /// Recycle every provider session after this long, ms (unset: each provider's own limit,
    /// e.g. `openai.max_session_secs`).
    pub max_session_ms: Option<u64>,
    /// Open the next session this long before the limit, ms.
    pub recycle_lead_ms: u64,
    /// Silence from the user required for a recycle swap, ms.
    pub quiet_ms: u64,
    /// A reply (spoken or typed turn, greeting) that shows no progress within this is given up
    /// (`error` `reply_timeout`); a provider that sent nothing at all is replaced, ms.
    pub reply_timeout_ms: u64,
    /// A provider session that is not ready this long after the session started is replaced
    /// (`error` `provider_timeout`); a second miss ends the session, ms.
    pub start_timeout_ms: u64,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        Self {
            attempts_per_provider: 3,
            backoff_base_ms: 250,
            backoff_max_ms: 5_000,
            gap_buffer_ms: 5_000,
            max_session_ms: None,
            recycle_lead_ms: 60_000,
            quiet_ms: 1_500,
            reply_timeout_ms: 15_000,
            start_timeout_ms: 10_000,
        }
    }
}

impl ResilienceSettings {
    /// The session's start deadline (at least 1 ms).
    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms.max(1))
    }

    /// The policy the provider wrapper applies (at least one attempt, a reply timeout > 0).
    pub fn policy(&self) -> ResiliencePolicy {
        ResiliencePolicy {
            attempts_per_provider: self.attempts_per_provider.max(1),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            gap_buffer: Duration::from_millis(self.gap_buffer_ms),
            max_session: self.max_session_ms.map(Duration::from_millis),
            recycle_lead: Duration::from_millis(self.recycle_lead_ms),
            quiet_for: Duration::from_millis(self.quiet_ms),
            reply_timeout: Duration::from_millis(self.reply_timeout_ms.max(1)),
        }
    }
}

/// Every value is usable: `policy` clamps what must not be zero.
impl Section for ResilienceSettings {}
