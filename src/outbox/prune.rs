//! Retention: finished jobs (`succeeded`, `coalesced`, `cancelled`) older than
//! `retention.finished` are deleted in small batches, oldest first; `dead` jobs stay until
//! retried or cancelled; delivered jobs without an idempotency key are in
//! `contact_sync.jobs_delivered` (moved there at completion), the others in the queue's table.
//! A delivered job deleted while an older change of its contact is parked (`dead`,
//! `cancelled`) leaves its id in that job's `overtaken_by`, so `retry` still sees that a newer
//! change was delivered; nothing is kept back, so no batch reads a row twice. Smartlink
//! watermarks (the newest `modify_ts` delivered per contact) go after the same time without an
//! update.

use sqlx::PgPool;
use std::time::Duration;

/// The retention statement of the queue's table: `$1` age in ms, `$2` batch size (public for
/// the plan tests).
#[doc(hidden)]
pub const PRUNE_SQL: &str = r#"
        WITH batch AS (
            SELECT j.id, j.contact_key, j.state FROM ONLY contact_sync.jobs j
            WHERE j.state IN ('succeeded', 'coalesced', 'cancelled')
              AND j.finished_at < now() - make_interval(secs => $1::bigint / 1000.0)
            ORDER BY j.finished_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ), overtaken AS (
            -- the older parked changes of each contact remember the newest delivered one of the
            -- batch (those that know it already are not written again)
            UPDATE ONLY contact_sync.jobs o
            SET overtaken_by = n.newest
            FROM (
                SELECT b.contact_key, max(b.id) AS newest FROM batch b
                WHERE b.state IN ('succeeded', 'coalesced')
                GROUP BY b.contact_key
            ) n
            WHERE o.contact_key = n.contact_key AND o.state IN ('dead', 'cancelled')
              AND o.id < n.newest AND (o.overtaken_by IS NULL OR o.overtaken_by < n.newest)
              AND o.id NOT IN (SELECT id FROM batch)
        )
        DELETE FROM ONLY contact_sync.jobs WHERE id IN (SELECT id FROM batch)
        "#;

/// The retention statement of `jobs_delivered`, as [`PRUNE_SQL`], oldest first along its
/// `finished_at` index (public for the plan tests).
#[doc(hidden)]
pub const PRUNE_DELIVERED_SQL: &str = r#"
        WITH batch AS (
            SELECT d.id, d.contact_key FROM contact_sync.jobs_delivered d
            WHERE d.finished_at < now() - make_interval(secs => $1::bigint / 1000.0)
            ORDER BY d.finished_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ), overtaken AS (
            UPDATE ONLY contact_sync.jobs o
            SET overtaken_by = n.newest
            FROM (SELECT b.contact_key, max(b.id) AS newest FROM batch b GROUP BY b.contact_key) n
            WHERE o.contact_key = n.contact_key AND o.state IN ('dead', 'cancelled')
              AND o.id < n.newest AND (o.overtaken_by IS NULL OR o.overtaken_by < n.newest)
        )
        DELETE FROM contact_sync.jobs_delivered WHERE id IN (SELECT id FROM batch)
        "#;

/// Deletes up to `batch` finished jobs older than `older_than`, from `jobs_delivered` first,
/// then from the queue's table; returns how many.
pub async fn prune_finished(
    pool: &PgPool,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let delivered = delete_batch(pool, PRUNE_DELIVERED_SQL, older_than, batch).await?;
    let rest = batch.saturating_sub(i64::try_from(delivered).unwrap_or(i64::MAX));
    if rest <= 0 {
        return Ok(delivered);
    }
    Ok(delivered + delete_batch(pool, PRUNE_SQL, older_than, rest).await?)
}

/// How many finished jobs [`prune_finished`] would delete at `older_than` (for a dry run; the
/// count reads `jobs_delivered` too, a child table of the queue's).
pub async fn count_prunable(pool: &PgPool, older_than: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        SELECT count(*) FROM contact_sync.jobs j
        WHERE j.state IN ('succeeded', 'coalesced', 'cancelled')
          AND j.finished_at < now() - make_interval(secs => $1::bigint / 1000.0)
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
