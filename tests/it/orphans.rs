//! Orphans: pending jobs inserted with triggers off (`session_replication_role = replica`, as
//! `pg_restore --disable-triggers` or a logical-replication apply does) are not in the queue of
//! contacts, so no claim takes them. They are found, said and counted, never silent.

use crate::helpers::*;
use contact_sync::outbox::orphans;
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

async fn insert_with_triggers_off(env: &TestEnv, email: &str) -> i64 {
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id = sqlx::query_scalar(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload) VALUES ('justclick', 'jc', $1, '{\"lead_name\": \"R\"}') RETURNING id",
    )
    .bind(email)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// The review's finding: such a job was never claimed, `status` called it runnable, and
/// `run --drain` exited 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_inserted_with_triggers_off_are_found_and_said() {
    let env = TestEnv::new().await;
    let config = env.config_file("");
    env.enqueue(jc("known@example.com", json!({"lead_name": "K"})))
        .await;
    let orphan = insert_with_triggers_off(&env, "restored@example.com").await;
    assert_eq!(
        orphans::count(&env.pool, None).await.unwrap(),
        orphans::Orphans {
            jobs: 1,
            contacts: 1
        }
    );

    let (code, out, err) = env.cli(&config, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 pending job(s) of 1 contact(s) are not in the queue"),
        "{out}"
    );
    assert!(out.contains(orphans::REPAIR), "{out}");

    let (code, _, err) = env.cli(&config, &["run", "--drain"]).await;
    assert_eq!(
        code, 1,
        "a drain that cannot reach a job does not succeed: {err}"
    );
    assert!(err.contains(orphans::REPAIR), "{err}");
    assert_eq!(env.job(orphan).await.state, "pending");

    // a running worker says so in its log within its first checks
    let worker = env
        .binary(&config)
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(worker.id().unwrap() as i32, libc::SIGTERM);
    }
    let out = worker.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("pending jobs the queue does not know"),
        "{log}"
    );
    assert!(log.contains(orphans::REPAIR), "{log}");

    // the repair puts it in the queue, and it is delivered
    sqlx::query(orphans::REPAIR)
        .execute(&env.pool)
        .await
        .unwrap();
    let (code, _, err) = env.cli(&config, &["run", "--drain"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(env.job(orphan).await.state, "succeeded");
}

/// The worker's check reads a bounded slice at a time and covers every pending job over a pass.
#[tokio::test]
async fn the_orphan_check_reads_slices_and_covers_the_whole_backlog() {
    let env = TestEnv::new().await;
    for i in 0..7 {
        env.enqueue(jc(&format!("k{i}@example.com"), json!({})))
            .await;
    }
    insert_with_triggers_off(&env, "k4b@example.com").await;
    let mut after: Option<String> = None;
    let mut found = 0;
    let mut slices = 0;
    loop {
        let (o, next) = orphans::check_slice(&env.pool, after.as_deref(), 3)
            .await
            .unwrap();
        found += o.jobs;
        slices += 1;
        after = next;
        if after.is_none() {
            break;
        }
        assert!(slices < 10);
    }
    assert_eq!(found, 1);
    assert_eq!(slices, 3, "8 pending jobs, 3 a slice");
}
