//! Backfill and resync: a source's table read in pages by primary key, each row compared with
//! what its accounts were last sent (the synced state), and only what differs queued, through
//! the same validation as every change. Each page is one transaction: its rows are locked
//! `FOR SHARE` while it runs (an application's update of them waits for the page, so its change
//! is queued after the backfill's), its jobs are queued and the cursor moves on together, so a
//! killed backfill resumes after the last page it queued and never sends a row twice. Before
//! each page it waits while its accounts' backlog is deep, so live changes keep flowing.

use super::catalog;
use super::generate;
use super::CaptureError;
use crate::config::{ProviderKind, Settings};
use crate::outbox::backfills::{self, Cursor};
use crate::outbox::synced;
use crate::outbox::{EnqueueError, NewJob};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a backfill does with each row in scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Queue what differs from what was last sent (everything for a contact never sent).
    Send,
    /// Queue every mapped field, whatever was sent before (the provider was edited by hand).
    Force,
    /// Queue nothing: record the rows as sent (a provider already in step).
    Baseline,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Send => "send",
            Mode::Force => "force",
            Mode::Baseline => "baseline",
        }
    }
}

/// How to run a backfill.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these target accounts (all of the source's when empty).
    pub accounts: Vec<String>,
    /// Only rows for which this SQL condition over the row holds.
    pub condition: Option<String>,
    pub mode: Mode,
    /// Count and show samples; queue and record nothing.
    pub dry_run: bool,
    /// Discard an unfinished backfill of the source and start from the first row.
    pub restart: bool,
    /// Rows per page.
    pub page: i64,
    /// Wait before a page while the accounts have more pending jobs than this.
    pub max_pending: i64,
    /// Once every row is read, send each target's `on_delete` to the contacts it was sent that
    /// are no longer rows of the source inside `where` (deleted, or gone out of it, while
    /// nothing captured them).
    pub sync_deletes: bool,
}

/// Where a backfill is.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Progress {
    pub source: String,
    /// Rows read so far (of this run and, when resumed, of the runs before).
    pub read: i64,
    /// Rows the run will read in all (counted at its start).
    pub total: i64,
    pub enqueued: i64,
    pub unchanged: i64,
    pub rejected: i64,
    /// Contacts no longer in the table that were sent their target's `on_delete`
    /// ([`Options::sync_deletes`]; counted once per account).
    pub deleted: i64,
    /// A run that went on from an unfinished one.
    pub resumed: bool,
    /// A few payloads that would be queued (dry run).
    pub samples: Vec<Value>,
}

/// How long a page waits for rows an application's transaction holds before it is tried again.
const PAGE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Runs a backfill of source `name`, calling `on_page` after every page.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    name: &str,
    options: &Options,
    mut on_page: impl FnMut(&Progress),
) -> Result<Progress, CaptureError> {
    let (name, source) = super::selected(settings, Some(name))?
        .into_iter()
        .next()
        .ok_or_else(|| CaptureError::UnknownSource(name.to_string(), String::new()))?;
    let providers: BTreeMap<String, ProviderKind> = settings
        .accounts
        .iter()
        .map(|(n, a)| (n.clone(), a.provider))
        .collect();
    let accounts: Vec<String> = if options.accounts.is_empty() {
        source.targets.keys().cloned().collect()
    } else {
        for a in &options.accounts {
            if !source.targets.contains_key(a) {
                return Err(CaptureError::Usage(format!(
                    "source {name} has no target account {a} (its targets: {})",
                    source
                        .targets
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        options.accounts.clone()
    };
    if options.sync_deletes && options.condition.is_some() {
        return Err(CaptureError::Usage(
            "--sync-deletes compares the whole table with what was sent: it cannot be combined with --where".into(),
        ));
    }
    if options.sync_deletes {
        // the synced state does not say which source a contact came from
        for (other, settings) in &settings.sources {
            if other == name {
                continue;
            }
            if let Some(account) = accounts.iter().find(|a| settings.targets.contains_key(*a)) {
                return Err(CaptureError::Usage(format!(
                    "source {other} also sends to {account}, and --sync-deletes would take its contacts for deleted: name only accounts this source alone feeds (--account)"
                )));
            }
        }
    }
    if options.sync_deletes && options.mode == Mode::Baseline {
        return Err(CaptureError::Usage(
            "--sync-deletes sends what the contacts gone from the table get: it cannot be combined with --baseline-only".into(),
        ));
    }
    if let Some(condition) = &options.condition {
        if condition.contains(';') || condition.contains("--") || condition.contains("/*") {
            return Err(CaptureError::Usage(
                "--where must be one SQL condition, without ';' or comments".into(),
            ));
        }
    }
    let checked = {
        let mut tx = pool.begin().await?;
        let checked = catalog::check(&mut tx, name, source, &providers).await;
        tx.rollback().await?;
        checked?
    };
    let pages: Vec<(String, ProviderKind, String)> = accounts
        .iter()
        .filter_map(|a| {
            Some((
                a.clone(),
                *providers.get(a)?,
                generate::page_sql(source, &checked, &providers, a)?,
            ))
        })
        .collect();
    let key = &source.key;
    let key_type = &checked.key_type;
    let (schema, _) = source.schema_and_table();
    let condition = options
        .condition
        .as_ref()
        .map(|c| format!(" AND coalesce(({c}\n), false)"))
        .unwrap_or_default();
    let keys_sql = format!(
        "SELECT r.{key}::text FROM {table} r WHERE ($1::text IS NULL OR r.{key} > $1::{key_type}){condition} \
         ORDER BY r.{key} LIMIT $2 FOR SHARE",
        table = source.table
    );
    let count_sql = format!(
        "SELECT count(*) FROM {table} r WHERE ($1::text IS NULL OR r.{key} > $1::{key_type}){condition}",
        table = source.table
    );

    // one backfill per source at a time: a session-level lock, on a connection of its own
    // that never goes back to the pool, so that a run that fails or is dropped midway (an
    // embedder's timeout) releases it when the connection closes, instead of leaving it held
    // by a pooled session that refuses every later backfill of the source
    let mut lock = pool.acquire().await?.detach();
    if !backfills::try_lock(&mut lock, name).await? {
        return Err(CaptureError::Usage(format!(
            "a backfill of {name} is already running; wait for it, or stop it (it resumes where it stopped)"
        )));
    }
    let result = async {
        let mut cursor = Cursor {
            source: name.to_string(),
            accounts: accounts.clone(),
            condition: options.condition.clone(),
            mode: options.mode.as_str().to_string(),
            ..Cursor::default()
        };
        let mut resumed = false;
        if !options.dry_run {
            match backfills::get(pool, name).await? {
                Some(old) if !old.done && !options.restart => {
                    if (&old.accounts, &old.condition, &old.mode)
                        != (&cursor.accounts, &cursor.condition, &cursor.mode)
                    {
                        return Err(CaptureError::Usage(format!(
                            "an unfinished backfill of {name} ran with other options (accounts {}, where {}, mode {}): run it again with the same options to resume it, or add --restart",
                            old.accounts.join(","),
                            old.condition.as_deref().unwrap_or("-"),
                            old.mode
                        )));
                    }
                    resumed = old.last_key.is_some();
                    cursor = old;
                }
                _ => backfills::start(pool, &cursor).await?,
            }
        }
        let left: i64 = sqlx::query_scalar(&count_sql)
            .bind(&cursor.last_key)
            .fetch_one(pool)
            .await?;
        let mut progress = Progress {
            source: name.to_string(),
            read: cursor.read,
            total: cursor.read + left,
            enqueued: cursor.enqueued,
            unchanged: cursor.unchanged,
            rejected: cursor.rejected,
            deleted: 0,
            resumed,
            samples: Vec::new(),
        };
        loop {
            if !options.dry_run && options.mode != Mode::Baseline {
                while backfills::pending(pool, &accounts).await? > options.max_pending {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let mut tx = begin(pool, schema, PAGE_LOCK_WAIT, false).await?;
            let keys: Vec<String> = match sqlx::query_scalar(&keys_sql)
                .bind(&cursor.last_key)
                .bind(options.page)
                .fetch_all(&mut *tx)
                .await
            {
                Ok(keys) => keys,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    // an application's transaction holds rows of this page: try again
                    drop(tx);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(last) = keys.last().cloned() else {
                break;
            };
            for (account, provider, sql) in &pages {
                let page = Page {
                    name,
                    account,
                    provider: *provider,
                    sql,
                };
                page.run(&mut tx, &keys, options, &mut progress).await?;
            }
            progress.read += i64::try_from(keys.len()).unwrap_or(i64::MAX);
            cursor.last_key = Some(last);
            cursor.read = progress.read;
            cursor.enqueued = progress.enqueued;
            cursor.unchanged = progress.unchanged;
            cursor.rejected = progress.rejected;
            if options.dry_run {
                tx.rollback().await?;
            } else {
                backfills::advance(&mut tx, &cursor).await?;
                tx.commit().await?;
            }
            on_page(&progress);
        }
        if options.sync_deletes {
            let gone: Vec<(&str, ProviderKind, String)> = pages
                .iter()
                .filter_map(|(a, p, _)| Some((a.as_str(), *p, generate::gone_sql(source, a, *p)?)))
                .collect();
            let table = &source.table;
            for (account, provider, sql) in &gone {
                let sweep = Sweep {
                    table,
                    schema,
                    account,
                    provider: *provider,
                    sql,
                };
                sweep.run(pool, options.dry_run, &mut progress).await?;
            }
        }
        if !options.dry_run {
            cursor.done = true;
            let mut conn = pool.acquire().await?;
            backfills::advance(&mut conn, &cursor).await?;
        }
        Ok(progress)
    }
    .await;
    let _ = backfills::unlock(&mut lock, name).await;
    let _ = sqlx::Connection::close(lock).await;
    result
}

/// A transaction of the backfill's: names resolve as in the generated triggers, and a lock
/// waits at most `lock_wait`. `read_committed`: each statement sees what committed before it,
/// whatever the role's default isolation.
async fn begin(
    pool: &PgPool,
    schema: &str,
    lock_wait: Duration,
    read_committed: bool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if read_committed {
        // (the first statement of the transaction, or Postgres refuses it)
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", lock_wait.as_millis()))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("SET LOCAL search_path = pg_catalog, {schema}"))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One account's part of `--sync-deletes`: its `on_delete` queued for the contacts it was sent
/// that the table no longer has. The table is locked `SHARE` while it is compared (writes to it
/// wait, about a second per million rows), so that a row written meanwhile is never taken for
/// gone; each change is queued after whatever the contact had queued before.
struct Sweep<'a> {
    table: &'a str,
    schema: &'a str,
    account: &'a str,
    provider: ProviderKind,
    sql: &'a str,
}

/// How long the sweep waits for the table's writers at a time: the application's writes queue
/// behind a waiting `LOCK`, so it gives up soon and tries again.
const SWEEP_LOCK_WAIT: Duration = Duration::from_millis(250);

/// How long the sweep keeps trying to lock a table that is always being written.
const SWEEP_LOCK_PATIENCE: Duration = Duration::from_secs(120);

impl Sweep<'_> {
    async fn run(
        &self,
        pool: &PgPool,
        dry_run: bool,
        progress: &mut Progress,
    ) -> Result<(), CaptureError> {
        let started = std::time::Instant::now();
        loop {
            // (at READ COMMITTED: the insert sees every row its lock waited for)
            let mut tx = begin(pool, self.schema, SWEEP_LOCK_WAIT, true).await?;
            // one hash anti-join, whatever the planner thinks of the table's size
            sqlx::query("SET LOCAL enable_nestloop = off")
                .execute(&mut *tx)
                .await?;
            // rows this role cannot see would be taken for gone
            let hidden: bool = sqlx::query_scalar("SELECT row_security_active($1::regclass)")
                .bind(self.table)
                .fetch_one(&mut *tx)
                .await?;
            if hidden {
                return Err(CaptureError::Usage(format!(
                    "row-level security hides rows of {} from this role, and --sync-deletes would take them for deleted: run it as a role that sees every row (the table's owner, or one with BYPASSRLS)",
                    self.table
                )));
            }
            if dry_run {
                let gone: Vec<(String, Value)> =
                    sqlx::query_as(&format!("SELECT x.email, x.payload FROM ({}) x", self.sql))
                        .fetch_all(&mut *tx)
                        .await?;
                for (email, payload) in gone
                    .iter()
                    .take(3usize.saturating_sub(progress.samples.len()))
                {
                    progress.samples.push(serde_json::json!({
                        "account": self.account, "email": email, "payload": payload
                    }));
                }
                progress.deleted += i64::try_from(gone.len()).unwrap_or(i64::MAX);
                tx.rollback().await?;
                return Ok(());
            }
            let locked = sqlx::query(&format!("LOCK TABLE {} IN SHARE MODE", self.table))
                .execute(&mut *tx)
                .await;
            match locked {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    drop(tx);
                    if started.elapsed() > SWEEP_LOCK_PATIENCE {
                        return Err(CaptureError::Usage(format!(
                            "{} was never free of writing transactions for {} ms in {} s, so the contacts gone from it could not be compared: every row is backfilled; run the same command again when the table is quieter (a transaction left open on it holds it too)",
                            self.table,
                            SWEEP_LOCK_WAIT.as_millis(),
                            SWEEP_LOCK_PATIENCE.as_secs()
                        )));
                    }
                    // an application's transaction is writing the table: let the writes queued
                    // behind the lock through, then try again
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let queued = sqlx::query(&format!(
                "INSERT INTO contact_sync.jobs (provider, account, email, payload)\n\
                 SELECT {}, {}, x.email, x.payload FROM ({}) x ORDER BY x.email",
                generate::literal(self.provider.as_str()),
                generate::literal(self.account),
                self.sql
            ))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            progress.deleted += i64::try_from(queued).unwrap_or(i64::MAX);
            return Ok(());
        }
    }
}

/// One account's part of one page.
struct Page<'a> {
    name: &'a str,
    account: &'a str,
    provider: ProviderKind,
    sql: &'a str,
}

impl Page<'_> {
    async fn run(
        &self,
        tx: &mut PgConnection,
        keys: &[String],
        options: &Options,
        progress: &mut Progress,
    ) -> Result<(), CaptureError> {
        let rows = self.read(tx, keys, progress).await?;
        let emails: Vec<String> = rows.iter().map(|r| r.email.clone()).collect();
        if options.mode == Mode::Baseline {
            let fields: Vec<Value> = rows
                .iter()
                .map(|r| Value::Object(r.payload.clone()))
                .collect();
            synced::baseline(tx, self.provider.as_str(), self.account, &emails, &fields).await?;
            progress.unchanged += i64::try_from(rows.len()).unwrap_or(0);
            return Ok(());
        }
        let known = if options.mode == Mode::Force {
            // (the worker would otherwise find the provider holding what it was last sent)
            synced::forget(tx, self.provider.as_str(), self.account, &emails).await?;
            vec![None; rows.len()]
        } else {
            synced::known(tx, self.provider.as_str(), self.account, &emails).await?
        };
        let mut jobs = Vec::new();
        for (row, known) in rows.into_iter().zip(known) {
            let payload = synced::differing(&row.payload, known.as_ref());
            if payload.is_empty() {
                progress.unchanged += 1;
                continue;
            }
            let job = NewJob::new(
                self.provider.as_str(),
                self.account,
                &row.email,
                Value::Object(payload),
            );
            if options.dry_run && progress.samples.len() < 3 {
                progress.samples.push(serde_json::json!({
                    "account": self.account, "email": row.email, "payload": job.payload
                }));
            }
            jobs.push((row.key, job));
        }
        self.enqueue(tx, jobs, progress).await
    }

    /// The page's rows that are contacts, with their payloads; a row whose mapping fails (an
    /// expression's error on its values) is rejected alone.
    async fn read(
        &self,
        tx: &mut PgConnection,
        keys: &[String],
        progress: &mut Progress,
    ) -> Result<Vec<Row>, CaptureError> {
        let mut out = Vec::new();
        let mut stack = vec![keys];
        while let Some(part) = stack.pop() {
            if part.is_empty() {
                continue;
            }
            sqlx::query("SAVEPOINT backfill_read")
                .execute(&mut *tx)
                .await?;
            let read: Result<Vec<PageRow>, _> = sqlx::query_as(self.sql)
                .bind(part)
                .fetch_all(&mut *tx)
                .await;
            match read {
                Ok(rows) => {
                    sqlx::query("RELEASE SAVEPOINT backfill_read")
                        .execute(&mut *tx)
                        .await?;
                    out.extend(rows.into_iter().filter_map(
                        |(key, email, inside, payload)| match (inside, email, payload) {
                            (true, Some(email), Some(Value::Object(payload))) => Some(Row {
                                key,
                                email,
                                payload,
                            }),
                            _ => None,
                        },
                    ));
                }
                Err(sqlx::Error::Database(e)) if !is_mapping_error(e.code().as_deref()) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT backfill_read")
                        .execute(&mut *tx)
                        .await?;
                    if let [key] = part {
                        self.reject(tx, key, e.code().as_deref().unwrap_or(""), e.message())
                            .await?;
                        progress.rejected += 1;
                    } else {
                        let (a, b) = part.split_at(part.len() / 2);
                        stack.push(b);
                        stack.push(a);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Queues `jobs` (row key, job); one that enqueue refuses is rejected alone.
    async fn enqueue(
        &self,
        tx: &mut PgConnection,
        jobs: Vec<(String, NewJob)>,
        progress: &mut Progress,
    ) -> Result<(), CaptureError> {
        let mut stack = vec![&jobs[..]];
        while let Some(part) = stack.pop() {
            if part.is_empty() {
                continue;
            }
            sqlx::query("SAVEPOINT backfill_enqueue")
                .execute(&mut *tx)
                .await?;
            let batch: Vec<NewJob> = part.iter().map(|(_, j)| j.clone()).collect();
            match crate::outbox::enqueue_batch(tx, &batch).await {
                Ok(ids) => {
                    sqlx::query("RELEASE SAVEPOINT backfill_enqueue")
                        .execute(&mut *tx)
                        .await?;
                    progress.enqueued += i64::try_from(ids.len()).unwrap_or(0);
                }
                Err(EnqueueError::Invalid { message, sqlstate }) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT backfill_enqueue")
                        .execute(&mut *tx)
                        .await?;
                    if let [(key, _)] = part {
                        self.reject(tx, key, &sqlstate, &message).await?;
                        progress.rejected += 1;
                    } else {
                        let (a, b) = part.split_at(part.len() / 2);
                        stack.push(b);
                        stack.push(a);
                    }
                }
                Err(EnqueueError::Database(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn reject(
        &self,
        tx: &mut PgConnection,
        key: &str,
        sqlstate: &str,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO contact_sync.capture_rejections (source, account, row_key, sqlstate, reason) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(self.name)
        .bind(self.account)
        .bind(key)
        .bind(sqlstate)
        .bind(crate::text::storable(reason))
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// A mapping that no longer fits the table (SQLSTATE class 42): an error for the whole run, not
/// a row's.
fn is_mapping_error(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("42"))
}

/// A row of a page as read: key, address, whether it is a contact, payload.
type PageRow = (String, Option<String>, bool, Option<Value>);

/// A row that is a contact, with every mapped field.
struct Row {
    key: String,
    email: String,
    payload: Map<String, Value>,
}
