//! The outbox: the only module with SQL on `contact_sync.jobs`, the synced state, the capture
//! tables and the double-opt-in tables.
//!
//! Who moves each state, and when:
//! ```text
//!             enqueue (app tx)             claim (one statement, SKIP LOCKED)
//!   (none) ──────────────────▶ pending ─────────────────────────────────────▶ running
//!                                ▲  ▲                                         │ │ │ │
//!        retry (fenced), rescue  │  └── release (shutdown, fenced) ◀──────────┘ │ │ │
//!        (lease expired) ────────┘                                              │ │ │
//!   succeeded ◀── succeed_many (fenced, batched) ◀──────────────────────────────┘ │ │
//!   dead      ◀── kill: permanent error / attempts used (fenced) ◀────────────────┘ │
//!   coalesced ◀── carried by the call of an earlier job of the same contact ◀───────┘
//!   cancelled ◀── operator (`cancel`); dead/cancelled ──retry──▶ pending
//! ```
//! Time is always the database's `now()`.
//!
//! The claim and the completion run prepared, on the hot path's own sessions ([`hot`]), whose
//! settings make one plan per session right at every size of the queue. Every other statement
//! a worker repeats (the sweeps, the account checks, the `/metrics` gauges) and the producers'
//! look-up of idempotency keys already used are sent unprepared (`.persistent(false)`), so
//! Postgres plans each for the tables as they are at that moment. (`enqueue_batch`'s insert
//! stays prepared: it reads no table but through its unique index.) A prepared statement on an
//! ordinary session may switch to a generic plan after five runs and keep it: one made while
//! the queue was empty reads the table with a sequential scan, and kept doing so once a backlog
//! of a million arrived. The capture functions get the same from
//! `plan_cache_mode = force_custom_plan`, and `contact_sync.enqueue()` plans its look-up of a
//! repeated key at each call (`EXECUTE`); the insert trigger keeps its plans, which read no table
//! but the transition table and, once per statement, the accounts (their definitions in
//! `schema/contact_sync.sql`). `plans::plans_made_on_an_empty_queue_hold_for_a_full_one`,
//! `plans::a_repeated_idempotency_key_is_looked_up_through_its_index` and
//! `plans::the_insert_trigger_plans_made_for_one_row_hold_for_many` pin them.

#[doc(hidden)]
pub mod accounts;
#[doc(hidden)]
pub mod backfills;
#[doc(hidden)]
pub mod capture;
#[doc(hidden)]
pub mod claim;
#[doc(hidden)]
pub mod complete;
#[doc(hidden)]
pub mod console;
#[doc(hidden)]
pub mod doi;
#[doc(hidden)]
pub mod enqueue;
#[doc(hidden)]
pub mod hot;
#[doc(hidden)]
pub mod inspect;
#[doc(hidden)]
pub mod job;
#[doc(hidden)]
pub mod probes;
#[doc(hidden)]
pub mod prune;
#[doc(hidden)]
pub mod repair;
#[doc(hidden)]
pub mod replicas;
#[doc(hidden)]
pub mod rescue;
#[doc(hidden)]
pub mod synced;

pub use enqueue::{enqueue, enqueue_batch, enqueue_batch_counted, EnqueueError, Enqueued};
#[doc(hidden)]
pub use job::{ClaimedJob, Lease};
pub use job::{JobId, JobState, NewJob};

/// Whether a statement gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03): the row or
/// table is held by another transaction, and the work is left for later.
#[doc(hidden)]
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Whether the queue's checks refused what a statement wrote (SQLSTATE classes 22 and 23: the
/// validation, a constraint): the rows are at fault, not the moment, and trying them again as
/// they are cannot succeed.
pub fn is_refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")))
}

/// Whether the database could not take a statement now, whatever the statement: it cannot be
/// reached (a connection or pool error), or answered that it is shutting down or was cut by an
/// administrator (SQLSTATE class 57), out of resources (53, as too many connections), in a
/// connection or system failure (08, 58), read-only (25006), or that the transaction lost a
/// serialization or deadlock race (40) or a lock (55P03, 55006). Any other answer is about the
/// statement or its rows (a constraint, a trigger's exception, bad data), and a statement
/// over fewer rows may go through.
#[doc(hidden)]
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| c.starts_with(class))
                || matches!(c.as_ref(), "25006" | "55P03" | "55006")
        }),
        _ => true,
    }
}

/// Whether the same statement will fail the same way again: the database refused the data or
/// the statement itself (SQLSTATE classes 22, 23, 42), as opposed to a database that is
/// unreachable, busy, locked or shutting down (a lock timeout, a deadlock, an admin shutdown).
#[doc(hidden)]
pub fn is_permanent(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("42")))
}

#[cfg(test)]
mod tests {
    use super::{is_permanent, is_transient};
    use std::borrow::Cow;

    /// A server error with a SQLSTATE, as the driver reports one.
    #[derive(Debug)]
    struct Server(&'static str);

    impl std::fmt::Display for Server {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Server {}

    impl sqlx::error::DatabaseError for Server {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn server(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Server(code)))
    }

    #[test]
    fn errors_the_database_gives_for_the_moment_are_transient_and_others_are_about_the_statement() {
        // cut by an administrator, shutting down, too many connections, read-only, a lost
        // serialization race, a deadlock, a lock: the same statement may go through later
        for code in [
            "57P01", "57P03", "53300", "25006", "40001", "40P01", "55P03", "08006",
        ] {
            assert!(is_transient(&server(code)), "{code}");
            assert!(!is_permanent(&server(code)), "{code}");
        }
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        // bad data, a constraint, a statement that no longer fits, a trigger's exception: about
        // the statement or its rows
        for code in ["22023", "23505", "42703", "P0001"] {
            assert!(!is_transient(&server(code)), "{code}");
        }
        for code in ["22023", "23505", "42703"] {
            assert!(is_permanent(&server(code)), "{code}");
        }
        assert!(!is_permanent(&server("P0001")));
    }
}
