//! HTTP hygiene shared by every provider client: one `reqwest` client (rustls, certificate
//! verification always on, keep-alive, timeouts from configuration), endpoints and
//! `Retry-After` parsing. The URL policy (https, or http to loopback only) is a configuration
//! rule: [`crate::config::check_base_url`].

use crate::config::HttpSettings;
use std::time::Duration;

/// The one client every provider shares (connection pool, TLS sessions).
pub fn build_client(
    settings: &HttpSettings,
    max_idle_per_host: usize,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(false) // per-account policy: config::check_base_url
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .pool_max_idle_per_host(max_idle_per_host.max(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("contact-sync/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A provider's endpoint: `base` with `path` appended to its path (trailing `/` of the base
/// not doubled). Built once per account, so no call parses a URL.
pub fn endpoint(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    let joined = format!("{}{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

/// `Retry-After` as delta-seconds or an HTTP date; capped at one day.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let secs = (at.timestamp() - chrono::Utc::now().timestamp()).max(0);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    Some(delay.min(Duration::from_secs(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::check_base_url;

    #[test]
    fn endpoints_append_the_path_once() {
        let at = |base: &str| {
            let base = check_base_url(base, true).unwrap();
            endpoint(&base, "/api/x").to_string()
        };
        assert_eq!(at("https://h.example"), "https://h.example/api/x");
        assert_eq!(at("https://h.example/"), "https://h.example/api/x");
        assert_eq!(
            at("http://127.0.0.1:8080/jc/demo"),
            "http://127.0.0.1:8080/jc/demo/api/x"
        );
        assert_eq!(
            at("http://127.0.0.1:8080/jc/demo//"),
            "http://127.0.0.1:8080/jc/demo/api/x"
        );
        assert_eq!(
            at("https://h.example/a%20b/"),
            "https://h.example/a%20b/api/x"
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
