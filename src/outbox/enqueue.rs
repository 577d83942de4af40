//! Recording changes: one at a time through `contact_sync.enqueue()` or many in one statement,
//! always on the caller's connection or transaction so the change commits or rolls back with the
//! caller's own work. Validation is the database's (`contact_sync.validate_job`).

use super::job::{JobId, NewJob};
use sqlx::PgConnection;

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
        "SELECT contact_sync.enqueue($1, $2, $3, $4, $5, coalesce($6, now()))",
    )
    .bind(&job.provider)
    .bind(&job.account)
    .bind(&job.email)
    .bind(&job.payload)
    .bind(&job.idempotency_key)
    .bind(job.run_at)
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
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut providers = Vec::with_capacity(jobs.len());
    let mut accounts = Vec::with_capacity(jobs.len());
    let mut emails = Vec::with_capacity(jobs.len());
    let mut payloads = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    for job in jobs {
        providers.push(job.provider.as_str());
        accounts.push(job.account.as_str());
        emails.push(job.email.as_str());
        payloads.push(&job.payload);
        keys.push(job.idempotency_key.as_deref());
        run_ats.push(job.run_at);
    }
    let rows: Vec<(i64, Option<JobId>)> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        WITH input AS (
            SELECT i.ord, i.provider, i.account, i.email, i.key, coalesce(i.run_at, now()) AS run_at,
                   CASE WHEN i.provider = 'smartlink' AND jsonb_typeof(i.payload) = 'object'
                             AND NOT i.payload ? 'modify_ts'
                        THEN i.payload || jsonb_build_object('modify_ts',
                                 floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                        ELSE i.payload END AS payload
            FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[], $6::timestamptz[])
                 WITH ORDINALITY AS i(provider, account, email, payload, key, run_at, ord)
        ), inserted AS (
            INSERT INTO contact_sync.jobs (provider, account, email, payload, idempotency_key, run_at)
            SELECT provider, account, email, payload, key, run_at FROM input ORDER BY ord
            ON CONFLICT (account, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id, account, idempotency_key
        ), numbered AS (
            SELECT id, account, idempotency_key,
                   row_number() OVER (ORDER BY id) AS rn
            FROM inserted WHERE idempotency_key IS NULL
        ), plain AS (
            SELECT ord, row_number() OVER (ORDER BY ord) AS rn FROM input WHERE key IS NULL
        )
        SELECT i.ord, coalesce(n.id, x.id, j.id)
        FROM input i
        LEFT JOIN plain p ON p.ord = i.ord
        LEFT JOIN numbered n ON n.rn = p.rn
        LEFT JOIN inserted x ON i.key IS NOT NULL AND x.account = i.account AND x.idempotency_key = i.key
        LEFT JOIN contact_sync.jobs j ON i.key IS NOT NULL AND x.id IS NULL AND j.idempotency_key IS NOT NULL
                                     AND j.account = i.account AND j.idempotency_key = i.key
        ORDER BY i.ord
        "#,
    )
    .bind(&providers)
    .bind(&accounts)
    .bind(&emails)
    .bind(&payloads)
    .bind(&keys)
    .bind(&run_ats)
    .fetch_all(&mut *conn)
    .await?;
    let mut ids = Vec::with_capacity(rows.len());
    for (index, (_, id)) in rows.into_iter().enumerate() {
        match id {
            Some(id) => ids.push(id),
            // A concurrent transaction committed this key after our statement's snapshot:
            // a fresh statement sees it.
            None => ids.push(enqueue(conn, &jobs[index]).await?),
        }
    }
    Ok(ids)
}
