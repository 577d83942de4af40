//! One claimed job: merge its followers, apply the double-opt-in rule, call the provider, and
//! turn the result into exactly one [`Completion`] for the completer. The executor never writes
//! a job's state itself.

use super::double_opt_in::{self};
use super::retry::next_delay;
use super::Shared;
use crate::config::ProviderKind;
use crate::metrics::{self as m};
use crate::outbox::accounts::{self, Throttle};
use crate::outbox::complete::{Attempt, SentFollower};
use crate::outbox::doi::{AfterCall, DoiRecord};
use crate::outbox::job::{AttemptError, ClaimedJob, Lease};
use crate::outbox::synced::Delivered;
use crate::providers::payload::{take_group, Change, HeldModifyTs, Payload};
use crate::providers::{justclick, smartlink, Delivery, DeliveryError, RetryReason};
use crate::telemetry::mask_email;
use futures_util::FutureExt;
use serde_json::{Map, Value};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Instrument;

/// [`Outcome::Success`]'s outcome when the provider does not have the contact and the account
/// skips it (`missing_contact = "skip"`).
pub const NOT_FOUND: &str = "not_found";

/// [`Outcome::Success`]'s outcome when the provider already held the change (the synced state
/// of a captured account): no call was made.
pub const UNCHANGED: &str = "unchanged";

/// Smartlink: the `modify_ts` a call with this payload carries.
fn smartlink_modify_ts(
    kind: ProviderKind,
    payload: &Map<String, Value>,
    job: &ClaimedJob,
) -> Option<i64> {
    match kind {
        ProviderKind::Smartlink => Some(
            payload
                .get("modify_ts")
                .and_then(Value::as_i64)
                .unwrap_or(job.created_at_ms),
        ),
        ProviderKind::Justclick => None,
    }
}

/// What to write for one claimed job.
#[derive(Debug)]
pub enum Outcome {
    Success {
        doi: Option<DoiRecord>,
        /// md5 of the head's payload text as claimed.
        sent_md5: String,
        /// What the call sent, for the synced state (accounts a source captures into).
        synced: Option<Delivered>,
        followers: Vec<SentFollower>,
        /// The call set a status (supersedes queued confirmation re-sends).
        sets_status: bool,
        /// Smartlink: the `modify_ts` sent.
        modify_ts: Option<i64>,
        /// Set when the call changed nothing: [`NOT_FOUND`] or [`UNCHANGED`] (no call made).
        outcome: Option<&'static str>,
        /// The double-opt-in ledger's writes this call leaves, made in the outcome's
        /// transaction.
        ledger: Option<Box<AfterCall>>,
    },
    Retry {
        delay: Duration,
        error: AttemptError,
        attempt: Attempt,
        /// The request was sent and the provider may still be acting on it (a timeout, a
        /// reset after sending, a gateway timeout): the job is held, not retried at once.
        abandoned: bool,
        /// Smartlink: the `modify_ts` the request carried (what the provider holds if it
        /// arrived).
        sent_modify_ts: Option<i64>,
    },
    Dead {
        error: AttemptError,
    },
    /// Could not even start (no client for the account): back to pending, attempt undone.
    Release,
}

/// An outcome on its way to the completer; the slot is freed once it is written.
#[derive(Debug)]
pub struct Completion {
    pub lease: Lease,
    pub max_attempts: i32,
    pub provider: String,
    pub account: String,
    pub outcome: Outcome,
    /// Held, never read: dropping it (after the write) frees the slot.
    #[allow(dead_code)]
    pub permit: OwnedSemaphorePermit,
}

pub async fn execute(
    shared: Arc<Shared>,
    job: ClaimedJob,
    claimed_at: Instant,
    permit: OwnedSemaphorePermit,
    completions: mpsc::UnboundedSender<Completion>,
) {
    // ERROR level so the job context shows on every event the filter lets through.
    let span = tracing::error_span!(
        "job",
        job_id = job.id,
        provider = %job.provider,
        account = %job.account,
        email = %mask_email(&job.email),
        attempt = job.attempts,
    );
    async move {
        // A bug that panics while delivering must still give the job an outcome: its lease
        // would otherwise be renewed for as long as this process lives, and its contact held.
        let outcome = match AssertUnwindSafe(deliver(&shared, &job, claimed_at))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(panic) => internal_error(&shared, job.attempts, panic_message(&*panic)),
        };
        let completion = Completion {
            lease: job.lease(),
            max_attempts: job.max_attempts,
            provider: job.provider,
            account: job.account,
            outcome,
            permit,
        };
        if completions.send(completion).is_err() {
            tracing::warn!("completer gone; the lease will expire and the job will be retried");
        }
    }
    .instrument(span)
    .await
}

/// When a job whose account the provider refused is due again: the pause holds it back
/// until the account is resumed, so this only keeps a job from being retried in a busy loop
/// if the pause could not be recorded.
const ACCOUNT_REFUSED_RETRY: Duration = Duration::from_secs(5);

/// The shortest pause after a throttle answer.
const MIN_THROTTLE_PAUSE: Duration = Duration::from_secs(1);

fn dead(code: &str, message: String) -> Outcome {
    Outcome::Dead {
        error: AttemptError {
            kind: "permanent".into(),
            code: Some(code.into()),
            message,
        },
    }
}

/// The text of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The outcome of a delivery that panicked: tried again after the backoff, and held first as
/// a call that may have been sent (where it stopped is unknown); its attempts count, so a
/// change that panics every time ends `dead` with the message.
fn internal_error(shared: &Shared, attempt: i32, message: String) -> Outcome {
    tracing::error!(error = %message, "internal error while delivering; the job will be tried again");
    let message = format!("internal error while delivering (please report it): {message}");
    retry_after_backoff(shared, attempt, "internal", message, true)
}

fn database_retry(shared: &Shared, attempt: i32, err: &sqlx::Error) -> Outcome {
    retry_after_backoff(
        shared,
        attempt,
        "database",
        format!("database error: {err}"),
        false,
    )
}

/// A counted attempt tried again after the account's backoff (`abandoned`: held first, as a
/// call that may have been sent).
fn retry_after_backoff(
    shared: &Shared,
    attempt: i32,
    kind: &str,
    message: String,
    abandoned: bool,
) -> Outcome {
    let w = &shared.settings.worker;
    let delay = next_delay(
        attempt,
        w.backoff_base,
        w.backoff_cap,
        None,
        &mut fastrand::Rng::new(),
    );
    Outcome::Retry {
        delay,
        error: AttemptError {
            kind: kind.into(),
            code: None,
            message,
        },
        attempt: Attempt::Counts,
        abandoned,
        sent_modify_ts: None,
    }
}

async fn deliver(shared: &Shared, job: &ClaimedJob, claimed_at: Instant) -> Outcome {
    let Some(provider) = shared.registry.get(&job.account) else {
        return Outcome::Release;
    };
    // A pause recorded after this job was claimed (another worker's throttle answer, an
    // operator): the call waits with the account, its attempt given back.
    if let Some(left) = shared.limits.paused_for(&job.account) {
        tracing::debug!(
            paused_for_ms = left.as_millis() as u64,
            "account paused since the claim; job put back"
        );
        return Outcome::Release;
    }
    let kind = provider.kind();
    if kind.as_str() != job.provider {
        return dead(
            "account_mismatch",
            format!(
                "account {} is a {kind} account; this job is for {}",
                job.account, job.provider
            ),
        );
    }
    // A row that cannot be decoded is parked alone, with the reason; it never touches another.
    let head = match job.decode() {
        Ok(head) => head,
        Err(why) => {
            tracing::error!(error = %why, "job payload cannot be decoded; job parked as dead");
            return dead("undecodable_payload", why);
        }
    };
    let mut followers = job.decode_followers();
    let mut follower_payloads: Vec<Payload> = followers
        .iter()
        .map(|f| match &f.payload {
            Value::Object(map) => map.clone(),
            _ => Payload::new(),
        })
        .collect();
    // A follower the provider could not take on its own (one queued with the triggers off)
    // ends the group: merged, it would take the head and the others down with it. It is
    // parked alone, with its reason, when its turn comes.
    let sendable = followers
        .iter()
        .zip(&follower_payloads)
        .take_while(|(f, payload)| {
            f.payload.is_object()
                && match kind {
                    ProviderKind::Justclick => justclick::form_fields(&job.email, payload).is_ok(),
                    ProviderKind::Smartlink => {
                        smartlink::body(&job.email, payload, f.created_at_ms).is_ok()
                    }
                }
        })
        .count();
    followers.truncate(sendable);
    follower_payloads.truncate(sendable);
    let mut changes = Vec::with_capacity(1 + followers.len());
    changes.push(Change {
        id: job.id,
        payload: &head,
        created_at_ms: job.created_at_ms,
    });
    for (f, payload) in followers.iter().zip(&follower_payloads) {
        changes.push(Change {
            id: f.id,
            payload,
            created_at_ms: f.created_at_ms,
        });
    }
    let held = HeldModifyTs {
        known: job.known_modify_ts,
        uncertain: job.uncertain_modify_ts,
    };
    let group = take_group(kind, held, &changes);
    let mut payload = group.payload;
    let followers: Vec<SentFollower> = followers[..group.taken.saturating_sub(1)]
        .iter()
        .map(|f| SentFollower {
            id: f.id,
            sent_md5: f.md5.clone(),
        })
        .collect();
    // A change the provider already holds (the synced state of an account a source captures
    // into) is not sent: the job finishes `succeeded` with the outcome `unchanged`. Never a
    // status: the same status sent again is not a no-op (a pending one asks for another
    // confirmation email once the hour is over).
    if let Some(known) = job
        .synced_fields
        .as_deref()
        .filter(|_| !payload.contains_key("subscribe"))
        .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok())
    {
        if crate::outbox::synced::differing(&payload, Some(&known)).is_empty() {
            tracing::debug!("the provider already holds this change; not sending it");
            return Outcome::Success {
                doi: None,
                sent_md5: job.payload_md5(),
                synced: None,
                followers,
                sets_status: false,
                // kept as the contact's watermark, as if sent: a later change older than this
                // one is dropped, as the provider would drop it after this call
                modify_ts: smartlink_modify_ts(kind, &payload, job),
                outcome: Some(UNCHANGED),
                ledger: None,
            };
        }
    }
    // The confirmation window is held in the name of the change that asks for it: its retry,
    // alone or merged into a later call, is the same request (not one inside another's hour).
    let window_holder = group.status_from.map_or(job.id, |i| changes[i].id);
    // (its change as this call carries it: sent again edited, it is a new request)
    let holder_md5 = match group.status_from {
        Some(i) if i > 0 => followers.get(i - 1).map(|f| f.sent_md5.clone()),
        _ => None,
    }
    .unwrap_or_else(|| job.payload_md5());
    if !followers.is_empty() {
        tracing::debug!(
            merged = followers.len(),
            left = changes.len() - group.taken,
            "coalescing consecutive changes into one call"
        );
    }

    let confirmation = provider.double_opt_in();
    let decision = match double_opt_in::decide(
        &shared.pool,
        confirmation,
        &job.email,
        window_holder,
        &holder_md5,
        &mut payload,
    )
    .await
    {
        Ok(d) => d,
        Err(e) => return database_retry(shared, job.attempts, &e),
    };
    let sets_status = payload.contains_key("subscribe");
    let modify_ts = smartlink_modify_ts(kind, &payload, job);

    // A worker stopped (SIGSTOP, a VM paused) or cut off from the database past its lease may
    // have lost the job to another worker, which may have called already: a call is started
    // only while the lease, as this worker last confirmed it, still holds.
    if !shared.lease_holds(claimed_at) {
        tracing::warn!("the lease may have lapsed before the call started (this worker was stopped or cut off); not sending, job put back");
        return Outcome::Release;
    }
    shared.call_started(job.lease());
    let started = Instant::now();
    let result = provider
        .deliver(Delivery {
            job_id: job.id,
            attempt: job.attempts,
            email: &job.email,
            payload: &payload,
            created_at_ms: job.created_at_ms,
        })
        .await;
    let took = started.elapsed();

    if let Err(error) = &result {
        double_opt_in::after_failure(
            &shared.pool,
            confirmation,
            &decision,
            &job.email,
            window_holder,
            error,
        )
        .await;
    }

    match result {
        Ok(delivered) => {
            m::provider_request(&job.provider, &job.account, "success", took);
            tracing::debug!(took_ms = took.as_millis() as u64, answer = %delivered.detail, "delivered");
            let covers = followers.last().map_or(job.id, |f| f.id);
            let carried = double_opt_in::Carried {
                head: job.id,
                covers,
                window_holder,
            };
            let ledger =
                double_opt_in::after_success(confirmation, &decision, carried, &holder_md5, job)
                    .map(Box::new);
            let synced =
                (shared.captured.contains(&job.account) && !delivered.not_found).then(|| {
                    Delivered {
                        provider: job.provider.clone(),
                        account: job.account.clone(),
                        email: job.email.clone(),
                        fields: Value::Object(payload.clone()),
                        job_id: covers,
                    }
                });
            Outcome::Success {
                doi: decision.record(),
                sent_md5: job.payload_md5(),
                synced,
                followers,
                sets_status,
                modify_ts,
                outcome: delivered.not_found.then_some(NOT_FOUND),
                ledger,
            }
        }
        Err(DeliveryError::Retryable {
            reason,
            retry_after,
            code,
            detail,
        }) => {
            m::provider_request(&job.provider, &job.account, "retryable", took);
            let w = &shared.settings.worker;
            let throttled = reason == RetryReason::RateLimited;
            // a throttle never retries sooner than a second, whatever the provider says: an
            // attempt it does not count must not become a busy loop
            let retry_after = if throttled {
                Some(
                    retry_after
                        .unwrap_or(w.backoff_base)
                        .max(MIN_THROTTLE_PAUSE),
                )
            } else {
                retry_after
            };
            if let (true, Some(pause)) = (throttled, retry_after) {
                shared.limits.pause(&job.account, pause);
                // the pause is the account's: every worker stops calling it
                let why = format!("{}: {detail}", code.as_deref().unwrap_or("throttled"));
                match accounts::throttle(&shared.pool, &job.account, &job.provider, pause, &why)
                    .await
                {
                    Ok(Throttle::Started) => {
                        m::account_throttled(&job.account);
                        tracing::warn!(account = %job.account, pause_ms = pause.as_millis() as u64, code = code.as_deref().unwrap_or(""), error = %detail, "provider asked to slow down: account paused for every worker");
                    }
                    Ok(Throttle::Extended) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "provider asked to slow down; could not record the pause for other workers (this one holds back)")
                    }
                }
            }
            let delay = next_delay(
                job.attempts,
                w.backoff_base,
                w.backoff_cap,
                retry_after,
                &mut fastrand::Rng::new(),
            );
            if throttled {
                tracing::debug!(code = code.as_deref().unwrap_or(""), retry_in_ms = delay.as_millis() as u64, error = %detail, "throttled; attempt not counted");
            } else {
                tracing::warn!(reason = %reason, code = code.as_deref().unwrap_or(""), retry_in_ms = delay.as_millis() as u64, error = %detail, "delivery failed; will retry");
            }
            // the request went out and no complete answer came back: the provider may still be
            // acting on it (a real server finishes a request whose client has gone)
            let abandoned = match reason {
                RetryReason::Timeout | RetryReason::Transport => true,
                RetryReason::ServerError => code.as_deref() == Some("504"),
                _ => false,
            };
            Outcome::Retry {
                abandoned,
                sent_modify_ts: modify_ts,
                delay,
                error: AttemptError {
                    kind: reason.as_str().into(),
                    code,
                    message: detail,
                },
                attempt: if throttled {
                    Attempt::Throttled
                } else {
                    Attempt::Counts
                },
            }
        }
        Err(DeliveryError::AccountRefused { code, text, check }) => {
            m::provider_request(&job.provider, &job.account, "account_refused", took);
            let check = check.describe(&job.account);
            let reason =
                format!("the provider refused the account (code {code}: {text}); check {check}");
            match accounts::pause_refused(&shared.pool, &job.account, &job.provider, &reason).await
            {
                Ok(true) => {
                    m::account_refused(&job.account);
                    tracing::error!(account = %job.account, code = %code, error = %text, check = %check, "provider refused the account: paused for every worker until a worker starts with a corrected configuration, or `contact-sync accounts resume {}`", job.account);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(account = %job.account, code = %code, check = %check, error = %e, "provider refused the account; could not record the pause (jobs go on failing without counting their attempts)")
                }
            }
            // the job is not at fault: it waits with the account, its attempt not counted
            Outcome::Retry {
                abandoned: false,
                sent_modify_ts: None,
                delay: ACCOUNT_REFUSED_RETRY,
                error: AttemptError {
                    kind: "account_refused".into(),
                    code: Some(code),
                    message: reason,
                },
                attempt: Attempt::Throttled,
            }
        }
        Err(DeliveryError::Permanent { code, text }) => {
            m::provider_request(&job.provider, &job.account, "permanent", took);
            tracing::error!(code = %code, error = %text, "provider refused the change; job parked as dead");
            Outcome::Dead {
                error: AttemptError {
                    kind: "permanent".into(),
                    code: Some(code),
                    message: text,
                },
            }
        }
    }
}
