//! How the operator commands print: aligned tables, JSON, times.

use super::table;
use contact_sync::outbox::{
    self,
    inspect::{JobDetail, JobSummary, Status},
};

/// Prints `value` as JSON with `--json`, else as `table` renders it.
pub fn print_as<T: serde::Serialize>(
    value: &T,
    json: bool,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let text = if json { to_json(value)? } else { table(value) };
    print!("{text}");
    Ok(())
}

pub fn to_json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(value)?))
}

pub fn ts(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
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
    for account in &status.unserved {
        let waiting = status
            .backlog
            .iter()
            .find(|b| &b.account == account)
            .map_or(0, |b| b.runnable + b.scheduled);
        out.push_str(&format!(
            "\n{account}: {waiting} job(s) wait for an account no live worker serves (add [accounts.{account}] to a worker's configuration, or fix the account name)\n"
        ));
    }
    for c in &status.capture {
        let p = &c.since_install;
        let mut line = format!("\ncapture {}: {}", c.source, c.table);
        if p.rejections > 0 {
            line.push_str(&format!(
                "; {}: {} row(s) rejected (contact-sync capture rejections --source {})",
                c.source, p.rejections, c.source
            ));
        }
        if p.failures > 0 {
            line.push_str(&format!(
                "; {}: {} statement(s) not captured, last: {} (contact-sync capture verify)",
                c.source,
                p.failures,
                p.last_failure.as_deref().unwrap_or("?")
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if !status.accounts.is_empty() {
        out.push('\n');
        out.push_str(&render_accounts(&status.accounts));
    }
    out.push_str(&format!("\ndead jobs: {}\n", status.dead));
    out
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
                let by = match a.paused_by.as_deref() {
                    Some("credentials") => "refused by the provider",
                    _ => "paused",
                };
                format!(
                    "{by} since {} ({})",
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
pub fn render_workers(rows: &[outbox::replicas::ReplicaRow]) -> String {
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

/// `text` cut to `max` characters, ending with "…" when cut.
pub fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The LAST ERROR cell: a job that ended well shows an earlier attempt's error as such.
fn last_error_cell(state: &str, error: Option<&str>) -> String {
    match (state, error) {
        (_, None) => String::new(),
        ("succeeded" | "coalesced", Some(e)) => cut(&format!("(earlier attempt) {e}"), 60),
        (_, Some(e)) => cut(e, 60),
    }
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
                j.state.to_string(),
                j.attempts.to_string(),
                ts(&j.run_at),
                last_error_cell(j.state.as_str(), j.last_error.as_deref()),
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
        vec!["state".into(), j.state.to_string()],
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
        vec![
            "double opt-in".into(),
            opt(&j.doi.as_ref().map(|d| d.to_string())),
        ],
        vec!["payload".into(), j.payload.to_string()],
        vec![
            match j.state.as_str() {
                "succeeded" | "coalesced" => "last error (an earlier attempt's)".into(),
                _ => "last error".into(),
            },
            opt(&j.last_error),
        ],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_texts_say_so() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("abcdefghijkl", 5), "abcd…");
        assert_eq!(cut("ääääää", 3), "ää…");
        assert_eq!(
            last_error_cell("succeeded", Some("timeout")),
            "(earlier attempt) timeout"
        );
        assert_eq!(last_error_cell("dead", Some("code 100")), "code 100");
    }
}
