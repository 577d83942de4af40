//! The metrics the worker records (through the `metrics` facade; rendered by the admin
//! endpoint's Prometheus recorder when one is installed, free otherwise).

use std::time::Duration;

/// A job life event, counted per provider and account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEvent {
    Claimed,
    Succeeded,
    Retried,
    Dead,
    Coalesced,
    LeaseLost,
    /// Finished without a change: the provider does not have the contact (`missing_contact = "skip"`).
    NotFound,
}

impl JobEvent {
    fn metric(self) -> &'static str {
        match self {
            JobEvent::Claimed => "contact_sync_jobs_claimed_total",
            JobEvent::Succeeded => "contact_sync_jobs_succeeded_total",
            JobEvent::Retried => "contact_sync_jobs_retried_total",
            JobEvent::Dead => "contact_sync_jobs_dead_total",
            JobEvent::Coalesced => "contact_sync_jobs_coalesced_total",
            JobEvent::LeaseLost => "contact_sync_jobs_lease_lost_total",
            JobEvent::NotFound => "contact_sync_jobs_not_found_total",
        }
    }
}

pub fn job_event(event: JobEvent, provider: &str, account: &str, n: u64) {
    if n > 0 {
        metrics::counter!(event.metric(), "provider" => provider.to_string(), "account" => account.to_string()).increment(n);
    }
}

/// Duration of one provider call, by outcome (`success`, `retryable`, `permanent`).
pub fn provider_request(provider: &str, account: &str, outcome: &'static str, took: Duration) {
    metrics::histogram!(
        "contact_sync_provider_request_duration_seconds",
        "provider" => provider.to_string(),
        "account" => account.to_string(),
        "outcome" => outcome
    )
    .record(took.as_secs_f64());
}

pub fn in_flight(n: usize) {
    metrics::gauge!("contact_sync_in_flight").set(n as f64);
}

/// A throttle answer that paused an account fleet-wide (counted by the worker that saw it).
/// An account the provider refused (credentials): paused by this worker.
pub fn account_refused(account: &str) {
    metrics::counter!("contact_sync_account_refused_pauses_total", "account" => account.to_string())
        .increment(1);
}

pub fn account_throttled(account: &str) {
    metrics::counter!("contact_sync_account_throttle_pauses_total", "account" => account.to_string())
        .increment(1);
}
