//! Adversarial regressions against issue #11 (fail-safe, eager refresh, batches, L1): each test states the
//! documented behaviour it checks, and runs on the embedded backend and on a throwaway redis-server.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward::policy::{CacheClass, Jitter, L1Tier, Policy};
use keyward::{CacheLookup, Keyward};
use keyward_testkit::RedisServer;
use tokio::sync::Notify;

static NEXT: AtomicUsize = AtomicUsize::new(0);

const L1_BOUND: Duration = Duration::from_millis(300);

fn policy() -> Policy {
    let app = format!(
        "brk{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Policy::builder("test", app)
        // Fail-safe with a grace longer than the TTL (the docs' example: ttl 10m, grace 10m, here scaled).
        .cache(
            "safe",
            CacheClass::new(Duration::from_secs(1), "tests")
                .jitter(Jitter::Percent(0.0))
                .stale_grace(Duration::from_secs(60))
                .lease_ttl(Duration::from_secs(2))
                .loader_timeout(Duration::from_millis(300)),
        )
        // Eager refresh, no fail-safe: a value must never be served past its TTL. Default lease (10 s).
        .cache(
            "eager",
            CacheClass::new(Duration::from_secs(1), "tests")
                .jitter(Jitter::Percent(0.0))
                .refresh_ahead(Duration::from_millis(800)),
        )
        // An in-process tier, bound 300 ms.
        .cache(
            "near",
            CacheClass::new(Duration::from_secs(60), "tests")
                .l1(L1Tier::new(1 << 20, Duration::from_secs(60)))
                .l1_max_stale(L1_BOUND),
        )
        // Fail-safe and an in-process tier.
        .cache(
            "safe_near",
            CacheClass::new(Duration::from_millis(200), "tests")
                .jitter(Jitter::Percent(0.0))
                .stale_grace(Duration::from_secs(60))
                .lease_ttl(Duration::from_secs(5))
                .loader_timeout(Duration::from_secs(3))
                .l1(L1Tier::new(1 << 20, Duration::from_millis(200)))
                .l1_max_stale(L1_BOUND),
        )
        // An in-process tier whose entries live as long as the class TTL.
        .cache(
            "near_short",
            CacheClass::new(Duration::from_secs(1), "tests")
                .jitter(Jitter::Percent(0.0))
                .l1(L1Tier::new(1 << 20, Duration::from_secs(1)))
                .l1_max_stale(L1_BOUND),
        )
        // docs/cache.md's example, scaled: negative caching and fail-safe on one class.
        .cache(
            "maybe_safe",
            CacheClass::new(Duration::from_secs(60), "tests")
                .negative_ttl(Duration::from_secs(30))
                .stale_grace(Duration::from_secs(60)),
        )
        // Negative caching and eager refresh on one class.
        .cache(
            "maybe_eager",
            CacheClass::new(Duration::from_secs(60), "tests")
                .negative_ttl(Duration::from_secs(30))
                .refresh_ahead(Duration::from_secs(45)),
        )
        .build()
        .expect("valid policy")
}

/// A backend for one test: the embedded store, or a throwaway redis-server (kept alive by the guard).
struct Backend {
    server: Option<RedisServer>,
    policy: Policy,
}

impl Backend {
    fn embedded() -> Self {
        Backend {
            server: None,
            policy: policy(),
        }
    }

    fn redis() -> Self {
        Backend {
            server: Some(RedisServer::spawn()),
            policy: policy(),
        }
    }

    /// A handle; on Redis each call is a new instance (its own connection, flights and L1).
    async fn handle(&self, first: Option<&Keyward>) -> Keyward {
        match (&self.server, first) {
            (Some(s), _) => Keyward::connect(&s.url(), self.policy.clone())
                .await
                .expect("connect"),
            (None, Some(kw)) => kw.clone(),
            (None, None) => Keyward::embedded(self.policy.clone()),
        }
    }
}

fn ok(v: &str) -> Result<String, std::io::Error> {
    Ok(v.to_owned())
}

fn broken() -> Result<String, std::io::Error> {
    Err(std::io::Error::other("the database is down"))
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(Duration::from_secs(60), super::cases::$name(super::Backend::embedded()))
                        .await
                        .expect("hung");
                }
            )*
            use std::time::Duration;
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(Duration::from_secs(60), super::cases::$name(super::Backend::redis()))
                        .await
                        .expect("hung");
                }
            )*
            use std::time::Duration;
        }
    };
}

both!(
    a_batch_fill_keeps_the_fail_safe_grace,
    batch_reads_do_not_keep_an_eager_value_alive_past_its_ttl,
    a_failed_eager_refresh_does_not_extend_the_value_past_its_ttl,
    a_stale_value_under_a_refill_lease_is_not_read_as_fresh,
    l1_does_not_serve_a_value_past_its_ttl,
    negative_entries_are_cached_on_a_fail_safe_class,
    negative_entries_are_cached_on_an_eager_class,
);

mod cases {
    use super::*;

    /// A class with `negative_ttl` (30 s) and `refresh_ahead` (45 s): a cached absent is always inside the
    /// refresh window, so every read takes the refresh lease, finds "not refreshable", *heals* (deletes) the
    /// absent as if it were corrupt, and loads again — negative caching is off.
    pub async fn negative_entries_are_cached_on_an_eager_class(b: Backend) {
        let kw = b.handle(None).await;
        let c = kw.cache::<String>("maybe_eager").unwrap();
        let loads = AtomicUsize::new(0);
        for _ in 0..3 {
            let got = c
                .get_or_set_opt(&1u64, || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<Option<String>, std::io::Error>(None) }
                })
                .await
                .unwrap();
            assert_eq!(got, None);
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "the absent is cached for negative_ttl (30 s): one load"
        );
    }

    /// A class with `negative_ttl` and `stale_grace` (docs/cache.md's own example has both): a cached absent
    /// is stored for `negative_ttl` only, which is at most `stale_grace`, so it is *always* "stale" (PTTL at
    /// most G): every read takes the refill lease over it and calls the loader — negative caching is off.
    pub async fn negative_entries_are_cached_on_a_fail_safe_class(b: Backend) {
        let kw = b.handle(None).await;
        let c = kw.cache::<String>("maybe_safe").unwrap();
        let loads = AtomicUsize::new(0);
        for _ in 0..3 {
            let got = c
                .get_or_set_opt(&1u64, || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<Option<String>, std::io::Error>(None) }
                })
                .await
                .unwrap();
            assert_eq!(got, None);
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "the absent is cached for negative_ttl (30 s): one load"
        );
    }

    /// `l1.ttl` must be at most the class `ttl` ("entry lifetime ≤ ttl"), yet an L1 entry's clock starts when
    /// it is *read*, not when the value was stored: a value read from Redis just before it expires is served
    /// from L1 for up to another `l1.ttl` — here 1 s TTL, served as `L1Hit` at 1.5 s.
    pub async fn l1_does_not_serve_a_value_past_its_ttl(b: Backend) {
        let kw = b.handle(None).await;
        let c = kw.cache::<String>("near_short").unwrap();
        // Let the backplane vouch for L1 first (Redis).
        let warm = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, how) = c
                .get_or_set_with_status(&0u64, || async { ok("warm") })
                .await
                .unwrap();
            if how == CacheLookup::L1Hit {
                break;
            }
            assert!(Instant::now() < warm, "L1 never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.set(&1u64, &"v1".to_owned()).await.unwrap();
        let stored = Instant::now();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let (v, _) = c
            .get_or_set_with_status(&1u64, || async { ok("v2") })
            .await
            .unwrap();
        assert_eq!(v, "v1", "fresh at 800 ms");
        tokio::time::sleep(Duration::from_millis(1500).saturating_sub(stored.elapsed())).await;
        let (v, how) = c
            .get_or_set_with_status(&1u64, || async { ok("v2") })
            .await
            .unwrap();
        assert_eq!(
            (v.as_str(), how),
            ("v2", CacheLookup::Miss),
            "a value with a 1 s TTL served {:?} after it was stored",
            stored.elapsed()
        );
    }

    /// `get_or_set_many` on a fail-safe class must store values like `get_or_set` does (`ttl + jitter +
    /// stale_grace`, `CacheClass::stored_ttl`): a value just filled by a batch is fresh, readable by `get`,
    /// and a hit for `get_or_set`.
    pub async fn a_batch_fill_keeps_the_fail_safe_grace(b: Backend) {
        let kw = b.handle(None).await;
        let c = kw.cache::<String>("safe").unwrap();
        let got = c
            .get_or_set_many(&[1u64], |_missing| async {
                Ok::<_, std::io::Error>(vec![(1u64, "v1".to_owned())])
            })
            .await
            .unwrap();
        assert_eq!(got, ["v1"]);
        assert_eq!(
            c.get(&1u64).await.unwrap().as_deref(),
            Some("v1"),
            "a value the batch just filled is fresh (its TTL must include stale_grace)"
        );
        let (v, how) = c
            .get_or_set_with_status(&1u64, || async { ok("reloaded") })
            .await
            .unwrap();
        assert_eq!((v.as_str(), how), ("v1", CacheLookup::Hit));
    }

    /// "`get_or_set_many` ... does not refresh ahead (it gives the refresh lease back and serves the current
    /// value)". Giving the lease back must not make the value outlive its TTL: batch reads of an entry in its
    /// refresh window must not keep it alive (the lease over it sets its TTL to `max(pttl, lease_ttl)`, and
    /// `release.lua` keeps that TTL).
    pub async fn batch_reads_do_not_keep_an_eager_value_alive_past_its_ttl(b: Backend) {
        let kw = b.handle(None).await;
        let c = kw.cache::<String>("eager").unwrap();
        c.set(&1u64, &"v1".to_owned()).await.unwrap();
        let filled = Instant::now();
        let loads = AtomicUsize::new(0);
        let mut last = String::new();
        // Read through the TTL (1 s) and well past it.
        while filled.elapsed() < Duration::from_millis(2500) {
            let got = c
                .get_or_set_many(&[1u64], |_missing| {
                    loads.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, std::io::Error>(vec![(1u64, "v2".to_owned())]) }
                })
                .await
                .unwrap();
            last = got[0].clone();
            if filled.elapsed() > Duration::from_millis(1200) && last == "v1" {
                panic!(
                    "v1 (TTL 1 s) still served {:?} after it was set; loader calls: {}",
                    filled.elapsed(),
                    loads.load(Ordering::SeqCst)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(last, "v2");
    }

    /// "A failed refresh leaves the current value in place" — in place, not with a longer life: a class
    /// without `stale_grace` never serves a value past its TTL.
    pub async fn a_failed_eager_refresh_does_not_extend_the_value_past_its_ttl(b: Backend) {
        let kw = b.handle(None).await;
        let c = kw.cache::<String>("eager").unwrap();
        c.set(&1u64, &"v1".to_owned()).await.unwrap();
        let filled = Instant::now();
        // Into the refresh window (the last 800 ms of 1 s).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (v, how) = c
            .get_or_set_with_status(&1u64, || async { broken() })
            .await
            .unwrap();
        assert_eq!(v, "v1", "{how:?}");
        // Past the TTL.
        let past = Duration::from_millis(1300);
        tokio::time::sleep(past.saturating_sub(filled.elapsed())).await;
        assert_eq!(
            c.get(&1u64).await.unwrap(),
            None,
            "v1 had a 1 s TTL and no stale_grace; read {:?} after it was set",
            filled.elapsed()
        );
    }

    /// `read.lua`: a read returns nil when the value is stale (PTTL at most `stale_grace`). docs/cache.md: while
    /// another caller refills, others "wait for its commit", they do not get the stale value as a `Hit`.
    /// `fetch.lua`'s lease over the stale value sets the key's TTL to `max(pttl, lease_ttl)`; with
    /// `lease_ttl > stale_grace` the stale value then looks fresh to every reader.
    /// A stale value under a refill lease read as fresh needed a grace shorter than the lease (the lease had
    /// to extend the key): such a class is now refused.
    pub async fn a_stale_value_under_a_refill_lease_is_not_read_as_fresh(_b: Backend) {
        let err = Policy::builder("test", "graceful")
            .cache(
                "graceful",
                CacheClass::new(Duration::from_millis(200), "tests")
                    .stale_grace(Duration::from_secs(2))
                    .lease_ttl(Duration::from_secs(10))
                    .loader_timeout(Duration::from_secs(5)),
            )
            .build()
            .unwrap_err();
        assert_eq!(err.field(), Some("stale_grace"), "{err}");
    }
}

/// Bad fail-safe and L1 fields in TOML: an error naming the class and the field, never a panic.
#[test]
fn bad_l1_and_fail_safe_toml_names_class_and_field() {
    let cases: &[(&str, &str)] = &[
        (r#"l1 = "yes""#, "l1"),
        (r#"l1 = { capacity = "64 MiB" }"#, "l1.ttl"),
        (r#"l1 = { ttl = "30s" }"#, "l1.capacity"),
        (r#"l1 = { capacity = "lots", ttl = "30s" }"#, "l1.capacity"),
        (r#"l1 = { capacity = -5, ttl = "30s" }"#, "l1.capacity"),
        (
            r#"l1 = { capacity = "-5 MiB", ttl = "30s" }"#,
            "l1.capacity",
        ),
        (
            r#"l1 = { capacity = "NaN MiB", ttl = "30s" }"#,
            "l1.capacity",
        ),
        (
            r#"l1 = { capacity = "1e400 B", ttl = "30s" }"#,
            "l1.capacity",
        ),
        (
            r#"l1 = { capacity = "64 MiB", ttl = "30s", extra = 1 }"#,
            "l1",
        ),
        (r#"l1 = { capacity = "64 MiB", ttl = "11m" }"#, "l1.ttl"),
        (r#"l1_max_stale = "1ms""#, "l1_max_stale"),
        (r#"stale_grace = "0s""#, "stale_grace"),
        (r#"soft_timeout = "5s""#, "soft_timeout"),
        (r#"refresh_ahead = "10m""#, "refresh_ahead"),
        (r#"fail_safe_throttle = "0s""#, "fail_safe_throttle"),
        (r#"stale_grace = 5"#, "stale_grace"),
    ];
    for (line, field) in cases {
        let text = format!(
            "[namespace]\nenv = \"prod\"\napp = \"shop\"\n\n[classes.product]\nkind = \"cache\"\nttl = \"10m\"\ninvalidation = \"tests\"\n{line}\n"
        );
        let got = std::panic::catch_unwind(|| Policy::from_toml_str(&text));
        let Ok(got) = got else {
            panic!("`{line}` panicked");
        };
        let err = match got {
            Ok(p) => panic!("`{line}` was accepted: {p}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("product") && err.contains(field),
            "`{line}`: the error must name class `product` and field `{field}`: {err}"
        );
    }
}

/// Group invalidations made on *another* instance (tag, class, namespace) and a load in flight on this one:
/// docs/cache.md and issue #11 — "a caller that joined after an invalidation never gets data loaded before
/// it". Instance A starts a load (leased before the invalidation), instance B invalidates the group and
/// returns, then — well past `l1_max_stale`, so A has applied B's message — a new caller on A asks for the
/// same entry. It joins A's in-process flight (only the invalidating handle detaches its flights) and gets the
/// value loaded before the invalidation.
mod cross_instance_group_invalidation {
    use super::*;

    async fn case(how: &'static str) {
        let b = Backend::redis();
        let kw_a = b.handle(None).await;
        let kw_b = b.handle(None).await;
        let a = kw_a.cache::<String>("near").unwrap();
        let a_b = kw_b.cache::<String>("near").unwrap();
        let started = Arc::new(Notify::new());
        let finish = Arc::new(Notify::new());
        let x = {
            let a = a.clone();
            let (started, finish) = (Arc::clone(&started), Arc::clone(&finish));
            tokio::spawn(async move {
                a.get_or_set_tagged(&1u64, &["t"], || async move {
                    started.notify_one();
                    finish.notified().await;
                    ok("old")
                })
                .await
                .unwrap()
            })
        };
        started.notified().await;
        match how {
            "tag" => kw_b.invalidate_tag("t").await.unwrap(),
            "class" => a_b.invalidate_all().await.unwrap(),
            _ => kw_b.invalidate_namespace().await.unwrap(),
        }
        // Well past the bound: A has applied B's message.
        tokio::time::sleep(L1_BOUND * 3).await;
        let y = {
            let a = a.clone();
            tokio::spawn(async move {
                a.get_or_set_tagged_with_status(&1u64, &["t"], || async { ok("new") })
                    .await
                    .unwrap()
            })
        };
        // Let Y reach its fetch (or join X's flight), then let X finish.
        tokio::time::sleep(Duration::from_millis(100)).await;
        finish.notify_one();
        let _ = x.await.unwrap();
        let (v, how_y) = y.await.unwrap();
        assert_eq!(
            v,
            "new",
            "{how}: a caller that started {:?} after the invalidation returned got the value loaded before it ({how_y:?})",
            L1_BOUND * 3
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tag() {
        case("tag").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn class() {
        case("class").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn namespace() {
        case("namespace").await;
    }
}

/// Cancellation: `Cache::invalidate` deletes the entry in Redis, then publishes on the backplane. A caller
/// dropped between the two (a client that hung up, a `select!` timeout) leaves the entry deleted in Redis and
/// never told to the fleet: the other instances' L1 keep serving the old value until the tier's own TTL, far
/// past `l1_max_stale` — and since the publisher numbers only messages it sends, no gap ever reveals it.
/// (The window is widened by queueing other invalidations of the same handle ahead on its backplane.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_invalidation_is_still_seen_by_every_l1() {
    let b = Backend::redis();
    let kw_a = b.handle(None).await;
    let kw_b = b.handle(None).await;
    let a = kw_a.cache::<String>("near").unwrap();
    let c_b = kw_b.cache::<String>("near").unwrap();
    // A serves "old" from its L1.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (v, how) = a
            .get_or_set_with_status(&1u64, || async { ok("old") })
            .await
            .unwrap();
        assert_eq!(v, "old");
        if how == CacheLookup::L1Hit {
            break;
        }
        assert!(Instant::now() < deadline, "never an L1 hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = a.key(&1u64).unwrap();
    let mut raw = b.server.as_ref().unwrap().connection();
    // A backlog of B's own invalidations (other ids) waiting to publish.
    let backlog: Vec<_> = (0..3000u64)
        .map(|i| {
            let c = c_b.clone();
            tokio::spawn(async move { c.invalidate(&(1000 + i)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let inv = c_b.invalidate(&1u64);
    tokio::pin!(inv);
    let mut cancelled = false;
    for _ in 0..5000 {
        tokio::select! {
            r = &mut inv => { r.unwrap(); break; }
            () = tokio::time::sleep(Duration::from_micros(500)) => {
                let exists: i64 = ::redis::cmd("EXISTS").arg(&key).query(&mut raw).unwrap();
                if exists == 0 {
                    cancelled = true;
                    break;
                }
            }
        }
    }
    assert!(
        cancelled,
        "the invalidation finished before it could be cancelled: widen the backlog"
    );
    // The caller goes away: the future is dropped after Redis deleted the entry.
    #[allow(clippy::drop_non_drop)]
    drop(inv);
    for t in backlog {
        t.await.unwrap().unwrap();
    }
    let cancelled_at = Instant::now();
    tokio::time::sleep(L1_BOUND * 3).await;
    let (v, how) = a
        .get_or_set_with_status(&1u64, || async { ok("new") })
        .await
        .unwrap();
    assert_eq!(
        (v.as_str(), how),
        ("new", CacheLookup::Miss),
        "Redis no longer holds the entry, yet A serves its L1 copy {:?} later",
        cancelled_at.elapsed()
    );
}

/// docs/cache.md: "`invalidate` (any form): the value is removed, stale copy included: invalidation is never
/// served stale". Instance A refills a stale value S (its loader will fail); instance B invalidates the entry
/// and returns; well past `l1_max_stale`, a new caller on A joins A's refill flight and, when the refill fails,
/// is served S — the value B invalidated — as `Coalesced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_value_is_not_served_after_another_instance_invalidated_it() {
    let b = Backend::redis();
    let kw_a = b.handle(None).await;
    let kw_b = b.handle(None).await;
    let a = kw_a.cache::<String>("safe_near").unwrap();
    let c_b = kw_b.cache::<String>("safe_near").unwrap();
    a.set(&1u64, &"S".to_owned()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // stale
    let started = Arc::new(Notify::new());
    let finish = Arc::new(Notify::new());
    let x = {
        let a = a.clone();
        let (started, finish) = (Arc::clone(&started), Arc::clone(&finish));
        tokio::spawn(async move {
            a.get_or_set_with_status(&1u64, || async move {
                started.notify_one();
                finish.notified().await;
                broken()
            })
            .await
        })
    };
    started.notified().await;
    c_b.invalidate(&1u64).await.unwrap();
    tokio::time::sleep(L1_BOUND * 3).await;
    let y = {
        let a = a.clone();
        tokio::spawn(async move {
            a.get_or_set_with_status(&1u64, || async { ok("new") })
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    finish.notify_one();
    // The refill overlapped the invalidation and failed: its lease was voided, so it is an error, not the
    // invalidated stale value.
    let refill = x.await.unwrap();
    assert!(refill.is_err(), "{refill:?}");
    let (xv, xhow) = ("(error)", CacheLookup::Miss);
    let (v, how) = y.await.unwrap();
    assert_eq!(
        v,
        "new",
        "a call started {:?} after B's invalidation returned was served the invalidated value ({how:?}); \
         the refill itself answered ({xv}, {xhow:?})",
        L1_BOUND * 3
    );
}
