//! Schema migrations, embedded in the binary. Everything, including the migrator's own
//! bookkeeping table, lives in the `contact_sync` schema, so a host application's own sqlx
//! migrations in the same database never collide with ours. Safe to run from several processes
//! at once: the first holds a transaction-scoped advisory lock, the others wait and find nothing
//! left to do.

use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// The embedded migrations (`migrations/`), run without sqlx's own lock (see [`migrate`]).
pub static MIGRATOR: std::sync::LazyLock<Migrator> = std::sync::LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_locking(false);
    migrator
});

/// Advisory lock key: "contact_sync" in ASCII, folded into an i64.
const MIGRATION_LOCK_KEY: i64 = 0x636f_6e74_6163_7473;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error while migrating: {0}")]
    Database(#[from] sqlx::Error),
}

/// Applies every pending migration inside one transaction.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS contact_sync")
        .execute(&mut *tx)
        .await?;
    // The migrator creates `_sqlx_migrations` in the first schema of the search path.
    sqlx::query("SET LOCAL search_path TO contact_sync")
        .execute(&mut *tx)
        .await?;
    // Without sqlx's own lock: it is a session-level advisory lock, which a failed migration
    // leaves held by the pooled connection it ran on, so the next `migrate` on another of the
    // pool's connections waited forever. The transaction-scoped lock above serializes migrators.
    MIGRATOR.run_direct(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// True when every embedded migration is applied (for `/readyz`).
pub async fn is_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM contact_sync._sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(v) => v,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

/// Foreign keys from other tables to `contact_sync.jobs(id)`, as `name on table`. A delivered
/// job's row leaves that table at completion, so such a key fails every completion (or, with
/// `ON DELETE CASCADE`, deletes the application's rows): the worker refuses to start while one
/// exists (the 2026-12-20 migration refuses to run).
pub async fn foreign_keys_to_jobs(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT format('%s on %s', c.conname, c.conrelid::regclass) FROM pg_constraint c
         WHERE c.contype = 'f' AND c.confrelid = 'contact_sync.jobs'::regclass ORDER BY 1",
    )
    .persistent(false)
    .fetch_all(pool)
    .await
}
