//! The one integration-test binary: every test gets its own database in the throwaway cluster
//! (`scripts/test.sh`), a sandbox on 127.0.0.1:0, and drives the real worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod admin;
mod claim;
mod cli;
mod enqueue;
mod limits;
mod model;
mod operator;
mod ordering;
mod plans;
mod providers;
mod reliability;
mod retries;
mod sandbox;
mod shutdown;
mod trust;
