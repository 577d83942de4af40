//! The sandbox: JustClick and Smartlink simulators on one port, for `contact-sync sandbox`,
//! `demo`, `bench`, our tests and users' own tests. They read the raw wire bytes, recompute
//! and check signatures the way the real services do, sign their answers, keep contact state,
//! apply Smartlink's one-hour confirmation-email rule, and inject scripted faults.
//!
//! Routes: `POST /justclick/{login}/api/UpdateSubscriberData`,
//! `POST /smartlink/api/v4/userinfo/sync_user_by_email?…`, and the control API under
//! `/_sandbox/` (`GET stats`, `GET contacts`, `POST faults`, `POST delay`, `POST reset`).

mod control;
#[doc(hidden)]
pub mod faults;
mod justclick;
mod smartlink;
mod state;
#[doc(hidden)]
pub mod throttle;
mod wire;

#[doc(hidden)]
pub use control::SeedFile;

use control::{
    contacts_json, post_contacts, push_fault, reset, seed_contacts, set_delay, set_rate_limit,
    stats,
};
use state::{Contact, ContactId, SandboxState, Stats};
use wire::{php_json_string, transport_fault};

use crate::config::{ProviderKind, Settings};
use crate::secret::Secret;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
#[doc(hidden)]
pub use faults::Faults;
pub use faults::{Fault, FaultRule};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
pub use throttle::RateLimitRule;
#[doc(hidden)]
pub use throttle::{AccountLog, ThrottleAnswer};
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
