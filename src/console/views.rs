//! The console's templates (`templates/console/`, compiled into the binary; every value is
//! HTML-escaped but the charts, which are built here from numbers only) and the values they
//! show, formatted once here.

use crate::outbox::console::HourOfActivity;
use askama::Template;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

/// What every page's frame shows.
#[derive(Debug, Clone)]
pub(crate) struct Chrome {
    pub title: String,
    pub user: Option<String>,
    pub role: &'static str,
    pub csrf: String,
    pub can_sign_out: bool,
    pub no_auth: bool,
}

impl Chrome {
    pub fn signed_out(title: &str) -> Chrome {
        Chrome {
            title: title.to_string(),
            user: None,
            role: "",
            csrf: String::new(),
            can_sign_out: false,
            no_auth: false,
        }
    }
}

pub(crate) fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not render a console page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not render the page\n",
            )
                .into_response()
        }
    }
}

pub(crate) fn database_error(e: &sqlx::Error) -> Response {
    tracing::warn!(error = %e, "the console could not read or write the database");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "the database did not answer as expected; try again shortly (the console's log has the error)\n",
    )
        .into_response()
}

pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

pub(crate) fn time_or_dash(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "—".to_string(), time)
}

pub(crate) fn age(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "—".to_string();
    }
    crate::duration::format(std::time::Duration::from_secs(seconds as u64))
}

/// JSON as indented text (for `<pre>`).
pub(crate) fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Twelve five-minute bars of the last hour: deliveries up (green), failures down (red).
/// Built from numbers only, so it is inserted unescaped.
pub(crate) fn chart(hour: &HourOfActivity) -> String {
    const W: i64 = 8;
    const H: i64 = 14;
    let top = hour
        .delivered
        .iter()
        .chain(hour.failed.iter())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = |n: i64| -> i64 {
        if n <= 0 {
            0
        } else {
            ((n * H + top - 1) / top).clamp(1, H)
        }
    };
    let mut svg = format!(
        r#"<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="deliveries and failures per five minutes over the last hour">"#,
        w = W * 12,
        h = 2 * H + 1
    );
    for i in 0..12 {
        let x = i64::try_from(i).unwrap_or(0) * W;
        let up = scale(hour.delivered[i]);
        let down = scale(hour.failed[i]);
        if up > 0 {
            svg.push_str(&format!(
                r#"<rect class="bar-ok" x="{x}" y="{}" width="{}" height="{up}"><title>{} delivered</title></rect>"#,
                H - up,
                W - 1,
                hour.delivered[i]
            ));
        }
        if down > 0 {
            svg.push_str(&format!(
                r#"<rect class="bar-bad" x="{x}" y="{}" width="{}" height="{down}"><title>{} failed</title></rect>"#,
                H + 1,
                W - 1,
                hour.failed[i]
            ));
        }
    }
    svg.push_str(&format!(
        r#"<line class="base" x1="0" y1="{y}" x2="{w}" y2="{y}"/></svg>"#,
        y = H,
        w = W * 12
    ));
    svg
}

// ---------------------------------------------------------------------------------------------
// Pages

#[derive(Template)]
#[template(path = "console/login.html")]
pub(crate) struct Login {
    pub chrome: Chrome,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "console/message.html")]
pub(crate) struct Message {
    pub chrome: Chrome,
    /// `done` or `error`.
    pub class: &'static str,
    pub message: String,
    pub details: Vec<String>,
    pub back: String,
}

/// One account on the overview.
#[derive(Debug, Clone)]
pub(crate) struct AccountLine {
    pub name: String,
    pub provider: String,
    pub due: String,
    pub scheduled: String,
    pub in_flight: String,
    pub dead: String,
    pub oldest_due: String,
    pub delivered_hour: i64,
    pub failed_hour: i64,
    pub chart: String,
    /// `active`, `paused`, `throttled`, `refused`.
    pub state_class: &'static str,
    pub state: String,
    pub state_reason: Option<String>,
    /// Paused by an operator (or for refused credentials): resume is offered.
    pub operator_paused: bool,
    pub limits: String,
}

#[derive(Debug, Clone)]
pub(crate) struct WorkerLine {
    pub id: String,
    pub host: String,
    pub accounts: String,
    pub concurrency: i32,
    pub started: String,
    pub heartbeat_age: String,
}

/// The overview's live part (what the page refreshes).
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub as_of: String,
    pub refresh: String,
    pub cap: i64,
    pub accounts: Vec<AccountLine>,
    pub unserved: Vec<String>,
    pub workers: Vec<WorkerLine>,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
pub(crate) struct Overview {
    pub chrome: Chrome,
    pub refresh_ms: u128,
    pub live: std::sync::Arc<Live>,
    pub can_act: bool,
    pub csrf: String,
}

#[derive(Template)]
#[template(path = "console/overview_live.html")]
pub(crate) struct OverviewLive {
    pub live: std::sync::Arc<Live>,
    pub can_act: bool,
    pub csrf: String,
}

/// The jobs filter as the form shows it again.
#[derive(Debug, Clone, Default)]
pub(crate) struct FilterEcho {
    pub state: String,
    pub account: String,
    pub provider: String,
    pub email: String,
    pub error: String,
    pub field: String,
    pub value: String,
    pub from: String,
    pub to: String,
    /// The last error, exactly (a dead-letter group; may be empty: no error).
    pub error_is: Option<String>,
    /// The provider code of the last attempt, exactly.
    pub code: Option<String>,
}

impl FilterEcho {
    /// The non-empty fields as (name, value) pairs.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("state", &self.state),
            ("account", &self.account),
            ("provider", &self.provider),
            ("email", &self.email),
            ("error", &self.error),
            ("field", &self.field),
            ("value", &self.value),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, v.clone()))
        .chain(self.error_is.iter().map(|v| ("error_is", v.clone())))
        .chain(self.code.iter().map(|v| ("code", v.clone())))
        .collect()
    }

    /// The filter as a query string (its values URL-encoded).
    pub fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.pairs() {
            q.append_pair(k, &v);
        }
        q.finish()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct JobRow {
    pub id: i64,
    pub state: String,
    pub account: String,
    pub email: String,
    pub attempts: i32,
    pub created: String,
    pub run_at: String,
    pub note: String,
}

#[derive(Template)]
#[template(path = "console/jobs.html")]
pub(crate) struct Jobs {
    pub chrome: Chrome,
    pub states: Vec<&'static str>,
    pub providers: Vec<&'static str>,
    pub filter: FilterEcho,
    pub filter_fields: Vec<(&'static str, String)>,
    pub error: Option<String>,
    pub jobs: Vec<JobRow>,
    pub examined_from: i64,
    pub examined_to: i64,
    pub next_link: Option<String>,
    pub can_act: bool,
    pub csrf: String,
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
pub(crate) struct Confirm {
    pub chrome: Chrome,
    pub summary: String,
    pub details: Vec<String>,
    pub count: i64,
    pub action_url: String,
    pub fields: Vec<(String, String)>,
    pub button: String,
    pub back: String,
    pub csrf: String,
}

#[derive(Debug, Clone)]
pub(crate) struct AttemptRow {
    pub attempt: String,
    pub at: String,
    pub kind: String,
    pub code: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "console/job.html")]
pub(crate) struct Job {
    pub chrome: Chrome,
    pub job: crate::outbox::inspect::JobDetail,
    pub max_attempts: String,
    pub created: String,
    pub run_at: String,
    pub finished: String,
    pub locked_until: String,
    pub doi: String,
    pub payload: String,
    pub call: String,
    pub carried: String,
    pub followers: Vec<(i64, String)>,
    pub attempts: Vec<AttemptRow>,
    pub retryable: bool,
    pub cancellable: bool,
    pub can_act: bool,
    pub csrf: String,
}

#[derive(Debug, Clone)]
pub(crate) struct ChangeRow {
    pub id: i64,
    pub created: String,
    pub state: String,
    pub finished: String,
    pub payload: String,
    pub note: String,
}

#[derive(Debug, Clone)]
pub(crate) struct ContactAccount {
    /// More open or parked changes than shown: a link to all of them.
    pub more: Option<String>,
    pub account: String,
    pub provider: String,
    pub known: String,
    pub known_source: String,
    pub changes: Vec<ChangeRow>,
}

#[derive(Template)]
#[template(path = "console/contact.html")]
pub(crate) struct Contact {
    pub chrome: Chrome,
    pub email: String,
    pub accounts: Vec<ContactAccount>,
    pub window: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct DeadRow {
    pub account: String,
    pub code: String,
    pub error: String,
    pub jobs: i64,
    pub link: String,
    pub newest_id: i64,
    pub newest_at: String,
}

#[derive(Template)]
#[template(path = "console/dead.html")]
pub(crate) struct Dead {
    pub chrome: Chrome,
    pub groups: Vec<DeadRow>,
    pub sampled: Vec<String>,
    pub sample: i64,
    pub can_act: bool,
    pub csrf: String,
}

#[derive(Debug, Clone)]
pub(crate) struct AuditRow {
    pub at: String,
    pub username: String,
    pub action: String,
    pub target: String,
    pub jobs: i64,
    pub outcome: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
pub(crate) struct Audit {
    pub chrome: Chrome,
    pub entries: Vec<AuditRow>,
    pub next_link: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_bar_per_nonzero_bucket_and_only_numbers() {
        let mut hour = HourOfActivity::default();
        hour.delivered[11] = 120;
        hour.delivered[3] = 1;
        hour.failed[11] = 4;
        let svg = chart(&hour);
        assert_eq!(svg.matches("bar-ok").count(), 2);
        assert_eq!(svg.matches("bar-bad").count(), 1);
        assert!(svg.contains("<title>120 delivered</title>"));
        assert!(
            !svg.contains("style="),
            "no inline style: the CSP forbids it"
        );
        assert!(chart(&HourOfActivity::default()).contains("<line"));
    }

    #[test]
    fn templates_escape_what_they_show() {
        let page = Message {
            chrome: Chrome::signed_out("t"),
            class: "done",
            message: "<script>alert(1)</script>".to_string(),
            details: vec!["\"quoted\" & <b>".to_string()],
            back: "/".to_string(),
        };
        let html = page.render().unwrap();
        assert!(!html.contains("<script>alert"));
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
                || html.contains("&lt;script&gt;")
        );
    }
}
