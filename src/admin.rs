//! The admin endpoint on `admin.listen` (loopback by default): Prometheus `/metrics`,
//! `/healthz` (the process is alive) and `/readyz` (database reachable, migrations current).
//! Queue gauges (depth and oldest runnable age per account) are read from the database at
//! scrape time; counters and histograms come from the worker through the `metrics` facade.

use crate::config::Settings;
use crate::outbox::inspect::backlog;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; `None` if another recorder was
/// installed first.
pub fn recorder() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("contact_sync_provider_request_duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            crate::metrics::describe();
            Some(handle)
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    pool: PgPool,
    handle: Option<PrometheusHandle>,
    /// Every account a gauge was ever set for: one missing from the next read goes to zero
    /// instead of keeping its last value.
    seen: Arc<Mutex<BTreeSet<String>>>,
}

/// The admin routes, for [`serve`] and for tests.
pub fn router(pool: PgPool) -> Router {
    router_for(pool, &[])
}

/// [`router`] with the gauges of `accounts` present (at zero) from the first scrape.
pub fn router_for(pool: PgPool, accounts: &[String]) -> Router {
    let state = AdminState {
        pool,
        handle: recorder(),
        seen: Arc::new(Mutex::new(accounts.iter().cloned().collect())),
    };
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_router(listener, router(pool), stop).await
}

async fn serve_router(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Binds `admin.listen` (unless empty) and serves in the background.
pub async fn spawn(
    settings: &Settings,
    pool: PgPool,
    stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if settings.admin.listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|e| anyhow::anyhow!("admin.listen {}: {e}", settings.admin.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the admin endpoint listens beyond loopback");
    }
    tracing::info!(%addr, "admin endpoint: /metrics /healthz /readyz");
    let accounts: Vec<String> = settings.accounts.keys().cloned().collect();
    let router = router_for(pool, &accounts);
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = serve_router(listener, router, stop).await {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    })))
}

async fn metrics_page(State(state): State<AdminState>) -> impl IntoResponse {
    // (side by side: a database that does not answer costs one wait, not two)
    let (gauges, ()) = tokio::join!(read_gauges(&state.pool), capture_gauges(&state.pool));
    let mut seen = match state.seen.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(rows) = &gauges {
        seen.extend(rows.iter().map(|r| r.account.clone()));
    }
    for account in seen.iter() {
        // an account without a row now is idle: its gauges read zero, not their last value
        let row = gauges
            .as_ref()
            .and_then(|rows| rows.iter().find(|r| &r.account == account))
            .cloned()
            .unwrap_or_default();
        let label = || account.clone();
        metrics::gauge!("contact_sync_queue_runnable", "account" => label()).set(row.runnable);
        metrics::gauge!("contact_sync_queue_scheduled", "account" => label()).set(row.scheduled);
        metrics::gauge!("contact_sync_queue_oldest_runnable_age_seconds", "account" => label())
            .set(row.oldest_runnable_age_s);
        metrics::gauge!("contact_sync_jobs_dead", "account" => label()).set(row.dead);
        metrics::gauge!("contact_sync_account_paused_by_operator", "account" => label())
            .set(row.paused);
        metrics::gauge!("contact_sync_account_throttled_seconds_left", "account" => label())
            .set(row.throttled_s);
        metrics::gauge!("contact_sync_account_calls_in_flight", "account" => label())
            .set(row.in_flight);
    }
    drop(seen);
    match &state.handle {
        Some(handle) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response(),
    }
}

/// Per installed capture source: rows rejected and statements not captured since its
/// installation (left as they were when the database does not answer).
async fn capture_gauges(pool: &PgPool) {
    let read = async {
        let mut out = Vec::new();
        for source in crate::outbox::capture::installed(pool).await? {
            let p =
                crate::outbox::capture::problems(pool, &source.source, Some(source.installed_at))
                    .await?;
            out.push((source.source, p));
        }
        Ok::<_, sqlx::Error>(out)
    };
    if let Ok(Ok(sources)) = tokio::time::timeout(DATABASE_WAIT, read).await {
        for (source, p) in sources {
            metrics::gauge!("contact_sync_capture_rejected_rows", "source" => source.clone())
                .set(p.rejections as f64);
            metrics::gauge!("contact_sync_capture_uncaptured_statements", "source" => source)
                .set(p.failures as f64);
        }
    }
}

/// The gauges of one account at scrape time.
#[derive(Debug, Clone, Default)]
struct AccountGauges {
    account: String,
    runnable: f64,
    scheduled: f64,
    oldest_runnable_age_s: f64,
    dead: f64,
    paused: f64,
    throttled_s: f64,
    in_flight: f64,
}

/// Every account's gauges, or `None` if the database could not be read (the gauges then keep
/// their values: a scrape during an outage is not a drop to zero).
async fn read_gauges(pool: &PgPool) -> Option<Vec<AccountGauges>> {
    let read = async {
        Ok::<_, sqlx::Error>((
            backlog(pool).await?,
            crate::outbox::inspect::dead_per_account(pool).await?,
            crate::outbox::accounts::list(pool).await?,
        ))
    };
    let (backlog, dead, accounts) = match tokio::time::timeout(DATABASE_WAIT, read).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "queue and account gauges unavailable");
            return None;
        }
        Err(_) => {
            tracing::warn!(
                wait_s = DATABASE_WAIT.as_secs(),
                "queue and account gauges unavailable: the database did not answer in time"
            );
            return None;
        }
    };
    let mut out: std::collections::BTreeMap<String, AccountGauges> = Default::default();
    fn entry<'a>(
        out: &'a mut std::collections::BTreeMap<String, AccountGauges>,
        account: &str,
    ) -> &'a mut AccountGauges {
        out.entry(account.to_string())
            .or_insert_with(|| AccountGauges {
                account: account.to_string(),
                ..Default::default()
            })
    }
    for b in backlog {
        let g = entry(&mut out, &b.account);
        g.runnable = b.runnable as f64;
        g.scheduled = b.scheduled as f64;
        g.oldest_runnable_age_s = b.oldest_runnable_age_s.unwrap_or(0.0);
    }
    for (account, n) in dead {
        entry(&mut out, &account).dead = n as f64;
    }
    let now = chrono::Utc::now();
    for a in accounts {
        let g = entry(&mut out, &a.account);
        g.paused = if a.paused_at.is_some() { 1.0 } else { 0.0 };
        g.throttled_s = a
            .throttled_until
            .map_or(0.0, |u| (u - now).num_milliseconds().max(0) as f64 / 1000.0);
        g.in_flight = a.in_flight as f64;
    }
    Some(out.into_values().collect())
}

/// How long `/readyz` and the scrape-time gauges wait for the database: an answer within a
/// scraper's timeout, even while the database is down.
const DATABASE_WAIT: Duration = Duration::from_secs(2);

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    match tokio::time::timeout(DATABASE_WAIT, crate::migrate::is_current(&state.pool)).await {
        Ok(Ok(true)) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Ok(false)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "migrations not current\n".to_string(),
        ),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "database unreachable: no answer within {} s\n",
                DATABASE_WAIT.as_secs()
            ),
        ),
    }
}
