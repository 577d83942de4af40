//! What the sandbox remembers: the contacts each provider holds, the counters `/_sandbox/stats`
//! reports, the requests in flight, the scripted faults and delays.

use super::SandboxAccounts;

use super::faults::{Fault, Faults};
use super::throttle;
use crate::providers::model;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    pub(crate) accounts: SandboxAccounts,
    pub(crate) contacts: Mutex<HashMap<ContactId, Contact>>,
    pub(crate) in_flight: Mutex<HashMap<ContactId, u64>>,
    /// (game id, email) → when the last confirmation email went out.
    pub(crate) emails: Mutex<HashMap<(String, String), Instant>>,
    pub(crate) faults: Faults,
    pub(crate) throttles: throttle::Throttles,
    pub(crate) requests: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) bad_signatures: AtomicU64,
    pub(crate) faults_injected: AtomicU64,
    pub(crate) max_in_flight: AtomicU64,
    pub(crate) emails_suppressed: AtomicU64,
    /// Receives (email, arrival time) of every signed request that reached a contact.
    pub(crate) observer: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, Instant)>>>,
}

/// Counts a call in flight for a contact until dropped.
pub(crate) struct InFlight<'a> {
    pub(crate) state: &'a SandboxState,
    pub(crate) id: ContactId,
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
