//! keyward-axum's integration tests, in one binary. Every test uses the embedded backend: no Redis.

mod util;

mod identity;
mod layer;
mod server;
