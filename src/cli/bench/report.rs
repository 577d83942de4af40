//! What the benchmark reports: one JSON line, and with `--pretty` a readable table.

use super::cpu::CpuPerJob;
use crate::cli::args::BenchProvider;
use crate::cli::table;
use serde::Serialize;

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
    /// Capture: the triggers' cost to the application's writes, and a resync.
    pub capture: Option<super::capture::CaptureResult>,
    /// From spawning the worker processes until every one was registered (ready to claim).
    pub worker_start_ms: f64,
    pub peak_rss_mb: f64,
    pub cores: usize,
    pub seconds: f64,
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
    if let Some(c) = &r.capture {
        let line = |what: &str, x: &super::capture::Ratio| {
            format!(
                "  {what}: {} ms without, {} ms with capture ({}x)\n",
                x.without_ms, x.with_ms, x.ratio
            )
        };
        out.push_str(&format!("capture, a table of {} rows:\n", c.rows));
        out.push_str(&line(
            "UPDATE of an unmapped column, every row",
            &c.unmapped_update,
        ));
        out.push_str(&line(
            "UPDATE of a mapped column, every row",
            &c.mapped_update,
        ));
        out.push_str(&line(
            "one row's mapped UPDATE, own transaction",
            &c.single_row_update,
        ));
        out.push_str(&format!(
            "  resync of the unchanged table: {} rows compared/s, {} job(s) queued\n",
            c.resync_rows_per_s, c.resync_enqueued
        ));
    }
    out
}
