//! Claiming: one short statement, committed before any provider call, that takes the runnable
//! head job of each contact (`FOR UPDATE SKIP LOCKED`), per-account quotas, the lease, and the
//! consecutive due jobs of the same contact that can ride along (coalescing). Also the lease
//! heartbeat and the "is anything runnable" probe used by `--drain`.

use super::job::{ClaimedJob, JobId, Lease};
use sqlx::PgPool;
use std::time::Duration;

/// How many jobs to take for one account in one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountQuota {
    pub account: String,
    pub limit: i32,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Claims up to each account's quota of runnable head jobs.
///
/// A job is runnable when it is `pending`, due, and its contact has no `running` job and no
/// earlier `pending` one (DESIGN.md rule 1). The unique index on running contacts backs this
/// up: a claim racing another for the same contact fails with 23505 and is simply retried.
pub async fn claim(
    pool: &PgPool,
    quotas: &[AccountQuota],
    lease: Duration,
    worker_id: &str,
    default_max_attempts: i32,
    max_followers: usize,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    if quotas.is_empty() {
        return Ok(Vec::new());
    }
    let accounts: Vec<&str> = quotas.iter().map(|q| q.account.as_str()).collect();
    let limits: Vec<i32> = quotas.iter().map(|q| q.limit).collect();
    let max_followers = i64::try_from(max_followers.saturating_sub(1)).unwrap_or(0);
    sqlx::query_as::<_, ClaimedJob>(
        // language=PostgreSQL
        r#"
        WITH picked AS (
            SELECT j.id
            FROM unnest($1::text[], $2::int[]) AS q(account, n)
            CROSS JOIN LATERAL (
                SELECT j.id FROM contact_sync.jobs j
                WHERE j.account = q.account AND j.state = 'pending' AND j.run_at <= now()
                  AND NOT EXISTS (
                      SELECT 1 FROM contact_sync.jobs e
                      WHERE e.contact_key = j.contact_key AND e.state = 'pending' AND e.id < j.id)
                  AND NOT EXISTS (
                      SELECT 1 FROM contact_sync.jobs r
                      WHERE r.contact_key = j.contact_key AND r.state = 'running')
                ORDER BY j.run_at, j.id
                LIMIT q.n
                FOR UPDATE SKIP LOCKED
            ) j
        )
        UPDATE contact_sync.jobs j
        SET state = 'running', attempts = j.attempts + 1,
            locked_until = now() + make_interval(secs => $3::bigint / 1000.0), locked_by = $4
        -- = ANY(ARRAY(...)): primary-key probes; a join on the CTE can make the planner hash
        -- the whole table
        WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
        -- payload and followers as text: the worker decodes each job on its own, so one row it
        -- cannot read is parked alone instead of failing the whole batch
        RETURNING j.id, j.provider, j.account, j.email, j.payload::text AS payload, j.attempts,
                  coalesce(j.max_attempts, $5) AS max_attempts,
                  floor(extract(epoch FROM j.created_at) * 1000)::bigint AS created_at_ms,
                  CASE WHEN j.provider = 'smartlink' THEN
                      (SELECT w.modify_ts FROM contact_sync.smartlink_watermarks w WHERE w.contact_key = j.contact_key)
                  END AS known_modify_ts,
                  (SELECT coalesce(jsonb_agg(jsonb_build_object(
                              'id', f.id, 'payload', f.payload,
                              'created_at_ms', floor(extract(epoch FROM f.created_at) * 1000)::bigint) ORDER BY f.id), '[]')::text
                   FROM (SELECT f.id, f.payload, f.created_at FROM contact_sync.jobs f
                         WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id
                           AND f.run_at <= now() AND f.resend_after IS NULL
                           -- consecutive only: stop at a job scheduled later or a re-send
                           AND NOT EXISTS (
                               SELECT 1 FROM contact_sync.jobs g
                               WHERE g.contact_key = j.contact_key AND g.state = 'pending'
                                 AND g.id > j.id AND g.id < f.id
                                 AND (g.run_at > now() OR g.resend_after IS NOT NULL))
                         ORDER BY f.id LIMIT $6) f) AS followers
        "#,
    )
    .bind(&accounts)
    .bind(&limits)
    .bind(millis(lease))
    .bind(worker_id)
    .bind(default_max_attempts)
    .bind(max_followers)
    .fetch_all(pool)
    .await
}

/// Extends the leases this worker still holds; returns the ids whose lease is still ours.
pub async fn extend_leases(
    pool: &PgPool,
    leases: &[Lease],
    lease: Duration,
) -> Result<Vec<JobId>, sqlx::Error> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, attempts): (Vec<JobId>, Vec<i32>) = leases.iter().map(|l| (l.id, l.attempt)).unzip();
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        UPDATE contact_sync.jobs j
        SET locked_until = now() + make_interval(secs => $3::bigint / 1000.0)
        FROM unnest($1::bigint[], $2::int[]) AS t(id, attempt)
        WHERE j.id = t.id AND j.state = 'running' AND j.attempts = t.attempt
        RETURNING j.id
        "#,
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(millis(lease))
    .fetch_all(pool)
    .await
}

/// Is any job of these accounts runnable now (due, head of its contact)?
pub async fn runnable_exists(pool: &PgPool, accounts: &[String]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT EXISTS (
            SELECT 1 FROM contact_sync.jobs j
            WHERE j.account = ANY($1) AND j.state = 'pending' AND j.run_at <= now()
              AND NOT EXISTS (
                  SELECT 1 FROM contact_sync.jobs e
                  WHERE e.contact_key = j.contact_key AND e.state = 'pending' AND e.id < j.id)
              AND NOT EXISTS (
                  SELECT 1 FROM contact_sync.jobs r
                  WHERE r.contact_key = j.contact_key AND r.state = 'running'))
        "#,
    )
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// Time until the next pending job of these accounts falls due (None: none pending).
pub async fn next_due_in(
    pool: &PgPool,
    accounts: &[String],
) -> Result<Option<Duration>, sqlx::Error> {
    let ms: Option<f64> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT (extract(epoch FROM (min(run_at) - now())) * 1000)::float8
        FROM contact_sync.jobs WHERE account = ANY($1) AND state = 'pending'
        "#,
    )
    .bind(accounts)
    .fetch_one(pool)
    .await?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
}

/// How many jobs are `running` under this worker's name (after a drain: must be none).
pub async fn held_by(pool: &PgPool, worker_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        "SELECT count(*) FROM contact_sync.jobs WHERE state = 'running' AND locked_by = $1",
    )
    .bind(worker_id)
    .fetch_one(pool)
    .await
}
