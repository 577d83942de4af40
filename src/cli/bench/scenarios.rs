//! Measurements beside the drain: the calls-only floor (signed calls with no queue), the claim
//! statement's latency against a backlog, and single-job latency into an idle fleet.

use super::cpu::{cpu_sample, per_job_us};
use super::report::FloorResult;
use super::workload::change;
use super::ACCOUNTS;
use crate::cli::args::BenchProvider;
use anyhow::{bail, Context};
use contact_sync::config::Settings;
use contact_sync::outbox::{claim, enqueue, NewJob};
use contact_sync::providers::{Delivery, Registry};
use contact_sync::sandbox::Sandbox;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
pub(crate) async fn measure_floor(
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

pub(crate) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Single jobs enqueued one at a time into the idle fleet: from the enqueue statement to the
/// provider receiving the call. Milliseconds, sorted.
pub(crate) async fn latency(
    pool: &PgPool,
    sandbox: &Sandbox,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
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

/// Claim statement latency against the current backlog: `samples` claims of a 256-job batch,
/// each rolled back. Milliseconds, sorted.
pub(crate) async fn claim_latency(pool: &PgPool, samples: usize) -> anyhow::Result<Vec<f64>> {
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
    // (on a session like the worker's own, with the plan it keeps)
    let hot = contact_sync::outbox::hot::pool(pool);
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        // (a head and up to 16 followers, as before the options were typed)
        let claimed = claim::claim_rolled_back(&hot, &quotas, 17).await;
        if let Err(e) = claimed {
            hot.close().await;
            return Err(e.into());
        }
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    hot.close().await;
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}
