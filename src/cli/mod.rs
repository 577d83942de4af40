//! The `contact-sync` command line: the binary's own code, not the library's surface. Each
//! subcommand calls library functions; no SQL and no HTTP here.
//!
//! - [`args`]: every subcommand and option (clap derive);
//! - [`daemon`]: `run` and `sandbox`, the long-running commands;
//! - [`enqueue`], [`jobs`], [`accounts`]: the operator commands by group;
//! - [`console`]: the operator console in the browser;
//! - [`render`] and [`table`]: how they print;
//! - [`demo`] and [`bench`]: the zero-setup demo and the benchmark.

pub mod accounts;
pub mod args;
pub mod bench;
pub mod capture;
pub mod console;
pub mod daemon;
pub mod demo;
pub mod enqueue;
pub mod jobs;
pub mod render;
pub mod table;

pub use args::{Cli, Command};

use anyhow::{anyhow, bail};
use contact_sync::config::Settings;
use contact_sync::outbox::inspect;
use contact_sync::worker::shutdown;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // A daemon handles SIGTERM from its first moment: before the configuration is read. So does
    // the bench, whose worker processes are stopped (SIGSTOP) between its runs: it ends them.
    let signals = match cli.command {
        Command::Run { .. } | Command::Sandbox(_) | Command::Bench(_) | Command::Console(_) => {
            Some(shutdown::Shutdown::on_signals())
        }
        _ => None,
    };
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo => {
            demo::run(database_url(&settings)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let pretty = args.pretty;
            let interrupted = signals.map(|s| s.graceful).unwrap_or_default();
            // dropping the run ends its worker processes, its throwaway Postgres and its
            // configuration file
            let result = tokio::select! {
                result = bench::run(args, database_url(&settings)) => result?,
                () = interrupted.cancelled() => bail!("interrupted: the bench's worker processes were ended"),
            };
            println!("{}", serde_json::to_string(&result)?);
            if pretty {
                print!("{}", bench::render(&result));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchCalls { count, provider } => {
            bench::calls_only(&settings, count, provider).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let pool = connect(&settings).await?;
            let status = inspect::status(&pool).await?;
            render::print_as(&status, json, render::render_status)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(command) => accounts::run(command, &settings).await,
        Command::Capture(command) => capture::run(command, &settings).await,
        Command::Backfill(args) => capture::backfill(args, &settings).await,
        Command::Workers { json } => accounts::workers(&settings, json).await,
        Command::Console(args) => console::run(args, &settings, signals.unwrap_or_default()).await,
        Command::Jobs(command) => jobs::run(command, &settings).await,
        Command::Retry(args) => jobs::retry(&settings, args).await,
        Command::Cancel(args) => jobs::cancel(&settings, args).await,
        Command::Purge(args) => jobs::purge(&settings, args).await,
        Command::Migrate => {
            let (pool, _) = connect_to(&settings).await?;
            contact_sync::migrate(&pool).await?;
            println!(
                "migrations applied ({} known)",
                contact_sync::MIGRATOR.iter().count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { drain, migrate } => {
            daemon::run_worker(settings, signals.unwrap_or_default(), drain, migrate).await
        }
        Command::Enqueue(args) => enqueue::run(args, &settings).await,
        Command::Sandbox(args) => {
            daemon::serve_sandbox(args, &settings, signals.unwrap_or_default()).await
        }
    }
}

fn database_url(settings: &Settings) -> Option<String> {
    settings
        .database
        .url
        .as_ref()
        .map(|u| u.expose().to_string())
}

/// How long a command waits for the database before saying why it cannot reach it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool for an operator command, on a database whose schema is current: otherwise an error
/// that names the database (host:port/name, never the password), the cause, and what to do.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let (pool, target) = connect_to(settings).await?;
    match contact_sync::migrate::is_current(&pool).await {
        Ok(true) => Ok(pool),
        Ok(false) => bail!(
            "the database {target} has no contact-sync schema, or an older one: run `contact-sync migrate`"
        ),
        Err(e) => bail!("cannot read the schema version of {target}: {}", redact_db_error(&e)),
    }
}

/// A pool, after one direct connection has shown the database answers: its error says why
/// (refused, authentication, no such database), where a pool would only time out.
pub async fn connect_to(settings: &Settings) -> anyhow::Result<(PgPool, String)> {
    let (options, target) = connect_options(settings)?;
    if let Some(cause) = probe(&options).await {
        bail!("cannot connect to the database at {target}: {cause}");
    }
    let pool = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    Ok((pool, target))
}

/// The database's connection options, and how errors name it: `host:port/name` (never the
/// password).
pub fn connect_options(settings: &Settings) -> anyhow::Result<(PgConnectOptions, String)> {
    let url = settings.database_url()?;
    // (checked first: a mistyped URL could otherwise be read as a host or database name that
    // holds the password, and be shown)
    if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
        bail!("DATABASE_URL must start with postgres:// or postgresql:// (e.g. postgres://USER:PASSWORD@HOST:5432/DATABASE)");
    }
    let options: PgConnectOptions = url.expose().parse().map_err(|e: sqlx::Error| {
        anyhow!(
            "DATABASE_URL is not a PostgreSQL URL ({}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
            redact_db_error(&e)
        )
    })?;
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    );
    Ok((options, target))
}

/// One direct connection: `None` if the database answers, else why not, in an operator's
/// words (a pool only says it timed out).
pub async fn probe(options: &PgConnectOptions) -> Option<String> {
    use sqlx::Connection;
    match tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(options)).await {
        Err(_) => Some(format!(
            "no answer within {} s (is the host reachable, and is the port right?)",
            CONNECT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Some(connect_cause(&e, options)),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            None
        }
    }
}

/// Why a connection failed, in an operator's words.
fn connect_cause(e: &sqlx::Error, options: &PgConnectOptions) -> String {
    if let sqlx::Error::Io(io) = e {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is PostgreSQL running and listening there?)".into()
            }
            std::io::ErrorKind::NotFound => {
                "no such socket or host (is PostgreSQL running, and the host right?)".into()
            }
            _ => redact_db_error(e),
        };
    }
    if let sqlx::Error::Database(db) = e {
        match db.code().as_deref() {
            Some("28P01") | Some("28000") => {
                return format!(
                "authentication failed for user {:?} (check the user and password in DATABASE_URL)",
                options.get_username()
            )
            }
            Some("3D000") => {
                return format!(
                    "database {:?} does not exist (create it, or fix the name in DATABASE_URL)",
                    options.get_database().unwrap_or(options.get_username())
                )
            }
            _ => {}
        }
    }
    if let sqlx::Error::Configuration(_) = e {
        return format!("{} (check DATABASE_URL)", redact_db_error(e));
    }
    redact_db_error(e)
}

/// sqlx errors do not carry the URL, but be explicit: only the error's own text.
pub fn redact_db_error(e: &sqlx::Error) -> String {
    contact_sync::text::error_chain(e)
}
