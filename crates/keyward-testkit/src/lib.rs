//! Throwaway `redis-server` processes for keyward's tests.
//!
//! Every test that needs Redis spawns its own server, so tests never share
//! state, never need a `FLUSHDB`, and can run in parallel. The server lives in
//! a fresh temporary directory (socket, log file and working directory) and is
//! killed, reaped and cleaned up when the [`RedisServer`] handle is dropped.
//!
//! ```no_run
//! use keyward_testkit::RedisServer;
//!
//! let server = RedisServer::spawn();
//! let mut con = server.connection();
//! let pong: String = redis::cmd("PING").query(&mut con).unwrap();
//! assert_eq!(pong, "PONG");
//! ```
//!
//! There is deliberately no "skip if Redis is missing" mode: if no
//! `redis-server` binary can be found, spawning panics with installation
//! instructions, so a test run can never pass silently without Redis.
//!
//! # Layout
//!
//! - `binary` — [`redis_server_binary`]: locating the `redis-server`
//!   executable (`KEYWARD_REDIS_SERVER`, then `PATH`, then well-known
//!   directories).
//! - `server` — [`RedisServer`] and [`ServerOptions`]: spawning a server on a
//!   Unix socket or a free TCP port, waiting until it answers `PING`, handing
//!   out clients and connections, and killing it on drop.

mod binary;
mod server;

pub use binary::{MISSING_REDIS_MESSAGE, REDIS_SERVER_ENV, redis_server_binary};
pub use server::{RedisServer, ServerOptions};

#[cfg(test)]
mod tests;
