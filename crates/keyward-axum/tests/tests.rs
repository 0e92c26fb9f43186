//! keyward-axum's integration tests, in one binary. Every test uses the embedded backend: no Redis.
//! Exceptions: the `idempotency` tests named `…_on_redis` and its store-failure test, and the
//! `session_outage` tests, each spawn a
//! redis-server (keyward-testkit).

mod util;

mod building_a_service;
mod idempotency;
mod identity;
mod layer;
mod server;
mod session;
mod session_outage;
