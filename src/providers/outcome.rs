//! What a provider call came to, decided here and nowhere else: transport failures, HTTP
//! statuses and provider codes become [`DeliveryError::Retryable`] or
//! [`DeliveryError::Permanent`]; the worker only matches on the variant.

use crate::text::{body_snippet, error_chain, printable};
use std::fmt;
use std::time::Duration;

/// Why a failed call is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The TCP/TLS connection could not be made.
    Connect,
    /// No complete answer within `http.request_timeout`.
    Timeout,
    /// HTTP 5xx.
    ServerError,
    /// HTTP 429 or a provider rate-limit code: the account is slowed down.
    RateLimited,
    /// A provider code declared retryable (built-in or `retryable_codes`).
    ProviderBusy,
    /// The response's signature did not verify: possibly forged, never a success.
    BadResponseSignature,
    /// Not the JSON the provider documents.
    MalformedResponse,
    /// Any other I/O failure (reset connection, truncated body).
    Transport,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
            RetryReason::ServerError => "server_error",
            RetryReason::RateLimited => "rate_limited",
            RetryReason::ProviderBusy => "provider_busy",
            RetryReason::BadResponseSignature => "bad_response_signature",
            RetryReason::MalformedResponse => "malformed_response",
            RetryReason::Transport => "transport",
        }
    }
}

impl fmt::Display for RetryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed delivery. Texts never contain secrets, signatures or request URLs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth another attempt, after `retry_after` if the provider said so.
    #[error("{reason}: {detail}")]
    Retryable {
        reason: RetryReason,
        retry_after: Option<Duration>,
        /// The provider's code, when it sent one.
        code: Option<String>,
        detail: String,
    },
    /// The provider refused the change itself (or it can never be sent): the job goes `dead`.
    #[error("permanent error {code}: {text}")]
    Permanent { code: String, text: String },
    /// The provider refused the account, not the change: wrong secret, unknown login or game
    /// id, a clock it does not accept. Every job of the account would fail alike, so the account
    /// is paused for every worker (jobs wait, attempts not counted) until the configuration is
    /// fixed and a worker restarts, or an operator resumes it.
    #[error("provider refused the account's credentials (code {code}: {text}); check {}", .check.describe("<account>"))]
    AccountRefused {
        code: String,
        text: String,
        check: AccountCheck,
    },
}

/// What to check when a provider refuses an account: named in the pause's reason and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountCheck {
    /// `accounts.NAME.secret` (JustClick's secret key or Smartlink's API secret).
    Secret,
    /// `accounts.NAME.login` (JustClick).
    Login,
    /// `accounts.NAME.game_id` (Smartlink).
    GameId,
    /// The provider's IP allow-list for this machine's address.
    AllowedAddress,
    /// This machine's clock (Smartlink refuses a `ts` too far from its own).
    Clock,
}

impl AccountCheck {
    /// What to check, for the account `account`.
    pub fn describe(self, account: &str) -> String {
        match self {
            AccountCheck::Secret => format!("accounts.{account}.secret"),
            AccountCheck::Login => format!("accounts.{account}.login"),
            AccountCheck::GameId => format!("accounts.{account}.game_id"),
            AccountCheck::AllowedAddress => {
                "the account's allowed IP addresses at the provider (this machine's address was refused)".into()
            }
            AccountCheck::Clock => "this machine's clock (the provider refused the request time)".into(),
        }
    }
}

impl DeliveryError {
    pub fn retryable(reason: RetryReason, detail: impl Into<String>) -> Self {
        DeliveryError::Retryable {
            reason,
            retry_after: None,
            code: None,
            detail: detail.into(),
        }
    }

    /// The code and text are made printable here (they may come from the provider).
    pub fn permanent(code: impl Into<String>, text: impl Into<String>) -> Self {
        DeliveryError::Permanent {
            code: printable(&code.into(), 64),
            text: printable(&text.into(), MAX_TEXT),
        }
    }

    /// A provider code the provider or the account declares retryable.
    pub fn provider_busy(code: i64, text: &str, retry_after: Option<Duration>) -> Self {
        DeliveryError::Retryable {
            reason: RetryReason::ProviderBusy,
            retry_after,
            code: Some(code.to_string()),
            detail: format!("provider code {code}: {}", printable(text, MAX_TEXT)),
        }
    }

    /// The account itself was refused (see [`DeliveryError::AccountRefused`]).
    pub fn account_refused(code: i64, text: &str, check: AccountCheck) -> Self {
        DeliveryError::AccountRefused {
            code: code.to_string(),
            text: printable(text, MAX_TEXT),
            check,
        }
    }

    /// Short machine-readable kind for the error history and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DeliveryError::Retryable { reason, .. } => reason.as_str(),
            DeliveryError::Permanent { .. } => "permanent",
            DeliveryError::AccountRefused { .. } => "account_refused",
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            DeliveryError::Retryable { code, .. } => code.as_deref(),
            DeliveryError::Permanent { code, .. } | DeliveryError::AccountRefused { code, .. } => {
                Some(code)
            }
        }
    }
}

/// Classifies a `reqwest` failure. The URL is stripped first: the Smartlink signature travels in
/// the query string.
pub fn from_transport(err: reqwest::Error) -> DeliveryError {
    let err = err.without_url();
    let reason = if err.is_timeout() {
        RetryReason::Timeout
    } else if err.is_connect() {
        RetryReason::Connect
    } else {
        RetryReason::Transport
    };
    DeliveryError::retryable(reason, error_chain(&err))
}

/// Classifies a non-2xx HTTP status (everything the provider did not answer with its JSON).
pub fn from_status(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> DeliveryError {
    let snippet = body_snippet(body);
    let retry_after = super::http::retry_after(headers);
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return DeliveryError::Retryable {
            reason: RetryReason::RateLimited,
            retry_after,
            code: Some("429".into()),
            detail: format!("HTTP 429 Too Many Requests {snippet}")
                .trim_end()
                .to_string(),
        };
    }
    if status.is_server_error() || status == reqwest::StatusCode::REQUEST_TIMEOUT {
        return DeliveryError::Retryable {
            reason: RetryReason::ServerError,
            retry_after,
            code: Some(status.as_u16().to_string()),
            detail: format!("HTTP {status} {snippet}").trim_end().to_string(),
        };
    }
    // 4xx other than 408/429: the request itself is wrong (path, method, size).
    DeliveryError::permanent(
        format!("http_{}", status.as_u16()),
        format!("HTTP {status} {snippet}").trim_end(),
    )
}

/// A provider code that arrives as a JSON number or a numeric string.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum CodeValue {
    Number(i64),
    Text(String),
}

impl CodeValue {
    /// The code as a number; anything else is a malformed answer.
    pub fn to_i64(&self, provider: &str, field: &str) -> Result<i64, DeliveryError> {
        match self {
            CodeValue::Number(n) => Ok(*n),
            CodeValue::Text(t) => t.trim().parse().map_err(|_| {
                DeliveryError::retryable(
                    RetryReason::MalformedResponse,
                    format!("{provider} {field} {t:?} is not a number"),
                )
            }),
        }
    }
}

/// Parses a 2xx answer body; anything but the documented JSON is a retryable malformed answer.
pub fn parse_answer<T: serde::de::DeserializeOwned>(
    provider: &str,
    body: &[u8],
) -> Result<T, DeliveryError> {
    serde_json::from_slice(body).map_err(|e| {
        DeliveryError::retryable(
            RetryReason::MalformedResponse,
            format!(
                "{provider} answer is not the documented JSON ({e}): {}",
                body_snippet(body)
            ),
        )
    })
}

/// Longest provider text kept in an error (characters).
pub const MAX_TEXT: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
    use reqwest::StatusCode;

    #[test]
    fn provider_texts_in_errors_are_printable() {
        match DeliveryError::permanent("7", "x\u{0}y") {
            DeliveryError::Permanent { text, .. } => assert_eq!(text, "x\\u{0000}y"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statuses_are_classified() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        match from_status(StatusCode::TOO_MANY_REQUESTS, &h, b"slow down") {
            DeliveryError::Retryable {
                reason,
                retry_after,
                ..
            } => {
                assert_eq!(reason, RetryReason::RateLimited);
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            from_status(StatusCode::BAD_GATEWAY, &HeaderMap::new(), b""),
            DeliveryError::Retryable {
                reason: RetryReason::ServerError,
                ..
            }
        ));
        assert!(matches!(
            from_status(StatusCode::NOT_FOUND, &HeaderMap::new(), b""),
            DeliveryError::Permanent { .. }
        ));
    }
}
