//! The admin endpoint on `admin.listen` (loopback by default): Prometheus `/metrics`,
//! `/healthz` (the process is alive) and `/readyz` (database reachable, migrations current).
//! Queue gauges (depth and oldest runnable age per account) are read from the database at
//! scrape time; counters and histograms come from the worker through the `metrics` facade.

use crate::config::Settings;
use crate::outbox::admin::backlog;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use std::sync::OnceLock;
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
            Some(handle)
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    pool: PgPool,
    handle: Option<PrometheusHandle>,
}

/// The admin routes, for [`serve`] and for tests.
pub fn router(pool: PgPool) -> Router {
    let state = AdminState {
        pool,
        handle: recorder(),
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
    axum::serve(listener, router(pool))
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
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = serve(listener, pool, stop).await {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    })))
}

async fn metrics_page(State(state): State<AdminState>) -> impl IntoResponse {
    match backlog(&state.pool).await {
        Ok(rows) => {
            for row in rows {
                metrics::gauge!("contact_sync_queue_runnable", "account" => row.account.clone())
                    .set(row.runnable as f64);
                metrics::gauge!("contact_sync_queue_scheduled", "account" => row.account.clone())
                    .set(row.scheduled as f64);
                metrics::gauge!("contact_sync_queue_oldest_runnable_age_seconds", "account" => row.account)
                    .set(row.oldest_runnable_age_s.unwrap_or(0.0));
            }
        }
        Err(e) => tracing::warn!(error = %e, "queue gauges unavailable"),
    }
    match crate::outbox::accounts::list(&state.pool).await {
        Ok(rows) => {
            let now = chrono::Utc::now();
            for row in rows {
                let account = row.account.clone();
                metrics::gauge!("contact_sync_account_paused_by_operator", "account" => account.clone())
                    .set(if row.paused_at.is_some() { 1.0 } else { 0.0 });
                let throttled = row
                    .throttled_until
                    .map_or(0.0, |u| (u - now).num_milliseconds().max(0) as f64 / 1000.0);
                metrics::gauge!("contact_sync_account_throttled_seconds_left", "account" => account.clone())
                    .set(throttled);
                metrics::gauge!("contact_sync_account_calls_in_flight", "account" => account)
                    .set(row.in_flight as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "account gauges unavailable"),
    }
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

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    match crate::migrate::is_current(&state.pool).await {
        Ok(true) => (StatusCode::OK, "ready\n".to_string()),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "migrations not current\n".to_string(),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {e}\n"),
        ),
    }
}
