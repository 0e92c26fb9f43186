//! The `lock` class kind: lease length, how long `lock` waits, the watchdog, and how long fencing state lives.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::fields::{Dur, Flag, Int, required};
use super::{ClassSpec, FieldError, MAX_TTL, fmt_duration};

/// Default lifetime of the fencing counter and fenced values: 7 days.
const DEFAULT_FENCE_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// A lock class: named mutual-exclusion leases with fencing tokens.
///
/// ```
/// use std::time::Duration;
/// use keyward::policy::{LockClass, Policy};
///
/// let policy = Policy::builder("prod", "billing")
///     .lock("invoice_run", LockClass::new(Duration::from_secs(30)).watchdog(true))
///     .build()?;
/// assert_eq!(policy.class("invoice_run").unwrap().kind().name(), "lock");
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LockClass {
    ttl: Duration,
    wait: Option<Duration>,
    watchdog: bool,
    fence_ttl: Duration,
    version: u32,
}

impl LockClass {
    /// A class whose leases last `ttl` unless extended; `wait` = `ttl`, no watchdog, fencing state kept 7 days.
    pub fn new(ttl: Duration) -> Self {
        LockClass {
            ttl,
            wait: None,
            watchdog: false,
            fence_ttl: DEFAULT_FENCE_TTL,
            version: 1,
        }
    }

    /// How long [`Locks::lock`](crate::lock::Locks::lock) waits for a held lock (default: the lease `ttl`).
    #[must_use]
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = Some(d);
        self
    }

    /// Renew the lease in the background while the guard lives (default off).
    #[must_use]
    pub fn watchdog(mut self, yes: bool) -> Self {
        self.watchdog = yes;
        self
    }

    /// How long the fencing counter and fenced values outlive their last use (default 7 days). Fencing
    /// tokens stay monotonic even past it (they never fall below the server's clock in µs).
    #[must_use]
    pub fn fence_ttl(mut self, d: Duration) -> Self {
        self.fence_ttl = d;
        self
    }

    /// The version, part of every key (default 1).
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// The lease length.
    pub fn ttl_value(&self) -> Duration {
        self.ttl
    }

    /// How long `lock` waits.
    pub fn wait_value(&self) -> Duration {
        self.wait.unwrap_or(self.ttl)
    }

    /// Whether guards renew their lease in the background.
    pub fn is_watchdog(&self) -> bool {
        self.watchdog
    }

    /// Lifetime of the fencing counter and fenced values after their last use.
    pub fn fence_ttl_value(&self) -> Duration {
        self.fence_ttl
    }

    /// The version that is part of every key of this class.
    pub fn version_value(&self) -> u32 {
        self.version
    }
}

impl ClassSpec for LockClass {
    type Raw = RawLock;
    const EVICTABLE: bool = false;

    fn from_raw(raw: RawLock) -> Result<Self, FieldError> {
        let mut class = LockClass::new(required("ttl", raw.ttl)?.0);
        class.wait = raw.wait.map(|d| d.0);
        if let Some(Flag(b)) = raw.watchdog {
            class.watchdog = b;
        }
        if let Some(Dur(d)) = raw.fence_ttl {
            class.fence_ttl = d;
        }
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.ttl < Duration::from_millis(10) || self.ttl > Duration::from_secs(24 * 3600) {
            return Err((
                "ttl",
                format!(
                    "must be between 10ms and 24h, got {}",
                    fmt_duration(self.ttl)
                ),
            ));
        }
        if let Some(w) = self.wait
            && w > MAX_TTL
        {
            return Err((
                "wait",
                format!("must be at most 365 days, got {}", fmt_duration(w)),
            ));
        }
        if self.fence_ttl < self.ttl || self.fence_ttl > MAX_TTL {
            return Err((
                "fence_ttl",
                format!(
                    "must be at least ttl ({}) and at most 365 days, got {}",
                    fmt_duration(self.ttl),
                    fmt_duration(self.fence_ttl)
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
        writeln!(f, "  wait:            {}", fmt_duration(self.wait_value()))?;
        writeln!(f, "  watchdog:        {}", self.watchdog)?;
        writeln!(f, "  fence_ttl:       {}", fmt_duration(self.fence_ttl))?;
        writeln!(f, "  version:         {}", self.version)
    }
}

/// The TOML form of a lock class (`kind` is read before this). Required: `ttl`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLock {
    ttl: Option<Dur>,
    wait: Option<Dur>,
    watchdog: Option<Flag>,
    fence_ttl: Option<Dur>,
    version: Option<Int>,
}
