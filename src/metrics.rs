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
    /// Finished without a call: the provider already held the change (captured accounts).
    Unchanged,
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
            JobEvent::Unchanged => "contact_sync_jobs_unchanged_total",
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

/// An account the provider refused (credentials): paused by this worker.
pub fn account_refused(account: &str) {
    metrics::counter!("contact_sync_account_refused_pauses_total", "account" => account.to_string())
        .increment(1);
}

/// A throttle answer that paused an account fleet-wide (counted by the worker that saw it).
pub fn account_throttled(account: &str) {
    metrics::counter!("contact_sync_account_throttle_pauses_total", "account" => account.to_string())
        .increment(1);
}

const JOB_EVENTS: [JobEvent; 7] = [
    JobEvent::Claimed,
    JobEvent::Succeeded,
    JobEvent::Retried,
    JobEvent::Dead,
    JobEvent::Coalesced,
    JobEvent::LeaseLost,
    JobEvent::NotFound,
];

/// Every series of these accounts exists from the start, at zero: a rate over a counter that
/// appears only with its first event misses that event, and an alert on "absent" cannot tell
/// an idle account from a missing one.
pub fn register_accounts(accounts: &[(&str, &str)]) {
    for (provider, account) in accounts {
        for event in JOB_EVENTS {
            metrics::counter!(event.metric(), "provider" => provider.to_string(), "account" => account.to_string())
                .increment(0);
        }
        metrics::counter!("contact_sync_account_throttle_pauses_total", "account" => account.to_string())
            .increment(0);
        metrics::counter!("contact_sync_account_refused_pauses_total", "account" => account.to_string())
            .increment(0);
    }
    metrics::gauge!("contact_sync_in_flight").set(0.0);
}

/// The `# HELP` text of every metric (what each one counts).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "contact_sync_jobs_claimed_total",
        "Jobs this worker claimed (one per call attempt; coalesced followers not included)"
    );
    describe_counter!(
        "contact_sync_jobs_succeeded_total",
        "Jobs this worker delivered (the provider accepted the change)"
    );
    describe_counter!(
        "contact_sync_jobs_retried_total",
        "Failed call attempts this worker scheduled for a retry (a job can count many times)"
    );
    describe_counter!("contact_sync_jobs_dead_total", "Jobs this worker parked as dead (permanent refusal or attempts used up); see contact_sync_jobs_dead for those dead now");
    describe_counter!(
        "contact_sync_jobs_coalesced_total",
        "Jobs delivered inside an earlier job's call of the same contact"
    );
    describe_counter!(
        "contact_sync_jobs_lease_lost_total",
        "Jobs whose lease another worker rescued before this one recorded the outcome"
    );
    describe_counter!("contact_sync_jobs_not_found_total", "Jobs finished without a change because the provider does not have the contact (missing_contact = skip)");
    describe_counter!("contact_sync_jobs_unchanged_total", "Jobs finished without a call because the provider already held the change (synced state of a captured account)");
    describe_counter!(
        "contact_sync_account_throttle_pauses_total",
        "Fleet-wide throttle pauses this worker started after a provider's throttle answer"
    );
    describe_counter!("contact_sync_account_refused_pauses_total", "Fleet-wide pauses this worker started because the provider refused the account's credentials");
    describe_histogram!(
        "contact_sync_provider_request_duration_seconds",
        Unit::Seconds,
        "Provider call duration by outcome (success, retryable, permanent, account_refused)"
    );
    describe_gauge!(
        "contact_sync_in_flight",
        "Provider calls this worker has in flight"
    );
    describe_gauge!(
        "contact_sync_queue_runnable",
        "Pending jobs due now, per account (read from the database at scrape time)"
    );
    describe_gauge!(
        "contact_sync_queue_scheduled",
        "Pending jobs scheduled later (retries, future run_at), per account"
    );
    describe_gauge!(
        "contact_sync_queue_oldest_runnable_age_seconds",
        "Age of the oldest job due now, per account (0 when none)"
    );
    describe_gauge!(
        "contact_sync_capture_rejected_rows",
        "Rows of a captured table whose change could not be queued, since the source's installation (contact-sync capture rejections)"
    );
    describe_gauge!(
        "contact_sync_capture_uncaptured_statements",
        "Statements on a captured table that were not captured (mapping drift, TRUNCATE), since the source's installation (contact-sync capture verify)"
    );
    describe_gauge!(
        "contact_sync_jobs_dead",
        "Jobs dead now, per account (waiting for an operator: retry or cancel)"
    );
    describe_gauge!(
        "contact_sync_account_paused_by_operator",
        "1 while an operator's pause, or a pause for refused credentials, holds the account"
    );
    describe_gauge!(
        "contact_sync_account_throttled_seconds_left",
        "Seconds left of the account's throttle pause (0 when none)"
    );
    describe_gauge!(
        "contact_sync_account_calls_in_flight",
        "Jobs of the account running now, fleet-wide"
    );
}
