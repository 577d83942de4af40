//! The control API under `/_sandbox/`: statistics, the contacts held, seeding contacts, scripted
//! faults, delays, rate limits and reset.

use super::state::{Contact, SandboxState, Stats};

use super::faults::FaultRule;
use super::throttle::RateLimitRule;
use axum::extract::State;
use axum::Json;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn stats(s: &SandboxState) -> Stats {
    Stats {
        requests: s.requests.load(Ordering::Relaxed),
        accepted: s.accepted.load(Ordering::Relaxed),
        bad_signatures: s.bad_signatures.load(Ordering::Relaxed),
        faults_injected: s.faults_injected.load(Ordering::Relaxed),
        max_in_flight_per_contact: s.max_in_flight.load(Ordering::Relaxed),
        emails_suppressed: s.emails_suppressed.load(Ordering::Relaxed),
    }
}

pub(crate) async fn contacts_json(State(s): State<Arc<SandboxState>>) -> Json<Vec<Value>> {
    let contacts = s.contacts.lock().map(|c| c.clone()).unwrap_or_default();
    let mut list: Vec<Value> = contacts
        .into_iter()
        .map(|((provider, account, email), c)| {
            serde_json::json!({"provider": provider, "account": account, "email": email, "contact": c})
        })
        .collect();
    list.sort_by_key(|v| v.to_string());
    Json(list)
}

/// Contacts to create: `{"provider": "justclick", "account": LOGIN, "emails": [...]}` (or a
/// list of those).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SeedContacts {
    pub provider: String,
    pub account: String,
    pub emails: Vec<String>,
}

/// A seed file or body: one `SeedContacts` or a list of them.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum SeedFile {
    One(SeedContacts),
    Many(Vec<SeedContacts>),
}

impl SeedFile {
    pub fn into_vec(self) -> Vec<SeedContacts> {
        match self {
            SeedFile::One(one) => vec![one],
            SeedFile::Many(many) => many,
        }
    }
}

pub(crate) fn seed_contacts(
    s: &SandboxState,
    provider: &str,
    account: &str,
    emails: &[String],
) -> usize {
    let Ok(mut contacts) = s.contacts.lock() else {
        return 0;
    };
    let mut created = 0;
    for email in emails {
        let id = (
            provider.to_string(),
            account.to_string(),
            email.to_lowercase(),
        );
        if let std::collections::hash_map::Entry::Vacant(slot) = contacts.entry(id) {
            slot.insert(Contact::default());
            created += 1;
        }
    }
    created
}

pub(crate) async fn post_contacts(
    State(s): State<Arc<SandboxState>>,
    Json(body): Json<SeedFile>,
) -> Json<Value> {
    let mut created = 0;
    for seed in body.into_vec() {
        created += seed_contacts(&s, &seed.provider, &seed.account, &seed.emails);
    }
    Json(serde_json::json!({"ok": true, "created": created}))
}

pub(crate) async fn push_fault(
    State(s): State<Arc<SandboxState>>,
    Json(rule): Json<FaultRule>,
) -> Json<Value> {
    s.faults.push(rule);
    Json(serde_json::json!({"ok": true, "remaining": s.faults.remaining()}))
}

#[derive(serde::Deserialize)]
pub(crate) struct DelayBody {
    pub(crate) ms: u64,
}

pub(crate) async fn set_delay(
    State(s): State<Arc<SandboxState>>,
    Json(body): Json<DelayBody>,
) -> Json<Value> {
    s.faults.set_delay(Duration::from_millis(body.ms));
    Json(serde_json::json!({"ok": true}))
}

pub(crate) async fn set_rate_limit(
    State(s): State<Arc<SandboxState>>,
    Json(rule): Json<RateLimitRule>,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    if let Err(e) = rule.check() {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"ok": false, "error": e})),
        )
            .into_response();
    }
    s.throttles.set(rule);
    Json(serde_json::json!({"ok": true})).into_response()
}

pub(crate) async fn reset(State(s): State<Arc<SandboxState>>) -> Json<Value> {
    s.faults.clear();
    if let Ok(mut c) = s.contacts.lock() {
        c.clear();
    }
    if let Ok(mut e) = s.emails.lock() {
        e.clear();
    }
    Json(serde_json::json!({"ok": true}))
}
