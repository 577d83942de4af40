//! Recording a change adds no abort source to the application's transaction: producers at
//! READ COMMITTED, REPEATABLE READ and SERIALIZABLE, recording changes of a few hot contacts
//! while a worker delivers them, fail with serialization errors no more often than the same
//! producers inserting into a plain table; and every change still reaches the provider, the
//! last one recorded winning.

use crate::helpers::*;
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;

const CONTACTS: usize = 50;
const PRODUCERS: usize = 4;
const TRANSACTIONS: usize = 120;

/// One producer's transactions at `level`, each running `statement` with the contact's number
/// and a value; returns how many failed with a serialization failure or a deadlock.
async fn produce(pool: PgPool, level: &'static str, statement: &'static str, me: usize) -> usize {
    let mut failed = 0;
    for t in 0..TRANSACTIONS {
        let contact = (me * 7 + t * 13) % CONTACTS;
        let value = format!("p{me}-t{t}");
        let result = async {
            let mut tx = pool.begin().await?;
            sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
                .execute(&mut *tx)
                .await?;
            // a read first, as an application's transaction does: the snapshot is taken here
            sqlx::query("SELECT 1").execute(&mut *tx).await?;
            sqlx::query(statement)
                .bind(format!("hot{contact}@example.com"))
                .bind(&value)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => {}
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("40001") | Some("40P01")) =>
            {
                failed += 1
            }
            Err(e) => panic!("{level} producer: {e}"),
        }
    }
    failed
}

async fn failures(pool: &PgPool, level: &'static str, statement: &'static str) -> usize {
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|me| tokio::spawn(produce(pool.clone(), level, statement, me)))
        .collect();
    let mut failed = 0;
    for p in producers {
        failed += p.await.unwrap();
    }
    failed
}

#[tokio::test]
async fn producers_at_every_isolation_level_gain_no_serialization_failure() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE plain_changes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL, payload jsonb NOT NULL)")
        .execute(&env.pool)
        .await
        .unwrap();
    let worker = env.worker();
    let stop = contact_sync::worker::Shutdown::new();
    let run = spawn_worker(&worker, &stop);
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let plain = failures(
            &env.pool,
            level,
            "INSERT INTO plain_changes (email, payload) VALUES ($1, jsonb_build_object('lead_name', $2::text))",
        )
        .await;
        let recorded = failures(
            &env.pool,
            level,
            "SELECT contact_sync.enqueue('justclick', 'jc', $1, jsonb_build_object('lead_name', $2::text))",
        )
        .await;
        assert!(
            recorded <= plain,
            "{level}: {recorded} of {} transactions recording a change failed with a \
             serialization error, {plain} inserting into a plain table",
            PRODUCERS * TRANSACTIONS
        );
    }
    // every change is delivered, and each contact ends with the last one recorded
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM contact_sync.jobs WHERE state IN ('pending', 'running')",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} changes still open after a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.graceful.cancel();
    run.await.unwrap();
    let last: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (email) email, payload ->> 'lead_name' FROM contact_sync.jobs ORDER BY email, id DESC",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(last.len(), CONTACTS);
    for (email, value) in last {
        let at_provider = env
            .sandbox
            .contact("justclick", JC_LOGIN, &email)
            .unwrap_or_else(|| panic!("{email} never reached the provider"));
        assert_eq!(at_provider.fields["lead_name"], json!(value), "{email}");
    }
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM contact_sync.jobs GROUP BY 1 ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(
        states
            .iter()
            .all(|(s, _)| s == "succeeded" || s == "coalesced"),
        "{states:?}"
    );
}

/// A change a REPEATABLE READ producer recorded for an idle contact, then one a READ COMMITTED
/// producer recorded after it: the claim takes the contact's first pending change, so the
/// provider ends with the later one. (From the earlier design, where the first change waited
/// for a re-read and the contact's queue row named the later one.)
#[tokio::test]
async fn a_change_noted_for_a_re_read_keeps_its_place_before_later_ones() {
    let env = TestEnv::new().await;
    let record = |level: &'static str, name: &'static str| {
        let pool = env.pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            let id: i64 = sqlx::query_scalar(
                "SELECT contact_sync.enqueue('justclick', 'jc', 'idle@example.com', jsonb_build_object('lead_name', $1::text))",
            )
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    let first = record("REPEATABLE READ", "first").await;
    let second = record("READ COMMITTED", "second").await;
    env.settle(&env.worker()).await;
    let at_provider = env
        .sandbox
        .contact("justclick", JC_LOGIN, "idle@example.com")
        .unwrap();
    assert_eq!(at_provider.fields["lead_name"], "second");
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM contact_sync.jobs WHERE id = ANY($1) ORDER BY id")
            .bind(vec![first, second])
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(
        states == ["succeeded", "succeeded"] || states == ["succeeded", "coalesced"],
        "{states:?}"
    );
}
