//! `run` (the worker daemon) and `sandbox` (the provider simulators as a server): the two
//! long-running commands, which handle SIGTERM/SIGINT from their first moment.

use super::args::SandboxArgs;
use anyhow::{bail, Context};
use contact_sync::config::Settings;
use contact_sync::providers::Registry;
use contact_sync::sandbox::{Sandbox, SandboxAccounts};
use contact_sync::worker::{shutdown, Worker};
use sqlx::postgres::PgPoolOptions;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run_worker(
    settings: Settings,
    signals: shutdown::Shutdown,
    drain: bool,
    migrate: bool,
) -> anyhow::Result<ExitCode> {
    let registry = Registry::from_settings(&settings)?;
    if registry.is_empty() {
        tracing::warn!(
            "no [accounts] configured: jobs will wait until configuration names their account"
        );
    }
    let stop = signals.graceful.clone();
    let (options, target) = super::connect_options(&settings)?;
    // which worker a session is, in pg_stat_activity
    let options = options.application_name(&worker_application_name(std::process::id()));
    // No worker statement waits without bound for a lock an outsider holds (an operator's open
    // transaction): the statements that meet such rows skip them; this is the backstop. No
    // worker statement is compiled (JIT): each reads a batch's rows through indexes, and the
    // cost estimates that grow with the table set compilation off at about 65 ms a statement
    // (the rescuer's, every housekeeping tick, beside a million queued jobs).
    let options = options.options([("lock_timeout", WORKER_LOCK_TIMEOUT), ("jit", "off")]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options.clone());
    // Every series from the start, and liveness while the database is still down.
    let accounts: Vec<(&str, &str)> = settings
        .accounts
        .iter()
        .map(|(name, a)| (a.provider.as_str(), name.as_str()))
        .collect();
    let admin = contact_sync::admin::spawn(&settings, pool.clone(), stop.clone()).await?;
    let console = spawn_console(&settings, pool.clone(), stop.clone()).await?;
    // (after the admin endpoint installed the recorder)
    contact_sync::metrics::register_accounts(&accounts);
    // Wait for the database at start (a daemon may start before Postgres).
    let mut backoff = Duration::from_millis(200);
    loop {
        let ready = async {
            if migrate {
                contact_sync::migrate(&pool)
                    .await
                    .map_err(anyhow::Error::from)?;
            }
            contact_sync::migrate::is_current(&pool)
                .await
                .map_err(anyhow::Error::from)
        };
        match ready.await {
            Ok(true) => break,
            Ok(false) => {
                stop.cancel();
                bail!("the database {target} has no contact-sync schema, or an older one: run `contact-sync migrate` (or `run --migrate`)")
            }
            Err(e) => {
                // the pool only says it timed out: one direct connection says why
                let cause = super::probe(&options)
                    .await
                    .unwrap_or_else(|| e.to_string());
                tracing::warn!(database = %target, error = %cause, retry_in_ms = backoff.as_millis() as u64, "database not ready; waiting for it");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return Ok(ExitCode::SUCCESS),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let foreign_keys = contact_sync::migrate::foreign_keys_to_jobs(&pool).await?;
    if !foreign_keys.is_empty() {
        stop.cancel();
        bail!(
            "foreign keys reference contact_sync.jobs ({}): a delivered job's row leaves that table, so every completion would fail; drop them and keep job ids as plain bigint columns",
            foreign_keys.join(", ")
        )
    }
    let worker = Worker::new(pool.clone(), settings, registry);
    let report = if drain {
        worker.drain_until(signals.clone()).await
    } else {
        worker.run(signals.clone()).await
    };
    // A drain succeeds only if none of its own claims is left `running`.
    let held = if drain {
        Some(worker.held_claims().await)
    } else {
        None
    };
    stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    if let Some(console) = console {
        let _ = console.await;
    }
    worker.close().await;
    pool.close().await;
    tracing::info!(
        claimed = report.claimed,
        succeeded = report.succeeded,
        coalesced = report.coalesced,
        retried = report.retried,
        dead = report.dead,
        lease_lost = report.lease_lost,
        "exiting"
    );
    match held {
        Some(Ok(0)) | None => Ok(ExitCode::SUCCESS),
        Some(Ok(n)) => {
            eprintln!("error: {n} job(s) claimed by this worker are still `running` (their outcome could not be recorded); they return to the queue when their lease expires");
            Ok(ExitCode::from(1))
        }
        Some(Err(e)) => {
            eprintln!("error: cannot check that this worker's claims were all recorded: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The longest a worker's statement waits for a row lock before it fails (and is tried again).
pub const WORKER_LOCK_TIMEOUT: &str = "5s";

/// The `application_name` of a worker process's sessions (`pg_stat_activity`).
pub fn worker_application_name(pid: u32) -> String {
    format!("contact-sync worker {pid}")
}

/// `sandbox`: serves the simulators until a signal.
pub async fn serve_sandbox(
    args: SandboxArgs,
    settings: &Settings,
    signals: shutdown::Shutdown,
) -> anyhow::Result<ExitCode> {
    let SandboxArgs {
        listen,
        justclick,
        smartlink,
        create_missing,
        seed,
        rate_limit,
    } = args;

    let seeds = match &seed {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --seed {}", path.display()))?;
            serde_json::from_str::<contact_sync::sandbox::SeedFile>(&text)
                .with_context(|| format!("--seed {}: expected {{\"provider\": \"justclick\", \"account\": LOGIN, \"emails\": [...]}} or a list of those", path.display()))?
                .into_vec()
        }
        None => Vec::new(),
    };
    let mut accounts = SandboxAccounts::from_settings(settings);
    if accounts.justclick.is_empty()
        && accounts.smartlink.is_empty()
        && justclick.is_empty()
        && smartlink.is_empty()
    {
        accounts = super::demo::sandbox_accounts();
        // strict like the real service unless --create-missing
        accounts.create_missing.clear();
    }
    for pair in &justclick {
        let (login, secret) = pair
            .split_once(':')
            .context("--justclick takes LOGIN:SECRET")?;
        accounts = accounts.with_justclick(login, secret);
    }
    for pair in &smartlink {
        let (game, secret) = pair
            .split_once(':')
            .context("--smartlink takes GAMEID:SECRET")?;
        accounts = accounts.with_smartlink(game, secret);
    }
    if create_missing {
        accounts = accounts.create_missing_contacts();
    }
    let logins: Vec<_> = accounts.justclick.keys().cloned().collect();
    let games: Vec<_> = accounts.smartlink.keys().cloned().collect();
    let sandbox = Sandbox::start(listen, accounts)
        .await
        .with_context(|| format!("binding {listen}"))?;
    for rule in rate_limit {
        println!(
            "  {} {}: at most {}/s (burst {}), then {:?}",
            rule.provider,
            rule.account,
            rule.rate,
            rule.burst.unwrap_or_else(|| rule.rate.ceil().max(1.0)),
            rule.answer
        );
        sandbox.rate_limit(rule);
    }
    for s in &seeds {
        let created = sandbox.seed(&s.provider, &s.account, &s.emails);
        println!(
            "  seeded {created} {} contact(s) of {}",
            s.provider, s.account
        );
    }
    println!("sandbox listening on {}", sandbox.url());
    for login in logins {
        println!(
            "  justclick {login}: base_url = \"{}\"",
            sandbox.justclick_base_url(&login)
        );
    }
    for game in games {
        println!(
            "  smartlink {game}: base_url = \"{}\"",
            sandbox.smartlink_base_url()
        );
    }
    signals.graceful.cancelled().await;
    sandbox.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Serves the console beside the worker when `console.listen` is set (with sign-in).
async fn spawn_console(
    settings: &Settings,
    pool: sqlx::PgPool,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if settings.console.listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(&settings.console.listen)
        .await
        .map_err(|e| anyhow::anyhow!("console.listen {}: {e}", settings.console.listen))?;
    let addr = listener.local_addr()?;
    let access = contact_sync::console::Access::SignIn;
    let router = contact_sync::console::router(pool, settings.console.clone(), access, addr)?;
    tracing::info!(%addr, "serving the console");
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = contact_sync::console::serve(listener, router, stop).await {
            tracing::error!(error = %e, "the console stopped");
        }
    })))
}
