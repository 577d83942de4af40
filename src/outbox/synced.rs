//! What each provider was last sent (`contact_sync.synced`), per captured account and contact:
//! written after a delivery, read by a backfill to queue only what differs and by a claim so
//! that the worker does not send what the provider already holds.

use super::job::JobId;
use serde_json::{Map, Value};

/// One delivered call, as synced state records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub provider: String,
    pub account: String,
    pub email: String,
    /// The fields the call carried.
    pub fields: Value,
    /// The newest job the call covered.
    pub job_id: JobId,
}

/// Merges delivered calls into the synced state, in the order given within one contact (one
/// call per contact in a batch of completions: a contact never has two calls in flight).
pub async fn record(conn: &mut sqlx::PgConnection, calls: &[Delivered]) -> Result<(), sqlx::Error> {
    if calls.is_empty() {
        return Ok(());
    }
    let providers: Vec<&str> = calls.iter().map(|c| c.provider.as_str()).collect();
    let accounts: Vec<&str> = calls.iter().map(|c| c.account.as_str()).collect();
    let emails: Vec<&str> = calls.iter().map(|c| c.email.as_str()).collect();
    let fields: Vec<&Value> = calls.iter().map(|c| &c.fields).collect();
    let ids: Vec<JobId> = calls.iter().map(|c| c.job_id).collect();
    sqlx::query(
        // one row per contact: its calls merged in the order given
        r#"
        WITH calls AS (
            SELECT c.provider || ':' || c.account || ':' || lower(c.email) AS contact_key, c.fields, c.id, c.n
            FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bigint[])
                 WITH ORDINALITY AS c(provider, account, email, fields, id, n)
        ), merged AS (
            SELECT contact_key, max(id) AS id, contact_sync.merge_all(array_agg(fields ORDER BY n)) AS fields
            FROM calls GROUP BY contact_key
        )
        INSERT INTO contact_sync.synced AS s (contact_key, fields, job_id)
        SELECT m.contact_key, m.fields, m.id FROM merged m ORDER BY m.contact_key
        -- whatever the job ids: the provider holds what reached it last, and a contact's calls
        -- reach it one after the other, in the order their completions commit (a change
        -- committed late, with a lower id, or a job sent again after an edit in flight, is
        -- the newest call all the same)
        ON CONFLICT (contact_key) DO UPDATE
            SET fields = contact_sync.merge_sent(s.fields, EXCLUDED.fields), job_id = EXCLUDED.job_id,
                synced_at = now()
        "#,
    )
    // (run on the hot path's sessions only, in the completion's transaction: see `outbox::hot`)
    .bind(&providers)
    .bind(&accounts)
    .bind(&emails)
    .bind(&fields)
    .bind(&ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// The fields of `fields` that differ from what was last sent (`known`): everything for a
/// contact never sent; Smartlink attributes key by key; `modify_ts` is carried along whenever
/// something else is sent.
pub fn differing(
    fields: &Map<String, Value>,
    known: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let Some(known) = known else {
        return fields.clone();
    };
    let mut out = Map::new();
    for (key, value) in fields {
        if key == "modify_ts" {
            continue;
        }
        if key == "attributes" {
            if let (Value::Object(now), old) = (value, known.get("attributes")) {
                let old = old.and_then(Value::as_object);
                let changed: Map<String, Value> = now
                    .iter()
                    .filter(|(k, v)| old.and_then(|o| o.get(*k)) != Some(*v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !changed.is_empty() {
                    out.insert(key.clone(), Value::Object(changed));
                }
                continue;
            }
        }
        if known.get(key) != Some(value) {
            out.insert(key.clone(), value.clone());
        }
    }
    if !out.is_empty() {
        if let Some(ts) = fields.get("modify_ts") {
            out.insert("modify_ts".into(), ts.clone());
        }
    }
    out
}

/// What was last sent to `account` (of `provider`) for each of `emails` (`None`: never).
pub async fn known(
    conn: &mut sqlx::PgConnection,
    provider: &str,
    account: &str,
    emails: &[String],
) -> Result<Vec<Option<Map<String, Value>>>, sqlx::Error> {
    // (fields the JSON decoder refuses, left by an edit by hand, read as never sent)
    let rows: Vec<(i64, super::inspect::StoredJson)> = sqlx::query_as(
        "SELECT e.n, s.fields FROM unnest($3::text[]) WITH ORDINALITY AS e(email, n) \
         JOIN contact_sync.synced s ON s.contact_key = $1 || ':' || $2 || ':' || lower(e.email)",
    )
    .bind(provider)
    .bind(account)
    .bind(emails)
    .fetch_all(conn)
    .await?;
    let mut out = vec![None; emails.len()];
    for (n, fields) in rows {
        if let (Some(slot), Value::Object(map)) = (
            usize::try_from(n - 1).ok().and_then(|i| out.get_mut(i)),
            fields.0,
        ) {
            *slot = Some(map);
        }
    }
    Ok(out)
}

/// Records `fields` as sent without sending them (`backfill --baseline-only`): merged into what
/// is known; a real delivery, whatever its job, is newer.
pub async fn baseline(
    conn: &mut sqlx::PgConnection,
    provider: &str,
    account: &str,
    emails: &[String],
    fields: &[Value],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contact_sync.synced AS s (contact_key, fields, job_id) \
         SELECT DISTINCT ON (1) $1 || ':' || $2 || ':' || lower(e.email), e.fields - 'modify_ts', 0 \
         FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS e(email, fields, n) ORDER BY 1, e.n DESC \
         ON CONFLICT (contact_key) DO UPDATE SET fields = contact_sync.merge_sent(s.fields, EXCLUDED.fields), synced_at = now()",
    )
    .bind(provider)
    .bind(account)
    .bind(emails)
    .bind(fields)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets what was last sent to `account` for `emails` (a forced resync: the provider may have
/// been edited by hand), so that the worker sends their changes instead of finding them held.
pub async fn forget(
    conn: &mut sqlx::PgConnection,
    provider: &str,
    account: &str,
    emails: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM contact_sync.synced \
         WHERE contact_key = ANY(ARRAY(SELECT $1 || ':' || $2 || ':' || lower(e) FROM unnest($3::text[]) e))",
    )
    .bind(provider)
    .bind(account)
    .bind(emails)
    .execute(conn)
    .await?;
    Ok(())
}

/// The common table expressions (`forgotten`, `uncertain`) a statement adds for calls that may
/// have reached the provider without an answer (a timeout, a worker gone mid-call, a call
/// abandoned at shutdown), the calls of the jobs `heads` (an SQL `bigint[]` expression):
/// - `forgotten`: what the provider was last sent for their contacts is no longer known, so
///   the contact's next change is sent whole, never skipped as already held;
/// - `uncertain`: a Smartlink contact's provider may now hold anything up to the newest
///   `modify_ts` such a call may have carried (the head's, or that of a later change of the
///   contact that may have ridden along), so a change older than that is never merged into a
///   newer one (`providers::payload::HeldModifyTs`). `sent_modify_ts`: an SQL expression for
///   the `modify_ts` the call carried, when the worker that made it knows it; otherwise the
///   newest of the head's and of the contact's later pending or cancelled changes (those that
///   may have ridden along), an over-count that only sends more calls alone.
pub(crate) fn unanswered_calls_ctes(heads: &str, sent_modify_ts: Option<&str>) -> String {
    let newest = sent_modify_ts.map_or_else(newest_modify_ts_behind_head, str::to_string);
    format!(
        r#"forgotten AS (
            DELETE FROM contact_sync.synced s
            WHERE s.contact_key = ANY(ARRAY(SELECT x.contact_key FROM contact_sync.jobs x WHERE x.id = ANY({heads})))
        ), uncertain AS (
            INSERT INTO contact_sync.smartlink_watermarks AS w (contact_key, uncertain_ts)
            -- (one row per contact: two calls of one contact, a stale one among them, are
            -- one upsert)
            SELECT n.contact_key, max(n.ts) FROM (
                SELECT x.contact_key, {newest} AS ts
                FROM contact_sync.jobs x
                WHERE x.id = ANY({heads}) AND x.provider = 'smartlink' AND x.contact_key IS NOT NULL) n
            WHERE n.ts IS NOT NULL
            GROUP BY n.contact_key
            ON CONFLICT (contact_key) DO UPDATE
                SET uncertain_ts = greatest(w.uncertain_ts, EXCLUDED.uncertain_ts), updated_at = now()
        )"#
    )
}

/// The newest `modify_ts` an unanswered call of the head `x` may have carried, when the worker
/// that made it is gone (see [`unanswered_calls_ctes`]).
fn newest_modify_ts_behind_head() -> String {
    // A change's modify_ts as the worker reads it: the payload's integer (as JSON text: a
    // `5000.0` is not one), else the enqueue time. Nested so that the cast only ever sees a
    // number; never a cast that can fail on odd input.
    const TS: &str = "CASE WHEN jsonb_typeof(c.payload -> 'modify_ts') = 'number' THEN \
            CASE WHEN (c.payload ->> 'modify_ts') ~ '^-?[0-9]{1,19}$' \
                  AND (c.payload ->> 'modify_ts')::numeric \
                      BETWEEN -9223372036854775808 AND 9223372036854775807 \
                 THEN (c.payload ->> 'modify_ts')::numeric END END";
    const ENQUEUED: &str = "floor(extract(epoch FROM c.created_at) * 1000)::numeric";
    format!(
        r#"(SELECT max(coalesce({TS}, {ENQUEUED}))::bigint FROM (
                       SELECT x.payload, x.created_at
                       UNION ALL
                       -- (at most `worker.max_coalesce` ride along)
                       (SELECT f.payload, f.created_at FROM ONLY contact_sync.jobs f
                        WHERE f.contact_key = x.contact_key AND f.state = 'pending' AND f.id > x.id
                        ORDER BY f.id LIMIT 1000)
                       UNION ALL
                       (SELECT f.payload, f.created_at FROM ONLY contact_sync.jobs f
                        WHERE f.contact_key = x.contact_key AND f.state = 'cancelled' AND f.id > x.id
                        ORDER BY f.id LIMIT 1000)) c)"#
    )
}

/// Records that the calls of these jobs may have reached the provider without an answer (see
/// `unanswered_calls_ctes`; `complete::hold`, `complete::abandon` and the rescuer do the
/// same in their own statements).
/// `sent_modify_ts`: the Smartlink `modify_ts` the call carried, when known (one job).
pub async fn forget_contacts_of(
    pool: &sqlx::PgPool,
    ids: &[i64],
    sent_modify_ts: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "WITH {} SELECT 1",
        unanswered_calls_ctes("$1::bigint[]", sent_modify_ts.map(|_| "$2::bigint"))
    ))
    .persistent(false)
    .bind(ids)
    .bind(sent_modify_ts)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn only_what_differs_is_sent() {
        let now = map(
            json!({"tags": ["a"], "language": "en", "attributes": {"plan": "pro", "level": 3}, "modify_ts": 9}),
        );
        assert_eq!(differing(&now, None), now, "never sent: everything");
        let known = map(
            json!({"tags": ["a"], "language": "de", "attributes": {"plan": "pro", "level": 2}}),
        );
        assert_eq!(
            Value::Object(differing(&now, Some(&known))),
            json!({"language": "en", "attributes": {"level": 3}, "modify_ts": 9})
        );
        let same = map(
            json!({"tags": ["a"], "language": "en", "attributes": {"plan": "pro", "level": 3}}),
        );
        assert!(
            differing(&now, Some(&same)).is_empty(),
            "unchanged: nothing, not even modify_ts"
        );
    }
}
