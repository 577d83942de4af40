//! The one integration-test binary: every test gets its own database in the throwaway cluster
//! (`scripts/test.sh`), a sandbox on 127.0.0.1:0, and drives the real worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod abandoned_calls;
mod addresses;
mod admin;
mod browser;
mod capture;
mod claim;
mod cli;
mod console;
mod delivered;
mod double_opt_in;
mod edits_in_flight;
mod enqueue;
mod isolation;
mod limits;
mod model;
mod operator;
mod ordering;
mod outside_locks;
mod plans;
mod providers;
mod reliability;
mod retention;
mod retries;
mod sandbox;
mod schema;
mod settings;
mod shutdown;
