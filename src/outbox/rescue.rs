//! The rescuer: running jobs whose lease expired and whose worker is gone (killed, cut off from
//! the database past its lease) go back to `pending`, or to `dead` if that was their last
//! attempt; so do jobs held after an abandoned call (see [`super::complete::hold`]) once their
//! hold has passed.
//!
//! A live worker never loses a lease to a lock it did not take: its heartbeat skips a job row
//! another transaction holds (an operator's open `UPDATE`), so that row's `locked_until` may
//! pass while the call is still in flight; a job is rescued only when its worker's own row in
//! `contact_sync.workers` has expired too. The rescuer itself skips rows another transaction
//! holds, so one locked row never keeps it from the others.

use sqlx::PgPool;
use std::time::Duration;

/// Returns expired leases; yields `(rescued back to pending, parked as dead)`.
///
/// `after_lease`: how long a rescued job of a gone worker waits before it is claimed again (its
/// call may have been sent just before the worker went, and the provider may still act on it:
/// `http.request_timeout + http.abandoned_call_bound`, or zero when that bound is zero).
pub async fn rescue_expired(
    pool: &PgPool,
    default_max_attempts: i32,
    after_lease: Duration,
) -> Result<(u64, u64), sqlx::Error> {
    let states: Vec<String> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH expired AS (
            SELECT x.id FROM contact_sync.jobs x
            -- a running row without a lease (hand-inserted) is rescued too, or it blocks its
            -- contact forever
            WHERE x.state = 'running' AND (x.locked_until IS NULL OR x.locked_until < now())
              AND NOT EXISTS (SELECT 1 FROM contact_sync.workers w
                              WHERE w.id = x.locked_by AND w.expires_at > now())
            FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE contact_sync.jobs j
        SET state = CASE WHEN j.attempts >= coalesce(j.max_attempts, $1) THEN 'dead' ELSE 'pending' END,
            finished_at = CASE WHEN j.attempts >= coalesce(j.max_attempts, $1) THEN now() END,
            -- held after an abandoned call (no owner, a lease): the hold has passed already;
            -- a gone worker's call may still be acted on
            run_at = CASE WHEN j.locked_by IS NULL AND j.locked_until IS NOT NULL THEN now()
                          ELSE now() + make_interval(secs => $2::bigint / 1000.0) END,
            locked_until = NULL,
            last_error = CASE WHEN j.locked_by IS NULL AND j.locked_until IS NOT NULL THEN j.last_error
                              ELSE 'lease expired: the worker ' || coalesce(j.locked_by, '?') || ' stopped renewing it' END,
            errors = CASE WHEN j.locked_by IS NULL AND j.locked_until IS NOT NULL THEN j.errors
                          ELSE j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempts, 'at', now(), 'kind', 'lease_expired', 'code', NULL,
                'error', 'lease expired: the worker ' || coalesce(j.locked_by, '?') || ' stopped renewing it')) END,
            locked_by = NULL
        WHERE j.id = ANY(ARRAY(SELECT id FROM expired)) AND j.state = 'running'
        RETURNING j.state
        "#,
    )
    .persistent(false)
    .bind(default_max_attempts)
    .bind(i64::try_from(after_lease.as_millis()).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let dead = states.iter().filter(|s| s.as_str() == "dead").count() as u64;
    Ok((states.len() as u64 - dead, dead))
}
