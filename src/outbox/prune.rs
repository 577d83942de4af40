//! Retention: finished jobs (`succeeded`, `coalesced`, `cancelled`) older than
//! `retention.finished` are deleted in small batches; `dead` jobs stay until retried or
//! cancelled, and a delivered job stays as long as an older dead or cancelled job of its
//! contact does (so that `retry` still sees it was overtaken). Smartlink watermarks (the newest `modify_ts` delivered per contact) go after the
//! same time without an update.

use sqlx::PgPool;
use std::time::Duration;

/// Deletes up to `batch` finished jobs older than `older_than`; returns how many.
pub async fn prune_finished(
    pool: &PgPool,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    delete_batch(
        pool,
        // language=PostgreSQL
        r#"
        DELETE FROM contact_sync.jobs
        WHERE id IN (
            SELECT j.id FROM contact_sync.jobs j
            WHERE j.state IN ('succeeded', 'coalesced', 'cancelled')
              AND j.finished_at < now() - make_interval(secs => $1::bigint / 1000.0)
              -- kept while an older change of the contact may still be retried: `retry` must
              -- see that a newer one was delivered
              AND NOT EXISTS (
                  SELECT 1 FROM contact_sync.jobs o
                  WHERE o.contact_key = j.contact_key AND o.state IN ('dead', 'cancelled')
                    AND o.id < j.id)
            ORDER BY j.finished_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED)
        "#,
        older_than,
        batch,
    )
    .await
}

/// How many finished jobs [`prune_finished`] would delete at `older_than` (for a dry run).
pub async fn count_prunable(pool: &PgPool, older_than: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT count(*) FROM contact_sync.jobs j
        WHERE j.state IN ('succeeded', 'coalesced', 'cancelled')
          AND j.finished_at < now() - make_interval(secs => $1::bigint / 1000.0)
          AND NOT EXISTS (
              SELECT 1 FROM contact_sync.jobs o
              WHERE o.contact_key = j.contact_key AND o.state IN ('dead', 'cancelled')
                AND o.id < j.id)
        "#,
    )
    .persistent(false)
    .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
    .fetch_one(pool)
    .await
}

/// Deletes up to `batch` Smartlink watermarks not updated for `older_than`; returns how many.
pub async fn prune_watermarks(
    pool: &PgPool,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    delete_batch(
        pool,
        // language=PostgreSQL
        r#"
        DELETE FROM contact_sync.smartlink_watermarks
        WHERE contact_key IN (
            SELECT contact_key FROM contact_sync.smartlink_watermarks
            WHERE updated_at < now() - make_interval(secs => $1::bigint / 1000.0)
            ORDER BY updated_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED)
        "#,
        older_than,
        batch,
    )
    .await
}

/// Runs a bounded `DELETE` taking `$1` (age in ms) and `$2` (batch size).
async fn delete_batch(
    pool: &PgPool,
    sql: &'static str,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(sql)
        .persistent(false)
        .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
        .bind(batch)
        .execute(pool)
        .await?;
    Ok(result.rows_affected())
}
