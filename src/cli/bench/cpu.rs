//! CPU time per delivered job, split by who spent it: the worker processes, the database's
//! cluster (its postmaster and every backend, exited ones included) and this process (the
//! sandbox). Read from Linux `/proc`.

use contact_sync::outbox::probes;
use serde::Serialize;
use sqlx::PgPool;

/// CPU time per delivered job, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct CpuPerJob {
    pub worker: f64,
    pub postgres: Option<f64>,
    /// None with `--sandbox-url`: the sandbox is another process then.
    pub sandbox: Option<f64>,
}

/// CPU clock ticks of this process, of its reaped children, of the live worker processes, and
/// of the bench's Postgres cluster (its postmaster's reaped children included). Linux `/proc`
/// only; `postgres` is `None` elsewhere, or when the database is not on this machine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    pub(crate) own: u64,
    pub(crate) children: u64,
    /// The live worker processes' own ticks.
    pub(crate) workers: u64,
    pub(crate) postgres: Option<u64>,
}

/// utime+stime and cutime+cstime of one `/proc/PID/stat`, with the command name.
pub(crate) fn proc_ticks(stat: &str) -> Option<(String, u64, u64, i64)> {
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
pub(crate) static POSTMASTER: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();

/// Finds the postmaster of the bench's database: the parent of this session's backend.
pub(crate) async fn find_postmaster(pool: &PgPool) -> anyhow::Result<Option<i64>> {
    let backend = probes::backend_pid(pool).await?;
    Ok(std::fs::read_to_string(format!("/proc/{backend}/stat"))
        .ok()
        .and_then(|s| proc_ticks(&s))
        .filter(|(comm, ..)| comm == "postgres")
        .map(|(_, _, _, ppid)| ppid))
}

pub(crate) fn cpu_sample(workers: u64) -> CpuSample {
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

pub(crate) fn per_job_us(before: CpuSample, after: CpuSample, jobs: usize) -> CpuPerJob {
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
