//! Rate limiting: five algorithms, exact under races, on the store's clock.
//!
//! **Guarantee.** A check is one atomic step on the store — one Lua script on Redis (`EVALSHA`, reading the
//! server's `TIME`; checks of one handle that wait at the same moment share one call of the script, which
//! decides them one after the other, each as alone: see `docs/rate-limiting.md`), one critical section in
//! the embedded backend — so concurrent checks cannot both read
//! "one left" and both pass: with a limit of 100, 1000 racing checks from any number of processes allow
//! exactly 100 (`fixed_window`, `sliding_log`, `token_bucket` and `gcra`; `sliding_counter` is exact within a
//! window and approximate across one, see [`Algorithm::SlidingCounter`](crate::policy::Algorithm::SlidingCounter)). Several limits checked together
//! are all or nothing: if one refuses, none is charged. A refused call charges nothing. The client's clock is
//! never used. Every key expires as soon as it no longer affects a decision.
//!
//! A refusal is a value ([`Decision`]), not an error; errors are failures only. When the store fails, each
//! class's `on_error` decides (allow, deny, or an in-process limiter), and a circuit breaker keeps requests
//! from each paying a timeout while it is down.
//!
//! **A check that timed out may still be charged, once.** A timeout is the client giving up: if Redis was
//! slow or hung (not dead), it runs the script it already received later, so that call counts against the
//! limit on the server although its caller got the `on_error` answer (with `"local"`, it was charged in
//! process too). It is charged at most once: redis-rs never resends a command after a timeout or a
//! reconnect, and a check is never retried. Such checks are counted in `keyward_ratelimit_uncertain_total`;
//! afterwards the identity can be refused earlier than the limit alone would say, by at most their cost,
//! until those charges age out. See `docs/rate-limiting.md`.
//!
//! **Corrupt or foreign state is contained to its identity.** A stored state the class could not have
//! written (`1e300`, a negative time, a count above the limit) is deleted and the identity starts fresh,
//! counted in `keyward_ratelimit_corrupt_state_total` and logged at `warn`. A key holding another Redis type
//! (a list where GCRA keeps a string) is an [`Error::Redis`] for that identity only, charging nothing; the
//! key is left for an operator to inspect.
//!
//! ```
//! # async fn demo() -> keyward::Result<()> {
//! use keyward::{Keyward, policy::Policy};
//!
//! let policy = Policy::from_toml_str(r#"
//!     [namespace]
//!     env = "dev"
//!     app = "api"
//!
//!     [classes.per_user]
//!     kind = "rate_limit"
//!     algorithm = "gcra"
//!     limit = 2
//!     window = "1m"
//! "#)?;
//! let kw = Keyward::from_env(policy).await?;
//! let limiter = kw.rate_limiter("per_user")?;
//! assert!(limiter.check("alice").await?.is_allowed());
//! assert!(limiter.check("alice").await?.is_allowed());
//! let third = limiter.check("alice").await?;
//! assert!(!third.is_allowed());
//! assert!(third.retry_after().unwrap() > std::time::Duration::from_secs(25));
//! assert!(limiter.check("bob").await?.is_allowed()); // identities are independent
//! # Ok(()) }
//! ```
//!
//! # Metrics
//! Labelled by `class`: `keyward_ratelimit_allowed_total`, `keyward_ratelimit_limited_total`,
//! `keyward_ratelimit_shadow_limited_total` (shadow classes that would have refused),
//! `keyward_ratelimit_blocked_locally_total` (refused from the block cache), `keyward_ratelimit_errors_total`
//! (store failures), `keyward_ratelimit_fallback_total` (with `on_error`), `keyward_ratelimit_uncertain_total`
//! (checks that timed out and may still be charged on the server) and `keyward_ratelimit_corrupt_state_total`
//! (corrupt states reset), plus the gauge `keyward_breaker_open`.

pub(crate) mod algo;
pub(crate) mod local;
pub(crate) mod store;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::backend::BreakerState;

use self::algo::{Group, Spec, Verdict};
use self::local::LocalRates;
use self::store::{Batching, Queued, RateCall, RateReply};
use crate::Keyward;
use crate::error::{Error, Result};
use crate::key::{IdParts, KeySpace};
use crate::policy::{ClassKind, OnError, RateLimitClass};

/// Most identities the block cache remembers at once, and the local fallback per class.
const LOCAL_CAPACITY: usize = 100_000;

/// Most refusals (of different costs) the block cache remembers per key.
const BLOCK_STEPS: usize = 4;

/// What the block cache remembers of one key: refusals by the store, as (refused cost, refused until).
///
/// A refusal of cost `k` until `t` says that no cost `>= k` can pass before `t` (every algorithm needs at
/// least as much room for a dearer call, and charges only make room scarcer). It says nothing about a
/// cheaper call, which goes to the store. So a check of cost `c` is refused in process only while some
/// remembered step with `k <= c` has not passed. Steps that another step makes redundant are dropped.
type Steps = Vec<(i64, Instant)>;

/// Where a [`Decision`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The store (Redis, or the embedded backend) decided.
    Store,
    /// Refused in process: the identity was known to be limited (the class's `block_cache`).
    BlockCache,
    /// The store failed; the in-process fallback limiter decided (`on_error = "local"`).
    LocalFallback,
    /// The store failed; allowed without counting (`on_error = "allow"`).
    FailOpen,
    /// The store failed; refused (`on_error = "deny"`).
    FailClosed,
}

/// The state of one limit after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    class: Arc<str>,
    allowed: bool,
    shadow: bool,
    limit: u64,
    window: Duration,
    remaining: u64,
    reset_after: Duration,
    retry_after: Option<Duration>,
}

impl LimitStatus {
    /// The class (policy name) of this limit.
    pub fn class(&self) -> &str {
        &self.class
    }
    /// Whether this limit allowed the call.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }
    /// Whether the class is in shadow mode (observes, never refuses).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }
    /// The declared limit per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }
    /// The declared window.
    pub fn window(&self) -> Duration {
        self.window
    }
    /// Units left now (after this call, if it was allowed).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
    /// Time until the limit is fully replenished.
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }
    /// For a refusal, how long until a call of the same cost can succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// The outcome of a check: allowed or limited, with what an HTTP response needs to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    allowed: bool,
    shadow_limited: bool,
    source: Source,
    limits: Vec<LimitStatus>,
}

impl Decision {
    /// Whether the call may proceed.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }
    /// Whether the call was refused.
    pub fn is_limited(&self) -> bool {
        !self.allowed
    }
    /// Whether a shadow-mode class would have refused (the call was allowed anyway).
    pub fn is_shadow_limited(&self) -> bool {
        self.shadow_limited
    }
    /// Where the decision came from.
    pub fn source(&self) -> Source {
        self.source
    }
    /// Every limit consulted, in the limiter's order.
    pub fn limits(&self) -> &[LimitStatus] {
        &self.limits
    }
    /// The limit that matters most to the caller: for a refusal, the enforced limit that refused with the
    /// longest `retry_after`; otherwise the one with the fewest units remaining (then the longest reset).
    pub fn binding(&self) -> &LimitStatus {
        let enforced = self.limits.iter().filter(|l| !l.shadow);
        let pick = if self.allowed {
            enforced.min_by(|a, b| {
                a.remaining
                    .cmp(&b.remaining)
                    .then(b.reset_after.cmp(&a.reset_after))
            })
        } else {
            enforced
                .filter(|l| !l.allowed)
                .max_by_key(|l| l.retry_after)
        };
        // A limiter has at least one limit; if every one is shadow, report the first.
        pick.unwrap_or(&self.limits[0])
    }
    /// The binding limit's declared limit.
    pub fn limit(&self) -> u64 {
        self.binding().limit
    }
    /// The binding limit's remaining units.
    pub fn remaining(&self) -> u64 {
        self.binding().remaining
    }
    /// Time until the binding limit is fully replenished.
    pub fn reset_after(&self) -> Duration {
        self.binding().reset_after
    }
    /// For a refusal, how long to wait before retrying; `None` when allowed.
    pub fn retry_after(&self) -> Option<Duration> {
        if self.allowed {
            None
        } else {
            self.limits
                .iter()
                .filter(|l| !l.shadow && !l.allowed)
                .filter_map(|l| l.retry_after)
                .max()
        }
    }
}

/// One limit of a limiter.
struct Limit {
    class: Arc<str>,
    config: RateLimitClass,
    keys: KeySpace,
    /// The decision counters, registered once with the recorder installed when the limiter was made (as
    /// every keyward handle does: install the recorder first), so a check formats no label.
    allowed: metrics::Counter,
    limited: metrics::Counter,
    shadow_limited: metrics::Counter,
}

/// Checks one or more rate-limit classes for an identity. Cheap to clone.
///
/// From [`Keyward::rate_limiter`] (one class) or [`Keyward::rate_limiter_group`] (several, all or nothing).
/// A refusal is a value ([`Decision::is_limited`]), not an error; errors are reserved for the store failing
/// in a way `on_error` does not cover (an error reply).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> keyward::Result<()> {
/// use std::time::Duration;
/// use keyward::{Keyward, policy::{Algorithm, Policy, RateLimitClass}};
///
/// let policy = Policy::builder("dev", "shop")
///     .rate_limit("login_per_ip", RateLimitClass::new(Algorithm::Gcra, 5, Duration::from_secs(60)))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let login = kw.rate_limiter("login_per_ip")?;
/// for _ in 0..5 {
///     assert!(login.check("203.0.113.7").await?.is_allowed());
/// }
/// let sixth = login.check("203.0.113.7").await?;
/// assert!(sixth.is_limited());
/// assert!(sixth.retry_after().is_some_and(|d| d <= Duration::from_secs(12))); // one per 12 s comes back
/// assert!(login.check("198.51.100.1").await?.is_allowed()); // per identity
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    kw: Keyward,
    /// The handle's block cache and local fallback, shared by every limiter of the handle.
    shared: Arc<RateShared>,
    limits: Arc<[Limit]>,
    /// The script's arguments per limit, derived once here rather than on every check.
    specs: Arc<[Spec]>,
    shadow: Arc<[bool]>,
    on_error: OnError,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field(
                "classes",
                &self.limits.iter().map(|l| &*l.class).collect::<Vec<_>>(),
            )
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// In-process state shared by every limiter of one [`Keyward`] handle.
pub(crate) struct RateShared {
    fallback: LocalRates,
    blocks: Mutex<HashMap<String, Steps>>,
    /// Merges the concurrent checks of every limiter of the handle into shared script calls (Redis only).
    batching: Batching,
}

impl Default for RateShared {
    fn default() -> Self {
        RateShared {
            fallback: LocalRates::new(LOCAL_CAPACITY),
            blocks: Mutex::new(HashMap::new()),
            batching: Batching::default(),
        }
    }
}

impl RateShared {
    /// Until when a check of `cost` on `key` is known to be refused, if it is.
    fn blocked_until(&self, key: &str, cost: i64, now: Instant) -> Option<Instant> {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        blocks
            .get(key)?
            .iter()
            .filter(|(k, until)| *k <= cost && *until > now)
            .map(|(_, until)| *until)
            .max()
    }

    /// Remember that the store refused `cost` on `key` until `until`.
    fn block(&self, key: &str, cost: i64, until: Instant, now: Instant) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if !blocks.contains_key(key) && blocks.len() >= LOCAL_CAPACITY {
            blocks.retain(|_, steps| steps.iter().any(|(_, u)| *u > now));
            if blocks.len() >= LOCAL_CAPACITY {
                // Still full of live blocks: forgetting one only costs a store call later.
                return;
            }
        }
        let steps = blocks.entry(key.to_owned()).or_default();
        // Drop what has passed, and what the new step covers (dearer or equal, refused no longer).
        steps.retain(|(k, u)| *u > now && !(*k >= cost && *u <= until));
        if steps.iter().any(|(k, u)| *k <= cost && *u >= until) {
            return; // a cheaper call is already known refused for at least as long
        }
        if steps.len() >= BLOCK_STEPS
            && let Some(i) = (0..steps.len()).min_by_key(|&i| steps[i].1)
        {
            steps.swap_remove(i);
        }
        steps.push((cost, until));
    }

    /// The store allowed `cost` on `key`: any remembered refusal of a cost `<= cost` was wrong (the limit
    /// was reset by hand, or its key lost), so forget it.
    fn unblock(&self, key: &str, cost: i64) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(steps) = blocks.get_mut(key) {
            steps.retain(|(k, _)| *k > cost);
            if steps.is_empty() {
                blocks.remove(key);
            }
        }
    }
}

impl Keyward {
    /// A limiter for one `rate_limit` class of the policy.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`].
    pub fn rate_limiter(&self, class: &str) -> Result<RateLimiter> {
        self.rate_limiter_group(&[class])
    }

    /// A limiter checking several classes at once, all or nothing (e.g. 10/second *and* 1000/day): if any
    /// enforced limit refuses, none is charged. Their keys for one identity share a hash tag.
    /// On store failure the strictest `on_error` of the group applies (deny, then local, then allow).
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`], or [`Error::InvalidArgument`] for an empty or
    /// repeated list.
    pub fn rate_limiter_group(&self, classes: &[&str]) -> Result<RateLimiter> {
        if classes.is_empty() {
            return Err(Error::InvalidArgument {
                what: "a rate limiter needs at least one class".to_owned(),
            });
        }
        let mut limits = Vec::with_capacity(classes.len());
        let mut specs = Vec::with_capacity(classes.len());
        for (i, &class) in classes.iter().enumerate() {
            if classes[..i].contains(&class) {
                return Err(Error::InvalidArgument {
                    what: format!("class `{class}` is listed twice"),
                });
            }
            let (declared, keys) = self.declared(class)?;
            let config = match declared.kind() {
                ClassKind::RateLimit(r) => r.clone(),
                other => {
                    return Err(Error::WrongKind {
                        class: class.to_owned(),
                        expected: "rate_limit",
                        found: other.name(),
                    });
                }
            };
            let spec = Spec {
                algorithm: config.algorithm_value(),
                limit: i64::try_from(config.limit_value()).unwrap_or(i64::MAX),
                window: config.window_us(),
                capacity: i64::try_from(config.capacity()).unwrap_or(i64::MAX),
                interval: config.interval_us(),
            };
            specs.push(spec);
            let label = class.to_owned();
            limits.push(Limit {
                class: Arc::from(class),
                config,
                keys,
                allowed: metrics::counter!("keyward_ratelimit_allowed_total", "class" => label.clone()),
                limited: metrics::counter!("keyward_ratelimit_limited_total", "class" => label.clone()),
                shadow_limited: metrics::counter!("keyward_ratelimit_shadow_limited_total", "class" => label),
            });
        }
        let on_error = limits
            .iter()
            .map(|l| l.config.on_error_value())
            .max_by_key(|o| match o {
                OnError::Deny => 2,
                OnError::Local => 1,
                _ => 0,
            })
            .unwrap_or_default();
        let shadow = limits.iter().map(|l| l.config.is_shadow()).collect();
        Ok(RateLimiter {
            kw: self.clone(),
            shared: self.shared::<RateShared>(),
            limits: limits.into(),
            specs: specs.into(),
            shadow,
            on_error,
        })
    }

    /// The state of the circuit breaker in front of the store, which every capability of this handle
    /// shares (always closed for the embedded backend).
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.backend.breaker_state()
    }
}

impl RateLimiter {
    /// The classes this limiter checks, in order.
    pub fn classes(&self) -> impl Iterator<Item = &str> {
        self.limits.iter().map(|l| &*l.class)
    }

    /// The settings of each class, in order.
    pub fn configs(&self) -> impl Iterator<Item = (&str, &RateLimitClass)> {
        self.limits.iter().map(|l| (&*l.class, &l.config))
    }

    /// Check and charge one unit for `id`.
    ///
    /// # Errors
    /// [`Error::Key`] for an unusable id (empty, or a key over 1 KiB). A store failure is not an error: the
    /// class's `on_error` answers instead ([`Decision::source`] says so), and the failure is counted and logged.
    /// The exception is data, not the store: [`Error::Redis`] (server code `WRONGTYPE`) when this identity's
    /// key holds another Redis type than its algorithm keeps. Nothing is charged, other identities are not
    /// affected, and the key is left in place until it is deleted or expires.
    pub async fn check(&self, id: &(impl IdParts + ?Sized)) -> Result<Decision> {
        self.run(id, 1, true).await
    }

    /// Check and charge `cost` units (a weighted request). A cost above what is available is refused and
    /// charges nothing; a cost of 0 is a [`peek`](Self::peek).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `cost` exceeds a limit's capacity (it could never be allowed), and
    /// otherwise as [`check`](Self::check).
    pub async fn check_cost(&self, id: &(impl IdParts + ?Sized), cost: u64) -> Result<Decision> {
        if cost == 0 {
            return self.peek(id).await;
        }
        for l in self.limits.iter() {
            if cost > l.config.capacity() {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "cost {cost} exceeds the capacity of rate-limit class `{}` ({}), so it could never be allowed",
                        l.class,
                        l.config.capacity()
                    ),
                });
            }
        }
        self.run(id, i64::try_from(cost).unwrap_or(i64::MAX), true)
            .await
    }

    /// Report the state for `id` without charging anything: `is_allowed` says whether a call of cost 1 would
    /// pass now, `remaining` is what is available.
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub async fn peek(&self, id: &(impl IdParts + ?Sized)) -> Result<Decision> {
        self.run(id, 1, false).await
    }

    async fn run(
        &self,
        id: &(impl IdParts + ?Sized),
        cost: i64,
        consume: bool,
    ) -> Result<Decision> {
        let keys = self
            .limits
            .iter()
            .map(|l| l.keys.key(id))
            .collect::<std::result::Result<Arc<[String]>, _>>()?;
        let shared = &self.shared;

        if consume && let Some(d) = self.blocked(&keys, cost, shared) {
            return Ok(d);
        }

        let queued = Queued {
            keys: Arc::clone(&keys),
            specs: Arc::clone(&self.specs),
            shadow: Arc::clone(&self.shadow),
            cost,
            consume,
        };
        let call = RateCall {
            keys: &keys,
            group: Group {
                specs: &self.specs,
                shadow: &self.shadow,
            },
            cost,
            consume,
        };
        // The backend bounds the call by the response timeout and answers at once while its breaker is open;
        // on Redis, checks waiting at the same moment share one script call (`store::decide`).
        let decision = match store::decide(&self.kw, &shared.batching, queued).await {
            Ok(reply) => self.decide(reply, Source::Store),
            // A full embedded store (a flood of identities past the class's budget) is the store failing too:
            // `on_error` decides, as it does for Redis answering `OOM`.
            Err(err) if err.is_unavailable() || matches!(err, Error::StoreFull { .. }) => {
                self.fallback(&call, err)
            }
            // An error reply (a wrong-type key, a missing ACL grant) is this identity's data or a
            // misconfiguration, not the store being down: a fallback would hide it for ever, so it is the
            // caller's error, for this call only.
            Err(err) => {
                for l in self.limits.iter() {
                    metrics::counter!("keyward_ratelimit_errors_total", "class" => l.class.to_string())
                        .increment(1);
                }
                if is_foreign_data(&err) {
                    tracing::warn!(error = %err, "keyward: rate-limit key of the wrong type");
                }
                return Err(err);
            }
        };
        self.record(&keys, &decision, cost, consume);
        Ok(decision)
    }

    /// A refusal from the block cache, if an enforced, block-caching limit is known to refuse a check of
    /// `cost` on `keys`.
    fn blocked(&self, keys: &[String], cost: i64, shared: &RateShared) -> Option<Decision> {
        let now = Instant::now();
        let mut limits = Vec::new();
        for (l, key) in self.limits.iter().zip(keys) {
            if !l.config.is_block_cache() || l.config.is_shadow() {
                continue;
            }
            if let Some(until) = shared.blocked_until(key, cost, now) {
                let retry = until - now;
                limits.push(LimitStatus {
                    class: Arc::clone(&l.class),
                    allowed: false,
                    shadow: false,
                    limit: l.config.limit_value(),
                    window: l.config.window_value(),
                    remaining: 0,
                    reset_after: retry,
                    retry_after: Some(retry),
                });
                metrics::counter!("keyward_ratelimit_blocked_locally_total", "class" => l.class.to_string())
                    .increment(1);
            }
        }
        (!limits.is_empty()).then_some(Decision {
            allowed: false,
            shadow_limited: false,
            source: Source::BlockCache,
            limits,
        })
    }

    fn decide(&self, reply: RateReply, source: Source) -> Decision {
        for (l, v) in self.limits.iter().zip(&reply.verdicts) {
            if v.corrupt {
                metrics::counter!("keyward_ratelimit_corrupt_state_total", "class" => l.class.to_string())
                    .increment(1);
                tracing::warn!(class = %l.class, "keyward: corrupt rate-limit state reset; the identity starts afresh");
            }
        }
        let limits: Vec<LimitStatus> = self
            .limits
            .iter()
            .zip(&reply.verdicts)
            .map(|(l, v)| status(l, v))
            .collect();
        let shadow_limited = limits.iter().any(|l| l.shadow && !l.allowed);
        Decision {
            allowed: reply.allowed,
            shadow_limited,
            source,
            limits,
        }
    }

    /// The store is unavailable (failed, or its breaker is open): apply `on_error`.
    fn fallback(&self, call: &RateCall<'_>, err: Error) -> Decision {
        // Counted and logged once where it began (the breaker opening, the lazy connect's attempts).
        let breaker_open = err.is_reported_outage();
        // A timed-out script may still run on the server: the call may be charged there (once) as well.
        let uncertain = call.consume && matches!(err, Error::Timeout { .. });
        for l in self.limits.iter() {
            let class = l.class.to_string();
            if !breaker_open {
                metrics::counter!("keyward_ratelimit_errors_total", "class" => class.clone())
                    .increment(1);
            }
            if uncertain {
                metrics::counter!("keyward_ratelimit_uncertain_total", "class" => class.clone())
                    .increment(1);
            }
            metrics::counter!("keyward_ratelimit_fallback_total", "class" => class, "on_error" => self.on_error.name())
                .increment(1);
        }
        if !breaker_open {
            tracing::warn!(error = %err, on_error = %self.on_error, "keyward: rate-limit store failed");
        }
        match self.on_error {
            OnError::Local => {
                let reply = self.shared.fallback.check(call);
                self.decide(reply, Source::LocalFallback)
            }
            OnError::Deny => {
                let retry = match err {
                    Error::CircuitOpen { retry_in, .. } => retry_in,
                    _ => Duration::ZERO,
                }
                .max(Duration::from_secs(1));
                self.synthetic(false, retry, Source::FailClosed)
            }
            _ => self.synthetic(true, Duration::ZERO, Source::FailOpen),
        }
    }

    fn synthetic(&self, allowed: bool, retry: Duration, source: Source) -> Decision {
        let limits = self
            .limits
            .iter()
            .map(|l| LimitStatus {
                class: Arc::clone(&l.class),
                allowed,
                shadow: l.config.is_shadow(),
                limit: l.config.limit_value(),
                window: l.config.window_value(),
                remaining: if allowed { l.config.capacity() } else { 0 },
                reset_after: retry,
                retry_after: (!allowed).then_some(retry),
            })
            .collect();
        Decision {
            allowed,
            shadow_limited: false,
            source,
            limits,
        }
    }

    fn record(&self, keys: &[String], d: &Decision, cost: i64, consume: bool) {
        if !consume {
            return;
        }
        let now = Instant::now();
        let rates = &self.shared;
        for ((l, status), key) in self.limits.iter().zip(&d.limits).zip(keys) {
            if status.shadow {
                if !status.allowed {
                    l.shadow_limited.increment(1);
                }
                continue;
            }
            if d.allowed {
                l.allowed.increment(1);
                if l.config.is_block_cache() && d.source == Source::Store {
                    rates.unblock(key, cost);
                }
            } else if !status.allowed {
                l.limited.increment(1);
                if l.config.is_block_cache()
                    && d.source == Source::Store
                    && let Some(retry) = status.retry_after
                {
                    // Remembered for this cost: a cheaper check still asks the store.
                    rates.block(key, cost, now + retry, now);
                }
            }
        }
    }
}

/// Whether a store error is about this identity's data rather than the store: its key holds another Redis type
/// (the script names the key's class and the type it found). Such an error is the caller's, not a fallback's,
/// and says nothing about the store's health.
fn is_foreign_data(err: &Error) -> bool {
    matches!(err, Error::Redis { source, .. } if source.code() == Some("WRONGTYPE"))
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn status(l: &Limit, v: &Verdict) -> LimitStatus {
    LimitStatus {
        class: Arc::clone(&l.class),
        allowed: v.allowed,
        shadow: l.config.is_shadow(),
        limit: l.config.limit_value(),
        window: l.config.window_value(),
        remaining: u64::try_from(v.remaining).unwrap_or(0),
        reset_after: micros(v.reset),
        retry_after: (!v.allowed).then(|| micros(v.retry)),
    }
}
