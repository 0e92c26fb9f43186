//! The declared policy: a namespace (`env`, `app`) and its named classes, each saying how its entries live.
//!
//! **The one decision to know:** a policy is only ever obtained through validation. Whether it is loaded
//! from TOML ([`Policy::from_toml_str`], [`Policy::from_file`]) or built in code ([`Policy::builder`]), the
//! same checks run, so every [`Policy`] value in the process is valid and every key built from it
//! (see [`crate::key`]) is well formed. Errors ([`PolicyError`]) name the file (if any), the class and the
//! field at fault.
//!
//! # TOML format
//!
//! ```toml
//! [namespace]
//! env = "prod"
//! app = "shop"
//!
//! [classes.product_list]
//! kind = "cache"
//! ttl = "10m"                 # humantime duration, required, > 0, <= 365 days
//! jitter = "10%"              # "N%" (0..=100, integer or decimal) or a duration ("30s"); default "10%"; a fixed jitter must be <= ttl
//! version = 1                 # integer >= 1, default 1
//! negative_ttl = "30s"        # optional; absent => `None` results are not cached; must be > 0 and <= ttl
//! max_value_bytes = 1048576   # default 1 MiB (1048576), must be 1..=536870912
//! invalidation = "catalog service, after every product write"   # REQUIRED, non-empty after trim: who invalidates this class, in one sentence
//! personal = false            # default false
//! allow_shared = false        # default false
//! lease_ttl = "10s"           # fill lease lifetime, default 10s, must be > loader_timeout
//! loader_timeout = "5s"       # default 5s, must be > 0
//!
//! [classes.api_per_tenant]
//! kind = "rate_limit"
//! algorithm = "gcra"          # fixed_window | sliding_log | sliding_counter | token_bucket | gcra (required)
//! limit = 100                 # requests (cost units) per window, required, 1..=1e9 (sliding_log: 1..=100000)
//! window = "1m"               # required, 1ms..=400 days
//! burst = 20                  # token_bucket and gcra only: how many at once; default = limit
//! version = 1                 # integer >= 1, default 1; bumping it starts every identity afresh
//! on_error = "local"          # "allow" | "deny" | "local" (in-process fallback), default "local"
//! block_cache = false         # refuse known-limited identities in process until retry_after; default false
//! shadow = false              # decide and count, never refuse; default false
//!
//! [classes.web_session]
//! kind = "session"
//! idle = "30m"                # required: ends this long after the last extension
//! absolute = "12h"            # required, >= idle: ends this long after creation, however busy
//! extend_after = "3m"         # default idle / 10; < idle: a read pushes the idle expiry back at most this often
//! version = 1
//! max_data_bytes = 65536      # default 64 KiB
//! cookie_name = "__Host-session"   # default; `__Host-` needs Secure, Path=/ and no Domain
//! cookie_secure = true        # default true
//! cookie_same_site = "lax"    # "lax" (default) | "strict" | "none" (needs Secure)
//! cookie_path = "/"           # default "/"
//! # cookie_domain = "example.com"  # default none (host-only)
//!
//! [classes.invoice_run]
//! kind = "lock"
//! ttl = "30s"                 # required lease, 10ms..=24h
//! wait = "30s"                # how long `lock` waits for a holder, default = ttl
//! watchdog = false            # renew in the background while the guard lives
//! fence_ttl = "7d"            # fencing counter and fenced values kept this long after last use, default 7d
//! version = 1
//!
//! [classes.charge]
//! kind = "idempotency"
//! ttl = "24h"                 # completed responses replayed this long, default 24h
//! lease = "60s"               # in-progress marker lifetime, default 60s, <= ttl
//! max_response_bytes = 1048576
//! version = 1
//! ```
//!
//! `kind` is required for every class: `"cache"`, `"rate_limit"`, `"session"`, `"lock"` or `"idempotency"`. Unknown fields anywhere are
//! errors. `env` and `app` are 1 to 32 characters of `[a-z0-9_.-]` starting with `[a-z0-9]`; class names
//! are 1 to 64 characters of `[a-z][a-z0-9_]*` (so no class can collide with keyward's internal `_kw`
//! keys). A policy with no classes is valid.
//!
//! The same policy in code:
//!
//! ```
//! # use keyward::policy::{CacheClass, Jitter, Policy};
//! use std::time::Duration;
//!
//! let policy = Policy::builder("prod", "shop")
//!     .cache(
//!         "product_list",
//!         CacheClass::new(Duration::from_secs(600), "catalog service, after every product write")
//!             .jitter(Jitter::Percent(10.0))
//!             .negative_ttl(Duration::from_secs(30)),
//!     )
//!     .build()?;
//! assert_eq!(policy.class("product_list").unwrap().kind().name(), "cache");
//! # Ok::<(), keyward::policy::PolicyError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;

mod idempotency;
mod lock;
mod rate_limit;
mod session;

pub use idempotency::IdempotencyClass;
pub use lock::LockClass;
pub use rate_limit::{Algorithm, OnError, RateLimitClass};
pub use session::{DEFAULT_COOKIE_NAME, SameSite, SessionClass};

/// Default jitter of a cache class: 10% of its TTL.
const DEFAULT_JITTER_PERCENT: f64 = 10.0;
/// Default largest stored value: 1 MiB.
const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest allowed `max_value_bytes`: Redis's 512 MiB string limit.
const MAX_VALUE_BYTES_LIMIT: usize = 512 * 1024 * 1024;
/// Default fill lease lifetime.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default loader timeout.
const DEFAULT_LOADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest allowed TTL: 365 days.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Longest `env` / `app`.
const MAX_NAMESPACE_LEN: usize = 32;
/// Longest class name.
const MAX_CLASS_NAME_LEN: usize = 64;

/// Fields a `cache` class accepts in TOML.
const CACHE_FIELDS: &[&str] = &[
    "kind",
    "ttl",
    "jitter",
    "version",
    "negative_ttl",
    "max_value_bytes",
    "invalidation",
    "personal",
    "allow_shared",
    "lease_ttl",
    "loader_timeout",
    "on_error",
];

/// Class kinds known to this version of keyward, as written in TOML.
const KNOWN_KINDS: &[&str] = &["cache", "rate_limit", "session", "lock", "idempotency"];

// ---------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------

/// Why a policy was rejected.
///
/// Displays as `policy.toml: class `product_list`, field `ttl`: must be greater than zero`; the file, class
/// and field parts are left out when they do not apply.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{}{message}", location_prefix(.file.as_deref(), .class.as_deref(), .field.as_deref()))]
pub struct PolicyError {
    file: Option<PathBuf>,
    class: Option<String>,
    field: Option<String>,
    message: String,
}

/// Renders the `file: class `c`, field `f`: ` prefix of a [`PolicyError`].
fn location_prefix(file: Option<&Path>, class: Option<&str>, field: Option<&str>) -> String {
    let mut parts = Vec::with_capacity(2);
    if let Some(class) = class {
        parts.push(format!("class `{class}`"));
    }
    if let Some(field) = field {
        parts.push(format!("field `{field}`"));
    }
    let mut out = String::new();
    if let Some(file) = file {
        out.push_str(&file.display().to_string());
        out.push_str(": ");
    }
    if !parts.is_empty() {
        out.push_str(&parts.join(", "));
        out.push_str(": ");
    }
    out
}

impl PolicyError {
    fn new(message: impl Into<String>) -> Self {
        PolicyError {
            file: None,
            class: None,
            field: None,
            message: message.into(),
        }
    }

    fn field_error(field: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            field: Some(field.into()),
            ..PolicyError::new(message)
        }
    }

    fn class_error(class: &str, field: Option<&str>, message: impl Into<String>) -> Self {
        PolicyError {
            class: Some(class.to_owned()),
            field: field.map(str::to_owned),
            ..PolicyError::new(message)
        }
    }

    fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }

    /// The policy file the error is in; `None` when the policy did not come from a file.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The class the error is in; `None` for namespace-level and syntax errors.
    pub fn class(&self) -> Option<&str> {
        self.class.as_deref()
    }

    /// The field at fault (`ttl`, `namespace.env`, …); `None` when the error is about a whole class or file.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// What is wrong, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }
}

// ---------------------------------------------------------------------------------------------------------
// Jitter
// ---------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------
// Cache class
// ---------------------------------------------------------------------------------------------------------

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
        }
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

    /// The longest an entry of this class (value, negative entry or fill lease) can live.
    fn max_lifetime(&self) -> Duration {
        self.ttl
            .saturating_add(self.max_jitter())
            .saturating_add(self.lease_ttl)
    }

    /// Checks every rule; the error names the field at fault.
    fn validate(&self) -> Result<(), (&'static str, String)> {
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
        Ok(())
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

fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

// ---------------------------------------------------------------------------------------------------------
// Classes
// ---------------------------------------------------------------------------------------------------------

/// What a class is and how it behaves.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClassKind {
    /// A cache-aside class (`kind = "cache"`).
    Cache(CacheClass),
    /// A rate limit (`kind = "rate_limit"`).
    RateLimit(RateLimitClass),
    /// Sessions (`kind = "session"`).
    Session(SessionClass),
    /// Distributed locks with fencing tokens (`kind = "lock"`).
    Lock(LockClass),
    /// Idempotency keys (`kind = "idempotency"`).
    Idempotency(IdempotencyClass),
}

impl ClassKind {
    /// The kind as written in TOML: `"cache"`, `"rate_limit"`, `"session"`, `"lock"`, `"idempotency"`.
    pub fn name(&self) -> &'static str {
        match self {
            ClassKind::Cache(_) => "cache",
            ClassKind::RateLimit(_) => "rate_limit",
            ClassKind::Session(_) => "session",
            ClassKind::Lock(_) => "lock",
            ClassKind::Idempotency(_) => "idempotency",
        }
    }

    /// The version that is part of every key of the class.
    pub fn version(&self) -> u32 {
        match self {
            ClassKind::Cache(c) => c.version_value(),
            ClassKind::RateLimit(r) => r.version_value(),
            ClassKind::Session(s) => s.version_value(),
            ClassKind::Lock(l) => l.version_value(),
            ClassKind::Idempotency(i) => i.version_value(),
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        match self {
            ClassKind::Cache(c) => c.validate(),
            ClassKind::RateLimit(r) => r.validate(),
            ClassKind::Session(s) => s.validate(),
            ClassKind::Lock(l) => l.validate(),
            ClassKind::Idempotency(i) => i.validate(),
        }
    }

    /// How long a cache value of this class can live (zero for kinds that hold no cache values).
    fn max_lifetime(&self) -> Duration {
        match self {
            ClassKind::Cache(c) => c.max_lifetime(),
            _ => Duration::ZERO,
        }
    }
}

/// One named class of a policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Class {
    name: String,
    kind: ClassKind,
}

impl Class {
    /// The class name, as used in keys.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the class is, with its settings.
    pub fn kind(&self) -> &ClassKind {
        &self.kind
    }

    /// The cache settings, if this is a cache class.
    pub fn as_cache(&self) -> Option<&CacheClass> {
        match &self.kind {
            ClassKind::Cache(c) => Some(c),
            _ => None,
        }
    }

    /// The rate-limit settings, if this is a rate-limit class.
    pub fn as_rate_limit(&self) -> Option<&RateLimitClass> {
        match &self.kind {
            ClassKind::RateLimit(r) => Some(r),
            _ => None,
        }
    }

    /// The session settings, if this is a session class.
    pub fn as_session(&self) -> Option<&SessionClass> {
        match &self.kind {
            ClassKind::Session(s) => Some(s),
            _ => None,
        }
    }

    /// The lock settings, if this is a lock class.
    pub fn as_lock(&self) -> Option<&LockClass> {
        match &self.kind {
            ClassKind::Lock(l) => Some(l),
            _ => None,
        }
    }

    /// The idempotency settings, if this is an idempotency class.
    pub fn as_idempotency(&self) -> Option<&IdempotencyClass> {
        match &self.kind {
            ClassKind::Idempotency(i) => Some(i),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------------------

/// A validated policy: the namespace (`env`, `app`) and its classes.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    env: String,
    app: String,
    classes: BTreeMap<String, Class>,
}

impl Policy {
    /// Starts a policy in code for the namespace `env`/`app`; [`PolicyBuilder::build`] validates it.
    pub fn builder(env: impl Into<String>, app: impl Into<String>) -> PolicyBuilder {
        PolicyBuilder {
            env: env.into(),
            app: app.into(),
            classes: Vec::new(),
        }
    }

    /// Parses and validates a policy from TOML text (errors carry no file).
    pub fn from_toml_str(text: &str) -> Result<Policy, PolicyError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let location = e
                .span()
                .map(|span| {
                    let (line, column) = line_column(text, span.start);
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            PolicyError::new(format!(
                "invalid TOML{location}: {}",
                e.message().trim_end()
            ))
        })?;
        from_table(table)
    }

    /// Reads, parses and validates a policy file; every error (an unreadable file too) carries the path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::new(format!("cannot read policy file: {e}")).in_file(path))?;
        Policy::from_toml_str(&text).map_err(|e| e.in_file(path))
    }

    /// The environment part of the namespace (`prod`).
    pub fn env(&self) -> &str {
        &self.env
    }

    /// The application part of the namespace (`shop`).
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The class with this name, if declared.
    pub fn class(&self, name: &str) -> Option<&Class> {
        self.classes.get(name)
    }

    /// Every class, sorted by name.
    pub fn classes(&self) -> impl Iterator<Item = &Class> {
        self.classes.values()
    }

    /// Upper bound on how long any cache value written under this policy can live: max over cache classes of
    /// (ttl + max jitter + lease_ttl); `Duration::ZERO` if none.
    pub fn max_entry_lifetime(&self) -> Duration {
        self.classes
            .values()
            .map(|c| c.kind.max_lifetime())
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Policy {
    /// A readable summary: the namespace, then one block per class with every field.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "namespace: env = {}, app = {}", self.env, self.app)?;
        if self.classes.is_empty() {
            writeln!(f, "classes: none")?;
        }
        for class in self.classes.values() {
            writeln!(f)?;
            writeln!(f, "class {} ({})", class.name, class.kind.name())?;
            match &class.kind {
                ClassKind::Cache(c) => {
                    writeln!(f, "  ttl:             {}", fmt_duration(c.ttl))?;
                    writeln!(
                        f,
                        "  jitter:          {} (up to {})",
                        c.jitter,
                        fmt_duration(c.max_jitter())
                    )?;
                    writeln!(f, "  version:         {}", c.version)?;
                    match c.negative_ttl {
                        Some(d) => writeln!(f, "  negative_ttl:    {}", fmt_duration(d))?,
                        None => writeln!(
                            f,
                            "  negative_ttl:    off (not-found results are not cached)"
                        )?,
                    }
                    writeln!(f, "  max_value_bytes: {}", c.max_value_bytes)?;
                    writeln!(f, "  invalidation:    {}", c.invalidation)?;
                    writeln!(f, "  personal:        {}", c.personal)?;
                    writeln!(f, "  allow_shared:    {}", c.allow_shared)?;
                    writeln!(f, "  lease_ttl:       {}", fmt_duration(c.lease_ttl))?;
                    writeln!(f, "  loader_timeout:  {}", fmt_duration(c.loader_timeout))?;
                }
                ClassKind::RateLimit(r) => r.describe(f)?,
                ClassKind::Session(c) => c.describe(f)?,
                ClassKind::Lock(c) => c.describe(f)?,
                ClassKind::Idempotency(c) => c.describe(f)?,
            }
        }
        if !self.classes.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "max entry lifetime: {}",
                fmt_duration(self.max_entry_lifetime())
            )?;
        }
        Ok(())
    }
}

/// Builds a [`Policy`] in code; [`build`](Self::build) runs the same validation as TOML loading.
#[must_use]
#[derive(Clone, Debug)]
pub struct PolicyBuilder {
    env: String,
    app: String,
    classes: Vec<(String, ClassKind)>,
}

impl PolicyBuilder {
    /// Declares a cache class.
    pub fn cache(mut self, name: impl Into<String>, class: CacheClass) -> Self {
        self.classes.push((name.into(), ClassKind::Cache(class)));
        self
    }

    /// Declares a rate-limit class.
    pub fn rate_limit(mut self, name: impl Into<String>, class: RateLimitClass) -> Self {
        self.classes
            .push((name.into(), ClassKind::RateLimit(class)));
        self
    }

    /// Declares a session class.
    pub fn session(mut self, name: impl Into<String>, class: SessionClass) -> Self {
        self.classes.push((name.into(), ClassKind::Session(class)));
        self
    }

    /// Declares a lock class.
    pub fn lock(mut self, name: impl Into<String>, class: LockClass) -> Self {
        self.classes.push((name.into(), ClassKind::Lock(class)));
        self
    }

    /// Declares an idempotency-key class.
    pub fn idempotency(mut self, name: impl Into<String>, class: IdempotencyClass) -> Self {
        self.classes
            .push((name.into(), ClassKind::Idempotency(class)));
        self
    }

    /// Validates and returns the policy; a duplicate class name is an error.
    pub fn build(self) -> Result<Policy, PolicyError> {
        assemble(self.env, self.app, self.classes)
    }
}

/// The one validation every policy goes through, whether from TOML or the builder.
fn assemble(
    env: String,
    app: String,
    classes: Vec<(String, ClassKind)>,
) -> Result<Policy, PolicyError> {
    check_namespace_part("namespace.env", &env)?;
    check_namespace_part("namespace.app", &app)?;
    let mut map = BTreeMap::new();
    for (name, kind) in classes {
        check_class_name(&name)?;
        kind.validate()
            .map_err(|(field, message)| PolicyError::class_error(&name, Some(field), message))?;
        if map.contains_key(&name) {
            return Err(PolicyError::class_error(
                &name,
                None,
                "declared more than once",
            ));
        }
        map.insert(name.clone(), Class { name, kind });
    }
    Ok(Policy {
        env,
        app,
        classes: map,
    })
}

fn check_namespace_part(field: &str, value: &str) -> Result<(), PolicyError> {
    let bytes = value.as_bytes();
    let ok = (1..=MAX_NAMESPACE_LEN).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(PolicyError::field_error(
            field,
            format!(
                "invalid value {value:?}: must be 1 to {MAX_NAMESPACE_LEN} characters of [a-z0-9_.-], \
                 starting with [a-z0-9]"
            ),
        ))
    }
}

fn check_class_name(name: &str) -> Result<(), PolicyError> {
    let bytes = name.as_bytes();
    let ok = (1..=MAX_CLASS_NAME_LEN).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PolicyError::class_error(
            name,
            None,
            format!(
                "invalid class name: must be 1 to {MAX_CLASS_NAME_LEN} characters of [a-z][a-z0-9_]*"
            ),
        ))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---------------------------------------------------------------------------------------------------------
// TOML loading
// ---------------------------------------------------------------------------------------------------------

fn from_table(mut table: toml::Table) -> Result<Policy, PolicyError> {
    let namespace = table.remove("namespace").ok_or_else(|| {
        PolicyError::field_error("namespace", "missing [namespace] table (with env and app)")
    })?;
    let toml::Value::Table(mut namespace) = namespace else {
        return Err(PolicyError::field_error(
            "namespace",
            format!("expected a table, found {}", namespace.type_str()),
        ));
    };
    let mut namespace_str = |key: &str| -> Result<String, PolicyError> {
        let field = format!("namespace.{key}");
        match namespace.remove(key) {
            Some(toml::Value::String(s)) => Ok(s),
            Some(other) => Err(PolicyError::field_error(
                field,
                format!("expected a string, found {}", other.type_str()),
            )),
            None => Err(PolicyError::field_error(field, "missing required field")),
        }
    };
    let env = namespace_str("env")?;
    let app = namespace_str("app")?;
    if let Some(key) = namespace.keys().next() {
        return Err(PolicyError::field_error(
            format!("namespace.{key}"),
            "unknown field; [namespace] accepts env, app",
        ));
    }

    let classes_table = match table.remove("classes") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return Err(PolicyError::field_error(
                "classes",
                format!("expected a table, found {}", other.type_str()),
            ));
        }
    };
    if let Some(key) = table.keys().next() {
        return Err(PolicyError::field_error(
            key.as_str(),
            "unknown top-level field; a policy has [namespace] and [classes.*]",
        ));
    }

    let mut classes = Vec::with_capacity(classes_table.len());
    for (name, value) in classes_table {
        let toml::Value::Table(class_table) = value else {
            return Err(PolicyError::class_error(
                &name,
                None,
                format!("expected a table, found {}", value.type_str()),
            ));
        };
        let kind = parse_class(&name, class_table)?;
        classes.push((name, kind));
    }
    assemble(env, app, classes)
}

/// Reads the fields of one class table, naming the class and field in every error.
struct ClassFields<'a> {
    class: &'a str,
    table: toml::Table,
}

impl ClassFields<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::class_error(self.class, Some(field), message)
    }

    fn type_error(&self, field: &str, expected: &str, found: &toml::Value) -> PolicyError {
        self.error(
            field,
            format!("expected {expected}, found {}", found.type_str()),
        )
    }

    fn string(&mut self, field: &str) -> Result<Option<String>, PolicyError> {
        match self.table.remove(field) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.type_error(field, "a string", &other)),
        }
    }

    fn required_string(&mut self, field: &str) -> Result<String, PolicyError> {
        self.string(field)?
            .ok_or_else(|| self.error(field, "missing required field"))
    }

    fn duration(&mut self, field: &str) -> Result<Option<Duration>, PolicyError> {
        match self.table.remove(field) {
            None => Ok(None),
            Some(toml::Value::String(s)) => {
                humantime::parse_duration(s.trim()).map(Some).map_err(|e| {
                    self.error(
                        field,
                        format!(
                            "invalid duration `{s}`: {e} (expected e.g. \"30s\", \"10m\", \"1h\")"
                        ),
                    )
                })
            }
            Some(other) => Err(self.type_error(field, "a duration string like \"10m\"", &other)),
        }
    }

    fn required_duration(&mut self, field: &str) -> Result<Duration, PolicyError> {
        self.duration(field)?
            .ok_or_else(|| self.error(field, "missing required field"))
    }

    fn integer<T: TryFrom<i64>>(
        &mut self,
        field: &str,
        range: &str,
    ) -> Result<Option<T>, PolicyError> {
        match self.table.remove(field) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => T::try_from(i)
                .map(Some)
                .map_err(|_| self.error(field, format!("must be {range}, got {i}"))),
            Some(other) => Err(self.type_error(field, "an integer", &other)),
        }
    }

    /// An error naming the first field that `kind` does not accept.
    fn reject_unknown(&self, kind: &str, accepted: &[&str]) -> Result<(), PolicyError> {
        match self.table.keys().find(|k| !accepted.contains(&k.as_str())) {
            Some(unknown) => Err(self.error(
                unknown,
                format!(
                    "unknown field; a {kind} class accepts {}",
                    accepted.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    fn boolean(&mut self, field: &str) -> Result<Option<bool>, PolicyError> {
        match self.table.remove(field) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(b)),
            Some(other) => Err(self.type_error(field, "true or false", &other)),
        }
    }
}

fn parse_class(name: &str, table: toml::Table) -> Result<ClassKind, PolicyError> {
    let mut fields = ClassFields { class: name, table };
    let known_kinds = KNOWN_KINDS
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let kind = fields.string("kind")?.ok_or_else(|| {
        fields.error(
            "kind",
            format!("missing required field; known kinds: {known_kinds}"),
        )
    })?;
    match kind.as_str() {
        "cache" => parse_cache(fields).map(ClassKind::Cache),
        "rate_limit" => rate_limit::parse_rate_limit(fields).map(ClassKind::RateLimit),
        "session" => session::parse_session(fields).map(ClassKind::Session),
        "lock" => lock::parse_lock(fields).map(ClassKind::Lock),
        "idempotency" => idempotency::parse_idempotency(fields).map(ClassKind::Idempotency),
        other => Err(fields.error(
            "kind",
            format!("unknown kind \"{other}\"; known kinds: {known_kinds}"),
        )),
    }
}

fn parse_cache(mut f: ClassFields<'_>) -> Result<CacheClass, PolicyError> {
    if let Some(unknown) = f.table.keys().find(|k| !CACHE_FIELDS.contains(&k.as_str())) {
        return Err(f.error(
            unknown,
            format!(
                "unknown field; a cache class accepts {}",
                CACHE_FIELDS.join(", ")
            ),
        ));
    }
    let ttl = f.required_duration("ttl")?;
    let invalidation = f.required_string("invalidation")?;
    let mut class = CacheClass::new(ttl, invalidation);
    if let Some(text) = f.string("jitter")? {
        class.jitter = Jitter::parse(&text).map_err(|m| f.error("jitter", m))?;
    }
    if let Some(v) = f.integer::<u32>("version", "an integer from 1 to 4294967295")? {
        class.version = v;
    }
    class.negative_ttl = f.duration("negative_ttl")?;
    if let Some(n) = f.integer::<usize>(
        "max_value_bytes",
        &format!("an integer from 1 to {MAX_VALUE_BYTES_LIMIT}"),
    )? {
        class.max_value_bytes = n;
    }
    if let Some(b) = f.boolean("personal")? {
        class.personal = b;
    }
    if let Some(b) = f.boolean("allow_shared")? {
        class.allow_shared = b;
    }
    if let Some(d) = f.duration("lease_ttl")? {
        class.lease_ttl = d;
    }
    if let Some(d) = f.duration("loader_timeout")? {
        class.loader_timeout = d;
    }
    if let Some(text) = f.string("on_error")? {
        class.on_error = match text.as_str() {
            "fail_open" => CacheOnError::FailOpen,
            "error" => CacheOnError::Error,
            other => {
                return Err(f.error(
                    "on_error",
                    format!("unknown value \"{other}\"; expected \"fail_open\" or \"error\""),
                ));
            }
        };
    }
    Ok(class)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"
[namespace]
env = "prod"
app = "shop"

[classes.product_list]
kind = "cache"
ttl = "10m"                 # humantime duration, required, > 0, <= 365 days
jitter = "10%"              # "N%" (0..=100, integer or decimal) or a duration ("30s"); default "10%"; a fixed jitter must be <= ttl
version = 1                 # integer >= 1, default 1
negative_ttl = "30s"        # optional; absent => `None` results are not cached; must be > 0 and <= ttl
max_value_bytes = 1048576   # default 1 MiB (1048576), must be 1..=536870912
invalidation = "catalog service, after every product write"   # REQUIRED, non-empty after trim: who invalidates this class, in one sentence
personal = false            # default false
allow_shared = false        # default false
lease_ttl = "10s"           # fill lease lifetime, default 10s, must be > loader_timeout
loader_timeout = "5s"       # default 5s, must be > 0
"#;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A minimal valid policy with one class whose body is `body`.
    fn one_class(body: &str) -> String {
        format!(
            "[namespace]\nenv = \"prod\"\napp = \"shop\"\n\n[classes.product_list]\nkind = \"cache\"\n\
             invalidation = \"catalog service\"\n{body}\n"
        )
    }

    #[track_caller]
    fn toml_err(body: &str) -> PolicyError {
        Policy::from_toml_str(&one_class(body)).expect_err("policy should be rejected")
    }

    #[track_caller]
    fn assert_class_field(err: &PolicyError, field: &str) {
        assert_eq!(err.class(), Some("product_list"), "{err}");
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("class `product_list`, field `{field}`: ")),
            "{err}"
        );
    }

    #[track_caller]
    fn builder_err(class: CacheClass) -> PolicyError {
        Policy::builder("prod", "shop")
            .cache("product_list", class)
            .build()
            .expect_err("should be rejected")
    }

    fn base() -> CacheClass {
        CacheClass::new(secs(600), "catalog service")
    }

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
    fn from_file_round_trip_and_errors_carry_the_path() {
        let dir = std::env::temp_dir().join(format!("keyward-policy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, EXAMPLE).unwrap();
        assert_eq!(
            Policy::from_file(&good).unwrap(),
            Policy::from_toml_str(EXAMPLE).unwrap()
        );

        let bad = dir.join("policy.toml");
        std::fs::write(&bad, one_class("ttl = \"0s\"")).unwrap();
        let err = Policy::from_file(&bad).unwrap_err();
        assert_eq!(err.file(), Some(bad.as_path()));
        assert_class_field(&err, "ttl");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: class `product_list`, field `ttl`: must be greater than zero",
                bad.display()
            )
        );

        let missing = dir.join("missing.toml");
        let err = Policy::from_file(&missing).unwrap_err();
        assert_eq!(err.file(), Some(missing.as_path()));
        assert!(err.message().contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn error_display_omits_absent_parts() {
        assert_eq!(PolicyError::new("boom").to_string(), "boom");
        assert_eq!(
            PolicyError::field_error("namespace.env", "bad").to_string(),
            "field `namespace.env`: bad"
        );
        assert_eq!(
            PolicyError::class_error("a", None, "bad").to_string(),
            "class `a`: bad"
        );
        let e = PolicyError::class_error("a", Some("ttl"), "bad").in_file(Path::new("policy.toml"));
        assert_eq!(e.to_string(), "policy.toml: class `a`, field `ttl`: bad");
        assert_eq!(e.message(), "bad");
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
    fn unknown_field_is_named() {
        let err = toml_err("ttl = \"10m\"\ntll = \"5m\"");
        assert_class_field(&err, "tll");
        assert!(err.message().contains("unknown field"), "{err}");

        let err = Policy::from_toml_str("[namespace]\nenv = \"a\"\napp = \"b\"\nregion = \"eu\"\n")
            .unwrap_err();
        assert_eq!(err.field(), Some("namespace.region"));
        assert_eq!(err.class(), None);

        let err = Policy::from_toml_str("extra = 1\n[namespace]\nenv = \"a\"\napp = \"b\"\n")
            .unwrap_err();
        assert_eq!(err.field(), Some("extra"));
    }

    #[test]
    fn unknown_or_missing_kind_lists_known_kinds() {
        let text = "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.login]\nkind = \"stream\"\n";
        let err = Policy::from_toml_str(text).unwrap_err();
        assert_eq!(err.class(), Some("login"));
        assert_eq!(err.field(), Some("kind"));
        assert!(
            err.message().contains("stream")
                && err.message().contains("\"session\"")
                && err.message().contains("\"cache\"")
                && err.message().contains("\"rate_limit\""),
            "{err}"
        );

        let text = "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.login]\nttl = \"1m\"\n";
        let err = Policy::from_toml_str(text).unwrap_err();
        assert_eq!((err.class(), err.field()), (Some("login"), Some("kind")));

        let text = "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.login]\nkind = 3\n";
        let err = Policy::from_toml_str(text).unwrap_err();
        assert_eq!((err.class(), err.field()), (Some("login"), Some("kind")));
    }

    #[test]
    fn namespace_rules() {
        let err = Policy::from_toml_str("").unwrap_err();
        assert_eq!(err.field(), Some("namespace"));
        let err = Policy::from_toml_str("namespace = 1").unwrap_err();
        assert_eq!(err.field(), Some("namespace"));
        let err = Policy::from_toml_str("[namespace]\napp = \"shop\"\n").unwrap_err();
        assert_eq!(err.field(), Some("namespace.env"));
        let err = Policy::from_toml_str("[namespace]\nenv = \"prod\"\n").unwrap_err();
        assert_eq!(err.field(), Some("namespace.app"));
        let err = Policy::from_toml_str("[namespace]\nenv = 1\napp = \"shop\"\n").unwrap_err();
        assert_eq!(err.field(), Some("namespace.env"));

        for good in ["a", "prod", "0", "eu-west.1_x", &"a".repeat(32)] {
            assert!(Policy::builder(good, good).build().is_ok(), "{good}");
        }
        for bad in [
            "",
            "Prod",
            "-prod",
            ".x",
            "_x",
            "a:b",
            "a b",
            "ü",
            "a*",
            &"a".repeat(33),
        ] {
            let err = Policy::builder(bad, "shop").build().unwrap_err();
            assert_eq!(err.field(), Some("namespace.env"), "{bad}");
            let err = Policy::builder("prod", bad).build().unwrap_err();
            assert_eq!(err.field(), Some("namespace.app"), "{bad}");
        }
        let err =
            Policy::from_toml_str("[namespace]\nenv = \"Prod\"\napp = \"shop\"\n").unwrap_err();
        assert_eq!(err.field(), Some("namespace.env"));
    }

    #[test]
    fn class_name_rules() {
        for good in ["a", "product_list", "a1_", &"a".repeat(64)] {
            assert!(
                Policy::builder("p", "s")
                    .cache(good, base())
                    .build()
                    .is_ok(),
                "{good}"
            );
        }
        for bad in [
            "",
            "_kw",
            "1a",
            "A",
            "productList",
            "a-b",
            "a:b",
            "a.b",
            "é",
            &"a".repeat(65),
        ] {
            let err = Policy::builder("p", "s")
                .cache(bad, base())
                .build()
                .unwrap_err();
            assert_eq!(err.class(), Some(bad), "{bad}");
            assert!(err.message().contains("invalid class name"), "{err}");
        }
        let text = "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes._kw]\nkind = \"cache\"\nttl = \"1m\"\ninvalidation = \"x\"\n";
        assert_eq!(
            Policy::from_toml_str(text).unwrap_err().class(),
            Some("_kw")
        );
        let text = "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes]\nproduct = 3\n";
        assert_eq!(
            Policy::from_toml_str(text).unwrap_err().class(),
            Some("product")
        );
    }

    #[test]
    fn duplicate_class_in_builder_is_an_error() {
        let err = Policy::builder("p", "s")
            .cache("a", base())
            .cache("a", base())
            .build()
            .unwrap_err();
        assert_eq!(err.class(), Some("a"));
        assert!(err.message().contains("more than once"), "{err}");
    }

    #[test]
    fn empty_policy_is_valid() {
        let p = Policy::from_toml_str("[namespace]\nenv = \"dev\"\napp = \"shop\"\n").unwrap();
        assert_eq!(p.classes().count(), 0);
        assert_eq!(p.max_entry_lifetime(), Duration::ZERO);
        assert_eq!(p, Policy::builder("dev", "shop").build().unwrap());
        assert!(p.to_string().contains("classes: none"));
        let p = Policy::from_toml_str("[namespace]\nenv = \"dev\"\napp = \"shop\"\n[classes]\n")
            .unwrap();
        assert_eq!(p.classes().count(), 0);
    }

    #[test]
    fn toml_syntax_error_has_location() {
        let err = Policy::from_toml_str("[namespace]\nenv = \"prod\napp = \"shop\"\n").unwrap_err();
        assert!(err.message().starts_with("invalid TOML at line 2"), "{err}");
        assert_eq!((err.class(), err.field(), err.file()), (None, None, None));
    }

    #[test]
    fn classes_sorted_and_max_lifetime_is_the_maximum() {
        let p = Policy::builder("p", "s")
            .cache(
                "zeta",
                CacheClass::new(secs(60), "x").jitter(Jitter::Fixed(secs(5))),
            )
            .cache(
                "alpha",
                CacheClass::new(secs(100), "x")
                    .jitter(Jitter::Percent(50.0))
                    .lease_ttl(secs(20)),
            )
            .cache("mid", CacheClass::new(secs(10), "x"))
            .build()
            .unwrap();
        let names: Vec<_> = p.classes().map(Class::name).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert_eq!(p.max_entry_lifetime(), secs(100 + 50 + 20));
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
            "max entry lifetime: 10m 50s",
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
}
