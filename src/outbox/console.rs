//! The console's statements: its sessions and audit trail, the per-minute activity the workers
//! add, and the reads behind its pages. Every read touches rows bounded by the page, whatever
//! the size of `contact_sync.jobs`: counts stop at [`COUNT_CAP`], a search examines at most
//! [`SEARCH_WINDOW`] ids per step, open and parked jobs are read through their partial
//! indexes, and per-account reads are index probes per account
//! (`plans::console_statements_touch_rows_bounded_by_the_page` pins it).

use super::job::{JobId, JobState};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::time::Duration;

/// Counts stop here: past it, a page says "at least".
pub const COUNT_CAP: i64 = 100_000;
/// The most job ids one search step examines (a page takes up to [`SEARCH_STEPS`] steps).
pub const SEARCH_WINDOW: i64 = 50_000;
/// Steps of [`SEARCH_WINDOW`] ids one page may take to fill itself.
pub const SEARCH_STEPS: usize = 4;
/// A job's coalesced followers are looked for among this many later ids.
pub const FOLLOWER_WINDOW: i64 = 100_000;
/// A contact's delivered changes are looked for among this many newest jobs (its open and
/// parked jobs are always found, through their indexes).
pub const CONTACT_WINDOW: i64 = 200_000;
/// Dead jobs grouped per account (the newest).
pub const DEAD_SAMPLE: i64 = 5_000;
/// A contact's open jobs, and its parked ones, shown per account (the first pending, the
/// newest parked).
pub const CONTACT_ROWS: i64 = 200;

// ---------------------------------------------------------------------------------------------
// Sessions

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub username: String,
    /// `viewer` or `operator`.
    pub role: String,
    pub csrf_token: String,
    /// A digest of the password hash the user signed in with.
    pub credential: String,
}

/// Records a session (and drops expired ones).
pub async fn create_session(
    pool: &PgPool,
    token_sha256: &[u8],
    session: &Session,
    ttl: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM contact_sync.console_sessions WHERE expires_at < now()")
        .persistent(false)
        .execute(pool)
        .await?;
    sqlx::query(
        // language=PostgreSQL
        r#"
        INSERT INTO contact_sync.console_sessions (token_sha256, username, role, csrf_token, credential, expires_at)
        VALUES ($1, $2, $3, $4, $6, now() + make_interval(secs => $5::bigint))
        "#,
    )
    .persistent(false)
    .bind(token_sha256)
    .bind(&session.username)
    .bind(&session.role)
    .bind(&session.csrf_token)
    .bind(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
    .bind(&session.credential)
    .execute(pool)
    .await?;
    Ok(())
}

/// The unexpired session of this token digest.
pub async fn session(pool: &PgPool, token_sha256: &[u8]) -> Result<Option<Session>, sqlx::Error> {
    sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT username, role, csrf_token, credential FROM contact_sync.console_sessions
        WHERE token_sha256 = $1 AND expires_at > now()
        "#,
    )
    .persistent(false)
    .bind(token_sha256)
    .fetch_optional(pool)
    .await
}

/// Ends a session (sign-out).
pub async fn end_session(pool: &PgPool, token_sha256: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM contact_sync.console_sessions WHERE token_sha256 = $1")
        .persistent(false)
        .bind(token_sha256)
        .execute(pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Audit

/// One action taken from the console.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub username: String,
    pub action: String,
    /// The job, account or filter acted on.
    pub target: String,
    /// How many jobs it changed.
    pub jobs: i64,
    pub outcome: String,
}

/// Writes an audit entry.
pub async fn audit(
    pool: &PgPool,
    username: &str,
    action: &str,
    target: &str,
    jobs: i64,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        // language=PostgreSQL
        r#"
        INSERT INTO contact_sync.console_audit (username, action, target, jobs, outcome)
        VALUES ($1, $2, $3, $4, $5)
        "#,
    )
    .persistent(false)
    // (text as it can be stored: no NUL, bounded, whatever a form sent)
    .bind(crate::text::printable(username, 200))
    .bind(crate::text::printable(action, 200))
    .bind(crate::text::printable(target, 2000))
    .bind(jobs)
    .bind(crate::text::printable(outcome, 2000))
    .execute(pool)
    .await?;
    Ok(())
}

/// The newest audit entries below `before` (keyset).
pub async fn audit_page(
    pool: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT id, at, username, action, target, jobs, outcome FROM contact_sync.console_audit
        WHERE id < coalesce($1, 9223372036854775807) ORDER BY id DESC LIMIT $2
        "#,
    )
    .persistent(false)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------------------------------------
// Activity

/// Adds deliveries and failed attempts (per account) to the current minute's row, and drops
/// rows older than a day. Accounts in name order: two workers adding at once never deadlock.
pub async fn add_activity(pool: &PgPool, counts: &[(String, i64, i64)]) -> Result<(), sqlx::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&(String, i64, i64)> = counts.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let accounts: Vec<&str> = sorted.iter().map(|c| c.0.as_str()).collect();
    let delivered: Vec<i64> = sorted.iter().map(|c| c.1).collect();
    let failed: Vec<i64> = sorted.iter().map(|c| c.2).collect();
    sqlx::query(
        // language=PostgreSQL
        r#"
        WITH old AS (
            DELETE FROM contact_sync.activity
            WHERE account = ANY($1) AND minute < date_trunc('minute', now()) - interval '1 day'
        )
        INSERT INTO contact_sync.activity AS a (account, minute, delivered, failed)
        SELECT t.account, date_trunc('minute', now()), t.delivered, t.failed
        FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t(account, delivered, failed)
        ORDER BY t.account
        ON CONFLICT (account, minute) DO UPDATE
            SET delivered = a.delivered + EXCLUDED.delivered, failed = a.failed + EXCLUDED.failed
        "#,
    )
    .persistent(false)
    .bind(&accounts)
    .bind(&delivered)
    .bind(&failed)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deliveries and failed attempts of the last hour, per account, in twelve five-minute buckets
/// (index 0: the oldest).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HourOfActivity {
    pub delivered: [i64; 12],
    pub failed: [i64; 12],
}

impl HourOfActivity {
    pub fn delivered_total(&self) -> i64 {
        self.delivered.iter().sum()
    }
    pub fn failed_total(&self) -> i64 {
        self.failed.iter().sum()
    }
}

/// The last hour of activity of `accounts` (primary-key probes per account: at most 60 rows
/// each).
pub async fn last_hour(
    pool: &PgPool,
    accounts: &[String],
) -> Result<Vec<(String, HourOfActivity)>, sqlx::Error> {
    let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT u.account, 11 - floor(extract(epoch FROM date_trunc('minute', now()) - a.minute) / 300)::int,
               a.delivered, a.failed
        FROM unnest($1::text[]) AS u(account)
        CROSS JOIN LATERAL (
            SELECT a.minute, a.delivered, a.failed FROM contact_sync.activity a
            WHERE a.account = u.account AND a.minute > date_trunc('minute', now()) - interval '60 minutes'
        ) a
        "#,
    )
    .persistent(false)
    .bind(accounts)
    .fetch_all(pool)
    .await?;
    let mut out: Vec<(String, HourOfActivity)> = accounts
        .iter()
        .map(|a| (a.clone(), HourOfActivity::default()))
        .collect();
    for (account, bucket, delivered, failed) in rows {
        let Ok(bucket) = usize::try_from(bucket) else {
            continue;
        };
        if let Some((_, hour)) = out.iter_mut().find(|(a, _)| *a == account) {
            if bucket < 12 {
                hour.delivered[bucket] += delivered;
                hour.failed[bucket] += failed;
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Overview

/// A count that stopped at [`COUNT_CAP`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Capped {
    pub n: i64,
    /// There are more than `n`.
    pub more: bool,
}

impl Capped {
    fn of(n: i64) -> Capped {
        Capped {
            n: n.min(COUNT_CAP),
            more: n > COUNT_CAP,
        }
    }
}

impl std::fmt::Display for Capped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.more {
            write!(f, "{}+", self.n)
        } else {
            write!(f, "{}", self.n)
        }
    }
}

/// An account's queue, as the overview shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueCounts {
    /// Changes due now and not waiting behind another change of their contact (a contact's
    /// later changes are counted once a claim has found them behind it).
    pub due: Capped,
    /// Changes scheduled later (a retry, a future `run_at`), not waiting behind another.
    pub scheduled: Capped,
    pub dead: Capped,
    /// How long the oldest due change has waited, in seconds.
    pub oldest_due_s: Option<f64>,
}

/// The queue counts of one account: changes waiting (the claim's own index, due and
/// scheduled), dead jobs (the dead index), each stopping at [`COUNT_CAP`].
pub async fn queue_counts(pool: &PgPool, account: &str) -> Result<QueueCounts, sqlx::Error> {
    let (due, scheduled, dead, oldest): (i64, i64, i64, Option<f64>) = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT (SELECT count(*) FROM (SELECT 1 FROM contact_sync.jobs c
                WHERE c.account = $1 AND c.state = 'pending' AND c.waits_for IS NULL AND c.run_at <= now()
                LIMIT $2) c),
               (SELECT count(*) FROM (SELECT 1 FROM contact_sync.jobs c
                WHERE c.account = $1 AND c.state = 'pending' AND c.waits_for IS NULL AND c.run_at > now()
                LIMIT $2) c),
               (SELECT count(*) FROM (SELECT 1 FROM contact_sync.jobs d
                WHERE d.state = 'dead' AND d.account = $1 LIMIT $2) d),
               (SELECT extract(epoch FROM now() - c.run_at)::float8 FROM contact_sync.jobs c
                WHERE c.account = $1 AND c.state = 'pending' AND c.waits_for IS NULL AND c.run_at <= now()
                ORDER BY c.run_at LIMIT 1)
        "#,
    )
    .persistent(false)
    .bind(account)
    .bind(COUNT_CAP + 1)
    .fetch_one(pool)
    .await?;
    Ok(QueueCounts {
        due: Capped::of(due),
        scheduled: Capped::of(scheduled),
        dead: Capped::of(dead),
        oldest_due_s: oldest,
    })
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// What the jobs page filters on (every field optional).
#[derive(Debug, Clone, Default)]
pub struct Search {
    pub state: Option<JobState>,
    pub account: Option<String>,
    pub provider: Option<String>,
    pub email: Option<String>,
    /// A text the last error contains (any case).
    pub error_like: Option<String>,
    /// The last error, exactly (`""`: none).
    pub error_is: Option<String>,
    /// The provider code of the last attempt, exactly (`""`: none).
    pub error_code: Option<String>,
    /// A payload field (path split at dots) and the text its value equals.
    pub payload_field: Option<(Vec<String>, String)>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    /// Ids below this one (the next page).
    pub before: Option<JobId>,
    pub limit: i64,
}

/// A page of search results.
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    pub jobs: Vec<super::inspect::JobSummary>,
    /// Where the next page starts (ids below it), if older jobs exist.
    pub next_before: Option<JobId>,
    /// The ids examined: from `examined.0` (lowest) up to below `examined.1`.
    pub examined: (JobId, JobId),
}

const SEARCH_SQL: &str = r#"
    SELECT j.id, j.provider, j.account, j.email, j.state, j.attempts, j.run_at, j.created_at,
           j.last_error, j.outcome
    FROM contact_sync.jobs j
    WHERE j.id < $1 AND j.id >= $2
      AND ($3::text IS NULL OR j.state = $3)
      AND ($4::text IS NULL OR j.account = $4)
      AND ($5::text IS NULL OR j.provider = $5)
      AND ($6::text IS NULL OR lower(j.email) = lower($6))
      AND ($7::text IS NULL OR strpos(lower(coalesce(j.last_error, '')), lower($7)) > 0)
      AND ($8::text[] IS NULL OR j.payload #>> $8 = $9)
      AND ($10::timestamptz IS NULL OR j.created_at >= $10)
      AND ($11::timestamptz IS NULL OR j.created_at < $11)
      AND ($13::text IS NULL OR coalesce(j.last_error, '') = $13)
      AND ($14::text IS NULL OR coalesce(j.errors -> -1 ->> 'code', '') = $14)
    ORDER BY j.id DESC LIMIT $12"#;

/// The newest jobs matching `search` below `search.before`: steps of [`SEARCH_WINDOW`] ids
/// (primary-key ranges), at most [`SEARCH_STEPS`] of them, until the page is full.
pub async fn search(pool: &PgPool, search: &Search) -> Result<SearchPage, sqlx::Error> {
    let limit = search.limit.clamp(1, 500);
    let top: JobId = match search.before {
        Some(before) => before,
        None => {
            let max: Option<JobId> = sqlx::query_scalar("SELECT max(id) FROM contact_sync.jobs")
                .persistent(false)
                .fetch_one(pool)
                .await?;
            max.map_or(0, |m| m.saturating_add(1))
        }
    };
    let mut page = SearchPage {
        examined: (top, top),
        ..SearchPage::default()
    };
    let mut upper = top;
    for _ in 0..SEARCH_STEPS {
        if upper <= 1 {
            break;
        }
        let lower = upper.saturating_sub(SEARCH_WINDOW).max(0);
        let want = limit - i64::try_from(page.jobs.len()).unwrap_or(limit);
        let found: Vec<super::inspect::JobSummary> = sqlx::query_as(SEARCH_SQL)
            .persistent(false)
            .bind(upper)
            .bind(lower)
            .bind(search.state)
            .bind(&search.account)
            .bind(&search.provider)
            .bind(&search.email)
            .bind(&search.error_like)
            .bind(search.payload_field.as_ref().map(|(path, _)| path))
            .bind(search.payload_field.as_ref().map(|(_, value)| value))
            .bind(search.created_from)
            .bind(search.created_to)
            .bind(want)
            .bind(&search.error_is)
            .bind(&search.error_code)
            .fetch_all(pool)
            .await?;
        let full = i64::try_from(found.len()).unwrap_or(0) >= want;
        page.jobs.extend(found);
        if full {
            let last = page.jobs.last().map_or(lower, |j| j.id);
            page.examined.0 = last;
            upper = last;
            break;
        }
        page.examined.0 = lower;
        upper = lower;
    }
    let older: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM contact_sync.jobs WHERE id < $1)")
            .persistent(false)
            .bind(upper)
            .fetch_one(pool)
            .await?;
    page.next_before = older.then_some(upper);
    Ok(page)
}

/// The highest job id now (0 when there is none).
pub async fn newest_job(pool: &PgPool) -> Result<JobId, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM contact_sync.jobs")
        .persistent(false)
        .fetch_one(pool)
        .await
}

/// A coalesced follower of a job.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Follower {
    pub id: JobId,
    pub payload: super::inspect::StoredJson,
    pub created_at: DateTime<Utc>,
}

/// Most followers a job page lists.
pub const FOLLOWERS_LISTED: i64 = 1_000;

/// The followers of a job, as its page shows them.
#[derive(Debug, Clone, Default)]
pub struct Followers {
    /// The first [`FOLLOWERS_LISTED`], in order.
    pub listed: Vec<Follower>,
    /// All of them.
    pub count: i64,
    /// The fields the call carried: the payloads of the job and of every follower merged in
    /// order (later values win).
    pub call: Option<super::inspect::StoredJson>,
}

/// The jobs whose change rode along with `id`'s call (among the next [`FOLLOWER_WINDOW`] ids).
pub async fn followers(pool: &PgPool, id: JobId) -> Result<Followers, sqlx::Error> {
    let listed: Vec<Follower> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT f.id, f.payload, f.created_at FROM contact_sync.jobs f
        WHERE f.id > $1 AND f.id <= $1 + $2 AND f.coalesced_into = $1
        ORDER BY f.id LIMIT $3
        "#,
    )
    .persistent(false)
    .bind(id)
    .bind(FOLLOWER_WINDOW)
    .bind(FOLLOWERS_LISTED)
    .fetch_all(pool)
    .await?;
    let (count, call): (i64, Option<super::inspect::StoredJson>) = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT count(f.id),
               contact_sync.merge_all(ARRAY(SELECT j.payload FROM contact_sync.jobs j WHERE j.id = $1)
                                      || coalesce(array_agg(f.payload ORDER BY f.id) FILTER (WHERE f.id IS NOT NULL), '{}'))
        FROM contact_sync.jobs f
        WHERE f.id > $1 AND f.id <= $1 + $2 AND f.coalesced_into = $1
        "#,
    )
    .persistent(false)
    .bind(id)
    .bind(FOLLOWER_WINDOW)
    .fetch_one(pool)
    .await?;
    Ok(Followers {
        listed,
        count,
        call,
    })
}

// ---------------------------------------------------------------------------------------------
// Contacts

/// One change of a contact, at one account.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ContactChange {
    pub id: JobId,
    pub provider: String,
    pub account: String,
    pub email: String,
    pub state: JobState,
    pub payload: super::inspect::StoredJson,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub coalesced_into: Option<JobId>,
    pub last_error: Option<String>,
    pub outcome: Option<String>,
}

/// What one account was last sent for a contact (the synced state of a captured account).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SyncedFields {
    pub contact_key: String,
    pub fields: super::inspect::StoredJson,
    pub job_id: JobId,
    pub synced_at: DateTime<Utc>,
}

/// Everything known of one address, across accounts.
#[derive(Debug, Clone, Default)]
pub struct ContactHistory {
    /// In id order: the open and parked jobs (all of them), and the delivered ones among the
    /// newest [`CONTACT_WINDOW`] jobs.
    pub changes: Vec<ContactChange>,
    pub synced: Vec<SyncedFields>,
    /// Accounts with more open or parked jobs for the address than [`CONTACT_ROWS`] each.
    pub truncated: Vec<String>,
    /// The address's contact key at each account, in the order asked.
    pub keys: Vec<String>,
}

/// The changes of `email` at every registered account (`accounts`: (account, provider)).
pub async fn contact(
    pool: &PgPool,
    email: &str,
    accounts: &[(String, String)],
) -> Result<ContactHistory, sqlx::Error> {
    // the keys as the jobs' generated column computes them (SQL's lower(), which is not Rust's
    // for every character in every database)
    let names: Vec<&str> = accounts.iter().map(|(a, _)| a.as_str()).collect();
    let providers: Vec<&str> = accounts.iter().map(|(_, p)| p.as_str()).collect();
    let keys: Vec<String> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT coalesce(array_agg(u.p || ':' || u.a || ':' || lower($3) ORDER BY u.n), '{}')
        FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(a, p, n)
        "#,
    )
    .persistent(false)
    .bind(&names)
    .bind(&providers)
    .bind(email)
    .fetch_one(pool)
    .await?;
    let changes: Vec<ContactChange> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        WITH k AS (SELECT unnest($1::text[]) AS key), open AS (
            SELECT j.* FROM k CROSS JOIN LATERAL (
                (SELECT j.id FROM contact_sync.jobs j WHERE j.contact_key = k.key AND j.state = 'pending'
                 ORDER BY j.id LIMIT $3)
                UNION ALL
                (SELECT j.id FROM contact_sync.jobs j WHERE j.contact_key = k.key AND j.state IN ('dead', 'cancelled')
                 ORDER BY j.id DESC LIMIT $3)
                UNION ALL
                SELECT j.id FROM contact_sync.jobs j WHERE j.contact_key = k.key AND j.state = 'running') j
        ), recent AS (
            -- the newest $2 jobs, read backwards along the primary key (a range the planner
            -- could read with a scan of the whole table when it is most of it)
            SELECT r.id FROM (SELECT j.id, j.contact_key, j.state FROM contact_sync.jobs j
                              ORDER BY j.id DESC LIMIT $2) r
            WHERE r.contact_key = ANY($1) AND r.state IN ('succeeded', 'coalesced')
        )
        SELECT j.id, j.provider, j.account, j.email, j.state, j.payload, j.attempts, j.created_at,
               j.finished_at, j.coalesced_into, j.last_error, j.outcome
        FROM contact_sync.jobs j
        WHERE j.id = ANY(ARRAY(SELECT id FROM open UNION SELECT id FROM recent))
        ORDER BY j.id
        "#,
    )
    .persistent(false)
    .bind(&keys)
    .bind(CONTACT_WINDOW)
    .bind(CONTACT_ROWS + 1)
    .fetch_all(pool)
    .await?;
    // more than CONTACT_ROWS pending, or parked, jobs at an account: the page says so
    let mut truncated = Vec::new();
    let mut changes = changes;
    for (account, _) in accounts {
        for parked in [false, true] {
            let of = |c: &ContactChange| {
                &c.account == account
                    && matches!(c.state, JobState::Dead | JobState::Cancelled) == parked
                    && (parked || c.state == JobState::Pending)
            };
            let n = changes.iter().filter(|c| of(c)).count();
            if i64::try_from(n).unwrap_or(i64::MAX) > CONTACT_ROWS {
                if !truncated.contains(account) {
                    truncated.push(account.clone());
                }
                // drop the one past the cap: the last pending, or the oldest parked
                let drop_id = if parked {
                    changes.iter().filter(|c| of(c)).map(|c| c.id).min()
                } else {
                    changes.iter().filter(|c| of(c)).map(|c| c.id).max()
                };
                changes.retain(|c| Some(c.id) != drop_id);
            }
        }
    }
    let synced: Vec<SyncedFields> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT contact_key, fields, job_id, synced_at FROM contact_sync.synced
        WHERE contact_key = ANY($1) ORDER BY contact_key
        "#,
    )
    .persistent(false)
    .bind(&keys)
    .fetch_all(pool)
    .await?;
    Ok(ContactHistory {
        changes,
        synced,
        truncated,
        keys,
    })
}

// ---------------------------------------------------------------------------------------------
// Dead letters

/// Dead jobs of one account that failed the same way.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadGroup {
    pub account: String,
    /// The provider's code of the last attempt (empty when there was none).
    pub code: String,
    /// The last error, as recorded.
    pub error: String,
    pub jobs: i64,
    pub newest_id: JobId,
    pub newest_at: Option<DateTime<Utc>>,
}

/// Dead jobs grouped by account, code and last error, among the newest [`DEAD_SAMPLE`] of each
/// account (the dead index, newest first); also says which accounts have more.
pub async fn dead_groups(
    pool: &PgPool,
    accounts: &[String],
) -> Result<(Vec<DeadGroup>, Vec<String>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // the newest dead jobs of an account, read backwards along the dead index: the planner,
    // which cannot know how many jobs are dead, would otherwise read them all and sort them
    sqlx::query("SET LOCAL enable_bitmapscan = off")
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    let groups: Vec<DeadGroup> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT u.account, coalesce(d.errors -> -1 ->> 'code', '') AS code, coalesce(d.last_error, '') AS error,
               count(*) AS jobs, max(d.id) AS newest_id, max(d.finished_at) AS newest_at
        FROM unnest($1::text[]) AS u(account)
        CROSS JOIN LATERAL (
            SELECT j.id, j.errors, j.last_error, j.finished_at FROM contact_sync.jobs j
            WHERE j.state = 'dead' AND j.account = u.account ORDER BY j.id DESC LIMIT $2) d
        GROUP BY 1, 2, 3 ORDER BY count(*) DESC, max(d.id) DESC
        "#,
    )
    .persistent(false)
    .bind(accounts)
    .bind(DEAD_SAMPLE)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut sampled: Vec<String> = Vec::new();
    for account in accounts {
        let n: i64 = groups
            .iter()
            .filter(|g| &g.account == account)
            .map(|g| g.jobs)
            .sum();
        if n >= DEAD_SAMPLE {
            sampled.push(account.clone());
        }
    }
    Ok((groups, sampled))
}
