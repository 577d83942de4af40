//! `jobs list|show`, `retry` and `cancel`: the operator's view of single jobs and their fixes.

use super::args::{CancelArgs, FilterArgs, JobsCommand, PurgeArgs, RetryArgs};
use super::render::{print_as, render_job, render_jobs, to_json};
use anyhow::Context;
use contact_sync::config::Settings;
use contact_sync::outbox::repair::ActionResult;
use contact_sync::outbox::JobState;
use contact_sync::outbox::{inspect, repair};
use std::process::ExitCode;

pub async fn run(command: JobsCommand, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::List {
            state,
            account,
            email,
            since,
            after,
            limit,
            json,
        } => {
            let pool = super::connect(settings).await?;
            let jobs = inspect::list(
                &pool,
                &inspect::ListFilter {
                    state,
                    account,
                    email,
                    since,
                    after,
                    limit,
                },
            )
            .await?;
            print_as(&jobs, json, |v| render_jobs(v))?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { id, json } => {
            let pool = super::connect(settings).await?;
            match inspect::show(&pool, id).await? {
                Some(job) => {
                    print_as(&job, json, render_job)?;
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("job {id} not found");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

/// `retry ID`, or `retry --dead|--state S [filters]`.
pub async fn retry(settings: &Settings, args: RetryArgs) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    let Some(state) = args.state.or(args.dead.then_some(JobState::Dead)) else {
        let id = args.id.context("a job id, --dead or --state is required")?;
        let result = repair::retry(&pool, id, args.force).await?;
        return report_action(id, "retry", result, args.json);
    };
    let filter = job_filter(state, &args.filter);
    let would = repair::retry_matching(&pool, &filter, args.force, true).await?;
    let done = if args.filter.dry_run {
        would
    } else if would.retried > 0
        && !confirmed(
            args.filter.yes,
            &format!("retry {} {} job(s)", would.retried, filter.state),
        )?
    {
        println!("nothing done");
        return Ok(ExitCode::SUCCESS);
    } else {
        repair::retry_matching(&pool, &filter, args.force, false).await?
    };
    if args.json {
        print!(
            "{}",
            to_json(&serde_json::json!({
                "dry_run": args.filter.dry_run,
                "retried": done.retried,
                "skipped_stale": done.skipped_stale,
                "skipped_busy": done.skipped_busy,
            }))?
        );
    } else {
        let verb = if args.filter.dry_run {
            "would go back to pending"
        } else {
            "back to pending"
        };
        println!("{} {} job(s) {verb}", done.retried, filter.state);
        if done.skipped_stale > 0 {
            println!(
                "{} left {}: a newer change of the same contact was already delivered (use --force to re-send them anyway)",
                done.skipped_stale, filter.state
            );
        }
        report_busy(&done.skipped_busy, "retry");
    }
    Ok(busy_exit(&done.skipped_busy))
}

/// `cancel ID`, or `cancel --state S [filters]`.
pub async fn cancel(settings: &Settings, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    let Some(state) = args.state else {
        let id = args.id.context("a job id or --state is required")?;
        let result = repair::cancel(&pool, id).await?;
        return report_action(id, "cancel", result, args.json);
    };
    let filter = job_filter(state, &args.filter);
    let would = repair::cancel_matching(&pool, &filter, true).await?;
    let done = if args.filter.dry_run {
        would
    } else if would.cancelled > 0
        && !confirmed(
            args.filter.yes,
            &format!("cancel {} {} job(s)", would.cancelled, filter.state),
        )?
    {
        println!("nothing done");
        return Ok(ExitCode::SUCCESS);
    } else {
        repair::cancel_matching(&pool, &filter, false).await?
    };
    let n = done.cancelled;
    if args.json {
        print!(
            "{}",
            to_json(&serde_json::json!({
                "dry_run": args.filter.dry_run,
                "cancelled": n,
                "skipped_busy": done.skipped_busy,
            }))?
        );
    } else if args.filter.dry_run {
        println!("{n} {} job(s) would be cancelled", filter.state);
    } else {
        println!("{n} {} job(s) cancelled", filter.state);
        report_busy(&done.skipped_busy, "cancel");
    }
    Ok(busy_exit(&done.skipped_busy))
}

/// Says which contacts a bulk action left alone because another transaction held them.
fn report_busy(contacts: &[String], verb: &str) {
    if contacts.is_empty() {
        return;
    }
    eprintln!(
        "{} contact(s) left as they were: another transaction holds them (an application's open transaction recording a change of them, or an operator's); run the {verb} again once it has ended:",
        contacts.len()
    );
    for c in contacts.iter().take(20) {
        eprintln!("  {c}");
    }
    if contacts.len() > 20 {
        eprintln!("  … and {} more", contacts.len() - 20);
    }
}

/// Exit 4 when a bulk action left contacts alone (held by another transaction).
fn busy_exit(contacts: &[String]) -> ExitCode {
    if contacts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    }
}

/// `purge --older-than AGE`: finished jobs, in batches, as retention deletes them.
pub async fn purge(settings: &Settings, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    let age = contact_sync::duration::format(args.older_than);
    let would = contact_sync::outbox::prune::count_prunable(&pool, args.older_than).await?;
    if args.dry_run {
        println!("{would} finished job(s) older than {age} would be deleted");
        return Ok(ExitCode::SUCCESS);
    }
    if would > 0
        && !confirmed(
            args.yes,
            &format!("delete {would} finished job(s) older than {age}"),
        )?
    {
        println!("nothing done");
        return Ok(ExitCode::SUCCESS);
    }
    let mut deleted = 0u64;
    loop {
        let n = contact_sync::outbox::prune::prune_finished(&pool, args.older_than, PURGE_BATCH)
            .await?;
        deleted += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    println!("{deleted} finished job(s) older than {age} deleted");
    Ok(ExitCode::SUCCESS)
}

/// Rows per `purge` statement: short transactions beside the workers.
const PURGE_BATCH: i64 = 5000;

fn job_filter(state: JobState, f: &FilterArgs) -> repair::JobFilter {
    repair::JobFilter {
        state,
        account: f.account.clone(),
        email: f.email.clone(),
        error_like: f.error_like.clone(),
        ..repair::JobFilter::new(state)
    }
}

/// On a terminal, without --yes: asks on stderr and reads the answer (only "y"/"yes" goes on).
/// Elsewhere (a script, CI) the command goes on: --dry-run is how a script counts first.
fn confirmed(yes: bool, what: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    eprint!("{what}? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

fn report_action(
    id: i64,
    verb: &str,
    (result, found): (ActionResult, Option<repair::Found>),
    json: bool,
) -> anyhow::Result<ExitCode> {
    let state = found.map(|f| f.to_string()).unwrap_or_default();
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
            ActionResult::Busy => eprintln!(
                "job {id}: nothing done: another transaction holds its contact (an application's open transaction recording a change of it, or an operator's); \
                 waited {} s. Run the {verb} again once it has ended",
                repair::OPERATOR_LOCK_WAIT.as_secs()
            ),
        }
    }
    Ok(match result {
        ActionResult::Done => ExitCode::SUCCESS,
        ActionResult::NotFound => ExitCode::from(2),
        ActionResult::WrongState | ActionResult::Stale => ExitCode::from(3),
        ActionResult::Busy => ExitCode::from(4),
    })
}
