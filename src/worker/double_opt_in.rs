//! Smartlink's one confirmation email per API key and address per hour:
//! before a call that would set the pending status (`subscribe = 3`), reserve the window in the
//! ledger; inside someone else's window, send the other fields and either re-send the status
//! when the window ends (`defer`) or record that no email was triggered (`drop`).

use crate::config::DoubleOptIn;
use crate::outbox::doi::{self, AfterCall, DoiRecord, Reservation};
use crate::outbox::{ClaimedJob, JobId};
use crate::providers::payload::Payload;
use crate::providers::{DeliveryError, RetryReason};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::providers::model::PENDING;

/// What was decided for one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The call does not set the pending status.
    NotApplicable,
    /// This call holds the window and triggers the email. `repeat`: the change's earlier
    /// attempt held it already (its answer was lost; the email may have gone): the window is
    /// never given back for this call.
    Send { repeat: bool },
    /// The status was taken out of the call; re-send at `until`.
    Defer {
        until: DateTime<Utc>,
        status: Payload,
    },
    /// The status was taken out of the call; no email.
    Suppress,
}

impl Decision {
    /// What the job's `doi` column records.
    pub fn record(&self) -> Option<DoiRecord> {
        match self {
            Decision::NotApplicable => None,
            Decision::Send { .. } => Some(DoiRecord::Sent),
            Decision::Defer { until, .. } => Some(DoiRecord::DeferredUntil(*until)),
            Decision::Suppress => Some(DoiRecord::Suppressed),
        }
    }
}

/// Decides, and strips `subscribe`/`update_strategy` from `payload` when the window is taken.
/// `window_holder`: the job whose change asks for the pending status (the window is reserved in
/// its name, so its own retry finds the window its earlier attempt took).
/// `account`: the account's API key id and policy (`None`: an account without the rule).
pub async fn decide(
    pool: &PgPool,
    account: Option<(&str, DoubleOptIn)>,
    email: &str,
    window_holder: JobId,
    holder_md5: &str,
    payload: &mut Payload,
) -> Result<Decision, sqlx::Error> {
    let Some((api_key_id, policy)) = account else {
        return Ok(Decision::NotApplicable);
    };
    if payload.get("subscribe").and_then(Value::as_i64) != Some(PENDING) {
        return Ok(Decision::NotApplicable);
    }
    match doi::reserve(pool, api_key_id, email, window_holder, holder_md5).await? {
        Reservation::Granted { repeat } => Ok(Decision::Send { repeat }),
        Reservation::Busy {
            until,
            asked_already,
        } => {
            let mut status = Payload::new();
            for key in ["subscribe", "update_strategy"] {
                if let Some(v) = payload.remove(key) {
                    status.insert(key.to_string(), v);
                }
            }
            Ok(match policy {
                // (this change's status went out with its answered call: never re-sent)
                DoubleOptIn::Defer if !asked_already => Decision::Defer { until, status },
                _ => Decision::Suppress,
            })
        }
    }
}

/// The jobs one call carried, as the ledger and the deferrals name them.
#[derive(Debug, Clone, Copy)]
pub struct Carried {
    /// The claimed job.
    pub head: JobId,
    /// The last job the call covers (the head, or its last follower).
    pub covers: JobId,
    /// The job whose change asks for the pending status (see [`decide`]).
    pub window_holder: JobId,
}

/// What a successful call leaves for the ledger (see [`AfterCall`]), written by the completer
/// with the job's outcome; `None` when the account has no rule or the decision records
/// nothing there.
pub fn after_success(
    account: Option<(&str, DoubleOptIn)>,
    decision: &Decision,
    jobs: Carried,
    holder_md5: &str,
    job: &ClaimedJob,
) -> Option<AfterCall> {
    let (api_key_id, _) = account?;
    let (provider, account, email) = (job.provider.clone(), job.account.clone(), job.email.clone());
    match decision {
        Decision::Send { .. } => Some(AfterCall::Sent {
            api_key_id: api_key_id.to_string(),
            provider,
            account,
            email,
            window_holder: jobs.window_holder,
            holder_md5: holder_md5.to_string(),
        }),
        Decision::Defer { until, status } => Some(AfterCall::Deferred {
            job_id: jobs.head,
            covers_id: jobs.covers,
            provider,
            account,
            email,
            payload: Value::Object(status.clone()),
            due_at: *until,
        }),
        Decision::NotApplicable | Decision::Suppress => None,
    }
}

/// After a failed call: when the provider certainly did not act on it, the confirmation window
/// this call took is given back. Not after a 500/502/504 or a timeout (a gateway can fail after
/// the service did its work), and not when an earlier attempt of the same change held the
/// window (its email may have gone, and the provider counts its hour from it).
pub async fn after_failure(
    pool: &PgPool,
    account: Option<(&str, DoubleOptIn)>,
    decision: &Decision,
    email: &str,
    window_holder: JobId,
    error: &DeliveryError,
) {
    let Some((api_key_id, _)) = account else {
        return;
    };
    let not_acted = match error {
        DeliveryError::Permanent { .. } | DeliveryError::AccountRefused { .. } => true,
        DeliveryError::Retryable { reason, code, .. } => match reason {
            RetryReason::Connect | RetryReason::RateLimited | RetryReason::ProviderBusy => true,
            RetryReason::ServerError => code.as_deref() == Some("503"),
            _ => false,
        },
    };
    if not_acted && *decision == (Decision::Send { repeat: false }) {
        if let Err(e) = doi::release(pool, api_key_id, email, window_holder).await {
            tracing::warn!(error = %e, "could not release the confirmation window");
        }
    }
}
