//! Both providers end to end against the sandbox: exact signatures with hard values, double
//! opt-in, rate limits.

use crate::helpers::*;
use contact_sync::config::DoubleOptIn;
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn cyrillic_and_punctuation_reach_both_providers_intact() {
    let env = TestEnv::new().await;
    let name = "Новое Имя2 *~'\"&=+%/?#;€ 🙂";
    let a = env
        .enqueue(jc("a.b+c@example.org", json!({"lead_name": name, "lead_phone": "+7 (777) 777-77-77", "lead_city": "Мухоловск", "lead_tags": ["tag1", "тег 2"]})))
        .await;
    let b = env
        .enqueue(sl(
            "a.b+c@example.org",
            json!({"tags": ["тег", "a&b"], "openid": "5450588341569", "subscribe": 1, "location": "004", "language": "ru",
                   "attributes": {"nickname": name, "level": "10"}, "preferences": ["x/y"], "update_strategy": 1}),
        ))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(a).await.state, "succeeded");
    assert_eq!(env.job(b).await.state, "succeeded");
    let c = env
        .sandbox
        .contact("justclick", JC_LOGIN, "a.b+c@example.org")
        .unwrap();
    assert_eq!(c.fields["lead_name"], name);
    assert_eq!(c.fields["lead_tags"], "tag1,тег 2");
    assert_eq!(c.fields["lead_phone"], "+7 (777) 777-77-77");
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "a.b+c@example.org")
        .unwrap();
    assert_eq!(c.fields["attributes"]["nickname"], name);
    assert_eq!(c.subscribe, Some(1));
    assert_eq!(env.sandbox.stats().bad_signatures, 0);
}

#[tokio::test]
async fn smartlink_modify_ts_is_the_change_time_not_the_send_time() {
    let env = TestEnv::new().await;
    let id = env
        .enqueue(sl("ts@example.com", json!({"tags": ["a"]})))
        .await;
    let enqueued_ms = env.job(id).await.payload["modify_ts"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.settle(&env.worker()).await;
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "ts@example.com")
        .unwrap();
    assert_eq!(c.modify_ts, enqueued_ms);
}

async fn ledger_to_the_past(env: &TestEnv) {
    sqlx::query("UPDATE contact_sync.doi_ledger SET sent_at = sent_at - interval '63 minutes'")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE contact_sync.doi_deferred SET due_at = due_at - interval '63 minutes'")
        .execute(&env.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn double_opt_in_defer_resends_the_status_when_the_window_ends() {
    let env = TestEnv::new().await;
    let worker = env.worker();
    let first = env
        .enqueue(sl("doi@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.doi.as_deref(), Some("sent"));
    // the contact unsubscribes, then asks again within the hour
    env.enqueue(sl("doi@example.com", json!({"subscribe": 0})))
        .await;
    env.settle(&worker).await;
    let second = env
        .enqueue(sl(
            "DOI@example.com",
            json!({"subscribe": 3, "tags": ["again"]}),
        ))
        .await;
    env.settle(&worker).await;
    let row = env.job(second).await;
    assert_eq!(row.state, "succeeded");
    assert!(
        row.doi.as_deref().unwrap().starts_with("deferred_until "),
        "{:?}",
        row.doi
    );
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "doi@example.com")
        .unwrap();
    assert_eq!(
        c.fields["tags"],
        json!(["again"]),
        "the other fields went now"
    );
    assert_eq!(c.subscribe, Some(0), "the status waits for the window");
    assert_eq!(c.pending_requests, 1);
    // nothing is re-sent before the window ends
    env.settle(&worker).await;
    assert_eq!(env.count("pending").await, 0);
    // the window ends (database time): the pending status is re-sent
    ledger_to_the_past(&env).await;
    env.settle(&worker).await;
    let resent: (i64, Option<String>) = sqlx::query_as(
        "SELECT id, doi FROM contact_sync.jobs WHERE id > $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(second)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(resent.1.as_deref(), Some("sent"));
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "doi@example.com")
        .unwrap();
    assert_eq!(c.pending_requests, 2);
    assert_eq!(c.subscribe, Some(3));
}

#[tokio::test]
async fn a_newer_status_supersedes_the_deferred_resend() {
    let env = TestEnv::new().await;
    let worker = env.worker();
    env.enqueue(sl("sup@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    env.enqueue(sl(
        "sup@example.com",
        json!({"subscribe": 3, "update_strategy": 1}),
    ))
    .await;
    env.settle(&worker).await;
    // strategy 1 lets "subscribed" overwrite "pending" (the default, 0, would not)
    let later = env
        .enqueue(sl(
            "sup@example.com",
            json!({"subscribe": 1, "update_strategy": 1}),
        ))
        .await;
    env.settle(&worker).await;
    ledger_to_the_past(&env).await;
    env.settle(&worker).await;
    let newest: i64 = sqlx::query_scalar("SELECT max(id) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(newest, later, "no re-send after a newer status");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.doi_deferred")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(
        env.sandbox
            .contact("smartlink", SL_GAME, "sup@example.com")
            .unwrap()
            .subscribe,
        Some(1)
    );
}

#[tokio::test]
async fn double_opt_in_drop_suppresses_and_the_window_is_per_api_key() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    // a second account with the same API key shares the window; it drops instead of deferring
    let mut sl2 = smartlink_account(&env.sandbox, SL_GAME, SL_SECRET);
    sl2.double_opt_in = DoubleOptIn::Drop;
    settings.accounts.insert("sl2".into(), sl2);
    let worker = env.worker_with(&settings, env.pool.clone());
    let first = env
        .enqueue(sl("drop@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.doi.as_deref(), Some("sent"));
    let second = env
        .enqueue(contact_sync::outbox::NewJob::new(
            "smartlink",
            "sl2",
            "drop@example.com",
            json!({"subscribe": 3, "language": "en"}),
        ))
        .await;
    env.settle(&worker).await;
    let row = env.job(second).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.doi.as_deref(), Some("suppressed"));
    let deferred: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.doi_deferred")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(deferred, 0);
    assert_eq!(
        env.sandbox
            .contact("smartlink", SL_GAME, "drop@example.com")
            .unwrap()
            .pending_requests,
        1
    );
    // another address is not affected
    let other = env
        .enqueue(sl("else@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(other).await.doi.as_deref(), Some("sent"));
    // the window is counted in database time
    ledger_to_the_past(&env).await;
    let third = env
        .enqueue(contact_sync::outbox::NewJob::new(
            "smartlink",
            "sl2",
            "drop@example.com",
            json!({"subscribe": 3}),
        ))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(third).await.doi.as_deref(), Some("sent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_account_does_not_slow_the_other() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.worker.concurrency = 16;
    let mut slow = justclick_account(&env.sandbox, JC_LOGIN, JC_SECRET);
    slow.rate_limit_per_second = Some(4.0);
    slow.burst = Some(1);
    settings.accounts.insert("jc".into(), slow);
    settings.accounts.insert(
        "jc2".into(),
        justclick_account(&env.sandbox, "other", "other-secret"),
    );
    // the slow account is also told to back off once
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::RateLimit {
                retry_after_secs: 1,
            },
            1,
        )
        .account(JC_LOGIN),
    );
    let mut conn = env.pool.acquire().await.unwrap();
    let mut jobs: Vec<_> = (0..6)
        .map(|i| jc(&format!("slow{i}@example.com"), json!({})))
        .collect();
    jobs.extend((0..200).map(|i| {
        contact_sync::outbox::NewJob::new(
            "justclick",
            "jc2",
            format!("fast{i}@example.com"),
            json!({}),
        )
    }));
    contact_sync::outbox::enqueue_batch(&mut conn, &jobs)
        .await
        .unwrap();
    let worker = env.worker_with(&settings, env.pool.clone());
    let started = std::time::Instant::now();
    worker.drain().await;
    let took = started.elapsed();
    let spans: Vec<(String, f64, f64)> = sqlx::query_as(
        "SELECT account, extract(epoch FROM min(finished_at) - min(created_at))::float8, extract(epoch FROM max(finished_at) - min(created_at))::float8
         FROM contact_sync.jobs WHERE state = 'succeeded' GROUP BY account ORDER BY account",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(env.count("succeeded").await, 206, "{spans:?}");
    let (fast_done, slow_done) = (spans[1].2, spans[0].2);
    // 6 calls at 4/s with a burst of 1 plus a 1 s Retry-After: well over a second
    assert!(
        slow_done >= 1.5,
        "slow account finished too early: {spans:?}"
    );
    assert!(
        fast_done < slow_done / 2.0,
        "fast account was held back: {spans:?}"
    );
    assert!(took >= Duration::from_millis(1500));
}

/// Looked into: a call that deferred the pending status, whose completion was lost (the worker
/// died after the call), and whose retry found the window free and sent the status itself. The
/// first attempt's deferral survived and, when it fell due, asked for a second confirmation
/// email about an hour later.
#[tokio::test]
async fn a_deferral_of_an_attempt_whose_retry_sent_the_status_is_dropped() {
    let env = TestEnv::new().await;
    let worker = env.worker();
    let first = env
        .enqueue(sl("lost@example.com", json!({"subscribe": 3})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.doi.as_deref(), Some("sent"));
    let change = env
        .enqueue(sl(
            "lost@example.com",
            json!({"subscribe": 3, "tags": ["x"]}),
        ))
        .await;
    env.settle(&worker).await;
    assert!(env
        .job(change)
        .await
        .doi
        .unwrap()
        .starts_with("deferred_until "));
    // as if the worker had died after the call and before recording it: running, its lease
    // gone (back in the queue's table: a delivered job has left it)
    sqlx::query(
        "WITH d AS (DELETE FROM contact_sync.jobs_delivered WHERE id = $1 RETURNING *) \
         INSERT INTO contact_sync.jobs (id, provider, account, email, payload, state, attempts, \
             run_at, created_at, locked_by, locked_until, errors) OVERRIDING SYSTEM VALUE \
         SELECT id, provider, account, email, payload, 'running', attempts, run_at, created_at, \
             'gone:1:0000', now() - interval '1 second', errors FROM d",
    )
    .bind(change)
    .execute(&env.pool)
    .await
    .unwrap();
    // the first window ends before the retry (the deferral is still an hour ahead)
    sqlx::query("UPDATE contact_sync.doi_ledger SET sent_at = sent_at - interval '63 minutes'")
        .execute(&env.pool)
        .await
        .unwrap();
    env.settle(&worker).await;
    let row = env.job(change).await;
    assert_eq!(
        (row.state.as_str(), row.doi.as_deref()),
        ("succeeded", Some("sent"))
    );
    let deferrals: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.doi_deferred")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        deferrals, 0,
        "the status went out: nothing is left to re-send"
    );
    // an hour later, nothing asks for another email
    sqlx::query("UPDATE contact_sync.doi_deferred SET due_at = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    ledger_to_the_past(&env).await;
    env.settle(&worker).await;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 2, "no re-send job");
    let c = env
        .sandbox
        .contact("smartlink", SL_GAME, "lost@example.com")
        .unwrap();
    // the first change's request and the retry's: no third one an hour later
    assert_eq!(c.pending_requests, 2);
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
