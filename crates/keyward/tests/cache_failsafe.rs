//! Fail-safe and eager refresh, on every backend: a value past its TTL is kept for `stale_grace` and served
//! when its refill fails, overruns the loader timeout or the soft timeout; the stale value stays readable while
//! one caller refills it; an eager refresh runs once fleet-wide while everyone keeps getting the current value;
//! invalidation removes the stale value too.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::Harness;
use keyward::{Cache, CacheLookup, StaleReason};
use tokio::sync::Notify;

/// A batch loader's answer.
type Answer = Result<Vec<(u64, String)>, std::io::Error>;

/// A deadline for things that must happen "soon".
const SOON: Duration = Duration::from_secs(20);

conformance!(
    a_failed_refill_serves_the_stale_value_and_throttles,
    an_overrunning_refill_serves_the_stale_value,
    a_soft_timeout_serves_the_stale_value_and_the_refill_lands_in_the_background,
    a_borrowing_loader_past_the_soft_timeout_is_abandoned,
    waiters_get_the_stale_value_at_the_soft_timeout,
    a_batch_waiting_for_another_s_lease_gets_the_stale_value_at_the_soft_timeout,
    invalidation_removes_the_stale_value,
    a_refill_that_raced_an_invalidation_is_refused,
    an_eager_refresh_runs_once_while_everyone_gets_the_current_value,
    a_batch_refreshes_ahead_inline,
    a_failed_batch_refresh_keeps_the_current_value,
    a_batch_past_the_soft_timeout_serves_the_stale_values,
    without_stale_grace_a_failed_load_is_an_error,
);

fn ok(v: &str) -> Result<String, std::io::Error> {
    Ok(v.to_owned())
}

/// A loader that must never be called.
fn unreachable(why: &str) -> Result<String, std::io::Error> {
    panic!("{why}")
}

fn broken() -> Result<String, std::io::Error> {
    Err(std::io::Error::other("the database is down"))
}

/// A refill that `c` holds the lease of: the first read of `id` (already cached) that is not a plain hit
/// starts a detached refill whose loader waits for the returned `Notify`. Returns once that loader runs,
/// with a flag set when the loader ends, however it ends (dropped at the loader timeout).
pub(crate) async fn hold_a_refill(c: &Cache<String>, id: u64) -> (Arc<Notify>, Arc<AtomicBool>) {
    /// Sets its flag when dropped.
    struct Ended(Arc<AtomicBool>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let deadline = Instant::now() + SOON;
    loop {
        let (entered_, release_) = (Arc::clone(&entered), Arc::clone(&release));
        // A fresh flag each try: a hit drops its loader unrun, which sets it.
        let ended = Arc::new(AtomicBool::new(false));
        let guard = Ended(Arc::clone(&ended));
        let (_, how) = c
            .get_or_set_detached(&id, move || async move {
                let _guard = guard;
                entered_.notify_one();
                release_.notified().await;
                ok("v2")
            })
            .await
            .unwrap();
        if how != CacheLookup::Hit {
            entered.notified().await;
            return (release, ended);
        }
        assert!(Instant::now() < deadline, "never stale");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Read `id` until a read is not a plain hit (the value went stale and was refilled or served stale, or an
/// eager refresh landed). Returns that read's outcome.
async fn until_stale<F, Fut>(c: &Cache<String>, id: u64, loader: F) -> (String, CacheLookup)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, std::io::Error>>,
{
    let deadline = Instant::now() + SOON;
    loop {
        let called = AtomicUsize::new(0);
        let got = c
            .get_or_set_with_status(&id, || {
                called.fetch_add(1, Ordering::SeqCst);
                loader()
            })
            .await
            .unwrap();
        // A hit may have called the loader: a failed eager refresh (the current value stays).
        if got.1 != CacheLookup::Hit {
            return got;
        }
        let _ = called;
        assert!(Instant::now() < deadline, "{id} never went stale");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

mod cases {
    use super::*;

    pub async fn a_failed_refill_serves_the_stale_value_and_throttles(h: Harness) {
        let kw = h.keyward().await;
        // Also with eager refresh: the throttled value must not fall in the refresh window at once (which
        // would ask the failing source on every read).
        for class in ["safe", "safe_eager"] {
            failed_refill_throttles(kw.cache::<String>(class).unwrap()).await;
        }
    }

    async fn failed_refill_throttles(c: Cache<String>) {
        let (v, how) = c
            .get_or_set_with_status(&1, || async { ok("v1") })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("v1", CacheLookup::Miss));
        let (v, how) = until_stale(&c, 1, || async { broken() }).await;
        assert_eq!(
            (v.as_str(), how),
            ("v1", CacheLookup::Stale(StaleReason::LoaderError))
        );
        assert_eq!(c.stats().stale_served, 1);
        // Throttled: the stale value is served as is for `fail_safe_throttle`, without asking the source.
        let (v, how) = c
            .get_or_set_with_status(&1, || async {
                unreachable("throttled: the loader is not called")
            })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("v1", CacheLookup::Hit));
        // After the throttle, a refill that works replaces it.
        let (v, how) = until_stale(&c, 1, || async { ok("v2") }).await;
        assert_eq!(v, "v2");
        assert!(
            matches!(how, CacheLookup::Miss | CacheLookup::Refreshed),
            "{how:?}"
        );
        assert_eq!(c.get(&1).await.unwrap().as_deref(), Some("v2"));
    }

    pub async fn an_overrunning_refill_serves_the_stale_value(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("safe").unwrap();
        c.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        let (v, how) = until_stale(&c, 1, || async {
            // Longer than the class's 300 ms loader timeout (the hard timeout).
            tokio::time::sleep(Duration::from_secs(5)).await;
            ok("late")
        })
        .await;
        assert_eq!(
            (v.as_str(), how),
            ("v1", CacheLookup::Stale(StaleReason::LoaderTimeout))
        );
    }

    pub async fn a_soft_timeout_serves_the_stale_value_and_the_refill_lands_in_the_background(
        h: Harness,
    ) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        c.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        let release = Arc::new(Notify::new());
        let deadline = Instant::now() + SOON;
        loop {
            let release = Arc::clone(&release);
            let (v, how) = c
                .get_or_set_detached(&1, move || async move {
                    release.notified().await;
                    ok("v2")
                })
                .await
                .unwrap();
            if how == CacheLookup::Stale(StaleReason::SoftTimeout) {
                assert_eq!(v, "v1");
                break;
            }
            assert_eq!((v.as_str(), how), ("v1", CacheLookup::Hit));
            assert!(Instant::now() < deadline, "never stale");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The refill goes on after the caller got its answer; once it finishes, it commits.
        release.notify_one();
        let deadline = Instant::now() + SOON;
        while c.get(&1).await.unwrap().as_deref() != Some("v2") {
            assert!(
                Instant::now() < deadline,
                "the background refill never landed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn a_borrowing_loader_past_the_soft_timeout_is_abandoned(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        c.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        let (v, how) = until_stale(&c, 1, || async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            ok("slow")
        })
        .await;
        assert_eq!(
            (v.as_str(), how),
            ("v1", CacheLookup::Stale(StaleReason::SoftTimeout))
        );
        // The lease gave the stale value back: the next caller takes the lease over it and refills.
        let (v, how) = c
            .get_or_set_with_status(&1, || async { ok("v2") })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("v2", CacheLookup::Miss));
    }

    pub async fn waiters_get_the_stale_value_at_the_soft_timeout(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<String>("soft").unwrap();
        let b = hs[1].cache::<String>("soft").unwrap();
        a.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        // `a` refills (detached, its loader held); `b` arrives while the lease is held.
        let (release, _) = hold_a_refill(&a, 1).await;
        let started = Instant::now();
        let (v, how) = b
            .get_or_set_with_status(&1, || async { unreachable("the lease is held elsewhere") })
            .await
            .unwrap();
        assert_eq!(
            (v.as_str(), how),
            ("v1", CacheLookup::Stale(StaleReason::SoftTimeout))
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "waited past the soft timeout"
        );
        release.notify_one();
    }

    /// As above, with the waiter a batch (`get_or_set_many`): it gets the value the holder keeps at its soft
    /// timeout, while the holder's load still runs, and its loader is never asked for that id. Batches had no
    /// soft timeout while waiting: this one waited until the holder's load gave up (its 3 s loader timeout).
    pub async fn a_batch_waiting_for_another_s_lease_gets_the_stale_value_at_the_soft_timeout(
        h: Harness,
    ) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<String>("soft").unwrap();
        let b = hs[1].cache::<String>("soft").unwrap();
        a.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        // `a` refills (detached, its loader held until the end); the batch arrives while the lease is held.
        let (release, ended) = hold_a_refill(&a, 1).await;
        let asked = AtomicUsize::new(0);
        let got = tokio::time::timeout(
            SOON,
            b.get_or_set_many(&[1u64], |missing| {
                asked.fetch_add(missing.len(), Ordering::SeqCst);
                async { Ok::<_, std::io::Error>(vec![(1u64, "from the batch".to_owned())]) }
            }),
        )
        .await
        .expect("the batch never answered")
        .unwrap();
        assert!(
            !ended.load(Ordering::SeqCst),
            "the batch answered only after the holder's load ended"
        );
        assert_eq!(got, ["v1"]);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            0,
            "the batch loaded the id itself"
        );
        release.notify_one();
    }

    pub async fn invalidation_removes_the_stale_value(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("safe").unwrap();
        c.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        // Let it go stale (a successful refill would replace it, so read with `get`, which never loads).
        let deadline = Instant::now() + SOON;
        while c.get(&1).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "never stale");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.invalidate(&1).await.unwrap();
        let err = c.get_or_set(&1, || async { broken() }).await.unwrap_err();
        assert!(matches!(err, keyward::Error::Loader { .. }), "{err}");
    }

    pub async fn a_refill_that_raced_an_invalidation_is_refused(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        c.get_or_set(&1, || async { ok("v1") }).await.unwrap();
        let deadline = Instant::now() + SOON;
        while c.get(&1).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "never stale");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let refill = {
            let (c, entered, release) = (c.clone(), Arc::clone(&entered), Arc::clone(&release));
            tokio::spawn(async move {
                c.get_or_set_detached(&1, move || async move {
                    entered.notify_one();
                    release.notified().await;
                    ok("before the write")
                })
                .await
            })
        };
        entered.notified().await;
        c.invalidate(&1).await.unwrap();
        release.notify_one();
        let _ = refill.await.unwrap().unwrap();
        let (v, how) = c
            .get_or_set_with_status(&1, || async { ok("after") })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("after", CacheLookup::Miss));
    }

    pub async fn an_eager_refresh_runs_once_while_everyone_gets_the_current_value(h: Harness) {
        let hs = h.handles(2).await;
        let caches: Vec<Cache<String>> = hs.iter().map(|k| k.cache("eager").unwrap()).collect();
        caches[0]
            .get_or_set(&1, || async { ok("v1") })
            .await
            .unwrap();
        // Inside the refresh window (the last 1.8 s of a 2 s TTL) after 200 ms: wait until a read says so.
        let release = Arc::new(Notify::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + SOON;
        loop {
            let (release, loads) = (Arc::clone(&release), Arc::clone(&loads));
            let (v, how) = caches[0]
                .get_or_set_detached(&1, move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                    ok("v2")
                })
                .await
                .unwrap();
            assert_eq!(v, "v1");
            if how == CacheLookup::RefreshAhead {
                break;
            }
            assert_eq!(how, CacheLookup::Hit);
            assert!(Instant::now() < deadline, "never due for a refresh");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // While it refreshes, 200 reads on both instances get the current value and never load.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let c = caches[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                c.get_or_set_with_status(&1, || async { unreachable("only one refresh") })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            let (v, how) = t.await.unwrap();
            assert_eq!(v, "v1");
            // Concurrent readers in one process may share one fetch.
            assert!(
                matches!(how, CacheLookup::Hit | CacheLookup::Coalesced),
                "{how:?}"
            );
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        release.notify_one();
        let deadline = Instant::now() + SOON;
        while caches[1].get(&1).await.unwrap().as_deref() != Some("v2") {
            assert!(Instant::now() < deadline, "the refresh never landed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(caches[0].stats().refreshes >= 1);
    }

    /// Read `ids` of the `eager` class (2 s TTL, refreshed ahead in its last 1.8 s) through
    /// `get_or_set_many` until a call asks its loader, which answers with `answer`; returns that call's
    /// result and the ids it asked for. Every call before it must get the `v1-{id}` values the batch was
    /// filled with, and the loader must be asked before the TTL ran out: an expired entry would be a miss,
    /// not a refresh (the class keeps no stale value).
    async fn until_a_batch_refreshes(
        c: &Cache<String>,
        ids: &[u64],
        answer: fn(&[u64]) -> Answer,
    ) -> (keyward::Result<Vec<String>>, Vec<u64>) {
        let v1 = |id: &u64| format!("v1-{id}");
        let filled = c
            .get_or_set_many(ids, |missing| {
                let answer: Vec<(u64, String)> = missing.iter().map(|id| (**id, v1(id))).collect();
                async move { Ok::<_, std::io::Error>(answer) }
            })
            .await
            .unwrap();
        assert_eq!(filled, ids.iter().map(v1).collect::<Vec<_>>());
        let filled_at = Instant::now();
        let deadline = filled_at + SOON;
        loop {
            let asked = std::sync::Mutex::new(Vec::new());
            let got = c
                .get_or_set_many(ids, |wanted| {
                    let wanted: Vec<u64> = wanted.into_iter().copied().collect();
                    *asked.lock().unwrap() = wanted.clone();
                    async move { answer(&wanted) }
                })
                .await;
            let asked = asked.into_inner().unwrap();
            if !asked.is_empty() {
                assert!(
                    filled_at.elapsed() < Duration::from_secs(2),
                    "asked only after the TTL: a miss, not an eager refresh"
                );
                return (got, asked);
            }
            assert_eq!(got.unwrap(), ids.iter().map(v1).collect::<Vec<_>>());
            assert!(Instant::now() < deadline, "never due for a refresh");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A batch whose ids are due for an eager refresh refreshes them inline (its loader borrows from the
    /// caller): the call gets the new values, which are stored. Batches used to give the refresh lease
    /// back, so a batch-only key was never refreshed ahead and went cold at its TTL.
    pub async fn a_batch_refreshes_ahead_inline(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let ids = [1u64, 2];
        let (got, asked) = until_a_batch_refreshes(&c, &ids, |wanted| {
            Ok(wanted.iter().map(|id| (*id, format!("v2-{id}"))).collect())
        })
        .await;
        let got = got.unwrap();
        for (id, v) in ids.iter().zip(&got) {
            let want = if asked.contains(id) { "v2" } else { "v1" };
            assert_eq!(v, &format!("{want}-{id}"));
        }
        assert!(c.stats().refreshes >= 1);
        for id in asked {
            assert_eq!(c.get(&id).await.unwrap(), Some(format!("v2-{id}")));
        }
    }

    /// A batch refresh whose loader fails keeps the current values (no error: they are still fresh), as a
    /// failed eager refresh of one entry does.
    pub async fn a_failed_batch_refresh_keeps_the_current_value(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let ids = [3u64, 4];
        let (got, _) = until_a_batch_refreshes(&c, &ids, |_| broken().map(|_| Vec::new())).await;
        assert_eq!(got.unwrap(), ["v1-3", "v1-4"]);
        assert_eq!(c.get(&3).await.unwrap().as_deref(), Some("v1-3"));
    }

    /// A batch whose every id has a stale value at hand, with a loader slower than the class's soft timeout
    /// (50 ms) but within its loader timeout (3 s): the stale values are served at the soft timeout and the
    /// load is abandoned, as for one id. Batches had no soft timeout: the call waited for the slow load.
    /// Each lease gave its stale value back, so the next call refills.
    pub async fn a_batch_past_the_soft_timeout_serves_the_stale_values(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        let ids = [1u64, 2];
        let v1 = |id: &u64| format!("v1-{id}");
        let load = |missing: Vec<&u64>, v: &'static str, delay: Duration| {
            let answer: Vec<(u64, String)> = missing
                .iter()
                .map(|id| (**id, format!("{v}-{id}")))
                .collect();
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::io::Error>(answer)
            }
        };
        c.get_or_set_many(&ids, |m| load(m, "v1", Duration::ZERO))
            .await
            .unwrap();
        let deadline = Instant::now() + SOON;
        loop {
            let asked = AtomicUsize::new(0);
            let got = c
                .get_or_set_many(&ids, |m| {
                    asked.fetch_add(m.len(), Ordering::SeqCst);
                    load(m, "slow", Duration::from_secs(2))
                })
                .await
                .unwrap();
            // Until the values go stale, plain hits; then the slow load, answered at the soft timeout.
            assert_eq!(got, ids.iter().map(v1).collect::<Vec<_>>());
            if asked.load(Ordering::SeqCst) == ids.len() {
                break;
            }
            assert!(Instant::now() < deadline, "never went stale");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(c.stats().stale_served >= 2);
        let got = c
            .get_or_set_many(&ids, |m| load(m, "v2", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(got, ["v2-1", "v2-2"]);
    }

    pub async fn without_stale_grace_a_failed_load_is_an_error(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let err = c.get_or_set(&1, || async { broken() }).await.unwrap_err();
        assert!(matches!(err, keyward::Error::Loader { .. }), "{err}");
    }
}
