//! Background upkeep of a running worker: the NOTIFY listener, the lease heartbeat (one
//! statement for every job in flight, in a task of its own), and the bounded housekeeping: the
//! rescuer, due double-opt-in re-sends and retention.

use super::Shared;
use crate::outbox::{accounts, claim, doi, prune, replicas, rescue, Lease};
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The channel `contact_sync.notify_jobs()` signals on every insert.
pub const CHANNEL: &str = "contact_sync_jobs";

/// Registers this replica and its accounts' limits (a warning names each account whose limits
/// another replica had set differently: they are the account's, the last registration wins).
pub async fn register(shared: &Shared) -> Result<(), sqlx::Error> {
    let first = !shared
        .registered_once
        .load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let changed = accounts::register(
        &shared.pool,
        &shared.replica,
        &shared.account_limits,
        shared.settings.worker.lease,
        first,
    )
    .await?;
    // (a registration may follow a gap: claims made before it are not vouched for)
    shared.renewed(started, false);
    shared
        .registered_once
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for c in changed.changed {
        let b = &c.before;
        let show = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        tracing::warn!(
            account = %c.account,
            before_provider = %b.provider,
            before_rate_limit_per_second = %show(b.rate_per_second.map(|r| r.to_string())),
            before_burst = %show(b.burst.map(|r| r.to_string())),
            before_max_in_flight = %show(b.max_in_flight.map(|r| r.to_string())),
            "this worker's limits for the account differ from those registered before; they apply to every worker now (configure replicas alike)"
        );
    }
    for r in changed.refused {
        shared.limits.exclude(&r.account);
        tracing::error!(
            account = %r.account,
            registered_provider = %r.registered,
            configured_provider = %r.configured,
            "this worker's configuration says accounts.{}.provider = {:?}, but the account is a {} account ({}): this worker does not serve it; fix accounts.{}.provider (or use another account name)",
            r.account, r.configured, r.registered, r.because, r.account
        );
    }
    shared.limits.set_registered();
    refresh_pauses(shared).await;
    Ok(())
}

/// Reads the pauses and limits of this worker's accounts from the database.
async fn refresh_pauses(shared: &Shared) {
    match accounts::holds(&shared.pool, &shared.accounts).await {
        Ok(rows) => shared.limits.set_from_database(&shared.accounts, &rows),
        Err(e) => tracing::debug!(error = %e, "could not read account pauses and limits"),
    }
}

/// Forwards NOTIFY to the producer (new jobs) and to the account holds (pauses, resumes);
/// reconnects with backoff after losing the database.
pub async fn listen(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&shared.pool).await?;
            listener.listen_all([CHANNEL, accounts::CHANNEL]).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let result = tokio::select! {
            r = connected => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(mut listener) => {
                backoff = Duration::from_millis(100);
                // catch up on what arrived while not listening
                refresh_pauses(&shared).await;
                shared.wake.notify_one();
                loop {
                    tokio::select! {
                        n = listener.recv() => match n {
                            Ok(n) if n.channel() == accounts::CHANNEL => {
                                let (account, throttled_for) = accounts::parse_announcement(n.payload());
                                if shared.accounts.iter().any(|a| a == account) {
                                    match throttled_for {
                                        // a throttle pause: hold back now, no query first
                                        Some(d) => shared.limits.pause(account, d),
                                        None => {
                                            refresh_pauses(&shared).await;
                                            shared.wake.notify_one();
                                        }
                                    }
                                }
                            }
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

/// The lease heartbeat, alone in its task: it never waits behind housekeeping, and each beat is
/// bounded by its interval (a slow database delays one beat, never the next). It also keeps
/// this replica in `contact_sync.workers` (registering it, if start-up could not).
pub async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken, registered: bool) {
    let mut registered = registered;
    let every = (shared.settings.worker.lease / 3).max(Duration::from_millis(200));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        if tokio::time::timeout(every, heartbeat(&shared))
            .await
            .is_err()
        {
            tracing::warn!("lease heartbeat took longer than its interval; trying again");
        }
        let beat_started = Instant::now();
        let beat = async {
            if registered {
                // the accounts it serves: not one it stands down from
                let mut replica = shared.replica.clone();
                replica.accounts.retain(|a| !shared.limits.is_excluded(a));
                replicas::heartbeat_continuous(&shared.pool, &replica, shared.settings.worker.lease)
                    .await
                    .map(|continuous| shared.renewed(beat_started, continuous))
            } else {
                register(&shared).await
            }
        };
        match tokio::time::timeout(every, beat).await {
            Ok(Ok(())) => registered = true,
            Ok(Err(e)) => tracing::debug!(error = %e, "replica heartbeat failed"),
            Err(_) => tracing::debug!("replica heartbeat took longer than its interval"),
        }
    }
}

/// Housekeeping: rescue of expired leases, due double-opt-in re-sends and retention, each
/// bounded per tick (retention deletes one batch a tick and comes back soon while a backlog
/// remains), so a large finished backlog never delays anything else.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let w = &shared.settings.worker;
    let sweep_every = w
        .poll_interval
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let prune_every = Duration::from_secs(60);
    let prune_backlog_every = Duration::from_millis(200);
    let mut next_sweep = Instant::now();
    let mut next_prune = Instant::now() + Duration::from_secs(5);
    let mut next_unserved = Instant::now() + UNSERVED_FIRST_CHECK;
    let mut warned: HashMap<String, Instant> = HashMap::new();
    let mut pruned_in_run = 0u64;
    loop {
        let now = Instant::now();
        if now >= next_sweep {
            sweep(&shared).await;
            next_sweep = now + sweep_every;
        }
        if now >= next_unserved {
            warn_unserved(&shared, &mut warned).await;
            next_unserved = now + UNSERVED_CHECK_EVERY;
        }
        if now >= next_prune {
            match retention(&shared).await {
                Some(n) if n >= PRUNE_BATCH as u64 => {
                    pruned_in_run += n;
                    next_prune = Instant::now() + prune_backlog_every;
                }
                done => {
                    pruned_in_run += done.unwrap_or(0);
                    if pruned_in_run > 0 {
                        tracing::info!(
                            pruned = pruned_in_run,
                            "pruned finished jobs past retention.finished"
                        );
                    }
                    pruned_in_run = 0;
                    next_prune = Instant::now() + prune_every;
                }
            }
        }
        let next = next_sweep.min(next_prune).min(next_unserved);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Contacts with waiting jobs one housekeeping tick looks at (see `claim::requeue_stale_waits`):
/// a tick's cost stays bounded however many contacts wait; the next tick goes on after them.
pub(crate) const WAITS_SWEEP_BUDGET: i64 = 1000;

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
    match claim::extend_leases(
        &shared.pool,
        &leases,
        shared.settings.worker.lease,
        &shared.worker_id,
    )
    .await
    {
        Ok(held) if held.len() < leases.len() => {
            // a job the completer finished since the beat began is not lost: only those still
            // in flight here are
            let held: std::collections::HashSet<_> = held.into_iter().collect();
            let lost = match shared.in_flight.lock() {
                Ok(f) => leases
                    .iter()
                    .filter(|l| !held.contains(&l.id) && f.get(&l.id) == Some(&l.attempt))
                    .count(),
                Err(_) => 0,
            };
            if lost > 0 {
                tracing::warn!(lost, "some leases were lost (rescued by another worker)");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "lease heartbeat failed"),
    }
}

async fn sweep(shared: &Shared) {
    // a pause or resume whose NOTIFY was missed (the listener reconnecting)
    refresh_pauses(shared).await;
    // the jobs this worker knows it holds (unknown: claim none of its own back)
    let (me, known): (&str, Vec<i64>) = match shared.in_flight.lock() {
        Ok(f) => (&shared.worker_id, f.keys().copied().collect()),
        Err(_) => ("", Vec::new()),
    };
    match rescue::rescue_expired(
        &shared.pool,
        shared.settings.worker.max_attempts,
        after_lease(&shared.settings),
        (me, &known),
    )
    .await
    {
        Ok((0, 0)) => {}
        Ok((rescued, dead)) => {
            tracing::warn!(rescued, dead, "returned jobs whose lease expired");
            shared.wake.notify_one();
        }
        Err(e) => tracing::debug!(error = %e, "rescue failed"),
    }
    // one step of the sweep over the contacts with waiting jobs, where the last one stopped
    let after = shared
        .waits_cursor
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    match claim::requeue_stale_waits(&shared.pool, &after, WAITS_SWEEP_BUDGET).await {
        Ok(step) => {
            if let Ok(mut cursor) = shared.waits_cursor.lock() {
                *cursor = step.next.unwrap_or_default();
            }
            if step.requeued > 0 {
                tracing::debug!(
                    jobs = step.requeued,
                    "brought back waiting jobs a completion missed"
                );
                shared.wake.notify_one();
            }
        }
        Err(e) => tracing::debug!(error = %e, "requeue sweep failed"),
    }
    match doi::enqueue_due_resends(&shared.pool).await {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(jobs = ?ids, "enqueued confirmation re-sends whose window ended")
        }
        Ok(_) => {}
        Err(e) if crate::outbox::is_transient(&e) => {
            tracing::debug!(error = %e, "re-send sweep failed")
        }
        Err(e) => tracing::warn!(error = %e, "re-send sweep failed"),
    }
}

/// How long a job rescued from a gone worker waits before it is claimed again: its call may
/// have been sent just before the worker went, and may run for `http.request_timeout`, after
/// which the provider may still act on it for `http.abandoned_call_bound`.
pub(crate) fn after_lease(settings: &crate::config::Settings) -> Duration {
    let bound = settings.http.abandoned_call_bound;
    if bound.is_zero() {
        Duration::ZERO
    } else {
        settings.http.request_timeout + bound
    }
}

/// When a worker first looks for jobs that no live worker serves (after the other replicas of
/// a rolling start have had time to register), and how often after that.
const UNSERVED_FIRST_CHECK: Duration = Duration::from_secs(10);
const UNSERVED_CHECK_EVERY: Duration = Duration::from_secs(60);
/// One warning per unserved account per this long, per worker.
const UNSERVED_WARN_EVERY: Duration = Duration::from_secs(3600);

/// Warns, once an hour per account, of jobs that wait for an account no live worker serves:
/// otherwise they only look like a runnable backlog that grows.
async fn warn_unserved(shared: &Shared, warned: &mut HashMap<String, Instant>) {
    let accounts = match accounts::unserved(&shared.pool).await {
        Ok(a) => a,
        Err(e) => return tracing::debug!(error = %e, "unserved-account check failed"),
    };
    let now = Instant::now();
    warned.retain(|_, at| now.duration_since(*at) < UNSERVED_WARN_EVERY);
    for account in accounts {
        if warned.contains_key(&account) {
            continue;
        }
        tracing::warn!(
            account = %account,
            served_here = %shared.accounts.join(","),
            "jobs wait for an account that no live worker serves: add [accounts.{account}] to a worker's configuration (or fix the account name the jobs were recorded with)"
        );
        warned.insert(account, now);
    }
}

/// Finished rows deleted per housekeeping tick.
const PRUNE_BATCH: i64 = 1000;

/// One bounded retention batch; `None` if it failed.
async fn retention(shared: &Shared) -> Option<u64> {
    match prune::prune_finished(
        &shared.pool,
        shared.settings.retention.finished,
        PRUNE_BATCH,
    )
    .await
    {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "retention pruning failed");
            None
        }
    }
}
