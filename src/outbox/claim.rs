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

/// The claim statement (public for the plan tests). Reads each account's due pending jobs
/// that are not waiting from `jobs_ready_idx` (oldest due first from the account's floor `$9`,
/// see [`ReadyFloors`]; at most the quota), locks them
/// `FOR NO KEY UPDATE SKIP LOCKED`, and judges each: a job whose contact has a running job, or a
/// lower pending one, is set waiting (`waits_for`: the job it was found behind; it leaves the
/// index until [`requeue_next`] or the sweep brings it back as its contact's next job); the
/// others are the heads, moved to `running`. Each head comes with its consecutive due followers
/// (at most `$6`, waiting or not) from the contact's pending jobs. Two claims that judged one
/// contact from snapshots on either side of a producer's commit both take a head: the unique
/// index on running contacts refuses the second (the caller claims again). Returns a row per
/// head, and one more whose `id` is NULL carrying how many it set waiting; every row also says
/// where each open account's scan ended.
#[doc(hidden)]
pub const CLAIM_SQL: &str = r#"
        WITH open_accounts AS (
            -- a paused account (its provider's throttle answer, or an operator) gives nothing,
            -- and an account with fleet-wide limits only within them ($7: claim_within_limits)
            -- where its scan starts: its floor (see ReadyFloors), or as much earlier as the
            -- slack for producers' transactions committing after the claim that set it; no
            -- floor: the start
            SELECT q.account, q.n,
                   CASE WHEN q.floor_at IS NULL THEN '-infinity'::timestamptz
                        ELSE least(q.floor_at, now() - interval '2 seconds') END AS from_at,
                   CASE WHEN q.floor_at <= now() - interval '2 seconds' THEN q.floor_id ELSE 0 END AS from_id
            FROM unnest($1::text[], $2::int[], $9::timestamptz[], $10::bigint[]) AS q(account, n, floor_at, floor_id)
            WHERE NOT EXISTS (
                SELECT 1 FROM contact_sync.accounts a
                WHERE a.account = q.account
                  AND (a.paused_at IS NOT NULL OR a.throttled_until > now()
                       OR (NOT $7 AND (a.rate_per_second IS NOT NULL OR a.max_in_flight IS NOT NULL))))
        ), candidates AS (
            SELECT c.id, c.contact_key, c.run_at, q.account, q.n
            FROM open_accounts q
            CROSS JOIN LATERAL (
                SELECT j.id, j.contact_key, j.run_at FROM ONLY contact_sync.jobs j
                WHERE j.account = q.account AND j.state = 'pending' AND j.waits_for IS NULL
                  AND j.run_at <= now() AND (j.run_at, j.id) >= (q.from_at, q.from_id)
                ORDER BY j.run_at, j.id
                LIMIT q.n
                FOR NO KEY UPDATE SKIP LOCKED
            ) c
        ), judged AS (
            -- what each candidate waits for: its contact's call in flight, else its contact's
            -- first pending job if that is lower (one probe of each contact index)
            SELECT c.id, coalesce(
                       (SELECT r.id FROM ONLY contact_sync.jobs r
                        WHERE r.contact_key = c.contact_key AND r.state = 'running' LIMIT 1),
                       (SELECT e.id FROM ONLY contact_sync.jobs e
                        WHERE e.contact_key = c.contact_key AND e.state = 'pending' AND e.id < c.id
                        ORDER BY e.id LIMIT 1)) AS behind
            FROM candidates c
        ), set_waiting AS (
            -- driven from the judged rows: one primary-key probe each (an `= ANY(...)` test
            -- besides the join made it a nested loop over both sides, quadratic in the batch)
            UPDATE ONLY contact_sync.jobs j SET waits_for = g.behind
            FROM judged g
            WHERE j.id = ANY(ARRAY(SELECT w.id FROM judged w WHERE w.behind IS NOT NULL))
              AND j.id = g.id AND coalesce(j.state, '') = 'pending'
            RETURNING j.id
        ), claimed AS (
            UPDATE ONLY contact_sync.jobs j
            -- (at most the table's bound: a count set that high by hand must not fail the claim)
            SET state = 'running', attempts = least(j.attempts + 1, 999999),
                locked_until = now() + make_interval(secs => $3::bigint / 1000.0), locked_by = $4
            -- the state test is written so that no partial index can serve it (a plain
            -- `state = 'pending'` let the planner AND the probes with a scan of a whole index)
            WHERE j.id = ANY(ARRAY(SELECT id FROM judged WHERE behind IS NULL))
              AND coalesce(j.state, '') = 'pending'
            RETURNING j.id, j.provider, j.account, j.email, j.payload, j.attempts, j.max_attempts,
                      j.created_at, j.contact_key
        )
        -- payload and followers as text: the worker decodes each job on its own, so one row it
        -- cannot read is parked alone instead of failing the whole batch
        SELECT j.id, j.provider, j.account, j.email, j.payload::text AS payload,
               -- the digest the completion compares, in the server's own encoding (the text the
               -- client receives is converted to UTF-8, and hashes differently in a WIN1251 database)
               md5(j.payload::text) AS payload_md5, j.attempts,
               coalesce(j.max_attempts, $5) AS max_attempts,
               floor(extract(epoch FROM j.created_at) * 1000)::bigint AS created_at_ms,
               -- [delivered, possibly delivered by a call whose answer was lost]
               CASE WHEN j.provider = 'smartlink' THEN
                   (SELECT ARRAY[w.modify_ts, w.uncertain_ts] FROM contact_sync.smartlink_watermarks w WHERE w.contact_key = j.contact_key)
               END AS watermark,
               -- what the provider was last sent, for the accounts a source captures into ($8)
               CASE WHEN j.account = ANY($8::text[]) THEN
                   (SELECT s.fields::text FROM contact_sync.synced s WHERE s.contact_key = j.contact_key)
               END AS synced_fields,
               -- most heads have no follower: one index probe says so, without the
               -- aggregate's set-up for every claimed job
               CASE WHEN j.id IS NULL THEN NULL
                    WHEN NOT EXISTS (SELECT 1 FROM ONLY contact_sync.jobs f
                                     WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id)
                    THEN '[]' ELSE
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                           'id', f.id, 'payload', f.payload, 'md5', md5(f.payload::text),
                           'created_at_ms', floor(extract(epoch FROM f.created_at) * 1000)::bigint) ORDER BY f.id), '[]')::text
                FROM (SELECT f.id, f.payload, f.created_at,
                             -- consecutive only: stop at a job scheduled later or a re-send
                             bool_and(f.run_at <= now() AND f.resend_after IS NULL) OVER (ORDER BY f.id) AS consecutive
                      FROM (SELECT f.id, f.payload, f.created_at, f.run_at, f.resend_after
                            FROM ONLY contact_sync.jobs f
                            WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id
                            ORDER BY f.id LIMIT $6) f) f
                WHERE f.consecutive) END AS followers,
               p.n AS set_waiting,
               -- where each open account's scan ended: its last candidate's run_at and how
               -- many it found (the next floor, see ReadyFloors)
               s.scanned_at, s.accounts AS scanned_accounts, s.last_ats AS scanned_last_ats,
               s.last_ids AS scanned_last_ids, s.founds AS scanned_founds
        FROM (SELECT count(*) AS n FROM set_waiting) p
        CROSS JOIN (SELECT now() AS scanned_at, array_agg(o.account) AS accounts,
                           array_agg(l.run_at) AS last_ats, array_agg(l.id) AS last_ids,
                           array_agg(x.found) AS founds
                    FROM open_accounts o
                    CROSS JOIN LATERAL (SELECT count(*) AS found FROM candidates c
                                        WHERE c.account = o.account) x
                    LEFT JOIN LATERAL (SELECT c.run_at, c.id FROM candidates c
                                       WHERE c.account = o.account
                                       ORDER BY c.run_at DESC, c.id DESC LIMIT 1) l ON true) s
        LEFT JOIN claimed j ON true
        "#;

/// Claims up to each account's quota of runnable head jobs (see [`CLAIM_SQL`]).
///
/// A job is runnable when it is `pending`, due, and the head of its contact (no `running` job,
/// no lower `pending` one). `pool` is one of the hot path's ([`super::hot::pool`]): the
/// statement is prepared, and its plan is kept for the session.
pub async fn claim(
    pool: &PgPool,
    quotas: &[AccountQuota],
    options: &ClaimOptions<'_>,
    floors: &mut ReadyFloors,
) -> Result<Claimed, sqlx::Error> {
    if quotas.is_empty() {
        return Ok(Claimed::default());
    }
    floors.prepare();
    let mut conn = pool.acquire().await?;
    let mut claimed = run_claim(&mut conn, quotas, options, false, floors).await?;
    floors.advance(std::mem::take(&mut claimed.floors));
    Ok(claimed)
}

/// What a claim took, and how many blocked jobs it set waiting on the way (when any, the
/// caller claims again at once: what it looked at was not the whole of what is due).
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<ClaimedJob>,
    pub set_waiting: u64,
    /// Where the scans ended, for [`ReadyFloors::advance`] once the claim is committed.
    pub(crate) floors: Vec<(String, Floor)>,
}

/// How far behind a floor a claim still looks ([`CLAIM_SQL`] writes it as a literal): a
/// producer's job carries its transaction's start as `run_at` and becomes visible at its
/// commit, so a change committed just after a claim can sort a little before where that claim
/// stopped.
pub const FLOOR_SLACK: Duration = Duration::from_secs(2);

/// How often a claim reads an account's ready jobs from the start whatever its floor: what
/// became ready behind a floor by way of another process (a job its producer's transaction held
/// longer than [`FLOOR_SLACK`], a waiting job another worker brought back, an operator's
/// `retry`) waits at most this long, plus the poll interval.
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

/// Bumped when this process makes jobs ready that may sort before a floor (a contact's next job
/// brought back, a rescued lease): every [`ReadyFloors`] then starts from the beginning.
static REWINDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Says that jobs with an earlier `run_at` than the floors may have become ready.
pub(crate) fn rewind_floors() {
    REWINDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Jobs this process brought back, with when and where they sort: each [`ReadyFloors`] lowers
/// its account's floor to them. Kept for [`FULL_SCAN_EVERY`]: a `ReadyFloors` that has not
/// looked since reads from the start anyway.
type BroughtBack = std::collections::VecDeque<(std::time::Instant, String, Floor)>;
static BROUGHT_BACK: std::sync::Mutex<BroughtBack> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Says that these jobs (account, position) are ready again: the next claim of each account
/// starts no later than there.
pub(crate) fn rewind_floors_to(jobs: impl IntoIterator<Item = (String, Floor)>) {
    let Ok(mut log) = BROUGHT_BACK.lock() else {
        rewind_floors();
        return;
    };
    let now = std::time::Instant::now();
    while log
        .front()
        .is_some_and(|(at, _, _)| now.duration_since(*at) > FULL_SCAN_EVERY)
    {
        log.pop_front();
    }
    log.extend(jobs.into_iter().map(|(account, at)| (now, account, at)));
}

/// A position in the ready index: `(run_at, id)`.
pub type Floor = (DateTime<Utc>, JobId);

/// Where each account's next claim starts reading the ready index (a worker's own).
///
/// The index is in `(run_at, id)` order, and the jobs a claim takes leave it, but their entries
/// stay in the index, dead, until a vacuum: a claim reading from the start walks over every job
/// claimed since, about a page of the index per 150 jobs (10 ms a claim after 250,000 jobs).
/// So a claim starts where the previous one stopped: at its last candidate when it found its
/// quota, at its own start when it found less (everything due was taken); and never after
/// [`FLOOR_SLACK`] before now. What may have become ready before that is found by a read from
/// the start every [`FULL_SCAN_EVERY`], and at once when this process brought it back (a
/// contact's next job after a completion lowers the floor to that job, the sweep and the
/// rescuer make the next claim read from the start). Only when jobs are seen changes: never
/// which job a claim may take, or in which order a contact's changes go.
#[derive(Debug, Default)]
pub struct ReadyFloors {
    floors: std::collections::HashMap<String, Floor>,
    full_scan_at: Option<std::time::Instant>,
    rewinds_seen: u64,
    /// When the jobs brought back were last looked at.
    looked_at: Option<std::time::Instant>,
    /// A claim since the last read from the start began at a floor.
    floored_since_full: bool,
}

impl ReadyFloors {
    /// The next claim reads every account from the start.
    pub fn forget(&mut self) {
        self.floors.clear();
    }

    /// Before a claim: forgets the floors when a full read is due or jobs were brought back
    /// without saying where, lowers them to the jobs brought back since the last claim.
    fn prepare(&mut self) {
        let rewinds = REWINDS.load(std::sync::atomic::Ordering::Relaxed);
        let due = self
            .full_scan_at
            .is_none_or(|at| at.elapsed() >= FULL_SCAN_EVERY);
        if due || rewinds != self.rewinds_seen {
            self.floors.clear();
            self.rewinds_seen = rewinds;
        }
        if due {
            self.full_scan_at = Some(std::time::Instant::now());
        }
        if due {
            self.floored_since_full = false;
        } else if !self.floors.is_empty() {
            self.floored_since_full = true;
        }
        let Ok(log) = BROUGHT_BACK.lock() else {
            self.floors.clear();
            return;
        };
        for (_, account, at) in log
            .iter()
            .filter(|(when, _, _)| self.looked_at.is_none_or(|looked| *when >= looked))
        {
            if let Some(floor) = self.floors.get_mut(account) {
                if *at < *floor {
                    *floor = *at;
                }
            }
        }
        // (read under the lock: what is brought back after this is newer)
        self.looked_at = Some(std::time::Instant::now());
    }

    /// When a claim since the last read from the start began at a floor: how long until the
    /// next read from the start is due. The claim loop wakes by then whatever its poll
    /// interval, so a job that became ready before a floor (a NOTIFY for a job queued with a
    /// past `run_at` woke a claim that did not read that far) waits at most
    /// [`FULL_SCAN_EVERY`].
    pub fn full_read_due_in(&self) -> Option<Duration> {
        if !self.floored_since_full {
            return None;
        }
        let since = self.full_scan_at?.elapsed();
        Some(FULL_SCAN_EVERY.saturating_sub(since))
    }

    /// Records where a committed claim's scans ended.
    pub fn advance(&mut self, ends: Vec<(String, Floor)>) {
        self.floors.extend(ends);
    }

    /// Where the next claim of `account` starts (None: from the start), before the slack.
    pub fn floor(&self, account: &str) -> Option<Floor> {
        self.floors.get(account).copied()
    }
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

/// A row of [`CLAIM_SQL`]: a claimed head, or (`id` NULL) the count of jobs set waiting.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: Option<JobId>,
    provider: Option<String>,
    account: Option<String>,
    email: Option<String>,
    payload: Option<String>,
    payload_md5: Option<String>,
    attempts: Option<i32>,
    max_attempts: Option<i32>,
    created_at_ms: Option<i64>,
    watermark: Option<Vec<Option<i64>>>,
    synced_fields: Option<String>,
    followers: Option<String>,
    set_waiting: i64,
    scanned_at: DateTime<Utc>,
    scanned_accounts: Option<Vec<String>>,
    scanned_last_ats: Option<Vec<Option<DateTime<Utc>>>>,
    scanned_last_ids: Option<Vec<Option<JobId>>>,
    scanned_founds: Option<Vec<i64>>,
}

impl ClaimRow {
    fn into_job(self) -> Option<ClaimedJob> {
        let watermark = self.watermark.unwrap_or_default();
        Some(ClaimedJob {
            id: self.id?,
            provider: self.provider?,
            account: self.account?,
            email: self.email?,
            payload: self.payload?,
            payload_md5: self.payload_md5?,
            attempts: self.attempts?,
            max_attempts: self.max_attempts?,
            created_at_ms: self.created_at_ms?,
            known_modify_ts: watermark.first().copied().flatten(),
            uncertain_modify_ts: watermark.get(1).copied().flatten(),
            synced_fields: self.synced_fields,
            followers: self.followers?,
        })
    }
}

/// How many times one claim runs [`CLAIM_SQL`] again while it sets jobs waiting and the quotas
/// are not filled (a blocked backlog is set waiting a window at a time; each job once).
const CLAIM_PASSES: usize = 4;

/// Runs [`CLAIM_SQL`] for `quotas`; `within_limits`: the caller holds the accounts' rows and
/// has cut the quotas to their budgets (otherwise accounts with limits are left alone). Runs it
/// again, for what is still wanted, while a pass set jobs waiting.
async fn run_claim(
    conn: &mut sqlx::PgConnection,
    quotas: &[AccountQuota],
    claim: &ClaimOptions<'_>,
    within_limits: bool,
    floors: &ReadyFloors,
) -> Result<Claimed, sqlx::Error> {
    let max_followers = i64::try_from(claim.max_followers.saturating_sub(1)).unwrap_or(0);
    let mut wanted: Vec<AccountQuota> = quotas.to_vec();
    let mut jobs: Vec<ClaimedJob> = Vec::new();
    let mut waiting = 0u64;
    // the floors as the passes move them (a later pass starts after what an earlier one set
    // waiting)
    let mut ends: Vec<(String, Floor)> = Vec::new();
    let floor_of = |ends: &[(String, Floor)], account: &str| {
        ends.iter()
            .rev()
            .find(|(a, _)| a == account)
            .map(|(_, at)| *at)
            .or_else(|| floors.floor(account))
    };
    for _ in 0..CLAIM_PASSES {
        let accounts: Vec<&str> = wanted.iter().map(|q| q.account.as_str()).collect();
        let limits: Vec<i32> = wanted.iter().map(|q| q.limit).collect();
        let starts: Vec<Option<Floor>> =
            wanted.iter().map(|q| floor_of(&ends, &q.account)).collect();
        let start_ats: Vec<Option<DateTime<Utc>>> = starts.iter().map(|f| f.map(|f| f.0)).collect();
        let start_ids: Vec<Option<JobId>> = starts.iter().map(|f| f.map(|f| f.1)).collect();
        let rows = sqlx::query_as::<_, ClaimRow>(CLAIM_SQL)
            .bind(&accounts)
            .bind(&limits)
            .bind(millis(claim.lease))
            .bind(claim.worker_id)
            .bind(claim.default_max_attempts)
            .bind(max_followers)
            .bind(within_limits)
            .bind(claim.captured)
            .bind(&start_ats)
            .bind(&start_ids)
            .fetch_all(&mut *conn)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            // a later pass lost a race for a contact: what the earlier passes claimed is
            // committed. Inside the caller's transaction the error has aborted it, and the
            // earlier passes with it: nothing is claimed, so the error goes up
            Err(e) if !jobs.is_empty() && !within_limits => {
                tracing::debug!(error = %e, "a further claim pass failed");
                break;
            }
            Err(e) => return Err(e),
        };
        let set_waiting = rows.first().map_or(0, |r| r.set_waiting);
        waiting += u64::try_from(set_waiting).unwrap_or(0);
        if let Some(first) = rows.first() {
            ends.extend(scan_ends(first, &wanted));
        }
        let got: Vec<ClaimedJob> = rows.into_iter().filter_map(ClaimRow::into_job).collect();
        for q in &mut wanted {
            let n = got.iter().filter(|j| j.account == q.account).count();
            q.limit -= i32::try_from(n).unwrap_or(q.limit);
        }
        jobs.extend(got);
        wanted.retain(|q| q.limit > 0);
        if set_waiting == 0 || wanted.is_empty() {
            break;
        }
    }
    Ok(Claimed {
        jobs,
        set_waiting: waiting,
        floors: ends,
    })
}

/// Where a pass's scans ended, for each account it read (a paused or held account was not
/// read: its floor stays): its last candidate's `run_at` when it found its whole quota (jobs
/// after it, even of that `run_at`, may be ready), the statement's start when it found less
/// (it read everything due).
fn scan_ends(row: &ClaimRow, wanted: &[AccountQuota]) -> Vec<(String, Floor)> {
    let accounts = row.scanned_accounts.as_deref().unwrap_or_default();
    let last_ats = row.scanned_last_ats.as_deref().unwrap_or_default();
    let last_ids = row.scanned_last_ids.as_deref().unwrap_or_default();
    let founds = row.scanned_founds.as_deref().unwrap_or_default();
    wanted
        .iter()
        .filter_map(|q| {
            let i = accounts.iter().position(|a| *a == q.account)?;
            let found = founds.get(i).copied().unwrap_or(0);
            let last = last_ats
                .get(i)
                .copied()
                .flatten()
                .zip(last_ids.get(i).copied().flatten());
            let end = match last {
                Some(last) if found >= i64::from(q.limit) => last,
                _ => (row.scanned_at, 0),
            };
            Some((q.account.clone(), end))
        })
        .collect()
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
    /// Blocked jobs set waiting on the way (see [`Claimed`]).
    pub set_waiting: u64,
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
/// limits in it, is claimed as asked. `pool`: as for [`claim`].
pub async fn claim_within_limits(
    pool: &PgPool,
    quotas: &[AccountQuota],
    options: &ClaimOptions<'_>,
    floors: &mut ReadyFloors,
) -> Result<LimitedClaim, sqlx::Error> {
    let mut out = LimitedClaim::default();
    if quotas.is_empty() {
        return Ok(out);
    }
    floors.prepare();
    let mut ends = Vec::new();
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
    )
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
                   (SELECT count(*) FROM ONLY contact_sync.jobs j WHERE j.state = 'running' AND j.account = a.account)
               ELSE 0 END AS running
        FROM contact_sync.accounts a CROSS JOIN (SELECT clock_timestamp() AS t) c
        WHERE a.account = ANY($1)
        "#,
    )
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
        let claimed = run_claim(&mut tx, &granted, options, true, floors).await?;
        out.jobs = claimed.jobs;
        out.set_waiting = claimed.set_waiting;
        ends = claimed.floors;
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
            -- (= ANY: an index scan of these accounts, whatever the plan)
            WHERE a.account = ANY($1::text[]) AND a.account = t.account
            "#,
        )
        .bind(&spent.0)
        .bind(&spent.1)
        .bind(&spent.2)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    floors.advance(ends);
    Ok(out)
}

/// Runs the claim statement for these quotas and rolls it back (the benchmark's and the plan
/// tests' probe: the backlog stays as it was). Returns how many jobs it would have claimed.
/// `pool`: as for [`claim`].
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
    let rows = run_claim(&mut tx, quotas, &options, false, &ReadyFloors::default()).await?;
    tx.rollback().await?;
    Ok(rows.jobs.len())
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
            SELECT j.id FROM ONLY contact_sync.jobs j
            JOIN unnest($1::bigint[], $2::int[]) AS t(id, attempt) ON j.id = t.id AND j.attempts = t.attempt
            -- primary-key probes
            WHERE j.id = ANY($1) AND j.state = 'running' AND j.locked_by = $4
        ), locked AS (
            SELECT j.id FROM ONLY contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT id FROM mine))
            ORDER BY j.id
            FOR NO KEY UPDATE SKIP LOCKED
        ), extended AS (
            UPDATE ONLY contact_sync.jobs j
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

/// Is any job of these accounts runnable now (due, not waiting)? Waiting jobs a completion
/// missed count once [`requeue_stale_waits`] has brought them back.
pub async fn runnable_exists(pool: &PgPool, accounts: &[String]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT EXISTS (
            SELECT 1 FROM unnest($1::text[]) AS a(account)
            -- the latest due first: the index keeps the entries of the jobs claimed since the
            -- last vacuum, dead, before the ones still ready (see ReadyFloors)
            WHERE (SELECT j.run_at FROM ONLY contact_sync.jobs j
                   WHERE j.account = a.account AND j.state = 'pending' AND j.waits_for IS NULL
                     AND j.run_at <= now()
                   ORDER BY j.run_at DESC LIMIT 1) IS NOT NULL)
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
        "SELECT EXISTS (SELECT 1 FROM ONLY contact_sync.jobs WHERE state = 'running' AND account = ANY($1))",
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
        "SELECT EXISTS (SELECT 1 FROM ONLY contact_sync.jobs WHERE state = 'running' AND locked_by IS NULL AND account = ANY($1))",
    ).persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// Time until the next pending job that is not waiting of these accounts falls due (None: none waiting).
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
            SELECT j.run_at FROM ONLY contact_sync.jobs j
            WHERE j.account = a.account AND j.state = 'pending' AND j.waits_for IS NULL
            ORDER BY j.run_at LIMIT 1) n
        "#,
    )
    .persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
}

/// One step of the sweep that brings back the contacts' waiting jobs a completion missed (a
/// claim that set a job waiting behind a call whose completion was committing, a hand-written
/// `UPDATE` or `DELETE`, a completion that could not take a row): looks at up to `budget`
/// contacts with waiting jobs, in key order after `after`, and brings back each one's first
/// pending job when it is waiting and no call of the contact is in flight. Returns how many
/// it brought back and the last contact looked at (None: it reached the end).
///
/// Three index probes per contact looked at, whatever the planner's statistics say (index
/// scans only, in a transaction of its own): its cost is the budget, never the waiting jobs.
pub async fn requeue_stale_waits(
    pool: &PgPool,
    after: &str,
    budget: i64,
) -> Result<StaleWaits, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true), \
                set_config('statement_timeout', '10s', true)",
    )
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    let (requeued, held, last, looked): (i64, i64, Option<String>, i64) =
        sqlx::query_as(REQUEUE_STALE_WAITS_SQL)
            .persistent(false)
            .bind(after)
            .bind(budget)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    if requeued > 0 {
        rewind_floors();
    }
    Ok(StaleWaits {
        requeued: u64::try_from(requeued).unwrap_or(0),
        held: u64::try_from(held).unwrap_or(0),
        next: if looked < budget { None } else { last },
    })
}

/// What one step of [`requeue_stale_waits`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleWaits {
    /// Contacts' first pending jobs brought back.
    pub requeued: u64,
    /// Ones to bring back that another transaction holds (the next step tries again).
    pub held: u64,
    /// The contact to go on after (None: the step reached the end).
    pub next: Option<String>,
}

/// The statement of [`requeue_stale_waits`] (public for the plan tests): `$1` the contact key
/// to start after, `$2` the most contacts to look at.
#[doc(hidden)]
pub const REQUEUE_STALE_WAITS_SQL: &str = r#"
        WITH RECURSIVE waiting(key, n) AS (
            (SELECT j.contact_key, 1 FROM ONLY contact_sync.jobs j
             WHERE j.state = 'pending' AND j.waits_for IS NOT NULL AND j.contact_key > $1
             ORDER BY j.contact_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.contact_key FROM ONLY contact_sync.jobs j
                    WHERE j.state = 'pending' AND j.waits_for IS NOT NULL AND j.contact_key > w.key
                    ORDER BY j.contact_key LIMIT 1), w.n + 1
            FROM waiting w WHERE w.key IS NOT NULL AND w.n < $2
        ), looked AS (
            SELECT w.key FROM waiting w WHERE w.key IS NOT NULL
        ), stale AS (
            SELECT f.id FROM looked k
            CROSS JOIN LATERAL (SELECT j.id, j.waits_for FROM ONLY contact_sync.jobs j
                                WHERE j.contact_key = k.key AND j.state = 'pending'
                                ORDER BY j.id LIMIT 1) f
            WHERE f.waits_for IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM ONLY contact_sync.jobs r
                              WHERE r.contact_key = k.key AND r.state = 'running')
        ), taken AS (
            -- a row another transaction holds is left for the next sweep
            SELECT j.id FROM ONLY contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT id FROM stale))
            ORDER BY j.id
            FOR NO KEY UPDATE SKIP LOCKED
        ), requeued AS (
            -- (tests written so that no partial index can serve them: the waiting index was
            -- read whole for them with stale statistics; the ids are primary-key probes)
            UPDATE ONLY contact_sync.jobs p SET waits_for = NULL
            WHERE p.id = ANY(ARRAY(SELECT id FROM taken)) AND coalesce(p.state, '') = 'pending'
            RETURNING p.id
        )
        SELECT (SELECT count(*) FROM requeued), (SELECT count(*) FROM stale) - (SELECT count(*) FROM taken),
               (SELECT max(key) FROM looked), (SELECT count(*) FROM looked)
        "#;

/// Brings back, for each contact of these jobs, its first pending job if it is waiting and no
/// call of the contact is in flight (what a completion, a retry, a release and the rescuer run
/// once the jobs are written): a contact's waiting jobs come back one at a time, in order, and
/// the rest ride along with it (coalesced) or wait again behind it. Rows another transaction
/// holds are skipped (an operator's action on the contact, which may wait for a row this
/// transaction holds): the sweep brings them back.
pub async fn requeue_next(
    conn: &mut sqlx::PgConnection,
    ids: &[JobId],
) -> Result<u64, sqlx::Error> {
    requeue_next_sql(conn, ids, &[], false).await
}

/// [`requeue_next`] once the jobs are written (a completion, a retry, the rescuer, `cancel`): a
/// failure is logged and left to the workers' sweep, never the caller's error. `hot`: `conn` is
/// one of the hot path's sessions ([`super::hot`]), where the statement is prepared and its
/// plan kept; elsewhere it is planned afresh.
pub(crate) async fn requeue_next_or_leave_to_sweep(
    conn: &mut sqlx::PgConnection,
    ids: &[JobId],
    hot: bool,
) {
    if let Err(e) = requeue_next_sql(conn, ids, &[], hot).await {
        tracing::debug!(error = %e, "could not bring back the next waiting jobs; the sweep will");
    }
}

/// [`requeue_next_of`] once a completion is written, on one of the hot path's sessions: a
/// failure is logged and left to the workers' sweep.
pub(crate) async fn requeue_next_of_or_leave_to_sweep(
    conn: &mut sqlx::PgConnection,
    contact_keys: &[String],
) {
    if let Err(e) = requeue_next_sql(conn, &[], contact_keys, true).await {
        tracing::debug!(error = %e, "could not bring back the next waiting jobs; the sweep will");
    }
}

/// [`requeue_next`] for contacts named by key (the operator actions: what they cancelled may
/// have been a contact's first pending job).
pub async fn requeue_next_of(
    conn: &mut sqlx::PgConnection,
    contact_keys: &[String],
) -> Result<u64, sqlx::Error> {
    requeue_next_sql(conn, &[], contact_keys, false).await
}

async fn requeue_next_sql(
    conn: &mut sqlx::PgConnection,
    ids: &[JobId],
    contact_keys: &[String],
    hot: bool,
) -> Result<u64, sqlx::Error> {
    // (nothing written, nothing to look up: no round trip)
    if ids.is_empty() && contact_keys.is_empty() {
        return Ok(0);
    }
    let requeued: Vec<(String, DateTime<Utc>, JobId)> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        WITH keys AS (
            -- = ANY(ARRAY(SELECT unnest(...))): primary-key probes whatever the planner
            -- believes of the table's size
            SELECT j.contact_key FROM ONLY contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT unnest($1::bigint[])))
            UNION
            SELECT unnest($2::text[])
        ), waiting AS (
            -- most contacts have no waiting job: one probe of the waiting index (as small as
            -- the jobs set waiting) says so, before the probes of the contact's pending and
            -- running jobs
            -- (a scalar sub-select: an EXISTS becomes a semi-join, which the hot sessions,
            -- without nested loops, ran as a hash of every waiting job: 15 ms a completion
            -- beside 51,000 of them)
            SELECT k.contact_key FROM keys k
            WHERE (SELECT w.id FROM ONLY contact_sync.jobs w
                   WHERE w.contact_key = k.contact_key AND w.state = 'pending'
                     AND w.waits_for IS NOT NULL
                   LIMIT 1) IS NOT NULL
        ), next AS (
            SELECT f.id FROM waiting k
            CROSS JOIN LATERAL (SELECT j.id, j.waits_for FROM ONLY contact_sync.jobs j
                                WHERE j.contact_key = k.contact_key AND j.state = 'pending'
                                ORDER BY j.id LIMIT 1) f
            WHERE f.waits_for IS NOT NULL
              -- (a probe of the contact, never an anti-join over every running job)
              AND (SELECT r.id FROM ONLY contact_sync.jobs r
                   WHERE r.contact_key = k.contact_key AND r.state = 'running') IS NULL
        ), taken AS (
            SELECT j.id FROM ONLY contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT id FROM next))
            ORDER BY j.id
            FOR NO KEY UPDATE SKIP LOCKED
        )
        -- (no partial index can serve this test: primary-key probes)
        UPDATE ONLY contact_sync.jobs p SET waits_for = NULL
        WHERE p.id = ANY(ARRAY(SELECT id FROM taken)) AND coalesce(p.state, '') = 'pending'
        RETURNING p.account, p.run_at, p.id
        "#,
    )
    .persistent(hot)
    .bind(ids)
    .bind(contact_keys)
    .fetch_all(conn)
    .await?;
    let count = requeued.len() as u64;
    // (ready again with the run_at they were queued with: before the floors)
    rewind_floors_to(
        requeued
            .into_iter()
            .map(|(account, run_at, id): (String, DateTime<Utc>, JobId)| (account, (run_at, id))),
    );
    Ok(count)
}

/// How many jobs are `running` under this worker's name (after a drain: must be none).
pub async fn held_by(pool: &PgPool, worker_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        "SELECT count(*) FROM ONLY contact_sync.jobs WHERE state = 'running' AND locked_by = $1",
    )
    .persistent(false)
    .bind(worker_id)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_job_brought_back_lowers_its_accounts_floor_once() {
        let mut floors = ReadyFloors::default();
        floors.prepare(); // the first claim reads from the start
        assert_eq!(floors.floor("floors_a"), None);
        assert_eq!(floors.full_read_due_in(), None);
        floors.advance(vec![
            ("floors_a".into(), (at(100), 500)),
            ("floors_b".into(), (at(100), 501)),
        ]);
        rewind_floors_to([("floors_a".to_string(), (at(10), 7))]);
        // a later job brought back does not raise a floor
        rewind_floors_to([("floors_b".to_string(), (at(200), 900))]);
        floors.prepare();
        assert_eq!(floors.floor("floors_a"), Some((at(10), 7)));
        // a claim that began at a floor: the next read from the start within a second
        assert!(floors
            .full_read_due_in()
            .is_some_and(|d| d <= FULL_SCAN_EVERY));
        assert_eq!(floors.floor("floors_b"), Some((at(100), 501)));
        // what was looked at is not applied again
        floors.advance(vec![("floors_a".into(), (at(150), 800))]);
        floors.prepare();
        assert_eq!(floors.floor("floors_a"), Some((at(150), 800)));
        // a tie on run_at sorts by id
        rewind_floors_to([("floors_a".to_string(), (at(150), 799))]);
        floors.prepare();
        assert_eq!(floors.floor("floors_a"), Some((at(150), 799)));
    }

    #[test]
    fn a_scan_that_filled_its_quota_stops_at_its_last_candidate_otherwise_at_its_start() {
        let row = ClaimRow {
            id: None,
            provider: None,
            account: None,
            email: None,
            payload: None,
            payload_md5: None,
            attempts: None,
            max_attempts: None,
            created_at_ms: None,
            watermark: None,
            synced_fields: None,
            followers: None,
            set_waiting: 0,
            scanned_at: at(1000),
            scanned_accounts: Some(vec!["full".into(), "short".into(), "none".into()]),
            scanned_last_ats: Some(vec![Some(at(5)), Some(at(6)), None]),
            scanned_last_ids: Some(vec![Some(40), Some(41), None]),
            scanned_founds: Some(vec![3, 2, 0]),
        };
        let quota = |account: &str, limit| AccountQuota {
            account: account.into(),
            limit,
        };
        let ends = scan_ends(
            &row,
            &[
                quota("full", 3),
                quota("short", 3),
                quota("none", 3),
                quota("paused", 3),
            ],
        );
        assert_eq!(
            ends,
            vec![
                ("full".to_string(), (at(5), 40)),
                ("short".to_string(), (at(1000), 0)),
                ("none".to_string(), (at(1000), 0)),
            ]
        );
    }
}
