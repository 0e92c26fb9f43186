//! Distributed locks with fencing tokens.
//!
//! **Guarantee.** At any instant, at most one caller holds a given lock *on the store*: acquiring is one atomic
//! step (one Lua script on Redis, one critical section in the embedded backend) that takes the lease only if
//! nobody holds it, and only the holder's secret token can extend or release it. Every acquisition also
//! issues a **fencing token**, strictly greater than every token issued before for that lock (it never falls
//! below the server's clock in µs, so it keeps increasing even after its counter expired). A lease is not
//! enough on its own: a holder can be paused (GC, a stopped VM, a slow network) past its lease and then act as
//! if it still held the lock, while another caller holds it. A lock cannot stop that; only the *resource* can,
//! by refusing a write whose token is lower than one it has already seen — see Martin Kleppmann, ["How to do
//! distributed locking"](https://martin.kleppmann.com/2016/02/08/how-to-do-distributed-locking.html) (2016).
//! So: pass [`LockGuard::fence`] with every protected write and have the resource check it, or keep the
//! protected value next to the lock with [`LockGuard::fenced_write`], which checks it for you and also refuses
//! a stale holder as soon as a newer one has acquired. Watch [`LockGuard::lost`] to stop work early.
//!
//! A lock held by someone else is a value (`Ok(None)`), not an error. Waiting in [`Locks::lock`] is woken by
//! the holder's release (pub/sub on Redis), or re-checks when the holder's lease runs out — never by polling.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use keyward::{Keyward, lock::FencedWrite, policy::{LockClass, Policy}};
//!
//! let policy = Policy::builder("dev", "billing")
//!     .lock("invoice_run", LockClass::new(Duration::from_secs(30)).wait(Duration::from_secs(5)))
//!     .build()?;
//! let kw = Keyward::embedded(policy);
//! let locks = kw.locks("invoice_run")?;
//!
//! let Some(guard) = locks.lock("2024-06").await? else {
//!     return Ok(()); // still held by someone else after `wait`
//! };
//! assert!(locks.try_lock("2024-06").await?.is_none()); // exclusive
//! assert_eq!(guard.fenced_write(b"sent").await?, FencedWrite::Applied);
//! let old = guard.fence();
//! assert!(guard.release().await?);
//!
//! let next = locks.try_lock("2024-06").await?.expect("free again");
//! assert!(next.fence() > old);
//! // A worker still carrying the old fence is refused by the resource:
//! let stale = locks.fenced_write("2024-06", old, b"late").await?;
//! assert!(matches!(stale, FencedWrite::Stale { .. }));
//! # next.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Storage
//! For a lock `L = {env}:{app}:{class}:v{n}:{name}`: `L` holds the holder's token, `L:f` the last fencing
//! token, `L:w` the fenced value — one hash tag, so one Cluster slot. Every key has a TTL: `L` the lease,
//! the other two the class's `fence_ttl` after their last use.
//!
//! # Metrics
//! Labelled by `class`: `keyward_lock_acquired_total`, `keyward_lock_contended_total` (an attempt found the
//! lock held), `keyward_lock_timeouts_total` (`lock` gave up at its deadline), `keyward_lock_lost_total`
//! (a lease lost while its guard lived), `keyward_lock_fenced_rejected_total` (stale fenced writes).

mod guard;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::Counter;
use tokio::time::{Instant, sleep, sleep_until};

pub use guard::LockGuard;

/// A process's turn at one lock name.
pub(crate) type Baton = tokio::sync::OwnedMutexGuard<()>;

/// One queue per lock name per process: of the tasks of this process that wait for a lock, only the first
/// in line asks the store; the rest wait their turn here, in order. So a release wakes one waiter per
/// process, not every task, and a task that releases and asks again queues behind the others instead of
/// winning straight back (what `keyward bench lock --names one` showed before: ~10 attempts per hand-off,
/// and the releaser re-acquiring more than half the time).
#[derive(Default)]
pub(crate) struct Queues {
    map: std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>,
    >,
}

impl Queues {
    fn queue(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = map.get(key).and_then(std::sync::Weak::upgrade) {
            return q;
        }
        if map.len() >= 1024 {
            map.retain(|_, q| q.strong_count() > 0);
        }
        let q = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(key.to_owned(), Arc::downgrade(&q));
        q
    }
}

use self::guard::Grant;
use self::store::{Attempt, LockKeys};
use crate::Keyward;
use crate::backend::Watch;
use crate::error::{Error, Result};
use crate::key::{IdParts, KeySpace};
use crate::policy::LockClass;

/// The longest lease one acquisition or extension may ask for.
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The longest `wait` (the class's is validated to the same bound).
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The largest fencing token Lua's numbers (doubles) hold exactly. Issued tokens are µs since the epoch,
/// about 2^51 today.
const MAX_FENCE: u64 = (1 << 53) - 1;

/// Upper bound of the random pause after a wake-up: 10% of 20 ms. It only spreads the waiters a release woke
/// together; it is not a polling interval.
const WAKE_JITTER_US: u64 = 2_000;

/// How to take one lock; anything left unset comes from the class.
///
/// ```
/// use std::time::Duration;
/// let options = keyward::lock::LockOptions::new()
///     .ttl(Duration::from_secs(10))
///     .wait(Duration::ZERO) // one attempt
///     .watchdog(true);
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LockOptions {
    ttl: Option<Duration>,
    wait: Option<Duration>,
    watchdog: Option<bool>,
}

impl LockOptions {
    /// Everything from the class.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lease length (between 1 ms and 24 h; default: the class `ttl`).
    #[must_use]
    pub fn ttl(mut self, d: Duration) -> Self {
        self.ttl = Some(d);
        self
    }

    /// How long to wait for a held lock (default: the class `wait`); zero makes one attempt.
    #[must_use]
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = Some(d);
        self
    }

    /// Renew the lease in the background every `ttl / 3` while the guard lives (default: the class
    /// `watchdog`).
    #[must_use]
    pub fn watchdog(mut self, yes: bool) -> Self {
        self.watchdog = Some(yes);
        self
    }
}

/// The outcome of a fenced write: a stale fence is a value, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub enum FencedWrite {
    /// Written: no newer fence had acquired the lock or written.
    Applied,
    /// Refused: a newer holder has acquired the lock or written since this fence was issued.
    Stale {
        /// The highest fence the lock has seen (issued or written).
        highest: u64,
    },
}

impl FencedWrite {
    /// Whether the write was applied.
    pub fn is_applied(&self) -> bool {
        matches!(self, FencedWrite::Applied)
    }
}

/// Per-class counters (the `metrics` facade; install any recorder).
struct LockMetrics {
    acquired: Counter,
    contended: Counter,
    timeouts: Counter,
    lost: Counter,
    fenced_rejected: Counter,
}

impl LockMetrics {
    fn new(class: &str) -> Self {
        let c = |name: &'static str| metrics::counter!(name, "class" => class.to_owned());
        LockMetrics {
            acquired: c("keyward_lock_acquired_total"),
            contended: c("keyward_lock_contended_total"),
            timeouts: c("keyward_lock_timeouts_total"),
            lost: c("keyward_lock_lost_total"),
            fenced_rejected: c("keyward_lock_fenced_rejected_total"),
        }
    }
}

struct ClassInfo {
    name: String,
    policy: LockClass,
    keys: KeySpace,
    metrics: LockMetrics,
}

/// The named locks of one `lock` class of the policy. Cheap to clone.
///
/// From [`Keyward::locks`]. See the [module docs](self) for the guarantee and an example.
#[derive(Clone)]
pub struct Locks {
    kw: Keyward,
    /// The handle's per-process wait queues, shared by every `Locks` of the handle.
    queues: Arc<Queues>,
    class: Arc<ClassInfo>,
}

impl fmt::Debug for Locks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locks")
            .field("class", &self.class.name)
            .field("keyward", &self.kw)
            .finish()
    }
}

/// One acquisition's settings, resolved from the options and the class.
struct Settings {
    ttl: Duration,
    wait: Duration,
    watchdog: bool,
    fence_ttl: Duration,
}

fn check_ttl(class: &str, ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_LEASE {
        return Err(Error::InvalidArgument {
            what: format!("class `{class}`: a lock ttl must be between 1ms and 24h, got {ttl:?}"),
        });
    }
    Ok(())
}

fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Keyward {
    /// The named locks of one `lock` class of the policy.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], or [`Error::WrongKind`] for a class of another kind.
    pub fn locks(&self, class: &str) -> Result<Locks> {
        let (declared, keys) = self.declared(class)?;
        let Some(policy) = declared.as_lock() else {
            return Err(Error::WrongKind {
                class: class.to_owned(),
                expected: "lock",
                found: declared.kind().name(),
            });
        };
        Ok(Locks {
            kw: self.clone(),
            queues: self.shared::<Queues>(),
            class: Arc::new(ClassInfo {
                name: class.to_owned(),
                policy: policy.clone(),
                keys,
                metrics: LockMetrics::new(class),
            }),
        })
    }
}

impl Locks {
    /// The class name.
    pub fn class(&self) -> &str {
        &self.class.name
    }

    /// The class's declared policy.
    pub fn policy(&self) -> &LockClass {
        &self.class.policy
    }

    /// The full Redis key of a lock (for logs and operators; the API never needs it).
    ///
    /// # Errors
    /// [`Error::Key`] for an empty id part or an over-long key.
    pub fn key(&self, name: &(impl IdParts + ?Sized)) -> Result<String> {
        Ok(self.class.keys.key(name)?)
    }

    fn keys(&self, name: &(impl IdParts + ?Sized)) -> Result<LockKeys> {
        Ok(LockKeys::new(self.key(name)?))
    }

    /// One attempt with the class's settings: the guard, or `None` if someone holds the lock.
    ///
    /// # Errors
    /// [`Error::Key`], backend failures.
    pub async fn try_lock(&self, name: &(impl IdParts + ?Sized)) -> Result<Option<LockGuard>> {
        self.acquire(name, &LockOptions::new().wait(Duration::ZERO), false)
            .await
    }

    /// Take the lock, waiting up to the class's `wait` for a holder to release it (or for its lease to run
    /// out). `None` if it is still held at the deadline.
    ///
    /// # Errors
    /// [`Error::Key`], backend failures.
    pub async fn lock(&self, name: &(impl IdParts + ?Sized)) -> Result<Option<LockGuard>> {
        self.acquire(name, &LockOptions::new(), true).await
    }

    /// [`lock`](Self::lock) with explicit options (a zero `wait` makes one attempt).
    ///
    /// Cancelling this future while a request is in flight may leave the lock held, with nobody knowing its
    /// token, until its lease runs out.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero `ttl` or one over 24 h; [`Error::Key`], backend failures.
    pub async fn lock_with(
        &self,
        name: &(impl IdParts + ?Sized),
        options: LockOptions,
    ) -> Result<Option<LockGuard>> {
        self.acquire(name, &options, true).await
    }

    fn settings(&self, options: &LockOptions) -> Result<Settings> {
        let policy = &self.class.policy;
        let ttl = options.ttl.unwrap_or_else(|| policy.ttl_value());
        check_ttl(&self.class.name, ttl)?;
        if options.wait.is_some_and(|w| w > MAX_WAIT) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "class `{}`: a lock wait must be at most 365 days, got {:?}",
                    self.class.name, options.wait
                ),
            });
        }
        Ok(Settings {
            ttl,
            wait: options.wait.unwrap_or_else(|| policy.wait_value()),
            watchdog: options.watchdog.unwrap_or_else(|| policy.is_watchdog()),
            // The fencing state must outlive the lease it fences.
            fence_ttl: policy.fence_ttl_value().max(ttl),
        })
    }

    async fn acquire(
        &self,
        name: &(impl IdParts + ?Sized),
        options: &LockOptions,
        count_timeout: bool,
    ) -> Result<Option<LockGuard>> {
        let s = self.settings(options)?;
        let keys = self.keys(name)?;
        let inner = &self.kw.inner;
        let m = &self.class.metrics;
        let token = token();
        let deadline = Instant::now().checked_add(s.wait);
        // Wait for this process's turn first (a single attempt skips the queue: it never waits).
        let baton = if s.wait.is_zero() {
            None
        } else {
            let queue = self.queues.queue(&keys.lock);
            let turn = queue.lock_owned();
            match deadline {
                Some(d) => match tokio::time::timeout_at(d, turn).await {
                    Ok(b) => Some(b),
                    Err(_) => {
                        m.contended.increment(1);
                        if count_timeout {
                            m.timeouts.increment(1);
                        }
                        return Ok(None);
                    }
                },
                None => Some(turn.await),
            }
        };
        let mut baton = baton;
        // Registered once an attempt finds the lock held (an uncontended lock never pays for it); from then on
        // every attempt is made with a wake-up already armed, so a release between the answer "held" and the
        // wait cannot be missed.
        let mut listener: Option<Watch> = None;
        loop {
            let notify = listener.as_ref().map(Watch::shared);
            let mut woken = notify.as_ref().map(|n| Box::pin(n.notified()));
            if let Some(w) = woken.as_mut() {
                w.as_mut().enable();
            }
            let sent = Instant::now();
            let held_for = match store::acquire(&self.kw, &keys, &token, s.ttl, s.fence_ttl).await?
            {
                Attempt::Acquired(fence) => {
                    m.acquired.increment(1);
                    let grant = Grant {
                        name: display_name(name),
                        keys,
                        token,
                        fence,
                        ttl: s.ttl,
                        fence_ttl: s.fence_ttl,
                        watchdog: s.watchdog,
                        sent,
                        baton: baton.take(),
                    };
                    return Ok(Some(LockGuard::start(self.clone(), grant)));
                }
                Attempt::Held(left) => left,
            };
            m.contended.increment(1);
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                if count_timeout && !s.wait.is_zero() {
                    m.timeouts.increment(1);
                }
                return Ok(None);
            }
            let Some(woken) = woken else {
                // First "held": arm the wake-up, then ask again before sleeping.
                listener = Some(inner.backend.watch(&inner.bus, &inner.ns, &keys.lock).await);
                continue;
            };
            // Woken by the holder's release; otherwise re-check when its lease runs out (an expiry publishes
            // nothing), or give up at the deadline.
            let left = held_for.unwrap_or(s.ttl).max(Duration::from_millis(1));
            let mut until = now + left;
            if let Some(d) = deadline {
                until = until.min(d);
            }
            // A hung Redis sends no wake-up: look again at least every response timeout (that look fails
            // fast, and the breaker then refuses the rest of the wait at once).
            if let Some(slice) = inner.backend.wait_slice() {
                until = until.min(now + slice);
            }
            tokio::select! {
                () = woken => {
                    sleep(Duration::from_micros(rand::random_range(0..=WAKE_JITTER_US))).await;
                }
                () = sleep_until(until) => {}
            }
        }
    }

    /// Write `value` next to lock `name` guarded by `fence`, for a worker that received the fence from the
    /// holder: refused with [`FencedWrite::Stale`] if a holder with a newer fence has acquired the lock or
    /// written since. The value lives for the class's `fence_ttl` after its last write.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a fence that was never issued (0, or above 2^53 - 1); [`Error::Key`],
    /// backend failures.
    pub async fn fenced_write(
        &self,
        name: &(impl IdParts + ?Sized),
        fence: u64,
        value: &[u8],
    ) -> Result<FencedWrite> {
        if fence == 0 || fence > MAX_FENCE {
            return Err(Error::InvalidArgument {
                what: format!(
                    "class `{}`: {fence} is not a fencing token keyward issues",
                    self.class.name
                ),
            });
        }
        let keys = self.keys(name)?;
        let fence_ttl = self.class.policy.fence_ttl_value();
        self.write_fenced(&keys, fence, value, fence_ttl).await
    }

    async fn write_fenced(
        &self,
        keys: &LockKeys,
        fence: u64,
        value: &[u8],
        fence_ttl: Duration,
    ) -> Result<FencedWrite> {
        let outcome = store::fenced_write(&self.kw, keys, fence, value, fence_ttl).await?;
        if let FencedWrite::Stale { highest } = outcome {
            self.class.metrics.fenced_rejected.increment(1);
            tracing::debug!(class = %self.class.name, key = %keys.lock, fence, highest, "stale fenced write refused");
        }
        Ok(outcome)
    }

    /// The value last written under lock `name`'s fences, with the fence that wrote it; `None` if nothing was
    /// written (or it expired).
    ///
    /// # Errors
    /// [`Error::Key`], backend failures.
    pub async fn fenced_read(
        &self,
        name: &(impl IdParts + ?Sized),
    ) -> Result<Option<(u64, Bytes)>> {
        let keys = self.keys(name)?;
        store::fenced_read(&self.kw, &keys).await
    }
}

/// A lock's name for display: its raw id parts joined with `:`.
fn display_name(name: &(impl IdParts + ?Sized)) -> String {
    let mut parts = Vec::new();
    name.push_parts(&mut parts);
    parts.join(":")
}
