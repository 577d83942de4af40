//! The sandbox's own per-account rate limit, as a provider enforces it per API key: a token
//! bucket per account; a signed request beyond it is answered with a throttle (HTTP 429 with
//! `Retry-After`, or JustClick's code 8), so users can check their `rate_limit_per_second`
//! against it. Also what the tests read: each account's call arrivals and most calls in flight.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a throttled request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThrottleAnswer {
    /// HTTP 429 with `Retry-After` (whole seconds until a token, at least 1).
    #[default]
    Http429,
    /// JustClick's signed code 8, "API request limit exhausted" (Smartlink answers 429).
    Code8,
}

/// A provider-side limit for one account (`provider` `justclick` with the login, or
/// `smartlink` with the game id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimitRule {
    pub provider: String,
    pub account: String,
    /// Requests per second.
    pub rate: f64,
    /// Bucket size (default: one second's worth, at least 1).
    #[serde(default)]
    pub burst: Option<f64>,
    #[serde(default)]
    pub answer: ThrottleAnswer,
}

impl RateLimitRule {
    /// `PROVIDER:ACCOUNT=RATE[/BURST][:code8]`, as `contact-sync sandbox --rate-limit` takes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expected = "expected PROVIDER:ACCOUNT=RATE[/BURST][:code8], e.g. justclick:shop=50/10";
        let (who, limit) = text.split_once('=').ok_or(expected)?;
        let (provider, account) = who.split_once(':').ok_or(expected)?;
        if !matches!(provider, "justclick" | "smartlink") || account.is_empty() {
            return Err(format!("{text:?}: {expected}"));
        }
        let (limit, answer) = match limit.strip_suffix(":code8") {
            Some(l) => (l, ThrottleAnswer::Code8),
            None => (limit, ThrottleAnswer::Http429),
        };
        let (rate, burst) = match limit.split_once('/') {
            Some((r, b)) => (r, Some(b)),
            None => (limit, None),
        };
        let number = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0);
        let rate = number(rate)
            .ok_or_else(|| format!("{text:?}: the rate must be a positive number; {expected}"))?;
        let burst = match burst {
            Some(b) => Some(
                number(b)
                    .ok_or_else(|| format!("{text:?}: the burst must be at least 1; {expected}"))?,
            ),
            None => None,
        };
        let rule = Self {
            provider: provider.into(),
            account: account.into(),
            rate,
            burst,
            answer,
        };
        rule.check()
            .map_err(|e| format!("{text:?}: {e}; {expected}"))?;
        Ok(rule)
    }

    /// The bounds a rule must keep, however it arrives (command line or `POST`): a rate of at
    /// least one request per 1,000 seconds and a burst of at least one request.
    pub fn check(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && self.rate >= 0.001) {
            return Err(format!(
                "the rate must be a number of at least 0.001 per second, got {}",
                self.rate
            ));
        }
        if let Some(b) = self.burst {
            if !(b.is_finite() && b >= 1.0) {
                return Err(format!("the burst must be at least 1, got {b}"));
            }
        }
        if !matches!(self.provider.as_str(), "justclick" | "smartlink") || self.account.is_empty() {
            return Err("the provider must be justclick or smartlink, with an account".into());
        }
        Ok(())
    }
}

struct Bucket {
    rule: RateLimitRule,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// (provider, account)
type AccountId = (String, String);

/// What one account saw.
#[derive(Debug, Clone, Default)]
pub struct AccountLog {
    /// Arrival of every signed request.
    pub arrivals: Vec<Instant>,
    /// When a throttle answer was sent (by a limit here or a scripted fault).
    pub throttled: Vec<Instant>,
    pub in_flight: u64,
    pub max_in_flight: u64,
}

#[derive(Default)]
pub(crate) struct Throttles {
    buckets: Mutex<HashMap<AccountId, Bucket>>,
    log: Mutex<HashMap<AccountId, AccountLog>>,
}

impl Throttles {
    pub(crate) fn set(&self, rule: RateLimitRule) {
        let burst = rule.burst.unwrap_or_else(|| rule.rate.ceil().max(1.0));
        if let Ok(mut b) = self.buckets.lock() {
            b.insert(
                (rule.provider.clone(), rule.account.clone()),
                Bucket {
                    rule,
                    burst,
                    tokens: burst,
                    at: Instant::now(),
                },
            );
        }
    }

    /// Takes a token for the account; `Some((answer, retry after))` when it has none.
    pub(crate) fn take(&self, provider: &str, account: &str) -> Option<(ThrottleAnswer, Duration)> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().ok()?;
        let b = buckets.get_mut(&(provider.to_string(), account.to_string()))?;
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * b.rule.rate)
            .min(b.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return None;
        }
        let wait = ((1.0 - b.tokens) / b.rule.rate).max(0.0);
        let wait = Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(1000));
        Some((b.rule.answer, wait))
    }

    pub(crate) fn arrived(&self, provider: &str, account: &str) {
        if let Ok(mut log) = self.log.lock() {
            let l = log
                .entry((provider.to_string(), account.to_string()))
                .or_default();
            l.arrivals.push(Instant::now());
            l.in_flight += 1;
            l.max_in_flight = l.max_in_flight.max(l.in_flight);
        }
    }

    pub(crate) fn left(&self, provider: &str, account: &str) {
        if let Ok(mut log) = self.log.lock() {
            if let Some(l) = log.get_mut(&(provider.to_string(), account.to_string())) {
                l.in_flight = l.in_flight.saturating_sub(1);
            }
        }
    }

    pub(crate) fn throttled(&self, provider: &str, account: &str) {
        if let Ok(mut log) = self.log.lock() {
            log.entry((provider.to_string(), account.to_string()))
                .or_default()
                .throttled
                .push(Instant::now());
        }
    }

    pub(crate) fn log(&self, provider: &str, account: &str) -> AccountLog {
        self.log
            .lock()
            .ok()
            .and_then(|l| l.get(&(provider.to_string(), account.to_string())).cloned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_say_what_is_expected() {
        let r = RateLimitRule::parse("justclick:shop=50/10:code8").unwrap();
        assert_eq!(
            (r.rate, r.burst, r.answer),
            (50.0, Some(10.0), ThrottleAnswer::Code8)
        );
        let r = RateLimitRule::parse("smartlink:123=2.5").unwrap();
        assert_eq!(
            (r.rate, r.burst, r.answer),
            (2.5, None, ThrottleAnswer::Http429)
        );
        for bad in [
            "shop=5",
            "mailchimp:x=5",
            "justclick:x=0",
            "justclick:x=5/0",
            "justclick:x=fast",
            "justclick:x=1e-300",
            "justclick:x=5/0.5",
        ] {
            let e = RateLimitRule::parse(bad).unwrap_err();
            assert!(e.contains("PROVIDER:ACCOUNT=RATE"), "{e}");
        }
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let t = Throttles::default();
        t.set(RateLimitRule::parse("justclick:a=10/3").unwrap());
        for _ in 0..3 {
            assert_eq!(t.take("justclick", "a"), None);
        }
        let (answer, wait) = t.take("justclick", "a").unwrap();
        assert_eq!(answer, ThrottleAnswer::Http429);
        assert!(wait <= Duration::from_millis(100));
        assert_eq!(t.take("justclick", "other"), None);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(t.take("justclick", "a"), None);
    }
}
