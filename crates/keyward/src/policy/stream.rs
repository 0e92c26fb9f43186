//! The `stream` class kind: a durable event stream's retention, its retry and dead-letter rules, and the
//! largest message it takes.
//!
//! **The one decision to know:** a stream is never unbounded. `retention` must say `maxlen`, `max_age` or
//! both; trimming never drops an entry some consumer group has not acknowledged yet (see `docs/streams.md`),
//! so on top of retention every stream has a **hard cap** (`retention.hard_maxlen`, by default 10 × `maxlen`,
//! or 1,000,000 entries for an age-only retention) that holds even when a group lags: past it the oldest
//! entries go, acknowledged or not, and the loss is counted and reported. The dead-letter stream has its own
//! retention, bounded the same way.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::fields::{Dur, Int, required};
use super::{ClassSpec, FieldError, MAX_TTL, fmt_duration};

/// Default `max_deliveries`: 5 attempts, then the dead letters.
const DEFAULT_MAX_DELIVERIES: u32 = 5;
/// Largest `max_deliveries`.
const MAX_DELIVERIES_LIMIT: u32 = 1000;
/// Default `claim_idle`: 60 s.
const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(60);
/// Default `max_message_bytes`: 1 MiB.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest allowed `max_message_bytes`: 64 MiB.
const MAX_MESSAGE_BYTES_LIMIT: usize = 64 * 1024 * 1024;
/// The hard cap of an age-only retention when none is given.
const DEFAULT_HARD_MAXLEN: u64 = 1_000_000;
/// How many times `maxlen` the default hard cap is.
const HARD_CAP_FACTOR: u64 = 10;
/// Largest `maxlen` / `hard_maxlen`: 2^32 entries (a bound, not a target).
const MAX_LEN_LIMIT: u64 = 1 << 32;
/// Default dead-letter retention: 10,000 entries, 14 days.
const DEFAULT_DEAD_MAXLEN: u64 = 10_000;
const DEFAULT_DEAD_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// How long a stream keeps its entries: by count (`maxlen`), by age (`max_age`, trimmed with `MINID`) or
/// both (an entry goes when either says so), never past the hard cap.
///
/// Entries not yet acknowledged by every consumer group are kept past `maxlen` and `max_age`, up to
/// `hard_maxlen` entries in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    maxlen: Option<u64>,
    max_age: Option<Duration>,
    approximate: bool,
    hard_maxlen: Option<u64>,
}

impl Retention {
    /// Keep about the newest `n` entries.
    pub fn maxlen(n: u64) -> Self {
        Retention {
            maxlen: Some(n),
            max_age: None,
            approximate: true,
            hard_maxlen: None,
        }
    }

    /// Keep entries for `d` after they were added (by their id's time, the server's clock).
    pub fn max_age(d: Duration) -> Self {
        Retention {
            maxlen: None,
            max_age: Some(d),
            approximate: true,
            hard_maxlen: None,
        }
    }

    /// Also keep entries at most `d` (an entry goes when either bound says so).
    #[must_use]
    pub fn and_max_age(mut self, d: Duration) -> Self {
        self.max_age = Some(d);
        self
    }

    /// Also keep at most about `n` entries.
    #[must_use]
    pub fn and_maxlen(mut self, n: u64) -> Self {
        self.maxlen = Some(n);
        self
    }

    /// Trim approximately (`~`, the default): Redis removes whole internal nodes only, so the stream may hold
    /// somewhat more than the bound (about 100 entries, `stream-node-max-entries`), for much cheaper trims.
    /// `false` trims exactly. The embedded backend always trims exactly.
    #[must_use]
    pub fn approximate(mut self, yes: bool) -> Self {
        self.approximate = yes;
        self
    }

    /// The most entries the stream ever holds, even when a consumer group lags (default 10 × `maxlen`, or
    /// 1,000,000 with an age-only retention). Past it the oldest entries are dropped, acknowledged or not.
    #[must_use]
    pub fn hard_maxlen(mut self, n: u64) -> Self {
        self.hard_maxlen = Some(n);
        self
    }

    /// The count bound, if any.
    pub fn maxlen_value(&self) -> Option<u64> {
        self.maxlen
    }

    /// The age bound, if any.
    pub fn max_age_value(&self) -> Option<Duration> {
        self.max_age
    }

    /// Whether trims are approximate.
    pub fn is_approximate(&self) -> bool {
        self.approximate
    }

    /// The hard cap on the number of entries.
    pub fn hard_maxlen_value(&self) -> u64 {
        self.hard_maxlen.unwrap_or(match self.maxlen {
            Some(n) => n.saturating_mul(HARD_CAP_FACTOR).min(MAX_LEN_LIMIT),
            None => DEFAULT_HARD_MAXLEN,
        })
    }

    /// Checks the bounds; `prefix` names the table (`retention` or `dead_letter`).
    fn validate(&self, fields: &RetentionFields) -> Result<(), FieldError> {
        if self.maxlen.is_none() && self.max_age.is_none() {
            return Err((
                fields.table,
                "an unbounded stream is refused: give `maxlen`, `max_age` or both".into(),
            ));
        }
        if let Some(n) = self.maxlen
            && !(1..=MAX_LEN_LIMIT).contains(&n)
        {
            return Err((
                fields.maxlen,
                format!("must be between 1 and {MAX_LEN_LIMIT}, got {n}"),
            ));
        }
        if let Some(d) = self.max_age
            && (d < Duration::from_secs(1) || d > MAX_TTL)
        {
            return Err((
                fields.max_age,
                format!("must be between 1s and 365 days, got {}", fmt_duration(d)),
            ));
        }
        let hard = self.hard_maxlen_value();
        let floor = self.maxlen.unwrap_or(1);
        if !(floor..=MAX_LEN_LIMIT).contains(&hard) {
            return Err((
                fields.hard_maxlen,
                format!("must be between maxlen ({floor}) and {MAX_LEN_LIMIT}, got {hard}"),
            ));
        }
        Ok(())
    }

    /// `approximate`: whether trims use `~` (the stream's own retention: `self.approximate`; the dead
    /// letters are always trimmed exactly, whatever their table says).
    fn describe(&self, approximate: bool) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.maxlen {
            parts.push(format!("maxlen {}{n}", if approximate { "~" } else { "" }));
        }
        if let Some(d) = self.max_age {
            parts.push(format!("max_age {}", fmt_duration(d)));
        }
        parts.push(format!("hard_maxlen {}", self.hard_maxlen_value()));
        parts.join(", ")
    }
}

/// The field names of one retention table, for errors.
struct RetentionFields {
    table: &'static str,
    maxlen: &'static str,
    max_age: &'static str,
    approximate: &'static str,
    hard_maxlen: &'static str,
}

const RETENTION_FIELDS: RetentionFields = RetentionFields {
    table: "retention",
    maxlen: "retention.maxlen",
    max_age: "retention.max_age",
    approximate: "retention.approximate",
    hard_maxlen: "retention.hard_maxlen",
};

const DEAD_LETTER_FIELDS: RetentionFields = RetentionFields {
    table: "dead_letter",
    maxlen: "dead_letter.maxlen",
    max_age: "dead_letter.max_age",
    approximate: "dead_letter.approximate",
    hard_maxlen: "dead_letter.hard_maxlen",
};

/// How long a failed delivery waits before the next: `base × factor^(attempt − 1)`, at most `max`, each
/// delay then shortened by a random part of up to `jitter` percent (so retries of one outage spread out).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    max: Duration,
    jitter_percent: f64,
}

impl Default for Backoff {
    /// 1 s, doubling, at most 5 min, 20 % jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter_percent: 20.0,
        }
    }
}

impl Backoff {
    /// A backoff starting at `base`, multiplied by `factor` per attempt, capped at `max`, 20 % jitter.
    pub fn new(base: Duration, factor: f64, max: Duration) -> Self {
        Backoff {
            base,
            factor,
            max,
            ..Backoff::default()
        }
    }

    /// Up to this many percent (0 to 100) of each delay is taken off at random.
    #[must_use]
    pub fn jitter_percent(mut self, p: f64) -> Self {
        self.jitter_percent = p;
        self
    }

    /// The first delay.
    pub fn base_value(&self) -> Duration {
        self.base
    }

    /// The growth per attempt.
    pub fn factor_value(&self) -> f64 {
        self.factor
    }

    /// The longest delay.
    pub fn max_value(&self) -> Duration {
        self.max
    }

    /// The jitter, in percent.
    pub fn jitter_percent_value(&self) -> f64 {
        self.jitter_percent
    }

    /// The delay after the `attempt`-th failed delivery (1-based) before jitter:
    /// `min(max, base × factor^(attempt − 1))`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            return self.max;
        }
        Duration::from_secs_f64(secs)
    }

    /// [`delay`](Self::delay) with `unit` (a number in `0..1`, drawn at random by the caller) of the jitter
    /// taken off: `delay × (1 − jitter × unit)`.
    pub fn jittered(&self, attempt: u32, unit: f64) -> Duration {
        let cut = (self.jitter_percent / 100.0) * unit.clamp(0.0, 1.0);
        self.delay(attempt).mul_f64((1.0 - cut).clamp(0.0, 1.0))
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.base < Duration::from_millis(1) || self.base > Duration::from_secs(24 * 3600) {
            return Err((
                "backoff.base",
                format!(
                    "must be between 1ms and 24h, got {}",
                    fmt_duration(self.base)
                ),
            ));
        }
        if !(1.0..=100.0).contains(&self.factor) {
            return Err((
                "backoff.factor",
                format!("must be between 1 and 100, got {}", self.factor),
            ));
        }
        if self.max < self.base || self.max > Duration::from_secs(24 * 3600) {
            return Err((
                "backoff.max",
                format!(
                    "must be between base ({}) and 24h, got {}",
                    fmt_duration(self.base),
                    fmt_duration(self.max)
                ),
            ));
        }
        if !(0.0..=100.0).contains(&self.jitter_percent) {
            return Err((
                "backoff.jitter",
                format!("must be between 0% and 100%, got {}%", self.jitter_percent),
            ));
        }
        Ok(())
    }
}

/// A stream class: a durable, retention-bounded log of typed events read by consumer groups.
///
/// ```
/// use std::time::Duration;
/// use keyward::policy::{Policy, Retention, StreamClass};
///
/// let policy = Policy::builder("prod", "shop")
///     .stream(
///         "order_events",
///         StreamClass::new(Retention::maxlen(100_000).and_max_age(Duration::from_secs(7 * 86400)))
///             .max_deliveries(8),
///     )
///     .build()?;
/// let class = policy.class("order_events").unwrap().as_stream().unwrap();
/// assert_eq!(class.retention_value().hard_maxlen_value(), 1_000_000);
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StreamClass {
    retention: Retention,
    max_deliveries: u32,
    backoff: Backoff,
    claim_idle: Duration,
    dead_letter: Option<Retention>,
    max_message_bytes: usize,
    version: u32,
}

impl StreamClass {
    /// A stream kept by `retention`; 5 deliveries then the dead letters (10,000 entries, 14 days), the
    /// default [`Backoff`], `claim_idle` 60 s, messages up to 1 MiB, version 1.
    pub fn new(retention: Retention) -> Self {
        StreamClass {
            retention,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            backoff: Backoff::default(),
            claim_idle: DEFAULT_CLAIM_IDLE,
            dead_letter: Some(
                Retention::maxlen(DEFAULT_DEAD_MAXLEN).and_max_age(DEFAULT_DEAD_MAX_AGE),
            ),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            version: 1,
        }
    }

    /// How many times an entry is handed to a handler before it goes to the dead letters (or, without
    /// them, is acknowledged and dropped); default 5.
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// The delay between deliveries of a failing entry.
    #[must_use]
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// How long an entry stays pending with one consumer before live workers take it over (default 60 s):
    /// longer than a handler normally runs.
    #[must_use]
    pub fn claim_idle(mut self, d: Duration) -> Self {
        self.claim_idle = d;
        self
    }

    /// The dead-letter stream's retention; `None` turns dead letters off (an entry past `max_deliveries`
    /// is then acknowledged and dropped, and counted).
    #[must_use]
    pub fn dead_letter(mut self, retention: Option<Retention>) -> Self {
        self.dead_letter = retention;
        self
    }

    /// Largest encoded message (default 1 MiB).
    #[must_use]
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// The version, part of every key (default 1).
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// The stream's retention.
    pub fn retention_value(&self) -> Retention {
        self.retention
    }

    /// Deliveries before dead-lettering.
    pub fn max_deliveries_value(&self) -> u32 {
        self.max_deliveries
    }

    /// The retry backoff.
    pub fn backoff_value(&self) -> Backoff {
        self.backoff
    }

    /// When a pending entry counts as abandoned.
    pub fn claim_idle_value(&self) -> Duration {
        self.claim_idle
    }

    /// The dead-letter stream's retention, if dead letters are on.
    pub fn dead_letter_value(&self) -> Option<Retention> {
        self.dead_letter
    }

    /// Largest encoded message.
    pub fn max_message_bytes_value(&self) -> usize {
        self.max_message_bytes
    }

    /// The version that is part of every key of this class.
    pub fn version_value(&self) -> u32 {
        self.version
    }
}

impl ClassSpec for StreamClass {
    type Raw = RawStream;
    const EVICTABLE: bool = false;

    fn from_raw(raw: RawStream) -> Result<Self, FieldError> {
        let retention = parse_retention(
            required("retention", raw.retention)?,
            &RETENTION_FIELDS,
            None,
        )?;
        let mut class = StreamClass::new(retention);
        if let Some(n) = raw.max_deliveries {
            class.max_deliveries = n.to("max_deliveries", "an integer from 1 to 1000")?;
        }
        if let Some(v) = raw.backoff {
            class.backoff = parse_backoff(&v)?;
        }
        if let Some(Dur(d)) = raw.claim_idle {
            class.claim_idle = d;
        }
        if let Some(v) = raw.dead_letter {
            class.dead_letter = match v {
                toml::Value::Boolean(false) => None,
                toml::Value::Boolean(true) => class.dead_letter,
                other => Some(parse_retention(
                    other,
                    &DEAD_LETTER_FIELDS,
                    class.dead_letter,
                )?),
            };
        }
        if let Some(n) = raw.max_message_bytes {
            class.max_message_bytes = n.to("max_message_bytes", "a positive integer")?;
        }
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        self.retention.validate(&RETENTION_FIELDS)?;
        if !(1..=MAX_DELIVERIES_LIMIT).contains(&self.max_deliveries) {
            return Err((
                "max_deliveries",
                format!(
                    "must be between 1 and {MAX_DELIVERIES_LIMIT}, got {}",
                    self.max_deliveries
                ),
            ));
        }
        self.backoff.validate()?;
        if self.claim_idle < Duration::from_millis(100)
            || self.claim_idle > Duration::from_secs(24 * 3600)
        {
            return Err((
                "claim_idle",
                format!(
                    "must be between 100ms and 24h, got {}",
                    fmt_duration(self.claim_idle)
                ),
            ));
        }
        if let Some(dead) = &self.dead_letter {
            dead.validate(&DEAD_LETTER_FIELDS)?;
        }
        if !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&self.max_message_bytes) {
            return Err((
                "max_message_bytes",
                format!(
                    "must be between 1 and {MAX_MESSAGE_BYTES_LIMIT}, got {}",
                    self.max_message_bytes
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
        writeln!(
            f,
            "  retention:       {}",
            self.retention.describe(self.retention.approximate)
        )?;
        writeln!(f, "  max_deliveries:  {}", self.max_deliveries)?;
        let b = &self.backoff;
        writeln!(
            f,
            "  backoff:         {} × {} up to {}, jitter {}%",
            fmt_duration(b.base),
            b.factor,
            fmt_duration(b.max),
            b.jitter_percent
        )?;
        writeln!(f, "  claim_idle:      {}", fmt_duration(self.claim_idle))?;
        match &self.dead_letter {
            // `stream_dead.lua` (and the embedded mirror) trim the dead letters exactly.
            Some(r) => writeln!(f, "  dead_letter:     {}", r.describe(false))?,
            None => writeln!(f, "  dead_letter:     off")?,
        }
        writeln!(f, "  max_message_bytes: {}", self.max_message_bytes)?;
        writeln!(f, "  version:         {}", self.version)
    }
}

/// The TOML form of a stream class (`kind` is read before this). Required: `retention`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    retention: Option<toml::Value>,
    max_deliveries: Option<Int>,
    backoff: Option<toml::Value>,
    claim_idle: Option<Dur>,
    dead_letter: Option<toml::Value>,
    max_message_bytes: Option<Int>,
    version: Option<Int>,
}

/// The table `v` as a map, refusing keys outside `accepted`.
fn table<'v>(
    v: &'v toml::Value,
    field: &'static str,
    example: &str,
    accepted: &[&str],
) -> Result<&'v toml::Table, FieldError> {
    let toml::Value::Table(t) = v else {
        return Err((
            field,
            format!("expected a table like {example}, found {}", v.type_str()),
        ));
    };
    if let Some(unknown) = t.keys().find(|k| !accepted.contains(&k.as_str())) {
        return Err((
            field,
            format!(
                "unknown field `{unknown}`; `{field}` takes {}",
                accepted
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(t)
}

fn duration(v: &toml::Value, field: &'static str) -> Result<Duration, FieldError> {
    match v {
        toml::Value::String(text) => humantime::parse_duration(text.trim()).map_err(|e| {
            (
                field,
                format!("invalid duration `{text}`: {e} (expected e.g. \"30s\", \"10m\", \"1h\")"),
            )
        }),
        other => Err((
            field,
            format!(
                "expected a duration string like \"10m\", found {}",
                other.type_str()
            ),
        )),
    }
}

fn count(v: &toml::Value, field: &'static str) -> Result<u64, FieldError> {
    match v {
        toml::Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| (field, format!("must be a positive integer, got {n}")))
        }
        other => Err((
            field,
            format!("expected an integer, found {}", other.type_str()),
        )),
    }
}

/// `{ maxlen = 100000, max_age = "7d", approximate = true, hard_maxlen = 1000000 }`; `base` gives the
/// defaults of absent fields (the dead letters') or none (the stream's own: absent means unbounded on
/// that axis).
fn parse_retention(
    v: toml::Value,
    fields: &RetentionFields,
    base: Option<Retention>,
) -> Result<Retention, FieldError> {
    let t = table(
        &v,
        fields.table,
        "{ maxlen = 100000, max_age = \"7d\" }",
        &["maxlen", "max_age", "approximate", "hard_maxlen"],
    )?;
    let mut r = match base {
        Some(b) if !t.contains_key("maxlen") && !t.contains_key("max_age") => b,
        _ => Retention {
            maxlen: None,
            max_age: None,
            approximate: true,
            hard_maxlen: None,
        },
    };
    if let Some(v) = t.get("maxlen") {
        r.maxlen = Some(count(v, fields.maxlen)?);
    }
    if let Some(v) = t.get("max_age") {
        r.max_age = Some(duration(v, fields.max_age)?);
    }
    if let Some(v) = t.get("approximate") {
        r.approximate = match v {
            toml::Value::Boolean(b) => *b,
            other => {
                return Err((
                    fields.approximate,
                    format!("expected true or false, found {}", other.type_str()),
                ));
            }
        };
    }
    if let Some(v) = t.get("hard_maxlen") {
        r.hard_maxlen = Some(count(v, fields.hard_maxlen)?);
    }
    Ok(r)
}

/// `{ base = "1s", factor = 2, max = "5m", jitter = "20%" }`; absent fields keep the defaults.
fn parse_backoff(v: &toml::Value) -> Result<Backoff, FieldError> {
    let t = table(
        v,
        "backoff",
        "{ base = \"1s\", factor = 2, max = \"5m\", jitter = \"20%\" }",
        &["base", "factor", "max", "jitter"],
    )?;
    let mut b = Backoff::default();
    if let Some(v) = t.get("base") {
        b.base = duration(v, "backoff.base")?;
    }
    if let Some(v) = t.get("factor") {
        b.factor = match v {
            toml::Value::Integer(n) => *n as f64,
            toml::Value::Float(x) => *x,
            other => {
                return Err((
                    "backoff.factor",
                    format!("expected a number, found {}", other.type_str()),
                ));
            }
        };
    }
    if let Some(v) = t.get("max") {
        b.max = duration(v, "backoff.max")?;
    }
    if let Some(v) = t.get("jitter") {
        let toml::Value::String(s) = v else {
            return Err((
                "backoff.jitter",
                format!("expected a percentage like \"20%\", found {}", v.type_str()),
            ));
        };
        b.jitter_percent = s
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|p| p.is_finite())
            .ok_or_else(|| {
                (
                    "backoff.jitter",
                    format!("invalid percentage `{s}`: expected e.g. \"20%\""),
                )
            })?;
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyError};

    fn class_err(body: &str) -> PolicyError {
        Policy::from_toml_str(&format!(
            "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.order_events]\nkind = \"stream\"\n{body}\n"
        ))
        .expect_err("should be rejected")
    }

    fn parse(body: &str) -> StreamClass {
        Policy::from_toml_str(&format!(
            "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.order_events]\nkind = \"stream\"\n{body}\n"
        ))
        .unwrap()
        .class("order_events")
        .unwrap()
        .as_stream()
        .unwrap()
        .clone()
    }

    #[track_caller]
    fn assert_field(err: &PolicyError, field: &str, contains: &str) {
        assert_eq!(err.class(), Some("order_events"), "{err}");
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(err.message().contains(contains), "{err}");
    }

    #[test]
    fn full_toml_round_trip_matches_the_builder() {
        let c = parse(
            "retention = { maxlen = 1000, max_age = \"7d\", approximate = false, hard_maxlen = 5000 }\n\
             max_deliveries = 3\n\
             backoff = { base = \"500ms\", factor = 3, max = \"1m\", jitter = \"10%\" }\n\
             claim_idle = \"30s\"\n\
             dead_letter = { maxlen = 50, max_age = \"30d\" }\n\
             max_message_bytes = 4096\n\
             version = 2",
        );
        let built = StreamClass::new(
            Retention::maxlen(1000)
                .and_max_age(Duration::from_secs(7 * 86400))
                .approximate(false)
                .hard_maxlen(5000),
        )
        .max_deliveries(3)
        .backoff(
            Backoff::new(Duration::from_millis(500), 3.0, Duration::from_secs(60))
                .jitter_percent(10.0),
        )
        .claim_idle(Duration::from_secs(30))
        .dead_letter(Some(
            Retention::maxlen(50).and_max_age(Duration::from_secs(30 * 86400)),
        ))
        .max_message_bytes(4096)
        .version(2);
        assert_eq!(c, built);
        let p = Policy::builder("a", "b")
            .stream("order_events", built)
            .build()
            .unwrap();
        assert_eq!(p.class("order_events").unwrap().kind().version(), 2);
        let text = p.to_string();
        assert!(
            text.contains("retention:       maxlen 1000, max_age 7days, hard_maxlen 5000"),
            "{text}"
        );
        assert!(
            text.contains("dead_letter:     maxlen 50, max_age 30days, hard_maxlen 500"),
            "{text}"
        );
    }

    #[test]
    fn defaults() {
        let c = parse("retention = { max_age = \"1h\" }");
        assert_eq!(c.retention_value().maxlen_value(), None);
        assert_eq!(c.retention_value().hard_maxlen_value(), DEFAULT_HARD_MAXLEN);
        assert!(c.retention_value().is_approximate());
        assert_eq!(c.max_deliveries_value(), 5);
        assert_eq!(c.claim_idle_value(), Duration::from_secs(60));
        assert_eq!(c.max_message_bytes_value(), 1 << 20);
        let dead = c.dead_letter_value().unwrap();
        assert_eq!(dead.maxlen_value(), Some(DEFAULT_DEAD_MAXLEN));
        assert_eq!(dead.max_age_value(), Some(DEFAULT_DEAD_MAX_AGE));
        assert_eq!(
            parse("retention = { maxlen = 7 }")
                .retention_value()
                .hard_maxlen_value(),
            70
        );
        assert_eq!(
            parse("retention = { maxlen = 7 }\ndead_letter = false").dead_letter_value(),
            None
        );
        assert_eq!(
            parse("retention = { maxlen = 7 }\ndead_letter = true").dead_letter_value(),
            StreamClass::new(Retention::maxlen(1)).dead_letter_value()
        );
        // A dead-letter table that only sets `approximate` keeps the default bounds.
        let dead = parse("retention = { maxlen = 7 }\ndead_letter = { approximate = false }")
            .dead_letter_value()
            .unwrap();
        assert!(!dead.is_approximate());
        assert_eq!(dead.maxlen_value(), Some(DEFAULT_DEAD_MAXLEN));
    }

    #[test]
    fn an_unbounded_stream_is_refused() {
        assert_field(&class_err(""), "retention", "missing required field");
        assert_field(
            &class_err("retention = {}"),
            "retention",
            "an unbounded stream is refused",
        );
        assert_field(
            &class_err("retention = { approximate = true, hard_maxlen = 10 }"),
            "retention",
            "unbounded",
        );
        assert_field(
            &class_err("retention = { maxlen = 5 }\ndead_letter = { hard_maxlen = 9, maxlen = 0 }"),
            "dead_letter.maxlen",
            "between 1 and",
        );
        let err = Policy::builder("a", "b")
            .stream(
                "order_events",
                StreamClass::new(Retention {
                    maxlen: None,
                    max_age: None,
                    approximate: true,
                    hard_maxlen: Some(10),
                }),
            )
            .build()
            .unwrap_err();
        assert_field(&err, "retention", "unbounded");
    }

    #[test]
    fn every_rule_names_its_field() {
        let r = "retention = { maxlen = 100 }\n";
        for (body, field, contains) in [
            ("retention = 5", "retention", "expected a table"),
            (
                "retention = { maxlen = 1, size = 3 }",
                "retention",
                "unknown field `size`",
            ),
            (
                "retention = { maxlen = 0 }",
                "retention.maxlen",
                "between 1 and",
            ),
            (
                "retention = { maxlen = -1 }",
                "retention.maxlen",
                "positive integer",
            ),
            (
                "retention = { maxlen = \"x\" }",
                "retention.maxlen",
                "expected an integer",
            ),
            (
                "retention = { max_age = \"0s\" }",
                "retention.max_age",
                "between 1s",
            ),
            (
                "retention = { max_age = \"soon\" }",
                "retention.max_age",
                "invalid duration",
            ),
            (
                "retention = { maxlen = 10, hard_maxlen = 5 }",
                "retention.hard_maxlen",
                "between maxlen (10)",
            ),
            (
                "retention = { maxlen = 10, approximate = 1 }",
                "retention.approximate",
                "true or false",
            ),
            (
                &format!("{r}max_deliveries = 0"),
                "max_deliveries",
                "between 1 and 1000",
            ),
            (
                &format!("{r}max_deliveries = 1001"),
                "max_deliveries",
                "between 1 and 1000",
            ),
            (
                &format!("{r}max_deliveries = -1"),
                "max_deliveries",
                "from 1 to 1000",
            ),
            (
                &format!("{r}backoff = {{ base = \"0s\" }}"),
                "backoff.base",
                "between 1ms",
            ),
            (
                &format!("{r}backoff = {{ factor = 0.5 }}"),
                "backoff.factor",
                "between 1 and 100",
            ),
            (
                &format!("{r}backoff = {{ factor = \"2\" }}"),
                "backoff.factor",
                "expected a number",
            ),
            (
                &format!("{r}backoff = {{ base = \"10s\", max = \"1s\" }}"),
                "backoff.max",
                "between base (10s)",
            ),
            (
                &format!("{r}backoff = {{ jitter = \"120%\" }}"),
                "backoff.jitter",
                "between 0% and 100%",
            ),
            (
                &format!("{r}backoff = {{ jitter = \"20\" }}"),
                "backoff.jitter",
                "invalid percentage",
            ),
            (
                &format!("{r}backoff = {{ jitter = 0.2 }}"),
                "backoff.jitter",
                "expected a percentage",
            ),
            (
                &format!("{r}backoff = {{ delay = \"1s\" }}"),
                "backoff",
                "unknown field `delay`",
            ),
            (
                &format!("{r}claim_idle = \"10ms\""),
                "claim_idle",
                "between 100ms and 24h",
            ),
            (
                &format!("{r}dead_letter = \"yes\""),
                "dead_letter",
                "expected a table",
            ),
            (
                &format!("{r}dead_letter = {{ max_age = \"400days\" }}"),
                "dead_letter.max_age",
                "365 days",
            ),
            (
                &format!("{r}max_message_bytes = 0"),
                "max_message_bytes",
                "between 1 and",
            ),
            (
                &format!("{r}max_message_bytes = 100000000"),
                "max_message_bytes",
                "between 1 and",
            ),
            (&format!("{r}version = 0"), "version", "at least 1"),
            (&format!("{r}bogus = 1"), "bogus", "unknown field"),
        ] {
            assert_field(&class_err(body), field, contains);
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters_down() {
        let b =
            Backoff::new(Duration::from_secs(1), 2.0, Duration::from_secs(10)).jitter_percent(50.0);
        let delays: Vec<_> = (1..=6).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
        assert_eq!(b.jittered(3, 0.0), Duration::from_secs(4));
        assert_eq!(b.jittered(3, 1.0), Duration::from_secs(2));
        assert_eq!(
            b.jittered(3, 7.0),
            Duration::from_secs(2),
            "the unit is clamped"
        );
    }
}
