//! A held lock: its fencing token, its renewal (watchdog) and its local view of when the lease is lost.
//!
//! The one decision a reader must know: **the guard's deadline is conservative.** It is measured from the
//! instant *before* the acquire (or renewal) request was sent, plus the lease length, so it never falls after
//! the server's own expiry (up to clock-rate drift, which is negligible over a lease). Past it the guard calls
//! itself lost, whatever the server might still say; renewals and the deadline are serialised by one mutex, so
//! a guard is never both renewed and lost.

use super::Baton;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};

use super::store::{self, LockKeys};
use super::{FencedWrite, Locks, check_ttl};
use crate::error::Result;

/// Shortest pause between two renewal attempts after a failed one.
const MIN_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Everything a guard, its keeper task and its drop-time release share.
pub(super) struct Shared {
    pub(super) locks: Locks,
    pub(super) name: String,
    pub(super) keys: LockKeys,
    /// The holder's secret: proves ownership to release and extend. Never logged.
    token: String,
    fence: u64,
    fence_ttl: Duration,
    watchdog: bool,
    state: Mutex<State>,
    /// `true` once the lease is known lost; `lost()` futures watch it.
    lost_tx: watch::Sender<bool>,
    /// Tells the keeper that the deadline moved (a manual extend).
    rearm: Notify,
}

struct State {
    /// The lease length of the last successful acquire or renewal (the watchdog renews with it).
    ttl: Duration,
    /// When the last successful acquire or renewal was *sent*.
    renewed_from: Instant,
    /// `renewed_from + ttl`: past this the lease may be gone on the server.
    deadline: Instant,
    lost: bool,
    /// This process's turn at the lock name (see `Queues`): given up once the lease is released or lost, so
    /// the next local waiter need not wait for the guard to be dropped.
    baton: Option<Baton>,
}

/// What [`Locks`] hands over to build a guard.
pub(super) struct Grant {
    pub(super) name: String,
    pub(super) keys: LockKeys,
    pub(super) token: String,
    pub(super) fence: u64,
    pub(super) ttl: Duration,
    pub(super) fence_ttl: Duration,
    pub(super) watchdog: bool,
    /// When the acquire request was sent.
    pub(super) sent: Instant,
    /// This process's turn for the lock name (see `Queues`), held while the guard lives.
    pub(super) baton: Option<Baton>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a release that cannot reach Redis keeps trying: as long as the lease can still be on the
    /// server — the time left to its deadline plus one more lease (a renewal in flight may extend it), and at
    /// least the class's TTL. A lock taken or extended with a longer TTL than the class's is covered.
    fn release_window(&self) -> Duration {
        let st = self.state();
        let left = st.deadline.saturating_duration_since(Instant::now());
        (left + st.ttl).max(self.locks.policy().ttl_value())
    }

    /// Mark the lease lost (once): wakes `lost()` futures, counts and logs it.
    fn lose_locked(&self, st: &mut State, why: &'static str) {
        if st.lost {
            return;
        }
        st.lost = true;
        // The lock may already be someone else's: let this process's next waiter ask.
        st.baton = None;
        self.lost_tx.send_replace(true);
        self.locks.class.metrics.lost.increment(1);
        tracing::warn!(
            class = %self.locks.class.name,
            lock = %self.name,
            fence = self.fence,
            why,
            "lock lease lost"
        );
    }

    fn lose(&self, why: &'static str) {
        let mut st = self.state();
        self.lose_locked(&mut st, why);
    }

    /// Whether the lease is lost, marking it so if its deadline has passed.
    fn expire_if_due(&self) -> bool {
        let mut st = self.state();
        if !st.lost && Instant::now() >= st.deadline {
            self.lose_locked(&mut st, "the lease ran out without renewal");
        }
        st.lost
    }

    /// Record a successful renewal sent at `sent`; `false` if the guard was already lost (it stays lost).
    fn renewed(&self, sent: Instant, ttl: Duration) -> bool {
        let mut st = self.state();
        if st.lost {
            return false;
        }
        // Replies can complete out of order (watchdog and a manual extend): the latest request wins.
        if sent >= st.renewed_from {
            st.renewed_from = sent;
            st.ttl = ttl;
            st.deadline = sent + ttl;
        }
        true
    }
}

/// A held lock. Release it with [`release`](Self::release); dropping it releases in the background instead.
///
/// Pass [`fence`](Self::fence) along with every write the lock protects, and have the resource refuse a fence
/// lower than one it has already seen — [`fenced_write`](Self::fenced_write) does exactly that for a value
/// kept next to the lock. Watch [`lost`](Self::lost) to stop work once the lease can no longer be trusted.
///
/// Its `Debug` output never shows the holder's secret token.
#[must_use = "a lock is released as soon as its guard is dropped"]
pub struct LockGuard {
    shared: Arc<Shared>,
    keeper: Option<AbortHandle>,
    /// Set once `release` has had its answer; until then `Drop` releases.
    released: bool,
}

impl LockGuard {
    /// Start holding: spawn the keeper (watchdog renewals, or just the deadline).
    pub(super) fn start(locks: Locks, grant: Grant) -> Self {
        let (lost_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            locks,
            name: grant.name,
            keys: grant.keys,
            token: grant.token,
            fence: grant.fence,
            fence_ttl: grant.fence_ttl,
            watchdog: grant.watchdog,
            state: Mutex::new(State {
                ttl: grant.ttl,
                renewed_from: grant.sent,
                deadline: grant.sent + grant.ttl,
                lost: false,
                baton: grant.baton,
            }),
            lost_tx,
            rearm: Notify::new(),
        });
        let keeper = tokio::spawn(keep(Arc::clone(&shared))).abort_handle();
        LockGuard {
            shared,
            keeper: Some(keeper),
            released: false,
        }
    }

    /// The fencing token of this acquisition: strictly greater than every token issued before for this lock,
    /// even after the fencing counter expired (tokens never fall below the server's clock in µs).
    pub fn fence(&self) -> u64 {
        self.shared.fence
    }

    /// The lock's name: its id parts, joined with `:`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The lock's full Redis key (for logs and operators).
    pub fn key(&self) -> &str {
        &self.shared.keys.lock
    }

    /// The class (policy name) of the lock.
    pub fn class(&self) -> &str {
        &self.shared.locks.class.name
    }

    /// The holder's secret; private so it can never be logged by a caller.
    fn token(&self) -> &str {
        &self.shared.token
    }

    /// Whether the lease is known lost: a renewal or extend was refused, or the local deadline passed
    /// without a renewal. Once lost, a guard stays lost.
    pub fn is_lost(&self) -> bool {
        self.shared.expire_if_due()
    }

    /// Resolves once the lease is known lost (see [`is_lost`](Self::is_lost)), or once the guard is released
    /// or dropped. It does not borrow the guard, so it can race the protected work in `tokio::select!`.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.shared.lost_tx.subscribe();
        async move {
            // An error means every sender is gone: the guard was released or dropped.
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }

    /// Renew the lease to `ttl` from now. `Ok(false)` means the lock is no longer held by this guard (its
    /// lease expired, possibly taken by someone else); the guard is then lost.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero `ttl` or one over 24 h; backend
    /// failures (the lease then runs on, and is lost at its deadline unless renewed).
    pub async fn extend(&self, ttl: Duration) -> Result<bool> {
        check_ttl(&self.shared.locks.class.name, ttl)?;
        if self.is_lost() {
            return Ok(false);
        }
        let sent = Instant::now();
        let s = &self.shared;
        if !store::extend(
            &s.locks.kw,
            &s.keys,
            self.token(),
            ttl,
            s.fence,
            s.fence_ttl,
        )
        .await?
        {
            s.lose("extend refused: the lease had expired or been taken");
            return Ok(false);
        }
        let held = s.renewed(sent, ttl);
        s.rearm.notify_one();
        Ok(held)
    }

    /// Release the lock and wake its waiters. `Ok(false)` means it was no longer held by this guard (the lease
    /// had expired, and perhaps been taken): whatever this guard did after that was not protected by the lock.
    ///
    /// # Errors
    /// Backend failures; the guard is then dropped, which tries once more in the background.
    pub async fn release(mut self) -> Result<bool> {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        let s = Arc::clone(&self.shared);
        let released = store::release(&s.locks.kw, &s.keys, self.token(), s.release_window()).await;
        // Released (or failed): this process's next waiter may ask now.
        drop(s.state().baton.take());
        let released = released?;
        self.released = true;
        if !released {
            s.lose("released after the lease had expired or been taken");
        }
        Ok(released)
    }

    /// Write `value` next to the lock, guarded by this guard's fence: refused with
    /// [`FencedWrite::Stale`] if a newer holder has acquired the lock or written since. The value lives for
    /// the class's `fence_ttl` after its last write. Read it back with
    /// [`Locks::fenced_read`](super::Locks::fenced_read).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn fenced_write(&self, value: &[u8]) -> Result<FencedWrite> {
        let s = &self.shared;
        s.locks
            .write_fenced(&s.keys, s.fence, value, s.fence_ttl)
            .await
    }

    /// Read the value last written under this lock's fences (see [`fenced_write`](Self::fenced_write)).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn fenced_read(&self) -> Result<Option<(u64, Bytes)>> {
        let s = &self.shared;
        store::fenced_read(&s.locks.kw, &s.keys).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        if self.released {
            return;
        }
        let s = Arc::clone(&self.shared);
        // The next waiter of this process goes once the release has happened, not before.
        let baton = self.shared.state().baton.take();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _turn = baton;
                    if let Err(err) =
                        store::release(&s.locks.kw, &s.keys, &s.token, s.release_window()).await
                    {
                        tracing::warn!(
                            class = %s.locks.class.name,
                            lock = %s.name,
                            error = %err,
                            "could not release a dropped lock guard; its lease will expire"
                        );
                    }
                });
            }
            Err(_) => tracing::warn!(
                class = %s.locks.class.name,
                lock = %s.name,
                "lock guard dropped outside a tokio runtime; its lease will expire"
            ),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("LockGuard")
            .field("class", &s.locks.class.name)
            .field("name", &s.name)
            .field("key", &s.keys.lock)
            .field("fence", &s.fence)
            .field("watchdog", &s.watchdog)
            .field("lost", &s.state().lost)
            .finish_non_exhaustive()
    }
}

/// The keeper task of one guard: with the watchdog, renews every `ttl / 3` (a refusal loses the lease; an
/// error is retried until the deadline); without it, only marks the lease lost at its deadline, re-arming
/// after a manual extend. Aborted by `release` and `Drop`.
async fn keep(s: Arc<Shared>) {
    let mut retry_at: Option<Instant> = None;
    loop {
        if s.expire_if_due() {
            return;
        }
        let (ttl, renewed_from, deadline) = {
            let st = s.state();
            (st.ttl, st.renewed_from, st.deadline)
        };
        let due = if s.watchdog {
            retry_at.unwrap_or(renewed_from + ttl / 3).min(deadline)
        } else {
            deadline
        };
        if Instant::now() < due {
            tokio::select! {
                () = sleep_until(due) => {}
                () = s.rearm.notified() => {}
            }
            continue;
        }
        // The watchdog is due to renew (without it, `due` is the deadline, handled at the top).
        let sent = Instant::now();
        tokio::select! {
            r = store::extend(&s.locks.kw, &s.keys, &s.token, ttl, s.fence, s.fence_ttl) => match r {
                Ok(true) => {
                    retry_at = None;
                    if !s.renewed(sent, ttl) {
                        return;
                    }
                }
                Ok(false) => {
                    s.lose("renewal refused: the lease had expired or been taken");
                    return;
                }
                Err(err) => {
                    tracing::warn!(
                        class = %s.locks.class.name,
                        lock = %s.name,
                        error = %err,
                        "lock renewal failed; retrying until the lease runs out"
                    );
                    retry_at = Some(Instant::now() + (ttl / 10).max(MIN_RETRY_PAUSE));
                }
            },
            // A renewal still in flight at the deadline is too late to count on.
            () = sleep_until(deadline) => {}
        }
    }
}
