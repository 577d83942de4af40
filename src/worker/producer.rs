//! The claim loop: when slots are free, plan per-account quotas, claim in one statement, spawn
//! an executor per job; otherwise sleep until a NOTIFY, a completion, a rate-limit token or the
//! jittered poll interval. Shutdown and drain end it here.

use super::executor::{self, Completion};
use super::limits::Plan;
use super::shutdown::Shutdown;
use super::{completer, maintenance, Shared};
use crate::metrics::{self as m, JobEvent};
use crate::outbox::{claim, complete, doi, Lease};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Poll interval ±10%, so replicas started together do not poll in step.
fn jittered(d: Duration) -> Duration {
    let factor = 0.9 + fastrand::f64() * 0.2;
    d.mul_f64(factor)
}

/// Claims what the plan allows: accounts without fleet-wide limits in one statement, limited
/// ones within their shared budget (whose holds this worker then remembers). The jobs claimed
/// are returned even when the other half failed, with whether blocked jobs were set waiting.
async fn claim_planned(
    shared: &Shared,
    plan: &Plan,
    floors: &mut claim::ReadyFloors,
) -> (Vec<crate::outbox::ClaimedJob>, bool, Option<sqlx::Error>) {
    let w = &shared.settings.worker;
    let options = claim::ClaimOptions {
        lease: w.lease,
        worker_id: &shared.worker_id,
        default_max_attempts: w.max_attempts,
        max_followers: w.max_coalesce,
        captured: &shared.captured,
    };
    let mut jobs = Vec::new();
    let mut set_waiting = false;
    let mut failed = None;
    if !plan.open.is_empty() {
        match claim::claim(&shared.hot, &plan.open, &options, floors).await {
            Ok(got) => {
                jobs = got.jobs;
                set_waiting = got.set_waiting > 0;
            }
            Err(e) => failed = Some(e),
        }
    }
    if !plan.limited.is_empty() {
        match claim::claim_within_limits(&shared.hot, &plan.limited, &options, floors).await {
            Ok(limited) => {
                for (account, held) in limited.held {
                    shared.limits.held(&account, held);
                }
                jobs.extend(limited.jobs);
                set_waiting |= limited.set_waiting > 0;
            }
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    (jobs, set_waiting, failed)
}

/// Runs `work` to the end, or, once the shutdown is forced, for at most [`FORCED_WAIT`] more.
async fn bounded_if_forced<T>(
    stop: &Shutdown,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return Some(done),
        _ = stop.force.cancelled() => {}
    }
    tokio::time::timeout(FORCED_WAIT, work).await.ok()
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// How long a forced shutdown waits for the completer and the release before giving up (the
/// leases then expire and the jobs come back on their own).
const FORCED_WAIT: Duration = Duration::from_secs(3);

pub async fn run(shared: Arc<Shared>, stop: Shutdown, drain: bool) {
    let shutdown = stop.graceful.clone();
    let w = shared.settings.worker.clone();
    let slots = Arc::new(Semaphore::new(w.concurrency));
    let (tx, rx) = mpsc::unbounded_channel::<Completion>();
    let completer = tokio::spawn(completer::run(shared.clone(), rx));
    let background = CancellationToken::new();
    let listener = tokio::spawn(maintenance::listen(shared.clone(), background.clone()));
    let upkeep = tokio::spawn(maintenance::run(shared.clone(), background.clone()));
    let registered = match maintenance::register(&shared).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not register this worker and its accounts' limits; retrying with the heartbeat");
            false
        }
    };
    let heartbeat = tokio::spawn(maintenance::heartbeat_loop(
        shared.clone(),
        background.clone(),
        registered,
    ));
    let mut tasks = JoinSet::new();
    let mut db_backoff = Duration::ZERO;
    let mut floors = claim::ReadyFloors::default();

    if drain {
        tracing::debug!(worker = %shared.worker_id, accounts = ?shared.accounts, "draining");
    } else {
        tracing::info!(worker = %shared.worker_id, accounts = ?shared.accounts, concurrency = w.concurrency, "worker started");
    }
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "executor task failed");
            }
        }
        let mut wake_in = jittered(w.poll_interval);
        let mut more_waiting = false;
        let mut held_back = false;
        let free = slots.available_permits();
        if free > 0 {
            let plan = shared.limits.plan(&shared.accounts, free, w.batch_size);
            if let Some(d) = plan.wake_in {
                wake_in = wake_in.min(d);
                held_back = true;
            }
            if !plan.is_empty() {
                let claimed_at = std::time::Instant::now();
                let (jobs, set_waiting, failed) = claim_planned(&shared, &plan, &mut floors).await;
                // a claim that began at a floor may have passed over a job ready before it:
                // the next read from the start comes within a second, not a poll interval
                if let Some(due) = floors.full_read_due_in() {
                    wake_in = wake_in.min(due);
                }
                // blocked jobs set waiting took the place of due ones: look again at once
                more_waiting |= set_waiting;
                for q in plan.open.iter().chain(&plan.limited) {
                    let got = jobs.iter().filter(|j| j.account == q.account).count();
                    more_waiting |= got == usize::try_from(q.limit).unwrap_or(0);
                }
                match failed {
                    None => db_backoff = Duration::ZERO,
                    // lost a race for a contact to a concurrent claim: try again now
                    Some(e) if is_unique_violation(&e) => more_waiting = true,
                    Some(e) => {
                        db_backoff = (db_backoff * 2)
                            .clamp(Duration::from_millis(100), Duration::from_secs(5));
                        tracing::warn!(error = %e, retry_in_ms = db_backoff.as_millis() as u64, "claim failed; retrying");
                        wake_in = db_backoff;
                    }
                }
                if !jobs.is_empty() {
                    shared.stats.add_claimed(jobs.len() as u64);
                    if let Ok(mut in_flight) = shared.in_flight.lock() {
                        for job in &jobs {
                            in_flight.insert(job.id, job.attempts);
                        }
                        m::in_flight(in_flight.len());
                    }
                }
                for job in jobs {
                    m::job_event(JobEvent::Claimed, &job.provider, &job.account, 1);
                    match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tasks.spawn(executor::execute(
                                shared.clone(),
                                job,
                                claimed_at,
                                permit,
                                tx.clone(),
                            ));
                        }
                        Err(_) => {
                            // Unreachable while only this loop takes slots; never lose the claim.
                            let lease = job.lease();
                            forget(&shared, &[lease]);
                            if let Err(e) = complete::release(&shared.pool, &[lease], true).await {
                                tracing::warn!(error = %e, job_id = lease.id, "could not release; the lease will expire");
                            }
                        }
                    }
                }
            }
        }

        if drain
            && !more_waiting
            && tasks.is_empty()
            && in_flight_is_empty(&shared)
            && db_backoff.is_zero()
        {
            match drain_check(&shared, held_back).await {
                DrainCheck::Done => break,
                DrainCheck::LookWithin(d) => {
                    // something is runnable that the last claim did not see: read it all
                    floors.forget();
                    wake_in = wake_in.min(d);
                }
                DrainCheck::LookIn(d) => wake_in = d,
            }
        }
        if more_waiting && slots.available_permits() > 0 {
            continue;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(wake_in) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    shut_down(&shared, &stop, tasks, tx, completer).await;
    background.cancel();
    let _ = listener.await;
    let _ = upkeep.await;
    let _ = heartbeat.await;
    let left = crate::outbox::replicas::deregister(&shared.pool, &shared.worker_id);
    if let Some(Err(e)) = bounded_if_forced(&stop, left).await {
        tracing::debug!(error = %e, "could not deregister; the replica drops out when its heartbeat expires");
    }
    m::in_flight(0);
    if drain {
        tracing::debug!(worker = %shared.worker_id, report = ?shared.stats.report(), "drained");
    } else {
        tracing::info!(worker = %shared.worker_id, report = ?shared.stats.report(), "worker stopped");
    }
}

/// What a drain found once nothing of its own was in flight.
enum DrainCheck {
    /// Nothing runnable, no call held: the drain is over.
    Done,
    /// Work is left: look again at the latest after this long.
    LookWithin(Duration),
    /// The check failed: look again after this long.
    LookIn(Duration),
}

async fn drain_check(shared: &Shared, held_back: bool) -> DrainCheck {
    if let Err(e) = doi::enqueue_due_resends(&shared.pool).await {
        tracing::warn!(error = %e, "could not enqueue due confirmation re-sends");
    }
    // waiting jobs a completion missed are runnable once back: a whole pass over the contacts
    // with waiting jobs, each step bounded; one another transaction holds is waited for
    let mut after = String::new();
    let mut stale_held = false;
    loop {
        match claim::requeue_stale_waits(&shared.pool, &after, maintenance::WAITS_SWEEP_BUDGET)
            .await
        {
            Ok(step) => {
                stale_held |= step.held > 0;
                match step.next {
                    Some(next) => after = next,
                    None => break,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not bring back waiting jobs");
                return DrainCheck::LookIn(Duration::from_millis(200));
            }
        }
    }
    if stale_held {
        // a contact's next job is held by another transaction: look again once it is free
        return DrainCheck::LookWithin(Duration::from_millis(200));
    }
    // an account an operator paused is not waited for
    let active = shared.limits.not_paused_by_operator(&shared.accounts);
    // held calls first: one rescued between the two checks is runnable by the second
    let held = claim::held_exists(&shared.pool, &active).await;
    let calls_held = matches!(held, Ok(true));
    let runnable = match held {
        Ok(false) => claim::runnable_exists(&shared.pool, &active).await,
        Ok(true) => Ok(true),
        Err(e) => Err(e),
    };
    match runnable {
        Ok(false) => DrainCheck::Done,
        // rate limit or pause: wake when it allows (the plan's own wake-up)
        Ok(true) if held_back => DrainCheck::LookWithin(Duration::MAX),
        // a call abandoned in flight (held until the provider can no longer act on it) is
        // still in flight: its job comes back when the hold ends
        Ok(true) if calls_held => DrainCheck::LookWithin(Duration::from_millis(200)),
        Ok(true) => DrainCheck::LookWithin(Duration::from_millis(10)),
        Err(e) => {
            tracing::warn!(error = %e, "drain check failed; retrying");
            DrainCheck::LookIn(Duration::from_millis(200))
        }
    }
}

/// Shutdown: finish in-flight calls within the timeout (or until a second signal), record their
/// outcomes, then put back what is left: claims never sent go back to pending at once, calls
/// abandoned in flight are held (the provider may still act on them).
async fn shut_down(
    shared: &Shared,
    stop: &Shutdown,
    mut tasks: JoinSet<()>,
    tx: mpsc::UnboundedSender<Completion>,
    completer: tokio::task::JoinHandle<()>,
) {
    let w = &shared.settings.worker;
    let deadline = tokio::time::sleep(w.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!(abandoned = tasks.len(), "shutdown timeout: abandoning in-flight calls");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
            _ = stop.force.cancelled() => {
                tracing::warn!(abandoned = tasks.len(), "forced shutdown: abandoning in-flight calls");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    drop(tx);
    let completer_done = async {
        if let Err(e) = completer.await {
            tracing::error!(error = %e, "completer task failed");
        }
    };
    if bounded_if_forced(stop, completer_done).await.is_none() {
        tracing::warn!("forced shutdown: outcomes not yet recorded are left to the lease");
    }
    let leftover: Vec<Lease> = shared
        .in_flight
        .lock()
        .map(|mut f| {
            f.drain()
                .map(|(id, attempt)| Lease { id, attempt })
                .collect()
        })
        .unwrap_or_default();
    // Claims whose call was sent and abandoned are held (the provider may still act on them);
    // the others go back to pending at once.
    let started: std::collections::HashSet<Lease> = shared
        .calls_started
        .lock()
        .map(|mut s| s.drain().collect())
        .unwrap_or_default();
    let (abandoned, unsent): (Vec<Lease>, Vec<Lease>) =
        leftover.into_iter().partition(|l| started.contains(l));
    if !unsent.is_empty() || !abandoned.is_empty() {
        let bound = shared.settings.http.abandoned_call_bound;
        let put_back = async {
            let released = complete::release(&shared.pool, &unsent, false).await?;
            let held = complete::abandon(&shared.pool, &abandoned, bound).await?;
            Ok::<_, sqlx::Error>((released, held))
        };
        match bounded_if_forced(stop, put_back).await {
            Some(Ok((released, held))) => {
                tracing::info!(released, held, hold_ms = bound.as_millis() as u64, "unfinished claims put back (calls abandoned in flight are held until the provider can no longer act on them)")
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not release claims; their leases will expire")
            }
            None => tracing::warn!(
                "forced shutdown: could not release claims in time; their leases will expire"
            ),
        }
    }
}

fn in_flight_is_empty(shared: &Shared) -> bool {
    shared
        .in_flight
        .lock()
        .map(|f| f.is_empty())
        .unwrap_or(true)
}

fn forget(shared: &Shared, leases: &[Lease]) {
    if let Ok(mut f) = shared.in_flight.lock() {
        for l in leases {
            if f.get(&l.id) == Some(&l.attempt) {
                f.remove(&l.id);
            }
        }
    }
}
