//! Failover lists with a circuit breaker per adapter.
//!
//! Each stage (STT, LLM, TTS) has an ordered list of adapters. A request tries them in order,
//! skipping adapters whose breaker is open. A breaker opens after [`FAILURES_TO_OPEN`]
//! consecutive retryable failures and stays open for [`OPEN_FOR`]; then one request is let
//! through (half-open): success closes it, failure opens it again. When every breaker is open
//! the list is tried in order anyway: trying a possibly-broken server beats certain silence.
//!
//! The breaker is sans-IO (it takes `now`); the list is shared by all sessions of a provider,
//! so one session's failures spare the others the timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Consecutive failures that open a breaker.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How long an open breaker rejects requests.
pub const OPEN_FOR: Duration = Duration::from_secs(30);

/// One adapter's breaker.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// Whether a request may use the adapter now.
    pub fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|t| now >= t)
    }
    /// A request succeeded.
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }
    /// A request failed (retryably).
    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        if self.failures >= FAILURES_TO_OPEN || self.open_until.is_some() {
            self.open_until = Some(now + OPEN_FOR);
        }
    }
    /// Whether the breaker is open at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        !self.allows(now)
    }
}

/// An ordered list of adapters of one stage.
pub struct Failover<T: ?Sized> {
    entries: Vec<(Arc<T>, Mutex<Breaker>)>,
}

impl<T: ?Sized> Failover<T> {
    /// Adapters in order of preference.
    pub fn new(adapters: Vec<Arc<T>>) -> Self {
        Self { entries: adapters.into_iter().map(|a| (a, Mutex::new(Breaker::default()))).collect() }
    }

    /// How many adapters the list has.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn breaker(&self, i: usize) -> std::sync::MutexGuard<'_, Breaker> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.entries[i].1.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The order to try now: (index, adapter), allowed ones first, then (all open) the rest.
    pub fn order(&self, now: Instant) -> Vec<(usize, Arc<T>)> {
        let allowed: Vec<usize> = (0..self.entries.len()).filter(|&i| self.breaker(i).allows(now)).collect();
        let idx: Vec<usize> = if allowed.is_empty() { (0..self.entries.len()).collect() } else { allowed };
        idx.into_iter().map(|i| (i, Arc::clone(&self.entries[i].0))).collect()
    }

    /// Report the outcome of using adapter `i`. Only retryable failures count against it.
    pub fn report(&self, i: usize, ok: bool, now: Instant) {
        if i >= self.entries.len() {
            return;
        }
        let mut b = self.breaker(i);
        if ok { b.success() } else { b.failure(now) }
    }

    /// Whether adapter `i`'s breaker is open.
    pub fn is_open(&self, i: usize, now: Instant) -> bool {
        i < self.entries.len() && self.breaker(i).is_open(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_consecutive_failures_and_half_opens_later() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.failure(t0);
        b.failure(t0);
        assert!(b.allows(t0), "two failures keep it closed");
        b.failure(t0);
        assert!(!b.allows(t0 + Duration::from_secs(1)), "open after three");
        assert!(b.allows(t0 + OPEN_FOR), "half-open after the open period");
        b.failure(t0 + OPEN_FOR);
        assert!(!b.allows(t0 + OPEN_FOR + Duration::from_secs(1)), "a half-open failure reopens at once");
        b.success();
        assert!(b.allows(t0 + OPEN_FOR + Duration::from_secs(1)));
    }

    #[test]
    fn order_skips_open_adapters_but_never_returns_nothing() {
        let f: Failover<str> = Failover::new(vec![Arc::from("a"), Arc::from("b")]);
        let t0 = Instant::now();
        for _ in 0..3 {
            f.report(0, false, t0);
        }
        let names: Vec<String> = f.order(t0).iter().map(|(_, a)| a.to_string()).collect();
        assert_eq!(names, ["b"]);
        for _ in 0..3 {
            f.report(1, false, t0);
        }
        let names: Vec<String> = f.order(t0).iter().map(|(_, a)| a.to_string()).collect();
        assert_eq!(names, ["a", "b"], "all open: try them all in order");
    }
}
