//! Configuration errors in an operator's words: the key (or the environment variable) that is
//! wrong, what it holds and what is expected, and the closest known name for a misspelled one.
//! No Rust type names, each error said once.

use super::ConfigError;
use crate::text::closest;

/// The values an enum setting takes, by the Rust type serde names in its error.
const ENUMS: &[(&str, &str, &str)] = &[
    ("ProviderKind", "provider", "justclick or smartlink"),
    ("DoubleOptIn", "double-opt-in policy", "defer or drop"),
    ("MissingContact", "missing-contact policy", "dead or skip"),
];

/// The environment variable that sets `key` (`worker.lease` → `CONTACT_SYNC__WORKER__LEASE`).
pub fn variable(key: &str) -> String {
    format!("CONTACT_SYNC__{}", key.replace('.', "__").to_uppercase())
}

/// Turns the loader's error into one line naming the key (or variable) and the fix.
/// `env_keys` are the keys the environment set (lower-case, dotted).
pub fn explain(err: config::ConfigError, env_keys: &[String], file: Option<&str>) -> ConfigError {
    let (key, origin, inner) = unwrap_at(err);
    let from_env = origin.as_deref().is_some_and(|o| o.contains("environment"));
    let name = |key: &str| {
        if from_env || env_keys.iter().any(|k| k == key) {
            format!("{} (environment)", variable(key))
        } else {
            key.to_string()
        }
    };
    match inner {
        config::ConfigError::Type {
            unexpected,
            expected,
            key: inner_key,
            ..
        } => {
            let key = inner_key.or(key).unwrap_or_default();
            ConfigError::Invalid {
                key: name(&key),
                reason: format!("expected {expected}, got {unexpected}"),
            }
        }
        config::ConfigError::Message(m) => {
            let key = key.unwrap_or_default();
            if let Some((field, expected)) = unknown_field(&m) {
                let full = if key.is_empty() {
                    field.clone()
                } else {
                    format!("{key}.{field}")
                };
                let known = expected;
                let mut reason = "unknown setting".to_string();
                if let Some(best) = closest(&field, &known) {
                    let best_full = if key.is_empty() {
                        best.to_string()
                    } else {
                        format!("{key}.{best}")
                    };
                    if env_keys.iter().any(|k| k == &full) {
                        reason.push_str(&format!(" (did you mean {}?)", variable(&best_full)));
                    } else {
                        reason.push_str(&format!(" (did you mean `{best}`?)"));
                    }
                } else if !known.is_empty() {
                    reason.push_str(&format!("; known: {}", known.join(", ")));
                }
                return ConfigError::Invalid {
                    key: name(&full),
                    reason,
                };
            }
            if let Some((ty, value)) = unknown_variant(&m) {
                let (what, expected) = ENUMS
                    .iter()
                    .find(|(t, _, _)| *t == ty)
                    .map(|(_, w, e)| (*w, *e))
                    .unwrap_or(("value", "one of the documented values"));
                return ConfigError::Invalid {
                    key: name(&key),
                    reason: format!("unknown {what} {value:?} (expected {expected})"),
                };
            }
            if let Some((value, expected)) = serde_unknown_variant(&m) {
                return ConfigError::Invalid {
                    key: name(&key),
                    reason: format!(
                        "unknown value {value:?} (expected {})",
                        expected.join(" or ")
                    ),
                };
            }
            ConfigError::Invalid {
                key: name(&key),
                reason: without_type_names(&m),
            }
        }
        config::ConfigError::FileParse { uri, cause } => ConfigError::Load(format!(
            "{} is not valid TOML: {}",
            uri.or_else(|| file.map(str::to_string))
                .unwrap_or_else(|| "the configuration file".into()),
            without_snippet(&cause.to_string())
        )),
        // (a missing or unreadable file never reaches here: `Settings::load_from` reads it)
        other => {
            let text = without_type_names(&other.to_string());
            match key {
                Some(key) => ConfigError::Invalid {
                    key: name(&key),
                    reason: text,
                },
                None => ConfigError::Load(text),
            }
        }
    }
}

/// A TOML parse error without the quoted source line: that line may hold a secret or a
/// database password. Keeps "at line L, column C" and the reason.
fn without_snippet(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let gutter = l
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            !gutter.starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// serde's "expected struct WorkerSettings" and the like, without the Rust names.
fn without_type_names(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    let mut rest = m;
    while let Some(i) = rest.find("expected struct ") {
        out.push_str(&rest[..i]);
        out.push_str("expected a table");
        rest = &rest[i + "expected struct ".len()..];
        let end = rest
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out.replace("expected a map", "expected a table")
        .replace("expected a sequence", "expected a list")
}

fn unwrap_at(err: config::ConfigError) -> (Option<String>, Option<String>, config::ConfigError) {
    let mut key = None;
    let mut origin = None;
    let mut err = err;
    while let config::ConfigError::At {
        error,
        origin: o,
        key: k,
    } = err
    {
        key = key.or(k);
        origin = origin.or(o);
        err = *error;
    }
    (key, origin, err)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`", "there are no
/// fields").
fn unknown_field(m: &str) -> Option<(String, Vec<String>)> {
    let rest = m.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    Some((field.to_string(), backticked(rest)))
}

/// config's "enum ProviderKind does not have variant constructor smartlnk".
fn unknown_variant(m: &str) -> Option<(&str, &str)> {
    let rest = m.strip_prefix("enum ")?;
    let (ty, value) = rest.split_once(" does not have variant constructor ")?;
    Some((ty, value.trim()))
}

/// serde's "unknown variant `x`, expected one of `a`, `b`".
fn serde_unknown_variant(m: &str) -> Option<(String, Vec<String>)> {
    let rest = m.strip_prefix("unknown variant `")?;
    let (value, rest) = rest.split_once('`')?;
    Some((value.to_string(), backticked(rest)))
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_setting() {
        let known: Vec<String> = ["concurrency", "batch_size", "lease"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(closest("concurency", &known), Some("concurrency"));
        assert_eq!(closest("leese", &known), Some("lease"));
        assert_eq!(closest("colour", &known), None);
    }

    #[test]
    fn messages_are_parsed() {
        assert_eq!(
            unknown_field("unknown field `concurency`, expected one of `concurrency`, `lease`"),
            Some((
                "concurency".into(),
                vec!["concurrency".into(), "lease".into()]
            ))
        );
        assert_eq!(
            unknown_variant("enum ProviderKind does not have variant constructor smartlnk"),
            Some(("ProviderKind", "smartlnk"))
        );
        assert_eq!(variable("worker.lease"), "CONTACT_SYNC__WORKER__LEASE");
        assert_eq!(
            without_snippet("TOML parse error at line 2, column 30\n  |\n2 | url = \"postgres://u:secretpw@h/db\" junk\n  |                              ^\nexpected newline, `#`\n"),
            "TOML parse error at line 2, column 30: expected newline, `#`"
        );
        assert_eq!(
            without_type_names("invalid type: integer `5`, expected struct WorkerSettings"),
            "invalid type: integer `5`, expected a table"
        );
    }
}
