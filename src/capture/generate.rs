//! The SQL that captures one source: a trigger function per operation (insert, update, delete,
//! truncate), statement-level with transition tables, and the triggers on the application's
//! table. What `capture plan` prints and `capture install` runs, byte for byte.
//!
//! Each function turns the statement's rows into jobs for every target account in one set-based
//! insert. It never fails the application's statement:
//! - a statement of at most [`SMALL_STATEMENT_ROWS`] rows (a web request's write, a loop's) is
//!   evaluated and checked first, as the insert checks it, in a block that writes nothing; its
//!   jobs are then inserted in the application's own transaction, taking no transaction id of
//!   their own;
//! - a larger statement, or one that failed that check, is inserted per account inside an
//!   exception block (a subtransaction). A statement whose rows cannot all be queued is split in
//!   halves until the rows at fault are alone, and those are recorded in
//!   `contact_sync.capture_rejections` with the reason; a mapping that no longer fits the table
//!   (a column renamed or dropped: SQLSTATE class 42) records the statement in
//!   `contact_sync.capture_failures` instead. A statement with `b` bad rows among `n` costs
//!   about `2·b·log2(n)` subtransactions; a clean large one costs one per account.

use super::catalog::{CheckedSource, Kind, Typed};
use crate::config::{OnDelete, ProviderKind, SourceSettings};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Placeholders in generated statements, filled in per use (control characters: the
/// configuration refuses them in expressions, so user text never holds one).
const PREFIX: &str = "\u{1}prefix\u{1}";
const JOIN: &str = "\u{1}join\u{1}";
const FILTER: &str = "\u{1}filter\u{1}";

/// The least `work_mem` the capture functions run with. Comparing a statement's old and new
/// rows is a hash join of the transition tables; with the default 4 MB it spills to disk from
/// about 40,000 rows (an update of 100,000 rows of unmapped columns on the development cluster:
/// 1.61× the time without capture, 1.46× with this). A session with more keeps its own. The
/// memory is taken only as a statement's rows need it.
const WORK_MEM: &str = "64MB";

/// The most rows a captured statement may have for its jobs to be checked before they are
/// written, and written in the application's own transaction. Written inside an exception
/// block instead, as larger statements are, each statement's jobs took a subtransaction id: an
/// application transaction of more than 64 captured statements (a loop of single-row updates)
/// overflowed Postgres's per-session cache of subtransaction ids, so that every snapshot taken
/// on the database while it ran had to look them up in `pg_subtrans`, and each captured
/// statement used up one more transaction id. Checked first, a statement's jobs are collected
/// into arrays, in memory in proportion to them: hence the bound.
pub const SMALL_STATEMENT_ROWS: usize = 1000;

/// Gives the application's session its own `work_mem` back before a capture function returns.
/// (A function's `SET` clause would also lower a larger one; a `set_config(…, true)` of a
/// variable the function has no `SET` clause for lasts until the transaction ends, so the
/// function restores it itself. An error that leaves the function skips this: it aborts the
/// application's statement, and only a savepoint's rollback would let the transaction go on
/// with the larger value.)
const RESTORE_WORK_MEM: &str = "PERFORM set_config('work_mem', _cs_work_mem, true);";

/// The dollar-quote of generated function bodies (the configuration refuses it in expressions).
pub use crate::config::sources::BODY_QUOTE;

/// The operations a source's triggers capture.
pub const OPERATIONS: [&str; 3] = ["insert", "update", "delete"];

/// Names of the objects a source's capture creates.
pub fn function_name(source: &str, operation: &str) -> String {
    format!("contact_sync.capture_{source}_{operation}")
}

pub fn trigger_name(source: &str, operation: &str) -> String {
    format!("contact_sync_capture_{source}_{operation}")
}

/// One target of a source, ready to generate.
struct Target<'a> {
    account: &'a str,
    provider: ProviderKind,
    on_delete: OnDelete,
    /// Provider field → (expression, type).
    fields: Vec<(&'a str, &'a str, &'a Typed)>,
}

/// The full installation script of one source: functions, triggers (replacing earlier ones),
/// and its row in `contact_sync.capture_sources` (with `md5` standing for the script's digest,
/// filled in by the caller).
pub fn install_sql(
    name: &str,
    source: &SourceSettings,
    checked: &CheckedSource,
    providers: &BTreeMap<String, ProviderKind>,
) -> String {
    let targets = targets(source, checked, providers);
    let table = &source.table;
    let mut sql = format!(
        "-- contact-sync: capture of source {name:?} ({table} → {})\n",
        targets
            .iter()
            .map(|t| t.account)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (schema, _) = source.schema_and_table();
    for operation in OPERATIONS {
        let mut body = String::new();
        let blocks: Vec<(&Target, Option<Vec<String>>)> = targets
            .iter()
            .map(|t| (t, watched(source, checked, Some(t.account))))
            .collect();
        if operation == "update" {
            body.push_str(&update_gate_sql(source, checked, &blocks));
        }
        body.push_str(SET_CAPTURE_TIME);
        let mut fallback = String::new();
        for (i, (target, watched)) in blocks.iter().enumerate() {
            fallback.push_str(&gated(
                operation,
                i,
                &target_block(name, source, operation, target, watched),
            ));
        }
        body.push_str(&small_statement_sql(
            name, source, operation, &blocks, &fallback,
        ));
        write!(
            sql,
            "\nCREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n\
             LANGUAGE plpgsql\n\
             SECURITY DEFINER\n\
             SET search_path = pg_catalog, {schema}\n\
             SET plan_cache_mode = force_custom_plan\n\
             SET jit = off\n\
             AS $contact_sync_capture$\n\
             DECLARE\n    _cs_keys text[];\n    _cs_stack int[];\n    _cs_lo int;\n    _cs_hi int;\n    _cs_mid int;\n\
             \x20   _cs_small boolean;\n    _cs_rows bigint;\n    _cs_accounts text[];\n    _cs_emails text[];\n    _cs_payloads jsonb[];\n\
             \x20   _cs_changed boolean[];\n    _cs_a text[];\n    _cs_e text[];\n    _cs_p jsonb[];\n\
             \x20   _cs_work_mem text := current_setting('work_mem');\n\
             BEGIN\n\
             \x20   -- (at least {WORK_MEM} for the comparisons, the session's own again on the way out)\n\
             \x20   IF pg_size_bytes(_cs_work_mem) < pg_size_bytes('{WORK_MEM}') THEN\n\
             \x20       PERFORM set_config('work_mem', '{WORK_MEM}', true);\n\
             \x20   END IF;\n\
             {body}    {RESTORE_WORK_MEM}\n    RETURN NULL;\nEND\n$contact_sync_capture$;\n",
            function = function_name(name, operation),
        )
        .ok();
    }
    write!(
        sql,
        "\nCREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n\
         LANGUAGE plpgsql\n\
         SECURITY DEFINER\n\
         SET search_path = pg_catalog\n\
         AS $contact_sync_capture$\n\
         BEGIN\n\
         \x20   INSERT INTO contact_sync.capture_failures (source, operation, sqlstate, error, row_count)\n\
         \x20   VALUES ({name_literal}, 'truncate', '00000', 'TRUNCATE is not captured: the providers keep these contacts; run a backfill to resync', 0);\n\
         \x20   RETURN NULL;\n\
         END\n$contact_sync_capture$;\n",
        function = function_name(name, "truncate"),
        name_literal = literal(name),
    )
    .ok();
    for operation in OPERATIONS {
        let referencing = match operation {
            "insert" => "REFERENCING NEW TABLE AS new_rows",
            "update" => "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
            _ => "REFERENCING OLD TABLE AS old_rows",
        };
        write!(
            sql,
            "\nDROP TRIGGER IF EXISTS {trigger} ON {table};\n\
             CREATE TRIGGER {trigger} AFTER {op} ON {table} {referencing}\n\
             \x20   FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n",
            trigger = trigger_name(name, operation),
            op = operation.to_uppercase(),
            function = function_name(name, operation),
        )
        .ok();
    }
    write!(
        sql,
        "\nDROP TRIGGER IF EXISTS {trigger} ON {table};\n\
         CREATE TRIGGER {trigger} AFTER TRUNCATE ON {table}\n\
         \x20   FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n",
        trigger = trigger_name(name, "truncate"),
        function = function_name(name, "truncate"),
    )
    .ok();
    sql
}

fn targets<'a>(
    source: &'a SourceSettings,
    checked: &'a CheckedSource,
    providers: &BTreeMap<String, ProviderKind>,
) -> Vec<Target<'a>> {
    source
        .targets
        .iter()
        .filter_map(|(account, t)| {
            let provider = *providers.get(account)?;
            let typed = checked.fields.get(account)?;
            Some(Target {
                account,
                provider,
                on_delete: t.on_delete,
                fields: t
                    .fields
                    .iter()
                    .filter_map(|(f, e)| Some((f.as_str(), e.as_str(), typed.get(f)?)))
                    .collect(),
            })
        })
        .collect()
}

/// Removes everything [`install_sql`] created for `name`: its functions, and with them (CASCADE)
/// its triggers wherever the table is now (renamed or moved), and its record and backfill cursor.
pub fn uninstall_sql(name: &str, table: &str) -> String {
    let mut sql = format!("-- contact-sync: remove the capture of source {name:?} ({table})\n");
    for operation in OPERATIONS.iter().chain(&["truncate"]) {
        writeln!(
            sql,
            "DROP FUNCTION IF EXISTS {}() CASCADE;",
            function_name(name, operation)
        )
        .ok();
    }
    writeln!(
        sql,
        "DELETE FROM contact_sync.capture_sources WHERE source = {0};\n\
         DELETE FROM contact_sync.backfills WHERE source = {0};",
        literal(name)
    )
    .ok();
    sql
}

/// The columns a source's expressions read (`None`: an expression reads the whole row, or
/// reads none, so no column can be ruled out).
/// `account`: only the columns that account's fields read (with the address and `where`).
fn watched(
    source: &SourceSettings,
    checked: &CheckedSource,
    account: Option<&str>,
) -> Option<Vec<String>> {
    let mut columns = std::collections::BTreeSet::new();
    let typed = std::iter::once(&checked.email)
        .chain(checked.filter.iter())
        .chain(
            checked
                .fields
                .iter()
                .filter(|(a, _)| account.is_none_or(|only| only == a.as_str()))
                .flat_map(|(_, f)| f.values()),
        );
    for t in typed {
        columns.extend(t.reads.as_ref()?.iter().cloned());
    }
    columns.insert(source.key.clone());
    // a type without an equality operator (json, xml, geometric types) is compared as text
    Some(
        columns
            .into_iter()
            .map(|c| {
                let ty = checked
                    .columns
                    .iter()
                    .find(|(name, _)| *name == c)
                    .map(|(_, t)| t.trim_end_matches("[]"))
                    .unwrap_or_default();
                let no_equality = matches!(
                    ty,
                    "json"
                        | "xml"
                        | "point"
                        | "line"
                        | "lseg"
                        | "box"
                        | "path"
                        | "polygon"
                        | "circle"
                );
                if no_equality {
                    format!("{c}::text")
                } else {
                    c
                }
            })
            .collect(),
    )
}

/// The rows of an `UPDATE` whose watched columns changed (or whose key did): one hash join of
/// the transition tables, `SELECT k` of the keys as text.
fn changed_sql(source: &SourceSettings, watched: &Option<Vec<String>>) -> String {
    format!(
        "SELECT coalesce(n.{key}, o.{key}) AS k FROM old_rows o FULL JOIN new_rows n ON n.{key} = o.{key}\n\
         WHERE {}",
        differs_sql(source, watched),
        key = source.key
    )
}

/// Whether an `UPDATE`'s row (old `o`, new `n`) changed in the watched columns, or its key did.
fn differs_sql(source: &SourceSettings, watched: &Option<Vec<String>>) -> String {
    let differs = match watched {
        Some(columns) => {
            let list = |a: &str| {
                columns
                    .iter()
                    .map(|c| format!("({a}.{c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("ROW({}) IS DISTINCT FROM ROW({})", list("o"), list("n"))
        }
        // (qualified whole rows, compared as text: a column named `o` or `n` would make the
        // bare aliases ambiguous, and a json column has no equality)
        None => "ROW(o.*)::text IS DISTINCT FROM ROW(n.*)::text".to_string(),
    };
    format!(
        "o.{key} IS NULL OR n.{key} IS NULL OR {differs}",
        key = source.key
    )
}

/// The start of an `UPDATE`'s function: which accounts' columns changed (`_cs_changed[i]`, in
/// the order of the targets), in one hash join of the transition tables. An update of columns
/// no mapping reads (the usual `last_seen_at = now()`) stops here; an account whose columns did
/// not change is not evaluated below (the statements of a one-row update cost mostly their
/// set-up, in proportion to their size). A mapping that no longer fits the table goes on with
/// every account: each records it below.
fn update_gate_sql(
    source: &SourceSettings,
    checked: &CheckedSource,
    blocks: &[(&Target, Option<Vec<String>>)],
) -> String {
    let flags: Vec<String> = blocks
        .iter()
        .enumerate()
        .map(|(i, _)| format!("coalesce(bool_or(s.d{i}), false)"))
        .collect();
    let differs: Vec<String> = blocks
        .iter()
        .enumerate()
        .map(|(i, (_, watched))| format!("({}) AS d{i}", differs_sql(source, watched)))
        .collect();
    let all = vec!["true"; blocks.len()].join(", ");
    let select = format!(
        "SELECT ARRAY[{}]::boolean[]\n\
         INTO _cs_changed\n\
         FROM (\n\
         \x20   SELECT {}\n\
         \x20   FROM old_rows o FULL JOIN new_rows n ON n.{key} = o.{key}\n\
         \x20   WHERE {}\n\
         ) s;",
        flags.join(", "),
        differs.join(",\n           "),
        differs_sql(source, &watched(source, checked, None)),
        key = source.key,
    );
    format!(
        "    BEGIN\n\
         {select}\
         \x20       IF NOT (true = ANY (_cs_changed)) THEN\n\
         \x20           {RESTORE_WORK_MEM}\n\
         \x20           RETURN NULL;\n\
         \x20       END IF;\n\
         \x20   EXCEPTION WHEN others THEN\n\
         \x20       IF SQLSTATE NOT LIKE '42%' THEN\n\
         \x20           RAISE;\n\
         \x20       END IF;\n\
         \x20       _cs_changed := ARRAY[{all}];\n\
         \x20   END;\n",
        select = indent(&select, 8),
    )
}

/// `statements` run only when target `i`'s columns changed (an `UPDATE`; every target for the
/// other operations).
fn gated(operation: &str, i: usize, statements: &str) -> String {
    if operation != "update" || statements.is_empty() {
        return statements.to_string();
    }
    format!(
        "    IF _cs_changed[{}] THEN\n{}    END IF;\n",
        i + 1,
        indent(statements, 4)
    )
}

/// The statements of one target inside one operation's function: the set-based insert, and
/// the halving that isolates the rows at fault when it fails.
fn target_block(
    name: &str,
    source: &SourceSettings,
    operation: &str,
    target: &Target,
    watched: &Option<Vec<String>>,
) -> String {
    let Some(changes) = changes_sql(source, operation, target) else {
        return String::new();
    };
    let key = &source.key;
    let Some(all) = all_changes_sql(source, operation, target, watched) else {
        return String::new();
    };
    // a half reads its own keys, through a hash join (a key list tested with `= ANY` would
    // compare every row with every key)
    let some = changes
        .replace(PREFIX, "")
        .replace(
            JOIN,
            &format!(" JOIN unnest(_cs_keys[_cs_lo:_cs_hi]) AS b(k) ON b.k = r.{key}::text"),
        )
        .replace(FILTER, "true");
    let rows = match operation {
        "insert" => "new_rows",
        _ => "old_rows",
    };
    let keys = match operation {
        "update" => changed_sql(source, watched),
        _ => format!("SELECT r.{key} AS k FROM {rows} r"),
    };
    let source_literal = literal(name);
    let account_literal = literal(target.account);
    format!(
        "    -- account {account}\n\
         \x20   BEGIN\n\
         {insert_all}\
         \x20   EXCEPTION WHEN others THEN\n\
         \x20       IF SQLSTATE NOT LIKE '22%' AND SQLSTATE NOT LIKE '23%' AND SQLSTATE NOT LIKE '42%' THEN\n\
         \x20           RAISE;  -- a serialization failure, a deadlock, a cancel: the application's to handle\n\
         \x20       ELSIF SQLSTATE LIKE '42%' THEN\n\
         \x20           -- the mapping no longer fits the table: nothing of this statement is queued\n\
         \x20           INSERT INTO contact_sync.capture_failures (source, operation, sqlstate, error, row_count)\n\
         \x20           VALUES ({source_literal}, {op_literal}, SQLSTATE, SQLERRM, (SELECT count(*) FROM {rows}));\n\
         \x20       ELSE\n\
         \x20           _cs_keys := ARRAY(SELECT s.k::text FROM ({keys}) s ORDER BY s.k);\n\
         \x20           _cs_stack := ARRAY[1, cardinality(_cs_keys)];\n\
         \x20           WHILE cardinality(_cs_stack) > 0 LOOP\n\
         \x20               _cs_lo := _cs_stack[cardinality(_cs_stack) - 1];\n\
         \x20               _cs_hi := _cs_stack[cardinality(_cs_stack)];\n\
         \x20               _cs_stack := _cs_stack[1:cardinality(_cs_stack) - 2];\n\
         \x20               BEGIN\n\
         {insert_some}\
         \x20               EXCEPTION WHEN others THEN\n\
         \x20                   IF SQLSTATE NOT LIKE '22%' AND SQLSTATE NOT LIKE '23%' THEN\n\
         \x20                       RAISE;\n\
         \x20                   ELSIF _cs_lo = _cs_hi THEN\n\
         \x20                       INSERT INTO contact_sync.capture_rejections (source, account, row_key, sqlstate, reason)\n\
         \x20                       VALUES ({source_literal}, {account_literal}, _cs_keys[_cs_lo], SQLSTATE, SQLERRM);\n\
         \x20                   ELSE\n\
         \x20                       _cs_mid := (_cs_lo + _cs_hi) / 2;\n\
         \x20                       _cs_stack := _cs_stack || ARRAY[_cs_mid + 1, _cs_hi, _cs_lo, _cs_mid];\n\
         \x20                   END IF;\n\
         \x20               END;\n\
         \x20           END LOOP;\n\
         \x20       END IF;\n\
         \x20   END;\n",
        account = target.account,
        op_literal = literal(operation),
        insert_all = indent(&insert_sql(&all), 8),
        insert_some = indent(&insert_sql(&some), 20),
    )
}

/// [`changes_sql`] of every row of the statement: the rows whose watched columns changed (an
/// `UPDATE`), or every row.
fn all_changes_sql(
    source: &SourceSettings,
    operation: &str,
    target: &Target,
    watched: &Option<Vec<String>>,
) -> Option<String> {
    let changes = changes_sql(source, operation, target)?;
    let (prefix, restrict) = match operation {
        "update" => (
            format!("changed AS (\n{}\n), ", changed_sql(source, watched)),
            format!("r.{} IN (SELECT k FROM changed)", source.key),
        ),
        _ => (String::new(), "true".to_string()),
    };
    Some(
        changes
            .replace(PREFIX, &prefix)
            .replace(JOIN, "")
            .replace(FILTER, &restrict),
    )
}

/// A statement of at most [`SMALL_STATEMENT_ROWS`] rows: every target's jobs evaluated and
/// checked as the insert checks them (an invalid one raises), in a block that writes nothing
/// (a subtransaction without a transaction id), then inserted in one statement of the
/// application's own transaction (whose insert trigger checks them again, as it checks every
/// insert). A target of an `UPDATE` whose columns did not change is
/// not evaluated. A statement that fails the check, or a larger one, goes through `fallback`
/// (the targets' blocks: each inserts in a subtransaction of its own, and records the rows at
/// fault).
fn small_statement_sql(
    name: &str,
    source: &SourceSettings,
    operation: &str,
    targets: &[(&Target, Option<Vec<String>>)],
    fallback: &str,
) -> String {
    // one statement per target, appending its checked jobs to the statement's (in the order
    // of the targets, each target's in the order of its insert)
    let collects: Vec<String> = targets
        .iter()
        .enumerate()
        .filter_map(|(i, (target, watched))| {
            let changes = all_changes_sql(source, operation, target, watched)?;
            let collect = format!(
                "SELECT array_agg(x.account ORDER BY x.seq, x.k), array_agg(x.email ORDER BY x.seq, x.k),\n\
                 \x20      array_agg(x.payload ORDER BY x.seq, x.k)\n\
                 INTO _cs_a, _cs_e, _cs_p\n\
                 FROM (\n{}\nSELECT * FROM changes\n) x\n\
                 WHERE x.payload - 'modify_ts' <> '{{}}'::jsonb;\n\
                 _cs_accounts := _cs_accounts || _cs_a;\n\
                 _cs_emails := _cs_emails || _cs_e;\n\
                 _cs_payloads := _cs_payloads || _cs_p;\n",
                indent(&changes, 4).trim_end(),
            );
            Some(gated(operation, i, &indent(&collect, 4)))
        })
        .collect();
    if collects.is_empty() {
        return String::new();
    }
    let providers: Vec<String> = targets
        .iter()
        .map(|(t, _)| {
            format!(
                "(a.account = {} AND a.provider <> {})",
                literal(t.account),
                literal(t.provider.as_str())
            )
        })
        .collect();
    // the jobs checked as the insert's trigger checks them, with its search path (the
    // function's own, which finds the application's schema for the mapping's expressions, could
    // find a look-alike of a function the check calls, and pass what the trigger then refuses).
    // One statement per provider, whose rules alone are in its plan.
    let mut checks = String::new();
    for provider in [ProviderKind::Justclick, ProviderKind::Smartlink] {
        let accounts: Vec<String> = targets
            .iter()
            .filter(|(t, _)| t.provider == provider)
            .map(|(t, _)| literal(t.account))
            .collect();
        if accounts.is_empty() {
            continue;
        }
        write!(
            checks,
            "    PERFORM 1 FROM unnest(_cs_accounts, _cs_emails, _cs_payloads) AS u(account, email, payload)\n\
             \x20   WHERE u.account IN ({}) AND NOT contact_sync.validate_job({}, u.email, u.payload);\n",
            accounts.join(", "),
            literal(provider.as_str()),
        )
        .ok();
    }
    let rows = if operation == "delete" {
        "old_rows"
    } else {
        "new_rows"
    };
    // (a larger statement reads no more than this of its rows here)
    let collect = format!(
        "SELECT count(*) INTO _cs_rows FROM (SELECT FROM {rows} LIMIT {}) s;\n\
         _cs_small := _cs_rows <= {SMALL_STATEMENT_ROWS};\n\
         IF _cs_small THEN\n\
         {}\
         \x20   -- (an account of another provider fails the insert: the blocks below record it)\n\
         \x20   PERFORM contact_sync.reject('contact_sync: an account''s provider differs', NULL, to_jsonb(a.account))\n\
         \x20   FROM contact_sync.accounts a WHERE {};\n\
         \x20   IF _cs_accounts IS NOT NULL THEN\n\
         \x20       -- (plans kept for the session from here on: nothing in them depends on the\n\
         \x20       -- arrays' values, and planning the checks takes longer than running them)\n\
         \x20       PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);\n\
         \x20       PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);\n\
         {}\
         \x20   END IF;\n\
         END IF;\n",
        SMALL_STATEMENT_ROWS + 1,
        collects.concat(),
        providers.join(" OR "),
        indent(&checks, 4),
    );
    let provider_of = targets
        .iter()
        .map(|(t, _)| {
            format!(
                "WHEN {} THEN {}",
                literal(t.account),
                literal(t.provider.as_str())
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "    -- a statement of at most {SMALL_STATEMENT_ROWS} rows: its jobs checked, then written in the\n\
         \x20   -- application's own transaction (no subtransaction id: see SMALL_STATEMENT_ROWS)\n\
         \x20   BEGIN\n\
         {collect}\
         \x20   EXCEPTION WHEN others THEN\n\
         \x20       IF SQLSTATE NOT LIKE '22%' AND SQLSTATE NOT LIKE '23%' AND SQLSTATE NOT LIKE '42%' THEN\n\
         \x20           RAISE;\n\
         \x20       END IF;\n\
         \x20       _cs_small := false;  -- the blocks below record what is at fault\n\
         \x20   END;\n\
         \x20   IF _cs_small THEN\n\
         \x20       IF _cs_accounts IS NOT NULL THEN\n\
         \x20           -- (jobs the insert's own check refuses after all, an account given another\n\
         \x20           -- provider since, are taken out again and the statement recorded as not\n\
         \x20           -- captured: the application's statement goes on)\n\
         \x20           PERFORM set_config('contact_sync.capture', {marker} || _cs_rows, true);\n\
         \x20           INSERT INTO contact_sync.jobs (provider, account, email, payload)\n\
         \x20           SELECT CASE u.account {provider_of} END, u.account, u.email, u.payload\n\
         \x20           FROM unnest(_cs_accounts, _cs_emails, _cs_payloads) WITH ORDINALITY AS u(account, email, payload, i)\n\
         \x20           ORDER BY u.i;\n\
         \x20           PERFORM set_config('contact_sync.capture', '', true);\n\
         \x20       END IF;\n\
         \x20   ELSE\n\
         {fallback}\
         \x20   END IF;\n",
        collect = indent(&collect, 8),
        marker = literal(&format!("{name}:{operation}:")),
        fallback = indent(fallback, 4),
    )
}

fn insert_sql(changes: &str) -> String {
    format!(
        "{changes}\n\
         INSERT INTO contact_sync.jobs (provider, account, email, payload)\n\
         SELECT x.provider, x.account, x.email, x.payload FROM changes x\n\
         WHERE x.payload - 'modify_ts' <> '{{}}'::jsonb\n\
         ORDER BY x.seq, x.k;"
    )
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// `WITH … changes AS (…)`: the jobs one statement makes for one target. Placeholders:
/// `{prefix}` (CTEs before the rows are read), `{join}` and `{filter}` (which rows of the
/// transition tables are read).
fn changes_sql(source: &SourceSettings, operation: &str, target: &Target) -> Option<String> {
    let provider = literal(target.provider.as_str());
    let account = literal(target.account);
    let side = |rows: &str| side_sql(source, target, rows);
    let leave = leave_sql(target.on_delete, target.provider);
    let changes = match operation {
        "insert" => format!(
            "WITH \u{1}prefix\u{1}n AS (\n{}\n), changes AS (\n\
             SELECT n.k, 2 AS seq, {provider} AS provider, {account} AS account, n.email, {} AS payload\n\
             FROM n WHERE n.inside\n)",
            side("new_rows"),
            payload_sql(target, "n", None)
        ),
        "delete" => {
            let leave = leave?;
            format!(
                "WITH \u{1}prefix\u{1}o AS (\n{}\n), changes AS (\n\
                 SELECT o.k, 1 AS seq, {provider} AS provider, {account} AS account, o.email, {leave} AS payload\n\
                 FROM o WHERE o.inside AND contact_sync.email_is_valid(o.email)\n)",
                side("old_rows")
            )
        }
        _ => {
            let compared: Vec<usize> = target
                .fields
                .iter()
                .enumerate()
                .filter(|(_, (f, _, _))| *f != "modify_ts")
                .map(|(i, _)| i)
                .collect();
            let distinct = if compared.is_empty() {
                "false".to_string()
            } else {
                let list = |a: &str| {
                    compared
                        .iter()
                        .map(|i| format!("{a}.f{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!("ROW({}) IS DISTINCT FROM ROW({})", list("o"), list("n"))
            };
            // the same contact before and after, or a contact that stops (old address) and
            // one that starts (new address)
            let same = "o.inside AND n.inside AND lower(n.email) = lower(o.email)";
            // (an address no provider ever took was never a contact: nothing to say for it)
            let leaving = "o.inside AND contact_sync.email_is_valid(o.email) \
                           AND NOT coalesce(n.inside AND lower(n.email) = lower(o.email), false)";
            let arriving = "n.inside AND NOT coalesce(o.inside AND lower(n.email) = lower(o.email), false)";
            let leave_value = match &leave {
                Some(leave) => format!("CASE WHEN {leaving} THEN {leave} END"),
                None => "NULL::jsonb".to_string(),
            };
            format!(
                "WITH \u{1}prefix\u{1}o AS (\n{}\n), n AS (\n{}\n), changes AS (\n\
                 SELECT v.k, v.seq, {provider} AS provider, {account} AS account, v.email, v.payload\n\
                 FROM o FULL JOIN n ON n.k = o.k\n\
                 CROSS JOIN LATERAL (VALUES\n\
                 \x20   (o.k, 1, o.email, {leave_value}),\n\
                 \x20   (n.k, 2, n.email, CASE WHEN {arriving} THEN {full}\n\
                 \x20                          WHEN {same} AND {distinct} THEN {changed} END)\n\
                 ) AS v(k, seq, email, payload)\n\
                 WHERE v.payload IS NOT NULL\n)",
                side("old_rows"),
                side("new_rows"),
                full = payload_sql(target, "n", None),
                changed = payload_sql(target, "n", Some("o")),
            )
        }
    };
    Some(changes)
}

/// The mapped values of rows read from `rows` (aliased `r`; placeholders `{join}` and
/// `{filter}` choose which): the key and the address as text, whether the row is a contact
/// (`inside`), each field as `f0…`.
fn side_sql(source: &SourceSettings, target: &Target, rows: &str) -> String {
    let mut columns = format!(
        "r.{key}::text AS k, ({email}\n)::text AS email, {inside} AS inside",
        key = source.key,
        email = source.email,
        inside = inside_sql(source),
    );
    for (i, (field, expression, typed)) in target.fields.iter().enumerate() {
        write!(
            columns,
            ",\n    {} AS f{i}",
            value_sql(target.provider, field, expression, typed)
        )
        .ok();
    }
    format!("SELECT {columns}\nFROM {rows} r\u{1}join\u{1} WHERE \u{1}filter\u{1}")
}

/// Whether a row (aliased `r`, its columns unqualified) is a contact: inside `where`, with an
/// address.
fn inside_sql(source: &SourceSettings) -> String {
    match &source.filter {
        Some(filter) => format!(
            "coalesce(({filter}\n), false) AND ({}\n) IS NOT NULL",
            source.email
        ),
        None => format!("({}\n) IS NOT NULL", source.email),
    }
}

/// The payload a target's `on_delete` sends for an address that stops being a contact, or
/// `None` when it sends nothing.
fn leave_sql(on_delete: OnDelete, provider: ProviderKind) -> Option<String> {
    match (on_delete, provider) {
        (OnDelete::Unsubscribe, ProviderKind::Smartlink) => Some(format!(
            "jsonb_build_object('subscribe', 0, 'modify_ts', {CAPTURE_TIME})"
        )),
        _ => None,
    }
}

/// `backfill --sync-deletes` for one target: `(email, payload)` of every address `account` was
/// sent (its synced state, an unsubscribe not the last thing sent) that no row of the table
/// inside `where` has any more, with what its `on_delete` sends, unless that change is queued
/// already. Addresses are lowered in the database's collation, as `contact_key` is. One pass
/// over each table: run it with `enable_nestloop` off, so the test for a row is a hash
/// anti-join at any size. `None` when the target's `on_delete` sends nothing.
pub fn gone_sql(source: &SourceSettings, account: &str, provider: ProviderKind) -> Option<String> {
    let leave = leave_sql(source.targets.get(account)?.on_delete, provider)?;
    let prefix = format!("{}:{account}:", provider.as_str());
    Some(format!(
        "SELECT g.email, {leave} AS payload\n\
         FROM (SELECT s.email, s.contact_key\n\
         \x20     FROM (SELECT substr(s.contact_key, {from}) AS email, s.contact_key FROM contact_sync.synced s\n\
         \x20           WHERE starts_with(s.contact_key, {prefix_literal})\n\
         \x20             AND (s.fields -> 'subscribe') IS DISTINCT FROM '0'::jsonb) s\n\
         \x20     WHERE NOT EXISTS (SELECT 1 FROM {table} r\n\
         \x20                       WHERE {inside} AND lower((({email}\n)::text) COLLATE \"default\") = s.email)\n\
         \x20     OFFSET 0) g\n\
         -- (for the few that are gone only, after the anti-join: the address test, and a probe\n\
         -- for the same change already queued)\n\
         WHERE contact_sync.email_is_valid(g.email)\n\
         \x20 AND (SELECT true FROM contact_sync.jobs j WHERE j.contact_key = g.contact_key AND j.state = 'pending'\n\
         \x20        AND j.payload -> 'subscribe' = '0'::jsonb LIMIT 1) IS NULL",
        from = prefix.chars().count() + 1,
        prefix_literal = literal(&prefix),
        table = source.table,
        inside = inside_sql(source),
        email = source.email,
    ))
}

/// A backfill's read of the rows `$1` (keys, as an array of the key's type) of the table for
/// one account: `(k, email, inside, payload)`, with every mapped field (a row that is not a
/// contact has no payload). `None` when the source has no target `account`.
pub fn page_sql(
    source: &SourceSettings,
    checked: &CheckedSource,
    providers: &BTreeMap<String, ProviderKind>,
    account: &str,
) -> Option<String> {
    let target = targets(source, checked, providers)
        .into_iter()
        .find(|t| t.account == account)?;
    let side = side_sql(source, &target, &source.table)
        .replace(JOIN, "")
        .replace(
            FILTER,
            &format!("r.{} = ANY($1::{}[])", source.key, checked.key_type),
        );
    Some(format!(
        "WITH n AS (\n{side}\n)\nSELECT n.k, n.email, n.inside, CASE WHEN n.inside THEN {} END AS payload FROM n",
        payload_sql(&target, "n", None)
    ))
}

/// The capture time in milliseconds: Smartlink's `modify_ts` when none is mapped. One per
/// captured statement ([`SET_CAPTURE_TIME`], set when its function starts): a contact's
/// changes of one statement (an address that stops, the same address that starts again in
/// another row) must not carry times in the order their rows happened to be evaluated, which
/// is not the order they are queued in, or Smartlink drops the one queued last as older. A
/// backfill's read has no capture function: the time of the row's evaluation.
const CAPTURE_TIME: &str =
    "coalesce(nullif(current_setting('contact_sync.capture_ts', true), '')::bigint, \
                            floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)";

/// Sets [`CAPTURE_TIME`] for the statement a capture function runs for (after the row locks
/// that order the writers of one row: so a change committed last carries the later time).
const SET_CAPTURE_TIME: &str = "    PERFORM set_config('contact_sync.capture_ts', \
                                floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint::text, true);\n";

/// The payload of one change: every mapped field of `alias` (`compared_with`: only those that
/// differ from it). A field whose value is SQL NULL is left out.
fn payload_sql(target: &Target, alias: &str, compared_with: Option<&str>) -> String {
    let value = |i: usize| match compared_with {
        Some(old) => {
            format!("CASE WHEN {old}.f{i} IS DISTINCT FROM {alias}.f{i} THEN {alias}.f{i} END")
        }
        None => format!("{alias}.f{i}"),
    };
    let mut top = Vec::new();
    let mut attributes = Vec::new();
    let mut modify_ts = None;
    for (i, (field, _, _)) in target.fields.iter().enumerate() {
        if *field == "modify_ts" {
            modify_ts = Some(format!("{alias}.f{i}"));
        } else if let Some(attribute) = field.strip_prefix("attributes.") {
            attributes.push(format!("{}, {}", literal(attribute), value(i)));
        } else {
            top.push(format!("{}, {}", literal(field), value(i)));
        }
    }
    if !attributes.is_empty() {
        top.push(format!(
            "'attributes', nullif(jsonb_strip_nulls(jsonb_build_object({})), '{{}}'::jsonb)",
            attributes.join(", ")
        ));
    }
    let mut payload = format!("jsonb_strip_nulls(jsonb_build_object({}))", top.join(", "));
    if target.provider == ProviderKind::Smartlink {
        let ts = match modify_ts {
            Some(mapped) => format!("coalesce({mapped}, to_jsonb({CAPTURE_TIME}))"),
            None => format!("to_jsonb({CAPTURE_TIME})"),
        };
        payload = format!("({payload} || jsonb_build_object('modify_ts', {ts}))");
    }
    payload
}

/// One field's value as the provider takes it, as jsonb (SQL NULL: left out of the payload).
/// What a cleared (NULL) column sends follows what each provider does with it: JustClick
/// replaces a field with what is sent, so NULL sends `""`; Smartlink replaces `tags` and
/// `preferences` (NULL sends `[]`), cannot clear `location`, `language`, `openid` or the status
/// (NULL sends nothing), and merges attributes key by key (NULL sends `""`).
fn value_sql(provider: ProviderKind, field: &str, expression: &str, typed: &Typed) -> String {
    let e = format!("({expression}\n)");
    match (provider, field, typed.kind) {
        (ProviderKind::Justclick, "lead_tags", Kind::TextArray) => {
            format!("to_jsonb(coalesce({e}::text[], '{{}}'::text[]))")
        }
        (ProviderKind::Justclick, _, _) => format!("to_jsonb(coalesce({e}::text, ''))"),
        (ProviderKind::Smartlink, "tags" | "preferences", _) => {
            format!("to_jsonb(coalesce({e}::text[], '{{}}'::text[]))")
        }
        (ProviderKind::Smartlink, "subscribe" | "update_strategy", _) => {
            format!("to_jsonb({e}::integer)")
        }
        (ProviderKind::Smartlink, "modify_ts", Kind::Time) => {
            format!("to_jsonb(floor(extract(epoch FROM {e}) * 1000)::bigint)")
        }
        (ProviderKind::Smartlink, "modify_ts", _) => format!("to_jsonb({e}::bigint)"),
        (ProviderKind::Smartlink, "openid" | "location" | "language", _) => {
            format!("to_jsonb({e}::text)")
        }
        // attributes.KEY
        (ProviderKind::Smartlink, _, Kind::Integer | Kind::Number | Kind::Boolean) => {
            format!("coalesce(to_jsonb({e}), '\"\"'::jsonb)")
        }
        (ProviderKind::Smartlink, _, _) => format!("to_jsonb(coalesce({e}::text, ''))"),
    }
}

/// `(function, body)` of every function an installation script creates, in name order: the
/// body as Postgres keeps it (`prosrc`: the text between the dollar quotes).
pub fn function_bodies(script: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = script;
    while let Some(at) = rest.find("CREATE OR REPLACE FUNCTION ") {
        rest = &rest[at + "CREATE OR REPLACE FUNCTION ".len()..];
        let name = rest.split('(').next().unwrap_or_default().to_string();
        let Some(open) = rest.find(BODY_QUOTE) else {
            break;
        };
        let body_start = &rest[open + BODY_QUOTE.len()..];
        let Some(close) = body_start.find(BODY_QUOTE) else {
            break;
        };
        out.push((name, body_start[..close].to_string()));
        rest = &body_start[close + BODY_QUOTE.len()..];
    }
    out.sort();
    out
}

pub use crate::text::sql_literal as literal;
