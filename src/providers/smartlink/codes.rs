//! Smartlink response `code` → outcome.

use crate::providers::outcome::AccountCheck;
use crate::providers::DeliveryError;

/// The API key lacks permission for this call.
pub const NO_PERMISSION: i64 = 22010;

/// The game id is unknown.
pub const INVALID_GAME_ID: i64 = 1001;
/// The request's `ts` is too far from the provider's clock.
pub const TS_EXPIRED: i64 = 1002;
/// The request's `sig` does not verify with the game's secret.
pub const SIG_ERROR: i64 = 1003;

pub fn classify(code: i64, msg: &str, extra_retryable: &[i64]) -> Result<(), DeliveryError> {
    match code {
        0 => Ok(()),
        c if extra_retryable.contains(&c) => Err(DeliveryError::provider_busy(c, msg, None)),
        // the account (or this machine), not the change: every job would fail alike
        INVALID_GAME_ID => Err(DeliveryError::account_refused(
            code,
            msg,
            AccountCheck::GameId,
        )),
        TS_EXPIRED => Err(DeliveryError::account_refused(
            code,
            msg,
            AccountCheck::Clock,
        )),
        SIG_ERROR => Err(DeliveryError::account_refused(
            code,
            msg,
            AccountCheck::Secret,
        )),
        // 22010 and every undocumented code: permanent, kept in the history.
        c => Err(DeliveryError::permanent(c.to_string(), msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_codes() {
        assert!(classify(0, "ok", &[]).is_ok());
        assert_eq!(
            classify(NO_PERMISSION, "no permission", &[]),
            Err(DeliveryError::permanent("22010", "no permission"))
        );
        for c in [INVALID_GAME_ID, TS_EXPIRED, SIG_ERROR] {
            assert!(matches!(
                classify(c, "sig error", &[]),
                Err(DeliveryError::AccountRefused { .. })
            ));
        }
        assert!(matches!(
            classify(5, "busy", &[5]),
            Err(DeliveryError::Retryable { .. })
        ));
        assert!(matches!(
            classify(5, "x", &[]),
            Err(DeliveryError::Permanent { .. })
        ));
    }
}
