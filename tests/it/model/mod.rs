//! Model-based randomized end-to-end test. Each round draws, from one seed, a workload of
//! contact changes (valid ones at every limit, adversarial ones that must be refused at
//! enqueue), a fault schedule (kill -9 of workers, provider faults, Postgres restarts) and the
//! worker settings; it runs real `contact-sync run` processes against its own database and the
//! in-process sandbox, lets everything drain, and then holds the outcome to invariants:
//!
//! - **a** every accepted change ended `succeeded`/`coalesced`, or `dead` because the provider
//!   refused it permanently (an injected error code, named in `last_error`); nothing is left
//!   `pending`/`running`; a refused change never became a row.
//! - **b** each contact the sandbox holds equals the reference model (`providers::model`) applied
//!   to the changes the outbox says were delivered, in id order (with the pending status taken
//!   out of the changes asking for it where the `doi` column says so; any other status of the
//!   same call still applies). A change whose answer was lost and that never
//!   succeeded may or may not have reached the provider, with or without its status (the
//!   worker may have taken it out and a job that never succeeded records no `doi`): the contact
//!   must equal the model under one of those histories, and the confirmation emails sent must
//!   lie within what the histories that explain it ask for.
//! - **c** never two calls in flight for one contact; never a second confirmation email, and no
//!   second confirmation request inside the hour except a retry of a call whose answer was lost;
//!   a pending status taken out only when another call to the address asked for it.
//! - **d** no secret, `sig=`, `hash=`, ESC or NUL in any worker's output or the stored errors.
//! - **e** every refusal is SQLSTATE 22023 naming the field; idempotency keys and all-or-nothing
//!   batches hold; the sandbox verified every request; workers exit 0 on SIGTERM.
//! - **f** the application's own table, captured (`app.rs`), written with plain SQL before and
//!   while the workers run, each write at a drawn isolation level: no write fails or aborts
//!   because of contact-sync, every captured change is delivered, nothing is rejected, each
//!   provider ends as the table is for every row in scope, and every address that left is
//!   unsubscribed at Smartlink.
//!
//! Every change is recorded in its own transaction at `READ COMMITTED`, `REPEATABLE READ` or
//! `SERIALIZABLE` (drawn per change).
//!
//! Faults: kill -9 of a worker (replaced after up to 1.5 s), sandbox faults (5xx, 429 with
//! `Retry-After: 1`, stalls past the request timeout, slow answers applied after the worker gave
//! up on them (as a real service finishes a request whose client went away; the workers hold
//! such a contact for `http.abandoned_call_bound`), resets mid-response, forged and unverifiable
//! answers, malformed bodies, permanent error codes whose text holds a NUL and an ANSI escape),
//! per-request delays, deferred confirmation re-sends brought forward in database time, and in
//! every round whose seed is a multiple of 3, a fast and an immediate restart of Postgres (a
//! cluster of its own, so other tests keep theirs).
//!
//! `CONTACT_SYNC_MODEL_SEED` fixes the first round's seed (random otherwise; round `i` uses
//! `seed + i`), `CONTACT_SYNC_MODEL_SECS` the budget (default 150: five rounds of about 25 s, over two minutes).
//! Every failure prints the one command that replays its round. A seed fixes the workload, the
//! fault schedule and the settings; the interleaving of the processes still varies from run to
//! run (the invariants hold for every interleaving).

mod app;
mod invariants;
mod plan;
mod round;

use crate::helpers::*;
use round::run_round;
use std::time::Duration;

/// One round takes at most about this long (setup, chaos, drain, checks).
pub(crate) const ROUND_SECS: u64 = 30;

pub(crate) const DEFAULT_SECS: u64 = 150;

/// Workers run under injected faults for this long; then the queue drains in peace.
pub(crate) const CHAOS: Duration = Duration::from_secs(22);

pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) const LEASE: Duration = Duration::from_secs(3);

pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Longer than any stall. (The sandbox applies a stalled change at once and only answers late,
/// so the provider has acted although the worker saw a timeout: the retry repeats the change.)
pub(crate) const BACKOFF_BASE: Duration = Duration::from_secs(2);

pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(4);

/// Stalls: longer than the request timeout, shorter than the backoff base and the lease.
pub(crate) const STALL_MS: std::ops::RangeInclusive<u64> = 1300..=1800;

/// In rounds with slow calls: stalls longer than the lease, answered before the request timeout.
pub(crate) const SLOW_STALL_MS: std::ops::RangeInclusive<u64> = 3500..=4500;

pub(crate) const SLOW_REQUEST_TIMEOUT: Duration = Duration::from_secs(6);

/// Slow answers (`Fault::Slow`): applied this long after the request timeout, when the worker
/// has given up (a real service finishes a request whose client went away).
pub(crate) const SLOW_PAST_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 200..=1200;

/// `http.abandoned_call_bound`: longer than any slow answer's time past the request timeout
/// (plus the per-request delay), so a held call is over before its contact is called again.
pub(crate) const ABANDONED_CALL_BOUND: Duration = Duration::from_millis(1600);

/// Finished rows a day old that the workers prune during a slow round (retention 1 h).
pub(crate) const HOUSEKEEPING_BACKLOG: i64 = 150_000;

/// Their account (no worker serves it; the checks leave it out).
pub(crate) const HOUSEKEEPING_ACCOUNT: &str = "housekeeping";

pub(crate) const JC2_LOGIN: &str = "model_jc2";

pub(crate) const JC2_SECRET: &str = "jc2-model-secret-5d1f0c93e2";

pub(crate) const SL2_GAME: &str = "4242";

pub(crate) const SL2_SECRET: &str = "sl2-model-secret-a7e2b4f81c";

/// In every injected permanent error text (with a NUL and an ANSI escape around it).
pub(crate) const PERMANENT_MARK: &str = "injected-permanent";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Account {
    pub(crate) name: &'static str,
    pub(crate) provider: &'static str,
    /// JustClick login or Smartlink game id.
    pub(crate) remote: &'static str,
}

/// `sl` defers confirmation re-sends (the default), `sl2` drops them.
pub(crate) const ACCOUNTS: [Account; 4] = [
    Account {
        name: "jc",
        provider: "justclick",
        remote: JC_LOGIN,
    },
    Account {
        name: "jc2",
        provider: "justclick",
        remote: JC2_LOGIN,
    },
    Account {
        name: "sl",
        provider: "smartlink",
        remote: SL_GAME,
    },
    Account {
        name: "sl2",
        provider: "smartlink",
        remote: SL2_GAME,
    },
];

pub(crate) const SECRETS: [&str; 4] = [JC_SECRET, JC2_SECRET, SL_SECRET, SL2_SECRET];

pub(crate) fn replay(seed: u64) -> String {
    format!(
        "CONTACT_SYNC_MODEL_SEED={seed} CONTACT_SYNC_MODEL_SECS={ROUND_SECS} bash scripts/test.sh model"
    )
}

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a non-negative integer, got {text:?}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(crate) async fn model_based_randomized_rounds() {
    let first = env_u64("CONTACT_SYNC_MODEL_SEED").unwrap_or_else(|| fastrand::u64(1..1 << 40));
    let budget = env_u64("CONTACT_SYNC_MODEL_SECS").unwrap_or(DEFAULT_SECS);
    let rounds = (budget / ROUND_SECS).max(1);
    eprintln!(
        "model test: seed {first}, {rounds} round(s) (seeds {first}..={}); replay the first with: {}",
        first.wrapping_add(rounds - 1),
        replay(first)
    );
    for i in 0..rounds {
        run_round(first.wrapping_add(i)).await;
    }
}
