//! The `session` class kind: idle and absolute timeouts, how often the idle expiry is pushed back, and the
//! cookie the web layer sets.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::fields::{Dur, Flag, Int, Text, required};
use super::{ClassSpec, FieldError, MAX_TTL, fmt_duration};

/// Default largest session payload: 64 KiB.
const DEFAULT_MAX_DATA_BYTES: usize = 64 * 1024;
/// Largest allowed `max_data_bytes`: 16 MiB (a session is read on every request).
const MAX_DATA_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// The default cookie name. The `__Host-` prefix makes browsers refuse the cookie unless it is `Secure`,
/// has `Path=/` and no `Domain` — so a sibling subdomain cannot plant or overwrite it.
pub const DEFAULT_COOKIE_NAME: &str = "__Host-session";

/// The `SameSite` attribute of the session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SameSite {
    /// Sent on same-site requests and top-level cross-site navigations (links). The default.
    #[default]
    Lax,
    /// Sent on same-site requests only.
    Strict,
    /// Sent on every request, cross-site included; requires `Secure`.
    None,
}

impl SameSite {
    /// The attribute value as it appears in `Set-Cookie` (`Lax`, `Strict`, `None`).
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }

    fn from_name(name: &str) -> Option<SameSite> {
        match name {
            "lax" => Some(SameSite::Lax),
            "strict" => Some(SameSite::Strict),
            "none" => Some(SameSite::None),
            _ => None,
        }
    }
}

impl fmt::Display for SameSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session class: sessions end `idle` after their last extension or `absolute` after creation, whichever
/// comes first, enforced on the server.
///
/// ```
/// use std::time::Duration;
/// use keyward::policy::{Policy, SessionClass};
///
/// let policy = Policy::builder("prod", "web")
///     .session(
///         "web_session",
///         SessionClass::new(Duration::from_secs(30 * 60), Duration::from_secs(12 * 3600))
///             .extend_after(Duration::from_secs(60)),
///     )
///     .build()?;
/// let class = policy.class("web_session").unwrap().as_session().unwrap();
/// assert_eq!(class.cookie_name_value(), "__Host-session");
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SessionClass {
    idle: Duration,
    absolute: Duration,
    extend_after: Option<Duration>,
    version: u32,
    max_data_bytes: usize,
    cookie_name: String,
    cookie_secure: bool,
    cookie_same_site: SameSite,
    cookie_path: String,
    cookie_domain: Option<String>,
}

impl SessionClass {
    /// A class with these timeouts; `extend_after` = `idle / 10`, version 1, 64 KiB of data, and the safe
    /// cookie defaults: `__Host-session`, `Secure`, `HttpOnly` (always), `SameSite=Lax`, `Path=/`, no `Domain`.
    pub fn new(idle: Duration, absolute: Duration) -> Self {
        SessionClass {
            idle,
            absolute,
            extend_after: None,
            version: 1,
            max_data_bytes: DEFAULT_MAX_DATA_BYTES,
            cookie_name: DEFAULT_COOKIE_NAME.to_owned(),
            cookie_secure: true,
            cookie_same_site: SameSite::Lax,
            cookie_path: "/".to_owned(),
            cookie_domain: None,
        }
    }

    /// Push the idle expiry back only when the last extension is at least this old (default `idle / 10`), so
    /// a busy session costs one write per `extend_after`, not one per request. A session therefore ends
    /// between `idle - extend_after` and `idle` after its last use.
    #[must_use]
    pub fn extend_after(mut self, d: Duration) -> Self {
        self.extend_after = Some(d);
        self
    }

    /// The version, part of every key (default 1); bumping it ends every session of the class.
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// Largest encoded session data (default 64 KiB).
    #[must_use]
    pub fn max_data_bytes(mut self, n: usize) -> Self {
        self.max_data_bytes = n;
        self
    }

    /// The cookie name (default `__Host-session`).
    #[must_use]
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie_name = name.into();
        self
    }

    /// Whether the cookie is `Secure` (default true; turning it off is for plain-http development only, and
    /// needs a cookie name without the `__Host-` prefix).
    #[must_use]
    pub fn cookie_secure(mut self, yes: bool) -> Self {
        self.cookie_secure = yes;
        self
    }

    /// The cookie's `SameSite` (default `Lax`).
    #[must_use]
    pub fn cookie_same_site(mut self, same_site: SameSite) -> Self {
        self.cookie_same_site = same_site;
        self
    }

    /// The cookie's `Path` (default `/`).
    #[must_use]
    pub fn cookie_path(mut self, path: impl Into<String>) -> Self {
        self.cookie_path = path.into();
        self
    }

    /// The cookie's `Domain` (default none: the cookie goes back only to the host that set it).
    #[must_use]
    pub fn cookie_domain(mut self, domain: impl Into<String>) -> Self {
        self.cookie_domain = Some(domain.into());
        self
    }

    /// Time since the last extension after which a session ends.
    pub fn idle_value(&self) -> Duration {
        self.idle
    }

    /// Time since creation after which a session ends, however busy.
    pub fn absolute_value(&self) -> Duration {
        self.absolute
    }

    /// The minimum age of the last extension before a read extends again.
    pub fn extend_after_value(&self) -> Duration {
        self.extend_after.unwrap_or(self.idle / 10)
    }

    /// The version that is part of every key of this class.
    pub fn version_value(&self) -> u32 {
        self.version
    }

    /// Largest encoded session data.
    pub fn max_data_bytes_value(&self) -> usize {
        self.max_data_bytes
    }

    /// The cookie name.
    pub fn cookie_name_value(&self) -> &str {
        &self.cookie_name
    }

    /// Whether the cookie is `Secure`.
    pub fn is_cookie_secure(&self) -> bool {
        self.cookie_secure
    }

    /// The cookie's `SameSite`.
    pub fn cookie_same_site_value(&self) -> SameSite {
        self.cookie_same_site
    }

    /// The cookie's `Path`.
    pub fn cookie_path_value(&self) -> &str {
        &self.cookie_path
    }

    /// The cookie's `Domain`, if any.
    pub fn cookie_domain_value(&self) -> Option<&str> {
        self.cookie_domain.as_deref()
    }
}

impl ClassSpec for SessionClass {
    type Raw = RawSession;
    const EVICTABLE: bool = false;

    fn from_raw(raw: RawSession) -> Result<Self, FieldError> {
        let idle = required("idle", raw.idle)?.0;
        let absolute = required("absolute", raw.absolute)?.0;
        let mut class = SessionClass::new(idle, absolute);
        class.extend_after = raw.extend_after.map(|d| d.0);
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        if let Some(n) = raw.max_data_bytes {
            class.max_data_bytes = n.to("max_data_bytes", "a positive integer")?;
        }
        if let Some(Text(name)) = raw.cookie_name {
            class.cookie_name = name;
        }
        if let Some(Flag(b)) = raw.cookie_secure {
            class.cookie_secure = b;
        }
        if let Some(Text(text)) = raw.cookie_same_site {
            class.cookie_same_site = SameSite::from_name(&text).ok_or_else(|| {
                (
                    "cookie_same_site",
                    format!("unknown value \"{text}\"; expected \"lax\", \"strict\" or \"none\""),
                )
            })?;
        }
        if let Some(Text(path)) = raw.cookie_path {
            class.cookie_path = path;
        }
        class.cookie_domain = raw.cookie_domain.map(|d| d.0);
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.idle < Duration::from_secs(1) || self.idle > MAX_TTL {
            return Err((
                "idle",
                format!(
                    "must be between 1s and 365 days, got {}",
                    fmt_duration(self.idle)
                ),
            ));
        }
        if self.absolute < self.idle || self.absolute > MAX_TTL {
            return Err((
                "absolute",
                format!(
                    "must be at least idle ({}) and at most 365 days, got {}",
                    fmt_duration(self.idle),
                    fmt_duration(self.absolute)
                ),
            ));
        }
        if let Some(e) = self.extend_after
            && e >= self.idle
        {
            return Err((
                "extend_after",
                format!(
                    "must be shorter than idle ({}), got {}",
                    fmt_duration(self.idle),
                    fmt_duration(e)
                ),
            ));
        }
        if !(1..=MAX_DATA_BYTES_LIMIT).contains(&self.max_data_bytes) {
            return Err((
                "max_data_bytes",
                format!(
                    "must be between 1 and {MAX_DATA_BYTES_LIMIT}, got {}",
                    self.max_data_bytes
                ),
            ));
        }
        if self.version < 1 {
            return Err(("version", "must be at least 1".into()));
        }
        self.validate_cookie()
    }

    fn key_version(&self) -> u32 {
        self.version
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  idle:            {}", fmt_duration(self.idle))?;
        writeln!(f, "  absolute:        {}", fmt_duration(self.absolute))?;
        writeln!(
            f,
            "  extend_after:    {}",
            fmt_duration(self.extend_after_value())
        )?;
        writeln!(f, "  version:         {}", self.version)?;
        writeln!(f, "  max_data_bytes:  {}", self.max_data_bytes)?;
        write!(
            f,
            "  cookie:          {}; HttpOnly; SameSite={}; Path={}",
            self.cookie_name, self.cookie_same_site, self.cookie_path
        )?;
        if self.cookie_secure {
            write!(f, "; Secure")?;
        }
        if let Some(d) = &self.cookie_domain {
            write!(f, "; Domain={d}")?;
        }
        writeln!(f)
    }
}

impl SessionClass {
    fn validate_cookie(&self) -> Result<(), FieldError> {
        let name = &self.cookie_name;
        // RFC 6265 cookie-name: an RFC 7230 token.
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || name.len() > 128 || !name.bytes().all(token) {
            return Err((
                "cookie_name",
                format!(
                    "invalid cookie name {name:?}: 1 to 128 characters of letters, digits and !#$%&'*+-.^_`|~"
                ),
            ));
        }
        if name.starts_with("__Host-") {
            if !self.cookie_secure {
                return Err((
                    "cookie_secure",
                    format!(
                        "a `__Host-` cookie ({name}) must be Secure; rename it to turn Secure off"
                    ),
                ));
            }
            if self.cookie_path != "/" {
                return Err((
                    "cookie_path",
                    format!("a `__Host-` cookie ({name}) must have Path=/"),
                ));
            }
            if self.cookie_domain.is_some() {
                return Err((
                    "cookie_domain",
                    format!("a `__Host-` cookie ({name}) cannot have a Domain"),
                ));
            }
        }
        if name.starts_with("__Secure-") && !self.cookie_secure {
            return Err((
                "cookie_secure",
                format!("a `__Secure-` cookie ({name}) must be Secure"),
            ));
        }
        if self.cookie_same_site == SameSite::None && !self.cookie_secure {
            return Err((
                "cookie_same_site",
                "SameSite=None requires cookie_secure = true (browsers drop it otherwise)".into(),
            ));
        }
        let attr_ok =
            |v: &str| !v.is_empty() && v.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';');
        if !self.cookie_path.starts_with('/') || !attr_ok(&self.cookie_path) {
            return Err((
                "cookie_path",
                format!(
                    "invalid path {:?}: must start with `/`, no spaces, `;` or control characters",
                    self.cookie_path
                ),
            ));
        }
        if let Some(d) = &self.cookie_domain
            && !attr_ok(d)
        {
            return Err((
                "cookie_domain",
                format!("invalid domain {d:?}: no spaces, `;` or control characters"),
            ));
        }
        Ok(())
    }
}

/// The TOML form of a session class (`kind` is read before this). Required: `idle`, `absolute`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSession {
    idle: Option<Dur>,
    absolute: Option<Dur>,
    extend_after: Option<Dur>,
    version: Option<Int>,
    max_data_bytes: Option<Int>,
    cookie_name: Option<Text>,
    cookie_secure: Option<Flag>,
    cookie_same_site: Option<Text>,
    cookie_path: Option<Text>,
    cookie_domain: Option<Text>,
}

#[cfg(test)]
mod tests {
    use crate::policy::{Policy, PolicyError};

    fn class(kind: &str, body: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml_str(&format!(
            "[namespace]\nenv = \"prod\"\napp = \"web\"\n\n[classes.c]\nkind = \"{kind}\"\n{body}\n"
        ))
    }

    #[track_caller]
    fn field_err(kind: &str, body: &str, field: &str, needle: &str) {
        let err = class(kind, body).unwrap_err();
        assert_eq!(err.class(), Some("c"), "{err}");
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(err.message().contains(needle), "{err}");
    }

    #[test]
    fn session_fields_parse_and_validate() {
        let p = class(
            "session",
            "idle = \"30m\"\nabsolute = \"12h\"\nextend_after = \"1m\"\ncookie_name = \"sid\"\n\
             cookie_secure = false\ncookie_same_site = \"strict\"\ncookie_path = \"/app\"\n\
             cookie_domain = \"example.com\"\nmax_data_bytes = 1000\nversion = 3",
        )
        .unwrap();
        let s = p.class("c").unwrap().as_session().unwrap();
        assert_eq!(s.extend_after_value().as_secs(), 60);
        assert!(!s.is_cookie_secure());
        assert_eq!(s.cookie_same_site_value().as_str(), "Strict");
        assert_eq!(s.cookie_domain_value(), Some("example.com"));
        assert_eq!(p.class("c").unwrap().kind().version(), 3);
        let d = class("session", "idle = \"10m\"\nabsolute = \"1h\"").unwrap();
        let d = d.class("c").unwrap().as_session().unwrap();
        assert_eq!(d.extend_after_value().as_secs(), 60, "default idle / 10");
        assert_eq!(d.cookie_name_value(), "__Host-session");

        field_err("session", "absolute = \"1h\"", "idle", "missing");
        field_err(
            "session",
            "idle = \"2h\"\nabsolute = \"1h\"",
            "absolute",
            "at least idle",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\nextend_after = \"1m\"",
            "extend_after",
            "shorter",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\ncookie_secure = false",
            "cookie_secure",
            "__Host-",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\ncookie_domain = \"a.com\"",
            "cookie_domain",
            "__Host-",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\ncookie_path = \"/x\"",
            "cookie_path",
            "__Host-",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\ncookie_name = \"a b\"",
            "cookie_name",
            "invalid",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\ncookie_name = \"s\"\ncookie_secure = false\ncookie_same_site = \"none\"",
            "cookie_same_site",
            "cookie_secure = true",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\ncookie_same_site = \"loose\"",
            "cookie_same_site",
            "loose",
        );
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\nttl = \"1m\"",
            "ttl",
            "unknown field",
        );
    }

    #[test]
    fn lock_and_idempotency_fields_validate() {
        let p = class(
            "lock",
            "ttl = \"30s\"\nwait = \"5s\"\nwatchdog = true\nfence_ttl = \"1d\"",
        )
        .unwrap();
        let l = p.class("c").unwrap().as_lock().unwrap();
        assert!(l.is_watchdog());
        assert_eq!(l.wait_value().as_secs(), 5);
        field_err("lock", "wait = \"1s\"", "ttl", "missing");
        field_err("lock", "ttl = \"1ms\"", "ttl", "10ms");
        field_err(
            "lock",
            "ttl = \"1h\"\nfence_ttl = \"1m\"",
            "fence_ttl",
            "at least ttl",
        );
        field_err(
            "lock",
            "ttl = \"1s\"\nidle = \"1s\"",
            "idle",
            "unknown field",
        );

        let p = class("idempotency", "").unwrap();
        let i = p.class("c").unwrap().as_idempotency().unwrap();
        assert_eq!(i.ttl_value().as_secs(), 86_400);
        assert_eq!(i.lease_value().as_secs(), 60);
        field_err(
            "idempotency",
            "ttl = \"1m\"\nlease = \"2m\"",
            "lease",
            "ttl",
        );
        field_err(
            "idempotency",
            "max_response_bytes = 0",
            "max_response_bytes",
            "between",
        );
        field_err("idempotency", "ttl = \"0s\"", "ttl", "between");
    }

    #[test]
    fn size_limits_name_their_own_field() {
        use crate::policy::{CacheClass, IdempotencyClass, SessionClass};
        use std::time::Duration;

        for (body, bad) in [
            ("max_data_bytes = 0", "0"),
            ("max_data_bytes = 16777217", "16777217"),
        ] {
            field_err(
                "session",
                &format!("idle = \"1m\"\nabsolute = \"1h\"\n{body}"),
                "max_data_bytes",
                bad,
            );
        }
        field_err(
            "session",
            "idle = \"1m\"\nabsolute = \"1h\"\nmax_data_bytes = -1",
            "max_data_bytes",
            "positive",
        );
        field_err(
            "idempotency",
            "max_response_bytes = 67108865",
            "max_response_bytes",
            "67108865",
        );
        field_err(
            "idempotency",
            "max_response_bytes = \"1MiB\"",
            "max_response_bytes",
            "expected an integer",
        );

        let minute = Duration::from_secs(60);
        let built =
            |b: crate::policy::PolicyBuilder| b.build().unwrap_err().field().map(str::to_owned);
        let b = || Policy::builder("a", "b");
        assert_eq!(
            built(b().cache("c", CacheClass::new(minute, "x").max_value_bytes(0))).as_deref(),
            Some("max_value_bytes")
        );
        assert_eq!(
            built(b().session("c", SessionClass::new(minute, minute).max_data_bytes(0))).as_deref(),
            Some("max_data_bytes")
        );
        assert_eq!(
            built(b().idempotency("c", IdempotencyClass::new().max_response_bytes(0))).as_deref(),
            Some("max_response_bytes")
        );
    }
}
