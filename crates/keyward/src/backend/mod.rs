//! The seam between capabilities and storage, and the connection-level services behind it.
//!
//! A capability reaches storage only through [`Backend::atomic`] (one Lua script on Redis, one critical section
//! of the embedded keyspace) and [`Backend::pipeline`] (plain commands in one round trip, for a hot path),
//! plus the walks and checks here ([`Backend::scan`], [`Backend::ping`]). Each capability keeps both halves of
//! its operations side by side in its own `store.rs`, with its `.lua` files next to it; this module owns what
//! is the same for all of them: script invocation, timeouts and the circuit breaker (in [`redis`]), and the
//! embedded keyspace (in [`memory`]). Nothing outside `backend/` matches on the backend or names a `redis::`
//! type.
//!
//! An enum rather than a trait object: there are exactly two backends, calls stay static, and async methods
//! need no boxing. `docs/architecture.md` says how to add a capability.

pub(crate) mod breaker;
pub(crate) mod channels;
pub(crate) mod lazy;
pub(crate) mod memory;
mod options;
pub(crate) mod redis;
mod script;
pub(crate) mod wake;

use std::time::Duration;

use crate::error::{Error, Result};

pub use breaker::BreakerState;
pub use memory::MemoryOptions;
pub(crate) use memory::keyspace::{Budget, Budgets, Keyspace, Kv, Val};
pub use options::ConnectOptions;
pub(crate) use redis::cluster::{ViewEpochs, slot_of};
pub(crate) use redis::redact;
// For `keyward::__cli` (the CLI's own connections say what the library's connect says).
pub use redis::unanswered;
pub(crate) use script::{Call, Pipeline, Reply, Script, Undo, scripts};

pub(crate) use self::redis::failure::unavailable as is_unavailable;

/// The per-namespace keys the cache operations share.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    /// Hash of epochs: field `*` for the whole namespace, one field per class, `t:<tag>` per tag.
    pub(crate) gens_key: String,
    /// Pub/sub channel on which fills are announced to waiters (payload: the entry key).
    pub(crate) channel: String,
    /// Pub/sub channel of the in-process tier's backplane (sharded on Cluster; see `cache::l1`).
    pub(crate) backplane: String,
    /// How long the epochs must outlive their last bump: longer than any value can live.
    pub(crate) gens_lifetime: Duration,
}

/// A registered interest in wake-ups for one key (see [`Backend::watch`]); dropping it unregisters.
pub(crate) struct Watch {
    listener: wake::Listener,
    _shard: Option<redis::ShardWatch>,
}

impl Watch {
    /// The registration's `Notify`, to create waits that do not borrow the watch.
    pub(crate) fn shared(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.listener.shared()
    }
}

/// Which storage a [`Keyward`](crate::Keyward) handle talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// Redis: a standalone server (over TCP, TLS or a unix socket), the master behind Sentinel, or a Redis
    /// Cluster.
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
    /// Redis, connecting in the background ([`ConnectOptions::lazy_connect`]): until the connection is made
    /// every call fails at once as unavailable, so each capability answers per its failure mode; then it
    /// is the Redis backend.
    Lazy(std::sync::Arc<lazy::Lazy>),
}

/// What a call goes to now: a lazy backend is `Pending` until connected and `Redis` from then on.
enum Target<'a> {
    Memory(&'a memory::MemoryBackend),
    Redis(&'a redis::RedisBackend),
    Pending(&'a std::sync::Arc<lazy::Lazy>),
}

impl Backend {
    /// The embedded backend for a policy declaring `classes` with their eviction rule (each gets its own
    /// budget; only evictable classes make room by evicting).
    pub(crate) fn embedded(options: &MemoryOptions, classes: &[(&str, bool)]) -> Self {
        Backend::Memory(Box::new(memory::MemoryBackend::new(options, classes)))
    }

    /// Connect to Redis at `url`, subscribed to `ns`'s wake-up channel; also returns the server's address
    /// (never credentials), for logs and `Debug`.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] or [`Error::Connect`].
    pub(crate) async fn connect(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: std::sync::Arc<crate::backend::wake::WakeBus>,
    ) -> Result<(Self, String)> {
        let r = redis::RedisBackend::connect(url, options, ns, bus).await?;
        let server = r.server().to_owned();
        Ok((Backend::Redis(r), server))
    }

    /// Start connecting to Redis at `url` in the background; see [`lazy`]. `on_connect` runs once, with the
    /// connected backend, when the connection is made.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] or [`Error::InvalidArgument`] (TLS material) when the URL or the options
    /// cannot be used: those are checked now, since no retry could fix them.
    pub(crate) fn connect_lazy(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: std::sync::Arc<crate::backend::wake::WakeBus>,
        on_connect: impl FnOnce(&redis::RedisBackend) + Send + 'static,
    ) -> Result<(Self, String)> {
        let lazy = lazy::Lazy::start(url, options, ns, bus, on_connect)?;
        let server = lazy.server().to_owned();
        Ok((Backend::Lazy(lazy), server))
    }

    fn target(&self) -> Target<'_> {
        match self {
            Backend::Memory(m) => Target::Memory(m),
            Backend::Redis(r) => Target::Redis(r),
            Backend::Lazy(l) => match l.get() {
                Some(r) => Target::Redis(r),
                None => Target::Pending(l),
            },
        }
    }

    pub(crate) fn kind(&self) -> BackendKind {
        match self {
            Backend::Memory(_) => BackendKind::Embedded,
            Backend::Redis(_) | Backend::Lazy(_) => BackendKind::Redis,
        }
    }

    /// The server's `maxmemory-policy` at connect (Redis only, when the server reported it).
    pub(crate) fn maxmemory_policy(&self) -> Option<&str> {
        match self.target() {
            Target::Memory(_) => None,
            Target::Redis(r) => r.maxmemory_policy(),
            Target::Pending(_) => None,
        }
    }

    /// The longest a caller waiting for someone else (a fill lease held elsewhere) should sleep before it asks
    /// the store again: the response timeout on Redis, so that a waiter is bounded by it while Redis hangs (a
    /// hung server sends no wake-up and no disconnect); `None` on the embedded backend, whose wake-ups cannot
    /// be lost.
    pub(crate) fn wait_slice(&self) -> Option<Duration> {
        match self.target() {
            Target::Memory(_) => None,
            Target::Redis(r) => Some(r.response_timeout()),
            Target::Pending(l) => Some(l.response_timeout()),
        }
    }

    /// The circuit breaker's state (always closed for the embedded backend).
    pub(crate) fn breaker_state(&self) -> BreakerState {
        match self.target() {
            Target::Memory(_) => BreakerState::Closed,
            Target::Redis(r) => r.breaker_state(),
            Target::Pending(_) => BreakerState::Open,
        }
    }

    /// Publish a backplane message (`PUBLISH`, `SPUBLISH` on Cluster); nothing on the embedded backend.
    ///
    /// # Errors
    /// As any Redis call ([`Error::Timeout`], [`Error::CircuitOpen`], [`Error::Redis`]).
    pub(crate) async fn publish_backplane(&self, channel: &str, message: &[u8]) -> Result<()> {
        match self.target() {
            Target::Memory(_) => Ok(()),
            Target::Redis(r) => r.publish_backplane(channel, message).await,
            Target::Pending(l) => Err(l.not_connected("backplane")),
        }
    }

    /// Subscribe to the backplane channel again (idempotent): when this handle's own messages stop coming back.
    pub(crate) async fn resubscribe_backplane(&self, channel: &str) {
        if let Target::Redis(r) = self.target() {
            r.resubscribe_backplane(channel).await;
        }
    }

    /// Tests: look inside the embedded keyspace (`None` on Redis), without the caller matching on the backend.
    #[cfg(test)]
    pub(crate) fn inspect_embedded<T>(&self, f: impl FnOnce(&mut Kv) -> T) -> Option<T> {
        match self.target() {
            Target::Memory(m) => m.keyspace.with(f).ok(),
            Target::Redis(_) | Target::Pending(_) => None,
        }
    }

    /// A health check: `PING` on Redis, bounded by the response timeout; always fine when embedded.
    pub(crate) async fn ping(&self) -> Result<()> {
        match self.target() {
            Target::Memory(_) => Ok(()),
            Target::Redis(r) => r.ping().await,
            Target::Pending(l) => Err(l.not_connected("ping")),
        }
    }

    /// Run one atomic operation: `call`'s script on Redis, its answer decoded by `decode`; `mirror` as one
    /// critical section of the embedded keyspace. `decode` returning `None` is a protocol error naming the
    /// operation and the reply.
    ///
    /// # Errors
    /// Redis: [`Error::Timeout`], [`Error::CircuitOpen`], [`Error::Redis`] (see `RedisBackend::call`);
    /// embedded: [`Error::StoreFull`] when a class that is never evicted is past its budget.
    pub(crate) async fn atomic<T>(
        &self,
        call: Call,
        mirror: impl FnOnce(&mut Kv) -> T,
        decode: impl FnOnce(&Reply) -> Option<T>,
    ) -> Result<T> {
        match self.target() {
            Target::Memory(m) if call.evicting => Ok(m.keyspace.with_evicting(mirror)),
            Target::Memory(m) => m.keyspace.with(mirror),
            Target::Redis(r) => {
                let op = call.op;
                let reply = boxed(r.run(call)).await?;
                decode(&reply).ok_or_else(|| r.protocol_err(op, &format!("{reply:?}")))
            }
            Target::Pending(l) => Err(l.not_connected(call.op)),
        }
    }

    /// Run plain commands in one round trip on Redis (their replies, in order, go to `decode`), or `mirror`
    /// as one critical section of the embedded keyspace. `undo` is built only if the commands got no answer
    /// (see [`Call::undo`]); a hit path pays nothing for it.
    ///
    /// # Errors
    /// As [`atomic`](Self::atomic).
    pub(crate) async fn pipeline<T>(
        &self,
        pipeline: Pipeline,
        undo: impl FnOnce() -> Undo + Send,
        mirror: impl FnOnce(&mut Kv) -> T,
        decode: impl FnOnce(&[Reply]) -> Option<T>,
    ) -> Result<T> {
        match self.target() {
            Target::Memory(m) if pipeline.evicting => Ok(m.keyspace.with_evicting(mirror)),
            Target::Memory(m) => m.keyspace.with(mirror),
            Target::Redis(r) => {
                let op = pipeline.op;
                let replies = boxed(r.run_pipeline(pipeline, undo)).await?;
                decode(&replies).ok_or_else(|| r.protocol_err(op, &format!("{replies:?}")))
            }
            Target::Pending(l) => Err(l.not_connected(pipeline.op)),
        }
    }

    /// Run plain commands that leave nothing behind (a read, an acknowledgement) in one round trip on Redis,
    /// their replies in order to `decode`, or `mirror` as one critical section of the embedded keyspace:
    /// [`pipeline`](Self::pipeline) for commands that need no undo when they get no answer.
    ///
    /// # Errors
    /// As [`atomic`](Self::atomic).
    pub(crate) async fn commands<T>(
        &self,
        pipeline: Pipeline,
        mirror: impl FnOnce(&mut Kv) -> T,
        decode: impl FnOnce(&[Reply]) -> Option<T>,
    ) -> Result<T> {
        match self.target() {
            Target::Memory(m) if pipeline.evicting => Ok(m.keyspace.with_evicting(mirror)),
            Target::Memory(m) => m.keyspace.with(mirror),
            Target::Redis(r) => {
                let op = pipeline.op;
                let replies = boxed(r.run_commands(pipeline)).await?;
                decode(&replies).ok_or_else(|| r.protocol_err(op, &format!("{replies:?}")))
            }
            Target::Pending(l) => Err(l.not_connected(pipeline.op)),
        }
    }

    /// Redis Cluster: the namespace and `class` group epochs and the `tags`' epochs from this handle's bounded
    /// view (see `backend/redis/cluster.rs`), for the scripts to compare entries with; `None` elsewhere, where
    /// the scripts read the epochs hash themselves.
    ///
    /// # Errors
    /// As [`atomic`](Self::atomic), when the view is older than its bound and re-reading it fails.
    pub(crate) async fn group_epochs(
        &self,
        ns: &Namespace,
        class: &str,
        tags: &[&str],
    ) -> Result<Option<ViewEpochs>> {
        match self.target() {
            Target::Memory(_) => Ok(None),
            Target::Redis(r) => r.group_epochs(ns, class, tags).await,
            Target::Pending(l) => Err(l.not_connected("epochs")),
        }
    }

    /// How old a fetch in progress (single-flight) may be for another caller to share its outcome: on Redis
    /// Cluster half the group-invalidation bound (with views at most half the bound old, the outcome then
    /// reflects every invalidation that returned more than the bound before the caller started); no limit
    /// elsewhere.
    pub(crate) fn flight_max_age(&self) -> Option<Duration> {
        match self.target() {
            Target::Redis(r) => r.epochs_bound().map(|b| b / 2),
            Target::Pending(l) => l.epochs_bound().map(|b| b / 2),
            Target::Memory(_) => None,
        }
    }

    /// Where concurrent calls are worth merging into one round trip: `Some(false)` for standalone Redis and
    /// Sentinel (one call carries them all), `Some(true)` for Redis Cluster (one call per slot); `None` when
    /// a call costs no round trip (embedded) or cannot be made (a lazy handle not connected yet).
    pub(crate) fn batching(&self) -> Option<bool> {
        match self.target() {
            Target::Redis(r) => Some(r.is_cluster()),
            Target::Memory(_) | Target::Pending(_) => None,
        }
    }

    /// Redis: the response timeout every call is bounded by; `None` for the embedded backend, whose calls
    /// do not wait.
    pub(crate) fn response_timeout(&self) -> Option<Duration> {
        match self.target() {
            Target::Redis(r) => Some(r.response_timeout()),
            Target::Memory(_) | Target::Pending(_) => None,
        }
    }

    /// The error of a call of `op` on `key` that got no answer within the response timeout (it waited in a
    /// batch queue, say).
    pub(crate) fn timeout_error(&self, op: &'static str, key: &str) -> Error {
        match self.target() {
            Target::Redis(r) => r.queued_timeout_err(op, key),
            Target::Memory(_) => Error::Timeout {
                server: "embedded".to_owned(),
                op,
                timeout: Duration::ZERO,
            },
            Target::Pending(l) => l.not_connected(op),
        }
    }

    /// The error for an error reply a script returned as a value for one part of its work (rather than
    /// failing the whole call): `reply` is the Redis error text, its first word the code (`WRONGTYPE …`),
    /// `key` the key it concerns (on Cluster, it names the node that holds it).
    ///
    /// The reply is parsed as the client parses an error reply of its own, so that its code has the same
    /// kind (`READONLY`, `LOADING`, `MASTERDOWN`… are "unavailable" as when a whole call gets them): a
    /// batched entry's error is then classified exactly as the same error of a lone call.
    pub(crate) fn reply_error(&self, op: &'static str, key: &str, reply: &str) -> Error {
        let e = server_error(reply);
        match self.target() {
            Target::Redis(r) => r.reply_err(op, key, e),
            Target::Memory(_) => Error::Redis {
                server: "embedded".to_owned(),
                op,
                source: redis::failure::failure(e),
            },
            Target::Pending(l) => l.not_connected(op),
        }
    }

    /// Whether group epochs are announced and read from a view (Redis Cluster).
    pub(crate) fn epochs_in_view(&self) -> bool {
        match self.target() {
            Target::Redis(r) => r.is_cluster(),
            Target::Pending(l) => l.is_cluster(),
            Target::Memory(_) => false,
        }
    }

    /// Record an epoch this handle just bumped (Redis Cluster: read-your-writes before its announcement).
    pub(crate) fn bumped(&self, field: &str, epoch: u64) {
        if let Target::Redis(r) = self.target() {
            r.bumped(field, epoch);
        }
    }

    /// Record that this handle's bump re-based `dropped` (a class field, or a tag's pair, deleted because its
    /// next epoch would not fit) and bumped `*` to `ns_epoch` instead (Redis Cluster: see "Exhaustion" in
    /// `cache/epochs.lua`).
    pub(crate) fn rebased(&self, dropped: &[&str], ns_epoch: u64) {
        if let Target::Redis(r) = self.target() {
            r.rebased(dropped, ns_epoch);
        }
    }

    /// The channel on which a script announces a fill or release of `key` (see `RedisBackend::wake_channel`);
    /// the scripts `SPUBLISH` to a channel ending in `}` and `PUBLISH` to any other.
    pub(crate) fn wake_channel<'a>(
        &self,
        ns: &'a Namespace,
        key: &str,
    ) -> std::borrow::Cow<'a, str> {
        match self.target() {
            Target::Redis(r) if r.is_cluster() => r.wake_channel(ns, key).into(),
            Target::Pending(l) if l.is_cluster() => {
                redis::RedisBackend::cluster_wake_channel(ns, key).into()
            }
            _ => std::borrow::Cow::Borrowed(&ns.channel),
        }
    }

    /// Register interest in wake-ups for `key`, then (on Cluster) subscribe to its sharded channel; a caller
    /// that asks the store again after this returns cannot miss the announcement.
    pub(crate) async fn watch(
        &self,
        bus: &std::sync::Arc<wake::WakeBus>,
        ns: &Namespace,
        key: &str,
    ) -> Watch {
        let listener = bus.listen(key);
        let shard = match self.target() {
            Target::Memory(_) => None,
            Target::Redis(r) => r.watch(ns, key).await,
            Target::Pending(_) => None,
        };
        Watch {
            listener,
            _shard: shard,
        }
    }

    /// Publish `message` on a typed channel: `PUBLISH` (`SPUBLISH` on Cluster) through the shared connection,
    /// bounded and admitted like every call; embedded, to the in-process subscribers. Returns how many
    /// subscribers received it (on Cluster: on the channel's shard).
    ///
    /// # Errors
    /// As [`atomic`](Self::atomic).
    pub(crate) async fn publish_channel(
        &self,
        channel: &str,
        message: bytes::Bytes,
    ) -> Result<u64> {
        match self.target() {
            Target::Memory(m) => Ok(m.channels.publish(channel, message)),
            Target::Redis(r) => r.publish_channel(channel, &message).await,
            Target::Pending(l) => Err(l.not_connected("publish")),
        }
    }

    /// Subscribe to a typed channel (on Redis, on the handle's dedicated channel connection; see
    /// [`channels`]). The `bool` says whether the subscription is live already; if not, its first delivery
    /// is a gap, and it becomes live when the connection is made.
    pub(crate) async fn subscribe_channel(&self, channel: &str) -> (channels::Subscription, bool) {
        match self.target() {
            Target::Memory(m) => (
                channels::Subscription::Local(m.channels.subscribe(channel)),
                true,
            ),
            Target::Redis(r) => {
                let (sub, live) = r.channel_hub().subscribe(channel).await;
                (channels::Subscription::Redis(sub), live)
            }
            Target::Pending(l) => {
                let (sub, live) = l.channel_hub().subscribe(channel).await;
                (channels::Subscription::Redis(sub), live)
            }
        }
    }

    /// Walk the keyspace with SCAN (never KEYS) and report each match with its TTL.
    pub(crate) async fn scan(&self, pattern: &str, batch: usize) -> Result<Vec<KeyTtl>> {
        match self.target() {
            Target::Memory(m) => Ok(m.scan(pattern)),
            Target::Redis(r) => r.scan(pattern, batch).await,
            Target::Pending(l) => Err(l.not_connected("scan")),
        }
    }
}

/// A Redis call's future behind a pointer, type-erased: the future of every keyward call nests inside the
/// application's own (a handler's), and the compiler walks the whole nesting — to lay it out and to prove it
/// `Send` — against the application crate's `recursion_limit`. Keyward's nesting below this seam (timeouts,
/// retries, redis-rs) once left applications only a few levels under the default limit; erased here, it
/// costs them nothing (one allocation per Redis round trip). keyward-axum's tests compile at three quarters
/// of the default limit to keep it so.
fn boxed<'a, T>(
    fut: impl Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(fut)
}

/// The client's error for the error reply text `reply` (`CODE detail`), as if the server had answered a call
/// with it: a known code gets its kind, any other an extension error with that code.
fn server_error(reply: &str) -> ::redis::RedisError {
    let line = reply.replace(['\r', '\n'], " ");
    match ::redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
        Ok(::redis::Value::ServerError(e)) => e.into(),
        _ => {
            let (code, detail) = reply.split_once(' ').unwrap_or((reply, ""));
            ::redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
        }
    }
}
