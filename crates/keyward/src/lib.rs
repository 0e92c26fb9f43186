//! keyward — the Redis data layer for Rust services, with the rules experienced teams write down for Redis
//! enforced by the library instead of by code review.
//!
//! - Every key is built from a declared [`Policy`](policy::Policy) (`{env}:{app}:{class}:v{n}:{id}`), never a
//!   hand-formatted string; id parts are escaped so user input cannot forge a separator or a glob.
//! - Every key has a TTL (with jitter); no API writes one without.
//! - No `KEYS`, `FLUSHDB` or `FLUSHALL`: group invalidation is an O(1) epoch bump, walks use `SCAN`.
//! - Every check-then-act is one command or one Lua script (Redis), or one critical section (embedded backend).
//! - A cache fill that raced an invalidation never lands (fenced fills), and a stampede on a cold key loads
//!   once across the whole fleet.
//! - Personal data stays out of a shared cache unless its class says so.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keyward::{Keyward, policy::Policy};
//!
//! let policy = Policy::from_toml_str(r#"
//!     [namespace]
//!     env = "dev"
//!     app = "shop"
//!
//!     [classes.product]
//!     kind = "cache"
//!     ttl = "10m"
//!     invalidation = "catalog service, after every product write"
//! "#)?;
//! let kw = Keyward::from_env(policy).await?; // REDIS_URL, or the embedded backend
//! let products = kw.cache::<String>("product")?;
//! let name = products.get_or_set(&42, || async { Ok::<_, std::io::Error>("apple".to_owned()) }).await?;
//! assert_eq!(name, "apple");
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`policy`] — the declared namespace and classes, from TOML or a builder; one validation for both.
//! - [`key`] — keys built only through the policy; escaping; SCAN patterns.
//! - [`Keyward`] — the process-wide handle (one multiplexed Redis connection, or the embedded backend).
//! - [`Cache`] — typed cache-aside with single-flight, fill leases, fenced fills and wake-ups.
//! - [`rate_limit`] — five algorithms (fixed window, sliding log, sliding counter, token bucket, GCRA), each
//!   one atomic script on the server's clock; several limits all or nothing; `on_error`, circuit breaker,
//!   block cache, shadow mode.
//! - [`lock`] — distributed locks with fencing tokens: exclusive leases, wake-up on release, a renewal
//!   watchdog, and fenced writes that let the resource refuse a holder whose lease ran out.
//! - [`session`] — server-side sessions: HMAC-keyed random tokens with secret rotation, idle and absolute
//!   timeouts in one script, versioned saves, `regenerate`, per-user listing and logout everywhere.
//! - [`idempotency`] — idempotency keys: one run per key, concurrent duplicates told so, the stored response
//!   replayed byte for byte; the in-progress marker is a lease.
//! - [`stream`] — durable events on Redis Streams: typed publish with the retention applied in the same
//!   script, trimming that never drops an entry a consumer group has not acknowledged (below a hard cap).
//!   [`Stream::worker`](stream::Stream::worker) consumes through a consumer group: at least once, retries,
//!   dead letters, reclaim, graceful shutdown.
//! - [`channel`] — typed pub/sub on a dedicated connection, with a `Gap` whenever messages may have been missed.
//! - [`inspect`] — read-only descriptions of stored bytes (a cache value's envelope, a fill lease) for
//!   operator tools; never a secret.
//! - [`codec`] — JSON by default, MessagePack behind the `msgpack` feature.
//! - [`Error`] — one error enum; expected outcomes are values, not errors.
//!
//! Internals: each capability keeps its storage half in its own `store.rs`, with its Lua scripts next to it;
//! `backend` holds only connection-level services (script invocation, the one response-timeout bound and circuit
//! breaker, the undo of calls that got no answer, SCAN, wake-ups, and the embedded keyspace); `envelope` (the
//! stored byte format), `flight` (single-flight). `docs/architecture.md` says how the layers fit and how to add
//! a capability; `docs/resilience.md` what happens when Redis fails.
//!
//! # When Redis fails
//! Every call is bounded by [`ConnectOptions::response_timeout`] and passes one circuit breaker per handle
//! ([`Keyward::breaker_state`]); caches fail open by default, rate limits apply `on_error`, and sessions, locks
//! and idempotency keys return a typed error. Whatever a call that got no answer may leave on the server (a
//! fill lease, an in-progress marker, a lock) is undone when the server answers again.
//!
//! # Metrics
//! Through the [`metrics`] facade, labelled by `class`: `keyward_cache_hits_total`, `…_misses_total`,
//! `…_negative_hits_total`, `…_coalesced_total`, `…_loader_calls_total`, `…_loader_errors_total`,
//! `…_lease_waits_total`, `…_fills_refused_total`, `…_decode_errors_total`, `…_fail_open_total`, and the
//! histogram `keyward_cache_loader_seconds`. `tracing` spans `keyward.cache.*` carry the cache status. Unlabelled
//! by class: `keyward_breaker_open` (gauge), `keyward_cleanups_total{op}` (undos sent),
//! `keyward_sentinel_switches_total` (master changes followed behind Sentinel), and the embedded store's
//! `keyward_memory_evictions_total` / `keyward_memory_refused_total` / `keyward_memory_full_total` by class.

mod backend;
mod batch;
mod cache;
pub mod channel;
mod client;
pub mod codec;
mod envelope;
mod error;
mod flight;
pub mod idempotency;
pub mod inspect;
pub mod key;
pub mod lock;
pub mod policy;
pub mod rate_limit;
pub mod session;
pub mod stream;

pub use backend::{BackendKind, BreakerState, ConnectOptions, KeyTtl, MemoryOptions};
pub use cache::many::MissingFromBatch;
pub use cache::write_behind::{Drain, Record, Write, WriteBehind};
pub use cache::{Cache, CacheLookup, CacheStats, StaleReason};
pub use channel::{Channel, ChannelEvent};
pub use client::Keyward;
pub use error::{BoxError, Error, RedisFailure, Result};
pub use rate_limit::{Decision, RateLimiter};

/// The README's Rust snippets compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
