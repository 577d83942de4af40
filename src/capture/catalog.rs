//! The live table as Postgres describes it: its columns, its primary key, and the type of each
//! mapped expression, found by letting Postgres analyse it (a temporary view in a transaction
//! that is rolled back). A mapping that does not fit the table is an error naming the setting,
//! with the nearest column name.

use crate::config::{ProviderKind, SourceSettings};
use crate::text::closest;
use sqlx::PgConnection;
use std::collections::BTreeMap;

/// What an expression's type can be sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text, or a type whose text form is sent (enums, uuid, …).
    Text,
    /// An array whose elements are text.
    TextArray,
    /// `smallint`, `integer`, `bigint`.
    Integer,
    /// `numeric`, `real`, `double precision`.
    Number,
    Boolean,
    /// `timestamp`, `timestamptz`, `date`.
    Time,
    Json,
    /// Any other array, composite or pseudo type.
    Other,
}

/// One expression as Postgres typed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typed {
    pub kind: Kind,
    /// `format_type` of the expression, for messages.
    pub type_name: String,
    /// The table's columns the expression reads (`None`: the whole row, e.g. `r` or `r.*`).
    pub reads: Option<Vec<String>>,
}

/// A source checked against its table: every expression typed, the key verified.
#[derive(Debug, Clone)]
pub struct CheckedSource {
    /// The table's columns and their types, in column order.
    pub columns: Vec<(String, String)>,
    /// The key column's type.
    pub key_type: String,
    pub email: Typed,
    pub filter: Option<Typed>,
    /// Account → provider field → type.
    pub fields: BTreeMap<String, BTreeMap<String, Typed>>,
}

/// A mapping that does not fit the table.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{key}: {reason}")]
    Mapping { key: String, reason: String },
    #[error("reading the table's definition: {0}")]
    Database(#[from] sqlx::Error),
}

fn mapping(key: impl Into<String>, reason: impl Into<String>) -> CatalogError {
    CatalogError::Mapping {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Checks `source` (named `name`) against the live table, on `conn` (inside a transaction that
/// is rolled back: nothing is left behind). `providers`: the provider of each target account.
pub async fn check(
    conn: &mut PgConnection,
    name: &str,
    source: &SourceSettings,
    providers: &BTreeMap<String, ProviderKind>,
) -> Result<CheckedSource, CatalogError> {
    let (schema, table) = source.schema_and_table();
    let columns = columns_of(&mut *conn, &source.table).await?;
    if columns.is_empty() {
        return Err(mapping(
            format!("sources.{name}.table"),
            format!("there is no table {schema}.{table} in this database"),
        ));
    }
    let column_names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
    let primary: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = format('%I.%I', $1::text, $2::text)::regclass AND i.indisprimary",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    if primary != [source.key.clone()] {
        let reason = match primary.as_slice() {
            [] if column_names.contains(&source.key.as_str()) => format!(
                "{schema}.{table} has no primary key: a captured table needs one (on {:?})",
                source.key
            ),
            [] => format!("{schema}.{table} has no primary key and no column {:?}", source.key),
            [one] => format!("the primary key of {schema}.{table} is {one:?}, not {:?}", source.key),
            many => format!(
                "the primary key of {schema}.{table} has several columns ({}): a captured table needs a one-column key",
                many.join(", ")
            ),
        };
        return Err(mapping(format!("sources.{name}.key"), reason));
    }
    let key_type = columns
        .iter()
        .find(|(c, _)| *c == source.key)
        .map(|(_, t)| t.clone())
        .unwrap_or_default();

    // names resolve as in the generated triggers: pg_catalog, then the table's schema
    sqlx::query(&format!("SET LOCAL search_path = pg_catalog, {schema}"))
        .execute(&mut *conn)
        .await?;
    let mut typer = Typer {
        conn,
        schema,
        table,
        columns: &column_names,
    };
    let email_key = format!("sources.{name}.email");
    let email = typer.type_of(&email_key, &source.email).await?;
    if email.kind != Kind::Text {
        return Err(mapping(
            email_key,
            format!("is {}: the address must be text", email.type_name),
        ));
    }
    let filter = match &source.filter {
        Some(filter) => {
            let key = format!("sources.{name}.where");
            let typed = typer.type_of(&key, filter).await?;
            if typed.kind != Kind::Boolean {
                return Err(mapping(
                    key,
                    format!("is {}: a condition must be boolean", typed.type_name),
                ));
            }
            Some(typed)
        }
        None => None,
    };
    let mut fields = BTreeMap::new();
    for (account, target) in &source.targets {
        let Some(provider) = providers.get(account).copied() else {
            continue;
        };
        let mut typed_fields = BTreeMap::new();
        for (field, expression) in &target.fields {
            let key = format!("sources.{name}.targets.{account}.{field}");
            let typed = typer.type_of(&key, expression).await?;
            if let Some(wanted) = refused(provider, field, typed.kind) {
                return Err(mapping(
                    key,
                    format!("is {}: {field} takes {wanted}", typed.type_name),
                ));
            }
            typed_fields.insert(field.clone(), typed);
        }
        fields.insert(account.clone(), typed_fields);
    }
    Ok(CheckedSource {
        columns,
        key_type,
        email,
        filter,
        fields,
    })
}

/// The columns of `table` (`schema.table`) and their types, in column order; none when there is
/// no such table. (Also what `capture verify` compares with the columns at installation.)
pub async fn columns_of(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(conn)
    .await
}

/// `Some(what the field takes)` when a value of `kind` cannot be sent as `field`.
fn refused(provider: ProviderKind, field: &str, kind: Kind) -> Option<&'static str> {
    use Kind::*;
    let scalar = matches!(kind, Text | Integer | Number | Boolean | Time);
    let ok = match (provider, field) {
        (ProviderKind::Justclick, "lead_tags") => matches!(kind, Text | TextArray),
        (ProviderKind::Justclick, _) => scalar,
        (ProviderKind::Smartlink, "tags" | "preferences") => kind == TextArray,
        (ProviderKind::Smartlink, "subscribe" | "update_strategy") => kind == Integer,
        (ProviderKind::Smartlink, "openid") => matches!(kind, Text | Integer),
        (ProviderKind::Smartlink, "location" | "language") => kind == Text,
        (ProviderKind::Smartlink, "modify_ts") => matches!(kind, Time | Integer),
        (ProviderKind::Smartlink, _) => scalar, // attributes.KEY
    };
    if ok {
        return None;
    }
    Some(match (provider, field) {
        (ProviderKind::Justclick, "lead_tags") => "text or an array of text",
        (ProviderKind::Justclick, _) => "a text, number, boolean or time value",
        (ProviderKind::Smartlink, "tags" | "preferences") => "an array of text",
        (ProviderKind::Smartlink, "subscribe" | "update_strategy") => "an integer",
        (ProviderKind::Smartlink, "openid") => "text or an integer",
        (ProviderKind::Smartlink, "location" | "language") => "text",
        (ProviderKind::Smartlink, "modify_ts") => "a timestamp or an integer of milliseconds",
        (ProviderKind::Smartlink, _) => "a text, number, boolean or time value",
    })
}

/// Types expressions over one table by letting Postgres analyse them.
struct Typer<'a> {
    conn: &'a mut PgConnection,
    schema: &'a str,
    table: &'a str,
    columns: &'a [&'a str],
}

impl Typer<'_> {
    async fn type_of(&mut self, key: &str, expression: &str) -> Result<Typed, CatalogError> {
        sqlx::query("SAVEPOINT capture_check")
            .execute(&mut *self.conn)
            .await?;
        let view = format!(
            "CREATE TEMPORARY VIEW contact_sync_capture_check AS SELECT ({expression}\n) AS value FROM {}.{} AS r",
            self.schema, self.table
        );
        let created = sqlx::raw_sql(&view).execute(&mut *self.conn).await;
        let typed = match created {
            Ok(_) => {
                let columns: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pg_temp.contact_sync_capture_check'::regclass AND attnum > 0",
                )
                .fetch_one(&mut *self.conn)
                .await?;
                if columns != 1 {
                    sqlx::query("ROLLBACK TO SAVEPOINT capture_check")
                        .execute(&mut *self.conn)
                        .await?;
                    return Err(mapping(
                        key,
                        "must be one SQL expression (its parentheses do not balance)",
                    ));
                }
                let (category, element, type_name, base): (String, Option<String>, String, String) =
                    sqlx::query_as(
                        "SELECT t.typcategory::text, e.typcategory::text, format_type(a.atttypid, a.atttypmod), t.typname::text \
                         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' \
                         WHERE a.attrelid = 'pg_temp.contact_sync_capture_check'::regclass AND a.attname = 'value'",
                    )
                    .fetch_one(&mut *self.conn)
                    .await?;
                // what the view depends on is what the expression reads
                let reads: Vec<(i32, Option<String>)> = sqlx::query_as(
                    "SELECT DISTINCT d.refobjsubid, a.attname::text FROM pg_depend d \
                     JOIN pg_rewrite w ON w.oid = d.objid AND d.classid = 'pg_rewrite'::regclass \
                     LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                     WHERE w.ev_class = 'pg_temp.contact_sync_capture_check'::regclass \
                       AND d.refobjid = format('%I.%I', $1::text, $2::text)::regclass",
                )
                .bind(self.schema)
                .bind(self.table)
                .fetch_all(&mut *self.conn)
                .await?;
                let whole_row = reads.iter().any(|(n, _)| *n <= 0);
                Ok(Typed {
                    kind: kind_of(&category, element.as_deref(), &base),
                    type_name,
                    reads: (!whole_row).then(|| reads.into_iter().filter_map(|(_, c)| c).collect()),
                })
            }
            Err(sqlx::Error::Database(e)) => {
                let mut reason = e.message().to_string();
                if let Some(missing) = reason
                    .strip_prefix("column \"")
                    .and_then(|r| r.split_once('"'))
                    .map(|(c, _)| c.trim_start_matches("r.").to_string())
                {
                    match closest(&missing, self.columns) {
                        Some(near) => reason.push_str(&format!(" (did you mean {near}?)")),
                        None => reason.push_str(&format!(
                            " (the columns of {}.{}: {})",
                            self.schema,
                            self.table,
                            self.columns.join(", ")
                        )),
                    }
                }
                Err(mapping(key, reason))
            }
            Err(e) => Err(e.into()),
        };
        sqlx::query("ROLLBACK TO SAVEPOINT capture_check")
            .execute(&mut *self.conn)
            .await?;
        typed
    }
}

fn kind_of(category: &str, element: Option<&str>, base: &str) -> Kind {
    match (category, element) {
        ("A", Some("S")) => Kind::TextArray,
        ("A", _) => Kind::Other,
        ("N", _) if matches!(base, "int2" | "int4" | "int8") => Kind::Integer,
        ("N", _) if matches!(base, "numeric" | "float4" | "float8") => Kind::Number,
        ("N", _) => Kind::Other, // oid, money, …
        ("B", _) => Kind::Boolean,
        ("D", _) => Kind::Time,
        ("U", _) if matches!(base, "json" | "jsonb") => Kind::Json,
        ("S", _) | ("E", _) => Kind::Text,
        ("U", _) if base == "uuid" => Kind::Text,
        _ => Kind::Other,
    }
}
