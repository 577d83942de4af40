//! The hot path's sessions: the connections a worker claims and completes on, whose settings
//! let each of those statements be planned once per session and kept.
//!
//! Everything else a worker runs (housekeeping, sweeps, gauges, the double-opt-in ledger) goes
//! through its ordinary pool, unprepared, planned for the tables as they are at that moment.
//!
//! Re-planning the claim and the completion at every run cost about a fifth of the database's
//! CPU per job (parse and plan, 14–19 µs). A plan kept for a session, though, is made for the
//! tables as they were when it was made: on an empty queue's statistics the planner may read a
//! table whole, and go on doing so once a million jobs are queued. These sessions pin the plan
//! shapes instead:
//! - `plan_cache_mode = force_generic_plan`: one plan per statement and session, made without
//!   the parameters' values (nothing in it depends on them);
//! - `enable_seqscan`, `enable_bitmapscan` off: every table is read through an index;
//! - `enable_nestloop` off: the batch's own sets (the jobs to write, the rows locked, the rows
//!   held) are joined by hashing, never by rescanning one for each row of the other; what must
//!   look up one row per row of the batch is written as a correlated sub-select (a primary-key
//!   or contact probe) or an `= ANY(ARRAY(...))` index scan, which these settings do not touch;
//! - `jit` off: a plan's cost estimates, inflated by the settings above, never set off
//!   compilation.
//!
//! So every statement run on these connections must be written that way, and the plan tests
//! (`plans::*`) run them on one of them: the claim and the completion of 256 jobs among 20,000,
//! planned while the queue held ten, read rows in proportion to the batch.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::time::Duration;

/// The session settings of the hot path's connections (see the module's documentation).
pub const SETTINGS: [(&str, &str); 5] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_nestloop", "off"),
    ("jit", "off"),
];

/// How many connections the hot path opens besides the ordinary pool: the claim (one at a
/// time), the completion (one at a time, and the look-up of each contact's next job after it),
/// and one spare.
pub const CONNECTIONS: u32 = 3;

/// A pool of hot-path sessions to the database `pool` connects to, with its options (the
/// lock timeout, the application name) and [`SETTINGS`]. Opens no connection until used.
pub fn pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options()).clone().options(SETTINGS);
    PgPoolOptions::new()
        .max_connections(CONNECTIONS)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options)
}
