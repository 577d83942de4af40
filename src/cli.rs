//! The `contact-sync` command line (clap derive). Each subcommand calls one library function;
//! no SQL and no HTTP here.

use crate::config::Settings;
use crate::outbox::admin::{self, ActionResult, JobDetail, JobSummary, Status};
use crate::outbox::{self, NewJob};
use crate::providers::Registry;
use crate::sandbox::{Sandbox, SandboxAccounts};
use crate::table;
use crate::telemetry::LogFormat;
use crate::worker::{shutdown, Worker};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "contact-sync",
    version,
    about = "Keeps email-marketing providers in step with your contacts, through a Postgres outbox"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "CONTACT_SYNC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format (RUST_LOG sets the level).
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the embedded migrations (idempotent, safe to run concurrently).
    Migrate,
    /// Run the worker daemon.
    Run {
        /// Exit 0 once no job is runnable now.
        #[arg(long)]
        drain: bool,
        /// Apply migrations before starting.
        #[arg(long)]
        migrate: bool,
    },
    /// Record a change (or, with --file, many).
    Enqueue(EnqueueArgs),
    /// Counts per state and account, backlog, oldest runnable job, dead jobs.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List or inspect jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Provider accounts: limits, calls in flight, pauses (fleet-wide, stored in Postgres).
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Live worker replicas: id, host, accounts, start, last heartbeat.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Put a dead or cancelled job back to pending (or every dead job with --dead).
    Retry {
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<i64>,
        #[arg(long)]
        dead: bool,
        /// With --dead: only this account's.
        #[arg(long, requires = "dead")]
        account: Option<String>,
        /// Retry even when a newer change of the same contact was already delivered (the old
        /// change then overwrites the newer one at the provider).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a pending or dead job.
    Cancel {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// The zero-setup demo: throwaway Postgres (unless DATABASE_URL), sandbox, sample changes.
    Demo,
    /// End-to-end benchmark; prints one JSON line.
    Bench(crate::bench::BenchArgs),
    /// Serve the JustClick and Smartlink simulators.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: SocketAddr,
        /// Extra JustClick account, LOGIN:SECRET (repeatable).
        #[arg(long = "justclick", value_name = "LOGIN:SECRET")]
        justclick: Vec<String>,
        /// Extra Smartlink account, GAMEID:SECRET (repeatable).
        #[arg(long = "smartlink", value_name = "GAMEID:SECRET")]
        smartlink: Vec<String>,
        /// JustClick accounts create an unknown contact on its first update (the real service
        /// answers 500 "subscriber not found", as the sandbox does without this flag).
        #[arg(long)]
        create_missing: bool,
        /// Contacts that exist from the start: a JSON file with
        /// {"provider": "justclick", "account": LOGIN, "emails": [...]} or a list of those.
        #[arg(long, value_name = "FILE")]
        seed: Option<std::path::PathBuf>,
        /// Limit an account as its provider would: beyond RATE requests per second (bucket of
        /// BURST, default one second's worth) it answers 429 with Retry-After, or JustClick's
        /// code 8 with `:code8` (repeatable). E.g. justclick:shop=50/10.
        #[arg(long = "rate-limit", value_name = "PROVIDER:ACCOUNT=RATE[/BURST][:code8]", value_parser = crate::sandbox::RateLimitRule::parse)]
        rate_limit: Vec<crate::sandbox::RateLimitRule>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Every known account with its limits, calls in flight, pause and live workers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop every worker from claiming the account's jobs until `accounts resume` (jobs wait;
    /// calls already under way finish).
    Pause {
        /// The account, as named in the configuration.
        name: String,
        /// Shown in `status`, `accounts list` and the logs.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
    },
    /// End an operator's pause, or a provider's throttle pause early.
    Resume {
        /// The account, as named in the configuration.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One job with its error history.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[arg(long, required_unless_present = "file")]
    pub provider: Option<String>,
    #[arg(long, required_unless_present = "file")]
    pub account: Option<String>,
    #[arg(long, required_unless_present = "file")]
    pub email: Option<String>,
    /// A payload field, KEY=VALUE (repeatable). Integers for subscribe, update_strategy and
    /// modify_ts; comma-separated lists for tags and preferences; attributes.NAME=VALUE for a
    /// Smartlink attribute; text otherwise.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The payload as a JSON object (merged under --set).
    #[arg(long)]
    pub payload: Option<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// JSON Lines file, one change per line (fields: provider, account, email, payload,
    /// idempotency_key, run_at). Bad lines are reported and skipped; good ones are queued.
    #[arg(long, conflicts_with_all = ["provider", "account", "email", "set", "payload", "idempotency_key"])]
    pub file: Option<PathBuf>,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // A daemon handles SIGTERM from its first moment: before the configuration is read.
    let signals = match cli.command {
        Command::Run { .. } | Command::Sandbox { .. } => Some(shutdown::Shutdown::on_signals()),
        _ => None,
    };
    let settings = Settings::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Demo => {
            let url = settings
                .database
                .url
                .as_ref()
                .map(|u| u.expose().to_string());
            crate::demo::run(url).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let pretty = args.pretty;
            let url = settings
                .database
                .url
                .as_ref()
                .map(|u| u.expose().to_string());
            let result = crate::bench::run(args, url).await?;
            println!("{}", serde_json::to_string(&result)?);
            if pretty {
                print!("{}", crate::bench::render(&result));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let pool = connect(&settings).await?;
            let status = admin::status(&pool).await?;
            print!(
                "{}",
                if json {
                    to_json(&status)?
                } else {
                    render_status(&status)
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(AccountsCommand::List { json }) => {
            let pool = connect(&settings).await?;
            let rows = outbox::accounts::list(&pool).await?;
            print!(
                "{}",
                if json {
                    to_json(&rows)?
                } else {
                    render_accounts(&rows)
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(AccountsCommand::Pause { name, reason }) => {
            known_account(&settings, &name)?;
            let pool = connect(&settings).await?;
            outbox::accounts::pause(&pool, &name, &reason).await?;
            println!("{name}: paused for every worker (jobs wait; `contact-sync accounts resume {name}` ends it)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(AccountsCommand::Resume { name }) => {
            known_account(&settings, &name)?;
            let pool = connect(&settings).await?;
            if outbox::accounts::resume(&pool, &name).await? {
                println!("{name}: resumed");
            } else {
                println!("{name}: was not paused");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers { json } => {
            let pool = connect(&settings).await?;
            let rows = outbox::accounts::live_replicas(&pool).await?;
            print!(
                "{}",
                if json {
                    to_json(&rows)?
                } else {
                    render_workers(&rows)
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs(JobsCommand::List {
            state,
            account,
            email,
            limit,
            json,
        }) => {
            if let Some(s) = &state {
                if crate::outbox::JobState::parse(s).is_none() {
                    bail!("--state {s:?}: expected one of pending, running, succeeded, dead, cancelled, coalesced");
                }
            }
            let pool = connect(&settings).await?;
            let jobs = admin::list(
                &pool,
                &admin::ListFilter {
                    state,
                    account,
                    email,
                    limit,
                },
            )
            .await?;
            print!(
                "{}",
                if json {
                    to_json(&jobs)?
                } else {
                    render_jobs(&jobs)
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs(JobsCommand::Show { id, json }) => {
            let pool = connect(&settings).await?;
            match admin::show(&pool, id).await? {
                Some(job) => {
                    print!(
                        "{}",
                        if json {
                            to_json(&job)?
                        } else {
                            render_job(&job)
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("job {id} not found");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Retry {
            id,
            dead,
            account,
            force,
            json,
        } => {
            let pool = connect(&settings).await?;
            if dead {
                let done = admin::retry_dead(&pool, account.as_deref(), force).await?;
                if json {
                    print!("{}", to_json(&done)?);
                } else {
                    println!("{} dead job(s) back to pending", done.retried);
                    if done.skipped_stale > 0 {
                        println!(
                            "{} left dead: a newer change of the same contact was already delivered (use --force to re-send them anyway)",
                            done.skipped_stale
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let id = id.context("a job id or --dead is required")?;
            let result = admin::retry(&pool, id, force).await?;
            Ok(report_action(id, "retry", result, json)?)
        }
        Command::Cancel { id, json } => {
            let pool = connect(&settings).await?;
            let result = admin::cancel(&pool, id).await?;
            Ok(report_action(id, "cancel", result, json)?)
        }
        Command::Migrate => {
            let pool = connect(&settings).await?;
            crate::migrate(&pool).await?;
            println!(
                "migrations applied ({} known)",
                crate::MIGRATOR.iter().count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { drain, migrate } => {
            run_worker(settings, signals.unwrap_or_default(), drain, migrate).await
        }
        Command::Enqueue(args) => {
            let pool = connect(&settings).await?;
            match &args.file {
                Some(path) => enqueue_file(&pool, path).await,
                None => {
                    let job = job_from_args(&args)?;
                    let mut conn = pool.acquire().await?;
                    let id = outbox::enqueue(&mut conn, &job).await?;
                    println!("{id}");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Sandbox {
            listen,
            justclick,
            smartlink,
            create_missing,
            seed,
            rate_limit,
        } => {
            let seeds = match &seed {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading --seed {}", path.display()))?;
                    serde_json::from_str::<crate::sandbox::SeedFile>(&text)
                        .with_context(|| format!("--seed {}: expected {{\"provider\": \"justclick\", \"account\": LOGIN, \"emails\": [...]}} or a list of those", path.display()))?
                        .into_vec()
                }
                None => Vec::new(),
            };
            let mut accounts = SandboxAccounts::from_settings(&settings);
            if accounts.justclick.is_empty()
                && accounts.smartlink.is_empty()
                && justclick.is_empty()
                && smartlink.is_empty()
            {
                accounts = crate::demo::sandbox_accounts();
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
            signals.unwrap_or_default().graceful.cancelled().await;
            sandbox.stop().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A pool for this process's settings.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let url = settings.database_url()?;
    PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url.expose())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database: {}", redact_db_error(&e)))
}

/// sqlx errors do not carry the URL, but be explicit: only the error's own text.
fn redact_db_error(e: &sqlx::Error) -> String {
    crate::providers::outcome::error_chain(e)
}

async fn run_worker(
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
    // Wait for the database at start (a daemon may start before Postgres).
    let url = settings.database_url()?.clone();
    let options = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(10));
    let pool = options
        .connect_lazy(url.expose())
        .map_err(|e| anyhow::anyhow!("bad database URL: {}", redact_db_error(&e)))?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let ready = async {
            if migrate {
                crate::migrate(&pool).await.map_err(anyhow::Error::from)?;
            }
            crate::migrate::is_current(&pool)
                .await
                .map_err(anyhow::Error::from)
        };
        match ready.await {
            Ok(true) => break,
            Ok(false) => bail!("the database schema is not current: run `contact-sync migrate` (or `run --migrate`)"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "database not ready");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return Ok(ExitCode::SUCCESS),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let admin = crate::admin::spawn(&settings, pool.clone(), stop.clone()).await?;
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
    pool.close().await;
    tracing::info!(?report, "exiting");
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

/// Builds a job from `--provider/--account/--email/--set/--payload`.
pub fn job_from_args(args: &EnqueueArgs) -> anyhow::Result<NewJob> {
    // --payload alone is stored as written (numbers exactly as typed); --set edits a JSON value
    let exact = match (&args.payload, args.set.is_empty()) {
        (Some(text), true) => Some(text.clone()),
        _ => None,
    };
    let mut payload = match &args.payload {
        Some(text) => match serde_json::from_str::<Value>(text).context("--payload is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--payload must be a JSON object"),
        },
        None => Map::new(),
    };
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--set {pair:?}: expected KEY=VALUE"))?;
        set_field(&mut payload, key, value)?;
    }
    let mut job = NewJob::new(
        args.provider.clone().unwrap_or_default(),
        args.account.clone().unwrap_or_default(),
        args.email.clone().unwrap_or_default(),
        Value::Object(payload),
    );
    job.idempotency_key = args.idempotency_key.clone();
    job.payload_json = exact;
    Ok(job)
}

fn set_field(payload: &mut Map<String, Value>, key: &str, value: &str) -> anyhow::Result<()> {
    if let Some(name) = key.strip_prefix("attributes.") {
        let attrs = payload
            .entry("attributes")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(attrs) = attrs else {
            bail!("attributes is not an object")
        };
        attrs.insert(name.to_string(), Value::String(value.to_string()));
        return Ok(());
    }
    let typed = match key {
        "subscribe" | "update_strategy" | "modify_ts" => Value::from(
            value
                .trim()
                .parse::<i64>()
                .with_context(|| format!("--set {key}: {value:?} is not an integer"))?,
        ),
        "tags" | "preferences" => Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        _ => Value::String(value.to_string()),
    };
    payload.insert(key.to_string(), typed);
    Ok(())
}

/// The payload of a bulk line as written.
#[derive(serde::Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow, default)]
    payload: Option<&'a serde_json::value::RawValue>,
}

/// Lines per batch statement in bulk loads.
const FILE_BATCH: usize = 1000;

/// Bulk load from JSON Lines: bad lines are reported on stderr and skipped, good ones queued.
/// Exit code 0 when every line was queued, 1 when some were rejected.
async fn enqueue_file(pool: &PgPool, path: &Path) -> anyhow::Result<ExitCode> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let mut rejected = 0usize;
    let mut queued = 0usize;
    let mut batch: Vec<(usize, NewJob)> = Vec::with_capacity(FILE_BATCH);
    let lines = bytes.split(|b| *b == b'\n');
    for (index, raw) in lines.enumerate() {
        let line_no = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let job = std::str::from_utf8(raw)
            .map_err(|_| "not valid UTF-8".to_string())
            .and_then(|text| {
                let mut job = serde_json::from_str::<NewJob>(text)
                    .map_err(|e| format!("not a change object: {e}"))?;
                // keep the payload's text: the database stores and checks numbers as written
                job.payload_json = serde_json::from_str::<RawPayload>(text)
                    .ok()
                    .and_then(|raw| raw.payload)
                    .map(|p| p.get().to_string());
                Ok(job)
            });
        match job {
            Ok(job) => batch.push((line_no, job)),
            Err(e) => {
                rejected += 1;
                eprintln!("line {line_no}: {e}");
            }
        }
        if batch.len() >= FILE_BATCH {
            let (q, r) = load_batch(pool, std::mem::take(&mut batch)).await?;
            queued += q;
            rejected += r;
        }
    }
    let (q, r) = load_batch(pool, batch).await?;
    queued += q;
    rejected += r;
    println!("queued {queued}, rejected {rejected}");
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One statement for the whole batch; if the database rejects one line, each line goes on its
/// own so the good ones still land. Returns (queued, rejected).
async fn load_batch(pool: &PgPool, batch: Vec<(usize, NewJob)>) -> anyhow::Result<(usize, usize)> {
    if batch.is_empty() {
        return Ok((0, 0));
    }
    let jobs: Vec<NewJob> = batch.iter().map(|(_, j)| j.clone()).collect();
    let mut conn = pool.acquire().await?;
    match outbox::enqueue_batch(&mut conn, &jobs).await {
        Ok(ids) => return Ok((ids.len(), 0)),
        Err(e) if e.is_invalid() => {}
        Err(e) => return Err(e.into()),
    }
    let (mut queued, mut rejected) = (0, 0);
    for (line_no, job) in &batch {
        match outbox::enqueue(&mut conn, job).await {
            Ok(_) => queued += 1,
            Err(e) if e.is_invalid() => {
                rejected += 1;
                eprintln!("line {line_no}: {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((queued, rejected))
}

fn to_json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(value)?))
}

fn report_action(
    id: i64,
    verb: &str,
    (result, state): (ActionResult, Option<String>),
    json: bool,
) -> anyhow::Result<ExitCode> {
    let state = state.unwrap_or_default();
    if json {
        print!(
            "{}",
            to_json(&serde_json::json!({"id": id, "result": result, "state": state}))?
        );
    } else {
        match result {
            ActionResult::Done => println!("job {id}: {state}"),
            ActionResult::NotFound => eprintln!("job {id} not found"),
            ActionResult::WrongState => eprintln!("job {id} is {state}: cannot {verb} it"),
            ActionResult::Stale => eprintln!(
                "job {id} not retried: job {state}, a newer change of the same contact, was already delivered (or is being delivered); \
                 retrying would overwrite it at the provider with older data. Use --force to re-send it anyway"
            ),
        }
    }
    Ok(match result {
        ActionResult::Done => ExitCode::SUCCESS,
        ActionResult::NotFound => ExitCode::from(2),
        ActionResult::WrongState | ActionResult::Stale => ExitCode::from(3),
    })
}

fn ts(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `status` as tables.
pub fn render_status(status: &Status) -> String {
    use std::collections::BTreeMap;
    let mut by_account: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for c in &status.counts {
        by_account
            .entry(c.account.as_str())
            .or_default()
            .insert(c.state.as_str(), c.count);
    }
    let states = [
        "pending",
        "running",
        "succeeded",
        "coalesced",
        "dead",
        "cancelled",
    ];
    let rows: Vec<Vec<String>> = by_account
        .iter()
        .map(|(account, counts)| {
            let mut row = vec![account.to_string()];
            row.extend(
                states
                    .iter()
                    .map(|s| counts.get(s).copied().unwrap_or(0).to_string()),
            );
            row
        })
        .collect();
    let mut out = table::render(
        &[
            "ACCOUNT",
            "PENDING",
            "RUNNING",
            "SUCCEEDED",
            "COALESCED",
            "DEAD",
            "CANCELLED",
        ],
        &rows,
    );
    if !status.backlog.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = status
            .backlog
            .iter()
            .map(|b| {
                vec![
                    b.account.clone(),
                    b.runnable.to_string(),
                    b.scheduled.to_string(),
                    b.oldest_runnable_age_s
                        .map(|s| format!("{s:.1}s"))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &["ACCOUNT", "RUNNABLE", "SCHEDULED", "OLDEST RUNNABLE"],
            &rows,
        ));
    }
    if !status.accounts.is_empty() {
        out.push('\n');
        out.push_str(&render_accounts(&status.accounts));
    }
    out.push_str(&format!("\ndead jobs: {}\n", status.dead));
    out
}

/// Refuses an account name the configuration does not have, listing those it has.
fn known_account(settings: &Settings, name: &str) -> anyhow::Result<()> {
    if settings.accounts.contains_key(name) {
        return Ok(());
    }
    let known: Vec<&str> = settings.accounts.keys().map(String::as_str).collect();
    if known.is_empty() {
        bail!("unknown account {name:?}: the configuration has no [accounts] (pass --config)");
    }
    bail!(
        "unknown account {name:?}: the configuration has {}",
        known.join(", ")
    )
}

/// `accounts list` (and the accounts part of `status`) as a table.
pub fn render_accounts(rows: &[outbox::accounts::AccountRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|a| {
            let rate = match (a.rate_per_second, a.burst) {
                (Some(r), Some(b)) => format!("{r}/s burst {b}"),
                (Some(r), None) => format!("{r}/s"),
                _ => "-".into(),
            };
            let state = if let Some(at) = &a.paused_at {
                format!(
                    "paused since {} ({})",
                    ts(at),
                    a.pause_reason.as_deref().unwrap_or("")
                )
            } else if let Some(until) = &a.throttled_until {
                format!(
                    "throttled until {} ({})",
                    ts(until),
                    a.throttle_reason.as_deref().unwrap_or("")
                )
            } else if a.workers == 0 {
                "no live worker serves it".into()
            } else {
                "active".into()
            };
            vec![
                a.account.clone(),
                a.provider.clone().unwrap_or_else(|| "-".into()),
                rate,
                a.max_in_flight
                    .map_or_else(|| "-".into(), |m| m.to_string()),
                a.in_flight.to_string(),
                a.workers.to_string(),
                state,
            ]
        })
        .collect();
    table::render(
        &[
            "ACCOUNT",
            "PROVIDER",
            "RATE",
            "MAX IN FLIGHT",
            "IN FLIGHT",
            "WORKERS",
            "STATE",
        ],
        &rows,
    )
}

/// `workers` as a table.
pub fn render_workers(rows: &[outbox::accounts::ReplicaRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.host.clone(),
                w.pid.to_string(),
                w.accounts.join(","),
                w.concurrency.to_string(),
                ts(&w.started_at),
                ts(&w.heartbeat_at),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "HOST",
            "PID",
            "ACCOUNTS",
            "CONCURRENCY",
            "STARTED",
            "LAST HEARTBEAT",
        ],
        &rows,
    )
}

/// `jobs list` as a table.
pub fn render_jobs(jobs: &[JobSummary]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.provider.clone(),
                j.account.clone(),
                j.email.clone(),
                j.state.clone(),
                j.attempts.to_string(),
                ts(&j.run_at),
                j.last_error
                    .as_deref()
                    .map(|e| e.chars().take(60).collect())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "PROVIDER",
            "ACCOUNT",
            "EMAIL",
            "STATE",
            "ATTEMPTS",
            "RUN AT",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// `jobs show` as a key/value block and the error history.
pub fn render_job(j: &JobDetail) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows = vec![
        vec!["id".into(), j.id.to_string()],
        vec!["provider".into(), j.provider.clone()],
        vec!["account".into(), j.account.clone()],
        vec!["email".into(), j.email.clone()],
        vec!["state".into(), j.state.clone()],
        vec![
            "attempts".into(),
            format!(
                "{}{}",
                j.attempts,
                j.max_attempts
                    .map(|m| format!(" of {m}"))
                    .unwrap_or_default()
            ),
        ],
        vec!["run at".into(), ts(&j.run_at)],
        vec!["created at".into(), ts(&j.created_at)],
        vec![
            "finished at".into(),
            j.finished_at.as_ref().map(ts).unwrap_or_else(|| "-".into()),
        ],
        vec!["locked by".into(), opt(&j.locked_by)],
        vec!["idempotency key".into(), opt(&j.idempotency_key)],
        vec![
            "coalesced into".into(),
            j.coalesced_into
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
        ],
        vec!["double opt-in".into(), opt(&j.doi)],
        vec!["payload".into(), j.payload.to_string()],
        vec!["last error".into(), opt(&j.last_error)],
    ];
    let mut out = table::render(&["FIELD", "VALUE"], &rows);
    let history: Vec<Vec<String>> = j
        .errors
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    let text = |k: &str| {
                        e.get(k)
                            .map(|v| {
                                v.as_str()
                                    .map(String::from)
                                    .unwrap_or_else(|| v.to_string())
                            })
                            .unwrap_or_default()
                    };
                    vec![
                        text("attempt"),
                        text("at"),
                        text("kind"),
                        text("code").replace("null", "-"),
                        text("error"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !history.is_empty() {
        out.push_str("\nerror history\n");
        out.push_str(&table::render(
            &["ATTEMPT", "AT", "KIND", "CODE", "ERROR"],
            &history,
        ));
    }
    out
}
