//! JustClick `UpdateSubscriberData` client: builds the form in the documented order, signs it,
//! and trusts an answer only when its own hash verifies.

pub mod codes;
pub mod sign;

use crate::config::{AccountSettings, MissingContact, ProviderKind};
use crate::providers::outcome::{self, parse_answer, AccountCheck, CodeValue};
use crate::providers::{
    digest_eq, BoxFuture, Delivered, Delivery, DeliveryError, Provider, RetryReason,
};
use crate::secret::Secret;
use serde::Deserialize;
use serde_json::Value;

/// Path appended to the account's base URL.
pub const PATH: &str = "/api/UpdateSubscriberData";

/// The optional fields, in the order they are sent after `lead_email`.
pub const FIELDS: [&str; 4] = ["lead_name", "lead_phone", "lead_city", "lead_tags"];

pub struct JustClick {
    login: String,
    secret: Secret,
    /// Parsed once: a URL given as text would be parsed again on every call.
    endpoint: reqwest::Url,
    client: reqwest::Client,
    extra_retryable: Vec<i64>,
    missing_contact: MissingContact,
}

impl JustClick {
    pub fn new(account: &AccountSettings, base: reqwest::Url, client: reqwest::Client) -> Self {
        Self {
            login: account.login.clone().unwrap_or_default(),
            secret: account.secret.clone(),
            endpoint: super::http::endpoint(&base, PATH),
            client,
            extra_retryable: account.retryable_codes.clone(),
            missing_contact: account.missing_contact,
        }
    }
}

/// The form fields in the documented order (without `hash`).
pub fn form_fields(
    email: &str,
    payload: &crate::providers::payload::Payload,
) -> Result<Vec<(&'static str, String)>, DeliveryError> {
    if let Some(key) = payload.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(DeliveryError::permanent(
            "invalid_payload",
            format!("unknown justclick field {key:?}"),
        ));
    }
    if !crate::providers::address::is_valid_email(email) {
        return Err(DeliveryError::permanent(
            "invalid_payload",
            "justclick lead_email: not a valid address (at most 254 characters, no spaces or control characters)",
        ));
    }
    // (a job enqueued before the database refused these: JustClick would answer code 100)
    if !crate::providers::address::php_valid_email(email) {
        return Err(DeliveryError::permanent(
            "invalid_payload",
            "justclick lead_email: JustClick refuses this address (it accepts what PHP's FILTER_VALIDATE_EMAIL accepts: ASCII, host name labels of letters, digits and inner hyphens, the last starting with a letter, no IP address)",
        ));
    }
    let mut fields = vec![("lead_email", email.to_string())];
    for name in FIELDS {
        let value = match payload.get(name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) if name == "lead_tags" => {
                let tags: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                let tags = tags.ok_or_else(|| {
                    DeliveryError::permanent(
                        "invalid_payload",
                        "justclick field lead_tags: tags must be strings",
                    )
                })?;
                if tags.iter().any(|t| t.is_empty() || t.contains(',')) {
                    return Err(DeliveryError::permanent(
                        "invalid_payload",
                        "justclick field lead_tags: a tag in an array must be non-empty and contain no comma",
                    ));
                }
                tags.join(",")
            }
            Some(_) => {
                return Err(DeliveryError::permanent(
                    "invalid_payload",
                    format!("justclick field {name} must be a string"),
                ))
            }
        };
        // (a job queued with the triggers off: the limits enqueue holds every change to)
        let most = most_characters(name);
        if value.chars().count() > most {
            return Err(DeliveryError::permanent(
                "invalid_payload",
                format!("justclick field {name} is longer than {most} characters"),
            ));
        }
        fields.push((name, value));
    }
    Ok(fields)
}

/// The most characters a field may carry: `contact_sync.validate_justclick`'s limits (tags
/// counted as sent, joined by commas).
fn most_characters(field: &str) -> usize {
    match field {
        "lead_phone" => 64,
        "lead_tags" => 1000,
        _ => 255,
    }
}

/// The signed form body: the encoded fields, then `&hash=…`.
pub fn signed_body(fields: &[(&str, String)], login: &str, secret: &str) -> String {
    let mut body = sign::php_build_query(fields);
    let hash = sign::request_hash(&body, login, secret);
    body.push_str("&hash=");
    body.push_str(&hash);
    body
}

#[derive(Deserialize)]
struct Answer {
    error_code: CodeValue,
    #[serde(default)]
    error_text: Option<String>,
    #[serde(default)]
    hash: Option<String>,
}

/// Verifies and classifies a 2xx answer body.
pub fn read_answer(
    body: &[u8],
    secret: &str,
    extra_retryable: &[i64],
    missing_contact: MissingContact,
) -> Result<Delivered, DeliveryError> {
    let answer: Answer = parse_answer("justclick", body)?;
    let code = answer.error_code.to_i64("justclick", "error_code")?;
    let text = answer.error_text.unwrap_or_default();
    let expected = sign::response_hash(code, &text, secret);
    match answer.hash {
        Some(hash) if digest_eq(&hash, &expected) => {}
        // The service refused our hash, or the login, and signed its answer with a key that
        // is not ours: the secret (or login) is wrong, not the answer forged.
        _ if code == codes::INCORRECT_HASH => {
            return Err(DeliveryError::account_refused(
                code,
                "incorrect hash, and the answer is signed with another key",
                AccountCheck::Secret,
            ))
        }
        _ if code == codes::UNKNOWN_LOGIN => {
            return Err(DeliveryError::account_refused(
                code,
                "unknown login",
                AccountCheck::Login,
            ))
        }
        _ => {
            tracing::warn!(
                error_code = code,
                "justclick answer hash does not verify: possible forgery, not trusted"
            );
            return Err(DeliveryError::Retryable {
                reason: RetryReason::BadResponseSignature,
                retry_after: None,
                code: Some(code.to_string()),
                detail: format!(
                    "justclick answer hash does not verify (error_code {code}); not trusted"
                ),
            });
        }
    }
    // Verified: from here on the text is only shown, so make it safe to show.
    let text = crate::text::printable(&text, outcome::MAX_TEXT);
    if code == codes::SUBSCRIBER_NOT_FOUND && missing_contact == MissingContact::Skip {
        return Ok(Delivered {
            detail: text,
            not_found: true,
        });
    }
    codes::classify(code, &text, extra_retryable)?;
    Ok(Delivered {
        detail: text,
        not_found: false,
    })
}

impl Provider for JustClick {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Justclick
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, DeliveryError>> {
        Box::pin(async move {
            let fields = form_fields(delivery.email, delivery.payload)?;
            let body = signed_body(&fields, &self.login, self.secret.expose());
            let response = self
                .client
                .post(self.endpoint.clone())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body)
                .send()
                .await
                .map_err(outcome::from_transport)?;
            let status = response.status();
            if !status.is_success() {
                let headers = response.headers().clone();
                let bytes = response.bytes().await.map_err(outcome::from_transport)?;
                return Err(outcome::from_status(status, &headers, &bytes));
            }
            let bytes = response.bytes().await.map_err(outcome::from_transport)?;
            read_answer(
                &bytes,
                self.secret.expose(),
                &self.extra_retryable,
                self.missing_contact,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_in_documented_order_with_tags_joined() {
        let payload = json!({"lead_tags": ["a", "b"], "lead_city": "X", "lead_name": "N"});
        let fields = form_fields("u@example.com", payload.as_object().unwrap()).unwrap();
        let names: Vec<_> = fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ["lead_email", "lead_name", "lead_city", "lead_tags"]);
        assert_eq!(fields[3].1, "a,b");
    }

    /// Regression: addresses JustClick refuses (code 100) were sent.
    /// What enqueue refuses is never sent, for a job queued with the triggers off: the same
    /// limits, counted in characters as Postgres's `length` counts them.
    #[test]
    fn fields_enqueue_would_refuse_are_never_sent() {
        let fits = json!({"lead_name": "я".repeat(255), "lead_city": "я".repeat(255),
                          "lead_phone": "1".repeat(64), "lead_tags": ["a".repeat(499), "b".repeat(500)]});
        assert!(form_fields("u@example.com", fits.as_object().unwrap()).is_ok());
        for (payload, expected) in [
            (
                json!({"lead_name": "я".repeat(256)}),
                "lead_name is longer than 255",
            ),
            (
                json!({"lead_city": "x".repeat(256)}),
                "lead_city is longer than 255",
            ),
            (
                json!({"lead_phone": "1".repeat(65)}),
                "lead_phone is longer than 64",
            ),
            (
                json!({"lead_tags": "t".repeat(1001)}),
                "lead_tags is longer than 1000",
            ),
            (
                json!({"lead_tags": ["a".repeat(500), "b".repeat(500)]}),
                "lead_tags is longer than 1000",
            ),
            (
                json!({"lead_tags": ["a", ""]}),
                "non-empty and contain no comma",
            ),
            (
                json!({"lead_tags": ["a,b"]}),
                "non-empty and contain no comma",
            ),
        ] {
            let err = form_fields("u@example.com", payload.as_object().unwrap()).unwrap_err();
            assert!(err.to_string().contains(expected), "{payload}: {err}");
        }
    }

    #[test]
    fn addresses_justclick_refuses_are_never_sent() {
        let payload = json!({"lead_name": "N"});
        let long_label = format!("a@{}.com", "b".repeat(64));
        for bad in [
            "a@b_c.com",
            "a@b-.com",
            "a@-b.com",
            "a@b.123",
            "a@1.2.3.4",
            long_label.as_str(),
            "ü@example.com",
        ] {
            match form_fields(bad, payload.as_object().unwrap()) {
                Err(DeliveryError::Permanent { code, text }) => {
                    assert_eq!(code, "invalid_payload", "{bad}");
                    assert!(text.contains("FILTER_VALIDATE_EMAIL"), "{bad}: {text}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let longest_label = format!("a@{}.com", "b".repeat(63));
        for ok in [
            "o'brien+tag@sub.example.org",
            "a@b.c1",
            longest_label.as_str(),
        ] {
            assert!(
                form_fields(ok, payload.as_object().unwrap()).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn signed_body_matches_vector() {
        let payload = json!({"lead_name": "Новое Имя2", "lead_phone": "+77777777777", "lead_city": "Мухоловск", "lead_tags": "tag1,tag2,tag3"});
        let fields = form_fields("user@example.com", payload.as_object().unwrap()).unwrap();
        let body = signed_body(
            &fields,
            "username",
            "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        );
        assert!(
            body.ends_with("&hash=ab9658bd7aa8614cc37a9c06a7bf744e"),
            "{body}"
        );
    }

    #[test]
    fn answers_verify_or_are_not_trusted() {
        let ok = br#"{"error_code":0,"error_text":"OK","hash":"b6dbfded180416dee23ca6bfb4d96e3d"}"#;
        assert_eq!(
            read_answer(ok, "s3cr3t", &[], MissingContact::Dead)
                .unwrap()
                .detail,
            "OK"
        );
        // \u escapes are decoded before hashing
        let escaped = br#"{"error_code":"0","error_text":"\u0414\u0430\u043d\u043d\u044b\u0435 \u043a\u043e\u043d\u0442\u0430\u043a\u0442\u0430 \u043e\u0431\u043d\u043e\u0432\u043b\u0435\u043d\u044b","hash":"c6979ee97b510722694890d64b702eed"}"#;
        assert!(read_answer(escaped, "s3cr3t", &[], MissingContact::Dead).is_ok());
        let forged =
            br#"{"error_code":0,"error_text":"OK","hash":"00000000000000000000000000000000"}"#;
        assert!(matches!(
            read_answer(forged, "s3cr3t", &[], MissingContact::Dead),
            Err(DeliveryError::Retryable {
                reason: RetryReason::BadResponseSignature,
                ..
            })
        ));
        let permanent =
            br#"{"error_code":401,"error_text":"Error","hash":"dec40809bfb20b91f07fc5104776c1e7"}"#;
        assert_eq!(
            read_answer(permanent, "s3cr3t", &[], MissingContact::Dead),
            Err(DeliveryError::permanent("401", "Error"))
        );
        // 500 "subscriber not found": dead by default, a finished no-op with `skip`
        let missing = format!(
            r#"{{"error_code":500,"error_text":"Subscriber not found","hash":"{}"}}"#,
            sign::response_hash(500, "Subscriber not found", "s3cr3t")
        );
        assert!(matches!(
            read_answer(missing.as_bytes(), "s3cr3t", &[], MissingContact::Dead),
            Err(DeliveryError::Permanent { .. })
        ));
        let skipped = read_answer(missing.as_bytes(), "s3cr3t", &[], MissingContact::Skip).unwrap();
        assert!(skipped.not_found);
        assert!(matches!(
            read_answer(b"<html>", "s3cr3t", &[], MissingContact::Dead),
            Err(DeliveryError::Retryable {
                reason: RetryReason::MalformedResponse,
                ..
            })
        ));
    }
}
