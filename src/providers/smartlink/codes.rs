//! Smartlink response `code` → outcome.

use crate::providers::DeliveryError;

/// The API key lacks permission for this call.
pub const NO_PERMISSION: i64 = 22010;

pub fn classify(code: i64, msg: &str, extra_retryable: &[i64]) -> Result<(), DeliveryError> {
    match code {
        0 => Ok(()),
        c if extra_retryable.contains(&c) => Err(DeliveryError::provider_busy(c, msg, None)),
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
