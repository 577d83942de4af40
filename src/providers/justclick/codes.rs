//! JustClick `error_code` → outcome (the table in docs/providers.md).

use crate::providers::outcome::AccountCheck;
use crate::providers::{DeliveryError, RetryReason};
use std::time::Duration;

/// Code 4: the request's hash was refused.
pub const INCORRECT_HASH: i64 = 4;

/// Code 5: the login is unknown (its answer is signed with an empty key).
pub const UNKNOWN_LOGIN: i64 = 5;

/// Code 500: the address is in none of the account's groups (the contact does not exist).
pub const SUBSCRIBER_NOT_FOUND: i64 = 500;

/// Code 8 (API request limit for this address exhausted) waits this long before the next try.
pub const LIMIT_EXHAUSTED_DELAY: Duration = Duration::from_secs(2 * 3600);

pub fn classify(code: i64, text: &str, extra_retryable: &[i64]) -> Result<(), DeliveryError> {
    match code {
        0 => Ok(()),
        // "slow down", not a failure of the job: the account pauses, the attempt is not counted
        8 => Err(DeliveryError::Retryable {
            reason: RetryReason::RateLimited,
            retry_after: Some(LIMIT_EXHAUSTED_DELAY),
            code: Some("8".into()),
            detail: format!("provider code 8: {text}"),
        }),
        c if extra_retryable.contains(&c) => Err(DeliveryError::provider_busy(code, text, None)),
        // the account, not the change: every job would fail alike
        UNKNOWN_LOGIN => Err(DeliveryError::account_refused(
            code,
            text,
            AccountCheck::Login,
        )),
        6 => Err(DeliveryError::account_refused(
            code,
            text,
            AccountCheck::AllowedAddress,
        )),
        // 1-7: client bug or configuration (alert); 100: invalid e-mail; 500: no such subscriber;
        // anything else: permanent by default, kept in the job's history.
        c => Err(DeliveryError::permanent(c.to_string(), text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_codes() {
        assert!(classify(0, "OK", &[]).is_ok());
        // a verified code 4 means the secret is right and one request's encoding was refused
        for c in [1, 2, 3, 4, 7, 100, 500, 401] {
            assert!(
                matches!(classify(c, "x", &[]), Err(DeliveryError::Permanent { .. })),
                "{c}"
            );
        }
        match classify(8, "limit", &[]) {
            Err(DeliveryError::Retryable {
                reason,
                retry_after,
                ..
            }) => {
                assert_eq!(reason, RetryReason::RateLimited);
                assert_eq!(retry_after, Some(LIMIT_EXHAUSTED_DELAY));
            }
            other => panic!("{other:?}"),
        }
        for c in [5, 6] {
            assert!(
                matches!(
                    classify(c, "x", &[]),
                    Err(DeliveryError::AccountRefused { .. })
                ),
                "{c}"
            );
        }
        assert!(matches!(
            classify(401, "x", &[401]),
            Err(DeliveryError::Retryable { .. })
        ));
    }
}
