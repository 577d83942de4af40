//! The capture scenario: what the generated triggers cost the application's own writes, as
//! ratios measured in one run on one table (the same statements without, then with, the
//! capture installed), and a resync of unchanged rows (rows compared per second, calls made).

use super::ACCOUNTS;
use anyhow::Context;
use contact_sync::capture::{self, backfill};
use contact_sync::config::{OnDelete, Settings, SourceSettings, TargetSettings};
use contact_sync::outbox::repair;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const TABLE: &str = "public.contact_sync_bench_users";
const SOURCE: &str = "bench_users";

/// One statement's time without and with capture.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    pub without_ms: f64,
    pub with_ms: f64,
    pub ratio: f64,
}

impl Ratio {
    fn new(without: Duration, with: Duration) -> Ratio {
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
        Ratio {
            without_ms: ms(without),
            with_ms: ms(with),
            ratio: if without.is_zero() {
                0.0
            } else {
                (with.as_secs_f64() / without.as_secs_f64() * 100.0).round() / 100.0
            },
        }
    }
}

/// What the capture scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureResult {
    pub rows: i64,
    /// `UPDATE` of an unmapped column of every row.
    pub unmapped_update: Ratio,
    /// `UPDATE` of a mapped column of every row (its jobs queued).
    pub mapped_update: Ratio,
    /// One row's mapped `UPDATE` in its own transaction (mean of `SINGLE_ROW_UPDATES`).
    pub single_row_update: Ratio,
    /// A backfill of the unchanged table after a baseline: rows compared per second and jobs
    /// queued (zero).
    pub resync_rows_per_s: f64,
    pub resync_enqueued: i64,
}

const SINGLE_ROW_UPDATES: i64 = 300;

/// Rounds of [`SINGLE_ROW_UPDATES`], the fastest kept: a round takes a fraction of a second, so
/// a stall of the machine moves one round's mean by as much as capture does (two rounds gave
/// 0.82 and 1.67 ms with capture for one build within an hour).
const SINGLE_ROW_ROUNDS: i64 = 6;

pub async fn measure(pool: &PgPool, config: &Path, rows: i64) -> anyhow::Result<CaptureResult> {
    eprintln!("bench: capture, a table of {rows} rows ...");
    let mut settings = Settings::load_from(Some(config), |_| None, Some(Vec::new()))?;
    settings.sources = BTreeMap::from([(SOURCE.to_string(), source())]);
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {TABLE};
         CREATE TABLE {TABLE} (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL,
             first_name text, last_name text, city text, plan text, lang text,
             marketing_opt_in boolean NOT NULL DEFAULT true, last_seen_at timestamptz,
             created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO {TABLE} (email, first_name, last_name, city, plan, lang)
         SELECT 'cap' || i || '@example.com', 'F' || i, 'L' || i, 'C' || (i % 100), 'p' || (i % 3), 'en'
         FROM generate_series(1, {rows}) i;"
    ))
    .execute(pool)
    .await?;
    // (a statement of its own: VACUUM runs outside a transaction)
    sqlx::query(&format!("VACUUM ANALYZE {TABLE}"))
        .execute(pool)
        .await?;
    let without = timings(pool, rows).await?;
    let plan = capture::plan(pool, &settings, SOURCE, &settings.sources[SOURCE]).await?;
    capture::install(pool, &plan, Duration::from_secs(5)).await?;
    let with = timings(pool, rows).await?;

    eprintln!("bench: capture, resync of {rows} unchanged rows ...");
    let options = |mode| backfill::Options {
        accounts: Vec::new(),
        condition: None,
        mode,
        dry_run: false,
        restart: true,
        page: 1000,
        max_pending: i64::MAX,
        sync_deletes: false,
    };
    backfill::run(
        pool,
        &settings,
        SOURCE,
        &options(backfill::Mode::Baseline),
        |_| {},
    )
    .await?;
    let started = Instant::now();
    let resync = backfill::run(
        pool,
        &settings,
        SOURCE,
        &options(backfill::Mode::Send),
        |_| {},
    )
    .await?;
    let took = started.elapsed().as_secs_f64();

    capture::uninstall(pool, SOURCE, TABLE, Duration::from_secs(5)).await?;
    sqlx::raw_sql(&format!(
        "DROP TABLE {TABLE}; DELETE FROM contact_sync.backfills WHERE source = '{SOURCE}';
         DELETE FROM contact_sync.synced WHERE contact_key LIKE '%:bench\\_%:cap%@example.com';"
    ))
    .execute(pool)
    .await?;
    for account in ACCOUNTS {
        repair::purge_account(pool, account, None).await?;
    }
    Ok(CaptureResult {
        rows,
        unmapped_update: Ratio::new(without.unmapped, with.unmapped),
        mapped_update: Ratio::new(without.mapped, with.mapped),
        single_row_update: Ratio::new(without.single, with.single),
        resync_rows_per_s: (resync.read as f64 / took.max(1e-9)).round(),
        resync_enqueued: resync.enqueued,
    })
}

/// The bench's source: both bench accounts, a few mapped columns.
fn source() -> SourceSettings {
    let target = |fields: &[(&str, &str)], on_delete| TargetSettings {
        on_delete,
        fields: fields
            .iter()
            .map(|(f, e)| (f.to_string(), e.to_string()))
            .collect(),
    };
    SourceSettings {
        table: TABLE.into(),
        key: "id".into(),
        email: "email".into(),
        filter: Some("marketing_opt_in".into()),
        targets: BTreeMap::from([
            (
                ACCOUNTS[0].to_string(),
                target(
                    &[
                        ("lead_name", "concat_ws(' ', first_name, last_name)"),
                        ("lead_city", "city"),
                    ],
                    OnDelete::Ignore,
                ),
            ),
            (
                ACCOUNTS[1].to_string(),
                target(
                    &[("attributes.plan", "plan"), ("language", "lang")],
                    OnDelete::Unsubscribe,
                ),
            ),
        ]),
    }
}

struct Timings {
    unmapped: Duration,
    mapped: Duration,
    single: Duration,
}

/// Each bulk statement twice, the faster kept, from a vacuumed table (the jobs a run queued are
/// removed before the next); the one-row updates in [`SINGLE_ROW_ROUNDS`] rounds.
async fn timings(pool: &PgPool, rows: i64) -> anyhow::Result<Timings> {
    let best = |d: Duration, slot: &mut Option<Duration>| {
        *slot = Some(slot.map_or(d, |s| s.min(d)));
    };
    let (mut unmapped, mut mapped, mut single) = (None, None, None);
    for _ in 0..2 {
        clean(pool).await?;
        let started = Instant::now();
        sqlx::query(&format!("UPDATE {TABLE} SET last_seen_at = now()"))
            .execute(pool)
            .await?;
        best(started.elapsed(), &mut unmapped);
        clean(pool).await?;
        let started = Instant::now();
        sqlx::query(&format!("UPDATE {TABLE} SET city = city || '.'"))
            .execute(pool)
            .await?;
        best(started.elapsed(), &mut mapped);
    }
    clean(pool).await?;
    for round in 0..SINGLE_ROW_ROUNDS {
        let started = Instant::now();
        for i in 0..SINGLE_ROW_UPDATES {
            let id = 1 + (i * 7919 + round * 31) % rows.max(1);
            sqlx::query(&format!(
                "UPDATE {TABLE} SET city = city || '!' WHERE id = $1"
            ))
            .bind(id)
            .execute(pool)
            .await?;
        }
        best(
            started.elapsed() / u32::try_from(SINGLE_ROW_UPDATES).unwrap_or(1),
            &mut single,
        );
    }
    let unmapped = unmapped.context("no run")?;
    let mapped = mapped.context("no run")?;
    let single = single.context("no run")?;
    Ok(Timings {
        unmapped,
        mapped,
        single,
    })
}

async fn clean(pool: &PgPool) -> anyhow::Result<()> {
    for account in ACCOUNTS {
        repair::purge_account(pool, account, None).await?;
    }
    sqlx::raw_sql(&format!("VACUUM {TABLE}"))
        .execute(pool)
        .await?;
    // (a superuser's only: without it the run starts as it is)
    let _ = sqlx::query("CHECKPOINT").execute(pool).await;
    Ok(())
}
