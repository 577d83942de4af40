//! `contact-sync bench`: the end-to-end benchmark. It uses `DATABASE_URL` or a throwaway
//! Postgres (fsync on, default `synchronous_commit`), the sandbox in-process (or
//! `--sandbox-url`), and real worker processes (`contact-sync run`), and prints one JSON line.
//!
//! The workers are started once (`worker_start_ms`: until every one is registered), serve the
//! idle-latency samples, drain an unmeasured warm-up backlog (`--warmup`), and are then kept as a
//! deployment keeps them: stopped (`SIGSTOP`) while each backlog is enqueued and its claims
//! probed, continued (`SIGCONT`) for its drain. For each backlog size of `--sizes` (5k, 20k, 100k
//! and 1M by default), one after the other on the same database (finished rows accumulate, as in
//! production):
//!
//! - `enqueue_jobs_per_s`: the backlog enqueued through the Rust batch API (two producers);
//! - `claim_ms_p50` / `claim_ms_p99`: the claim statement of a 256-job batch against that backlog
//!   (run and rolled back, so the backlog stays);
//! - `e2e_jobs_per_s`: from continuing the workers until the last job's `finished_at` (on the
//!   database's clock), each job a signed HTTP call to the sandbox, both providers, distinct
//!   contacts unless `--contacts`;
//! - `cpu_us_per_job`: CPU time per delivered job of the worker processes, of Postgres (the
//!   processes of the database's cluster when it runs on this machine: its postmaster, exited
//!   backends included, and its children) and of this process (the sandbox);
//! - `wal_bytes_per_job`: the write-ahead log the cluster wrote during the drain, per job.
//!
//! Then the blocked scenario (`--blocked-contacts` contacts of the Smartlink account, each with
//! its head scheduled an hour later and `--blocked-depth` changes behind it) with the
//! `--blocked-jobs` backlog draining beside it, and the idle latency: single jobs enqueued one at a
//! time into an idle worker, from the enqueue statement to the provider receiving the call.
//!
//! Last, the calls-only scenario (`--floor-calls`): the same signed calls, made by a process of
//! this binary through the worker's provider clients at the worker's concurrency, with no
//! database. Its CPU per call is the least a worker needs per job; the sandbox's CPU per call is
//! the sandbox's share of every job.

mod capture;
mod cpu;
mod fleet;
mod report;
mod scenarios;
mod workload;

pub use report::{render, BenchResult};
pub use scenarios::calls_only;

use super::args::BenchArgs;
use super::demo;
use anyhow::bail;
use contact_sync::outbox::{enqueue_batch, repair, NewJob};
use contact_sync::sandbox::Sandbox;
use cpu::{find_postmaster, POSTMASTER};
use fleet::{config_file, drained, e2e, Fleet, RemovedOnDrop, WorkerProcess};
use report::{RateResult, SizeResult};
use scenarios::{claim_latency, latency, measure_floor, percentile};
use serde_json::json;
use sqlx::PgPool;
use std::path::Path;
use std::time::{Duration, Instant};
use workload::{blocked_jobs, finished, jobs, load};

pub(crate) const ACCOUNTS: [&str; 2] = ["bench_jc", "bench_sl"];

/// The rate scenario's account (the sandbox's `demo` login, limited).
pub(crate) const RATE_ACCOUNT: &str = "bench_rate";

/// Starts each measured run from the same state: dirty pages flushed, statistics current.
/// (CHECKPOINT needs a superuser; without one the run simply starts as it is.)
async fn quiesce(pool: &PgPool) {
    let _ = sqlx::query("ANALYZE contact_sync.jobs").execute(pool).await;
    let _ = sqlx::query("CHECKPOINT").execute(pool).await;
}

pub async fn run(args: BenchArgs, database_url: Option<String>) -> anyhow::Result<BenchResult> {
    let started = Instant::now();
    if database_url.is_none() {
        eprintln!(
            "bench: starting a throwaway PostgreSQL (fsync on, default synchronous_commit) ..."
        );
    }
    let (_pg, pool, url) = contact_sync::pg::open(
        database_url,
        "max_wal_size = 4GB\ncheckpoint_timeout = 15min",
        4,
    )
    .await?;
    for account in ACCOUNTS.iter().chain(&["bench_old"]) {
        repair::purge_account(&pool, account, None).await?;
    }
    let _ = POSTMASTER.set(find_postmaster(&pool).await?);
    let sandbox = match &args.sandbox_url {
        Some(_) => None,
        None => Some(Sandbox::start("127.0.0.1:0".parse()?, demo::sandbox_accounts()).await?),
    };
    let base = match (&args.sandbox_url, &sandbox) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, Some(s)) => s.url(),
        (None, None) => bail!("no sandbox"),
    };
    let dir = std::env::temp_dir();
    let config = RemovedOnDrop(config_file(
        &args,
        &format!("{base}/justclick/demo"),
        &format!("{base}/smartlink"),
        &dir,
    )?);
    let config = config.0.as_path();

    eprintln!(
        "bench: starting {} worker process(es) ...",
        args.workers.max(1)
    );
    let mut fleet = Fleet::start(&pool, config, &url, args.workers).await?;
    let worker_start_ms = fleet.start_ms;
    // first, on a quiet database: an idle worker
    let (latency_ms_p50, latency_ms_p99) = match (&sandbox, args.latency_samples) {
        (Some(s), n) if n > 0 => {
            eprintln!("bench: idle latency, {n} single jobs ...");
            let samples = latency(&pool, s, n).await?;
            (percentile(&samples, 50.0), percentile(&samples, 99.0))
        }
        _ => (None, None),
    };
    if args.warmup > 0 {
        eprintln!("bench: warm-up, {} jobs (not measured) ...", args.warmup);
        let (before, _) = finished(&pool).await?;
        load(&pool, &jobs(&args, args.warmup, args.sizes.len() + 2)).await?;
        drained(&pool, &mut fleet, before, args.warmup).await?;
    }
    fleet.pause(&pool).await?;

    let mut sizes = Vec::new();
    for (wave, &size) in args.sizes.iter().enumerate() {
        sizes.push(measure_size(&pool, &args, &mut fleet, size, wave, 0).await?);
    }
    let blocked = if args.blocked_contacts > 0 && args.blocked_jobs > 0 {
        let stuck = blocked_jobs(args.blocked_contacts, args.blocked_depth);
        eprintln!("bench: blocked scenario: {} blocked jobs ...", stuck.len());
        // one producer: each contact's head is committed before the changes behind it
        let mut conn = pool.acquire().await?;
        for chunk in stuck.chunks(5000) {
            enqueue_batch(&mut conn, chunk).await?;
        }
        drop(conn);
        let wave = args.sizes.len() + 1;
        let r = measure_size(
            &pool,
            &args,
            &mut fleet,
            args.blocked_jobs,
            wave,
            stuck.len(),
        )
        .await?;
        repair::purge_account(&pool, ACCOUNTS[1], None).await?;
        Some(r)
    } else {
        None
    };
    let peak = fleet.finish().await?;
    let rate = match (args.rate, &sandbox) {
        (Some(r), Some(s)) => Some(measure_rate(&pool, &args, r, s, config, &url).await?),
        (Some(_), None) => bail!("--rate needs the in-process sandbox (not --sandbox-url)"),
        (None, _) => None,
    };
    let floor = match args.floor_calls {
        0 => None,
        n => {
            eprintln!("bench: calls only, {n} calls without a database ...");
            Some(measure_floor(config, n, args.provider, sandbox.is_some()).await?)
        }
    };
    let capture = match args.capture_rows {
        0 => None,
        rows => Some(capture::measure(&pool, config, rows).await?),
    };
    let rates: Vec<f64> = sizes.iter().map(|s| s.e2e_jobs_per_s).collect();
    let e2e_min_over_max = match (
        rates.iter().copied().reduce(f64::min),
        rates.iter().copied().reduce(f64::max),
    ) {
        (Some(min), Some(max)) if max > 0.0 => Some((min / max * 100.0).round() / 100.0),
        _ => None,
    };
    let blocked_over_unblocked = blocked.as_ref().and_then(|b| {
        let nearest = sizes.iter().min_by_key(|s| s.backlog.abs_diff(b.backlog))?;
        (nearest.e2e_jobs_per_s > 0.0)
            .then(|| (b.e2e_jobs_per_s / nearest.e2e_jobs_per_s * 100.0).round() / 100.0)
    });

    if _pg.is_none() {
        for account in ACCOUNTS.iter().chain(&["bench_old", RATE_ACCOUNT]) {
            repair::purge_account(&pool, account, None).await?;
        }
    }
    pool.close().await;
    if let Some(s) = sandbox {
        s.stop().await;
    }
    Ok(BenchResult {
        provider: args.provider,
        concurrency: args.concurrency,
        batch_size: args.batch_size,
        workers: args.workers,
        sizes,
        blocked,
        e2e_min_over_max,
        blocked_over_unblocked,
        capture,
        latency_ms_p50: latency_ms_p50.map(|v| (v * 100.0).round() / 100.0),
        latency_ms_p99: latency_ms_p99.map(|v| (v * 100.0).round() / 100.0),
        rate,
        floor,
        worker_start_ms,
        peak_rss_mb: (peak * 10.0).round() / 10.0,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

/// The rate scenario: `rate × rate_seconds` jobs of one limited account, drained by
/// `--workers` processes; the sandbox's arrival times are the measure.
async fn measure_rate(
    pool: &PgPool,
    args: &BenchArgs,
    rate: f64,
    sandbox: &Sandbox,
    config: &Path,
    url: &str,
) -> anyhow::Result<RateResult> {
    let n = ((rate * args.rate_seconds as f64).ceil() as usize).max(20);
    eprintln!(
        "bench: rate scenario: {n} jobs at {rate}/s over {} worker(s) ...",
        args.workers
    );
    repair::purge_account(pool, RATE_ACCOUNT, None).await?;
    let batch: Vec<NewJob> = (0..n)
        .map(|i| {
            NewJob::new(
                "justclick",
                RATE_ACCOUNT,
                format!("rate{i}@bench.example.com"),
                json!({"lead_name": format!("User {i}")}),
            )
        })
        .collect();
    load(pool, &batch).await?;
    let before = sandbox.account_log("justclick", "demo").arrivals.len();
    let started = Instant::now();
    let procs: Vec<WorkerProcess> = (0..args.workers)
        .map(|_| WorkerProcess::spawn(config, url, true))
        .collect::<Result<_, _>>()?;
    for mut p in procs {
        let (code, _) = p.wait().await?;
        if code != 0 {
            bail!("worker exited with {code}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let arrivals: Vec<Instant> = sandbox
        .account_log("justclick", "demo")
        .arrivals
        .split_off(before);
    let span = match (arrivals.first(), arrivals.last()) {
        (Some(a), Some(b)) if b > a => (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    let mut worst = 0;
    let mut end = 0;
    for (i, start) in arrivals.iter().enumerate() {
        while end < arrivals.len() && arrivals[end] < *start + Duration::from_secs(1) {
            end += 1;
        }
        worst = worst.max(end - i);
    }
    repair::purge_account(pool, RATE_ACCOUNT, None).await?;
    Ok(RateResult {
        workers: args.workers,
        configured_per_s: rate,
        burst: args.burst.map_or(rate.ceil().max(1.0), f64::from),
        calls: arrivals.len(),
        // n calls span n - 1 intervals
        achieved_per_s: if span > 0.0 {
            ((arrivals.len().saturating_sub(1)) as f64 / span * 10.0).round() / 10.0
        } else {
            0.0
        },
        worst_1s_window: worst,
        seconds: (seconds * 10.0).round() / 10.0,
    })
}

/// Enqueues one backlog while the (stopped) fleet waits, measures its claims, drains it.
async fn measure_size(
    pool: &PgPool,
    args: &BenchArgs,
    fleet: &mut Fleet,
    size: usize,
    wave: usize,
    blocked: usize,
) -> anyhow::Result<SizeResult> {
    eprintln!("bench: backlog of {size}: enqueueing ...");
    let batch = jobs(args, size, wave);
    let enqueue_jobs_per_s = load(pool, &batch).await?;
    drop(batch);
    quiesce(pool).await;
    let claims = claim_latency(pool, 30).await?;
    eprintln!("bench: backlog of {size}: e2e run ...");
    quiesce(pool).await;
    let mut drain = e2e(pool, fleet, size).await?;
    if args.sandbox_url.is_some() {
        // the sandbox is another process: this one's CPU says nothing about it
        drain.cpu.sandbox = None;
    }
    let ms = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
    Ok(SizeResult {
        backlog: size,
        blocked,
        enqueue_jobs_per_s: enqueue_jobs_per_s.round(),
        claim_ms_p50: ms(percentile(&claims, 50.0)),
        claim_ms_p99: ms(percentile(&claims, 99.0)),
        e2e_jobs_per_s: drain.jobs_per_s.round(),
        coalesced: drain.coalesced,
        cpu_us_per_job: drain.cpu,
        wal_bytes_per_job: drain.wal_bytes_per_job,
    })
}
