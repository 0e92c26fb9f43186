//! The process-wide handle: one per policy, cheap to clone, holding one multiplexed connection.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::memory::MemoryBackend;
use crate::backend::redis::{RedisBackend, redact};
use crate::backend::{Backend, BackendKind, KeyTtl, MemoryOptions, Namespace};
use crate::cache::{Cache, ClassInfo};
use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::key::{KeySpace, internal_key, namespace_pattern};
use crate::policy::{ClassKind, Policy};
use crate::rate_limit::RateShared;
use crate::wake::WakeBus;

/// Connection settings. Credentials come only from the URL and are never logged.
///
/// ```
/// use std::time::Duration;
/// let options = keyward::ConnectOptions::default()
///     .connect_timeout(Duration::from_secs(2))
///     .response_timeout(Duration::from_millis(250));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) reconnect_retries: usize,
    pub(crate) memory: MemoryOptions,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) danger_accept_invalid_certs: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(1),
            reconnect_retries: 6,
            memory: MemoryOptions::default(),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
            danger_accept_invalid_certs: false,
        }
    }
}

impl ConnectOptions {
    /// How long to wait for a connection (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// How long to wait for any one command's answer (default 1 s).
    #[must_use]
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }
    /// Reconnection attempts, with exponential backoff, after the connection drops (default 6).
    #[must_use]
    pub fn reconnect_retries(mut self, n: usize) -> Self {
        self.reconnect_retries = n;
        self
    }
    /// The circuit breaker in front of Redis, shared by every capability of the handle: it opens after
    /// `failures` consecutive calls that found Redis unavailable (timed out, refused, dropped; default 3),
    /// fails every call at once with [`Error::CircuitOpen`] for `cooldown` (default 1 s) — caches then fail
    /// open, rate limits apply their `on_error` — and then lets one probe through, closing if it succeeds.
    #[must_use]
    pub fn breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures.max(1);
        self.breaker_cooldown = cooldown;
        self
    }
    /// **Turns off TLS certificate and hostname verification** for `rediss://` URLs. Anyone on the network
    /// path can then impersonate the server. For test set-ups with self-signed certificates only; it is
    /// logged at `warn` once and shown in `Debug`. A URL's `#insecure` fragment alone is refused: it must be
    /// this explicit call.
    #[must_use]
    pub fn danger_accept_invalid_certs(mut self) -> Self {
        self.danger_accept_invalid_certs = true;
        self
    }

    /// Settings for the embedded backend, used for `mem://` or when no `REDIS_URL` is set.
    #[must_use]
    pub fn memory(mut self, m: MemoryOptions) -> Self {
        self.memory = m;
        self
    }
}

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
    pub(crate) flights: Arc<Flights>,
    pub(crate) bus: Arc<WakeBus>,
    pub(crate) rates: RateShared,
    /// Per-process wait queues of lock names.
    pub(crate) lock_queues: crate::lock::Queues,
    server: Option<String>,
    insecure_tls: bool,
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
        // Epochs must outlive every value that may carry an older one; a margin covers clock drift.
        gens_lifetime: policy.max_entry_lifetime() + Duration::from_secs(60),
    }
}

impl Keyward {
    /// Connect to `url` with default options. Schemes: `redis://`, `rediss://` (TLS), `unix://` or
    /// `redis+unix://` (unix socket), and `mem://` (the embedded backend).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL that cannot be used, [`Error::Connect`] (naming the server) when the server
    /// refuses, does not answer within the connect timeout, or is older than Redis 7.0.
    pub async fn connect(url: &str, policy: Policy) -> Result<Self> {
        Self::connect_with(url, policy, ConnectOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
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
        let redis = RedisBackend::connect(url, &options, &ns, Arc::clone(&bus)).await?;
        let server = redis.server().to_owned();
        tracing::info!(server = %server, namespace = %format!("{}:{}", policy.env(), policy.app()), "keyward connected to Redis");
        Ok(Self::assemble(
            policy,
            ns,
            bus,
            Backend::Redis(redis),
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
    pub fn embedded(policy: Policy) -> Self {
        Self::embedded_with(policy, MemoryOptions::default())
    }

    /// The embedded backend with explicit options.
    pub fn embedded_with(policy: Policy, options: MemoryOptions) -> Self {
        let ns = namespace(&policy);
        let bus = Arc::new(WakeBus::default());
        let classes: Vec<&str> = policy.classes().map(|c| c.name()).collect();
        let backend = Backend::Memory(Box::new(MemoryBackend::new(
            &options,
            &classes,
            Arc::clone(&bus),
        )));
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
                flights: Arc::new(Flights::default()),
                bus,
                rates: RateShared::new(),
                lock_queues: crate::lock::Queues::default(),
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

    /// A typed cache for a `cache` class of the policy, storing JSON.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`], or [`Error::PersonalData`] for a `personal = true` class
    /// that does not also set `allow_shared = true`.
    pub fn cache<V>(&self, class: &str) -> Result<Cache<V>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.cache_with_codec::<V, Json>(class)
    }

    /// A typed cache with another codec, e.g. `MsgPack` (feature `msgpack`).
    ///
    /// # Errors
    /// As [`cache`](Self::cache).
    pub fn cache_with_codec<V, C>(&self, class: &str) -> Result<Cache<V, C>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let (declared, keys) = self.declared(class)?;
        let cache_class = match declared.kind() {
            ClassKind::Cache(c) => c.clone(),
            other => {
                return Err(Error::WrongKind {
                    class: class.to_owned(),
                    expected: "cache",
                    found: other.name(),
                });
            }
        };
        if cache_class.is_personal() && !cache_class.is_shared_allowed() {
            return Err(Error::PersonalData {
                class: class.to_owned(),
            });
        }
        Ok(Cache {
            kw: self.clone(),
            class: Arc::new(ClassInfo::new(class, cache_class, keys)),
            _types: PhantomData,
        })
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

    /// Check that the store answers, for health checks: `PING` on Redis, bounded by the response timeout.
    /// It is not counted in any cache or rate-limit metric and is not refused by an open circuit breaker
    /// (a health check must see the server, not the breaker's memory of it); a success closes the breaker.
    /// Always `Ok` on the embedded backend.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`] when Redis does not answer.
    pub async fn ping(&self) -> Result<()> {
        self.inner.backend.ping().await
    }

    /// Invalidate every cache entry of the namespace in O(1): bumps the namespace epoch, so entries filled
    /// before it read as misses and fills leased before it never become visible. No SCAN, no FLUSH.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn invalidate_namespace(&self) -> Result<()> {
        self.inner.backend.bump(&self.inner.ns, "*").await?;
        self.inner.flights.detach_all();
        Ok(())
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
