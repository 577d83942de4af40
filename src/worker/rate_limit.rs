//! Per-account rate limits in this process: a token bucket per account
//! (`rate_limit_per_second`, `burst`) and a pause set by a 429 / rate-limit answer. Turned into
//! per-account claim quotas, so a slow or throttled account never holds slots other accounts
//! could use.

use crate::config::Settings;
use crate::outbox::claim::AccountQuota;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    /// Tokens per second; `None` = unlimited.
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    refilled_at: Instant,
    paused_until: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let elapsed = now
                .saturating_duration_since(self.refilled_at)
                .as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        }
        self.refilled_at = now;
    }
}

/// What the producer may claim now, and when to look again if something is held back.
#[derive(Debug, Default)]
pub struct Plan {
    pub quotas: Vec<AccountQuota>,
    /// Earliest moment a held-back account (no tokens, paused) may take work again.
    pub wake_in: Option<Duration>,
}

#[derive(Debug)]
pub struct RateLimits {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Rotates which accounts get the odd slots when slots are scarce.
    rotation: Mutex<usize>,
}

impl RateLimits {
    pub fn from_settings(settings: &Settings) -> Self {
        let now = Instant::now();
        let buckets = settings
            .accounts
            .iter()
            .map(|(name, a)| {
                let burst = f64::from(a.burst.unwrap_or_else(|| {
                    a.rate_limit_per_second
                        .map_or(1, |r| r.ceil().max(1.0) as u32)
                }));
                let bucket = Bucket {
                    rate: a.rate_limit_per_second,
                    burst,
                    tokens: burst,
                    refilled_at: now,
                    paused_until: None,
                };
                (name.clone(), bucket)
            })
            .collect();
        Self {
            buckets: Mutex::new(buckets),
            rotation: Mutex::new(0),
        }
    }

    /// Shares `free` slots among `accounts` (at most `batch` each), within their tokens. Tokens
    /// for the quotas are taken now; [`RateLimits::refund`] gives back what was not claimed.
    pub fn plan(&self, accounts: &[String], free: usize, batch: usize) -> Plan {
        let now = Instant::now();
        let mut plan = Plan::default();
        let Ok(mut buckets) = self.buckets.lock() else {
            return plan;
        };
        let mut ready: Vec<(&String, usize)> = Vec::new();
        for account in accounts {
            let Some(bucket) = buckets.get_mut(account) else {
                ready.push((account, usize::MAX));
                continue;
            };
            if let Some(until) = bucket.paused_until {
                if until > now {
                    plan.wake_in = min_opt(plan.wake_in, until - now);
                    continue;
                }
                bucket.paused_until = None;
            }
            bucket.refill(now);
            match bucket.rate {
                None => ready.push((account, usize::MAX)),
                Some(_) if bucket.tokens >= 1.0 => {
                    ready.push((account, bucket.tokens.floor() as usize))
                }
                Some(rate) => {
                    let wait = Duration::from_secs_f64(((1.0 - bucket.tokens) / rate).max(0.001));
                    plan.wake_in = min_opt(plan.wake_in, wait);
                }
            }
        }
        if ready.is_empty() || free == 0 {
            return plan;
        }
        let n = ready.len();
        let start = self.rotation.lock().map(|mut r| {
            *r = r.wrapping_add(1);
            *r % n
        });
        let start = start.unwrap_or(0);
        let (base, extra) = (free / n, free % n);
        for i in 0..n {
            let (account, tokens) = ready[(start + i) % n];
            let share = base + usize::from(i < extra);
            let limit = share.min(tokens).min(batch);
            if limit == 0 {
                continue;
            }
            if let Some(bucket) = buckets.get_mut(account) {
                if bucket.rate.is_some() {
                    bucket.tokens -= limit as f64;
                }
            }
            plan.quotas.push(AccountQuota {
                account: account.clone(),
                limit: i32::try_from(limit).unwrap_or(i32::MAX),
            });
        }
        plan
    }

    /// Returns the tokens of quota slots that found no job.
    pub fn refund(&self, account: &str, unused: usize) {
        if let Ok(mut buckets) = self.buckets.lock() {
            if let Some(bucket) = buckets.get_mut(account) {
                if bucket.rate.is_some() {
                    bucket.tokens = (bucket.tokens + unused as f64).min(bucket.burst);
                }
            }
        }
    }

    /// Holds the account back for `delay` (a 429 or rate-limit code); other accounts go on.
    pub fn pause(&self, account: &str, delay: Duration) {
        let until = Instant::now() + delay;
        if let Ok(mut buckets) = self.buckets.lock() {
            let bucket = buckets
                .entry(account.to_string())
                .or_insert_with(|| Bucket {
                    rate: None,
                    burst: 1.0,
                    tokens: 1.0,
                    refilled_at: Instant::now(),
                    paused_until: None,
                });
            bucket.paused_until = Some(bucket.paused_until.map_or(until, |u| u.max(until)));
        }
    }
}

fn min_opt(current: Option<Duration>, candidate: Duration) -> Option<Duration> {
    Some(current.map_or(candidate, |c| c.min(candidate)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountSettings, ProviderKind};

    fn settings(rate: Option<f64>) -> Settings {
        let mut s = Settings::default();
        for name in ["a", "b"] {
            s.accounts.insert(
                name.into(),
                AccountSettings {
                    provider: ProviderKind::Justclick,
                    login: Some("x".into()),
                    game_id: None,
                    secret: crate::secret::Secret::new("s"),
                    base_url: None,
                    rate_limit_per_second: if name == "a" { rate } else { None },
                    burst: None,
                    allow_insecure_http: false,
                    double_opt_in: Default::default(),
                    retryable_codes: vec![],
                    missing_contact: Default::default(),
                },
            );
        }
        s
    }

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn slots_are_shared_and_never_exceeded() {
        let limits = RateLimits::from_settings(&settings(None));
        for free in [1, 2, 3, 31, 32] {
            let plan = limits.plan(&names(), free, 100);
            let total: i32 = plan.quotas.iter().map(|q| q.limit).sum();
            assert_eq!(total as usize, free);
        }
        let plan = limits.plan(&names(), 32, 10);
        assert!(plan.quotas.iter().all(|q| q.limit == 10));
    }

    #[test]
    fn a_limited_account_gets_its_tokens_only() {
        let limits = RateLimits::from_settings(&settings(Some(2.0)));
        let plan = limits.plan(&names(), 32, 100);
        let a = plan.quotas.iter().find(|q| q.account == "a").unwrap();
        let b = plan.quotas.iter().find(|q| q.account == "b").unwrap();
        assert_eq!(a.limit, 2);
        assert_eq!(b.limit, 16);
        let plan = limits.plan(&names(), 32, 100);
        assert!(plan.quotas.iter().all(|q| q.account != "a"));
        assert!(plan.wake_in.is_some());
        limits.refund("a", 1);
        let plan = limits.plan(&names(), 32, 100);
        assert_eq!(
            plan.quotas.iter().find(|q| q.account == "a").unwrap().limit,
            1
        );
    }

    #[test]
    fn pause_holds_back_one_account() {
        let limits = RateLimits::from_settings(&settings(None));
        limits.pause("a", Duration::from_secs(60));
        let plan = limits.plan(&names(), 32, 100);
        assert_eq!(plan.quotas.len(), 1);
        assert_eq!(plan.quotas[0].account, "b");
        assert_eq!(plan.quotas[0].limit, 32);
        assert!(plan.wake_in.unwrap() > Duration::from_secs(50));
    }
}
