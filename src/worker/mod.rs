//! The worker: [`Worker::run`] (the daemon, until a shutdown signal) and [`Worker::drain`]
//! (until nothing is runnable now). It wires the parts below:
//!
//! - `producer`: claims batches when slots are free, woken by NOTIFY, completions or a jittered
//!   poll; spawns one executor per job;
//! - `executor`: one provider call, turned into one outcome;
//! - `completer`: the only writer of outcomes, batched;
//! - `maintenance`: lease heartbeat, rescue of expired leases, due double-opt-in re-sends,
//!   retention pruning;
//! - `retry`, `rate_limit`, `double_opt_in`: pure policies and their bookkeeping;
//! - `shutdown`: SIGTERM/SIGINT → a cancellation token.

mod completer;
#[doc(hidden)]
pub mod double_opt_in;
mod executor;
#[doc(hidden)]
pub mod limits;
mod maintenance;
mod producer;
#[doc(hidden)]
pub mod retry;
#[doc(hidden)]
pub mod shutdown;

use crate::config::Settings;
use crate::outbox::accounts::AccountLimits;
use crate::outbox::replicas::Replica;
use crate::outbox::JobId;
use crate::outbox::Lease;
use crate::providers::Registry;
use limits::Limits;
pub use shutdown::Shutdown;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

/// State shared by the worker's tasks.
pub(crate) struct Shared {
    pub pool: PgPool,
    /// The claim's and the completion's sessions ([`crate::outbox::hot`]), to the same database.
    pub hot: PgPool,
    /// Held by the loop running now: the in-flight map is the worker's, and a loop that ends
    /// puts back every claim in it, so two loops of one worker never run at once.
    pub running: tokio::sync::Mutex<()>,
    pub settings: Settings,
    pub registry: Registry,
    /// Accounts this worker serves (the registry's); other accounts' jobs wait.
    pub accounts: Vec<String>,
    /// Accounts a source captures into: their deliveries are recorded in the synced state.
    /// (sorted, without repeats: the claim binds it as it is)
    pub captured: Vec<String>,
    /// Written into `locked_by`: host, pid and a random tag.
    pub worker_id: String,
    pub limits: Limits,
    /// This replica as `contact_sync.workers` shows it.
    pub replica: Replica,
    /// The accounts' provider and fleet-wide limits, registered at start.
    pub account_limits: Vec<AccountLimits>,
    /// Leases held right now (job id → attempt), for the heartbeat and shutdown.
    pub in_flight: Mutex<HashMap<JobId, i32>>,
    /// The leases among those whose call was started (a shutdown that abandons them holds
    /// their jobs instead of putting them back: the provider may still act on the call).
    pub calls_started: Mutex<HashSet<Lease>>,
    /// Since when, and until when, this replica's row in `contact_sync.workers` is known to
    /// have held without a gap (until: its last heartbeat's start plus one lease): while it
    /// holds, no rescuer takes a job this worker claimed within that time.
    pub alive: Mutex<Alive>,
    /// Wakes the producer (NOTIFY, completions).
    pub wake: Notify,
    /// Where housekeeping's sweep over the contacts with waiting jobs goes on from.
    pub waits_cursor: Mutex<String>,
    pub stats: Stats,
    /// Set by this worker's first registration: only a start (which may bring a corrected
    /// configuration) ends a pause for refused credentials, not every `drain`.
    pub registered_once: std::sync::atomic::AtomicBool,
}

/// This replica's liveness as its heartbeats showed it (see [`Shared::alive`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Alive {
    since: Option<Instant>,
    until: Option<Instant>,
}

impl Shared {
    /// Does the lease of a job claimed at `claimed_at` still hold, as far as this worker can
    /// tell from its own clock? It holds one lease after the claim began, and, if this
    /// replica's row has been renewed without a gap since the claim, one lease after the start
    /// of the last renewal (the rescuer takes a job only once its worker's row has expired). A
    /// worker stopped or cut off past that may have lost the job to another worker.
    pub fn lease_holds(&self, claimed_at: Instant) -> bool {
        let mut until = claimed_at + self.settings.worker.lease;
        if let Ok(alive) = self.alive.lock() {
            if let (Some(since), Some(alive_until)) = (alive.since, alive.until) {
                if since <= claimed_at {
                    until = until.max(alive_until);
                }
            }
        }
        Instant::now() < until
    }

    /// This replica's row was renewed by a statement that started at `beat_started`;
    /// `continuous`: it had not expired before (no other worker may have rescued its jobs).
    pub fn renewed(&self, beat_started: Instant, continuous: bool) {
        if let Ok(mut alive) = self.alive.lock() {
            if !continuous || alive.since.is_none() {
                alive.since = Some(beat_started);
            }
            let until = beat_started + self.settings.worker.lease;
            alive.until = Some(alive.until.map_or(until, |a| a.max(until)));
            if !continuous {
                alive.until = Some(until);
            }
        }
    }

    /// The call of this lease is about to be sent.
    pub fn call_started(&self, lease: Lease) {
        if let Ok(mut started) = self.calls_started.lock() {
            started.insert(lease);
        }
    }
}

/// Counters of one worker's life, for `--drain` summaries, tests and the demo.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Stats {
    claimed: AtomicU64,
    succeeded: AtomicU64,
    coalesced: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    lease_lost: AtomicU64,
}

impl Stats {
    fn add_claimed(&self, n: u64) {
        self.claimed.fetch_add(n, Ordering::Relaxed);
    }
    fn add_succeeded(&self, n: u64, coalesced: u64) {
        self.succeeded.fetch_add(n, Ordering::Relaxed);
        self.coalesced.fetch_add(coalesced, Ordering::Relaxed);
    }
    fn add_retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    fn add_dead(&self) {
        self.dead.fetch_add(1, Ordering::Relaxed);
    }
    fn add_lost(&self) {
        self.lease_lost.fetch_add(1, Ordering::Relaxed);
    }

    pub fn report(&self) -> Report {
        Report {
            claimed: self.claimed.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            lease_lost: self.lease_lost.load(Ordering::Relaxed),
        }
    }
}

/// What a worker did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub claimed: u64,
    pub succeeded: u64,
    pub coalesced: u64,
    pub retried: u64,
    pub dead: u64,
    pub lease_lost: u64,
}

/// A contact-sync worker bound to one database and one set of provider accounts.
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(pool: PgPool, settings: Settings, registry: Registry) -> Worker {
        let accounts = registry.account_names();
        let limits = Limits::from_settings(&settings);
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        let worker_id = format!("{host}:{}:{:04x}", std::process::id(), fastrand::u16(..));
        let account_limits = accounts
            .iter()
            .filter_map(|name| {
                let a = settings.accounts.get(name)?;
                let rate = a.rate_limit_per_second;
                Some(AccountLimits {
                    account: name.clone(),
                    provider: a.provider.as_str().to_string(),
                    rate_per_second: rate,
                    // default burst: one second's worth, at least 1
                    burst: rate.map(|r| a.burst.map_or(r.ceil().max(1.0), f64::from)),
                    max_in_flight: a.max_in_flight.and_then(|m| i32::try_from(m).ok()),
                })
            })
            .collect();
        let replica = Replica {
            id: worker_id.clone(),
            host,
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            accounts: accounts.clone(),
            concurrency: i32::try_from(settings.worker.concurrency).unwrap_or(i32::MAX),
        };
        let captured: Vec<String> = settings
            .sources
            .values()
            .flat_map(|s| s.targets.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Worker {
            shared: Arc::new(Shared {
                hot: crate::outbox::hot::pool(&pool),
                running: tokio::sync::Mutex::new(()),
                pool,
                settings,
                registry,
                accounts,
                worker_id,
                limits,
                replica,
                account_limits,
                captured,
                in_flight: Mutex::new(HashMap::new()),
                calls_started: Mutex::new(HashSet::new()),
                alive: Mutex::new(Alive::default()),
                wake: Notify::new(),
                waits_cursor: Mutex::new(String::new()),
                stats: Stats::default(),
                registered_once: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// This worker's `locked_by` name.
    pub fn id(&self) -> &str {
        &self.shared.worker_id
    }

    pub fn report(&self) -> Report {
        self.shared.stats.report()
    }

    /// Jobs still `running` under this worker's name (after [`Worker::drain`] a clean drain
    /// leaves none; `run --drain` fails otherwise).
    pub async fn held_claims(&self) -> Result<i64, sqlx::Error> {
        crate::outbox::claim::held_by(&self.shared.pool, &self.shared.worker_id).await
    }

    /// Runs until `shutdown` fires: then stops claiming, lets in-flight calls finish within
    /// `worker.shutdown_timeout`, and puts unfinished claims back.
    /// A [`Shutdown`] also carries a second stage: when its `force` fires, in-flight calls are
    /// abandoned at once and their claims put back.
    ///
    /// One worker runs one loop at a time: a second `run` or `drain` of it waits for the first
    /// to end (a loop that ends puts back every claim of the worker's still in flight).
    pub async fn run(&self, shutdown: impl Into<Shutdown>) -> Report {
        let shutdown: Shutdown = shutdown.into();
        // (a shutdown fired while another loop of this worker runs ends this one unstarted)
        let _one_loop = tokio::select! {
            one = self.shared.running.lock() => one,
            _ = shutdown.graceful.cancelled() => return self.report(),
        };
        producer::run(self.shared.clone(), shutdown, false).await;
        self.report()
    }

    /// Runs until no job of this worker's accounts is runnable now and none is in flight
    /// (`contact-sync run --drain`; what tests use instead of sleeping).
    pub async fn drain(&self) -> Report {
        let _one_loop = self.shared.running.lock().await;
        producer::run(self.shared.clone(), Shutdown::new(), true).await;
        self.report()
    }

    /// Closes the hot path's connections ([`crate::outbox::hot`]; the worker's other
    /// connections are the pool it was given). A worker is not run again after this.
    pub async fn close(&self) {
        self.shared.hot.close().await;
    }

    /// [`Worker::drain`] that also stops when `shutdown` fires.
    pub async fn drain_until(&self, shutdown: impl Into<Shutdown>) -> Report {
        let shutdown: Shutdown = shutdown.into();
        // (a shutdown fired while another loop of this worker runs ends this one unstarted)
        let _one_loop = tokio::select! {
            one = self.shared.running.lock() => one,
            _ = shutdown.graceful.cancelled() => return self.report(),
        };
        producer::run(self.shared.clone(), shutdown, true).await;
        self.report()
    }
}
