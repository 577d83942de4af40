//! What a new operator trips over, driven through the binary: refused credentials pause the
//! account instead of burning attempts, accounts and providers checked at enqueue, database
//! errors that name the database and the cause.

use crate::helpers::*;
use contact_sync::outbox::repair;
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::json;
use std::time::{Duration, Instant};

async fn scalar(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&env.pool).await.unwrap()
}

async fn stop(mut worker: tokio::process::Child) {
    let pid = worker.id().expect("running") as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("worker exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_pause_the_account_until_a_corrected_worker_starts() {
    let env = TestEnv::new().await;
    let good = env.config_file("");
    let text = std::fs::read_to_string(&good).unwrap();
    let wrong_text = text
        .replace(JC_SECRET, "a-wrong-justclick-secret")
        .replace(SL_SECRET, "a-wrong-smartlink-secret");
    assert_ne!(text, wrong_text);
    let wrong = write_config(&wrong_text);
    let mut jobs: Vec<_> = (0..30)
        .map(|i| jc(&format!("w{i}@example.com"), json!({"lead_name": "W"})))
        .collect();
    jobs.extend((0..30).map(|i| sl(&format!("w{i}@example.com"), json!({"subscribe": 1}))));
    env.enqueue_many(&jobs).await;
    let worker = env.spawn_quiet(&wrong, &["run"]);
    let started = Instant::now();
    let status = loop {
        let (_, status, _) = env.cli(&good, &["status"]).await;
        if status.matches("refused by the provider").count() == 2 {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.contains("check accounts.jc.secret") && status.contains("check accounts.sl.secret"),
        "{status}"
    );
    // the calls stop: a few in flight when the first refusal came, not one per job per retry
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = env.sandbox.stats().bad_signatures;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(env.sandbox.stats().bad_signatures, refused, "calls go on");
    assert!(refused < 30, "{refused} refused calls for 60 jobs");
    // no job is dead or lost an attempt
    assert_eq!(env.count("pending").await, 60);
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM contact_sync.jobs WHERE attempts > 0"
        )
        .await,
        0
    );
    assert!(
        scalar(
            &env,
            "SELECT count(*) FROM contact_sync.jobs WHERE errors::text LIKE '%account_refused%'"
        )
        .await
            >= 2
    );
    let (_, list, _) = env.cli(&good, &["accounts", "list", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["paused_by"], "credentials", "{row}");
    }
    stop(worker).await;
    // a worker with the corrected configuration ends the pause and delivers everything
    let worker = env.spawn_quiet(&good, &["run"]);
    let started = Instant::now();
    while env.count("succeeded").await < 60 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not delivered after the fix: {} pending",
            env.count("pending").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(worker).await;
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM contact_sync.jobs WHERE attempts <> 1"
        )
        .await,
        0
    );
    let (_, status, _) = env.cli(&good, &["status"]).await;
    assert!(!status.contains("refused by the provider"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_providers_are_checked_at_enqueue() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    // the command line knows the configuration's accounts
    let (code, _, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "smartlink",
                "--account",
                "jc",
                "--email",
                "a@example.com",
            ],
        )
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("account \"jc\" is a justclick account, not smartlink")
            && err.contains("--provider justclick")
            && err.contains("(sl)"),
        "{err}"
    );
    let (code, _, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "justclick",
                "--account",
                "jc_main",
                "--email",
                "a@example.com",
            ],
        )
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown account \"jc_main\"")
            && err.contains("jc (justclick), sl (smartlink)"),
        "{err}"
    );
    // a bulk file: the bad lines are named and skipped, the good one queued
    let file = Scratch::file(
        "contact-sync-it",
        ".jsonl",
        concat!(
            r#"{"provider":"justclick","account":"jc","email":"ok@example.com","payload":{}}"#,
            "\n",
            r#"{"provider":"justclick","account":"sl","email":"b@example.com","payload":{}}"#,
            "\n",
            r#"{"provider":"justclick","account":"nobody","email":"c@example.com","payload":{}}"#,
            "\n"
        ),
    );
    let (code, out, err) = env
        .cli(&config, &["enqueue", "--file", file.to_str().unwrap()])
        .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("queued 1, duplicates 0, rejected 2"), "{out}");
    assert!(
        err.contains("line 2: account \"sl\" is a smartlink account")
            && err.contains("line 3: unknown account \"nobody\""),
        "{err}"
    );
    // every other path: once a worker has registered the accounts, the database refuses a
    // provider that is not the account's
    let worker = env.spawn_quiet(&config, &["run"]);
    let started = Instant::now();
    while scalar(
        &env,
        "SELECT count(*) FROM contact_sync.accounts WHERE provider IS NOT NULL",
    )
    .await
        < 2
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no registration"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err =
        sqlx::query("SELECT contact_sync.enqueue('justclick', 'sl', 'x@example.com', '{}'::jsonb)")
            .execute(&env.pool)
            .await
            .unwrap_err();
    let db = err.as_database_error().unwrap();
    assert_eq!(db.code().as_deref(), Some("22023"));
    assert!(
        db.message()
            .contains("account 'sl' is a smartlink account, not justclick"),
        "{}",
        db.message()
    );
    // an empty idempotency key (an unset variable) is refused on every path
    let err = sqlx::query(
        "SELECT contact_sync.enqueue('smartlink', 'sl', 'k@example.com', '{}'::jsonb, '')",
    )
    .execute(&env.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("idempotency_key must be 1 to 200 characters"),
        "{err}"
    );
    let mut conn = env.pool.acquire().await.unwrap();
    let err = contact_sync::outbox::enqueue_batch(
        &mut conn,
        &[sl("k@example.com", json!({})).idempotency_key("")],
    )
    .await
    .unwrap_err();
    assert!(err.is_invalid(), "{err}");
    drop(conn);
    // the right provider still goes through, unknown accounts too (a worker may come for them)
    sqlx::query("SELECT contact_sync.enqueue('smartlink', 'sl', 'x@example.com', '{}'::jsonb)")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("SELECT contact_sync.enqueue('justclick', 'later', 'x@example.com', '{}'::jsonb)")
        .execute(&env.pool)
        .await
        .unwrap();
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_name_the_database_and_the_cause() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let mut url = url::Url::parse(&env.db.url).unwrap();
    let cli_at = |url: String| {
        let config = config.to_path_buf();
        let env = &env;
        async move {
            let started = Instant::now();
            let out = env
                .binary(&config)
                .env("DATABASE_URL", url)
                .args(["status"])
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                started.elapsed(),
            )
        }
    };
    // nothing listens on this port
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut refused = url.clone();
    refused.set_port(Some(port)).unwrap();
    refused.set_password(Some("never-shown")).unwrap();
    let (code, err, took) = cli_at(refused.to_string()).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("connection refused"),
        "{err}"
    );
    assert!(!err.contains("never-shown"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // a mistyped URL never shows what might be its password
    let (code, err, _) = cli_at("postgres:/postgres:secretpw@127.0.0.1:1/cs".into()).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("must start with postgres:// or postgresql://") && !err.contains("secretpw"),
        "{err}"
    );
    // a database that does not exist
    url.set_path("/no_such_database_here");
    let (code, err, _) = cli_at(url.to_string()).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("database \"no_such_database_here\" does not exist"),
        "{err}"
    );
    // a database without the schema
    let name = format!("contact_sync_empty_{}", fastrand::u32(..));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&env.pool)
        .await
        .unwrap();
    url.set_path(&format!("/{name}"));
    let (code, err, _) = cli_at(url.to_string()).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("run `contact-sync migrate`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_warns_of_jobs_that_no_live_worker_serves() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new().await;
    let config = env.config_file("");
    env.enqueue(contact_sync::outbox::NewJob::new(
        "justclick",
        "jc_typo",
        "t@example.com",
        json!({}),
    ))
    .await;
    let mut worker = env
        .binary(&config)
        .args(["run", "--log-format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(worker.stderr.take().unwrap()).lines();
    let warning = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("no live worker serves") {
                return line;
            }
        }
        panic!("the worker exited without the warning");
    })
    .await
    .expect("a warning within 20 s");
    let v: serde_json::Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(v["level"], "WARN", "{warning}");
    assert_eq!(v["fields"]["account"], "jc_typo", "{warning}");
    assert!(warning.contains("[accounts.jc_typo]"), "{warning}");
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_and_every_series_before_the_database_answers() {
    let env = TestEnv::new().await;
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = admin.local_addr().unwrap();
    drop(admin);
    let config = env.config_file("");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[admin]\nlisten = \"\"\n",
        &format!("[admin]\nlisten = \"{admin_addr}\"\n"),
    );
    std::fs::write(&config, text).unwrap();
    // a database that is not there (yet)
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut url = url::Url::parse(&env.db.url).unwrap();
    url.set_port(Some(port)).unwrap();
    let worker = env
        .binary(&config)
        .env("DATABASE_URL", url.as_str())
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://{admin_addr}{path}"))
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
    };
    let started = Instant::now();
    while get("/healthz").await.map(|r| r.0) != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(10), "no /healthz");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = Instant::now();
    let (status, body) = get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    let asked = Instant::now();
    let (status, page) = get("/metrics").await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(status, 200);
    for help in [
        "# HELP contact_sync_jobs_claimed_total",
        "# HELP contact_sync_jobs_dead_total",
        "# HELP contact_sync_in_flight",
    ] {
        assert!(page.contains(help), "{help} missing:\n{page}");
    }
    for account in ["jc", "sl"] {
        let series = page
            .lines()
            .find(|l| {
                l.starts_with("contact_sync_jobs_succeeded_total{")
                    && l.contains(&format!("account=\"{account}\""))
            })
            .unwrap_or_else(|| panic!("no succeeded series for {account}:\n{page}"));
        assert!(series.ends_with(" 0"), "{series}");
    }
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_names_an_account_with_another_provider_stands_down() {
    let env = TestEnv::new().await;
    let good = env.config_file("");
    // the fleet knows jc as a JustClick account, with work waiting
    sqlx::query("INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc', 'justclick')")
        .execute(&env.pool)
        .await
        .unwrap();
    env.enqueue_many(
        &(0..20)
            .map(|i| jc(&format!("p{i}@example.com"), json!({})))
            .collect::<Vec<_>>(),
    )
    .await;
    let text = std::fs::read_to_string(&good).unwrap();
    let wrong_text = text.replace(
        &format!("[accounts.jc]\nprovider = \"justclick\"\nlogin = \"{JC_LOGIN}\""),
        "[accounts.jc]\nprovider = \"smartlink\"\ngame_id = \"999\"",
    );
    assert_ne!(text, wrong_text);
    let wrong = write_config(&wrong_text);
    let (code, _, err) = env.cli(&wrong, &["run", "--drain"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("this worker does not serve it; fix accounts.jc.provider")
            && err.contains("it has open justclick jobs"),
        "{err}"
    );
    // nothing of jc was touched, and the fleet still knows it as JustClick
    assert_eq!(env.count("pending").await, 20);
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM contact_sync.jobs WHERE attempts > 0"
        )
        .await,
        0
    );
    let provider: String =
        sqlx::query_scalar("SELECT provider FROM contact_sync.accounts WHERE account = 'jc'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(provider, "justclick");
    // a running replica with that configuration does not list jc among the accounts it serves
    let running = env.spawn_quiet(&wrong, &["run"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let served = loop {
        let rows: Vec<Vec<String>> =
            sqlx::query_scalar("SELECT accounts FROM contact_sync.workers")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        if let [accounts] = rows.as_slice() {
            if !accounts.iter().any(|a| a == "jc") || std::time::Instant::now() > deadline {
                break accounts.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never registered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        !served.iter().any(|a| a == "jc") && served.iter().any(|a| a == "sl"),
        "{served:?}"
    );
    let (_, listed, _) = env.cli(&good, &["workers", "--json"]).await;
    assert!(!listed.contains("\"jc\""), "{listed}");
    stop(running).await;
    sqlx::query("SELECT contact_sync.enqueue('justclick', 'jc', 'late@example.com', '{}'::jsonb)")
        .execute(&env.pool)
        .await
        .unwrap();
    // the right configuration delivers it all
    let (code, _, err) = env.cli(&good, &["run", "--drain"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(env.count("succeeded").await, 21);
}

#[tokio::test]
async fn configuration_errors_say_once_what_to_fix() {
    let env = TestEnv::new().await;
    let base = std::fs::read_to_string(env.config_file("")).unwrap();
    let cases = [
        (
            base.replace("[worker]\n", "[worker]\nconcurency = 5\n"),
            "configuration key worker.concurency: unknown setting (did you mean `concurrency`?)",
        ),
        (
            base.replace("provider = \"smartlink\"", "provider = \"smartlnk\""),
            "configuration key accounts.sl.provider: unknown provider \"smartlnk\" (expected justclick or smartlink)",
        ),
        (
            base.replace(
                "provider = \"justclick\"\n",
                "provider = \"justclick\"\ndouble_opt_in = \"drop\"\n",
            ),
            "configuration key accounts.jc.double_opt_in: applies to smartlink accounts only (remove it)",
        ),
    ];
    for (text, expected) in cases {
        let path = write_config(&text);
        let (code, out, err) = env.cli(&path, &["status"]).await;
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(err.trim(), format!("error: {expected}"), "{err}");
    }
    // a misspelled variable is named as the variable
    let (code, _, err) = {
        let out = env
            .binary(&env.config_file(""))
            .env("CONTACT_SYNC__WORKER__CONCURENCY", "5")
            .arg("status")
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, 1);
    assert!(
        err.contains("CONTACT_SYNC__WORKER__CONCURENCY (environment): unknown setting (did you mean CONTACT_SYNC__WORKER__CONCURRENCY?)")
            && err.lines().count() == 1,
        "{err}"
    );
    // an empty configuration (/dev/null) is a configuration, not a missing file
    let (code, out, err) = env
        .cli(std::path::Path::new("/dev/null"), &["status"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = env
        .cli(
            std::path::Path::new("/nonexistent/contact-sync.toml"),
            &["status"],
        )
        .await;
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "error: configuration: configuration file /nonexistent/contact-sync.toml not found (check --config or CONTACT_SYNC_CONFIG)"
    );
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
    let (result, state) = repair::retry(&env.pool, old, false).await.unwrap();
    assert_eq!(result, repair::ActionResult::Stale);
    assert_eq!(state, Some(repair::Found::Newer(newer)));
    let bulk = repair::retry_dead(&env.pool, None, false).await.unwrap();
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
    let (result, state) = repair::retry(&env.pool, old, false).await.unwrap();
    assert_eq!(state, Some(repair::Found::Newer(newer)));
    assert_eq!(
        result,
        repair::ActionResult::Stale,
        "still refused after retention ran"
    );
    env.settle(&worker).await;
    let c = env
        .sandbox
        .contact("justclick", JC_LOGIN, "s@example.com")
        .unwrap();
    assert_eq!(c.fields["lead_name"], "New");
    // explicitly forced: re-sent
    let (result, _) = repair::retry(&env.pool, old, true).await.unwrap();
    assert_eq!(result, repair::ActionResult::Done);
    env.settle(&worker).await;
    assert_eq!(env.job(old).await.state, "succeeded");

    // Regression: retrying a cancelled scheduled job dropped its run_at.
    let later = chrono::Utc::now() + chrono::Duration::hours(3);
    let scheduled = env
        .enqueue(jc("sched@example.com", json!({"lead_name": "S"})).run_at(later))
        .await;
    repair::cancel(&env.pool, scheduled).await.unwrap();
    repair::retry(&env.pool, scheduled, false).await.unwrap();
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM run_at - now())::float8 FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(scheduled)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(wait > 10_000.0, "{wait}");
}

/// Bulk actions over more contacts than one transaction takes (10,000) work through them in
/// turns and do every one: a cancel of 12,000 pending changes, then their retry, leave the
/// queue as it was.
#[tokio::test]
async fn bulk_actions_over_many_contacts_do_every_one() {
    use contact_sync::outbox::repair::{cancel_matching, retry_matching, JobFilter};
    use contact_sync::outbox::JobState;
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload)
         SELECT 'justclick', 'jc', 'many' || g || '@example.com', '{}' FROM generate_series(1, 12000) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let cancelled = cancel_matching(&env.pool, &JobFilter::new(JobState::Pending), false)
        .await
        .unwrap();
    assert_eq!(
        (cancelled.cancelled, cancelled.skipped_busy.len()),
        (12_000, 0)
    );
    assert_eq!(env.count("pending").await, 0);
    let retried = retry_matching(
        &env.pool,
        &JobFilter::new(JobState::Cancelled),
        false,
        false,
    )
    .await
    .unwrap();
    assert_eq!(retried.retried, 12_000, "{retried:?}");
    let ready: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE state = 'pending' AND waits_for IS NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((env.count("pending").await, ready), (12_000, 12_000));
}
