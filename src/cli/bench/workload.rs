//! The benchmark's work: the changes of each backlog, the blocked scenario's contacts, and
//! enqueueing them through the Rust batch API.

use super::ACCOUNTS;
use crate::cli::args::{BenchArgs, BenchProvider};
use contact_sync::outbox::{enqueue_batch, probes, NewJob};
use serde_json::json;
use sqlx::PgPool;
use std::time::Instant;

pub(crate) fn jobs(args: &BenchArgs, size: usize, wave: usize) -> Vec<NewJob> {
    let contacts = args.contacts.unwrap_or(size).clamp(1, size.max(1));
    (0..size)
        .map(|i| change(args.provider, i, i % contacts, &format!("w{wave}")))
        .collect()
}

/// Change `i` of the benchmark, for contact `c` (`tag` keeps runs apart): half JustClick, half
/// Smartlink with `both`.
pub(crate) fn change(provider: BenchProvider, i: usize, c: usize, tag: &str) -> NewJob {
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

pub(crate) async fn finished(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let counts = probes::counts_for(pool, &ACCOUNTS.map(String::from)).await?;
    let get = |s: &str| {
        counts
            .iter()
            .filter(|c| c.state.as_str() == s)
            .map(|c| c.count)
            .sum::<i64>()
    };
    Ok((
        get("succeeded") + get("coalesced") + get("dead"),
        get("coalesced"),
    ))
}

/// Enqueues in batches of 5000; returns jobs per second.
pub(crate) async fn load(pool: &PgPool, jobs: &[NewJob]) -> anyhow::Result<f64> {
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

/// The blocked scenario's jobs: per contact, a head scheduled an hour later and `depth` changes
/// behind it, all on the Smartlink account.
pub(crate) fn blocked_jobs(contacts: usize, depth: usize) -> Vec<NewJob> {
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
