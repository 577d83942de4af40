//! The single writer of outcomes: batches successes into one fenced statement, writes retries
//! and dead jobs one by one, frees the slots, and wakes the producer. A database error while
//! recording is not a job outcome: it is retried for a while, then logged, and the job is left
//! to its lease (the rescuer returns it).

use super::executor::{Completion, Outcome};
use super::Shared;
use crate::metrics::{self as m, JobEvent};
use crate::outbox::complete::{self, Success};
use crate::outbox::JobState;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Most completions written by one statement.
const MAX_BATCH: usize = 1024;

pub async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Completion>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        write(&shared, std::mem::take(&mut batch)).await;
        shared.wake.notify_one();
    }
}

/// Retries a database write with backoff for up to half a lease.
async fn with_retries<T, F, Fut>(shared: &Shared, what: &str, mut op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let budget = shared.settings.worker.lease / 2;
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() + delay < budget => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "could not record {what}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn write(shared: &Shared, batch: Vec<Completion>) {
    let pool = &shared.pool;
    let successes: Vec<Success> = batch
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Success { doi, followers } => Some(Success {
                lease: c.lease,
                doi: doi.clone(),
                followers: followers.clone(),
            }),
            _ => None,
        })
        .collect();
    if !successes.is_empty() {
        match with_retries(shared, "successes", || {
            complete::succeed_many(pool, &successes)
        })
        .await
        {
            Ok(lost) => {
                let lost: std::collections::HashSet<_> = lost.into_iter().collect();
                for c in &batch {
                    if let Outcome::Success { followers, .. } = &c.outcome {
                        if lost.contains(&c.lease.id) {
                            lease_lost(shared, c);
                        } else {
                            m::job_event(JobEvent::Succeeded, &c.provider, &c.account, 1);
                            m::job_event(
                                JobEvent::Coalesced,
                                &c.provider,
                                &c.account,
                                followers.len() as u64,
                            );
                            shared.stats.add_succeeded(1, followers.len() as u64);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = successes.len(), "could not record delivered jobs; their leases will expire and they will be delivered again")
            }
        }
    }
    for c in &batch {
        let written = match &c.outcome {
            Outcome::Success { .. } => continue,
            Outcome::Retry { delay, error } => {
                with_retries(shared, "a retry", || complete::retry_or_kill(pool, c.lease, c.max_attempts, *delay, error))
                    .await
                    .map(|state| match state {
                        Some(JobState::Dead) => {
                            tracing::error!(job_id = c.lease.id, attempts = c.lease.attempt, error = %error.message, "attempts used up; job parked as dead");
                            m::job_event(JobEvent::Dead, &c.provider, &c.account, 1);
                            shared.stats.add_dead();
                            true
                        }
                        Some(_) => {
                            m::job_event(JobEvent::Retried, &c.provider, &c.account, 1);
                            shared.stats.add_retried();
                            true
                        }
                        None => false,
                    })
            }
            Outcome::Dead { error } => with_retries(shared, "a dead job", || complete::kill(pool, c.lease, error))
                .await
                .inspect(|ok| {
                    if *ok {
                        m::job_event(JobEvent::Dead, &c.provider, &c.account, 1);
                        shared.stats.add_dead();
                    }
                }),
            Outcome::Release => complete::release(pool, &[c.lease], true).await.map(|n| n == 1),
        };
        match written {
            Ok(true) => {}
            Ok(false) => lease_lost(shared, c),
            Err(e) => {
                tracing::error!(job_id = c.lease.id, error = %e, "could not record the outcome; the lease will expire and the job will be retried")
            }
        }
    }
    if let Ok(mut in_flight) = shared.in_flight.lock() {
        for c in &batch {
            in_flight.remove(&c.lease.id);
        }
        m::in_flight(in_flight.len());
    }
    drop(batch); // frees the slots
}

fn lease_lost(shared: &Shared, c: &Completion) {
    tracing::warn!(job_id = c.lease.id, attempt = c.lease.attempt, "lease lost before the outcome was recorded: another worker owns the job now; nothing written");
    m::job_event(JobEvent::LeaseLost, &c.provider, &c.account, 1);
    shared.stats.add_lost();
}
