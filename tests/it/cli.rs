//! The real `contact-sync` binary: enqueue (single and bulk), status, jobs, retry, cancel,
//! run --drain, and the demo.

use crate::helpers::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_run_and_operator_commands() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    // enqueue: single, with --set typing
    let (code, out, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "smartlink",
                "--account",
                "sl",
                "--email",
                "cli@example.com",
                "--set",
                "subscribe=1",
                "--set",
                "tags=a,b",
                "--set",
                "attributes.level=7",
                "--set",
                "openid=123",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let id: i64 = out.trim().parse().unwrap();
    let payload = env.job(id).await.payload;
    assert_eq!(payload["subscribe"], 1);
    assert_eq!(payload["tags"], json!(["a", "b"]));
    assert_eq!(
        payload["attributes"]["level"], 7,
        "a number, as the SQL path keeps it"
    );
    assert_eq!(payload["openid"], "123");
    // a validation error is reported with the database's words and a non-zero exit
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
                "nope",
            ],
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("malformed email"), "{err}");
    // idempotency key from the CLI
    let args = [
        "enqueue",
        "--provider",
        "justclick",
        "--account",
        "jc",
        "--email",
        "k@example.com",
        "--idempotency-key",
        "order-1",
    ];
    let (_, first, _) = env.cli(&config, &args).await;
    let (_, second, _) = env.cli(&config, &args).await;
    assert_eq!(first, second);

    // a job that will fail permanently, and one for an unknown account
    env.sandbox.faults().push(
        contact_sync::sandbox::FaultRule::new(
            contact_sync::sandbox::Fault::ErrorCode {
                code: 100,
                text: "E-mail is invalid".into(),
            },
            1,
        )
        .email("bad@example.com"),
    );
    let (_, dead_id, _) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "justclick",
                "--account",
                "jc",
                "--email",
                "bad@example.com",
                "--set",
                "lead_name=X",
            ],
        )
        .await;
    let dead_id: i64 = dead_id.trim().parse().unwrap();
    // the command line refuses an account nobody knows; other paths accept it (its worker may
    // come later), and `status` shows its jobs waiting
    let (code, _, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "justclick",
                "--account",
                "ghost",
                "--email",
                "g@example.com",
            ],
        )
        .await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown account \"ghost\""), "{err}");
    env.enqueue(contact_sync::outbox::NewJob::new(
        "justclick",
        "ghost",
        "g@example.com",
        json!({}),
    ))
    .await;

    let (code, _, err) = env.cli(&config, &["run", "--drain"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(env.job(id).await.state, "succeeded");
    assert_eq!(env.job(dead_id).await.state, "dead");

    // status: table and JSON
    let (code, out, _) = env.cli(&config, &["status"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .next()
            .unwrap()
            .starts_with("ACCOUNT  PENDING  RUNNING  SUCCEEDED"),
        "{out}"
    );
    let ghost_line = out.lines().find(|l| l.starts_with("ghost")).unwrap();
    assert_eq!(
        ghost_line.split_whitespace().collect::<Vec<_>>(),
        ["ghost", "1", "0", "0", "0", "0", "0"]
    );
    assert!(out.contains("dead jobs: 1"), "{out}");
    assert!(
        out.contains("ghost: 1 job(s) wait for an account no live worker serves"),
        "{out}"
    );
    let (_, out, _) = env.cli(&config, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["dead"], 1);
    assert!(status["backlog"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["account"] == "ghost" && b["runnable"] == 1));

    // jobs list with filters
    let (_, out, _) = env.cli(&config, &["jobs", "list", "--state", "dead"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("ID"));
    assert!(
        lines[1].contains("bad@example.com") && lines[1].contains("E-mail is invalid"),
        "{out}"
    );
    let (_, out, _) = env
        .cli(&config, &["jobs", "list", "--account", "sl", "--json"])
        .await;
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["email"], "cli@example.com");
    let (_, out, _) = env
        .cli(
            &config,
            &["jobs", "list", "--email", "CLI@example.com", "--limit", "5"],
        )
        .await;
    assert_eq!(out.lines().count(), 2);
    let (code, _, err) = env
        .cli(&config, &["jobs", "list", "--state", "bogus"])
        .await;
    assert_eq!(code, 64);
    assert!(err.contains("[possible values: pending, running"), "{err}");

    // jobs show: table with the error history, and JSON
    let (_, out, _) = env
        .cli(&config, &["jobs", "show", &dead_id.to_string()])
        .await;
    assert!(out.contains("state            dead"), "{out}");
    assert!(out.contains("error history"), "{out}");
    assert!(out.contains("permanent") && out.contains("100"), "{out}");
    let (_, out, _) = env
        .cli(&config, &["jobs", "show", &dead_id.to_string(), "--json"])
        .await;
    let detail: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(detail["errors"][0]["code"], "100");
    let (code, _, _) = env.cli(&config, &["jobs", "show", "999999"]).await;
    assert_eq!(code, 2);

    // retry a dead job: pending again, then delivered
    let (code, out, _) = env
        .cli(&config, &["retry", &dead_id.to_string(), "--json"])
        .await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "pending"
    );
    let (code, _, err) = env.cli(&config, &["retry", &id.to_string()]).await;
    assert_eq!(code, 3, "a succeeded job cannot be retried");
    assert!(err.contains("succeeded"));
    env.cli(&config, &["run", "--drain"]).await;
    assert_eq!(env.job(dead_id).await.state, "succeeded");

    // cancel the waiting job; retry --dead
    let ghost: i64 = sqlx::query_scalar("SELECT id FROM contact_sync.jobs WHERE account = 'ghost'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let (code, out, _) = env.cli(&config, &["cancel", &ghost.to_string()]).await;
    assert_eq!(code, 0);
    assert!(out.contains("cancelled"));
    let (code, out, _) = env
        .cli(&config, &["retry", "--dead", "--account", "jc"])
        .await;
    assert_eq!(code, 0);
    assert!(out.contains("0 dead job(s)"), "{out}");
}

#[tokio::test]
async fn bulk_file_rejects_bad_lines_and_keeps_good_ones() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let mut file: Vec<u8> = Vec::new();
    file.extend_from_slice(b"{\"provider\":\"justclick\",\"account\":\"jc\",\"email\":\"one@example.com\",\"payload\":{\"lead_name\":\"One\"}}\n");
    file.extend_from_slice(
        b"{\"provider\":\"justclick\",\"account\":\"jc\",\"email\":\"broken\"}\n",
    );
    file.extend_from_slice(b"not json at all\n");
    file.extend_from_slice(b"{\"provider\":\"smartlink\",\"account\":\"sl\",\"email\":\"two@example.com\",\"payload\":{\"subscribe\":\"yes\"}}\n");
    file.extend_from_slice(
        b"{\"provider\":\"justclick\",\"account\":\"jc\",\"email\":\"\xff\xfe@example.com\"}\n",
    );
    file.extend_from_slice(b"\n");
    file.extend_from_slice(b"{\"provider\":\"smartlink\",\"account\":\"sl\",\"email\":\"three@example.com\",\"payload\":{\"tags\":[\"x\"]},\"idempotency_key\":\"t3\"}\r\n");
    file.extend_from_slice(b"{\"provider\":\"justclick\",\"account\":\"jc\",\"email\":\"four@example.com\",\"unexpected\":1}\n");
    file.extend_from_slice(b"{\"provider\":\"justclick\",\"account\":\"jc\",\"email\":\"five@example.com\",\"email\":\"six@example.com\"}\n");
    let path = Scratch::file("changes", ".jsonl", &file);
    let (code, out, err) = env
        .cli(&config, &["enqueue", "--file", path.to_str().unwrap()])
        .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("queued 2, duplicates 0, rejected 6"),
        "{out}\n{err}"
    );
    assert!(
        err.contains("line 2: ") && err.contains("malformed email"),
        "{err}"
    );
    assert!(err.contains("line 3: not JSON"), "{err}");
    assert!(
        err.contains("line 4: ") && err.contains("subscribe"),
        "{err}"
    );
    assert!(err.contains("line 5: not valid UTF-8"), "{err}");
    assert!(
        err.contains("line 8: unknown field \"unexpected\" (the fields are provider, account"),
        "{err}"
    );
    assert!(
        err.contains("line 9: email: given twice (a key may appear once per object)"),
        "{err}"
    );
    let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM contact_sync.jobs ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(emails, ["one@example.com", "three@example.com"]);
    // the same file again, from standard input: the keyed line is a duplicate
    let mut child = env
        .binary(&config)
        .args(["enqueue", "--file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&file).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("queued 1, duplicates 1, rejected 6"),
        "{stdout}"
    );
    // a JSON array is named as such, once
    std::fs::write(
        &path,
        r#"[{"provider":"justclick","account":"jc","email":"a@example.com"}]"#,
    )
    .unwrap();
    let (code, _, err) = env
        .cli(&config, &["enqueue", "--file", path.to_str().unwrap()])
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("holds a JSON array; expected JSON Lines") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test]
async fn enqueue_takes_a_time_an_attempt_budget_and_typed_attributes() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let (code, out, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "smartlink",
                "--account",
                "sl",
                "--email",
                "t@example.com",
                "--set",
                "attributes.level=7",
                "--set",
                "attributes.code=\"7\"",
                "--set",
                "attributes.vip=true",
                "--run-at",
                "2030-01-01T12:00:00+02:00",
                "--max-attempts",
                "3",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let id: i64 = out.trim().parse().unwrap();
    let (payload, run_at, max_attempts): (Value, String, Option<i32>) = sqlx::query_as(
        "SELECT payload, to_char(run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), max_attempts FROM contact_sync.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(payload["attributes"]["level"], json!(7));
    assert_eq!(payload["attributes"]["code"], json!("7"));
    assert_eq!(payload["attributes"]["vip"], json!(true));
    assert_eq!(run_at, "2030-01-01 10:00");
    assert_eq!(max_attempts, Some(3));
    for (args, expected) in [
        (vec!["--run-at", "tomorrow"], "expected an RFC 3339 time"),
        (vec!["--max-attempts", "0"], "--max-attempts"),
    ] {
        let mut full = vec![
            "enqueue",
            "--provider",
            "smartlink",
            "--account",
            "sl",
            "--email",
            "t@example.com",
        ];
        full.extend(args);
        let (code, _, err) = env.cli(&config, &full).await;
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(expected), "{err}");
    }
    // the SQL function takes the budget too
    let id: i64 = sqlx::query_scalar(
        "SELECT contact_sync.enqueue('justclick', 'jc', 'u@example.com', '{}', NULL, now(), 2)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(env.job(id).await.state, "pending");
    let m: Option<i32> =
        sqlx::query_scalar("SELECT max_attempts FROM contact_sync.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(m, Some(2));
}

#[tokio::test]
async fn demo_runs_to_completion_on_a_throwaway_postgres() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    // stdout and stderr in one file, in the order written
    let path = Scratch::path("cs-demo", ".out");
    let file = std::fs::File::create(&path).unwrap();
    let status = env
        .binary(&config)
        .env_remove("DATABASE_URL")
        .env_remove("CONTACT_SYNC_CONFIG")
        .arg("demo")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .await
        .unwrap();
    let stdout = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "{stdout}");
    // Regression: a warning that the throwaway Postgres ended a connection came
    // after the summary. Nothing is logged once the summary is printed.
    let after = stdout.split("Summary").nth(1).unwrap_or_default();
    assert!(
        !after
            .lines()
            .any(|l| l.contains(" WARN ") || l.contains(" ERROR ")),
        "{after}"
    );
    assert!(
        stdout.contains("starting a throwaway PostgreSQL"),
        "{stdout}"
    );
    assert!(
        stdout.contains("demo_jc") && stdout.contains("demo_sl"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Dead job") && stdout.contains("subscriber not found"),
        "{stdout}"
    );
    assert!(stdout.contains("deferred_until: 1"), "{stdout}");
    assert!(stdout.contains("cleaned up"), "{stdout}");
}

/// Regression: `Pool::close` returned while a connection was still on its way back
/// to the pool, so the demo stopped its throwaway Postgres under it (a warning each time).
#[tokio::test]
async fn a_closed_pool_has_no_connection_left() {
    let env = TestEnv::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(env.db.options.clone())
        .await
        .unwrap();
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    // one idle connection, one on its way back when the pool closes
    drop(a);
    while pool.num_idle() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(b);
    contact_sync::pg::close_pool(&pool).await;
    assert_eq!(pool.size(), 0, "a connection outlived the pool's close");
}

#[tokio::test]
async fn bulk_retry_cancel_purge_and_paged_lists() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let ids = env
        .enqueue_many(
            &["a", "b", "c", "d", "e", "f"]
                .iter()
                .map(|n| jc(&format!("{n}@example.com"), json!({})))
                .collect::<Vec<_>>(),
        )
        .await;
    let park = |emails: &'static [&'static str], error: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query(
                "UPDATE contact_sync.jobs SET state = 'dead', last_error = $2, finished_at = now() WHERE email = ANY($1)",
            )
            .bind(emails)
            .bind(error)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    park(
        &["a@example.com", "b@example.com"],
        "permanent error 100: E-mail is invalid",
    )
    .await;
    park(
        &["c@example.com"],
        "permanent error 500: Subscriber not found",
    )
    .await;
    let state = |id: i64| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM contact_sync.jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // a dry run counts and changes nothing
    let (code, out, err) = env
        .cli(
            &config,
            &[
                "retry",
                "--state",
                "dead",
                "--error-like",
                "ERROR 100",
                "--dry-run",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 dead job(s) would go back to pending"),
        "{out}"
    );
    assert_eq!(state(ids[0]).await, "dead");
    // without a terminal there is no question: it is done
    let (code, out, _) = env
        .cli(
            &config,
            &["retry", "--state", "dead", "--error-like", "error 100"],
        )
        .await;
    assert_eq!(code, 0);
    assert!(out.contains("2 dead job(s) back to pending"), "{out}");
    assert_eq!(
        (
            state(ids[0]).await,
            state(ids[1]).await,
            state(ids[2]).await
        ),
        ("pending".into(), "pending".into(), "dead".into())
    );
    let (code, out, _) = env
        .cli(
            &config,
            &[
                "cancel",
                "--state",
                "pending",
                "--account",
                "jc",
                "--email",
                "A@EXAMPLE.COM",
            ],
        )
        .await;
    assert_eq!(code, 0);
    assert!(out.contains("1 pending job(s) cancelled"), "{out}");
    assert_eq!(state(ids[0]).await, "cancelled");
    let (_, out, _) = env
        .cli(
            &config,
            &["cancel", "--state", "dead", "--dry-run", "--json"],
        )
        .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({"cancelled": 1, "dry_run": true, "skipped_busy": []})
    );
    // an id and a filter, or neither: a usage error
    for args in [
        vec!["retry", "5", "--state", "dead"],
        vec!["retry"],
        vec!["cancel"],
    ] {
        let (code, _, err) = env.cli(&config, &args).await;
        assert_eq!(code, 64, "{args:?}: {err}");
    }
    // purge: finished jobs older than the age only
    sqlx::query(
        "UPDATE contact_sync.jobs SET finished_at = now() - interval '40 days' WHERE id = $1",
    )
    .bind(ids[0])
    .execute(&env.pool)
    .await
    .unwrap();
    let (_, out, _) = env
        .cli(&config, &["purge", "--older-than", "30d", "--dry-run"])
        .await;
    assert!(
        out.contains("1 finished job(s) older than 30d would be deleted"),
        "{out}"
    );
    let (code, out, _) = env.cli(&config, &["purge", "--older-than", "30d"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("1 finished job(s) older than 30d deleted"),
        "{out}"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM contact_sync.jobs")
            .fetch_one(&env.pool)
            .await
            .unwrap(),
        5
    );
    // lists: --limit 0 is empty, pages follow with --after, times carry their zone
    let (_, out, _) = env
        .cli(&config, &["jobs", "list", "--limit", "0", "--json"])
        .await;
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
    let (_, out, _) = env
        .cli(&config, &["jobs", "list", "--limit", "2", "--json"])
        .await;
    let first: Vec<i64> = serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(first, vec![ids[5], ids[4]]);
    let (_, out, _) = env
        .cli(
            &config,
            &[
                "jobs",
                "list",
                "--limit",
                "2",
                "--after",
                &ids[4].to_string(),
                "--json",
            ],
        )
        .await;
    let next: Vec<i64> = serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(next, vec![ids[3], ids[2]]);
    let (_, out, _) = env.cli(&config, &["jobs", "list"]).await;
    assert!(out.contains(" UTC"), "{out}");
    let (code, _, err) = env.cli(&config, &["jobs", "list", "--state", "done"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("possible values: pending, running"), "{err}");
}

/// `contact-sync bench` on tiny sizes: every scenario runs against the test's database and
/// reports figures that add up (the jobs it drained, CPU for each process, the calls-only run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_every_scenario() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let (code, out, err) = env
        .cli(
            &config,
            &[
                "bench",
                // (large enough that each process's CPU, read in 10 ms clock ticks, is never
                // zero: 200 blocked-scenario jobs once drained in 28 ms with none counted for
                // Postgres)
                "--sizes",
                "1000,2000",
                "--blocked-contacts",
                "20",
                "--blocked-depth",
                "3",
                "--blocked-jobs",
                "1000",
                "--latency-samples",
                "3",
                "--floor-calls",
                "400",
                "--warmup",
                "100",
                "--capture-rows",
                "500",
                "--pretty",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let line = out.lines().next().unwrap();
    let r: Value = serde_json::from_str(line).unwrap();
    let sizes = r["sizes"].as_array().unwrap();
    assert_eq!(
        sizes
            .iter()
            .map(|s| s["backlog"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1000, 2000]
    );
    for s in sizes.iter().chain([&r["blocked"]]) {
        assert!(s["e2e_jobs_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["claim_ms_p99"].as_f64().unwrap() > 0.0, "{s}");
        let cpu = &s["cpu_us_per_job"];
        for part in ["worker", "postgres", "sandbox"] {
            assert!(cpu[part].as_f64().unwrap() > 0.0, "{part}: {s}");
        }
        // every delivered job writes its row and its contact's to the log
        assert!(s["wal_bytes_per_job"].as_f64().unwrap() > 100.0, "{s}");
    }
    // 20 blocked heads, 3 changes behind each
    assert_eq!(r["blocked"]["blocked"], 80, "{line}");
    assert_eq!(r["blocked"]["backlog"], 1000, "{line}");
    let floor = &r["floor"];
    assert_eq!(floor["calls"], 400, "{line}");
    for part in ["calls_per_s", "worker_us_per_call", "sandbox_us_per_call"] {
        assert!(floor[part].as_f64().unwrap() > 0.0, "{part}: {line}");
    }
    assert!(out.contains("calls only (no database): 400 calls"), "{out}");
    // the workers were started once, before every measured run
    assert!(r["worker_start_ms"].as_f64().unwrap() > 0.0, "{line}");
    assert!(out.contains("worker start "), "{out}");
    // capture: each statement timed without and with the triggers; a resync queues nothing
    let capture = &r["capture"];
    assert_eq!(capture["rows"], 500, "{line}");
    for part in ["unmapped_update", "mapped_update", "single_row_update"] {
        assert!(
            capture[part]["without_ms"].as_f64().unwrap() > 0.0,
            "{part}: {line}"
        );
        assert!(
            capture[part]["ratio"].as_f64().unwrap() > 0.0,
            "{part}: {line}"
        );
    }
    assert_eq!(capture["resync_enqueued"], 0, "{line}");
    assert!(
        capture["resync_rows_per_s"].as_f64().unwrap() > 0.0,
        "{line}"
    );
    assert!(out.contains("capture, a table of 500 rows"), "{out}");
    let left: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public.contact_sync_bench_users')::text")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(left, None, "the bench's table is dropped");
    // the backlogs were drained: nothing is left open
    assert_eq!(env.count("pending").await + env.count("running").await, 0);
}

#[tokio::test]
async fn the_command_line_never_rounds_a_number() {
    // Found by the adversarial review: `enqueue --file` and `--payload` parsed numbers as floats,
    // so values the database refuses were silently rounded and queued.
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let file = Scratch::file(
        "cs-numbers",
        ".jsonl",
        concat!(
            r#"{"provider":"smartlink","account":"sl","email":"f1@example.com","payload":{"attributes":{"x":0.1000000000000000055}}}"#,
            "\n",
            r#"{"provider":"smartlink","account":"sl","email":"f2@example.com","payload":{"attributes":{"x":3817034.98274485000000000000}}}"#,
            "\n"
        ),
    );
    let (code, out, err) = env
        .cli(&config, &["enqueue", "--file", file.to_str().unwrap()])
        .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("queued 1, duplicates 0, rejected 1"), "{out}");
    assert!(
        err.contains("line 1") && err.contains("cannot be sent exactly"),
        "{err}"
    );
    let (code, _, err) = env
        .cli(
            &config,
            &[
                "enqueue",
                "--provider",
                "smartlink",
                "--account",
                "sl",
                "--email",
                "p@example.com",
                "--payload",
                r#"{"attributes":{"y":123456789012345678.5}}"#,
            ],
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot be sent exactly"), "{err}");
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT payload -> 'attributes' ->> 'x' FROM contact_sync.jobs")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored, vec!["3817034.98274485000000000000".to_string()]);
}

/// `contact-sync jobs list | head`: the command ends quietly when its reader goes, as Unix tools
/// do (it panicked on the broken pipe).
#[tokio::test]
async fn a_reader_that_goes_away_ends_the_command_quietly() {
    use tokio::io::AsyncReadExt;
    let env = TestEnv::new().await;
    let jobs: Vec<_> = (0..3000)
        .map(|i| jc(&format!("pipe{i}@example.com"), json!({"lead_name": "P"})))
        .collect();
    env.enqueue_many(&jobs).await;
    let config = env.config_file("");
    let mut child = env
        .binary(&config)
        .args(["jobs", "list", "--json", "--limit", "3000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // read a little, then go away, as `head -c 100` does
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 100];
    stdout.read_exact(&mut first).await.unwrap();
    drop(stdout);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
