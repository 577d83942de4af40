//! Smartlink's one confirmation email per API key and address per hour:
//! before a call that would set the pending status (`subscribe = 3`), reserve the window in the
//! ledger; inside someone else's window, send the other fields and either re-send the status
//! when the window ends (`defer`) or record that no email was triggered (`drop`).

use crate::config::DoubleOptIn;
use crate::outbox::doi::{self, Deferral, Reservation};
use crate::outbox::JobId;
use crate::providers::payload::Payload;
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
    pub fn record(&self) -> Option<String> {
        match self {
            Decision::NotApplicable => None,
            Decision::Send { .. } => Some("sent".into()),
            Decision::Defer { until, .. } => Some(format!(
                "deferred_until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
            Decision::Suppress => Some("suppressed".into()),
        }
    }
}

/// Decides, and strips `subscribe`/`update_strategy` from `payload` when the window is taken.
/// `window_holder`: the job whose change asks for the pending status (the window is reserved in
/// its name, so its own retry finds the window its earlier attempt took).
pub async fn decide(
    pool: &PgPool,
    api_key_id: &str,
    policy: DoubleOptIn,
    email: &str,
    window_holder: JobId,
    payload: &mut Payload,
) -> Result<Decision, sqlx::Error> {
    if payload.get("subscribe").and_then(Value::as_i64) != Some(PENDING) {
        return Ok(Decision::NotApplicable);
    }
    match doi::reserve(pool, api_key_id, email, window_holder).await? {
        Reservation::Granted { repeat } => Ok(Decision::Send { repeat }),
        Reservation::Busy { until } => {
            let mut status = Payload::new();
            for key in ["subscribe", "update_strategy"] {
                if let Some(v) = payload.remove(key) {
                    status.insert(key.to_string(), v);
                }
            }
            Ok(match policy {
                DoubleOptIn::Defer => Decision::Defer { until, status },
                DoubleOptIn::Drop => Decision::Suppress,
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

/// After a successful call: restart the window from the answer's time (`Send`), or schedule
/// the deferred re-send (`Defer`).
pub async fn after_success(
    pool: &PgPool,
    api_key_id: &str,
    decision: &Decision,
    jobs: Carried,
    provider: &str,
    account: &str,
    email: &str,
) -> Result<(), sqlx::Error> {
    if matches!(decision, Decision::Send { .. }) {
        doi::confirm(pool, api_key_id, email, jobs.window_holder).await?;
        // an earlier attempt of this change may have deferred the status, and lost its
        // completion: the status went out now, so that re-send must not
        doi::drop_deferral_of(pool, provider, account, email, jobs.window_holder).await?;
    }
    if let Decision::Defer { until, status } = decision {
        doi::defer(
            pool,
            &Deferral {
                job_id: jobs.head,
                covers_id: jobs.covers,
                provider,
                account,
                email,
                payload: Value::Object(status.clone()),
                due_at: *until,
            },
        )
        .await?;
    }
    Ok(())
}
