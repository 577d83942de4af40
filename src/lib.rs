//! # contact-sync
//!
//! A durable Postgres outbox and a long-running worker that keeps email-marketing providers
//! (JustClick, Smartlink) in step with an application's contacts.
//!
//! ```text
//! app transaction ──INSERT via contact_sync.enqueue()──▶ contact_sync.jobs ──NOTIFY──▶ worker(s)
//!                                                          ▲   │ claim: FOR UPDATE SKIP LOCKED, lease
//!                                                          │   ▼
//!                           retry: run_at = now()+backoff ─┤  provider call (signed HTTP) ──▶ JustClick / Smartlink
//!                           done / dead / coalesced  ◀─────┘  classify: success | retryable | permanent
//! ```
//!
//! ## Enqueue from Rust, inside your own transaction
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use contact_sync::outbox::{enqueue, NewJob};
//! use serde_json::json;
//!
//! let mut tx = pool.begin().await?;
//! // ... your own writes on `tx` ...
//! let job_id = enqueue(
//!     &mut tx,
//!     &NewJob::new("justclick", "jc_main", "jane@example.com", json!({"lead_name": "Jane"}))
//!         .idempotency_key("signup-42"),
//! )
//! .await?;
//! tx.commit().await?; // the change is queued if and only if your transaction commits
//! # let _ = job_id;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`config`]: the typed [`config::Settings`] (TOML file, `CONTACT_SYNC__…` env, `DATABASE_URL`).
//! - [`mod@migrate`]: embedded migrations, all inside the `contact_sync` schema.
//! - [`outbox`]: the only SQL on `contact_sync.jobs`: enqueue, claim, fenced completion,
//!   rescue, retention, the double-opt-in ledger, operator queries.
//! - [`providers`]: the [`providers::Provider`] trait, the account registry, the JustClick and
//!   Smartlink clients and their signatures; Retryable vs Permanent is decided in
//!   [`providers::outcome`].
//! - [`worker`]: claim loop, executors, batched completer, heartbeat/rescuer, retry policy, rate
//!   limits, double opt-in, graceful shutdown.
//! - [`sandbox`]: local JustClick and Smartlink simulators that verify signatures like the real
//!   services and inject faults.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`; [`metrics`]: what is counted.
//! - [`pg`]: a throwaway local PostgreSQL (the demo's and the tests').
//! - [`telemetry`], [`duration`], [`secret`]: logging, durations, redacted secrets.

pub mod admin;
pub mod config;
pub mod duration;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod pg;
pub mod providers;
pub mod sandbox;
pub mod secret;
pub mod telemetry;
pub mod text;
pub mod worker;

pub use migrate::{migrate, MIGRATOR};
