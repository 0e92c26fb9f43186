//! Connection settings: timeouts, reconnection, the circuit breaker, TLS verification, and the embedded
//! backend's budgets.

use std::time::Duration;

use super::MemoryOptions;
#[cfg(doc)]
use crate::error::Error;

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
