//! Calls per second per caller: a token bucket for each identity, so one
//! certificate (or, without TLS, one address) flooding a replica or a
//! gateway is answered 429 with `Retry-After` while every other caller goes
//! on as before. Both ends of SLAP keep one (the gateway and each replica),
//! which is why it lives in this shared crate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept before full (idle) ones are forgotten.
const KEEP: usize = 100_000;

/// Per-caller token buckets: `rate` calls per second, `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` calls per second and `burst` calls at once per caller; `None`
    /// (no limit) when `rate` is 0.
    pub fn new(rate: u32, burst: u32) -> Option<RateLimiter> {
        (rate > 0).then(|| RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one call for `caller` at `now`: `Ok`, or how long until it may
    /// call again.
    pub fn take(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= KEEP && !buckets.contains_key(caller) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.refilled(now, rate, burst) < burst);
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = bucket.refilled(now, self.rate, self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

impl Bucket {
    fn refilled(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

/// The `Retry-After` value for a wait: whole seconds, at least one.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_is_held_back_and_the_others_are_not() {
        let limiter = RateLimiter::new(10, 5).unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.take("flood", t0).is_ok());
        }
        let wait = limiter.take("flood", t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.take("quiet", t0).is_ok(), "another caller has its own bucket");
        // A tenth of a second later, one more call.
        let later = t0 + Duration::from_millis(100);
        assert!(limiter.take("flood", later).is_ok());
        assert!(limiter.take("flood", later).is_err());
        assert_eq!(retry_after_secs(Duration::from_millis(20)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2500)), 3);
        assert!(RateLimiter::new(0, 10).is_none(), "0 means no limit");
    }

    #[test]
    fn idle_buckets_are_forgotten_past_the_bound() {
        let limiter = RateLimiter::new(1000, 1).unwrap();
        let t0 = Instant::now();
        for i in 0..KEEP {
            limiter.take(&format!("c{i}"), t0).unwrap();
        }
        // A second later every bucket is full again: the next new caller
        // makes room.
        limiter.take("new", t0 + Duration::from_secs(1)).unwrap();
        assert!(limiter.buckets.lock().unwrap().len() < KEEP);
    }
}
