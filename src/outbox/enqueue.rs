//! Recording changes: one at a time through `contact_sync.enqueue()` or many in one statement,
//! always on the caller's connection or transaction so the change commits or rolls back with the
//! caller's own work. Validation is the database's (`contact_sync.validate_job`).

use super::job::{JobId, NewJob};
use sqlx::PgConnection;
use std::collections::HashMap;

/// Why a change was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The database refused the change (SQLSTATE 22023 from the validation, or 23514/22P02…).
    #[error("{message}")]
    Invalid { message: String, sqlstate: String },
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl EnqueueError {
    pub fn is_invalid(&self) -> bool {
        matches!(self, EnqueueError::Invalid { .. })
    }
}

impl From<sqlx::Error> for EnqueueError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // 22xxx data exceptions and 23514 check violations are the caller's input.
            if code.starts_with("22") || code == "23514" || code == "23502" {
                let mut message = db.message().to_string();
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    if let Some(hint) = pg.hint() {
                        message = format!("{message} (hint: {hint})");
                    }
                }
                return EnqueueError::Invalid {
                    message,
                    sqlstate: code,
                };
            }
        }
        EnqueueError::Database(err)
    }
}

/// Enqueues one change; a repeated `(account, idempotency_key)` returns the existing id.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> Result<JobId, EnqueueError> {
    let id: JobId = sqlx::query_scalar(
        // language=PostgreSQL
        "SELECT contact_sync.enqueue($1, $2, $3, $4::text::jsonb, $5, coalesce($6, now()), $7)",
    )
    .bind(&job.provider)
    .bind(&job.account)
    .bind(&job.email)
    .bind(job.payload_text())
    .bind(&job.idempotency_key)
    .bind(job.run_at)
    .bind(job.max_attempts)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// Enqueues many changes in one statement (all or nothing), returning their ids in input order.
/// Same rules as [`enqueue`]: validation, the Smartlink `modify_ts` default, idempotency keys.
pub async fn enqueue_batch(
    conn: &mut PgConnection,
    jobs: &[NewJob],
) -> Result<Vec<JobId>, EnqueueError> {
    Ok(enqueue_batch_counted(conn, jobs).await?.ids)
}

/// What [`enqueue_batch_counted`] recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// One id per input change, in input order.
    pub ids: Vec<JobId>,
    /// Changes whose idempotency key was already recorded (earlier, or on an earlier line of
    /// the same batch): their id is the existing job's, and nothing new was queued.
    pub duplicates: usize,
}

/// The batch insert: rows in the order given, each Smartlink payload without `modify_ts` given
/// the time of the insert. `{conflict}` stands for [`ON_CONFLICT`] when a row has an idempotency
/// key; a batch without keys goes without it (no unique index applies to its rows, and the
/// speculative insertion costs a WAL record per row).
const BATCH_INSERT_SQL: &str = r#"
        INSERT INTO contact_sync.jobs (provider, account, email, payload, idempotency_key, run_at, max_attempts)
        SELECT i.provider, i.account, i.email,
               CASE WHEN i.provider = 'smartlink' AND jsonb_typeof(i.payload) = 'object' AND NOT i.payload ? 'modify_ts'
                    THEN i.payload || jsonb_build_object('modify_ts', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                    ELSE i.payload END,
               i.key, coalesce(i.run_at, now()), i.max_attempts
        -- payloads arrive as text (kept exactly as the caller wrote them), parsed once here
        FROM (SELECT u.provider, u.account, u.email, u.payload::jsonb AS payload, u.key, u.run_at, u.max_attempts, u.ord
              FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::int[])
                   WITH ORDINALITY AS u(provider, account, email, payload, key, run_at, max_attempts, ord)
              OFFSET 0) i
        ORDER BY i.ord
        {conflict}
        RETURNING id, account, idempotency_key
        "#;

const ON_CONFLICT: &str =
    "ON CONFLICT (account, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";

/// [`enqueue_batch`], also counting the idempotent duplicates.
pub async fn enqueue_batch_counted(
    conn: &mut PgConnection,
    jobs: &[NewJob],
) -> Result<Enqueued, EnqueueError> {
    if jobs.is_empty() {
        return Ok(Enqueued::default());
    }
    let mut providers = Vec::with_capacity(jobs.len());
    let mut accounts = Vec::with_capacity(jobs.len());
    let mut emails = Vec::with_capacity(jobs.len());
    let mut payloads = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    for job in jobs {
        providers.push(job.provider.as_str());
        accounts.push(job.account.as_str());
        emails.push(job.email.as_str());
        payloads.push(job.payload_text());
        keys.push(job.idempotency_key.as_deref());
        run_ats.push(job.run_at);
        max_attempts.push(job.max_attempts);
    }
    // Identity values are taken in insertion order, so the new keyless ids, sorted, line up
    // with the keyless inputs; keyed rows are matched by (account, key).
    let keyed = jobs.iter().any(|j| j.idempotency_key.is_some());
    let sql = BATCH_INSERT_SQL.replace("{conflict}", if keyed { ON_CONFLICT } else { "" });
    let inserted: Vec<(JobId, String, Option<String>)> = sqlx::query_as(&sql)
        .bind(&providers)
        .bind(&accounts)
        .bind(&emails)
        .bind(&payloads)
        .bind(&keys)
        .bind(&run_ats)
        .bind(&max_attempts)
        .fetch_all(&mut *conn)
        .await?;
    let mut keyless: Vec<JobId> = Vec::with_capacity(inserted.len());
    let mut by_key: HashMap<(String, String), JobId> = HashMap::new();
    for (id, account, key) in inserted {
        match key {
            None => keyless.push(id),
            Some(key) => {
                by_key.insert((account, key), id);
            }
        }
    }
    keyless.sort_unstable();
    // keys this statement inserted: the first line with each is new, any other a duplicate
    let mut fresh: std::collections::HashSet<(String, String)> = by_key.keys().cloned().collect();
    let missing: Vec<(&str, &str)> = jobs
        .iter()
        .filter_map(|j| {
            j.idempotency_key
                .as_deref()
                .map(|k| (j.account.as_str(), k))
        })
        .filter(|(a, k)| !by_key.contains_key(&((*a).to_string(), (*k).to_string())))
        .collect();
    if !missing.is_empty() {
        let (accounts, keys): (Vec<&str>, Vec<&str>) = missing.into_iter().unzip();
        let existing: Vec<(JobId, String, String)> = sqlx::query_as(
            // language=PostgreSQL
            r#"
            SELECT j.id, j.account, j.idempotency_key FROM ONLY contact_sync.jobs j
            JOIN unnest($1::text[], $2::text[]) AS m(account, key) ON j.account = m.account AND j.idempotency_key = m.key
            WHERE j.idempotency_key IS NOT NULL
            "#,
        )
        // planned for the table as it is (see the module `outbox`)
        .persistent(false)
        .bind(&accounts)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
        for (id, account, key) in existing {
            by_key.insert((account, key), id);
        }
    }
    let mut next_keyless = keyless.into_iter();
    let mut ids = Vec::with_capacity(jobs.len());
    let mut duplicates = 0;
    for job in jobs {
        let id = match &job.idempotency_key {
            None => next_keyless.next(),
            Some(key) => {
                let k = (job.account.clone(), key.clone());
                if !fresh.remove(&k) {
                    duplicates += 1;
                }
                by_key.get(&k).copied()
            }
        };
        match id {
            Some(id) => ids.push(id),
            // A concurrent transaction committed this key after our statement's snapshot:
            // a fresh statement sees it.
            None => ids.push(enqueue(conn, job).await?),
        }
    }
    Ok(Enqueued { ids, duplicates })
}
