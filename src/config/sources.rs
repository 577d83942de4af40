//! Sources: application tables whose rows are contacts, mapped to provider fields per account
//! (`[sources.NAME]`, `[sources.NAME.targets.ACCOUNT]`). What can be checked without the
//! database is checked here, at start; the check against the live table (columns, types, the
//! expressions themselves) is `capture::catalog`'s.

use super::{invalid, ConfigError, ProviderKind, Settings};
use crate::text::closest;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One application table captured into the queue.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The table, schema-qualified (`public.users`).
    pub table: String,
    /// Its primary key: one column.
    pub key: String,
    /// The address: a column, or an SQL expression over the row.
    pub email: String,
    /// Rows for which this SQL condition over the row is not true are not contacts (or no
    /// longer are: a row leaving it sends its targets' `on_delete`).
    #[serde(rename = "where", default)]
    pub filter: Option<String>,
    /// Per account of the configuration: the provider fields and what a row leaving sends.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetSettings>,
}

/// What one account is sent for each row.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TargetSettings {
    /// What a row that is deleted, leaves `where` or changes its address sends for the address
    /// it had.
    #[serde(default)]
    pub on_delete: OnDelete,
    /// Provider field → SQL expression over the row (a column name, or any expression).
    /// Smartlink attributes are named `attributes.KEY`.
    #[serde(flatten)]
    pub fields: BTreeMap<String, String>,
}

/// What a contact that stops being one sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Nothing: the provider keeps the contact as it was.
    #[default]
    Ignore,
    /// Smartlink only: `subscribe = 0` (unsubscribed).
    Unsubscribe,
}

/// The fields each provider takes, as a mapping names them.
pub fn provider_fields(provider: ProviderKind) -> &'static [&'static str] {
    match provider {
        ProviderKind::Justclick => &["lead_name", "lead_phone", "lead_city", "lead_tags"],
        ProviderKind::Smartlink => &[
            "modify_ts",
            "tags",
            "openid",
            "subscribe",
            "location",
            "language",
            "preferences",
            "update_strategy",
        ],
    }
}

/// The dollar-quote of the generated trigger functions' bodies: an expression must not hold it.
pub const BODY_QUOTE: &str = "$contact_sync_capture$";

/// The longest source name: generated names (`capture_NAME_update`) stay within Postgres's 63.
const MAX_SOURCE_NAME: usize = 40;

/// A plain SQL identifier (lower case, as Postgres folds an unquoted one).
pub fn plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

impl SourceSettings {
    /// `(schema, table)` of `table`.
    pub fn schema_and_table(&self) -> (&str, &str) {
        self.table
            .split_once('.')
            .unwrap_or(("public", &self.table))
    }
}

/// Checks every source against the rest of the configuration (not against the database).
pub(super) fn validate_sources(settings: &Settings) -> Result<(), ConfigError> {
    for (name, source) in &settings.sources {
        let key = |field: &str| format!("sources.{name}.{field}");
        if !plain_identifier(name) || name.len() > MAX_SOURCE_NAME {
            return Err(invalid(
                format!("sources.{name}"),
                format!(
                    "source names use only a-z, 0-9 and _, start with a letter or _ (at most {MAX_SOURCE_NAME} characters)"
                ),
            ));
        }
        let parts: Vec<&str> = source.table.split('.').collect();
        if parts.len() != 2 || !parts.iter().all(|p| plain_identifier(p)) {
            return Err(invalid(
                key("table"),
                format!(
                    "{:?} must be schema-qualified lower-case names, like \"public.users\"",
                    source.table
                ),
            ));
        }
        if !plain_identifier(&source.key) {
            return Err(invalid(
                key("key"),
                format!(
                    "{:?} must be the name of the primary key column",
                    source.key
                ),
            ));
        }
        for (field, expression) in [
            ("email", Some(&source.email)),
            ("where", source.filter.as_ref()),
        ] {
            if let Some(e) = expression {
                check_expression(&key(field), e)?;
            }
        }
        if source.targets.is_empty() {
            return Err(invalid(
                key("targets"),
                "names no account: add a [sources.NAME.targets.ACCOUNT] table",
            ));
        }
        for (account, target) in &source.targets {
            let key = |field: &str| format!("sources.{name}.targets.{account}.{field}");
            let Some(configured) = settings.accounts.get(account) else {
                let known: Vec<&String> = settings.accounts.keys().collect();
                let hint = closest(account, &known)
                    .map(|k| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                return Err(invalid(
                    format!("sources.{name}.targets.{account}"),
                    format!("names no configured account{hint}"),
                ));
            };
            let provider = configured.provider;
            if target.fields.is_empty() {
                return Err(invalid(
                    format!("sources.{name}.targets.{account}"),
                    format!(
                        "maps no field: name at least one of {}",
                        provider_fields(provider).join(", ")
                    ),
                ));
            }
            for (field, expression) in &target.fields {
                let known = provider_fields(provider);
                let attribute = field.strip_prefix("attributes.");
                let ok = match attribute {
                    Some(a) => provider == ProviderKind::Smartlink && !a.is_empty(),
                    None => known.contains(&field.as_str()),
                };
                if !ok {
                    let hint = closest(field, known)
                        .map(|k| format!(" (did you mean {k}?)"))
                        .unwrap_or_default();
                    let extra = if provider == ProviderKind::Smartlink {
                        ", or attributes.NAME"
                    } else {
                        ""
                    };
                    return Err(invalid(
                        key(field),
                        format!(
                            "is not a {provider} field{hint}: use one of {}{extra}",
                            known.join(", ")
                        ),
                    ));
                }
                check_expression(&key(field), expression)?;
            }
            if target.on_delete == OnDelete::Unsubscribe && provider != ProviderKind::Smartlink {
                return Err(invalid(
                    key("on_delete"),
                    "\"unsubscribe\" applies to smartlink accounts only (justclick: \"ignore\")",
                ));
            }
        }
    }
    Ok(())
}

/// An expression is written into generated SQL between parentheses: it must be one expression.
fn check_expression(key: &str, expression: &str) -> Result<(), ConfigError> {
    if expression.trim().is_empty() {
        return Err(invalid(
            key,
            "is empty: name a column or write an expression",
        ));
    }
    if expression.contains(';')
        || expression.contains("--")
        || expression.contains("/*")
        || expression.contains(BODY_QUOTE)
        || expression
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
    {
        return Err(invalid(
            key,
            "must be one SQL expression, without ';', comments, control characters or $contact_sync_capture$",
        ));
    }
    Ok(())
}
