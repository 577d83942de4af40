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
    /// For the real binary (`DATABASE_URL`).
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin_url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL must be set: run the tests through scripts/test.sh");
        Self::on(&admin_url).await
    }

    /// A database of its own with the migrations before `version` applied only (an upgrade
    /// test applies the rest with [`contact_sync::migrate`]).
    pub async fn before_migration(version: i64) -> TestDb {
        let admin_url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL must be set: run the tests through scripts/test.sh");
        let db = Self::unmigrated(&admin_url).await;
        let earlier = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(
                contact_sync::MIGRATOR
                    .iter()
                    .filter(|m| m.version < version)
                    .cloned()
                    .collect(),
            ),
            locking: false,
            ..sqlx::migrate::Migrator::DEFAULT
        };
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("CREATE SCHEMA IF NOT EXISTS contact_sync")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("SET LOCAL search_path TO contact_sync")
            .execute(&mut *tx)
            .await
            .unwrap();
        earlier.run_direct(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        db
    }

    /// A database of its own on another server.
    pub async fn on(admin_url: &str) -> TestDb {
        let db = Self::unmigrated(admin_url).await;
        contact_sync::migrate(&db.pool).await.unwrap();
        db
    }

    async fn unmigrated(admin_url: &str) -> TestDb {
        let admin = PgConnectOptions::from_str(admin_url).unwrap();
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
        let mut url = url::Url::parse(admin_url).unwrap();
        url.set_path(&format!("/{name}"));
        let pool = pool_for(&options).await;
        TestDb {
            options,
            url: url.to_string(),
            pool,
        }
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
        Self::with_db(TestDb::new().await).await
    }

    /// On another Postgres server (tests that restart it).
    pub async fn with_database_url(url: &str) -> TestEnv {
        Self::with_db(TestDb::on(url).await).await
    }

    /// On a database already made (an upgrade test's).
    pub async fn with_db(db: TestDb) -> TestEnv {
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxAccounts::default()
                .with_justclick(JC_LOGIN, JC_SECRET)
                .with_justclick("other", "other-secret")
                .with_smartlink(SL_GAME, SL_SECRET)
                .create_missing_contacts(),
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
        // (tests of the abandoned-call hold, and the model test, set it)
        settings.http.abandoned_call_bound = Duration::ZERO;
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

    /// Drains, pulling scheduled retries forward, until nothing is pending for the test accounts.
    pub async fn settle(&self, worker: &Worker) -> Report {
        for _ in 0..200 {
            worker.drain().await;
            let pulled = sqlx::query(
                "UPDATE contact_sync.jobs SET run_at = now() WHERE state = 'pending' AND account IN ('jc', 'sl', 'jc2', 'sl2')",
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

    /// A TOML configuration equal to `self.settings` (for the real binary).
    pub fn config_file(&self, extra: &str) -> Scratch {
        self.config_file_with("", extra)
    }

    /// [`TestEnv::config_file`] with `jc_extra` lines in the `jc` account's table.
    pub fn config_file_with(&self, jc_extra: &str, extra: &str) -> Scratch {
        let w = &self.settings.worker;
        let mut toml = format!(
            "[worker]\nconcurrency = {}\nbatch_size = {}\nlease = \"{}\"\npoll_interval = \"{}\"\nbackoff_base = \"{}\"\nbackoff_cap = \"{}\"\nshutdown_timeout = \"{}\"\nmax_attempts = {}\n[admin]\nlisten = \"\"\n[http]\nrequest_timeout = \"{}\"\nabandoned_call_bound = \"{}\"\n",
            w.concurrency,
            w.batch_size,
            contact_sync::duration::format(w.lease),
            contact_sync::duration::format(w.poll_interval),
            contact_sync::duration::format(w.backoff_base),
            contact_sync::duration::format(w.backoff_cap),
            contact_sync::duration::format(w.shutdown_timeout),
            w.max_attempts,
            contact_sync::duration::format(self.settings.http.request_timeout),
            contact_sync::duration::format(self.settings.http.abandoned_call_bound),
        );
        toml.push_str(&format!(
            "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"{JC_LOGIN}\"\nsecret = \"{JC_SECRET}\"\nbase_url = \"{}\"\n{jc_extra}\n",
            self.sandbox.justclick_base_url(JC_LOGIN)
        ));
        toml.push_str(&format!(
            "[accounts.sl]\nprovider = \"smartlink\"\ngame_id = \"{SL_GAME}\"\nsecret = \"{SL_SECRET}\"\nbase_url = \"{}\"\n",
            self.sandbox.smartlink_base_url()
        ));
        toml.push_str(extra);
        write_config(&toml)
    }

    /// The real binary with this test's database and configuration.
    pub fn binary(&self, config: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-sync"));
        cmd.env("DATABASE_URL", &self.db.url)
            .env("CONTACT_SYNC_CONFIG", config)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Starts `contact-sync ARGS` in the background, output discarded.
    pub fn spawn_quiet(&self, config: &std::path::Path, args: &[&str]) -> tokio::process::Child {
        self.binary(config)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Enqueues many jobs in one statement.
    pub async fn enqueue_many(&self, jobs: &[NewJob]) -> Vec<JobId> {
        let mut conn = self.pool.acquire().await.unwrap();
        outbox::enqueue_batch(&mut conn, jobs).await.unwrap()
    }

    /// Runs the binary to completion: (exit code, stdout, stderr).
    pub async fn cli(&self, config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
        let out = self.binary(config).args(args).output().await.unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Polls until job `id` is in `state`; panics after `within`.
    pub async fn wait_for_state(&self, id: JobId, state: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let now = self.job(id).await.state;
            if now == state {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} is {now} after {within:?}, not {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        max_in_flight: None,
        allow_insecure_http: false,
        double_opt_in: DoubleOptIn::Defer,
        retryable_codes: vec![],
        missing_contact: Default::default(),
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
        max_in_flight: None,
        allow_insecure_http: false,
        double_opt_in: DoubleOptIn::Defer,
        retryable_codes: vec![],
        missing_contact: Default::default(),
    }
}

/// A file or directory of a test's own under the temporary directory, removed when dropped
/// (so that test runs leave nothing behind). Used as a path: `&scratch` is a `&Path`.
#[derive(Debug)]
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    /// A path no other test uses: `{prefix}-{random}{suffix}` (nothing created yet).
    pub fn path(prefix: &str, suffix: &str) -> Scratch {
        Scratch(std::env::temp_dir().join(format!(
            "{prefix}-{}-{}{suffix}",
            std::process::id(),
            fastrand::u64(..)
        )))
    }

    /// A directory of its own, created.
    pub fn dir(prefix: &str) -> Scratch {
        let dir = Scratch::path(prefix, "");
        std::fs::create_dir_all(&dir.0).unwrap();
        dir
    }

    /// A file of its own holding `contents`.
    pub fn file(prefix: &str, suffix: &str, contents: impl AsRef<[u8]>) -> Scratch {
        let file = Scratch::path(prefix, suffix);
        std::fs::write(&file.0, contents).unwrap();
        file
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Writes `toml` to a configuration file of its own (removed when the result is dropped).
pub fn write_config(toml: &str) -> Scratch {
    Scratch::file("contact-sync-it", ".toml", toml)
}

pub fn jc(email: &str, payload: Value) -> NewJob {
    NewJob::new("justclick", "jc", email, payload)
}

pub fn sl(email: &str, payload: Value) -> NewJob {
    NewJob::new("smartlink", "sl", email, payload)
}

/// Parks a job as `dead` by hand (an operator's SQL), as if its provider had refused it.
pub async fn park_as_dead(pool: &PgPool, id: i64) {
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'dead', finished_at = now(), last_error = 'x' WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn enqueue_err(env: &TestEnv, job: NewJob) -> String {
    let mut conn = env.pool.acquire().await.unwrap();
    match outbox::enqueue(&mut conn, &job).await {
        Ok(id) => panic!("{job:?} was accepted as job {id}"),
        Err(e) => {
            assert!(e.is_invalid(), "{e}");
            e.to_string()
        }
    }
}

/// Inserts rows as an old version (or a hand-written INSERT with the trigger off) could have.
pub async fn insert_unchecked(env: &TestEnv, sql: &str) {
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE contact_sync.jobs DISABLE TRIGGER jobs_after_insert")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE contact_sync.jobs ENABLE TRIGGER jobs_after_insert")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Runs `worker` in the background until `stop` (a `CancellationToken` or a
/// `contact_sync::worker::Shutdown`) ends it; the handle gives its report.
pub fn spawn_worker<S>(worker: &Worker, stop: &S) -> tokio::task::JoinHandle<Report>
where
    S: Into<contact_sync::worker::Shutdown> + Clone + Send + 'static,
{
    let worker = worker.clone();
    let stop = stop.clone();
    tokio::spawn(async move { worker.run(stop).await })
}
