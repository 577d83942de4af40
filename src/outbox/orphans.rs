//! Orphans: pending jobs the queue of contacts does not know. A job inserted while the
//! triggers were off (`session_replication_role = replica`, as `pg_restore --disable-triggers`
//! or a logical-replication apply does) has no row in `contact_sync.contacts`, so no claim ever
//! takes it. Workers look for them a slice at a time (a bounded read per check, the whole
//! backlog over successive checks); `status` and `run --drain` look at all of them. The repair
//! is [`REPAIR`].

use sqlx::PgPool;

/// The statement that puts orphans (and anything else the queue missed) back in the queue.
pub const REPAIR: &str = "SELECT contact_sync.rebuild_contacts();";

/// Orphaned jobs and the contacts they belong to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Orphans {
    pub jobs: i64,
    pub contacts: i64,
}

/// One slice of the pending jobs, in contact order after `after` (from the start when `None`):
/// the orphans found in it, and where the next slice starts (`None`: this one reached the end).
pub async fn check_slice(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
) -> Result<(Orphans, Option<String>), sqlx::Error> {
    // The slice is read in the pending index's order, never gathered whole and sorted (what a
    // planner believing the table small would do: 48 ms at 100,000 pending jobs).
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true), set_config('enable_seqscan', 'off', true)",
    )
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    let (jobs, contacts, last, read): (i64, i64, Option<String>, i64) = sqlx::query_as(
        // language=PostgreSQL
        r#"
        WITH slice AS (
            SELECT j.contact_key FROM contact_sync.jobs j
            WHERE j.state = 'pending' AND j.contact_key > coalesce($1, '')
            ORDER BY j.contact_key
            LIMIT $2
        ), orphaned AS (
            SELECT s.contact_key FROM slice s
            WHERE NOT EXISTS (SELECT 1 FROM contact_sync.contacts c WHERE c.contact_key = s.contact_key)
        )
        SELECT (SELECT count(*) FROM orphaned), (SELECT count(DISTINCT contact_key) FROM orphaned),
               (SELECT max(contact_key) FROM slice), (SELECT count(*) FROM slice)
        "#,
    )
    .persistent(false)
    .bind(after)
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let next = if read < limit { None } else { last };
    Ok((Orphans { jobs, contacts }, next))
}

/// Every orphan of these accounts (all accounts when `None`): a read of every pending job.
pub async fn count(pool: &PgPool, accounts: Option<&[String]>) -> Result<Orphans, sqlx::Error> {
    let (jobs, contacts): (i64, i64) = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT count(*), count(DISTINCT j.contact_key) FROM contact_sync.jobs j
        WHERE j.state = 'pending' AND ($1::text[] IS NULL OR j.account = ANY($1))
          AND NOT EXISTS (SELECT 1 FROM contact_sync.contacts c WHERE c.contact_key = j.contact_key)
        "#,
    )
    .persistent(false)
    .bind(accounts)
    .fetch_one(pool)
    .await?;
    Ok(Orphans { jobs, contacts })
}
