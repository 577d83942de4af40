//! Retention: finished rows go after `retention.finished`, whatever older parked jobs their
//! contacts have, and `retry` still refuses to re-send a parked change over a newer delivered
//! one that retention deleted.

use crate::helpers::*;
use contact_sync::outbox::prune;
use contact_sync::outbox::repair;
use contact_sync::outbox::repair::{ActionResult, JobFilter};
use contact_sync::outbox::JobState;
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::json;
use std::time::Duration;

/// The review's finding: with 200,000 dead jobs whose newer delivered job had to be kept, one
/// retention batch of 1,000 read 808,731 buffers (0.4 s), every 200 ms per worker, because
/// every kept row was read again by every batch. Now nothing is kept back: each batch deletes
/// what it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_delivered_rows_behind_parked_ones_and_retry_still_knows() {
    let env = TestEnv::new().await;
    const CONTACTS: i64 = 3000;
    // per contact: a dead change, and a newer delivered one finished two days ago
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, finished_at, last_error) \
         SELECT 'justclick', 'jc', 'p' || i || '@example.com', '{\"lead_name\": \"old\"}', 'dead', now() - interval '3 days', 'x' \
         FROM generate_series(1, $1) i",
    )
    .bind(CONTACTS)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, finished_at) \
         SELECT 'justclick', 'jc', 'p' || i || '@example.com', '{\"lead_name\": \"new\"}', 'succeeded', now() - interval '2 days' \
         FROM generate_series(1, $1) i",
    )
    .bind(CONTACTS)
    .execute(&env.pool)
    .await
    .unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(
        prune::count_prunable(&env.pool, day).await.unwrap(),
        CONTACTS
    );
    let mut batches = 0;
    loop {
        let n = prune::prune_finished(&env.pool, day, 1000).await.unwrap();
        if n == 0 {
            break;
        }
        batches += 1;
        assert!(batches <= 3, "a batch deleted less than it read");
    }
    assert_eq!(
        env.count("succeeded").await,
        0,
        "delivered rows were kept back"
    );
    assert_eq!(env.count("dead").await, CONTACTS);

    // retry still sees that a newer change was delivered
    let dead: i64 =
        sqlx::query_scalar("SELECT id FROM contact_sync.jobs WHERE email = 'p7@example.com'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let (result, newer) = repair::retry(&env.pool, dead, false).await.unwrap();
    assert_eq!(result, ActionResult::Stale);
    assert!(matches!(newer, Some(repair::Found::Newer(id)) if id > dead));
    let bulk = repair::retry_matching(&env.pool, &JobFilter::new(JobState::Dead), false, false)
        .await
        .unwrap();
    assert_eq!((bulk.retried, bulk.skipped_stale), (0, CONTACTS as u64));
    let (result, _) = repair::retry(&env.pool, dead, true).await.unwrap();
    assert_eq!(result, ActionResult::Done, "--force still re-sends it");
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
