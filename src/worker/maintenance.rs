//! Background upkeep of a running worker: the NOTIFY listener, the lease heartbeat (one
//! statement for every job in flight), the rescuer, due double-opt-in re-sends and retention.

use super::Shared;
use crate::outbox::{claim, doi, prune, rescue, Lease};
use sqlx::postgres::PgListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The channel `contact_sync.notify_jobs()` signals on every insert.
pub const CHANNEL: &str = "contact_sync_jobs";

/// Forwards NOTIFY to the producer; reconnects with backoff after losing the database.
pub async fn listen(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&shared.pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let result = tokio::select! {
            r = connected => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(mut listener) => {
                backoff = Duration::from_millis(100);
                shared.wake.notify_one(); // catch up on what arrived while not listening
                loop {
                    tokio::select! {
                        n = listener.recv() => match n {
                            Ok(_) => shared.wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
                                break;
                            }
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot LISTEN; polling meanwhile")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let w = &shared.settings.worker;
    let heartbeat_every = (w.lease / 3).max(Duration::from_millis(200));
    let sweep_every = w
        .poll_interval
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let prune_every = Duration::from_secs(60);
    let mut next_heartbeat = Instant::now() + heartbeat_every;
    let mut next_sweep = Instant::now();
    let mut next_prune = Instant::now() + Duration::from_secs(5);
    loop {
        let now = Instant::now();
        if now >= next_heartbeat {
            heartbeat(&shared).await;
            next_heartbeat = now + heartbeat_every;
        }
        if now >= next_sweep {
            sweep(&shared).await;
            next_sweep = now + sweep_every;
        }
        if now >= next_prune {
            retention(&shared).await;
            next_prune = now + prune_every;
        }
        let next = next_heartbeat.min(next_sweep).min(next_prune);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn heartbeat(shared: &Shared) {
    let leases: Vec<Lease> = match shared.in_flight.lock() {
        Ok(f) => f
            .iter()
            .map(|(id, attempt)| Lease {
                id: *id,
                attempt: *attempt,
            })
            .collect(),
        Err(_) => return,
    };
    if leases.is_empty() {
        return;
    }
    match claim::extend_leases(&shared.pool, &leases, shared.settings.worker.lease).await {
        Ok(held) if held.len() < leases.len() => {
            tracing::warn!(
                lost = leases.len() - held.len(),
                "some leases were lost (rescued by another worker)"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "lease heartbeat failed"),
    }
}

async fn sweep(shared: &Shared) {
    match rescue::rescue_expired(&shared.pool, shared.settings.worker.max_attempts).await {
        Ok((0, 0)) => {}
        Ok((rescued, dead)) => {
            tracing::warn!(rescued, dead, "returned jobs whose lease expired");
            shared.wake.notify_one();
        }
        Err(e) => tracing::debug!(error = %e, "rescue failed"),
    }
    match doi::enqueue_due_resends(&shared.pool).await {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(jobs = ?ids, "enqueued confirmation re-sends whose window ended")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "re-send sweep failed"),
    }
}

async fn retention(shared: &Shared) {
    const BATCH: i64 = 1000;
    let mut total = 0;
    loop {
        match prune::prune_finished(&shared.pool, shared.settings.retention.finished, BATCH).await {
            Ok(n) => {
                total += n;
                if n < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "retention pruning failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            pruned = total,
            "pruned finished jobs past retention.finished"
        );
    }
}
