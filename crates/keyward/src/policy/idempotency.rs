//! The `idempotency` class kind: how long a completed response is replayed and how long a request may run.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::fields::{Dur, Int};
use super::{ClassSpec, FieldError, MAX_TTL, fmt_duration};

/// Default replay window: 24 hours.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default in-progress lease: 60 seconds.
const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Default largest stored response: 1 MiB.
const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Largest allowed `max_response_bytes`: 64 MiB.
const MAX_RESPONSE_BYTES_LIMIT: usize = 64 * 1024 * 1024;

/// An idempotency-key class: a key's first request runs, and its response is replayed for `ttl`.
///
/// ```
/// use std::time::Duration;
/// use keyward::policy::{IdempotencyClass, Policy};
///
/// let policy = Policy::builder("prod", "payments")
///     .idempotency("charge", IdempotencyClass::new().lease(Duration::from_secs(30)))
///     .build()?;
/// let class = policy.class("charge").unwrap().as_idempotency().unwrap();
/// assert_eq!(class.ttl_value(), Duration::from_secs(24 * 3600));
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotencyClass {
    ttl: Duration,
    lease: Duration,
    max_response_bytes: usize,
    version: u32,
}

impl Default for IdempotencyClass {
    fn default() -> Self {
        Self::new()
    }
}

impl IdempotencyClass {
    /// Responses kept 24 h, a 60 s in-progress lease, responses up to 1 MiB, version 1.
    pub fn new() -> Self {
        IdempotencyClass {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            version: 1,
        }
    }

    /// How long a completed response is kept and replayed (default 24 h).
    #[must_use]
    pub fn ttl(mut self, d: Duration) -> Self {
        self.ttl = d;
        self
    }

    /// How long an in-progress marker holds the key (default 60 s). If the handler dies, the marker expires
    /// and a retry runs; a handler that outlives it may run concurrently with a retry, so set it above the
    /// longest request.
    #[must_use]
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// Largest stored response, headers and body together (default 1 MiB).
    #[must_use]
    pub fn max_response_bytes(mut self, n: usize) -> Self {
        self.max_response_bytes = n;
        self
    }

    /// The version, part of every key (default 1).
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// How long a completed response is replayed.
    pub fn ttl_value(&self) -> Duration {
        self.ttl
    }

    /// The in-progress lease.
    pub fn lease_value(&self) -> Duration {
        self.lease
    }

    /// Largest stored response.
    pub fn max_response_bytes_value(&self) -> usize {
        self.max_response_bytes
    }

    /// The version that is part of every key of this class.
    pub fn version_value(&self) -> u32 {
        self.version
    }
}

impl ClassSpec for IdempotencyClass {
    type Raw = RawIdempotency;
    const EVICTABLE: bool = false;

    fn from_raw(raw: RawIdempotency) -> Result<Self, FieldError> {
        let mut class = IdempotencyClass::new();
        if let Some(Dur(d)) = raw.ttl {
            class.ttl = d;
        }
        if let Some(Dur(d)) = raw.lease {
            class.lease = d;
        }
        if let Some(n) = raw.max_response_bytes {
            class.max_response_bytes = n.to("max_response_bytes", "a positive integer")?;
        }
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.ttl < Duration::from_secs(1) || self.ttl > MAX_TTL {
            return Err((
                "ttl",
                format!(
                    "must be between 1s and 365 days, got {}",
                    fmt_duration(self.ttl)
                ),
            ));
        }
        if self.lease < Duration::from_millis(10) || self.lease > self.ttl {
            return Err((
                "lease",
                format!(
                    "must be between 10ms and ttl ({}), got {}",
                    fmt_duration(self.ttl),
                    fmt_duration(self.lease)
                ),
            ));
        }
        if !(1..=MAX_RESPONSE_BYTES_LIMIT).contains(&self.max_response_bytes) {
            return Err((
                "max_response_bytes",
                format!(
                    "must be between 1 and {MAX_RESPONSE_BYTES_LIMIT}, got {}",
                    self.max_response_bytes
                ),
            ));
        }
        if self.version < 1 {
            return Err(("version", "must be at least 1".into()));
        }
        Ok(())
    }

    fn key_version(&self) -> u32 {
        self.version
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  ttl:             {}", fmt_duration(self.ttl))?;
        writeln!(f, "  lease:           {}", fmt_duration(self.lease))?;
        writeln!(f, "  max_response_bytes: {}", self.max_response_bytes)?;
        writeln!(f, "  version:         {}", self.version)
    }
}

/// The TOML form of an idempotency class (`kind` is read before this). Every field has a default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdempotency {
    ttl: Option<Dur>,
    lease: Option<Dur>,
    max_response_bytes: Option<Int>,
    version: Option<Int>,
}
