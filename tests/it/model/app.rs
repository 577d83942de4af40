//! The application as a producer: a `users` table captured into `jc` and `sl`, written with
//! plain SQL while the workers run (inserts, mapped and unmapped updates, multi-row updates,
//! rows leaving and entering the `where`, address changes, deletes), each write in its own
//! transaction at a drawn isolation level, retried across Postgres restarts. At the end every
//! captured change is delivered, nothing is rejected, each provider holds what the table says
//! for every row in scope, and Smartlink has unsubscribed every address that left.

use super::invariants::Violations;
use super::plan::{percent, pick, Isolation};
use crate::helpers::*;
use fastrand::Rng;
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Addresses of the application's users end with this (no planned contact uses it).
pub(crate) const DOMAIN: &str = "@app.example.com";

pub(crate) const TABLE: &str = "CREATE TABLE public.app_users (
    id int PRIMARY KEY,
    email text NOT NULL,
    first_name text,
    last_name text,
    city text,
    plan text,
    lang text,
    opt_in boolean NOT NULL DEFAULT true,
    seen_at timestamptz
)";

/// The mapping of the table to the round's `jc` and `sl` accounts.
pub(crate) const SOURCES: &str = r#"
[sources.app]
table = "public.app_users"
key = "id"
email = "email"
where = "opt_in"

[sources.app.targets.jc]
lead_name = "concat_ws(' ', first_name, last_name)"
lead_city = "city"

[sources.app.targets.sl]
language = "lang"
"attributes.plan" = "plan"
on_delete = "unsubscribe"
"#;

/// One write of the application: SQL run in its own transaction.
#[derive(Debug, Clone)]
pub(crate) struct AppWrite {
    pub(crate) at: Duration,
    pub(crate) sql: String,
    pub(crate) isolation: Isolation,
}

/// The application's writes of a round: before the workers start (`at` zero), then spread over
/// `window`. Every address any write uses is returned too.
pub(crate) fn plan_writes(seed: u64, window: Duration) -> (Vec<AppWrite>, BTreeSet<String>) {
    let mut rng = Rng::with_seed(seed ^ 0x00a9_9a99);
    let users = rng.usize(4..=10);
    // (exists, address generation, in scope)
    let mut state: Vec<(bool, u32, bool)> = vec![(false, 0, false); users];
    let mut addresses = BTreeSet::new();
    let address = |u: usize, generation: u32| format!("app{u}.g{generation}.{seed}{DOMAIN}");
    let mut writes = Vec::new();
    let text = |rng: &mut Rng, options: &[&str]| -> String {
        match *pick(rng, options) {
            "NULL" => "NULL".to_string(),
            v => format!("'{}'", v.replace('\'', "''")),
        }
    };
    const NAMES: &[&str] = &["Ann", "Bob", "O'Brien", "Zoë", "NULL", ""];
    const CITIES: &[&str] = &["Berlin", "Москва", "São Paulo", "NULL", "", "Paris"];
    const PLANS: &[&str] = &["free", "pro", "team", "NULL"];
    const LANGS: &[&str] = &["en", "de", "pt-BR", "NULL"];
    let count = rng.usize(15..=40);
    for k in 0..count {
        let at = if k < users / 2 {
            Duration::ZERO
        } else {
            Duration::from_millis(rng.u64(0..(window.as_millis() as u64)))
        };
        let u = rng.usize(..users);
        let (exists, generation, _) = state[u];
        let sql = if !exists {
            let opt_in = percent(&mut rng, 80);
            state[u] = (true, generation, opt_in);
            addresses.insert(address(u, generation));
            format!(
                "INSERT INTO public.app_users (id, email, first_name, last_name, city, plan, lang, opt_in) \
                 VALUES ({u}, '{}', {}, {}, {}, {}, {}, {opt_in})",
                address(u, generation),
                text(&mut rng, NAMES),
                text(&mut rng, NAMES),
                text(&mut rng, CITIES),
                text(&mut rng, PLANS),
                text(&mut rng, LANGS),
            )
        } else {
            match rng.u8(..100) {
                0..=34 => {
                    let (column, values) = *pick(
                        &mut rng,
                        &[
                            ("first_name", NAMES),
                            ("last_name", NAMES),
                            ("city", CITIES),
                            ("plan", PLANS),
                            ("lang", LANGS),
                        ],
                    );
                    format!(
                        "UPDATE public.app_users SET {column} = {} WHERE id = {u}",
                        text(&mut rng, values)
                    )
                }
                // an update of no mapped column: queues nothing
                35..=44 => format!("UPDATE public.app_users SET seen_at = now() WHERE id = {u}"),
                // many rows in one statement
                45..=54 => format!(
                    "UPDATE public.app_users SET plan = {}, city = {} WHERE id % 2 = {}",
                    text(&mut rng, PLANS),
                    text(&mut rng, CITIES),
                    rng.u8(..2)
                ),
                55..=69 => {
                    let opt_in = !state[u].2;
                    state[u].2 = opt_in;
                    format!("UPDATE public.app_users SET opt_in = {opt_in} WHERE id = {u}")
                }
                70..=84 => {
                    state[u].1 += 1;
                    addresses.insert(address(u, state[u].1));
                    format!(
                        "UPDATE public.app_users SET email = '{}' WHERE id = {u}",
                        address(u, state[u].1)
                    )
                }
                _ => {
                    state[u].0 = false;
                    state[u].1 += 1;
                    format!("DELETE FROM public.app_users WHERE id = {u}")
                }
            }
        };
        writes.push(AppWrite {
            at,
            sql,
            isolation: Isolation::draw(&mut rng),
        });
    }
    // in time order; the writes at zero keep their order
    writes.sort_by_key(|w| w.at);
    (writes, addresses)
}

/// Creates the table and installs its capture through the command line.
pub(crate) async fn install(env: &TestEnv, config: &std::path::Path, v: &mut Violations) {
    sqlx::raw_sql(TABLE).execute(&env.pool).await.unwrap();
    let (code, out, err) = env.cli(config, &["capture", "install"]).await;
    if code != 0 {
        v.add(
            "f: the application's table is captured",
            "app",
            format!("capture install exited {code}: {out}{err}"),
        );
    }
}

/// Runs one write in its own transaction, retrying while the database is away (a write whose
/// commit was lost is repeated: every write sets values, so a repeat changes nothing, and an
/// insert already made is found by its key). A serialization failure is a violation: the
/// application is the only writer of its rows, so only contact-sync could have caused it.
pub(crate) async fn write(pool: &sqlx::PgPool, w: &AppWrite, v: &mut Violations) {
    for _ in 0..120 {
        let result = async {
            let mut tx = pool.begin().await?;
            sqlx::query(&format!(
                "SET TRANSACTION ISOLATION LEVEL {}",
                w.isolation.sql()
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::raw_sql(&w.sql).execute(&mut *tx).await?;
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => return,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => return,
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("40001") | Some("40P01")) =>
            {
                v.add(
                    "f: the application's writes gain no serialization failure",
                    "app",
                    format!("{} at {}: {e}", w.sql, w.isolation.sql()),
                );
                return;
            }
            Err(sqlx::Error::Database(e))
                if e.code()
                    .as_deref()
                    .is_some_and(|c| !c.starts_with("57") && !c.starts_with("08")) =>
            {
                v.add(
                    "f: the application's writes never fail because of contact-sync",
                    "app",
                    format!("{} at {}: {e}", w.sql, w.isolation.sql()),
                );
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    v.add(
        "f: the application's writes never fail because of contact-sync",
        "app",
        format!("{}: the database never came back", w.sql),
    );
}

/// After the drain: every captured change delivered, nothing rejected, the providers as the
/// table is, every address that left unsubscribed at Smartlink.
pub(crate) async fn check(env: &TestEnv, addresses: &BTreeSet<String>, v: &mut Violations) {
    let like = format!("%{DOMAIN}");
    let open: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, state, coalesce(last_error, '') FROM contact_sync.jobs \
         WHERE email LIKE $1 AND state NOT IN ('succeeded', 'coalesced') ORDER BY id",
    )
    .bind(&like)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (id, state, error) in open {
        v.add(
            "f: every captured change is delivered",
            "app",
            format!("job {id} is {state}: {error}"),
        );
    }
    let refused: Vec<(String, String)> = sqlx::query_as(
        "SELECT row_key, reason FROM contact_sync.capture_rejections \
         UNION ALL SELECT operation, error FROM contact_sync.capture_failures",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (key, reason) in refused {
        v.add(
            "f: every captured change is delivered",
            "app",
            format!("{key} was not captured: {reason}"),
        );
    }
    let rows = sqlx::query(
        "SELECT email, concat_ws(' ', first_name, last_name) AS name, coalesce(city, '') AS city, \
                coalesce(plan, '') AS plan, lang \
         FROM public.app_users WHERE opt_in",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut in_scope = BTreeMap::new();
    for row in rows {
        let email: String = row.get("email");
        in_scope.insert(email.clone(), ());
        let expect = |what: &str, want: serde_json::Value, got: Option<&serde_json::Value>| {
            (got != Some(&want))
                .then(|| format!("{what}: {want} expected, the provider has {got:?}"))
        };
        let jc = env.sandbox.contact("justclick", JC_LOGIN, &email);
        let sl = env.sandbox.contact("smartlink", SL_GAME, &email);
        let mut wrong = Vec::new();
        match &jc {
            None => wrong.push("JustClick does not have it".to_string()),
            Some(c) => {
                wrong.extend(expect(
                    "lead_name",
                    json!(row.get::<String, _>("name")),
                    c.fields.get("lead_name"),
                ));
                wrong.extend(expect(
                    "lead_city",
                    json!(row.get::<String, _>("city")),
                    c.fields.get("lead_city"),
                ));
            }
        }
        match &sl {
            None => wrong.push("Smartlink does not have it".to_string()),
            Some(c) => {
                let plan = c.fields.get("attributes").and_then(|a| a.get("plan"));
                wrong.extend(expect(
                    "attributes.plan",
                    json!(row.get::<String, _>("plan")),
                    plan,
                ));
                if let Some(lang) = row.get::<Option<String>, _>("lang") {
                    wrong.extend(expect("language", json!(lang), c.fields.get("language")));
                }
            }
        }
        if !wrong.is_empty() {
            let history: Vec<(i64, String, String, Value, Option<String>)> = sqlx::query_as(
                "SELECT id, account, state, payload, outcome FROM contact_sync.jobs \
                 WHERE lower(email) = lower($1) ORDER BY id",
            )
            .bind(&email)
            .fetch_all(&env.pool)
            .await
            .unwrap();
            let history: Vec<String> = history
                .iter()
                .map(|(id, account, state, payload, outcome)| {
                    format!("#{id} {account} {state} {payload} {outcome:?}")
                })
                .collect();
            for w in wrong {
                v.add(
                    "f: the providers end as the table is",
                    &email,
                    format!("{w}; its jobs: {}", history.join(" | ")),
                );
            }
        }
    }
    for email in addresses.iter().filter(|e| !in_scope.contains_key(*e)) {
        if let Some(c) = env.sandbox.contact("smartlink", SL_GAME, email) {
            if c.subscribe != Some(0) {
                v.add(
                    "f: an address that left is unsubscribed",
                    email,
                    format!("Smartlink has subscribe = {:?}", c.subscribe),
                );
            }
        }
    }
}
