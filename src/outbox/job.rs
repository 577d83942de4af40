//! The job as the worker and the operator see it: states, the claimed row, new rows.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

pub type JobId = i64;

/// A job's place in its life (docs/design.md, "Job states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Dead,
    Cancelled,
    Coalesced,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Dead,
        JobState::Cancelled,
        JobState::Coalesced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
            JobState::Coalesced => "coalesced",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// The `state` column is text with a CHECK of these six names: read and written as the enum.
impl sqlx::Type<sqlx::Postgres> for JobState {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl sqlx::postgres::PgHasArrayType for JobState {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for JobState {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        JobState::parse(text).ok_or_else(|| format!("unknown job state {text:?}").into())
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for JobState {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
    }
}

/// A change to record: what `contact_sync.enqueue()` takes.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub provider: String,
    pub account: String,
    pub email: String,
    #[serde(default = "empty_object")]
    pub payload: Value,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts before the job goes `dead` (`None`: the worker's `worker.max_attempts`).
    #[serde(default)]
    pub max_attempts: Option<i32>,
    /// The payload as exact JSON text, when the caller has it (a file, a command line): stored
    /// as written instead of `payload`, so the database validates and keeps every number as
    /// written (a JSON value holds numbers as 64-bit floats).
    #[serde(skip)]
    pub payload_json: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl NewJob {
    pub fn new(
        provider: impl Into<String>,
        account: impl Into<String>,
        email: impl Into<String>,
        payload: Value,
    ) -> Self {
        Self {
            provider: provider.into(),
            account: account.into(),
            email: email.into(),
            payload,
            idempotency_key: None,
            run_at: None,
            max_attempts: None,
            payload_json: None,
        }
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The JSON text the database stores and validates (see [`NewJob::payload_json`]).
    pub fn payload_text(&self) -> String {
        self.payload_json
            .clone()
            .unwrap_or_else(|| self.payload.to_string())
    }

    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Attempts before the job goes `dead`, instead of the worker's `worker.max_attempts`.
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }
}

/// A later pending job of the same contact, merged into its head's call.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Follower {
    pub id: JobId,
    pub payload: Value,
    pub created_at_ms: i64,
    /// md5 of the stored payload's text as claimed (`md5(payload::text)`): the completion
    /// marks the follower delivered only if it is still the change that was sent.
    #[serde(default)]
    pub md5: String,
}

/// A job this worker holds the lease of. `(id, attempts)` is the fencing token: every write
/// after the claim matches both, so a worker whose lease was lost writes nothing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: JobId,
    pub provider: String,
    pub account: String,
    pub email: String,
    /// The stored payload as JSON text, decoded by [`ClaimedJob::decode`].
    pub payload: String,
    /// `md5(payload::text)` as the database computes it (see `complete::Success::sent_md5`).
    pub payload_md5: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub created_at_ms: i64,
    /// Smartlink: the newest `modify_ts` already delivered for this contact, if known.
    pub known_modify_ts: Option<i64>,
    /// Smartlink: the newest `modify_ts` a call of this contact whose answer was lost may have
    /// carried (see `providers::payload::HeldModifyTs`).
    pub uncertain_modify_ts: Option<i64>,
    /// Accounts a source captures into: the fields the provider was last sent for this
    /// contact (`contact_sync.synced`), as JSON text, if any.
    pub synced_fields: Option<String>,
    /// Consecutive due pending jobs of the same contact, as JSON text
    /// (`[{"id", "payload", "md5", "created_at_ms"}]`).
    pub followers: String,
}

/// A job's fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub id: JobId,
    pub attempt: i32,
}

impl ClaimedJob {
    /// The job's payload object. An error names why it cannot be read (the job is parked alone).
    pub fn decode(&self) -> Result<serde_json::Map<String, Value>, String> {
        match serde_json::from_str::<Value>(&self.payload) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(format!(
                "payload is not a JSON object but {}",
                json_kind(&other)
            )),
            Err(e) => Err(format!("stored payload cannot be decoded exactly: {e}")),
        }
    }

    /// The followers that can be decoded, in order, up to the first that cannot (which will be
    /// claimed as a head later and parked alone).
    pub fn decode_followers(&self) -> Vec<Follower> {
        match serde_json::from_str::<Vec<Follower>>(&self.followers) {
            Ok(list) => list
                .into_iter()
                .take_while(|f| f.payload.is_object())
                .collect(),
            Err(_) => {
                // One follower the decoder refuses spoils the list: keep the readable prefix.
                let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&self.followers) else {
                    return Vec::new();
                };
                items
                    .into_iter()
                    .map_while(|v| serde_json::from_value::<Follower>(v).ok())
                    .take_while(|f| f.payload.is_object())
                    .collect()
            }
        }
    }

    /// md5 of the payload text as claimed, as the database computes it.
    pub fn payload_md5(&self) -> String {
        self.payload_md5.clone()
    }

    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            attempt: self.attempts,
        }
    }
}

/// One failed attempt, as kept in `errors` and `last_error`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptError {
    /// `timeout`, `server_error`, `permanent`, …
    pub kind: String,
    /// The provider's code or HTTP status, when there is one.
    pub code: Option<String>,
    pub message: String,
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
