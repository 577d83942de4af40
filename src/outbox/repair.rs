//! Operator writes: `retry`, `cancel` (one job, or every job matching a filter) and `purge`.
//! Each keeps the queue's order rules, takes the pending jobs of the contacts it changes first
//! (the rows a claim takes), waits a bounded time for those another transaction holds, and
//! reports the contacts it skipped rather than blocking the worker.

use super::is_lock_timeout;
use super::job::{JobId, JobState};
use serde::Serialize;
use sqlx::PgPool;

/// What an operator action did to one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionResult {
    Done,
    NotFound,
    /// The job is in a state the action does not apply to (the state is returned).
    WrongState,
    /// Retrying would re-send an old change after a newer change of the same contact was
    /// delivered (or is in flight): refused unless forced (the newer job's id is returned).
    Stale,
    /// The job's contact is held by another transaction (an application's, still open, that
    /// records a change of it; an operator's): nothing done after waiting
    /// [`OPERATOR_LOCK_WAIT`]; try again once it has committed.
    Busy,
}

/// What an action found besides its result: the job's state (after the action, or the state
/// the action does not apply to), or the newer change that makes a retry stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    State(JobState),
    Newer(JobId),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::State(state) => write!(f, "{state}"),
            Found::Newer(id) => write!(f, "{id}"),
        }
    }
}

/// The longest an operator command waits for a contact another transaction holds, before it
/// leaves that contact alone and says so.
pub const OPERATOR_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A transaction whose statements wait at most `wait` for a row lock.
async fn bounded_tx(
    pool: &PgPool,
    wait: std::time::Duration,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .persistent(false)
        .bind(format!("{}ms", wait.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The job's current state, if it exists.
async fn state_of(pool: &PgPool, id: JobId) -> Result<Option<JobState>, sqlx::Error> {
    sqlx::query_scalar("SELECT state FROM contact_sync.jobs WHERE id = $1")
        .persistent(false)
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A newer change of the same contact that was delivered or is being delivered (or was
/// delivered and has been pruned since: `overtaken_by`): retrying an older change after it
/// would overwrite the newer value at the provider. (`contact_sync.jobs` with its child
/// `jobs_delivered`: read backwards along their primary keys, down to this job at most.)
const NEWER_DELIVERED: &str = r#"
    coalesce((SELECT n.id FROM contact_sync.jobs n
              WHERE n.contact_key = j.contact_key AND n.id > j.id
                AND n.state IN ('succeeded', 'coalesced', 'running')
              ORDER BY n.id DESC LIMIT 1), j.overtaken_by)"#;

/// A `dead` or `cancelled` job back to `pending` with a fresh set of attempts (its error
/// history is kept), at its scheduled time if that is still ahead, else now. Refused
/// ([`ActionResult::Stale`], with the newer job's id) when a newer change of the same contact
/// was already delivered or is in flight, unless `force`.
///
/// The contact's pending jobs are taken first (as a claim takes them), then the check and the update
/// run in one statement: no claim of a newer change can come between them. A contact another
/// transaction holds is waited for at most [`OPERATOR_LOCK_WAIT`] ([`ActionResult::Busy`]).
pub async fn retry(
    pool: &PgPool,
    id: JobId,
    force: bool,
) -> Result<(ActionResult, Option<Found>), sqlx::Error> {
    match retry_held(pool, id, force).await {
        Err(e) if is_lock_timeout(&e) => Ok((ActionResult::Busy, None)),
        other => other,
    }
}

async fn retry_held(
    pool: &PgPool,
    id: JobId,
    force: bool,
) -> Result<(ActionResult, Option<Found>), sqlx::Error> {
    let mut tx = bounded_tx(pool, OPERATOR_LOCK_WAIT).await?;
    sqlx::query(
        // language=PostgreSQL
        r#"
        SELECT c.id FROM ONLY contact_sync.jobs c
        WHERE c.contact_key = (SELECT j.contact_key FROM ONLY contact_sync.jobs j WHERE j.id = $1)
          AND c.state = 'pending'
        ORDER BY c.id
        FOR NO KEY UPDATE
        "#,
    )
    .persistent(false)
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let (newer, done): (Option<JobId>, bool) = sqlx::query_as(&format!(
        r#"
        WITH target AS (
            SELECT j.id, {NEWER_DELIVERED} AS newer
            FROM ONLY contact_sync.jobs j WHERE j.id = $1 AND j.state IN ('dead', 'cancelled')
        ), done AS (
            UPDATE ONLY contact_sync.jobs j
            SET state = 'pending', attempts = 0, run_at = greatest(j.run_at, now()), finished_at = NULL, waits_for = NULL,
                locked_until = NULL, locked_by = NULL
            FROM target t
            WHERE j.id = t.id AND j.state IN ('dead', 'cancelled') AND ($2 OR t.newer IS NULL)
            RETURNING j.id
        )
        SELECT (SELECT newer FROM target), EXISTS (SELECT 1 FROM done)
        "#
    ))
    .persistent(false)
    .bind(id)
    .bind(force)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if done {
        notify(pool).await?;
        return Ok((ActionResult::Done, Some(Found::State(JobState::Pending))));
    }
    if let (Some(newer), false) = (newer, force) {
        return Ok((ActionResult::Stale, Some(Found::Newer(newer))));
    }
    Ok(match state_of(pool, id).await? {
        None => (ActionResult::NotFound, None),
        Some(s) => (ActionResult::WrongState, Some(Found::State(s))),
    })
}

/// What a bulk retry did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BulkRetry {
    pub retried: u64,
    /// Left dead: a newer change of the same contact was already delivered (or is in flight).
    pub skipped_stale: u64,
    /// Contacts left alone because another transaction held them (see [`OPERATOR_LOCK_WAIT`]):
    /// their jobs are as they were; run the command again once that transaction has ended.
    pub skipped_busy: Vec<String>,
}

/// Every `dead` job (of one account) back to `pending`, except those a newer delivered change
/// of the same contact made stale (unless `force`).
pub async fn retry_dead(
    pool: &PgPool,
    account: Option<&str>,
    force: bool,
) -> Result<BulkRetry, sqlx::Error> {
    let filter = JobFilter {
        account: account.map(String::from),
        ..JobFilter::new(JobState::Dead)
    };
    retry_matching(pool, &filter, force, false).await
}

/// Which jobs a bulk `retry` or `cancel` acts on: one state, and optionally an account, an
/// address (any case), a text the last error contains (any case), and the console's further
/// filters (provider, exact last error, a payload field's value, creation time, chosen ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFilter {
    pub state: JobState,
    pub account: Option<String>,
    pub email: Option<String>,
    pub error_like: Option<String>,
    pub provider: Option<String>,
    /// The last error, exactly (a dead-letter group; `""` matches no error).
    pub error_is: Option<String>,
    /// The provider code of the last attempt, exactly (`""`: none).
    pub error_code: Option<String>,
    /// Only jobs up to this id (what a confirmed count covered).
    pub max_id: Option<JobId>,
    /// A payload field (`lead_city`, `attributes.plan`: the path split at dots) and the text
    /// its value must equal.
    pub payload_field: Option<(Vec<String>, String)>,
    /// Created at or after.
    pub created_from: Option<chrono::DateTime<chrono::Utc>>,
    /// Created before.
    pub created_to: Option<chrono::DateTime<chrono::Utc>>,
    /// Only these jobs (a selection).
    pub ids: Option<Vec<JobId>>,
}

impl JobFilter {
    /// Every job in `state`.
    pub fn new(state: JobState) -> JobFilter {
        JobFilter {
            state,
            account: None,
            email: None,
            error_like: None,
            provider: None,
            error_is: None,
            error_code: None,
            max_id: None,
            payload_field: None,
            created_from: None,
            created_to: None,
            ids: None,
        }
    }
}

/// The filter as SQL over `contact_sync.jobs j`, binding $1..$4, $8..$16, and `$7`: only
/// these contacts (all when NULL).
const FILTER_SQL: &str = r#"
    j.state = $1 AND ($2::text IS NULL OR j.account = $2)
    AND ($3::text IS NULL OR lower(j.email) = lower($3))
    AND ($4::text IS NULL OR strpos(lower(coalesce(j.last_error, '')), lower($4)) > 0)
    AND ($7::text[] IS NULL OR j.contact_key = ANY($7))
    AND ($8::text IS NULL OR j.provider = $8)
    AND ($9::text IS NULL OR coalesce(j.last_error, '') = $9)
    AND ($10::text[] IS NULL OR j.payload #>> $10 = $11)
    AND ($12::timestamptz IS NULL OR j.created_at >= $12)
    AND ($13::timestamptz IS NULL OR j.created_at < $13)
    AND ($14::bigint[] IS NULL OR j.id = ANY($14))
    AND ($15::text IS NULL OR coalesce(j.errors -> -1 ->> 'code', '') = $15)
    AND ($16::bigint IS NULL OR j.id <= $16)"#;

/// Takes the pending jobs of the contacts of the jobs matching the filter, in key order, as a
/// claim takes them (the first statement of a bulk action: the next one sees every claim made
/// before).
const HOLD_CONTACTS_SQL: &str = r#"
    SELECT c.id FROM ONLY contact_sync.jobs c
    WHERE c.state = 'pending'
      AND c.contact_key IN (SELECT j.contact_key FROM ONLY contact_sync.jobs j WHERE {FILTER})
    ORDER BY c.contact_key, c.id
    FOR NO KEY UPDATE OF c"#;

/// The longest a bulk action goes on looking for the contacts another transaction holds, one
/// group at a time, before it leaves the rest alone.
const BULK_BUSY_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// The most contacts a bulk action takes in one transaction: a stop midway leaves the chunks
/// done as done, and the locks one transaction holds stay bounded.
const BULK_CHUNK: usize = 10_000;

/// The wait for one group of contacts while looking for the held ones.
const BULK_GROUP_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A bulk operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Retry { force: bool },
    Cancel,
}

impl Bulk {
    /// The states the action takes jobs from.
    fn states_taken(self) -> &'static [JobState] {
        match self {
            Bulk::Retry { .. } => &[JobState::Dead, JobState::Cancelled],
            Bulk::Cancel => &[JobState::Pending, JobState::Dead],
        }
    }

    fn statement(self) -> String {
        match self {
            Bulk::Retry { .. } => format!(
                r#"
        WITH matched AS (
            SELECT j.id, j.contact_key, j.overtaken_by FROM ONLY contact_sync.jobs j
            WHERE j.state IN ('dead', 'cancelled') AND {FILTER_SQL}
        ), newest AS (
            -- the newest delivered or running change of each matched contact, in one pass
            -- (not a probe per job: finished rows have no index by contact; `jobs_delivered`
            -- included)
            SELECT n.contact_key, max(n.id) AS id FROM contact_sync.jobs n
            WHERE n.state IN ('succeeded', 'coalesced', 'running')
              AND n.contact_key IN (SELECT contact_key FROM matched)
            GROUP BY n.contact_key
        ), candidates AS (
            SELECT m.id, coalesce(greatest(w.id, m.overtaken_by) > m.id, false) AS stale
            FROM matched m LEFT JOIN newest w ON w.contact_key = m.contact_key
        ), done AS (
            UPDATE ONLY contact_sync.jobs j
            SET state = 'pending', attempts = 0, run_at = greatest(j.run_at, now()), finished_at = NULL, waits_for = NULL,
                locked_until = NULL, locked_by = NULL
            FROM candidates c
            WHERE j.id = c.id AND j.state = $1 AND ($5 OR NOT c.stale) AND NOT $6
            RETURNING j.id
        )
        SELECT CASE WHEN $6 THEN (SELECT count(*) FROM candidates WHERE $5 OR NOT stale)
                    ELSE (SELECT count(*) FROM done) END,
               (SELECT count(*) FROM candidates WHERE stale AND NOT $5)
        "#
            ),
            Bulk::Cancel => format!(
                r#"
        WITH targets AS (
            SELECT j.id, j.contact_key FROM ONLY contact_sync.jobs j
            WHERE j.state IN ('pending', 'dead') AND {FILTER_SQL}
        ), done AS (
            UPDATE ONLY contact_sync.jobs j SET state = 'cancelled', finished_at = now(), waits_for = NULL
            FROM targets t
            WHERE j.id = t.id AND j.state = $1 AND NOT $6
            RETURNING j.id
        )
        SELECT CASE WHEN $6 THEN (SELECT count(*) FROM targets) ELSE (SELECT count(*) FROM done) END,
               0::bigint
        "#
            ),
        }
    }

    /// Runs the action once on `conn` (restricted to `keys`, when given); with `hold`, the
    /// the contacts' pending jobs are taken first, in a statement of their own, so that the action
    /// sees every claim made before. Returns (done, left stale).
    async fn run(
        self,
        conn: &mut sqlx::PgConnection,
        filter: &JobFilter,
        dry_run: bool,
        keys: Option<Vec<String>>,
        hold: bool,
    ) -> Result<(i64, i64), sqlx::Error> {
        let force = matches!(self, Bulk::Retry { force: true });
        if hold {
            let sql = HOLD_CONTACTS_SQL.replace("{FILTER}", FILTER_SQL);
            bind_filter(sqlx::query(&sql), filter, force, dry_run, keys.clone())
                .fetch_all(&mut *conn)
                .await?;
        }
        let sql = self.statement();
        let row = bind_filter(sqlx::query(&sql), filter, force, dry_run, keys)
            .fetch_one(&mut *conn)
            .await?;
        Ok((
            sqlx::Row::try_get::<i64, _>(&row, 0)?,
            sqlx::Row::try_get::<i64, _>(&row, 1)?,
        ))
    }

    /// After a cancel: the contacts whose first pending job it cancelled have their next one
    /// brought back at once (`claim::requeue_next_of`; failing that, the workers' sweep does).
    async fn requeue(self, pool: &PgPool, contact_keys: &[String]) {
        if self != Bulk::Cancel {
            return;
        }
        let requeued = async {
            let mut conn = pool.acquire().await?;
            super::claim::requeue_next_of(&mut conn, contact_keys).await
        }
        .await;
        if let Err(e) = requeued {
            tracing::debug!(error = %e, "could not bring back the contacts' next jobs; the sweep will");
        }
    }

    /// Runs the action on every job matching the filter: all at once when at most
    /// [`BULK_CHUNK`] contacts match, otherwise [`BULK_CHUNK`] contacts per transaction, in key
    /// order; each waits at most [`OPERATOR_LOCK_WAIT`] for contacts other transactions hold.
    /// If one is held, goes on by halves of those contacts (each waiting [`BULK_GROUP_WAIT`]),
    /// down to single contacts, which are left alone and returned, sorted. With `dry_run`, only
    /// counts.
    async fn apply(
        self,
        pool: &PgPool,
        filter: &JobFilter,
        dry_run: bool,
    ) -> Result<((i64, i64), Vec<String>), sqlx::Error> {
        if dry_run {
            let mut conn = pool.acquire().await?;
            return Ok((
                self.run(&mut conn, filter, true, None, false).await?,
                Vec::new(),
            ));
        }
        let sql = format!(
            r#"SELECT DISTINCT j.contact_key FROM ONLY contact_sync.jobs j
               WHERE j.state = ANY($17) AND {FILTER_SQL} ORDER BY 1"#
        );
        let keys: Vec<String> = bind_filter(sqlx::query(&sql), filter, false, false, None)
            .bind(self.states_taken())
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| sqlx::Row::try_get::<String, _>(row, 0))
            .collect::<Result<_, _>>()?;
        if keys.len() <= BULK_CHUNK {
            let once = async {
                let mut tx = bounded_tx(pool, OPERATOR_LOCK_WAIT).await?;
                let r = self.run(&mut tx, filter, false, None, true).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(r)
            }
            .await;
            match once {
                Ok(r) => {
                    self.requeue(pool, &keys).await;
                    return Ok((r, Vec::new()));
                }
                Err(e) if is_lock_timeout(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // Contacts whose pending jobs another transaction holds are found at once (a probe that
        // skips them, rolled back); the halving below is left to find only the ones held
        // otherwise (a producer's first change of an idle contact, not committed yet).
        let mut busy: Vec<String> = {
            let mut probe = pool.begin().await?;
            let held: Vec<String> = sqlx::query_scalar(
                // language=PostgreSQL
                r#"
                WITH free AS (
                    SELECT l.id FROM ONLY contact_sync.jobs l
                    WHERE l.contact_key = ANY($1) AND l.state = 'pending'
                    FOR NO KEY UPDATE SKIP LOCKED)
                -- an anti-join, not NOT IN: hashed or merged at any size
                SELECT DISTINCT c.contact_key FROM ONLY contact_sync.jobs c
                WHERE c.contact_key = ANY($1) AND c.state = 'pending'
                  AND NOT EXISTS (SELECT 1 FROM free f WHERE f.id = c.id)
                "#,
            )
            .persistent(false)
            .bind(&keys)
            .fetch_all(&mut *probe)
            .await?;
            probe.rollback().await?;
            held
        };
        let held: std::collections::HashSet<&String> = busy.iter().collect();
        let keys: Vec<String> = keys.iter().filter(|k| !held.contains(k)).cloned().collect();
        let deadline = std::time::Instant::now() + BULK_BUSY_BUDGET;
        // (contacts, split after a lock timeout), in key order
        let mut groups: Vec<(Vec<String>, bool)> = keys
            .chunks(BULK_CHUNK)
            .rev()
            .map(|chunk| (chunk.to_vec(), false))
            .collect();
        let mut total = (0, 0);
        while let Some((group, split)) = groups.pop() {
            if group.is_empty() {
                continue;
            }
            if split && std::time::Instant::now() >= deadline {
                busy.extend(group);
                continue;
            }
            let attempt = async {
                let mut tx = bounded_tx(pool, BULK_GROUP_WAIT).await?;
                let r = self
                    .run(&mut tx, filter, false, Some(group.clone()), true)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(r)
            }
            .await;
            match attempt {
                Ok((done, stale)) => {
                    self.requeue(pool, &group).await;
                    total.0 += done;
                    total.1 += stale;
                }
                Err(e) if is_lock_timeout(&e) => {
                    if group.len() == 1 {
                        busy.extend(group);
                    } else {
                        let mut first = group;
                        let second = first.split_off(first.len() / 2);
                        groups.push((second, true));
                        groups.push((first, true));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        busy.sort();
        Ok((total, busy))
    }
}

/// Every `dead` or `cancelled` job matching `filter` back to `pending` (see [`retry`]), except
/// those a newer delivered change of the same contact made stale (unless `force`). With
/// `dry_run`, only counts what it would do. Contacts other transactions hold are left alone
/// and listed ([`BulkRetry::skipped_busy`]).
pub async fn retry_matching(
    pool: &PgPool,
    filter: &JobFilter,
    force: bool,
    dry_run: bool,
) -> Result<BulkRetry, sqlx::Error> {
    let ((retried, skipped), busy) = Bulk::Retry { force }.apply(pool, filter, dry_run).await?;
    if retried > 0 && !dry_run {
        notify(pool).await?;
    }
    Ok(BulkRetry {
        retried: u64::try_from(retried).unwrap_or(0),
        skipped_stale: u64::try_from(skipped).unwrap_or(0),
        skipped_busy: busy,
    })
}

/// Binds the filter's `$1..$16` to a statement built on [`FILTER_SQL`].
fn bind_filter<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    filter: &'q JobFilter,
    force: bool,
    dry_run: bool,
    keys: Option<Vec<String>>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.persistent(false)
        .bind(filter.state)
        .bind(&filter.account)
        .bind(&filter.email)
        .bind(&filter.error_like)
        .bind(force)
        .bind(dry_run)
        .bind(keys)
        .bind(&filter.provider)
        .bind(&filter.error_is)
        .bind(filter.payload_field.as_ref().map(|(path, _)| path))
        .bind(filter.payload_field.as_ref().map(|(_, value)| value))
        .bind(filter.created_from)
        .bind(filter.created_to)
        .bind(&filter.ids)
        .bind(&filter.error_code)
        .bind(filter.max_id)
}

/// What a bulk cancel did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BulkCancel {
    pub cancelled: u64,
    /// Contacts left alone because another transaction held them (see [`BulkRetry`]).
    pub skipped_busy: Vec<String>,
}

/// Every `pending` or `dead` job matching `filter` to `cancelled`; returns how many (with
/// `dry_run`, how many it would). The contacts' pending jobs are taken first, in key order, as a
/// claim takes them; contacts other transactions hold are left alone and listed.
pub async fn cancel_matching(
    pool: &PgPool,
    filter: &JobFilter,
    dry_run: bool,
) -> Result<BulkCancel, sqlx::Error> {
    let ((cancelled, _), busy) = Bulk::Cancel.apply(pool, filter, dry_run).await?;
    Ok(BulkCancel {
        cancelled: u64::try_from(cancelled).unwrap_or(0),
        skipped_busy: busy,
    })
}

/// A `pending` or `dead` job to `cancelled` (a `running` one must finish or be released
/// first). A contact another transaction holds is waited for at most [`OPERATOR_LOCK_WAIT`]
/// ([`ActionResult::Busy`]).
pub async fn cancel(
    pool: &PgPool,
    id: JobId,
) -> Result<(ActionResult, Option<Found>), sqlx::Error> {
    let done = async {
        let mut tx = bounded_tx(pool, OPERATOR_LOCK_WAIT).await?;
        let done = sqlx::query(
            // language=PostgreSQL
            r#"
            -- the contact's pending jobs first, in id order, as the other operator actions
            -- take them (its contact's next job is brought back after the commit)
            WITH held AS (
                SELECT c.id FROM ONLY contact_sync.jobs c
                WHERE c.contact_key = (SELECT j.contact_key FROM ONLY contact_sync.jobs j WHERE j.id = $1)
                  AND c.state = 'pending'
                ORDER BY c.id
                FOR NO KEY UPDATE
            )
            UPDATE ONLY contact_sync.jobs SET state = 'cancelled', finished_at = now(), waits_for = NULL
            WHERE id = $1 AND state IN ('pending', 'dead') AND (SELECT count(*) FROM held) >= 0
            "#,
        )
        .persistent(false)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(done.rows_affected())
    }
    .await;
    let done = match done {
        Err(e) if is_lock_timeout(&e) => return Ok((ActionResult::Busy, None)),
        other => other?,
    };
    if done == 1 {
        // it may have been its contact's first pending job: the next one comes back at once
        match pool.acquire().await {
            Ok(mut conn) => {
                super::claim::requeue_next_or_leave_to_sweep(&mut conn, &[id], false).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not bring back the contact's next job; the sweep will")
            }
        }
        return Ok((ActionResult::Done, Some(Found::State(JobState::Cancelled))));
    }
    Ok(match state_of(pool, id).await? {
        None => (ActionResult::NotFound, None),
        Some(s) => (ActionResult::WrongState, Some(Found::State(s))),
    })
}

async fn notify(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('contact_sync_jobs', '')")
        .persistent(false)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Deletes every job of `account` and the double-opt-in rows of `api_key_id` (the demo's own
/// clean-up; not exposed on the command line).
pub async fn purge_account(
    pool: &PgPool,
    account: &str,
    api_key_id: Option<&str>,
) -> Result<u64, sqlx::Error> {
    let n = sqlx::query("DELETE FROM contact_sync.jobs WHERE account = $1")
        .persistent(false)
        .bind(account)
        .execute(pool)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM contact_sync.doi_deferred WHERE account = $1")
        .persistent(false)
        .bind(account)
        .execute(pool)
        .await?;
    if let Some(key) = api_key_id {
        sqlx::query("DELETE FROM contact_sync.doi_ledger WHERE api_key_id = $1")
            .persistent(false)
            .bind(key)
            .execute(pool)
            .await?;
    }
    Ok(n)
}
