//! Failure, caused for real against the real binary: kill -9, Postgres restarts, provider
//! storms, bad input, shutdown under load, secrets, transport security.

use crate::helpers::*;
use contact_sync::outbox::repair;
use contact_sync::outbox::{enqueue_batch, NewJob};
use contact_sync::sandbox::{Fault, FaultRule};
use serde_json::json;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running") as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

fn sigkill(child: &tokio::process::Child) {
    let pid = child.id().expect("running") as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Polls the database (the process under test is another program) until `done` or the deadline.
async fn wait_until<F, Fut>(deadline: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !done().await {
        assert!(
            Instant::now() < until,
            "condition not reached within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count_where(env: &TestEnv, condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM contact_sync.jobs WHERE {condition}"
    ))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// `n` changes of distinct contacts, JustClick and Smartlink alternating, each carrying
/// `final {i}`: what the providers must end with.
fn alternating_jobs(prefix: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                jc(
                    &format!("{prefix}{i}@example.com"),
                    json!({"lead_name": format!("final {i}")}),
                )
            } else {
                sl(
                    &format!("{prefix}{i}@example.com"),
                    json!({"attributes": {"v": format!("final {i}")}}),
                )
            }
        })
        .collect()
}

/// Every contact of [`alternating_jobs`] holds its final value; `repeated` says whether a
/// contact's change may have been delivered more than once.
fn assert_final_values(env: &TestEnv, jobs: &[NewJob], repeated: impl Fn(&str) -> bool) {
    for (i, job) in jobs.iter().enumerate() {
        let (provider, account) = if i % 2 == 0 {
            ("justclick", JC_LOGIN)
        } else {
            ("smartlink", SL_GAME)
        };
        let c = env.sandbox.contact(provider, account, &job.email).unwrap();
        let value = if i % 2 == 0 {
            c.fields["lead_name"].clone()
        } else {
            c.fields["attributes"]["v"].clone()
        };
        assert_eq!(value, json!(format!("final {i}")));
        if c.updates > 1 {
            assert!(
                repeated(&job.email.to_lowercase()),
                "{} delivered twice but was not in flight",
                job.email
            );
        }
    }
    assert_eq!(env.sandbox.stats().max_in_flight_per_contact, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing() {
    let mut env = TestEnv::new().await;
    env.settings.worker.concurrency = 64;
    env.settings.worker.lease = Duration::from_secs(2);
    let config = env.config_file("");
    env.sandbox.faults().set_delay(Duration::from_millis(20));
    let jobs = alternating_jobs("k", 5000);
    env.enqueue_many(&jobs).await;
    let mut first = env.spawn_quiet(&config, &["run"]);
    wait_until(Duration::from_secs(60), || async {
        count_where(&env, "state = 'succeeded'").await >= 1500
    })
    .await;
    sigkill(&first);
    first.wait().await.unwrap();
    let in_flight: HashSet<String> =
        sqlx::query_scalar("SELECT lower(email) FROM contact_sync.jobs WHERE state = 'running'")
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(
        !in_flight.is_empty(),
        "the kill should catch calls in flight"
    );
    let mut second = env.spawn_quiet(&config, &["run"]);
    wait_until(Duration::from_secs(120), || async {
        count_where(&env, "state = 'succeeded'").await == 5000
    })
    .await;
    sigterm(&second);
    assert!(second.wait().await.unwrap().success());
    assert_eq!(count_where(&env, "state = 'running'").await, 0);
    // every contact has its final value; only calls in flight at the kill were repeated
    assert_final_values(&env, &jobs, |email| in_flight.contains(email));
}

/// A worker's sessions cut again and again while it delivers (an administrator's
/// `pg_terminate_backend`, a pooler or a failover closing connections: SQLSTATE 57P01 or a
/// closed socket): the outcomes the cut interrupted are kept and written once a session is
/// back, every contact ends with its final value, only calls in flight at a cut are repeated,
/// never two at once for a contact, and the worker keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_sessions_lose_nothing() {
    let mut env = TestEnv::new().await;
    env.settings.worker.concurrency = 64;
    env.settings.worker.lease = Duration::from_secs(2);
    let config = env.config_file("");
    env.sandbox.faults().set_delay(Duration::from_millis(25));
    let total = 4000;
    let jobs = alternating_jobs("t", total);
    env.enqueue_many(&jobs).await;
    let mut worker = env.spawn_quiet(&config, &["run"]);
    // (the worker's sessions' application_name: `cli::daemon::worker_application_name`)
    let app = format!("contact-sync worker {}", worker.id().expect("running"));
    let until = Instant::now() + Duration::from_secs(120);
    let (mut cut, mut rounds) = (0i64, 0);
    while count_where(&env, "state = 'succeeded'").await < total as i64 {
        assert!(
            Instant::now() < until,
            "not delivered within 120 s ({cut} sessions cut)"
        );
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited");
        let now = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                   WHERE datname = current_database() AND application_name = $1) t",
        )
        .bind(&app)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        cut += now;
        rounds += usize::from(now > 0);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        rounds >= 5,
        "sessions cut {rounds} times ({cut} in all): the drain was too quick to test anything"
    );
    sigterm(&worker);
    assert!(worker.wait().await.unwrap().success());
    assert_eq!(count_where(&env, "state <> 'succeeded'").await, 0);
    // (calls in flight at a cut may be repeated: their outcomes may not have been written)
    assert_final_values(&env, &jobs, |_| true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate_lose_nothing() {
    // its own cluster: restarting the shared one would cut every other test's connections
    let pg = tokio::task::spawn_blocking(|| contact_sync::pg::ThrowawayPostgres::start(""))
        .await
        .unwrap()
        .unwrap();
    let mut env = TestEnv::with_database_url(&pg.url()).await;
    env.settings.worker.concurrency = 16;
    env.settings.worker.lease = Duration::from_secs(3);
    env.settings.worker.poll_interval = Duration::from_millis(100);
    let config = env.config_file("");
    env.sandbox.faults().set_delay(Duration::from_millis(10));
    let jobs: Vec<NewJob> = (0..3000)
        .map(|i| {
            jc(
                &format!("pg{i}@example.com"),
                json!({"lead_name": format!("v{i}")}),
            )
        })
        .collect();
    env.enqueue_many(&jobs).await;
    let worker = env
        .binary(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for (mode, after) in [("fast", 800), ("immediate", 1800)] {
        wait_until(Duration::from_secs(60), || async {
            // the pool reconnects by itself after a restart
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM contact_sync.jobs WHERE state = 'succeeded'",
            )
            .fetch_one(&env.pool)
            .await
            .map(|n| n >= after)
            .unwrap_or(false)
        })
        .await;
        let pg_ref = &pg;
        tokio::task::block_in_place(|| pg_ref.restart(mode)).unwrap();
    }
    wait_until(Duration::from_secs(120), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM contact_sync.jobs WHERE state = 'succeeded'",
        )
        .fetch_one(&env.pool)
        .await
        .map(|n| n == 3000)
        .unwrap_or(false)
    })
    .await;
    sigterm(&worker);
    let out = worker.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("WARN"), "the outage was logged");
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state <> 'succeeded'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(open, 0);
    for i in (0..3000).step_by(97) {
        let c = env
            .sandbox
            .contact("justclick", JC_LOGIN, &format!("pg{i}@example.com"))
            .unwrap();
        assert_eq!(c.fields["lead_name"], format!("v{i}"));
    }
    env.pool.close().await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_storms_end_in_success_and_do_not_slow_other_accounts() {
    let mut env = TestEnv::new().await;
    env.settings.worker.max_attempts = 10;
    env.settings.http.request_timeout = Duration::from_millis(500);
    let config = env.config_file("");
    let storm = [
        Fault::Status { status: 500 },
        Fault::Status { status: 503 },
        Fault::RateLimit {
            retry_after_secs: 1,
        },
        Fault::Reset,
        Fault::Stall { ms: 1200 },
        Fault::Malformed,
        Fault::ForgeSignature,
    ];
    for f in &storm {
        env.sandbox
            .faults()
            .push(FaultRule::new(f.clone(), 6).provider("justclick"));
    }
    let mut jobs: Vec<NewJob> = (0..30)
        .map(|i| jc(&format!("storm{i}@example.com"), json!({"lead_name": "S"})))
        .collect();
    jobs.extend((0..200).map(|i| sl(&format!("calm{i}@example.com"), json!({"tags": ["calm"]}))));
    env.enqueue_many(&jobs).await;
    let mut worker = env.spawn_quiet(&config, &["run"]);
    let started = Instant::now();
    wait_until(Duration::from_secs(20), || async {
        count_where(&env, "account = 'sl' AND state = 'succeeded'").await == 200
    })
    .await;
    let calm_done = started.elapsed();
    wait_until(Duration::from_secs(90), || async {
        count_where(&env, "account = 'jc' AND state = 'succeeded'").await == 30
    })
    .await;
    let storm_done = started.elapsed();
    sigterm(&worker);
    assert!(worker.wait().await.unwrap().success());
    assert_eq!(
        env.sandbox.faults().remaining(),
        0,
        "every fault was served"
    );
    assert!(
        calm_done < storm_done,
        "calm {calm_done:?} vs storm {storm_done:?}"
    );
    // nothing counted as success while a fault lasted: every fault shows as a failed attempt
    let failed: i64 = sqlx::query_scalar("SELECT sum(jsonb_array_length(errors))::bigint FROM contact_sync.jobs WHERE account = 'jc'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let by_kind: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e->>'kind', count(*) FROM contact_sync.jobs, jsonb_array_elements(errors) e WHERE account = 'jc' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(failed, 42, "{by_kind:?}");
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT e->>'kind' FROM contact_sync.jobs, jsonb_array_elements(errors) e WHERE account = 'jc' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        [
            "bad_response_signature",
            "malformed_response",
            "rate_limited",
            "server_error",
            "timeout",
            "transport"
        ]
    );
    assert_eq!(count_where(&env, "attempts > 10").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_thousand_calls_in_flight() {
    let mut env = TestEnv::new().await;
    env.settings.worker.concurrency = 1000;
    env.settings.worker.batch_size = 1000;
    env.settings.worker.shutdown_timeout = Duration::from_secs(2);
    let config = env.config_file("[database]\nmax_connections = 10\n");
    env.sandbox.faults().set_delay(Duration::from_secs(30));
    let jobs: Vec<NewJob> = (0..1500)
        .map(|i| jc(&format!("t{i}@example.com"), json!({})))
        .collect();
    env.enqueue_many(&jobs).await;
    let mut worker = env.spawn_quiet(&config, &["run"]);
    wait_until(Duration::from_secs(30), || async {
        count_where(&env, "state = 'running'").await == 1000
    })
    .await;
    let started = Instant::now();
    sigterm(&worker);
    let status = worker.wait().await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(4), "exit took {took:?}");
    assert_eq!(count_where(&env, "state = 'running'").await, 0);
    assert_eq!(
        count_where(&env, "state = 'pending' AND locked_until IS NULL").await,
        1500
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_abandons_calls_and_puts_their_claims_back() {
    let mut env = TestEnv::new().await;
    env.settings.worker.shutdown_timeout = Duration::from_secs(60);
    let config = env.config_file("");
    env.sandbox.faults().set_delay(Duration::from_secs(30));
    let jobs: Vec<NewJob> = (0..12)
        .map(|i| jc(&format!("f{i}@example.com"), json!({})))
        .collect();
    env.enqueue_many(&jobs).await;
    let mut worker = env.spawn_quiet(&config, &["run"]);
    wait_until(Duration::from_secs(30), || async {
        count_where(&env, "state = 'running'").await == 8
    })
    .await;
    sigterm(&worker);
    // The first signal waits for the calls (up to the 60 s shutdown timeout).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "exited on the first signal while calls were in flight"
    );
    assert_eq!(count_where(&env, "state = 'running'").await, 8);
    let started = Instant::now();
    sigterm(&worker);
    let status = worker.wait().await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(4), "forced exit took {took:?}");
    assert_eq!(
        count_where(&env, "state = 'pending' AND locked_until IS NULL").await,
        12,
        "every abandoned call is back in the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_or_parked_and_never_blocks_others() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    for (args, expected) in [
        (
            vec![
                "--provider",
                "mailchimp",
                "--account",
                "jc",
                "--email",
                "a@example.com",
            ],
            "[possible values: justclick, smartlink]",
        ),
        (
            vec![
                "--provider",
                "justclick",
                "--account",
                "jc",
                "--email",
                "a@@example",
            ],
            "malformed email",
        ),
        (
            vec![
                "--provider",
                "justclick",
                "--account",
                "j-c",
                "--email",
                "a@example.com",
            ],
            "invalid account name",
        ),
        (
            vec![
                "--provider",
                "smartlink",
                "--account",
                "sl",
                "--email",
                "a@example.com",
                "--set",
                "subscribe=x",
            ],
            "not an integer",
        ),
        (
            vec![
                "--provider",
                "smartlink",
                "--account",
                "sl",
                "--email",
                "a@example.com",
                "--payload",
                "{\"tags\": \"x\"}",
            ],
            "array of strings",
        ),
        (
            vec![
                "--provider",
                "justclick",
                "--account",
                "jc",
                "--email",
                "a@example.com",
                "--payload",
                "{\"lead_name\": \"'; DROP TABLE x; --\", \"bogus\": 1}",
            ],
            "unknown justclick payload key 'bogus'",
        ),
    ] {
        let mut full = vec!["enqueue"];
        full.extend(args);
        let (code, _, err) = env.cli(&config, &full).await;
        assert_ne!(code, 0, "{full:?}");
        assert!(err.contains(expected), "{full:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "justclick",
                "--account",
                "jc",
                "--email",
                "a@example.com",
                "--set",
                &format!("lead_city={}", "я".repeat(256)),
            ],
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("longer than 255"), "{err}");
    // only the provider can tell: a dead job with its reason, and the rest flows
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 100,
                text: "E-mail is invalid".into(),
            },
            1,
        )
        .email("rejected@example.com"),
    );
    let mut conn = env.pool.acquire().await.unwrap();
    let mut jobs = vec![jc("rejected@example.com", json!({"lead_name": "R"}))];
    jobs.push(NewJob::new(
        "justclick",
        "nobody",
        "w@example.com",
        json!({}),
    ));
    jobs.extend((0..50).map(|i| {
        jc(
            &format!("ok{i}@example.com"),
            json!({"lead_name": "Robert'); DROP TABLE contact_sync.jobs;--"}),
        )
    }));
    enqueue_batch(&mut conn, &jobs).await.unwrap();
    let (code, _, err) = env.cli(&config, &["run", "--drain"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(count_where(&env, "state = 'succeeded'").await, 50);
    assert_eq!(
        count_where(&env, "state = 'dead' AND last_error = 'E-mail is invalid'").await,
        1
    );
    assert_eq!(
        count_where(&env, "state = 'pending' AND account = 'nobody'").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_errors() {
    let mut env = TestEnv::new().await;
    env.settings.worker.max_attempts = 2;
    // a password in the URL (the test cluster trusts local connections and ignores it)
    let mut url = url::Url::parse(&env.db.url).unwrap();
    url.set_password(Some("pg-password-never-logged")).unwrap();
    let config = env.config_file("");
    for f in [
        Fault::Status { status: 503 },
        Fault::ForgeSignature,
        Fault::Reset,
        Fault::Malformed,
    ] {
        env.sandbox.faults().push(FaultRule::new(f, 1));
    }
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 4,
                text: "Incorrect hash".into(),
            },
            2,
        )
        .provider("justclick"),
    );
    let mut jobs: Vec<NewJob> = (0..6)
        .map(|i| jc(&format!("s{i}@example.com"), json!({"lead_name": "N"})))
        .collect();
    jobs.extend((0..6).map(|i| sl(&format!("s{i}@example.com"), json!({"subscribe": 3}))));
    env.enqueue_many(&jobs).await;
    let out = env
        .binary(&config)
        .env("DATABASE_URL", url.as_str())
        .env("RUST_LOG", "trace")
        .args(["run", "--drain"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("TRACE"), "trace logging was on");
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT errors::text || coalesce(last_error, '') FROM contact_sync.jobs",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    text.push_str(&stored.join("\n"));
    for secret in [JC_SECRET, SL_SECRET, "pg-password-never-logged"] {
        assert!(!text.contains(secret), "secret {secret} leaked");
    }
    assert!(!text.contains("sig="), "a Smartlink signature leaked");
    assert!(!text.contains("&hash="), "a JustClick request hash leaked");
    // and Debug of the configuration is redacted
    let settings = contact_sync::config::Settings::load_from(
        Some(&config),
        |_| Some(url.to_string()),
        Some(vec![]),
    )
    .unwrap();
    let debug = format!("{settings:?}");
    assert!(
        debug.contains("[redacted]")
            && !debug.contains(JC_SECRET)
            && !debug.contains("pg-password")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_security() {
    let env = TestEnv::new().await;
    // 1. an https provider with a self-signed certificate is refused
    let dir = Scratch::dir("cs-tls");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let mut settings = env.settings.clone();
    settings.worker.max_attempts = 1;
    let mut tls = justclick_account(&env.sandbox, JC_LOGIN, JC_SECRET);
    tls.base_url = Some(format!("https://localhost:{port}/justclick/{JC_LOGIN}"));
    settings.accounts.insert("jc".into(), tls);
    let id = env.enqueue(jc("tls@example.com", json!({}))).await;
    env.worker_with(&settings, env.pool.clone()).drain().await;
    let row = env.job(id).await;
    assert_eq!(row.state, "dead");
    let error = row.last_error.unwrap();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
    server.kill().await.ok();

    // 2. plain http to a non-loopback host is refused at start, naming the key
    let config = env.config_file("[accounts.far]\nprovider = \"justclick\"\nlogin = \"far\"\nsecret = \"s\"\nbase_url = \"http://10.20.30.40/jc\"\n");
    let (code, _, err) = env.cli(&config, &["run", "--drain"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("accounts.far.base_url") && err.contains("refused"),
        "{err}"
    );
    let config = env.config_file(
        "[accounts.far]\nprovider = \"justclick\"\nlogin = \"far\"\nsecret = \"s\"\nbase_url = \"http://10.20.30.40/jc\"\nallow_insecure_http = true\n",
    );
    let (code, _, err) = env.cli(&config, &["status"]).await;
    assert_eq!(code, 0, "{err}");

    // 3. the admin endpoint listens on loopback by default
    let config = env.config_file("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[admin]\nlisten = \"\"\n", "");
    std::fs::write(&config, text).unwrap();
    let worker = env
        .binary(&config)
        .arg("run")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), || async {
        match reqwest::get("http://127.0.0.1:9187/healthz").await {
            Ok(r) => r.status() == 200,
            Err(_) => false,
        }
    })
    .await;
    sigterm(&worker);
    let out = worker.wait_with_output().await.unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("addr=127.0.0.1:9187"), "{logs}");
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
    let (result, _) = repair::cancel(&env.pool, follower).await.unwrap();
    assert_eq!(result, repair::ActionResult::Done);
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

/// A change queued with the triggers off that the provider could not take never takes down
/// the changes merged with it: the head and the valid followers before it are delivered, it
/// is parked alone with its reason, and what follows it is delivered after.
#[tokio::test]
async fn an_unsendable_follower_is_parked_alone() {
    let env = TestEnv::new().await;
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload) VALUES
             ('justclick', 'jc', 'head@example.com', '{\"lead_name\": \"Head\"}'),
             ('justclick', 'jc', 'head@example.com', '{\"lead_city\": \"Riga\"}'),
             ('justclick', 'jc', 'head@example.com', '{\"lead_name\": 5}'),
             ('justclick', 'jc', 'head@example.com', '{\"lead_phone\": \"+371\"}'),
             ('smartlink', 'sl', 'sl@example.com', '{\"subscribe\": 1}'),
             ('smartlink', 'sl', 'sl@example.com', '{\"attributes\": {\"a\": [1, 2]}}')
         RETURNING id",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    env.sandbox
        .seed("justclick", JC_LOGIN, &["head@example.com".to_string()]);
    let worker = env.worker();
    env.settle(&worker).await;
    let states = |i: usize| {
        let env = &env;
        let id = ids[i];
        async move { env.job(id).await }
    };
    assert_eq!(states(0).await.state, "succeeded");
    assert_eq!(states(1).await.state, "coalesced");
    let bad = states(2).await;
    assert_eq!(bad.state, "dead");
    assert!(
        bad.last_error
            .unwrap_or_default()
            .contains("lead_name must be a string"),
        "the follower's own reason"
    );
    assert_eq!(states(3).await.state, "succeeded");
    assert_eq!(states(4).await.state, "succeeded");
    assert_eq!(states(5).await.state, "dead");
    let contact = env
        .sandbox
        .contact("justclick", JC_LOGIN, "head@example.com")
        .expect("the head was delivered");
    let field = |name: &str| {
        contact
            .fields
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    assert_eq!(field("lead_name").as_deref(), Some("Head"));
    assert_eq!(field("lead_city").as_deref(), Some("Riga"));
    assert_eq!(field("lead_phone").as_deref(), Some("+371"));
}
