//! The admin endpoint (filled in by the operator-toolkit work).
use crate::config::Settings;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Starts the admin endpoint when `admin.listen` is set.
pub async fn spawn(
    _settings: &Settings,
    _pool: PgPool,
    _stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    Ok(None)
}
