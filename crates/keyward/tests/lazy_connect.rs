//! Lazy connect (`ConnectOptions::lazy_connect`): a handle built before Redis is up answers every call per
//! its capability's failure mode at once, and reaches Redis once a redis-server started after it is up.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keyward::policy::{
    Algorithm, CacheClass, ChannelClass, OnError, Policy, RateLimitClass, SessionClass,
};
use keyward::session::SessionSecrets;
use keyward::{BackendKind, BreakerState, ChannelEvent, ConnectOptions, Error, Keyward};
use keyward_testkit::{RedisServer, ServerOptions};

const RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);

fn policy() -> Policy {
    Policy::builder("test", "lazy")
        .cache(
            "article",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .rate_limit(
            "login_deny",
            RateLimitClass::new(Algorithm::Gcra, 5, Duration::from_secs(60))
                .on_error(OnError::Deny),
        )
        .rate_limit(
            "login_allow",
            RateLimitClass::new(Algorithm::Gcra, 5, Duration::from_secs(60))
                .on_error(OnError::Allow),
        )
        .session(
            "web",
            SessionClass::new(Duration::from_secs(60), Duration::from_secs(600)),
        )
        .channel("news", ChannelClass::new())
        .build()
        .unwrap()
}

/// A TCP port nobody listens on now (the OS's next free one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_follow_the_failure_mode_until_redis_is_up_then_reach_it() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let options = ConnectOptions::default()
        .lazy_connect()
        .response_timeout(RESPONSE_TIMEOUT)
        .connect_timeout(Duration::from_secs(1));
    // Nothing listens on the port: a plain connect fails, a lazy one returns a handle at once.
    let plain = ConnectOptions::default().connect_timeout(Duration::from_secs(1));
    let refused = Keyward::connect_with(&url, policy(), plain).await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
    let kw = Keyward::connect_with(&url, policy(), options)
        .await
        .unwrap();
    assert_eq!(kw.backend(), BackendKind::Redis);

    let cache = kw.cache::<String>("article").unwrap();
    let deny = kw.rate_limiter("login_deny").unwrap();
    let allow = kw.rate_limiter("login_allow").unwrap();
    let sessions = kw
        .sessions::<String>("web", SessionSecrets::new([7u8; 32]).unwrap())
        .unwrap();
    let news = kw.channel::<String>("news").unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let load = |value: &'static str| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(value.to_owned())
        }
    };

    // Before Redis is up: every call answers per its failure mode, within the response timeout.
    let started = Instant::now();
    assert_eq!(cache.get_or_set("a", load("db-1")).await.unwrap(), "db-1");
    assert_eq!(
        cache.get_or_set("a", load("db-2")).await.unwrap(),
        "db-2",
        "fail open writes nothing: the loader runs again"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert!(
        deny.check("203.0.113.7").await.unwrap().is_limited(),
        "on_error = deny"
    );
    assert!(
        !allow.check("203.0.113.7").await.unwrap().is_limited(),
        "on_error = allow"
    );
    let err = sessions
        .create("user-1", &"cart".to_owned())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("not connected yet"), "{err}");
    assert!(!err.to_string().contains("7u8"), "{err}");
    let ping = kw.ping().await.unwrap_err();
    assert!(ping.is_unavailable(), "{ping}");
    assert_eq!(kw.breaker_state(), BreakerState::Open);
    assert!(
        started.elapsed() < RESPONSE_TIMEOUT * 6,
        "six calls took {:?}: none may wait for the connection",
        started.elapsed()
    );
    // A subscription made before the connection starts with a gap and becomes live once connected.
    let mut sub = news.subscribe().await.unwrap();

    // Now start Redis on the port the handle was given.
    let _server = RedisServer::spawn_with(ServerOptions::default().args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while kw.ping().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "not connected 20 s after Redis started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kw.breaker_state(), BreakerState::Closed);

    // After: the cache stores and hits, rate limits and sessions reach Redis.
    assert_eq!(cache.get_or_set("a", load("db-3")).await.unwrap(), "db-3");
    assert_eq!(
        cache.get_or_set("a", load("db-4")).await.unwrap(),
        "db-3",
        "a hit"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    for _ in 0..5 {
        assert!(!deny.check("198.51.100.1").await.unwrap().is_limited());
    }
    assert!(
        deny.check("198.51.100.1").await.unwrap().is_limited(),
        "the 6th of 5"
    );
    let (token, _) = sessions.create("user-1", &"cart".to_owned()).await.unwrap();
    let read = sessions.get(token.as_str()).await.unwrap().expect("alive");
    assert_eq!(read.data, "cart");
    let keys = kw.scan_namespace().await.unwrap();
    assert!(
        keys.iter().any(|k| k.key.contains(":article:")),
        "the cache entry is in Redis: {keys:?}"
    );
    assert!(keys.iter().any(|k| k.key.contains(":web:")), "{keys:?}");

    // The early subscription: a gap, then the messages published now that it is live.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_gap = false;
    loop {
        news.publish(&"hello".to_owned()).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(ChannelEvent::Gap))) => saw_gap = true,
            Ok(Some(Ok(ChannelEvent::Message(m)))) => {
                assert_eq!(m, "hello");
                break;
            }
            Ok(other) => panic!("unexpected delivery {other:?}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "no message 20 s after Redis started"
        );
    }
    assert!(
        saw_gap,
        "a subscription made before the connection starts with a gap"
    );
}

#[tokio::test]
async fn a_url_that_cannot_work_fails_at_once_even_lazily() {
    let lazy = ConnectOptions::default().lazy_connect();
    let err = Keyward::connect_with("http://127.0.0.1:6379", policy(), lazy.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    let err = Keyward::connect_with(
        "redis://127.0.0.1:1",
        policy(),
        lazy.clone().tls_ca_file("/nonexistent/ca.pem"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidUrl { .. }),
        "TLS material needs rediss://: {err:?}"
    );
    let err = Keyward::connect_with(
        "rediss://127.0.0.1:1",
        policy(),
        lazy.tls_ca_file("/nonexistent/ca.pem"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { what } if what.contains("/nonexistent/ca.pem")),
        "{err:?}"
    );
}

/// A handle that is not connected yet counts each call's fallback but reports the outage once (the
/// connecting task logs each attempt), as an open breaker does: no error counted, and so no warning
/// logged, per call. Before, every request on a never-connecting handle logged a warning and counted a
/// rate-limit store error (found by a fresh-user trial: 200 warnings for 200 requests).
#[test]
fn a_pending_handle_reports_its_outage_once_not_per_call() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The calls run on this thread (current-thread runtime), so the thread-local recorder sees them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let url = format!("redis://127.0.0.1:{}", free_port());
            let lazy = ConnectOptions::default()
                .lazy_connect()
                .response_timeout(RESPONSE_TIMEOUT);
            let kw = Keyward::connect_with(&url, policy(), lazy).await.unwrap();
            let limiter = kw.rate_limiter("login_allow").unwrap();
            let cache = kw.cache::<String>("article").unwrap();
            for i in 0..20 {
                assert!(limiter.check("u").await.unwrap().is_allowed());
                let v = cache
                    .get_or_set(&i, || async { Ok::<_, std::io::Error>("v".to_owned()) })
                    .await
                    .unwrap();
                assert_eq!(v, "v");
            }
            assert_eq!(cache.stats().fail_open, 20, "every cache call failed open");
        })
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let count = |name: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                DebugValue::Counter(v) => *v,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(
        count("keyward_ratelimit_fallback_total"),
        20,
        "every call fell back"
    );
    assert_eq!(
        count("keyward_ratelimit_errors_total"),
        0,
        "but no call counted an error"
    );
}
