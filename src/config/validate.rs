//! Every value checked once, at start: the range of each number and duration, the rules of
//! each account, the base-URL policy (https, or http to loopback only). Errors name the key.

use super::accounts::valid_account_name;
use super::{invalid, ConfigError, ProviderKind, Settings};
use std::net::IpAddr;
use std::time::Duration;

/// The range of every numeric setting: what the code computes with, with room to spare (a rate
/// times the seconds since the bucket's last refill in `float8`, `integer` columns, Postgres
/// intervals added to `now()`, tokio timers), and more than a deployment could want. A value
/// outside is refused at start, naming the key and the range.
pub mod bounds {
    use std::time::Duration;

    const DAY: u64 = 86_400;
    pub const MAX_CONNECTIONS: (u32, u32) = (2, 1_000);
    pub const CONCURRENCY: (usize, usize) = (1, 10_000);
    pub const BATCH_SIZE: (usize, usize) = (1, 10_000);
    pub const MAX_ATTEMPTS: (i32, i32) = (1, 1_000);
    pub const MAX_COALESCE: (usize, usize) = (1, 1_000);
    pub const LEASE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(DAY));
    pub const POLL_INTERVAL: (Duration, Duration) =
        (Duration::from_millis(10), Duration::from_secs(3_600));
    /// `backoff_base` and `backoff_cap` (a retry's `run_at = now() + delay`).
    pub const BACKOFF: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(30 * DAY));
    pub const SHUTDOWN_TIMEOUT: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(3_600));
    /// `retention.finished`: 100 years (`now() - interval`).
    pub const RETENTION: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(36_500 * DAY));
    /// `http.connect_timeout` and `http.request_timeout`.
    pub const HTTP_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(10), Duration::from_secs(3_600));
    /// Calls per second: from one call in about 11.6 days to a million a second.
    pub const RATE_PER_SECOND: (f64, f64) = (0.000_001, 1_000_000.0);
    pub const BURST: (u32, u32) = (1, 1_000_000);
    pub const MAX_IN_FLIGHT: (u32, u32) = (1, 1_000_000);
}

/// `value` within `(min, max)`, or an error naming the key and the range.
fn number_within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    (min, max): (T, T),
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, format!("must be between {min} and {max}")));
    }
    Ok(())
}

/// [`number_within`] for durations, the range written as the configuration writes it.
fn duration_within(
    key: &str,
    value: Duration,
    (min, max): (Duration, Duration),
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {}",
                crate::duration::format(min),
                crate::duration::format(max)
            ),
        ));
    }
    Ok(())
}

impl Settings {
    /// Checks every value once, at start; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        self.console.validate()?;
        number_within("worker.concurrency", w.concurrency, bounds::CONCURRENCY)?;
        number_within("worker.batch_size", w.batch_size, bounds::BATCH_SIZE)?;
        duration_within("worker.lease", w.lease, bounds::LEASE)?;
        if self.http.abandoned_call_bound > Duration::from_secs(86_400) {
            return Err(invalid(
                "http.abandoned_call_bound",
                "must be at most 1d (0s: the provider never acts on a request it was left with)",
            ));
        }
        duration_within(
            "worker.poll_interval",
            w.poll_interval,
            bounds::POLL_INTERVAL,
        )?;
        number_within("worker.max_attempts", w.max_attempts, bounds::MAX_ATTEMPTS)?;
        duration_within("worker.backoff_base", w.backoff_base, bounds::BACKOFF)?;
        duration_within("worker.backoff_cap", w.backoff_cap, bounds::BACKOFF)?;
        if w.backoff_cap < w.backoff_base {
            return Err(invalid(
                "worker.backoff_cap",
                "must not be smaller than worker.backoff_base",
            ));
        }
        duration_within(
            "worker.shutdown_timeout",
            w.shutdown_timeout,
            bounds::SHUTDOWN_TIMEOUT,
        )?;
        number_within("worker.max_coalesce", w.max_coalesce, bounds::MAX_COALESCE)?;
        duration_within(
            "retention.finished",
            self.retention.finished,
            bounds::RETENTION,
        )?;
        duration_within(
            "http.connect_timeout",
            self.http.connect_timeout,
            bounds::HTTP_TIMEOUT,
        )?;
        duration_within(
            "http.request_timeout",
            self.http.request_timeout,
            bounds::HTTP_TIMEOUT,
        )?;
        number_within(
            "database.max_connections",
            self.database.max_connections,
            bounds::MAX_CONNECTIONS,
        )?;
        if !self.admin.listen.is_empty()
            && self.admin.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "admin.listen",
                "must be an address like 127.0.0.1:9187, or empty to turn it off",
            ));
        }
        for (name, account) in &self.accounts {
            let key = |field: &str| format!("accounts.{name}.{field}");
            if !valid_account_name(name) {
                return Err(invalid(
                    format!("accounts.{name}"),
                    "account names use only a-z, 0-9 and _ (at most 64 characters)",
                ));
            }
            if account.secret.is_empty() {
                return Err(invalid(key("secret"), "is required"));
            }
            match account.provider {
                ProviderKind::Justclick => {
                    let login = account.login.as_deref().unwrap_or_default();
                    if login.is_empty()
                        || !login
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(invalid(
                            key("login"),
                            "is required for justclick (letters, digits, - and _)",
                        ));
                    }
                    if account.game_id.is_some() {
                        return Err(invalid(
                            key("game_id"),
                            "applies to smartlink accounts only",
                        ));
                    }
                }
                ProviderKind::Smartlink => {
                    let game = account.game_id.as_deref().unwrap_or_default();
                    if game.is_empty() || !game.chars().all(|c| c.is_ascii_digit()) {
                        return Err(invalid(
                            key("game_id"),
                            "is required for smartlink (digits)",
                        ));
                    }
                    if account.login.is_some() {
                        return Err(invalid(key("login"), "applies to justclick accounts only"));
                    }
                }
            }
            if let Some(rate) = account.rate_limit_per_second {
                let (min, max) = bounds::RATE_PER_SECOND;
                // (written so that NaN fails too)
                if !(rate >= min && rate <= max) {
                    return Err(invalid(
                        key("rate_limit_per_second"),
                        format!("must be a number from {min} to {max} (calls per second)"),
                    ));
                }
            }
            if let Some(burst) = account.burst {
                number_within(&key("burst"), burst, bounds::BURST)?;
            }
            if account.burst.is_some() && account.rate_limit_per_second.is_none() {
                return Err(invalid(
                    key("burst"),
                    "applies with rate_limit_per_second only",
                ));
            }
            if let Some(cap) = account.max_in_flight {
                number_within(&key("max_in_flight"), cap, bounds::MAX_IN_FLIGHT)?;
            }
            check_base_url(&account.effective_base_url(), account.allow_insecure_http)
                .map_err(|reason| invalid(key("base_url"), reason))?;
        }
        super::sources::validate_sources(self)?;
        Ok(())
    }
}

/// `https://` always; `http://` only for loopback hosts, or anywhere with `allow_insecure_http`.
pub fn check_base_url(url: &str, allow_insecure_http: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("must not carry a query or fragment".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials".into());
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_insecure_http || is_loopback(&parsed) => Ok(parsed),
        "http" => Err(format!(
            "plain http:// to {} is refused: use https://, a loopback address, or allow_insecure_http = true",
            parsed.host_str().unwrap_or("?")
        )),
        other => Err(format!("unsupported scheme {other:?}")),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_policy() {
        assert!(check_base_url("https://shop.justclick.ru", false).is_ok());
        assert!(check_base_url("http://127.0.0.1:8080/jc", false).is_ok());
        assert!(check_base_url("http://localhost:8080", false).is_ok());
        assert!(check_base_url("http://[::1]:8080", false).is_ok());
        assert!(check_base_url("http://192.168.1.10", false).is_err());
        assert!(check_base_url("http://example.com", false).is_err());
        assert!(check_base_url("http://example.com", true).is_ok());
        assert!(check_base_url("ftp://example.com", true).is_err());
        assert!(check_base_url("https://u:p@example.com", false).is_err());
    }
}
