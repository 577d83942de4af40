//! Delivered jobs leave the queue's table: `contact_sync.jobs_delivered` holds those without an
//! idempotency key, every reader of `contact_sync.jobs` still sees them, `retry` still refuses
//! to send a parked change over a newer one that left, a hand update cannot reopen one, and the
//! upgrade moves the delivered jobs already there.

use crate::helpers::*;
use contact_sync::outbox::claim::{AccountQuota, ClaimOptions, ReadyFloors};
use contact_sync::outbox::complete::{self, Success};
use contact_sync::outbox::repair::{self, ActionResult, Found, JobFilter};
use contact_sync::outbox::JobState;
use serde_json::json;
use std::time::Duration;

/// Where a job is: `("queue" | "delivered", state)`.
async fn place(pool: &sqlx::PgPool, id: i64) -> (String, String) {
    sqlx::query_as(
        "SELECT CASE WHEN tableoid = 'contact_sync.jobs_delivered'::regclass THEN 'delivered' ELSE 'queue' END, state
         FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn delivered_jobs_leave_the_queue_and_every_reader_still_sees_them() {
    let env = TestEnv::new().await;
    // one contact's three changes: a head and two followers coalesced into its call
    let head = env
        .enqueue(jc("a@example.com", json!({"lead_name": "A1"})))
        .await;
    let followers = env
        .enqueue_many(&[
            jc("a@example.com", json!({"lead_name": "A2"})),
            jc("a@example.com", json!({"lead_city": "Kazan"})),
        ])
        .await;
    let keyed = env
        .enqueue(jc("k@example.com", json!({"lead_name": "K"})).idempotency_key("once"))
        .await;
    let smartlink = env
        .enqueue(sl("s@example.com", json!({"tags": ["t"]})))
        .await;
    let report = env.settle(&env.worker()).await;
    assert_eq!(report.succeeded, 3, "{report:?}");

    for id in [head, smartlink] {
        assert_eq!(
            place(&env.pool, id).await,
            ("delivered".into(), "succeeded".into())
        );
    }
    for id in &followers {
        assert_eq!(
            place(&env.pool, *id).await,
            ("delivered".into(), "coalesced".into())
        );
        assert_eq!(env.job(*id).await.coalesced_into, Some(head));
    }
    // a job with an idempotency key stays, and a repeated key still finds it
    assert_eq!(
        place(&env.pool, keyed).await,
        ("queue".into(), "succeeded".into())
    );
    let again = env
        .enqueue(jc("k@example.com", json!({"lead_name": "K2"})).idempotency_key("once"))
        .await;
    assert_eq!(again, keyed);
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ONLY contact_sync.jobs WHERE idempotency_key IS NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        open, 0,
        "the queue's table keeps no delivered job without a key"
    );

    // the readers: jobs show, jobs list, status, the provider's state
    let shown = contact_sync::outbox::inspect::show(&env.pool, head)
        .await
        .unwrap()
        .expect("jobs show finds a delivered job");
    assert_eq!(shown.state, JobState::Succeeded);
    assert!(shown.finished_at.is_some());
    let listed = contact_sync::outbox::inspect::list(
        &env.pool,
        &contact_sync::outbox::inspect::ListFilter {
            state: Some(JobState::Coalesced),
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        listed.iter().map(|j| j.id).collect::<Vec<_>>(),
        followers.iter().rev().copied().collect::<Vec<_>>()
    );
    assert_eq!(env.count("succeeded").await, 3);
    assert_eq!(env.count("coalesced").await, 2);
    let contact = env
        .sandbox
        .contact("justclick", JC_LOGIN, "a@example.com")
        .unwrap();
    assert_eq!(contact.fields["lead_name"], "A2");
    assert_eq!(contact.fields["lead_city"], "Kazan");

    // retention deletes them when their time comes
    sqlx::query("UPDATE contact_sync.jobs SET finished_at = now() - interval '8 days'")
        .execute(&env.pool)
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(
        contact_sync::outbox::prune::count_prunable(&env.pool, day)
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        contact_sync::outbox::prune::prune_finished(&env.pool, day, 100)
            .await
            .unwrap(),
        5
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn retry_refuses_a_parked_change_over_a_newer_one_that_left_the_queue() {
    let env = TestEnv::new().await;
    let old = env
        .enqueue(jc("p@example.com", json!({"lead_name": "old"})))
        .await;
    park_as_dead(&env.pool, old).await;
    let newer = env
        .enqueue(jc("p@example.com", json!({"lead_name": "new"})))
        .await;
    env.settle(&env.worker()).await;
    assert_eq!(
        place(&env.pool, newer).await,
        ("delivered".into(), "succeeded".into())
    );
    let (result, found) = repair::retry(&env.pool, old, false).await.unwrap();
    assert_eq!(result, ActionResult::Stale);
    assert!(
        matches!(found, Some(Found::Newer(id)) if id == newer),
        "{found:?}"
    );
    let bulk = repair::retry_matching(&env.pool, &JobFilter::new(JobState::Dead), false, false)
        .await
        .unwrap();
    assert_eq!((bulk.retried, bulk.skipped_stale), (0, 1));
    // still after retention deleted the newer one
    sqlx::query("UPDATE contact_sync.jobs_delivered SET finished_at = now() - interval '8 days'")
        .execute(&env.pool)
        .await
        .unwrap();
    contact_sync::outbox::prune::prune_finished(&env.pool, Duration::from_secs(86_400), 100)
        .await
        .unwrap();
    let overtaken: Option<i64> =
        sqlx::query_scalar("SELECT overtaken_by FROM contact_sync.jobs WHERE id = $1")
            .bind(old)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(overtaken, Some(newer));
    let (result, _) = repair::retry(&env.pool, old, false).await.unwrap();
    assert_eq!(result, ActionResult::Stale);
    let (result, _) = repair::retry(&env.pool, old, true).await.unwrap();
    assert_eq!(result, ActionResult::Done, "--force still re-sends it");
    env.settle(&env.worker()).await;
    assert_eq!(
        env.sandbox
            .contact("justclick", JC_LOGIN, "p@example.com")
            .unwrap()
            .fields["lead_name"],
        "old"
    );
}

/// A delivered job's row held `FOR KEY SHARE` by another transaction (a lock an update does not
/// wait for, a delete does): the completion does not wait for it; the call is held, its lease
/// kept, and written once the row is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_row_held_elsewhere_holds_its_completion_without_a_wait() {
    let env = TestEnv::new().await;
    let options = ClaimOptions {
        lease: Duration::from_secs(30),
        worker_id: "w",
        default_max_attempts: 5,
        max_followers: 1,
        captured: &[],
    };
    let quotas = [AccountQuota {
        account: "jc".into(),
        limit: 10,
    }];
    let third = env
        .enqueue(jc("h@example.com", json!({"lead_name": "third"})))
        .await;
    let claimed = contact_sync::outbox::claim::claim(
        &env.pool,
        &quotas,
        &options,
        &mut ReadyFloors::default(),
    )
    .await
    .unwrap()
    .jobs;
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [third]);
    let success = Success {
        lease: claimed[0].lease(),
        doi: None,
        sent_md5: claimed[0].payload_md5(),
        followers: vec![],
        sets_status: false,
        modify_ts: None,
        outcome: None,
        synced: None,
        after_call: None,
    };
    let mut outsider = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM contact_sync.jobs WHERE id = $1 FOR KEY SHARE")
        .bind(third)
        .execute(&mut *outsider)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let written = complete::succeed_many(&env.pool, std::slice::from_ref(&success))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "it waited");
    assert_eq!(written.held, vec![third]);
    outsider.commit().await.unwrap();
    let written = complete::succeed_many(&env.pool, &[success]).await.unwrap();
    assert_eq!(written, Default::default());
    assert_eq!(
        place(&env.pool, third).await,
        ("delivered".into(), "succeeded".into())
    );
}

#[tokio::test]
async fn a_hand_update_cannot_reopen_a_delivered_job() {
    let env = TestEnv::new().await;
    let id = env
        .enqueue(jc("u@example.com", json!({"lead_name": "secret-name"})))
        .await;
    env.settle(&env.worker()).await;
    assert_eq!(place(&env.pool, id).await.0, "delivered");
    for (set, says) in [
        (
            "state = 'pending'",
            "was delivered; it cannot become 'pending'",
        ),
        ("idempotency_key = 'k'", "cannot be given one"),
        ("finished_at = 'infinity'", "finite"),
        ("attempts = -1", "attempts must be between"),
        ("errors = '{}'", "errors must be a JSON array"),
    ] {
        let err = sqlx::query(&format!("UPDATE contact_sync.jobs SET {set} WHERE id = $1"))
            .bind(id)
            .execute(&env.pool)
            .await
            .unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("22023"), "{set}: {db}");
        assert!(db.message().contains(says), "{set}: {}", db.message());
        assert!(
            !format!("{err:?}").contains("secret-name"),
            "{set}: {err:?}"
        );
    }
    // the same with the triggers off (a restore, a replica's apply): the table's checks hold
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    for set in [
        "state = 'pending'",
        "run_at = 'infinity'",
        "attempts = -5",
        "account = 'NOT VALID!!'",
    ] {
        let err = sqlx::query(&format!("UPDATE contact_sync.jobs SET {set} WHERE id = $1"))
            .bind(id)
            .execute(&mut *conn)
            .await
            .expect_err(set);
        assert!(err.as_database_error().is_some(), "{set}: {err}");
    }
    // a row written into the table by hand is held to the same rules, its contents kept out
    // of the error
    let err = sqlx::query(
        "INSERT INTO contact_sync.jobs_delivered (id, provider, account, email, payload, state, finished_at)
         VALUES (1000000, 'justclick', 'jc', 'old@example.com', '{\"lead_name\": \"secret-name\"}', 'pending', now())",
    )
    .execute(&mut *conn)
    .await
    .unwrap_err();
    let db = err.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("22023"), "{db}");
    assert!(db.message().contains("is succeeded or coalesced"), "{db}");
    assert!(!format!("{err:?}").contains("secret-name"), "{err:?}");
    drop(conn);
    // what retention tests and operators do still works
    sqlx::query("UPDATE contact_sync.jobs SET finished_at = now() - interval '1 day', last_error = 'note' WHERE id = $1")
        .bind(id)
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        place(&env.pool, id).await,
        ("delivered".into(), "succeeded".into())
    );
}

/// The upgrade, with every kind of job in the table: the delivered ones without a key move,
/// `retry` still finds them newer than a parked change, and the queue goes on.
#[tokio::test]
async fn the_upgrade_moves_delivered_jobs_and_keeps_retry_right() {
    let db = TestDb::before_migration(20261220000001).await;
    let insert = |email: &str, state: &str, key: Option<&str>| {
        let pool = db.pool.clone();
        let (email, state, key) = (
            email.to_string(),
            state.to_string(),
            key.map(str::to_string),
        );
        async move {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, idempotency_key, finished_at, coalesced_into)
                 VALUES ('justclick', 'jc', $1, '{\"lead_name\": \"x\"}', $2, $3,
                         CASE WHEN $2 IN ('succeeded', 'coalesced', 'dead') THEN now() END,
                         CASE WHEN $2 = 'coalesced' THEN 1 END)
                 RETURNING id",
            )
            .bind(email)
            .bind(state)
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap();
            id
        }
    };
    let parked = insert("a@example.com", "dead", None).await;
    let delivered = insert("a@example.com", "succeeded", None).await;
    let coalesced = insert("a@example.com", "coalesced", None).await;
    let keyed = insert("k@example.com", "succeeded", Some("key")).await;
    let pending = insert("p@example.com", "pending", None).await;
    contact_sync::migrate(&db.pool).await.unwrap();

    assert_eq!(
        place(&db.pool, delivered).await,
        ("delivered".into(), "succeeded".into())
    );
    assert_eq!(
        place(&db.pool, coalesced).await,
        ("delivered".into(), "coalesced".into())
    );
    for (id, state) in [(keyed, "succeeded"), (pending, "pending"), (parked, "dead")] {
        assert_eq!(place(&db.pool, id).await, ("queue".into(), state.into()));
    }
    let (result, found) = repair::retry(&db.pool, parked, false).await.unwrap();
    assert_eq!(result, ActionResult::Stale);
    assert!(
        matches!(found, Some(Found::Newer(id)) if id == coalesced),
        "{found:?}"
    );
    // and the queue goes on: the pending job is delivered and moves
    let env = TestEnv::with_db(db).await;
    env.settle(&env.worker()).await;
    assert_eq!(
        place(&env.pool, pending).await,
        ("delivered".into(), "succeeded".into())
    );
}

/// A row written by hand into `jobs_delivered` with an id the queue had not issued yet (an
/// archive reloaded), or the id sequence set back (a restore, a promoted replica): a job given
/// an id a delivered job has is refused at enqueue, with what to do; one that got in with the
/// triggers off is delivered and recorded all the same, never sent again and again.
#[tokio::test]
async fn an_id_a_delivered_job_has_is_never_given_twice_and_never_wedges_a_delivery() {
    let env = TestEnv::new().await;
    let next: i64 = sqlx::query_scalar("SELECT last_value + 2 FROM contact_sync.jobs_id_seq")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO contact_sync.jobs_delivered (id, provider, account, email, payload, state, finished_at)
         VALUES ($1, 'justclick', 'jc', 'archived@example.com', '{}', 'succeeded', now() - interval '1 year')",
    )
    .bind(next)
    .execute(&env.pool)
    .await
    .unwrap();
    let jobs = [
        jc("d1@example.com", json!({"lead_name": "D1"})),
        jc("d2@example.com", json!({"lead_name": "D2"})),
        jc("d3@example.com", json!({"lead_name": "D3"})),
    ];
    let mut conn = env.pool.acquire().await.unwrap();
    let err = contact_sync::outbox::enqueue_batch(&mut conn, &jobs)
        .await
        .unwrap_err();
    match err {
        contact_sync::outbox::EnqueueError::Invalid { message, sqlstate } => {
            assert_eq!(sqlstate, "22023");
            assert!(
                message.contains(&format!(
                    "job id {next} is already taken by a delivered job"
                )),
                "{message}"
            );
        }
        other => panic!("{other}"),
    }
    // what the hint says to do
    sqlx::query(
        "SELECT setval('contact_sync.jobs_id_seq', (SELECT max(id) FROM contact_sync.jobs))",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let ids = contact_sync::outbox::enqueue_batch(&mut conn, &jobs)
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    // with the triggers off, the check does not run: the delivery is recorded over the id
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO contact_sync.jobs (id, provider, account, email, payload) OVERRIDING SYSTEM VALUE
         VALUES ($1, 'justclick', 'jc', 'restored@example.com', '{\"lead_name\": \"R\"}')",
    )
    .bind(next)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let report = env.settle(&env.worker()).await;
    assert_eq!(report.succeeded, 4, "{report:?}");
    let email: String = sqlx::query_scalar("SELECT email FROM contact_sync.jobs WHERE id = $1")
        .bind(next)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(email, "restored@example.com");
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state = 'running'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(running, 0);
}

/// A foreign key to `contact_sync.jobs(id)` would fail every completion once delivered jobs
/// leave the table: the upgrade refuses it and says what to do.
#[tokio::test]
async fn the_upgrade_refuses_foreign_keys_to_the_jobs_table() {
    let db = TestDb::before_migration(20261220000001).await;
    sqlx::query("CREATE TABLE public.app_audit (job_id bigint REFERENCES contact_sync.jobs (id))")
        .execute(&db.pool)
        .await
        .unwrap();
    let err = contact_sync::migrate(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("foreign keys reference contact_sync.jobs"),
        "{err}"
    );
    assert!(err.contains("app_audit"), "{err}");
    // the failed migration leaves no lock behind on the pool's connection (sqlx's own
    // session-level lock did: the next migrate on another connection waited forever)
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
         WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(held, 0, "advisory locks held after a failed migration");
    sqlx::query("ALTER TABLE public.app_audit DROP CONSTRAINT app_audit_job_id_fkey")
        .execute(&db.pool)
        .await
        .unwrap();
    contact_sync::migrate(&db.pool).await.unwrap();
    // one added since: the worker refuses to start, and says why
    sqlx::query(
        "ALTER TABLE public.app_audit ADD FOREIGN KEY (job_id) REFERENCES contact_sync.jobs (id)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let env = TestEnv::with_db(db).await;
    let config = env.config_file("");
    let (code, _, stderr) = env.cli(&config, &["run", "--drain"]).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("foreign keys reference contact_sync.jobs"),
        "{stderr}"
    );
    assert!(stderr.contains("app_audit"), "{stderr}");
}
