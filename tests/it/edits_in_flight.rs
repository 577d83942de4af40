//! Changes edited while their call is in flight (an operator's `UPDATE`, an application's
//! `INSERT … ON CONFLICT … DO UPDATE`): a change marked delivered is the change that was sent;
//! an edited one is sent as it is now, and so is every change of its contact after it, in order.

use crate::helpers::*;
use contact_sync::outbox::NewJob;
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::json;
use std::time::{Duration, Instant};

fn slow(email: &str) -> FaultRule {
    FaultRule::new(Fault::Slow { ms: 1500 }, 1)
        .provider("justclick")
        .email(email)
}

/// The README's way: a plain update of the pending job.
async fn edit_pending(env: &TestEnv, id: i64, payload: serde_json::Value) {
    let mut tx = env.pool.begin().await.unwrap();
    let n = sqlx::query(
        "UPDATE contact_sync.jobs SET payload = $2 WHERE id = $1 AND state = 'pending'",
    )
    .bind(id)
    .bind(payload)
    .execute(&mut *tx)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
    tx.commit().await.unwrap();
}

/// An application's upsert by idempotency key.
async fn upsert(env: &TestEnv, email: &str, key: &str, payload: serde_json::Value) {
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, idempotency_key) \
         VALUES ('justclick', 'jc', $1, $2, $3) \
         ON CONFLICT (account, idempotency_key) WHERE idempotency_key IS NOT NULL \
         DO UPDATE SET payload = EXCLUDED.payload",
    )
    .bind(email)
    .bind(payload)
    .bind(key)
    .execute(&env.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_edited_while_its_call_is_in_flight_is_sent_as_edited() {
    let env = TestEnv::new().await;
    for e in [
        "e1@example.com",
        "e2@example.com",
        "e3@example.com",
        "e4@example.com",
    ] {
        env.sandbox.faults().push(slow(e));
    }
    // e1: a follower edited by an operator
    let a1 = env
        .enqueue(jc("e1@example.com", json!({"lead_name": "a"})))
        .await;
    let b1 = env
        .enqueue(jc("e1@example.com", json!({"lead_city": "b"})))
        .await;
    // e2: a follower edited, and a later follower that must still win
    let a2 = env
        .enqueue(jc("e2@example.com", json!({"lead_name": "a"})))
        .await;
    let b2 = env
        .enqueue(jc("e2@example.com", json!({"lead_city": "b"})))
        .await;
    let c2 = env
        .enqueue(jc(
            "e2@example.com",
            json!({"lead_city": "c", "lead_phone": "1"}),
        ))
        .await;
    // e3: a follower an application upserts by its idempotency key
    let a3 = env
        .enqueue(jc("e3@example.com", json!({"lead_name": "a"})))
        .await;
    let b3 = env
        .enqueue(
            NewJob::new(
                "justclick",
                "jc",
                "e3@example.com",
                json!({"lead_city": "b"}),
            )
            .idempotency_key("signup-e3"),
        )
        .await;
    // e4: the head itself, upserted while its own call is in flight
    let a4 = env
        .enqueue(
            NewJob::new(
                "justclick",
                "jc",
                "e4@example.com",
                json!({"lead_city": "a"}),
            )
            .idempotency_key("signup-e4"),
        )
        .await;

    let worker = env.worker();
    let run = tokio::spawn({
        let worker = worker.clone();
        async move { worker.drain().await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in [a1, a2, a3, a4] {
        while env.job(id).await.state != "running" {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    edit_pending(&env, b1, json!({"lead_city": "B1"})).await;
    edit_pending(&env, b2, json!({"lead_city": "B2"})).await;
    upsert(
        &env,
        "e3@example.com",
        "signup-e3",
        json!({"lead_city": "B3"}),
    )
    .await;
    upsert(
        &env,
        "e4@example.com",
        "signup-e4",
        json!({"lead_city": "A4"}),
    )
    .await;
    run.await.unwrap();
    env.settle(&worker).await;

    let city = |email: &str| {
        env.sandbox
            .contact("justclick", JC_LOGIN, email)
            .unwrap()
            .fields["lead_city"]
            .clone()
    };
    assert_eq!(city("e1@example.com"), "B1", "the edited follower was sent");
    assert_eq!(
        city("e2@example.com"),
        "c",
        "the change after it still wins"
    );
    assert_eq!(
        city("e3@example.com"),
        "B3",
        "the upserted follower was sent"
    );
    assert_eq!(
        city("e4@example.com"),
        "A4",
        "the upserted head was sent again"
    );
    // the edited changes were not marked as carried by the first call
    for (edited, head) in [(b1, a1), (b2, a2), (c2, a2), (b3, a3)] {
        let row = env.job(edited).await;
        assert_ne!(row.coalesced_into, Some(head), "job {edited}: {row:?}");
        assert!(
            row.state == "succeeded" || row.state == "coalesced",
            "job {edited}: {row:?}"
        );
    }
    let a4_row = env.job(a4).await;
    assert_eq!(a4_row.state, "succeeded");
    assert!(a4_row
        .last_error
        .unwrap_or_default()
        .contains("changed while its call was in flight"),);
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
}
