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
    /// Cookies carry `Secure` unless the console listens on loopback.
    secure_cookies: bool,
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
    let console = Arc::new(Console {
        pool,
        settings,
        access,
        secure_cookies: !addr.ip().is_loopback(),
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
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console))
}

/// Serves the console's `router` on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
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

/// A browser's report of a Content-Security-Policy violation: counted and logged (its text is
/// the browser's, never shown).
async fn csp_report(State(console): State<Arc<Console>>, body: axum::body::Bytes) -> StatusCode {
    console.csp_reports.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        bytes = body.len(),
        "a browser reported a Content-Security-Policy violation on the console"
    );
    StatusCode::NO_CONTENT
}

/// How many violations were reported since the console started (for the browser tests and
/// for monitoring).
async fn csp_count(State(console): State<Arc<Console>>) -> String {
    format!("{}\n", console.csp_reports.load(Ordering::Relaxed))
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}
