//! The `cache` class kind: TTL and jitter, negative caching, the value size limit, the fill lease, who
//! invalidates the class, and what a read does when the store fails.
//!
//! **The one decision to know:** cache entries are the only entries the embedded store may evict under
//! memory pressure (`EVICTABLE` below): a cache miss costs a reload, while every other kind's state
//! (rate limits, sessions, locks, idempotency records) would be silently wrong if it disappeared.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

use super::fields::{Dur, Flag, Int, Text, required};
use super::{ClassSpec, FieldError, MAX_TTL, fmt_duration};

/// Default jitter of a cache class: 10% of its TTL.
const DEFAULT_JITTER_PERCENT: f64 = 10.0;
/// Default largest stored value: 1 MiB.
const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest allowed `max_value_bytes`: Redis's 512 MiB string limit.
pub(super) const MAX_VALUE_BYTES_LIMIT: usize = 512 * 1024 * 1024;
/// Default fill lease lifetime.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default loader timeout.
const DEFAULT_LOADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How much random time is added on top of a TTL, so entries written together do not expire together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Up to this percentage of the TTL, from 0 to 100 (`Percent(10.0)` is "10%").
    Percent(f64),
    /// Up to this fixed duration; must not exceed the class's TTL.
    Fixed(Duration),
}

impl Jitter {
    /// The largest jitter added to `ttl`. A percentage that is not a positive finite number counts as zero.
    pub fn max_for(&self, ttl: Duration) -> Duration {
        match *self {
            Jitter::Percent(p) if p.is_finite() && p > 0.0 => {
                Duration::try_from_secs_f64(ttl.as_secs_f64() * p / 100.0).unwrap_or(Duration::MAX)
            }
            Jitter::Percent(_) => Duration::ZERO,
            Jitter::Fixed(d) => d,
        }
    }

    /// Parses the TOML form: `"N%"` (N an integer or decimal) or a humantime duration.
    fn parse(text: &str) -> Result<Jitter, String> {
        let text = text.trim();
        if let Some(number) = text.strip_suffix('%') {
            let number = number.trim();
            let (int, frac) = number.split_once('.').unwrap_or((number, "0"));
            let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !is_digits(int) || !is_digits(frac) {
                return Err(format!(
                    "invalid jitter `{text}`: expected a percentage like \"10%\" or \"2.5%\", or a duration like \"30s\""
                ));
            }
            let value: f64 = number
                .parse()
                .map_err(|e| format!("invalid jitter `{text}`: {e}"))?;
            Ok(Jitter::Percent(value))
        } else {
            humantime::parse_duration(text).map(Jitter::Fixed).map_err(|e| {
                format!(
                    "invalid jitter `{text}`: {e}; expected a percentage like \"10%\" or a duration like \"30s\""
                )
            })
        }
    }
}

impl fmt::Display for Jitter {
    /// `10%` or a humantime duration such as `30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Jitter::Percent(p) => write!(f, "{p}%"),
            Jitter::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

/// How the entries of one cache class live: TTL and jitter, negative caching, size limit, fill lease, and
/// who invalidates it.
///
/// Built with [`CacheClass::new`] and the chained setters; checked when the policy is built.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheClass {
    ttl: Duration,
    jitter: Jitter,
    version: u32,
    negative_ttl: Option<Duration>,
    max_value_bytes: usize,
    invalidation: String,
    personal: bool,
    allow_shared: bool,
    lease_ttl: Duration,
    loader_timeout: Duration,
    on_error: CacheOnError,
    l1: Option<L1Tier>,
    l1_max_stale: Option<Duration>,
    stale_grace: Option<Duration>,
    soft_timeout: Option<Duration>,
    refresh_ahead: Option<Duration>,
    fail_safe_throttle: Option<Duration>,
}

/// Default `fail_safe_throttle`: after a failed refill served the last value, how long it is served as is.
const DEFAULT_FAIL_SAFE_THROTTLE: Duration = Duration::from_secs(5);

/// Default `l1_max_stale`: how long an instance may serve an L1 value after it was invalidated elsewhere.
const DEFAULT_L1_MAX_STALE: Duration = Duration::from_secs(1);
/// Smallest `l1_max_stale`: heartbeats go every quarter of it, and below 20 ms they would cost more than L1
/// saves.
const MIN_L1_MAX_STALE: Duration = Duration::from_millis(20);
/// Smallest L1 capacity: 4 KiB.
const MIN_L1_CAPACITY: u64 = 4 * 1024;

/// The in-process tier (L1) of a cache class: how much memory it may hold and how long an entry stays in it.
///
/// An L1 entry is also dropped when the entry is invalidated anywhere in the fleet (within the class's
/// `l1_max_stale`, see `docs/cache.md`). Capacity counts the encoded value plus the key, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Tier {
    capacity_bytes: u64,
    ttl: Duration,
}

impl L1Tier {
    /// An L1 of at most `capacity_bytes` (encoded values plus keys) whose entries live at most `ttl`.
    pub fn new(capacity_bytes: u64, ttl: Duration) -> Self {
        L1Tier {
            capacity_bytes,
            ttl,
        }
    }

    /// The most bytes (encoded values plus keys) the tier holds; the least recently used go first.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// How long an entry stays in the tier at most (at most the class TTL).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// What a cache class does when the store (Redis) fails or its circuit breaker is open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheOnError {
    /// Serve from the source: the loader is called directly (concurrent callers in one process still share
    /// one load), nothing is written, and `keyward_cache_fail_open_total` counts it. `get` reads as a miss,
    /// `set` and invalidations return the error (a write that did not happen must not look done).
    #[default]
    FailOpen,
    /// Return the store's error to the caller.
    Error,
}

impl CacheOnError {
    /// The name used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOnError::FailOpen => "fail_open",
            CacheOnError::Error => "error",
        }
    }

    fn from_name(name: &str) -> Option<CacheOnError> {
        [CacheOnError::FailOpen, CacheOnError::Error]
            .into_iter()
            .find(|o| o.as_str() == name)
    }
}

impl CacheClass {
    /// A cache class with the two required fields, `ttl` and `invalidation` (who invalidates this class, in
    /// one sentence), and every other field at its default: jitter 10%, version 1, no negative caching,
    /// 1 MiB values, not personal, not shared, lease 10s, loader timeout 5s, `on_error` fail open.
    pub fn new(ttl: Duration, invalidation: impl Into<String>) -> Self {
        CacheClass {
            ttl,
            jitter: Jitter::Percent(DEFAULT_JITTER_PERCENT),
            version: 1,
            negative_ttl: None,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            invalidation: invalidation.into(),
            personal: false,
            allow_shared: false,
            lease_ttl: DEFAULT_LEASE_TTL,
            loader_timeout: DEFAULT_LOADER_TIMEOUT,
            on_error: CacheOnError::FailOpen,
            l1: None,
            l1_max_stale: None,
            stale_grace: None,
            soft_timeout: None,
            refresh_ahead: None,
            fail_safe_throttle: None,
        }
    }

    /// Fail-safe: keeps each value this much longer after its TTL, to be served instead of an error when its
    /// refill fails or overruns the loader timeout (default: off). The Redis TTL of an entry becomes
    /// `ttl + jitter + stale_grace`; an entry past `ttl + jitter` is *stale*: the next read refills it, and a
    /// failed refill serves the stale value (`CacheLookup::Stale`).
    #[must_use]
    pub fn stale_grace(mut self, d: Duration) -> Self {
        self.stale_grace = Some(d);
        self
    }

    /// With a stale value at hand, a caller waits at most this long for a refill (its own or another
    /// caller's) and then gets the stale value; a refill that is still running goes on (in the background
    /// for `get_or_set_detached`) and commits if its lease is still valid. Must be below `loader_timeout`
    /// (which is the hard timeout). Default: off (callers wait up to `loader_timeout`).
    #[must_use]
    pub fn soft_timeout(mut self, d: Duration) -> Self {
        self.soft_timeout = Some(d);
        self
    }

    /// Eager refresh: a read within this long of an entry's expiry (its TTL, not counting `stale_grace`)
    /// returns the current value, and one caller fleet-wide refreshes it under the fill lease. Must be below
    /// `ttl`. Default: off.
    #[must_use]
    pub fn refresh_ahead(mut self, d: Duration) -> Self {
        self.refresh_ahead = Some(d);
        self
    }

    /// After a refill failed and the stale value was served, the stale value is stored again as current for
    /// this long, so that a failing source is not asked again on every read (default 5s; only with
    /// `stale_grace`).
    #[must_use]
    pub fn fail_safe_throttle(mut self, d: Duration) -> Self {
        self.fail_safe_throttle = Some(d);
        self
    }

    /// How long a value is kept past its TTL for fail-safe serving; `None` when off.
    pub fn stale_grace_value(&self) -> Option<Duration> {
        self.stale_grace
    }

    /// How long a caller with a stale value at hand waits for a refill; `None` when off.
    pub fn soft_timeout_value(&self) -> Option<Duration> {
        self.soft_timeout
    }

    /// How long before expiry a read triggers an eager refresh; `None` when off.
    pub fn refresh_ahead_value(&self) -> Option<Duration> {
        self.refresh_ahead
    }

    /// How long a stale value is served as is after a failed refill.
    pub fn fail_safe_throttle_value(&self) -> Duration {
        self.fail_safe_throttle
            .unwrap_or(DEFAULT_FAIL_SAFE_THROTTLE)
    }

    /// The Redis TTL of a value: [`jittered_ttl`](Self::jittered_ttl) plus `stale_grace`.
    pub fn stored_ttl(&self) -> Duration {
        self.jittered_ttl()
            .saturating_add(self.stale_grace.unwrap_or_default())
    }

    /// Adds an in-process tier (L1) in front of the store (default: none). TOML:
    /// `l1 = { capacity = "64 MiB", ttl = "30s" }`.
    #[must_use]
    pub fn l1(mut self, tier: L1Tier) -> Self {
        self.l1 = Some(tier);
        self
    }

    /// Sets the longest an instance may serve an L1 value after the entry was invalidated anywhere in the
    /// fleet (default 1s, at least 20 ms). Only meaningful with [`l1`](Self::l1).
    #[must_use]
    pub fn l1_max_stale(mut self, d: Duration) -> Self {
        self.l1_max_stale = Some(d);
        self
    }

    /// The in-process tier, if the class has one.
    pub fn l1_value(&self) -> Option<L1Tier> {
        self.l1
    }

    /// The longest an instance may serve an L1 value after an invalidation anywhere in the fleet.
    pub fn l1_max_stale_value(&self) -> Duration {
        self.l1_max_stale.unwrap_or(DEFAULT_L1_MAX_STALE)
    }

    /// Sets what happens when the store fails (default [`CacheOnError::FailOpen`]).
    #[must_use]
    pub fn on_error(mut self, on_error: CacheOnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// What happens when the store fails.
    pub fn on_error_value(&self) -> CacheOnError {
        self.on_error
    }

    /// Sets the jitter added on top of the TTL (default 10%).
    #[must_use]
    pub fn jitter(mut self, j: Jitter) -> Self {
        self.jitter = j;
        self
    }

    /// Sets the version, part of every key (default 1); bumping it orphans all old entries at once.
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// Caches "not found" results for this long (at most the TTL); without it they are not cached.
    #[must_use]
    pub fn negative_ttl(mut self, d: Duration) -> Self {
        self.negative_ttl = Some(d);
        self
    }

    /// Sets the largest encoded value accepted for this class (default 1 MiB, at most 512 MiB).
    #[must_use]
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.max_value_bytes = n;
        self
    }

    /// Marks the class as holding personal data (default false).
    #[must_use]
    pub fn personal(mut self, yes: bool) -> Self {
        self.personal = yes;
        self
    }

    /// Allows the class's entries in a shared cache even if personal (default false).
    #[must_use]
    pub fn allow_shared(mut self, yes: bool) -> Self {
        self.allow_shared = yes;
        self
    }

    /// Sets how long a fill lease lives (default 10s); must exceed the loader timeout.
    #[must_use]
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.lease_ttl = d;
        self
    }

    /// Sets how long a loader may run before it is given up on (default 5s); must be greater than zero.
    #[must_use]
    pub fn loader_timeout(mut self, d: Duration) -> Self {
        self.loader_timeout = d;
        self
    }

    /// The base TTL of an entry.
    pub fn ttl_value(&self) -> Duration {
        self.ttl
    }

    /// The jitter added on top of the TTL.
    pub fn jitter_value(&self) -> Jitter {
        self.jitter
    }

    /// The version that is part of every key of this class.
    pub fn version_value(&self) -> u32 {
        self.version
    }

    /// How long "not found" results are cached; `None` when they are not.
    pub fn negative_ttl_value(&self) -> Option<Duration> {
        self.negative_ttl
    }

    /// The largest encoded value accepted for this class, in bytes.
    pub fn max_value_bytes_value(&self) -> usize {
        self.max_value_bytes
    }

    /// Who invalidates this class, in one sentence.
    pub fn invalidation_value(&self) -> &str {
        &self.invalidation
    }

    /// Whether the class holds personal data.
    pub fn is_personal(&self) -> bool {
        self.personal
    }

    /// Whether the class's entries may live in a shared cache.
    pub fn is_shared_allowed(&self) -> bool {
        self.allow_shared
    }

    /// How long a fill lease lives.
    pub fn lease_ttl_value(&self) -> Duration {
        self.lease_ttl
    }

    /// How long a loader may run.
    pub fn loader_timeout_value(&self) -> Duration {
        self.loader_timeout
    }

    /// Largest jitter this class adds.
    pub fn max_jitter(&self) -> Duration {
        self.jitter.max_for(self.ttl)
    }

    /// A TTL drawn uniformly from `[ttl, ttl + max_jitter]` with the thread rng; never below `ttl`.
    pub fn jittered_ttl(&self) -> Duration {
        add_random(self.ttl, self.max_jitter())
    }

    /// Same as [`jittered_ttl`](Self::jittered_ttl) for the negative TTL: a percentage jitter applies to
    /// it, a fixed jitter is capped at the negative TTL. `None` when negative caching is off.
    pub fn jittered_negative_ttl(&self) -> Option<Duration> {
        let base = self.negative_ttl?;
        let max = match self.jitter {
            Jitter::Fixed(d) => d.min(base),
            percent => percent.max_for(base),
        };
        Some(add_random(base, max))
    }
}

/// The TOML form of a cache class (`kind` is read before this). Required: `ttl`, `invalidation`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    ttl: Option<Dur>,
    invalidation: Option<Text>,
    jitter: Option<Text>,
    version: Option<Int>,
    negative_ttl: Option<Dur>,
    max_value_bytes: Option<Int>,
    personal: Option<Flag>,
    allow_shared: Option<Flag>,
    lease_ttl: Option<Dur>,
    loader_timeout: Option<Dur>,
    on_error: Option<Text>,
    l1: Option<toml::Value>,
    l1_max_stale: Option<Dur>,
    stale_grace: Option<Dur>,
    soft_timeout: Option<Dur>,
    refresh_ahead: Option<Dur>,
    fail_safe_throttle: Option<Dur>,
}

/// `l1 = { capacity = "64 MiB", ttl = "30s" }`: `capacity` in bytes (an integer) or a size with a unit
/// (`"64 MiB"`, `"500 kB"`), `ttl` a duration.
fn parse_l1(v: &toml::Value) -> Result<L1Tier, FieldError> {
    let toml::Value::Table(t) = v else {
        return Err((
            "l1",
            format!(
                "expected a table like {{ capacity = \"64 MiB\", ttl = \"30s\" }}, found {}",
                v.type_str()
            ),
        ));
    };
    if let Some(unknown) = t
        .keys()
        .find(|k| !["capacity", "ttl"].contains(&k.as_str()))
    {
        return Err((
            "l1",
            format!("unknown field `{unknown}`; `l1` takes `capacity` and `ttl`"),
        ));
    }
    let missing = |field| (field, "missing required field".to_owned());
    let capacity = parse_capacity(t.get("capacity").ok_or_else(|| missing("l1.capacity"))?)?;
    let ttl = match t.get("ttl").ok_or_else(|| missing("l1.ttl"))? {
        toml::Value::String(text) => humantime::parse_duration(text.trim()).map_err(|e| {
            (
                "l1.ttl",
                format!("invalid duration `{text}`: {e}; expected a duration like \"30s\""),
            )
        })?,
        other => {
            return Err((
                "l1.ttl",
                format!(
                    "expected a duration like \"30s\", found {}",
                    other.type_str()
                ),
            ));
        }
    };
    Ok(L1Tier::new(capacity, ttl))
}

fn parse_capacity(v: &toml::Value) -> Result<u64, FieldError> {
    match v {
        toml::Value::Integer(n) => u64::try_from(*n).map_err(|_| {
            (
                "l1.capacity",
                format!("must be a positive number of bytes, got {n}"),
            )
        }),
        toml::Value::String(s) => s
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|_| {
                (
                    "l1.capacity",
                    format!(
                        "invalid size `{s}`: expected a number of bytes, or a positive number and a unit \
                         like \"64 MiB\" or \"500 kB\""
                    ),
                )
            }),
        other => Err((
            "l1.capacity",
            format!(
                "expected a size like \"64 MiB\" or a number of bytes, found {}",
                other.type_str()
            ),
        )),
    }
}

impl ClassSpec for CacheClass {
    type Raw = RawCache;
    const EVICTABLE: bool = true;

    fn from_raw(raw: RawCache) -> Result<Self, FieldError> {
        let ttl = required("ttl", raw.ttl)?.0;
        let invalidation = required("invalidation", raw.invalidation)?.0;
        let mut class = CacheClass::new(ttl, invalidation);
        if let Some(Text(text)) = raw.jitter {
            class.jitter = Jitter::parse(&text).map_err(|m| ("jitter", m))?;
        }
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        class.negative_ttl = raw.negative_ttl.map(|d| d.0);
        if let Some(n) = raw.max_value_bytes {
            class.max_value_bytes = n.to(
                "max_value_bytes",
                &format!("an integer from 1 to {MAX_VALUE_BYTES_LIMIT}"),
            )?;
        }
        if let Some(Flag(b)) = raw.personal {
            class.personal = b;
        }
        if let Some(Flag(b)) = raw.allow_shared {
            class.allow_shared = b;
        }
        if let Some(Dur(d)) = raw.lease_ttl {
            class.lease_ttl = d;
        }
        if let Some(Dur(d)) = raw.loader_timeout {
            class.loader_timeout = d;
        }
        if let Some(Text(text)) = raw.on_error {
            class.on_error = CacheOnError::from_name(&text).ok_or_else(|| {
                (
                    "on_error",
                    format!("unknown value \"{text}\"; expected \"fail_open\" or \"error\""),
                )
            })?;
        }
        if let Some(raw) = raw.l1 {
            class.l1 = Some(parse_l1(&raw)?);
        }
        class.l1_max_stale = raw.l1_max_stale.map(|d| d.0);
        class.stale_grace = raw.stale_grace.map(|d| d.0);
        class.soft_timeout = raw.soft_timeout.map(|d| d.0);
        class.refresh_ahead = raw.refresh_ahead.map(|d| d.0);
        class.fail_safe_throttle = raw.fail_safe_throttle.map(|d| d.0);
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        let ttl = self.ttl;
        if ttl.is_zero() {
            return Err(("ttl", "must be greater than zero".into()));
        }
        if ttl > MAX_TTL {
            return Err((
                "ttl",
                format!("must be at most 365 days, got {}", fmt_duration(ttl)),
            ));
        }
        match self.jitter {
            Jitter::Percent(p) if !(p.is_finite() && (0.0..=100.0).contains(&p)) => {
                return Err((
                    "jitter",
                    format!("a percentage must be between 0% and 100%, got {p}%"),
                ));
            }
            Jitter::Fixed(d) if d > ttl => {
                return Err((
                    "jitter",
                    format!(
                        "a fixed jitter ({}) must not exceed ttl ({})",
                        fmt_duration(d),
                        fmt_duration(ttl)
                    ),
                ));
            }
            _ => {}
        }
        if self.version < 1 {
            return Err(("version", "must be at least 1".into()));
        }
        if let Some(neg) = self.negative_ttl {
            if neg.is_zero() {
                return Err(("negative_ttl", "must be greater than zero".into()));
            }
            if neg > ttl {
                return Err((
                    "negative_ttl",
                    format!(
                        "must not exceed ttl ({}), got {}",
                        fmt_duration(ttl),
                        fmt_duration(neg)
                    ),
                ));
            }
        }
        if !(1..=MAX_VALUE_BYTES_LIMIT).contains(&self.max_value_bytes) {
            return Err((
                "max_value_bytes",
                format!(
                    "must be between 1 and {MAX_VALUE_BYTES_LIMIT}, got {}",
                    self.max_value_bytes
                ),
            ));
        }
        if self.invalidation.trim().is_empty() {
            return Err((
                "invalidation",
                "must say who invalidates this class, in one sentence".into(),
            ));
        }
        if self.loader_timeout.is_zero() {
            return Err(("loader_timeout", "must be greater than zero".into()));
        }
        if self.lease_ttl <= self.loader_timeout {
            return Err((
                "lease_ttl",
                format!(
                    "must be greater than loader_timeout ({}), got {}",
                    fmt_duration(self.loader_timeout),
                    fmt_duration(self.lease_ttl)
                ),
            ));
        }
        if let Some(l1) = self.l1 {
            if l1.capacity_bytes < MIN_L1_CAPACITY {
                return Err((
                    "l1.capacity",
                    format!(
                        "must be at least {MIN_L1_CAPACITY} bytes, got {}",
                        l1.capacity_bytes
                    ),
                ));
            }
            if l1.ttl.is_zero() || l1.ttl > ttl {
                return Err((
                    "l1.ttl",
                    format!(
                        "must be greater than zero and at most ttl ({}), got {}",
                        fmt_duration(ttl),
                        fmt_duration(l1.ttl)
                    ),
                ));
            }
        }
        if let Some(g) = self.stale_grace
            && (g.is_zero() || g > MAX_TTL)
        {
            return Err((
                "stale_grace",
                format!("must be between 1ms and 365 days, got {}", fmt_duration(g)),
            ));
        }
        if let Some(g) = self.stale_grace
            && g < self.lease_ttl
        {
            // A refill holds its lease over the stale value; the value must outlive the lease, or the
            // lease would have to extend it (and a stale value would read as fresh).
            return Err((
                "stale_grace",
                format!(
                    "must be at least lease_ttl ({}), got {}",
                    fmt_duration(self.lease_ttl),
                    fmt_duration(g)
                ),
            ));
        }
        if let Some(soft) = self.soft_timeout
            && (soft.is_zero() || soft >= self.loader_timeout)
        {
            return Err((
                "soft_timeout",
                format!(
                    "must be greater than zero and below loader_timeout ({}), got {}",
                    fmt_duration(self.loader_timeout),
                    fmt_duration(soft)
                ),
            ));
        }
        if let Some(r) = self.refresh_ahead
            && (r.is_zero() || r >= ttl)
        {
            return Err((
                "refresh_ahead",
                format!(
                    "must be greater than zero and below ttl ({}), got {}",
                    fmt_duration(ttl),
                    fmt_duration(r)
                ),
            ));
        }
        let throttle = self.fail_safe_throttle_value();
        if throttle.is_zero() || throttle > MAX_TTL {
            return Err((
                "fail_safe_throttle",
                format!(
                    "must be between 1ms and 365 days, got {}",
                    fmt_duration(throttle)
                ),
            ));
        }
        // Fields that only mean something together with another: set alone, they would silently do nothing.
        for (field, set, needs) in [
            (
                "soft_timeout",
                self.soft_timeout.is_some(),
                self.stale_grace.is_some(),
            ),
            (
                "fail_safe_throttle",
                self.fail_safe_throttle.is_some(),
                self.stale_grace.is_some(),
            ),
            (
                "l1_max_stale",
                self.l1_max_stale.is_some(),
                self.l1.is_some(),
            ),
        ] {
            if set && !needs {
                let other = if field == "l1_max_stale" {
                    "l1"
                } else {
                    "stale_grace"
                };
                return Err((
                    field,
                    format!("only applies with `{other}`, which this class does not set"),
                ));
            }
        }
        let l1_max_stale = self.l1_max_stale_value();
        if l1_max_stale < MIN_L1_MAX_STALE || l1_max_stale > MAX_TTL {
            return Err((
                "l1_max_stale",
                format!(
                    "must be between 20ms and 365 days, got {}",
                    fmt_duration(l1_max_stale)
                ),
            ));
        }
        Ok(())
    }

    fn key_version(&self) -> u32 {
        self.version
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  ttl:             {}", fmt_duration(self.ttl))?;
        writeln!(
            f,
            "  jitter:          {} (up to {})",
            self.jitter,
            fmt_duration(self.max_jitter())
        )?;
        writeln!(f, "  version:         {}", self.version)?;
        match self.negative_ttl {
            Some(d) => writeln!(f, "  negative_ttl:    {}", fmt_duration(d))?,
            None => writeln!(
                f,
                "  negative_ttl:    off (not-found results are not cached)"
            )?,
        }
        writeln!(f, "  max_value_bytes: {}", self.max_value_bytes)?;
        writeln!(f, "  invalidation:    {}", self.invalidation)?;
        if self.personal && !self.allow_shared {
            writeln!(
                f,
                "  personal:        true (Keyward::cache refuses this class unless allow_shared = true)"
            )?;
        } else {
            writeln!(f, "  personal:        {}", self.personal)?;
        }
        writeln!(f, "  allow_shared:    {}", self.allow_shared)?;
        writeln!(f, "  lease_ttl:       {}", fmt_duration(self.lease_ttl))?;
        writeln!(
            f,
            "  loader_timeout:  {}",
            fmt_duration(self.loader_timeout)
        )?;
        writeln!(f, "  on_error:        {}", self.on_error.as_str())?;
        match self.l1 {
            Some(l1) => {
                writeln!(
                    f,
                    "  l1:              {} in process, entries live at most {}",
                    bytesize::ByteSize::b(l1.capacity_bytes).display().iec(),
                    fmt_duration(l1.ttl)
                )?;
                writeln!(
                    f,
                    "  l1_max_stale:    {}",
                    fmt_duration(self.l1_max_stale_value())
                )?;
            }
            None => writeln!(f, "  l1:              off")?,
        }
        let opt = |d: Option<Duration>| {
            d.map_or_else(|| "off".to_owned(), |d| fmt_duration(d).to_string())
        };
        writeln!(f, "  stale_grace:     {}", opt(self.stale_grace))?;
        writeln!(f, "  soft_timeout:    {}", opt(self.soft_timeout))?;
        writeln!(f, "  refresh_ahead:   {}", opt(self.refresh_ahead))?;
        if self.stale_grace.is_some() {
            writeln!(
                f,
                "  fail_safe_throttle: {}",
                fmt_duration(self.fail_safe_throttle_value())
            )?;
        }
        Ok(())
    }

    /// The longest an entry of this class (value, negative entry or fill lease) can live.
    fn max_value_lifetime(&self) -> Duration {
        self.ttl
            .saturating_add(self.max_jitter())
            .saturating_add(self.lease_ttl)
            .saturating_add(self.stale_grace.unwrap_or_default())
            .saturating_add(if self.stale_grace.is_some() {
                self.fail_safe_throttle_value()
                    .saturating_add(self.refresh_ahead.unwrap_or_default())
            } else {
                Duration::ZERO
            })
    }
}

/// `base` plus a uniform random amount in `[0, max]`, at millisecond granularity (the full `max` included).
fn add_random(base: Duration, max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    let extra = if max_ms == 0 {
        Duration::ZERO
    } else {
        let ms = rand::rng().random_range(0..=max_ms);
        if ms == max_ms {
            max
        } else {
            Duration::from_millis(ms)
        }
    };
    base.saturating_add(extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::policy::test_support::*;
    use proptest::prelude::*;

    #[test]
    fn example_parses_with_every_field() {
        let policy = Policy::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(policy.env(), "prod");
        assert_eq!(policy.app(), "shop");
        let class = policy.class("product_list").unwrap();
        assert_eq!(class.name(), "product_list");
        assert_eq!(class.kind().name(), "cache");
        let c = class.as_cache().unwrap();
        assert_eq!(c.ttl_value(), secs(600));
        assert_eq!(c.jitter_value(), Jitter::Percent(10.0));
        assert_eq!(c.version_value(), 1);
        assert_eq!(c.negative_ttl_value(), Some(secs(30)));
        assert_eq!(c.max_value_bytes_value(), 1_048_576);
        assert_eq!(
            c.invalidation_value(),
            "catalog service, after every product write"
        );
        assert!(!c.is_personal());
        assert!(!c.is_shared_allowed());
        assert_eq!(c.lease_ttl_value(), secs(10));
        assert_eq!(c.loader_timeout_value(), secs(5));
        assert_eq!(c.max_jitter(), secs(60));
        assert_eq!(policy.max_entry_lifetime(), secs(600 + 60 + 10));
    }

    #[test]
    fn builder_and_toml_give_equal_policies() {
        let built = Policy::builder("prod", "shop")
            .cache(
                "product_list",
                CacheClass::new(secs(600), "catalog service, after every product write")
                    .negative_ttl(secs(30)),
            )
            .build()
            .unwrap();
        assert_eq!(built, Policy::from_toml_str(EXAMPLE).unwrap());
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let policy = Policy::from_toml_str(&one_class("ttl = \"1h\"")).unwrap();
        let c = policy.class("product_list").unwrap().as_cache().unwrap();
        assert_eq!(c, &CacheClass::new(secs(3600), "catalog service"));
        assert_eq!(c.jitter_value(), Jitter::Percent(10.0));
        assert_eq!(c.version_value(), 1);
        assert_eq!(c.negative_ttl_value(), None);
        assert_eq!(c.jittered_negative_ttl(), None);
        assert_eq!(c.max_value_bytes_value(), 1_048_576);
        assert_eq!(c.lease_ttl_value(), secs(10));
        assert_eq!(c.loader_timeout_value(), secs(5));
    }

    #[test]
    fn ttl_rules() {
        assert_class_field(&toml_err("ttl = \"0s\""), "ttl");
        assert_class_field(&toml_err("ttl = \"366days\""), "ttl");
        assert_class_field(&toml_err(""), "ttl");
        assert!(Policy::from_toml_str(&one_class("ttl = \"365days\"")).is_ok());
        assert_class_field(&builder_err(CacheClass::new(Duration::ZERO, "x")), "ttl");
        assert_class_field(
            &builder_err(CacheClass::new(MAX_TTL + Duration::from_millis(1), "x")),
            "ttl",
        );
    }

    #[test]
    fn bad_duration_names_class_and_field() {
        let err = toml_err("ttl = \"ten minutes\"");
        assert_class_field(&err, "ttl");
        assert!(err.message().contains("invalid duration"), "{err}");
        let err = toml_err("ttl = 600");
        assert_class_field(&err, "ttl");
        assert!(err.message().contains("found integer"), "{err}");
        assert_class_field(
            &toml_err("ttl = \"10m\"\nlease_ttl = \"soon\""),
            "lease_ttl",
        );
    }

    #[test]
    fn l1_and_fail_safe_fields() {
        let p = Policy::from_toml_str(&one_class(
            "ttl = \"10m\"\nl1 = { capacity = \"64 MiB\", ttl = \"30s\" }\nl1_max_stale = \"500ms\"\n\
             stale_grace = \"1h\"\nsoft_timeout = \"200ms\"\nfail_safe_throttle = \"2s\"\nrefresh_ahead = \"1m\"",
        ))
        .unwrap();
        let c = p.class("product_list").unwrap().as_cache().unwrap();
        assert_eq!(c.l1_value(), Some(L1Tier::new(64 << 20, secs(30))));
        assert_eq!(c.l1_max_stale_value(), Duration::from_millis(500));
        assert_eq!(c.stale_grace_value(), Some(secs(3600)));
        assert_eq!(c.soft_timeout_value(), Some(Duration::from_millis(200)));
        assert_eq!(c.fail_safe_throttle_value(), secs(2));
        assert_eq!(c.refresh_ahead_value(), Some(secs(60)));
        assert_eq!(
            Policy::from_toml_str(&one_class(
                "ttl = \"10m\"\nl1 = { capacity = 4096, ttl = \"1s\" }"
            ))
            .unwrap()
            .class("product_list")
            .unwrap()
            .as_cache()
            .unwrap()
            .l1_value(),
            Some(L1Tier::new(4096, secs(1)))
        );
        for (body, field, says) in [
            (
                "l1 = { capacity = \"lots\", ttl = \"1s\" }",
                "l1.capacity",
                "invalid size `lots`",
            ),
            (
                "l1 = { capacity = -5, ttl = \"1s\" }",
                "l1.capacity",
                "positive",
            ),
            (
                "l1 = { capacity = \"64 MiB\", ttl = \"1s\", size = 3 }",
                "l1",
                "unknown field `size`",
            ),
            ("l1 = \"64 MiB\"", "l1", "expected a table"),
            ("l1 = { ttl = \"1s\" }", "l1.capacity", "missing"),
            ("l1 = { capacity = \"64 MiB\" }", "l1.ttl", "missing"),
            (
                "l1 = { capacity = \"64 MiB\", ttl = \"soon\" }",
                "l1.ttl",
                "invalid duration",
            ),
            (
                "l1 = { capacity = \"64 MiB\", ttl = \"11m\" }",
                "l1.ttl",
                "at most ttl",
            ),
            (
                "l1 = { capacity = 100, ttl = \"1s\" }",
                "l1.capacity",
                "at least",
            ),
            (
                "l1_max_stale = \"1s\"",
                "l1_max_stale",
                "only applies with `l1`",
            ),
            (
                "l1 = { capacity = 4096, ttl = \"1s\" }\nl1_max_stale = \"5ms\"",
                "l1_max_stale",
                "20ms",
            ),
            (
                "soft_timeout = \"1s\"",
                "soft_timeout",
                "only applies with `stale_grace`",
            ),
            (
                "fail_safe_throttle = \"1s\"",
                "fail_safe_throttle",
                "only applies with `stale_grace`",
            ),
            (
                "stale_grace = \"1m\"\nsoft_timeout = \"5s\"",
                "soft_timeout",
                "below loader_timeout",
            ),
            ("refresh_ahead = \"10m\"", "refresh_ahead", "below ttl"),
            ("stale_grace = \"0s\"", "stale_grace", "between"),
        ] {
            let err = toml_err(&format!("ttl = \"10m\"\n{body}"));
            assert_class_field(&err, field);
            assert!(err.to_string().contains(says), "{body}: {err}");
        }
    }

    #[test]
    fn jitter_rules() {
        for (text, expected) in [
            ("0%", Jitter::Percent(0.0)),
            ("100%", Jitter::Percent(100.0)),
            ("2.5%", Jitter::Percent(2.5)),
            ("30s", Jitter::Fixed(secs(30))),
            ("10m", Jitter::Fixed(secs(600))),
        ] {
            let p =
                Policy::from_toml_str(&one_class(&format!("ttl = \"10m\"\njitter = \"{text}\"")))
                    .unwrap();
            assert_eq!(
                p.class("product_list")
                    .unwrap()
                    .as_cache()
                    .unwrap()
                    .jitter_value(),
                expected,
                "{text}"
            );
        }
        for bad in [
            "101%", "-1%", "abc%", "%", "1e2%", "nan%", "inf%", "11m", "soon", "1.%",
        ] {
            let err = toml_err(&format!("ttl = \"10m\"\njitter = \"{bad}\""));
            assert_class_field(&err, "jitter");
        }
        assert_class_field(&toml_err("ttl = \"10m\"\njitter = 10"), "jitter");
        assert_class_field(
            &builder_err(base().jitter(Jitter::Percent(f64::NAN))),
            "jitter",
        );
        assert_class_field(&builder_err(base().jitter(Jitter::Percent(-0.5))), "jitter");
        assert_class_field(
            &builder_err(base().jitter(Jitter::Fixed(secs(601)))),
            "jitter",
        );
    }

    #[test]
    fn version_rules() {
        assert_class_field(&toml_err("ttl = \"10m\"\nversion = 0"), "version");
        assert_class_field(&toml_err("ttl = \"10m\"\nversion = -3"), "version");
        assert_class_field(&toml_err("ttl = \"10m\"\nversion = 4294967296"), "version");
        assert_class_field(&toml_err("ttl = \"10m\"\nversion = \"2\""), "version");
        assert_class_field(&builder_err(base().version(0)), "version");
        let p = Policy::from_toml_str(&one_class("ttl = \"10m\"\nversion = 7")).unwrap();
        assert_eq!(
            p.class("product_list")
                .unwrap()
                .as_cache()
                .unwrap()
                .version_value(),
            7
        );
    }

    #[test]
    fn negative_ttl_rules() {
        assert_class_field(
            &toml_err("ttl = \"10m\"\nnegative_ttl = \"0s\""),
            "negative_ttl",
        );
        assert_class_field(
            &toml_err("ttl = \"10m\"\nnegative_ttl = \"11m\""),
            "negative_ttl",
        );
        assert_class_field(
            &builder_err(base().negative_ttl(Duration::ZERO)),
            "negative_ttl",
        );
        assert_class_field(&builder_err(base().negative_ttl(secs(601))), "negative_ttl");
        assert!(
            Policy::builder("a", "b")
                .cache("c", base().negative_ttl(secs(600)))
                .build()
                .is_ok()
        );
    }

    #[test]
    fn max_value_bytes_rules() {
        assert_class_field(
            &toml_err("ttl = \"10m\"\nmax_value_bytes = 0"),
            "max_value_bytes",
        );
        assert_class_field(
            &toml_err("ttl = \"10m\"\nmax_value_bytes = 536870913"),
            "max_value_bytes",
        );
        assert_class_field(
            &toml_err("ttl = \"10m\"\nmax_value_bytes = -1"),
            "max_value_bytes",
        );
        assert!(
            Policy::from_toml_str(&one_class("ttl = \"10m\"\nmax_value_bytes = 536870912")).is_ok()
        );
        assert!(Policy::from_toml_str(&one_class("ttl = \"10m\"\nmax_value_bytes = 1")).is_ok());
        assert_class_field(&builder_err(base().max_value_bytes(0)), "max_value_bytes");
        assert_class_field(
            &builder_err(base().max_value_bytes(MAX_VALUE_BYTES_LIMIT + 1)),
            "max_value_bytes",
        );
    }

    #[test]
    fn invalidation_rules() {
        let missing = "[namespace]\nenv = \"prod\"\napp = \"shop\"\n[classes.product_list]\nkind = \"cache\"\nttl = \"1m\"\n";
        assert_class_field(&Policy::from_toml_str(missing).unwrap_err(), "invalidation");
        let blank = missing.to_owned() + "invalidation = \"   \"\n";
        assert_class_field(&Policy::from_toml_str(&blank).unwrap_err(), "invalidation");
        assert_class_field(
            &builder_err(CacheClass::new(secs(60), " \t\n")),
            "invalidation",
        );
    }

    #[test]
    fn lease_and_loader_timeout_rules() {
        assert_class_field(
            &toml_err("ttl = \"10m\"\nloader_timeout = \"0s\""),
            "loader_timeout",
        );
        assert_class_field(&toml_err("ttl = \"10m\"\nlease_ttl = \"5s\""), "lease_ttl");
        assert_class_field(&toml_err("ttl = \"10m\"\nlease_ttl = \"3s\""), "lease_ttl");
        assert!(
            Policy::from_toml_str(&one_class(
                "ttl = \"10m\"\nlease_ttl = \"3s\"\nloader_timeout = \"2s\""
            ))
            .is_ok()
        );
        assert_class_field(
            &builder_err(base().loader_timeout(Duration::ZERO)),
            "loader_timeout",
        );
        assert_class_field(&builder_err(base().lease_ttl(secs(5))), "lease_ttl");
    }

    #[test]
    fn personal_flags_parsed() {
        let p = Policy::from_toml_str(&one_class(
            "ttl = \"10m\"\npersonal = true\nallow_shared = true",
        ))
        .unwrap();
        let c = p.class("product_list").unwrap().as_cache().unwrap();
        assert!(c.is_personal());
        assert!(c.is_shared_allowed());
        let p = Policy::from_toml_str(&one_class("ttl = \"10m\"\npersonal = true")).unwrap();
        let c = p.class("product_list").unwrap().as_cache().unwrap();
        assert!(c.is_personal());
        assert!(!c.is_shared_allowed());
        assert_class_field(&toml_err("ttl = \"10m\"\npersonal = \"yes\""), "personal");
        assert_class_field(&toml_err("ttl = \"10m\"\nallow_shared = 1"), "allow_shared");
    }

    #[test]
    fn display_lists_every_field() {
        let p = Policy::from_toml_str(&one_class(
            "ttl = \"10m\"\njitter = \"30s\"\nversion = 3\nnegative_ttl = \"1m\"\nmax_value_bytes = 2048\n\
             personal = true\nallow_shared = true\nlease_ttl = \"20s\"\nloader_timeout = \"7s\"",
        ))
        .unwrap();
        let text = p.to_string();
        for needle in [
            "env = prod",
            "app = shop",
            "class product_list (cache)",
            "ttl:             10m",
            "jitter:          30s",
            "version:         3",
            "negative_ttl:    1m",
            "max_value_bytes: 2048",
            "invalidation:    catalog service",
            "personal:        true",
            "allow_shared:    true",
            "lease_ttl:       20s",
            "loader_timeout:  7s",
            "max cache entry lifetime: 10m 50s",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let p = Policy::from_toml_str(EXAMPLE).unwrap().to_string();
        assert!(p.contains("jitter:          10% (up to 1m)"), "{p}");
    }

    #[test]
    fn jitter_max_for() {
        assert_eq!(Jitter::Percent(10.0).max_for(secs(600)), secs(60));
        assert_eq!(Jitter::Percent(0.0).max_for(secs(600)), Duration::ZERO);
        assert_eq!(Jitter::Percent(f64::NAN).max_for(secs(600)), Duration::ZERO);
        assert_eq!(Jitter::Fixed(secs(7)).max_for(secs(600)), secs(7));
    }

    #[test]
    fn jittered_negative_ttl_caps_fixed_jitter() {
        let c = CacheClass::new(secs(600), "x")
            .jitter(Jitter::Fixed(secs(300)))
            .negative_ttl(secs(2));
        for _ in 0..200 {
            let d = c.jittered_negative_ttl().unwrap();
            assert!(d >= secs(2) && d <= secs(4), "{d:?}");
        }
        let c = CacheClass::new(secs(600), "x")
            .jitter(Jitter::Percent(50.0))
            .negative_ttl(secs(10));
        for _ in 0..200 {
            let d = c.jittered_negative_ttl().unwrap();
            assert!(d >= secs(10) && d <= secs(15), "{d:?}");
        }
        let c = CacheClass::new(secs(600), "x").jitter(Jitter::Percent(0.0));
        assert_eq!(c.jittered_ttl(), secs(600));
    }

    proptest! {
        #[test]
        fn jittered_ttl_within_bounds(
            ttl_ms in 1u64..=365 * 24 * 3_600_000,
            percent in 0.0f64..=100.0,
            fixed_frac in 0.0f64..=1.0,
            use_fixed in any::<bool>(),
        ) {
            let ttl = Duration::from_millis(ttl_ms);
            let jitter = if use_fixed {
                Jitter::Fixed(ttl.mul_f64(fixed_frac))
            } else {
                Jitter::Percent(percent)
            };
            let class = CacheClass::new(ttl, "x").jitter(jitter);
            prop_assert!(class.validate().is_ok());
            let max = class.max_jitter();
            for _ in 0..8 {
                let d = class.jittered_ttl();
                prop_assert!(d >= ttl && d <= ttl + max, "{:?} not in [{:?}, {:?}]", d, ttl, ttl + max);
            }
        }
    }

    #[test]
    fn on_error_parses_defaults_and_names_the_field_when_bad() {
        let c = |body: &str| {
            Policy::from_toml_str(&one_class(body)).map(|p| {
                p.class("product_list")
                    .unwrap()
                    .as_cache()
                    .unwrap()
                    .on_error_value()
            })
        };
        assert_eq!(c("ttl = \"10m\"").unwrap(), CacheOnError::FailOpen);
        assert_eq!(
            c("ttl = \"10m\"\non_error = \"fail_open\"").unwrap(),
            CacheOnError::FailOpen
        );
        assert_eq!(
            c("ttl = \"10m\"\non_error = \"error\"").unwrap(),
            CacheOnError::Error
        );
        let built = Policy::builder("prod", "shop")
            .cache("product_list", base().on_error(CacheOnError::Error))
            .build()
            .unwrap();
        assert_eq!(
            built,
            Policy::from_toml_str(&one_class("ttl = \"10m\"\non_error = \"error\"")).unwrap()
        );
        assert!(
            built.to_string().contains("on_error:        error"),
            "{built}"
        );

        let err = toml_err("ttl = \"10m\"\non_error = \"retry\"");
        assert_class_field(&err, "on_error");
        assert_eq!(
            err.message(),
            "unknown value \"retry\"; expected \"fail_open\" or \"error\""
        );
        let err = toml_err("ttl = \"10m\"\non_error = false");
        assert_class_field(&err, "on_error");
        assert!(err.message().contains("found boolean"), "{err}");
    }
}
