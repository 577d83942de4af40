//! The Smartlink double-opt-in ledger (`contact_sync.doi_ledger`) and the deferred pending-status
//! re-sends (`contact_sync.doi_deferred`). The one-hour window is counted in database time, per
//! API key (its md5, never the key) and lower-cased address, shared by every worker.

use super::job::JobId;
use super::{is_lock_timeout, is_refused};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// The double-opt-in decision a Smartlink job records (`contact_sync.jobs.doi`, text):
/// `sent` (its call triggered the confirmation email), `deferred_until <RFC 3339 time>` (the
/// pending status was taken out of the call and is re-sent then), `suppressed` (taken out, no
/// email: `double_opt_in = "drop"`), or, on a deferred re-send a later status change made
/// pointless, `superseded by job <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DoiRecord {
    Sent,
    DeferredUntil(DateTime<Utc>),
    Suppressed,
    SupersededBy(JobId),
    /// Text this version does not write (a hand edit): kept and shown as stored, never an
    /// error that would hide the job from the operator.
    Other(String),
}

impl DoiRecord {
    /// The decision without its time or job: `sent`, `deferred_until`, `suppressed`,
    /// `superseded`, or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            DoiRecord::Sent => "sent",
            DoiRecord::DeferredUntil(_) => "deferred_until",
            DoiRecord::Suppressed => "suppressed",
            DoiRecord::SupersededBy(_) => "superseded",
            DoiRecord::Other(_) => "other",
        }
    }

    /// Reads the column's text; what this version would not write itself is kept as
    /// [`DoiRecord::Other`], so that writing the record back gives the same text.
    pub fn parse(text: &str) -> DoiRecord {
        let known = match text.split_once(' ') {
            None if text == "sent" => Some(DoiRecord::Sent),
            None if text == "suppressed" => Some(DoiRecord::Suppressed),
            Some(("deferred_until", at)) => DateTime::parse_from_rfc3339(at)
                .ok()
                .map(|at| DoiRecord::DeferredUntil(at.with_timezone(&Utc))),
            Some(("superseded", rest)) => rest
                .strip_prefix("by job ")
                .and_then(|id| id.parse().ok())
                .map(DoiRecord::SupersededBy),
            _ => None,
        };
        match known {
            Some(record) if record.to_string() == text => record,
            _ => DoiRecord::Other(text.to_string()),
        }
    }
}

impl std::fmt::Display for DoiRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DoiRecord::DeferredUntil(at) => write!(
                f,
                "deferred_until {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            DoiRecord::SupersededBy(id) => write!(f, "superseded by job {id}"),
            DoiRecord::Other(text) => f.write_str(text),
            other => f.write_str(other.kind()),
        }
    }
}

impl serde::Serialize for DoiRecord {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl sqlx::Type<sqlx::Postgres> for DoiRecord {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for DoiRecord {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Ok(DoiRecord::parse(text))
    }
}

/// May this job trigger a confirmation email now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Yes: the ledger now records it (taken over by the job on its retries). `repeat`: this
    /// job already held a live window: an earlier attempt's email may have gone, so a failed
    /// call must not give the window back.
    Granted { repeat: bool },
    /// No: one was triggered within the hour; the window ends at `until`. `asked_already`:
    /// by this change itself, whose answered call carried another version of it (it was
    /// edited while that call was in flight): its status went out with that call.
    Busy {
        until: DateTime<Utc>,
        asked_already: bool,
    },
}

/// The provider's window (one hour) plus a safety margin for clock skew and call latency: the
/// ledger frees an address only once the provider has certainly forgotten its last email.
pub const WINDOW_SQL: &str = "interval '1 hour 2 minutes'";

/// Reserves the confirmation window for `job_id`, unless another call holds it, or its own
/// call was answered within the hour carrying another version of the change (`md5`: the
/// change's payload digest now; edited while that call was in flight, it is a new request,
/// not a retry). Every time is the database's.
pub async fn reserve(
    pool: &PgPool,
    api_key_id: &str,
    email: &str,
    job_id: JobId,
    md5: &str,
) -> Result<Reservation, sqlx::Error> {
    let insert = format!(
        r#"
        WITH prior AS (
            SELECT p.job_id = $3 AND p.sent_at > now() - {WINDOW_SQL} AS repeat
            FROM contact_sync.doi_ledger p WHERE p.api_key_id = $1 AND p.email = lower($2)
        )
        INSERT INTO contact_sync.doi_ledger AS l (api_key_id, email, sent_at, job_id)
        VALUES ($1, lower($2), now(), $3)
        ON CONFLICT (api_key_id, email) DO UPDATE
            SET sent_at = now(), job_id = EXCLUDED.job_id,
                -- (kept while the same change holds the window: it answered already)
                answered = CASE WHEN l.sent_at > now() - {WINDOW_SQL} THEN l.answered END
            -- (the same change again, edited since its call was answered, asked already
            -- within the hour; a mark left by another job is not this change's)
            WHERE l.sent_at <= now() - {WINDOW_SQL}
               OR (l.job_id = EXCLUDED.job_id
                   AND (l.answered IS NULL OR l.answered = $3 || ':' || $4
                        OR NOT starts_with(l.answered, $3 || ':')))
        RETURNING coalesce((SELECT repeat FROM prior), false)
        "#
    );
    let holder = format!(
        "SELECT sent_at + {WINDOW_SQL}, job_id = $3 FROM contact_sync.doi_ledger WHERE api_key_id = $1 AND email = lower($2)"
    );
    // The holder can vanish between the two statements (its call failed and released the
    // window): then try again.
    for _ in 0..3 {
        let granted: Option<bool> = sqlx::query_scalar(&insert)
            .persistent(false)
            .bind(api_key_id)
            .bind(email)
            .bind(job_id)
            .bind(md5)
            .fetch_optional(pool)
            .await?;
        if let Some(repeat) = granted {
            return Ok(Reservation::Granted { repeat });
        }
        let busy: Option<(DateTime<Utc>, Option<bool>)> = sqlx::query_as(&holder)
            .persistent(false)
            .bind(api_key_id)
            .bind(email)
            .bind(job_id)
            .fetch_optional(pool)
            .await?;
        if let Some((until, own)) = busy {
            return Ok(Reservation::Busy {
                until,
                asked_already: own == Some(true),
            });
        }
    }
    // Still contended: treat the window as busy for a minute of database time.
    let until: DateTime<Utc> = sqlx::query_scalar("SELECT now() + interval '1 minute'")
        .persistent(false)
        .fetch_one(pool)
        .await?;
    Ok(Reservation::Busy {
        until,
        asked_already: false,
    })
}

/// Gives the window back after a call that certainly sent no email (the provider refused it,
/// answered 5xx/429, or was never reached).
pub async fn release(
    pool: &PgPool,
    api_key_id: &str,
    email: &str,
    job_id: JobId,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM contact_sync.doi_ledger WHERE api_key_id = $1 AND email = lower($2) AND job_id = $3").persistent(false)
        .bind(api_key_id)
        .bind(email)
        .bind(job_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// What a delivered call leaves for the ledger. The completer writes it in the transaction of
/// the call's fenced outcome ([`super::complete::succeed_many`]), only when that outcome is
/// written: the call is answered, so a database that cannot take it never makes the call be
/// repeated, and a worker that lost the job writes nothing. Idempotent.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterCall {
    /// The call triggered the confirmation email: the provider's hour started no earlier than
    /// the answer, so the window counts from now, and records the change's digest as the call
    /// carried it (sent again edited, the change is a new request inside the hour). An earlier attempt of the same change may have
    /// deferred the status and lost its completion: that re-send is dropped (the status went
    /// out now).
    Sent {
        api_key_id: String,
        provider: String,
        account: String,
        email: String,
        /// The job whose change asks for the pending status (the window is held in its name).
        window_holder: JobId,
        /// That change's payload digest as the call carried it (`md5(payload::text)`).
        holder_md5: String,
    },
    /// The pending status was taken out of the call: re-send it when the window ends.
    Deferred {
        /// The job that carried the change (its head).
        job_id: JobId,
        /// The newest job id merged into that call: a later status supersedes the re-send.
        covers_id: JobId,
        provider: String,
        account: String,
        email: String,
        /// `{"subscribe": 3, ["update_strategy": n]}`
        payload: Value,
        due_at: DateTime<Utc>,
    },
}

/// Writes what `calls` left for the ledger on `conn` (inside their outcomes' transaction):
/// three set-based statements, whatever their number.
pub async fn write_after_calls(
    conn: &mut sqlx::PgConnection,
    calls: &[&AfterCall],
) -> Result<(), sqlx::Error> {
    let mut sent = SentColumns::default();
    let mut deferred = DeferredColumns::default();
    for call in calls {
        match call {
            AfterCall::Sent {
                api_key_id,
                provider,
                account,
                email,
                window_holder,
                holder_md5,
            } => {
                sent.holder_md5.push(holder_md5.as_str());
                sent.api_key_id.push(api_key_id.as_str());
                sent.provider.push(provider.as_str());
                sent.account.push(account.as_str());
                sent.email.push(email.as_str());
                sent.window_holder.push(*window_holder);
            }
            AfterCall::Deferred {
                job_id,
                covers_id,
                provider,
                account,
                email,
                payload,
                due_at,
            } => {
                deferred.job_id.push(*job_id);
                deferred.covers_id.push(*covers_id);
                deferred.provider.push(provider.as_str());
                deferred.account.push(account.as_str());
                deferred.email.push(email.as_str());
                deferred.payload.push(payload);
                deferred.due_at.push(*due_at);
            }
        }
    }
    if !sent.window_holder.is_empty() {
        sqlx::query(
            // language=PostgreSQL
            r#"
            UPDATE contact_sync.doi_ledger l SET sent_at = now(), answered = s.holder || ':' || s.md5
            FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS s(api_key_id, email, holder, md5)
            WHERE l.api_key_id = s.api_key_id AND l.email = lower(s.email) AND l.job_id = s.holder
            "#,
        )
        .persistent(false)
        .bind(&sent.api_key_id)
        .bind(&sent.email)
        .bind(&sent.window_holder)
        .bind(&sent.holder_md5)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            // language=PostgreSQL
            r#"
            DELETE FROM contact_sync.doi_deferred f
            USING unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS s(provider, account, email, holder)
            WHERE f.job_id <= s.holder AND f.covers_id >= s.holder
              AND f.provider = s.provider AND f.account = s.account AND lower(f.email) = lower(s.email)
            "#,
        )
        .persistent(false)
        .bind(&sent.provider)
        .bind(&sent.account)
        .bind(&sent.email)
        .bind(&sent.window_holder)
        .execute(&mut *conn)
        .await?;
    }
    if !deferred.job_id.is_empty() {
        sqlx::query(
            // language=PostgreSQL
            r#"
            INSERT INTO contact_sync.doi_deferred (job_id, covers_id, provider, account, email, payload, due_at)
            SELECT DISTINCT ON (d.job_id) d.job_id, d.covers_id, d.provider, d.account, d.email, d.payload, d.due_at
            FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::timestamptz[])
                 AS d(job_id, covers_id, provider, account, email, payload, due_at)
            ORDER BY d.job_id
            ON CONFLICT (job_id) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload,
                                               covers_id = EXCLUDED.covers_id
            "#,
        )
        .persistent(false)
        .bind(&deferred.job_id)
        .bind(&deferred.covers_id)
        .bind(&deferred.provider)
        .bind(&deferred.account)
        .bind(&deferred.email)
        .bind(&deferred.payload)
        .bind(&deferred.due_at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// [`AfterCall::Sent`] calls as the statement's arrays.
#[derive(Default)]
struct SentColumns<'a> {
    api_key_id: Vec<&'a str>,
    provider: Vec<&'a str>,
    account: Vec<&'a str>,
    email: Vec<&'a str>,
    window_holder: Vec<JobId>,
    holder_md5: Vec<&'a str>,
}

/// [`AfterCall::Deferred`] calls as the statement's arrays.
#[derive(Default)]
struct DeferredColumns<'a> {
    job_id: Vec<JobId>,
    covers_id: Vec<JobId>,
    provider: Vec<&'a str>,
    account: Vec<&'a str>,
    email: Vec<&'a str>,
    payload: Vec<&'a Value>,
    due_at: Vec<DateTime<Utc>>,
}

/// Turns due deferrals into jobs at the end of their contact's queue. Later status changes win,
/// in delivery order (never by id: a change committed late has an older id): a status
/// delivered after the deferring call removes the deferral, or cancels its queued re-send
/// ([`super::complete::succeed_many`]); one still queued at the sweep drops it here; a contact
/// with a call in flight waits for the next sweep. The re-send remembers the change it follows
/// (`resend_after`) and never rides along with other changes. Returns the new job ids.
pub async fn enqueue_due_resends(pool: &PgPool) -> Result<Vec<JobId>, sqlx::Error> {
    // A re-send is a new job: its contact's queue row may be held by a producer transaction
    // still open (the first change of that contact, not committed yet), and the worker never
    // waits for an application's transaction. All at once under a short lock timeout; if one
    // contact is held, one by one, leaving the held ones for a later sweep.
    // (at most 20 × 50 ms one by one: the sweep also rescues expired leases)
    match resends_with_timeout(pool, None, 200).await {
        // (one row the insert refuses: one by one, so that it holds up no other)
        Err(e) if is_lock_timeout(&e) || is_refused(&e) => {}
        other => return other,
    }
    let due: Vec<JobId> = sqlx::query_scalar(
        "SELECT job_id FROM contact_sync.doi_deferred WHERE due_at <= now() ORDER BY due_at LIMIT 20",
    ).persistent(false)
    .fetch_all(pool)
    .await?;
    let mut ids = Vec::new();
    for job_id in due {
        match resends_with_timeout(pool, Some(job_id), 50).await {
            Ok(mut new) => ids.append(&mut new),
            Err(e) if is_lock_timeout(&e) => {}
            Err(e) if is_refused(&e) => {
                // a deferral no insert will ever take (edited by hand, or a rule that changed
                // since): dropped, with the reason, instead of blocking every re-send after it
                tracing::warn!(job_id, error = %e, "confirmation re-send refused by the queue's checks; deferral dropped");
                sqlx::query("DELETE FROM contact_sync.doi_deferred WHERE job_id = $1")
                    .persistent(false)
                    .bind(job_id)
                    .execute(pool)
                    .await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ids)
}

async fn resends_with_timeout(
    pool: &PgPool,
    only: Option<JobId>,
    lock_timeout_ms: u32,
) -> Result<Vec<JobId>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .persistent(false)
        .bind(format!("{lock_timeout_ms}ms"))
        .execute(&mut *tx)
        .await?;
    let ids = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH due AS (
            -- a contact with a call in flight waits for the next sweep: that call may be a
            -- status change about to supersede the re-send
            DELETE FROM contact_sync.doi_deferred d
            WHERE d.job_id IN (
                SELECT f.job_id FROM contact_sync.doi_deferred f
                WHERE f.due_at <= now() AND ($1::bigint IS NULL OR f.job_id = $1)
                  AND NOT EXISTS (
                      SELECT 1 FROM ONLY contact_sync.jobs r
                      WHERE r.contact_key = f.provider || ':' || f.account || ':' || lower(f.email)
                        AND r.state = 'running')
                ORDER BY f.due_at LIMIT 1000 FOR UPDATE SKIP LOCKED)
            RETURNING d.*
        )
        INSERT INTO contact_sync.jobs (provider, account, email, payload, resend_after)
        SELECT due.provider, due.account, due.email,
               due.payload || jsonb_build_object('modify_ts', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint),
               due.covers_id
        FROM due
        -- a status change still queued comes later than the deferring call, whatever its id
        -- (one delivered since already removed the deferral)
        WHERE NOT EXISTS (
            SELECT 1 FROM ONLY contact_sync.jobs n
            WHERE n.contact_key = due.provider || ':' || due.account || ':' || lower(due.email)
              AND n.state = 'pending' AND n.payload ? 'subscribe')
        RETURNING id
        "#,
    ).persistent(false)
    .bind(only)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ids)
}

#[cfg(test)]
mod record_tests {
    use super::DoiRecord;

    #[test]
    fn records_read_back_as_written() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-06T10:11:12Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        for record in [
            DoiRecord::Sent,
            DoiRecord::Suppressed,
            DoiRecord::DeferredUntil(at),
            DoiRecord::SupersededBy(8),
        ] {
            assert_eq!(DoiRecord::parse(&record.to_string()), record);
        }
        assert_eq!(
            DoiRecord::DeferredUntil(at).to_string(),
            "deferred_until 2026-12-06T10:11:12Z"
        );
        assert_eq!(
            DoiRecord::SupersededBy(8).to_string(),
            "superseded by job 8"
        );
        // what this version would not write is kept as it is, never an error
        for text in [
            "deferred_until",
            "sent later",
            "sent ",
            "deferred_until 2026-12-06T13:11:12+03:00",
            "superseded by job x",
            "",
        ] {
            let record = DoiRecord::parse(text);
            assert_eq!(record, DoiRecord::Other(text.to_string()), "{text:?}");
            assert_eq!(record.to_string(), text);
        }
    }
}
