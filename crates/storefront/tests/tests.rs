//! The storefront's tests, one binary (so it links once): `cargo test -p storefront`.
//!
//! Every test gets its own SQLite file in a temporary directory; the ones that need Redis spawn their own
//! `redis-server` (keyward-testkit).

mod util;

mod account;
mod browser;
mod catalog;
mod dashboard;
mod import;
mod metrics;
mod orders;
mod policy;
mod processes;
mod replay;
mod restock;
mod serve;
mod two_instances;
mod worker;
