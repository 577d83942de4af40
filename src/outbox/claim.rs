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

/// The claim statement (public for the plan tests). Reads only the ready contacts of each
/// account from `contacts_ready_idx` (contacts with a call in flight are not in it, a head
/// scheduled later sits past `now()`), locks them `FOR NO KEY UPDATE SKIP LOCKED` (compatible
/// with the `FOR KEY SHARE` a producer holds), moves each head job to `running` and the contact
/// to `running`, and reads each head's consecutive due followers (at most `$6`) from the
/// contact's pending jobs. A head that is no longer `pending` (changed by hand) leaves its
/// contact to be read again; the unique index on running contacts stays the last word. Head
/// jobs are not locked on their own (that would cost a write per job): whoever changes a
/// pending job takes its contact's row first, as the operator commands do.
#[doc(hidden)]
pub const CLAIM_SQL: &str = r#"
        WITH picked AS (
            SELECT c.contact_key, c.head_id
            FROM unnest($1::text[], $2::int[]) AS q(account, n)
            CROSS JOIN LATERAL (
                SELECT c.contact_key, c.head_id FROM contact_sync.contacts c
                WHERE c.account = q.account AND c.head_id IS NOT NULL AND NOT c.running
                  AND c.run_at <= now()
                ORDER BY c.run_at, c.head_id
                LIMIT q.n
                FOR NO KEY UPDATE SKIP LOCKED
            ) c
        ), claimed AS (
            UPDATE contact_sync.jobs j
            SET state = 'running', attempts = j.attempts + 1,
                locked_until = now() + make_interval(secs => $3::bigint / 1000.0), locked_by = $4
            -- = ANY(ARRAY(...)): primary-key probes, never a join the planner could hash; the
            -- state test is written so that no partial index can serve it (a plain
            -- `state = 'pending'` let the planner AND the probes with a scan of the whole
            -- pending index)
            WHERE j.id = ANY(ARRAY(SELECT head_id FROM picked)) AND coalesce(j.state, '') = 'pending'
              AND NOT EXISTS (SELECT 1 FROM contact_sync.jobs r
                              WHERE r.contact_key = j.contact_key AND r.state = 'running')
            RETURNING j.id, j.provider, j.account, j.email, j.payload, j.attempts, j.max_attempts,
                      j.created_at, j.contact_key
        ), marked AS (
            UPDATE contact_sync.contacts c
            SET running = c.head_id IN (SELECT id FROM claimed),
                head_id = CASE WHEN c.head_id IN (SELECT id FROM claimed) THEN c.head_id END,
                run_at = CASE WHEN c.head_id IN (SELECT id FROM claimed) THEN c.run_at END
            WHERE c.contact_key = ANY(ARRAY(SELECT contact_key FROM picked))
        )
        -- payload and followers as text: the worker decodes each job on its own, so one row it
        -- cannot read is parked alone instead of failing the whole batch
        SELECT j.id, j.provider, j.account, j.email, j.payload::text AS payload, j.attempts,
               coalesce(j.max_attempts, $5) AS max_attempts,
               floor(extract(epoch FROM j.created_at) * 1000)::bigint AS created_at_ms,
               CASE WHEN j.provider = 'smartlink' THEN
                   (SELECT w.modify_ts FROM contact_sync.smartlink_watermarks w WHERE w.contact_key = j.contact_key)
               END AS known_modify_ts,
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                           'id', f.id, 'payload', f.payload,
                           'created_at_ms', floor(extract(epoch FROM f.created_at) * 1000)::bigint) ORDER BY f.id), '[]')::text
                FROM (SELECT f.id, f.payload, f.created_at,
                             -- consecutive only: stop at a job scheduled later or a re-send
                             bool_and(f.run_at <= now() AND f.resend_after IS NULL) OVER (ORDER BY f.id) AS consecutive
                      FROM (SELECT f.id, f.payload, f.created_at, f.run_at, f.resend_after
                            FROM contact_sync.jobs f
                            WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id
                            ORDER BY f.id LIMIT $6) f) f
                WHERE f.consecutive) AS followers
        FROM claimed j
        "#;

/// Claims up to each account's quota of runnable head jobs (see [`CLAIM_SQL`]).
///
/// A job is runnable when it is `pending`, due, and the head of its contact (no `running` job,
/// no earlier `pending` one: DESIGN.md rule 1), which `contact_sync.contacts` keeps.
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
    sqlx::query_as::<_, ClaimedJob>(CLAIM_SQL)
        .bind(&accounts)
        .bind(&limits)
        .bind(millis(lease))
        .bind(worker_id)
        .bind(default_max_attempts)
        .bind(max_followers)
        .fetch_all(pool)
        .await
}

/// Runs the claim statement for these quotas and rolls it back (the benchmark's and the plan
/// tests' probe: the backlog stays as it was). Returns how many jobs it would have claimed.
pub async fn claim_rolled_back(
    pool: &PgPool,
    quotas: &[AccountQuota],
    max_followers: i64,
) -> Result<usize, sqlx::Error> {
    let accounts: Vec<&str> = quotas.iter().map(|q| q.account.as_str()).collect();
    let limits: Vec<i32> = quotas.iter().map(|q| q.limit).collect();
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(CLAIM_SQL)
        .bind(&accounts)
        .bind(&limits)
        .bind(30_000i64)
        .bind("probe")
        .bind(5i32)
        .bind(max_followers)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(rows.len())
}

/// Extends the leases this worker still holds; returns the ids whose lease is still ours.
///
/// Rows another statement holds right now are skipped, never waited for: that is this worker's
/// completer finishing them (a beat waiting for it, while it waits for the beat's rows in
/// another order, was a deadlock), or a rescuer taking them. They still count as ours while the
/// row says so.
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
        WITH mine AS (
            SELECT j.id FROM contact_sync.jobs j
            JOIN unnest($1::bigint[], $2::int[]) AS t(id, attempt) ON j.id = t.id AND j.attempts = t.attempt
            -- primary-key probes
            WHERE j.id = ANY($1) AND j.state = 'running'
        ), locked AS (
            SELECT j.id FROM contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT id FROM mine))
            ORDER BY j.id
            FOR NO KEY UPDATE SKIP LOCKED
        ), extended AS (
            UPDATE contact_sync.jobs j
            SET locked_until = now() + make_interval(secs => $3::bigint / 1000.0)
            WHERE j.id = ANY(ARRAY(SELECT id FROM locked)) AND j.state = 'running'
        )
        SELECT id FROM mine
        "#,
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(millis(lease))
    .fetch_all(pool)
    .await
}

/// Is any job of these accounts runnable now (a ready contact due, or a contact to be read
/// again that has a pending job)?
pub async fn runnable_exists(pool: &PgPool, accounts: &[String]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT EXISTS (
            SELECT 1 FROM unnest($1::text[]) AS a(account)
            WHERE EXISTS (SELECT 1 FROM contact_sync.contacts c
                          WHERE c.account = a.account AND c.head_id IS NOT NULL AND NOT c.running
                            AND c.run_at <= now()))
            -- a contact to read again is runnable if it has committed open work (one whose
            -- only new job is not committed yet is not)
            OR EXISTS (SELECT 1 FROM contact_sync.contacts c
                       WHERE c.head_id IS NULL AND c.account = ANY($1)
                         AND EXISTS (SELECT 1 FROM contact_sync.jobs j
                                     WHERE j.contact_key = c.contact_key AND j.state = 'pending'))
        "#,
    )
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// Time until the next ready contact of these accounts falls due (None: none waiting).
pub async fn next_due_in(
    pool: &PgPool,
    accounts: &[String],
) -> Result<Option<Duration>, sqlx::Error> {
    let ms: Option<f64> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT (extract(epoch FROM (min(n.run_at) - now())) * 1000)::float8
        FROM unnest($1::text[]) AS a(account)
        CROSS JOIN LATERAL (
            SELECT c.run_at FROM contact_sync.contacts c
            WHERE c.account = a.account AND c.head_id IS NOT NULL AND NOT c.running
            ORDER BY c.run_at LIMIT 1) n
        "#,
    )
    .bind(accounts)
    .fetch_one(pool)
    .await?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
}

/// Reads again the contacts left to be re-read (a producer held the row while its last job
/// finished, or another transaction held it while a job changed), at most `limit` of each kind,
/// in random order so that rows still held cannot starve the others; returns how many were
/// looked at.
pub async fn reread_contacts(pool: &PgPool, limit: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH noted AS (
            DELETE FROM contact_sync.contacts_dirty d
            WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM contact_sync.contacts_dirty LIMIT $1))
            RETURNING d.contact_key
        ), k AS (
            SELECT ARRAY(
                SELECT contact_key FROM noted
                UNION
                SELECT contact_key FROM (
                    SELECT contact_key FROM contact_sync.contacts WHERE head_id IS NULL
                    ORDER BY random() LIMIT $1) r) AS keys
        )
        SELECT cardinality(keys)::bigint FROM k, LATERAL contact_sync.refresh_contacts(k.keys)
        "#,
    )
    .bind(limit)
    .fetch_one(pool)
    .await
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
