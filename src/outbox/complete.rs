//! Fenced state writes after a claim: succeed (many at once, with the coalesced followers),
//! retry, kill (dead), release. Every write matches `(id, attempts, state = 'running')`; a write
//! that touches no row means the lease was lost and another worker owns the job now.

use super::job::{storable, AttemptError, JobId, JobState, Lease};
use sqlx::PgPool;
use std::time::Duration;

/// A delivered job and what rode along with it.
#[derive(Debug, Clone)]
pub struct Success {
    pub lease: Lease,
    /// Double-opt-in outcome to record (`sent`, `deferred_until …`, `suppressed`).
    pub doi: Option<String>,
    /// Followers carried by this call: they end `coalesced`, pointing here.
    pub followers: Vec<JobId>,
    /// The call set a Smartlink status: pending confirmation re-sends queued behind it for the
    /// contact are superseded (they end `cancelled`, `doi = superseded by job …`).
    pub sets_status: bool,
    /// Smartlink: the `modify_ts` the call carried (kept per contact as the watermark).
    pub modify_ts: Option<i64>,
    /// Set when the call changed nothing: `not_found` (the provider does not have the contact).
    pub outcome: Option<String>,
}

/// Marks many jobs `succeeded` (and their followers `coalesced`) in one statement. Returns the
/// ids whose lease was lost (nothing written for them).
pub async fn succeed_many(pool: &PgPool, items: &[Success]) -> Result<Vec<JobId>, sqlx::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(items.len());
    let mut attempts = Vec::with_capacity(items.len());
    let mut dois = Vec::with_capacity(items.len());
    let mut sets_status = Vec::with_capacity(items.len());
    let mut modify_ts = Vec::with_capacity(items.len());
    let mut outcomes = Vec::with_capacity(items.len());
    let mut follower_ids = Vec::new();
    let mut follower_heads = Vec::new();
    for item in items {
        ids.push(item.lease.id);
        attempts.push(item.lease.attempt);
        dois.push(item.doi.as_deref());
        sets_status.push(item.sets_status);
        modify_ts.push(item.modify_ts);
        outcomes.push(item.outcome.as_deref());
        for f in &item.followers {
            follower_ids.push(*f);
            follower_heads.push(item.lease.id);
        }
    }
    let done: Vec<JobId> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH done AS (
            UPDATE contact_sync.jobs j
            SET state = 'succeeded', finished_at = now(), locked_until = NULL, doi = coalesce(t.doi, j.doi),
                outcome = t.outcome
            FROM unnest($1::bigint[], $2::int[], $3::text[], $6::bool[], $7::bigint[], $8::text[])
                 AS t(id, attempt, doi, sets_status, modify_ts, outcome)
            WHERE j.id = t.id AND j.state = 'running' AND j.attempts = t.attempt
            RETURNING j.id, j.contact_key, t.sets_status, t.modify_ts
        ), watermark AS (
            -- one running job per contact: a contact appears at most once here
            INSERT INTO contact_sync.smartlink_watermarks AS w (contact_key, modify_ts)
            SELECT d.contact_key, d.modify_ts FROM done d WHERE d.modify_ts IS NOT NULL
            ON CONFLICT (contact_key) DO UPDATE
                SET modify_ts = greatest(w.modify_ts, EXCLUDED.modify_ts), updated_at = now()
        ), merged AS (
            -- a follower cancelled while its call was in flight was delivered all the same:
            -- say so instead of leaving it `cancelled`
            UPDATE contact_sync.jobs f
            SET state = 'coalesced', finished_at = now(), coalesced_into = m.head,
                last_error = CASE WHEN f.state = 'cancelled'
                                  THEN 'cancelled while being delivered with job ' || m.head || ': delivered all the same'
                                  ELSE f.last_error END
            FROM unnest($4::bigint[], $5::bigint[]) AS m(id, head)
            WHERE f.id = m.id AND f.state IN ('pending', 'cancelled') AND m.head IN (SELECT id FROM done)
            RETURNING f.id
        ), superseded AS (
            -- a status delivered now comes after every confirmation re-send still waiting for
            -- its contact (in delivery order, whatever the ids): those are superseded, queued
            -- or not yet swept
            UPDATE contact_sync.jobs r
            SET state = 'cancelled', finished_at = now(), doi = 'superseded by job ' || d.id
            FROM done d
            WHERE d.sets_status AND r.contact_key = d.contact_key AND r.state = 'pending'
              AND r.resend_after IS NOT NULL
            RETURNING r.id
        ), superseded_deferrals AS (
            DELETE FROM contact_sync.doi_deferred f
            USING done d
            WHERE d.sets_status AND f.job_id <> d.id
              AND (f.provider || ':' || f.account || ':' || lower(f.email)) = d.contact_key
            RETURNING f.job_id
        )
        SELECT id FROM done
        "#,
    ).persistent(false)
    .bind(&ids)
    .bind(&attempts)
    .bind(&dois)
    .bind(&follower_ids)
    .bind(&follower_heads)
    .bind(&sets_status)
    .bind(&modify_ts)
    .bind(&outcomes)
    .fetch_all(pool)
    .await?;
    let done: std::collections::HashSet<JobId> = done.into_iter().collect();
    Ok(ids.into_iter().filter(|id| !done.contains(id)).collect())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Most entries kept in a job's `errors` history (the oldest go first).
pub const MAX_ERRORS_KEPT: i32 = 100;

/// Whether a retry uses up one of the job's attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A failed attempt.
    Counts,
    /// The provider asked to slow down (429, JustClick code 8): not a failure of the job.
    Throttled,
}

/// Records a retryable failure: back to `pending` at `now() + delay`. False if the lease was lost.
pub async fn retry(
    pool: &PgPool,
    lease: Lease,
    delay: Duration,
    error: &AttemptError,
    attempt: Attempt,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        // language=PostgreSQL
        r#"
        UPDATE contact_sync.jobs
        SET state = 'pending', run_at = now() + make_interval(secs => $3::bigint / 1000.0),
            locked_until = NULL, locked_by = NULL,
            attempts = CASE WHEN $7 THEN attempts - 1 ELSE attempts END,
            last_error = $5,
            errors = (CASE WHEN jsonb_array_length(errors) >= $8 THEN errors - 0 ELSE errors END)
                     || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'kind', $4::text, 'code', $6::text, 'error', $5::text))
        WHERE id = $1 AND attempts = $2 AND state = 'running'
        "#,
    ).persistent(false)
    .bind(lease.id)
    .bind(lease.attempt)
    .bind(millis(delay))
    .bind(&error.kind)
    .bind(storable(&error.message))
    .bind(error.code.as_deref().map(storable))
    .bind(attempt == Attempt::Throttled)
    .bind(MAX_ERRORS_KEPT)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// A retryable failure: [`retry`], or [`kill`] once the job has used its `max_attempts`.
/// Returns the new state, or `None` if the lease was lost.
pub async fn retry_or_kill(
    pool: &PgPool,
    lease: Lease,
    max_attempts: i32,
    delay: Duration,
    error: &AttemptError,
    attempt: Attempt,
) -> Result<Option<JobState>, sqlx::Error> {
    if attempt == Attempt::Counts && lease.attempt >= max_attempts {
        return kill(pool, lease, error)
            .await
            .map(|ok| ok.then_some(JobState::Dead));
    }
    retry(pool, lease, delay, error, attempt)
        .await
        .map(|ok| ok.then_some(JobState::Pending))
}

/// Parks a job as `dead` (permanent failure or attempts exhausted). False if the lease was lost.
pub async fn kill(pool: &PgPool, lease: Lease, error: &AttemptError) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        // language=PostgreSQL
        r#"
        UPDATE contact_sync.jobs
        SET state = 'dead', finished_at = now(), locked_until = NULL, locked_by = NULL,
            last_error = $4,
            errors = errors || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'kind', $3::text, 'code', $5::text, 'error', $4::text))
        WHERE id = $1 AND attempts = $2 AND state = 'running'
        "#,
    ).persistent(false)
    .bind(lease.id)
    .bind(lease.attempt)
    .bind(&error.kind)
    .bind(storable(&error.message))
    .bind(error.code.as_deref().map(storable))
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Puts claimed jobs back to `pending`, runnable now. `undo_attempt` for jobs whose call never
/// started (shutdown before they ran, or a job of an account this worker cannot serve).
pub async fn release(
    pool: &PgPool,
    leases: &[Lease],
    undo_attempt: bool,
) -> Result<u64, sqlx::Error> {
    if leases.is_empty() {
        return Ok(0);
    }
    let (ids, attempts): (Vec<JobId>, Vec<i32>) = leases.iter().map(|l| (l.id, l.attempt)).unzip();
    let result = sqlx::query(
        // language=PostgreSQL
        r#"
        UPDATE contact_sync.jobs j
        SET state = 'pending', locked_until = NULL, locked_by = NULL, run_at = now(),
            attempts = CASE WHEN $3 THEN j.attempts - 1 ELSE j.attempts END
        FROM unnest($1::bigint[], $2::int[]) AS t(id, attempt)
        WHERE j.id = t.id AND j.state = 'running' AND j.attempts = t.attempt
        "#,
    )
    .persistent(false)
    .bind(&ids)
    .bind(&attempts)
    .bind(undo_attempt)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
