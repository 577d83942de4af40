//! Per-contact ordering and coalescing, across several workers on one database.

use crate::helpers::*;
use contact_sync::outbox::enqueue_batch;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_keep_one_call_per_contact_and_the_last_value_wins() {
    let env = TestEnv::new().await;
    env.sandbox.faults().set_delay(Duration::from_millis(3));
    let contacts = 5;
    let changes_per_contact = 60;
    let mut jobs = Vec::new();
    for round in 0..changes_per_contact {
        for c in 0..contacts {
            jobs.push(jc(&format!("Contact{c}@Example.com"), json!({"lead_name": format!("name {c} v{round}"), "lead_city": format!("city {round}")})));
            jobs.push(sl(
                &format!("contact{c}@example.com"),
                json!({"attributes": {"v": format!("{round}")}, "modify_ts": 1_000 + round}),
            ));
        }
    }
    // enqueue in slices while the workers run, so claims interleave with new changes
    let mut handles = Vec::new();
    for _ in 0..4 {
        let pool = env.db.another_pool().await;
        let mut settings = env.settings.clone();
        settings.worker.concurrency = 4;
        settings.worker.max_coalesce = 3;
        let worker = env.worker_with(&settings, pool);
        handles.push(worker);
    }
    let mut conn = env.pool.acquire().await.unwrap();
    let mut runs = Vec::new();
    for chunk in jobs.chunks(100) {
        enqueue_batch(&mut conn, chunk).await.unwrap();
        for w in &handles {
            let w = w.clone();
            runs.push(tokio::spawn(async move { w.drain().await }));
        }
    }
    for r in runs {
        r.await.unwrap();
    }
    for w in &handles {
        env.settle(w).await;
    }
    let stats = env.sandbox.stats();
    assert_eq!(
        stats.max_in_flight_per_contact, 1,
        "two calls in flight for one contact: {stats:?}"
    );
    assert_eq!(stats.bad_signatures, 0);
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE state NOT IN ('succeeded', 'coalesced')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
    let last = changes_per_contact - 1;
    for c in 0..contacts {
        let jc_contact = env
            .sandbox
            .contact("justclick", JC_LOGIN, &format!("contact{c}@example.com"))
            .unwrap();
        assert_eq!(jc_contact.fields["lead_name"], format!("name {c} v{last}"));
        assert_eq!(jc_contact.fields["lead_city"], format!("city {last}"));
        let sl_contact = env
            .sandbox
            .contact("smartlink", SL_GAME, &format!("contact{c}@example.com"))
            .unwrap();
        assert_eq!(sl_contact.fields["attributes"]["v"], format!("{last}"));
        assert_eq!(
            sl_contact.stale_updates, 0,
            "smartlink saw an older change after a newer one"
        );
    }
    // coalesced jobs point at a succeeded carrier of the same contact
    let bad_pointers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs f JOIN contact_sync.jobs h ON h.id = f.coalesced_into
         WHERE f.state = 'coalesced' AND (h.state <> 'succeeded' OR h.contact_key <> f.contact_key OR h.id > f.id)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(bad_pointers, 0);
}

#[tokio::test]
async fn consecutive_changes_are_coalesced_into_one_call() {
    let env = TestEnv::new().await;
    let a = env
        .enqueue(jc(
            "merge@example.com",
            json!({"lead_name": "First", "lead_city": "Paris"}),
        ))
        .await;
    let b = env
        .enqueue(jc("MERGE@example.com", json!({"lead_name": "Second"})))
        .await;
    let c = env
        .enqueue(jc("merge@example.com", json!({"lead_phone": "+100"})))
        .await;
    let other = env
        .enqueue(jc("other@example.com", json!({"lead_name": "Other"})))
        .await;
    let worker = env.worker();
    let report = env.settle(&worker).await;
    assert_eq!(report.succeeded, 2);
    assert_eq!(report.coalesced, 2);
    assert_eq!(env.job(a).await.state, "succeeded");
    for id in [b, c] {
        let row = env.job(id).await;
        assert_eq!(row.state, "coalesced");
        assert_eq!(row.coalesced_into, Some(a));
    }
    assert_eq!(env.job(other).await.state, "succeeded");
    let contact = env
        .sandbox
        .contact("justclick", JC_LOGIN, "merge@example.com")
        .unwrap();
    assert_eq!(contact.updates, 1);
    assert_eq!(contact.fields["lead_name"], "Second");
    assert_eq!(contact.fields["lead_city"], "Paris");
    assert_eq!(contact.fields["lead_phone"], "+100");
}

#[tokio::test]
async fn a_scheduled_change_is_not_merged_and_blocks_later_ones() {
    let env = TestEnv::new().await;
    let now = env
        .enqueue(jc("s@example.com", json!({"lead_name": "now"})))
        .await;
    let later = env
        .enqueue(
            jc("s@example.com", json!({"lead_name": "later"}))
                .run_at(chrono::Utc::now() + chrono::Duration::hours(1)),
        )
        .await;
    let after = env
        .enqueue(jc("s@example.com", json!({"lead_name": "after"})))
        .await;
    let worker = env.worker();
    worker.drain().await;
    assert_eq!(env.job(now).await.state, "succeeded");
    assert_eq!(env.job(later).await.state, "pending");
    assert_eq!(
        env.job(after).await.state,
        "pending",
        "must wait for the earlier scheduled change"
    );
    assert_eq!(
        env.sandbox
            .contact("justclick", JC_LOGIN, "s@example.com")
            .unwrap()
            .fields["lead_name"],
        "now"
    );
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
