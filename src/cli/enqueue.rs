//! `enqueue`: one change from options, or many from a JSON Lines file.

use super::accounts::KnownAccounts;
use super::args::EnqueueArgs;
use anyhow::{bail, Context};
use contact_sync::config::Settings;
use contact_sync::outbox::{self, NewJob};
use serde_json::{Map, Value};
use sqlx::PgPool;
use std::path::Path;
use std::process::ExitCode;

pub async fn run(args: EnqueueArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    let known = KnownAccounts::load(settings, &pool).await?;
    match &args.file {
        Some(path) => enqueue_file(&pool, &known, path).await,
        None => {
            let job = job_from_args(&args)?;
            if !matches!(job.provider.as_str(), "justclick" | "smartlink") {
                bail!(
                    "--provider {:?}: unknown provider (expected justclick or smartlink)",
                    job.provider
                );
            }
            known
                .check(&job.provider, &job.account)
                .map_err(anyhow::Error::msg)?;
            let mut conn = pool.acquire().await?;
            let id = outbox::enqueue(&mut conn, &job).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Builds a job from `--provider/--account/--email/--set/--payload`.
pub fn job_from_args(args: &EnqueueArgs) -> anyhow::Result<NewJob> {
    // --payload alone is stored as written (numbers exactly as typed); --set edits a JSON value
    let exact = match (&args.payload, args.set.is_empty()) {
        (Some(text), true) => Some(text.clone()),
        _ => None,
    };
    let mut payload = match &args.payload {
        Some(text) => match serde_json::from_str::<Value>(text).context("--payload is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--payload must be a JSON object"),
        },
        None => Map::new(),
    };
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--set {pair:?}: expected KEY=VALUE"))?;
        set_field(&mut payload, key, value)?;
    }
    let mut job = NewJob::new(
        args.provider.clone().unwrap_or_default(),
        args.account.clone().unwrap_or_default(),
        args.email.clone().unwrap_or_default(),
        Value::Object(payload),
    );
    job.idempotency_key = args.idempotency_key.clone();
    job.payload_json = exact;
    Ok(job)
}

fn set_field(payload: &mut Map<String, Value>, key: &str, value: &str) -> anyhow::Result<()> {
    if let Some(name) = key.strip_prefix("attributes.") {
        let attrs = payload
            .entry("attributes")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(attrs) = attrs else {
            bail!("attributes is not an object")
        };
        attrs.insert(name.to_string(), Value::String(value.to_string()));
        return Ok(());
    }
    let typed = match key {
        "subscribe" | "update_strategy" | "modify_ts" => Value::from(
            value
                .trim()
                .parse::<i64>()
                .with_context(|| format!("--set {key}: {value:?} is not an integer"))?,
        ),
        "tags" | "preferences" => Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        _ => Value::String(value.to_string()),
    };
    payload.insert(key.to_string(), typed);
    Ok(())
}

/// The payload of a bulk line as written.
#[derive(serde::Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow, default)]
    payload: Option<&'a serde_json::value::RawValue>,
}

/// Lines per batch statement in bulk loads.
const FILE_BATCH: usize = 1000;

/// Bulk load from JSON Lines: bad lines are reported on stderr and skipped, good ones queued.
/// Exit code 0 when every line was queued, 1 when some were rejected.
async fn enqueue_file(
    pool: &PgPool,
    known: &KnownAccounts,
    path: &Path,
) -> anyhow::Result<ExitCode> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let mut rejected = 0usize;
    let mut queued = 0usize;
    let mut batch: Vec<(usize, NewJob)> = Vec::with_capacity(FILE_BATCH);
    let lines = bytes.split(|b| *b == b'\n');
    for (index, raw) in lines.enumerate() {
        let line_no = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let job = std::str::from_utf8(raw)
            .map_err(|_| "not valid UTF-8".to_string())
            .and_then(|text| {
                let mut job = serde_json::from_str::<NewJob>(text)
                    .map_err(|e| format!("not a change object: {e}"))?;
                // keep the payload's text: the database stores and checks numbers as written
                job.payload_json = serde_json::from_str::<RawPayload>(text)
                    .ok()
                    .and_then(|raw| raw.payload)
                    .map(|p| p.get().to_string());
                known.check(&job.provider, &job.account)?;
                Ok(job)
            });
        match job {
            Ok(job) => batch.push((line_no, job)),
            Err(e) => {
                rejected += 1;
                eprintln!("line {line_no}: {e}");
            }
        }
        if batch.len() >= FILE_BATCH {
            let (q, r) = load_batch(pool, std::mem::take(&mut batch)).await?;
            queued += q;
            rejected += r;
        }
    }
    let (q, r) = load_batch(pool, batch).await?;
    queued += q;
    rejected += r;
    println!("queued {queued}, rejected {rejected}");
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One statement for the whole batch; if the database rejects one line, each line goes on its
/// own so the good ones still land. Returns (queued, rejected).
async fn load_batch(pool: &PgPool, batch: Vec<(usize, NewJob)>) -> anyhow::Result<(usize, usize)> {
    if batch.is_empty() {
        return Ok((0, 0));
    }
    let jobs: Vec<NewJob> = batch.iter().map(|(_, j)| j.clone()).collect();
    let mut conn = pool.acquire().await?;
    match outbox::enqueue_batch(&mut conn, &jobs).await {
        Ok(ids) => return Ok((ids.len(), 0)),
        Err(e) if e.is_invalid() => {}
        Err(e) => return Err(e.into()),
    }
    let (mut queued, mut rejected) = (0, 0);
    for (line_no, job) in &batch {
        match outbox::enqueue(&mut conn, job).await {
            Ok(_) => queued += 1,
            Err(e) if e.is_invalid() => {
                rejected += 1;
                eprintln!("line {line_no}: {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((queued, rejected))
}
