//! Short-term state the router needs across requests (and, with Redis, across nodes): used
//! token ids (single-use offers), idempotency records of `POST /v1/sessions`, and rate-limit
//! counters. Everything here expires on its own.
//!
//! [`ShortTermStore`] is the seam: [`MemoryShortTerm`] keeps it in this process (one node),
//! the `kotodama` crate implements it on Redis (`SET NX PX`, `INCR` + `PEXPIRE`) for a
//! cluster. Keys are plain strings chosen by the router (`jti:<id>`, `idem:<scope>:<key>`,
//! `rl:<bucket>`); the implementation may prefix them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

/// The short-term store failed (e.g. Redis unreachable). The router answers 503: it never
/// lets a request through on a guard it could not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("short-term state unavailable: {0}")]
pub struct ShortTermError(pub String);

/// Expiring keys and counters. Object safe (`Arc<dyn ShortTermStore>`).
#[async_trait]
pub trait ShortTermStore: Send + Sync + 'static {
    /// Set `key` to `value` for `ttl` unless it exists: `None` when this call set it, else the
    /// value already there (atomic: of concurrent callers exactly one gets `None`).
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Option<Vec<u8>>, ShortTermError>;

    /// Set `key` to `value` for `ttl`, replacing any value.
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), ShortTermError>;

    /// Remove `key`.
    async fn delete(&self, key: &str) -> Result<(), ShortTermError>;

    /// Count one hit on the fixed window `key` of length `window` (the window starts with its
    /// first hit): the count so far including this one, and the time left in the window.
    async fn hit(&self, key: &str, window: Duration) -> Result<(u64, Duration), ShortTermError>;
}

/// Entries [`MemoryShortTerm`] holds at most; beyond that, after dropping expired entries,
/// new keys are refused (fail closed) rather than growing without bound.
pub const MEMORY_CAPACITY: usize = 200_000;

/// [`ShortTermStore`] in this process: for one node without Redis.
#[derive(Debug, Default)]
pub struct MemoryShortTerm {
    values: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    counters: Mutex<HashMap<String, (u64, Instant)>>,
}

impl MemoryShortTerm {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn make_room<V>(map: &mut HashMap<String, (V, Instant)>, now: Instant) -> Result<(), ShortTermError> {
    if map.len() >= MEMORY_CAPACITY {
        map.retain(|_, (_, until)| *until > now);
    }
    if map.len() >= MEMORY_CAPACITY {
        return Err(ShortTermError(format!("in-process short-term state is full ({MEMORY_CAPACITY} entries)")));
    }
    Ok(())
}

#[async_trait]
impl ShortTermStore for MemoryShortTerm {
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Option<Vec<u8>>, ShortTermError> {
        let now = Instant::now();
        let mut map = lock(&self.values);
        if let Some((v, until)) = map.get(key)
            && *until > now
        {
            return Ok(Some(v.clone()));
        }
        make_room(&mut map, now)?;
        map.insert(key.to_owned(), (value.to_vec(), now + ttl));
        Ok(None)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), ShortTermError> {
        let now = Instant::now();
        let mut map = lock(&self.values);
        if !map.contains_key(key) {
            make_room(&mut map, now)?;
        }
        map.insert(key.to_owned(), (value.to_vec(), now + ttl));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), ShortTermError> {
        lock(&self.values).remove(key);
        Ok(())
    }

    async fn hit(&self, key: &str, window: Duration) -> Result<(u64, Duration), ShortTermError> {
        let now = Instant::now();
        let mut map = lock(&self.counters);
        match map.get_mut(key) {
            Some((count, until)) if *until > now => {
                *count += 1;
                Ok((*count, *until - now))
            }
            _ => {
                make_room(&mut map, now)?;
                map.insert(key.to_owned(), (1, now + window));
                Ok((1, window))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn set_nx_claims_once_until_deleted() {
        let s = MemoryShortTerm::new();
        assert_eq!(s.set_nx("a", b"1", Duration::from_secs(60)).await, Ok(None));
        assert_eq!(s.set_nx("a", b"2", Duration::from_secs(60)).await, Ok(Some(b"1".to_vec())));
        s.delete("a").await.unwrap();
        assert_eq!(s.set_nx("a", b"3", Duration::from_secs(60)).await, Ok(None));
        s.set("a", b"4", Duration::from_secs(60)).await.unwrap();
        assert_eq!(s.set_nx("a", b"5", Duration::from_secs(60)).await, Ok(Some(b"4".to_vec())));
        // Expired entries are gone.
        assert_eq!(s.set_nx("b", b"1", Duration::ZERO).await, Ok(None));
        assert_eq!(s.set_nx("b", b"2", Duration::from_secs(60)).await, Ok(None));
    }

    #[tokio::test]
    async fn hits_count_within_the_window() {
        let s = MemoryShortTerm::new();
        let w = Duration::from_secs(60);
        assert_eq!(s.hit("k", w).await.unwrap().0, 1);
        assert_eq!(s.hit("k", w).await.unwrap().0, 2);
        let (n, left) = s.hit("k", w).await.unwrap();
        assert_eq!(n, 3);
        assert!(left <= w && left > Duration::from_secs(50));
        assert_eq!(s.hit("other", w).await.unwrap().0, 1, "keys count separately");
        assert_eq!(s.hit("z", Duration::ZERO).await.unwrap().0, 1);
        assert_eq!(s.hit("z", Duration::ZERO).await.unwrap().0, 1, "an expired window starts over");
    }
}
