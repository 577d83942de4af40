//! Operator reads: `status`, `jobs list`, `jobs show`, and the queue gauges of `/metrics`.
//! Filters are bound parameters, never formatted into SQL; every read is bounded by an index.

use super::doi::DoiRecord;
use super::job::{JobId, JobState};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, QueryBuilder};

/// Jobs per account and state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq, Eq)]
pub struct StateCount {
    pub account: String,
    pub state: JobState,
    pub count: i64,
}

/// The runnable backlog of one account.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct Backlog {
    pub account: String,
    /// Pending jobs due now.
    pub runnable: i64,
    /// Pending jobs scheduled later (retries, future run_at).
    pub scheduled: i64,
    /// Age of the oldest job due now, in seconds.
    pub oldest_runnable_age_s: Option<f64>,
}

/// What `contact-sync status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub counts: Vec<StateCount>,
    pub backlog: Vec<Backlog>,
    pub dead: i64,
    /// Known accounts: limits, calls in flight, pauses, live workers serving them.
    pub accounts: Vec<super::accounts::AccountRow>,
    /// Accounts with jobs waiting that no live worker serves.
    pub unserved: Vec<String>,
    /// Installed capture sources with the rows rejected and statements not captured since
    /// their installation.
    pub capture: Vec<CaptureStatus>,
}

/// One installed capture source, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureStatus {
    pub source: String,
    pub table: String,
    #[serde(flatten)]
    pub since_install: super::capture::Problems,
}

pub async fn status(pool: &PgPool) -> Result<Status, sqlx::Error> {
    let counts = sqlx::query_as::<_, StateCount>(
        // language=PostgreSQL
        "SELECT account, state, count(*) AS count FROM contact_sync.jobs GROUP BY account, state ORDER BY account, state",
    ).persistent(false)
    .fetch_all(pool)
    .await?;
    let backlog = backlog(pool).await?;
    let dead = counts
        .iter()
        .filter(|c| c.state == JobState::Dead)
        .map(|c| c.count)
        .sum();
    let accounts = super::accounts::list(pool).await?;
    let unserved = super::accounts::unserved(pool).await?;
    let mut capture = Vec::new();
    for installed in super::capture::installed(pool).await? {
        let since_install =
            super::capture::problems(pool, &installed.source, Some(installed.installed_at)).await?;
        capture.push(CaptureStatus {
            source: installed.source,
            table: installed.table_name,
            since_install,
        });
    }
    Ok(Status {
        counts,
        backlog,
        dead,
        accounts,
        unserved,
        capture,
    })
}

/// Pending work per account (uses the pending partial index only).
pub async fn backlog(pool: &PgPool) -> Result<Vec<Backlog>, sqlx::Error> {
    sqlx::query_as::<_, Backlog>(
        // language=PostgreSQL
        r#"
        SELECT account,
               count(*) FILTER (WHERE run_at <= now()) AS runnable,
               count(*) FILTER (WHERE run_at > now()) AS scheduled,
               extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8 AS oldest_runnable_age_s
        FROM contact_sync.jobs WHERE state = 'pending'
        GROUP BY account ORDER BY account
        "#,
    ).persistent(false)
    .fetch_all(pool)
    .await
}

/// Jobs dead now, per account (the dead-jobs partial index only).
pub async fn dead_per_account(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        // language=PostgreSQL
        "SELECT account, count(*) FROM contact_sync.jobs WHERE state = 'dead' GROUP BY account ORDER BY account",
    ).persistent(false)
    .fetch_all(pool)
    .await
}

/// One line of `jobs list`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobSummary {
    pub id: JobId,
    pub provider: String,
    pub account: String,
    pub email: String,
    pub state: JobState,
    pub attempts: i32,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Finished without a change: `not_found` or `unchanged` (see [`JobDetail::outcome`]).
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<JobState>,
    pub account: Option<String>,
    pub email: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Ids below this one (the next page of a newest-first list).
    pub after: Option<JobId>,
    /// At most this many (0: none).
    pub limit: i64,
}

pub async fn list(pool: &PgPool, filter: &ListFilter) -> Result<Vec<JobSummary>, sqlx::Error> {
    if filter.limit <= 0 {
        return Ok(Vec::new());
    }
    let mut q = QueryBuilder::new(
        "SELECT id, provider, account, email, state, attempts, run_at, created_at, last_error, outcome FROM contact_sync.jobs WHERE true",
    );
    if let Some(state) = &filter.state {
        q.push(" AND state = ").push_bind(state);
    }
    if let Some(account) = &filter.account {
        q.push(" AND account = ").push_bind(account);
    }
    if let Some(email) = &filter.email {
        q.push(" AND lower(email) = lower(")
            .push_bind(email)
            .push(")");
    }
    if let Some(since) = &filter.since {
        q.push(" AND created_at >= ").push_bind(since);
    }
    if let Some(after) = filter.after {
        q.push(" AND id < ").push_bind(after);
    }
    q.push(" ORDER BY id DESC LIMIT ")
        .push_bind(filter.limit.clamp(1, 10_000));
    q.build_query_as::<JobSummary>().fetch_all(pool).await
}

/// A stored JSON value as an operator's view shows it: decoded when it can be, else its text
/// as a JSON string. A row written with the triggers off or edited by hand may hold what the
/// decoder refuses (a number beyond a double's range, nesting deeper than its limit); one such
/// row must not hide the page it is on. Reads as the [`Value`] it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct StoredJson(pub Value);

impl std::ops::Deref for StoredJson {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.0
    }
}

impl std::fmt::Display for StoredJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl sqlx::Type<sqlx::Postgres> for StoredJson {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Value as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <Value as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for StoredJson {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        use sqlx::postgres::PgValueFormat;
        use sqlx::TypeInfo;
        let binary = value.format() == PgValueFormat::Binary;
        let jsonb = sqlx::ValueRef::type_info(&value).name() == "JSONB";
        let bytes = value.as_bytes()?;
        // (binary jsonb starts with its format version, 1)
        let text = match bytes {
            [1, rest @ ..] if binary && jsonb => rest,
            _ => bytes,
        };
        Ok(StoredJson(serde_json::from_slice(text).unwrap_or_else(
            |_| Value::String(String::from_utf8_lossy(text).into_owned()),
        )))
    }
}

/// Everything about one job, with its error history.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobDetail {
    pub id: JobId,
    pub provider: String,
    pub account: String,
    pub email: String,
    pub payload: StoredJson,
    pub idempotency_key: Option<String>,
    pub state: JobState,
    pub attempts: i32,
    pub max_attempts: Option<i32>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub locked_until: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    pub last_error: Option<String>,
    pub errors: StoredJson,
    pub coalesced_into: Option<JobId>,
    /// The double-opt-in decision of its call (Smartlink).
    pub doi: Option<DoiRecord>,
    /// Finished without a change: `not_found` (the provider does not have the contact) or
    /// `unchanged` (it already held the change; no call was made).
    pub outcome: Option<String>,
}

pub async fn show(pool: &PgPool, id: JobId) -> Result<Option<JobDetail>, sqlx::Error> {
    sqlx::query_as::<_, JobDetail>(
        // language=PostgreSQL
        r#"
        SELECT id, provider, account, email, payload, idempotency_key, state, attempts, max_attempts, run_at,
               created_at, finished_at, locked_until, locked_by, last_error, errors, coalesced_into, doi, outcome
        FROM contact_sync.jobs WHERE id = $1
        "#,
    ).persistent(false)
    .bind(id)
    .fetch_optional(pool)
    .await
}
