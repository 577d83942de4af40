//! What a viewer reads: the overview (and its live part), jobs, one job, one contact, dead
//! letters grouped by cause, the audit trail. Every page's reads are bounded
//! (`outbox::console`).

use super::auth::{reader, Form, Me};
use super::views::{self, *};
use super::Console;
use crate::outbox::console::{self as store, Search};
use crate::outbox::{accounts, inspect, replicas, JobState};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use std::sync::Arc;
use std::time::Instant;

/// Jobs per page.
const PAGE: i64 = 100;

macro_rules! me_or_return {
    ($console:expr, $headers:expr) => {
        match reader(&$console, &$headers).await {
            Ok(me) => me,
            Err(response) => return response,
        }
    };
}

macro_rules! or_db_error {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return views::database_error(&e),
        }
    };
}

pub(crate) async fn overview(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let me = me_or_return!(console, headers);
    let live = or_db_error!(live(&console).await);
    views::render(&Overview {
        chrome: me.chrome(&console, "Overview"),
        refresh_ms: console.settings.refresh_interval.as_millis(),
        live,
        can_act: me.can_act(),
        csrf: me.csrf.clone(),
    })
}

/// The overview's live part alone, for the page's refresh.
pub(crate) async fn overview_live(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
) -> Response {
    // the page's script asks for this part: an ended session is said, not redirected (the
    // script would paste the sign-in page inside the overview)
    let Ok(me) = reader(&console, &headers).await else {
        return (StatusCode::UNAUTHORIZED, "sign in again\n").into_response();
    };
    let live = or_db_error!(live(&console).await);
    views::render(&OverviewLive {
        live,
        can_act: me.can_act(),
        csrf: me.csrf.clone(),
    })
}

/// The live part, read from the database at most once per `refresh_interval` whatever the
/// number of browsers (the server's floor on polling).
async fn live(console: &Console) -> Result<Arc<Live>, sqlx::Error> {
    let mut cached = console.overview.lock().await;
    if let Some((at, live)) = cached.as_ref() {
        if at.elapsed() < console.settings.refresh_interval {
            return Ok(live.clone());
        }
    }
    let fresh = Arc::new(read_live(console).await?);
    *cached = Some((Instant::now(), fresh.clone()));
    Ok(fresh)
}

async fn read_live(console: &Console) -> Result<Live, sqlx::Error> {
    let pool = &console.pool;
    let rows = accounts::list(pool).await?;
    let names: Vec<String> = rows.iter().map(|a| a.account.clone()).collect();
    let hours = store::last_hour(pool, &names).await?;
    let mut lines = Vec::with_capacity(rows.len());
    for (row, (_, hour)) in rows.iter().zip(hours.iter()) {
        let counts = store::queue_counts(pool, &row.account).await?;
        let (state_class, state, state_reason, operator_paused) =
            match (&row.paused_by, row.paused_at, row.throttled_until) {
                (Some(by), Some(at), _) if by == "credentials" => (
                    "refused",
                    format!("credentials refused since {}", views::time(at)),
                    row.pause_reason.clone(),
                    true,
                ),
                (_, Some(at), _) => (
                    "paused",
                    format!("paused since {}", views::time(at)),
                    row.pause_reason.clone(),
                    true,
                ),
                (_, None, Some(until)) => (
                    "throttled",
                    format!("throttled until {}", views::time(until)),
                    row.throttle_reason.clone(),
                    false,
                ),
                _ => ("active", "active".to_string(), None, false),
            };
        let mut limits = Vec::new();
        if let Some(rate) = row.rate_per_second {
            limits.push(format!(
                "rate {rate}/s, burst {}",
                row.burst.unwrap_or(rate.max(1.0))
            ));
        }
        if let Some(max) = row.max_in_flight {
            limits.push(format!("at most {max} in flight"));
        }
        if limits.is_empty() {
            limits.push("no fleet-wide limit".to_string());
        }
        limits.push(format!("{} live worker(s) serve it", row.workers));
        lines.push(AccountLine {
            name: row.account.clone(),
            provider: row.provider.clone().unwrap_or_default(),
            due: counts.due.to_string(),
            scheduled: counts.scheduled.to_string(),
            in_flight: match row.max_in_flight {
                Some(max) => format!("{} / {max}", row.in_flight),
                None => row.in_flight.to_string(),
            },
            dead: counts.dead.to_string(),
            oldest_due: counts.oldest_due_s.map_or("—".to_string(), views::age),
            delivered_hour: hour.delivered_total(),
            failed_hour: hour.failed_total(),
            chart: views::chart(hour),
            state_class,
            state,
            state_reason,
            operator_paused,
            limits: limits.join("; "),
        });
    }
    let unserved = accounts::unserved(pool).await?;
    let now = Utc::now();
    let workers = replicas::live_replicas(pool)
        .await?
        .into_iter()
        .map(|w| WorkerLine {
            id: w.id,
            host: format!("{} (pid {})", w.host, w.pid),
            accounts: w.accounts.join(", "),
            concurrency: w.concurrency,
            started: views::time(w.started_at),
            heartbeat_age: views::age((now - w.heartbeat_at).num_milliseconds() as f64 / 1000.0),
        })
        .collect();
    Ok(Live {
        as_of: views::time(now),
        refresh: crate::duration::format(console.settings.refresh_interval),
        cap: store::COUNT_CAP,
        accounts: lines,
        unserved,
        workers,
    })
}

/// A time as a form gives it: RFC 3339, or a date (midnight UTC).
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        })
}

/// The jobs filter of a query string or form: what it echoes, and the search (or why not).
pub(crate) fn read_filter(form: &Form) -> (FilterEcho, Result<Search, String>) {
    let text = |name: &str| form.get(name).unwrap_or("").to_string();
    let echo = FilterEcho {
        state: text("state"),
        account: text("account"),
        provider: text("provider"),
        email: text("email"),
        error: text("error"),
        field: text("field"),
        value: text("value"),
        from: text("from"),
        to: text("to"),
        error_is: form.raw("error_is").map(str::to_string),
        code: form.raw("code").map(str::to_string),
    };
    let search = (|| {
        if form.has_nul() {
            return Err("a value holds a NUL character, which no job can contain".to_string());
        }
        let mut search = Search {
            limit: PAGE,
            error_is: form.raw("error_is").map(str::to_string),
            error_code: form.raw("code").map(str::to_string),
            ..Search::default()
        };
        if let Some(state) = form.get("state") {
            search.state = Some(JobState::parse(state).ok_or_else(|| {
                format!("unknown state {state:?}: pending, running, succeeded, dead, cancelled or coalesced")
            })?);
        }
        search.account = form.get("account").map(str::to_string);
        if let Some(provider) = form.get("provider") {
            if !matches!(provider, "justclick" | "smartlink") {
                return Err(format!(
                    "unknown provider {provider:?}: justclick or smartlink"
                ));
            }
            search.provider = Some(provider.to_string());
        }
        search.email = form.get("email").map(str::to_string);
        search.error_like = form.get("error").map(str::to_string);
        match (form.get("field"), form.get("value")) {
            (Some(field), Some(value)) => {
                let path: Vec<String> = field.split('.').map(str::to_string).collect();
                if path.iter().any(String::is_empty) || path.len() > 4 {
                    return Err(format!(
                        "payload field {field:?}: a name, or names joined by dots (attributes.plan)"
                    ));
                }
                search.payload_field = Some((path, value.to_string()));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err("a payload filter needs both the field and the value".to_string())
            }
            (None, None) => {}
        }
        for (name, slot) in [
            ("from", &mut search.created_from),
            ("to", &mut search.created_to),
        ] {
            if let Some(text) = form.get(name) {
                *slot = Some(parse_time(text).ok_or_else(|| {
                    format!("{name} {text:?}: a time like 2026-12-01T08:00:00Z, or a date like 2026-12-01")
                })?);
            }
        }
        if let Some(before) = form.get("before") {
            search.before = Some(
                before
                    .parse()
                    .map_err(|_| format!("before {before:?}: a job id"))?,
            );
        }
        Ok(search)
    })();
    (echo, search)
}

fn job_note(last_error: Option<&str>, outcome: Option<&str>) -> String {
    match (outcome, last_error) {
        (Some(outcome), _) => outcome.to_string(),
        (None, Some(error)) => error.to_string(),
        (None, None) => String::new(),
    }
}

pub(crate) async fn jobs(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let me = me_or_return!(console, headers);
    let form = Form::parse(query.unwrap_or_default().as_bytes());
    let (echo, search) = read_filter(&form);
    let mut page = Jobs {
        chrome: me.chrome(&console, "Jobs"),
        states: JobState::ALL.iter().map(|s| s.as_str()).collect(),
        providers: vec!["justclick", "smartlink"],
        filter_fields: echo.pairs(),
        filter: echo,
        error: None,
        jobs: Vec::new(),
        examined_from: 0,
        examined_to: 0,
        next_link: None,
        can_act: me.can_act(),
        csrf: me.csrf.clone(),
    };
    match search {
        Err(why) => page.error = Some(why),
        Ok(search) => {
            let found = or_db_error!(store::search(&console.pool, &search).await);
            page.examined_from = found.examined.0;
            page.examined_to = found.examined.1.saturating_sub(1).max(0);
            page.next_link = found.next_before.map(|before| {
                let q = page.filter.query();
                if q.is_empty() {
                    format!("/jobs?before={before}")
                } else {
                    format!("/jobs?{q}&before={before}")
                }
            });
            page.jobs = found
                .jobs
                .into_iter()
                .map(|j| JobRow {
                    id: j.id,
                    state: j.state.to_string(),
                    account: j.account,
                    email: j.email,
                    attempts: j.attempts,
                    created: views::time(j.created_at),
                    run_at: views::time(j.run_at),
                    note: job_note(j.last_error.as_deref(), j.outcome.as_deref()),
                })
                .collect();
        }
    }
    views::render(&page)
}

pub(crate) fn message(
    me: &Me,
    console: &Console,
    title: &str,
    ok: bool,
    text: String,
    details: Vec<String>,
    back: String,
) -> Response {
    views::render(&Message {
        chrome: me.chrome(console, title),
        class: if ok { "done" } else { "error" },
        message: text,
        details,
        back,
    })
}

/// The page for a path that names no job.
pub(crate) fn not_a_job(me: &Me, console: &Console, id: &str) -> Response {
    let mut r = message(
        me,
        console,
        "No such job",
        false,
        format!("{id:?} is not a job id"),
        vec![],
        "/jobs".into(),
    );
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

pub(crate) async fn job(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let me = me_or_return!(console, headers);
    let Ok(id) = id.parse::<i64>() else {
        return not_a_job(&me, &console, &id);
    };
    let Some(job) = or_db_error!(inspect::show(&console.pool, id).await) else {
        let mut r = message(
            &me,
            &console,
            "No such job",
            false,
            format!("there is no job {id} (finished jobs are deleted after the retention period)"),
            vec![],
            "/jobs".into(),
        );
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let followers = or_db_error!(store::followers(&console.pool, id).await);
    let attempts = job
        .errors
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    if !e.is_object() {
                        // a hand-written entry: shown as it is stored
                        return AttemptRow {
                            attempt: String::new(),
                            at: String::new(),
                            kind: String::new(),
                            code: String::new(),
                            error: e.to_string(),
                        };
                    }
                    let field = |name: &str| match e.get(name) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(serde_json::Value::Null) | None => String::new(),
                        Some(other) => other.to_string(),
                    };
                    let at = field("at");
                    AttemptRow {
                        attempt: field("attempt"),
                        at: DateTime::parse_from_rfc3339(&at)
                            .map(|t| views::time(t.with_timezone(&Utc)))
                            .unwrap_or(at),
                        kind: field("kind"),
                        code: field("code"),
                        error: field("error"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let page = Job {
        chrome: me.chrome(&console, format!("Job {id}")),
        max_attempts: job
            .max_attempts
            .map_or("the worker's worker.max_attempts".to_string(), |m| {
                m.to_string()
            }),
        created: views::time(job.created_at),
        run_at: views::time(job.run_at),
        finished: views::time_or_dash(job.finished_at),
        locked_until: views::time_or_dash(job.locked_until),
        doi: job.doi.as_ref().map_or("—".to_string(), |d| d.to_string()),
        payload: views::pretty(&job.payload),
        call: followers.call.as_ref().map_or_else(String::new, |call| views::pretty(call)),
        carried: match followers.count {
            0 => "this job's payload alone".to_string(),
            n if n > store::FOLLOWERS_LISTED => format!(
                "this job's payload and its {n} coalesced followers (the first {} listed below), later values winning",
                store::FOLLOWERS_LISTED
            ),
            n => format!(
                "this job's payload and its {n} coalesced follower(s), later values winning"
            ),
        },
        followers: followers
            .listed
            .iter()
            .map(|f| (f.id, views::time(f.created_at)))
            .collect(),
        attempts,
        retryable: matches!(job.state, JobState::Dead | JobState::Cancelled),
        cancellable: matches!(job.state, JobState::Pending | JobState::Dead),
        can_act: me.can_act(),
        csrf: me.csrf.clone(),
        job,
    };
    views::render(&page)
}

/// Later values win; Smartlink's `attributes` merge key by key.
fn merge_into(known: &mut serde_json::Map<String, serde_json::Value>, sent: &serde_json::Value) {
    let Some(sent) = sent.as_object() else {
        return;
    };
    for (key, value) in sent {
        if key == "modify_ts" {
            continue;
        }
        match (key.as_str(), value, known.get_mut(key)) {
            (
                "attributes",
                serde_json::Value::Object(new),
                Some(serde_json::Value::Object(old)),
            ) => {
                for (k, v) in new {
                    old.insert(k.clone(), v.clone());
                }
            }
            _ => {
                known.insert(key.clone(), value.clone());
            }
        }
    }
}

pub(crate) async fn contact(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let me = me_or_return!(console, headers);
    let form = Form::parse(query.unwrap_or_default().as_bytes());
    let email = form
        .get("email")
        .unwrap_or("")
        .chars()
        .take(320)
        .collect::<String>();
    if form.has_nul() {
        return message(
            &me,
            &console,
            "Contact",
            false,
            "the address holds a NUL character, which no address can contain".into(),
            vec![],
            "/contacts".into(),
        );
    }
    let mut page = Contact {
        chrome: me.chrome(&console, "Contact"),
        email: email.clone(),
        accounts: Vec::new(),
        window: store::CONTACT_WINDOW,
    };
    if email.is_empty() {
        return views::render(&page);
    }
    let accounts = or_db_error!(accounts::providers(&console.pool).await);
    let history = or_db_error!(store::contact(&console.pool, &email, &accounts).await);
    for ((account, provider), key) in accounts.iter().zip(&history.keys) {
        let changes: Vec<&store::ContactChange> = history
            .changes
            .iter()
            .filter(|c| &c.account == account)
            .collect();
        let synced = history.synced.iter().find(|s| &s.contact_key == key);
        if changes.is_empty() && synced.is_none() {
            continue;
        }
        let (known, known_source) = match synced {
            Some(s) => (
                views::pretty(&s.fields),
                format!(
                    "The synced state of a captured account: what job {} sent, at {}.",
                    s.job_id,
                    views::time(s.synced_at)
                ),
            ),
            None => {
                let mut merged = serde_json::Map::new();
                let mut any = false;
                for c in changes.iter().filter(|c| {
                    matches!(c.state, JobState::Succeeded | JobState::Coalesced)
                        && c.outcome.is_none()
                }) {
                    merge_into(&mut merged, &c.payload);
                    any = true;
                }
                if any {
                    (
                        views::pretty(&serde_json::Value::Object(merged)),
                        "The delivered changes still kept, merged in order (later values win)."
                            .to_string(),
                    )
                } else {
                    (
                        String::new(),
                        "No delivered change is kept for this contact.".to_string(),
                    )
                }
            }
        };
        page.accounts.push(ContactAccount {
            more: history.truncated.contains(account).then(|| {
                let mut q = url::form_urlencoded::Serializer::new(String::new());
                q.append_pair("email", &email);
                q.append_pair("account", account);
                format!("/jobs?{}", q.finish())
            }),
            account: account.clone(),
            provider: provider.clone(),
            known,
            known_source,
            changes: changes
                .iter()
                .map(|c| ChangeRow {
                    id: c.id,
                    created: views::time(c.created_at),
                    state: c.state.to_string(),
                    finished: views::time_or_dash(c.finished_at),
                    payload: c.payload.to_string(),
                    note: match (
                        c.coalesced_into,
                        c.outcome.as_deref(),
                        c.last_error.as_deref(),
                    ) {
                        (Some(into), _, _) => format!("carried by the call of job {into}"),
                        (None, Some(outcome), _) => outcome.to_string(),
                        (None, None, Some(error)) => error.to_string(),
                        _ => String::new(),
                    },
                })
                .collect(),
        });
    }
    views::render(&page)
}

pub(crate) async fn dead(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let me = me_or_return!(console, headers);
    let names: Vec<String> = or_db_error!(accounts::list(&console.pool).await)
        .into_iter()
        .map(|a| a.account)
        .collect();
    let (groups, sampled) = or_db_error!(store::dead_groups(&console.pool, &names).await);
    let groups = groups
        .into_iter()
        .map(|g| {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            q.append_pair("state", "dead");
            q.append_pair("account", &g.account);
            q.append_pair("error_is", &g.error);
            q.append_pair("code", &g.code);
            DeadRow {
                link: format!("/jobs?{}", q.finish()),
                account: g.account,
                code: g.code,
                error: g.error,
                jobs: g.jobs,
                newest_id: g.newest_id,
                newest_at: views::time_or_dash(g.newest_at),
            }
        })
        .collect();
    views::render(&Dead {
        chrome: me.chrome(&console, "Dead letters"),
        groups,
        sampled,
        sample: store::DEAD_SAMPLE,
        can_act: me.can_act(),
        csrf: me.csrf.clone(),
    })
}

pub(crate) async fn audit(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let me = me_or_return!(console, headers);
    let form = Form::parse(query.unwrap_or_default().as_bytes());
    let before = form.get("before").and_then(|b| b.parse::<i64>().ok());
    let entries = or_db_error!(store::audit_page(&console.pool, before, PAGE).await);
    let next_link = (i64::try_from(entries.len()).unwrap_or(0) >= PAGE)
        .then(|| entries.last().map(|e| format!("/audit?before={}", e.id)))
        .flatten();
    views::render(&Audit {
        chrome: me.chrome(&console, "Audit"),
        entries: entries
            .into_iter()
            .map(|e| AuditRow {
                at: views::time(e.at),
                username: e.username,
                action: e.action,
                target: e.target,
                jobs: e.jobs,
                outcome: e.outcome,
            })
            .collect(),
        next_link,
    })
}
