//! Regression tests of the trust issue: each defect found by trying the guarantees
//! adversarially, reproduced as it was found and held fixed.

use crate::helpers::*;
use contact_sync::outbox::{self, admin, NewJob};
use contact_sync::providers::address::is_valid_email;
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::{json, Value};
use std::time::Duration;

async fn enqueue_err(env: &TestEnv, job: NewJob) -> String {
    let mut conn = env.pool.acquire().await.unwrap();
    match outbox::enqueue(&mut conn, &job).await {
        Ok(id) => panic!("{job:?} was accepted as job {id}"),
        Err(e) => {
            assert!(e.is_invalid(), "{e}");
            e.to_string()
        }
    }
}

/// Inserts rows as an old version (or a hand-written INSERT with the trigger off) could have.
async fn insert_unchecked(env: &TestEnv, sql: &str) {
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE contact_sync.jobs DISABLE TRIGGER jobs_after_insert")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE contact_sync.jobs ENABLE TRIGGER jobs_after_insert")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn numbers_reach_the_provider_exactly_or_are_refused() {
    let env = TestEnv::new().await;
    // (through SQL: a Rust caller's JSON library could not even hold most of these)
    for bad in [
        "1e400",
        "123456789012345678901",
        "0.1000000000000000055",
        "-1e-400",
        "1e308",
    ] {
        let err = sqlx::query_scalar::<_, i64>(&format!(
            r#"SELECT contact_sync.enqueue('smartlink', 'sl', 'n@example.com', '{{"attributes": {{"n": {bad}}}}}')"#
        ))
        .fetch_one(&env.pool)
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("attribute 'n'") && err.contains("cannot be sent exactly"),
            "{bad}: {err}"
        );
    }
    // what a Rust caller's f64 makes of 123456789012345678901 is refused too
    let message = enqueue_err(
        &env,
        sl(
            "n@example.com",
            json!({"attributes": {"n": 1.2345678901234568e20}}),
        ),
    )
    .await;
    assert!(message.contains("cannot be sent exactly"), "{message}");
    let exact = json!({"attributes": {"big": 9007199254740993u64, "neg": -5, "dec": 0.125,
                                      "e": 1.5e300, "huge_int": 9223372036854775807i64, "one": 1.0}});
    let id = env.enqueue(sl("n@example.com", exact.clone())).await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(id).await.state, "succeeded");
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "n@example.com")
        .unwrap();
    assert_eq!(c.fields["attributes"], exact["attributes"]);

    // Values as an application's numeric columns store them (plain notation, trailing zeros)
    // and at the edges of the accepted range: each must arrive with the value Postgres holds.
    // (Compared with Postgres's own correctly rounded float8, parsed by Rust's correctly
    // rounded parser: a sloppy JSON parser in the worker would not cancel out here.)
    let id: i64 = sqlx::query_scalar(
        "SELECT contact_sync.enqueue('smartlink', 'sl', 'edge@example.com', jsonb_build_object('attributes', jsonb_build_object(
            'price', 3817034.98274485::numeric(30,20), 'total', 8466569467991.35::numeric(34,20),
            'r', 348359269.386637::numeric(30,20), 'a', 1e-307::numeric, 'b', 2.32762829599804e200::numeric,
            'c', 6.492751806747e-278::numeric, 'd', 9.123196010941e205::numeric, 'e', 6.68902524318885e95::numeric)))",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    env.settle(&worker).await;
    assert_eq!(env.job(id).await.state, "succeeded");
    let held: Vec<(String, String)> = sqlx::query_as(
        "SELECT key, (value::numeric)::float8::text FROM contact_sync.jobs, jsonb_each(payload -> 'attributes') WHERE id = $1",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "edge@example.com")
        .unwrap();
    for (key, pg) in held {
        let expected: f64 = pg.parse().unwrap();
        let sent = c.fields["attributes"][&key].as_f64().unwrap();
        assert_eq!(
            sent, expected,
            "{key}: Postgres holds {pg}, the provider got {sent:e}"
        );
    }
}

#[tokio::test]
async fn an_undecodable_row_is_parked_alone() {
    // Regression: one poison row failed the decoding of the whole claimed batch; every job of
    // every account in it ended dead with "lease expired" and the provider saw no call.
    let env = TestEnv::new().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            env.enqueue(jc(&format!("ok{i}@example.com"), json!({"lead_name": "x"})))
                .await,
        );
        ids.push(
            env.enqueue(sl(&format!("ok{i}@example.com"), json!({"tags": ["t"]})))
                .await,
        );
    }
    insert_unchecked(
        &env,
        r#"INSERT INTO contact_sync.jobs (provider, account, email, payload)
           VALUES ('smartlink', 'sl', 'poison@example.com', '{"attributes": {"n": 1e400}, "modify_ts": 1}')"#,
    )
    .await;
    // a follower that cannot be decoded stops the group before it
    let head = env
        .enqueue(sl("poison2@example.com", json!({"tags": ["a"]})))
        .await;
    insert_unchecked(
        &env,
        r#"INSERT INTO contact_sync.jobs (provider, account, email, payload)
           VALUES ('smartlink', 'sl', 'poison2@example.com', '{"attributes": {"n": 1e400}, "modify_ts": 1}')"#,
    )
    .await;
    let worker = env.worker();
    env.settle(&worker).await;
    for id in ids {
        assert_eq!(env.job(id).await.state, "succeeded");
    }
    assert_eq!(env.job(head).await.state, "succeeded");
    let dead: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT email, last_error FROM contact_sync.jobs WHERE state = 'dead' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (_, error) in dead {
        let error = error.unwrap();
        assert!(error.contains("cannot be decoded"), "{error}");
        assert!(!error.contains("lease expired"));
    }
}

#[tokio::test]
async fn coalescing_keeps_an_unsubscribe_and_splits_at_provider_limits() {
    let env = TestEnv::new().await;
    // the contact is subscribed at the provider
    let first = env
        .enqueue(sl("u@example.com", json!({"subscribe": 1})))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.state, "succeeded");
    // Regression: these two merged into one call whose strategy kept the contact subscribed.
    env.enqueue(sl("u@example.com", json!({"subscribe": 0})))
        .await;
    env.enqueue(sl(
        "u@example.com",
        json!({"update_strategy": 2, "tags": ["x"]}),
    ))
    .await;
    // Regression: two valid changes of 30 attributes each became one call of 60 (dead).
    let a: serde_json::Map<String, Value> = (0..30).map(|i| (format!("a{i}"), json!(i))).collect();
    let b: serde_json::Map<String, Value> = (0..30).map(|i| (format!("b{i}"), json!(i))).collect();
    let x = env
        .enqueue(sl("attrs@example.com", json!({ "attributes": a })))
        .await;
    let y = env
        .enqueue(sl("attrs@example.com", json!({ "attributes": b })))
        .await;
    env.settle(&worker).await;
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "u@example.com")
        .unwrap();
    assert_eq!(c.subscribe, Some(0), "the unsubscribe was lost");
    assert_eq!(c.fields["tags"], json!(["x"]));
    assert_eq!(env.job(x).await.state, "succeeded");
    assert_eq!(env.job(y).await.state, "succeeded", "split, not merged");
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "attrs@example.com")
        .unwrap();
    assert_eq!(c.fields["attributes"].as_object().unwrap().len(), 60);
}

#[tokio::test]
async fn an_unsubscribe_survives_a_confirmation_request_taken_out_of_its_call() {
    let mut env = TestEnv::new().await;
    env.settings.accounts.get_mut("sl").unwrap().double_opt_in =
        contact_sync::config::DoubleOptIn::Drop;
    // a confirmation request holds the contact's window for the hour
    let first = env
        .enqueue(sl("p@example.com", json!({"subscribe": 3})))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.doi.as_deref(), Some("sent"));
    // Regression (the model test, seed 927240252511): these two were merged into one call
    // asking for the pending status; inside the window the worker took that status out, and
    // the unsubscribe went with it: the contact stayed pending.
    let unsubscribe = env
        .enqueue(sl(
            "p@example.com",
            json!({"subscribe": 0, "update_strategy": 3}),
        ))
        .await;
    let again = env
        .enqueue(sl(
            "p@example.com",
            json!({"subscribe": 3, "update_strategy": 1}),
        ))
        .await;
    env.settle(&worker).await;
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "p@example.com")
        .unwrap();
    assert_eq!(c.subscribe, Some(0), "the unsubscribe was lost");
    assert_eq!(c.confirmation_emails, 1);
    let unsubscribe = env.job(unsubscribe).await;
    let again = env.job(again).await;
    assert_eq!(unsubscribe.state, "succeeded", "{unsubscribe:?}");
    assert_eq!(
        again.state, "succeeded",
        "its own call, not merged: {again:?}"
    );
    assert_eq!(again.doi.as_deref(), Some("suppressed"));
}

#[tokio::test]
async fn a_retried_confirmation_request_finds_its_own_window_in_another_call() {
    let mut env = TestEnv::new().await;
    env.settings.accounts.get_mut("sl").unwrap().double_opt_in =
        contact_sync::config::DoubleOptIn::Drop;
    // retries wait until the test brings them forward
    env.settings.worker.backoff_base = Duration::from_secs(600);
    env.settings.worker.backoff_cap = Duration::from_secs(600);
    // the first call's answer cannot be verified: retried, the window kept (the email may
    // have gone)
    env.sandbox.faults().push(
        FaultRule::new(Fault::Unverifiable, 1)
            .provider("smartlink")
            .email("h@example.com"),
    );
    let head = env
        .enqueue(sl("h@example.com", json!({"tags": ["a"]})))
        .await;
    let pending = env
        .enqueue(sl("h@example.com", json!({"subscribe": 3})))
        .await;
    let worker = env.worker();
    worker.drain().await;
    assert_eq!(env.job(head).await.attempts, 1);
    assert_eq!(env.job(pending).await.state, "pending", "it rode along");
    // the retry groups the changes differently: the head is gone, the request goes alone
    let (done, _) = admin::cancel(&env.pool, head).await.unwrap();
    assert_eq!(done, admin::ActionResult::Done);
    env.settle(&worker).await;
    // Regression (the model test, seed 813226260054): the window was held in the name of the
    // call's head, so the request's own retry found it taken and its status was taken out.
    let row = env.job(pending).await;
    assert_eq!(row.state, "succeeded", "{row:?}");
    assert_eq!(row.doi.as_deref(), Some("sent"), "{row:?}");
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "h@example.com")
        .unwrap();
    assert_eq!(c.subscribe, Some(3));
    assert_eq!(c.confirmation_emails, 1);
}

#[tokio::test]
async fn a_refused_retry_keeps_the_window_its_earlier_attempt_may_have_used() {
    let mut env = TestEnv::new().await;
    env.settings.worker.backoff_base = Duration::from_secs(600);
    env.settings.worker.backoff_cap = Duration::from_secs(600);
    env.sandbox.faults().push(
        FaultRule::new(Fault::Unverifiable, 1)
            .provider("smartlink")
            .email("r@example.com"),
    );
    let job = env
        .enqueue(sl("r@example.com", json!({"subscribe": 3})))
        .await;
    let worker = env.worker();
    worker.drain().await;
    let ledger = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM contact_sync.doi_ledger WHERE email = 'r@example.com'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    // the answer was lost: the email may have gone, the window is kept
    assert_eq!(ledger().await, 1);
    // the retry is refused before the provider acts
    env.sandbox.faults().push(
        FaultRule::new(Fault::Status { status: 503 }, 1)
            .provider("smartlink")
            .email("r@example.com"),
    );
    sqlx::query("UPDATE contact_sync.jobs SET run_at = now() WHERE id = $1")
        .bind(job)
        .execute(&env.pool)
        .await
        .unwrap();
    worker.drain().await;
    assert_eq!(env.job(job).await.attempts, 2);
    // Regression (the review of the window holder): the refused retry gave the window back,
    // though the first attempt's email may have gone within the hour.
    assert_eq!(ledger().await, 1, "the window was given back");
    env.settle(&worker).await;
    let row = env.job(job).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.doi.as_deref(), Some("sent"));
}

#[tokio::test]
async fn an_unverifiable_answer_is_never_a_success() {
    let env = TestEnv::new().await;
    for provider in ["justclick", "smartlink"] {
        env.sandbox
            .faults()
            .push(FaultRule::new(Fault::Unverifiable, 1).provider(provider));
    }
    let a = env
        .enqueue(jc("v@example.com", json!({"lead_name": "V"})))
        .await;
    let b = env
        .enqueue(sl("v@example.com", json!({"tags": ["v"]})))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    for id in [a, b] {
        let row = env.job(id).await;
        assert_eq!(row.state, "succeeded");
        assert_eq!(
            row.attempts, 2,
            "the unverifiable answer was not taken as success"
        );
        assert_eq!(row.errors[0]["kind"], "bad_response_signature", "{row:?}");
    }
}

#[tokio::test]
async fn a_nul_in_a_provider_text_is_stored_and_never_blocks_others() {
    let env = TestEnv::new().await;
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 777,
                text: "bad\u{0}text \u{1b}[31mred".into(),
            },
            1,
        )
        .provider("justclick")
        .email("nul@example.com"),
    );
    let bad = env
        .enqueue(jc("nul@example.com", json!({"lead_name": "N"})))
        .await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(
            env.enqueue(jc(&format!("o{i}@example.com"), json!({"lead_name": "O"})))
                .await,
        );
    }
    let worker = env.worker();
    let report = env.settle(&worker).await;
    assert_eq!(report.lease_lost, 0);
    let row = env.job(bad).await;
    assert_eq!(row.state, "dead");
    let error = row.last_error.unwrap();
    assert!(
        error.contains("bad\\u{0000}text \\u{001b}[31mred"),
        "{error}"
    );
    assert_eq!(row.errors[0]["code"], "777");
    assert_eq!(
        row.attempts, 1,
        "dead at once with the provider's code, not by lease"
    );
    for id in others {
        assert_eq!(env.job(id).await.state, "succeeded");
    }
}

#[tokio::test]
async fn failed_calls_give_the_confirmation_window_back() {
    let mut env = TestEnv::new().await;
    env.settings.worker.max_attempts = 2;
    env.settings.accounts.get_mut("sl").unwrap().double_opt_in =
        contact_sync::config::DoubleOptIn::Drop;
    env.sandbox.faults().push(
        FaultRule::new(Fault::Status { status: 503 }, 2)
            .provider("smartlink")
            .email("w@example.com"),
    );
    let first = env
        .enqueue(sl("w@example.com", json!({"subscribe": 3})))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.state, "dead");
    // Regression: the failed call kept the hour reserved; this one was "suppressed".
    let second = env
        .enqueue(sl("w@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    let row = env.job(second).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.doi.as_deref(), Some("sent"));
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "w@example.com")
        .unwrap();
    assert_eq!(c.confirmation_emails, 1);
    // the window is the provider's hour plus a margin, in database time
    let until: bool = sqlx::query_scalar(
        "SELECT sent_at > now() - interval '1 minute' FROM contact_sync.doi_ledger",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(until);
}

#[tokio::test]
async fn a_status_change_committed_after_the_sweep_supersedes_the_resend() {
    let env = TestEnv::new().await;
    let worker = env.worker();
    let first = env
        .enqueue(sl("r@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    // inside the window: the pending status is deferred
    let second = env
        .enqueue(sl("r@example.com", json!({"subscribe": 3, "tags": ["b"]})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.doi.as_deref(), Some("sent"));
    assert!(env
        .job(second)
        .await
        .doi
        .unwrap()
        .starts_with("deferred_until"));
    // the user unsubscribes in a transaction still open when the window ends and the sweep runs
    let mut tx = env.pool.begin().await.unwrap();
    let later = outbox::enqueue(&mut tx, &sl("r@example.com", json!({"subscribe": 0})))
        .await
        .unwrap();
    sqlx::query("UPDATE contact_sync.doi_deferred SET due_at = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    // The sweep cannot see the uncommitted change. The open transaction holds the contact's
    // queue row (its first change since the contact went idle): the sweep never waits for it
    // and leaves the re-send for a later sweep, or makes it when the row is free.
    let resends = outbox::doi::enqueue_due_resends(&env.pool).await.unwrap();
    assert!(resends.len() <= 1, "{resends:?}");
    tx.commit().await.unwrap();
    env.settle(&worker).await;
    assert_eq!(env.job(later).await.state, "succeeded");
    if let Some(&id) = resends.first() {
        let resend = env.job(id).await;
        assert_eq!(resend.state, "cancelled", "{resend:?}");
        assert_eq!(
            resend.doi.as_deref(),
            Some(format!("superseded by job {later}").as_str())
        );
    }
    // a sweep after the commit has nothing left to re-send
    assert!(outbox::doi::enqueue_due_resends(&env.pool)
        .await
        .unwrap()
        .is_empty());
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "r@example.com")
        .unwrap();
    assert_eq!(
        c.subscribe,
        Some(0),
        "the re-send re-subscribed the contact"
    );
}

#[tokio::test]
async fn one_definition_of_an_address_for_enqueue_and_the_worker() {
    let env = TestEnv::new().await;
    // Regression: a no-break space passed enqueue and the worker refused it (dead).
    let message = enqueue_err(&env, sl("user\u{a0}@example.com", json!({"tags": ["x"]}))).await;
    assert!(message.contains("malformed email"), "{message}");
    // Hostile and random addresses: the database and the clients answer the same.
    let mut rng = fastrand::Rng::with_seed(9);
    let alphabet: Vec<char> = "ab.@-_+ \u{a0}\u{2007}\u{200b}\u{feff}\u{85}\u{1}\"<>,;:\\()[]ü例é\u{61c}\u{fff9}\u{e0001}\u{1d173}\u{34f}\u{fe0f}\u{e0100}\u{1d17b}\u{ffa1}"
        .chars()
        .collect();
    let mut samples: Vec<String> = vec![
        "user@example.com".into(),
        "a@b".into(),
        "ü@例え.jp".into(),
        ".a@b.co".into(),
        "a..b@b.co".into(),
        "a.@b.co".into(),
        format!("{}@b.co", "a".repeat(64)),
        format!("{}@b.co", "a".repeat(65)),
        format!("a@{}.co", "b".repeat(249)),
        format!("a@{}.co", "b".repeat(250)),
    ];
    for _ in 0..3000 {
        let len = rng.usize(1..8);
        let mut s: String = (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        if rng.bool() {
            s = format!("x{s}@ex.com");
        }
        samples.push(s);
    }
    let answers: Vec<bool> =
        sqlx::query_scalar("SELECT contact_sync.email_is_valid(e) FROM unnest($1::text[]) WITH ORDINALITY AS t(e, n) ORDER BY n")
            .bind(&samples)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let mut accepted = 0;
    for (s, db) in samples.iter().zip(answers) {
        assert_eq!(db, is_valid_email(s), "{s:?}: database says {db}");
        accepted += usize::from(db);
    }
    assert!(
        accepted > 20,
        "the sample must hold valid addresses too ({accepted})"
    );
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
    admin::status(&env.pool).await.unwrap();
}

#[tokio::test]
async fn throttling_does_not_consume_attempts() {
    let mut env = TestEnv::new().await;
    env.settings.worker.max_attempts = 2;
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::RateLimit {
                retry_after_secs: 0,
            },
            4,
        )
        .provider("justclick"),
    );
    let id = env
        .enqueue(jc("t@example.com", json!({"lead_name": "T"})))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    let row = env.job(id).await;
    assert_eq!(
        row.state, "succeeded",
        "four 429s must not kill a job of 2 attempts"
    );
    assert_eq!(row.attempts, 1);
    assert_eq!(row.errors.as_array().unwrap().len(), 4);
    // JustClick code 8 (limit exhausted): waits its two hours without using an attempt
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 8,
                text: "limit".into(),
            },
            1,
        )
        .provider("justclick"),
    );
    let id = env
        .enqueue(jc("t8@example.com", json!({"lead_name": "T"})))
        .await;
    // (one drain: `settle` would pull the two-hour retry forward into the paused account)
    worker.drain().await;
    let (state, attempts, wait): (String, i32, f64) = sqlx::query_as(
        "SELECT state, attempts, extract(epoch FROM run_at - now())::float8 FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), attempts), ("pending", 0));
    assert!(wait > 7000.0, "{wait}");
}

#[tokio::test]
async fn retry_keeps_per_contact_order_and_the_schedule() {
    let mut env = TestEnv::new().await;
    env.settings.worker.max_attempts = 1;
    env.sandbox.faults().push(
        FaultRule::new(Fault::Status { status: 503 }, 1)
            .provider("justclick")
            .email("s@example.com"),
    );
    let old = env
        .enqueue(jc("s@example.com", json!({"lead_name": "Old"})))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(old).await.state, "dead");
    let newer = env
        .enqueue(jc("s@example.com", json!({"lead_name": "New"})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(newer).await.state, "succeeded");
    // Regression: retrying the old change overwrote the newer value at the provider.
    let (result, state) = admin::retry(&env.pool, old, false).await.unwrap();
    assert_eq!(result, admin::ActionResult::Stale);
    assert_eq!(state, Some(newer.to_string()));
    let bulk = admin::retry_dead(&env.pool, None, false).await.unwrap();
    assert_eq!((bulk.retried, bulk.skipped_stale), (0, 1));
    // retention deletes the newer job, and the old one remembers it (`overtaken_by`)
    sqlx::query(
        "UPDATE contact_sync.jobs SET finished_at = now() - interval '30 days' WHERE id = $1",
    )
    .bind(newer)
    .execute(&env.pool)
    .await
    .unwrap();
    let pruned =
        contact_sync::outbox::prune::prune_finished(&env.pool, Duration::from_secs(86_400), 1000)
            .await
            .unwrap();
    assert_eq!(pruned, 1);
    let (result, state) = admin::retry(&env.pool, old, false).await.unwrap();
    assert_eq!(state, Some(newer.to_string()));
    assert_eq!(
        result,
        admin::ActionResult::Stale,
        "still refused after retention ran"
    );
    env.settle(&worker).await;
    let c = env
        .sandbox
        .contact("justclick", JC_LOGIN, "s@example.com")
        .unwrap();
    assert_eq!(c.fields["lead_name"], "New");
    // explicitly forced: re-sent
    let (result, _) = admin::retry(&env.pool, old, true).await.unwrap();
    assert_eq!(result, admin::ActionResult::Done);
    env.settle(&worker).await;
    assert_eq!(env.job(old).await.state, "succeeded");

    // Regression: retrying a cancelled scheduled job dropped its run_at.
    let later = chrono::Utc::now() + chrono::Duration::hours(3);
    let scheduled = env
        .enqueue(jc("sched@example.com", json!({"lead_name": "S"})).run_at(later))
        .await;
    admin::cancel(&env.pool, scheduled).await.unwrap();
    admin::retry(&env.pool, scheduled, false).await.unwrap();
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM run_at - now())::float8 FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(scheduled)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(wait > 10_000.0, "{wait}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cancelled_in_flight_ends_coalesced_and_a_leaseless_running_row_is_rescued() {
    let env = TestEnv::new().await;
    env.sandbox.faults().push(
        FaultRule::new(Fault::Stall { ms: 1500 }, 1)
            .provider("justclick")
            .email("f@example.com"),
    );
    let head = env
        .enqueue(jc("f@example.com", json!({"lead_name": "1"})))
        .await;
    let follower = env
        .enqueue(jc("f@example.com", json!({"lead_city": "2"})))
        .await;
    let worker = env.worker();
    let run = tokio::spawn({
        let worker = worker.clone();
        async move { worker.drain().await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env.job(head).await.state != "running" {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (result, _) = admin::cancel(&env.pool, follower).await.unwrap();
    assert_eq!(result, admin::ActionResult::Done);
    run.await.unwrap();
    let row = env.job(follower).await;
    assert_eq!(row.state, "coalesced", "it was delivered with its head");
    assert_eq!(row.coalesced_into, Some(head));
    assert!(row.last_error.unwrap().contains("delivered all the same"));

    // a hand-inserted running row without a lease blocked its contact forever
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, attempts) VALUES ('justclick', 'jc', 'h@example.com', '{\"lead_name\": \"H\"}', 'running', 0)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let behind = env
        .enqueue(jc("h@example.com", json!({"lead_city": "C"})))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        env.settle(&worker).await;
        if ["succeeded", "coalesced"].contains(&env.job(behind).await.state.as_str()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the contact stayed blocked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retention_run_never_starves_the_heartbeat() {
    // Regression: pruning a large finished backlog ran in the heartbeat's task; another worker
    // rescued a job whose call was still in flight and the provider got two calls at once.
    let mut env = TestEnv::new().await;
    env.settings.worker.lease = Duration::from_secs(2);
    env.settings.retention.finished = Duration::from_secs(1);
    env.settings.http.request_timeout = Duration::from_secs(20);
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, finished_at)
         SELECT 'justclick', 'jc', 'old' || g || '@example.com', '{}', 'succeeded', now() - interval '1 day'
         FROM generate_series(1, 300000) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    env.sandbox.faults().push(
        FaultRule::new(Fault::Stall { ms: 9000 }, 1)
            .provider("justclick")
            .email("slow@example.com"),
    );
    let id = env
        .enqueue(jc("slow@example.com", json!({"lead_name": "S"})))
        .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let a = env.worker();
    let b = env.worker_with(&env.settings, env.db.another_pool().await);
    let runs = [a, b].map(|w| {
        let stop = stop.clone();
        tokio::spawn(async move { w.run(stop).await })
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while env.job(id).await.state != "succeeded" {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            env.job(id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for r in runs {
        r.await.unwrap();
    }
    let row = env.job(id).await;
    assert_eq!(row.attempts, 1, "{row:?}");
    assert_eq!(
        row.errors,
        json!([]),
        "the lease expired under a live worker"
    );
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state = 'succeeded'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(left < 300_000, "retention ran meanwhile ({left} left)");
}

#[tokio::test]
async fn drain_fails_while_its_own_claims_are_still_running() {
    // The database refuses every write that would move one delivered job out of `running` (a
    // trigger stands in for any write that keeps failing): its outcome is kept with its lease,
    // the others are recorded, and `run --drain` stopped by SIGTERM cannot release it either:
    // it says so and exits 1 instead of 0.
    let env = TestEnv::new().await;
    sqlx::query(
        r#"CREATE FUNCTION refuse_stuck() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF OLD.state = 'running' AND NEW.state <> 'running' AND NEW.email = 'stuck@example.com' THEN
                   RAISE EXCEPTION 'refusing to record this job';
               END IF;
               RETURN NEW;
           END $$"#,
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_stuck BEFORE UPDATE ON contact_sync.jobs FOR EACH ROW EXECUTE FUNCTION refuse_stuck()",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let stuck = env
        .enqueue(jc("stuck@example.com", json!({"lead_name": "S"})))
        .await;
    let mut others = Vec::new();
    for i in 0..10 {
        others.push(
            env.enqueue(jc(
                &format!("fine{i}@example.com"),
                json!({"lead_name": "F"}),
            ))
            .await,
        );
    }
    let config = env.config_file("");
    let child = env
        .binary(&config)
        .args(["run", "--drain"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state = 'succeeded'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if done == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the others were not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.job(stuck).await.state, "running");
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("still `running`"), "{stderr}");
}

#[tokio::test]
async fn a_status_change_committed_late_with_an_older_id_supersedes_the_resend() {
    // Found by the adversarial review: supersession compared ids, and a change whose id was
    // taken before the deferring call but committed after it lost to the re-send.
    let env = TestEnv::new().await;
    let worker = env.worker();
    env.enqueue(sl("late@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    // a change queued (committed) before the transaction opens: the contact's queue row exists,
    // so the open transaction below holds it without making later changes wait
    let queued = env
        .enqueue(sl("late@example.com", json!({"tags": ["q"]})))
        .await;
    let mut tx = env.pool.begin().await.unwrap();
    // (its modify_ts is the newest: an older one would rightly be discarded by the provider)
    let newest = chrono::Utc::now().timestamp_millis() + 60_000;
    let unsubscribe = outbox::enqueue(
        &mut tx,
        &sl(
            "late@example.com",
            json!({"subscribe": 0, "modify_ts": newest}),
        ),
    )
    .await
    .unwrap();
    let deferred = env
        .enqueue(sl(
            "late@example.com",
            json!({"subscribe": 3, "tags": ["x"]}),
        ))
        .await;
    env.settle(&worker).await;
    // the queued change carried the deferred one (coalesced): the call's outcome is on it
    let carrier = env.job(queued).await;
    assert!(
        carrier
            .doi
            .as_deref()
            .is_some_and(|d| d.starts_with("deferred_until"))
            || env
                .job(deferred)
                .await
                .doi
                .is_some_and(|d| d.starts_with("deferred_until")),
        "{carrier:?}"
    );
    assert!(unsubscribe < deferred);
    tx.commit().await.unwrap();
    env.settle(&worker).await;
    assert_eq!(env.job(unsubscribe).await.state, "succeeded");
    // the hour passes: nothing is left to re-send
    sqlx::query("UPDATE contact_sync.doi_ledger SET sent_at = now() - interval '2 hours'")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE contact_sync.doi_deferred SET due_at = now()")
        .execute(&env.pool)
        .await
        .unwrap();
    assert!(outbox::doi::enqueue_due_resends(&env.pool)
        .await
        .unwrap()
        .is_empty());
    env.settle(&worker).await;
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "late@example.com")
        .unwrap();
    assert_eq!(
        c.subscribe,
        Some(0),
        "the re-send re-subscribed the contact"
    );
}

#[tokio::test]
async fn the_command_line_never_rounds_a_number() {
    // Found by the adversarial review: `enqueue --file` and `--payload` parsed numbers as floats,
    // so values the database refuses were silently rounded and queued.
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let file = std::env::temp_dir().join(format!("cs-numbers-{}.jsonl", fastrand::u64(..)));
    std::fs::write(
        &file,
        concat!(
            r#"{"provider":"smartlink","account":"sl","email":"f1@example.com","payload":{"attributes":{"x":0.1000000000000000055}}}"#,
            "\n",
            r#"{"provider":"smartlink","account":"sl","email":"f2@example.com","payload":{"attributes":{"x":3817034.98274485000000000000}}}"#,
            "\n"
        ),
    )
    .unwrap();
    let (code, out, err) = env
        .cli(&config, &["enqueue", "--file", file.to_str().unwrap()])
        .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("queued 1, duplicates 0, rejected 1"), "{out}");
    assert!(
        err.contains("line 1") && err.contains("cannot be sent exactly"),
        "{err}"
    );
    let (code, _, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "smartlink",
                "--account",
                "sl",
                "--email",
                "p@example.com",
                "--payload",
                r#"{"attributes":{"y":123456789012345678.5}}"#,
            ],
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot be sent exactly"), "{err}");
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT payload -> 'attributes' ->> 'x' FROM contact_sync.jobs")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored, vec!["3817034.98274485000000000000".to_string()]);
}
