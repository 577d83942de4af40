//! What an operator does from the console: pause and resume an account, retry or cancel one
//! job, retry or cancel a selection or everything a filter matches (the count first, then a
//! confirmation). Each goes through the same `outbox` functions as the command line, with its
//! per-contact rules (a retry over a newer delivered change is refused unless forced), and is
//! written to the audit trail.

use super::auth::{poster, Form, Me};
use super::pages::{message, not_a_job, read_filter};
use super::views::{self, Confirm};
use super::Console;
use crate::outbox::console as store;
use crate::outbox::repair::{self, ActionResult, Found, JobFilter};
use crate::outbox::{accounts, JobState};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use std::sync::Arc;

macro_rules! operator_or_return {
    ($console:expr, $headers:expr, $form:expr) => {
        match poster(&$console, &$headers, &$form, true).await {
            Ok(me) => me,
            Err(response) => return response,
        }
    };
}

/// Writes the audit entry; a failure is logged, never hides the action's result.
async fn audited(console: &Console, me: &Me, action: &str, target: &str, jobs: i64, outcome: &str) {
    if let Err(e) = store::audit(&console.pool, &me.user, action, target, jobs, outcome).await {
        tracing::warn!(error = %e, action, "could not write the console's audit entry");
    }
}

/// An action on an account: its operator, its form, and the account's name if registered.
async fn account_action(
    console: &Console,
    headers: &HeaderMap,
    account: &str,
    body: &[u8],
) -> Result<(Me, Form, String), Response> {
    let form = Form::parse(body);
    let me = poster(console, headers, &form, true).await?;
    let account = registered(console, &me, account).await?;
    Ok((me, form, account))
}

/// A registered account's name, or the page that says it is not one.
async fn registered(console: &Console, me: &Me, account: &str) -> Result<String, Response> {
    match accounts::list(&console.pool).await {
        Ok(rows) if rows.iter().any(|a| a.account == account) => Ok(account.to_string()),
        Ok(_) => Err(message(
            me,
            console,
            "No such account",
            false,
            format!("{account:?} is not a registered account"),
            vec![],
            "/".into(),
        )),
        Err(e) => Err(views::database_error(&e)),
    }
}

pub(crate) async fn pause(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(account): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let (me, form, account) = match account_action(&console, &headers, &account, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reason = match form.get("reason") {
        Some(why) => format!(
            "{} ({}, console)",
            why.chars().take(150).collect::<String>(),
            me.user
        ),
        None => format!("paused by {} from the console", me.user),
    };
    if let Err(e) = accounts::pause(&console.pool, &account, &reason).await {
        return views::database_error(&e);
    }
    console.overview.lock().await.take();
    audited(
        &console,
        &me,
        "pause",
        &format!("account {account}"),
        0,
        &reason,
    )
    .await;
    message(
        &me,
        &console,
        "Paused",
        true,
        format!("{account} is paused: no worker claims its jobs until it is resumed."),
        vec![],
        "/".into(),
    )
}

pub(crate) async fn resume(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(account): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let (me, _, account) = match account_action(&console, &headers, &account, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let was_paused = match accounts::resume(&console.pool, &account).await {
        Ok(p) => p,
        Err(e) => return views::database_error(&e),
    };
    console.overview.lock().await.take();
    let outcome = if was_paused {
        "resumed"
    } else {
        "was not paused"
    };
    audited(
        &console,
        &me,
        "resume",
        &format!("account {account}"),
        0,
        outcome,
    )
    .await;
    message(
        &me,
        &console,
        "Resumed",
        true,
        if was_paused {
            format!("{account} is resumed: workers claim its jobs again.")
        } else {
            format!("{account} was not paused.")
        },
        vec![],
        "/".into(),
    )
}

/// What a single-job action's result means to a person.
fn explain(id: i64, verb: &str, result: ActionResult, found: Option<Found>) -> (bool, String) {
    match (result, found) {
        (ActionResult::Done, _) => (true, format!("Job {id}: {verb} done.")),
        (ActionResult::NotFound, _) => (false, format!("There is no job {id}.")),
        (ActionResult::WrongState, Some(found)) => (
            false,
            format!("Job {id} is {found}: {verb} does not apply to it."),
        ),
        (ActionResult::WrongState, None) => {
            (false, format!("Job {id}: {verb} does not apply to its state."))
        }
        (ActionResult::Stale, found) => (
            false,
            format!(
                "Job {id} was not retried: a newer change of the same contact{} was delivered or is in flight, and re-sending this one would overwrite it at the provider. Tick \"force\" to send it anyway.",
                found.map_or(String::new(), |f| format!(" (job {f})"))
            ),
        ),
        (ActionResult::Busy, _) => (
            false,
            format!("Job {id}: its contact is held by another transaction right now; try again in a moment."),
        ),
    }
}

async fn single(
    console: Arc<Console>,
    headers: HeaderMap,
    id: String,
    body: axum::body::Bytes,
    retry: bool,
) -> Response {
    let form = Form::parse(&body);
    let me = operator_or_return!(console, headers, form);
    let back = format!("/jobs/{id}");
    let Ok(id) = id.parse::<i64>() else {
        return not_a_job(&me, &console, &id);
    };
    let force = form.get("force").is_some();
    let (verb, result) = if retry {
        ("retry", repair::retry(&console.pool, id, force).await)
    } else {
        ("cancel", repair::cancel(&console.pool, id).await)
    };
    let (result, found) = match result {
        Ok(r) => r,
        Err(e) => return views::database_error(&e),
    };
    let (ok, text) = explain(id, verb, result, found);
    let action = match (retry, force) {
        (true, true) => "retry (forced)",
        (true, false) => "retry",
        (false, _) => "cancel",
    };
    audited(
        &console,
        &me,
        action,
        &format!("job {id}"),
        i64::from(ok),
        &text,
    )
    .await;
    message(
        &me,
        &console,
        if ok { "Done" } else { "Not done" },
        ok,
        text,
        vec![],
        back,
    )
}

pub(crate) async fn retry_job(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    single(console, headers, id, body, true).await
}

pub(crate) async fn cancel_job(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    single(console, headers, id, body, false).await
}

/// The most jobs a selection may name.
const MAX_SELECTED: usize = 1000;

/// What a bulk form asks for: the filters (one per state the action takes), how they read.
fn bulk_filters(form: &Form, retry: bool) -> Result<(Vec<JobFilter>, String), String> {
    let takes: &[JobState] = if retry {
        &[JobState::Dead, JobState::Cancelled]
    } else {
        &[JobState::Pending, JobState::Dead]
    };
    let names = takes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    if form.get("scope") == Some("selected") {
        let ids: Vec<i64> = form
            .all("id")
            .map(|id| id.trim().parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| "a selected id is not a job id".to_string())?;
        if ids.is_empty() {
            return Err("no job is selected: tick the jobs first".to_string());
        }
        if ids.len() > MAX_SELECTED {
            return Err(format!(
                "at most {MAX_SELECTED} jobs can be selected; act on the filter instead"
            ));
        }
        let mut shown: Vec<String> = ids.iter().take(20).map(i64::to_string).collect();
        if ids.len() > 20 {
            shown.push(format!("and {} more", ids.len() - 20));
        }
        let filters = takes
            .iter()
            .map(|s| JobFilter {
                ids: Some(ids.clone()),
                ..JobFilter::new(*s)
            })
            .collect();
        return Ok((filters, format!("jobs {} ({names})", shown.join(", "))));
    }
    let (echo, search) = read_filter(form);
    let search = search?;
    let Some(state) = search.state.filter(|s| takes.contains(s)) else {
        return Err(format!(
            "choose the state {names} in the filter first: only those can be {}",
            if retry { "retried" } else { "cancelled" }
        ));
    };
    let filter = JobFilter {
        account: search.account,
        email: search.email,
        error_like: search.error_like,
        provider: search.provider,
        error_is: search.error_is,
        error_code: search.error_code,
        payload_field: search.payload_field,
        created_from: search.created_from,
        created_to: search.created_to,
        ..JobFilter::new(state)
    };
    let described: Vec<String> = echo
        .pairs()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Ok((vec![filter], format!("filter {}", described.join(" "))))
}

pub(crate) async fn bulk(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    let me = operator_or_return!(console, headers, form);
    let retry = match form.get("action") {
        Some("retry") => true,
        Some("cancel") => false,
        _ => {
            return message(
                &me,
                &console,
                "Not done",
                false,
                "choose retry or cancel".into(),
                vec![],
                "/jobs".into(),
            )
        }
    };
    let force = retry && form.get("force").is_some();
    let back = {
        let (echo, _) = read_filter(&form);
        let q = echo.query();
        if q.is_empty() {
            "/jobs".to_string()
        } else {
            format!("/jobs?{q}")
        }
    };
    let (filters, target) = match bulk_filters(&form, retry) {
        Ok(f) => f,
        Err(why) => return message(&me, &console, "Not done", false, why, vec![], back),
    };
    // The confirmation covers the jobs that existed when they were counted: the count pins
    // the highest id, and the action goes no further (a job queued meanwhile is not touched).
    let pinned: Option<i64> = form.get("upto").and_then(|u| u.parse().ok());
    let confirmed = form.get("confirm") == Some("yes") && pinned.is_some();
    let upto = match pinned.filter(|_| confirmed) {
        Some(upto) => upto,
        None => match store::newest_job(&console.pool).await {
            Ok(id) => id,
            Err(e) => return views::database_error(&e),
        },
    };
    let filters: Vec<JobFilter> = filters
        .into_iter()
        .map(|f| JobFilter {
            max_id: Some(upto),
            ..f
        })
        .collect();
    let (mut done, mut stale, mut busy) = (0u64, 0u64, Vec::new());
    for filter in &filters {
        let result = if retry {
            repair::retry_matching(&console.pool, filter, force, !confirmed)
                .await
                .map(|r| (r.retried, r.skipped_stale, r.skipped_busy))
        } else {
            repair::cancel_matching(&console.pool, filter, !confirmed)
                .await
                .map(|r| (r.cancelled, 0, r.skipped_busy))
        };
        match result {
            Ok((d, s, b)) => {
                done += d;
                stale += s;
                busy.extend(b);
            }
            Err(e) => return views::database_error(&e),
        }
    }
    let verb = if retry { "retry" } else { "cancel" };
    let mut details = Vec::new();
    if stale > 0 {
        details.push(format!(
            "{stale} job(s) are left as they are: a newer change of the same contact was delivered or is in flight (tick \"force\" to re-send them anyway)."
        ));
    }
    if !busy.is_empty() {
        details.push(format!(
            "{} contact(s) were held by other transactions and left alone; act again once they are free.",
            busy.len()
        ));
    }
    if !confirmed {
        let mut fields: Vec<(String, String)> = form
            .pairs()
            .filter(|(k, _)| !matches!(k.as_str(), "csrf" | "confirm" | "upto" | "counted"))
            .cloned()
            .collect();
        fields.push(("upto".into(), upto.to_string()));
        fields.push(("counted".into(), done.to_string()));
        return views::render(&Confirm {
            chrome: me.chrome(&console, if retry { "Retry jobs?" } else { "Cancel jobs?" }),
            summary: format!(
                "This will {verb} {done} job(s){}: {target}.",
                if force {
                    ", forced over newer delivered changes"
                } else {
                    ""
                }
            ),
            details,
            count: i64::try_from(done).unwrap_or(i64::MAX),
            action_url: "/jobs/bulk".into(),
            fields,
            button: format!("{} {done} job(s)", if retry { "Retry" } else { "Cancel" }),
            back,
            csrf: me.csrf.clone(),
        });
    }
    let action = match (retry, force) {
        (true, true) => "bulk retry (forced)",
        (true, false) => "bulk retry",
        (false, _) => "bulk cancel",
    };
    let text = format!(
        "{} {done} job(s).",
        if retry { "Retried" } else { "Cancelled" }
    );
    if let Some(counted) = form.get("counted").and_then(|c| c.parse::<u64>().ok()) {
        if counted != done {
            details.insert(
                0,
                format!("{counted} matched when they were counted: the queue changed meanwhile (jobs queued since were not touched)."),
            );
        }
    }
    audited(
        &console,
        &me,
        action,
        &target,
        i64::try_from(done).unwrap_or(i64::MAX),
        format!("{text} {}", details.join(" ")).trim(),
    )
    .await;
    message(&me, &console, "Done", true, text, details, back)
}
