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

use super::daemon;
use super::demo;
use super::table;
use anyhow::{bail, Context};
use contact_sync::config::Settings;
use contact_sync::outbox::{accounts, admin, claim, enqueue, enqueue_batch, NewJob};
use contact_sync::providers::{Delivery, Registry};
use contact_sync::sandbox::Sandbox;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchProvider {
    Both,
    Justclick,
    Smartlink,
}

impl BenchProvider {
    /// As written on the command line.
    fn name(self) -> &'static str {
        match self {
            BenchProvider::Both => "both",
            BenchProvider::Justclick => "justclick",
            BenchProvider::Smartlink => "smartlink",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Backlog sizes, each enqueued then drained end to end (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![5_000usize, 20_000, 100_000, 1_000_000])]
    pub sizes: Vec<usize>,
    /// worker.concurrency of the worker process.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// worker.batch_size of the worker process.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Number of distinct contacts per backlog (fewer than its size forces coalescing).
    #[arg(long)]
    pub contacts: Option<usize>,
    /// Which provider's calls the jobs make.
    #[arg(long, value_enum, default_value = "both")]
    pub provider: BenchProvider,
    /// Use a running sandbox (`contact-sync sandbox`, demo credentials) instead of one in-process.
    #[arg(long)]
    pub sandbox_url: Option<String>,
    /// Blocked scenario: contacts whose head is scheduled an hour later (0 skips the scenario).
    #[arg(long, default_value_t = 1_000)]
    pub blocked_contacts: usize,
    /// Blocked scenario: changes queued behind each blocked head.
    #[arg(long, default_value_t = 50)]
    pub blocked_depth: usize,
    /// Blocked scenario: the backlog drained beside the blocked contacts.
    #[arg(long, default_value_t = 20_000)]
    pub blocked_jobs: usize,
    /// Single-job latency samples.
    #[arg(long, default_value_t = 200)]
    pub latency_samples: usize,
    /// Jobs drained before the measured runs, not measured: the workers' connections to
    /// Postgres and to the providers opened, as in a running deployment (0 skips it).
    #[arg(long, default_value_t = 2_048)]
    pub warmup: usize,
    /// Worker processes for the e2e runs (all on one database).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Rate scenario: one JustClick account limited to RATE calls/s (fleet-wide), drained by
    /// --workers processes; reports the rate the sandbox saw against this one.
    #[arg(long, value_name = "RATE")]
    pub rate: Option<f64>,
    /// Rate scenario: the account's burst (default: one second's worth).
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// Rate scenario: seconds of traffic at the configured rate.
    #[arg(long, default_value_t = 10, requires = "rate")]
    pub rate_seconds: u64,
    /// Calls-only scenario: this many signed calls from a worker-like process without a
    /// database, the least the worker needs per call (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    pub floor_calls: usize,
    /// Also print a readable table.
    #[arg(long)]
    pub pretty: bool,
}

/// CPU time per delivered job, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct CpuPerJob {
    pub worker: f64,
    pub postgres: Option<f64>,
    /// None with `--sandbox-url`: the sandbox is another process then.
    pub sandbox: Option<f64>,
}

/// One backlog size, enqueued and drained.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub backlog: usize,
    /// Jobs queued elsewhere that the claims must not pay for (the blocked scenario).
    pub blocked: usize,
    pub enqueue_jobs_per_s: f64,
    pub claim_ms_p50: Option<f64>,
    pub claim_ms_p99: Option<f64>,
    pub e2e_jobs_per_s: f64,
    pub coalesced: i64,
    pub cpu_us_per_job: CpuPerJob,
    /// Bytes of write-ahead log the cluster wrote during the drain, per delivered job (None
    /// when the server cannot say, e.g. a standby).
    pub wal_bytes_per_job: Option<f64>,
}

/// The calls-only scenario: the same signed calls as the e2e runs, made by the provider clients
/// at the worker's concurrency with no queue around them.
#[derive(Debug, Clone, Serialize)]
pub struct FloorResult {
    pub calls: usize,
    pub calls_per_s: f64,
    /// CPU time of the calling process per call: the least a worker needs per job.
    pub worker_us_per_call: f64,
    /// CPU time of the sandbox per call (None with `--sandbox-url`: another process).
    pub sandbox_us_per_call: Option<f64>,
}

/// The rate scenario: what the provider saw against what was configured.
#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    pub workers: usize,
    pub configured_per_s: f64,
    pub burst: f64,
    pub calls: usize,
    /// Calls over the time from the first to the last call.
    pub achieved_per_s: f64,
    /// Most calls the sandbox saw in any 1-second window (the bound is rate + burst).
    pub worst_1s_window: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub provider: BenchProvider,
    pub concurrency: usize,
    pub batch_size: usize,
    pub workers: usize,
    pub sizes: Vec<SizeResult>,
    pub blocked: Option<SizeResult>,
    /// Slowest e2e rate over the fastest, across sizes (1.0: no cliff).
    pub e2e_min_over_max: Option<f64>,
    /// Blocked scenario e2e over the unblocked run of the nearest size.
    pub blocked_over_unblocked: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub rate: Option<RateResult>,
    pub floor: Option<FloorResult>,
    /// From spawning the worker processes until every one was registered (ready to claim).
    pub worker_start_ms: f64,
    pub peak_rss_mb: f64,
    pub cores: usize,
    pub seconds: f64,
}

const ACCOUNTS: [&str; 2] = ["bench_jc", "bench_sl"];

fn jobs(args: &BenchArgs, size: usize, wave: usize) -> Vec<NewJob> {
    let contacts = args.contacts.unwrap_or(size).clamp(1, size.max(1));
    (0..size)
        .map(|i| change(args.provider, i, i % contacts, &format!("w{wave}")))
        .collect()
}

/// Change `i` of the benchmark, for contact `c` (`tag` keeps runs apart): half JustClick, half
/// Smartlink with `both`.
fn change(provider: BenchProvider, i: usize, c: usize, tag: &str) -> NewJob {
    let provider = match provider {
        BenchProvider::Justclick => "justclick",
        BenchProvider::Smartlink => "smartlink",
        BenchProvider::Both if c % 2 == 0 => "justclick",
        BenchProvider::Both => "smartlink",
    };
    let email = format!("user{c}.{tag}@bench.example.com");
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
}

/// The calls-only process (`contact-sync bench-calls`): `count` changes as the e2e runs make
/// them, each one signed call through the configured account's provider client (the worker's
/// own), at most `worker.concurrency` in flight. Fails on the first call that does not succeed.
pub async fn calls_only(
    settings: &Settings,
    count: usize,
    provider: BenchProvider,
) -> anyhow::Result<()> {
    let registry = Registry::from_settings(settings)?;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        settings.worker.concurrency.max(1),
    ));
    let tag = format!("floor{}", std::process::id());
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..count {
        let permit = in_flight.clone().acquire_owned().await?;
        let job = change(provider, i, i, &tag);
        let Some(provider) = registry.get(&job.account).cloned() else {
            bail!("no account {} in the configuration", job.account);
        };
        let Value::Object(payload) = job.payload else {
            bail!("a benchmark payload is not an object");
        };
        calls.spawn(async move {
            let delivery = Delivery {
                job_id: i64::try_from(i).unwrap_or(i64::MAX),
                attempt: 1,
                email: &job.email,
                payload: &payload,
                created_at_ms: chrono::Utc::now().timestamp_millis(),
            };
            let result = provider.deliver(delivery).await.map(|_| ());
            drop(permit);
            result
        });
        while let Some(done) = calls.try_join_next() {
            done?.map_err(|e| anyhow::anyhow!("call failed: {e}"))?;
        }
    }
    while let Some(done) = calls.join_next().await {
        done?.map_err(|e| anyhow::anyhow!("call failed: {e}"))?;
    }
    Ok(())
}

/// Runs the calls-only process against the sandbox: its CPU per call is the floor of the
/// worker's, and this process's (the sandbox's) CPU per call is the sandbox's share of a job.
async fn measure_floor(
    config: &Path,
    calls: usize,
    provider: BenchProvider,
    own_sandbox: bool,
) -> anyhow::Result<FloorResult> {
    let exe = std::env::current_exe().context("locating the contact-sync binary")?;
    let before = cpu_sample(0);
    let started = Instant::now();
    let status = tokio::process::Command::new(exe)
        .arg("bench-calls")
        .arg("--count")
        .arg(calls.to_string())
        .arg("--provider")
        .arg(provider.name())
        .env("CONTACT_SYNC_CONFIG", config)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .context("starting the calls-only process")?;
    let took = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the calls-only process failed ({status})");
    }
    let cpu = per_job_us(before, cpu_sample(0), calls);
    Ok(FloorResult {
        calls,
        calls_per_s: (calls as f64 / took).round(),
        worker_us_per_call: cpu.worker,
        sandbox_us_per_call: cpu.sandbox.filter(|_| own_sandbox),
    })
}

/// The rate scenario's account (the sandbox's `demo` login, limited).
const RATE_ACCOUNT: &str = "bench_rate";

fn config_file(
    args: &BenchArgs,
    justclick_base: &str,
    smartlink_base: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let mut toml = format!(
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
    if let Some(rate) = args.rate {
        toml.push_str(&format!(
            "[accounts.{RATE_ACCOUNT}]\nprovider = \"justclick\"\nlogin = \"demo\"\nsecret = \"demo-justclick-secret\"\nbase_url = \"{justclick_base}\"\nallow_insecure_http = true\nrate_limit_per_second = {rate}\n"
        ));
        if let Some(burst) = args.burst {
            toml.push_str(&format!("burst = {burst}\n"));
        }
    }
    let path = dir.join(format!("contact-sync-bench-{}.toml", std::process::id()));
    // readable by this user only: it holds the sandbox's (demo) secrets
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?
        .write_all(toml.as_bytes())?;
    Ok(path)
}

/// The bench's configuration file (it holds the sandbox's demo secrets): removed however the
/// bench ends.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A worker process; `wait` returns its exit status and peak RSS in KiB. Killed if dropped
/// while it runs (a bench that fails leaves no worker behind).
struct WorkerProcess {
    child: std::process::Child,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl WorkerProcess {
    fn spawn(config: &Path, url: &str, drain: bool) -> anyhow::Result<WorkerProcess> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("locating the contact-sync binary")?;
        let mut cmd = std::process::Command::new(exe);
        // (a statement that straddles a stop between two runs would be logged as slow)
        cmd.arg("run")
            .env("CONTACT_SYNC_CONFIG", config)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn,sqlx::query=error");
        if drain {
            cmd.arg("--drain");
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill this child when the
        // thread that started it ends (a runtime worker thread, which lives as long as the
        // bench), so a bench that is killed leaves no stopped worker behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting the worker")?;
        Ok(WorkerProcess { child })
    }

    fn signal(&self, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    fn terminate(&self) {
        // a stopped process acts on SIGTERM once continued
        self.signal(libc::SIGTERM);
        self.signal(libc::SIGCONT);
    }

    /// CPU clock ticks the process has used so far (user and system).
    fn ticks(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| proc_ticks(&s))
            .map_or(0, |(_, own, _, _)| own)
    }

    /// Waits for the process; returns its exit code and its peak RSS in MiB. The peak is
    /// read from `/proc/PID/status` (VmHWM, reset at exec) while it runs: `wait4`'s maxrss would
    /// also count the parent's image the child was forked from.
    async fn wait(&mut self) -> anyhow::Result<(i32, f64)> {
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

/// CPU clock ticks of this process, of its reaped children, of the live worker processes, and
/// of the bench's Postgres cluster (its postmaster's reaped children included). Linux `/proc`
/// only; `postgres` is `None` elsewhere, or when the database is not on this machine.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    own: u64,
    children: u64,
    /// The live worker processes' own ticks.
    workers: u64,
    postgres: Option<u64>,
}

/// utime+stime and cutime+cstime of one `/proc/PID/stat`, with the command name.
fn proc_ticks(stat: &str) -> Option<(String, u64, u64, i64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<i64>().ok());
    let ppid = num(1)?;
    let own = u64::try_from(num(11)? + num(12)?).ok()?;
    let children = u64::try_from(num(13)? + num(14)?).ok()?;
    Some((comm, own, children, ppid))
}

/// The local postmaster of the bench's database (`None`: not on this machine, or not found).
static POSTMASTER: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();

/// Finds the postmaster of the bench's database: the parent of this session's backend.
async fn find_postmaster(pool: &PgPool) -> anyhow::Result<Option<i64>> {
    let backend = admin::backend_pid(pool).await?;
    Ok(std::fs::read_to_string(format!("/proc/{backend}/stat"))
        .ok()
        .and_then(|s| proc_ticks(&s))
        .filter(|(comm, ..)| comm == "postgres")
        .map(|(_, _, _, ppid)| ppid))
}

fn cpu_sample(workers: u64) -> CpuSample {
    let (own, children) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| proc_ticks(&s))
        .map(|(_, o, c, _)| (o, c))
        .unwrap_or((0, 0));
    let mut postgres: Option<u64> = None;
    // the bench's own cluster only: its postmaster (with the backends it has reaped) and its
    // children; another cluster starting or stopping meanwhile is not counted
    if let Some(postmaster) = POSTMASTER.get().copied().flatten() {
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else {
                    continue;
                };
                let Some((comm, own, children, ppid)) =
                    std::fs::read_to_string(entry.path().join("stat"))
                        .ok()
                        .and_then(|s| proc_ticks(&s))
                else {
                    continue;
                };
                if comm != "postgres" {
                    continue;
                }
                if pid == postmaster {
                    postgres = Some(postgres.unwrap_or(0) + own + children);
                } else if ppid == postmaster {
                    postgres = Some(postgres.unwrap_or(0) + own);
                }
            }
        }
    }
    CpuSample {
        own,
        children,
        workers,
        postgres,
    }
}

fn per_job_us(before: CpuSample, after: CpuSample, jobs: usize) -> CpuPerJob {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let us = |ticks: u64| ticks as f64 / hz * 1e6 / jobs.max(1) as f64;
    let round = |v: f64| (v * 10.0).round() / 10.0;
    CpuPerJob {
        worker: round(us(after.children.saturating_sub(before.children)
            + after.workers.saturating_sub(before.workers))),
        postgres: match (before.postgres, after.postgres) {
            (Some(b), Some(a)) => Some(round(us(a.saturating_sub(b)))),
            _ => None,
        },
        sandbox: Some(round(us(after.own.saturating_sub(before.own)))),
    }
}

/// The worker processes of the e2e runs (`contact-sync run`, not draining), as a deployment
/// runs them: started once, warmed up, and kept. Each run stops them (`SIGSTOP`) while its
/// backlog is enqueued and its claims are probed, and continues them (`SIGCONT`) for the drain,
/// so the figures measure the queue and not the start of a process (reported on its own).
struct Fleet {
    procs: Vec<WorkerProcess>,
    /// From spawning the processes until the last of them was registered.
    start_ms: f64,
}

impl Fleet {
    async fn start(
        pool: &PgPool,
        config: &Path,
        url: &str,
        workers: usize,
    ) -> anyhow::Result<Fleet> {
        let started = Instant::now();
        let mut procs: Vec<WorkerProcess> = (0..workers.max(1))
            .map(|_| WorkerProcess::spawn(config, url, false))
            .collect::<Result<_, _>>()?;
        let pids: Vec<i32> = procs
            .iter()
            .filter_map(|p| i32::try_from(p.child.id()).ok())
            .collect();
        loop {
            let live = accounts::live_replicas(pool).await?;
            if pids.iter().all(|pid| live.iter().any(|r| r.pid == *pid)) {
                break;
            }
            for p in &mut procs {
                if let Some(status) = p.child.try_wait()? {
                    bail!("the worker exited at start ({status})");
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the workers did not register within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Fleet {
            procs,
            start_ms: (started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        })
    }

    fn signal(&self, signal: libc::c_int) {
        for p in &self.procs {
            p.signal(signal);
        }
    }

    fn ticks(&self) -> u64 {
        self.procs.iter().map(WorkerProcess::ticks).sum()
    }

    /// Stops the workers, never inside one of their transactions (a periodic sweep could have
    /// one open): that would hold back vacuum, or a lock, while the next backlog is enqueued.
    /// A statement already sent finishes without its client: after 50 ms, a session of theirs
    /// still inside a transaction is waiting for them, and they are continued for a moment.
    async fn pause(&self, pool: &PgPool) -> anyhow::Result<()> {
        let names: Vec<String> = self
            .procs
            .iter()
            .map(|p| daemon::worker_application_name(p.child.id()))
            .collect();
        for _ in 0..40 {
            self.signal(libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if admin::sessions_in_transaction(pool, &names).await? == 0 {
                return Ok(());
            }
            self.signal(libc::SIGCONT);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("a worker's session stayed inside a transaction for 3 s")
    }

    /// Fails if a worker process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!("a worker process exited during the run ({status})");
            }
        }
        Ok(())
    }

    /// Stops the workers; returns the largest peak RSS (MiB).
    async fn finish(mut self) -> anyhow::Result<f64> {
        for p in &self.procs {
            p.terminate();
        }
        let mut peak: f64 = 0.0;
        for p in &mut self.procs {
            let (code, rss) = p.wait().await?;
            if code != 0 {
                bail!("worker exited with {code}");
            }
            peak = peak.max(rss);
        }
        Ok(peak)
    }
}

/// Waits until every job of the benchmark's accounts is finished and `expected` more have
/// finished than `before` (polled every 50 ms: a cheap probe, but one that reads the ready
/// contacts' index, whose cost would show in Postgres's share if it ran more often).
async fn drained(
    pool: &PgPool,
    fleet: &mut Fleet,
    before: i64,
    expected: usize,
) -> anyhow::Result<()> {
    let accounts = ACCOUNTS.map(String::from);
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if !claim::runnable_exists(pool, &accounts).await?
            && !claim::in_flight_exists(pool, &accounts).await?
        {
            let (after, _) = finished(pool).await?;
            if usize::try_from(after - before).unwrap_or(0) >= expected {
                return Ok(());
            }
        }
        fleet.check_alive()?;
        if Instant::now() > deadline {
            bail!("the backlog was not drained within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Continues the (stopped) fleet and waits for the backlog to drain; returns (jobs/s,
/// coalesced, CPU per job). The drain is timed on the database's clock, from just before the
/// workers are continued to the last job's `finished_at` (when its completion was written; the
/// commit follows within the completion statement's few milliseconds).
async fn e2e(pool: &PgPool, fleet: &mut Fleet, expected: usize) -> anyhow::Result<Drain> {
    let (before, coalesced_before) = finished(pool).await?;
    let wal_before = admin::wal_position(pool).await.ok();
    let cpu_before = cpu_sample(fleet.ticks());
    let started = admin::clock(pool).await?;
    fleet.signal(libc::SIGCONT);
    drained(pool, fleet, before, expected).await?;
    let cpu = per_job_us(cpu_before, cpu_sample(fleet.ticks()), expected);
    fleet.pause(pool).await?;
    let wal_bytes_per_job = match &wal_before {
        Some(position) => admin::wal_bytes_since(pool, position)
            .await
            .ok()
            .map(|bytes| (bytes / expected.max(1) as f64).round()),
        None => None,
    };
    let Some(last) = admin::last_finished_at(pool, &ACCOUNTS.map(String::from)).await? else {
        bail!("no job finished");
    };
    let took = (last - started).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
    if took <= 0.0 {
        bail!("the last job finished before the drain started");
    }
    let (after, coalesced_after) = finished(pool).await?;
    let done = usize::try_from(after - before).unwrap_or(0);
    if done != expected {
        bail!("{done} of {expected} jobs finished");
    }
    Ok(Drain {
        jobs_per_s: expected as f64 / took,
        coalesced: coalesced_after - coalesced_before,
        cpu,
        wal_bytes_per_job,
    })
}

/// What one drain measured (see [`e2e`]).
struct Drain {
    jobs_per_s: f64,
    coalesced: i64,
    cpu: CpuPerJob,
    wal_bytes_per_job: Option<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Single jobs enqueued one at a time into the idle fleet: from the enqueue statement to the
/// provider receiving the call. Milliseconds, sorted.
async fn latency(pool: &PgPool, sandbox: &Sandbox, samples: usize) -> anyhow::Result<Vec<f64>> {
    let mut arrivals = sandbox.observe();
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
    measured.sort_by(|a, b| a.total_cmp(b));
    Ok(measured)
}

/// The blocked scenario's jobs: per contact, a head scheduled an hour later and `depth` changes
/// behind it, all on the Smartlink account.
fn blocked_jobs(contacts: usize, depth: usize) -> Vec<NewJob> {
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut out = Vec::with_capacity(contacts * (depth + 1));
    for c in 0..contacts {
        let email = format!("blocked{c}@bench.example.com");
        for d in 0..=depth {
            let mut job = NewJob::new(
                "smartlink",
                ACCOUNTS[1],
                email.clone(),
                json!({"attributes": {"n": format!("{d}")}}),
            );
            if d == 0 {
                job.run_at = Some(later);
            }
            out.push(job);
        }
    }
    out
}

/// Claim statement latency against the current backlog: `samples` claims of a 256-job batch,
/// each rolled back. Milliseconds, sorted.
async fn claim_latency(pool: &PgPool, samples: usize) -> anyhow::Result<Vec<f64>> {
    let quotas = [
        claim::AccountQuota {
            account: ACCOUNTS[0].into(),
            limit: 128,
        },
        claim::AccountQuota {
            account: ACCOUNTS[1].into(),
            limit: 128,
        },
    ];
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        claim::claim_rolled_back(pool, &quotas, 16).await?;
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
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
    let (_pg, pool, url) = contact_sync::pg::open(
        database_url,
        "max_wal_size = 4GB\ncheckpoint_timeout = 15min",
        4,
    )
    .await?;
    for account in ACCOUNTS.iter().chain(&["bench_old"]) {
        admin::purge_account(&pool, account, None).await?;
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
        admin::purge_account(&pool, ACCOUNTS[1], None).await?;
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
            admin::purge_account(&pool, account, None).await?;
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
    admin::purge_account(pool, RATE_ACCOUNT, None).await?;
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
    admin::purge_account(pool, RATE_ACCOUNT, None).await?;
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

pub fn render(r: &BenchResult) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v}")).unwrap_or_else(|| "-".into());
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in r.sizes.iter().chain(r.blocked.iter()) {
        let name = if s.blocked > 0 {
            format!("{} beside {} blocked", s.backlog, s.blocked)
        } else {
            format!("{}", s.backlog)
        };
        rows.push(vec![
            name,
            format!("{}", s.enqueue_jobs_per_s),
            format!("{}", s.e2e_jobs_per_s),
            opt(s.claim_ms_p50),
            opt(s.claim_ms_p99),
            format!("{}", s.cpu_us_per_job.worker),
            opt(s.cpu_us_per_job.postgres),
            opt(s.cpu_us_per_job.sandbox),
            opt(s.wal_bytes_per_job),
        ]);
    }
    let mut out = table::render(
        &[
            "BACKLOG",
            "ENQUEUE/S",
            "E2E/S",
            "CLAIM P50 MS",
            "CLAIM P99 MS",
            "WORKER µS/JOB",
            "PG µS/JOB",
            "SANDBOX µS/JOB",
            "WAL BYTES/JOB",
        ],
        &rows,
    );
    out.push_str(&format!(
        "e2e slowest/fastest {} · blocked/unblocked {} · idle latency p50 {} ms, p99 {} ms · worker start {} ms · worker peak RSS {} MB\n",
        opt(r.e2e_min_over_max),
        opt(r.blocked_over_unblocked),
        opt(r.latency_ms_p50),
        opt(r.latency_ms_p99),
        r.worker_start_ms,
        r.peak_rss_mb
    ));
    if let Some(rate) = &r.rate {
        out.push_str(&format!(
            "rate: {} worker(s), configured {}/s burst {}: achieved {}/s over {} calls, worst 1-s window {} (bound {})\n",
            rate.workers,
            rate.configured_per_s,
            rate.burst,
            rate.achieved_per_s,
            rate.calls,
            rate.worst_1s_window,
            rate.configured_per_s + rate.burst
        ));
    }
    if let Some(f) = &r.floor {
        out.push_str(&format!(
            "calls only (no database): {} calls, {}/s; caller {} µs/call, sandbox {} µs/call\n",
            f.calls,
            f.calls_per_s,
            f.worker_us_per_call,
            opt(f.sandbox_us_per_call)
        ));
    }
    out
}
