//! Graceful shutdown: stop claiming, finish or release in-flight work, nothing lost.

use crate::helpers::*;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_unfinished_claims() {
    let env = TestEnv::new().await;
    env.sandbox.faults().set_delay(Duration::from_secs(3));
    let jobs: Vec<_> = (0..20)
        .map(|i| jc(&format!("s{i}@example.com"), json!({})))
        .collect();
    env.enqueue_many(&jobs).await;
    let mut settings = env.settings.clone();
    settings.worker.shutdown_timeout = Duration::from_millis(300);
    let worker = env.worker_with(&settings, env.pool.clone());
    let stop = CancellationToken::new();
    let run = spawn_worker(&worker, &stop);
    // wait until calls are in flight
    for _ in 0..200 {
        if env.count("running").await == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.count("running").await, 8);
    let started = std::time::Instant::now();
    stop.cancel();
    let report = run.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(report.claimed, 8);
    assert_eq!(env.count("running").await, 0);
    assert_eq!(env.count("pending").await, 20);
    let leftover: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE locked_until IS NOT NULL OR locked_by IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(leftover, 0);
    // the released jobs are delivered by the next worker
    env.sandbox.faults().set_delay(Duration::ZERO);
    env.settle(&env.worker()).await;
    assert_eq!(env.count("succeeded").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_calls_that_finish_in_time() {
    let env = TestEnv::new().await;
    env.sandbox.faults().set_delay(Duration::from_millis(300));
    for i in 0..4 {
        env.enqueue(jc(&format!("f{i}@example.com"), json!({})))
            .await;
    }
    let worker = env.worker();
    let stop = CancellationToken::new();
    let run = spawn_worker(&worker, &stop);
    for _ in 0..200 {
        if env.count("running").await == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let report = run.await.unwrap();
    assert_eq!(report.succeeded, 4);
    assert_eq!(env.count("succeeded").await, 4);
}

#[tokio::test]
async fn drain_fails_while_its_own_claims_are_still_running() {
    // The database refuses every write that would move one delivered job out of `running` (a
    // trigger stands in for any write that keeps failing): its outcome is kept with its lease,
    // the others are recorded, and `run --drain` stopped by SIGTERM cannot release it either:
    // it says so and exits 1 instead of 0.
    let env = TestEnv::new().await;
    sqlx::query(
        r#"CREATE FUNCTION refuse_stuck() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               -- (a delivered job leaves the table: its outcome is a DELETE)
               IF TG_OP = 'DELETE' THEN
                   IF OLD.state = 'running' AND OLD.email = 'stuck@example.com' THEN
                       RAISE EXCEPTION 'refusing to record this job';
                   END IF;
                   RETURN OLD;
               END IF;
               IF OLD.state = 'running' AND NEW.state <> 'running' AND NEW.email = 'stuck@example.com' THEN
                   RAISE EXCEPTION 'refusing to record this job';
               END IF;
               RETURN NEW;
           END $$"#,
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_stuck BEFORE UPDATE OR DELETE ON contact_sync.jobs FOR EACH ROW EXECUTE FUNCTION refuse_stuck()",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let stuck = env
        .enqueue(jc("stuck@example.com", json!({"lead_name": "S"})))
        .await;
    let mut others = Vec::new();
    for i in 0..10 {
        others.push(
            env.enqueue(jc(
                &format!("fine{i}@example.com"),
                json!({"lead_name": "F"}),
            ))
            .await,
        );
    }
    let config = env.config_file("");
    let child = env
        .binary(&config)
        .args(["run", "--drain"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state = 'succeeded'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if done == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the others were not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.job(stuck).await.state, "running");
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("still `running`"), "{stderr}");
}
