//! Rate limits for a drive or a network card: token buckets for bandwidth (bytes per second)
//! and operations per second, each holding at most one second's worth, so a device idle for
//! a while may burst for a second and then goes at the rate. A device that finds a bucket
//! empty stops taking requests and arms the limiter's timer (one of its host descriptors);
//! the event loop wakes it when enough tokens have come back.
//!
//! Limits change while the VM runs: the VMM holds the same `SharedLimiter` and calls `set`,
//! which also wakes a device that was waiting.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use stratus_vmm_api::RateLimit;
use vmm_sys_util::timerfd::TimerFd;

#[derive(Debug)]
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Self { rate, tokens: rate as f64, last: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.last = now;
    }

    /// How long until `n` tokens are there (a request larger than the bucket waits for a
    /// full bucket, then goes and leaves it in debt).
    fn wait_for(&self, n: u64) -> Duration {
        let need = (n as f64).min(self.rate as f64) - self.tokens;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate.max(1) as f64)
        }
    }
}

/// The limiter of one device.
pub struct RateLimiter {
    limit: RateLimit,
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    /// Requests that had to wait, for metrics.
    pub throttled: u64,
}

/// A limiter shared by a device and the VMM that changes its limits.
pub type SharedLimiter = Arc<Mutex<RateLimiter>>;

impl RateLimiter {
    /// A limiter with `limit`.
    pub fn new(limit: RateLimit) -> std::io::Result<Self> {
        let mut limiter = Self { limit, bytes: None, ops: None, timer: TimerFd::new()?, throttled: 0 };
        limiter.set(limit);
        Ok(limiter)
    }

    /// A limiter shared between a device and the VMM.
    pub fn shared(limit: RateLimit) -> std::io::Result<SharedLimiter> {
        Ok(Arc::new(Mutex::new(Self::new(limit)?)))
    }

    /// Changes the limits (buckets start full) and wakes the device if it was waiting.
    pub fn set(&mut self, limit: RateLimit) {
        self.limit = limit;
        self.bytes = limit.bytes_per_sec.filter(|&r| r > 0).map(Bucket::new);
        self.ops = limit.ops_per_sec.filter(|&r| r > 0).map(Bucket::new);
        // Fire at once: a device blocked on the old limits looks again.
        let _ = self.timer.reset(Duration::from_nanos(1), None);
    }

    /// The limits in force.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes the tokens for one request of `bytes` bytes: true if it may go now; false if
    /// it must wait — the timer is then armed for when it may.
    pub fn consume(&mut self, bytes: u64) -> bool {
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if wait > Duration::ZERO {
            self.throttled += 1;
            let _ = self.timer.reset(wait, None);
            return false;
        }
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.tokens -= n as f64;
            }
        }
        true
    }

    /// Takes `bytes` tokens after the fact (a received frame whose size was not known before
    /// reading it); the bucket may go into debt, which later requests wait out.
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.refill(Instant::now());
            b.tokens -= bytes as f64;
        }
    }

    /// The timer's descriptor: readable when a waiting device may go on.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Acknowledges the timer.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut l = RateLimiter::new(RateLimit::default()).unwrap();
        for _ in 0..10_000 {
            assert!(l.consume(1 << 20));
        }
    }

    #[test]
    fn operations_are_held_to_their_rate() {
        let mut l = RateLimiter::new(RateLimit { bytes_per_sec: None, ops_per_sec: Some(100) }).unwrap();
        let start = Instant::now();
        let mut done = 0;
        while start.elapsed() < Duration::from_millis(500) {
            if l.consume(0) {
                done += 1;
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // A full bucket (100) plus about 50 more in half a second.
        assert!((140..=160).contains(&done), "{done} operations in 0.5 s at 100/s");
        assert!(l.throttled > 0);
    }

    #[test]
    fn bandwidth_is_held_to_its_rate_and_changes_at_once() {
        let mut l = RateLimiter::new(RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: None }).unwrap();
        assert!(l.consume(1 << 20), "the first second's worth goes at once");
        assert!(!l.consume(4096), "then the bucket is empty");
        l.set(RateLimit::default());
        assert!(l.consume(1 << 30), "lifting the limit lets everything through");
        // A request larger than the bucket goes once the bucket is full, leaving debt.
        l.set(RateLimit { bytes_per_sec: Some(1000), ops_per_sec: None });
        assert!(l.consume(5000));
        assert!(!l.consume(1));
    }
}
