//! Simulated JustClick `UpdateSubscriberData`: decodes the raw form body as PHP fills `$_POST`,
//! recomputes `http_build_query` + `::login::secret`, and answers with a signed JSON body.

use super::{php_json_string, Contact, Fault, SandboxState};
use crate::providers::justclick::sign::{
    php_build_query, php_urldecode, request_hash, response_hash,
};
use crate::providers::{digest_eq, model};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub const OK_TEXT: &str = "Данные контакта обновлены";

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

/// Checks a raw form body the way the service does: decode the fields as PHP fills `$_POST`,
/// take `hash` out, re-encode the rest with `http_build_query`, compare. Returns the decoded
/// fields (without `hash`) or the provider's error code and text.
pub fn verify_form(
    body: &[u8],
    login: &str,
    secret: &str,
) -> Result<Vec<(String, String)>, (i64, &'static str)> {
    let text = std::str::from_utf8(body).map_err(|_| (3, "Wrong data"))?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match (php_urldecode(k), php_urldecode(v)) {
            (Some(k), Some(v)) => pairs.push((k, v)),
            _ => return Err((3, "Wrong data")),
        }
    }
    let hash_index = pairs
        .iter()
        .position(|(k, _)| k == "hash")
        .ok_or((1, "Hash is missing"))?;
    let sent_hash = pairs.remove(hash_index).1;
    if pairs.is_empty() {
        return Err((2, "No data"));
    }
    let expected = request_hash(&php_build_query(&pairs), login, secret);
    if !digest_eq(&sent_hash, &expected) {
        return Err((4, "Incorrect hash"));
    }
    Ok(pairs)
}

pub async fn update_subscriber(
    State(state): State<Arc<SandboxState>>,
    Path(login): Path<String>,
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
    let pairs = match verify_form(&body, &login, &secret) {
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
    if !crate::providers::address::is_valid_email(&email) {
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
    }
    if let Ok(mut contacts) = state.contacts.lock() {
        let contact: &mut Contact = contacts.entry(id).or_default();
        contact.apply(|state| model::apply_justclick(state, &pairs));
        contact.updates += 1;
    }
    state.accepted.fetch_add(1, Ordering::Relaxed);
    // a stalled answer: the change is applied, the answer comes late (or never, when the
    // client gives up first)
    drop(in_flight); // processed: only the answer is late
    if let Some(delay) = stall {
        tokio::time::sleep(delay).await;
    }
    answer(0, OK_TEXT, &secret)
}
