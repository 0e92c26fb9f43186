//! When Redis fails mid-run: each class's `on_error` applies, the circuit breaker opens so requests stop
//! paying a timeout, a probe closes it once Redis answers again, and nothing panics.

#![allow(unreachable_pub)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::policy::{Algorithm, OnError, Policy, RateLimitClass};
use keyward::rate_limit::{BreakerState, Source};
use keyward::{ConnectOptions, Keyward};
use keyward_testkit::RedisServer;
use tokio::sync::Barrier;

const HOUR: Duration = Duration::from_secs(3600);

fn policy() -> Policy {
    let class = |on_error| RateLimitClass::new(Algorithm::Gcra, 3, HOUR).on_error(on_error);
    Policy::builder("test", "failures")
        .rate_limit("open", class(OnError::Allow))
        .rate_limit("closed", class(OnError::Deny))
        .rate_limit("local", class(OnError::Local))
        .build()
        .unwrap()
}

fn signal(server: &RedisServer, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_modes_and_the_breaker() {
    let mut server = RedisServer::spawn();
    let options = ConnectOptions::default()
        .response_timeout(Duration::from_millis(200))
        .breaker(3, Duration::from_millis(500));
    let kw = Keyward::connect_with(&server.url(), policy(), options)
        .await
        .unwrap();
    let open = kw.rate_limiter("open").unwrap();
    let closed = kw.rate_limiter("closed").unwrap();
    let local = kw.rate_limiter("local").unwrap();

    for l in [&open, &closed, &local] {
        let d = l.check("warm").await.unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.source(), Source::Store);
    }
    assert_eq!(kw.breaker_state(), BreakerState::Closed);

    // A hung server: calls time out, then the breaker opens.
    signal(&server, "-STOP");
    for i in 0..3 {
        let d = open.check(&format!("hung{i}")).await.unwrap();
        assert!(d.is_allowed(), "on_error = allow");
        assert_eq!(d.source(), Source::FailOpen);
    }
    assert_eq!(kw.breaker_state(), BreakerState::Open);
    let d = closed.check("x").await.unwrap();
    assert!(d.is_limited(), "on_error = deny");
    assert_eq!(d.source(), Source::FailClosed);
    assert!(d.retry_after().is_some());
    // The local fallback enforces the same limit in process.
    let mut allowed = 0;
    for _ in 0..10 {
        let d = local.check("y").await.unwrap();
        assert_eq!(d.source(), Source::LocalFallback);
        allowed += usize::from(d.is_allowed());
    }
    assert_eq!(
        allowed, 3,
        "the in-process limiter applies the class's numbers"
    );

    // The server comes back: after the cooldown one probe goes through and closes the breaker.
    signal(&server, "-CONT");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = open.check("back").await.unwrap();
        if d.source() == Source::Store {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kw.breaker_state(), BreakerState::Closed);
    assert_eq!(local.check("warm").await.unwrap().source(), Source::Store);

    // The server dies: every mode still answers, nothing panics.
    server.kill();
    for i in 0..6 {
        let o = open.check(&format!("dead{i}")).await.unwrap();
        assert!(o.is_allowed() && o.source() == Source::FailOpen);
        let c = closed.check("dead").await.unwrap();
        assert!(c.is_limited() && c.source() == Source::FailClosed);
        let l = local.check("dead").await.unwrap();
        assert_eq!(l.source(), Source::LocalFallback);
    }
    assert_eq!(kw.breaker_state(), BreakerState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strictest_on_error_of_a_group_applies() {
    let mut server = RedisServer::spawn();
    let options = ConnectOptions::default()
        .response_timeout(Duration::from_millis(200))
        .breaker(1, Duration::from_secs(60));
    let kw = Keyward::connect_with(&server.url(), policy(), options)
        .await
        .unwrap();
    server.kill();
    let g = kw.rate_limiter_group(&["open", "closed"]).unwrap();
    assert_eq!(g.check("a").await.unwrap().source(), Source::FailClosed);
    let g = kw.rate_limiter_group(&["open", "local"]).unwrap();
    assert_eq!(g.check("a").await.unwrap().source(), Source::LocalFallback);
}

/// Concurrent checks share script calls (auto-batching), and a check may queue behind calls in flight. With
/// the server hung, every check still answers within the response timeout (plus scheduling), per its
/// `on_error`: none waits for the calls ahead of it *and* its own. (Before the queue was bounded too, the
/// checks queued behind two hung calls took two timeouts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_queued_behind_hung_calls_is_bounded_by_the_response_timeout() {
    let server = RedisServer::spawn();
    let timeout = Duration::from_secs(1);
    // A breaker that does not open during the test: every check waits on the hung server.
    let options = ConnectOptions::default()
        .response_timeout(timeout)
        .breaker(100_000, Duration::from_secs(60));
    let kw = Keyward::connect_with(&server.url(), policy(), options)
        .await
        .unwrap();
    let open = kw.rate_limiter("open").unwrap();
    assert_eq!(open.check("warm").await.unwrap().source(), Source::Store);

    signal(&server, "-STOP");
    let mut tasks = Vec::new();
    for i in 0..64 {
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            let start = std::time::Instant::now();
            let d = open.check(&format!("hung{i}")).await.unwrap();
            (d.source(), start.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (source, took) = t.await.unwrap();
        assert_eq!(source, Source::FailOpen);
        slowest = slowest.max(took);
    }
    signal(&server, "-CONT");
    // Two timeouts is what a check queued behind the calls in flight took before; one plus scheduling now.
    assert!(
        slowest < timeout + timeout / 2,
        "the slowest of 64 concurrent checks took {slowest:?} with a {timeout:?} response timeout"
    );
}

/// Redis Cluster, one master stalled (SIGSTOP) while many checks race (so that they are batched, one script
/// call per slot): checks of identities whose keys live on the healthy masters are answered by the store
/// before the stalled master's checks time out (a lone check to a healthy master never waited for another
/// master), and those on the stalled master end, per their `on_error`, within about the response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_master_does_not_hold_back_checks_on_healthy_masters() {
    const IDS: usize = 48;
    let mut cluster = keyward_testkit::RedisCluster::spawn();
    let timeout = Duration::from_secs(2);
    // A breaker that does not open during the test: each stalled check waits for its own call.
    let options = ConnectOptions::default()
        .response_timeout(timeout)
        .breaker(100_000, Duration::from_secs(60));
    let policy = Policy::builder("test", "stalled-master")
        .rate_limit(
            "open",
            RateLimitClass::new(Algorithm::Gcra, 1_000, HOUR).on_error(OnError::Allow),
        )
        .build()
        .unwrap();
    let kw = Keyward::connect_with(&cluster.seed_url(), policy, options)
        .await
        .unwrap();
    let open = kw.rate_limiter("open").unwrap();
    let ids: Vec<String> = (0..IDS).map(|i| format!("user-{i}")).collect();
    // Each identity's keys carry it as their hash tag. One check each first: every master has the script
    // and a connection.
    let master = |id: &str| cluster.master_for_key(&format!("{{{id}}}")).port;
    for id in &ids {
        assert_eq!(open.check(id).await.unwrap().source(), Source::Store);
    }
    let stalled = master(&ids[0]);
    let on_stalled: Vec<bool> = ids.iter().map(|id| master(id) == stalled).collect();
    let healthy = on_stalled.iter().filter(|s| !**s).count();
    assert!(healthy > IDS / 3 && healthy < IDS, "{healthy} of {IDS}");

    let start = Arc::new(Barrier::new(IDS + 1));
    let mut tasks = Vec::new();
    for id in ids.iter().cloned() {
        let (open, start) = (open.clone(), Arc::clone(&start));
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let d = open.check(&id).await.unwrap();
            (id, d.source(), Instant::now())
        }));
    }
    cluster.pause(stalled);
    let started = Instant::now();
    start.wait().await;
    // Bounded, so that a hung check fails the test instead of hanging it.
    let answers = tokio::time::timeout(3 * timeout, futures_util::future::join_all(tasks)).await;
    cluster.resume(stalled);
    let answers = answers.expect("checks hung");

    let (mut healthy_done, mut stalled_first, mut stalled_last) = (Vec::new(), None, None);
    for ((id, source, at), on_stalled) in answers.into_iter().map(Result::unwrap).zip(&on_stalled) {
        let took = at.saturating_duration_since(started);
        if *on_stalled {
            assert_eq!(source, Source::FailOpen, "{id} (stalled master)");
            stalled_first = Some(stalled_first.map_or(took, |t: Duration| t.min(took)));
            stalled_last = Some(stalled_last.map_or(took, |t: Duration| t.max(took)));
        } else {
            healthy_done.push((took, source, id));
        }
    }
    let (stalled_first, stalled_last) = (stalled_first.unwrap(), stalled_last.unwrap());
    healthy_done.sort_by_key(|(took, ..)| *took);
    // Held back: answered after the first stalled check timed out (or after half the response timeout), or
    // not by the store (its wait ran out).
    let late: Vec<_> = healthy_done
        .iter()
        .filter(|(took, source, _)| {
            *took >= stalled_first.min(timeout / 2) || *source != Source::Store
        })
        .collect();
    assert!(
        late.is_empty(),
        "{} of {healthy} checks on healthy masters waited for the stalled one (first stalled check ended \
         after {stalled_first:?}, response timeout {timeout:?}): {late:?}",
        late.len()
    );
    assert!(
        stalled_last < timeout + timeout / 2,
        "the slowest check on the stalled master took {stalled_last:?} (response timeout {timeout:?})"
    );
}

/// A handle used from a second runtime (a worker's own runtime, a test's) that shuts down while two of its
/// checks are under way, each polled once: the batch task the second check started on that runtime never
/// runs. The handle must go on deciding checks on the store from the runtime that is still up; it must not
/// count that task as a batch in flight for ever (then, once two had gone so, every later check would queue
/// behind calls that never come, wait the whole response timeout and take the `on_error` path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_shut_down_with_checks_under_way_does_not_wedge_the_handle() {
    let server = RedisServer::spawn();
    let options = ConnectOptions::default().response_timeout(Duration::from_secs(1));
    let kw = Keyward::connect_with(&server.url(), policy(), options)
        .await
        .unwrap();
    let open = kw.rate_limiter("open").unwrap();
    assert_eq!(open.check("warm").await.unwrap().source(), Source::Store);

    // Stalled meanwhile, so that no check of the second runtime is answered before it shuts down.
    signal(&server, "-STOP");
    for round in 0..2 {
        let open = open.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (a, b) = (open.check("a"), open.check("b"));
                tokio::pin!(a, b);
                // Each polled once: under way (a call sent, or queued for a batch), not answered yet.
                let pa = futures_util::poll!(&mut a);
                let pb = futures_util::poll!(&mut b);
                assert!(
                    pa.is_pending() && pb.is_pending(),
                    "round {round}: {pa:?} {pb:?}"
                );
            });
            // The runtime shuts down here, dropping the tasks spawned on it.
        })
        .join()
        .unwrap();
    }
    signal(&server, "-CONT");

    // Alone, and several at once (batched).
    assert_eq!(open.check("c").await.unwrap().source(), Source::Store);
    let checks = (0..8).map(|i| {
        let open = open.clone();
        async move { open.check(&format!("d{i}")).await.unwrap().source() }
    });
    let sources = futures_util::future::join_all(checks).await;
    assert!(sources.iter().all(|s| *s == Source::Store), "{sources:?}");
}
