//! The single writer of outcomes: batches successes into one fenced statement, writes retries
//! and dead jobs one by one, frees the slots, and wakes the producer.
//!
//! A completion that cannot be written never blocks the others: a batch the database refuses
//! is split and each outcome written alone; an outcome that still cannot be written is kept
//! (its lease stays in the heartbeat, so no other worker calls the provider again) and written
//! again on the next round, while new outcomes keep flowing. Only at shutdown is an unwritable
//! outcome given up, after `worker.shutdown_timeout` more of trying, to its lease (the rescuer
//! returns the job).
//!
//! The calls that write the double-opt-in ledger ([`crate::outbox::doi::AfterCall`]) are written
//! apart from the others, with their ledger writes in the same transaction, under a short lock
//! timeout: a ledger row another transaction holds keeps back only those (then, split one by
//! one, only its own). A round that cannot reach the database keeps the rest without trying.

use super::executor::{self, Completion, Outcome};
use super::Shared;
use crate::metrics::{self as m, JobEvent};
use crate::outbox::complete::{self, Success, Write};
use crate::outbox::synced;
use crate::outbox::{is_lock_timeout, is_permanent, is_transient, JobState};
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::mpsc;

/// Most completions written by one statement.
const MAX_BATCH: usize = 1024;
/// Wait before writing kept outcomes again when nothing new arrives.
const REWRITE_EVERY: Duration = Duration::from_millis(500);
/// How often the deliveries and failures counted are added to `contact_sync.activity` (what
/// the console's overview charts): one small statement per interval, whatever the throughput.
const ACTIVITY_EVERY: Duration = Duration::from_secs(5);

/// Deliveries and failed attempts per account, since they were last added to the database.
#[derive(Debug, Default)]
struct Activity {
    counts: std::collections::BTreeMap<String, (i64, i64)>,
    since: Option<std::time::Instant>,
}

impl Activity {
    fn delivered(&mut self, account: &str, n: usize) {
        self.entry(account).0 += i64::try_from(n).unwrap_or(0);
    }

    fn failed(&mut self, account: &str) {
        self.entry(account).1 += 1;
    }

    fn entry(&mut self, account: &str) -> &mut (i64, i64) {
        self.since.get_or_insert_with(std::time::Instant::now);
        self.counts.entry(account.to_string()).or_default()
    }

    /// Adds the counts to the database once [`ACTIVITY_EVERY`] has passed (or now, with
    /// `now`); kept for the next time if that fails.
    async fn flush(&mut self, pool: &sqlx::PgPool, now: bool) {
        let due = self.since.is_some_and(|t| t.elapsed() >= ACTIVITY_EVERY);
        if self.counts.is_empty() || !(due || now) {
            return;
        }
        let rows: Vec<(String, i64, i64)> = self
            .counts
            .iter()
            .map(|(a, (d, f))| (a.clone(), *d, *f))
            .collect();
        match crate::outbox::console::add_activity(pool, &rows).await {
            Ok(()) => {
                self.counts.clear();
                self.since = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not add the activity counts; kept for the next time")
            }
        }
    }
}

pub async fn run(shared: std::sync::Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Completion>) {
    let mut kept: Vec<Completion> = Vec::new();
    let mut activity = Activity::default();
    let mut open = true;
    // when the worker stopped handing in outcomes (shutdown): kept ones are tried again for up
    // to `worker.shutdown_timeout` from then
    let mut closed_at: Option<std::time::Instant> = None;
    let give_up_after = shared.settings.worker.shutdown_timeout;
    while open || !kept.is_empty() {
        let mut batch = std::mem::take(&mut kept);
        let first = if batch.is_empty() && !activity.counts.is_empty() {
            // nothing to write: the counts go to the database when no outcome comes for a while
            tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep(ACTIVITY_EVERY) => {
                    activity.flush(&shared.pool, true).await;
                    continue;
                }
            }
        } else if batch.is_empty() {
            rx.recv().await
        } else if open {
            tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep(REWRITE_EVERY) => None,
            }
        } else {
            // shutting down with outcomes kept: try them again shortly
            tokio::time::sleep(REWRITE_EVERY).await;
            None
        };
        match first {
            Some(c) => batch.push(c),
            None if batch.is_empty() => break,
            None => {}
        }
        while open && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if rx.is_closed() && rx.is_empty() {
            open = false;
        }
        if !open {
            closed_at.get_or_insert_with(std::time::Instant::now);
        }
        let (written, unwritten, reached) = write(&shared, batch, &mut activity).await;
        if reached {
            // (the database down: the counts wait for a round that reaches it, or for the end)
            activity.flush(&shared.pool, !open).await;
        }
        forget(&shared, &written);
        drop(written); // frees the slots
        shared.wake.notify_one();
        if !unwritten.is_empty() {
            if open || closed_at.is_some_and(|t| t.elapsed() < give_up_after) {
                kept = unwritten;
            } else {
                // Left in the heartbeat's map: the shutdown tries to release them.
                for c in &unwritten {
                    tracing::error!(job_id = c.lease.id, "could not record the outcome before shutdown; the lease will expire and the job will be retried");
                }
            }
        }
        if !open && rx.is_empty() && kept.is_empty() {
            break;
        }
    }
    activity.flush(&shared.pool, true).await;
}

/// Drops written (or given-up) leases from the heartbeat, matching the attempt: a newer attempt
/// of the same job claimed meanwhile keeps its lease.
fn forget(shared: &Shared, done: &[Completion]) {
    if let Ok(mut in_flight) = shared.in_flight.lock() {
        for c in done {
            if in_flight.get(&c.lease.id) == Some(&c.lease.attempt) {
                in_flight.remove(&c.lease.id);
            }
        }
        m::in_flight(in_flight.len());
    }
    if let Ok(mut started) = shared.calls_started.lock() {
        for c in done {
            started.remove(&c.lease);
        }
    }
}

/// Writes a batch; returns (written or lost, to keep for another round, whether the database
/// took writes: false when it could not be reached or could not take one now, as opposed to
/// refusing an outcome for what it holds).
async fn write(
    shared: &Shared,
    batch: Vec<Completion>,
    activity: &mut Activity,
) -> (Vec<Completion>, Vec<Completion>, bool) {
    let pool = &shared.pool;
    let (successes, others): (Vec<Completion>, Vec<Completion>) = batch
        .into_iter()
        .partition(|c| matches!(c.outcome, Outcome::Success { .. }));
    let mut written = Vec::with_capacity(successes.len() + others.len());
    let mut unwritten = Vec::new();

    // Successes: one statement; if the database refuses it, each alone.
    // (the calls that write the double-opt-in ledger apart: a ledger row held elsewhere keeps
    // back only theirs, then only its own)
    let (plain, ledger): (Vec<Completion>, Vec<Completion>) =
        successes.into_iter().partition(|c| {
            !matches!(
                &c.outcome,
                Outcome::Success {
                    ledger: Some(_),
                    ..
                }
            )
        });
    let mut groups: Vec<Vec<Completion>> = vec![plain, ledger];
    // the database cannot be reached, or cannot take writes now (`outbox::is_transient`:
    // shutting down, too many connections, read-only, a serialization failure): the rest of the
    // round is kept without trying, so that a round (and a shutdown) waits for one attempt, not
    // one per outcome
    let mut unreachable = false;
    while let Some(group) = groups.pop() {
        if group.is_empty() {
            continue;
        }
        if unreachable {
            unwritten.extend(group);
            continue;
        }
        let items: Vec<Success> = group.iter().filter_map(success_of).collect();
        match complete::succeed_many(&shared.hot, &items).await {
            Ok(w) => {
                let lost: HashSet<_> = w.lost.into_iter().collect();
                let held: HashSet<_> = w.held.into_iter().collect();
                if !held.is_empty() {
                    tracing::info!(jobs = ?held, "a row of these calls is held by another transaction; their outcomes are written once it is free");
                }
                for c in group {
                    if held.contains(&c.lease.id) {
                        unwritten.push(c);
                        continue;
                    }
                    if lost.contains(&c.lease.id) {
                        lease_lost(shared, &c);
                    } else if let Outcome::Success {
                        followers, outcome, ..
                    } = &c.outcome
                    {
                        match *outcome {
                            Some(executor::NOT_FOUND) => {
                                m::job_event(JobEvent::NotFound, &c.provider, &c.account, 1)
                            }
                            Some(executor::UNCHANGED) => {
                                m::job_event(JobEvent::Unchanged, &c.provider, &c.account, 1)
                            }
                            _ => {}
                        }
                        m::job_event(JobEvent::Succeeded, &c.provider, &c.account, 1);
                        m::job_event(
                            JobEvent::Coalesced,
                            &c.provider,
                            &c.account,
                            followers.len() as u64,
                        );
                        shared.stats.add_succeeded(1, followers.len() as u64);
                        activity.delivered(&c.account, 1 + followers.len());
                    }
                    written.push(c);
                }
            }
            Err(e) if is_lock_timeout(&e) && group.len() > 1 => {
                groups.extend(group.into_iter().map(|c| vec![c]));
            }
            Err(e) if is_lock_timeout(&e) => {
                tracing::info!(jobs = ?group.iter().map(|c| c.lease.id).collect::<Vec<_>>(), "a double-opt-in ledger row of this call is held by another transaction; its outcome is written once it is free");
                unwritten.extend(group);
            }
            // (a batch the database refused for what it holds is split, to find the outcome at
            // fault; one it could not take now (shutting down, too many connections, a
            // serialization failure) is kept whole for the next round)
            Err(e) if !is_transient(&e) && group.len() > 1 => {
                tracing::warn!(error = %e, jobs = group.len(), "the database refused a batch of outcomes; writing them one by one");
                groups.extend(group.into_iter().map(|c| vec![c]));
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = group.len(), "could not record delivered jobs; keeping their leases and trying again");
                unreachable |= is_transient(&e);
                unwritten.extend(group);
            }
        }
    }

    let hold_for = shared.settings.http.abandoned_call_bound;
    // Failed calls that need nothing but their row written (dead, or back to pending later):
    // one statement for the batch. What it could not write (a row held elsewhere, a lease
    // lost) goes the one-by-one way below, which says which.
    let (batch, mut others): (Vec<Completion>, Vec<Completion>) =
        others.into_iter().partition(|c| failure_of(c).is_some());
    if !batch.is_empty() && !unreachable {
        let items: Vec<complete::Failure> = batch.iter().filter_map(failure_of).collect();
        match complete::fail_many(pool, &items).await {
            Ok(leases) => {
                let leases: HashSet<_> = leases.into_iter().collect();
                for c in batch {
                    // (by lease: of two outcomes of one job, the stale one was not written)
                    if leases.contains(&c.lease) {
                        let dead = failure_of(&c).is_some_and(|f| f.retry_after.is_none());
                        failure_written(shared, &c, dead, activity);
                        written.push(c);
                    } else {
                        others.push(c);
                    }
                }
            }
            Err(e) if is_transient(&e) => {
                tracing::error!(error = %e, jobs = batch.len(), "could not record failed calls; keeping their leases and trying again");
                unreachable = true;
                unwritten.extend(batch);
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "the database refused a batch of failed calls; writing them one by one");
                others.extend(batch);
            }
        }
    } else {
        others.extend(batch);
    }
    for c in others {
        if unreachable {
            unwritten.push(c);
            continue;
        }
        // a call that got no answer and is not held: what it may have left at the provider is
        // recorded here (held calls record it in the hold's own statement)
        let unanswered_unheld = match c.outcome {
            Outcome::Retry {
                abandoned: true,
                sent_modify_ts,
                ..
            } if hold_for.is_zero() => Some(sent_modify_ts),
            _ => None,
        };
        if let Some(sent_modify_ts) = unanswered_unheld {
            // recorded before the outcome, or the outcome waits
            match synced::forget_contacts_of(pool, &[c.lease.id], sent_modify_ts).await {
                Ok(()) => {}
                Err(e) if is_permanent(&e) => {
                    tracing::error!(job_id = c.lease.id, error = %e, "could not record that a call got no answer (the provider may hold it or not); its contact's next changes may be merged or skipped as if it had not arrived")
                }
                Err(e) => {
                    tracing::warn!(job_id = c.lease.id, error = %e, "could not record that a call got no answer (the provider may hold it or not); keeping its outcome and trying again");
                    unreachable |= is_transient(&e);
                    unwritten.push(c);
                    continue;
                }
            }
        }
        let result = match &c.outcome {
            Outcome::Success { .. } => continue,
            Outcome::Retry {
                delay,
                error,
                abandoned: true,
                sent_modify_ts,
                ..
            } if !hold_for.is_zero() => complete::hold(
                pool,
                c.lease,
                hold_for.max(*delay),
                error,
                *sent_modify_ts,
            )
                .await
                .inspect(|w| {
                    if *w == Write::Done {
                        tracing::warn!(job_id = c.lease.id, hold_ms = hold_for.max(*delay).as_millis() as u64, error = %error.message, "no answer to a call the provider may still be acting on: nothing more is sent for this contact until the hold has passed");
                        m::job_event(JobEvent::Retried, &c.provider, &c.account, 1);
                        shared.stats.add_retried();
                        activity.failed(&c.account);
                    }
                }),
            Outcome::Retry {
                delay,
                error,
                attempt,
                ..
            } => complete::retry_or_kill(pool, c.lease, c.max_attempts, *delay, error, *attempt)
                .await
                .map(|state| match state {
                    Ok(state) => {
                        failure_written(shared, &c, state == JobState::Dead, activity);
                        Write::Done
                    }
                    Err(why) => why,
                }),
            Outcome::Dead { error } => complete::kill(pool, c.lease, error).await.inspect(|w| {
                if *w == Write::Done {
                    failure_written(shared, &c, true, activity);
                }
            }),
            Outcome::Release => complete::release_one(pool, c.lease, true).await,
        };
        match result {
            Ok(Write::Done) => written.push(c),
            Ok(Write::Lost) => {
                lease_lost(shared, &c);
                written.push(c);
            }
            Ok(Write::Held) => {
                tracing::info!(job_id = c.lease.id, "the job's row is held by another transaction; its outcome is written once it is free");
                unwritten.push(c);
            }
            Err(e) => {
                tracing::error!(job_id = c.lease.id, error = %e, "could not record the outcome; keeping the lease and trying again");
                unreachable |= is_transient(&e);
                unwritten.push(c);
            }
        }
    }
    (written, unwritten, !unreachable)
}

/// A failed call whose outcome is only its row: dead, or back to pending after a delay (not a
/// call that got no answer: it is held, or its uncertainty recorded first).
fn failure_of(c: &Completion) -> Option<complete::Failure<'_>> {
    match &c.outcome {
        Outcome::Dead { error } => Some(complete::Failure {
            lease: c.lease,
            error,
            retry_after: None,
            attempt: complete::Attempt::Counts,
        }),
        Outcome::Retry {
            delay,
            error,
            attempt,
            abandoned: false,
            ..
        } => {
            let used_up =
                *attempt == complete::Attempt::Counts && c.lease.attempt >= c.max_attempts;
            Some(complete::Failure {
                lease: c.lease,
                error,
                retry_after: (!used_up).then_some(*delay),
                attempt: *attempt,
            })
        }
        _ => None,
    }
}

/// The counters and the log of a failed call once its row is written.
fn failure_written(shared: &Shared, c: &Completion, dead: bool, activity: &mut Activity) {
    activity.failed(&c.account);
    if !dead {
        m::job_event(JobEvent::Retried, &c.provider, &c.account, 1);
        shared.stats.add_retried();
        return;
    }
    if let Outcome::Retry { error, .. } = &c.outcome {
        tracing::error!(job_id = c.lease.id, attempts = c.lease.attempt, error = %error.message, "attempts used up; job parked as dead");
    }
    m::job_event(JobEvent::Dead, &c.provider, &c.account, 1);
    shared.stats.add_dead();
}

fn success_of(c: &Completion) -> Option<Success> {
    match &c.outcome {
        Outcome::Success {
            doi,
            sent_md5,
            followers,
            sets_status,
            modify_ts,
            outcome,
            synced,
            ledger,
        } => Some(Success {
            lease: c.lease,
            doi: doi.clone(),
            sent_md5: sent_md5.clone(),
            followers: followers.clone(),
            sets_status: *sets_status,
            modify_ts: *modify_ts,
            outcome: outcome.map(str::to_string),
            synced: synced.clone(),
            after_call: ledger.as_deref().cloned(),
        }),
        _ => None,
    }
}

fn lease_lost(shared: &Shared, c: &Completion) {
    tracing::warn!(job_id = c.lease.id, attempt = c.lease.attempt, "lease lost before the outcome was recorded: another worker owns the job now; nothing written");
    m::job_event(JobEvent::LeaseLost, &c.provider, &c.account, 1);
    shared.stats.add_lost();
}
