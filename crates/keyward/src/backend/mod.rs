//! The seam between capabilities and storage: a handful of *semantic* atomic operations.
//!
//! Each operation is atomic where it must be — one command or one Lua script on Redis, one critical section in
//! the embedded backend — with the same
//! semantics (TTL, atomicity, ordering); the conformance suite in `tests/` runs against both. Capabilities never
//! send raw commands, so the rules (every key has a TTL, fills are fenced) are kept in one place.
//!
//! An enum rather than a trait object: there are exactly two backends, calls stay static, and async methods
//! need no boxing.

pub(crate) mod breaker;
pub(crate) mod memory;
pub(crate) mod redis;

use std::time::Duration;

use bytes::Bytes;

use crate::envelope::Gens;
use crate::error::Result;

pub use breaker::BreakerState;
pub use memory::MemoryOptions;

/// Whether a client error means the server could not be reached (as opposed to an error reply from it).
pub(crate) fn is_unavailable(e: &::redis::RedisError) -> bool {
    use ::redis::{ErrorKind, ServerErrorKind};
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::MasterDown)
        )
}

/// The per-namespace keys the cache operations share.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    /// Hash of epochs: field `*` for the whole namespace, one field per class.
    pub(crate) gens_key: String,
    /// Pub/sub channel on which fills are announced to waiters (payload: the entry key).
    pub(crate) channel: String,
    /// How long the epochs must outlive their last bump: longer than any value can live.
    pub(crate) gens_lifetime: Duration,
}

/// What a fetch found.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// A stored value (still enveloped; may be corrupt).
    Hit(Bytes),
    /// No usable value: the caller now holds the fill lease, under these epochs.
    Leased(Gens),
    /// Another caller holds the lease; it expires within this long.
    Wait(Duration),
}

/// Which storage a [`Keyward`](crate::Keyward) handle talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// A Redis server (standalone, over TCP, TLS or a unix socket).
    Redis,
    /// The embedded in-process backend.
    Embedded,
}

/// A key found by a keyspace walk, with its remaining time to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTtl {
    /// The full key.
    pub key: String,
    /// Remaining TTL; `None` if the key has none (which keyward never writes).
    pub ttl: Option<Duration>,
}

pub(crate) enum Backend {
    Memory(Box<memory::MemoryBackend>),
    Redis(redis::RedisBackend),
}

/// The arguments every entry operation shares.
pub(crate) struct Entry<'a> {
    pub(crate) ns: &'a Namespace,
    pub(crate) class: &'a str,
    pub(crate) key: &'a str,
}

impl Backend {
    pub(crate) fn kind(&self) -> BackendKind {
        match self {
            Backend::Memory(_) => BackendKind::Embedded,
            Backend::Redis(_) => BackendKind::Redis,
        }
    }

    /// The circuit breaker's state (always closed for the embedded backend).
    pub(crate) fn breaker_state(&self) -> BreakerState {
        match self {
            Backend::Memory(_) => BreakerState::Closed,
            Backend::Redis(r) => r.breaker_state(),
        }
    }

    /// A health check: `PING` on Redis, bounded by the response timeout; always fine when embedded.
    pub(crate) async fn ping(&self) -> Result<()> {
        match self {
            Backend::Memory(_) => Ok(()),
            Backend::Redis(r) => r.ping().await,
        }
    }

    /// Return the value, or grant the fill lease identified by `marker` (`L1:{token}:0`), or say who waits.
    /// A value filled under other epochs, or a negative entry when `negative_ok` is false, counts as absent.
    pub(crate) async fn fetch(
        &self,
        e: &Entry<'_>,
        marker: &str,
        lease_ttl: Duration,
        negative_ok: bool,
    ) -> Result<Fetched> {
        match self {
            Backend::Memory(m) => Ok(m.fetch(e, marker, lease_ttl, negative_ok)),
            Backend::Redis(r) => r.fetch(e, marker, lease_ttl, negative_ok).await,
        }
    }

    /// Read without taking a lease: a current value, or nothing.
    pub(crate) async fn read(&self, e: &Entry<'_>) -> Result<Option<Bytes>> {
        match self {
            Backend::Memory(m) => Ok(m.read(e)),
            Backend::Redis(r) => r.read(e).await,
        }
    }

    /// Store `value` (a full envelope) only if the lease whose marker starts with `lease_prefix` is still held.
    pub(crate) async fn commit(
        &self,
        e: &Entry<'_>,
        lease_prefix: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool> {
        match self {
            Backend::Memory(m) => Ok(m.commit(e, lease_prefix, value, ttl)),
            Backend::Redis(r) => r.commit(e, lease_prefix, value, ttl).await,
        }
    }

    /// Give a lease back (the loader failed) so that a waiter takes over now rather than at expiry.
    pub(crate) async fn release(&self, e: &Entry<'_>, lease_prefix: &str) -> Result<bool> {
        match self {
            Backend::Memory(m) => Ok(m.release(e, lease_prefix)),
            Backend::Redis(r) => r.release(e, lease_prefix).await,
        }
    }

    /// Unconditional write of `body` (`v:…`/`n:`) under the current epochs; voids any lease.
    pub(crate) async fn set(&self, e: &Entry<'_>, body: &[u8], ttl: Duration) -> Result<()> {
        match self {
            Backend::Memory(m) => {
                m.set(e, body, ttl);
                Ok(())
            }
            Backend::Redis(r) => r.set(e, body, ttl).await,
        }
    }

    /// Remove the value or lease of one entry; a fill leased before this can no longer commit.
    pub(crate) async fn invalidate(&self, e: &Entry<'_>) -> Result<bool> {
        match self {
            Backend::Memory(m) => Ok(m.invalidate(e)),
            Backend::Redis(r) => r.invalidate(e).await,
        }
    }

    /// Bump a group epoch (`*` for the namespace, or a class name): O(1), whatever the number of entries.
    pub(crate) async fn bump(&self, ns: &Namespace, field: &str) -> Result<u64> {
        match self {
            Backend::Memory(m) => m.bump(ns, field),
            Backend::Redis(r) => r.bump(ns, field).await,
        }
    }

    /// Delete the entry only if it still holds exactly `raw` (self-healing of undecodable values).
    pub(crate) async fn heal(&self, key: &str, raw: &[u8]) -> Result<bool> {
        match self {
            Backend::Memory(m) => Ok(m.heal(key, raw)),
            Backend::Redis(r) => r.heal(key, raw).await,
        }
    }

    /// Walk the keyspace with SCAN (never KEYS) and report each match with its TTL.
    pub(crate) async fn scan(&self, pattern: &str, batch: usize) -> Result<Vec<KeyTtl>> {
        match self {
            Backend::Memory(m) => Ok(m.scan(pattern)),
            Backend::Redis(r) => r.scan(pattern, batch).await,
        }
    }
}
