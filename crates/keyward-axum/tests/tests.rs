//! keyward-axum's integration tests, in one binary. Every test uses the embedded backend: no Redis.
//! Exceptions: the `idempotency` tests named `…_on_redis` and its store-failure test, the
//! `session_outage` tests and the `errors` tests named after Redis, each spawn a redis-server
//! (keyward-testkit).

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
