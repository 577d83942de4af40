//! Read-only probes the demo and the benchmark measure with (job counts of a set of accounts,
//! the database clock, WAL position, sessions in a transaction). Not part of the embedding API.

use super::inspect::StateCount;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Counts per state for some accounts (progress lines, summaries).
pub async fn counts_for(
    pool: &PgPool,
    accounts: &[String],
) -> Result<Vec<StateCount>, sqlx::Error> {
    sqlx::query_as::<_, StateCount>(
        // language=PostgreSQL
        "SELECT account, state, count(*) AS count FROM contact_sync.jobs WHERE account = ANY($1) GROUP BY account, state ORDER BY account, state",
    ).persistent(false)
    .bind(accounts)
    .fetch_all(pool)
    .await
}

/// The database's clock, and the latest `finished_at` of these accounts' jobs (when the last
/// completion was written): the benchmark times a drain between the two.
pub async fn clock(pool: &PgPool) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .persistent(false)
        .fetch_one(pool)
        .await
}

/// See [`clock`]. Each branch can read `jobs_finished_idx` or `jobs_dead_idx` from its end.
pub async fn last_finished_at(
    pool: &PgPool,
    accounts: &[String],
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT greatest(
            (SELECT max(finished_at) FROM contact_sync.jobs
             WHERE state IN ('succeeded', 'coalesced', 'cancelled') AND account = ANY($1)),
            (SELECT max(finished_at) FROM contact_sync.jobs WHERE state = 'dead' AND account = ANY($1)))
        "#,
    ).persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// The cluster's current write-ahead log position (the benchmark measures the log a drain
/// writes from it, with [`wal_bytes_since`]).
pub async fn wal_position(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .persistent(false)
        .fetch_one(pool)
        .await
}

/// Bytes of write-ahead log the cluster wrote since `position` (every database's: the log is
/// the cluster's). Exact at once, unlike the statistics views, which lag by up to a second.
pub async fn wal_bytes_since(pool: &PgPool, position: &str) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
        .persistent(false)
        .bind(position)
        .fetch_one(pool)
        .await
}

/// The process id of the session's backend (the benchmark finds its cluster's processes by it).
pub async fn backend_pid(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .persistent(false)
        .fetch_one(pool)
        .await
}

/// Sessions with one of these `application_name`s that are inside a transaction (running a
/// statement, or waiting for their client within one).
pub async fn sessions_in_transaction(
    pool: &PgPool,
    application_names: &[String],
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1) AND xact_start IS NOT NULL",
    )
    .persistent(false)
    .bind(application_names)
    .fetch_one(pool)
    .await
}

/// Failed attempts recorded for some accounts (the sum of their error histories).
pub async fn failed_attempts(pool: &PgPool, accounts: &[String]) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(jsonb_array_length(errors)), 0)::bigint FROM contact_sync.jobs WHERE account = ANY($1)",
    ).persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await
}

/// Jobs of `accounts` per double-opt-in decision (`sent`, `deferred_until`, `suppressed`).
pub async fn doi_counts(
    pool: &PgPool,
    accounts: &[String],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows: Vec<(super::doi::DoiRecord, i64)> = sqlx::query_as(
        "SELECT doi, count(*) FROM contact_sync.jobs WHERE account = ANY($1) AND doi IS NOT NULL GROUP BY 1",
    )
    .bind(accounts)
    .fetch_all(pool)
    .await?;
    let mut kinds = std::collections::BTreeMap::<&str, i64>::new();
    for (record, count) in rows {
        *kinds.entry(record.kind()).or_default() += count;
    }
    Ok(kinds
        .into_iter()
        .map(|(kind, count)| (kind.to_string(), count))
        .collect())
}
