//! Backfill cursors (`contact_sync.backfills`): one row per source, written in the same
//! transaction as each page's jobs, so a killed backfill resumes after the last page it queued.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// A backfill's row.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow, PartialEq, Eq)]
pub struct Cursor {
    pub source: String,
    pub accounts: Vec<String>,
    pub condition: Option<String>,
    pub mode: String,
    pub last_key: Option<String>,
    pub done: bool,
    pub read: i64,
    pub enqueued: i64,
    pub unchanged: i64,
    pub rejected: i64,
}

pub async fn get(pool: &PgPool, source: &str) -> Result<Option<Cursor>, sqlx::Error> {
    sqlx::query_as(
        "SELECT source, accounts, condition, mode, last_key, done, read, enqueued, unchanged, rejected \
         FROM contact_sync.backfills WHERE source = $1",
    )
    .bind(source)
    .fetch_optional(pool)
    .await
}

/// Starts a backfill from the beginning (replacing a finished or abandoned one).
pub async fn start(pool: &PgPool, cursor: &Cursor) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contact_sync.backfills (source, accounts, condition, mode) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (source) DO UPDATE SET accounts = EXCLUDED.accounts, condition = EXCLUDED.condition, \
             mode = EXCLUDED.mode, last_key = NULL, done = false, read = 0, enqueued = 0, unchanged = 0, \
             rejected = 0, started_at = now(), updated_at = now()",
    )
    .bind(&cursor.source)
    .bind(&cursor.accounts)
    .bind(&cursor.condition)
    .bind(&cursor.mode)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a page (inside the page's transaction).
pub async fn advance(conn: &mut PgConnection, cursor: &Cursor) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE contact_sync.backfills SET last_key = $2, done = $3, read = $4, enqueued = $5, \
             unchanged = $6, rejected = $7, updated_at = now() WHERE source = $1",
    )
    .bind(&cursor.source)
    .bind(&cursor.last_key)
    .bind(cursor.done)
    .bind(cursor.read)
    .bind(cursor.enqueued)
    .bind(cursor.unchanged)
    .bind(cursor.rejected)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the source's backfill lock for as long as `conn` holds it: `false` when another
/// session has it.
pub async fn try_lock(conn: &mut PgConnection, source: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('contact_sync.backfill:' || $1))")
        .bind(source)
        .fetch_one(conn)
        .await
}

pub async fn unlock(conn: &mut PgConnection, source: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_unlock(hashtext('contact_sync.backfill:' || $1))")
        .bind(source)
        .execute(conn)
        .await?;
    Ok(())
}

/// Pending jobs of `accounts` (the backlog a backfill waits on before its next page).
pub async fn pending(pool: &PgPool, accounts: &[String]) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE state = 'pending' AND account = ANY($1)",
    )
    .persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await
}
