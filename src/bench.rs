//! `contact-sync bench`: the end-to-end benchmark. It uses `DATABASE_URL` or a throwaway
//! Postgres (fsync on, default `synchronous_commit`), the sandbox in-process (or
//! `--sandbox-url`), and a real worker process (`contact-sync run`), and prints one JSON line:
//!
//! - `enqueue_jobs_per_s`: `--jobs` changes through the Rust batch API;
//! - `e2e_jobs_per_s`: worker start until all of them are finished (`run --drain`), each a signed
//!   HTTP call to the sandbox, both providers, distinct contacts unless `--contacts`;
//! - `latency_ms_p50` / `latency_ms_p99`: single jobs enqueued one at a time into an idle
//!   worker, from the enqueue statement to the provider receiving the call;
//! - `backlog_e2e_jobs_per_s`: the same e2e run with `--backlog` finished rows in the table;
//! - `peak_rss_mb`: the worker process's peak resident memory.

use crate::demo;
use crate::outbox::{admin, enqueue, enqueue_batch, NewJob};
use crate::sandbox::Sandbox;
use crate::table;
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchProvider {
    Both,
    Justclick,
    Smartlink,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Changes per e2e run.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// worker.concurrency of the worker process.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// worker.batch_size of the worker process.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Number of distinct contacts (fewer than --jobs forces coalescing).
    #[arg(long)]
    pub contacts: Option<usize>,
    #[arg(long, value_enum, default_value = "both")]
    pub provider: BenchProvider,
    /// Use a running sandbox (`contact-sync sandbox`, demo credentials) instead of one in-process.
    #[arg(long)]
    pub sandbox_url: Option<String>,
    /// Finished rows put in the table before the backlog run (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: usize,
    /// Single-job latency samples.
    #[arg(long, default_value_t = 200)]
    pub latency_samples: usize,
    /// Worker processes for the e2e runs (all on one database).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Also print a readable table.
    #[arg(long)]
    pub pretty: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub jobs: usize,
    pub provider: BenchProvider,
    pub concurrency: usize,
    pub batch_size: usize,
    pub workers: usize,
    pub contacts: usize,
    pub enqueue_jobs_per_s: f64,
    pub e2e_jobs_per_s: f64,
    pub coalesced: i64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub backlog_rows: usize,
    pub backlog_e2e_jobs_per_s: Option<f64>,
    pub peak_rss_mb: f64,
    pub cores: usize,
    pub seconds: f64,
}

const ACCOUNTS: [&str; 2] = ["bench_jc", "bench_sl"];

fn jobs(args: &BenchArgs, wave: usize) -> Vec<NewJob> {
    let contacts = args.contacts.unwrap_or(args.jobs).max(1);
    (0..args.jobs)
        .map(|i| {
            let c = i % contacts;
            let provider = match args.provider {
                BenchProvider::Justclick => "justclick",
                BenchProvider::Smartlink => "smartlink",
                BenchProvider::Both if c % 2 == 0 => "justclick",
                BenchProvider::Both => "smartlink",
            };
            let email = format!("user{c}.w{wave}@bench.example.com");
            if provider == "justclick" {
                NewJob::new(
                    provider,
                    ACCOUNTS[0],
                    email,
                    json!({"lead_name": format!("User {i}"), "lead_city": "Москва"}),
                )
            } else {
                NewJob::new(
                    provider,
                    ACCOUNTS[1],
                    email,
                    json!({"tags": ["bench"], "attributes": {"n": format!("{i}")}}),
                )
            }
        })
        .collect()
}

fn config_file(
    args: &BenchArgs,
    justclick_base: &str,
    smartlink_base: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let toml = format!(
        r#"[database]
max_connections = 8
[worker]
concurrency = {c}
batch_size = {b}
poll_interval = "200ms"
backoff_base = "100ms"
backoff_cap = "1s"
[admin]
listen = ""
[accounts.{jc}]
provider = "justclick"
login = "demo"
secret = "demo-justclick-secret"
base_url = "{justclick_base}"
allow_insecure_http = true
[accounts.{sl}]
provider = "smartlink"
game_id = "12345"
secret = "demo-smartlink-secret"
base_url = "{smartlink_base}"
allow_insecure_http = true
"#,
        c = args.concurrency,
        b = args.batch_size,
        jc = ACCOUNTS[0],
        sl = ACCOUNTS[1],
    );
    let path = dir.join(format!("contact-sync-bench-{}.toml", std::process::id()));
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// A worker process; `wait` returns its exit status and peak RSS in KiB.
struct WorkerProcess {
    child: std::process::Child,
}

impl WorkerProcess {
    fn spawn(config: &Path, url: &str, drain: bool) -> anyhow::Result<WorkerProcess> {
        let exe = std::env::current_exe().context("locating the contact-sync binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("run")
            .env("CONTACT_SYNC_CONFIG", config)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn");
        if drain {
            cmd.arg("--drain");
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting the worker")?;
        Ok(WorkerProcess { child })
    }

    fn terminate(&self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }

    /// Waits for the process; returns its exit code and its peak RSS in MiB. The peak is
    /// read from `/proc/PID/status` (VmHWM, reset at exec) while it runs: `wait4`'s maxrss would
    /// also count the parent's image the child was forked from.
    async fn wait(mut self) -> anyhow::Result<(i32, f64)> {
        let status_path = format!("/proc/{}/status", self.child.id());
        let mut peak_kib: u64 = 0;
        loop {
            if let Ok(status) = std::fs::read_to_string(&status_path) {
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
            }
            if let Some(status) = self.child.try_wait()? {
                return Ok((status.code().unwrap_or(-1), peak_kib as f64 / 1024.0));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn finished(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let counts = admin::counts_for(pool, &ACCOUNTS.map(String::from)).await?;
    let get = |s: &str| {
        counts
            .iter()
            .filter(|c| c.state == s)
            .map(|c| c.count)
            .sum::<i64>()
    };
    Ok((
        get("succeeded") + get("coalesced") + get("dead"),
        get("coalesced"),
    ))
}

/// Enqueues in batches of 5000; returns jobs per second.
async fn load(pool: &PgPool, jobs: &[NewJob]) -> anyhow::Result<f64> {
    // Two producers, as an application with a couple of request handlers would be: one
    // Postgres backend per connection, so both cores take part.
    const PRODUCERS: usize = 2;
    const BATCH: usize = 5000;
    let batches: Vec<&[NewJob]> = jobs.chunks(BATCH).collect();
    let shares: Vec<Vec<Vec<NewJob>>> = (0..PRODUCERS)
        .map(|p| {
            batches
                .iter()
                .skip(p)
                .step_by(PRODUCERS)
                .map(|b| b.to_vec())
                .collect()
        })
        .collect();
    let loaded = Instant::now();
    let mut handles = Vec::new();
    for mine in shares {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            for batch in &mine {
                enqueue_batch(&mut conn, batch).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(jobs.len() as f64 / loaded.elapsed().as_secs_f64())
}

/// Starts `workers` draining processes, waits for them; returns (jobs/s, peak RSS MiB, coalesced).
async fn e2e(
    pool: &PgPool,
    config: &Path,
    url: &str,
    workers: usize,
    expected: usize,
) -> anyhow::Result<(f64, f64, i64)> {
    let (before, coalesced_before) = finished(pool).await?;
    let started = Instant::now();
    let procs: Vec<WorkerProcess> = (0..workers)
        .map(|_| WorkerProcess::spawn(config, url, true))
        .collect::<Result<_, _>>()?;
    let mut peak: f64 = 0.0;
    for p in procs {
        let (code, rss) = p.wait().await?;
        if code != 0 {
            bail!("worker exited with {code}");
        }
        peak = peak.max(rss);
    }
    let took = started.elapsed().as_secs_f64();
    let (after, coalesced_after) = finished(pool).await?;
    let done = usize::try_from(after - before).unwrap_or(0);
    if done != expected {
        bail!("{done} of {expected} jobs finished");
    }
    Ok((
        expected as f64 / took,
        peak,
        coalesced_after - coalesced_before,
    ))
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

async fn latency(
    pool: &PgPool,
    sandbox: &Sandbox,
    config: &Path,
    url: &str,
    samples: usize,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let mut arrivals = sandbox.observe();
    let worker = WorkerProcess::spawn(config, url, false)?;
    let mut conn = pool.acquire().await?;
    let mut measured = Vec::with_capacity(samples);
    // the first call warms the worker's connections up
    for i in 0..samples + 1 {
        let email = format!("latency{i}@bench.example.com");
        let job = NewJob::new("justclick", ACCOUNTS[0], &email, json!({"lead_name": "L"}));
        let t0 = Instant::now();
        enqueue(&mut conn, &job).await?;
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                got = arrivals.recv() => match got {
                    Some((seen, at)) if seen == email => {
                        if i > 0 {
                            measured.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                        }
                        break;
                    }
                    Some(_) => {}
                    None => bail!("sandbox stopped"),
                },
                _ = &mut deadline => bail!("no provider call within 10s of enqueueing {email}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.terminate();
    let (_, rss) = worker.wait().await?;
    measured.sort_by(|a, b| a.total_cmp(b));
    Ok((measured, rss))
}

async fn insert_backlog(pool: &PgPool, rows: usize) -> anyhow::Result<()> {
    let rows = i64::try_from(rows)?;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(100_000);
        sqlx::query(
            r#"INSERT INTO contact_sync.jobs (provider, account, email, payload, state, attempts, finished_at)
               SELECT 'justclick', 'bench_old', 'old' || g || '@bench.example.com', '{"lead_name": "Old"}', 'succeeded', 1, now()
               FROM generate_series(1, $1) g"#,
        )
        .bind(n)
        .execute(pool)
        .await?;
        done += n;
    }
    // a table that has held a million finished rows for a while has been vacuumed
    sqlx::query("VACUUM (ANALYZE) contact_sync.jobs")
        .execute(pool)
        .await?;
    Ok(())
}

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
    let (_pg, pool, url) = crate::pg::open(
        database_url,
        "max_wal_size = 4GB\ncheckpoint_timeout = 15min",
        4,
    )
    .await?;
    for account in ACCOUNTS.iter().chain(&["bench_old"]) {
        admin::purge_account(&pool, account, None).await?;
    }
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
    let config = config_file(
        &args,
        &format!("{base}/justclick/demo"),
        &format!("{base}/smartlink"),
        &dir,
    )?;

    // first, on a quiet database: an idle worker
    let mut peak: f64 = 0.0;
    let (latency_ms_p50, latency_ms_p99) = match (&sandbox, args.latency_samples) {
        (Some(s), n) if n > 0 => {
            eprintln!("bench: idle latency, {n} single jobs ...");
            let (samples, rss) = latency(&pool, s, &config, &url, n).await?;
            peak = peak.max(rss);
            (percentile(&samples, 50.0), percentile(&samples, 99.0))
        }
        _ => (None, None),
    };

    eprintln!("bench: enqueueing {} changes ...", args.jobs);
    let first = jobs(&args, 0);
    let enqueue_jobs_per_s = load(&pool, &first).await?;
    drop(first);
    eprintln!("bench: e2e run ...");
    quiesce(&pool).await;
    let (e2e_jobs_per_s, rss, coalesced) =
        e2e(&pool, &config, &url, args.workers, args.jobs).await?;
    peak = peak.max(rss);

    let backlog_e2e_jobs_per_s = if args.backlog > 0 {
        eprintln!(
            "bench: inserting {} finished rows, then the e2e run again ...",
            args.backlog
        );
        insert_backlog(&pool, args.backlog).await?;
        let second = jobs(&args, 1);
        load(&pool, &second).await?;
        drop(second);
        quiesce(&pool).await;
        let (rate, rss, _) = e2e(&pool, &config, &url, args.workers, args.jobs).await?;
        peak = peak.max(rss);
        Some(rate)
    } else {
        None
    };

    if _pg.is_none() {
        for account in ACCOUNTS.iter().chain(&["bench_old"]) {
            admin::purge_account(&pool, account, None).await?;
        }
    }
    let _ = std::fs::remove_file(&config);
    pool.close().await;
    if let Some(s) = sandbox {
        s.stop().await;
    }
    Ok(BenchResult {
        jobs: args.jobs,
        provider: args.provider,
        concurrency: args.concurrency,
        batch_size: args.batch_size,
        workers: args.workers,
        contacts: args.contacts.unwrap_or(args.jobs),
        enqueue_jobs_per_s: enqueue_jobs_per_s.round(),
        e2e_jobs_per_s: e2e_jobs_per_s.round(),
        coalesced,
        latency_ms_p50: latency_ms_p50.map(|v| (v * 100.0).round() / 100.0),
        latency_ms_p99: latency_ms_p99.map(|v| (v * 100.0).round() / 100.0),
        backlog_rows: args.backlog,
        backlog_e2e_jobs_per_s: backlog_e2e_jobs_per_s.map(f64::round),
        peak_rss_mb: (peak * 10.0).round() / 10.0,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

/// The `--pretty` table.
pub fn render(r: &BenchResult) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v}")).unwrap_or_else(|| "-".into());
    let rows = vec![
        vec![
            "enqueue_jobs_per_s".into(),
            format!("{}", r.enqueue_jobs_per_s),
            ">= 50000".into(),
        ],
        vec![
            "e2e_jobs_per_s".into(),
            format!("{}", r.e2e_jobs_per_s),
            ">= 10000".into(),
        ],
        vec!["latency_ms_p50".into(), opt(r.latency_ms_p50), "".into()],
        vec![
            "latency_ms_p99".into(),
            opt(r.latency_ms_p99),
            "<= 20".into(),
        ],
        vec![
            "backlog_e2e_jobs_per_s".into(),
            opt(r.backlog_e2e_jobs_per_s),
            "within 15% of e2e".into(),
        ],
        vec![
            "peak_rss_mb".into(),
            format!("{}", r.peak_rss_mb),
            "<= 64".into(),
        ],
    ];
    table::render(&["METRIC", "VALUE", "TARGET"], &rows)
}
