//! The `rate_limit` class kind: an algorithm and its numbers, and what to do when Redis fails.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::fields::{Dur, Flag, Int, Text, required};
use super::{ClassSpec, FieldError, fmt_duration};

/// Largest `limit` (and `burst`) a class may declare.
pub(crate) const MAX_LIMIT: u64 = 1_000_000_000;
/// Largest `limit` of a `sliding_log` class: it stores one sorted-set member per request in the window.
pub(crate) const MAX_LOG_LIMIT: u64 = 100_000;
/// Longest window: 400 days (a yearly quota plus slack), in microseconds well below 2^53.
const MAX_WINDOW: Duration = Duration::from_secs(400 * 24 * 60 * 60);
/// Longest time a token bucket or GCRA identity may take to refill from empty: 10 years.
const MAX_REFILL: Duration = Duration::from_secs(10 * 366 * 24 * 60 * 60);

/// How a rate-limit class counts. Every algorithm is one Lua script on Redis and one critical section in the
/// embedded backend, on the server's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// A counter per fixed window (aligned to the Unix epoch). Cheapest, but a burst straddling a window
    /// edge can reach 2 × `limit` within one window's length.
    FixedWindow,
    /// Exact sliding window: one sorted-set member per request (memory grows with `limit`).
    SlidingLog,
    /// Two fixed windows, the previous one weighted by how much of it still overlaps the sliding window.
    /// O(1) memory; exact when the previous window's traffic was evenly spread, and never more than
    /// 2 × `limit` in any window's length otherwise.
    SlidingCounter,
    /// A bucket of `burst` tokens refilled at `limit` per `window`, one whole token at a time. O(1) memory.
    /// In any interval of length `d` at most `burst + d × limit / window` are allowed.
    TokenBucket,
    /// Generic cell rate algorithm: one timestamp per identity; `limit` per `window`, up to `burst` at once.
    /// O(1) memory and no window edges: in any interval of length `d` at most `burst + d × limit / window`
    /// are allowed. With the default `burst = limit` that is up to 2 × `limit` within one window's length
    /// after an idle period; `burst = 1` paces strictly (never more than `limit` in any window).
    Gcra,
}

impl Algorithm {
    /// Every algorithm, in documentation order.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingLog,
        Algorithm::SlidingCounter,
        Algorithm::TokenBucket,
        Algorithm::Gcra,
    ];

    /// The name as written in TOML (`"gcra"`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::SlidingCounter => "sliding_counter",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::Gcra => "gcra",
        }
    }

    /// Parses a TOML name.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether `burst` applies (token bucket and GCRA).
    pub fn has_burst(self) -> bool {
        matches!(self, Algorithm::TokenBucket | Algorithm::Gcra)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a check does when the store cannot be reached (or the circuit breaker is open).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnError {
    /// Let the request through (availability first).
    Allow,
    /// Refuse the request (protection first: login attempts, costly endpoints).
    Deny,
    /// Fall back to an in-process limiter with the same algorithm and numbers: each process enforces the
    /// limit on its own share of the traffic until the store is back. The default.
    #[default]
    Local,
}

impl OnError {
    /// The name as written in TOML.
    pub fn name(self) -> &'static str {
        match self {
            OnError::Allow => "allow",
            OnError::Deny => "deny",
            OnError::Local => "local",
        }
    }

    fn from_name(name: &str) -> Option<OnError> {
        [OnError::Allow, OnError::Deny, OnError::Local]
            .into_iter()
            .find(|o| o.name() == name)
    }
}

impl fmt::Display for OnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rate limit: `limit` requests (or cost units) per `window`, counted by `algorithm`.
///
/// ```
/// use std::time::Duration;
/// use keyward::policy::{Algorithm, OnError, Policy, RateLimitClass};
///
/// let policy = Policy::builder("prod", "api")
///     .rate_limit(
///         "per_tenant",
///         RateLimitClass::new(Algorithm::Gcra, 100, Duration::from_secs(60))
///             .burst(20)
///             .on_error(OnError::Deny),
///     )
///     .build()?;
/// assert_eq!(policy.class("per_tenant").unwrap().kind().name(), "rate_limit");
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitClass {
    algorithm: Algorithm,
    limit: u64,
    window: Duration,
    burst: Option<u64>,
    version: u32,
    on_error: OnError,
    block_cache: bool,
    shadow: bool,
}

impl RateLimitClass {
    /// A class allowing `limit` per `window` with `algorithm`; burst = `limit`, version 1, `on_error =
    /// local`, no block cache, enforcing (not shadow).
    pub fn new(algorithm: Algorithm, limit: u64, window: Duration) -> Self {
        RateLimitClass {
            algorithm,
            limit,
            window,
            burst: None,
            version: 1,
            on_error: OnError::default(),
            block_cache: false,
            shadow: false,
        }
    }

    /// How many requests may arrive at once (token bucket capacity, GCRA burst); default `limit`.
    /// Only for `token_bucket` and `gcra`.
    #[must_use]
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The version, part of every key (default 1); bumping it starts every identity afresh.
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// What to do when the store fails (default [`OnError::Local`]).
    #[must_use]
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// Remember refused identities in process until their `retry_after`, refusing them without a store call.
    #[must_use]
    pub fn block_cache(mut self, yes: bool) -> Self {
        self.block_cache = yes;
        self
    }

    /// Shadow mode: decide and count, but never refuse (for rolling out a new limit).
    #[must_use]
    pub fn shadow(mut self, yes: bool) -> Self {
        self.shadow = yes;
        self
    }

    /// The counting algorithm.
    pub fn algorithm_value(&self) -> Algorithm {
        self.algorithm
    }

    /// Requests (cost units) allowed per window.
    pub fn limit_value(&self) -> u64 {
        self.limit
    }

    /// The window (period) of the limit.
    pub fn window_value(&self) -> Duration {
        self.window
    }

    /// How many may arrive at once: `burst` for token bucket and GCRA, else `limit`.
    pub fn capacity(&self) -> u64 {
        if self.algorithm.has_burst() {
            self.burst.unwrap_or(self.limit)
        } else {
            self.limit
        }
    }

    /// The version that is part of every key of this class.
    pub fn version_value(&self) -> u32 {
        self.version
    }

    /// What a check does when the store fails.
    pub fn on_error_value(&self) -> OnError {
        self.on_error
    }

    /// Whether refused identities are remembered in process.
    pub fn is_block_cache(&self) -> bool {
        self.block_cache
    }

    /// Whether the class only observes (never refuses).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// The window in microseconds (validated to fit).
    pub(crate) fn window_us(&self) -> i64 {
        i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX)
    }

    /// Microseconds per unit of refill for token bucket and GCRA: `ceil(window / limit)`, so the long-run rate
    /// never exceeds `limit` per `window`.
    pub(crate) fn interval_us(&self) -> i64 {
        let limit = i64::try_from(self.limit.max(1)).unwrap_or(i64::MAX);
        let w = self.window_us();
        (w + limit - 1) / limit
    }

    /// How long a key of this class can live at most.
    pub(crate) fn max_lifetime(&self) -> Duration {
        match self.algorithm {
            Algorithm::FixedWindow | Algorithm::SlidingLog => self.window,
            Algorithm::SlidingCounter => self.window.saturating_mul(2),
            Algorithm::TokenBucket | Algorithm::Gcra => {
                let us = self.interval_us().saturating_mul(self.capacity() as i64);
                Duration::from_micros(u64::try_from(us).unwrap_or(0))
            }
        }
    }
}

impl ClassSpec for RateLimitClass {
    type Raw = RawRateLimit;
    const EVICTABLE: bool = false;

    fn from_raw(raw: RawRateLimit) -> Result<Self, FieldError> {
        let names = Algorithm::ALL.map(Algorithm::name).join(", ");
        let algorithm = required("algorithm", raw.algorithm)?.0;
        let algorithm = Algorithm::from_name(&algorithm).ok_or_else(|| {
            (
                "algorithm",
                format!("unknown algorithm \"{algorithm}\"; known: {names}"),
            )
        })?;
        let limit = required("limit", raw.limit)?.to("limit", "a positive integer")?;
        let window = required("window", raw.window)?.0;
        let mut class = RateLimitClass::new(algorithm, limit, window);
        class.burst = raw
            .burst
            .map(|b| b.to("burst", "a positive integer"))
            .transpose()?;
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        if let Some(Text(text)) = raw.on_error {
            class.on_error = OnError::from_name(&text).ok_or_else(|| {
                (
                    "on_error",
                    format!("unknown value \"{text}\"; expected \"allow\", \"deny\" or \"local\""),
                )
            })?;
        }
        if let Some(Flag(b)) = raw.block_cache {
            class.block_cache = b;
        }
        if let Some(Flag(b)) = raw.shadow {
            class.shadow = b;
        }
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        let max_limit = if self.algorithm == Algorithm::SlidingLog {
            MAX_LOG_LIMIT
        } else {
            MAX_LIMIT
        };
        if !(1..=max_limit).contains(&self.limit) {
            let why = if self.algorithm == Algorithm::SlidingLog {
                " (sliding_log keeps one entry per request; use gcra or sliding_counter for larger limits)"
            } else {
                ""
            };
            return Err((
                "limit",
                format!("must be between 1 and {max_limit}, got {}{why}", self.limit),
            ));
        }
        if self.window < Duration::from_millis(1) || self.window > MAX_WINDOW {
            return Err((
                "window",
                format!(
                    "must be between 1ms and 400 days, got {}",
                    fmt_duration(self.window)
                ),
            ));
        }
        if !self.window.subsec_nanos().is_multiple_of(1000) {
            return Err((
                "window",
                "must be a whole number of microseconds".to_owned(),
            ));
        }
        if u128::from(self.limit) > self.window.as_micros() {
            return Err((
                "limit",
                format!(
                    "{} per {} is more than one per microsecond",
                    self.limit,
                    fmt_duration(self.window)
                ),
            ));
        }
        if let Some(burst) = self.burst {
            if !self.algorithm.has_burst() {
                return Err((
                    "burst",
                    format!(
                        "only token_bucket and gcra take a burst; {} allows `limit` per window",
                        self.algorithm
                    ),
                ));
            }
            if !(1..=MAX_LIMIT).contains(&burst) {
                return Err((
                    "burst",
                    format!("must be between 1 and {MAX_LIMIT}, got {burst}"),
                ));
            }
            let refill = u128::from(burst) * (self.interval_us() as u128);
            if refill > MAX_REFILL.as_micros() {
                return Err((
                    "burst",
                    format!(
                        "{burst} at one per {} takes longer than 10 years to refill",
                        fmt_duration(Duration::from_micros(self.interval_us() as u64))
                    ),
                ));
            }
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
        writeln!(f, "  algorithm:       {}", self.algorithm)?;
        writeln!(
            f,
            "  limit:           {} per {}",
            self.limit,
            fmt_duration(self.window)
        )?;
        if self.algorithm.has_burst() {
            writeln!(f, "  burst:           {}", self.capacity())?;
        }
        writeln!(f, "  version:         {}", self.version)?;
        writeln!(f, "  on_error:        {}", self.on_error)?;
        writeln!(f, "  block_cache:     {}", self.block_cache)?;
        writeln!(f, "  shadow:          {}", self.shadow)?;
        writeln!(
            f,
            "  key lifetime:    at most {}",
            fmt_duration(self.max_lifetime())
        )
    }
}

/// The TOML form of a rate-limit class (`kind` is read before this). Required: `algorithm`, `limit`,
/// `window`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    algorithm: Option<Text>,
    limit: Option<Int>,
    window: Option<Dur>,
    burst: Option<Int>,
    version: Option<Int>,
    on_error: Option<Text>,
    block_cache: Option<Flag>,
    shadow: Option<Flag>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyError};

    fn policy(body: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml_str(&format!(
            "[namespace]\nenv = \"prod\"\napp = \"api\"\n\n[classes.per_tenant]\nkind = \"rate_limit\"\n{body}\n"
        ))
    }

    #[track_caller]
    fn field_err(body: &str, field: &str, needle: &str) {
        let err = policy(body).expect_err("should be rejected");
        assert_eq!(err.class(), Some("per_tenant"), "{err}");
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(err.message().contains(needle), "{err}");
    }

    #[test]
    fn every_field_parses_and_matches_the_builder() {
        let p = policy(
            "algorithm = \"gcra\"\nlimit = 100\nwindow = \"1m\"\nburst = 20\nversion = 3\n\
             on_error = \"deny\"\nblock_cache = true\nshadow = true",
        )
        .unwrap();
        let c = p.class("per_tenant").unwrap().as_rate_limit().unwrap();
        assert_eq!(c.algorithm_value(), Algorithm::Gcra);
        assert_eq!(c.limit_value(), 100);
        assert_eq!(c.window_value(), Duration::from_secs(60));
        assert_eq!(c.capacity(), 20);
        assert_eq!(c.version_value(), 3);
        assert_eq!(c.on_error_value(), OnError::Deny);
        assert!(c.is_block_cache() && c.is_shadow());
        assert_eq!(c.interval_us(), 600_000);
        let built = Policy::builder("prod", "api")
            .rate_limit(
                "per_tenant",
                RateLimitClass::new(Algorithm::Gcra, 100, Duration::from_secs(60))
                    .burst(20)
                    .version(3)
                    .on_error(OnError::Deny)
                    .block_cache(true)
                    .shadow(true),
            )
            .build()
            .unwrap();
        assert_eq!(built, p);
        let text = p.to_string();
        assert!(text.contains("class per_tenant (rate_limit)"), "{text}");
        assert!(text.contains("100 per 1m"), "{text}");
        assert!(text.contains("key lifetime:    at most 12s"), "{text}");
    }

    #[test]
    fn defaults() {
        for a in Algorithm::ALL {
            let p = policy(&format!("algorithm = \"{a}\"\nlimit = 10\nwindow = \"1s\"")).unwrap();
            let c = p.class("per_tenant").unwrap().as_rate_limit().unwrap();
            assert_eq!(c.capacity(), 10);
            assert_eq!(c.on_error_value(), OnError::Local);
            assert!(!c.is_block_cache() && !c.is_shadow());
            assert_eq!(c.version_value(), 1);
            assert_eq!(Algorithm::from_name(a.name()), Some(a));
        }
    }

    #[test]
    fn bad_fields_are_named() {
        field_err("limit = 1\nwindow = \"1s\"", "algorithm", "missing");
        field_err(
            "algorithm = \"leaky\"\nlimit = 1\nwindow = \"1s\"",
            "algorithm",
            "gcra",
        );
        field_err("algorithm = \"gcra\"\nwindow = \"1s\"", "limit", "missing");
        field_err(
            "algorithm = \"gcra\"\nlimit = 0\nwindow = \"1s\"",
            "limit",
            "between 1",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = -3\nwindow = \"1s\"",
            "limit",
            "positive",
        );
        field_err(
            "algorithm = \"sliding_log\"\nlimit = 1000000\nwindow = \"1h\"",
            "limit",
            "sliding_log keeps one entry",
        );
        field_err("algorithm = \"gcra\"\nlimit = 5", "window", "missing");
        field_err(
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"0s\"",
            "window",
            "between 1ms",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"500d\"",
            "window",
            "400 days",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 5000\nwindow = \"1ms\"",
            "limit",
            "more than one per microsecond",
        );
        field_err(
            "algorithm = \"fixed_window\"\nlimit = 5\nwindow = \"1s\"\nburst = 2",
            "burst",
            "only token_bucket and gcra",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"1s\"\nburst = 0",
            "burst",
            "between 1",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 1\nwindow = \"400d\"\nburst = 100",
            "burst",
            "10 years",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"1s\"\non_error = \"retry\"",
            "on_error",
            "\"allow\", \"deny\" or \"local\"",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"1s\"\nttl = \"1s\"",
            "ttl",
            "a rate_limit class accepts",
        );
        field_err(
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"1s\"\nshadow = \"yes\"",
            "shadow",
            "true or false",
        );
    }
}
