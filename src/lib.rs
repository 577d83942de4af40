//! # contact-sync
//!
//! A durable Postgres outbox and a long-running worker that keeps email-marketing providers
//! (JustClick, Smartlink) in step with an application's contacts. The application records a
//! change inside its own transaction; the worker delivers it with a signed call, in order per
//! contact, and records the outcome. The `contact-sync` binary is the usual way to run the
//! worker; this library is for applications that enqueue from Rust or embed the worker.
//!
//! ```text
//! app transaction ──INSERT via contact_sync.enqueue()──▶ contact_sync.jobs ──NOTIFY──▶ worker(s)
//!                                                          ▲   │ claim: FOR UPDATE SKIP LOCKED, lease
//!                                                          │   ▼
//!                           retry: run_at = now()+backoff ─┤  provider call (signed HTTP) ──▶ JustClick / Smartlink
//!                           done / dead / coalesced  ◀─────┘  classify: success | retryable | permanent
//! ```
//!
//! ## What an embedder uses
//!
//! - [`migrate()`]: creates or upgrades the `contact_sync` schema (safe from several processes).
//! - [`outbox::enqueue`], [`outbox::enqueue_batch`] with [`outbox::NewJob`]: record changes
//!   inside your own transaction; [`outbox::EnqueueError`] says why one was refused.
//! - [`config::Settings`]: the typed configuration (file, environment, `DATABASE_URL`).
//! - [`worker::Worker`] with [`providers::Registry`]: run the worker in your own process until
//!   a [`worker::Shutdown`].
//! - [`sandbox::Sandbox`]: local JustClick and Smartlink simulators for your own tests.
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
//! ## Run the worker in your own process
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use contact_sync::config::Settings;
//! use contact_sync::providers::Registry;
//! use contact_sync::worker::{Shutdown, Worker};
//!
//! let settings = Settings::load(Some(std::path::Path::new("contact-sync.toml")))?;
//! contact_sync::migrate(&pool).await?;
//! let worker = Worker::new(pool, settings.clone(), Registry::from_settings(&settings)?);
//! // until SIGTERM or SIGINT; calls in flight finish within worker.shutdown_timeout
//! let report = worker.run(Shutdown::on_signals()).await;
//! println!("{} delivered", report.succeeded);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! Who owns what, lowest layer first (each module's documentation says more):
//!
//! - `duration`, `secret`, `text`: durations as the configuration writes them, secrets that
//!   never print, text made safe to store and show.
//! - [`config`]: the typed [`config::Settings`], its bounds and validation.
//! - [`mod@migrate`]: embedded migrations, all inside the `contact_sync` schema; the current
//!   schema is `schema/contact_sync.sql`.
//! - [`outbox`]: every SQL statement on contact-sync's tables: enqueue, claim, fenced
//!   completion, rescue, retention, accounts and replicas, the double-opt-in ledger, operator
//!   reads (`inspect`) and writes (`repair`); `hot`: the sessions the claim and the completion
//!   run on, one kept plan per statement.
//! - [`providers`]: the provider seam and account registry, the JustClick and Smartlink clients
//!   and their signatures, outcome classification, payload merging, the providers' reference
//!   model.
//! - [`worker`]: claim loop, executors, batched completer, maintenance, retry policy, fleet-wide
//!   limits, double opt-in, graceful shutdown.
//! - [`sandbox`]: local simulators that verify signatures like the real services and inject
//!   faults.
//! - [`console`]: the operator console in the browser (its SQL is in `outbox::console`).
//! - `admin` (`/metrics`, `/healthz`, `/readyz`), `metrics`, `telemetry`, `pg` (a throwaway
//!   local PostgreSQL): what the binary runs beside the worker.
//!
//! Modules and items marked hidden in this documentation are public only for the binary and
//! the integration tests (separate crates); they are not a stable API.

pub mod capture;
pub mod config;
pub mod console;
pub mod migrate;
pub mod outbox;
pub mod providers;
pub mod sandbox;
pub mod secret;
pub mod worker;

#[doc(hidden)]
pub mod admin;
#[doc(hidden)]
pub mod duration;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod pg;
#[doc(hidden)]
pub mod telemetry;
#[doc(hidden)]
pub mod text;

pub use migrate::{migrate, MigrateError, MIGRATOR};
