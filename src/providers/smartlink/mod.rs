//! Smartlink `SyncUserByEmail` client: validates the change, serialises the JSON body once,
//! signs `path?params + body + key`, sends exactly those bytes with a fresh `seq` and `ts`.

pub mod codes;
pub mod sign;

use crate::config::{AccountSettings, DoubleOptIn, ProviderKind};
use crate::providers::outcome::{self, parse_answer, CodeValue};
use crate::providers::payload::Payload;
use crate::providers::{
    md5_hex, BoxFuture, Delivered, Delivery, DeliveryError, Provider, RetryReason,
};
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The signed path (without host or any base-URL prefix).
pub const PATH: &str = "/api/v4/userinfo/sync_user_by_email";

pub struct Smartlink {
    game_id: String,
    secret: Secret,
    /// md5 of the API key: names the double-opt-in window without exposing the key.
    api_key_id: String,
    /// Parsed once: a URL given as text would be parsed again on every call.
    endpoint: reqwest::Url,
    client: reqwest::Client,
    extra_retryable: Vec<i64>,
    double_opt_in: DoubleOptIn,
}

impl Smartlink {
    pub fn new(account: &AccountSettings, base: reqwest::Url, client: reqwest::Client) -> Self {
        Self {
            game_id: account.game_id.clone().unwrap_or_default(),
            api_key_id: api_key_id(&account.secret),
            secret: account.secret.clone(),
            endpoint: super::http::endpoint(&base, PATH),
            client,
            extra_retryable: account.retryable_codes.clone(),
            double_opt_in: account.double_opt_in,
        }
    }
}

/// The identity the one-hour confirmation window is counted by.
pub fn api_key_id(secret: &Secret) -> String {
    md5_hex(&[b"contact-sync:smartlink:", secret.expose().as_bytes()])
}

/// The JSON body, fields in the documented order.
#[derive(Debug, Serialize, PartialEq)]
pub struct Body<'a> {
    pub email: &'a str,
    pub modify_ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferences: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<i64>,
}

fn invalid(field: &str, why: &str) -> DeliveryError {
    DeliveryError::permanent("invalid_payload", format!("smartlink field {field}: {why}"))
}

fn string_list<'a>(payload: &'a Payload, field: &str) -> Result<Option<&'a Value>, DeliveryError> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Array(items)) => {
            if items.len() > 100 {
                return Err(invalid(field, "more than 100 entries"));
            }
            if items.iter().any(|i| !i.is_string()) {
                return Err(invalid(field, "entries must be strings"));
            }
            // (the limit enqueue holds every change to: a job queued with the triggers off)
            if items
                .iter()
                .filter_map(Value::as_str)
                .any(|i| i.chars().count() > 255)
            {
                return Err(invalid(field, "has an entry longer than 255 characters"));
            }
            Ok(Some(v))
        }
        Some(_) => Err(invalid(field, "must be an array of strings")),
    }
}

fn int_in(payload: &Payload, field: &str, allowed: &[i64]) -> Result<Option<i64>, DeliveryError> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if allowed.contains(&n) => Ok(Some(n)),
            _ => Err(invalid(field, &format!("must be one of {allowed:?}"))),
        },
    }
}

fn text<'a>(
    payload: &'a Payload,
    field: &str,
    ok: impl Fn(&str) -> bool,
    why: &str,
) -> Result<Option<&'a str>, DeliveryError> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if ok(s) => Ok(Some(s)),
        Some(_) => Err(invalid(field, why)),
    }
}

fn is_language_code(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let mut parts = s.split(['-', '_']);
    let first_ok = parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphabetic()));
    first_ok
        && parts.all(|p| (2..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Validates a change and lays out its body (invalid input is a permanent failure naming the field).
pub fn body<'a>(
    email: &'a str,
    payload: &'a Payload,
    created_at_ms: i64,
) -> Result<Body<'a>, DeliveryError> {
    const KNOWN: [&str; 9] = [
        "modify_ts",
        "tags",
        "openid",
        "subscribe",
        "location",
        "language",
        "attributes",
        "preferences",
        "update_strategy",
    ];
    if let Some(key) = payload.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(DeliveryError::permanent(
            "invalid_payload",
            format!("unknown smartlink field {key:?}"),
        ));
    }
    if !crate::providers::address::is_valid_email(email) {
        return Err(invalid(
            "email",
            "not a valid address (at most 254 characters, no spaces or control characters)",
        ));
    }
    let modify_ts = match payload.get("modify_ts") {
        None | Some(Value::Null) => created_at_ms,
        Some(v) => v
            .as_i64()
            .filter(|n| *n >= 0)
            .ok_or_else(|| invalid("modify_ts", "must be a non-negative integer"))?,
    };
    let attributes = match payload.get("attributes") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(map)) => {
            if map.len() > 50 {
                return Err(invalid("attributes", "more than 50 entries"));
            }
            for (k, value) in map {
                if k.chars().count() > 255 {
                    return Err(invalid(
                        "attributes",
                        "has a name longer than 255 characters",
                    ));
                }
                match value {
                    Value::String(s) if s.chars().count() > 1000 => {
                        return Err(invalid(
                            "attributes",
                            &format!("{k:?} is longer than 1000 characters"),
                        ))
                    }
                    Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
                    _ => {
                        return Err(invalid(
                            "attributes",
                            &format!("{k:?} must be a string, number or boolean"),
                        ))
                    }
                }
            }
            Some(v)
        }
        Some(_) => return Err(invalid("attributes", "must be an object")),
    };
    Ok(Body {
        email,
        modify_ts,
        tags: string_list(payload, "tags")?,
        openid: text(
            payload,
            "openid",
            |s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()),
            "must be a string of at most 20 digits",
        )?,
        subscribe: int_in(payload, "subscribe", &[-1, 0, 1, 3])?,
        location: text(
            payload,
            "location",
            |s| s.is_empty() || (s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit())),
            "must be a 3-digit ISO 3166 numeric code like \"004\"",
        )?,
        language: text(
            payload,
            "language",
            is_language_code,
            "must be a language code like \"en\"",
        )?,
        attributes,
        preferences: string_list(payload, "preferences")?,
        update_strategy: int_in(payload, "update_strategy", &[0, 1, 2, 3])?,
    })
}

#[derive(Deserialize)]
struct Answer {
    code: CodeValue,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    seq: Option<String>,
}

/// Classifies a 2xx answer; `seq` must echo the request's.
pub fn read_answer(
    body: &[u8],
    seq: &str,
    extra_retryable: &[i64],
) -> Result<Delivered, DeliveryError> {
    let answer: Answer = parse_answer("smartlink", body)?;
    let code = answer.code.to_i64("smartlink", "code")?;
    // The echo is what ties this answer to this request: without it the answer proves nothing.
    match answer.seq.as_deref() {
        Some(echo) if echo == seq => {}
        Some(echo) => {
            return Err(DeliveryError::retryable(
                RetryReason::BadResponseSignature,
                format!(
                    "smartlink answer echoes seq {:?}, not this request's {seq:?}; not trusted",
                    crate::text::printable(echo, 64)
                ),
            ));
        }
        None => {
            return Err(DeliveryError::retryable(
                RetryReason::BadResponseSignature,
                format!("smartlink answer carries no seq echo (code {code}); cannot be verified, not trusted"),
            ));
        }
    }
    let msg = crate::text::printable(&answer.msg.unwrap_or_default(), outcome::MAX_TEXT);
    codes::classify(code, &msg, extra_retryable)?;
    Ok(Delivered {
        detail: msg,
        not_found: false,
    })
}

/// `gameid=…&seq=…&ts=…` (the signed params).
pub fn params(game_id: &str, seq: &str, ts: i64) -> String {
    format!("gameid={game_id}&seq={seq}&ts={ts}")
}

impl Provider for Smartlink {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Smartlink
    }

    fn double_opt_in(&self) -> Option<(&str, DoubleOptIn)> {
        Some((&self.api_key_id, self.double_opt_in))
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, DeliveryError>> {
        Box::pin(async move {
            let body = body(delivery.email, delivery.payload, delivery.created_at_ms)?;
            let bytes = serde_json::to_vec(&body).map_err(|e| {
                DeliveryError::permanent("invalid_payload", format!("cannot serialise: {e}"))
            })?;
            // Fresh per request: letters, digits and `_` only.
            let seq = format!(
                "job_{}_{}_{}",
                delivery.job_id,
                delivery.attempt,
                fastrand::u32(..)
            );
            let ts = chrono::Utc::now().timestamp();
            let params = params(&self.game_id, &seq, ts);
            let sig = sign::sig(PATH, &params, &bytes, self.secret.expose());
            let mut url = self.endpoint.clone();
            url.set_query(Some(&format!("{params}&sig={sig}")));
            let response = self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes)
                .send()
                .await
                .map_err(outcome::from_transport)?;
            let status = response.status();
            if !status.is_success() {
                let headers = response.headers().clone();
                let answer = response.bytes().await.map_err(outcome::from_transport)?;
                return Err(outcome::from_status(status, &headers, &answer));
            }
            let answer = response.bytes().await.map_err(outcome::from_transport)?;
            read_answer(&answer, &seq, &self.extra_retryable)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_bytes_match_the_vector() {
        let payload = json!({"modify_ts": 1691225447577i64, "tags": ["tag1","tag2"], "openid": "5450588341569", "subscribe": 1,
            "location": "004", "language": "en", "attributes": {"nickname":"tang","level":"10","birthday":"1990-05-09 00:00:00+08:00"},
            "preferences": ["option1","option2"]});
        let b = body("545058834@qq.com", payload.as_object().unwrap(), 0).unwrap();
        let bytes = serde_json::to_string(&b).unwrap();
        assert_eq!(
            bytes,
            r#"{"email":"545058834@qq.com","modify_ts":1691225447577,"tags":["tag1","tag2"],"openid":"5450588341569","subscribe":1,"location":"004","language":"en","attributes":{"nickname":"tang","level":"10","birthday":"1990-05-09 00:00:00+08:00"},"preferences":["option1","option2"]}"#
        );
        let sig = sign::sig(
            PATH,
            &params("12345", "job_42_1", 1691225447),
            bytes.as_bytes(),
            "sl-api-key-0123456789abcdef",
        );
        assert_eq!(sig, "2f2200788ba8bf16584cec1d1ad529b3");
    }

    #[test]
    fn modify_ts_falls_back_to_the_change_time() {
        let payload = json!({});
        let b = body("a@b.co", payload.as_object().unwrap(), 1700000000000).unwrap();
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"email":"a@b.co","modify_ts":1700000000000}"#
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        for (payload, field) in [
            (json!({"openid": "123456789012345678901"}), "openid"),
            (json!({"openid": "12a"}), "openid"),
            (json!({"subscribe": 2}), "subscribe"),
            (json!({"update_strategy": 4}), "update_strategy"),
            (json!({"location": "4"}), "location"),
            (json!({"language": "english!"}), "language"),
            (json!({"tags": "x"}), "tags"),
            (json!({"nope": 1}), "nope"),
            // enqueue's limits, for a job queued with the triggers off
            (json!({"tags": ["я".repeat(256)]}), "tags"),
            (json!({"preferences": ["p".repeat(256)]}), "preferences"),
            (json!({"attributes": {"n".repeat(256): 1}}), "attributes"),
        ] {
            match body("a@b.co", payload.as_object().unwrap(), 0) {
                Err(DeliveryError::Permanent { text, .. }) => {
                    assert!(text.contains(field), "{text}")
                }
                other => panic!("{payload}: {other:?}"),
            }
        }
        let fits =
            json!({"tags": ["я".repeat(255)], "attributes": {"n".repeat(255): "v".repeat(1000)}});
        assert!(body("a@b.co", fits.as_object().unwrap(), 0).is_ok());
        assert!(body("not-an-address", json!({}).as_object().unwrap(), 0).is_err());
        assert!(is_language_code("pt-BR") && is_language_code("en") && is_language_code(""));
    }

    #[test]
    fn answers() {
        assert!(read_answer(br#"{"code":0,"msg":"ok","seq":"s1"}"#, "s1", &[]).is_ok());
        assert!(matches!(
            read_answer(br#"{"code":0,"msg":"ok","seq":"other"}"#, "s1", &[]),
            Err(DeliveryError::Retryable { .. })
        ));
        assert_eq!(
            read_answer(
                br#"{"code":22010,"msg":"no permission","seq":"s1"}"#,
                "s1",
                &[]
            ),
            Err(DeliveryError::permanent("22010", "no permission"))
        );
        // Regression: an answer without the seq echo cannot be verified: never a success.
        assert!(matches!(
            read_answer(br#"{"code":0,"msg":"ok"}"#, "s1", &[]),
            Err(DeliveryError::Retryable {
                reason: RetryReason::BadResponseSignature,
                ..
            })
        ));
        assert!(matches!(
            read_answer(b"{", "s1", &[]),
            Err(DeliveryError::Retryable { .. })
        ));
    }
}
