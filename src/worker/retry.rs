//! Retry timing as a pure function: capped exponential growth with full jitter, or the
//! provider's `Retry-After`. The result is written as `run_at = now() + delay` in SQL; the
//! process never sleeps on a retry.

use std::time::Duration;

/// Largest exponent used: `base * 2^30` already exceeds any sensible cap.
const MAX_EXPONENT: u32 = 30;

/// The delay before attempt `attempt + 1`, where `attempt` (1-based) just failed.
///
/// `random(0, min(cap, base * 2^(attempt-1)))`, or `retry_after` when the provider sent one.
pub fn next_delay(
    attempt: i32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
    rng: &mut fastrand::Rng,
) -> Duration {
    if let Some(delay) = retry_after {
        return delay;
    }
    let exponent = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(MAX_EXPONENT);
    let ceiling = base.saturating_mul(1u32 << exponent).min(cap);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.u64(0..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_with_full_jitter() {
        let mut rng = fastrand::Rng::with_seed(7);
        let base = Duration::from_secs(2);
        let cap = Duration::from_secs(3600);
        for attempt in 1..40 {
            let ceiling = base.saturating_mul(1 << (attempt - 1).min(30)).min(cap);
            for _ in 0..50 {
                let d = next_delay(attempt, base, cap, None, &mut rng);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
        // full jitter reaches both ends of the range over many draws
        let draws: Vec<_> = (0..2000)
            .map(|_| next_delay(3, base, cap, None, &mut rng))
            .collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(1)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(7)));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let mut rng = fastrand::Rng::with_seed(1);
        let d = next_delay(
            i32::MAX,
            Duration::from_secs(2),
            Duration::from_secs(60),
            None,
            &mut rng,
        );
        assert!(d <= Duration::from_secs(60));
        let d = next_delay(
            0,
            Duration::from_secs(2),
            Duration::from_secs(60),
            None,
            &mut rng,
        );
        assert!(d <= Duration::from_secs(2));
    }

    #[test]
    fn retry_after_wins() {
        let mut rng = fastrand::Rng::with_seed(1);
        let d = next_delay(
            5,
            Duration::from_secs(2),
            Duration::from_secs(60),
            Some(Duration::from_secs(7)),
            &mut rng,
        );
        assert_eq!(d, Duration::from_secs(7));
    }
}
