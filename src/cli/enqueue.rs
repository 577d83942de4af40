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

/// Builds a job from `--provider/--account/--email/--set/--payload/--run-at/--max-attempts`.
pub fn job_from_args(args: &EnqueueArgs) -> anyhow::Result<NewJob> {
    // --payload alone is stored as written (numbers exactly as typed); --set edits a JSON value
    let exact = match (&args.payload, args.set.is_empty()) {
        (Some(text), true) => Some(text.clone()),
        _ => None,
    };
    let mut payload = match &args.payload {
        Some(text) => match serde_json::from_str::<Value>(text).context("--payload is not JSON")? {
            Value::Object(map) => {
                no_duplicate_keys(text).map_err(|e| anyhow::anyhow!("--payload: {e}"))?;
                map
            }
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
    if let Some(key) = &job.idempotency_key {
        check_key(key).map_err(|e| anyhow::anyhow!("--idempotency-key: {e}"))?;
    }
    job.run_at = args.run_at;
    job.max_attempts = args.max_attempts;
    job.payload_json = exact;
    Ok(job)
}

fn set_field(payload: &mut Map<String, Value>, key: &str, value: &str) -> anyhow::Result<()> {
    if let Some(name) = key.strip_prefix("attributes.") {
        if name.trim().is_empty() {
            bail!("--set {key}={value}: the attribute name is empty (attributes.NAME=VALUE)");
        }
        let typed = attribute_value(name, value)?;
        let attrs = payload
            .entry("attributes")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(attrs) = attrs else {
            bail!("attributes is not an object")
        };
        attrs.insert(name.to_string(), typed);
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

/// A Smartlink attribute as the SQL path would store it: a JSON number, `true`/`false` or a
/// JSON string (`"7"`) as written; anything else is text. A number with more significant
/// digits than the command line can carry exactly is refused (use --payload).
fn attribute_value(name: &str, value: &str) -> anyhow::Result<Value> {
    match serde_json::from_str::<Value>(value) {
        Ok(Value::Number(n)) => {
            if n.is_i64() || n.is_u64() {
                return Ok(Value::Number(n));
            }
            let digits = value
                .split(['e', 'E'])
                .next()
                .unwrap_or("")
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>();
            if digits.trim_start_matches('0').trim_end_matches('0').len() > 15 {
                bail!("--set attributes.{name}: {value} has more significant digits than --set carries exactly; pass it in --payload");
            }
            Ok(Value::Number(n))
        }
        Ok(v @ (Value::Bool(_) | Value::String(_))) => Ok(v),
        _ => Ok(Value::String(value.to_string())),
    }
}

/// An idempotency key is 1 to 200 characters (the database's rule, said before the round
/// trip): an empty one, from an unset variable, would make later changes "duplicates".
fn check_key(key: &str) -> Result<(), String> {
    let n = key.chars().count();
    if (1..=200).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to 200 characters, got {n} (omit it for a change without one)"
        ))
    }
}

/// The fields of a bulk line.
const LINE_FIELDS: &str =
    "provider, account, email, payload, idempotency_key, run_at, max_attempts";

/// What a JSON value is, in an error.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a text",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses a JSON text in which an object has a key twice (`{"email":"a@x","email":"b@x"}`):
/// JSON parsers and Postgres's jsonb keep the last one silently, which is rarely what the writer
/// meant. The error names the key and where it sits.
fn no_duplicate_keys(text: &str) -> Result<(), String> {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// Where a value sits, as a chain to its parent: written out only for the error, so the
    /// check stays linear in the text however deep or wide it is.
    enum Step<'a> {
        Root,
        Key(&'a Step<'a>, &'a str),
        Index(&'a Step<'a>, usize),
    }
    impl fmt::Display for Step<'_> {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            match self {
                Step::Root => Ok(()),
                Step::Key(Step::Root, key) => f.write_str(key),
                Step::Key(parent, key) => write!(f, "{parent}.{key}"),
                Step::Index(parent, i) => write!(f, "{parent}[{i}]"),
            }
        }
    }
    struct Unique<'a>(&'a Step<'a>);
    impl<'de> serde::de::DeserializeSeed<'de> for Unique<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Unique<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if seen.contains(&key) {
                    return Err(serde::de::Error::custom(format!(
                        "{}: given twice (a key may appear once per object)",
                        Step::Key(self.0, &key)
                    )));
                }
                map.next_value_seed(Unique(&Step::Key(self.0, &key)))?;
                seen.insert(key);
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while seq
                .next_element_seed(Unique(&Step::Index(self.0, i)))?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut d = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(Unique(&Step::Root), &mut d).map_err(|e| {
        // serde_json appends " at line L column C"; one line needs no position
        let text = e.to_string();
        match text.rfind(" at line ") {
            Some(at) => text[..at].to_string(),
            None => text,
        }
    })
}

/// One bulk line: every field checked, the error naming the field and the expected form.
fn parse_line(text: &str) -> Result<NewJob, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(map) = &value else {
        return Err(format!(
            "expected a JSON object (one change per line, fields {LINE_FIELDS}), got {}",
            kind(&value)
        ));
    };
    no_duplicate_keys(text)?;
    if let Some(unknown) = map
        .keys()
        .find(|k| !LINE_FIELDS.split(", ").any(|f| f == k.as_str()))
    {
        return Err(format!(
            "unknown field {unknown:?} (the fields are {LINE_FIELDS})"
        ));
    }
    let text_field = |name: &str, required: bool| -> Result<Option<String>, String> {
        match map.get(name) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            None | Some(Value::Null) if required => Err(format!("{name}: missing (a text)")),
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(format!("{name}: expected a text, got {}", kind(other))),
        }
    };
    let provider = text_field("provider", true)?.unwrap_or_default();
    if !matches!(provider.as_str(), "justclick" | "smartlink") {
        return Err(format!(
            "provider: unknown provider {provider:?} (expected justclick or smartlink)"
        ));
    }
    let account = text_field("account", true)?.unwrap_or_default();
    let email = text_field("email", true)?.unwrap_or_default();
    let payload = match map.get("payload") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            return Err(format!(
                "payload: expected a JSON object, got {}",
                kind(other)
            ))
        }
    };
    let mut job = NewJob::new(provider, account, email, payload);
    job.idempotency_key = text_field("idempotency_key", false)?;
    if let Some(key) = &job.idempotency_key {
        check_key(key).map_err(|e| format!("idempotency_key: {e}"))?;
    }
    job.run_at = match map.get("run_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => {
            Some(super::args::parse_time(t).map_err(|e| format!("run_at: {e}"))?)
        }
        Some(other) => {
            return Err(format!(
                "run_at: expected an RFC 3339 time such as 2026-11-23T18:00:00Z, got {}",
                kind(other)
            ))
        }
    };
    job.max_attempts = match map.get("max_attempts") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|n| *n >= 1)
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| {
                    format!("max_attempts: expected a whole number of at least 1, got {v}")
                })?,
        ),
    };
    // keep the payload's text: the database stores and checks numbers as written
    job.payload_json = serde_json::from_str::<RawPayload>(text)
        .ok()
        .and_then(|raw| raw.payload)
        .filter(|p| p.get() != "null")
        .map(|p| p.get().to_string());
    Ok(job)
}

/// The payload of a bulk line as written.
#[derive(serde::Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow, default)]
    payload: Option<&'a serde_json::value::RawValue>,
}

/// Lines per batch statement in bulk loads.
const FILE_BATCH: usize = 1000;

/// What a bulk load did.
#[derive(Debug, Default)]
struct Loaded {
    queued: usize,
    duplicates: usize,
    rejected: usize,
}

/// Bulk load from JSON Lines (`-`: standard input): bad lines are reported on stderr and
/// skipped, good ones queued. Exit code 0 when no line was rejected, 1 otherwise.
async fn enqueue_file(
    pool: &PgPool,
    known: &KnownAccounts,
    path: &Path,
) -> anyhow::Result<ExitCode> {
    let (bytes, name) = if path == Path::new("-") {
        let bytes = tokio::task::spawn_blocking(|| {
            use std::io::Read;
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes).map(|_| bytes)
        })
        .await?
        .context("reading standard input")?;
        (bytes, "standard input".to_string())
    } else {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        (bytes, path.display().to_string())
    };
    // a byte-order mark (some editors write one) is not part of the first line
    let bytes = match bytes.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => rest.to_vec(),
        None => bytes,
    };
    // a JSON array of changes is a common slip: say so once, not once per line
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    if start.is_some_and(|i| bytes[i] == b'[')
        && serde_json::from_slice::<Vec<Value>>(&bytes).is_ok()
    {
        bail!(
            "{name} holds a JSON array; expected JSON Lines, one change object per line (convert it with: jq -c '.[]')"
        );
    }
    let mut total = Loaded::default();
    let mut batch: Vec<(usize, NewJob)> = Vec::with_capacity(FILE_BATCH);
    for (index, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line_no = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let job = std::str::from_utf8(raw)
            .map_err(|_| "not valid UTF-8".to_string())
            .and_then(parse_line)
            .and_then(|job| known.check(&job.provider, &job.account).map(|()| job));
        match job {
            Ok(job) => batch.push((line_no, job)),
            Err(e) => {
                total.rejected += 1;
                eprintln!("line {line_no}: {e}");
            }
        }
        if batch.len() >= FILE_BATCH {
            load_batch(pool, std::mem::take(&mut batch), &mut total).await?;
        }
    }
    load_batch(pool, batch, &mut total).await?;
    println!(
        "queued {}, duplicates {}, rejected {}",
        total.queued, total.duplicates, total.rejected
    );
    Ok(if total.rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One statement for the whole batch; if the database rejects one line, each line goes on its
/// own so the good ones still land.
async fn load_batch(
    pool: &PgPool,
    batch: Vec<(usize, NewJob)>,
    total: &mut Loaded,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let jobs: Vec<NewJob> = batch.iter().map(|(_, j)| j.clone()).collect();
    let mut conn = pool.acquire().await?;
    match outbox::enqueue_batch_counted(&mut conn, &jobs).await {
        Ok(done) => {
            total.queued += done.ids.len() - done.duplicates;
            total.duplicates += done.duplicates;
            return Ok(());
        }
        Err(e) if e.is_invalid() => {}
        Err(e) => return Err(e.into()),
    }
    for (line_no, job) in batch {
        match outbox::enqueue_batch_counted(&mut conn, std::slice::from_ref(&job)).await {
            Ok(done) => {
                total.queued += done.ids.len() - done.duplicates;
                total.duplicates += done.duplicates;
            }
            Err(e) if e.is_invalid() => {
                total.rejected += 1;
                eprintln!("line {line_no}: {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_keep_numbers_and_flags() {
        assert_eq!(attribute_value("a", "7").unwrap(), serde_json::json!(7));
        assert_eq!(attribute_value("a", "7.5").unwrap(), serde_json::json!(7.5));
        assert_eq!(
            attribute_value("a", "true").unwrap(),
            serde_json::json!(true)
        );
        assert_eq!(
            attribute_value("a", "\"7\"").unwrap(),
            serde_json::json!("7")
        );
        assert_eq!(
            attribute_value("a", "007").unwrap(),
            serde_json::json!("007")
        );
        assert_eq!(
            attribute_value("a", "gold").unwrap(),
            serde_json::json!("gold")
        );
        assert!(attribute_value("a", "0.1000000000000000055").is_err());
    }

    #[test]
    fn a_key_given_twice_is_refused_with_its_place() {
        assert_eq!(
            parse_line(
                r#"{"provider":"smartlink","account":"sl","email":"a@x.io","email":"b@x.io"}"#
            )
            .unwrap_err(),
            "email: given twice (a key may appear once per object)"
        );
        assert_eq!(
            parse_line(r#"{"provider":"smartlink","account":"sl","email":"a@x.io","payload":{"attributes":{"level":1,"level":2}}}"#)
                .unwrap_err(),
            "payload.attributes.level: given twice (a key may appear once per object)"
        );
        assert!(no_duplicate_keys(r#"{"a":[{"b":1},{"b":2}],"c":{"b":3}}"#).is_ok());
        assert_eq!(
            no_duplicate_keys(r#"{"a":[{"b":1,"b":2}]}"#).unwrap_err(),
            "a[0].b: given twice (a key may appear once per object)"
        );
        assert_eq!(
            no_duplicate_keys(r#"{"a":{"c":[0,[{"e\u0078":1,"ex":2}]]}}"#).unwrap_err(),
            "a.c[1][0].ex: given twice (a key may appear once per object)"
        );
        // a line that is not an object says so first
        assert!(parse_line(r#"[{"a":1,"a":2}]"#)
            .unwrap_err()
            .starts_with("expected a JSON object"));
        // linear in the text: a long key above a wide array (it took 35 s at 3 MB when every
        // element wrote out its whole path)
        let wide = format!(
            r#"{{"{}":[{}]}}"#,
            "k".repeat(1_000_000),
            vec!["0"; 1_000_000].join(",")
        );
        let started = std::time::Instant::now();
        assert!(no_duplicate_keys(&wide).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn bulk_lines_name_the_field_and_the_form() {
        let err = |line: &str| parse_line(line).unwrap_err();
        assert!(err(
            r#"{"provider":"justclick","account":"jc","email":"a@example.com","run_at":"tomorrow"}"#
        )
        .starts_with("run_at: expected an RFC 3339 time"));
        assert!(err(r#"{"provider":"justclick","account":"jc"}"#).starts_with("email: missing"));
        assert!(err(
            r#"{"provider":"justclick","account":"jc","email":"a@example.com","colour":1}"#
        )
        .starts_with("unknown field \"colour\""));
        assert!(err(
            r#"{"provider":"justclick","account":"jc","email":"a@example.com","payload":[1]}"#
        )
        .starts_with("payload: expected a JSON object, got an array"));
        assert!(err(
            r#"{"provider":"justclick","account":"jc","email":"a@example.com","max_attempts":0}"#
        )
        .starts_with("max_attempts: expected a whole number"));
        assert!(err("[1, 2]").starts_with("expected a JSON object"));
        assert!(err(r#"{"provider":"justclick","account":"jc","email":"a@example.com","idempotency_key":""}"#)
            .starts_with("idempotency_key: must be 1 to 200 characters, got 0"));
        let job = parse_line(r#"{"provider":"smartlink","account":"sl","email":"a@example.com","payload":{"x":1.50},"run_at":"2030-01-01T00:00:00+01:00","max_attempts":3}"#).unwrap();
        assert_eq!(job.payload_json.as_deref(), Some(r#"{"x":1.50}"#));
        assert_eq!(job.max_attempts, Some(3));
        assert_eq!(
            job.run_at.unwrap().to_rfc3339(),
            "2029-12-31T23:00:00+00:00"
        );
    }
}
