//! Simulated Smartlink `SyncUserByEmail`: checks `gameid/seq/ts/sig` against the raw query
//! string and body bytes, applies `modify_ts` ordering and the `update_strategy` table, and
//! sends at most one confirmation email per API key and address per hour.

use super::justclick::json;
use super::{Contact, Fault, SandboxState};
use crate::providers::smartlink::{sign, PATH};
use crate::providers::{digest_eq, model};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The provider's confirmation-email window.
pub const EMAIL_WINDOW: Duration = Duration::from_secs(3600);
/// How far `ts` may be from the sandbox's clock.
const TS_TOLERANCE_SECS: i64 = 600;

fn answer(code: i64, msg: &str, seq: &str) -> Response {
    json(serde_json::json!({"code": code, "msg": msg, "seq": seq}).to_string())
}

/// The raw query string split into the signed params and the `sig` (which must come last).
pub fn split_signed_query(query: &str) -> Option<(&str, &str)> {
    query.rsplit_once("&sig=")
}

/// `sig == md5(path + "?" + params + body + key)` over the bytes as received.
pub fn verify_signature(params: &str, sig: &str, body: &[u8], secret: &str) -> bool {
    digest_eq(sig, &sign::sig(PATH, params, body, secret))
}

pub async fn sync_user_by_email(
    State(state): State<Arc<SandboxState>>,
    uri: Uri,
    body: Bytes,
) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let query = uri.query().unwrap_or("");
    let Some((params, sig)) = split_signed_query(query) else {
        return answer(1003, "sig missing or not last", "");
    };
    let mut game_id = None;
    let mut seq = None;
    let mut ts = None;
    for pair in params.split('&') {
        match pair.split_once('=') {
            Some(("gameid", v)) => game_id = Some(v),
            Some(("seq", v)) => seq = Some(v),
            Some(("ts", v)) => ts = v.parse::<i64>().ok(),
            _ => return answer(1005, "unexpected query parameter", ""),
        }
    }
    let seq = seq.unwrap_or("");
    if !seq.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return answer(1005, "seq may hold letters, digits and _ only", "");
    }
    let Some(game_id) = game_id else {
        return answer(1005, "gameid missing", seq);
    };
    let Some(secret) = state
        .accounts
        .smartlink
        .get(game_id)
        .map(|s| s.expose().to_string())
    else {
        return answer(1001, "invalid gameid", seq);
    };
    let Some(ts) = ts else {
        return answer(1005, "ts missing", seq);
    };
    if (ts - chrono::Utc::now().timestamp()).abs() > TS_TOLERANCE_SECS {
        return answer(1002, "ts expired", seq);
    }
    if !verify_signature(params, sig, &body, &secret) {
        state.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return answer(1003, "sig error", seq);
    }
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(&body) else {
        return answer(1005, "body is not a JSON object", seq);
    };
    let Some(email) = doc
        .get("email")
        .and_then(Value::as_str)
        .filter(|e| crate::providers::address::is_valid_email(e))
    else {
        return answer(1005, "email missing or invalid", seq);
    };
    if doc.get("modify_ts").and_then(Value::as_i64).is_none() {
        return answer(1005, "modify_ts missing", seq);
    }
    let subscribe = doc.get("subscribe").and_then(Value::as_i64);
    if subscribe.is_some_and(|s| ![-1, 0, 1, 3].contains(&s)) {
        return answer(1005, "subscribe invalid", seq);
    }
    let strategy = doc.get("update_strategy").and_then(Value::as_i64);
    if strategy.is_some_and(|s| !(0..=3).contains(&s)) {
        return answer(1005, "update_strategy invalid", seq);
    }

    let id = (
        "smartlink".to_string(),
        game_id.to_string(),
        email.to_lowercase(),
    );
    let in_flight = state.enter(id.clone());
    let mut stall = None;
    match state.before_answer("smartlink", game_id, email).await {
        None => {}
        Some(f @ (Fault::Status { .. } | Fault::RateLimit { .. } | Fault::Reset)) => {
            return super::transport_fault(&f).unwrap_or_default();
        }
        Some(Fault::ForgeSignature) => return answer(0, "success", "forged_seq"),
        Some(Fault::Unverifiable) => {
            return json(serde_json::json!({"code": 0, "msg": "success"}).to_string())
        }
        Some(Fault::ErrorCode { code, text }) => return answer(code, &text, seq),
        Some(Fault::Malformed) => return json("<html>Bad Gateway</html>".into()),
        Some(Fault::Stall { ms }) => stall = Some(Duration::from_millis(ms)),
        // (taken by `before_answer`: the wait is over, the change goes on as usual)
        Some(Fault::Slow { .. }) => {}
    }

    let response = apply(&state, id, &doc, subscribe, game_id, email, seq);
    // a stalled answer: the change is applied, the answer comes late (or never, when the
    // client gives up first)
    // (still in flight until answered, or until the client gives up and the call is dropped)
    if let Some(delay) = stall {
        tokio::time::sleep(delay).await;
    }
    drop(in_flight);
    response
}

/// Applies a verified request to the contact through the reference model.
fn apply(
    state: &SandboxState,
    id: super::ContactId,
    doc: &serde_json::Map<String, Value>,
    subscribe: Option<i64>,
    game_id: &str,
    email: &str,
    seq: &str,
) -> Response {
    let Ok(mut contacts) = state.contacts.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "sandbox state poisoned").into_response();
    };
    let contact: &mut Contact = contacts.entry(id).or_default();
    if subscribe == Some(3) {
        contact.pending_requests += 1;
    }
    let effect = contact.apply(|model_state| model::apply_smartlink(model_state, doc));
    if !effect.applied {
        contact.stale_updates += 1;
        state.accepted.fetch_add(1, Ordering::Relaxed);
        return answer(0, "success", seq);
    }
    contact.updates += 1;
    if effect.confirmation {
        let key = (game_id.to_string(), email.to_lowercase());
        if let Ok(mut emails) = state.emails.lock() {
            let now = Instant::now();
            match emails.get(&key) {
                Some(at) if now.duration_since(*at) < EMAIL_WINDOW => {
                    state.emails_suppressed.fetch_add(1, Ordering::Relaxed);
                    contact.confirmations_suppressed += 1;
                }
                _ => {
                    emails.insert(key, now);
                    contact.confirmation_emails += 1;
                }
            }
        }
    }
    state.accepted.fetch_add(1, Ordering::Relaxed);
    answer(0, "success", seq)
}

#[cfg(test)]
mod property {
    //! Any Unicode in any field survives the client's signing and the sandbox's verification.
    use super::*;
    use crate::providers::justclick::{form_fields, signed_body};
    use crate::providers::smartlink::{body, params};
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn justclick_requests_verify(name in "\\PC{0,40}", city in "\\PC{0,40}", phone in "\\PC{0,20}",
                                     tags in proptest::collection::vec("[^,]{1,10}", 0..4),
                                     local in "[a-zA-Z0-9+_~*'!-]{1,20}", secret in "\\PC{1,30}") {
            let email = format!("{local}@example.com");
            let payload = json!({"lead_name": name, "lead_city": city, "lead_phone": phone, "lead_tags": tags});
            let fields = form_fields(&email, payload.as_object().unwrap()).unwrap();
            let wire = signed_body(&fields, "login", &secret);
            let decoded = crate::sandbox::justclick::verify_form(wire.as_bytes(), true, "login", &secret).unwrap();
            let expected: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            prop_assert_eq!(decoded, expected);
            // and a wrong secret never verifies
            let other = format!("{secret}x");
            prop_assert_eq!(crate::sandbox::justclick::verify_form(wire.as_bytes(), true, "login", &other).unwrap_err().0, 4);
        }

        #[test]
        fn smartlink_requests_verify(nick in "\\PC{0,40}", tag in "\\PC{0,20}", lang in "[a-z]{2}",
                                     ts in 0i64..4_000_000_000, id in 0i64..1_000_000, key in "\\PC{1,30}") {
            let payload = json!({"tags": [tag], "attributes": {"nick": nick}, "language": lang, "modify_ts": ts * 1000});
            let b = body("a.b+c@example.org", payload.as_object().unwrap(), 0).unwrap();
            let bytes = serde_json::to_vec(&b).unwrap();
            let query_params = params("777", &format!("job_{id}_1"), ts);
            let sig = sign::sig(PATH, &query_params, &bytes, &key);
            let query = format!("{query_params}&sig={sig}");
            let (p, s) = split_signed_query(&query).unwrap();
            prop_assert!(verify_signature(p, s, &bytes, &key));
            let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&parsed["attributes"]["nick"], &json!(nick));
            let other = format!("{key}x");
            prop_assert!(!verify_signature(p, s, &bytes, &other));
        }
    }
}
