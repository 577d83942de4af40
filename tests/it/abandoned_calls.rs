//! Calls the worker stopped waiting for (a timeout, a shutdown that abandons them, a worker
//! stopped past its lease): a real provider finishes a request whose client has gone, and the
//! sandbox does too. Nothing more is sent for the contact, and the account's in-flight slot
//! stays taken, until the provider can no longer be acting on the first request
//! (`http.abandoned_call_bound`).

use crate::helpers::*;
use contact_sync::sandbox::{Fault, FaultRule};
use contact_sync::worker::Shutdown;
use serde_json::json;
use std::time::{Duration, Instant};

fn slow(email: &str, ms: u64) -> FaultRule {
    FaultRule::new(Fault::Slow { ms }, 1)
        .provider("justclick")
        .email(email)
}

/// The review's finding: with `request_timeout = 1s` and a provider taking 2.5 s, the retry
/// (carrying a newer coalesced change) was applied first and the first attempt's stale value
/// landed last, while the database recorded the newer one as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_holds_its_contact_until_the_provider_is_done_with_it() {
    let mut env = TestEnv::new().await;
    env.settings.http.request_timeout = Duration::from_secs(1);
    // (well past the provider's 2.5 s, also on a loaded machine)
    env.settings.http.abandoned_call_bound = Duration::from_secs(6);
    env.sandbox.faults().push(slow("t@example.com", 2500));
    let old = env
        .enqueue(jc("t@example.com", json!({"lead_name": "old"})))
        .await;
    let worker = env.worker();
    let run = tokio::spawn({
        let worker = worker.clone();
        async move { worker.drain().await }
    });
    env.wait_for_state(old, "running", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = env
        .enqueue(jc("t@example.com", json!({"lead_name": "new"})))
        .await;
    // the timeout comes at 1 s; the provider is still at work until 2.5 s
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let held: (String, Option<String>, bool) = sqlx::query_as(
        "SELECT state, locked_by, locked_until > now() + interval '1 second' FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(old)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        held,
        ("running".to_string(), None, true),
        "held, owned by no worker"
    );
    assert_eq!(env.job(new).await.state, "pending");
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("drain waits for the hold, then delivers")
        .unwrap();

    let c = env
        .sandbox
        .contact("justclick", JC_LOGIN, "t@example.com")
        .unwrap();
    assert_eq!(
        c.fields["lead_name"], "new",
        "the provider ends with the newest change"
    );
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
    let row = env.job(old).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.errors[0]["kind"], "timeout");
    assert_eq!(env.job(new).await.state, "coalesced");
}

/// The review's finding: with `max_in_flight = 3` the provider saw 18 requests of the account
/// in flight. A timed-out call keeps its slot until the hold has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_keeps_its_accounts_in_flight_slot() {
    let mut env = TestEnv::new().await;
    env.settings.http.request_timeout = Duration::from_secs(1);
    env.settings.http.abandoned_call_bound = Duration::from_secs(2);
    env.settings.accounts.get_mut("jc").unwrap().max_in_flight = Some(1);
    env.sandbox.faults().push(slow("a@example.com", 2000));
    env.sandbox.faults().push(slow("b@example.com", 2000));
    let ids = env
        .enqueue_many(&[
            jc("a@example.com", json!({"lead_name": "A"})),
            jc("b@example.com", json!({"lead_name": "B"})),
            jc("c@example.com", json!({"lead_name": "C"})),
        ])
        .await;
    let worker = env.worker();
    tokio::time::timeout(Duration::from_secs(60), worker.drain())
        .await
        .expect("drained");
    for id in ids {
        assert_eq!(env.job(id).await.state, "succeeded");
    }
    let log = env.sandbox.account_log("justclick", JC_LOGIN);
    assert_eq!(log.max_in_flight, 1, "{log:?}");
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
}

/// A shutdown that abandons calls in flight holds their jobs (the provider may still act on
/// them) instead of putting them back for another worker to send at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_holds_the_calls_it_abandons() {
    let mut env = TestEnv::new().await;
    env.settings.http.abandoned_call_bound = Duration::from_secs(3);
    env.settings.worker.shutdown_timeout = Duration::from_millis(300);
    env.sandbox.faults().push(slow("s@example.com", 2500));
    let first = env
        .enqueue(jc("s@example.com", json!({"lead_name": "first"})))
        .await;
    let worker = env.worker();
    let stop = Shutdown::new();
    let run = spawn_worker(&worker, &stop);
    env.wait_for_state(first, "running", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.graceful.cancel();
    run.await.unwrap();
    let held: (String, Option<String>, bool) = sqlx::query_as(
        "SELECT state, locked_by, locked_until > now() + interval '1 second' FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(first)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(held, ("running".to_string(), None, true));
    let second = env
        .enqueue(jc("s@example.com", json!({"lead_name": "second"})))
        .await;
    // another worker waits for the hold, then sends both, in order
    let other = env.worker();
    tokio::time::timeout(Duration::from_secs(30), other.drain())
        .await
        .expect("drained");
    let c = env
        .sandbox
        .contact("justclick", JC_LOGIN, "s@example.com")
        .unwrap();
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT concat_ws(' ', id, state, attempts, coalesced_into, errors::text) FROM contact_sync.jobs ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(c.fields["lead_name"], "second", "{c:?} {rows:?}");
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
    assert_eq!(env.job(first).await.state, "succeeded");
    assert_eq!(env.job(second).await.state, "coalesced");
}

/// A worker stopped (SIGSTOP) between its claim and its call, past its lease: another worker
/// took the job and delivered it and a newer change. The stopped worker, resumed, must not
/// send its stale call after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_past_its_lease_does_not_send_its_stale_call() {
    let mut env = TestEnv::new().await;
    env.settings.worker.lease = Duration::from_secs(2);
    let config = env.config_file("");
    // The confirmation window's ledger is where a Smartlink call with the pending status
    // stops before it is sent: an outside lock holds the worker there.
    let mut outside = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE contact_sync.doi_ledger IN EXCLUSIVE MODE")
        .execute(&mut *outside)
        .await
        .unwrap();
    let stale = env
        .enqueue(sl(
            "z@example.com",
            json!({"subscribe": 3, "attributes": {"v": 1}}),
        ))
        .await;
    let mut stopped = env.spawn_quiet(&config, &["run"]);
    env.wait_for_state(stale, "running", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = stopped.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    outside.commit().await.unwrap();
    let newer = env
        .enqueue(sl("z@example.com", json!({"attributes": {"v": 2}})))
        .await;
    // another worker rescues the job once the stopped one's lease and registration expired
    let other = env.worker();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.job(stale).await.state != "succeeded" {
        if Instant::now() > deadline {
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT concat_ws(' ', id, state, locked_by, locked_until, last_error) FROM contact_sync.jobs ORDER BY id",
            )
            .fetch_all(&env.pool)
            .await
            .unwrap();
            let workers: Vec<String> = sqlx::query_scalar(
                "SELECT concat_ws(' ', id, expires_at) FROM contact_sync.workers",
            )
            .fetch_all(&env.pool)
            .await
            .unwrap();
            panic!("the other worker never delivered: {rows:?} {workers:?}");
        }
        other.drain().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = env
        .sandbox
        .contact("smartlink", SL_GAME, "z@example.com")
        .unwrap();
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stopped.kill().await.unwrap();
    let after = env
        .sandbox
        .contact("smartlink", SL_GAME, "z@example.com")
        .unwrap();
    assert_eq!(
        after.updates + after.stale_updates,
        before.updates + before.stale_updates,
        "the resumed worker sent its stale call: {after:?}"
    );
    assert_eq!(after.fields["attributes"]["v"], 2);
    assert_eq!(env.job(stale).await.state, "succeeded");
    // (in a call of its own: as far as the database knows, the stopped worker's call could
    // have carried it, and the provider could hold its `modify_ts` already)
    assert_eq!(env.job(newer).await.state, "succeeded");
}

/// The adversarial review's finding: a killed worker's job on its last attempt went `dead` at
/// once when its lease expired, and a newer change of the contact was sent while the killed
/// worker's call was still at the provider (and a job going back to `pending` gave its
/// account's in-flight slot back). A gone worker's jobs are held first, like abandoned calls.
#[tokio::test]
async fn a_gone_workers_job_is_held_before_it_returns_or_goes_dead() {
    use contact_sync::outbox::rescue::rescue_expired;
    let env = TestEnv::new().await;
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, attempts, max_attempts, locked_by, locked_until) \
         VALUES ('justclick', 'jc', 'g@example.com', '{\"lead_name\": \"old\"}', 'running', 1, 1, 'gone:1:0000', now() - interval '1 second') RETURNING id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let newer = env
        .enqueue(jc("g@example.com", json!({"lead_name": "new"})))
        .await;
    let hold = Duration::from_secs(2);
    assert_eq!(
        rescue_expired(&env.pool, 20, hold, ("", &[]))
            .await
            .unwrap(),
        (1, 0)
    );
    let (state, owner, held): (String, Option<String>, bool) = sqlx::query_as(
        "SELECT state, locked_by, locked_until > now() + interval '1 second' FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(last)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), owner, held), ("running", None, true));
    // the newer change cannot be claimed meanwhile
    let quota = [contact_sync::outbox::claim::AccountQuota {
        account: "jc".into(),
        limit: 10,
    }];
    let options = contact_sync::outbox::claim::ClaimOptions {
        lease: Duration::from_secs(30),
        worker_id: "w",
        default_max_attempts: 20,
        max_followers: 1,
        captured: &[],
    };
    let claimed = contact_sync::outbox::claim::claim(
        &env.pool,
        &quota,
        &options,
        &mut contact_sync::outbox::claim::ReadyFloors::default(),
    )
    .await
    .unwrap();
    assert!(claimed.jobs.is_empty(), "{claimed:?}");
    tokio::time::sleep(hold + Duration::from_millis(200)).await;
    assert_eq!(
        rescue_expired(&env.pool, 20, hold, ("", &[]))
            .await
            .unwrap(),
        (0, 1)
    );
    assert_eq!(env.job(last).await.state, "dead");
    // a drain (which waits for held calls) then delivers the newer change
    env.worker().drain().await;
    assert_eq!(env.job(newer).await.state, "succeeded");
}

/// The model test's finding (seed 622952402601): a Smartlink call whose answer was lost reached
/// the provider; its job then went `dead`. The contact's next change, older by `modify_ts`
/// than that call, was merged into a call with a newer change and applied, where the provider,
/// holding the lost call's newer `modify_ts`, discards it one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_older_than_a_lost_call_is_not_merged_into_a_newer_one() {
    let mut env = TestEnv::new().await;
    env.settings.http.request_timeout = Duration::from_millis(500);
    env.settings.http.abandoned_call_bound = Duration::from_millis(300);
    let email = "lost@example.com";
    // the first call is applied, its answer comes after the worker stopped waiting; its retry
    // is refused for good
    env.sandbox.faults().push(
        FaultRule::new(Fault::Stall { ms: 1500 }, 1)
            .provider("smartlink")
            .email(email),
    );
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 22010,
                text: "no permission".into(),
            },
            1,
        )
        .provider("smartlink")
        .email(email),
    );
    let lost = env
        .enqueue(sl(
            email,
            json!({"attributes": {"level": 2}, "modify_ts": 2000}),
        ))
        .await;
    let worker = env.worker();
    let run = tokio::spawn({
        let worker = worker.clone();
        async move { worker.drain().await }
    });
    env.wait_for_state(lost, "running", Duration::from_secs(10))
        .await;
    // behind it: one change older than the lost call, one newer
    let older = env
        .enqueue(sl(
            email,
            json!({"attributes": {"plan": "old"}, "modify_ts": 1000}),
        ))
        .await;
    let newer = env
        .enqueue(sl(email, json!({"tags": ["t"], "modify_ts": 3000})))
        .await;
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("drains")
        .unwrap();

    let row = env.job(lost).await;
    assert_eq!(row.state, "dead", "{row:?}");
    assert_eq!(row.errors[0]["kind"], "timeout", "{row:?}");
    let uncertain: Option<i64> = sqlx::query_scalar(
        "SELECT uncertain_ts FROM contact_sync.smartlink_watermarks WHERE contact_key = $1",
    )
    .bind(format!("smartlink:sl:{email}"))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        uncertain.is_some_and(|ts| ts >= 2000),
        "the lost call's modify_ts is recorded: {uncertain:?}"
    );
    let c = env.sandbox.contact("smartlink", SL_GAME, email).unwrap();
    assert_eq!(c.fields["attributes"]["level"], 2, "the lost call arrived");
    assert_eq!(
        c.fields["tags"],
        json!(["t"]),
        "the newer change is applied"
    );
    assert!(
        c.fields["attributes"].get("plan").is_none(),
        "the older change is discarded, as one by one: {:?}",
        c.fields
    );
    // sent alone: its own call, which the provider found stale
    assert_eq!(env.job(older).await.state, "succeeded");
    assert_eq!(env.job(newer).await.state, "succeeded");
}

/// The adversarial review's finding: recording two unanswered calls of one contact in one
/// statement (a stale call of a job rescued and finished elsewhere, and the contact's next
/// call, abandoned together at shutdown) upserted the contact's watermark twice and failed,
/// and the abandon with it. What the calls may have carried is recorded whatever their
/// payloads hold.
#[tokio::test]
async fn unanswered_calls_of_one_contact_are_recorded_in_one_statement() {
    let env = TestEnv::new().await;
    let email = "two@example.com";
    let first = env
        .enqueue(sl(email, json!({"tags": ["a"], "modify_ts": 5000})))
        .await;
    let second = env
        .enqueue(sl(email, json!({"tags": ["b"], "modify_ts": 7000})))
        .await;
    let odd = env
        .enqueue(sl("odd@example.com", json!({"tags": ["c"]})))
        .await;
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'succeeded', finished_at = now() WHERE id = $1",
    )
    .bind(first)
    .execute(&env.pool)
    .await
    .unwrap();
    contact_sync::outbox::synced::forget_contacts_of(&env.pool, &[first, second, odd], None)
        .await
        .expect("one upsert per contact");
    let recorded: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT contact_key, uncertain_ts FROM contact_sync.smartlink_watermarks ORDER BY contact_key",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded[1], (format!("smartlink:sl:{email}"), Some(7000)));
    // a change without a modify_ts carries its enqueue time
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        recorded[0]
            .1
            .is_some_and(|ts| (now_ms - 60_000..=now_ms).contains(&ts)),
        "{recorded:?}"
    );
}
