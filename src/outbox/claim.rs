//! Claiming: one short statement, committed before any provider call, that takes the runnable
//! head job of each contact (`FOR UPDATE SKIP LOCKED`), per-account quotas, the lease, and the
//! consecutive due jobs of the same contact that can ride along (coalescing). Also the lease
//! heartbeat and the "is anything runnable" probe used by `--drain`.

use super::job::{ClaimedJob, JobId, Lease};
use chrono::{DateTime, Utc};
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
/// contact's pending jobs. A head that is no longer `pending` (changed by hand), or no longer
/// its contact's first pending job, leaves its contact to be read again; the unique index on
/// running contacts stays the last word. Head
/// jobs are not locked on their own (that would cost a write per job): whoever changes a
/// pending job takes its contact's row first, as the operator commands do.
#[doc(hidden)]
pub const CLAIM_SQL: &str = r#"
        WITH picked AS (
            SELECT c.contact_key, c.head_id
            FROM unnest($1::text[], $2::int[]) AS q(account, n)
            -- a paused account (its provider's throttle answer, or an operator) gives nothing,
            -- and an account with fleet-wide limits only within them ($7: claim_within_limits)
            CROSS JOIN LATERAL (
                SELECT 1 WHERE NOT EXISTS (
                    SELECT 1 FROM contact_sync.accounts a
                    WHERE a.account = q.account
                      AND (a.paused_at IS NOT NULL OR a.throttled_until > now()
                           OR (NOT $7 AND (a.rate_per_second IS NOT NULL OR a.max_in_flight IS NOT NULL))))
            ) open
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
              -- the contact's first pending job, whatever its queue row says (a change noted
              -- for a re-read by a REPEATABLE READ producer, then one queued by a READ
              -- COMMITTED one): otherwise the row is read again first
              AND NOT EXISTS (SELECT 1 FROM contact_sync.jobs e
                              WHERE e.contact_key = j.contact_key AND e.state = 'pending' AND e.id < j.id)
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
        SELECT j.id, j.provider, j.account, j.email, j.payload::text AS payload,
               -- the digest the completion compares, in the server's own encoding (the text the
               -- client receives is converted to UTF-8, and hashes differently in a WIN1251 database)
               md5(j.payload::text) AS payload_md5, j.attempts,
               coalesce(j.max_attempts, $5) AS max_attempts,
               floor(extract(epoch FROM j.created_at) * 1000)::bigint AS created_at_ms,
               CASE WHEN j.provider = 'smartlink' THEN
                   (SELECT w.modify_ts FROM contact_sync.smartlink_watermarks w WHERE w.contact_key = j.contact_key)
               END AS known_modify_ts,
               -- what the provider was last sent, for the accounts a source captures into ($8)
               CASE WHEN j.account = ANY($8::text[]) THEN
                   (SELECT s.fields::text FROM contact_sync.synced s WHERE s.contact_key = j.contact_key)
               END AS synced_fields,
               -- most heads have no follower: one index probe says so, without the
               -- aggregate's set-up for every claimed job
               CASE WHEN NOT EXISTS (SELECT 1 FROM contact_sync.jobs f
                                     WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id)
                    THEN '[]' ELSE
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                           'id', f.id, 'payload', f.payload, 'md5', md5(f.payload::text),
                           'created_at_ms', floor(extract(epoch FROM f.created_at) * 1000)::bigint) ORDER BY f.id), '[]')::text
                FROM (SELECT f.id, f.payload, f.created_at,
                             -- consecutive only: stop at a job scheduled later or a re-send
                             bool_and(f.run_at <= now() AND f.resend_after IS NULL) OVER (ORDER BY f.id) AS consecutive
                      FROM (SELECT f.id, f.payload, f.created_at, f.run_at, f.resend_after
                            FROM contact_sync.jobs f
                            WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id
                            ORDER BY f.id LIMIT $6) f) f
                WHERE f.consecutive) END AS followers
        FROM claimed j
        "#;

/// Claims up to each account's quota of runnable head jobs (see [`CLAIM_SQL`]).
///
/// A job is runnable when it is `pending`, due, and the head of its contact (no `running` job,
/// no earlier `pending` one), which `contact_sync.contacts` keeps.
pub async fn claim(
    pool: &PgPool,
    quotas: &[AccountQuota],
    options: &ClaimOptions<'_>,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    if quotas.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = pool.acquire().await?;
    run_claim(&mut conn, quotas, options, false).await
}

/// What every claim takes besides the quotas.
#[derive(Debug, Clone, Copy)]
pub struct ClaimOptions<'a> {
    /// How long the claimed jobs are leased.
    pub lease: Duration,
    /// Written into `locked_by`.
    pub worker_id: &'a str,
    /// `max_attempts` of a job enqueued without one.
    pub default_max_attempts: i32,
    /// The most jobs one call carries (the head and its coalesced followers).
    pub max_followers: usize,
    /// Accounts a source captures into: their claimed jobs come with the contact's synced
    /// state, so that a change the provider already holds is not sent.
    pub captured: &'a [String],
}

/// Runs [`CLAIM_SQL`] for `quotas`; `within_limits`: the caller holds the accounts' rows and
/// has cut the quotas to their budgets (otherwise accounts with limits are left alone).
async fn run_claim(
    conn: &mut sqlx::PgConnection,
    quotas: &[AccountQuota],
    claim: &ClaimOptions<'_>,
    within_limits: bool,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    let accounts: Vec<&str> = quotas.iter().map(|q| q.account.as_str()).collect();
    let limits: Vec<i32> = quotas.iter().map(|q| q.limit).collect();
    let max_followers = i64::try_from(claim.max_followers.saturating_sub(1)).unwrap_or(0);
    sqlx::query_as::<_, ClaimedJob>(CLAIM_SQL)
        .persistent(false)
        .bind(&accounts)
        .bind(&limits)
        .bind(millis(claim.lease))
        .bind(claim.worker_id)
        .bind(claim.default_max_attempts)
        .bind(max_followers)
        .bind(within_limits)
        .bind(claim.captured)
        .fetch_all(conn)
        .await
}

/// What held an account back in [`claim_within_limits`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Held {
    /// Paused (throttle answer or operator) for this long (`Duration::MAX`: until resumed).
    Paused(Duration),
    /// The bucket is short of tokens: worth asking again after this long.
    Tokens(Duration),
    /// `max_in_flight` calls are in flight fleet-wide.
    InFlight,
    /// Another worker is claiming for the account right now.
    Busy,
}

/// A claim of limited accounts: the jobs, and what held each account back.
#[derive(Debug, Default)]
pub struct LimitedClaim {
    pub jobs: Vec<ClaimedJob>,
    pub held: Vec<(String, Held)>,
}

/// Tokens are spent when a job is claimed, and the provider sees the call a little later: a few
/// milliseconds, more on a loaded machine or when a connection must be opened first. So that
/// this delay, varying from call to call, cannot push more than `burst + rate × window` calls
/// into a window at the provider, the bucket holds `rate ×` this margin less than its burst (at
/// most half the burst, at least one token).
pub const CALL_JITTER_MARGIN: Duration = Duration::from_millis(50);

/// The part of an account's budget worth waking for: about a tenth of a second's worth of
/// tokens (at least one, at most the burst), so a slow account is claimed in small batches, not
/// one job per statement.
fn wake_tokens(rate: f64, burst: f64) -> f64 {
    (rate * 0.1).clamp(1.0, burst.max(1.0))
}

/// Claims for accounts with fleet-wide limits (`rate_per_second`/`burst`, `max_in_flight` in
/// `contact_sync.accounts`), in one transaction:
/// 1. the accounts' rows are locked (`FOR UPDATE SKIP LOCKED`, in name order): claims of one
///    limited account are serialized across every worker, and a row another claim holds is
///    reported as [`Held::Busy`], never waited for;
/// 2. its running jobs are counted in the next statement, which under READ COMMITTED sees every
///    claim and completion committed before the lock was granted;
/// 3. each quota is cut to the whole tokens in the bucket and the free in-flight slots;
/// 4. the claim statement takes at most that; the bucket keeps what was not used.
///
/// No two workers can spend the same token or slot. An account without a row, or without
/// limits in it, is claimed as asked.
pub async fn claim_within_limits(
    pool: &PgPool,
    quotas: &[AccountQuota],
    options: &ClaimOptions<'_>,
) -> Result<LimitedClaim, sqlx::Error> {
    let mut out = LimitedClaim::default();
    if quotas.is_empty() {
        return Ok(out);
    }
    let mut names: Vec<&str> = quotas.iter().map(|q| q.account.as_str()).collect();
    names.sort_unstable();
    let mut tx = pool.begin().await?;
    // A stopped or cut-off worker must not hold an account's row for long: its session ends
    // after this much idle time in the transaction, and the lock with it.
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '5s'")
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    // 1. the lock, never waited for: an account another claim holds right now is skipped
    //    (asked again shortly), so nothing queues behind a slow or stopped claimer
    let locked: Vec<String> = sqlx::query_scalar(
        // language=PostgreSQL
        "SELECT account FROM contact_sync.accounts WHERE account = ANY($1) ORDER BY account FOR UPDATE SKIP LOCKED",
    ).persistent(false)
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    // 2. a fresh snapshot: the bucket as of one instant `t`, and the calls in flight
    type BucketRow = (
        String,
        Option<f64>,
        Option<f64>,
        Option<i32>,
        Option<f64>,
        Option<i64>,
        bool,
        DateTime<Utc>,
        i64,
    );
    let buckets: Vec<BucketRow> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT a.account, a.rate_per_second, a.burst, a.max_in_flight,
               -- refilled since refilled_at, never above the burst less the jitter margin (at
               -- most half the burst, at least one token)
               CASE WHEN a.rate_per_second IS NOT NULL THEN
                   least(greatest(1, coalesce(a.burst, 1) - least(a.rate_per_second * $2, coalesce(a.burst, 1) / 2)),
                         a.tokens + a.rate_per_second *
                         greatest(0, extract(epoch FROM c.t - a.refilled_at)))
               END AS tokens,
               CASE WHEN a.paused_at IS NULL AND a.throttled_until > c.t
                    THEN ceil(extract(epoch FROM a.throttled_until - c.t) * 1000)::bigint
               END AS throttled_ms,
               a.paused_at IS NOT NULL AS paused,
               c.t,
               CASE WHEN a.max_in_flight IS NOT NULL THEN
                   (SELECT count(*) FROM contact_sync.jobs j WHERE j.state = 'running' AND j.account = a.account)
               ELSE 0 END AS running
        FROM contact_sync.accounts a CROSS JOIN (SELECT clock_timestamp() AS t) c
        WHERE a.account = ANY($1)
        "#,
    ).persistent(false)
    .bind(&names)
    .bind(CALL_JITTER_MARGIN.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let mut granted = Vec::with_capacity(quotas.len());
    for q in quotas {
        let Some(b) = buckets.iter().find(|b| b.0 == q.account) else {
            granted.push(q.clone());
            continue;
        };
        if !locked.contains(&q.account) {
            out.held.push((q.account.clone(), Held::Busy));
            continue;
        }
        let (_, rate, burst, max_in_flight, tokens, throttled_ms, paused, _, busy) = b;
        if *paused {
            out.held
                .push((q.account.clone(), Held::Paused(Duration::MAX)));
            continue;
        }
        if let Some(ms) = throttled_ms {
            let left = Duration::from_millis(u64::try_from(*ms).unwrap_or(0));
            out.held.push((q.account.clone(), Held::Paused(left)));
            continue;
        }
        let mut limit = i64::from(q.limit);
        if let Some(cap) = max_in_flight {
            let free = i64::from(*cap) - busy;
            if free <= limit {
                limit = free.max(0);
                if limit == 0 {
                    out.held.push((q.account.clone(), Held::InFlight));
                }
            }
        }
        if let (Some(rate), Some(tokens)) = (rate, tokens) {
            let whole = tokens.floor() as i64;
            if whole < limit {
                limit = whole.max(0);
                if limit == 0 {
                    let want = wake_tokens(*rate, burst.unwrap_or(1.0));
                    // a rate so small that the wait overflows: ask again in an hour
                    let wait = Duration::try_from_secs_f64(((want - tokens) / rate).max(0.001))
                        .unwrap_or(Duration::from_secs(3600));
                    out.held.push((q.account.clone(), Held::Tokens(wait)));
                }
            }
        }
        if limit > 0 {
            granted.push(AccountQuota {
                account: q.account.clone(),
                limit: i32::try_from(limit).unwrap_or(i32::MAX),
            });
        }
    }
    if !granted.is_empty() {
        out.jobs = run_claim(&mut tx, &granted, options, true).await?;
    }
    // spend the tokens of what was claimed (one per call: followers ride along)
    let mut spent: (Vec<String>, Vec<f64>, Vec<DateTime<Utc>>) = Default::default();
    for b in buckets.iter().filter(|b| locked.contains(&b.0)) {
        if let Some(tokens) = b.4 {
            let n = out.jobs.iter().filter(|j| j.account == b.0).count() as f64;
            spent.0.push(b.0.clone());
            spent.1.push(tokens - n);
            spent.2.push(b.7);
        }
    }
    if !spent.0.is_empty() {
        sqlx::query(
            // language=PostgreSQL
            r#"
            UPDATE contact_sync.accounts a SET tokens = t.tokens, refilled_at = t.at
            FROM unnest($1::text[], $2::float8[], $3::timestamptz[]) AS t(account, tokens, at)
            WHERE a.account = t.account
            "#,
        )
        .persistent(false)
        .bind(&spent.0)
        .bind(&spent.1)
        .bind(&spent.2)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// Runs the claim statement for these quotas and rolls it back (the benchmark's and the plan
/// tests' probe: the backlog stays as it was). Returns how many jobs it would have claimed.
pub async fn claim_rolled_back(
    pool: &PgPool,
    quotas: &[AccountQuota],
    max_followers: usize,
) -> Result<usize, sqlx::Error> {
    let options = ClaimOptions {
        lease: Duration::from_secs(30),
        worker_id: "probe",
        default_max_attempts: 5,
        max_followers,
        captured: &[],
    };
    let mut tx = pool.begin().await?;
    let rows = run_claim(&mut tx, quotas, &options, false).await?;
    tx.rollback().await?;
    Ok(rows.len())
}

/// Extends the leases this worker still holds; returns the ids whose lease is still ours.
///
/// Rows another statement holds right now are skipped, never waited for: that is this worker's
/// completer finishing them (a beat waiting for it, while it waits for the beat's rows in
/// another order, was a deadlock), a rescuer looking at them, or an outsider's open
/// transaction. They still count as ours while the row says so: the rescuer takes a job only
/// once its worker's own row (`contact_sync.workers`) has expired too. A lease is never
/// shortened (a job held after an abandoned call is no longer this worker's: `locked_by` says
/// so).
pub async fn extend_leases(
    pool: &PgPool,
    leases: &[Lease],
    lease: Duration,
    worker_id: &str,
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
            WHERE j.id = ANY($1) AND j.state = 'running' AND j.locked_by = $4
        ), locked AS (
            SELECT j.id FROM contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT id FROM mine))
            ORDER BY j.id
            FOR NO KEY UPDATE SKIP LOCKED
        ), extended AS (
            UPDATE contact_sync.jobs j
            SET locked_until = greatest(j.locked_until, now() + make_interval(secs => $3::bigint / 1000.0))
            WHERE j.id = ANY(ARRAY(SELECT id FROM locked)) AND j.state = 'running' AND j.locked_by = $4
        )
        SELECT id FROM mine
        "#,
    ).persistent(false)
    .bind(&ids)
    .bind(&attempts)
    .bind(millis(lease))
    .bind(worker_id)
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
            -- so is a contact a REPEATABLE READ or SERIALIZABLE producer noted (read again by
            -- housekeeping, which the caller wakes)
            OR EXISTS (SELECT 1 FROM contact_sync.contacts_dirty d
                       WHERE split_part(d.contact_key, ':', 2) = ANY($1))
        "#,
    )
    .persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// Is a call of these accounts in flight (a `running` job)?
pub async fn in_flight_exists(pool: &PgPool, accounts: &[String]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        "SELECT EXISTS (SELECT 1 FROM contact_sync.jobs WHERE state = 'running' AND account = ANY($1))",
    ).persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// Is a job of these accounts held after an abandoned call (running, owned by no worker, until
/// the provider can no longer be acting on it)?
pub async fn held_exists(pool: &PgPool, accounts: &[String]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        "SELECT EXISTS (SELECT 1 FROM contact_sync.jobs WHERE state = 'running' AND locked_by IS NULL AND account = ANY($1))",
    ).persistent(false)
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
    .persistent(false)
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
    .persistent(false)
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
    .persistent(false)
    .bind(worker_id)
    .fetch_one(pool)
    .await
}
