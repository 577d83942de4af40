//! `capture plan|install|verify|uninstall|rejections`: the triggers that capture the
//! application's tables, as the configuration's `[sources.*]` describe them.

use super::args::{BackfillArgs, CaptureCommand};
use super::render::print_as;
use super::table;
use contact_sync::capture::{self, CaptureError};
use contact_sync::config::Settings;
use contact_sync::outbox::capture as records;
use std::process::ExitCode;
use std::time::Duration;

/// How long `install` and `uninstall` wait for the application's table (creating a trigger
/// takes a lock that blocks its writes for the moment the transaction takes).
const TABLE_LOCK_WAIT: Duration = Duration::from_secs(5);

pub async fn run(command: CaptureCommand, settings: &Settings) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    match command {
        CaptureCommand::Plan { source } => {
            let sources = capture::selected(settings, source.as_deref())?;
            if sources.is_empty() {
                eprintln!("no [sources.*] in the configuration: nothing to capture");
            }
            for (name, source) in sources {
                let plan = capture::plan(&pool, settings, name, source).await?;
                print!("{}", plan.script);
            }
            Ok(ExitCode::SUCCESS)
        }
        CaptureCommand::Install { source } => {
            let sources = capture::selected(settings, source.as_deref())?;
            if sources.is_empty() {
                eprintln!("no [sources.*] in the configuration: nothing to install");
            }
            for (name, source) in sources {
                let plan = capture::plan(&pool, settings, name, source).await?;
                match capture::install(&pool, &plan, TABLE_LOCK_WAIT).await {
                    Ok(()) => println!(
                        "{name}: capturing {} into {} (mapping {})",
                        plan.table,
                        source
                            .targets
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        &plan.mapping_md5[..8]
                    ),
                    Err(CaptureError::Database(sqlx::Error::Database(e)))
                        if e.code().as_deref() == Some("55P03") =>
                    {
                        anyhow::bail!(
                            "{name}: {} stayed locked by another transaction for {} s; nothing was changed. Run the install again when it is free",
                            plan.table,
                            TABLE_LOCK_WAIT.as_secs()
                        )
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CaptureCommand::Verify { source, json } => {
            let verdicts = capture::verify(&pool, settings, source.as_deref()).await?;
            let sound = verdicts.iter().all(|v| v.sound());
            print_as(&verdicts, json, |verdicts| {
                let mut out = String::new();
                if verdicts.is_empty() {
                    out.push_str("no [sources.*] configured or installed\n");
                }
                for v in verdicts {
                    if v.sound() {
                        out.push_str(&format!(
                            "{}: ok ({}; since the installation: {} row(s) rejected)\n",
                            v.source, v.table, v.since_install.rejections
                        ));
                    } else {
                        out.push_str(&format!("{}: {}\n", v.source, v.table));
                        for p in &v.problems {
                            out.push_str(&format!("  - {p}\n"));
                        }
                    }
                }
                out
            })?;
            Ok(if sound {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CaptureCommand::Uninstall { source } => {
            let table = match settings.sources.get(&source) {
                Some(s) => Some(s.table.clone()),
                None => records::installed(&pool)
                    .await?
                    .into_iter()
                    .find(|i| i.source == source)
                    .map(|i| i.table_name),
            };
            let Some(table) = table else {
                anyhow::bail!("no source {source:?} is configured or installed");
            };
            capture::uninstall(&pool, &source, &table, TABLE_LOCK_WAIT).await?;
            println!("{source}: capture of {table} removed");
            Ok(ExitCode::SUCCESS)
        }
        CaptureCommand::Rejections {
            source,
            before,
            limit,
            json,
        } => {
            let rows = records::rejections(&pool, source.as_deref(), before, limit).await?;
            print_as(&rows, json, |rows| {
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.rejected_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                            r.source.clone(),
                            r.account.clone(),
                            r.row_key.clone(),
                            r.reason.clone(),
                        ]
                    })
                    .collect();
                table::render(&["ID", "AT", "SOURCE", "ACCOUNT", "ROW", "REASON"], &rows)
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `backfill SOURCE`: a progress bar with rate and ETA on a terminal, JSON lines otherwise;
/// then the summary.
pub async fn backfill(args: BackfillArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    use contact_sync::capture::backfill::{self, Mode, Options};
    use std::io::IsTerminal;
    let pool = super::connect(settings).await?;
    let options = Options {
        accounts: args.accounts,
        condition: args.condition,
        mode: if args.baseline_only {
            Mode::Baseline
        } else if args.force {
            Mode::Force
        } else {
            Mode::Send
        },
        dry_run: args.dry_run,
        restart: args.restart,
        page: args.page,
        max_pending: args.max_pending,
        sync_deletes: args.sync_deletes,
    };
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} rows, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(args.source.clone());
        bar
    });
    let json = args.json;
    let summary = backfill::run(&pool, settings, &args.source, &options, |p| {
        if let Some(bar) = &bar {
            bar.set_length(u64::try_from(p.total).unwrap_or(0));
            bar.set_position(u64::try_from(p.read).unwrap_or(0));
        } else if json {
            if let Ok(line) = serde_json::to_string(&serde_json::json!({
                "read": p.read, "total": p.total, "enqueued": p.enqueued,
                "unchanged": p.unchanged, "rejected": p.rejected
            })) {
                println!("{line}");
            }
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let verb = if options.dry_run {
            "would be queued"
        } else {
            "queued"
        };
        println!(
            "{}: {} row(s) read{}; {} change(s) {verb}, {} unchanged, {} rejected{}{}",
            summary.source,
            summary.read,
            if summary.resumed { " (resumed)" } else { "" },
            summary.enqueued,
            summary.unchanged,
            summary.rejected,
            if options.sync_deletes {
                format!(
                    "; {} contact(s) gone from the table: on_delete {verb}",
                    summary.deleted
                )
            } else {
                String::new()
            },
            if summary.rejected > 0 {
                format!(
                    " (contact-sync capture rejections --source {})",
                    summary.source
                )
            } else {
                String::new()
            }
        );
        for sample in &summary.samples {
            println!("  e.g. {sample}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
