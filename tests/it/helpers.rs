//! Test fixtures: a fresh database per test, the sandbox, settings pointing at it, and ways to
//! drive the worker until the queue settles (no sleeping for work).

use contact_sync::config::{AccountSettings, DoubleOptIn, ProviderKind, Settings};
use contact_sync::outbox::{self, JobId, NewJob};
use contact_sync::providers::Registry;
use contact_sync::sandbox::{Sandbox, SandboxAccounts};
use contact_sync::secret::Secret;
use contact_sync::worker::{Report, Worker};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const JC_LOGIN: &str = "shop42";
pub const JC_SECRET: &str = "jc-test-secret-0123456789";
pub const SL_GAME: &str = "777";
pub const SL_SECRET: &str = "sl-test-secret-abcdef";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own, created from `DATABASE_URL`, migrated.
pub struct TestDb {
    pub options: PgConnectOptions,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin_url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL must be set: run the tests through scripts/test.sh");
        let admin = PgConnectOptions::from_str(&admin_url).unwrap();
        let name = format!(
            "cs_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let mut conn = admin.connect().await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let options = admin.clone().database(&name);
        let pool = pool_for(&options).await;
        contact_sync::migrate(&pool).await.unwrap();
        TestDb { options, pool }
    }

    /// Another pool on the same database: a stand-in for another process.
    pub async fn another_pool(&self) -> PgPool {
        pool_for(&self.options).await
    }
}

pub async fn pool_for(options: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.clone())
        .await
        .unwrap()
}

/// Database + sandbox + settings for one JustClick (`jc`) and one Smartlink (`sl`) account.
pub struct TestEnv {
    pub db: TestDb,
    pub pool: PgPool,
    pub sandbox: Sandbox,
    pub settings: Settings,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let db = TestDb::new().await;
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxAccounts::default()
                .with_justclick(JC_LOGIN, JC_SECRET)
                .with_justclick("other", "other-secret")
                .with_smartlink(SL_GAME, SL_SECRET),
        )
        .await
        .unwrap();
        let mut settings = Settings::default();
        settings.worker.concurrency = 8;
        settings.worker.batch_size = 50;
        settings.worker.lease = Duration::from_secs(10);
        settings.worker.poll_interval = Duration::from_millis(50);
        settings.worker.backoff_base = Duration::from_millis(1);
        settings.worker.backoff_cap = Duration::from_millis(5);
        settings.worker.shutdown_timeout = Duration::from_secs(5);
        settings.http.request_timeout = Duration::from_secs(5);
        settings.accounts.insert(
            "jc".into(),
            justclick_account(&sandbox, JC_LOGIN, JC_SECRET),
        );
        settings
            .accounts
            .insert("sl".into(), smartlink_account(&sandbox, SL_GAME, SL_SECRET));
        TestEnv {
            pool: db.pool.clone(),
            db,
            sandbox,
            settings,
        }
    }

    pub fn worker(&self) -> Worker {
        self.worker_with(&self.settings, self.pool.clone())
    }

    pub fn worker_with(&self, settings: &Settings, pool: PgPool) -> Worker {
        let registry = Registry::from_settings(settings).unwrap();
        Worker::new(pool, settings.clone(), registry)
    }

    pub async fn enqueue(&self, job: NewJob) -> JobId {
        let mut conn = self.pool.acquire().await.unwrap();
        outbox::enqueue(&mut conn, &job).await.unwrap()
    }

    /// Drains, pulling scheduled retries forward, until nothing is pending for known accounts.
    pub async fn settle(&self, worker: &Worker) -> Report {
        for _ in 0..200 {
            worker.drain().await;
            let pulled = sqlx::query(
                "UPDATE contact_sync.jobs SET run_at = now() WHERE state = 'pending' AND account IN ('jc', 'sl', 'jc2', 'sl2') AND run_at > now()",
            )
            .execute(&self.pool)
            .await
            .unwrap()
            .rows_affected();
            if pulled == 0 {
                return worker.report();
            }
        }
        panic!("queue did not settle");
    }

    pub async fn job(&self, id: JobId) -> JobRow {
        sqlx::query_as::<_, JobRow>(
            "SELECT state, attempts, last_error, errors, coalesced_into, doi, payload FROM contact_sync.jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn count(&self, state: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state = $1")
            .bind(state)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct JobRow {
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub errors: Value,
    pub coalesced_into: Option<i64>,
    pub doi: Option<String>,
    pub payload: Value,
}

pub fn justclick_account(sandbox: &Sandbox, login: &str, secret: &str) -> AccountSettings {
    AccountSettings {
        provider: ProviderKind::Justclick,
        login: Some(login.into()),
        game_id: None,
        secret: Secret::new(secret),
        base_url: Some(sandbox.justclick_base_url(login)),
        rate_limit_per_second: None,
        burst: None,
        allow_insecure_http: false,
        double_opt_in: DoubleOptIn::Defer,
        retryable_codes: vec![],
    }
}

pub fn smartlink_account(sandbox: &Sandbox, game: &str, secret: &str) -> AccountSettings {
    AccountSettings {
        provider: ProviderKind::Smartlink,
        login: None,
        game_id: Some(game.into()),
        secret: Secret::new(secret),
        base_url: Some(sandbox.smartlink_base_url()),
        rate_limit_per_second: None,
        burst: None,
        allow_insecure_http: false,
        double_opt_in: DoubleOptIn::Defer,
        retryable_codes: vec![],
    }
}

pub fn jc(email: &str, payload: Value) -> NewJob {
    NewJob::new("justclick", "jc", email, payload)
}

pub fn sl(email: &str, payload: Value) -> NewJob {
    NewJob::new("smartlink", "sl", email, payload)
}
