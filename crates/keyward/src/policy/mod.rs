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
//! on_error = "fail_open"      # "fail_open" (default: the loader runs, nothing is written) | "error"
//! l1 = { capacity = "64 MiB", ttl = "30s" }   # optional in-process tier: bytes (integer, or a size with a unit), ttl <= ttl
//! l1_max_stale = "1s"         # with l1 only: longest an instance serves L1 after an invalidation anywhere; default 1s, >= 20ms
//! stale_grace = "10m"         # optional fail-safe: values kept this long past their TTL, served when a refill fails
//! soft_timeout = "200ms"      # with stale_grace only: wait this long for a refill, then serve the stale value; < loader_timeout
//! fail_safe_throttle = "5s"   # with stale_grace only: after a failed refill, serve the stale value as is this long; default 5s
//! refresh_ahead = "1m"        # optional eager refresh: in the last minute of the TTL one caller refreshes; < ttl
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
//!
//! [classes.order_events]
//! kind = "stream"
//! retention = { maxlen = 100000, max_age = "7d" }   # REQUIRED, maxlen and/or max_age (an unbounded stream is refused);
//!                             # approximate = true (default: `~` trims); hard_maxlen = 10 × maxlen (1000000 if age only):
//!                             # the cap that holds even when a group lags (see docs/streams.md)
//! max_deliveries = 5          # deliveries before the dead letters, 1..=1000, default 5
//! backoff = { base = "1s", factor = 2, max = "5m", jitter = "20%" }   # retry delays (these are the defaults)
//! claim_idle = "60s"          # a pending entry idle this long is taken over by live workers, 100ms..=24h
//! dead_letter = { maxlen = 10000, max_age = "14d" }   # the dead-letter stream's retention (default); false = off
//! max_message_bytes = 1048576 # largest encoded message, default 1 MiB, 1..=64 MiB
//! version = 1
//!
//! [classes.catalog_changes]
//! kind = "channel"            # typed pub/sub: broadcasts that may be lost (no TTL: nothing is stored)
//! max_message_bytes = 65536   # default 64 KiB, at most 8 MiB
//! version = 1                 # part of the channel name
//! ```
//!
//! `kind` is required for every class: `"cache"`, `"rate_limit"`, `"session"`, `"lock"`, `"idempotency"`,
//! `"stream"` or `"channel"`. Unknown fields anywhere are
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
//!
//! # One file, several environments
//!
//! A service deploys one policy file to every environment; the namespace's `env` (and `app`) come from the
//! environment variables `KEYWARD_ENV` and `KEYWARD_APP` when they are set, through
//! [`Policy::with_env_overrides`]:
//!
//! ```no_run
//! # use keyward::policy::Policy;
//! // policy.toml says env = "dev"; with KEYWARD_ENV=prod the keys are `prod:shop:…`.
//! let policy = Policy::from_file("policy.toml")?.with_env_overrides()?;
//! # Ok::<(), keyward::policy::PolicyError>(())
//! ```
//!
//! A value from the environment is validated exactly like the file's, and a bad one is an error naming the
//! variable ([`PolicyError::variable`]). Nothing is read from the environment unless you call it; operator
//! tools reading the same file must be given the same namespace.
//!
//! # Eviction
//!
//! Each kind states whether the embedded store may evict its entries to make room
//! ([`ClassKind::evictable`], shown as `eviction:` in the [`Policy`] display): cache entries may be evicted
//! under memory pressure (a miss costs a reload); rate-limit state, sessions, locks and idempotency records
//! never are.
//!
//! # Adding a class kind
//!
//! A kind lives in one file, `policy/<kind>.rs`. Registering it takes its `mod` and `pub use` lines here
//! and one entry in the `class_kinds!` invocation below (variant, TOML name, `Class::as_…` accessor,
//! `PolicyBuilder` method), which generates the [`ClassKind`] variant and all the dispatch: `name`,
//! `version`, `evictable`, validation, display, TOML loading and the list of known kinds. (The `mod` line
//! stays outside the macro so that rustfmt still finds the file.) The kind's file holds:
//!
//! 1. the public settings type (`FooClass`) with `new`, chained setters and `…_value` getters;
//! 2. its raw TOML form, a private struct with `#[derive(Deserialize)] #[serde(deny_unknown_fields)]`
//!    whose fields are `Option<…>` of the field types in `policy/fields.rs` (`Dur`, `Int`, `Flag`, `Text`);
//! 3. `impl ClassSpec for FooClass`: `from_raw` (raw → settings; required fields, names of enum values,
//!    integer ranges), `validate` (every rule, for TOML and builder alike), `describe` (its lines of the
//!    [`Policy`] display), `key_version`, `EVICTABLE` (may the embedded store evict its entries?) and,
//!    for a kind that holds cache values, `max_value_lifetime`.
//!
//! Then document its fields in the TOML example above.
//!
//! Every error is a `(field, message)` pair; the loader adds the file and class. Unknown fields, type
//! errors, the list of known kinds and the TOML syntax errors need nothing from the kind.
//!
//! Why not `#[serde(tag = "kind")]` on an enum of the raw structs: serde buffers an internally tagged
//! value before it picks the variant, and errors raised from the buffer no longer say which field they
//! are in. The loader reads `kind` itself and hands the rest of the table to that kind's raw struct,
//! which is what the tagged enum would do, with the field path intact.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

mod cache;
mod channel;
mod fields;
mod idempotency;
mod lock;
mod rate_limit;
mod session;
mod stream;

pub use cache::{CacheClass, CacheOnError, Jitter, L1Tier};
pub use channel::ChannelClass;
pub use idempotency::IdempotencyClass;
pub use lock::LockClass;
pub use rate_limit::{Algorithm, OnError, RateLimitClass};
pub use session::{DEFAULT_COOKIE_NAME, SameSite, SessionClass};
pub use stream::{Backoff, Retention, StreamClass};

use fields::{TableError, Text, deserialize_table};

/// Longest allowed TTL: 365 days.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// The environment variable that overrides `namespace.env` ([`Policy::with_env_overrides`]).
pub const ENV_VAR: &str = "KEYWARD_ENV";
/// The environment variable that overrides `namespace.app` ([`Policy::with_env_overrides`]).
pub const APP_VAR: &str = "KEYWARD_APP";

/// Longest `env` / `app`.
const MAX_NAMESPACE_LEN: usize = 32;
/// Longest class name.
const MAX_CLASS_NAME_LEN: usize = 64;

/// A rule broken by one field of a class: the field's name and what is wrong with it.
type FieldError = (&'static str, String);

/// What each class kind provides to the policy; implemented once per kind, in the kind's own file.
trait ClassSpec: Sized {
    /// The TOML form of the class, without `kind`: a `#[serde(deny_unknown_fields)]` struct.
    type Raw: DeserializeOwned;

    /// Whether the embedded store may evict entries of this kind to make room (see
    /// [`ClassKind::evictable`]).
    const EVICTABLE: bool;

    /// Turns the TOML form into the settings: required fields, value names, integer ranges. The rules
    /// shared with the builder are left to [`validate`](Self::validate), which runs afterwards.
    fn from_raw(raw: Self::Raw) -> Result<Self, FieldError>;

    /// Checks every rule; the error names the field at fault.
    fn validate(&self) -> Result<(), FieldError>;

    /// The version that is part of every key of the class.
    fn key_version(&self) -> u32;

    /// The class's lines in the [`Policy`] display (every field, two-space indented).
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;

    /// How long a cache value of this class can live; zero for kinds that hold no cache values.
    fn max_value_lifetime(&self) -> Duration {
        Duration::ZERO
    }
}

/// Declares the class kinds: the [`ClassKind`] enum and everything that dispatches on it.
///
/// One entry per kind: `Variant(SettingsType) = "toml_name", as_accessor, builder_method;`.
macro_rules! class_kinds {
    ($(
        $(#[$doc:meta])*
        $variant:ident($ty:ident) = $name:literal, $as_fn:ident, $builder_fn:ident;
    )*) => {
        /// What a class is and how it behaves.
        #[derive(Clone, Debug, PartialEq)]
        #[non_exhaustive]
        pub enum ClassKind {
            $(
                $(#[$doc])*
                $variant($ty),
            )*
        }

        /// Class kinds known to this version of keyward, as written in TOML.
        const KNOWN_KINDS: &[&str] = &[$($name),*];

        impl ClassKind {
            /// The kind as written in TOML: `"cache"`, `"rate_limit"`, `"session"`, `"lock"`,
            /// `"idempotency"`, `"stream"`.
            pub fn name(&self) -> &'static str {
                match self {
                    $(ClassKind::$variant(_) => $name,)*
                }
            }

            /// The version that is part of every key of the class.
            pub fn version(&self) -> u32 {
                match self {
                    $(ClassKind::$variant(c) => ClassSpec::key_version(c),)*
                }
            }

            /// Whether the embedded store may evict this class's entries under memory pressure. Only cache
            /// entries may be evicted (a miss costs a reload); rate-limit state, sessions, locks and
            /// idempotency records never are: losing them would let requests through, log users out, hand
            /// a lock to two holders or run a request twice. Redis applies its own `maxmemory-policy`.
            pub fn evictable(&self) -> bool {
                match self {
                    $(ClassKind::$variant(_) => <$ty as ClassSpec>::EVICTABLE,)*
                }
            }

            fn validate(&self) -> Result<(), FieldError> {
                match self {
                    $(ClassKind::$variant(c) => ClassSpec::validate(c),)*
                }
            }

            fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(ClassKind::$variant(c) => ClassSpec::describe(c, f),)*
                }
            }

            /// How long a cache value of this class can live (zero for kinds that hold no cache values).
            fn max_value_lifetime(&self) -> Duration {
                match self {
                    $(ClassKind::$variant(c) => ClassSpec::max_value_lifetime(c),)*
                }
            }

            /// Reads a class table (without `kind`) as the kind named `kind`; `None` for an unknown kind.
            fn from_table(kind: &str, table: toml::Table) -> Option<Result<ClassKind, TableError>> {
                match kind {
                    $($name => Some(parse_kind::<$ty>(table).map(ClassKind::$variant)),)*
                    _ => None,
                }
            }
        }

        impl Class {
            $(
                #[doc = concat!("The settings, if this is a `", $name, "` class.")]
                pub fn $as_fn(&self) -> Option<&$ty> {
                    match &self.kind {
                        ClassKind::$variant(c) => Some(c),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            )*
        }

        impl PolicyBuilder {
            $(
                #[doc = concat!("Declares a `", $name, "` class.")]
                pub fn $builder_fn(mut self, name: impl Into<String>, class: $ty) -> Self {
                    self.classes.push((name.into(), ClassKind::$variant(class)));
                    self
                }
            )*
        }
    };
}

class_kinds! {
    /// A cache-aside class (`kind = "cache"`).
    Cache(CacheClass) = "cache", as_cache, cache;
    /// A rate limit (`kind = "rate_limit"`).
    RateLimit(RateLimitClass) = "rate_limit", as_rate_limit, rate_limit;
    /// Sessions (`kind = "session"`).
    Session(SessionClass) = "session", as_session, session;
    /// Distributed locks with fencing tokens (`kind = "lock"`).
    Lock(LockClass) = "lock", as_lock, lock;
    /// Idempotency keys (`kind = "idempotency"`).
    Idempotency(IdempotencyClass) = "idempotency", as_idempotency, idempotency;
    /// A durable event stream read by consumer groups (`kind = "stream"`).
    Stream(StreamClass) = "stream", as_stream, stream;
    /// A typed pub/sub channel (`kind = "channel"`).
    Channel(ChannelClass) = "channel", as_channel, channel;
}

/// A raw class table of kind `K` deserialized, converted and (later, in [`assemble`]) validated.
fn parse_kind<K: ClassSpec>(table: toml::Table) -> Result<K, TableError> {
    let raw = deserialize_table::<K::Raw>(table)?;
    K::from_raw(raw).map_err(|(field, message)| TableError::Invalid {
        field: Some(field.to_owned()),
        message,
    })
}

/// Shared by every kind's display: `10m 30s`.
fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

// ---------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------

/// Why a policy was rejected.
///
/// Displays as `policy.toml: class `product_list`, field `ttl`: must be greater than zero`; the file, class
/// and field parts are left out when they do not apply.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error(
    "{}{message}",
    location_prefix(.file.as_deref(), .variable.as_deref(), .class.as_deref(), .field.as_deref())
)]
pub struct PolicyError {
    file: Option<PathBuf>,
    /// The environment variable the bad value came from ([`Policy::with_env_overrides`]).
    variable: Option<String>,
    class: Option<String>,
    field: Option<String>,
    message: String,
}

/// Renders the `file: class `c`, field `f`: ` prefix of a [`PolicyError`] (or `environment variable `V`
/// (overrides field `f`): ` when the value came from the environment).
fn location_prefix(
    file: Option<&Path>,
    variable: Option<&str>,
    class: Option<&str>,
    field: Option<&str>,
) -> String {
    if let Some(variable) = variable {
        let overrides = field.map(|f| format!(" (overrides field `{f}`)"));
        return format!(
            "environment variable `{variable}`{}: ",
            overrides.unwrap_or_default()
        );
    }
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
            variable: None,
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

    /// The environment variable the bad value came from ([`ENV_VAR`] or [`APP_VAR`], read by
    /// [`Policy::with_env_overrides`]); `None` when it came from the file or the builder.
    pub fn variable(&self) -> Option<&str> {
        self.variable.as_deref()
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
// Classes
// ---------------------------------------------------------------------------------------------------------

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
}

// ---------------------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------------------

/// A validated policy: the namespace (`env`, `app`) and its classes.
///
/// Only ever made through validation ([`from_file`](Self::from_file), [`from_toml_str`](Self::from_toml_str),
/// [`builder`](Self::builder)), so every `Policy` is valid. Its `Display` is the summary `keyward policy
/// check` prints.
///
/// ```
/// use keyward::policy::Policy;
///
/// let policy = Policy::from_toml_str(r#"
///     [namespace]
///     env = "dev"
///     app = "shop"
///
///     [classes.article]
///     kind = "cache"
///     ttl = "10m"
///     invalidation = "the article service, right after each article write"
///
///     [classes.login_per_ip]
///     kind = "rate_limit"
///     algorithm = "gcra"
///     limit = 5
///     window = "1m"
/// "#)?;
/// assert_eq!((policy.env(), policy.app()), ("dev", "shop"));
/// assert_eq!(policy.class("article").unwrap().kind().name(), "cache");
/// assert!(policy.to_string().contains("class login_per_ip (rate_limit)"));
///
/// // Errors name the class and the field.
/// let err = Policy::from_toml_str(r#"
///     [namespace]
///     env = "dev"
///     app = "shop"
///
///     [classes.article]
///     kind = "cache"
///     ttl = "0s"
///     invalidation = "the article service, right after each article write"
/// "#)
/// .unwrap_err();
/// assert_eq!((err.class(), err.field()), (Some("article"), Some("ttl")));
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
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
    ///
    /// # Errors
    /// [`PolicyError`] naming the class and field at fault (and the line and column of a TOML syntax error):
    /// invalid TOML, a missing `[namespace]` or required field, an unknown field or kind, a value out of its
    /// range, or a rule between fields broken (see the module docs for every rule).
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
        from_document(table)
    }

    /// Reads, parses and validates a policy file; every error (an unreadable file too) carries the path.
    ///
    /// ```no_run
    /// use keyward::policy::Policy;
    /// let policy = Policy::from_file("policy.toml")?.with_env_overrides()?;
    /// # Ok::<(), keyward::policy::PolicyError>(())
    /// ```
    ///
    /// # Errors
    /// [`PolicyError`] with [`file`](PolicyError::file) set: the file cannot be read (missing, no
    /// permission, not UTF-8), or as [`from_toml_str`](Self::from_toml_str).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::new(format!("cannot read policy file: {e}")).in_file(path))?;
        Policy::from_toml_str(&text).map_err(|e| e.in_file(path))
    }

    /// This policy with its namespace's `env` and `app` taken from the environment variables [`ENV_VAR`]
    /// (`KEYWARD_ENV`) and [`APP_VAR`] (`KEYWARD_APP`) where they are set: one policy file, deployed to
    /// several environments. A variable that is not set leaves the value as declared; a variable that is
    /// set is validated exactly like `namespace.env` / `namespace.app` in the file (1 to 32 characters of
    /// `[a-z0-9_.-]` starting with `[a-z0-9]`, nothing trimmed). A variable set to the empty string is an
    /// error, not "unset": a deployment that meant to set it must not silently write into the file's
    /// namespace.
    ///
    /// ```
    /// use keyward::policy::Policy;
    /// let policy = Policy::from_toml_str("[namespace]\nenv = \"dev\"\napp = \"shop\"\n")?;
    /// // In a deployment: `KEYWARD_ENV=prod` → keys live under `prod:shop:…`.
    /// let policy = policy.with_env_overrides()?;
    /// # Ok::<(), keyward::policy::PolicyError>(())
    /// ```
    ///
    /// # Errors
    /// [`PolicyError`] whose [`variable`](PolicyError::variable) names the variable and whose
    /// [`field`](PolicyError::field) is `namespace.env` or `namespace.app`, when a variable is set to an
    /// invalid value or to one that is not UTF-8.
    pub fn with_env_overrides(self) -> Result<Policy, PolicyError> {
        self.with_overrides(|name| match std::env::var(name) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err("is not valid UTF-8".to_owned()),
        })
    }

    /// [`with_env_overrides`](Self::with_env_overrides) with the variables read through `lookup` (given
    /// [`ENV_VAR`] or [`APP_VAR`], it returns the value if set) instead of the process environment: for
    /// tests, or configuration that arrives another way.
    ///
    /// ```
    /// use keyward::policy::{ENV_VAR, Policy};
    /// let policy = Policy::from_toml_str("[namespace]\nenv = \"dev\"\napp = \"shop\"\n")?;
    /// let prod = policy.clone().with_env_overrides_from(|v| (v == ENV_VAR).then(|| "prod".to_owned()))?;
    /// assert_eq!((prod.env(), prod.app()), ("prod", "shop"));
    ///
    /// let err = policy.with_env_overrides_from(|v| (v == ENV_VAR).then(|| "Prod".to_owned())).unwrap_err();
    /// assert_eq!(err.variable(), Some("KEYWARD_ENV"));
    /// assert_eq!(err.field(), Some("namespace.env"));
    /// # Ok::<(), keyward::policy::PolicyError>(())
    /// ```
    ///
    /// # Errors
    /// As [`with_env_overrides`](Self::with_env_overrides).
    pub fn with_env_overrides_from(
        self,
        mut lookup: impl FnMut(&str) -> Option<String>,
    ) -> Result<Policy, PolicyError> {
        self.with_overrides(|name| Ok(lookup(name)))
    }

    fn with_overrides(
        mut self,
        mut lookup: impl FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<Policy, PolicyError> {
        for (variable, field) in [(ENV_VAR, "namespace.env"), (APP_VAR, "namespace.app")] {
            let in_variable = |message: String| PolicyError {
                variable: Some(variable.to_owned()),
                ..PolicyError::field_error(field, message)
            };
            let Some(value) = lookup(variable).map_err(in_variable)? else {
                continue;
            };
            check_namespace_part(field, &value).map_err(|e| in_variable(e.message))?;
            if field == "namespace.env" {
                self.env = value;
            } else {
                self.app = value;
            }
        }
        Ok(self)
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
    /// (ttl + max jitter + lease_ttl, plus stale_grace + fail_safe_throttle + refresh_ahead for fail-safe
    /// classes); `Duration::ZERO` if none.
    pub fn max_entry_lifetime(&self) -> Duration {
        self.classes
            .values()
            .map(|c| c.kind.max_value_lifetime())
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Policy {
    /// A readable summary: the namespace, then one block per class with every field and its eviction rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "namespace: env = {}, app = {}", self.env, self.app)?;
        if self.classes.is_empty() {
            writeln!(f, "classes: none")?;
        }
        for class in self.classes.values() {
            writeln!(f)?;
            writeln!(f, "class {} ({})", class.name, class.kind.name())?;
            class.kind.describe(f)?;
            let eviction = if class.kind.evictable() {
                "allowed"
            } else {
                "never (embedded store; on Redis this needs maxmemory-policy noeviction)"
            };
            writeln!(f, "  {:<17}{eviction}", "eviction:")?;
        }
        // Only when there is a cache class: a policy of streams or rate limits alone printed "0s".
        if self.classes.values().any(|c| c.as_cache().is_some()) {
            writeln!(f)?;
            writeln!(
                f,
                "max cache entry lifetime: {}",
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
    /// Validates and returns the policy, with the same rules as a policy file.
    ///
    /// # Errors
    /// [`PolicyError`] naming the class and field at fault: an invalid `env`, `app` or class name, a class
    /// declared twice, or a class whose settings break a rule (see the module docs for every rule).
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
        // A long value is cut in the message (it may come from the environment, of any size).
        let shown: String = value.chars().take(MAX_NAMESPACE_LEN + 8).collect();
        let cut = if shown.len() < value.len() { "…" } else { "" };
        Err(PolicyError::field_error(
            field,
            format!(
                "invalid value {shown:?}{cut} ({} bytes): must be 1 to {MAX_NAMESPACE_LEN} characters of \
                 [a-z0-9_.-], starting with [a-z0-9]",
                value.len()
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

/// The document: `[namespace]` and `[classes.*]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    namespace: Option<fields::Table>,
    classes: Option<fields::Table>,
}

/// `[namespace]`: both fields required.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    env: Option<Text>,
    app: Option<Text>,
}

fn from_document(table: toml::Table) -> Result<Policy, PolicyError> {
    let doc: RawDocument = deserialize_table(table).map_err(|e| match e {
        TableError::Unknown { field, .. } => PolicyError::field_error(
            field,
            "unknown top-level field; a policy has [namespace] and [classes.*]",
        ),
        TableError::Invalid { field, message } => PolicyError {
            field,
            ..PolicyError::new(message)
        },
    })?;

    let namespace = doc.namespace.ok_or_else(|| {
        PolicyError::field_error("namespace", "missing [namespace] table (with env and app)")
    })?;
    let namespace: RawNamespace = deserialize_table(namespace.0).map_err(|e| match e {
        TableError::Unknown { field, .. } => PolicyError::field_error(
            format!("namespace.{field}"),
            "unknown field; [namespace] accepts env, app",
        ),
        TableError::Invalid { field, message } => PolicyError {
            field: Some(field.map_or_else(|| "namespace".to_owned(), |f| format!("namespace.{f}"))),
            ..PolicyError::new(message)
        },
    })?;
    let missing = |field: &str| PolicyError::field_error(field, "missing required field");
    let env = namespace.env.ok_or_else(|| missing("namespace.env"))?.0;
    let app = namespace.app.ok_or_else(|| missing("namespace.app"))?.0;

    let classes_table = doc.classes.map(|t| t.0).unwrap_or_default();
    let mut classes = Vec::with_capacity(classes_table.len());
    for (name, value) in classes_table {
        let toml::Value::Table(table) = value else {
            return Err(PolicyError::class_error(
                &name,
                None,
                format!("expected a table, found {}", value.type_str()),
            ));
        };
        let kind = parse_class(&name, table)?;
        classes.push((name, kind));
    }
    assemble(env, app, classes)
}

/// Reads `kind` and hands the rest of the table to that kind; every error names the class and field.
fn parse_class(name: &str, mut table: toml::Table) -> Result<ClassKind, PolicyError> {
    let error = |field: &str, message: String| PolicyError::class_error(name, Some(field), message);
    let known_kinds = KNOWN_KINDS
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let kind = match table.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(other) => {
            return Err(error(
                "kind",
                format!("expected a string, found {}", other.type_str()),
            ));
        }
        None => {
            return Err(error(
                "kind",
                format!("missing required field; known kinds: {known_kinds}"),
            ));
        }
    };
    let parsed = ClassKind::from_table(&kind, table).ok_or_else(|| {
        error(
            "kind",
            format!("unknown kind \"{kind}\"; known kinds: {known_kinds}"),
        )
    })?;
    parsed.map_err(|e| match e {
        TableError::Unknown { field, accepted } => error(
            &field,
            format!(
                "unknown field; a {kind} class accepts kind, {}",
                accepted.join(", ")
            ),
        ),
        TableError::Invalid { field, message } => {
            PolicyError::class_error(name, field.as_deref(), message)
        }
    })
}

/// Helpers shared by the policy's test modules.
#[cfg(test)]
mod test_support {
    use super::*;

    pub(super) const EXAMPLE: &str = r#"
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

    pub(super) fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A minimal valid policy with one class whose body is `body`.
    pub(super) fn one_class(body: &str) -> String {
        format!(
            "[namespace]\nenv = \"prod\"\napp = \"shop\"\n\n[classes.product_list]\nkind = \"cache\"\n\
             invalidation = \"catalog service\"\n{body}\n"
        )
    }

    #[track_caller]
    pub(super) fn toml_err(body: &str) -> PolicyError {
        Policy::from_toml_str(&one_class(body)).expect_err("policy should be rejected")
    }

    #[track_caller]
    pub(super) fn assert_class_field(err: &PolicyError, field: &str) {
        assert_eq!(err.class(), Some("product_list"), "{err}");
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("class `product_list`, field `{field}`: ")),
            "{err}"
        );
    }

    #[track_caller]
    pub(super) fn builder_err(class: CacheClass) -> PolicyError {
        Policy::builder("prod", "shop")
            .cache("product_list", class)
            .build()
            .expect_err("should be rejected")
    }

    pub(super) fn base() -> CacheClass {
        CacheClass::new(secs(600), "catalog service")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;

    /// A huge bad value (from the environment, say) is cut in the message, which still says how long it is.
    #[test]
    fn a_long_bad_namespace_value_is_cut_in_the_error() {
        let err = super::check_namespace_part("env", &"A".repeat(5000)).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 300, "{} bytes: {text}", text.len());
        assert!(text.contains("5000 bytes") && text.contains('…'), "{text}");
        let short = super::check_namespace_part("env", "Prod")
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("\"Prod\" (4 bytes)") && !short.contains('…'),
            "{short}"
        );
    }
    use super::*;

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
        let text = "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.login]\nkind = \"queue\"\n";
        let err = Policy::from_toml_str(text).unwrap_err();
        assert_eq!(err.class(), Some("login"));
        assert_eq!(err.field(), Some("kind"));
        assert!(
            err.message().contains("queue")
                && err.message().contains("\"stream\"")
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
    fn env_overrides_replace_the_namespace_and_validate_like_the_file() {
        let policy = Policy::from_toml_str("[namespace]\nenv = \"dev\"\napp = \"shop\"\n").unwrap();
        let vars = |env: Option<&str>, app: Option<&str>| {
            let (env, app) = (env.map(str::to_owned), app.map(str::to_owned));
            move |name: &str| match name {
                ENV_VAR => env.clone(),
                APP_VAR => app.clone(),
                other => panic!("unexpected variable {other}"),
            }
        };
        let same = policy
            .clone()
            .with_env_overrides_from(vars(None, None))
            .unwrap();
        assert_eq!(same, policy);
        let both = policy
            .clone()
            .with_env_overrides_from(vars(Some("prod-eu.1"), Some("shop2")))
            .unwrap();
        assert_eq!((both.env(), both.app()), ("prod-eu.1", "shop2"));

        for (env, app, variable, field) in [
            (Some("Prod"), None, "KEYWARD_ENV", "namespace.env"),
            (Some(""), None, "KEYWARD_ENV", "namespace.env"),
            (Some(" prod"), None, "KEYWARD_ENV", "namespace.env"),
            (Some("prod:x"), None, "KEYWARD_ENV", "namespace.env"),
            (None, Some("_shop"), "KEYWARD_APP", "namespace.app"),
            (
                Some("prod"),
                Some(&"a".repeat(33)),
                "KEYWARD_APP",
                "namespace.app",
            ),
        ] {
            let err = policy
                .clone()
                .with_env_overrides_from(vars(env, app))
                .unwrap_err();
            assert_eq!(err.variable(), Some(variable), "{err}");
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.file().is_none() && err.class().is_none());
            // The same rule, in the same words, as a bad value in the file.
            let value = env.filter(|_| variable == "KEYWARD_ENV").or(app).unwrap();
            let in_file = Policy::builder(
                if variable == "KEYWARD_ENV" {
                    value
                } else {
                    "dev"
                },
                if variable == "KEYWARD_APP" {
                    value
                } else {
                    "shop"
                },
            )
            .build()
            .unwrap_err();
            assert_eq!(err.message(), in_file.message());
            assert!(
                err.to_string().starts_with(&format!(
                    "environment variable `{variable}` (overrides field `{field}`): invalid value"
                )),
                "{err}"
            );
        }
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

    /// One minimal valid class body per kind (without `kind`).
    const MINIMAL: [(&str, &str); 7] = [
        ("cache", "ttl = \"1m\"\ninvalidation = \"x\""),
        (
            "rate_limit",
            "algorithm = \"gcra\"\nlimit = 5\nwindow = \"1s\"",
        ),
        ("session", "idle = \"1m\"\nabsolute = \"1h\""),
        ("lock", "ttl = \"1s\""),
        ("idempotency", ""),
        ("stream", "retention = { maxlen = 10 }"),
        ("channel", ""),
    ];

    fn class_of(kind: &str, body: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml_str(&format!(
            "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.c]\nkind = \"{kind}\"\n{body}\n"
        ))
    }

    #[test]
    fn every_registered_kind_parses_and_is_known() {
        assert_eq!(KNOWN_KINDS, MINIMAL.map(|(kind, _)| kind));
        for (kind, body) in MINIMAL {
            let p = class_of(kind, body).unwrap();
            assert_eq!(p.class("c").unwrap().kind().name(), kind);
            assert_eq!(p.class("c").unwrap().kind().version(), 1);
        }
    }

    #[test]
    fn only_cache_entries_are_evictable_and_display_says_so() {
        for (kind, body) in MINIMAL {
            let p = class_of(kind, body).unwrap();
            let class = p.class("c").unwrap();
            assert_eq!(class.kind().evictable(), kind == "cache", "{kind}");
            let text = p.to_string();
            let block = text
                .split("\n\n")
                .find(|b| b.starts_with("class c ("))
                .unwrap();
            let expected = if kind == "cache" {
                "  eviction:        allowed"
            } else {
                "  eviction:        never (embedded store; on Redis this needs maxmemory-policy noeviction)"
            };
            assert_eq!(
                block
                    .lines()
                    .filter(|l| l.starts_with("  eviction:"))
                    .collect::<Vec<_>>(),
                [expected],
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_field_names_class_field_and_accepted_fields_for_every_kind() {
        for (kind, body) in MINIMAL {
            let err = class_of(kind, &format!("{body}\nbogus_field = 1")).unwrap_err();
            assert_eq!(err.class(), Some("c"), "{err}");
            assert_eq!(err.field(), Some("bogus_field"), "{err}");
            assert!(
                err.message()
                    .starts_with(&format!("unknown field; a {kind} class accepts kind, ")),
                "{err}"
            );
            assert!(err.message().contains("version"), "{err}");
        }
    }

    #[test]
    fn type_errors_name_the_field_and_what_was_expected() {
        for (kind, body, field, message) in [
            (
                "cache",
                "ttl = \"1m\"\ninvalidation = 3",
                "invalidation",
                "expected a string, found integer",
            ),
            (
                "cache",
                "ttl = \"1m\"\ninvalidation = \"x\"\npersonal = 1",
                "personal",
                "expected true or false, found integer",
            ),
            (
                "cache",
                "ttl = [\"1m\"]\ninvalidation = \"x\"",
                "ttl",
                "expected a duration string like \"10m\", found array",
            ),
            (
                "rate_limit",
                "algorithm = \"gcra\"\nlimit = 1.5\nwindow = \"1s\"",
                "limit",
                "expected an integer, found float",
            ),
            (
                "lock",
                "ttl = \"1s\"\nwatchdog = \"on\"",
                "watchdog",
                "expected true or false, found string",
            ),
            (
                "idempotency",
                "lease = { secs = 1 }",
                "lease",
                "expected a duration string like \"10m\", found table",
            ),
        ] {
            let err = class_of(kind, body).unwrap_err();
            assert_eq!(
                (err.class(), err.field()),
                (Some("c"), Some(field)),
                "{err}"
            );
            assert_eq!(err.message(), message, "{err}");
        }
    }

    #[test]
    fn document_level_shape_errors_name_the_field() {
        let err = Policy::from_toml_str("classes = 3\n[namespace]\nenv = \"a\"\napp = \"b\"\n")
            .unwrap_err();
        assert_eq!((err.class(), err.field()), (None, Some("classes")));
        assert_eq!(err.message(), "expected a table, found integer");
        let err = Policy::from_toml_str("namespace = \"prod\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `namespace`: expected a table, found string"
        );
        let err = Policy::from_toml_str(
            "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes]\nc = \"cache\"\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "class `c`: expected a table, found string");
    }

    #[test]
    fn toml_syntax_error_keeps_line_and_column() {
        let err = Policy::from_toml_str("[namespace]\nenv = \"prod\"\napp = = 1\n").unwrap_err();
        assert!(
            err.message()
                .starts_with("invalid TOML at line 3, column 7"),
            "{err}"
        );
        let err = Policy::from_toml_str("[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.c]\nkind = \"lock\"\nkind = \"lock\"\n")
            .unwrap_err();
        assert!(err.message().starts_with("invalid TOML at line 6"), "{err}");
    }
}
