//! The outbox: the only module with SQL on `contact_sync.jobs`, the queue of contacts
//! (`contact_sync.contacts`, kept by triggers) and the double-opt-in tables.
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

pub mod accounts;
pub mod admin;
pub mod claim;
pub mod complete;
pub mod doi;
pub mod enqueue;
pub mod job;
pub mod prune;
pub mod rescue;

pub use enqueue::{enqueue, enqueue_batch, enqueue_batch_counted, EnqueueError, Enqueued};
pub use job::{ClaimedJob, JobId, JobState, Lease, NewJob};
