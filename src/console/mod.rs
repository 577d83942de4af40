//! The operator console: a server-rendered web interface to the queue, served by
//! `contact-sync console` (or by `run`, with `console.listen`). It owns the routes, the
//! security every response carries (sign-in, roles, CSRF token and Origin check on every POST,
//! a strict Content-Security-Policy), and the pages; its SQL is in `outbox::console`.
//!
//! - `auth`: users, sessions, the per-request identity, CSRF and Origin checks.
//! - `pages`: what a viewer reads (overview, jobs, job, contact, dead letters, audit).
//! - `actions`: what an operator does (pause, resume, retry, cancel, in bulk), each audited.
//! - `views`: the templates (compiled into the binary) and the values they show.

mod actions;
mod auth;
mod pages;
mod views;

pub use auth::hash_password;

use crate::config::ConsoleSettings;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Who may use the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Users of `[console.users]` sign in with their password.
    SignIn,
    /// No sign-in: anyone who reaches the address acts as an operator. Only on loopback.
    Open,
}

/// Why the console cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the console without sign-in listens only on loopback (127.0.0.1 or [::1]), not on {0}: add users to [console.users] to serve it further")]
    OpenBeyondLoopback(std::net::SocketAddr),
    #[error("no user may sign in: add one to [console.users] (its password_hash from `contact-sync console hash-password`), or start with --no-auth on loopback")]
    NoUsers,
}

/// What every request shares.
pub(crate) struct Console {
    pool: PgPool,
    settings: ConsoleSettings,
    access: Access,
    /// Cookies carry `Secure` (`console.secure_cookies`; by default unless the console listens
    /// on loopback).
    secure_cookies: bool,
    /// Password checks at once, and failed sign-ins per user and per address.
    sign_in: auth::SignInGuard,
    /// When the last policy-violation report was logged (at most one line a minute).
    csp_logged: std::sync::Mutex<Option<Instant>>,
    /// The CSRF token of forms when there is no sign-in (and so no session).
    open_csrf: String,
    /// The overview's live part, read at most once per `refresh_interval`.
    overview: tokio::sync::Mutex<Option<(Instant, Arc<views::Live>)>>,
    /// Content-Security-Policy violations browsers reported.
    csp_reports: AtomicU64,
}

/// The console's routes over `pool`. Checks that `access` can be served on `addr`.
pub fn router(
    pool: PgPool,
    settings: ConsoleSettings,
    access: Access,
    addr: std::net::SocketAddr,
) -> Result<Router, ConsoleError> {
    match access {
        Access::Open if !addr.ip().is_loopback() => {
            return Err(ConsoleError::OpenBeyondLoopback(addr))
        }
        Access::SignIn if settings.users.is_empty() => return Err(ConsoleError::NoUsers),
        _ => {}
    }
    let secure_cookies = settings.secure_cookies.unwrap_or(!addr.ip().is_loopback());
    let console = Arc::new(Console {
        pool,
        settings,
        access,
        secure_cookies,
        sign_in: auth::SignInGuard::new(),
        csp_logged: std::sync::Mutex::new(None),
        open_csrf: auth::random_token(),
        overview: tokio::sync::Mutex::new(None),
        csp_reports: AtomicU64::new(0),
    });
    Ok(Router::new()
        .route("/", get(pages::overview))
        .route("/overview/live", get(pages::overview_live))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/bulk", post(actions::bulk))
        .route("/jobs/{id}", get(pages::job))
        .route("/jobs/{id}/retry", post(actions::retry_job))
        .route("/jobs/{id}/cancel", post(actions::cancel_job))
        .route("/contacts", get(pages::contact))
        .route("/dead", get(pages::dead))
        .route("/audit", get(pages::audit))
        .route("/accounts/{account}/pause", post(actions::pause))
        .route("/accounts/{account}/resume", post(actions::resume))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/static/console.css", get(stylesheet))
        .route("/static/console.js", get(script))
        .route("/csp-report", post(csp_report))
        .route("/csp-reports", get(csp_count))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            console.clone(),
            check_host,
        ))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console))
}

/// Serves the console's `router` on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await
}

/// Whether a `Host` header names this console: an IP address, `localhost`, or a name of
/// `console.allowed_hosts`. A page of another site whose name was made to resolve to this
/// address (DNS rebinding) carries its own name, and is refused.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

async fn check_host(
    State(console): State<Arc<Console>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, &console.settings.allowed_hosts) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers only to its IP address, localhost, or a name of console.allowed_hosts\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// The Content-Security-Policy of every response: nothing inline, nothing from elsewhere.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'; report-uri /csp-report";

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../../assets/console/console.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../../assets/console/console.js"),
    )
        .into_response()
}

/// A browser's report of a Content-Security-Policy violation: counted, and logged at most
/// once a minute (its text is the browser's, never shown).
async fn csp_report(
    State(console): State<Arc<Console>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !(kind.starts_with("application/csp-report")
        || kind.starts_with("application/json")
        || kind.starts_with("application/reports+json"))
        || body.len() > 64 * 1024
    {
        return StatusCode::BAD_REQUEST;
    }
    let total = console.csp_reports.fetch_add(1, Ordering::Relaxed) + 1;
    if let Ok(mut last) = console.csp_logged.lock() {
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(total, "a browser reported a Content-Security-Policy violation on the console (at most one line a minute)");
        }
    }
    StatusCode::NO_CONTENT
}

/// How many violations browsers reported since the console started (signed-in users only).
async fn csp_count(
    State(console): State<Arc<Console>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(response) = auth::reader(&console, &headers).await {
        return response;
    }
    format!("{}\n", console.csp_reports.load(Ordering::Relaxed)).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_addresses_localhost_and_configured_names_are_this_console() {
        let allowed = vec!["console.example.com".to_string()];
        for host in [
            "127.0.0.1:8090",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:8090",
            "[::1]",
            "localhost:8090",
            "LOCALHOST",
            "console.example.com",
            "Console.Example.com:443",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in [
            "rebind.attacker.example:8090",
            "",
            "127.0.0.1.attacker.example",
            "localhost.attacker.example",
            "[::1",
            "[evil]:80",
            "127.0.0.1:port",
            "console.example.com.evil",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }
}
