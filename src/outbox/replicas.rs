//! Worker replicas (`contact_sync.workers`): each live worker process's row, kept by its
//! heartbeat, removed on a clean exit; what `workers` shows, and what rescue and the limits
//! read to tell a live worker from a gone one.

use super::accounts::millis;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;

/// A worker replica as it registers itself.
#[derive(Debug, Clone)]
pub struct Replica {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub accounts: Vec<String>,
    pub concurrency: i32,
}

/// The replica's heartbeat: pushes its expiry one lease on (and registers it again if a sweep
/// had dropped it while it could not reach the database). Drops expired replicas.
pub async fn heartbeat(
    pool: &PgPool,
    replica: &Replica,
    lease: Duration,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    upsert_replica(&mut conn, replica, lease).await.map(|_| ())
}

/// [`heartbeat`], saying whether the replica's row was still alive (not expired, not removed)
/// when it was renewed: if not, other workers may have rescued its jobs meanwhile.
pub async fn heartbeat_continuous(
    pool: &PgPool,
    replica: &Replica,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    upsert_replica(&mut conn, replica, lease).await
}

/// Records the replica (or pushes its expiry one lease on) and drops expired replicas: the
/// registration's first step and the heartbeat.
/// Returns whether the row was still alive before (see [`heartbeat_continuous`]).
pub(crate) async fn upsert_replica(
    conn: &mut sqlx::PgConnection,
    replica: &Replica,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH gone AS (
            -- (a row another transaction holds is left for a later beat, never waited for)
            DELETE FROM contact_sync.workers WHERE id IN (
                SELECT id FROM contact_sync.workers WHERE expires_at < now() AND id <> $1
                FOR UPDATE SKIP LOCKED)
        ), before AS (
            SELECT expires_at > now() AS alive FROM contact_sync.workers WHERE id = $1
        ), renewed AS (
            INSERT INTO contact_sync.workers (id, host, pid, accounts, concurrency, expires_at)
            VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::bigint / 1000.0))
            ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at
        )
        SELECT coalesce((SELECT alive FROM before), false)
        "#,
    )
    .persistent(false)
    .bind(&replica.id)
    .bind(&replica.host)
    .bind(replica.pid)
    .bind(&replica.accounts)
    .bind(replica.concurrency)
    .bind(millis(lease))
    .fetch_one(conn)
    .await
}

/// A replica leaving cleanly.
pub async fn deregister(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM contact_sync.workers WHERE id = $1")
        .persistent(false)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// A live replica, for `contact-sync workers`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ReplicaRow {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub accounts: Vec<String>,
    pub concurrency: i32,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Replicas whose heartbeat has not expired.
pub async fn live_replicas(pool: &PgPool) -> Result<Vec<ReplicaRow>, sqlx::Error> {
    sqlx::query_as(
        // language=PostgreSQL
        "SELECT id, host, pid, accounts, concurrency, started_at, heartbeat_at, expires_at \
         FROM contact_sync.workers WHERE expires_at >= now() ORDER BY started_at, id",
    )
    .persistent(false)
    .fetch_all(pool)
    .await
}
