//! Fenced state writes after a claim: succeed (many at once, with the coalesced followers),
//! retry, kill (dead), release. Every write matches `(id, attempts, state = 'running')`; a write
//! that touches no row means the lease was lost and another worker owns the job now.

use super::doi::{AfterCall, DoiRecord};
use super::job::{AttemptError, JobId, JobState, Lease};
use super::synced::Delivered;
use crate::text::storable;
use sqlx::PgPool;
use std::collections::HashSet;
use std::time::Duration;

/// A delivered job and what rode along with it.
#[derive(Debug, Clone)]
pub struct Success {
    pub lease: Lease,
    /// Double-opt-in decision to record.
    pub doi: Option<DoiRecord>,
    /// md5 of the payload text the call carried for this job (`md5(payload::text)`): a job
    /// changed while its call was in flight (an operator's edit, an application's upsert) is
    /// not the change that was delivered, and is sent again.
    pub sent_md5: String,
    /// Followers carried by this call, in id order: they end `coalesced`, pointing here, up to
    /// the first one changed since the claim (it and those after it are sent again).
    pub followers: Vec<SentFollower>,
    /// The call set a Smartlink status: pending confirmation re-sends queued behind it for the
    /// contact are superseded (they end `cancelled`, `doi = superseded by job …`).
    pub sets_status: bool,
    /// Smartlink: the `modify_ts` the call carried (kept per contact as the watermark).
    pub modify_ts: Option<i64>,
    /// Set when the call changed nothing: `not_found` (the provider does not have the contact)
    /// or `unchanged` (no call: the provider already held the change).
    pub outcome: Option<String>,
    /// What the call sent, for the synced state (accounts a source captures into): written in
    /// the completion's transaction, so that the contact's next claim reads it.
    pub synced: Option<Delivered>,
    /// The double-opt-in ledger's writes the call leaves: written in the outcome's transaction,
    /// only if the outcome is (the write is fenced like the outcome).
    pub after_call: Option<AfterCall>,
}

/// A follower as its call carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFollower {
    pub id: JobId,
    /// md5 of the payload text carried (see [`Success::sent_md5`]).
    pub sent_md5: String,
}

/// What a batch of fenced writes did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Lease lost: another worker owns the job now (nothing written).
    pub lost: Vec<JobId>,
    /// A row of the call (the job or one of its followers) is held by another transaction
    /// right now (an operator's open `UPDATE`, an application's upsert): nothing written,
    /// nothing waited for; the caller keeps the outcome and its lease and writes it later.
    pub held: Vec<JobId>,
}

/// What one fenced write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Lease lost (see [`Written::lost`]).
    Lost,
    /// Row held by another transaction (see [`Written::held`]).
    Held,
}

/// Marks many jobs `succeeded` (and their followers `coalesced`) in one statement, never
/// waiting for a row another transaction holds. A job changed since its call was claimed goes
/// back to `pending` (sent again, as it is now), and so do the followers from the first changed
/// one on.
///
/// The synced state of the calls written is recorded in the same transaction: a contact's next
/// change is claimed only once this completes, and must find what this call sent (a change
/// back to the previous value would otherwise look already held, and not be sent).
///
/// `pool` is one of the hot path's ([`super::hot::pool`]): the statements are prepared, and
/// their plans kept for the session.
pub async fn succeed_many(pool: &PgPool, items: &[Success]) -> Result<Written, sqlx::Error> {
    if items.is_empty() {
        return Ok(Written::default());
    }
    if items
        .iter()
        .all(|i| i.synced.is_none() && i.after_call.is_none())
    {
        let mut conn = pool.acquire().await?;
        let outcomes = write_successes(&mut conn, items).await?;
        if outcomes.sent_again() {
            super::claim::rewind_floors();
        }
        super::claim::requeue_next_of_or_leave_to_sweep(&mut conn, &outcomes.contact_keys).await;
        return Ok(outcomes.written);
    }
    let mut tx = pool.begin().await?;
    if items.iter().any(|i| i.after_call.is_some()) {
        // a ledger row another transaction holds fails this write at once (the caller keeps
        // the outcome and tries again), instead of holding up the completer
        sqlx::query(LEDGER_LOCK_TIMEOUT)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
    }
    let outcomes = write_successes(&mut tx, items).await?;
    let sent_again = outcomes.sent_again();
    let Outcomes {
        written,
        done,
        as_sent,
        contact_keys,
    } = outcomes;
    let calls: Vec<Delivered> = items
        .iter()
        .filter(|i| done.contains(&i.lease))
        .filter_map(|i| i.synced.clone())
        .collect();
    super::synced::record(&mut tx, &calls).await?;
    // the window the call took is the provider's whatever became of the job; a deferred
    // status only for the change delivered (one changed in flight is decided again)
    let after_calls: Vec<&AfterCall> = items
        .iter()
        .filter_map(|i| {
            let after = i.after_call.as_ref()?;
            let applies = match after {
                AfterCall::Sent { .. } => done.contains(&i.lease),
                AfterCall::Deferred { .. } => as_sent.contains(&i.lease),
            };
            applies.then_some(after)
        })
        .collect();
    super::doi::write_after_calls(&mut tx, &after_calls).await?;
    tx.commit().await?;
    if sent_again {
        super::claim::rewind_floors();
    }
    let mut conn = pool.acquire().await?;
    super::claim::requeue_next_of_or_leave_to_sweep(&mut conn, &contact_keys).await;
    Ok(written)
}

/// The head of an insert into `jobs_delivered`: its column list (the `SELECT` follows).
macro_rules! insert_delivered {
    () => {
        r#"
            INSERT INTO contact_sync.jobs_delivered
                (id, provider, account, email, payload, state, attempts, max_attempts, run_at,
                 created_at, locked_by, finished_at, last_error, errors, coalesced_into, doi,
                 resend_after, outcome, overtaken_by, waits_for)
"#
    };
}

/// The tail of an insert into `jobs_delivered`: an id already there can only be a row written
/// by hand (e.g. an archive reloaded with ids the queue had not issued yet). The job delivered
/// now is the one that holds the id, and its outcome must be recorded, or it would be sent
/// again.
macro_rules! on_delivered_id_taken {
    () => {
        r#"
            ON CONFLICT (id) DO UPDATE
                SET provider = EXCLUDED.provider, account = EXCLUDED.account, email = EXCLUDED.email,
                    payload = EXCLUDED.payload, state = EXCLUDED.state, attempts = EXCLUDED.attempts,
                    max_attempts = EXCLUDED.max_attempts, run_at = EXCLUDED.run_at,
                    created_at = EXCLUDED.created_at, locked_until = NULL, locked_by = EXCLUDED.locked_by,
                    finished_at = EXCLUDED.finished_at, last_error = EXCLUDED.last_error,
                    errors = EXCLUDED.errors, coalesced_into = EXCLUDED.coalesced_into, doi = EXCLUDED.doi,
                    resend_after = EXCLUDED.resend_after, outcome = EXCLUDED.outcome,
                    overtaken_by = EXCLUDED.overtaken_by, waits_for = EXCLUDED.waits_for
"#
    };
}

/// How long a completion that writes the double-opt-in ledger waits for a lock.
const LEDGER_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '20ms'";

/// What [`write_successes`] did.
struct Outcomes {
    written: Written,
    /// The heads it wrote, `succeeded` or back to `pending` (changed while in flight), by the
    /// lease written (of two outcomes of one job in a batch, only the one whose lease held).
    done: HashSet<Lease>,
    /// Those that ended `succeeded` (the change delivered was the change recorded).
    as_sent: HashSet<Lease>,
    /// The contacts of the calls' rows (heads and followers) as they are now, once each: what
    /// waits behind them is brought back (behind one still open, it is set waiting again by the
    /// next claim).
    contact_keys: Vec<String>,
}

/// A row of [`write_successes`]'s statement: a head written (`succeeded`, or back to `pending`
/// when changed in flight), one held by another transaction (`written` false), or a contact of
/// the calls (`id` NULL).
#[derive(sqlx::FromRow)]
struct WrittenRow {
    /// NULL on the rows that name a contact of the calls (`contact_key`).
    id: Option<JobId>,
    attempts: Option<i32>,
    written: bool,
    as_sent: bool,
    contact_key: Option<String>,
}

impl Outcomes {
    /// Did a job go back to pending, changed while its call was in flight? It keeps the
    /// `run_at` it was queued with, before the claims' floors: the next claim reads from the
    /// start (`claim::rewind_floors`, once the write is committed).
    fn sent_again(&self) -> bool {
        self.done.len() > self.as_sent.len()
    }
}

/// The statement of [`succeed_many`].
async fn write_successes(
    conn: &mut sqlx::PgConnection,
    items: &[Success],
) -> Result<Outcomes, sqlx::Error> {
    let mut ids = Vec::with_capacity(items.len());
    let mut attempts = Vec::with_capacity(items.len());
    let mut dois = Vec::with_capacity(items.len());
    let mut sets_status = Vec::with_capacity(items.len());
    let mut modify_ts = Vec::with_capacity(items.len());
    let mut outcomes = Vec::with_capacity(items.len());
    let mut sent_md5 = Vec::with_capacity(items.len());
    let mut follower_ids = Vec::new();
    let mut follower_heads = Vec::new();
    let mut follower_md5 = Vec::new();
    for item in items {
        ids.push(item.lease.id);
        attempts.push(item.lease.attempt);
        dois.push(item.doi.as_ref().map(|d| d.to_string()));
        sets_status.push(item.sets_status);
        modify_ts.push(item.modify_ts);
        outcomes.push(item.outcome.as_deref());
        sent_md5.push(item.sent_md5.as_str());
        for f in &item.followers {
            follower_ids.push(f.id);
            follower_heads.push(item.lease.id);
            follower_md5.push(f.sent_md5.as_str());
        }
    }
    let rows: Vec<WrittenRow> = sqlx::query_as(concat!(
        // language=PostgreSQL
        r#"
        WITH t AS (
            SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $6::bool[], $7::bigint[], $8::text[], $9::text[])
                 AS t(id, attempt, doi, sets_status, modify_ts, outcome, sent_md5)
        ), m AS (
            SELECT * FROM unnest($4::bigint[], $5::bigint[], $10::text[]) AS m(id, head, sent_md5)
        ), locked AS (
            -- the rows of these calls this statement can take now: one another transaction
            -- holds (an operator's open UPDATE, an application's upsert) is skipped, never
            -- waited for
            SELECT j.id, j.contact_key, md5(j.payload::text) AS md5,
                   j.idempotency_key IS NOT NULL AS keyed
            FROM ONLY contact_sync.jobs j
            -- = ANY(ARRAY(SELECT unnest(...))): primary-key probes whatever the planner
            -- believes of the table's size (a seq scan was planned on statistics of an empty queue)
            WHERE j.id = ANY(ARRAY(SELECT unnest($1::bigint[] || $4::bigint[])))
            ORDER BY j.id
            -- (FOR UPDATE, the lock a delete takes: a row another transaction holds even
            -- `FOR KEY SHARE` is skipped here, not waited for by `moved`)
            FOR UPDATE SKIP LOCKED
        ), held AS (
            -- a call one of whose rows is held elsewhere is written later, whole: a head still
            -- running under this attempt, or a follower still there, that `locked` could not
            -- take (`<> ALL(ARRAY(...))`: one pass over the locked ids per row, in C; the look-ups
            -- are primary-key probes, one per row not locked)
            SELECT t.id FROM t
            WHERE t.id <> ALL(ARRAY(SELECT l.id FROM locked l))
              AND (SELECT p.state = 'running' AND p.attempts = t.attempt
                   FROM ONLY contact_sync.jobs p WHERE p.id = t.id)
            UNION
            SELECT m.head FROM m
            WHERE m.id <> ALL(ARRAY(SELECT l.id FROM locked l))
              AND (SELECT true FROM ONLY contact_sync.jobs p WHERE p.id = m.id)
        ), todo AS (
            -- the heads to write, and whether each is still as its call carried it (the row as
            -- `locked` took it: this statement holds it until the end)
            SELECT t.*, l.md5 = t.sent_md5 AS as_sent, l.keyed FROM t JOIN locked l ON l.id = t.id
            WHERE t.id <> ALL(ARRAY(SELECT h.id FROM held h))
        ), moved AS (
            -- delivered, as its call carried it, without an idempotency key: out of the queue's
            -- table into `jobs_delivered` (below). Keyed jobs stay (`kept`): the unique index
            -- that answers a repeated key is on the queue's table.
            -- (= ANY(ARRAY(...)): primary-key probes, whatever the plan; the state test is
            -- written so that no partial index can serve it: a plan kept from a small queue
            -- read every running job of the fleet through one)
            DELETE FROM ONLY contact_sync.jobs j
            USING todo t
            WHERE j.id = ANY(ARRAY(SELECT todo.id FROM todo WHERE todo.as_sent AND NOT todo.keyed))
              AND j.id = t.id AND coalesce(j.state, '') = 'running' AND j.attempts = t.attempt
            RETURNING j.id, j.provider, j.account, j.email, j.payload, j.attempts, j.max_attempts,
                      j.run_at, j.created_at, j.locked_by, j.last_error, j.errors, j.coalesced_into,
                      coalesce(t.doi, j.doi) AS doi, j.resend_after, t.outcome, j.overtaken_by,
                      j.waits_for, j.contact_key, t.sets_status, t.modify_ts
        ), delivered AS (
"#,
        insert_delivered!(),
        r#"
            SELECT m.id, m.provider, m.account, m.email, m.payload, 'succeeded', m.attempts,
                   m.max_attempts, m.run_at, m.created_at, m.locked_by, now(), m.last_error,
                   m.errors, m.coalesced_into, m.doi, m.resend_after, m.outcome, m.overtaken_by,
                   m.waits_for
            FROM moved m
"#,
        on_delivered_id_taken!(),
        r#"
        ), kept AS (
            -- delivered with an idempotency key: `succeeded` in place; a job changed since the
            -- claim was delivered as it was, and goes back to pending to be sent as it is now
            -- (never `run_at` in the SET list: it would fire the row-level validation trigger,
            -- which fires on that column whatever the value, for every job)
            UPDATE ONLY contact_sync.jobs j
            SET state = CASE WHEN t.as_sent THEN 'succeeded' ELSE 'pending' END,
                finished_at = CASE WHEN t.as_sent THEN now() END,
                locked_until = NULL,
                locked_by = CASE WHEN t.as_sent THEN j.locked_by END,
                -- (a status deferred by a call whose change was edited meanwhile is decided
                -- again when the change is sent as it is now: not recorded)
                doi = CASE WHEN t.as_sent OR t.doi = 'sent' THEN coalesce(t.doi, j.doi) ELSE j.doi END, -- DoiRecord::Sent
                outcome = t.outcome,
                last_error = CASE WHEN t.as_sent THEN j.last_error
                                  ELSE 'changed while its call was in flight: the call delivered it as it was; it is sent again as it is now' END
            FROM todo t
            -- (the rows `locked` holds: their key cannot have changed since)
            WHERE j.id = ANY(ARRAY(SELECT todo.id FROM todo WHERE NOT todo.as_sent OR todo.keyed))
              AND j.id = t.id AND coalesce(j.state, '') = 'running' AND j.attempts = t.attempt
            RETURNING j.id, j.attempts, j.contact_key, t.sets_status, t.modify_ts, j.state = 'succeeded' AS as_sent
        ), done AS (
            SELECT m.id, m.attempts, m.contact_key, m.sets_status, m.modify_ts, true AS as_sent FROM moved m
            UNION ALL
            SELECT k.id, k.attempts, k.contact_key, k.sets_status, k.modify_ts, k.as_sent FROM kept k
        ), watermark AS (
            -- one running job per contact: a contact appears at most once here
            INSERT INTO contact_sync.smartlink_watermarks AS w (contact_key, modify_ts)
            SELECT d.contact_key, d.modify_ts FROM done d WHERE d.modify_ts IS NOT NULL
            ON CONFLICT (contact_key) DO UPDATE
                SET modify_ts = greatest(w.modify_ts, EXCLUDED.modify_ts), updated_at = now()
        ), followers AS (
            -- in id order, up to the first follower changed since the claim (or gone, or moved
            -- to another contact): it and those after it are sent again, in order. The rows as
            -- `locked` took them (the newest versions, never this statement's snapshot: a change
            -- committed in between must be seen), joined by hashing.
            SELECT m.id, m.head, coalesce(l.keyed, false) AS keyed,
                   bool_and(coalesce(l.md5 = m.sent_md5 AND l.contact_key = h.contact_key, false))
                       OVER (PARTITION BY m.head ORDER BY m.id) AS as_sent
            FROM m JOIN locked h ON h.id = m.head
            LEFT JOIN locked l ON l.id = m.id
            WHERE m.head = ANY(ARRAY(SELECT d.id FROM done d WHERE d.as_sent))
        ), merged_moved AS (
            -- (a follower cancelled while its call was in flight was delivered all the same:
            -- said so instead of leaving it `cancelled`)
            DELETE FROM ONLY contact_sync.jobs f
            USING followers m
            WHERE f.id = ANY(ARRAY(SELECT m.id FROM followers m WHERE m.as_sent AND NOT m.keyed))
              AND f.id = m.id AND f.state IN ('pending', 'cancelled')
            RETURNING f.id, f.provider, f.account, f.email, f.payload, f.attempts, f.max_attempts,
                      f.run_at, f.created_at, f.locked_by, f.errors, f.doi, f.resend_after,
                      f.outcome, f.overtaken_by, f.waits_for, f.contact_key, m.head,
                      CASE WHEN f.state = 'cancelled'
                           THEN 'cancelled while being delivered with job ' || m.head || ': delivered all the same'
                           ELSE f.last_error END AS last_error
        ), merged_delivered AS (
"#,
        insert_delivered!(),
        r#"
            SELECT f.id, f.provider, f.account, f.email, f.payload, 'coalesced', f.attempts,
                   f.max_attempts, f.run_at, f.created_at, f.locked_by, now(), f.last_error,
                   f.errors, f.head, f.doi, f.resend_after, f.outcome, f.overtaken_by, f.waits_for
            FROM merged_moved f
"#,
        on_delivered_id_taken!(),
        r#"
        ), merged_kept AS (
            UPDATE ONLY contact_sync.jobs f
            SET state = 'coalesced', finished_at = now(), coalesced_into = m.head,
                last_error = CASE WHEN f.state = 'cancelled'
                                  THEN 'cancelled while being delivered with job ' || m.head || ': delivered all the same'
                                  ELSE f.last_error END
            FROM followers m
            WHERE f.id = ANY(ARRAY(SELECT m.id FROM followers m WHERE m.as_sent AND m.keyed))
              AND f.id = m.id AND f.state IN ('pending', 'cancelled')
            RETURNING f.id
        ), superseded AS (
            -- a status delivered now comes after every confirmation re-send still waiting for
            -- its contact (in delivery order, whatever the ids): those are superseded, queued
            -- or not yet swept
            UPDATE ONLY contact_sync.jobs r
            SET state = 'cancelled', finished_at = now(), doi = 'superseded by job ' || d.id -- DoiRecord::SupersededBy
            FROM done d
            WHERE r.contact_key = ANY(ARRAY(SELECT s.contact_key FROM done s WHERE s.sets_status))
              AND d.sets_status AND r.contact_key = d.contact_key AND r.state = 'pending'
              AND r.resend_after IS NOT NULL
            RETURNING r.id
        ), superseded_deferrals AS (
            -- (a contact's deferral belongs to one of its jobs: to the one delivered now, or
            -- to a re-send it supersedes)
            DELETE FROM contact_sync.doi_deferred f
            WHERE (f.provider || ':' || f.account || ':' || lower(f.email))
                      = ANY(ARRAY(SELECT s.contact_key FROM done s WHERE s.sets_status))
              AND f.job_id <> ALL(ARRAY(SELECT s.id FROM done s WHERE s.sets_status))
            RETURNING f.job_id
        )
        SELECT id, attempts, true AS written, as_sent, NULL::text AS contact_key FROM done
        UNION ALL
        SELECT id, NULL, false, false, NULL FROM held
        UNION ALL
        -- the contacts of every row of these calls, as they are now (a head or a follower moved
        -- to another address leaves its waiting jobs behind in the contact it left)
        SELECT NULL, NULL, false, false, k.contact_key FROM (SELECT DISTINCT l.contact_key FROM locked l) k
        "#,
    ))
    .bind(&ids)
    .bind(&attempts)
    .bind(&dois)
    .bind(&follower_ids)
    .bind(&follower_heads)
    .bind(&sets_status)
    .bind(&modify_ts)
    .bind(&outcomes)
    .bind(&sent_md5)
    .bind(&follower_md5)
    .fetch_all(&mut *conn)
    .await?;
    let done: HashSet<JobId> = rows
        .iter()
        .filter(|r| r.written)
        .filter_map(|r| r.id)
        .collect();
    let lease = |r: &WrittenRow| {
        Some(Lease {
            id: r.id?,
            attempt: r.attempts?,
        })
    };
    let contact_keys: Vec<String> = rows
        .iter()
        .filter(|r| r.id.is_none())
        .filter_map(|r| r.contact_key.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let done_leases: HashSet<Lease> = rows
        .iter()
        .filter(|r| r.written)
        .filter_map(lease)
        .collect();
    let as_sent: HashSet<Lease> = rows
        .iter()
        .filter(|r| r.as_sent)
        .filter_map(lease)
        .collect();
    let held: HashSet<JobId> = rows
        .iter()
        .filter(|r| !r.written)
        .filter_map(|r| r.id)
        .collect();
    let written = Written {
        lost: ids
            .iter()
            .copied()
            .filter(|id| !done.contains(id) && !held.contains(id))
            .collect(),
        held: ids.into_iter().filter(|id| held.contains(id)).collect(),
    };
    Ok(Outcomes {
        written,
        done: done_leases,
        as_sent,
        contact_keys,
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Most entries kept in a job's `errors` history (the oldest go first).
pub const MAX_ERRORS_KEPT: i32 = 100;

/// Whether a retry uses up one of the job's attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A failed attempt.
    Counts,
    /// The provider asked to slow down (429, JustClick code 8): not a failure of the job.
    Throttled,
}

/// A failed call's outcome for [`fail_many`].
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub lease: Lease,
    pub error: &'a AttemptError,
    /// Dead (a permanent failure, or the attempts used up), or back to `pending` after this
    /// long.
    pub retry_after: Option<Duration>,
    /// A retry the provider asked for (throttling): it does not use up an attempt.
    pub attempt: Attempt,
}

/// Records failed calls in one statement, as [`kill`] and [`retry`] would one by one (the
/// same fencing: `(id, attempts, state = 'running')`, rows another transaction holds skipped),
/// then brings back what waits behind them. Returns the leases written (of two outcomes of
/// one job, only the one whose lease held); the caller writes the others one by one, which
/// says whether each was held or lost. One statement a batch: a
/// provider that refuses every change (contacts it does not have, a revoked key) was written
/// at about 700 jobs a second, one transaction and one look-up each.
pub async fn fail_many(pool: &PgPool, items: &[Failure<'_>]) -> Result<Vec<Lease>, sqlx::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<JobId> = items.iter().map(|f| f.lease.id).collect();
    let attempts: Vec<i32> = items.iter().map(|f| f.lease.attempt).collect();
    let delays: Vec<Option<i64>> = items.iter().map(|f| f.retry_after.map(millis)).collect();
    let throttled: Vec<bool> = items
        .iter()
        .map(|f| f.attempt == Attempt::Throttled)
        .collect();
    let kinds: Vec<&str> = items.iter().map(|f| f.error.kind.as_str()).collect();
    let messages: Vec<String> = items.iter().map(|f| storable(&f.error.message)).collect();
    let codes: Vec<Option<String>> = items
        .iter()
        .map(|f| f.error.code.as_deref().map(storable))
        .collect();
    let mut conn = pool.acquire().await?;
    let written: Vec<(JobId, i32)> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        WITH t AS (
            SELECT * FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bool[], $5::text[], $6::text[], $7::text[])
                 AS t(id, attempt, delay_ms, throttled, kind, message, code)
        ), locked AS (
            -- (rows another transaction holds are skipped, never waited for; primary-key probes)
            SELECT j.id FROM ONLY contact_sync.jobs j
            WHERE j.id = ANY(ARRAY(SELECT unnest($1::bigint[])))
            ORDER BY j.id
            FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE ONLY contact_sync.jobs j
        SET state = CASE WHEN t.delay_ms IS NULL THEN 'dead' ELSE 'pending' END,
            finished_at = CASE WHEN t.delay_ms IS NULL THEN now() END,
            -- (unchanged for a dead job: the row-level validation trigger fires on run_at only
            -- when the value is not finite)
            run_at = CASE WHEN t.delay_ms IS NULL THEN j.run_at
                          ELSE now() + make_interval(secs => t.delay_ms / 1000.0) END,
            locked_until = NULL, locked_by = NULL,
            attempts = CASE WHEN t.delay_ms IS NOT NULL AND t.throttled THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
            last_error = t.message,
            errors = (CASE WHEN jsonb_array_length(j.errors) >= $8 THEN j.errors - 0 ELSE j.errors END)
                     || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempts, 'at', now(), 'kind', t.kind, 'code', t.code, 'error', t.message))
        FROM t
        WHERE j.id = ANY(ARRAY(SELECT id FROM locked)) AND j.id = t.id
          AND j.attempts = t.attempt AND j.state = 'running'
        -- (the lease written: a throttled retry's attempts go back one)
        RETURNING j.id, t.attempt
        "#,
    )
    .persistent(false)
    .bind(&ids)
    .bind(&attempts)
    .bind(&delays)
    .bind(&throttled)
    .bind(&kinds)
    .bind(&messages)
    .bind(&codes)
    .bind(MAX_ERRORS_KEPT)
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<JobId> = written.iter().map(|(id, _)| *id).collect();
    // what waits behind these calls comes first now (a failure here is the sweep's)
    super::claim::requeue_next_or_leave_to_sweep(&mut conn, &ids, false).await;
    Ok(written
        .into_iter()
        .map(|(id, attempt)| Lease { id, attempt })
        .collect())
}

/// Records a retryable failure: back to `pending` at `now() + delay`.
pub async fn retry(
    pool: &PgPool,
    lease: Lease,
    delay: Duration,
    error: &AttemptError,
    attempt: Attempt,
) -> Result<Write, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let result = sqlx::query(
        // language=PostgreSQL
        r#"
        UPDATE ONLY contact_sync.jobs
        SET state = 'pending', run_at = now() + make_interval(secs => $3::bigint / 1000.0),
            locked_until = NULL, locked_by = NULL,
            attempts = CASE WHEN $7 THEN greatest(attempts - 1, 0) ELSE attempts END,
            last_error = $5,
            errors = (CASE WHEN jsonb_array_length(errors) >= $8 THEN errors - 0 ELSE errors END)
                     || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'kind', $4::text, 'code', $6::text, 'error', $5::text))
        WHERE id = $1 AND attempts = $2 AND state = 'running'
          AND id IN (SELECT id FROM ONLY contact_sync.jobs WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED)
        "#,
    ).persistent(false)
    .bind(lease.id)
    .bind(lease.attempt)
    .bind(millis(delay))
    .bind(&error.kind)
    .bind(storable(&error.message))
    .bind(error.code.as_deref().map(storable))
    .bind(attempt == Attempt::Throttled)
    .bind(MAX_ERRORS_KEPT)
    .execute(&mut *conn)
    .await?;
    if result.rows_affected() == 1 {
        // a lower change found behind this call now comes first
        super::claim::requeue_next_or_leave_to_sweep(&mut conn, &[lease.id], false).await;
    }
    written_or_why(pool, lease, result.rows_affected()).await
}

/// Records a failed attempt whose request the provider may still be acting on (a timeout, a
/// reset after the request was sent, a gateway timeout): the job stays `running`, owned by no
/// worker, until `hold` has passed (or `delay`, if longer), so nothing more is sent for its
/// contact and its account's in-flight slot stays taken; the rescuer then puts it back to
/// `pending` (or `dead`, if that was its last attempt).
///
/// `sent_modify_ts`: the Smartlink `modify_ts` the request carried (the provider holds it if the
/// request arrived; see `synced::unanswered_calls_ctes`).
pub async fn hold(
    pool: &PgPool,
    lease: Lease,
    hold: Duration,
    error: &AttemptError,
    sent_modify_ts: Option<i64>,
) -> Result<Write, sqlx::Error> {
    let result = sqlx::query(&format!(
        // language=PostgreSQL
        r#"
        -- the provider may hold this call or not
        WITH {unanswered}
        UPDATE ONLY contact_sync.jobs
        SET locked_until = now() + make_interval(secs => $3::bigint / 1000.0), locked_by = NULL,
            last_error = $5 || ' (the provider may still be acting on this request: nothing more is sent for the contact before '
                         || (now() + make_interval(secs => $3::bigint / 1000.0))::text || ')',
            errors = (CASE WHEN jsonb_array_length(errors) >= $7 THEN errors - 0 ELSE errors END)
                     || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'kind', $4::text, 'code', $6::text, 'error', $5::text))
        WHERE id = $1 AND attempts = $2 AND state = 'running'
          AND id IN (SELECT id FROM ONLY contact_sync.jobs WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED)
        "#,
        unanswered = super::synced::unanswered_calls_ctes(
            "ARRAY[$1::bigint]",
            sent_modify_ts.map(|_| "$8::bigint")
        )
    )).persistent(false)
    .bind(lease.id)
    .bind(lease.attempt)
    .bind(millis(hold))
    .bind(&error.kind)
    .bind(storable(&error.message))
    .bind(error.code.as_deref().map(storable))
    .bind(MAX_ERRORS_KEPT)
    .bind(sent_modify_ts)
    .execute(pool)
    .await?;
    written_or_why(pool, lease, result.rows_affected()).await
}

/// Why a fenced write of one row touched nothing: the lease was lost, or the row is held by
/// another transaction right now.
async fn written_or_why(pool: &PgPool, lease: Lease, rows: u64) -> Result<Write, sqlx::Error> {
    if rows == 1 {
        return Ok(Write::Done);
    }
    let ours: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM ONLY contact_sync.jobs WHERE id = $1 AND attempts = $2 AND state = 'running')",
    )
    .persistent(false)
    .bind(lease.id)
    .bind(lease.attempt)
    .fetch_one(pool)
    .await?;
    Ok(if ours { Write::Held } else { Write::Lost })
}

/// A retryable failure: [`retry`], or [`kill`] once the job has used its `max_attempts`.
/// Returns the new state, or why nothing was written.
pub async fn retry_or_kill(
    pool: &PgPool,
    lease: Lease,
    max_attempts: i32,
    delay: Duration,
    error: &AttemptError,
    attempt: Attempt,
) -> Result<Result<JobState, Write>, sqlx::Error> {
    let (write, state) = if attempt == Attempt::Counts && lease.attempt >= max_attempts {
        (kill(pool, lease, error).await?, JobState::Dead)
    } else {
        (
            retry(pool, lease, delay, error, attempt).await?,
            JobState::Pending,
        )
    };
    Ok(match write {
        Write::Done => Ok(state),
        other => Err(other),
    })
}

/// Parks a job as `dead` (permanent failure or attempts exhausted).
pub async fn kill(pool: &PgPool, lease: Lease, error: &AttemptError) -> Result<Write, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let result = sqlx::query(
        // language=PostgreSQL
        r#"
        UPDATE ONLY contact_sync.jobs
        SET state = 'dead', finished_at = now(), locked_until = NULL, locked_by = NULL,
            last_error = $4,
            errors = (CASE WHEN jsonb_array_length(errors) >= $6 THEN errors - 0 ELSE errors END)
                     || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'at', now(), 'kind', $3::text, 'code', $5::text, 'error', $4::text))
        WHERE id = $1 AND attempts = $2 AND state = 'running'
          AND id IN (SELECT id FROM ONLY contact_sync.jobs WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED)
        "#,
    ).persistent(false)
    .bind(lease.id)
    .bind(lease.attempt)
    .bind(&error.kind)
    .bind(storable(&error.message))
    .bind(error.code.as_deref().map(storable))
    .bind(MAX_ERRORS_KEPT)
    .execute(&mut *conn)
    .await?;
    if result.rows_affected() == 1 {
        super::claim::requeue_next_or_leave_to_sweep(&mut conn, &[lease.id], false).await;
    }
    written_or_why(pool, lease, result.rows_affected()).await
}

/// Puts claimed jobs back to `pending`, runnable now. `undo_attempt` for jobs whose call never
/// started (shutdown before they ran, or a job of an account this worker cannot serve). Rows
/// another transaction holds are skipped (their leases bring them back).
pub async fn release(
    pool: &PgPool,
    leases: &[Lease],
    undo_attempt: bool,
) -> Result<u64, sqlx::Error> {
    if leases.is_empty() {
        return Ok(0);
    }
    let (ids, attempts): (Vec<JobId>, Vec<i32>) = leases.iter().map(|l| (l.id, l.attempt)).unzip();
    let mut conn = pool.acquire().await?;
    let result = sqlx::query(
        // language=PostgreSQL
        r#"
        UPDATE ONLY contact_sync.jobs j
        SET state = 'pending', locked_until = NULL, locked_by = NULL, run_at = now(),
            attempts = CASE WHEN $3 THEN greatest(j.attempts - 1, 0) ELSE j.attempts END
        FROM unnest($1::bigint[], $2::int[]) AS t(id, attempt)
        WHERE j.id = t.id AND j.state = 'running' AND j.attempts = t.attempt
          AND j.id IN (SELECT id FROM ONLY contact_sync.jobs WHERE id = ANY(ARRAY(SELECT unnest($1::bigint[]))) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED)
        "#,
    )
    .persistent(false)
    .bind(&ids)
    .bind(&attempts)
    .bind(undo_attempt)
    .execute(&mut *conn)
    .await?;
    if result.rows_affected() > 0 {
        super::claim::requeue_next_or_leave_to_sweep(&mut conn, &ids, false).await;
    }
    Ok(result.rows_affected())
}

/// [`release`] of one claim, saying why nothing was written.
pub async fn release_one(
    pool: &PgPool,
    lease: Lease,
    undo_attempt: bool,
) -> Result<Write, sqlx::Error> {
    let n = release(pool, &[lease], undo_attempt).await?;
    written_or_why(pool, lease, n).await
}

/// Calls abandoned while in flight (a forced or timed-out shutdown): the provider may still act
/// on them, so their jobs stay `running`, owned by no worker, for `hold` (see [`hold`]); with
/// a zero `hold` they go back to `pending` at once. Rows another transaction holds are skipped
/// (their leases bring them back, later still). Returns how many were written.
pub async fn abandon(pool: &PgPool, leases: &[Lease], hold: Duration) -> Result<u64, sqlx::Error> {
    if leases.is_empty() {
        return Ok(0);
    }
    let (ids, attempts): (Vec<JobId>, Vec<i32>) = leases.iter().map(|l| (l.id, l.attempt)).unzip();
    if hold.is_zero() {
        // the provider may hold these calls or not
        super::synced::forget_contacts_of(pool, &ids, None).await?;
        return release(pool, leases, false).await;
    }
    let result = sqlx::query(&format!(
        // language=PostgreSQL
        r#"
        -- the provider may hold these calls or not
        WITH {unanswered}
        UPDATE ONLY contact_sync.jobs j
        SET locked_until = now() + make_interval(secs => $3::bigint / 1000.0), locked_by = NULL,
            last_error = 'the worker stopped waiting for this call (shutdown); the provider may still act on it until ' || (now() + make_interval(secs => $3::bigint / 1000.0))::text,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempts, 'at', now(), 'kind', 'abandoned', 'code', NULL,
                'error', 'the worker stopped waiting for this call (shutdown)'))
        FROM unnest($1::bigint[], $2::int[]) AS t(id, attempt)
        WHERE j.id = t.id AND j.state = 'running' AND j.attempts = t.attempt
          AND j.id IN (SELECT id FROM ONLY contact_sync.jobs WHERE id = ANY(ARRAY(SELECT unnest($1::bigint[]))) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED)
        "#,
        unanswered = super::synced::unanswered_calls_ctes("$1::bigint[]", None)
    ))
    .persistent(false)
    .bind(&ids)
    .bind(&attempts)
    .bind(millis(hold))
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
