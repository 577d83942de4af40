//! Capture: the application's own tables as the source of changes. A source
//! (`[sources.NAME]`) maps a table's rows to provider fields per account; this module checks
//! the mapping against the live table ([`catalog`]), generates the statement-level triggers
//! that turn every committed write into jobs inside the application's transaction
//! ([`generate`]), and installs, verifies and removes them. What the triggers record besides
//! jobs (rejected rows, statements not captured) is read through [`crate::outbox::capture`].

pub mod backfill;
pub mod catalog;
pub mod generate;

use crate::config::{ProviderKind, Settings, SourceSettings};
use crate::outbox::capture as records;
use catalog::CatalogError;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;

/// Why a capture command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("no source named {0:?} in the configuration{1}")]
    UnknownSource(String, String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Usage(String),
}

/// The script that installs one source, as `capture plan` prints it and `capture install`
/// runs it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: String,
    pub table: String,
    /// The triggers and their functions.
    pub triggers_sql: String,
    /// md5 of `triggers_sql`: what `capture_sources` records as installed.
    pub mapping_md5: String,
    /// The whole script: `triggers_sql`, then the record of the installation.
    pub script: String,
    /// `(function, md5 of its body)` as the script creates them, in name order.
    pub function_digests: Vec<(String, String)>,
}

/// The sources named (all configured ones when `only` is `None`), in name order.
pub fn selected<'a>(
    settings: &'a Settings,
    only: Option<&str>,
) -> Result<Vec<(&'a str, &'a SourceSettings)>, CaptureError> {
    match only {
        None => Ok(settings
            .sources
            .iter()
            .map(|(n, s)| (n.as_str(), s))
            .collect()),
        Some(name) => match settings.sources.get_key_value(name) {
            Some((n, s)) => Ok(vec![(n.as_str(), s)]),
            None => {
                let known: Vec<&String> = settings.sources.keys().collect();
                let hint = crate::text::closest(name, &known)
                    .map(|k| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                Err(CaptureError::UnknownSource(name.to_string(), hint))
            }
        },
    }
}

fn providers(settings: &Settings) -> BTreeMap<String, ProviderKind> {
    settings
        .accounts
        .iter()
        .map(|(name, a)| (name.clone(), a.provider))
        .collect()
}

/// Checks `source` against the live table and generates its script.
pub async fn plan(
    pool: &PgPool,
    settings: &Settings,
    name: &str,
    source: &SourceSettings,
) -> Result<Plan, CaptureError> {
    let providers = providers(settings);
    let mut tx = pool.begin().await?;
    let checked = catalog::check(&mut tx, name, source, &providers).await;
    tx.rollback().await?;
    let checked = checked?;
    let triggers_sql = generate::install_sql(name, source, &checked, &providers);
    let mapping_md5 = crate::providers::md5_hex(&[triggers_sql.as_bytes()]);
    let columns = serde_json::to_value(&checked.columns).unwrap_or_default();
    let script = format!(
        "BEGIN;\n{triggers_sql}\n{}COMMIT;\n",
        records::record_sql(name, &source.table, &mapping_md5, &columns)
    );
    let function_digests = generate::function_bodies(&triggers_sql)
        .into_iter()
        .map(|(f, body)| (f, crate::providers::md5_hex(&[body.as_bytes()])))
        .collect();
    Ok(Plan {
        function_digests,
        source: name.to_string(),
        table: source.table.clone(),
        triggers_sql,
        mapping_md5,
        script,
    })
}

/// Runs a plan's script (idempotent: functions replaced, triggers dropped and created again),
/// waiting at most `lock_wait` for the table (creating a trigger blocks the table's writes for
/// the few milliseconds the transaction takes).
pub async fn install(
    pool: &PgPool,
    plan: &Plan,
    lock_wait: std::time::Duration,
) -> Result<(), CaptureError> {
    let mut conn = pool.acquire().await?;
    let script = plan.script.replacen(
        "BEGIN;\n",
        &format!(
            "BEGIN;\nSET LOCAL lock_timeout = '{}ms';\n",
            lock_wait.as_millis().max(1)
        ),
        1,
    );
    run_script(&mut conn, &script).await
}

/// Runs a script of several statements (`BEGIN; … COMMIT;`); when one fails, the transaction it
/// left open on the connection is rolled back before the connection returns to the pool.
async fn run_script(conn: &mut sqlx::PgConnection, script: &str) -> Result<(), CaptureError> {
    let result = sqlx::raw_sql(script).execute(&mut *conn).await;
    if result.is_err() {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    }
    result?;
    Ok(())
}

/// Removes a source's triggers, functions and record (`table`: where they are).
pub async fn uninstall(
    pool: &PgPool,
    name: &str,
    table: &str,
    lock_wait: std::time::Duration,
) -> Result<(), CaptureError> {
    let script = format!(
        "BEGIN;\nSET LOCAL lock_timeout = '{}ms';\n{}COMMIT;\n",
        lock_wait.as_millis().max(1),
        generate::uninstall_sql(name, table)
    );
    let mut conn = pool.acquire().await?;
    run_script(&mut conn, &script).await
}

/// What `capture verify` found for one source.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub source: String,
    pub table: String,
    /// Everything that is wrong, each with what to do; empty when the capture is sound.
    pub problems: Vec<String>,
    /// Rows rejected and statements not captured since the installation.
    pub since_install: records::Problems,
}

impl Verdict {
    pub fn sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Compares each configured source (or `only`) with what is installed and with the table as it
/// is now; installed sources no longer configured are reported too.
pub async fn verify(
    pool: &PgPool,
    settings: &Settings,
    only: Option<&str>,
) -> Result<Vec<Verdict>, CaptureError> {
    let installed: BTreeMap<String, records::Installed> = records::installed(pool)
        .await?
        .into_iter()
        .map(|i| (i.source.clone(), i))
        .collect();
    let mut verdicts = Vec::new();
    for (name, source) in selected(settings, only)? {
        let mut problems = Vec::new();
        let record = installed.get(name);
        let plan = match plan(pool, settings, name, source).await {
            Ok(plan) => Some(plan),
            Err(CaptureError::Catalog(CatalogError::Mapping { key, reason })) => {
                problems.push(format!(
                    "the mapping no longer fits the table: {key}: {reason} (fix the table or the configuration, then run `contact-sync capture install {name}`)"
                ));
                None
            }
            Err(e) => return Err(e),
        };
        match record {
            None => problems.push(format!(
                "not installed: run `contact-sync capture install {name}`"
            )),
            Some(record) => {
                if record.table_name != source.table {
                    problems.push(format!(
                        "installed on {} but configured for {}: run `contact-sync capture uninstall {name}` then `install`",
                        record.table_name, source.table
                    ));
                }
                if let Some(plan) = &plan {
                    if plan.mapping_md5 != record.mapping_md5 {
                        problems.push(format!(
                            "the installed triggers differ from the configured mapping (or from what the table's types call for now): run `contact-sync capture install {name}`"
                        ));
                    }
                }
                problems.extend(column_drift(record, pool).await?);
                let triggers = records::triggers_on(pool, &record.table_name).await?;
                for operation in generate::OPERATIONS.iter().chain(&["truncate"]) {
                    let trigger = generate::trigger_name(name, operation);
                    let function = generate::function_name(name, operation);
                    match triggers.iter().find(|t| t.name == trigger) {
                        None => problems.push(format!(
                            "trigger {trigger} is missing on {}: run `contact-sync capture install {name}`",
                            record.table_name
                        )),
                        Some(t) if t.function != function => problems.push(format!(
                            "trigger {trigger} on {} calls {} instead of {function}: run `contact-sync capture install {name}`",
                            record.table_name, t.function
                        )),
                        Some(t) if !matches!(t.enabled.as_str(), "O" | "A") => problems.push(format!(
                            "trigger {trigger} on {} is {}: its writes are not captured (ALTER TABLE … ENABLE TRIGGER {trigger}, then a backfill)",
                            record.table_name,
                            if t.enabled == "D" { "disabled" } else { "enabled for replicas only" }
                        )),
                        Some(_) => {}
                    }
                }
                if let Some(plan) = &plan {
                    let names: Vec<String> = plan
                        .function_digests
                        .iter()
                        .map(|(n, _)| n.clone())
                        .collect();
                    let installed = records::function_digests(pool, &names).await?;
                    if installed != plan.function_digests {
                        problems.push(format!(
                            "the installed trigger functions were changed by hand: run `contact-sync capture install {name}`"
                        ));
                    }
                }
            }
        }
        let since_install = records::problems(pool, name, record.map(|r| r.installed_at)).await?;
        if since_install.failures > 0 {
            problems.push(format!(
                "{} statement(s) on {} were not captured since the installation (last: {}); after fixing, a backfill resyncs",
                since_install.failures,
                source.table,
                since_install.last_failure.as_deref().unwrap_or("?")
            ));
        }
        verdicts.push(Verdict {
            source: name.to_string(),
            table: source.table.clone(),
            problems,
            since_install,
        });
    }
    if only.is_none() {
        for (name, record) in &installed {
            if !settings.sources.contains_key(name) {
                verdicts.push(Verdict {
                    source: name.clone(),
                    table: record.table_name.clone(),
                    problems: vec![format!(
                        "installed on {} but not in the configuration: its triggers still queue changes; run `contact-sync capture uninstall {name}` to remove them",
                        record.table_name
                    )],
                    since_install: records::Problems::default(),
                });
            }
        }
    }
    Ok(verdicts)
}

/// The table's columns now against those recorded at installation.
async fn column_drift(
    record: &records::Installed,
    pool: &PgPool,
) -> Result<Vec<String>, sqlx::Error> {
    let then: Vec<(String, String)> =
        serde_json::from_value(record.columns.0.clone()).unwrap_or_default();
    let now = catalog::columns_of(&mut *pool.acquire().await?, &record.table_name).await?;
    if now.is_empty() {
        return Ok(vec![format!(
            "table {} no longer exists: run `contact-sync capture uninstall {}`",
            record.table_name, record.source
        )]);
    }
    let mut changes = Vec::new();
    for (column, ty) in &then {
        match now.iter().find(|(c, _)| c == column) {
            None => changes.push(format!("{column} dropped or renamed")),
            Some((_, t)) if t != ty => changes.push(format!("{column} changed from {ty} to {t}")),
            Some(_) => {}
        }
    }
    Ok(if changes.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "columns of {} changed since the installation: {}",
            record.table_name,
            changes.join(", ")
        )]
    })
}
