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
/// `own`: the calling worker's id and the jobs it knows it holds. A running job of that worker
/// that it does not know (the claim committed but its answer never arrived: a connection cut,
/// a Postgres restart) is rescued once its lease has expired, as a gone worker's would be:
/// nothing else would ever return it, since its worker is alive.
///
/// `after_lease`: how long a gone worker's job is held (running, owned by no worker) before it
/// goes back to `pending` or `dead`: its call may have been sent just before the worker went,
/// and the provider may still act on it (`http.request_timeout + http.abandoned_call_bound`,
/// or zero when that bound is zero: then at once). Held jobs count as rescued.
pub async fn rescue_expired(
    pool: &PgPool,
    default_max_attempts: i32,
    after_lease: Duration,
    own: (&str, &[i64]),
) -> Result<(u64, u64), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let rows: Vec<(i64, String)> = sqlx::query_as(&format!(
        // language=PostgreSQL
        r#"
        WITH expired AS (
            SELECT x.id FROM ONLY contact_sync.jobs x
            -- a running row without a lease (hand-inserted) is rescued too, or it blocks its
            -- contact forever
            -- (`account > ''` holds for every job: it lets the small index of running jobs by
            -- account serve the scan, where the one by contact keeps an entry for every call
            -- made since the last vacuum)
            WHERE x.state = 'running' AND x.account > '' AND (x.locked_until IS NULL OR x.locked_until < now())
              AND (NOT EXISTS (SELECT 1 FROM contact_sync.workers w
                               WHERE w.id = x.locked_by AND w.expires_at > now())
                   OR (x.locked_by = $3 AND NOT x.id = ANY($4)))
            FOR NO KEY UPDATE SKIP LOCKED
        ),
        -- a gone worker's call may have reached the provider, or not (a held job's was
        -- recorded when it was held)
        {unanswered}
        UPDATE ONLY contact_sync.jobs j
        -- a held job (no owner, a lease) is over its hold: back to pending, or dead after its
        -- last attempt. A gone worker's job is first held itself for `$2` (its call may still
        -- be at the provider: the contact waits and the account's slot stays taken), unless $2
        -- is zero.
        SET state = CASE WHEN NOT (j.locked_by IS NULL AND j.locked_until IS NOT NULL) AND $2 > 0 THEN 'running'
                         WHEN j.attempts >= coalesce(j.max_attempts, $1) THEN 'dead' ELSE 'pending' END,
            finished_at = CASE WHEN NOT (j.locked_by IS NULL AND j.locked_until IS NOT NULL) AND $2 > 0 THEN NULL
                               WHEN j.attempts >= coalesce(j.max_attempts, $1) THEN now() END,
            locked_until = CASE WHEN NOT (j.locked_by IS NULL AND j.locked_until IS NOT NULL) AND $2 > 0
                                THEN now() + make_interval(secs => $2::bigint / 1000.0) END,
            last_error = CASE WHEN j.locked_by IS NULL AND j.locked_until IS NOT NULL THEN j.last_error
                              ELSE 'lease expired: the worker ' || coalesce(j.locked_by, '?') || ' stopped renewing it' END,
            errors = CASE WHEN j.locked_by IS NULL AND j.locked_until IS NOT NULL THEN j.errors
                          ELSE j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempts, 'at', now(), 'kind', 'lease_expired', 'code', NULL,
                'error', 'lease expired: the worker ' || coalesce(j.locked_by, '?') || ' stopped renewing it')) END,
            locked_by = NULL
        WHERE j.id = ANY(ARRAY(SELECT id FROM expired)) AND j.state = 'running'
        RETURNING j.id, j.state
        "#,
        unanswered = super::synced::unanswered_calls_ctes(
            "ARRAY(SELECT x.id FROM ONLY contact_sync.jobs x WHERE x.id = ANY(ARRAY(SELECT id FROM expired)) AND x.locked_by IS NOT NULL)",
            None
        )
    ))
    .persistent(false)
    .bind(default_max_attempts)
    .bind(i64::try_from(after_lease.as_millis()).unwrap_or(i64::MAX))
    .bind(own.0)
    .bind(own.1)
    .fetch_all(&mut *conn)
    .await?;
    let back: Vec<i64> = rows
        .iter()
        .filter(|(_, state)| state.as_str() != "running")
        .map(|(id, _)| *id)
        .collect();
    if rows.iter().any(|(_, state)| state.as_str() == "pending") {
        // (pending again with the run_at they were queued with)
        super::claim::rewind_floors();
    }
    if !back.is_empty() {
        // what waits behind these calls: the contacts' next jobs come back (failing that, the
        // sweep brings them back)
        super::claim::requeue_next_or_leave_to_sweep(&mut conn, &back, false).await;
    }
    let dead = rows.iter().filter(|(_, s)| s.as_str() == "dead").count() as u64;
    Ok((rows.len() as u64 - dead, dead))
}
