//! The admin endpoint, retention, and the container files.

use crate::helpers::*;
use contact_sync::outbox::prune::prune_finished;
use serde_json::json;
use std::time::Duration;

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn metric(page: &str, name: &str, account: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("account=\"{account}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness() {
    let env = TestEnv::new().await;
    // account names of their own: the metrics registry is process-wide
    let mut settings = env.settings.clone();
    settings.accounts.clear();
    settings.accounts.insert(
        "metrics_jc".into(),
        justclick_account(&env.sandbox, JC_LOGIN, JC_SECRET),
    );
    settings.worker.max_attempts = 2;
    for i in 0..5 {
        env.enqueue(contact_sync::outbox::NewJob::new(
            "justclick",
            "metrics_jc",
            format!("m{i}@example.com"),
            json!({}),
        ))
        .await;
    }
    env.enqueue(contact_sync::outbox::NewJob::new(
        "justclick",
        "metrics_jc",
        "m0@example.com",
        json!({"lead_name": "again"}),
    ))
    .await;
    env.enqueue(contact_sync::outbox::NewJob::new(
        "justclick",
        "metrics_idle",
        "w@example.com",
        json!({}),
    ))
    .await;
    env.sandbox.faults().push(
        contact_sync::sandbox::FaultRule::new(
            contact_sync::sandbox::Fault::Status { status: 503 },
            5,
        )
        .email("m4@example.com"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(contact_sync::admin::serve(
        listener,
        env.pool.clone(),
        stop.clone(),
    ));
    let worker = env.worker_with(&settings, env.pool.clone());
    env.settle(&worker).await;
    for _ in 0..5 {
        // settle only pulls known test accounts forward
        sqlx::query("UPDATE contact_sync.jobs SET run_at = now() WHERE state = 'pending' AND account = 'metrics_jc'").execute(&env.pool).await.unwrap();
        worker.drain().await;
    }
    let (status, page) = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&page, "contact_sync_jobs_claimed_total", "metrics_jc"),
        6.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "contact_sync_jobs_succeeded_total", "metrics_jc"),
        4.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "contact_sync_jobs_coalesced_total", "metrics_jc"),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "contact_sync_jobs_retried_total", "metrics_jc"),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "contact_sync_jobs_dead_total", "metrics_jc"),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "contact_sync_provider_request_duration_seconds_count",
            "metrics_jc"
        ),
        6.0,
        "{page}"
    );
    assert!(
        page.contains("contact_sync_provider_request_duration_seconds_bucket"),
        "histogram buckets"
    );
    assert_eq!(
        metric(&page, "contact_sync_queue_runnable", "metrics_idle"),
        1.0,
        "{page}"
    );
    assert!(
        metric(
            &page,
            "contact_sync_queue_oldest_runnable_age_seconds",
            "metrics_idle"
        ) >= 0.0
    );
    assert_eq!(
        get(&format!("http://{addr}/healthz")).await,
        (200, "ok\n".into())
    );
    assert_eq!(get(&format!("http://{addr}/readyz")).await.0, 200);
    // readiness follows the database
    sqlx::query("DELETE FROM contact_sync._sqlx_migrations WHERE version = (SELECT max(version) FROM contact_sync._sqlx_migrations)")
        .execute(&env.pool)
        .await
        .unwrap();
    let (status, body) = get(&format!("http://{addr}/readyz")).await;
    assert_eq!(status, 503);
    assert!(body.contains("migrations"));
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[test]
fn admin_endpoint_binds_loopback_by_default() {
    let settings = contact_sync::config::Settings::default();
    let addr: std::net::SocketAddr = settings.admin.listen.parse().unwrap();
    assert!(addr.ip().is_loopback());
}

#[tokio::test]
async fn retention_prunes_old_finished_jobs_only() {
    let env = TestEnv::new().await;
    for i in 0..5 {
        env.enqueue(jc(&format!("r{i}@example.com"), json!({})))
            .await;
    }
    env.settle(&env.worker()).await;
    let dead = env.enqueue(jc("dead@example.com", json!({}))).await;
    let cancelled = env.enqueue(jc("cancel@example.com", json!({}))).await;
    sqlx::query("UPDATE contact_sync.jobs SET state = 'dead', finished_at = now() WHERE id = $1")
        .bind(dead)
        .execute(&env.pool)
        .await
        .unwrap();
    contact_sync::outbox::repair::cancel(&env.pool, cancelled)
        .await
        .unwrap();
    // nothing is old enough yet
    assert_eq!(
        prune_finished(&env.pool, Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0
    );
    sqlx::query("UPDATE contact_sync.jobs SET finished_at = now() - interval '8 days'")
        .execute(&env.pool)
        .await
        .unwrap();
    // small batches
    assert_eq!(
        prune_finished(&env.pool, Duration::from_secs(7 * 86_400), 4)
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        prune_finished(&env.pool, Duration::from_secs(7 * 86_400), 4)
            .await
            .unwrap(),
        2
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT state FROM contact_sync.jobs")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, ["dead"]);
}

#[test]
fn docker_compose_file_is_valid_and_wired() {
    use yaml_rust2::YamlLoader;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let services = &docs[0]["services"];
    for name in ["postgres", "migrate", "worker", "sandbox"] {
        assert!(!services[name].is_badvalue(), "service {name} missing");
    }
    let worker_cmd = format!("{:?}", services["worker"]["command"]);
    assert!(worker_cmd.contains("run"), "{worker_cmd}");
    let env = format!("{:?}", services["worker"]["environment"]);
    assert!(env.contains("DATABASE_URL"), "{env}");
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
    assert!(dockerfile.contains("USER "), "non-root runtime user");
}
