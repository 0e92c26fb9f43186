//! The conformance suite: every case runs against the embedded backend and a real redis-server, and both must
//! behave the same. Nothing here sleeps to "wait for things": waits use wake-ups, barriers and deadlines.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{Harness, Source};
use keyward::{Error, Keyward};
use tokio::sync::{Barrier, Notify};

/// A deadline for things that must happen "soon"; generous, so a slow CI machine does not fail a test.
const SOON: Duration = Duration::from_secs(20);

conformance!(
    hit_and_miss,
    every_written_key_has_a_ttl_in_range,
    stampede_of_1000_loads_once,
    stampede_across_handles_loads_once,
    waiters_are_woken_by_the_commit,
    invalidation_refuses_a_stale_fill,
    randomized_fill_invalidate_trials_never_read_stale,
    dead_lease_holder_is_taken_over_by_one_waiter,
    cancelled_leader_hands_over,
    undecodable_values_self_heal,
    loader_errors_are_shared_and_not_cached,
    loader_timeout_is_an_error,
    write_through_failure_leaves_cache_untouched,
    invalidate_after_only_on_success,
    negative_caching,
    class_and_namespace_invalidation_are_o1,
    value_size_limit_names_class_and_size,
    personal_classes_are_refused,
    key_errors_are_typed,
    stats_count_what_each_class_did,
    get_or_set_with_status_says_how_it_was_answered,
);

mod cases {
    use super::*;

    pub async fn get_or_set_with_status_says_how_it_was_answered(h: Harness) {
        use keyward::CacheLookup;
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let (v, how) = c
            .get_or_set_with_status(&1, || async { ok("a".to_owned()) })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("a", CacheLookup::Miss));
        let (v, how) = c
            .get_or_set_with_status(&1, || async { ok("b".to_owned()) })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("a", CacheLookup::Hit));
        // Six callers of one cold entry in one process: exactly one loads, the others share its outcome.
        let gate = Arc::new(Notify::new());
        let leader = {
            let (c, gate) = (c.clone(), gate.clone());
            tokio::spawn(async move {
                c.get_or_set_with_status(&2, || async move {
                    gate.notified().await;
                    ok("shared".to_owned())
                })
                .await
            })
        };
        let followers: Vec<_> = (0..5)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.get_or_set_with_status(&2, || async { ok("other".to_owned()) })
                        .await
                })
            })
            .collect();
        // A follower joins the flight (coalesced) or comes after its commit (a hit); either way exactly one
        // caller loads.
        gate.notify_one();
        let mut hows = vec![leader.await.unwrap().unwrap()];
        for f in followers {
            hows.push(f.await.unwrap().unwrap());
        }
        // Whichever caller led (spawn order is not run order), everyone got its value.
        assert!(hows.iter().all(|(v, _)| *v == hows[0].0), "{hows:?}");
        assert_eq!(
            hows.iter()
                .filter(|(_, how)| *how == CacheLookup::Miss)
                .count(),
            1,
            "one caller loaded: {hows:?}"
        );
        assert!(
            hows.iter().all(|(_, how)| matches!(
                how,
                CacheLookup::Miss | CacheLookup::Coalesced | CacheLookup::Hit
            )),
            "{hows:?}"
        );
    }

    pub async fn stats_count_what_each_class_did(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        assert_eq!(c.stats(), keyward::CacheStats::default());
        assert_eq!(c.stats().hit_ratio(), None);
        let load = || async { ok("v".to_owned()) };
        c.get_or_set(&1, load).await.unwrap(); // miss, one load
        c.get_or_set(&1, load).await.unwrap(); // hit
        c.get_or_set(&1, load).await.unwrap(); // hit
        assert_eq!(c.get(&2).await.unwrap(), None); // miss
        let failing = c
            .get_or_set(&3, || async {
                Err::<String, _>(std::io::Error::other("source down"))
            })
            .await;
        assert!(failing.is_err());
        // Another `Cache` of the class on the same handle shares the totals; another class has its own.
        let same = kw.cache::<String>("product").unwrap().stats();
        let s = c.stats();
        assert_eq!(same, s);
        assert_eq!(
            (s.hits, s.misses, s.loader_calls, s.loader_errors),
            (2, 3, 2, 1),
            "{s:?}"
        );
        assert_eq!(s.hit_ratio(), Some(0.4));
        assert_eq!(
            kw.cache::<String>("other").unwrap().stats(),
            keyward::CacheStats::default()
        );
    }

    fn ok<T>(v: T) -> Result<T, std::io::Error> {
        Ok(v)
    }

    pub async fn hit_and_miss(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        assert_eq!(c.get(&1).await.unwrap(), None);
        let loads = AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            ok("apple".to_owned())
        };
        assert_eq!(c.get_or_set(&1, load).await.unwrap(), "apple");
        assert_eq!(c.get(&1).await.unwrap().as_deref(), Some("apple"));
        let again = c
            .get_or_set(&1, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                ok("pear".to_owned())
            })
            .await
            .unwrap();
        assert_eq!(again, "apple", "second call is a hit");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        c.set(&1, &"plum".to_owned()).await.unwrap();
        assert_eq!(c.get(&1).await.unwrap().as_deref(), Some("plum"));
        c.invalidate(&1).await.unwrap();
        assert_eq!(c.get(&1).await.unwrap(), None);
        // Case is preserved in ids: two entries.
        c.set("Sku-A", &"upper".to_owned()).await.unwrap();
        c.set("sku-a", &"lower".to_owned()).await.unwrap();
        assert_eq!(c.get("Sku-A").await.unwrap().as_deref(), Some("upper"));
        assert_eq!(c.get("sku-a").await.unwrap().as_deref(), Some("lower"));
    }

    pub async fn every_written_key_has_a_ttl_in_range(h: Harness) {
        let kw = h.keyward().await;
        let product = kw.cache::<Vec<u32>>("product").unwrap();
        let maybe = kw.cache::<u32>("maybe").unwrap();
        let other = kw.cache::<String>("other").unwrap();
        for i in 0..50u32 {
            product
                .get_or_set(&i, || async move { ok(vec![i; 3]) })
                .await
                .unwrap();
            maybe
                .get_or_set_opt(&i, || async move { ok((i % 2 == 0).then_some(i)) })
                .await
                .unwrap();
            other.set(&(i, "x:y*z"), &format!("v{i}")).await.unwrap();
            if i % 7 == 0 {
                product.invalidate(&i).await.unwrap();
            }
        }
        other.invalidate_all().await.unwrap();
        kw.invalidate_namespace().await.unwrap();
        // A lease left behind by a holder that never finishes (forgotten, like a crashed process).
        let stuck = product.clone();
        let mut f = Box::pin(async move {
            stuck
                .get_or_set(&"stuck", || {
                    std::future::pending::<Result<Vec<u32>, std::io::Error>>()
                })
                .await
        });
        assert!(futures_poll_once(&mut f).await.is_none());
        std::mem::forget(f);

        let keys = h.all_keys(&kw).await;
        assert!(keys.len() >= 100, "workload wrote keys: {}", keys.len());
        let max = kw.policy().max_entry_lifetime() + Duration::from_secs(61);
        for k in &keys {
            let ttl = k
                .ttl
                .unwrap_or_else(|| panic!("key `{}` has no TTL (TTL -1)", k.key));
            assert!(ttl <= max, "key `{}` TTL {ttl:?} beyond {max:?}", k.key);
            assert!(k.key.starts_with(&format!("test:{}:", kw.policy().app())));
        }
        // Value TTLs sit within [ttl - elapsed, ttl + jitter] of their class.
        let pattern = format!("test:{}:product:v1:{{", kw.policy().app());
        let product_ttl = Duration::from_secs(60);
        for k in keys.iter().filter(|k| k.key.starts_with(&pattern)) {
            let ttl = k.ttl.unwrap();
            if k.key.ends_with("{stuck}") {
                assert!(ttl <= Duration::from_secs(10), "lease TTL is the lease_ttl");
                continue;
            }
            assert!(ttl <= product_ttl + product_ttl / 10, "{}: {ttl:?}", k.key);
            assert!(
                ttl >= product_ttl - Duration::from_secs(30),
                "{}: {ttl:?}",
                k.key
            );
        }
    }

    /// Poll a future once (so it starts), returning its output if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        // Drive it until it parks on I/O or a wait: a few yields with a short deadline.
        tokio::time::timeout(Duration::from_millis(200), f)
            .await
            .ok()
    }

    pub async fn stampede_of_1000_loads_once(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let source = Arc::new(Source::default());
        let gate = Arc::new(Barrier::new(1000));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let (c, source, gate) = (c.clone(), source.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                gate.wait().await;
                c.get_or_set("cold", || async {
                    source.loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await; // the slow source
                    ok("loaded".to_owned())
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "loaded");
        }
        assert_eq!(
            source.loads.load(Ordering::SeqCst),
            1,
            "exactly one loader call"
        );
    }

    pub async fn stampede_across_handles_loads_once(h: Harness) {
        // On Redis each handle has its own connection, flights and wake-ups, as separate processes would.
        let handles = h.handles(8).await;
        let source = Arc::new(Source::default());
        let gate = Arc::new(Barrier::new(800));
        let mut tasks = Vec::new();
        for kw in &handles {
            let c = kw.cache::<String>("product").unwrap();
            for _ in 0..100 {
                let (c, source, gate) = (c.clone(), source.clone(), gate.clone());
                tasks.push(tokio::spawn(async move {
                    gate.wait().await;
                    c.get_or_set("cold", || async {
                        source.loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        ok("loaded".to_owned())
                    })
                    .await
                }));
            }
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "loaded");
        }
        assert_eq!(source.loads.load(Ordering::SeqCst), 1);
    }

    pub async fn waiters_are_woken_by_the_commit(h: Harness) {
        // The lease outlives the test's deadline: a waiter that only re-checked at lease expiry would hang.
        let handles = h.handles(2).await;
        let policy_lease = handles[0]
            .cache::<String>("product")
            .unwrap()
            .policy()
            .lease_ttl_value();
        assert!(policy_lease >= Duration::from_secs(10));
        let a = handles[0].cache::<String>("product").unwrap();
        // The waiter's counters go to a recorder of its own, so the test can see it start waiting.
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let b = metrics::with_local_recorder(&recorder, || handles[1].cache::<String>("product"))
            .unwrap();
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let holder = {
            let (started, release) = (started.clone(), release.clone());
            tokio::spawn(async move {
                a.get_or_set("k", || async move {
                    started.notify_one();
                    release.notified().await;
                    ok("from-a".to_owned())
                })
                .await
            })
        };
        started.notified().await;
        // `get_or_set_opt` is a separate in-process flight from `get_or_set`, so even on the embedded backend
        // (one process, shared flights) the waiter goes to the store and parks on the lease.
        let waiter = tokio::spawn(async move {
            b.get_or_set_opt("k", || async { ok(Some("from-b".to_owned())) })
                .await
        });
        // Until the waiter is parked on the lease (its lease_waits counter moves); a condition, not a delay.
        let parked = async {
            loop {
                let waits: u64 = snapshotter
                    .snapshot()
                    .into_vec()
                    .into_iter()
                    .filter(|(k, ..)| k.key().name() == "keyward_cache_lease_waits_total")
                    .map(|(.., v)| match v {
                        metrics_util::debugging::DebugValue::Counter(n) => n,
                        _ => 0,
                    })
                    .sum();
                if waits > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(SOON, parked)
            .await
            .expect("the waiter parks on the lease");
        assert!(!waiter.is_finished());
        release.notify_one();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woken well before the 10 s lease ends")
            .unwrap()
            .unwrap();
        assert_eq!(got.as_deref(), Some("from-a"));
        assert_eq!(holder.await.unwrap().unwrap(), "from-a");
    }

    pub async fn invalidation_refuses_a_stale_fill(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("product").unwrap();
        let source = Arc::new(Source::default());
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        let filler = {
            let (c, source, loaded, proceed) =
                (c.clone(), source.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                c.get_or_set("k", || async move {
                    let v = source.version.load(Ordering::SeqCst); // reads version 0
                    loaded.notify_one();
                    proceed.notified().await;
                    ok(v)
                })
                .await
            })
        };
        loaded.notified().await;
        // The source-of-truth write, then the invalidation, while the fill is in flight.
        source.version.store(1, Ordering::SeqCst);
        c.invalidate("k").await.unwrap();
        proceed.notify_one();
        assert_eq!(
            filler.await.unwrap().unwrap(),
            0,
            "the loader's own caller sees its load"
        );
        // The stale fill never landed.
        assert_eq!(c.get("k").await.unwrap(), None);
        let fresh = c
            .get_or_set("k", || async { ok(source.version.load(Ordering::SeqCst)) })
            .await
            .unwrap();
        assert_eq!(fresh, 1);
    }

    pub async fn randomized_fill_invalidate_trials_never_read_stale(h: Harness) {
        // 10,000 trials over 8 keys: a writer bumps the source and invalidates while readers fill with random
        // delays; every read that starts after an invalidation returned must see at least that version.
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("product").unwrap();
        let stale = Arc::new(AtomicUsize::new(0));
        let mut keys = Vec::new();
        for key in 0..8u32 {
            let (c, stale) = (c.clone(), stale.clone());
            keys.push(tokio::spawn(async move {
                let source = Arc::new(Source::default());
                for trial in 0..1250u64 {
                    let reader = {
                        let (c, source) = (c.clone(), source.clone());
                        tokio::spawn(async move {
                            c.get_or_set(&key, || async {
                                let v = source.version.load(Ordering::SeqCst);
                                for _ in 0..(rand::random::<u8>() % 4) {
                                    tokio::task::yield_now().await;
                                }
                                ok(v)
                            })
                            .await
                        })
                    };
                    for _ in 0..(rand::random::<u8>() % 4) {
                        tokio::task::yield_now().await;
                    }
                    source.version.store(trial + 1, Ordering::SeqCst);
                    c.invalidate(&key).await.unwrap();
                    let after = c
                        .get_or_set(&key, || async { ok(source.version.load(Ordering::SeqCst)) })
                        .await
                        .unwrap();
                    if after < trial + 1 {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(seen) = c.get(&key).await.unwrap()
                        && seen < trial + 1
                    {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    reader.await.unwrap().unwrap();
                }
            }));
        }
        for k in keys {
            k.await.unwrap();
        }
        assert_eq!(
            stale.load(Ordering::SeqCst),
            0,
            "stale reads after invalidation"
        );
    }

    pub async fn dead_lease_holder_is_taken_over_by_one_waiter(h: Harness) {
        // `short`: lease 400 ms. The holder's future is forgotten mid-load: it never commits nor releases,
        // exactly like a process that died.
        let handles = h.handles(4).await;
        let dead = handles[0].cache::<String>("short").unwrap();
        let mut f = Box::pin(async move {
            dead.get_or_set("k", || {
                std::future::pending::<Result<String, std::io::Error>>()
            })
            .await
        });
        assert!(futures_poll_once(&mut f).await.is_none());
        std::mem::forget(f);
        let loads = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for kw in &handles[1..] {
            let c = kw.cache::<String>("short").unwrap();
            let loads = loads.clone();
            waiters.push(tokio::spawn(async move {
                c.get_or_set("k", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    ok("taken-over".to_owned())
                })
                .await
            }));
        }
        for w in waiters {
            let got = tokio::time::timeout(SOON, w)
                .await
                .expect("takeover happens")
                .unwrap();
            assert_eq!(got.unwrap(), "taken-over");
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "exactly one waiter took over"
        );
    }

    pub async fn cancelled_leader_hands_over(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let started = Arc::new(Notify::new());
        let leader = {
            let (c, started) = (c.clone(), started.clone());
            tokio::spawn(async move {
                c.get_or_set("k", || async move {
                    started.notify_one();
                    std::future::pending::<()>().await;
                    ok("never".to_owned())
                })
                .await
            })
        };
        started.notified().await;
        let follower = {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_set("k", || async { ok("second".to_owned()) })
                    .await
            })
        };
        tokio::task::yield_now().await;
        leader.abort(); // the caller went away: its lease is released, the follower leads
        let got = tokio::time::timeout(SOON, follower)
            .await
            .expect("handover")
            .unwrap();
        assert_eq!(got.unwrap(), "second");
    }

    pub async fn undecodable_values_self_heal(h: Harness) {
        let kw = h.keyward().await;
        let as_text = kw.cache::<String>("product").unwrap();
        let as_number = kw.cache::<u64>("product").unwrap();
        as_text.set("k", &"not a number".to_owned()).await.unwrap();
        // A reader of another shape (a deploy changed the type without bumping the version).
        assert_eq!(as_number.get("k").await.unwrap(), None, "treated as a miss");
        assert_eq!(as_text.get("k").await.unwrap(), None, "and removed");
        as_text.set("k", &"still not".to_owned()).await.unwrap();
        let v = as_number.get_or_set("k", || async { ok(7) }).await.unwrap();
        assert_eq!(v, 7, "get_or_set heals and loads");
        assert_eq!(as_number.get("k").await.unwrap(), Some(7));
        if let Some(mut con) = h.raw() {
            // Raw garbage written behind keyward's back.
            let key = as_number.key("k").unwrap();
            for garbage in [&b"\xff\x00garbage"[..], b"V1:zz", b"V1:0:0:v:{not json"] {
                let _: () = ::redis::cmd("SET")
                    .arg(&key)
                    .arg(garbage)
                    .arg("PX")
                    .arg(60_000)
                    .query(&mut *con)
                    .unwrap();
                assert_eq!(as_number.get("k").await.unwrap(), None);
                let exists: bool = ::redis::cmd("EXISTS").arg(&key).query(&mut *con).unwrap();
                assert!(!exists, "garbage deleted");
            }
        }
    }

    pub async fn loader_errors_are_shared_and_not_cached(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Barrier::new(50));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, loads, gate) = (c.clone(), loads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                gate.wait().await;
                c.get_or_set("k", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<String, _>(std::io::Error::other("database down"))
                })
                .await
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                Err(Error::Loader { class, source }) => {
                    assert_eq!(class, "product");
                    assert!(source.to_string().contains("database down"));
                }
                other => panic!("expected a loader error, got {other:?}"),
            }
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load, error shared");
        assert_eq!(c.get("k").await.unwrap(), None, "error not cached");
        let v = c
            .get_or_set("k", || async { ok("recovered".to_owned()) })
            .await
            .unwrap();
        assert_eq!(v, "recovered");
    }

    pub async fn loader_timeout_is_an_error(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("short").unwrap(); // loader_timeout 300 ms
        let err = c
            .get_or_set("k", || async {
                std::future::pending::<()>().await;
                ok("never".to_owned())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LoaderTimeout { .. }), "{err}");
        assert!(err.is_retryable());
        // The lease was released: the next caller loads at once.
        let v = c
            .get_or_set("k", || async { ok("next".to_owned()) })
            .await
            .unwrap();
        assert_eq!(v, "next");
    }

    pub async fn write_through_failure_leaves_cache_untouched(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        c.set("k", &"v1".to_owned()).await.unwrap();
        let err = c
            .write_through("k", &"v2".to_owned(), async {
                Err::<(), _>(std::io::Error::other("constraint violated"))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Source { .. }), "{err}");
        assert_eq!(c.get("k").await.unwrap().as_deref(), Some("v1"));
        let persisted = c
            .write_through("k", &"v2".to_owned(), async { ok(42) })
            .await
            .unwrap();
        assert_eq!(persisted, 42);
        assert_eq!(c.get("k").await.unwrap().as_deref(), Some("v2"));
        // A value the class cannot hold is refused before persist runs.
        let small = kw.cache::<String>("small").unwrap();
        let ran = AtomicUsize::new(0);
        let err = small
            .write_through("k", &"x".repeat(100), async {
                ran.fetch_add(1, Ordering::SeqCst);
                ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ValueTooLarge { .. }));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    pub async fn invalidate_after_only_on_success(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        c.set("k", &"old".to_owned()).await.unwrap();
        let err = c
            .invalidate_after("k", async { Err::<(), _>(std::io::Error::other("nope")) })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Source { .. }));
        assert_eq!(c.get("k").await.unwrap().as_deref(), Some("old"));
        c.invalidate_after("k", async { ok(()) }).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
    }

    pub async fn negative_caching(h: Harness) {
        let kw = h.keyward().await;
        let maybe = kw.cache::<u32>("maybe").unwrap();
        let loads = AtomicUsize::new(0);
        for _ in 0..3 {
            let v = maybe
                .get_or_set_opt("missing", || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    ok(None)
                })
                .await
                .unwrap();
            assert_eq!(v, None);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1, "absence cached");
        // A non-optional read does not accept a cached absence: it loads.
        let v = maybe
            .get_or_set("missing", || async { ok(5) })
            .await
            .unwrap();
        assert_eq!(v, 5);
        // A class without negative_ttl does not cache absence.
        let product = kw.cache::<u32>("product").unwrap();
        let loads = AtomicUsize::new(0);
        for _ in 0..2 {
            product
                .get_or_set_opt("missing", || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    ok(None)
                })
                .await
                .unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    pub async fn class_and_namespace_invalidation_are_o1(h: Harness) {
        let kw = h.keyward().await;
        let product = kw.cache::<u32>("product").unwrap();
        let other = kw.cache::<u32>("other").unwrap();
        for i in 0..20u32 {
            product.set(&i, &i).await.unwrap();
            other.set(&i, &i).await.unwrap();
        }
        product.invalidate_all().await.unwrap();
        for i in 0..20u32 {
            assert_eq!(product.get(&i).await.unwrap(), None);
            assert_eq!(
                other.get(&i).await.unwrap(),
                Some(i),
                "other classes untouched"
            );
        }
        // A fill leased before a class bump never becomes visible.
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        let filler = {
            let (p, loaded, proceed) = (product.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                p.get_or_set(&100, || async move {
                    loaded.notify_one();
                    proceed.notified().await;
                    ok(1)
                })
                .await
            })
        };
        loaded.notified().await;
        product.invalidate_all().await.unwrap();
        proceed.notify_one();
        filler.await.unwrap().unwrap();
        assert_eq!(product.get(&100).await.unwrap(), None);
        let v = product.get_or_set(&100, || async { ok(2) }).await.unwrap();
        assert_eq!(v, 2);

        kw.invalidate_namespace().await.unwrap();
        assert_eq!(product.get(&100).await.unwrap(), None);
        assert_eq!(other.get(&1).await.unwrap(), None);
        other.set(&1, &9).await.unwrap();
        assert_eq!(
            other.get(&1).await.unwrap(),
            Some(9),
            "writes after the bump are visible"
        );
    }

    pub async fn value_size_limit_names_class_and_size(h: Harness) {
        let kw = h.keyward().await;
        let small = kw.cache::<String>("small").unwrap();
        let err = small.set("k", &"x".repeat(100)).await.unwrap_err();
        match &err {
            Error::ValueTooLarge {
                class,
                field,
                size,
                max,
            } => {
                assert_eq!(class, "small");
                assert_eq!(*field, "max_value_bytes");
                assert_eq!(*size, 102);
                assert_eq!(*max, 64);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("small") && err.to_string().contains("102"));
        let err = small
            .get_or_set("k", || async { ok("y".repeat(100)) })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ValueTooLarge { .. }));
        // The lease was released: a fitting value fills at once.
        let v = small
            .get_or_set("k", || async { ok("fits".to_owned()) })
            .await
            .unwrap();
        assert_eq!(v, "fits");
    }

    pub async fn personal_classes_are_refused(h: Harness) {
        let kw: Keyward = h.keyward().await;
        let err = kw.cache::<String>("pii").unwrap_err();
        assert!(matches!(err, Error::PersonalData { .. }));
        assert!(err.to_string().contains("allow_shared"), "{err}");
        assert!(kw.cache::<String>("pii_ok").is_ok());
        assert!(matches!(
            kw.cache::<String>("nope").unwrap_err(),
            Error::UnknownClass { .. }
        ));
    }

    pub async fn key_errors_are_typed(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        assert!(matches!(c.get("").await.unwrap_err(), Error::Key(_)));
        assert!(matches!(
            c.set(&"x".repeat(2000), &"v".to_owned()).await.unwrap_err(),
            Error::Key(_)
        ));
        // Separators and globs in ids cannot reach into another entry.
        c.set(&("a", "b"), &"tuple".to_owned()).await.unwrap();
        assert_eq!(c.get("a:b").await.unwrap(), None);
        assert_eq!(c.get(&("a", "b")).await.unwrap().as_deref(), Some("tuple"));
        c.set("*", &"star".to_owned()).await.unwrap();
        assert_eq!(c.get("x").await.unwrap(), None);
    }
}
