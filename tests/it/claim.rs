//! Claiming, leases, the rescuer, fencing, unknown accounts.

use crate::helpers::*;
use contact_sync::outbox::claim::{AccountQuota, ClaimOptions, ReadyFloors};
use contact_sync::outbox::complete::{self, Success};
use contact_sync::outbox::job::AttemptError;
use contact_sync::outbox::rescue::rescue_expired;
use contact_sync::outbox::Lease;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// The jobs one claim took.
async fn claim(
    pool: &sqlx::PgPool,
    quotas: &[AccountQuota],
    options: &ClaimOptions<'_>,
) -> Result<Vec<contact_sync::outbox::ClaimedJob>, sqlx::Error> {
    contact_sync::outbox::claim::claim(pool, quotas, options, &mut ReadyFloors::default())
        .await
        .map(|c| c.jobs)
}

fn quota(account: &str, limit: i32) -> Vec<AccountQuota> {
    vec![AccountQuota {
        account: account.into(),
        limit,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_take_the_same_job() {
    let env = TestEnv::new().await;
    let jobs: Vec<_> = (0..600)
        .map(|i| jc(&format!("c{i}@example.com"), json!({})))
        .collect();
    env.enqueue_many(&jobs).await;
    let mut handles = Vec::new();
    for w in 0..6 {
        let pool = env.db.another_pool().await;
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = claim(&pool, &quota("jc", 17), &options(&format!("w{w}")))
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|j| j.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 600, "every job claimed once");
    assert_eq!(unique.len(), 600, "no job claimed twice");
}

#[tokio::test]
async fn expired_leases_are_rescued_and_the_last_attempt_goes_dead() {
    let env = TestEnv::new().await;
    let a = env.enqueue(jc("a@example.com", json!({}))).await;
    let b = env.enqueue(jc("b@example.com", json!({}))).await;
    sqlx::query("UPDATE contact_sync.jobs SET max_attempts = 1 WHERE id = $1")
        .bind(b)
        .execute(&env.pool)
        .await
        .unwrap();
    let claimed = claim(&env.pool, &quota("jc", 10), &options("w"))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    // a live lease is not rescued
    assert_eq!(
        rescue_expired(&env.pool, 20, Duration::ZERO, ("", &[]))
            .await
            .unwrap(),
        (0, 0)
    );
    sqlx::query("UPDATE contact_sync.jobs SET locked_until = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        rescue_expired(&env.pool, 20, Duration::ZERO, ("", &[]))
            .await
            .unwrap(),
        (1, 1)
    );
    let a_row = env.job(a).await;
    assert_eq!(a_row.state, "pending");
    assert_eq!(a_row.errors[0]["kind"], "lease_expired");
    let b_row = env.job(b).await;
    assert_eq!(b_row.state, "dead");
    assert!(b_row.last_error.unwrap().contains("lease expired"));
}

#[tokio::test]
async fn writes_after_a_lost_lease_change_nothing() {
    let env = TestEnv::new().await;
    let id = env.enqueue(jc("a@example.com", json!({}))).await;
    // the old worker stalls; its lease expires and another worker takes the job
    let (first, second) = claimed_then_taken_over(&env, "jc").await;
    let old = first[0].lease();
    let new = second[0].lease();
    assert_eq!(new.attempt, old.attempt + 1);

    let error = AttemptError {
        kind: "timeout".into(),
        code: None,
        message: "late".into(),
    };
    let lost = complete::succeed_many(
        &env.pool,
        &[Success {
            lease: old,
            doi: None,
            sent_md5: first[0].payload_md5(),
            followers: vec![],
            sets_status: false,
            modify_ts: None,
            outcome: None,
            synced: Some(sent("old")),
            after_call: None,
        }],
    )
    .await
    .unwrap();
    assert_eq!(lost.lost, vec![id]);
    assert_eq!(
        complete::retry(
            &env.pool,
            old,
            Duration::ZERO,
            &error,
            complete::Attempt::Counts
        )
        .await
        .unwrap(),
        complete::Write::Lost
    );
    assert_eq!(
        complete::kill(&env.pool, old, &error).await.unwrap(),
        complete::Write::Lost
    );
    assert_eq!(complete::release(&env.pool, &[old], true).await.unwrap(), 0);
    let row = env.job(id).await;
    assert_eq!(row.state, "running");
    assert_eq!(row.attempts, 2);

    // the owner's write goes through
    let lost = complete::succeed_many(
        &env.pool,
        &[Success {
            lease: new,
            doi: None,
            sent_md5: second[0].payload_md5(),
            followers: vec![],
            sets_status: false,
            modify_ts: None,
            outcome: None,
            synced: Some(sent("new")),
            after_call: None,
        }],
    )
    .await
    .unwrap();
    assert_eq!(lost, Default::default());
    assert_eq!(env.job(id).await.state, "succeeded");
    // the synced state is the owner's call's, written with its outcome (the lost one wrote
    // nothing): the contact's next claim reads it
    let synced: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT fields FROM contact_sync.synced")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(synced, [json!({"lead_name": "new"})]);
    // and a stale heartbeat extends nothing
    assert!(contact_sync::outbox::claim::extend_leases(
        &env.pool,
        &[Lease { id, attempt: 1 }],
        Duration::from_secs(5),
        "old"
    )
    .await
    .unwrap()
    .is_empty());
}

#[tokio::test]
async fn jobs_of_unknown_accounts_wait() {
    let env = TestEnv::new().await;
    let ghost = env
        .enqueue(contact_sync::outbox::NewJob::new(
            "justclick",
            "ghost",
            "a@example.com",
            json!({}),
        ))
        .await;
    let known = env.enqueue(jc("a@example.com", json!({}))).await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(known).await.state, "succeeded");
    let row = env.job(ghost).await;
    assert_eq!(row.state, "pending");
    assert_eq!(row.attempts, 0);
    // once configuration names the account, it is delivered
    let mut settings = env.settings.clone();
    settings.accounts.insert(
        "ghost".into(),
        justclick_account(&env.sandbox, "other", "other-secret"),
    );
    env.worker_with(&settings, env.pool.clone()).drain().await;
    assert_eq!(env.job(ghost).await.state, "succeeded");
}

#[tokio::test]
async fn migrations_are_idempotent_and_safe_concurrently() {
    let env = TestEnv::new().await;
    contact_sync::migrate(&env.pool).await.unwrap();
    let other = env.db.another_pool().await;
    let (a, b) = tokio::join!(
        contact_sync::migrate(&env.pool),
        contact_sync::migrate(&other)
    );
    a.unwrap();
    b.unwrap();
    assert!(contact_sync::migrate::is_current(&env.pool).await.unwrap());
    // our bookkeeping stays inside our schema
    let public: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(public, None);
}

/// An account whose row carries fleet-wide limits is claimed only through the shared budget:
/// a claimer that does not know of them (started before another replica registered them)
/// gets nothing until it does.
#[tokio::test]
async fn the_plain_claim_leaves_an_account_with_fleet_limits_alone() {
    let env = TestEnv::new().await;
    env.enqueue(jc("a@example.com", json!({}))).await;
    let q = quota("jc", 10);
    let w = options("w");
    let plain = || claim(&env.pool, &q, &w);
    sqlx::query(
        "INSERT INTO contact_sync.accounts (account, provider, max_in_flight) VALUES ('jc', 'justclick', 1)",
    )
        .execute(&env.pool)
        .await
        .unwrap();
    assert!(plain().await.unwrap().is_empty());
    sqlx::query("UPDATE contact_sync.accounts SET max_in_flight = NULL WHERE account = 'jc'")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(plain().await.unwrap().len(), 1);
}

/// Regression: a claim that committed while its answer was lost (the connection cut, Postgres
/// restarted at that moment) left jobs `running` under a worker that was alive and did not know
/// them. Nothing renewed their lease and the rescuer waited for the worker to be gone, so they
/// never ran (a Postgres restart test hung on it now and then). The worker now returns its own
/// jobs it does not know once their lease has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_workers_claim_whose_answer_was_lost_is_returned() {
    let mut env = TestEnv::new().await;
    env.settings.worker.lease = Duration::from_secs(1);
    let lost = env
        .enqueue(jc("lost@example.com", json!({"lead_name": "L"})))
        .await;
    // the worker is not running yet: make the job look as its lost claim left it
    let worker = env.worker();
    let stop = contact_sync::worker::Shutdown::new();
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'running', attempts = 1, locked_by = $2, \
         locked_until = now() + interval '1 second' WHERE id = $1",
    )
    .bind(lost)
    .bind(worker.id())
    .execute(&env.pool)
    .await
    .unwrap();
    let run = spawn_worker(&worker, &stop);
    env.wait_for_state(lost, "succeeded", Duration::from_secs(20))
        .await;
    let row = env.job(lost).await;
    assert_eq!(row.errors[0]["kind"], "lease_expired", "{row:?}");
    // and the jobs it knows are left alone: a slow call outlives its first lease
    env.sandbox.faults().set_delay(Duration::from_millis(2500));
    let slow = env
        .enqueue(jc("slow@example.com", json!({"lead_name": "S"})))
        .await;
    env.wait_for_state(slow, "succeeded", Duration::from_secs(20))
        .await;
    assert_eq!(env.job(slow).await.attempts, 1);
    assert_eq!(
        env.sandbox.stats().accepted,
        2,
        "each job was delivered once"
    );
    stop.graceful.cancel();
    run.await.unwrap();
}

/// A claim's options as a worker with `worker_id` sets them (no coalescing, nothing captured).
fn options(worker_id: &str) -> contact_sync::outbox::claim::ClaimOptions<'_> {
    contact_sync::outbox::claim::ClaimOptions {
        lease: Duration::from_secs(30),
        worker_id,
        default_max_attempts: 20,
        max_followers: 1,
        captured: &[],
    }
}

/// A delivered call as the synced state records it (job 1 of `jc`, `lead_name` = `name`).
fn sent(name: &str) -> contact_sync::outbox::synced::Delivered {
    contact_sync::outbox::synced::Delivered {
        provider: "justclick".into(),
        account: "jc".into(),
        email: "a@example.com".into(),
        fields: json!({ "lead_name": name }),
        job_id: 1,
    }
}

/// Found by the adversarial review: the synced state kept the call with the highest job id,
/// while the provider holds the call that reached it last. A change retried from dead after a
/// later one was delivered (or committed late with a lower id, or sent again after an edit in
/// flight) is the newest call all the same: the synced state must say what it sent, or a
/// change back to the later value is skipped as held.
#[tokio::test]
async fn the_synced_state_is_the_last_call_whatever_its_job_id() {
    use contact_sync::outbox::repair;
    let env = TestEnv::new().await;
    let older = env
        .enqueue(jc("a@example.com", json!({"lead_name": "X"})))
        .await;
    let newer = env
        .enqueue(jc("a@example.com", json!({"lead_name": "Y"})))
        .await;
    let deliver = |name: &'static str| {
        let pool = env.pool.clone();
        async move {
            let got = claim(&pool, &quota("jc", 1), &options("w")).await.unwrap();
            let done = complete::succeed_many(
                &pool,
                &[Success {
                    lease: got[0].lease(),
                    doi: None,
                    sent_md5: got[0].payload_md5(),
                    followers: vec![],
                    sets_status: false,
                    modify_ts: None,
                    outcome: None,
                    synced: Some(contact_sync::outbox::synced::Delivered {
                        job_id: got[0].id,
                        ..sent(name)
                    }),
                    after_call: None,
                }],
            )
            .await
            .unwrap();
            assert_eq!(done, Default::default());
            got[0].id
        }
    };
    // the older change fails for good, the newer one is delivered
    let got = claim(&env.pool, &quota("jc", 1), &options("w"))
        .await
        .unwrap();
    assert_eq!(got[0].id, older);
    let error = AttemptError {
        kind: "permanent".into(),
        code: Some("1".into()),
        message: "no".into(),
    };
    assert_eq!(
        complete::kill(&env.pool, got[0].lease(), &error)
            .await
            .unwrap(),
        complete::Write::Done
    );
    assert_eq!(deliver("Y").await, newer);
    // the operator sends the older one again, over the newer one
    let (result, _) = repair::retry(&env.pool, older, true).await.unwrap();
    assert_eq!(result, repair::ActionResult::Done, "{result:?}");
    assert_eq!(deliver("X").await, older);
    let synced: (serde_json::Value, i64) =
        sqlx::query_as("SELECT fields, job_id FROM contact_sync.synced")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(synced, (json!({"lead_name": "X"}), older));
}

/// Found by the adversarial review: a claim of an account with fleet-wide limits runs its
/// passes in one transaction; a later pass that failed (here: a race for a contact, on the
/// unique index of running contacts) aborted that transaction, yet the earlier passes' jobs were
/// handed to the worker, which called the provider for jobs still `pending`. Now the error goes
/// up and nothing is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pass_of_a_limited_claim_claims_nothing() {
    let env = TestEnv::new().await;
    sqlx::query("INSERT INTO contact_sync.accounts (account, provider, max_in_flight) VALUES ('jc', 'justclick', 10)")
        .execute(&env.pool)
        .await
        .unwrap();
    let insert = |email: &'static str, ago: i64| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO contact_sync.jobs (provider, account, email, payload, run_at)
                 VALUES ('justclick', 'jc', $1, '{\"lead_name\": \"x\"}', now() - make_interval(secs => $2::float8)) RETURNING id",
            )
            .bind(email)
            .bind(ago as f64)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // w: a held call, and four changes behind it (set waiting by the first pass)
    let held = insert("w@example.com", 700).await;
    sqlx::query("UPDATE contact_sync.jobs SET state = 'running', attempts = 1, locked_until = now() + interval '1 hour' WHERE id = $1")
        .bind(held)
        .execute(&env.pool)
        .await
        .unwrap();
    for _ in 0..4 {
        insert("w@example.com", 600).await;
    }
    // a: claimed by the first pass
    let a = insert("a@example.com", 500).await;
    // x: its first change is taken by the second pass while an outsider makes its other one
    // `running` and commits, so the second pass fails on the unique index
    let x1 = insert("x@example.com", 60).await;
    let x2 = insert("x@example.com", 30).await;
    let mut outsider = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE contact_sync.jobs SET state = 'running', attempts = 1, locked_by = 'outsider', locked_until = now() + interval '1 hour' WHERE id = $1")
        .bind(x2)
        .execute(&mut *outsider)
        .await
        .unwrap();
    let commit = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        outsider.commit().await.unwrap();
    });
    let options = ClaimOptions {
        lease: Duration::from_secs(30),
        worker_id: "w",
        default_max_attempts: 5,
        max_followers: 1,
        captured: &[],
    };
    let got = contact_sync::outbox::claim::claim_within_limits(
        &env.pool,
        &quota("jc", 5),
        &options,
        &mut ReadyFloors::default(),
    )
    .await;
    commit.await.unwrap();
    match got {
        Err(e) => assert!(e.to_string().contains("jobs_running_contact_idx"), "{e}"),
        Ok(c) => assert!(
            c.jobs.is_empty() || c.jobs.iter().all(|j| j.id != a),
            "handed over without being claimed: {:?}",
            c.jobs.iter().map(|j| j.id).collect::<Vec<_>>()
        ),
    }
    // whatever the worker was told, the database agrees
    let (a_state, x1_state): (String, String) = sqlx::query_as(
        "SELECT (SELECT state FROM contact_sync.jobs WHERE id = $1), (SELECT state FROM contact_sync.jobs WHERE id = $2)",
    )
    .bind(a)
    .bind(x1)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (a_state.as_str(), x1_state.as_str()),
        ("pending", "pending")
    );
}

/// Found by the adversarial review of the double-opt-in ledger's writes after a call: a worker
/// frozen past its lease wrote a deferral after another worker had delivered the job, and a
/// later unsubscribe had removed that deferral: the contact was set pending again an hour
/// later. The ledger's writes are fenced with the outcome.
#[tokio::test]
async fn a_worker_that_lost_its_job_writes_nothing_to_the_ledger() {
    let env = TestEnv::new().await;
    let id = env
        .enqueue(sl("f@example.com", json!({"subscribe": 3})))
        .await;
    let (first, second) = claimed_then_taken_over(&env, "sl").await;
    let old = first[0].lease();
    assert_eq!(second[0].id, id);
    let deferred = contact_sync::outbox::doi::AfterCall::Deferred {
        job_id: id,
        covers_id: id,
        provider: "smartlink".into(),
        account: "sl".into(),
        email: "f@example.com".into(),
        payload: json!({"subscribe": 3}),
        due_at: chrono::Utc::now(),
    };
    let success = |lease: Lease, after_call| Success {
        lease,
        doi: None,
        sent_md5: first[0].payload_md5(),
        followers: vec![],
        sets_status: true,
        modify_ts: None,
        outcome: None,
        synced: None,
        after_call,
    };
    let deferrals = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM contact_sync.doi_deferred")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let lost = complete::succeed_many(&env.pool, &[success(old, Some(deferred.clone()))])
        .await
        .unwrap();
    assert_eq!(lost.lost, vec![id]);
    assert_eq!(deferrals().await, 0, "the stale worker wrote to the ledger");
    // the worker that holds the lease writes both
    let done = complete::succeed_many(&env.pool, &[success(second[0].lease(), Some(deferred))])
        .await
        .unwrap();
    assert!(done.lost.is_empty() && done.held.is_empty(), "{done:?}");
    assert_eq!(env.job(id).await.state, "succeeded");
    assert_eq!(deferrals().await, 1);
}

/// The account's one job claimed by worker "old", whose lease then expires, and claimed again
/// by worker "new": (the first claim, the second).
async fn claimed_then_taken_over(
    env: &TestEnv,
    account: &str,
) -> (
    Vec<contact_sync::outbox::ClaimedJob>,
    Vec<contact_sync::outbox::ClaimedJob>,
) {
    let first = claim(&env.pool, &quota(account, 1), &options("old"))
        .await
        .unwrap();
    sqlx::query("UPDATE contact_sync.jobs SET locked_until = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    rescue_expired(&env.pool, 20, Duration::ZERO, ("", &[]))
        .await
        .unwrap();
    let second = claim(&env.pool, &quota(account, 1), &options("new"))
        .await
        .unwrap();
    (first, second)
}

/// A claim starts where the previous one stopped ([`ReadyFloors`]); a change that becomes ready
/// behind that point is not lost. Here a producer's transaction, open for longer than the
/// floors' slack, commits after the worker's floor has moved past its change: the worker's
/// claims take it at the latest after their next read from the start.
#[tokio::test]
async fn a_change_committed_behind_the_floor_is_still_claimed() {
    use contact_sync::outbox::claim::{FLOOR_SLACK, FULL_SCAN_EVERY};
    let env = TestEnv::new().await;
    let mut producer = env.pool.begin().await.unwrap();
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *producer)
        .await
        .unwrap();
    let late: i64 = sqlx::query_scalar(
        "SELECT contact_sync.enqueue('justclick', 'jc', 'late@example.com', '{}')",
    )
    .fetch_one(&mut *producer)
    .await
    .unwrap();
    tokio::time::sleep(FLOOR_SLACK + Duration::from_millis(500)).await;
    // meanwhile the worker takes everything else: its floor moves past the late change
    let early = env.enqueue(jc("early@example.com", json!({}))).await;
    let mut floors = ReadyFloors::default();
    let got =
        contact_sync::outbox::claim::claim(&env.pool, &quota("jc", 10), &options("w"), &mut floors)
            .await
            .unwrap();
    assert_eq!(
        got.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![early]
    );
    let floor = floors.floor("jc").unwrap();
    let slack = chrono::Duration::from_std(FLOOR_SLACK).unwrap();
    assert!(
        floor.0 - slack > started,
        "{floor:?}, the change's run_at {started}"
    );
    producer.commit().await.unwrap();

    let since = std::time::Instant::now();
    loop {
        let got = contact_sync::outbox::claim::claim(
            &env.pool,
            &quota("jc", 10),
            &options("w"),
            &mut floors,
        )
        .await
        .unwrap();
        if got.jobs.iter().any(|j| j.id == late) {
            break;
        }
        assert!(got.jobs.is_empty(), "{:?}", got.jobs);
        assert!(
            since.elapsed() < FULL_SCAN_EVERY + Duration::from_secs(2),
            "the change committed behind the floor was not claimed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claimers that keep their floors, side by side, with producers committing all along: every
/// change is claimed once (a floor skips only what was taken, or what a later full read finds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimers_keeping_their_floors_take_every_change_once() {
    let env = TestEnv::new().await;
    const CHANGES: usize = 3000;
    let producer_pool = env.db.another_pool().await;
    let producer = tokio::spawn(async move {
        for batch in 0..30 {
            let mut tx = producer_pool.begin().await.unwrap();
            for i in 0..(CHANGES / 30) {
                sqlx::query("SELECT contact_sync.enqueue('justclick', 'jc', $1, '{}')")
                    .bind(format!("c{batch}-{i}@example.com"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            // some transactions stay open past the floors' slack
            if batch % 10 == 3 {
                tokio::time::sleep(
                    contact_sync::outbox::claim::FLOOR_SLACK + Duration::from_millis(300),
                )
                .await;
            }
            tx.commit().await.unwrap();
        }
    });
    let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..3 {
        let pool = env.db.another_pool().await;
        let taken = taken.clone();
        handles.push(tokio::spawn(async move {
            let mut floors = ReadyFloors::default();
            let since = std::time::Instant::now();
            while taken.lock().unwrap().len() < CHANGES {
                assert!(
                    since.elapsed() < Duration::from_secs(60),
                    "not every change was claimed"
                );
                let got = contact_sync::outbox::claim::claim(
                    &pool,
                    &quota("jc", 40),
                    &options(&format!("w{w}")),
                    &mut floors,
                )
                .await
                .unwrap();
                if got.jobs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                taken.lock().unwrap().extend(got.jobs.iter().map(|j| j.id));
            }
        }));
    }
    producer.await.unwrap();
    for h in handles {
        h.await.unwrap();
    }
    let all = taken.lock().unwrap().clone();
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), CHANGES, "every change claimed");
    assert_eq!(unique.len(), CHANGES, "no change claimed twice");
}

/// Review: a job queued with a `run_at` in the past (or by a transaction open for longer than
/// the floors' slack) sorts before the claims' floors. A NOTIFY for it woke a claim that began
/// at a floor and did not see it, and the worker then slept its poll interval (here 30 s). The
/// claim loop now wakes for the next read from the start within [`FULL_SCAN_EVERY`].
#[tokio::test]
async fn a_job_queued_in_the_past_is_claimed_within_a_second_of_its_notify() {
    use contact_sync::outbox::claim::FULL_SCAN_EVERY;
    let mut env = TestEnv::new().await;
    env.settings.worker.poll_interval = Duration::from_secs(30);
    let worker = env.worker();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = spawn_worker(&worker, &stop);
    for round in 0..3 {
        // a job of now: its NOTIFY wakes the worker, its claim reads from a floor after it
        let now = env
            .enqueue(jc(&format!("now{round}@example.com"), json!({})))
            .await;
        env.wait_for_state(now, "succeeded", Duration::from_secs(5))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let past: i64 = sqlx::query_scalar(
            "SELECT contact_sync.enqueue('justclick', 'jc', $1, '{}', run_at => now() - interval '1 hour')",
        )
        .bind(format!("past{round}@example.com"))
        .fetch_one(&env.pool)
        .await
        .unwrap();
        env.wait_for_state(past, "succeeded", FULL_SCAN_EVERY + Duration::from_secs(2))
            .await;
    }
    stop.cancel();
    run.await.unwrap();
}
