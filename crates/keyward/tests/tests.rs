//! keyward's integration tests, as one test binary: every file in this folder is a module of it, so the suite
//! links once instead of once per file (`cargo test -p keyward --test tests`).
//!
//! Run one module with a filter on its path: `cargo test -p keyward --test tests lock::` (or one case,
//! e.g. `conformance::redis::hit_and_miss`). The tower-sessions store needs its feature:
//! `cargo test -p keyward --features tower-sessions --test tests tower_sessions::`.
//!
//! **Adding a test module** (e.g. `streams.rs`):
//! 1. create `tests/streams.rs`, opening with a `//!` line saying what it proves; file-level attributes such as
//!    `#![allow(unreachable_pub)]` work there as before;
//! 2. add `mod streams;` below, in alphabetical order (behind `#[cfg(feature = "…")]` if it needs a feature);
//! 3. use the shared harness as `crate::common::Harness`; the `conformance!` macro is in scope everywhere
//!    (`common` is declared first, with `#[macro_use]`).
//!
//! Things shared by every module now that they run in one process: a test that re-runs this binary as a
//! child must pass its test's full path (see `multiprocess::test_path`); a `metrics` recorder must be local
//! to the test (`metrics::with_local_recorder`), never installed globally; process-wide state (environment
//! variables, the current directory) must not be changed by a test.

#[macro_use]
mod common;

mod acl;
mod architecture;
mod break11;
mod break12;
mod break_commits;
mod break_expire;
mod break_throttle;
mod break_today;
mod break_today2;
mod break_wb;
mod cache_batch;
mod cache_commits;
mod cache_failsafe;
mod cache_l1;
mod cache_tags;
mod channel;
mod cluster;
mod cluster_epochs;
mod cluster_faults;
mod cluster_resharding;
mod conformance;
mod connect;
mod fault_regressions;
mod faults;
mod idempotency;
mod lazy_connect;
mod lock;
mod metrics;
mod metrics_table;
mod multiprocess;
mod no_forbidden_commands;
mod rate_limit;
mod rate_limit_failures;
mod resilience;
mod sentinel;
mod session;
mod stream;
mod stream_backoff;
mod stream_publish;
mod tls;
#[cfg(feature = "tower-sessions")]
mod tower_sessions;
mod write_behind;
