//! Exponential backoff with jitter, for retrying infrastructure faults in
//! place (README, "Failure semantics"): 100 ms doubling up to 30 s, each sleep drawn
//! uniformly from [d/2, d] ("equal jitter") so replicas do not retry in step.

use crate::shutdown::Shutdown;
use std::time::Duration;

/// Backoff state for one retry loop. Create one per operation; `reset()`
/// after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Starts at `base`, doubles per attempt, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            base,
            max,
        }
    }

    /// Number of failures seen since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay (with jitter) and advance.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        let d = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(jitter())
    }

    /// Sleeps the next delay. Returns `false` (early) if shutdown is
    /// triggered, `true` otherwise.
    pub async fn wait(&mut self, shutdown: &Shutdown) -> bool {
        let d = self.next_delay();
        shutdown.sleep(d).await
    }
}

/// A number in [0, 1) from a cheap per-thread xorshift generator, seeded
/// from the clock and the process id. Not for cryptography.
fn jitter() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            (t ^ (u64::from(std::process::id()) << 32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d0 = b.next_delay();
        assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(200));
        let d2 = b.next_delay();
        assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400));
        let d3 = b.next_delay();
        assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
        for _ in 0..38 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
        assert_eq!(b.attempts(), 42);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
