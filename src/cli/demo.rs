//! `contact-sync demo`: the zero-setup main job. A throwaway local Postgres when no
//! `DATABASE_URL` is set, the sandbox as both providers, a realistic mix of changes (some that
//! fail and retry, one permanent failure, a double-opt-in dedupe), the worker until drained with
//! a live progress line, a summary table, and clean-up.

use super::table;
use contact_sync::config::{AccountSettings, DoubleOptIn, ProviderKind, Settings};
use contact_sync::outbox::inspect::StateCount;
use contact_sync::outbox::{claim, enqueue_batch, NewJob};
use contact_sync::outbox::{probes, repair};
use contact_sync::providers::smartlink::api_key_id;
use contact_sync::providers::Registry;
use contact_sync::sandbox::{Fault, FaultRule, Sandbox, SandboxAccounts};
use contact_sync::secret::Secret;
use contact_sync::worker::Worker;
use serde::Serialize;
use serde_json::json;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

const JC_LOGIN: &str = "demo";
const JC_SECRET: &str = "demo-justclick-secret";
const SL_GAME: &str = "12345";
const SL_SECRET: &str = "demo-smartlink-secret";
/// The demo's accounts; only their jobs are touched when the demo runs on your database.
pub const ACCOUNTS: [&str; 2] = ["demo_jc", "demo_sl"];

/// The demo's provider accounts (also the sandbox's default credentials); JustClick creates
/// unknown contacts on their first update.
pub fn sandbox_accounts() -> SandboxAccounts {
    SandboxAccounts::default()
        .with_justclick(JC_LOGIN, JC_SECRET)
        .with_smartlink(SL_GAME, SL_SECRET)
        .create_missing_contacts()
}

/// What the demo ended with.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub counts: Vec<StateCount>,
    pub failed_attempts: i64,
    pub provider_requests: u64,
    pub doi: Vec<(String, i64)>,
    pub dead: Vec<(i64, String, String)>,
    pub seconds: f64,
}

fn demo_settings(sandbox: &Sandbox) -> Settings {
    let mut settings = Settings::default();
    settings.worker.concurrency = 16;
    settings.worker.poll_interval = Duration::from_millis(100);
    settings.worker.backoff_base = Duration::from_millis(200);
    settings.worker.backoff_cap = Duration::from_secs(1);
    settings.http.request_timeout = Duration::from_secs(2);
    // the sandbox finishes every request (also one whose client gave up) within 2.5 s
    settings.http.abandoned_call_bound = Duration::from_secs(3);
    let account =
        |provider, login: Option<&str>, game: Option<&str>, secret: &str, base: String| {
            AccountSettings {
                provider,
                login: login.map(String::from),
                game_id: game.map(String::from),
                secret: Secret::new(secret),
                base_url: Some(base),
                rate_limit_per_second: None,
                burst: None,
                max_in_flight: None,
                allow_insecure_http: false,
                double_opt_in: DoubleOptIn::Defer,
                retryable_codes: vec![],
                missing_contact: Default::default(),
            }
        };
    settings.accounts.insert(
        ACCOUNTS[0].into(),
        account(
            ProviderKind::Justclick,
            Some(JC_LOGIN),
            None,
            JC_SECRET,
            sandbox.justclick_base_url(JC_LOGIN),
        ),
    );
    settings.accounts.insert(
        ACCOUNTS[1].into(),
        account(
            ProviderKind::Smartlink,
            None,
            Some(SL_GAME),
            SL_SECRET,
            sandbox.smartlink_base_url(),
        ),
    );
    settings
}

const FIRST: [&str; 8] = [
    "Анна",
    "Boris",
    "Chloé",
    "Dmitri",
    "Eve",
    "Фёдор",
    "Grace",
    "Hugo",
];
const CITIES: [&str; 6] = [
    "Москва",
    "Berlin",
    "São Paulo",
    "Мухоловск",
    "Zürich",
    "Lyon",
];

fn first_wave() -> Vec<NewJob> {
    let mut jobs = Vec::new();
    for i in 0..40 {
        let email = format!("customer{i}@example.com");
        let name = format!("{} {}", FIRST[i % FIRST.len()], i);
        jobs.push(NewJob::new(
            "justclick",
            ACCOUNTS[0],
            &email,
            json!({"lead_name": name, "lead_tags": ["newsletter"]}),
        ));
        jobs.push(NewJob::new("justclick", ACCOUNTS[0], &email, json!({"lead_city": CITIES[i % CITIES.len()], "lead_phone": format!("+7 900 000-{i:02}-{i:02}")})));
        jobs.push(NewJob::new(
            "smartlink",
            ACCOUNTS[1],
            &email,
            json!({"subscribe": 1, "tags": ["vip", "q4"], "language": "en", "location": "276", "attributes": {"name": name, "level": format!("{}", i % 10)}}),
        ));
    }
    // a contact JustClick does not know: a permanent failure
    jobs.push(NewJob::new(
        "justclick",
        ACCOUNTS[0],
        "unknown.person@example.com",
        json!({"lead_name": "Nobody"}),
    ));
    // double opt-in: asks to confirm
    jobs.push(NewJob::new(
        "smartlink",
        ACCOUNTS[1],
        "confirm.me@example.com",
        json!({"subscribe": 3}),
    ));
    jobs
}

fn second_wave() -> Vec<NewJob> {
    let mut jobs = Vec::new();
    for i in 0..20 {
        let email = format!("customer{i}@example.com");
        jobs.push(NewJob::new(
            "smartlink",
            ACCOUNTS[1],
            &email,
            json!({"attributes": {"last_order": format!("#{}", 1000 + i)}}),
        ));
    }
    // asks to confirm again within the hour: the provider would not send a second email, so the
    // status is deferred until the window ends
    jobs.push(NewJob::new(
        "smartlink",
        ACCOUNTS[1],
        "confirm.me@example.com",
        json!({"subscribe": 3, "tags": ["returning"]}),
    ));
    jobs
}

/// Runs the demo; `database_url` None starts a throwaway Postgres.
pub async fn run(database_url: Option<String>) -> anyhow::Result<DemoSummary> {
    let started = Instant::now();
    match &database_url {
        Some(_) => {
            println!("Using DATABASE_URL (only the demo's accounts {ACCOUNTS:?} are touched).")
        }
        None => println!("No DATABASE_URL: starting a throwaway PostgreSQL ..."),
    }
    let (pg, pool, url) = contact_sync::pg::open(database_url, "", 12).await?;
    if let Some(pg) = &pg {
        println!(
            "  PostgreSQL on {} (data in {}, removed at the end)",
            url.trim_start_matches("postgres://postgres@"),
            pg.data_dir().display()
        );
    }
    let result = run_on(&pool, pg.is_some(), started).await;
    // Every connection is gone before the throwaway Postgres stops, on every path: one it
    // ended would be reported as a warning when sqlx tests it on its way back to the pool.
    contact_sync::pg::close_pool(&pool).await;
    drop(pg);
    let summary = result?;
    println!("Done in {:.1}s; cleaned up.", summary.seconds);
    Ok(summary)
}

/// The demo on a migrated database (`throwaway`: one started for it, whose data goes anyway).
async fn run_on(
    pool: &sqlx::PgPool,
    throwaway: bool,
    started: Instant,
) -> anyhow::Result<DemoSummary> {
    let sl_key = api_key_id(&Secret::new(SL_SECRET));
    for account in ACCOUNTS {
        repair::purge_account(pool, account, Some(&sl_key)).await?;
    }
    let sandbox = Sandbox::start("127.0.0.1:0".parse()?, sandbox_accounts()).await?;
    println!(
        "Sandbox providers on {} (JustClick login {JC_LOGIN:?}, Smartlink game {SL_GAME})",
        sandbox.url()
    );
    // The weather: a few outages, a throttle, a forged answer, a timeout, an unknown contact.
    let faults = sandbox.faults();
    faults.push(FaultRule::new(Fault::Status { status: 503 }, 3).provider("justclick"));
    faults.push(FaultRule::new(Fault::ForgeSignature, 1).provider("justclick"));
    faults.push(
        FaultRule::new(
            Fault::RateLimit {
                retry_after_secs: 1,
            },
            2,
        )
        .provider("smartlink"),
    );
    faults.push(FaultRule::new(Fault::Stall { ms: 2500 }, 1).provider("smartlink"));
    faults.push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 500,
                text: "Подписчик не найден (subscriber not found)".into(),
            },
            1,
        )
        .provider("justclick")
        .email("unknown.person@example.com"),
    );
    faults.set_delay(Duration::from_millis(5));

    let settings = demo_settings(&sandbox);
    let registry = Registry::from_settings(&settings)?;
    let worker = Worker::new(pool.clone(), settings, registry);
    let accounts: Vec<String> = ACCOUNTS.iter().map(|s| s.to_string()).collect();

    let progress = tokio::spawn(progress_line(pool.clone(), accounts.clone()));
    let waves = async {
        for (i, wave) in [first_wave(), second_wave()].into_iter().enumerate() {
            let mut conn = pool.acquire().await?;
            let ids = enqueue_batch(&mut conn, &wave).await?;
            drop(conn);
            eprintln!("\rwave {}: enqueued {} changes", i + 1, ids.len());
            settle(pool, &worker, &accounts).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let waves = waves.await;
    progress.abort();
    // (its connection back in the pool before the pool closes)
    let _ = progress.await;
    // (the claim's and the completion's sessions closed before the throwaway Postgres stops)
    worker.close().await;
    waves?;
    eprintln!();

    let counts = probes::counts_for(pool, &accounts).await?;
    let failed_attempts = probes::failed_attempts(pool, &accounts).await?;
    let doi = probes::doi_counts(pool, &accounts).await?;
    let dead: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, email, coalesce(last_error, '') FROM contact_sync.jobs WHERE account = ANY($1) AND state = 'dead' ORDER BY id",
    )
    .bind(&accounts)
    .fetch_all(pool)
    .await?;
    let summary = DemoSummary {
        counts,
        failed_attempts,
        provider_requests: sandbox.stats().requests,
        doi,
        dead,
        seconds: started.elapsed().as_secs_f64(),
    };
    print_summary(&summary, &sandbox);
    if !throwaway {
        for account in ACCOUNTS {
            repair::purge_account(pool, account, Some(&sl_key)).await?;
        }
    }
    sandbox.stop().await;
    Ok(summary)
}

/// Drains, then waits for scheduled retries, until nothing of the demo is pending.
async fn settle(pool: &sqlx::PgPool, worker: &Worker, accounts: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        worker.drain().await;
        match claim::next_due_in(pool, accounts).await? {
            None => return Ok(()),
            Some(wait) if Instant::now() < deadline => {
                tokio::time::sleep(wait.min(Duration::from_secs(2))).await
            }
            Some(_) => anyhow::bail!("the demo did not settle within two minutes"),
        }
    }
}

async fn progress_line(pool: sqlx::PgPool, accounts: Vec<String>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    loop {
        if let Ok(counts) = probes::counts_for(&pool, &accounts).await {
            let get = |s: &str| {
                counts
                    .iter()
                    .filter(|c| c.state.as_str() == s)
                    .map(|c| c.count)
                    .sum::<i64>()
            };
            let line = format!(
                "pending {:>4} | running {:>3} | succeeded {:>4} | coalesced {:>4} | dead {:>2}",
                get("pending"),
                get("running"),
                get("succeeded"),
                get("coalesced"),
                get("dead")
            );
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
        tokio::time::sleep(every).await;
    }
}

fn print_summary(s: &DemoSummary, sandbox: &Sandbox) {
    println!("\nSummary");
    let mut rows = Vec::new();
    for account in ACCOUNTS {
        let get = |state: &str| {
            s.counts
                .iter()
                .filter(|c| c.account == account && c.state.as_str() == state)
                .map(|c| c.count)
                .sum::<i64>()
                .to_string()
        };
        rows.push(vec![
            account.to_string(),
            get("succeeded"),
            get("coalesced"),
            get("dead"),
            get("pending"),
        ]);
    }
    print!(
        "{}",
        table::render(
            &["ACCOUNT", "SUCCEEDED", "COALESCED", "DEAD", "PENDING"],
            &rows
        )
    );
    let stats = sandbox.stats();
    println!(
        "\nProvider calls: {} (faults injected: {}, failed attempts retried or recorded: {}, most calls in flight for one contact: {})",
        s.provider_requests, stats.faults_injected, s.failed_attempts, stats.max_in_flight_per_contact
    );
    if !s.doi.is_empty() {
        let doi: Vec<String> = s.doi.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("Double opt-in: {}", doi.join(", "));
    }
    for (id, email, error) in &s.dead {
        println!("Dead job {id} ({email}): {error}");
    }
}
