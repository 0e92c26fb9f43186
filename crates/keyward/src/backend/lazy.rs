//! Lazy connect ([`ConnectOptions::lazy_connect`](super::ConnectOptions::lazy_connect)): a Redis handle
//! that is usable before Redis is, because containers start in any order.
//!
//! The URL and TLS material are checked when the handle is made (no retry could fix them); the connection
//! itself is made by a background task that retries with capped exponential backoff (100 ms doubling to 5 s,
//! each attempt bounded by the connect timeout) and stops when the handle is dropped.
//!
//! **The one decision to know:** until the connection is made, every call fails *at once* with
//! [`Error::Connect`] — an unavailability error, like the one an open circuit breaker gives — so each
//! capability answers exactly as it does while Redis is down: caches run the loader (`on_error =
//! "fail_open"`), rate limits apply their `on_error`, sessions, locks and idempotency keys return the error.
//! No call waits for the connection: none can take longer than the response timeout, and before the
//! connection none takes any time at all. Once connected, the handle is the ordinary Redis backend (its
//! breaker, timeouts and reconnects); the warning about `maxmemory-policy` is logged then.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use super::channels::RedisHub;
use super::redis::RedisBackend;
use super::redis::dedicated::Dial;
use super::wake::WakeBus;
use super::{ConnectOptions, Namespace};
use crate::error::{Error, Result};

/// The first pause between two connect attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between two connect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) struct Lazy {
    /// The connected backend, set once by the connect task.
    cell: OnceLock<RedisBackend>,
    /// The server (never credentials), for messages.
    server: String,
    cluster: bool,
    connect_timeout: Duration,
    response_timeout: Duration,
    group_invalidation_bound: Duration,
    /// Why the last attempt failed, for the error every call gets meanwhile.
    last_error: Mutex<Option<String>>,
    /// Typed-channel subscriptions made before (and after) the connection: one hub whose dedicated
    /// connection is dialled through the connected backend once there is one.
    hub: OnceLock<Arc<RedisHub>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Lazy {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

impl Lazy {
    /// Check `url` and `options`, and start the connect task.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], or [`Error::InvalidArgument`] for TLS material that cannot be read or parsed;
    /// [`Error::InvalidArgument`] when called outside a Tokio runtime (the task needs one).
    pub(crate) fn start(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: Arc<WakeBus>,
        on_connect: impl FnOnce(&RedisBackend) + Send + 'static,
    ) -> Result<Arc<Self>> {
        let server = RedisBackend::check_url(url, options)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| Error::InvalidArgument {
                what: "ConnectOptions::lazy_connect needs a Tokio runtime: connect from inside one"
                    .to_owned(),
            })?;
        let lazy = Arc::new(Lazy {
            cell: OnceLock::new(),
            server,
            cluster: super::redis::cluster::is_cluster_url(url),
            connect_timeout: options.connect_timeout,
            response_timeout: options.response_timeout,
            group_invalidation_bound: options.group_invalidation_bound,
            last_error: Mutex::new(None),
            hub: OnceLock::new(),
            task: Mutex::new(None),
        });
        let task = runtime.spawn(connect(
            Arc::downgrade(&lazy),
            url.to_owned(),
            options.clone(),
            ns.clone(),
            bus,
            on_connect,
        ));
        *lazy.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(lazy)
    }

    /// The connected backend, once there is one.
    pub(crate) fn get(&self) -> Option<&RedisBackend> {
        self.cell.get()
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// On Cluster, the group-invalidation bound the connected backend will have.
    pub(crate) fn epochs_bound(&self) -> Option<Duration> {
        self.cluster.then_some(self.group_invalidation_bound)
    }

    /// The error of a call made before the connection: unavailability, so each capability's failure mode
    /// applies.
    pub(crate) fn not_connected(&self, op: &'static str) -> Error {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Error::Connect {
            server: self.server.clone(),
            reason: match last {
                Some(e) => format!(
                    "not connected yet (connecting in the background; `{op}` was not sent); last attempt: {e}"
                ),
                None => {
                    format!("not connected yet (connecting in the background; `{op}` was not sent)")
                }
            },
        }
    }

    /// The hub of this handle's typed-channel subscriptions.
    pub(crate) fn channel_hub(self: &Arc<Self>) -> Arc<RedisHub> {
        Arc::clone(self.hub.get_or_init(|| {
            RedisHub::start(Arc::new(Dial::Lazy {
                lazy: Arc::downgrade(self),
                connect_timeout: self.connect_timeout,
                response_timeout: self.response_timeout,
            }))
        }))
    }
}

/// Connect until it works or the handle is gone; never holds the handle between attempts.
async fn connect(
    lazy: Weak<Lazy>,
    url: String,
    options: ConnectOptions,
    ns: Namespace,
    bus: Arc<WakeBus>,
    on_connect: impl FnOnce(&RedisBackend) + Send + 'static,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut attempts: u32 = 0;
    loop {
        let result = RedisBackend::connect(&url, &options, &ns, Arc::clone(&bus)).await;
        let Some(handle) = lazy.upgrade() else { return };
        match result {
            Ok(backend) => {
                if let Some(hub) = handle.hub.get() {
                    backend.adopt_channel_hub(Arc::clone(hub));
                }
                on_connect(&backend);
                tracing::info!(server = %backend.server(), attempts = attempts + 1, "keyward connected to Redis (lazy connect)");
                let _ = handle.cell.set(backend);
                // Waiters (a cache reader waiting for a fill) look again, now against Redis.
                bus.wake_all();
                return;
            }
            Err(e) => {
                attempts += 1;
                let message = e.to_string();
                if attempts == 1 || attempts.is_power_of_two() {
                    tracing::warn!(server = %handle.server, attempts, error = %message, retry_in = ?backoff, "keyward: cannot connect to Redis yet; calls answer per their failure mode until it can");
                } else {
                    tracing::debug!(server = %handle.server, attempts, error = %message, "keyward: cannot connect to Redis yet");
                }
                *handle.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
            }
        }
        drop(handle);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
