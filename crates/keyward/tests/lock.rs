//! Lock conformance: every case runs on the embedded backend and on a real redis-server, which must agree.
//! Properties that need controlled time (the local deadline, a fencing counter expiring after days) also run
//! on the embedded backend with tokio's paused clock (`mod paused`).

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::Harness;
use keyward::lock::{FencedWrite, LockOptions};
use keyward::policy::{CacheClass, LockClass, Policy};
use keyward::{Error, Keyward};
use tokio::time::Instant;

static NEXT_APP: AtomicUsize = AtomicUsize::new(0);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn unique_app() -> String {
    format!(
        "lock{}-{}",
        std::process::id(),
        NEXT_APP.fetch_add(1, Ordering::Relaxed)
    )
}

/// `job` (30 s lease, waits up to 60 s), `short` (300 ms, one attempt), `fencey` (50 ms lease, fencing state
/// kept 100 ms), `dog` (300 ms lease, watchdog), and `product`, a cache class.
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .lock(
            "job",
            LockClass::new(Duration::from_secs(30)).wait(Duration::from_secs(60)),
        )
        .lock("short", LockClass::new(ms(300)).wait(Duration::ZERO))
        .lock("fencey", LockClass::new(ms(50)).fence_ttl(ms(100)))
        .lock(
            "dog",
            // 900 ms: the watchdog renews every 300 ms, so a loaded CI machine may stall the keeper for up to
            // 600 ms without losing the lease (a 300 ms lease made this test flaky when every module shares one
            // test binary and runs in parallel).
            LockClass::new(ms(900)).watchdog(true).wait(Duration::ZERO),
        )
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .build()
        .unwrap()
}

/// `n` handles on one namespace: separate connections on Redis (like separate processes), clones of one
/// handle on the embedded backend (single-process by design).
async fn handles(h: &Harness, n: usize) -> Vec<Keyward> {
    let app = unique_app();
    let first = connect(h, &app).await;
    let mut out = vec![first.clone()];
    for _ in 1..n {
        out.push(if h.is_redis() {
            connect(h, &app).await
        } else {
            first.clone()
        });
    }
    out
}

async fn connect(h: &Harness, app: &str) -> Keyward {
    match h.url() {
        Some(s) => Keyward::connect(&s, policy(app)).await.unwrap(),
        None => Keyward::embedded(policy(app)),
    }
}

conformance!(
    a_held_lock_keeps_its_fencing_counter_alive,
    a_lost_guard_does_not_hold_up_the_next_waiter_of_its_process,
    acquire_release_extend_and_only_the_holder_can_release,
    fences_strictly_increase_and_survive_the_counter_expiring,
    hundred_racing_tasks_never_overlap_and_all_acquire,
    a_waiter_is_woken_by_release,
    lock_gives_up_at_its_deadline,
    a_paused_holder_loses_to_the_next,
    watchdog_keeps_a_short_lease_alive_and_stops_after_drop,
    typed_errors_for_wrong_kind_and_bad_arguments,
    every_key_has_a_ttl,
    debug_never_shows_the_token,
);

mod cases {
    use super::*;

    /// `fencey` keeps its counter 100 ms after last use (at least one lease); a watchdog-renewed 300 ms lease
    /// held for 1 s, more than three leases, must keep the counter (renewals refresh it), so fencing never
    /// relies on the clock floor while held. The lease is 300 ms, not the class's 50 ms: renewals every 100 ms
    /// survive a loaded machine's scheduling stalls, which a 50 ms lease (renewed every 17 ms) did not.
    pub async fn a_held_lock_keeps_its_fencing_counter_alive(h: Harness) {
        let kw = connect(&h, "fencealive").await;
        let locks = kw.locks("fencey").unwrap();
        let options = keyward::lock::LockOptions::new()
            .watchdog(true)
            .ttl(Duration::from_millis(300));
        let guard = locks
            .lock_with("long", options)
            .await
            .unwrap()
            .expect("free");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!guard.is_lost());
        let keys = kw.scan_namespace().await.unwrap();
        assert!(
            keys.iter().any(|k| k.key.ends_with("{long}:f")),
            "the fencing counter expired while its lock was held: {keys:?}"
        );
        assert!(guard.release().await.unwrap());
    }

    /// A guard whose lease ran out, still alive in its task, must not keep this process's next `lock()`
    /// waiting: its turn in the per-process queue ends with the lease.
    pub async fn a_lost_guard_does_not_hold_up_the_next_waiter_of_its_process(h: Harness) {
        let kw = connect(&h, "lostturn").await;
        let locks = kw.locks("job").unwrap();
        let short = keyward::lock::LockOptions::new().ttl(Duration::from_millis(150));
        let stale = locks.lock_with("lost", short).await.unwrap().expect("free");
        let started = std::time::Instant::now();
        let next = locks
            .lock_with(
                "lost",
                keyward::lock::LockOptions::new().wait(Duration::from_secs(20)),
            )
            .await
            .unwrap()
            .expect("acquired once the first lease ran out");
        assert!(stale.is_lost());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?}: the lost guard kept its turn",
            started.elapsed()
        );
        assert!(next.fence() > stale.fence());
        assert!(matches!(
            locks
                .lock_with(
                    "x",
                    keyward::lock::LockOptions::new().wait(Duration::from_secs(400 * 86_400))
                )
                .await,
            Err(keyward::Error::InvalidArgument { .. })
        ));
        drop(stale);
        next.release().await.unwrap();
    }

    pub async fn acquire_release_extend_and_only_the_holder_can_release(h: Harness) {
        let kws = handles(&h, 2).await;
        let (a, b) = (kws[0].locks("job").unwrap(), kws[1].locks("job").unwrap());

        let g = a.try_lock("report").await.unwrap().expect("free lock");
        assert_eq!(g.name(), "report");
        assert_eq!(g.class(), "job");
        assert!(g.key().ends_with(":job:v1:{report}"), "{}", g.key());
        assert!(b.try_lock("report").await.unwrap().is_none(), "exclusive");
        let other = b
            .try_lock("other")
            .await
            .unwrap()
            .expect("names are independent");
        assert!(other.release().await.unwrap());

        assert!(g.extend(Duration::from_secs(90)).await.unwrap());
        let ttl = ttl_of(&kws[0], g.key()).await.expect("lock key exists");
        assert!(ttl > Duration::from_secs(60), "extended to 90s: {ttl:?}");
        assert!(!g.is_lost());
        assert!(g.release().await.unwrap(), "the holder releases");
        let again = b
            .try_lock("report")
            .await
            .unwrap()
            .expect("free after release");
        assert!(again.release().await.unwrap());

        // A holder whose lease ran out cannot release (or extend) what someone else now holds.
        let opts = LockOptions::new().ttl(ms(100)).wait(Duration::ZERO);
        let stale = a.lock_with("report", opts).await.unwrap().expect("free");
        tokio::time::sleep(ms(250)).await;
        let current = b
            .try_lock("report")
            .await
            .unwrap()
            .expect("expired lease is free");
        assert!(!stale.extend(Duration::from_secs(30)).await.unwrap());
        assert!(stale.is_lost());
        assert!(!stale.release().await.unwrap(), "not the holder any more");
        assert!(
            a.try_lock("report").await.unwrap().is_none(),
            "the stale release did not free the current holder's lock"
        );
        assert!(current.extend(Duration::from_secs(30)).await.unwrap());
        assert!(current.release().await.unwrap());
        assert!(!current_is_held(&b, "report").await);
    }

    pub async fn fences_strictly_increase_and_survive_the_counter_expiring(h: Harness) {
        let kws = handles(&h, 2).await;
        let locks = [
            kws[0].locks("fencey").unwrap(),
            kws[1].locks("fencey").unwrap(),
        ];
        let mut last = 0;
        for i in 0..20 {
            let g = locks[i % 2].try_lock("f").await.unwrap().expect("free");
            assert!(g.fence() > last, "{} after {last}", g.fence());
            // Fences are µs-scale (never below the server clock) and read back exactly.
            assert!(g.fence() > 1_600_000_000_000_000, "{}", g.fence());
            last = g.fence();
            assert!(g.release().await.unwrap());
        }
        let g = locks[0].try_lock("f").await.unwrap().unwrap();
        assert_eq!(g.fenced_write(b"v1").await.unwrap(), FencedWrite::Applied);
        let (fence, value) = locks[1].fenced_read("f").await.unwrap().expect("written");
        assert_eq!(
            (fence, &value[..]),
            (g.fence(), &b"v1"[..]),
            "exact read-back"
        );
        if let Some(mut con) = h.raw() {
            // Stored as plain decimal integers, not Lua's exponent form.
            let f: String = ::redis::cmd("GET")
                .arg(format!("{}:f", g.key()))
                .query(&mut *con)
                .unwrap();
            let t: String = ::redis::cmd("HGET")
                .arg(format!("{}:w", g.key()))
                .arg("t")
                .query(&mut *con)
                .unwrap();
            assert_eq!(f, g.fence().to_string());
            assert_eq!(t, g.fence().to_string());
        }
        last = g.fence();
        assert!(g.release().await.unwrap());

        // The counter and the fenced value expire (fence_ttl = 100ms); tokens still increase.
        tokio::time::sleep(ms(300)).await;
        let keys = kws[0].scan_namespace().await.unwrap();
        assert!(keys.is_empty(), "fencing state expired: {keys:?}");
        assert!(locks[0].fenced_read("f").await.unwrap().is_none());
        let g = locks[1].try_lock("f").await.unwrap().expect("free");
        assert!(
            g.fence() > last,
            "{} after the counter expired, was {last}",
            g.fence()
        );
        assert!(g.release().await.unwrap());
    }

    pub async fn hundred_racing_tasks_never_overlap_and_all_acquire(h: Harness) {
        let kws = handles(&h, 4).await;
        let inside = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let mut tasks = Vec::new();
        for i in 0..100 {
            let locks = kws[i % 4].locks("job").unwrap();
            let (inside, total, barrier) = (inside.clone(), total.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let g = locks
                    .lock_with("hot", LockOptions::new().wait(Duration::from_secs(100)))
                    .await
                    .unwrap()
                    .expect("every task acquires within a generous wait");
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                tokio::time::sleep(ms(1)).await;
                total.fetch_add(1, Ordering::SeqCst);
                assert_eq!(inside.fetch_sub(1, Ordering::SeqCst), 1);
                let fence = g.fence();
                assert!(g.release().await.unwrap());
                fence
            }));
        }
        let mut fences = Vec::new();
        for t in tasks {
            fences.push(t.await.unwrap());
        }
        assert_eq!(total.load(Ordering::SeqCst), 100);
        fences.sort_unstable();
        fences.dedup();
        assert_eq!(fences.len(), 100, "every acquisition had its own fence");
    }

    pub async fn a_waiter_is_woken_by_release(h: Harness) {
        let kws = handles(&h, 2).await;
        let (a, b) = (kws[0].locks("job").unwrap(), kws[1].locks("job").unwrap());
        let holder = a.try_lock("w").await.unwrap().expect("free"); // 30 s lease
        let waiter = tokio::spawn(async move {
            let started = Instant::now();
            let g = b
                .lock_with("w", LockOptions::new().wait(Duration::from_secs(25)))
                .await
                .unwrap()
                .expect("acquired after the release");
            let waited = started.elapsed();
            assert!(g.release().await.unwrap());
            waited
        });
        tokio::time::sleep(ms(100)).await;
        assert!(holder.release().await.unwrap());
        let waited = waiter.await.unwrap();
        assert!(
            waited < Duration::from_secs(10),
            "woken by the release, not by the 30s lease running out: {waited:?}"
        );
    }

    pub async fn lock_gives_up_at_its_deadline(h: Harness) {
        let kws = handles(&h, 2).await;
        let (a, b) = (kws[0].locks("job").unwrap(), kws[1].locks("job").unwrap());
        let holder = a.try_lock("busy").await.unwrap().expect("free");
        let started = Instant::now();
        let got = b
            .lock_with("busy", LockOptions::new().wait(ms(300)))
            .await
            .unwrap();
        assert!(got.is_none(), "a held lock is a value, not an error");
        assert!(started.elapsed() >= ms(300));
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(holder.release().await.unwrap());
    }

    pub async fn a_paused_holder_loses_to_the_next(h: Harness) {
        let kws = handles(&h, 2).await;
        let (a, b) = (
            kws[0].locks("short").unwrap(),
            kws[1].locks("short").unwrap(),
        );
        let paused = a.try_lock("res").await.unwrap().expect("free"); // 300 ms, no watchdog
        let lost = paused.lost();
        assert!(!paused.is_lost());
        // The holder "pauses" (GC, stopped VM) past its lease...
        tokio::time::sleep(ms(700)).await;
        let next = b
            .try_lock("res")
            .await
            .unwrap()
            .expect("expired lease taken over");
        assert!(next.fence() > paused.fence());
        // ...and is refused as soon as the next holder has acquired, even before it writes.
        assert_eq!(
            paused.fenced_write(b"stale").await.unwrap(),
            FencedWrite::Stale {
                highest: next.fence()
            }
        );
        assert!(next.fenced_write(b"fresh").await.unwrap().is_applied());
        let late = b
            .fenced_write("res", paused.fence(), b"stale")
            .await
            .unwrap();
        assert_eq!(
            late,
            FencedWrite::Stale {
                highest: next.fence()
            }
        );
        let (fence, value) = b.fenced_read("res").await.unwrap().unwrap();
        assert_eq!((fence, &value[..]), (next.fence(), &b"fresh"[..]));
        assert!(paused.is_lost());
        tokio::time::timeout(Duration::from_secs(1), lost)
            .await
            .expect("lost() resolved at the deadline");
        assert!(!paused.release().await.unwrap());
        assert!(
            a.try_lock("res").await.unwrap().is_none(),
            "still held by the next holder"
        );
        assert!(next.release().await.unwrap());
    }

    pub async fn watchdog_keeps_a_short_lease_alive_and_stops_after_drop(h: Harness) {
        let kws = handles(&h, 2).await;
        let (a, b) = (kws[0].locks("dog").unwrap(), kws[1].locks("dog").unwrap());
        let guard = a.try_lock("dog").await.unwrap().expect("free"); // 900 ms lease, watchdog
        let key = guard.key().to_owned();
        for _ in 0..4 {
            tokio::time::sleep(ms(600)).await;
            assert!(!guard.is_lost(), "renewed in the background");
            assert!(b.try_lock("dog").await.unwrap().is_none(), "still held");
            let ttl = ttl_of(&kws[0], &key).await.expect("still there");
            assert!(ttl <= ms(900), "{ttl:?}");
        }
        // Without the watchdog the same lease is gone after its ttl.
        let plain = b
            .lock_with("other", LockOptions::new().watchdog(false))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(ms(1000)).await;
        assert!(plain.is_lost());
        assert!(ttl_of(&kws[0], plain.key()).await.is_none());
        drop(plain);

        let lost = guard.lost();
        drop(guard); // no release: the drop releases in the background and stops the watchdog
        tokio::time::timeout(Duration::from_secs(5), lost)
            .await
            .expect("the guard's keeper and release task finished");
        let started = Instant::now();
        loop {
            if let Some(g) = b.try_lock("dog").await.unwrap() {
                drop(g);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "released after drop"
            );
            tokio::time::sleep(ms(20)).await;
        }
        if h.is_redis() {
            // Nothing renews any more: no script runs on the server while we wait several ttls.
            tokio::time::sleep(ms(200)).await;
            let before = script_calls(&h);
            tokio::time::sleep(ms(1000)).await;
            assert_eq!(script_calls(&h), before, "no renewals after drop");
        }
    }

    pub async fn typed_errors_for_wrong_kind_and_bad_arguments(h: Harness) {
        let kw = &handles(&h, 1).await[0];
        match kw.locks("product") {
            Err(Error::WrongKind {
                class,
                expected,
                found,
            }) => assert_eq!(
                (class.as_str(), expected, found),
                ("product", "lock", "cache")
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(kw.locks("nope"), Err(Error::UnknownClass { .. })));
        let locks = kw.locks("job").unwrap();
        for ttl in [Duration::ZERO, Duration::from_secs(25 * 3600)] {
            let e = locks
                .lock_with("x", LockOptions::new().ttl(ttl))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        }
        let g = locks.try_lock("x").await.unwrap().unwrap();
        assert!(matches!(
            g.extend(Duration::ZERO).await,
            Err(Error::InvalidArgument { .. })
        ));
        // 0, beyond 2^53, and a fence far above any issued (it would block real writers for fence_ttl).
        for fence in [0, 1 << 60, g.fence() + 3_600_000_000] {
            assert!(matches!(
                locks.fenced_write("x", fence, b"v").await,
                Err(Error::InvalidArgument { .. })
            ));
        }
        assert!(
            g.fenced_write(b"v").await.unwrap().is_applied(),
            "a bogus fence blocked nobody"
        );
        assert!(matches!(
            locks.try_lock(&Vec::<String>::new()).await,
            Err(Error::Key(_))
        ));
        assert!(g.release().await.unwrap());
    }

    pub async fn every_key_has_a_ttl(h: Harness) {
        let kw = &handles(&h, 1).await[0];
        let locks = kw.locks("job").unwrap();
        let g = locks.try_lock(&("tenant", 7)).await.unwrap().unwrap();
        assert_eq!(g.name(), "tenant:7");
        assert!(g.fenced_write(b"v").await.unwrap().is_applied());
        let keys = kw.scan_namespace().await.unwrap();
        let names: Vec<_> = keys.iter().map(|k| k.key.clone()).collect();
        let l = g.key().to_owned();
        assert_eq!(names, [l.clone(), format!("{l}:f"), format!("{l}:w")]);
        for k in &keys {
            let ttl = k.ttl.unwrap_or_else(|| panic!("{} has no TTL", k.key));
            let max = if k.key == l {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(7 * 24 * 3600)
            };
            assert!(ttl > Duration::ZERO && ttl <= max, "{}: {ttl:?}", k.key);
        }
        assert!(g.release().await.unwrap());
        let left: Vec<_> = kw
            .scan_namespace()
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        assert_eq!(
            left,
            [format!("{l}:f"), format!("{l}:w")],
            "the lease is gone"
        );
    }

    pub async fn debug_never_shows_the_token(h: Harness) {
        let kw = &handles(&h, 1).await[0];
        let locks = kw.locks("job").unwrap();
        let g = locks.try_lock("secret").await.unwrap().unwrap();
        let shown = format!("{g:?} {locks:?}");
        assert!(shown.contains("fence"), "{shown}");
        if let Some(mut con) = h.raw() {
            let token: String = ::redis::cmd("GET").arg(g.key()).query(&mut *con).unwrap();
            assert_eq!(token.len(), 32);
            assert!(!shown.contains(&token), "{shown}");
        }
        assert!(g.release().await.unwrap());
    }

    async fn ttl_of(kw: &Keyward, key: &str) -> Option<Duration> {
        let keys = kw.scan_namespace().await.unwrap();
        keys.into_iter().find(|k| k.key == key).and_then(|k| k.ttl)
    }

    async fn current_is_held(locks: &keyward::lock::Locks, name: &str) -> bool {
        match locks.try_lock(name).await.unwrap() {
            Some(g) => {
                assert!(g.release().await.unwrap());
                false
            }
            None => true,
        }
    }

    /// Script calls the server ran so far; 0 when embedded and on the shared cluster, whose counters other
    /// tests move too.
    fn script_calls(h: &Harness) -> u64 {
        let Some(s) = h.server() else { return 0 };
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut s.connection())
            .unwrap();
        ["cmdstat_evalsha:calls=", "cmdstat_eval:calls="]
            .iter()
            .filter_map(|prefix| {
                info.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }
}

/// The embedded backend with tokio's paused clock: time-dependent properties, exactly and without sleeping.
mod paused {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_local_deadline_is_the_lease_and_extend_rearms_it() {
        let kw = Keyward::embedded(policy("paused"));
        let locks = kw.locks("job").unwrap();
        let g = locks.try_lock("d").await.unwrap().unwrap(); // 30 s, no watchdog
        let lost = g.lost();
        tokio::pin!(lost);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!g.is_lost());
        assert!(g.extend(Duration::from_secs(30)).await.unwrap());
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!g.is_lost(), "the manual extend re-armed the deadline");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut lost)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(g.is_lost(), "30 s after the extend");
        tokio::time::timeout(Duration::from_millis(1), &mut lost)
            .await
            .expect("lost() resolved at the deadline");
        assert!(
            !g.extend(Duration::from_secs(30)).await.unwrap(),
            "lost is final"
        );
        assert!(
            !g.release().await.unwrap(),
            "the lease expired on the store too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fences_stay_monotonic_after_days_without_a_counter() {
        let kw = Keyward::embedded(policy("paused"));
        let locks = kw.locks("job").unwrap(); // fence_ttl: 7 days
        let first = locks.try_lock("m").await.unwrap().unwrap();
        let f1 = first.fence();
        assert!(first.release().await.unwrap());
        let second = locks.try_lock("m").await.unwrap().unwrap();
        assert_eq!(second.fence(), f1 + 1, "same instant: the counter decides");
        assert!(second.release().await.unwrap());
        tokio::time::sleep(Duration::from_secs(8 * 24 * 3600)).await;
        assert!(
            kw.scan_namespace().await.unwrap().is_empty(),
            "counter expired"
        );
        let third = locks.try_lock("m").await.unwrap().unwrap();
        assert!(
            third.fence() >= f1 + 8 * 24 * 3600 * 1_000_000,
            "the clock decides: {} vs {f1}",
            third.fence()
        );
        assert!(third.release().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_count_by_class() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        let kw = Keyward::embedded(policy("paused"));
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // Counters are registered when the handle is made and keep reporting to this recorder.
        let locks = metrics::with_local_recorder(&recorder, || kw.locks("short")).unwrap();

        let first = locks.try_lock("m").await.unwrap().unwrap(); // acquired
        assert!(locks.try_lock("m").await.unwrap().is_none()); // contended
        let gave_up = locks
            .lock_with("m", LockOptions::new().wait(Duration::from_millis(50)))
            .await
            .unwrap();
        assert!(gave_up.is_none()); // contended (twice or more), one timeout
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(first.is_lost()); // lost
        let second = locks.try_lock("m").await.unwrap().unwrap(); // acquired
        assert!(!first.fenced_write(b"x").await.unwrap().is_applied()); // rejected
        assert!(!first.release().await.unwrap()); // already counted as lost
        assert!(second.release().await.unwrap());

        // One snapshot: taking it resets the debugging recorder's counters.
        let snapshot = snapshotter.snapshot().into_vec();
        let count = |name: &str| -> u64 {
            snapshot
                .iter()
                .filter(|(key, _, _, _)| {
                    key.key().name() == name
                        && key
                            .key()
                            .labels()
                            .any(|l| l.key() == "class" && l.value() == "short")
                })
                .map(|(_, _, _, v)| match v {
                    DebugValue::Counter(n) => *n,
                    other => panic!("{name}: {other:?}"),
                })
                .sum()
        };
        assert_eq!(count("keyward_lock_acquired_total"), 2);
        let contended = count("keyward_lock_contended_total");
        assert!(contended >= 3, "{contended}");
        assert_eq!(count("keyward_lock_timeouts_total"), 1);
        assert_eq!(count("keyward_lock_lost_total"), 1);
        assert_eq!(count("keyward_lock_fenced_rejected_total"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_renews_for_an_hour() {
        let kw = Keyward::embedded(policy("paused"));
        let locks = kw.locks("dog").unwrap(); // 900 ms lease
        let g = locks.try_lock("w").await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!g.is_lost());
        assert!(locks.try_lock("w").await.unwrap().is_none());
        assert!(g.release().await.unwrap());
    }
}
