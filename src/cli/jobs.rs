//! `jobs list|show`, `retry` and `cancel`: the operator's view of single jobs and their fixes.

use super::args::JobsCommand;
use super::render::{render_job, render_jobs, to_json};
use anyhow::{bail, Context};
use contact_sync::config::Settings;
use contact_sync::outbox::admin::{self, ActionResult};
use std::process::ExitCode;

pub async fn run(command: JobsCommand, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::List {
            state,
            account,
            email,
            limit,
            json,
        } => {
            if let Some(s) = &state {
                if contact_sync::outbox::JobState::parse(s).is_none() {
                    bail!("--state {s:?}: expected one of pending, running, succeeded, dead, cancelled, coalesced");
                }
            }
            let pool = super::connect(settings).await?;
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
        JobsCommand::Show { id, json } => {
            let pool = super::connect(settings).await?;
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
    }
}

/// `retry ID` or `retry --dead [--account]`.
pub async fn retry(
    settings: &Settings,
    id: Option<i64>,
    dead: bool,
    account: Option<String>,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
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
    report_action(id, "retry", result, json)
}

/// `cancel ID`.
pub async fn cancel(settings: &Settings, id: i64, json: bool) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    let result = admin::cancel(&pool, id).await?;
    report_action(id, "cancel", result, json)
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
