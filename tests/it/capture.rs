//! Capture from the application's own tables: a realistic `users` table written to with plain
//! SQL, triggers installed by the command line, real workers and the sandbox. The providers'
//! contacts are held to what the table says, computed here from the table (not from what the
//! triggers sent) and compared with the sandbox, which applies every call through the
//! providers' reference model.

use crate::helpers::*;
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use std::time::Duration;

/// The application's table: mapped columns, unmapped ones, an opt-in flag.
pub const USERS: &str = r#"
CREATE TABLE public.users (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email            text NOT NULL,
    first_name       text,
    last_name        text,
    city             text,
    phone            text,
    tags             text[] NOT NULL DEFAULT '{}',
    plan             text,
    lang             text,
    level            integer,
    marketing_opt_in boolean NOT NULL DEFAULT true,
    unsubscribed_at  timestamptz,
    password_hash    text,
    last_seen_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
)"#;

/// The mapping of `USERS` to both test accounts.
pub const SOURCES: &str = r#"
[sources.users]
table = "public.users"
key = "id"
email = "email"
where = "marketing_opt_in"

[sources.users.targets.jc]
lead_name = "concat_ws(' ', first_name, last_name)"
lead_city = "city"
lead_phone = "phone"
lead_tags = "tags"

[sources.users.targets.sl]
subscribe = "case when unsubscribed_at is null then 1 else 0 end"
language = "lang"
tags = "tags"
"attributes.plan" = "plan"
"attributes.level" = "level"
on_delete = "unsubscribe"
"#;

async fn exec(env: &TestEnv, sql: &str) {
    sqlx::raw_sql(sql).execute(&env.pool).await.unwrap();
}

async fn jobs(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The jobs queued for one address.
async fn jobs_for(env: &TestEnv, email: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE email = $1")
        .bind(email)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// A users table with its capture installed through the command line.
async fn captured() -> (TestEnv, Scratch) {
    let mut env = TestEnv::new().await;
    exec(&env, USERS).await;
    let config = env.config_file(SOURCES);
    let (code, out, err) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("users: capturing public.users into jc, sl"),
        "{out}"
    );
    env.settings.sources = sources_of(&config);
    (env, config)
}

/// What each provider must hold for the table as it is now, and for addresses that left it.
async fn assert_providers_match_the_table(env: &TestEnv, gone: &[&str]) {
    let rows = sqlx::query(
        "SELECT email, first_name, last_name, city, phone, tags, plan, lang, level, \
                unsubscribed_at IS NULL AS subscribed \
         FROM public.users WHERE marketing_opt_in ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(!rows.is_empty());
    for row in rows {
        let email: String = row.get("email");
        let text = |c: &str| row.get::<Option<String>, _>(c).unwrap_or_default();
        let tags: Vec<String> = row.get("tags");
        let name = [
            row.get::<Option<String>, _>("first_name"),
            row.get("last_name"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        if !email_is_valid(&email) {
            continue;
        }
        let jc = env
            .sandbox
            .contact("justclick", JC_LOGIN, &email)
            .unwrap_or_else(|| panic!("JustClick has no {email}"));
        let expected = json!({
            "lead_name": name,
            "lead_city": text("city"),
            "lead_phone": text("phone"),
            "lead_tags": tags.join(","),
        });
        assert_eq!(
            Value::Object(jc.fields.clone()),
            expected,
            "JustClick {email}"
        );
        let sl = env
            .sandbox
            .contact("smartlink", SL_GAME, &email)
            .unwrap_or_else(|| panic!("Smartlink has no {email}"));
        let subscribed: bool = row.get("subscribed");
        assert_eq!(
            sl.subscribe,
            Some(i64::from(subscribed)),
            "Smartlink {email}"
        );
        assert_eq!(sl.fields["tags"], json!(tags), "Smartlink {email}");
        if let Some(lang) = row.get::<Option<String>, _>("lang") {
            assert_eq!(sl.fields["language"], json!(lang), "Smartlink {email}");
        }
        let level = row
            .get::<Option<i32>, _>("level")
            .map_or(json!(""), |l| json!(l));
        assert_eq!(
            sl.fields["attributes"],
            json!({"plan": text("plan"), "level": level}),
            "Smartlink {email}"
        );
    }
    for email in gone {
        let sl = env.sandbox.contact("smartlink", SL_GAME, email).unwrap();
        assert_eq!(sl.subscribe, Some(0), "{email} left: unsubscribed");
    }
}

fn email_is_valid(email: &str) -> bool {
    contact_sync::providers::address::php_valid_email(email)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_reaches_the_providers() {
    let (env, _config) = captured().await;
    let worker = env.worker();

    // INSERT: two contacts and a user who did not opt in
    exec(
        &env,
        "INSERT INTO users (email, first_name, last_name, city, phone, tags, plan, lang, level) VALUES \
           ('ann@example.com', 'Ann', 'Lee', 'Berlin', '+491', '{vip,news}', 'pro', 'de', 3), \
           ('bob@example.com', 'Bob', NULL, 'Paris', NULL, '{}', 'free', 'fr', NULL); \
         INSERT INTO users (email, first_name, marketing_opt_in) VALUES ('cy@example.com', 'Cy', false)",
    )
    .await;
    assert_eq!(jobs(&env).await, 4, "two contacts, two accounts");
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;

    // only unmapped columns: nothing is queued
    let before = jobs(&env).await;
    exec(
        &env,
        "UPDATE users SET last_seen_at = now(), password_hash = 'x', updated_at = now()",
    )
    .await;
    assert_eq!(
        jobs(&env).await,
        before,
        "an update of unmapped columns queues nothing"
    );
    // a mapped column rewritten with the same value: nothing either
    exec(&env, "UPDATE users SET city = city, tags = tags").await;
    assert_eq!(jobs(&env).await, before);

    // a mapped column: only what changed is sent
    exec(
        &env,
        "UPDATE users SET city = 'Munich' WHERE email = 'ann@example.com'",
    )
    .await;
    let payload: Value = sqlx::query_scalar(
        "SELECT payload FROM contact_sync.jobs WHERE provider = 'justclick' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(payload, json!({"lead_city": "Munich"}));
    assert_eq!(jobs(&env).await, before + 1, "Smartlink maps no city");

    // entering and leaving `where`, NULLs, an address change, a delete, a rollback
    exec(
        &env,
        "UPDATE users SET marketing_opt_in = true WHERE email = 'cy@example.com'",
    )
    .await;
    exec(
        &env,
        "UPDATE users SET marketing_opt_in = false WHERE email = 'bob@example.com'",
    )
    .await;
    exec(&env, "UPDATE users SET city = NULL, plan = NULL, level = NULL, tags = '{}' WHERE email = 'ann@example.com'").await;
    exec(
        &env,
        "UPDATE users SET unsubscribed_at = now() WHERE email = 'cy@example.com'",
    )
    .await;
    exec(
        &env,
        "UPDATE users SET email = 'ann.lee@example.com' WHERE email = 'ann@example.com'",
    )
    .await;
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET city = 'Nowhere'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    exec(
        &env,
        "INSERT INTO users (email, first_name, lang) VALUES ('dee@example.com', 'Dee', 'en'); \
         DELETE FROM users WHERE email = 'dee@example.com'",
    )
    .await;
    env.settle(&worker).await;
    assert_providers_match_the_table(
        &env,
        &["bob@example.com", "ann@example.com", "dee@example.com"],
    )
    .await;
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.capture_rejections")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rejected, 0);
    let dead = env.count("dead").await;
    assert_eq!(dead, 0);
}

/// A row that cannot become a valid change never fails the application's statement: its
/// change is rejected with the reason, per account, and every other row of the statement is
/// queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_be_sent_is_rejected_and_the_write_commits() {
    let (env, config) = captured().await;
    let long_name = "x".repeat(300);
    // one statement: a good row, a malformed address, a name JustClick cannot take, an
    // address only Smartlink takes
    sqlx::query(
        "INSERT INTO users (email, first_name, tags) VALUES \
           ('good@example.com', 'Good', '{a}'), ('not an address', 'Bad', '{}'), \
           ('long@example.com', $1, '{}'), ('ü@example.com', 'U', '{}')",
    )
    .bind(&long_name)
    .execute(&env.pool)
    .await
    .expect("the application's statement commits");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(users, 4);
    let queued: Vec<(String, String)> =
        sqlx::query_as("SELECT account, email FROM contact_sync.jobs ORDER BY account, email")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let queued: Vec<(&str, &str)> = queued
        .iter()
        .map(|(a, e)| (a.as_str(), e.as_str()))
        .collect();
    assert_eq!(
        queued,
        vec![
            ("jc", "good@example.com"),
            ("sl", "good@example.com"),
            ("sl", "long@example.com"),
            ("sl", "ü@example.com"),
        ]
    );
    let rejections: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT r.account, u.email, r.sqlstate, r.reason FROM contact_sync.capture_rejections r \
         JOIN users u ON u.id::text = r.row_key ORDER BY r.account, u.email",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let summary: Vec<(&str, &str, &str)> = rejections
        .iter()
        .map(|(a, e, s, _)| (a.as_str(), e.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("jc", "long@example.com", "22023"),
            ("jc", "not an address", "22023"),
            ("jc", "ü@example.com", "22023"),
            ("sl", "not an address", "22023"),
        ]
    );
    assert!(
        rejections[0].3.contains("lead_name is longer than 255"),
        "{rejections:?}"
    );
    assert!(
        rejections[1].3.contains("malformed email"),
        "{rejections:?}"
    );
    assert!(
        rejections[2].3.contains("justclick refuses the email"),
        "{rejections:?}"
    );
    // the operator sees them
    let (code, out, _) = env
        .cli(&config, &["capture", "rejections", "--source", "users"])
        .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("malformed email") && out.contains("lead_name is longer"),
        "{out}"
    );
    let (code, out, _) = env.cli(&config, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("users: 4 row(s) rejected"), "{out}");
    // and /metrics
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(contact_sync::admin::serve(
        listener,
        env.pool.clone(),
        stop.clone(),
    ));
    let page = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.lines()
            .any(|l| l == "contact_sync_capture_rejected_rows{source=\"users\"} 4"),
        "{page}"
    );
    stop.cancel();
    let _ = server.await;
}

/// A mapped column renamed or dropped never breaks the application's writes: the statements
/// are recorded as not captured, `capture verify` exits 1 naming the drift, and once the
/// mapping is fixed and installed again, capture resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_never_breaks_the_applications_writes() {
    let (env, config) = captured().await;
    let (code, out, err) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("users: ok"), "{out}");

    exec(&env, "ALTER TABLE users RENAME COLUMN city TO town").await;
    exec(
        &env,
        "INSERT INTO users (email, town) VALUES ('t@example.com', 'Oslo')",
    )
    .await;
    exec(&env, "UPDATE users SET town = 'Bergen'").await;
    exec(&env, "ALTER TABLE users DROP COLUMN phone").await;
    exec(&env, "DELETE FROM users").await;
    // JustClick's mapping reads city and phone: nothing of the insert and the update is queued
    // for it (its deletes send nothing: on_delete = "ignore");
    // Smartlink's does not, and goes on (t@: inserted, then deleted)
    let queued: Vec<String> =
        sqlx::query_scalar("SELECT account FROM contact_sync.jobs ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(queued, vec!["sl", "sl"]);
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("column \"city\" does not exist"), "{out}");
    assert!(
        out.contains("city dropped or renamed") && out.contains("phone dropped or renamed"),
        "{out}"
    );
    assert!(
        out.contains("2 statement(s) on public.users were not captured"),
        "{out}"
    );
    let (_, out, _) = env.cli(&config, &["capture", "verify", "--json"]).await;
    let verdicts: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdicts[0]["since_install"]["failures"], 2);
    let (code, out, _) = env.cli(&config, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("users: 2 statement(s) not captured"), "{out}");

    // fixed in the configuration and installed again: capture resumes
    let fixed = SOURCES
        .replace("lead_city = \"city\"", "lead_city = \"town\"")
        .replace("lead_phone = \"phone\"\n", "");
    let config = env.config_file(&fixed);
    let (code, out, err) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0, "{out}{err}");
    exec(
        &env,
        "INSERT INTO users (email, town) VALUES ('u@example.com', 'Oslo')",
    )
    .await;
    assert_eq!(jobs(&env).await, 4);
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 0, "{out}");
}

/// `plan` prints exactly what `install` runs; install twice changes nothing; uninstall leaves
/// no trigger, function or record behind, and installing again works.
#[tokio::test]
async fn plan_install_and_uninstall_leave_nothing_behind() {
    let env = TestEnv::new().await;
    exec(&env, USERS).await;
    let config = env.config_file(SOURCES);
    let objects = || async {
        let functions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'contact_sync' AND p.proname LIKE 'capture\\_%'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        let triggers: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.users'::regclass AND NOT tgisinternal",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        let records: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.capture_sources")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        (functions, triggers, records)
    };
    assert_eq!(objects().await, (0, 0, 0));
    let (code, plan, err) = env.cli(&config, &["capture", "plan"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(objects().await, (0, 0, 0), "plan changes nothing");
    // applied by hand, the plan is the installation
    exec(&env, &plan).await;
    assert_eq!(objects().await, (4, 4, 1));
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(
        code, 0,
        "the plan applied by hand is what install would do: {out}"
    );
    let (code, _, _) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0);
    let (code, _, _) = env.cli(&config, &["capture", "install", "users"]).await;
    assert_eq!(code, 0);
    assert_eq!(objects().await, (4, 4, 1));
    let (code, out, _) = env.cli(&config, &["capture", "uninstall", "users"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(objects().await, (0, 0, 0));
    exec(
        &env,
        "INSERT INTO users (email) VALUES ('after@example.com')",
    )
    .await;
    assert_eq!(jobs(&env).await, 0, "nothing captured after uninstall");
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 1);
    assert!(out.contains("not installed"), "{out}");
    let (code, _, _) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0);
    assert_eq!(objects().await, (4, 4, 1));
    // TRUNCATE is not captured, and says so
    exec(
        &env,
        "INSERT INTO users (email) VALUES ('t@example.com'); TRUNCATE users",
    )
    .await;
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 1);
    assert!(out.contains("truncate: TRUNCATE is not captured"), "{out}");
    // a misspelled column is named with the nearest one, before anything is installed
    let typo = env.config_file(&SOURCES.replace("lead_city = \"city\"", "lead_city = \"cty\""));
    let (code, _, err) = env.cli(&typo, &["capture", "plan"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("sources.users.targets.jc.lead_city") && err.contains("did you mean city?"),
        "{err}"
    );
    let wrong_type = env.config_file(&SOURCES.replace(
        "tags = \"tags\"\n\"attributes",
        "tags = \"plan\"\n\"attributes",
    ));
    let (code, _, err) = env.cli(&wrong_type, &["capture", "plan"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("sources.users.targets.sl.tags: is text: tags takes an array of text"),
        "{err}"
    );
}

/// One `UPDATE` of many rows is one set-based insert, and concurrent transactions on one row
/// end with the value committed last at the provider.
async fn work_mem(conn: &mut sqlx::PgConnection) -> String {
    sqlx::query_scalar("SELECT current_setting('work_mem')")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// The capture raises `work_mem` for its own comparisons only: after every kind of captured
/// write, a rejected row's included, the application's transaction has its own setting back,
/// a smaller one and a larger one alike.
#[tokio::test]
async fn a_captured_write_leaves_the_sessions_settings_as_they_were() {
    let (env, _config) = captured().await;
    let mut tx = env.pool.begin().await.unwrap();
    for (setting, writes) in [
        (
            "4MB",
            [
                "INSERT INTO public.users (email, city) VALUES ('wm1@example.com', 'Oslo'), ('not an address', 'Rome')",
                "UPDATE public.users SET city = 'Bergen' WHERE email = 'wm1@example.com'",
                "UPDATE public.users SET last_seen_at = now()",
                "DELETE FROM public.users WHERE email = 'wm1@example.com'",
            ],
        ),
        (
            "256MB",
            [
                "INSERT INTO public.users (email, city) VALUES ('wm2@example.com', 'Oslo')",
                "UPDATE public.users SET city = 'Bergen' WHERE email = 'wm2@example.com'",
                "UPDATE public.users SET last_seen_at = now()",
                "DELETE FROM public.users WHERE email = 'wm2@example.com'",
            ],
        ),
    ] {
        sqlx::query(&format!("SET LOCAL work_mem = '{setting}'"))
            .execute(&mut *tx)
            .await
            .unwrap();
        for write in writes {
            sqlx::query(write).execute(&mut *tx).await.unwrap();
            assert_eq!(work_mem(&mut tx).await, setting, "after {write}");
        }
    }
    tx.commit().await.unwrap();
    // the capture did run: the rejected address is on record, the good ones queued
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.capture_rejections")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rejected, 2, "the bad address, once per account");
    assert!(jobs(&env).await >= 4);
}

/// A transaction of many captured statements (a loop of single-row writes) writes its jobs in
/// its own transaction: no captured statement of up to `SMALL_STATEMENT_ROWS` clean rows takes
/// a subtransaction id (more than 64 in one transaction overflow Postgres's per-session cache,
/// and every snapshot on the database then looks them up in `pg_subtrans`). Each job's `xmin`
/// is the application transaction's own id. A statement with a row at fault, and a larger one,
/// go through the blocks that record it, as before.
#[tokio::test]
async fn many_captured_statements_in_one_transaction_take_no_subtransaction_ids() {
    let (env, _config) = captured().await;
    exec(
        &env,
        "INSERT INTO users (email, first_name, city, plan) \
         SELECT 'x' || i || '@example.com', 'X', 'A', 'free' FROM generate_series(1, 1500) i",
    )
    .await;
    exec(&env, "DELETE FROM contact_sync.jobs").await;
    let mut tx = env.pool.begin().await.unwrap();
    for i in 1..=150 {
        sqlx::query("UPDATE users SET city = $1, plan = 'pro' WHERE email = $2")
            .bind(format!("C{i}"))
            .bind(format!("x{i}@example.com"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    for write in [
        "INSERT INTO users (email, first_name) VALUES ('fresh1@example.com', 'F'), ('fresh2@example.com', 'G')",
        "UPDATE users SET marketing_opt_in = false WHERE email = 'x151@example.com'",
        "DELETE FROM users WHERE email = 'x152@example.com'",
        // 1,000 rows: the bound itself
        "UPDATE users SET city = 'B' WHERE id IN (SELECT id FROM users WHERE email LIKE 'x%' ORDER BY id LIMIT 1000)",
        "UPDATE users SET last_seen_at = now()",
    ] {
        sqlx::query(write).execute(&mut *tx).await.unwrap();
    }
    let (own, others): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE xmin = pg_current_xact_id()::xid),
                count(*) FILTER (WHERE xmin <> pg_current_xact_id()::xid)
         FROM contact_sync.jobs",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        others, 0,
        "{own} jobs in the transaction's own id, {others} in others"
    );
    // 150 updates × 2 accounts, 2 new rows × 2, an opt-out and a delete (Smartlink's
    // unsubscribes), and the 1,000-row update's new city (JustClick) for all but the row that
    // opted out
    assert_eq!(own, 150 * 2 + 2 * 2 + 1 + 1 + 999);
    // a statement with a row at fault goes through the recording blocks (a subtransaction id
    // each), and the rest of its rows are queued
    sqlx::query("INSERT INTO users (email) VALUES ('ok@example.com'), ('not an address')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE email = 'ok@example.com' AND xmin <> pg_current_xact_id()::xid",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        queued, 2,
        "the good row of a statement with a bad one, once per account"
    );
    // more than the bound: one subtransaction id per account
    sqlx::query("UPDATE users SET city = 'D' WHERE email LIKE 'x%'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let ids: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM contact_sync.jobs WHERE payload ->> 'lead_city' = 'D'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(ids, 1, "the larger statement's jobs in one subtransaction");
    tx.commit().await.unwrap();
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.capture_rejections")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rejected, 2, "the bad address, once per account");
}

/// A small statement's jobs pass the capture's check, then fail the insert's own check (an
/// account given another provider in between): the application's statement still commits; its
/// jobs are taken out and the statement is recorded as not captured, as drift is. A function in
/// the table's schema that looks like one the check calls does not change what the capture
/// accepts (it checks with the insert's search path): its row is rejected, as any invalid row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_the_insert_refuses_after_the_capture_checked_them_never_fail_the_write() {
    let (env, _config) = captured().await;
    exec(
        &env,
        "INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc', 'justclick'), ('sl', 'smartlink')
         ON CONFLICT (account) DO UPDATE SET provider = EXCLUDED.provider",
    )
    .await;
    let failures = |reason: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM contact_sync.capture_failures WHERE error LIKE '%' || $1 || '%'",
            )
            .bind(reason)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // 1. the account's provider changes between the capture's check and the insert: the insert
    //    waits behind a lock the change's transaction holds, then sees the new provider
    let mut change = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE contact_sync.accounts SET provider = 'smartlink' WHERE account = 'jc'")
        .execute(&mut *change)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE contact_sync.jobs IN SHARE MODE")
        .execute(&mut *change)
        .await
        .unwrap();
    let pool = env.pool.clone();
    let write = tokio::spawn(async move {
        sqlx::query(
            "INSERT INTO users (email, first_name, city) VALUES ('race@example.com', 'R', 'Oslo')",
        )
        .execute(&pool)
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the insert should wait for the lock");
    change.commit().await.unwrap();
    write
        .await
        .unwrap()
        .expect("the application's write commits");
    assert_eq!(failures("is a smartlink account, not justclick").await, 1);
    let queued = jobs_for(&env, "race@example.com").await;
    assert_eq!(queued, 0, "the statement's jobs were taken out");
    exec(
        &env,
        "UPDATE contact_sync.accounts SET provider = 'justclick' WHERE account = 'jc'",
    )
    .await;

    // 2. a look-alike function in the table's schema, which the mapping's search path finds
    //    before pg_catalog's for a text argument, would pass a value the insert's check refuses:
    //    the capture checks with the insert's search path, and rejects the row for that account
    exec(
        &env,
        "CREATE FUNCTION public.jsonb_path_exists(j jsonb, path text) RETURNS boolean
         LANGUAGE sql IMMUTABLE AS $$ SELECT false $$",
    )
    .await;
    // (a session of its own: one that ran the capture before keeps the plans it made then)
    let mut fresh = sqlx::PgConnection::connect_with(&env.pool.connect_options())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO users (email, first_name, plan) VALUES ('alike@example.com', 'A', repeat('x', 1001))",
    )
    .execute(&mut fresh)
    .await
    .expect("the application's write commits");
    drop(fresh);
    assert_eq!(failures("longer than 1000 characters").await, 0);
    let rejected: Vec<(String, String)> = sqlx::query_as(
        "SELECT r.account, r.reason FROM contact_sync.capture_rejections r
         JOIN users u ON u.id::text = r.row_key WHERE u.email = 'alike@example.com'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "sl");
    assert!(
        rejected[0].1.contains("longer than 1000 characters"),
        "{rejected:?}"
    );
    let queued = jobs_for(&env, "alike@example.com").await;
    assert_eq!(queued, 1, "the other account's job");
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT row_count FROM contact_sync.capture_failures WHERE source = 'users' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows, [1], "a statement of one row (two jobs)");
    // an insert that is not a capture's fails as before, with the same error, even with the
    // capture's marker set by hand
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::query("SET contact_sync.capture = 'users:insert:1'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = sqlx::query(
        "SELECT contact_sync.enqueue('smartlink', 'sl', 'x@example.com', jsonb_build_object('attributes', jsonb_build_object('plan', repeat('x', 1001))))",
    )
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("longer than 1000 characters"),
        "{err}"
    );
    let err = sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email) VALUES ('justclick', 'jc', 'good@example.com'), ('justclick', 'jc', 'bad')",
    )
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("malformed email"), "{err}");
    sqlx::query("RESET contact_sync.capture")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    assert_eq!(
        failures("failed the insert").await,
        1,
        "nothing recorded for them"
    );
    // and the capture goes on for the next statements
    exec(&env, "DROP FUNCTION public.jsonb_path_exists(jsonb, text)").await;
    exec(
        &env,
        "INSERT INTO users (email, first_name) VALUES ('after@example.com', 'B')",
    )
    .await;
    let queued = jobs_for(&env, "after@example.com").await;
    assert_eq!(queued, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_update_and_concurrent_writers() {
    let (env, _config) = captured().await;
    exec(
        &env,
        "INSERT INTO users (email, first_name, city, lang) \
         SELECT 'u' || i || '@example.com', 'U' || i, 'A', 'en' FROM generate_series(1, 5000) i",
    )
    .await;
    assert_eq!(jobs(&env).await, 10_000);
    let started = std::time::Instant::now();
    exec(&env, "UPDATE users SET city = 'B'").await;
    let took = started.elapsed();
    assert_eq!(
        jobs(&env).await,
        15_000,
        "one job per row for the account that maps city"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");

    // concurrent writers on one row: the provider ends with the value committed last
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = env.pool.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                sqlx::query("UPDATE users SET city = $1 WHERE email = 'u1@example.com'")
                    .bind(format!("w{i}-{j}"))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let worker = env.worker();
    env.settle(&worker).await;
    let city: String = sqlx::query_scalar("SELECT city FROM users WHERE email = 'u1@example.com'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let jc = env
        .sandbox
        .contact("justclick", JC_LOGIN, "u1@example.com")
        .unwrap();
    assert_eq!(jc.fields["lead_city"], json!(city));
    let jc = env
        .sandbox
        .contact("justclick", JC_LOGIN, "u5000@example.com")
        .unwrap();
    assert_eq!(jc.fields["lead_city"], json!("B"));
}

/// Existing contacts: `INSERT`ed before the capture was installed.
async fn existing_users(env: &TestEnv, n: i64) {
    sqlx::query(
        "INSERT INTO users (email, first_name, last_name, city, tags, plan, lang, level, marketing_opt_in) \
         SELECT CASE WHEN i = 7 THEN 'bad email ' || i ELSE 'old' || i || '@example.com' END, \
                'F' || i, 'L' || i, 'C' || (i % 5), ARRAY['t' || (i % 3)], 'p' || (i % 2), 'en', i, i % 10 <> 0 \
         FROM generate_series(1, $1) i",
    )
    .bind(n)
    .execute(&env.pool)
    .await
    .unwrap();
}

/// A users table of `n` rows that existed before its capture was installed.
async fn installed_over_existing_users(n: i64) -> (TestEnv, Scratch) {
    let mut env = TestEnv::new().await;
    exec(&env, USERS).await;
    existing_users(&env, n).await;
    let config = env.config_file(SOURCES);
    let (code, out, err) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0, "{out}{err}");
    env.settings.sources = sources_of(&config);
    (env, config)
}

/// The sources of a configuration file: the worker records what it sends to their accounts.
fn sources_of(
    config: &std::path::Path,
) -> std::collections::BTreeMap<String, contact_sync::config::SourceSettings> {
    contact_sync::config::Settings::load_from(Some(config), |_| None, Some(Vec::new()))
        .unwrap()
        .sources
}

fn summary(out: &str) -> Value {
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// An embedder's backfill that is dropped midway (its timeout fired, its task was aborted) or
/// fails leaves the source free: the next backfill of it runs, in the same process and pool.
/// (Its lock was a session-level lock on a pooled connection, which went back to the pool held:
/// every later backfill of the source was refused as "already running".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_dropped_midway_leaves_the_source_free() {
    use contact_sync::capture::backfill::{self, Mode, Options};
    let (env, _config) = installed_over_existing_users(400).await;
    let options = |max_pending| Options {
        accounts: Vec::new(),
        condition: None,
        mode: Mode::Send,
        dry_run: false,
        restart: false,
        page: 10,
        max_pending,
        sync_deletes: false,
    };
    // no worker runs: with at most 10 pending jobs the run waits after its first page
    let dropped = tokio::time::timeout(
        Duration::from_millis(1500),
        backfill::run(&env.pool, &env.settings, "users", &options(10), |_| {}),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the backfill was to be waiting: {dropped:?}"
    );
    let queued = jobs(&env).await;
    assert!(queued > 0, "the dropped backfill queued nothing");
    // the same pool, every connection of it: the lock is gone with the dropped run
    for _ in 0..3 {
        let progress = backfill::run(
            &env.pool,
            &env.settings,
            "users",
            &Options {
                dry_run: true,
                ..options(1_000_000)
            },
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("a backfill after the dropped one: {e}"));
        assert!(progress.resumed || progress.read > 0, "{progress:?}");
    }
    let done = backfill::run(
        &env.pool,
        &env.settings,
        "users",
        &options(1_000_000),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(done.read, 400, "{done:?}");
}

/// A backfill queues what differs from what was last sent: everything the first time (a dry run
/// counts exactly that and queues nothing), nothing on a resync of unchanged rows, and only the
/// fields that changed behind the capture's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_sends_only_what_differs() {
    let (env, config) = installed_over_existing_users(300).await;
    // 300 rows: 30 did not opt in, one has a malformed address
    let in_scope = 269;
    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--dry-run", "--json"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let dry = summary(&out);
    assert_eq!(
        (
            dry["read"].as_i64(),
            dry["enqueued"].as_i64(),
            dry["unchanged"].as_i64(),
            dry["rejected"].as_i64()
        ),
        (Some(300), Some(2 * in_scope), Some(0), Some(2)),
        "{dry}"
    );
    assert_eq!(dry["samples"].as_array().map(Vec::len), Some(3));
    assert_eq!(jobs(&env).await, 0, "a dry run queues nothing");
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.capture_rejections")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rejected, 0, "a dry run records nothing");

    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--json", "--page", "64"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let run = summary(&out);
    assert_eq!(run["enqueued"], dry["enqueued"], "{run}");
    assert_eq!(run["rejected"], 2);
    assert!(
        out.lines().count() > 2,
        "progress lines, then the summary: {out}"
    );
    let worker = env.worker();
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;
    let calls = env.sandbox.stats().accepted;

    // a resync of unchanged rows: no call
    let (code, out, _) = env.cli(&config, &["backfill", "users", "--json"]).await;
    assert_eq!(code, 0);
    let again = summary(&out);
    assert_eq!(again["enqueued"], 0, "{again}");
    assert_eq!(again["unchanged"], 2 * in_scope);
    env.settle(&worker).await;
    assert_eq!(env.sandbox.stats().accepted, calls, "zero provider calls");

    // changed behind the capture's back (triggers off): only what changed is sent
    exec(
        &env,
        "ALTER TABLE users DISABLE TRIGGER USER; \
         UPDATE users SET city = 'Moved', level = 99 WHERE email = 'old1@example.com'; \
         ALTER TABLE users ENABLE TRIGGER USER",
    )
    .await;
    let (code, out, _) = env.cli(&config, &["backfill", "users", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(summary(&out)["enqueued"], 2);
    let sent: Vec<Value> = sqlx::query_scalar(
        "SELECT payload - 'modify_ts' FROM contact_sync.jobs WHERE email = 'old1@example.com' ORDER BY id DESC LIMIT 2",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(sent.contains(&json!({"lead_city": "Moved"})), "{sent:?}");
    assert!(
        sent.contains(&json!({"attributes": {"level": 99}})),
        "{sent:?}"
    );
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;

    // a change back to what the provider holds, before the worker gets to it: no call
    let calls = env.sandbox.stats().accepted;
    exec(
        &env,
        "UPDATE users SET city = 'Elsewhere' WHERE email = 'old1@example.com'",
    )
    .await;
    exec(
        &env,
        "UPDATE users SET city = 'Moved' WHERE email = 'old1@example.com'",
    )
    .await;
    env.settle(&worker).await;
    assert_eq!(env.sandbox.stats().accepted, calls, "the provider held it");
    let finished: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state, outcome FROM contact_sync.jobs WHERE email = 'old1@example.com' ORDER BY id DESC LIMIT 2",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        finished,
        [
            ("coalesced".to_string(), None),
            ("succeeded".to_string(), Some("unchanged".to_string()))
        ]
    );
    assert_providers_match_the_table(&env, &[]).await;

    // --force sends everything again, the provider's synced state notwithstanding
    let (code, out, _) = env
        .cli(&config, &["backfill", "users", "--force", "--json"])
        .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(summary(&out)["enqueued"], 2 * in_scope, "{out}");
    env.settle(&worker).await;
    assert_eq!(
        env.sandbox.stats().accepted,
        calls + 2 * in_scope as u64,
        "every contact sent again"
    );

    // a provider already in step: record without sending
    exec(&env, "DELETE FROM contact_sync.synced").await;
    let before = jobs(&env).await;
    let (code, out, _) = env
        .cli(&config, &["backfill", "users", "--baseline-only", "--json"])
        .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(jobs(&env).await, before);
    let (_, out, _) = env.cli(&config, &["backfill", "users", "--json"]).await;
    assert_eq!(summary(&out)["enqueued"], 0, "{out}");
}

/// Rows deleted, gone out of `where`, or given another address while nothing captured them:
/// `backfill --sync-deletes` sends their target's `on_delete` (Smartlink: unsubscribe; the
/// JustClick target ignores them), counted exactly by a dry run, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_with_sync_deletes_unsubscribes_contacts_gone_while_capture_was_off() {
    let (env, config) = installed_over_existing_users(100).await;
    let (code, out, err) = env.cli(&config, &["backfill", "users", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let worker = env.worker();
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;
    // nothing gone yet
    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--sync-deletes", "--json"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(summary(&out)["deleted"], 0, "{out}");

    // behind the capture's back: one row deleted, one out of `where`, one moved to another
    // address (written in another case: the provider matches addresses case-blind), and an
    // address that only changed case (the same contact: not gone)
    exec(
        &env,
        "ALTER TABLE users DISABLE TRIGGER USER; \
         DELETE FROM users WHERE email = 'old2@example.com'; \
         UPDATE users SET marketing_opt_in = false WHERE email = 'old3@example.com'; \
         UPDATE users SET email = 'NEW4@Example.com' WHERE email = 'old4@example.com'; \
         UPDATE users SET email = 'OLD5@example.com' WHERE email = 'old5@example.com'; \
         ALTER TABLE users ENABLE TRIGGER USER",
    )
    .await;
    let gone = ["old2@example.com", "old3@example.com", "old4@example.com"];
    let before = jobs(&env).await;
    let (code, out, err) = env
        .cli(
            &config,
            &["backfill", "users", "--sync-deletes", "--dry-run", "--json"],
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let dry = summary(&out);
    assert_eq!(dry["deleted"], 3, "{dry}");
    assert_eq!(
        dry["enqueued"], 2,
        "the new address, for both accounts: {dry}"
    );
    assert_eq!(jobs(&env).await, before, "a dry run queues nothing");

    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--sync-deletes"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("3 contact(s) gone from the table: on_delete queued"),
        "{out}"
    );
    let unsubscribes: Vec<(String, String)> = sqlx::query_as(
        "SELECT account, email FROM contact_sync.jobs WHERE state = 'pending' AND payload -> 'subscribe' = '0' ORDER BY email",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String)> = gone
        .iter()
        .map(|e| ("sl".to_string(), e.to_string()))
        .collect();
    assert_eq!(unsubscribes, expected);
    // run again before the worker got to them: they are queued already
    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--sync-deletes", "--json"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(summary(&out)["deleted"], 0, "{out}");
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &gone).await;

    // once sent, an unsubscribe is what the provider holds: nothing more to send
    let calls = env.sandbox.stats().accepted;
    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--sync-deletes", "--json"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let again = summary(&out);
    assert_eq!(
        (again["deleted"].as_i64(), again["enqueued"].as_i64()),
        (Some(0), Some(0)),
        "{again}"
    );
    env.settle(&worker).await;
    assert_eq!(env.sandbox.stats().accepted, calls);

    // another source feeding the same account: its contacts would look gone
    let two = env.config_file(&format!(
        "{SOURCES}\n[sources.vips]\ntable = \"public.users\"\nkey = \"id\"\nemail = \"email\"\nwhere = \"level > 50\"\n\
         [sources.vips.targets.sl]\nlanguage = \"lang\"\non_delete = \"unsubscribe\"\n"
    ));
    let (code, _, err) = env
        .cli(&two, &["backfill", "users", "--sync-deletes"])
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("source vips also sends to sl"), "{err}");
    let (code, out, err) = env
        .cli(
            &two,
            &[
                "backfill",
                "users",
                "--sync-deletes",
                "--account",
                "jc",
                "--json",
            ],
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        summary(&out)["deleted"],
        0,
        "JustClick's on_delete sends nothing"
    );

    // a filtered backfill cannot tell what is gone
    let (code, _, err) = env
        .cli(
            &config,
            &["backfill", "users", "--sync-deletes", "--where", "id < 5"],
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("--where"), "{err}");
}

/// A backfill killed with SIGKILL resumes after the last page it queued: every contact is sent
/// exactly once. Two backfills of one source never run at once. Live changes made while a
/// backfill runs keep their order: the provider ends as the table is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backfill_resumes_and_live_changes_keep_their_order() {
    let env = TestEnv::new().await;
    exec(&env, USERS).await;
    existing_users(&env, 400).await;
    let config = env.config_file(SOURCES);
    let (code, _, _) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0);
    let mut env = env;
    env.settings.sources = sources_of(&config);

    // no worker: the backfill stops queueing at --max-pending and waits; kill it there
    let mut first = env
        .binary(&config)
        .args([
            "backfill",
            "users",
            "--json",
            "--page",
            "10",
            "--max-pending",
            "100",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while jobs(&env).await < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backfill queued nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let queued_before = jobs(&env).await;
    assert!(queued_before < 2 * 360, "killed mid-run: {queued_before}");

    // two at once are refused
    let mut holder = env.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('contact_sync.backfill:users'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (code, _, err) = env.cli(&config, &["backfill", "users"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("already running"), "{err}");
    sqlx::query("SELECT pg_advisory_unlock(hashtext('contact_sync.backfill:users'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);

    // resumed with a worker delivering and the application writing
    let worker = env.worker();
    let stop = contact_sync::worker::Shutdown::new();
    let run = spawn_worker(&worker, &stop);
    let writer = tokio::spawn({
        let pool = env.pool.clone();
        async move {
            for round in 0..30 {
                sqlx::query(
                    "UPDATE users SET city = 'live' || $1, level = $1 WHERE id % 37 = $1 % 37",
                )
                .bind(round)
                .execute(&pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let (code, out, err) = env
        .cli(&config, &["backfill", "users", "--json", "--page", "10"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let resumed = summary(&out);
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(resumed["read"], 400);
    writer.await.unwrap();
    stop.graceful.cancel();
    run.await.unwrap();
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;
    // sent once by the backfill: the contacts no live change touched had one call each
    let untouched = env
        .sandbox
        .contact("justclick", JC_LOGIN, "old31@example.com")
        .unwrap();
    assert_eq!(untouched.updates, 1, "{untouched:?}");
    let backfill_jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT j.account, j.email FROM contact_sync.jobs j \
         JOIN users u ON u.email = j.email WHERE u.id % 37 NOT IN (SELECT r % 37 FROM generate_series(0, 29) r) \
         GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(backfill_jobs, 0, "no contact queued twice");
}

/// Found by the adversarial review: a key change and an address swap queued the arriving
/// contact before the leaving one; fixing a malformed address never reached Smartlink; a json
/// column or a column named like a variable of the generated functions broke capture; the
/// application's role needed rights on contact-sync's tables; two sources on one table
/// replaced each other's triggers; a hand-edited function passed `verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_writes_and_schemas_keep_the_providers_right() {
    let (env, _) = captured().await;
    exec(
        &env,
        "ALTER TABLE users ADD COLUMN keys text, ADD COLUMN hi int, ADD COLUMN prefs json;
         INSERT INTO users (email, first_name, keys) VALUES ('k1@example.com', 'K', 'x'), ('k2@example.com', 'L', 'y');",
    )
    .await;
    // a key change: the contact leaves under its old key and arrives under the new one
    exec(
        &env,
        "UPDATE users SET id = DEFAULT WHERE email = 'k1@example.com'",
    )
    .await;
    // an address swap
    let last: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    exec(
        &env,
        "UPDATE users u SET email = v.e FROM (VALUES ('k1@example.com', 'k2@example.com'), ('k2@example.com', 'k1@example.com')) v(o, e) \
         WHERE u.email = v.o",
    )
    .await;
    // (its Smartlink changes, unsubscribes queued before subscribes, carry one capture time:
    // times taken row by row could make a subscribe look older than the unsubscribe before it,
    // and Smartlink would drop it)
    let times: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT DISTINCT payload ->> 'modify_ts' FROM contact_sync.jobs WHERE account = 'sl' AND id > $1",
    )
    .bind(last)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(times.len(), 1, "{times:?}");
    // a malformed address, fixed
    exec(
        &env,
        "INSERT INTO users (email, first_name) VALUES ('typo@@example.com', 'T');
         UPDATE users SET email = 'typo@example.com' WHERE email = 'typo@@example.com'",
    )
    .await;
    // a statement with a bad row in a table with a column named `keys`
    exec(
        &env,
        "INSERT INTO users (email, keys) VALUES ('k3@example.com', 'z'), ('not an address', 'w')",
    )
    .await;
    // the application's own role, with rights on its table only (a name of this run's own:
    // roles are the cluster's, and one left by an interrupted run must not fail the next)
    let role = format!("capture_app_{}", fastrand::u32(..));
    exec(
        &env,
        &format!("CREATE ROLE {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON users TO {role};"),
    )
    .await;
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "SET ROLE {role}; INSERT INTO users (email, first_name) OVERRIDING USER VALUE VALUES ('role@example.com', 'R'); RESET ROLE",
    ))
    .execute(&mut *conn)
    .await
    .expect("the application's role writes without rights on contact-sync's tables");
    drop(conn);
    exec(&env, &format!("DROP OWNED BY {role}; DROP ROLE {role};")).await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;
    let sl = env
        .sandbox
        .contact("smartlink", SL_GAME, "typo@example.com")
        .expect("the fixed address reached Smartlink");
    assert_eq!(sl.subscribe, Some(1));
    let rejected: Vec<String> = sqlx::query_scalar(
        "SELECT account || ' ' || sqlstate FROM contact_sync.capture_rejections ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rejected,
        vec!["jc 22023", "jc 22023", "sl 22023", "sl 22023"],
        "the malformed addresses only, each account once"
    );

    // a mapping reading a json column, and a column named like a variable
    let json_mapping = SOURCES
        .replace("lead_city = \"city\"", "lead_city = \"prefs->>'city'\"")
        .replace("lead_phone = \"phone\"", "lead_phone = \"hi\"");
    let config = env.config_file(&json_mapping);
    let (code, out, err) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0, "{out}{err}");
    exec(
        &env,
        "UPDATE users SET prefs = '{\"city\": \"Riga\"}', hi = 5 WHERE email = 'k3@example.com'",
    )
    .await;
    let payload: Value = sqlx::query_scalar(
        "SELECT payload FROM contact_sync.jobs WHERE account = 'jc' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(payload, json!({"lead_city": "Riga", "lead_phone": "5"}));
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 0, "{out}");

    // a second source on the same table keeps the first one's triggers
    let two = format!(
        "{json_mapping}\n[sources.vip]\ntable = \"public.users\"\nkey = \"id\"\nemail = \"email\"\nwhere = \"plan = 'vip'\"\n\
         [sources.vip.targets.sl]\n\"attributes.vip\" = \"true\"\n"
    );
    let config = env.config_file(&two);
    let (code, out, err) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let before = jobs(&env).await;
    exec(
        &env,
        "INSERT INTO users (email, plan) VALUES ('v@example.com', 'vip')",
    )
    .await;
    assert_eq!(jobs(&env).await, before + 3, "users: jc and sl; vip: sl");
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 0, "{out}");

    // a function changed by hand is reported
    exec(
        &env,
        "CREATE OR REPLACE FUNCTION contact_sync.capture_users_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    )
    .await;
    let (code, out, _) = env.cli(&config, &["capture", "verify"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("changed by hand"), "{out}");
}

/// Found by the model test: a call that got no answer (a timeout; the provider applied it all
/// the same) was retried with the contact's next change coalesced, which set the field back to
/// what the synced state said the provider held; the retry was skipped as already held, and the
/// provider kept the timed-out value. Such a call now forgets the contact's synced state, so the
/// retry is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_an_answer_makes_the_next_change_go_out_whole() {
    let env = TestEnv::new().await;
    exec(&env, USERS).await;
    existing_users(&env, 3).await;
    let config = env.config_file(SOURCES);
    let (code, out, err) = env.cli(&config, &["capture", "install"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let mut env = env;
    env.settings.sources = sources_of(&config);
    env.settings.http.request_timeout = Duration::from_secs(1);
    env.settings.http.abandoned_call_bound = Duration::from_secs(3);
    let (code, out, err) = env.cli(&config, &["backfill", "users", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let worker = env.worker();
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;

    // the provider takes 2.5 s to apply this one; the worker stops waiting after 1 s
    env.sandbox.faults().push(
        FaultRule::new(Fault::Slow { ms: 2500 }, 1)
            .provider("justclick")
            .email("old1@example.com"),
    );
    exec(
        &env,
        "UPDATE users SET city = 'Nowhere' WHERE email = 'old1@example.com'",
    )
    .await;
    let run = tokio::spawn({
        let worker = worker.clone();
        async move { worker.drain().await }
    });
    let first: i64 = sqlx::query_scalar(
        "SELECT max(id) FROM contact_sync.jobs WHERE email = 'old1@example.com' AND provider = 'justclick'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    env.wait_for_state(first, "running", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // back to what the provider held before: coalesced into the retry of the first change
    exec(
        &env,
        "UPDATE users SET city = 'C1' WHERE email = 'old1@example.com'",
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the drain ends")
        .unwrap();
    env.settle(&worker).await;
    assert_providers_match_the_table(&env, &[]).await;
}
