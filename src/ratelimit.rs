//! Token buckets: one per WebSocket connection for sends, and keyed ones
//! (per client address, per username) for login attempts.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// A token bucket: `capacity` tokens, refilled at `rate` tokens a second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(capacity: f64, rate_per_sec: f64) -> Self {
        TokenBucket {
            capacity,
            rate: rate_per_sec,
            tokens: capacity,
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self) -> Result<(), Duration> {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Gives a token back (an attempt that should not count).
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// Token buckets by key. Buckets that have refilled completely carry no
/// information and are pruned as the map grows, so memory stays bounded by
/// the number of keys active within one window.
pub struct KeyedLimiter<K: Eq + Hash> {
    buckets: DashMap<K, TokenBucket>,
    capacity: f64,
    rate: f64,
    ops: AtomicU64,
}

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    /// `per_window` attempts, refilled evenly over `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        let capacity = f64::from(per_window);
        KeyedLimiter {
            buckets: DashMap::new(),
            capacity,
            rate: capacity / window.as_secs_f64(),
            ops: AtomicU64::new(0),
        }
    }

    pub fn try_take(&self, key: &K) -> Result<(), Duration> {
        if self.ops.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.prune();
        }
        self.buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.capacity, self.rate))
            .try_take()
    }

    pub fn give_back(&self, key: &K) {
        if let Some(mut b) = self.buckets.get_mut(key) {
            b.give_back();
        }
    }

    fn prune(&self) {
        let now = Instant::now();
        self.buckets.retain(|_, b| !b.is_full(now));
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refuses_with_a_wait() {
        let mut b = TokenBucket::new(3.0, 1.0);
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_ok());
        let wait = b.try_take().unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        b.give_back();
        assert!(b.try_take().is_ok());
    }

    #[test]
    fn keys_are_limited_independently() {
        let l = KeyedLimiter::new(2, Duration::from_secs(60));
        assert!(l.try_take(&"a").is_ok());
        assert!(l.try_take(&"a").is_ok());
        assert!(l.try_take(&"a").is_err());
        assert!(l.try_take(&"b").is_ok());
    }
}
