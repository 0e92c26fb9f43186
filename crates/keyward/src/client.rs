//! The process-wide handle: one per policy, cheap to clone, holding one multiplexed connection.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::wake::WakeBus;
use crate::backend::{
    Backend, BackendKind, ConnectOptions, KeyTtl, MemoryOptions, Namespace, redact,
};
use crate::error::{Error, Result};
use crate::key::{KeySpace, internal_key, namespace_pattern};
use crate::policy::Policy;

/// The handle to keyward for one policy namespace. Create one per process and clone it freely.
///
/// ```
/// # async fn demo() -> keyward::Result<()> {
/// use std::time::Duration;
/// use keyward::{Keyward, policy::{CacheClass, Policy}};
/// let policy = Policy::builder("dev", "shop")
///     .cache("product", CacheClass::new(Duration::from_secs(600), "catalog service, after each product write"))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// assert_eq!(kw.backend(), keyward::BackendKind::Embedded);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Keyward {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) policy: Policy,
    pub(crate) backend: Backend,
    pub(crate) ns: Namespace,
    pub(crate) bus: Arc<WakeBus>,
    /// Per-handle state of the capabilities (the cache's single-flight table, the rate limiter's block cache
    /// and fallback, the locks' wait queues), one value per type, created on first use. Type-erased so that
    /// this module depends on no capability: the capabilities depend on it (no import cycle).
    shared: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    server: Option<String>,
    insecure_tls: bool,
}

/// Warns when the server's `maxmemory-policy` could evict a class the policy says is never evicted (sessions,
/// locks, idempotency keys, rate-limit state). Every key keyward writes has a TTL, so a `volatile-*` policy
/// can evict them as readily as an `allkeys-*` one: only `noeviction` keeps them. Returns the message.
pub(crate) fn warn_if_evicting(
    policy: &Policy,
    maxmemory_policy: Option<&str>,
    server: &str,
) -> Option<String> {
    let evicting = maxmemory_policy.filter(|p| *p != "noeviction")?;
    let never: Vec<&str> = policy
        .classes()
        .filter(|c| !c.kind().evictable())
        .map(|c| c.name())
        .collect();
    if never.is_empty() {
        return None;
    }
    let message = format!(
        "Redis at {server} has maxmemory-policy {evicting}: under memory pressure it may evict keys of \
         classes that must never be evicted ({}); a lost lock, session or in-progress marker breaks its \
         guarantee. Use maxmemory-policy noeviction, or a separate Redis for the cache (docs/operations.md)",
        never.join(", ")
    );
    tracing::warn!(server, maxmemory_policy = evicting, classes = %never.join(", "), "keyward: {message}");
    Some(message)
}

/// `REDIS_URL`, trimmed, if set and not empty.
fn redis_url_from_env() -> Option<String> {
    std::env::var("REDIS_URL")
        .ok()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
}

fn namespace(policy: &Policy) -> Namespace {
    Namespace {
        gens_key: internal_key(policy, "gens"),
        channel: internal_key(policy, "fills"),
        backplane: internal_key(policy, "l1"),
        // Epochs must outlive every value that may carry an older one; a margin covers clock drift.
        gens_lifetime: policy.max_entry_lifetime() + Duration::from_secs(60),
    }
}

impl Keyward {
    /// Connect to `url` with default options. Schemes: `redis://`, `rediss://` (TLS), `unix://` or
    /// `redis+unix://` (unix socket), `redis[s]+sentinel://[user:pass@]host:port[,host:port…]/master-name` (the
    /// master the sentinels name, followed across failovers; the credentials are the data nodes', the
    /// sentinels' go in `?sentinel_username=…&sentinel_password=…`),
    /// `redis+cluster://[user:pass@]host:port[,host:port…]` and `rediss+cluster://` (Redis Cluster: the
    /// addresses are seed nodes; see [`ConnectOptions::group_invalidation_bound`] for what changes), and
    /// `mem://` (the embedded backend). `docs/operations.md` says what each capability guarantees on each.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL that cannot be used, [`Error::Connect`] (naming the server, or the
    /// sentinels) when the server refuses, does not answer within the connect timeout, or is older than Redis
    /// 7.0, when no sentinel names a master that answers `ROLE` with `master`, or when no cluster seed answers.
    pub async fn connect(url: &str, policy: Policy) -> Result<Self> {
        Self::connect_with(url, policy, ConnectOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    ///
    /// With [`ConnectOptions::lazy_connect`] it returns at once and connects in the background.
    ///
    /// # Errors
    /// As [`connect`](Self::connect); with [`ConnectOptions::lazy_connect`] only [`Error::InvalidUrl`] and
    /// [`Error::InvalidArgument`] (TLS material that cannot be used, or no Tokio runtime).
    pub async fn connect_with(url: &str, policy: Policy, options: ConnectOptions) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("mem://") {
            if !rest.is_empty() && rest != "/" {
                return Err(Error::InvalidUrl {
                    reason: format!("`mem://` takes no host or path, got `{}`", redact(url)),
                });
            }
            return Ok(Self::embedded_with(policy, options.memory));
        }
        let ns = namespace(&policy);
        let bus = Arc::new(WakeBus::default());
        if options.lazy_connect {
            let checked = policy.clone();
            let (backend, server) =
                Backend::connect_lazy(url, &options, &ns, Arc::clone(&bus), move |r| {
                    warn_if_evicting(&checked, r.maxmemory_policy(), r.server());
                })?;
            tracing::info!(server = %server, namespace = %format!("{}:{}", policy.env(), policy.app()), "keyward connecting to Redis in the background (lazy connect)");
            return Ok(Self::assemble(
                policy,
                ns,
                bus,
                backend,
                Some(server),
                &options,
            ));
        }
        let (backend, server) = Backend::connect(url, &options, &ns, Arc::clone(&bus)).await?;
        tracing::info!(server = %server, namespace = %format!("{}:{}", policy.env(), policy.app()), "keyward connected to Redis");
        warn_if_evicting(&policy, backend.maxmemory_policy(), &server);
        Ok(Self::assemble(
            policy,
            ns,
            bus,
            backend,
            Some(server),
            &options,
        ))
    }

    /// Connect to `REDIS_URL`; without it (unset or empty), use the embedded backend and log at `warn` that
    /// state is then per process. Use [`from_env_required`](Self::from_env_required) in deployments where
    /// that would be wrong.
    ///
    /// # Errors
    /// As [`connect`](Self::connect) when `REDIS_URL` is set.
    pub async fn from_env(policy: Policy) -> Result<Self> {
        Self::from_env_with(policy, ConnectOptions::default()).await
    }

    /// [`from_env`](Self::from_env) with explicit options (they apply to the embedded backend too).
    ///
    /// # Errors
    /// As [`connect`](Self::connect) when `REDIS_URL` is set.
    pub async fn from_env_with(policy: Policy, options: ConnectOptions) -> Result<Self> {
        match redis_url_from_env() {
            Some(url) => Self::connect_with(&url, policy, options).await,
            None => {
                tracing::warn!(
                    "REDIS_URL is not set: keyward uses the embedded in-process backend. State is per process: \
                     each replica of this service gets its own rate limits, sessions, locks and idempotency \
                     keys, and caches are not shared. Set REDIS_URL, or use Keyward::from_env_required to \
                     refuse to start without it."
                );
                Ok(Self::embedded_with(policy, options.memory))
            }
        }
    }

    /// Connect to `REDIS_URL`, and refuse to start without it: for services that run more than one replica,
    /// where per-process state would silently multiply every rate limit.
    ///
    /// # Errors
    /// [`Error::MissingRedisUrl`] when `REDIS_URL` is unset or empty; otherwise as [`connect`](Self::connect).
    pub async fn from_env_required(policy: Policy, options: ConnectOptions) -> Result<Self> {
        match redis_url_from_env() {
            Some(url) => Self::connect_with(&url, policy, options).await,
            None => Err(Error::MissingRedisUrl),
        }
    }

    /// The embedded in-process backend with default options: same semantics as Redis, one process only.
    ///
    /// # Testing with paused time
    /// The embedded backend's clock is Tokio's: a handle made inside a runtime whose time is paused
    /// (`#[tokio::test(start_paused = true)]`, Tokio's `test-util` feature) sees TTLs, idle timeouts,
    /// leases and rate-limit windows pass with `tokio::time::advance`, with no real waiting. Make the handle
    /// inside that runtime (its clock starts when it is made):
    ///
    /// ```
    /// # fn main() -> keyward::Result<()> {
    /// use std::time::Duration;
    /// use keyward::{Keyward, policy::{CacheClass, Jitter, Policy}};
    ///
    /// // What `#[tokio::test(start_paused = true)] async fn …` sets up:
    /// let runtime = tokio::runtime::Builder::new_current_thread()
    ///     .enable_time()
    ///     .start_paused(true)
    ///     .build()
    ///     .expect("a runtime");
    /// runtime.block_on(async {
    ///     let policy = Policy::builder("test", "shop")
    ///         .cache(
    ///             "product",
    ///             CacheClass::new(Duration::from_secs(600), "tests").jitter(Jitter::Percent(0.0)),
    ///         )
    ///         .build()?;
    ///     let kw = Keyward::embedded(policy);
    ///     let products = kw.cache::<String>("product")?;
    ///     products.set(&1, &"apple".to_owned()).await?;
    ///     tokio::time::advance(Duration::from_secs(599)).await;
    ///     assert_eq!(products.get(&1).await?.as_deref(), Some("apple"));
    ///     tokio::time::advance(Duration::from_secs(2)).await; // 10 minutes passed, at once
    ///     assert_eq!(products.get(&1).await?, None);
    ///     Ok(())
    /// })
    /// # }
    /// ```
    ///
    /// Redis keeps its own clock: on Redis, tests wait for real time (keep their TTLs short).
    pub fn embedded(policy: Policy) -> Self {
        Self::embedded_with(policy, MemoryOptions::default())
    }

    /// The embedded backend with explicit options.
    pub fn embedded_with(policy: Policy, options: MemoryOptions) -> Self {
        let ns = namespace(&policy);
        let bus = Arc::new(WakeBus::default());
        let classes: Vec<(&str, bool)> = policy
            .classes()
            .map(|c| (c.name(), c.kind().evictable()))
            .collect();
        let backend = Backend::embedded(&options, &classes);
        Self::assemble(policy, ns, bus, backend, None, &ConnectOptions::default())
    }

    fn assemble(
        policy: Policy,
        ns: Namespace,
        bus: Arc<WakeBus>,
        backend: Backend,
        server: Option<String>,
        options: &ConnectOptions,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                policy,
                backend,
                ns,
                bus,
                shared: Mutex::new(HashMap::new()),
                server,
                insecure_tls: options.danger_accept_invalid_certs,
            }),
        }
    }

    /// The policy this handle enforces.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Which backend this handle uses.
    pub fn backend(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    /// The declared class and its key space, or [`Error::UnknownClass`].
    pub(crate) fn declared(&self, class: &str) -> Result<(&crate::policy::Class, KeySpace)> {
        let unknown = || Error::UnknownClass {
            class: class.to_owned(),
        };
        let declared = self.inner.policy.class(class).ok_or_else(unknown)?;
        let keys = KeySpace::new(&self.inner.policy, class).ok_or_else(unknown)?;
        Ok((declared, keys))
    }

    /// Check that the store answers, for health checks: `PING` on Redis, bounded by the response timeout and
    /// not counted in any cache or rate-limit metric. It goes through the circuit breaker like every call:
    /// while the breaker is open it fails at once with [`Error::CircuitOpen`] (the store is considered down),
    /// and after the cooldown it is the probe that closes the breaker. Always `Ok` on the embedded backend.
    /// On Redis Cluster every node is asked, so it fails while any node does not answer (for instance during
    /// a primary's failover window), although calls to the other primaries go on working: use it as "the
    /// whole cluster answers", not as a liveness probe that should restart the service.
    ///
    /// # Errors
    /// [`Error::Timeout`], [`Error::CircuitOpen`] or [`Error::Redis`] when Redis is not answering.
    pub async fn ping(&self) -> Result<()> {
        self.inner.backend.ping().await
    }

    /// This handle's one value of the capability state `T`, created on first use. Capabilities take it once,
    /// when their handle (a `Cache`, a `RateLimiter`, `Locks`) is made, never per call.
    pub(crate) fn shared<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut map = self.inner.shared.lock().unwrap_or_else(|p| p.into_inner());
        let any = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()))
            .clone();
        // The entry for `TypeId::of::<T>()` only ever holds a `T`.
        any.downcast::<T>()
            .unwrap_or_else(|_| Arc::new(T::default()))
    }

    /// Every key this namespace holds, with its TTL, found by walking with `SCAN` (never `KEYS`).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn scan_namespace(&self) -> Result<Vec<KeyTtl>> {
        self.inner
            .backend
            .scan(&namespace_pattern(&self.inner.policy), 500)
            .await
    }
}

impl fmt::Debug for Keyward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Keyward");
        d.field("backend", &self.backend());
        if let Some(server) = &self.inner.server {
            d.field("server", server);
        }
        d.field(
            "namespace",
            &format_args!("{}:{}", self.inner.policy.env(), self.inner.policy.app()),
        );
        d.field("breaker", &self.inner.backend.breaker_state());
        if self.inner.insecure_tls {
            d.field("tls_verification", &"OFF (danger_accept_invalid_certs)");
        }
        d.finish()
    }
}
