//! Retry timing shared by the adapters: exponential backoff with full jitter, and the server's
//! own `Retry-After` when it gives one.

use std::time::Duration;

/// How often and how patiently to retry a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay ceiling before the first retry; doubles each retry.
    pub base: Duration,
    /// Largest delay between two attempts, `Retry-After` included.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            max_attempts: 6,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (0 for the first retry). A server's `Retry-After`
    /// wins over the computed backoff (capped); otherwise full jitter spreads clients out.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.cap);
        }
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_wins_but_is_capped() {
        let b = Backoff {
            max_attempts: 3,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(90))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn jittered_delay_stays_under_the_doubling_ceiling() {
        let b = Backoff {
            max_attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        for retry in 0..10 {
            let ceiling = Duration::from_millis(100 * (1 << retry)).min(b.cap);
            for _ in 0..50 {
                assert!(b.delay(retry, None) <= ceiling);
            }
        }
    }
}
