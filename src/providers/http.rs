//! HTTP hygiene shared by every provider client: one `reqwest` client (rustls, certificate
//! verification always on, keep-alive, timeouts from configuration), the https-or-loopback URL
//! policy and `Retry-After` parsing.

use crate::config::HttpSettings;
use std::net::IpAddr;
use std::time::Duration;

/// The one client every provider shares (connection pool, TLS sessions).
pub fn build_client(
    settings: &HttpSettings,
    max_idle_per_host: usize,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(false) // per-account policy: see check_base_url
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .pool_max_idle_per_host(max_idle_per_host.max(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("contact-sync/", env!("CARGO_PKG_VERSION")))
        .build()
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

/// A provider's endpoint: `base` with `path` appended to its path (trailing `/` of the base
/// not doubled). Built once per account, so no call parses a URL.
pub fn endpoint(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    let joined = format!("{}{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
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
