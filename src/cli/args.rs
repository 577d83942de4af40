//! The command line's arguments (clap derive): every subcommand, its options and their help.

use clap::{Args, Parser, Subcommand};
use contact_sync::outbox::JobState;
use contact_sync::telemetry::LogFormat;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;

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
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List or inspect jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Provider accounts: limits, calls in flight, pauses (fleet-wide, stored in Postgres).
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Capture changes from the application's own tables (`[sources.*]` of the configuration).
    #[command(subcommand)]
    Capture(CaptureCommand),
    /// Sync a source's existing rows: queue what differs from what each account was last sent
    /// (resumable: a stopped backfill goes on where it stopped).
    Backfill(BackfillArgs),
    /// Serve the operator console in the browser (sign-in from [console.users]).
    Console(ConsoleArgs),
    /// Live worker replicas: id, host, accounts, start, last heartbeat.
    Workers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead or cancelled jobs back to pending: one by ID, or every job a filter matches
    /// (--dead, or --state with --account/--email/--error-like).
    Retry(RetryArgs),
    /// Cancel pending or dead jobs: one by ID, or every job a filter matches.
    Cancel(CancelArgs),
    /// Delete finished jobs (succeeded, coalesced, cancelled) older than an age, as retention
    /// does (a delivered job stays while an older dead or cancelled job of its contact does).
    Purge(PurgeArgs),
    /// The zero-setup demo: throwaway Postgres (unless DATABASE_URL), sandbox, sample changes.
    Demo,
    /// End-to-end benchmark; prints one JSON line.
    Bench(BenchArgs),
    /// Serve the JustClick and Smartlink simulators.
    Sandbox(SandboxArgs),
    /// The benchmark's calls-only process: COUNT signed calls through the configured accounts
    /// `bench_jc` and `bench_sl`, no database (`contact-sync bench` starts it).
    #[command(hide = true)]
    BenchCalls {
        /// How many calls to make.
        #[arg(long)]
        count: usize,
        /// Which provider's calls to make.
        #[arg(long, value_enum, default_value = "both")]
        provider: BenchProvider,
    },
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// A source of the configuration.
    pub source: String,
    /// Only this target account (repeatable; all of the source's by default).
    #[arg(long = "account", value_name = "NAME")]
    pub accounts: Vec<String>,
    /// Only rows for which this SQL condition over the row holds.
    #[arg(long = "where", value_name = "SQL")]
    pub condition: Option<String>,
    /// Count what would be queued, unchanged and rejected, show a few payloads; queue nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Queue nothing: record the rows as already sent (a provider that is already in step).
    #[arg(long, conflicts_with = "force")]
    pub baseline_only: bool,
    /// Queue every mapped field, whatever was sent before (a provider edited by hand).
    #[arg(long)]
    pub force: bool,
    /// Start from the first row, discarding an unfinished backfill of the source.
    #[arg(long)]
    pub restart: bool,
    /// Once every row is read, also send each target's on_delete to the contacts it was sent
    /// that are no longer rows of the source inside `where` (deleted, or gone out of it, while
    /// capture was off). Locks the table against writes while it compares.
    #[arg(long, conflicts_with_all = ["condition", "baseline_only"])]
    pub sync_deletes: bool,
    /// Rows per page (one short transaction each).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub page: i64,
    /// Wait before a page while the accounts have more pending jobs than this (live changes
    /// keep flowing).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_pending: i64,
    /// Print JSON (progress lines and the summary) instead of a progress bar and text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConsoleArgs {
    #[command(subcommand)]
    pub command: Option<ConsoleCommand>,
    /// Where to listen (default: console.listen, else 127.0.0.1:8090).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// No sign-in: anyone who reaches the address acts as an operator. Only on loopback.
    #[arg(long)]
    pub no_auth: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConsoleCommand {
    /// Print an Argon2 hash of a password (asked for without echo, or read from stdin) for
    /// `[console.users.NAME] password_hash`.
    HashPassword,
}

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Print the SQL that installs a source's triggers (all sources without SOURCE), to read
    /// or to put in your own migration tool; nothing is changed.
    Plan {
        /// A source of the configuration.
        source: Option<String>,
    },
    /// Install (or update) a source's triggers, as `plan` prints them (all sources without
    /// SOURCE). Idempotent.
    Install {
        /// A source of the configuration.
        source: Option<String>,
    },
    /// Check the installed triggers against the configuration and the table as it is now;
    /// exit 1 when something drifted (a mapped column renamed or dropped, a trigger missing or
    /// disabled, statements not captured).
    Verify {
        /// A source of the configuration.
        source: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a source's triggers, functions and record (jobs already queued stay).
    Uninstall {
        /// A source, configured or installed.
        source: String,
    },
    /// Rows whose change could not be queued, newest first, with the reason.
    Rejections {
        /// Only this source's.
        #[arg(long)]
        source: Option<String>,
        /// Ids below this one (the next page).
        #[arg(long, value_name = "ID")]
        before: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(0..=10_000))]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Every known account with its limits, calls in flight, pause and live workers.
    List {
        /// Print JSON instead of a table.
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
    /// Jobs, newest first (page on with --after the last id shown).
    List {
        /// Only jobs in this state.
        #[arg(long, value_parser = states(&["pending", "running", "succeeded", "coalesced", "dead", "cancelled"]))]
        state: Option<JobState>,
        /// Only this account's jobs.
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// Only this address's jobs (any case).
        #[arg(long, value_name = "ADDRESS")]
        email: Option<String>,
        /// Only jobs created at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only jobs with a smaller id (the next page after a list that ended at ID).
        #[arg(long, value_name = "ID")]
        after: Option<i64>,
        /// At most this many (0 to 10000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(0..=10_000))]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One job with its error history.
    Show {
        /// The job's id.
        id: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(
    override_usage = "contact-sync enqueue [--config <FILE>] --provider <PROVIDER> --account <ACCOUNT> --email <EMAIL> [--set <KEY=VALUE>]... [--payload <JSON>] [--idempotency-key <KEY>] [--run-at <TIME>] [--max-attempts <N>]\n       contact-sync enqueue [--config <FILE>] --file <FILE|->"
)]
pub struct EnqueueArgs {
    /// The provider: justclick or smartlink.
    #[arg(long, required_unless_present = "file", value_parser = ["justclick", "smartlink"])]
    pub provider: Option<String>,
    /// The account, as named in the workers' configuration ([accounts.NAME]).
    #[arg(long, required_unless_present = "file")]
    pub account: Option<String>,
    /// The contact's e-mail address.
    #[arg(long, required_unless_present = "file")]
    pub email: Option<String>,
    /// A payload field, KEY=VALUE (repeatable). Integers for subscribe, update_strategy and
    /// modify_ts; comma-separated lists for tags and preferences; attributes.NAME=VALUE for a
    /// Smartlink attribute (a number when VALUE is one, e.g. attributes.level=7; true/false;
    /// text otherwise, or a JSON string such as '"7"' to keep digits as text); text otherwise.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The payload as a JSON object (merged under --set).
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// A repeated key for the same account records nothing new (the existing job's id is
    /// printed).
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Not before this time: RFC 3339, e.g. 2026-11-23T18:00:00Z (default: now).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Attempts before the job goes dead (default: the worker's worker.max_attempts).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub max_attempts: Option<i32>,
    /// JSON Lines file (`-`: standard input), one change object per line with the fields
    /// provider, account, email, payload, idempotency_key, run_at, max_attempts. Bad lines are
    /// reported and skipped; good ones are queued.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["provider", "account", "email", "set", "payload", "idempotency_key", "run_at", "max_attempts"])]
    pub file: Option<PathBuf>,
}

/// Which jobs a bulk `retry` or `cancel` acts on.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only this account's jobs.
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// Only this address's jobs (any case).
    #[arg(long, value_name = "ADDRESS")]
    pub email: Option<String>,
    /// Only jobs whose last error contains TEXT (any case), e.g. --error-like "code 100".
    #[arg(long, value_name = "TEXT")]
    pub error_like: Option<String>,
    /// Only count what would be done.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (it is asked only on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "dead", "state"])))]
pub struct RetryArgs {
    /// The job to retry.
    #[arg(conflicts_with_all = ["dead", "state", "account", "email", "error_like", "dry_run"])]
    pub id: Option<i64>,
    /// Every dead job (the same as --state dead).
    #[arg(long, conflicts_with = "state")]
    pub dead: bool,
    /// Every job in this state.
    #[arg(long, value_parser = states(&["dead", "cancelled"]))]
    pub state: Option<JobState>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Retry even when a newer change of the same contact was already delivered (the old
    /// change then overwrites the newer one at the provider).
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "state"])))]
pub struct CancelArgs {
    /// The job to cancel.
    #[arg(conflicts_with_all = ["state", "account", "email", "error_like", "dry_run"])]
    pub id: Option<i64>,
    /// Every job in this state.
    #[arg(long, value_parser = states(&["pending", "dead"]))]
    pub state: Option<JobState>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Finished longer ago than this: 30d, 12h, 90m…
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: std::time::Duration,
    /// Only count what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (it is asked only on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// An age for `purge`: a duration of at most 100 years.
fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    let age = contact_sync::duration::parse(text)?;
    if age > std::time::Duration::from_secs(100 * 365 * 86_400) {
        return Err(format!("{text:?} is more than 100 years"));
    }
    Ok(age)
}

/// An RFC 3339 time, for `--run-at`.
pub fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| {
            format!("expected an RFC 3339 time such as 2026-11-23T18:00:00Z, got {text:?}")
        })
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Extra JustClick account, LOGIN:SECRET (repeatable).
    #[arg(long = "justclick", value_name = "LOGIN:SECRET")]
    pub justclick: Vec<String>,
    /// Extra Smartlink account, GAMEID:SECRET (repeatable).
    #[arg(long = "smartlink", value_name = "GAMEID:SECRET")]
    pub smartlink: Vec<String>,
    /// JustClick accounts create an unknown contact on its first update (the real service
    /// answers 500 "subscriber not found", as the sandbox does without this flag).
    #[arg(long)]
    pub create_missing: bool,
    /// Contacts that exist from the start: a JSON file with
    /// {"provider": "justclick", "account": LOGIN, "emails": [...]} or a list of those.
    #[arg(long, value_name = "FILE")]
    pub seed: Option<std::path::PathBuf>,
    /// Limit an account as its provider would: beyond RATE requests per second (bucket of
    /// BURST, default one second's worth) it answers 429 with Retry-After, or JustClick's
    /// code 8 with `:code8` (repeatable). E.g. justclick:shop=50/10.
    #[arg(long = "rate-limit", value_name = "PROVIDER:ACCOUNT=RATE[/BURST][:code8]", value_parser = contact_sync::sandbox::RateLimitRule::parse)]
    pub rate_limit: Vec<contact_sync::sandbox::RateLimitRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchProvider {
    Both,
    Justclick,
    Smartlink,
}

impl BenchProvider {
    /// As written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BenchProvider::Both => "both",
            BenchProvider::Justclick => "justclick",
            BenchProvider::Smartlink => "smartlink",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Backlog sizes, each enqueued then drained end to end (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![5_000usize, 20_000, 100_000, 1_000_000])]
    pub sizes: Vec<usize>,
    /// worker.concurrency of the worker process.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// worker.batch_size of the worker process.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Number of distinct contacts per backlog (fewer than its size forces coalescing).
    #[arg(long)]
    pub contacts: Option<usize>,
    /// Which provider's calls the jobs make.
    #[arg(long, value_enum, default_value = "both")]
    pub provider: BenchProvider,
    /// Use a running sandbox (`contact-sync sandbox`, demo credentials) instead of one in-process.
    #[arg(long)]
    pub sandbox_url: Option<String>,
    /// Blocked scenario: contacts whose head is scheduled an hour later (0 skips the scenario).
    #[arg(long, default_value_t = 1_000)]
    pub blocked_contacts: usize,
    /// Blocked scenario: changes queued behind each blocked head.
    #[arg(long, default_value_t = 50)]
    pub blocked_depth: usize,
    /// Blocked scenario: the backlog drained beside the blocked contacts.
    #[arg(long, default_value_t = 20_000)]
    pub blocked_jobs: usize,
    /// Single-job latency samples.
    #[arg(long, default_value_t = 200)]
    pub latency_samples: usize,
    /// Jobs drained before the measured runs, not measured: the workers' connections to
    /// Postgres and to the providers opened, as in a running deployment (0 skips it).
    #[arg(long, default_value_t = 2_048)]
    pub warmup: usize,
    /// Worker processes for the e2e runs (all on one database).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Rate scenario: one JustClick account limited to RATE calls/s (fleet-wide), drained by
    /// --workers processes; reports the rate the sandbox saw against this one.
    #[arg(long, value_name = "RATE")]
    pub rate: Option<f64>,
    /// Rate scenario: the account's burst (default: one second's worth).
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// Rate scenario: seconds of traffic at the configured rate.
    #[arg(long, default_value_t = 10, requires = "rate")]
    pub rate_seconds: u64,
    /// Calls-only scenario: this many signed calls from a worker-like process without a
    /// database, the least the worker needs per call (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    pub floor_calls: usize,
    /// Capture scenario: a table of this many rows, its writes timed without and with the
    /// generated triggers, then a resync of it (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub capture_rows: i64,
    /// Also print a readable table.
    #[arg(long)]
    pub pretty: bool,
}

/// A `--state` argument: one of `names` (listed by `--help` and in the error), as a [`JobState`].
fn states(
    names: &'static [&'static str],
) -> impl clap::builder::TypedValueParser<Value = JobState> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names)
        .try_map(|name| JobState::parse(&name).ok_or_else(|| format!("unknown state {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every option and argument of every command says what it is for.
    #[test]
    fn every_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "contact-sync", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
        Cli::command().debug_assert();
    }
}
