//! Failures found by two adversarial reviews of the fault handling (issue #9), each reproduced against a real
//! `redis-server` (or the embedded store) and kept as a test: a release refused by the open breaker, a
//! waiter during a hang, an undo on a server whose script cache never saw it, a server that answers but
//! cannot serve (`READONLY`, `OOM`), a lock release that gave up before its lease ended, a kept-alive
//! idempotency lease that did not know it was lost, a lock waiter during a hang, and a rate-limit class
//! flooded past its embedded budget.

#![allow(unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward::idempotency::{Begin, fingerprint};
use keyward::lock::LockOptions;
use keyward::policy::{
    Algorithm, CacheClass, IdempotencyClass, LockClass, OnError, Policy, RateLimitClass,
};
use keyward::rate_limit::Source;
use keyward::{ConnectOptions, Keyward, MemoryOptions};
use keyward_testkit::{RedisServer, ServerOptions};

const RESPONSE: Duration = Duration::from_millis(250);

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn policy() -> Policy {
    let app = format!(
        "regr{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Policy::builder("test", app)
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests")
                .lease_ttl(Duration::from_secs(10))
                .loader_timeout(Duration::from_secs(9)),
        )
        .rate_limit(
            "open",
            RateLimitClass::new(Algorithm::Gcra, 1000, Duration::from_secs(3600))
                .on_error(OnError::Allow),
        )
        .lock(
            "job",
            LockClass::new(Duration::from_secs(1)).wait(Duration::ZERO),
        )
        .idempotency(
            "pay",
            IdempotencyClass::new().lease(Duration::from_millis(600)),
        )
        .build()
        .unwrap()
}

fn options(cooldown: Duration) -> ConnectOptions {
    ConnectOptions::default()
        .response_timeout(RESPONSE)
        .connect_timeout(RESPONSE)
        .breaker(3, cooldown)
}

async fn load(v: &str) -> Result<String, std::io::Error> {
    Ok(v.to_owned())
}

/// Polls the raw value of `key` until it is not a fill lease, for at most `within`.
async fn lease_gone(server: &RedisServer, key: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut c = server.connection();
    loop {
        let v: Option<String> = redis::cmd("GET").arg(key).query(&mut c).unwrap();
        if !v.as_deref().is_some_and(|v| v.starts_with("L1:")) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fill whose loader finishes while its handle's breaker is open: the commit is refused unsent, and so
/// was the lease's release, which left the lease for the rest of `lease_ttl` (8.5 s) although Redis was
/// back. The release must land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_refused_by_the_open_breaker_still_lands() {
    let mut server = RedisServer::spawn_tcp();
    let p = policy();
    let a = Keyward::connect_with(&server.url(), p.clone(), options(Duration::from_secs(5)))
        .await
        .unwrap();
    let ca = a.cache::<String>("product").unwrap();
    assert_eq!(ca.get_or_set("warm", || load("w")).await.unwrap(), "w");
    let key = ca.key("k").unwrap();
    let filler = tokio::spawn({
        let ca = ca.clone();
        async move {
            ca.get_or_set("k", || async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok::<_, std::io::Error>("filled".to_owned())
            })
            .await
        }
    });
    // The lease is taken once the key holds it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_gone(&server, &key, Duration::ZERO).await {
        assert!(Instant::now() < deadline, "the filler never took the lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.pause();
    let _ = tokio::join!(a.ping(), a.ping(), a.ping());
    assert_eq!(a.breaker_state(), keyward::rate_limit::BreakerState::Open);
    server.resume();
    // The loader's value still reaches its caller (fail open), and the lease does not outlive the outage.
    assert_eq!(filler.await.unwrap().unwrap(), "filled");
    assert!(
        lease_gone(&server, &key, Duration::from_secs(2)).await,
        "the lease was stranded on the server"
    );
}

/// A caller waiting for another handle's fill when Redis hangs: no wake-up can come, so it used to sleep
/// until the lease ran out (10 s). It looks again every response timeout, and fails open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_bounded_by_the_response_timeout_while_redis_hangs() {
    let mut server = RedisServer::spawn_tcp();
    let p = policy();
    let a = Keyward::connect_with(&server.url(), p.clone(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let b = Keyward::connect_with(&server.url(), p, options(Duration::from_secs(1)))
        .await
        .unwrap();
    let (ca, cb) = (
        a.cache::<String>("product").unwrap(),
        b.cache::<String>("product").unwrap(),
    );
    assert_eq!(ca.get_or_set("warm", || load("w")).await.unwrap(), "w");
    let key = ca.key("k").unwrap();
    let holder = tokio::spawn(async move {
        cb.get_or_set("k", || async {
            tokio::time::sleep(Duration::from_secs(6)).await;
            Ok::<_, std::io::Error>("b".to_owned())
        })
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_gone(&server, &key, Duration::ZERO).await {
        assert!(Instant::now() < deadline, "the holder never took the lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let got = ca.get_or_set("k", || load("a-fail-open")).await;
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.pause();
    let paused = Instant::now();
    let (got, _) = waiter.await.unwrap();
    let after_pause = paused.elapsed();
    server.resume();
    assert_eq!(got.unwrap(), "a-fail-open");
    eprintln!(
        "FAULT-FIGURE waiter_during_hang={}",
        after_pause.as_millis()
    );
    assert!(
        after_pause < Duration::from_secs(3),
        "the waiter slept through the hang: {after_pause:?}"
    );
    let _ = holder.await;
}

/// An undo is sent while the server hangs and runs when it resumes. `release.lua` is rarely run, so the
/// server's script cache may never have seen it: sent by SHA, the queued undo failed with `NOSCRIPT` and the
/// lease stayed. Undos are sent with the script's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_runs_on_a_server_whose_script_cache_never_saw_it() {
    let mut server = RedisServer::spawn_tcp();
    let kw = Keyward::connect_with(&server.url(), policy(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let cache = kw.cache::<String>("product").unwrap();
    assert_eq!(cache.get_or_set("warm", || load("w")).await.unwrap(), "w");
    let mut c = server.connection();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
    let key = cache.key("hung").unwrap();
    server.pause();
    // The fetch times out; its lease lands when the server resumes; the fetch fails open.
    assert_eq!(
        cache.get_or_set("hung", || load("fresh")).await.unwrap(),
        "fresh"
    );
    server.resume();
    assert!(
        lease_gone(&server, &key, Duration::from_secs(2)).await,
        "the undo did not run"
    );
}

/// A server that answers but cannot serve — demoted to a replica by a failover (`READONLY`), or full under
/// `noeviction` (`OOM`) — is unavailability: caches fail open and rate limits apply `on_error`, instead of
/// returning errors to every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_and_oom_are_unavailability() {
    // READONLY: the server we talk to became a replica.
    let server = RedisServer::spawn_tcp();
    let master = RedisServer::spawn_tcp();
    let kw = Keyward::connect_with(&server.url(), policy(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let cache = kw.cache::<String>("product").unwrap();
    let limiter = kw.rate_limiter("open").unwrap();
    assert_eq!(cache.get_or_set("warm", || load("w")).await.unwrap(), "w");
    let mut c = server.connection();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(master.tcp_port().unwrap())
        .query(&mut c)
        .unwrap();
    assert_eq!(
        cache.get_or_set("k", || load("fresh")).await.unwrap(),
        "fresh"
    );
    assert_eq!(
        limiter.check("id").await.unwrap().source(),
        Source::FailOpen
    );

    // OOM: a full server under noeviction refuses the rate limit's write.
    let server = RedisServer::spawn_tcp();
    let kw = Keyward::connect_with(&server.url(), policy(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let limiter = kw.rate_limiter("open").unwrap();
    let mut c = server.connection();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for (k, v) in [
        ("maxmemory", (used + 100_000).to_string()),
        ("maxmemory-policy", "noeviction".to_owned()),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query(&mut c)
            .unwrap();
    }
    let big = "x".repeat(10_000);
    for i in 0..100 {
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("junk{i}"))
            .arg(&big)
            .query(&mut c);
    }
    assert_eq!(
        limiter.check("id").await.unwrap().source(),
        Source::FailOpen
    );
}

/// A lock taken with a longer TTL than its class's, released while Redis is down: the release must keep
/// trying for as long as that lock can be on the server. It used to give up after the class's TTL, and a
/// server restarted from its append-only file then kept the lock for the rest of its 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_keeps_trying_as_long_as_its_lock_can_live() {
    let mut server = RedisServer::spawn_with(ServerOptions::default().tcp(true).args([
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]));
    let p = policy();
    let a = Keyward::connect_with(
        &server.url(),
        p.clone(),
        options(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let b = Keyward::connect_with(&server.url(), p, options(Duration::from_millis(200)))
        .await
        .unwrap();
    let guard = a
        .locks("job")
        .unwrap()
        .lock_with("nightly", LockOptions::new().ttl(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("free");
    server.kill();
    assert!(guard.release().await.is_err(), "Redis is down");
    // The outage outlasts the class's 1 s TTL; the server comes back with its data (AOF).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    let locks = b.locks("job").unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        if let Ok(Some(g)) = locks.try_lock("nightly").await {
            g.release().await.unwrap();
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released lock was still held after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `keep_alive` during a hang: renewals cannot reach Redis, the lease expires there and a retry elsewhere may
/// take over, so the holder must see `is_lost()` by the time its lease can be gone, not only when a renewal
/// finally reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_knows_it_may_be_lost_during_a_hang() {
    let mut server = RedisServer::spawn_tcp();
    let kw = Keyward::connect_with(&server.url(), policy(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let idem = kw.idempotency("pay").unwrap();
    let Begin::New(lease) = idem.begin("order-1", &fingerprint(&[b"x"])).await.unwrap() else {
        panic!("a fresh key");
    };
    let alive = idem.keep_alive(&lease);
    server.pause();
    let paused = Instant::now();
    while !alive.is_lost() {
        assert!(
            paused.elapsed() < Duration::from_secs(2),
            "a 600 ms lease not renewed for 2 s still looks held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.resume();
}

/// A lock waiter when Redis hangs: no release can wake it, so it used to sleep for its whole `wait` (8 s).
/// It looks again every response timeout and gives up fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waiter_is_bounded_while_redis_hangs() {
    let mut server = RedisServer::spawn_tcp();
    let p = policy();
    let a = Keyward::connect_with(&server.url(), p.clone(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let b = Keyward::connect_with(&server.url(), p, options(Duration::from_secs(1)))
        .await
        .unwrap();
    let _held = a
        .locks("job")
        .unwrap()
        .lock_with("res", LockOptions::new().ttl(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("free");
    let waiter = tokio::spawn(async move {
        b.locks("job")
            .unwrap()
            .lock_with("res", LockOptions::new().wait(Duration::from_secs(8)))
            .await
            .map(|g| g.is_some())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.pause();
    let paused = Instant::now();
    let got = waiter.await.unwrap();
    let took = paused.elapsed();
    server.resume();
    assert!(got.is_err(), "Redis hangs: {got:?}");
    assert!(
        took < Duration::from_secs(3),
        "the waiter slept through the hang: {took:?}"
    );
}

/// The embedded store, flooded with distinct identities past a rate-limit class's budget: the class's
/// `on_error` decides, as for Redis answering `OOM`, instead of every new client getting an error.
#[tokio::test]
async fn a_rate_limit_class_flooded_past_its_embedded_budget_applies_on_error() {
    let kw = Keyward::embedded_with(
        policy(),
        MemoryOptions::default().class_budget("open", 64 * 1024),
    );
    let limiter = kw.rate_limiter("open").unwrap();
    let mut fell_back = 0;
    for i in 0..2000 {
        let d = limiter
            .check(&format!("client-{i}"))
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(d.is_allowed());
        if d.source() == Source::FailOpen {
            fell_back += 1;
        }
    }
    assert!(fell_back > 0, "the 64 KiB budget never filled");
}
