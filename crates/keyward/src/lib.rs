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
//! Internals (private, so not on these pages; read them in the source): each capability keeps its storage
//! half in its own `src/<capability>/store.rs`, with its Lua scripts next to it; `src/backend/` holds only
//! connection-level services (script invocation, the one response-timeout bound and circuit breaker, the undo
//! of calls that got no answer, lazy connect, SCAN, wake-ups, and the embedded keyspace); `src/envelope.rs`
//! is the stored byte format and `src/flight.rs` the single-flight table. `docs/architecture.md` in the
//! repository says how the layers fit and how to add a capability; `docs/resilience.md` what happens when
//! Redis fails.
//!
//! # Configuration from the environment
//! `REDIS_URL` picks the server ([`Keyward::from_env`]); `KEYWARD_ENV` and `KEYWARD_APP` override the
//! policy's namespace when you ask for it ([`Policy::with_env_overrides`](policy::Policy::with_env_overrides)),
//! so one policy file serves every environment.
//!
//! # Testing
//! [`Keyward::embedded`] runs every capability in process, on Tokio's clock: with paused time
//! (`#[tokio::test(start_paused = true)]`) TTLs and windows pass at once (see its example).
//!
//! # When Redis fails
//! Every call is bounded by [`ConnectOptions::response_timeout`] and passes one circuit breaker per handle
//! ([`Keyward::breaker_state`]); caches fail open by default, rate limits apply `on_error`, and sessions, locks
//! and idempotency keys return a typed error. Whatever a call that got no answer may leave on the server (a
//! fill lease, an in-progress marker, a lock) is undone when the server answers again. A service that may
//! start before Redis does uses [`ConnectOptions::lazy_connect`]: the handle is made at once, connects in the
//! background, and until then every call answers per the same failure modes.
//!
//! # Metrics
//! Through the [`metrics`](https://docs.rs/metrics) facade: nothing is emitted until the process installs a
//! recorder (an exporter). Every metric keyward emits (the same table as `docs/metrics.md`, which also shows
//! exporting them to Prometheus from an axum route; a test keeps both complete):
//!
//! | Name | Type | Labels | What increments it |
//! |---|---|---|---|
//! | `keyward_cache_hits_total` | counter | `class` | A read answered with a stored value, from Redis or from the in-process tier (L1 hits count here *and* in `keyward_cache_l1_hits_total`); also a read served the current value while it starts an eager refresh. Coalesced callers are **not** hits. |
//! | `keyward_cache_l1_hits_total` | counter | `class` | A read answered by the in-process tier (L1) without asking Redis (a subset of `keyward_cache_hits_total`). |
//! | `keyward_cache_misses_total` | counter | `class` | A read that found no usable value: the caller that then loads (it holds the fill lease), a plain `get` that found nothing, and a value that failed to decode. Once per load, not once per waiting caller. |
//! | `keyward_cache_negative_hits_total` | counter | `class` | A read answered with a cached "absent" (`negative_ttl`). |
//! | `keyward_cache_coalesced_total` | counter | `class` | A caller that shared another caller's fetch in this process (single-flight) instead of asking Redis: it counts here only, neither as a hit nor as a miss. |
//! | `keyward_cache_loader_calls_total` | counter | `class` | Each call of your loader (including loads that fail open and eager refreshes). |
//! | `keyward_cache_loader_errors_total` | counter | `class` | A loader call that returned an error or overran `loader_timeout` (never cached). |
//! | `keyward_cache_loader_seconds` | histogram | `class` | The duration of each loader call, in seconds, failed ones included. |
//! | `keyward_cache_lease_waits_total` | counter | `class` | Each wait for another caller's fill lease (anywhere in the fleet); one caller may wait more than once. |
//! | `keyward_cache_fills_refused_total` | counter | `class` | A fill refused because an invalidation (or a `set`) voided its lease while the loader ran: the value was returned, not stored. |
//! | `keyward_cache_decode_errors_total` | counter | `class` | A stored value that failed to decode: it was deleted and treated as a miss. |
//! | `keyward_cache_fail_open_total` | counter | `class` | A call of an `on_error = "fail_open"` class that found the store unavailable (timeout, refused, breaker open, lazy handle not yet connected) and was answered from the loader (or as a miss by `get`). |
//! | `keyward_cache_stale_served_total` | counter | `class` | A call answered with a stale value (fail-safe: a refill failed, overran `loader_timeout`, or `soft_timeout` passed). |
//! | `keyward_cache_refreshes_total` | counter | `class` | An eager refresh started (an entry read within `refresh_ahead` of its expiry). |
//! | `keyward_cache_l1_drops_total` | counter | `reason` (`disconnect`, `gap`, `own_gap`, `lapse`) | The in-process tier emptied every class because it could no longer vouch for it: the backplane connection dropped, a message was missed from another instance (`gap`) or from this one (`own_gap`), or no own message came back within `l1_max_stale` (`lapse`). |
//! | `keyward_ratelimit_allowed_total` | counter | `class` | A charging check (`check`, `check_cost`) that was allowed, by Redis or by the `on_error` fallback; per class of a group. `peek` counts nothing. |
//! | `keyward_ratelimit_limited_total` | counter | `class` | A charging check that this class refused (by Redis or by the fallback); in a group, only the classes that refused. |
//! | `keyward_ratelimit_blocked_locally_total` | counter | `class` | A check refused in process by the block cache (`block_cache = true`) without asking Redis; not also in `limited_total`. |
//! | `keyward_ratelimit_shadow_limited_total` | counter | `class` | A check that a `shadow = true` class would have refused (it was not refused). |
//! | `keyward_ratelimit_errors_total` | counter | `class` | A check that failed at the store: an error reply (returned to the caller), or unavailability other than an open breaker (then `on_error` decided). |
//! | `keyward_ratelimit_fallback_total` | counter | `class`, `on_error` (`allow`, `deny`, `local`) | A check decided by `on_error` because the store was unavailable (breaker open and lazy handle not yet connected included). |
//! | `keyward_ratelimit_uncertain_total` | counter | `class` | A charging check that timed out: it may still have been charged on the server as well as by the fallback. |
//! | `keyward_ratelimit_corrupt_state_total` | counter | `class` | Rate-limit state that could not be read (corrupt): reset, the identity starts afresh. |
//! | `keyward_session_created_total` | counter | `class` | A session created (`Sessions::create`). |
//! | `keyward_session_hits_total` | counter | `class` | A `Sessions::get` that found a live session. |
//! | `keyward_session_misses_total` | counter | `class` | A `Sessions::get` of a well-formed token that found no live session (ended, expired, never existed); malformed tokens count nothing. |
//! | `keyward_session_conflicts_total` | counter | `class` | A `Sessions::save` refused because another save changed the session first (`Saved::Conflict`). |
//! | `keyward_lock_acquired_total` | counter | `class` | A lock acquired. |
//! | `keyward_lock_contended_total` | counter | `class` | An acquisition attempt that found the lock held (one `lock` call that waits may count several), or a waiter whose deadline passed in this process's queue. |
//! | `keyward_lock_timeouts_total` | counter | `class` | A `lock` (or `lock_with`) call that gave up at its `wait` deadline (`try_lock` never counts). |
//! | `keyward_lock_lost_total` | counter | `class` | A lease lost while its guard lived (it expired or was taken over; `lost()` fires). |
//! | `keyward_lock_fenced_rejected_total` | counter | `class` | A fenced write refused because a newer holder's fencing token was seen. |
//! | `keyward_idempotency_total` | counter | `class`, `outcome` (`new`, `in_progress`, `replayed`, `mismatch`, `lease_lost`) | Each `begin` by its outcome (a new run, a duplicate while the first runs, a stored response replayed, a different request with the same key), and each lease found lost (at `complete`, or by the heartbeat). |
//! | `keyward_stream_published_total` | counter | `class` | Entries appended to the stream. |
//! | `keyward_stream_dropped_unacked_total` | counter | `class` | Entries the hard cap trimmed before every consumer group acknowledged them. |
//! | `keyward_stream_handled_total` | counter | `class`, `group` | Messages a worker's handler finished with `Ok` (then acknowledged). |
//! | `keyward_stream_failed_total` | counter | `class`, `group` | Deliveries that failed: the handler returned an error or panicked, the event could not be decoded, or it was delivered more than `max_deliveries` times; each retry counts again. |
//! | `keyward_stream_dead_lettered_total` | counter | `class`, `group` | Messages moved to the dead letters (after `max_deliveries`, or a permanent failure). |
//! | `keyward_stream_lost_total` | counter | `class`, `group` | Pending entries trimmed from the stream before this group handled them (the group lagged past the hard cap). |
//! | `keyward_stream_handler_seconds` | histogram | `class`, `group` | The duration of each handler run, in seconds. |
//! | `keyward_stream_pending` | gauge | `class`, `group` | Entries delivered to the group and not yet acknowledged, set once per reclaim period. |
//! | `keyward_stream_lag` | gauge | `class`, `group` | Entries not yet delivered to the group, set once per reclaim period (when Redis reports it). |
//! | `keyward_stream_oldest_pending_age_seconds` | gauge | `class`, `group` | Age of the oldest pending entry, in seconds (0 when none), set once per reclaim period. |
//! | `keyward_channel_published_total` | counter | `class` | Messages published on a typed channel (whether or not anyone listened). |
//! | `keyward_channel_gaps_total` | counter | `class` | `Gap`s delivered to subscribers (a lost connection, or a subscriber that fell behind); one per subscriber. |
//! | `keyward_breaker_open` | gauge | — | Set to 1 when a circuit breaker opens and to 0 when a probe closes it again (on Cluster each primary's breaker sets the same gauge). |
//! | `keyward_cleanups_total` | counter | `op` (the operation) | An undo sent after a call that got no answer (a fill lease, an in-progress marker or a lock it may have left). |
//! | `keyward_sentinel_switches_total` | counter | — | Master changes followed behind Sentinel. |
//! | `keyward_memory_evictions_total` | counter | `class` | Embedded backend: an entry of an evictable (cache) class evicted to make room. |
//! | `keyward_memory_refused_total` | counter | `class` | Embedded backend: a cache entry not stored because it cannot fit its class's budget, even after evicting. |
//! | `keyward_memory_full_total` | counter | `class` | Embedded backend: an operation refused with `Error::StoreFull` (a class that is never evicted is at its budget). |
//!
//! `tracing` spans `keyward.cache.*` carry each cache call's status (`hit`, `l1_hit`, `miss`, `coalesced`,
//! `fail_open`, …). [`Cache::stats`] gives this handle's cache counts in process, without an exporter.

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

/// `url` (any URL keyward accepts) without its credentials, for messages and logs: the user-info part
/// (everything between `://` and the *last* `@`, since an unencoded password may hold `/`, `:`, `?` or `@`)
/// becomes `***`, and any query or fragment (`?password=…`) is replaced by `?…` (`#…`); when an `@` follows a `?` or `#`
/// (a password with an unencoded `@` in the query), nothing after the scheme is shown. keyward's own errors
/// use the same rule.
///
/// ```
/// assert_eq!(keyward::redact_url("redis://u:p@ss@host:6379/0?x=1"), "redis://***@host:6379/0?…");
/// assert_eq!(keyward::redact_url("redis+sentinel://h:26379/m?password=a@b"), "redis+sentinel://***…");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    backend::redact(url)
}

#[doc(hidden)]
pub mod __cli {
    //! Pieces of the library's connect that the `keyward` CLI's own raw connections (audit, inspect, purge,
    //! streams) share, so that both say the same thing. **Not part of keyward's API**: hidden from the docs,
    //! exempt from semver, free to change in any release.

    /// `reason` for a `rediss://` connect that got no answer, with what one plain-text `PING` at the port
    /// tells (at most `min(connect_timeout, 1 s)`, no credentials); other addresses get `reason` back.
    pub use crate::backend::unanswered;
}

#[doc(hidden)]
pub mod __bench {
    //! Thin wrappers over crate-private pieces, for the criterion benchmarks in `crates/keyward/benches/`
    //! only. **Not part of keyward's API**: hidden from the docs, exempt from semver, and free to change or
    //! disappear in any release. Do not call it from anything but a benchmark.
    //!
    //! The one decision: each wrapper calls the private function the hot path calls and adds nothing, so a
    //! benchmark measures that function and a regression in it shows up without a Redis.

    use crate::envelope::{self, Body, Gens, Stamp};

    /// What a fill records (namespace epoch, class epoch, `(tag, tag epoch)`s), built once outside the
    /// measured loop.
    pub struct BenchStamp(Stamp);

    impl BenchStamp {
        /// A stamp of namespace epoch `ns`, class epoch `class` and `tags`.
        pub fn new(ns: u64, class: u64, tags: &[(&str, u64)]) -> Self {
            BenchStamp(Stamp {
                gens: Gens { ns, class },
                tags: tags.iter().map(|&(t, e)| (t.to_owned(), e)).collect(),
                kept: None,
            })
        }

        /// `envelope::value(stamp, &envelope::body(payload))`: the bytes a fill or a `set` stores
        /// (`payload: None` is a cached "absent").
        pub fn encode(&self, payload: Option<&[u8]>) -> Vec<u8> {
            envelope::value(&self.0, &envelope::body(payload))
        }
    }

    /// `envelope::parse_tagged` (which checks every tag): `(ns epoch, class epoch, payload)`, the payload
    /// `None` for a cached absent; `None` for bytes that are not a value.
    pub fn envelope_parse(raw: &[u8]) -> Option<(u64, u64, Option<&[u8]>)> {
        let (g, _tags, body) = envelope::parse_tagged(raw).ok()?;
        let payload = match body {
            Body::Value(p) => Some(p),
            Body::Negative => None,
        };
        Some((g.ns, g.class, payload))
    }

    /// `envelope::judge` against epochs `ns`/`class`, every tag at epoch 0 (the hit path's decision):
    /// whether the stored bytes are a current value.
    pub fn envelope_is_current(raw: &[u8], ns: u64, class: u64) -> bool {
        let tag_epochs = |_: &[u8]| Some(envelope::TagEpochs::default());
        envelope::judge(raw, Gens { ns, class }, tag_epochs, false) == envelope::Verdict::Current
    }
}

/// The README's Rust snippets compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// docs/metrics.md's Prometheus example compiles and runs (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../../docs/metrics.md")]
struct MetricsDoctests;
