//! The sandbox: JustClick and Smartlink simulators on one port, for `contact-sync sandbox`,
//! `demo`, `bench`, our tests and users' own tests. They read the raw wire bytes, recompute
//! and check signatures the way the real services do, sign their answers, keep contact state,
//! apply Smartlink's one-hour confirmation-email rule, and inject scripted faults.
//!
//! Routes: `POST /justclick/{login}/api/UpdateSubscriberData`,
//! `POST /smartlink/api/v4/userinfo/sync_user_by_email?…`, and the control API under
//! `/_sandbox/` (`GET stats`, `GET contacts`, `POST faults`, `POST delay`, `POST reset`).

pub mod faults;
mod justclick;
mod smartlink;
pub mod throttle;

use crate::config::{ProviderKind, Settings};
use crate::providers::model;
use crate::secret::Secret;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
pub use faults::{Fault, FaultRule, Faults};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use throttle::{AccountLog, RateLimitRule, ThrottleAnswer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Credentials the sandbox verifies against.
#[derive(Debug, Clone, Default)]
pub struct SandboxAccounts {
    /// JustClick login → API key.
    pub justclick: HashMap<String, Secret>,
    /// Smartlink game id → API key.
    pub smartlink: HashMap<String, Secret>,
    /// JustClick logins that create an unknown contact on its first update. The real service
    /// only updates existing contacts (500 "subscriber not found"), and so does the sandbox for
    /// every other login: seed contacts with `POST /_sandbox/contacts` or `--seed FILE`.
    pub create_missing: HashSet<String>,
}

impl SandboxAccounts {
    /// The accounts of a configuration (so `contact-sync sandbox --config` matches a worker).
    pub fn from_settings(settings: &Settings) -> Self {
        let mut accounts = SandboxAccounts::default();
        for account in settings.accounts.values() {
            match account.provider {
                ProviderKind::Justclick => {
                    accounts.justclick.insert(
                        account.login.clone().unwrap_or_default(),
                        account.secret.clone(),
                    );
                }
                ProviderKind::Smartlink => {
                    accounts.smartlink.insert(
                        account.game_id.clone().unwrap_or_default(),
                        account.secret.clone(),
                    );
                }
            }
        }
        accounts
    }

    pub fn with_justclick(mut self, login: &str, secret: &str) -> Self {
        self.justclick.insert(login.into(), Secret::new(secret));
        self
    }

    pub fn with_smartlink(mut self, game_id: &str, secret: &str) -> Self {
        self.smartlink.insert(game_id.into(), Secret::new(secret));
        self
    }

    /// Every JustClick login known so far creates unknown contacts on their first update
    /// (what the demo and the benchmark use).
    pub fn create_missing_contacts(mut self) -> Self {
        self.create_missing.extend(self.justclick.keys().cloned());
        self
    }
}

/// One contact as a provider holds it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Contact {
    /// Current field values.
    pub fields: Map<String, Value>,
    /// Smartlink status (1, 0, -1, 3).
    pub subscribe: Option<i64>,
    pub modify_ts: i64,
    /// Accepted updates.
    pub updates: u64,
    /// Smartlink updates ignored because their `modify_ts` was older than the contact's.
    pub stale_updates: u64,
    /// Calls that asked for the pending status (`subscribe = 3`).
    pub pending_requests: u64,
    /// Confirmation emails actually sent.
    pub confirmation_emails: u64,
    /// Confirmation emails asked for inside the hour of the previous one (not sent again).
    pub confirmations_suppressed: u64,
}

impl Contact {
    /// Runs the reference model ([`crate::providers::model`]) on this contact's state.
    pub(crate) fn apply(
        &mut self,
        f: impl FnOnce(&mut model::ContactState) -> model::Effect,
    ) -> model::Effect {
        let mut state = model::ContactState {
            fields: std::mem::take(&mut self.fields),
            subscribe: self.subscribe,
            modify_ts: self.modify_ts,
        };
        let effect = f(&mut state);
        self.fields = state.fields;
        self.subscribe = state.subscribe;
        self.modify_ts = state.modify_ts;
        effect
    }

    /// The provider-visible part of this contact, as the reference model holds it.
    pub fn state(&self) -> model::ContactState {
        model::ContactState {
            fields: self.fields.clone(),
            subscribe: self.subscribe,
            modify_ts: self.modify_ts,
        }
    }
}

/// (provider, account, lower-cased email)
pub type ContactId = (String, String, String);

/// Counters across all requests.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub accepted: u64,
    pub bad_signatures: u64,
    pub faults_injected: u64,
    /// The most calls ever in flight at once for a single contact (1 when ordering holds).
    pub max_in_flight_per_contact: u64,
    /// Confirmation emails the 1-hour rule held back.
    pub emails_suppressed: u64,
}

#[derive(Default)]
pub(crate) struct SandboxState {
    accounts: SandboxAccounts,
    contacts: Mutex<HashMap<ContactId, Contact>>,
    in_flight: Mutex<HashMap<ContactId, u64>>,
    /// (game id, email) → when the last confirmation email went out.
    emails: Mutex<HashMap<(String, String), Instant>>,
    faults: Faults,
    throttles: throttle::Throttles,
    requests: AtomicU64,
    accepted: AtomicU64,
    bad_signatures: AtomicU64,
    faults_injected: AtomicU64,
    max_in_flight: AtomicU64,
    emails_suppressed: AtomicU64,
    /// Receives (email, arrival time) of every signed request that reached a contact.
    observer: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, Instant)>>>,
}

/// Counts a call in flight for a contact until dropped.
pub(crate) struct InFlight<'a> {
    state: &'a SandboxState,
    id: ContactId,
}

impl SandboxState {
    /// A signed request for a contact arrives: counted (per contact and per account) until the
    /// returned guard drops.
    pub(crate) fn enter(&self, id: ContactId) -> InFlight<'_> {
        self.throttles.arrived(&id.0, &id.1);
        if let Ok(observer) = self.observer.lock() {
            if let Some(tx) = observer.as_ref() {
                let _ = tx.send((id.2.clone(), Instant::now()));
            }
        }
        if let Ok(mut f) = self.in_flight.lock() {
            let n = f.entry(id.clone()).or_insert(0);
            *n += 1;
            self.max_in_flight.fetch_max(*n, Ordering::Relaxed);
        }
        InFlight { state: self, id }
    }

    /// Applies the per-request delay and a matching fault; returns the fault to answer with
    /// (`Stall`: the handler applies the change, then waits before answering).
    pub(crate) async fn before_answer(
        &self,
        provider: &str,
        account: &str,
        email: &str,
    ) -> Option<Fault> {
        // beyond the account's own limit: a throttle answer, as the service gives
        if let Some((answer, wait)) = self.throttles.take(provider, account) {
            self.throttles.throttled(provider, account);
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            return Some(match (answer, provider) {
                (throttle::ThrottleAnswer::Code8, "justclick") => Fault::ErrorCode {
                    code: 8,
                    text: "API request limit exhausted".into(),
                },
                _ => Fault::RateLimit {
                    retry_after_secs: secs,
                },
            });
        }
        let delay = self.faults.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut fault = self.faults.take(provider, account, email);
        if fault.is_some() {
            self.faults_injected.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(Fault::Slow { ms }) = fault {
            // a slow service: the change is applied (and answered) after the wait, whether or
            // not the client is still there
            tokio::time::sleep(Duration::from_millis(ms)).await;
            fault = None;
        }
        if matches!(fault, Some(Fault::RateLimit { .. })) {
            self.throttles.throttled(provider, account);
        }
        fault
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.state.throttles.left(&self.id.0, &self.id.1);
        if let Ok(mut f) = self.state.in_flight.lock() {
            if let Some(n) = f.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    f.remove(&self.id);
                }
            }
        }
    }
}

/// A running sandbox; stops when dropped or on [`Sandbox::stop`].
pub struct Sandbox {
    addr: SocketAddr,
    state: Arc<SandboxState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sandbox {
    /// Binds `addr` (use port 0 for any free port) and serves in the background.
    pub async fn start(addr: SocketAddr, accounts: SandboxAccounts) -> std::io::Result<Sandbox> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve(listener, accounts)
    }

    /// Serves on an already-bound listener.
    pub fn serve(listener: TcpListener, accounts: SandboxAccounts) -> std::io::Result<Sandbox> {
        let addr = listener.local_addr()?;
        let state = Arc::new(SandboxState {
            accounts,
            ..Default::default()
        });
        let stop = CancellationToken::new();
        let app = router(state.clone());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "sandbox server failed");
            }
        });
        Ok(Sandbox {
            addr,
            state,
            stop,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `base_url` of a JustClick account served here.
    pub fn justclick_base_url(&self, login: &str) -> String {
        format!("{}/justclick/{login}", self.url())
    }

    /// The `base_url` of every Smartlink account served here.
    pub fn smartlink_base_url(&self) -> String {
        format!("{}/smartlink", self.url())
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Limits an account as its provider would (see [`RateLimitRule`]); replaces an earlier
    /// rule for the same account.
    pub fn rate_limit(&self, rule: RateLimitRule) {
        self.state.throttles.set(rule);
    }

    /// What an account saw: call arrivals, throttle answers, most calls in flight at once.
    pub fn account_log(&self, provider: &str, account: &str) -> AccountLog {
        self.state.throttles.log(provider, account)
    }

    /// A contact's state: provider `justclick` with the login, or `smartlink` with the game id.
    pub fn contact(&self, provider: &str, account: &str, email: &str) -> Option<Contact> {
        let id = (
            provider.to_string(),
            account.to_string(),
            email.to_lowercase(),
        );
        self.state.contacts.lock().ok()?.get(&id).cloned()
    }

    /// Makes contacts exist (empty) so that JustClick updates them: `provider` `justclick` with
    /// the login (or `smartlink` with the game id). Returns how many were new.
    pub fn seed(&self, provider: &str, account: &str, emails: &[String]) -> usize {
        seed_contacts(&self.state, provider, account, emails)
    }

    pub fn contacts(&self) -> HashMap<ContactId, Contact> {
        self.state
            .contacts
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        stats(&self.state)
    }

    /// Reports (lower-cased email, arrival time) of every verified request from now on
    /// (latency measurements).
    pub fn observe(&self) -> tokio::sync::mpsc::UnboundedReceiver<(String, Instant)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut observer) = self.state.observer.lock() {
            *observer = Some(tx);
        }
        rx
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn stats(s: &SandboxState) -> Stats {
    Stats {
        requests: s.requests.load(Ordering::Relaxed),
        accepted: s.accepted.load(Ordering::Relaxed),
        bad_signatures: s.bad_signatures.load(Ordering::Relaxed),
        faults_injected: s.faults_injected.load(Ordering::Relaxed),
        max_in_flight_per_contact: s.max_in_flight.load(Ordering::Relaxed),
        emails_suppressed: s.emails_suppressed.load(Ordering::Relaxed),
    }
}

fn router(state: Arc<SandboxState>) -> Router {
    Router::new()
        .route(
            "/justclick/{login}/api/UpdateSubscriberData",
            post(
                |s: State<Arc<SandboxState>>, login: Path<String>, h: HeaderMap, b: Bytes| {
                    to_completion(justclick::update_subscriber(s, login, h, b))
                },
            ),
        )
        .route(
            "/smartlink/api/v4/userinfo/sync_user_by_email",
            post(|s: State<Arc<SandboxState>>, uri: Uri, b: Bytes| {
                to_completion(smartlink::sync_user_by_email(s, uri, b))
            }),
        )
        .route(
            "/_sandbox/stats",
            get(|State(s): State<Arc<SandboxState>>| async move { Json(stats(&s)) }),
        )
        .route("/_sandbox/contacts", get(contacts_json).post(post_contacts))
        .route("/_sandbox/faults", post(push_fault))
        .route("/_sandbox/delay", post(set_delay))
        .route("/_sandbox/rate_limit", post(set_rate_limit))
        .route("/_sandbox/reset", post(reset))
        .with_state(state)
}

/// A real service finishes a request whose client has gone (PHP behind nginx does: a timed-out
/// client does not stop the script): each provider request runs in a task of its own, so a
/// client that disconnects (its timeout, a reset) does not cancel it; a delayed change is still
/// applied when its delay ends, and the request counts as in flight until then.
async fn to_completion(
    handler: impl std::future::Future<Output = Response> + Send + 'static,
) -> Response {
    match tokio::spawn(handler).await {
        Ok(response) => response,
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "sandbox handler failed").into_response(),
    }
}

async fn contacts_json(State(s): State<Arc<SandboxState>>) -> Json<Vec<Value>> {
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

/// A seed file or body: one [`SeedContacts`] or a list of them.
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

fn seed_contacts(s: &SandboxState, provider: &str, account: &str, emails: &[String]) -> usize {
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

async fn post_contacts(
    State(s): State<Arc<SandboxState>>,
    Json(body): Json<SeedFile>,
) -> Json<Value> {
    let mut created = 0;
    for seed in body.into_vec() {
        created += seed_contacts(&s, &seed.provider, &seed.account, &seed.emails);
    }
    Json(serde_json::json!({"ok": true, "created": created}))
}

impl SandboxState {
    /// Does the provider hold this contact (JustClick updates existing contacts only)?
    pub(crate) fn justclick_contact_known(&self, login: &str, email: &str) -> bool {
        self.accounts.create_missing.contains(login)
            || self.contacts.lock().is_ok_and(|c| {
                c.contains_key(&(
                    "justclick".to_string(),
                    login.to_string(),
                    email.to_lowercase(),
                ))
            })
    }
}

async fn push_fault(
    State(s): State<Arc<SandboxState>>,
    Json(rule): Json<FaultRule>,
) -> Json<Value> {
    s.faults.push(rule);
    Json(serde_json::json!({"ok": true, "remaining": s.faults.remaining()}))
}

#[derive(serde::Deserialize)]
struct DelayBody {
    ms: u64,
}

async fn set_delay(State(s): State<Arc<SandboxState>>, Json(body): Json<DelayBody>) -> Json<Value> {
    s.faults.set_delay(Duration::from_millis(body.ms));
    Json(serde_json::json!({"ok": true}))
}

async fn set_rate_limit(
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

async fn reset(State(s): State<Arc<SandboxState>>) -> Json<Value> {
    s.faults.clear();
    if let Ok(mut c) = s.contacts.lock() {
        c.clear();
    }
    if let Ok(mut e) = s.emails.lock() {
        e.clear();
    }
    Json(serde_json::json!({"ok": true}))
}

/// The answer to a fault that is the same for both providers (HTTP status, 429, reset); `None`
/// for the provider-specific ones.
pub(crate) fn transport_fault(fault: &Fault) -> Option<axum::response::Response> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    match fault {
        Fault::Status { status } => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some((code, "sandbox: injected failure").into_response())
        }
        Fault::RateLimit { retry_after_secs } => Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after_secs.to_string())],
                "slow down",
            )
                .into_response(),
        ),
        Fault::Reset => Some(reset_mid_response()),
        _ => None,
    }
}

/// A 200 response that promises a JSON body, sends half of it, and breaks the connection.
pub(crate) fn reset_mid_response() -> axum::response::Response {
    use axum::http::header;
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = vec![
        Ok(axum::body::Bytes::from_static(
            b"{\"error_code\":0,\"error_te",
        )),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "sandbox: injected reset",
        )),
    ];
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    axum::response::Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "120")
        .body(body)
        .unwrap_or_default()
}

/// JSON string the way PHP's `json_encode` writes it: non-ASCII as `\uXXXX`, `/` as `\/`.
pub(crate) fn php_json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn php_style_json_round_trips() {
        for s in ["Данные контакта обновлены", "a/b \"q\" \\", "🙂\n"] {
            let encoded = super::php_json_string(s);
            assert!(encoded.is_ascii());
            let back: String = serde_json::from_str(&encoded).unwrap();
            assert_eq!(back, s);
        }
    }
}
