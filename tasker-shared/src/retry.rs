//! Retry backoff: when a failed step runs again.
//!
//! The delay before attempt `n + 1` (after `n` failed attempts) is exponential in
//! `n` from the step's `backoff_ms`, capped at [`MAX_BACKOFF`], with "equal
//! jitter": half of it is fixed, the other half uniformly random. The fixed half
//! guarantees a minimum spacing; the random half spreads out retries of steps that
//! failed together (a dependency outage), so they do not come back in lockstep.

use std::time::Duration;

/// No retry waits longer than this, however many attempts failed.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A step's retry policy, from its template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay after the first failure, before jitter.
    pub base: Duration,
}

impl BackoffPolicy {
    /// A policy from a step's `backoff_ms`.
    pub fn from_millis(backoff_ms: i32) -> Self {
        BackoffPolicy { base: Duration::from_millis(u64::try_from(backoff_ms).unwrap_or(0)) }
    }

    /// The capped exponential delay after `failed_attempts` failures, before jitter.
    pub fn ceiling(&self, failed_attempts: i32) -> Duration {
        let doublings = u32::try_from(failed_attempts.saturating_sub(1)).unwrap_or(0).min(31);
        self.base.checked_mul(1u32 << doublings).unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF)
    }

    /// The delay to wait after `failed_attempts` failures, with jitter from `rng`.
    pub fn delay(&self, failed_attempts: i32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(failed_attempts);
        let half = ceiling / 2;
        half + half.mul_f64(rng.f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_per_attempt_within_half_and_full_ceiling() {
        let policy = BackoffPolicy::from_millis(100);
        let mut rng = fastrand::Rng::with_seed(7);
        for (attempt, ceiling_ms) in [(1, 100), (2, 200), (3, 400), (4, 800)] {
            let ceiling = Duration::from_millis(ceiling_ms);
            assert_eq!(policy.ceiling(attempt), ceiling);
            for _ in 0..100 {
                let d = policy.delay(attempt, &mut rng);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn delays_are_capped_and_never_overflow() {
        let policy = BackoffPolicy::from_millis(86_400_000);
        assert_eq!(policy.ceiling(100), MAX_BACKOFF);
        assert_eq!(BackoffPolicy::from_millis(0).ceiling(50), Duration::ZERO);
        assert_eq!(BackoffPolicy::from_millis(-5).ceiling(1), Duration::ZERO);
    }
}
