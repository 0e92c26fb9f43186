//! Issue #9's defects that are about stored state: group epochs that repeat after their record expired,
//! corrupted data that used to hang or fail a whole namespace, values that could not round-trip, secrets in
//! URL errors and an insecure-TLS fragment. Each case failed before its fix.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyward::key::internal_key;
use keyward::policy::{CacheClass, Jitter, LockClass, Policy};
use keyward::{ConnectOptions, Error, Keyward};
use keyward_testkit::RedisServer;

/// The class: ttl 10 s, no jitter, lease 1 s, loader timeout 500 ms. The epochs record then lives
/// `max entry lifetime (11 s) + 60 s` = 71 s after a bump.
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .cache(
            "k",
            CacheClass::new(Duration::from_secs(10), "tests, after each write")
                .jitter(Jitter::Percent(0.0))
                .lease_ttl(Duration::from_secs(1))
                .loader_timeout(Duration::from_millis(500)),
        )
        .lock("job", LockClass::new(Duration::from_secs(30)))
        .build()
        .unwrap()
}

async fn load(v: &str) -> Result<String, std::io::Error> {
    Ok(v.to_owned())
}

/// The scenario on the embedded backend, on a paused clock: the epochs record expires between two
/// group invalidations; the second one must still hide the value filled before it.
#[tokio::test(start_paused = true)]
async fn group_invalidation_is_not_undone_by_the_epochs_expiring_embedded() {
    let kw = Keyward::embedded(policy("epochs"));
    let cache = kw.cache::<String>("k").unwrap();
    for invalidate_namespace in [false, true] {
        let bump = || async {
            if invalidate_namespace {
                kw.invalidate_namespace().await.unwrap();
            } else {
                cache.invalidate_all().await.unwrap();
            }
        };
        bump().await;
        tokio::time::advance(Duration::from_secs(65)).await;
        assert_eq!(cache.get_or_set("k", || load("S1")).await.unwrap(), "S1");
        tokio::time::advance(Duration::from_secs(7)).await; // t = 72 s: the epochs record is gone
        bump().await; // the source became S2
        assert_eq!(
            cache.get("k").await.unwrap(),
            None,
            "namespace: {invalidate_namespace}"
        );
        assert_eq!(cache.get_or_set("k", || load("S2")).await.unwrap(), "S2");
        tokio::time::advance(Duration::from_secs(120)).await;
    }
}

/// The same on Redis: the epochs hash is deleted where it would have expired at t = 71 s.
#[tokio::test]
async fn group_invalidation_is_not_undone_by_the_epochs_expiring_redis() {
    let server = RedisServer::spawn();
    let p = policy("epochs");
    let gens = internal_key(&p, "gens");
    let kw = Keyward::connect(&server.url(), p).await.unwrap();
    let cache = kw.cache::<String>("k").unwrap();
    let mut raw = server.connection();
    for invalidate_namespace in [false, true] {
        let bump = || async {
            if invalidate_namespace {
                kw.invalidate_namespace().await.unwrap();
            } else {
                cache.invalidate_all().await.unwrap();
            }
        };
        bump().await;
        assert_eq!(cache.get_or_set("k", || load("S1")).await.unwrap(), "S1");
        let _: i64 = redis::cmd("DEL").arg(&gens).query(&mut raw).unwrap();
        bump().await;
        assert_eq!(
            cache.get("k").await.unwrap(),
            None,
            "namespace: {invalidate_namespace}"
        );
        assert_eq!(cache.get_or_set("k", || load("S2")).await.unwrap(), "S2");
        cache.invalidate("k").await.unwrap();
    }
}

/// A lease-shaped value without a TTL (keyward never writes one) used to make `get_or_set` spin forever at
/// ~2,200 commands/s; it is taken over like an expired lease.
#[tokio::test]
async fn a_lease_without_ttl_is_taken_over() {
    let server = RedisServer::spawn();
    let kw = Keyward::connect(&server.url(), policy("lease"))
        .await
        .unwrap();
    let cache = kw.cache::<String>("k").unwrap();
    let key = cache.key("stuck").unwrap();
    let mut raw = server.connection();
    for marker in ["L1:deadbeef:0", "L1:deadbeef:1"] {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(marker)
            .query(&mut raw)
            .unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            cache.get_or_set("stuck", || load("fresh")),
        )
        .await
        .expect("get_or_set must not wait on a lease that never expires");
        assert_eq!(got.unwrap(), "fresh");
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut raw).unwrap();
        assert!(ttl > 0, "the refilled entry has a TTL ({ttl})");
        cache.invalidate("stuck").await.unwrap();
    }
}

/// A corrupt epoch field (or an epochs key of the wrong type) used to fail every cache call of the
/// namespace; now reads go on, and the field is repaired (bumped), which is always safe.
#[tokio::test]
async fn a_corrupt_epoch_is_repaired_not_fatal() {
    let server = RedisServer::spawn();
    let p = policy("corrupt");
    let gens = internal_key(&p, "gens");
    let kw = Keyward::connect(&server.url(), p).await.unwrap();
    let cache = kw.cache::<String>("k").unwrap();
    let mut raw = server.connection();
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = |v: &'static str| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(v.to_owned())
        }
    };
    assert_eq!(cache.get_or_set("a", loader("v1")).await.unwrap(), "v1");

    for corrupt in ["garbage", "1e300", "99999999999999999999"] {
        let _: () = redis::cmd("HSET")
            .arg(&gens)
            .arg("*")
            .arg(corrupt)
            .query(&mut raw)
            .unwrap();
        // The value filled before the corruption cannot be vouched for: a miss, then a fill that lands.
        assert_eq!(
            cache.get_or_set("a", loader("v2")).await.unwrap(),
            "v2",
            "{corrupt}"
        );
        assert_eq!(cache.get("a").await.unwrap().as_deref(), Some("v2"));
        let field: String = redis::cmd("HGET")
            .arg(&gens)
            .arg("*")
            .query(&mut raw)
            .unwrap();
        assert!(
            field.parse::<u64>().is_ok_and(|n| n < 1 << 53),
            "{corrupt} repaired to {field}"
        );
        kw.invalidate_namespace().await.unwrap();
        assert_eq!(cache.get("a").await.unwrap(), None);
        assert_eq!(cache.get_or_set("a", loader("v1")).await.unwrap(), "v1");
    }

    // The epochs key holding a string instead of a hash.
    let _: () = redis::cmd("SET")
        .arg(&gens)
        .arg("oops")
        .arg("PX")
        .arg(60_000)
        .query(&mut raw)
        .unwrap();
    assert_eq!(cache.get_or_set("b", loader("b1")).await.unwrap(), "b1");
    cache.set("c", &"c1".to_owned()).await.unwrap();
    assert_eq!(cache.get("c").await.unwrap().as_deref(), Some("c1"));
    cache.invalidate_all().await.unwrap();
    assert_eq!(cache.get("c").await.unwrap(), None);
    let ttl: i64 = redis::cmd("PTTL").arg(&gens).query(&mut raw).unwrap();
    assert!(ttl > 0, "the repaired epochs hash has a TTL ({ttl})");
}

/// A fencing counter at or above 2^53 (or not a number) is corrupt: it is reset to the clock floor instead
/// of failing every acquire (Lua cannot even format such a fence).
#[tokio::test]
async fn a_corrupt_fence_counter_is_reset() {
    let server = RedisServer::spawn();
    let kw = Keyward::connect(&server.url(), policy("fence"))
        .await
        .unwrap();
    let locks = kw.locks("job").unwrap();
    let fence_key = format!("{}:f", locks.key("nightly").unwrap());
    let mut raw = server.connection();
    for corrupt in ["1e300", "9007199254740993", "-5", "nonsense"] {
        let _: () = redis::cmd("SET")
            .arg(&fence_key)
            .arg(corrupt)
            .arg("PX")
            .arg(60_000)
            .query(&mut raw)
            .unwrap();
        let guard = locks
            .try_lock("nightly")
            .await
            .unwrap_or_else(|e| panic!("{corrupt}: {e}"))
            .expect("the lock is free");
        assert!(
            guard.fence() < 1 << 53,
            "{corrupt}: fence {}",
            guard.fence()
        );
        assert_eq!(
            guard.fenced_write(b"ok").await.unwrap(),
            keyward::lock::FencedWrite::Applied,
            "{corrupt}"
        );
        guard.release().await.unwrap();
    }
}

/// Non-finite floats cannot round-trip through JSON: refused at write, on both backends, instead of being
/// stored as `null` and read back as a miss forever after.
#[tokio::test]
async fn non_finite_floats_are_refused_at_write() {
    let server = RedisServer::spawn();
    for kw in [
        Keyward::embedded(policy("nan")),
        Keyward::connect(&server.url(), policy("nan"))
            .await
            .unwrap(),
    ] {
        let cache = kw.cache::<Vec<f64>>("k").unwrap();
        let err = cache.set("p", &vec![1.0, f64::NAN]).await.unwrap_err();
        assert!(matches!(err, Error::Encode { .. }), "{err:?}");
        let err = cache
            .get_or_set("q", || async {
                Ok::<_, std::io::Error>(vec![f64::INFINITY])
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Encode { .. }), "{err:?}");
        assert_eq!(cache.get("p").await.unwrap(), None);
        cache.set("p", &vec![1.5]).await.unwrap();
        assert_eq!(cache.get("p").await.unwrap(), Some(vec![1.5]));
    }
}

/// The four URL shapes: the password never appears in the error, its Display or its Debug.
#[tokio::test]
async fn no_password_in_url_errors() {
    for (url, secret) in [
        ("redis://app:s3cretPW9/x@127.0.0.1:6379", "s3cretPW9"),
        ("app:s3cretPW9@127.0.0.1:6379", "s3cretPW9"),
        (
            "redis+unix:///nonexistent/redis.sock?pass=s3cretPW9",
            "s3cretPW9",
        ),
        ("mem://user:s3cretPW9@host", "s3cretPW9"),
    ] {
        let options = ConnectOptions::default().connect_timeout(Duration::from_millis(500));
        let err = Keyward::connect_with(url, policy("url"), options)
            .await
            .expect_err(url);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(secret), "{url}: {shown}");
        assert!(!shown.contains("PW9"), "{url}: {shown}");
    }
}

/// `#insecure` in a URL alone must not turn certificate verification off.
#[tokio::test]
async fn an_insecure_fragment_alone_is_refused() {
    let err = Keyward::connect("rediss://127.0.0.1:1/#insecure", policy("tls"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    assert!(
        err.to_string().contains("danger_accept_invalid_certs"),
        "{err}"
    );
    // With the explicit option the URL is accepted (and fails later, at connect: nothing listens there).
    let err = Keyward::connect_with(
        "rediss://127.0.0.1:1/#insecure",
        policy("tls"),
        ConnectOptions::default()
            .danger_accept_invalid_certs()
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
}

/// `ping` answers on both backends and the strict constructor refuses to start without `REDIS_URL`.
#[tokio::test]
async fn ping_and_the_strict_constructor() {
    let server = RedisServer::spawn();
    Keyward::embedded(policy("ping")).ping().await.unwrap();
    let kw = Keyward::connect(&server.url(), policy("ping"))
        .await
        .unwrap();
    kw.ping().await.unwrap();
    assert!(format!("{kw:?}").contains("breaker: Closed"), "{kw:?}");
    // SAFETY of the test: no other test of this file reads REDIS_URL.
    if std::env::var_os("REDIS_URL").is_none() {
        let err = Keyward::from_env_required(policy("ping"), ConnectOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::MissingRedisUrl), "{err:?}");
    }
}

/// A writer that keeps what a `tracing` subscriber writes, for asserting on log lines.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A server whose `maxmemory-policy` could evict a lock (every keyward key has a TTL, so `volatile-lru` can
/// evict it as readily as `allkeys-lru`) gets a warning at connect naming the classes at risk; `noeviction`
/// gets none.
#[tokio::test(flavor = "current_thread")]
async fn an_evicting_server_is_warned_about_at_connect() {
    for (server_policy, warned) in [
        ("volatile-lru", true),
        ("allkeys-lru", true),
        ("noeviction", false),
    ] {
        let server = RedisServer::spawn_with(
            keyward_testkit::ServerOptions::default().args(["--maxmemory-policy", server_policy]),
        );
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let _kw = Keyward::connect(&server.url(), policy("evict"))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert_eq!(
            text.contains("maxmemory-policy"),
            warned,
            "{server_policy}: {text}"
        );
        if warned {
            assert!(
                text.contains("job") && text.contains(server_policy),
                "{text}"
            );
        }
    }
}
