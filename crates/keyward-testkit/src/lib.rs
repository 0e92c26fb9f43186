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
//!   out clients and connections, and killing it on drop; for fault tests, freezing it
//!   ([`RedisServer::pause`] / [`RedisServer::resume`]) and crashing it into an empty restart on the same
//!   address ([`RedisServer::restart`]).
//! - `proxy` — [`TcpProxy`] (forward, blackhole or refuse, switchable while clients are connected) and
//!   [`Blackhole`] (accepts TCP, never answers): network faults on loopback only.
//! - `cluster` — [`RedisCluster`] and [`ClusterOptions`]: 3 masters (optionally with replicas) on loopback,
//!   formed with `redis-cli --cluster create` ([`redis_cli_binary`]) and ready when every node says
//!   `cluster_state:ok`; topology ([`RedisCluster::nodes`], [`RedisCluster::master_for_key`]) and faults
//!   ([`RedisCluster::kill_master_of`], [`RedisCluster::wait_for_failover`], pause/resume of a node).
//! - `tls` — [`TestCerts`] (a throwaway CA, server and client certificates, and an unrelated CA),
//!   [`TlsServer`] (a server with `--tls-port`, optionally requiring client certificates) and [`TlsFiles`]
//!   (what TLS sentinel sets and clusters are started with: [`ClusterOptions::tls`], [`SentinelOptions::tls`]).
//! - `sentinel` — [`SentinelSet`]: one master, one replica and three sentinels on loopback, with
//!   [`SentinelSet::failover`] (`SENTINEL FAILOVER`, returning when every sentinel names the new master);
//!   [`SentinelOptions`] for TLS and password- or ACL-protected sentinels.
//!
//! # Faults
//!
//! ```no_run
//! use keyward_testkit::{RedisServer, TcpProxy};
//!
//! let mut server = RedisServer::spawn_tcp();
//! server.pause(); // SIGSTOP: connected clients get no answer
//! let answering_again = server.resume(); // SIGCONT, returns once it answers PING
//! let back = server.restart(); // SIGKILL, then an empty server on the same port
//! let proxy = TcpProxy::to_server(&server);
//! proxy.blackhole(); // open connections go silent
//! proxy.refuse(); // connections closed, the port refuses
//! proxy.forward(); // traffic flows again
//! # let _ = (answering_again, back);
//! ```

mod binary;
mod cluster;
mod proxy;
mod sentinel;
mod server;
mod tls;

pub use binary::{
    MISSING_REDIS_CLI_MESSAGE, MISSING_REDIS_MESSAGE, REDIS_CLI_ENV, REDIS_SERVER_ENV,
    redis_cli_binary, redis_server_binary,
};
pub use cluster::{ClusterNode, ClusterOptions, MASTERS, NodeRole, RedisCluster, SLOTS};
pub use proxy::{Blackhole, ProxyMode, TcpProxy};
pub use sentinel::{SENTINEL_MASTER_NAME, SentinelOptions, SentinelSet};
pub use server::{RedisServer, ServerOptions};
pub use tls::{TestCerts, TlsFiles, TlsServer};

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;
