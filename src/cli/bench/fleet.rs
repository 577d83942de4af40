//! The worker processes the benchmark measures: their configuration file, each child process
//! (started, stopped with `SIGSTOP`, continued, reaped with its peak memory), and the timed drain.

use super::cpu::{cpu_sample, per_job_us, proc_ticks, CpuPerJob};
use super::workload::finished;
use super::{ACCOUNTS, RATE_ACCOUNT};
use crate::cli::args::BenchArgs;
use crate::cli::daemon;
use anyhow::{bail, Context};
use contact_sync::outbox::{claim, probes, replicas};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) fn config_file(
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
pub(crate) struct RemovedOnDrop(pub(crate) PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A worker process; `wait` returns its exit status and peak RSS in KiB. Killed if dropped
/// while it runs (a bench that fails leaves no worker behind).
pub(crate) struct WorkerProcess {
    pub(crate) child: std::process::Child,
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
    pub(crate) fn spawn(config: &Path, url: &str, drain: bool) -> anyhow::Result<WorkerProcess> {
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

    pub(crate) fn signal(&self, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    pub(crate) fn terminate(&self) {
        // a stopped process acts on SIGTERM once continued
        self.signal(libc::SIGTERM);
        self.signal(libc::SIGCONT);
    }

    /// CPU clock ticks the process has used so far (user and system).
    pub(crate) fn ticks(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| proc_ticks(&s))
            .map_or(0, |(_, own, _, _)| own)
    }

    /// Waits for the process; returns its exit code and its peak RSS in MiB. The peak is
    /// read from `/proc/PID/status` (VmHWM, reset at exec) while it runs: `wait4`'s maxrss would
    /// also count the parent's image the child was forked from.
    pub(crate) async fn wait(&mut self) -> anyhow::Result<(i32, f64)> {
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

/// The worker processes of the e2e runs (`contact-sync run`, not draining), as a deployment
/// runs them: started once, warmed up, and kept. Each run stops them (`SIGSTOP`) while its
/// backlog is enqueued and its claims are probed, and continues them (`SIGCONT`) for the drain,
/// so the figures measure the queue and not the start of a process (reported on its own).
pub(crate) struct Fleet {
    pub(crate) procs: Vec<WorkerProcess>,
    /// From spawning the processes until the last of them was registered.
    pub(crate) start_ms: f64,
}

impl Fleet {
    pub(crate) async fn start(
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
            let live = replicas::live_replicas(pool).await?;
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

    pub(crate) fn signal(&self, signal: libc::c_int) {
        for p in &self.procs {
            p.signal(signal);
        }
    }

    pub(crate) fn ticks(&self) -> u64 {
        self.procs.iter().map(WorkerProcess::ticks).sum()
    }

    /// Stops the workers, never inside one of their transactions (a periodic sweep could have
    /// one open): that would hold back vacuum, or a lock, while the next backlog is enqueued.
    /// A statement already sent finishes without its client: after 50 ms, a session of theirs
    /// still inside a transaction is waiting for them, and they are continued for a moment.
    pub(crate) async fn pause(&self, pool: &PgPool) -> anyhow::Result<()> {
        let names: Vec<String> = self
            .procs
            .iter()
            .map(|p| daemon::worker_application_name(p.child.id()))
            .collect();
        for _ in 0..40 {
            self.signal(libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if probes::sessions_in_transaction(pool, &names).await? == 0 {
                return Ok(());
            }
            self.signal(libc::SIGCONT);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("a worker's session stayed inside a transaction for 3 s")
    }

    /// Fails if a worker process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!("a worker process exited during the run ({status})");
            }
        }
        Ok(())
    }

    /// Stops the workers; returns the largest peak RSS (MiB).
    pub(crate) async fn finish(mut self) -> anyhow::Result<f64> {
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

/// How often [`drained`] looks.
const DRAINED_POLL: Duration = Duration::from_millis(250);

/// Waits until every job of the benchmark's accounts is finished and `expected` more have
/// finished than `before`. Polled every [`DRAINED_POLL`]: the probe reads the front of the
/// ready index, where the entries of the jobs just claimed are, and took about 2.8 ms a call
/// during a drain of 100,000 jobs; every 50 ms, that was 3 µs of the Postgres CPU per job the
/// bench reports. The drain's time is the last job's `finished_at`, not when this notices.
pub(crate) async fn drained(
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
        tokio::time::sleep(DRAINED_POLL).await;
    }
}

/// Continues the (stopped) fleet and waits for the backlog to drain; returns (jobs/s,
/// coalesced, CPU per job). The drain is timed on the database's clock, from just before the
/// workers are continued to the last job's `finished_at` (when its completion was written; the
/// commit follows within the completion statement's few milliseconds).
pub(crate) async fn e2e(
    pool: &PgPool,
    fleet: &mut Fleet,
    expected: usize,
) -> anyhow::Result<Drain> {
    let (before, coalesced_before) = finished(pool).await?;
    let wal_before = probes::wal_position(pool).await.ok();
    let cpu_before = cpu_sample(fleet.ticks());
    let started = probes::clock(pool).await?;
    fleet.signal(libc::SIGCONT);
    drained(pool, fleet, before, expected).await?;
    let cpu = per_job_us(cpu_before, cpu_sample(fleet.ticks()), expected);
    fleet.pause(pool).await?;
    let wal_bytes_per_job = match &wal_before {
        Some(position) => probes::wal_bytes_since(pool, position)
            .await
            .ok()
            .map(|bytes| (bytes / expected.max(1) as f64).round()),
        None => None,
    };
    let Some(last) = probes::last_finished_at(pool, &ACCOUNTS.map(String::from)).await? else {
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
pub(crate) struct Drain {
    pub(crate) jobs_per_s: f64,
    pub(crate) coalesced: i64,
    pub(crate) cpu: CpuPerJob,
    pub(crate) wal_bytes_per_job: Option<f64>,
}
