//! The rescuer: running jobs whose lease expired (their worker died or lost the database) go
//! back to `pending`, or to `dead` if that was their last attempt.

use sqlx::PgPool;

/// Returns expired leases; yields `(rescued back to pending, parked as dead)`.
pub async fn rescue_expired(
    pool: &PgPool,
    default_max_attempts: i32,
) -> Result<(u64, u64), sqlx::Error> {
    let states: Vec<String> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        UPDATE contact_sync.jobs
        SET state = CASE WHEN attempts >= coalesce(max_attempts, $1) THEN 'dead' ELSE 'pending' END,
            finished_at = CASE WHEN attempts >= coalesce(max_attempts, $1) THEN now() END,
            run_at = now(), locked_until = NULL,
            last_error = 'lease expired: the worker ' || coalesce(locked_by, '?') || ' stopped renewing it',
            errors = errors || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'kind', 'lease_expired', 'code', NULL,
                'error', 'lease expired: the worker ' || coalesce(locked_by, '?') || ' stopped renewing it')),
            locked_by = NULL
        -- a running row without a lease (hand-inserted) is rescued too, or it blocks its contact forever
        WHERE state = 'running' AND (locked_until IS NULL OR locked_until < now())
        RETURNING state
        "#,
    ).persistent(false)
    .bind(default_max_attempts)
    .fetch_all(pool)
    .await?;
    let dead = states.iter().filter(|s| s.as_str() == "dead").count() as u64;
    Ok((states.len() as u64 - dead, dead))
}
