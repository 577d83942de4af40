//! Enqueue: validation, idempotency, transactions, batch and bulk forms.

use crate::helpers::*;
use contact_sync::outbox::inspect;
use contact_sync::outbox::{enqueue, enqueue_batch, NewJob};
use serde_json::json;

async fn sql_error(env: &TestEnv, sql: &str) -> (String, String) {
    let err = sqlx::query(sql).execute(&env.pool).await.unwrap_err();
    let db = err.as_database_error().expect("database error");
    (db.code().unwrap().to_string(), db.message().to_string())
}

#[tokio::test]
async fn sql_function_validates_with_clear_messages() {
    let env = TestEnv::new().await;
    let cases = [
        ("SELECT contact_sync.enqueue('mailchimp', 'jc', 'a@b.co')", "unknown provider"),
        ("SELECT contact_sync.enqueue('justclick', 'jc', 'not-an-email')", "malformed email"),
        ("SELECT contact_sync.enqueue('justclick', 'jc', 'a b@c.co')", "malformed email"),
        ("SELECT contact_sync.enqueue('justclick', 'jc', 'a@b.co', '[1]')", "must be a JSON object"),
        ("SELECT contact_sync.enqueue('justclick', 'jc', 'a@b.co', '{\"lead_nmae\": \"x\"}')", "unknown justclick payload key 'lead_nmae'"),
        ("SELECT contact_sync.enqueue('justclick', 'jc', 'a@b.co', '{\"lead_name\": 5}')", "lead_name must be a string"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"subscribe\": 2}')", "subscribe must be one of"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"openid\": \"123456789012345678901\"}')", "openid"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"location\": \"US\"}')", "location"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"lead_name\": \"x\"}')", "unknown smartlink payload key"),
        ("SELECT contact_sync.enqueue('justclick', 'JC-Main', 'a@b.co')", "invalid account name"),
        // nested arrays (a lax JSON path unwrapped them)
        ("SELECT contact_sync.enqueue('justclick', 'jc', 'a@b.co', '{\"lead_tags\": [[\"a\"]]}')", "lead_tags must be a string or an array of strings"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"tags\": [[\"a\"]]}')", "tags must be an array of strings"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"preferences\": [\"a\", [\"b\"]]}')", "preferences must be an array of strings"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"attributes\": {\"k\": [1, \"x\", true]}}')", "values must be strings, numbers or booleans"),
        ("SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{\"attributes\": {\"k\": []}}')", "values must be strings, numbers or booleans"),
    ];
    for (sql, expected) in cases {
        let (code, message) = sql_error(&env, sql).await;
        assert_eq!(code, "22023", "{sql}: {message}");
        assert!(message.contains(expected), "{sql}: {message}");
    }
    let long_name = "x".repeat(256);
    let (_, message) = sql_error(
        &env,
        &format!("SELECT contact_sync.enqueue('justclick', 'jc', 'a@b.co', '{{\"lead_name\": \"{long_name}\"}}')"),
    )
    .await;
    assert!(message.contains("longer than 255"), "{message}");
    let too_many_tags: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    let (_, message) = sql_error(
        &env,
        &format!(
            "SELECT contact_sync.enqueue('smartlink', 'sl', 'a@b.co', '{}')",
            json!({"tags": too_many_tags})
        ),
    )
    .await;
    assert!(message.contains("more than 100"), "{message}");
    // a direct INSERT obeys the same rules (the insert trigger)
    let (code, message) = sql_error(
        &env,
        "INSERT INTO contact_sync.jobs (provider, account, email, payload) VALUES ('justclick', 'jc', 'x', '{}')",
    )
    .await;
    assert_eq!(code, "22023");
    assert!(message.contains("malformed email"));
    assert_eq!(env.count("pending").await, 0);
}

#[tokio::test]
async fn sql_injection_looking_values_are_just_data() {
    let env = TestEnv::new().await;
    let evil = "Robert'); DROP TABLE contact_sync.jobs;--";
    let id = env
        .enqueue(jc("bobby@example.com", json!({"lead_name": evil})))
        .await;
    let row = env.job(id).await;
    assert_eq!(row.payload["lead_name"], evil);
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(id).await.state, "succeeded");
    let contact = env
        .sandbox
        .contact("justclick", JC_LOGIN, "bobby@example.com")
        .unwrap();
    assert_eq!(contact.fields["lead_name"], evil);
}

#[tokio::test]
async fn idempotency_key_returns_the_existing_job() {
    let env = TestEnv::new().await;
    let a = env
        .enqueue(jc("a@example.com", json!({"lead_name": "A"})).idempotency_key("k1"))
        .await;
    let b = env
        .enqueue(jc("a@example.com", json!({"lead_name": "B"})).idempotency_key("k1"))
        .await;
    assert_eq!(a, b);
    let c = env
        .enqueue(jc("a@example.com", json!({"lead_name": "C"})).idempotency_key("k2"))
        .await;
    assert_ne!(a, c);
    let sql_id: i64 = sqlx::query_scalar(
        "SELECT contact_sync.enqueue('justclick', 'jc', 'a@example.com', '{}', 'k1')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(sql_id, a);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
    assert_eq!(env.job(a).await.payload["lead_name"], "A");
}

#[tokio::test]
async fn rollback_drops_the_job_and_commit_keeps_it() {
    let env = TestEnv::new().await;
    let mut tx = env.pool.begin().await.unwrap();
    enqueue(&mut tx, &jc("gone@example.com", json!({})))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    let kept = enqueue(&mut tx, &jc("kept@example.com", json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM contact_sync.jobs")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![kept]);
}

#[tokio::test]
async fn batch_enqueue_is_one_statement_with_the_same_rules() {
    let env = TestEnv::new().await;
    let existing = env
        .enqueue(jc("x@example.com", json!({})).idempotency_key("dup"))
        .await;
    let jobs = vec![
        jc("a@example.com", json!({"lead_name": "A"})),
        sl("b@example.com", json!({"subscribe": 1})),
        jc("x@example.com", json!({})).idempotency_key("dup"),
        jc("c@example.com", json!({})).idempotency_key("new"),
        jc("c@example.com", json!({})).idempotency_key("new"),
        jc("d@example.com", json!({})),
    ];
    let mut conn = env.pool.acquire().await.unwrap();
    let ids = enqueue_batch(&mut conn, &jobs).await.unwrap();
    assert_eq!(ids.len(), 6);
    assert_eq!(ids[2], existing);
    assert_eq!(ids[3], ids[4]);
    assert!(ids[0] < ids[1] && ids[1] < ids[5]);
    let emails: Vec<String> =
        sqlx::query_scalar("SELECT email FROM contact_sync.jobs WHERE id = ANY($1) ORDER BY id")
            .bind(&ids)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        emails,
        [
            "x@example.com",
            "a@example.com",
            "b@example.com",
            "c@example.com",
            "d@example.com"
        ]
    );
    // modify_ts defaulted for Smartlink
    assert!(env.job(ids[1]).await.payload["modify_ts"].as_i64().unwrap() > 1_700_000_000_000);
    // one bad row rejects the whole batch with a clear error
    let bad = vec![jc("ok@example.com", json!({})), jc("bad", json!({}))];
    let err = enqueue_batch(&mut conn, &bad).await.unwrap_err();
    assert!(err.is_invalid(), "{err}");
    assert!(err.to_string().contains("malformed email"), "{err}");
}

#[tokio::test]
async fn rust_api_reports_validation_errors_as_invalid() {
    let env = TestEnv::new().await;
    let mut conn = env.pool.acquire().await.unwrap();
    let err = enqueue(
        &mut conn,
        &NewJob::new("smartlink", "sl", "a@b.co", json!({"update_strategy": 9})),
    )
    .await
    .unwrap_err();
    assert!(err.is_invalid());
    assert!(err.to_string().contains("update_strategy"), "{err}");
}

#[tokio::test]
async fn hand_written_updates_are_validated_too() {
    let env = TestEnv::new().await;
    let id = env.enqueue(jc("u@example.com", json!({}))).await;
    let err =
        sqlx::query("UPDATE contact_sync.jobs SET payload = '{\"lead_city\": 7}' WHERE id = $1")
            .bind(id)
            .execute(&env.pool)
            .await
            .unwrap_err();
    assert!(
        err.to_string().contains("lead_city must be a string"),
        "{err}"
    );
    // the worker's own state updates are not re-validated, and work
    sqlx::query("UPDATE contact_sync.jobs SET run_at = now() WHERE id = $1")
        .bind(id)
        .execute(&env.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn non_finite_run_at_is_refused() {
    let env = TestEnv::new().await;
    for when in ["-infinity", "infinity"] {
        let err = sqlx::query_scalar::<_, i64>(&format!(
            "SELECT contact_sync.enqueue('justclick', 'jc', 'a@example.com', '{{}}', NULL, '{when}')"
        ))
        .fetch_one(&env.pool)
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("run_at must be a finite time"),
            "{err}"
        );
        let err = sqlx::query(&format!(
            "INSERT INTO contact_sync.jobs (provider, account, email, run_at) VALUES ('justclick', 'jc', 'a@example.com', '{when}')"
        ))
        .execute(&env.pool)
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("run_at must be a finite time"),
            "{err}"
        );
    }
    // Several faults in one statement: a row's run_at is checked as the row is written (the
    // table's own check), then the account of every row, then every row's fields, whichever
    // row comes first.
    sqlx::query("INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc', 'justclick')")
        .execute(&env.pool)
        .await
        .unwrap();
    for (rows, expected) in [
        (
            "('smartlink', 'zz', 'bad', now()), ('smartlink', 'zz', 'a@b.co', 'infinity')",
            "run_at must be a finite time",
        ),
        (
            "('nope', 'zz', 'a@b.co', now()), ('justclick', 'zz', 'a@b.co', '-infinity')",
            "run_at must be a finite time",
        ),
        (
            "('smartlink', 'zz', 'a@b.co', now()), ('smartlink', 'zz', 'bad', now())",
            "malformed email",
        ),
        (
            "('justclick', 'zz', 'bad', now()), ('smartlink', 'jc', 'a@b.co', now())",
            "is a justclick account, not smartlink",
        ),
    ] {
        let err = sqlx::query(&format!(
            "INSERT INTO contact_sync.jobs (provider, account, email, run_at) VALUES {rows}"
        ))
        .execute(&env.pool)
        .await
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{rows}: {err}");
    }
    inspect::status(&env.pool).await.unwrap();
}

/// The table's own check holds where the triggers do not run (`pg_restore --disable-triggers`,
/// `session_replication_role = replica`) and for hand-written updates of any column: a time no
/// reader can represent (one such job failed every claim of its account, or stopped the worker),
/// an attempt count that overflows the claim, an `errors` that is not an array are refused with
/// what to fix. Jobs within them, however odd, are claimed and shown like any other.
#[tokio::test]
async fn values_no_reader_can_use_are_refused_even_with_the_triggers_off() {
    let env = TestEnv::new().await;
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    let insert = |column: &str, value: &str| {
        format!(
            "INSERT INTO contact_sync.jobs (provider, account, email, payload, {column}) \
             VALUES ('justclick', 'jc', 'a@b.co', '{{}}', {value}) RETURNING id"
        )
    };
    for (column, value, expected) in [
        ("run_at", "'infinity'", "run_at must be a finite time"),
        ("run_at", "'-infinity'", "run_at must be a finite time"),
        (
            "run_at",
            "'12000-01-01'",
            "run_at must be a finite time before the year 10000",
        ),
        (
            "created_at",
            "'infinity'",
            "created_at must be a finite time",
        ),
        (
            "created_at",
            "'200000-01-01'",
            "created_at must be a finite time",
        ),
        (
            "locked_until",
            "'infinity'",
            "locked_until must be a finite time",
        ),
        (
            "finished_at",
            "'-infinity'",
            "finished_at must be a finite time",
        ),
        (
            "attempts",
            "2147483647",
            "attempts must be between 0 and 999999",
        ),
        ("attempts", "-1", "attempts must be between 0 and 999999"),
        ("errors", "'{}'", "errors must be a JSON array"),
    ] {
        let err = sqlx::query(&insert(column, value))
            .execute(&mut *conn)
            .await
            .unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(
            db.code().as_deref(),
            Some("22023"),
            "{column} = {value}: {err}"
        );
        assert!(db.message().contains(expected), "{column} = {value}: {err}");
        assert!(!db.message().contains("a@b.co"), "no row contents: {err}");
    }
    // odd but usable, with the triggers off: one due since the year 1, one never due
    let old: i64 = sqlx::query_scalar(&insert("run_at", "'0001-01-01 00:00:00+00'"))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let never: i64 = sqlx::query_scalar(&insert("run_at", "'9999-12-31 00:00:00+00'"))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SET session_replication_role = DEFAULT")
        .execute(&mut *conn)
        .await
        .unwrap();
    // hand-written updates of columns no trigger watches
    for (set, expected) in [
        (
            "created_at = 'infinity'",
            "created_at must be a finite time",
        ),
        ("attempts = 2147483647", "attempts must be between"),
        ("errors = '\"x\"'", "errors must be a JSON array"),
        (
            "locked_until = '-infinity'",
            "locked_until must be a finite time",
        ),
    ] {
        let err = sqlx::query(&format!("UPDATE contact_sync.jobs SET {set} WHERE id = $1"))
            .bind(never)
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{set}: {err}");
    }
    // a count at the table's bound: the claim's increment stays within it (it failed every
    // claim of every account)
    sqlx::query(
        "UPDATE contact_sync.jobs SET attempts = 999999, max_attempts = 1000000 WHERE id = $1",
    )
    .bind(old)
    .execute(&mut *conn)
    .await
    .unwrap();
    // the other tables' times: one out of range stopped claims, calls or operator views
    for sql in [
        "INSERT INTO contact_sync.accounts (account, provider, refilled_at) VALUES ('x1', 'justclick', '-infinity')",
        "INSERT INTO contact_sync.accounts (account, provider, paused_at) VALUES ('x2', 'justclick', '270000-01-01')",
        "INSERT INTO contact_sync.doi_ledger (api_key_id, email, sent_at) VALUES ('k', 'a@b.co', 'infinity')",
        "INSERT INTO contact_sync.activity (account, minute) VALUES ('jc', 'infinity')",
        "INSERT INTO contact_sync.synced (contact_key, fields, job_id, synced_at) VALUES ('k', '{}', 1, '-infinity')",
        "INSERT INTO contact_sync.workers (id, host, pid, accounts, concurrency, expires_at) VALUES ('w', 'h', 1, ARRAY['jc', NULL], 1, now())",
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("23514"), "{sql}: {err}");
    }
    drop(conn);
    let worker = env.worker();
    worker.drain().await;
    assert_eq!(env.job(old).await.state, "succeeded");
    assert_eq!(env.job(never).await.state, "pending");
    inspect::status(&env.pool).await.unwrap();
    let listed = inspect::list(
        &env.pool,
        &inspect::ListFilter {
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(inspect::show(&env.pool, never).await.unwrap().is_some());
    // what the JSON decoder refuses is shown as its text, never an error for the whole view
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    let odd: i64 = sqlx::query_scalar(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, errors)
         VALUES ('justclick', 'jc', 'a@b.co', '{\"lead_name\": 1e400}', '[{\"error\": 1e400}]') RETURNING id",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let shown = inspect::show(&env.pool, odd).await.unwrap().unwrap();
    assert!(
        shown
            .payload
            .as_str()
            .is_some_and(|t| t.contains("1e400") || t.contains("10000")),
        "{shown:?}"
    );
    assert!(shown.errors.as_str().is_some(), "{shown:?}");
}

/// The insert trigger's checks run with Postgres's own functions, whatever the caller's
/// `search_path`: an aggregate or function of the same name earlier on it cannot stand in for
/// one and let an invalid row in.
#[tokio::test]
async fn a_callers_search_path_cannot_switch_the_checks_off() {
    let env = TestEnv::new().await;
    let mut conn = env.pool.acquire().await.unwrap();
    for sql in [
        "CREATE SCHEMA shadow",
        "CREATE FUNCTION shadow.none(boolean, boolean) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT NULL::boolean'",
        "CREATE AGGREGATE shadow.bool_or(boolean) (sfunc = shadow.none, stype = boolean)",
        "CREATE FUNCTION shadow.isfinite(timestamptz) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'",
        "SET search_path = shadow, pg_catalog, public",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    for (row, expected) in [
        (
            "('bogus', 'jc', 'a@b.co', '{}', now())",
            "unknown provider 'bogus'",
        ),
        (
            "('justclick', 'jc', 'not-an-email', '{}', now())",
            "malformed email",
        ),
        (
            "('justclick', 'jc', 'a@b.co', '{}', 'infinity')",
            "run_at must be a finite time",
        ),
    ] {
        let err = sqlx::query(&format!(
            "INSERT INTO contact_sync.jobs (provider, account, email, payload, run_at) VALUES {row}"
        ))
        .execute(&mut *conn)
        .await
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{row}: {err}");
    }
    // and the update trigger's, for an account of another provider, a malformed email, an
    // infinite run_at
    sqlx::query(
        "INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc', 'justclick'), ('sl', 'smartlink')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT contact_sync.enqueue('justclick', 'jc', 'a@b.co')")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    for sql in [
        "CREATE FUNCTION shadow.never(text, text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT false'",
        "CREATE OPERATOR shadow.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = shadow.never)",
        "CREATE FUNCTION shadow.always(text, text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'",
        "CREATE OPERATOR shadow.~ (LEFTARG = text, RIGHTARG = text, FUNCTION = shadow.always)",
        "CREATE OPERATOR shadow.!~ (LEFTARG = text, RIGHTARG = text, FUNCTION = shadow.never)",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    for (set, expected) in [
        ("account = 'sl'", "is a smartlink account, not justclick"),
        ("email = 'a b@example.com'", "malformed email"),
        ("run_at = 'infinity'", "run_at must be a finite time"),
    ] {
        let err = sqlx::query(&format!("UPDATE contact_sync.jobs SET {set} WHERE id = $1"))
            .bind(id)
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{set}: {err}");
    }
    drop(conn);
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE account = 'jc' AND email = 'a@b.co' AND isfinite(run_at)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(queued, 1);
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(all, 1);
}

/// An `UPDATE` that gives a job an account of another provider is refused, as an insert is: by
/// hand, or through an upsert's `DO UPDATE`.
#[tokio::test]
async fn a_job_cannot_be_moved_to_an_account_of_another_provider() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc', 'justclick'), ('sl', 'smartlink'), ('jc2', 'justclick')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let id: i64 = sqlx::query_scalar(
        "SELECT contact_sync.enqueue('justclick', 'jc', 'a@example.com', '{}', 'key-1')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let err = sqlx::query("UPDATE contact_sync.jobs SET account = 'sl' WHERE id = $1")
        .bind(id)
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("account 'sl' is a smartlink account, not justclick"),
        "{err}"
    );
    let err = sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, idempotency_key)
         VALUES ('justclick', 'jc', 'a@example.com', 'key-1')
         ON CONFLICT (account, idempotency_key) WHERE idempotency_key IS NOT NULL
         DO UPDATE SET account = 'sl'",
    )
    .execute(&env.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("account 'sl' is a smartlink account, not justclick"),
        "{err}"
    );
    // an account name the table refuses is refused by its CHECK, as for an insert, even when an
    // accounts row of the other provider has that name
    sqlx::query("INSERT INTO contact_sync.accounts (account, provider) VALUES ('Sl', 'smartlink')")
        .execute(&env.pool)
        .await
        .unwrap();
    let err = sqlx::query("UPDATE contact_sync.jobs SET account = 'Sl' WHERE id = $1")
        .bind(id)
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("jobs_account_check"), "{err}");
    // to an account of its own provider, or one with no provider recorded, it may go
    for account in ["jc2", "unregistered"] {
        sqlx::query("UPDATE contact_sync.jobs SET account = $2 WHERE id = $1")
            .bind(id)
            .bind(account)
            .execute(&env.pool)
            .await
            .unwrap();
    }
}

/// A statement whose rows all have one provider is validated with that provider's rules alone
/// (the other provider's are folded away when the trigger's plan is made), one mixing providers
/// or naming an unknown one with every rule: either way the first faulty row in the statement's
/// order is the one reported, with the same message.
#[tokio::test]
async fn validation_reports_the_first_faulty_row_whatever_the_providers() {
    let env = TestEnv::new().await;
    for (rows, expected) in [
        // one provider
        (
            "('justclick', 'jc', 'good@b.co', '{}'), ('justclick', 'jc', 'bad1', '{}'), ('justclick', 'jc', 'bad2', '{}')",
            "malformed email 'bad1'",
        ),
        (
            "('justclick', 'jc', 'good@b.co', '{}'), ('justclick', 'jc', 'ü@b.co', '{}')",
            "justclick refuses the email 'ü@b.co'",
        ),
        (
            "('justclick', 'jc', 'good@b.co', '{\"lead_tags\": 5}')",
            "justclick field lead_tags must be a string or an array of strings",
        ),
        (
            "('smartlink', 'sl', 'good@b.co', '{\"subscribe\": 5}'), ('smartlink', 'sl', 'bad3', '{}')",
            "smartlink field subscribe must be one of -1, 0, 1, 3",
        ),
        (
            "('smartlink', 'sl', 'good@b.co', '{\"lead_name\": \"x\"}')",
            "unknown smartlink payload key 'lead_name'",
        ),
        // mixed providers: still the first faulty row
        (
            "('smartlink', 'sl', 'bad4', '{}'), ('justclick', 'jc', 'bad5', '{}')",
            "malformed email 'bad4'",
        ),
        (
            "('justclick', 'jc', 'bad6', '{}'), ('smartlink', 'sl', 'bad7', '{}')",
            "malformed email 'bad6'",
        ),
        (
            "('smartlink', 'sl', 'good@b.co', '{}'), ('justclick', 'jc', 'good@b.co', '{\"subscribe\": 1}')",
            "unknown justclick payload key 'subscribe'",
        ),
        // an unknown provider
        (
            "('justclick', 'jc', 'good@b.co', '{}'), ('mailchimp', 'jc', 'good@b.co', '{}')",
            "unknown provider 'mailchimp'",
        ),
        (
            "('justclick', 'jc', 'bad8', '{}'), ('JustClick', 'jc', 'good@b.co', '{}')",
            "malformed email 'bad8'",
        ),
    ] {
        let err = sqlx::query(&format!(
            "INSERT INTO contact_sync.jobs (provider, account, email, payload) VALUES {rows}"
        ))
        .execute(&env.pool)
        .await
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{rows}: {err}");
    }
    // and valid statements of each kind go in
    for rows in [
        "('justclick', 'jc', 'a1@b.co', '{\"lead_name\": \"A\"}'), ('justclick', 'jc', 'a2@b.co', '{}')",
        "('smartlink', 'sl', 'a3@b.co', '{\"subscribe\": 1}')",
        "('smartlink', 'sl', 'a4@b.co', '{}'), ('justclick', 'jc', 'a5@b.co', '{}')",
    ] {
        sqlx::query(&format!(
            "INSERT INTO contact_sync.jobs (provider, account, email, payload) VALUES {rows}"
        ))
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(queued, 5);
}

/// The stored JSON contact-sync reads back for its own bookkeeping (what a provider was last
/// sent, the columns a capture was installed against) may have been edited by hand into what
/// the JSON decoder refuses: the contact reads as never sent (its change is sent again), the
/// installed source as matching no table, and nothing else stops.
#[tokio::test]
async fn bookkeeping_json_the_decoder_refuses_stops_nothing() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO contact_sync.synced (contact_key, fields, job_id) VALUES
             ('justclick:jc:odd@example.com', '{\"lead_name\": 1e400}', 1),
             ('justclick:jc:deep@example.com', (repeat('[', 200) || repeat(']', 200))::jsonb, 2),
             ('justclick:jc:fine@example.com', '{\"lead_name\": \"Fine\"}', 3)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut conn = env.pool.acquire().await.unwrap();
    let known = contact_sync::outbox::synced::known(
        &mut conn,
        "justclick",
        "jc",
        &[
            "odd@example.com".to_string(),
            "deep@example.com".to_string(),
            "fine@example.com".to_string(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(known[0], None);
    assert_eq!(known[1], None);
    assert_eq!(
        known[2].as_ref().and_then(|f| f.get("lead_name")),
        Some(&json!("Fine"))
    );
    sqlx::query(
        "INSERT INTO contact_sync.capture_sources (source, table_name, mapping_md5, columns)
         VALUES ('s1', 'public.users', 'x', '[1e400]')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let installed = contact_sync::outbox::capture::installed(&env.pool)
        .await
        .unwrap();
    assert!(installed[0].columns.is_string(), "{installed:?}");
    inspect::status(&env.pool).await.unwrap();
}
