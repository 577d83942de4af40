//! Simulated JustClick `UpdateSubscriberData`, as strict as the service: decodes the raw form
//! body as PHP fills `$_POST` (only with the form content type), checks in the service's order
//! (no data 2, hash missing 1, hash wrong 4, e-mail missing or invalid 100, unknown contact
//! 500), updates existing contacts only (unless the login creates missing ones), and answers
//! with a signed JSON body.

use super::{php_json_string, Contact, Fault, SandboxState};
use crate::providers::justclick::sign::{
    php_build_query, php_urldecode, request_hash, response_hash,
};
use crate::providers::model;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub const OK_TEXT: &str = "Данные контакта обновлены";
/// Code 500: the address is in none of the account's groups.
pub const NOT_FOUND_TEXT: &str = "Subscriber not found";

fn answer(code: i64, text: &str, secret: &str) -> Response {
    let hash = response_hash(code, text, secret);
    json(format!(
        r#"{{"error_code":{code},"error_text":{},"hash":"{hash}"}}"#,
        php_json_string(text)
    ))
}

pub(crate) fn json(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Decodes a form body as PHP fills `$_POST`: `+` and `%XX` decoded; `.` and spaces in a key
/// become `_` (`lead.name` arrives as `lead_name`); a repeated key keeps its first position and
/// its last value. `Err` for bytes PHP could not decode as this service expects (code 3).
pub fn php_post_fields(body: &[u8]) -> Result<Vec<(String, String)>, (i64, &'static str)> {
    let text = std::str::from_utf8(body).map_err(|_| (3, "Wrong data"))?;
    let mut fields: Vec<(String, String)> = Vec::new();
    for part in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (Some(k), Some(v)) = (php_urldecode(k), php_urldecode(v)) else {
            return Err((3, "Wrong data"));
        };
        let k: String = k
            .trim_start_matches(' ')
            .chars()
            .map(|c| if c == '.' || c == ' ' { '_' } else { c })
            .collect();
        if k.is_empty() {
            continue;
        }
        match fields.iter_mut().find(|(name, _)| *name == k) {
            Some(slot) => slot.1 = v,
            None => fields.push((k, v)),
        }
    }
    Ok(fields)
}

/// Checks a raw form body the way the service does, in its order: no POST data (empty body, or
/// a content type other than `application/x-www-form-urlencoded`) → 2; `hash` missing or empty
/// → 1; `hash` not equal to the lower-case hex of `md5(http_build_query(fields) + "::" + login
/// + "::" + secret)` over the fields as PHP decoded them → 4. Returns those fields (without
/// `hash`).
pub fn verify_form(
    body: &[u8],
    form_content_type: bool,
    login: &str,
    secret: &str,
) -> Result<Vec<(String, String)>, (i64, &'static str)> {
    if !form_content_type || body.is_empty() {
        return Err((2, "No data"));
    }
    let mut fields = php_post_fields(body)?;
    if fields.is_empty() {
        return Err((2, "No data"));
    }
    let sent_hash = match fields.iter().position(|(k, _)| k == "hash") {
        Some(i) => fields.remove(i).1,
        None => String::new(),
    };
    if sent_hash.is_empty() {
        return Err((1, "Hash is missing"));
    }
    let expected = request_hash(&php_build_query(&fields), login, secret);
    // PHP compares the strings: the lower-case hex digest only
    if sent_hash != expected {
        return Err((4, "Incorrect hash"));
    }
    Ok(fields)
}

/// Is this `Content-Type` a form (`application/x-www-form-urlencoded`, any parameters)?
pub fn is_form_content_type(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        v.split(';').next().is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    })
}

/// The service's own address check: PHP's `filter_var($email, FILTER_VALIDATE_EMAIL)` without
/// Unicode, modelled by [`crate::providers::address::php_valid_email`] (which contact-sync also
/// applies to every JustClick job at enqueue and before sending). An address it refuses is
/// answered with code 100.
pub fn php_valid_email(email: &str) -> bool {
    crate::providers::address::php_valid_email(email)
}

pub async fn update_subscriber(
    State(state): State<Arc<SandboxState>>,
    Path(login): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let secret = state
        .accounts
        .justclick
        .get(&login)
        .map(|s| s.expose().to_string());
    let Some(secret) = secret else {
        return answer(5, "Unknown login", "");
    };
    let form = is_form_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let pairs = match verify_form(&body, form, &login, &secret) {
        Ok(pairs) => pairs,
        Err((code, text)) => {
            if code == 4 {
                state.bad_signatures.fetch_add(1, Ordering::Relaxed);
            }
            return answer(code, text, &secret);
        }
    };
    let Some(email) = pairs
        .iter()
        .find(|(k, _)| k == "lead_email")
        .map(|(_, v)| v.clone())
    else {
        return answer(100, "E-mail is missing", &secret);
    };
    if !php_valid_email(&email) {
        return answer(100, "E-mail is invalid", &secret);
    }
    let id = ("justclick".to_string(), login.clone(), email.to_lowercase());
    let in_flight = state.enter(id.clone());
    let mut stall = None;
    match state.before_answer("justclick", &login, &email).await {
        None => {}
        Some(f @ (Fault::Status { .. } | Fault::RateLimit { .. } | Fault::Reset)) => {
            return super::transport_fault(&f).unwrap_or_default();
        }
        Some(Fault::ForgeSignature) => {
            return json(format!(
                r#"{{"error_code":0,"error_text":{},"hash":"{}"}}"#,
                php_json_string(OK_TEXT),
                response_hash(0, OK_TEXT, "not-the-secret")
            ));
        }
        Some(Fault::Unverifiable) => {
            return json(format!(
                r#"{{"error_code":0,"error_text":{}}}"#,
                php_json_string(OK_TEXT)
            ));
        }
        Some(Fault::ErrorCode { code, text }) => return answer(code, &text, &secret),
        Some(Fault::Malformed) => return json("<html>Service Unavailable</html>".into()),
        Some(Fault::Stall { ms }) => stall = Some(Duration::from_millis(ms)),
        // (taken by `before_answer`: the wait is over, the change goes on as usual)
        Some(Fault::Slow { .. }) => {}
    }
    if !state.justclick_contact_known(&login, &email) {
        drop(in_flight);
        return answer(500, NOT_FOUND_TEXT, &secret);
    }
    if let Ok(mut contacts) = state.contacts.lock() {
        let contact: &mut Contact = contacts.entry(id).or_default();
        contact.apply(|state| model::apply_justclick(state, &pairs));
        contact.updates += 1;
    }
    state.accepted.fetch_add(1, Ordering::Relaxed);
    // a stalled answer: the change is applied, the answer comes late (or never, when the
    // client gives up first)
    // (still in flight until answered, or until the client gives up and the call is dropped)
    if let Some(delay) = stall {
        tokio::time::sleep(delay).await;
    }
    drop(in_flight);
    answer(0, OK_TEXT, &secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(pairs: &[(&str, &str)], secret: &str) -> String {
        let query = php_build_query(pairs);
        let hash = request_hash(&query, "login", secret);
        format!("{query}&hash={hash}")
    }

    #[test]
    fn checks_run_in_the_services_order() {
        let ok = signed(&[("lead_email", "a@example.com")], "s");
        assert!(verify_form(ok.as_bytes(), true, "login", "s").is_ok());
        // no POST data: empty body, or not a form
        assert_eq!(verify_form(b"", true, "login", "s").unwrap_err().0, 2);
        assert_eq!(
            verify_form(ok.as_bytes(), false, "login", "s")
                .unwrap_err()
                .0,
            2
        );
        // hash missing or empty
        assert_eq!(
            verify_form(b"lead_email=a%40example.com", true, "login", "s")
                .unwrap_err()
                .0,
            1
        );
        assert_eq!(
            verify_form(b"lead_email=a%40example.com&hash=", true, "login", "s")
                .unwrap_err()
                .0,
            1
        );
        // wrong hash, and an upper-case right one (PHP compares the strings)
        assert_eq!(
            verify_form(ok.as_bytes(), true, "login", "other")
                .unwrap_err()
                .0,
            4
        );
        let upper = {
            let (q, h) = ok.rsplit_once("&hash=").unwrap();
            format!("{q}&hash={}", h.to_uppercase())
        };
        assert_eq!(
            verify_form(upper.as_bytes(), true, "login", "s")
                .unwrap_err()
                .0,
            4
        );
    }

    #[test]
    fn the_form_is_read_as_php_reads_it() {
        // PHP turns `lead.name` into `lead_name`, and keeps a repeated key's first position
        // with its last value, before the hash is checked
        let hash = request_hash(
            &php_build_query(&[("lead_email", "a@example.com"), ("lead_name", "B")]),
            "login",
            "s",
        );
        let body = format!("lead_email=a%40example.com&lead.name=A&lead_name=B&hash={hash}");
        let fields = verify_form(body.as_bytes(), true, "login", "s").unwrap();
        assert_eq!(
            fields,
            vec![
                ("lead_email".to_string(), "a@example.com".to_string()),
                ("lead_name".to_string(), "B".to_string())
            ]
        );
        assert!(is_form_content_type(Some(
            "application/x-www-form-urlencoded; charset=UTF-8"
        )));
        assert!(!is_form_content_type(Some("application/json")));
        assert!(!is_form_content_type(None));
    }

    #[test]
    fn addresses_as_the_service_validates_them() {
        for ok in [
            "a@example.com",
            "o'brien+tag@sub.example.org",
            "x_y-z1@b.co",
        ] {
            assert!(php_valid_email(ok), "{ok}");
        }
        for bad in [
            "a@b",
            "ü@example.com",
            "a@пример.рф",
            "a..b@example.com",
            "a@-b.com",
            "a b@c.com",
            // found by the review: the top-level label starts with a letter
            "a@b.123",
            "a@1.2.3.4",
            "a@b_c.com",
            "a@b-.com",
        ] {
            assert!(!php_valid_email(bad), "{bad}");
        }
    }
}
