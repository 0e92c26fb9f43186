//! keyward-axum's integration tests, in one binary. Every test uses the embedded backend: no Redis.
//! Exceptions: the `idempotency` tests named `…_on_redis` and its store-failure test, the
//! `session_outage` tests and the `errors` tests named after Redis, each spawn a redis-server
//! (keyward-testkit).
//!
//! Three quarters of the compiler's default recursion limit: a handler's future nests every keyward call's
//! future, and keyward once came within a few levels of the default (128), so an application a little
//! deeper than `building_a_service` failed to compile ("queries overflow the depth limit"). The backend
//! seam now erases the Redis call's future (`backend::boxed`; `Cache::get_or_set`, the deepest public
//! future, then needs 73–80 levels on its own); this limit keeps that margin from eroding.
#![recursion_limit = "96"]

mod util;

mod building_a_service;
mod errors;
mod idempotency;
mod identity;
mod layer;
mod server;
mod session;
mod session_outage;
mod stack;
