//! Redis Cluster specifics, on real 3-master clusters (every conformance suite also runs on the shared one):
//!
//! - the staleness bound of a class invalidation, from another OS process, with the bump's push delivered and
//!   with it lost (the epochs written behind keyward's back): no read started later than the bound after the
//!   invalidation returned is served a value filled before it;
//! - a keyspace walk covers every primary;
//! - a master killed under load (cache, rate limit, lock loops) on a cluster with replicas: 0 wrong values,
//!   rate limits exact on keys whose master did not fail, every operation succeeds again after the failover;
//!   the longest call and the recovery time are printed.

#![allow(unreachable_pub)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common;
use keyward::policy::{Algorithm, CacheClass, LockClass, Policy, RateLimitClass};
use keyward::{ConnectOptions, Keyward};
use keyward_testkit::{ClusterOptions, RedisCluster};

const CHILD_URL: &str = "KEYWARD_TEST_CLUSTER_URL";
const CHILD_APP: &str = "KEYWARD_TEST_CLUSTER_APP";
/// The bound the staleness test configures.
const BOUND: Duration = Duration::from_millis(200);

fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .rate_limit(
            "exact",
            RateLimitClass::new(Algorithm::FixedWindow, 50, Duration::from_secs(86_400)),
        )
        .lock("job", LockClass::new(Duration::from_secs(2)))
        .build()
        .unwrap()
}

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

fn test_path(test: &str) -> String {
    match module_path!().split_once("::") {
        Some((_crate, module)) => format!("{module}::{test}"),
        None => test.to_owned(),
    }
}

fn spawn_child(test: &str, url: &str, app: &str) -> (Child, BufReader<ChildStdout>) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args([
            "--exact",
            &test_path(test),
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, url)
        .env(CHILD_APP, app)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("re-run the test binary as a child");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn expect_line(out: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "child exited before printing {prefix}");
        if let Some(at) = line.find(prefix) {
            return line[at..].trim().to_owned();
        }
    }
}

fn options() -> ConnectOptions {
    ConnectOptions::default().group_invalidation_bound(BOUND)
}

/// Bump a class epoch behind keyward's back, as a bump whose announcement was lost: `HSET` only, no publish.
fn silent_bump(con: &mut dyn redis::ConnectionLike, gens_key: &str, field: &str) {
    let current: Option<u64> = redis::cmd("HGET")
        .arg(gens_key)
        .arg(field)
        .query(con)
        .unwrap();
    let next = current.unwrap_or(0).saturating_add(1).max(now_us());
    let () = redis::cmd("HSET")
        .arg(gens_key)
        .arg(field)
        .arg(next)
        .query(con)
        .unwrap();
}

/// Rounds of: fill a value, let the child read it, invalidate the class (odd rounds through keyward, whose
/// bump announces itself; even rounds by writing the epoch behind keyward's back, as if the announcement were
/// lost). The child, another OS process, reads in a loop and reports when each read started and what it saw.
#[test]
fn group_invalidation_is_bounded_across_processes() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("stale{}", std::process::id());
    let (mut child, mut out) = spawn_child("child_reader", &url, &app);
    expect_line(&mut out, "READY");
    let mut raw = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_connection()
        .unwrap();
    let gens_key = format!("test:{app}:_kw:gens");
    const ROUNDS: u64 = 16;
    let invalidated: Vec<(u64, u64, bool)> = common::runtime().block_on(async {
        let kw = Keyward::connect_with(&url, policy(&app), options())
            .await
            .unwrap();
        let c = kw.cache::<String>("product").unwrap();
        let mut invalidated = Vec::new();
        for round in 0..ROUNDS {
            let value = format!("gen{round}");
            c.set("k", &value).await.unwrap();
            // Until the child has seen the value (it reads in a tight loop, so this is quick).
            let seen_at = Instant::now();
            loop {
                let line = expect_line(&mut out, "SAW ");
                if line == format!("SAW {value}") {
                    break;
                }
                assert!(
                    seen_at.elapsed() < Duration::from_secs(10),
                    "the child never saw {value}"
                );
            }
            let pushed = round % 2 == 1;
            if pushed {
                c.invalidate_all().await.unwrap();
            } else {
                silent_bump(&mut raw, &gens_key, "product");
            }
            invalidated.push((round, now_us(), pushed));
            // The next round's fill must be made under the new epoch: after a silent bump this handle learns
            // it only from its own refresh, within the bound.
            tokio::time::sleep(BOUND + Duration::from_millis(50)).await;
        }
        invalidated
    });
    writeln!(child.stdin.as_mut().unwrap(), "STOP").unwrap();
    let mut reads: Vec<(u64, String)> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
        let l = line.trim();
        if l.ends_with("DONE") {
            break;
        }
        if let Some(rest) = l.strip_prefix("R ") {
            let (at, v) = rest.split_once(' ').unwrap();
            reads.push((at.parse().unwrap(), v.to_owned()));
        }
    }
    assert!(child.wait().unwrap().success());
    let bound_us = u64::try_from(BOUND.as_micros()).unwrap();
    let mut worst = [0u64; 2];
    let mut violations = Vec::new();
    for (round, at, pushed) in &invalidated {
        let value = format!("gen{round}");
        for (started, v) in &reads {
            if *v == value && *started > *at {
                let late = started - at;
                worst[usize::from(*pushed)] = worst[usize::from(*pushed)].max(late);
                if late > bound_us {
                    violations.push(format!(
                        "round {round} ({}): a read started {late} µs after the invalidation returned saw {v}",
                        if *pushed { "pushed" } else { "push lost" }
                    ));
                }
            }
        }
    }
    println!(
        "group invalidation on Cluster, bound {BOUND:?}: {} reads by another process over {ROUNDS} rounds; \
         latest stale read started {} µs after an announced bump returned, {} µs after an unannounced one",
        reads.len(),
        worst[1],
        worst[0]
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    assert!(
        reads.len() > 100,
        "the child read in a loop: {}",
        reads.len()
    );
}

#[test]
#[ignore = "child process of group_invalidation_is_bounded_across_processes"]
fn child_reader() {
    let Some((url, app)) = std::env::var(CHILD_URL)
        .ok()
        .zip(std::env::var(CHILD_APP).ok())
    else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            stop.store(true, Ordering::SeqCst);
        });
    }
    common::runtime().block_on(async {
        let kw = Keyward::connect_with(&url, policy(&app), options())
            .await
            .unwrap();
        let c = kw.cache::<String>("product").unwrap();
        println!("READY");
        let mut reads = Vec::new();
        let mut last = None;
        while !stop.load(Ordering::SeqCst) {
            let started = now_us();
            let v = c.get("k").await.unwrap();
            if v != last {
                if let Some(v) = &v {
                    println!("SAW {v}");
                }
                last.clone_from(&v);
            }
            reads.push((started, v.unwrap_or_else(|| "-".to_owned())));
        }
        let mut out = std::io::stdout().lock();
        for (at, v) in reads {
            writeln!(out, "R {at} {v}").unwrap();
        }
        writeln!(out, "DONE").unwrap();
    });
}

/// `scan_namespace` walks every primary with its own cursor: it finds exactly the keys a raw walk of each node
/// finds, and they sit on all three primaries.
#[test]
fn keyspace_walk_covers_every_primary() {
    let cluster = RedisCluster::shared();
    let app = format!("walk{}", std::process::id());
    common::runtime().block_on(async {
        let kw = Keyward::connect(&cluster.seed_url(), policy(&app))
            .await
            .unwrap();
        let c = kw.cache::<u32>("product").unwrap();
        for i in 0..300u32 {
            c.set(&i, &i).await.unwrap();
        }
        let walked: HashSet<String> = kw
            .scan_namespace()
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        let mut per_node = Vec::new();
        let mut raw = HashSet::new();
        for url in cluster.urls() {
            let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
            let keys: Vec<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(format!("test:{app}:*"))
                .clone()
                .iter(&mut con)
                .unwrap()
                .map(|k: redis::RedisResult<String>| k.unwrap())
                .collect();
            per_node.push(keys.len());
            raw.extend(keys);
        }
        assert_eq!(walked, raw);
        assert!(walked.len() >= 300, "{}", walked.len());
        assert!(
            per_node.iter().filter(|n| **n > 0).count() >= 3,
            "keys on every primary: {per_node:?}"
        );
    });
}

/// What one loop of the failover test saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    wrong: AtomicUsize,
    /// The longest call, µs.
    longest_us: AtomicU64,
    /// When the last failed call ended (µs since the test's start).
    last_failure_us: AtomicU64,
}

impl Tally {
    fn record(&self, started: Instant, t0: Instant, ok: bool) {
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.longest_us.fetch_max(took, Ordering::Relaxed);
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let at = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.last_failure_us.fetch_max(at, Ordering::Relaxed);
        }
    }
}

/// A master is SIGKILLed while cache, rate-limit and lock loops run against a 3-master cluster with one
/// replica each. Nothing panics, no loop ever reads a wrong value, rate limits on keys whose master lived stay
/// exact, and every loop succeeds again after the replica is promoted. Prints the longest call and how long
/// after the kill the last failure happened.
#[test]
fn master_failover_under_load() {
    // With the default `cluster-require-full-coverage yes`, every node refuses every query (CLUSTERDOWN) from
    // the moment the dead master is flagged failing until its replica takes over; `no` lets the live masters
    // go on serving their slots (docs/operations.md).
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .replicas(1)
            .require_full_coverage(false),
    );
    let url = cluster.seed_url();
    let app = format!("failover{}", std::process::id());
    let rt = common::runtime();
    let kw = rt
        .block_on(Keyward::connect_with(
            &url,
            policy(&app),
            ConnectOptions::default().response_timeout(Duration::from_millis(500)),
        ))
        .unwrap();
    let cache = kw.cache::<String>("product").unwrap();
    let limiter = kw.rate_limiter("exact").unwrap();
    let locks = kw.locks("job").unwrap();
    // The victim: the master serving this cache key.
    let victim_key = cache.key("victim").unwrap();
    let victim_master = cluster.master_for_key(&victim_key).port;
    // Rate-limit identities whose master is not the victim: they must stay exact.
    let survivors: Vec<String> = (0..200)
        .map(|i| format!("id{i}"))
        // A rate-limit key's hash tag is its identity: `test:{app}:exact:v1:{id}`.
        .filter(|id| cluster.master_for_key(&format!("{{{id}}}")).port != victim_master)
        .take(6)
        .collect();
    assert_eq!(survivors.len(), 6);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
    let allowed: Arc<Vec<AtomicUsize>> = Arc::new((0..6).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    // Cache: values are a function of the id; any other value is wrong.
    for w in 0..4 {
        let (cache, stop, tally) = (cache.clone(), stop.clone(), tallies[0].clone());
        tasks.push(rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = if i.is_multiple_of(5) {
                    "victim".to_owned()
                } else {
                    format!("k{w}-{}", i % 50)
                };
                let started = Instant::now();
                let r = cache
                    .get_or_set(&id, || {
                        let id = id.clone();
                        async move { Ok::<_, std::io::Error>(format!("v-{id}")) }
                    })
                    .await;
                match r {
                    Ok(v) if v == format!("v-{id}") => tally.record(started, t0, true),
                    Ok(_) => {
                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => tally.record(started, t0, false),
                }
            }
        }));
    }
    // Rate limits: survivors' identities, 3 checks each per pass; limit 50 each.
    {
        let (limiter, stop, tally, allowed, survivors) = (
            limiter.clone(),
            stop.clone(),
            tallies[1].clone(),
            allowed.clone(),
            survivors.clone(),
        );
        tasks.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (i, id) in survivors.iter().enumerate() {
                    let started = Instant::now();
                    match limiter.check(id.as_str()).await {
                        Ok(d) => {
                            if d.is_allowed() {
                                allowed[i].fetch_add(1, Ordering::Relaxed);
                            }
                            tally.record(started, t0, true);
                        }
                        Err(_) => tally.record(started, t0, false),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Locks: acquire, fenced write, release.
    for w in 0..2 {
        let (locks, stop, tally) = (locks.clone(), stop.clone(), tallies[2].clone());
        tasks.push(rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("L{w}-{}", i % 20);
                let started = Instant::now();
                let r = async {
                    if let Some(g) = locks.try_lock(name.as_str()).await? {
                        g.release().await?;
                    }
                    Ok::<_, keyward::Error>(())
                }
                .await;
                tally.record(started, t0, r.is_ok());
            }
        }));
    }
    // Warm up, then kill the victim's master.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(800)).await });
    let killed_at = t0.elapsed();
    cluster.kill_master_of(&victim_key);
    let promoted = cluster.wait_for_failover(Duration::from_secs(30));
    let promoted_at = promoted.duration_since(t0);
    // Run on well past the promotion, then stop.
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(4)).await });
    // Every loop works again now: one more successful call each.
    rt.block_on(async {
        assert!(
            cache
                .get_or_set("victim", || async {
                    Ok::<_, std::io::Error>("v-victim".to_owned())
                })
                .await
                .is_ok()
        );
        assert!(limiter.peek(survivors[0].as_str()).await.is_ok());
        assert!(locks.try_lock("after").await.is_ok());
    });
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        rt.block_on(t).expect("no loop panicked");
    }
    let names = ["cache", "rate limit", "lock"];
    for (name, t) in names.iter().zip(&tallies) {
        let last = Duration::from_micros(t.last_failure_us.load(Ordering::Relaxed));
        println!(
            "failover: {name}: {} ok, {} failed, {} wrong; longest call {:?}; last failure {:?} after the kill \
             (promotion {:?} after the kill)",
            t.ok.load(Ordering::Relaxed),
            t.failed.load(Ordering::Relaxed),
            t.wrong.load(Ordering::Relaxed),
            Duration::from_micros(t.longest_us.load(Ordering::Relaxed)),
            last.saturating_sub(killed_at),
            promoted_at.saturating_sub(killed_at)
        );
        assert_eq!(t.wrong.load(Ordering::Relaxed), 0, "{name}: wrong values");
        assert!(t.ok.load(Ordering::Relaxed) > 0, "{name} ran");
    }
    assert_eq!(
        tallies[1].failed.load(Ordering::Relaxed),
        0,
        "rate limits on live masters never failed"
    );
    for (i, n) in allowed.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::Relaxed),
            50,
            "identity {} allowed exactly the limit",
            survivors[i]
        );
    }
}

/// Wake-ups on Cluster travel on the key's sharded channel: with a response timeout (and so a re-check
/// interval) of 60 s and a fill lease of 60 s, a cache waiter and a lock waiter in another handle can only
/// finish soon after the commit or release by being woken. The waiter's subscription exists while it waits and
/// is gone after.
#[test]
fn sharded_wake_ups_reach_waiters_in_other_handles() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("wake{}", std::process::id());
    let policy = Policy::builder("test", app.as_str())
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests").lease_ttl(Duration::from_secs(60)),
        )
        .lock(
            "job",
            LockClass::new(Duration::from_secs(60)).wait(Duration::from_secs(50)),
        )
        .build()
        .unwrap();
    let slow = ConnectOptions::default().response_timeout(Duration::from_secs(60));
    common::runtime().block_on(async {
        let a = Keyward::connect_with(&url, policy.clone(), slow.clone())
            .await
            .unwrap();
        let b = Keyward::connect_with(&url, policy, slow).await.unwrap();
        let (ca, cb) = (
            a.cache::<String>("product").unwrap(),
            b.cache::<String>("product").unwrap(),
        );
        let key = ca.key("k").unwrap();
        let channel = format!("test:{app}:_kw:fills:{{k}}");
        assert_eq!(
            ca.key("k").unwrap(),
            format!("test:{app}:product:v1:{{k}}"),
            "the channel carries the key's hash tag"
        );
        let started = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let holder = {
            let (started, release) = (started.clone(), release.clone());
            tokio::spawn(async move {
                ca.get_or_set("k", || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("from-a".to_owned())
                })
                .await
            })
        };
        started.notified().await;
        let waiter = tokio::spawn(async move {
            cb.get_or_set("k", || async {
                Ok::<_, std::io::Error>("from-b".to_owned())
            })
            .await
        });
        // Until the waiter has subscribed (a condition, polled; not a delay).
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::shard_subscribers(cluster, &channel) == 0 {
            assert!(
                Instant::now() < deadline,
                "the waiter never subscribed to {channel}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), "from-a");
        let got = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the waiter was woken by the commit, well before its 60 s re-check")
            .unwrap()
            .unwrap();
        assert_eq!(got, "from-a", "the waiter got the holder's value: {key}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::shard_subscribers(cluster, &channel) != 0 {
            assert!(
                Instant::now() < deadline,
                "the subscription outlived its waiters"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // A lock waiter in handle b, woken by a release in handle a.
        let (la, lb) = (a.locks("job").unwrap(), b.locks("job").unwrap());
        let guard = la.try_lock("x").await.unwrap().expect("free");
        let lock_channel = format!("test:{app}:_kw:fills:{{x}}");
        let waiter = tokio::spawn(async move { lb.lock("x").await });
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::shard_subscribers(cluster, &lock_channel) == 0 {
            assert!(
                Instant::now() < deadline,
                "the lock waiter never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(guard.release().await.unwrap());
        let got = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the lock waiter was woken by the release")
            .unwrap()
            .unwrap();
        assert!(got.is_some(), "the waiter got the lock");
    });
}

/// Wake-ups across a failover. A lock waiter subscribed on a primary that lives through another primary's
/// failover is still woken by a release afterwards (the client's topology refresh re-subscribes every node,
/// which must keep it); and a waiter on a lock of the failed primary's slots, made after the promotion, is
/// woken by a release on the promoted replica. Each waiter re-checks only every 60 s (its response timeout), so
/// only a wake-up ends its wait soon after the release.
#[test]
fn wake_ups_work_across_a_failover() {
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .replicas(1)
            .require_full_coverage(false),
    );
    let url = cluster.seed_url();
    let app = format!("wakefail{}", std::process::id());
    let policy = Policy::builder("test", app.as_str())
        .lock(
            "job",
            LockClass::new(Duration::from_secs(60)).wait(Duration::from_secs(55)),
        )
        .build()
        .unwrap();
    let slow = ConnectOptions::default().response_timeout(Duration::from_secs(60));
    let rt = common::runtime();
    let (a, b) = rt.block_on(async {
        (
            Keyward::connect_with(&url, policy.clone(), slow.clone())
                .await
                .unwrap(),
            Keyward::connect_with(&url, policy, slow).await.unwrap(),
        )
    });
    let (la, lb) = (a.locks("job").unwrap(), b.locks("job").unwrap());
    // `w` is on the primary that dies; `s`, on another one, survives.
    let w = rt.block_on(la.try_lock("w")).unwrap().expect("free");
    let victim = cluster.master_for_key(w.key());
    let survivor_name = (0..100)
        .map(|i| format!("s{i}"))
        .find(|n| cluster.master_for_key(&format!("{{{n}}}")).port != victim.port)
        .unwrap();
    let s = rt
        .block_on(la.try_lock(survivor_name.as_str()))
        .unwrap()
        .expect("free");
    let replica = cluster
        .nodes()
        .into_iter()
        .find(|n| n.master_id.as_deref() == Some(victim.id.as_str()))
        .expect("the victim has a replica");
    // The lock reached the replica (replication is asynchronous; this is a condition, polled).
    let mut on_replica = redis::Client::open(replica.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("READONLY").query(&mut on_replica).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis::cmd("EXISTS")
        .arg(w.key())
        .query::<bool>(&mut on_replica)
        .unwrap()
    {
        assert!(
            Instant::now() < deadline,
            "the lock never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let wait_subscribed = |cluster: &RedisCluster, channel: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::shard_subscribers(cluster, channel) == 0 {
            assert!(Instant::now() < deadline, "nobody subscribed to {channel}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let survivor_channel = format!("test:{app}:_kw:fills:{{{survivor_name}}}");
    let waiter_s = {
        let (lb, name) = (lb.clone(), survivor_name.clone());
        rt.spawn(async move { lb.lock(name.as_str()).await })
    };
    wait_subscribed(&cluster, &survivor_channel);

    cluster.kill_master_of(w.key());
    cluster.wait_for_failover(Duration::from_secs(30));

    // The survivor's waiter, subscribed before the failover, is woken by a release after it.
    rt.block_on(async {
        assert!(s.release().await.unwrap());
        let got = tokio::time::timeout(Duration::from_secs(20), waiter_s)
            .await
            .expect("the waiter on the surviving primary was woken after the failover")
            .unwrap()
            .expect("its wait never failed");
        assert!(got.is_some(), "the waiter got the lock");
    });

    // A waiter on the failed primary's slot, after the promotion: woken by the release there.
    rt.block_on(async {
        // Until handle b reaches the new primary (its client may still be learning the topology): the lock
        // reads as held there.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match lb.try_lock("w").await {
                Ok(held) => {
                    assert!(held.is_none(), "the promoted replica has the lock");
                    break;
                }
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the new primary never answered: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let waiter_w = {
        let lb = lb.clone();
        rt.spawn(async move { lb.lock("w").await })
    };
    wait_subscribed(&cluster, &format!("test:{app}:_kw:fills:{{w}}"));
    rt.block_on(async {
        assert!(w.release().await.unwrap(), "released on the new primary");
        let got = tokio::time::timeout(Duration::from_secs(20), waiter_w)
            .await
            .expect("the waiter was woken by the release on the new primary")
            .unwrap()
            .unwrap();
        assert!(got.is_some(), "the waiter got the lock");
    });
}

/// A handle connects while the primary holding the namespace's epochs is frozen (say, in its failover
/// window): its cache calls fail open (the loader answers) instead of serving from a view nobody vouches
/// for, and once the primary is back the cache works again. (Connecting used to fail: "cannot subscribe to the
/// epochs channel".)
#[test]
fn connects_while_the_epochs_primary_is_down_and_fails_open_until_it_is_back() {
    let mut cluster =
        RedisCluster::spawn_with(ClusterOptions::default().require_full_coverage(false));
    let app = format!("epochsdown{}", std::process::id());
    let gens_key = format!("test:{app}:_kw:gens");
    let epochs_primary = cluster.master_for_key(&gens_key).port;
    // An id whose entry lives on another primary (found before the pause: a frozen primary is soon flagged
    // failed, and the topology then names no master for its slots).
    let id = (0..100)
        .map(|i| format!("k{i}"))
        .find(|id| cluster.master_for_key(&format!("{{{id}}}")).port != epochs_primary)
        .unwrap();
    cluster.pause(epochs_primary);
    let rt = common::runtime();
    let options = ConnectOptions::default().response_timeout(Duration::from_millis(300));
    let kw = rt
        .block_on(Keyward::connect_with(
            &cluster.seed_url(),
            policy(&app),
            options,
        ))
        .expect("connects although the epochs' primary is frozen");
    let c = kw.cache::<String>("product").unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let load = || {
        let loads = loads.clone();
        async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("from-source".to_owned())
        }
    };
    rt.block_on(async {
        assert_eq!(
            c.get_or_set(id.as_str(), load).await.unwrap(),
            "from-source"
        );
        assert_eq!(
            c.get_or_set(id.as_str(), load).await.unwrap(),
            "from-source"
        );
    });
    assert_eq!(
        loads.load(Ordering::SeqCst),
        2,
        "failed open: nothing cached"
    );
    cluster.resume(epochs_primary);
    rt.block_on(async {
        // Until the view is vouched for again (a condition, polled): then a fill is cached and hit.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = loads.load(Ordering::SeqCst);
            c.get_or_set(id.as_str(), load).await.unwrap();
            c.get_or_set(id.as_str(), load).await.unwrap();
            if loads.load(Ordering::SeqCst) == before + 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the cache never worked again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// Bad connection set-ups are refused at connect with an error that says what to do: a plain URL given for a
/// cluster node (it used to connect, then fail every call of other nodes' slots with `CrossSlot`), and a user
/// name without a password (it used to log in as `default`, bypassing the intended ACL user).
#[test]
fn misconfigured_urls_are_refused_at_connect() {
    let cluster = RedisCluster::shared();
    let rt = common::runtime();
    let plain = cluster.urls()[0].clone();
    let err = rt
        .block_on(Keyward::connect(&plain, policy("plain")))
        .unwrap_err();
    assert!(
        matches!(err, keyward::Error::Connect { .. })
            && err.to_string().contains("redis+cluster://"),
        "{err}"
    );
    let port = cluster.ports()[0];
    for url in [
        format!("redis://someuser@127.0.0.1:{port}"),
        format!("redis+cluster://someuser@127.0.0.1:{port}"),
    ] {
        let err = rt
            .block_on(Keyward::connect(&url, policy("nopw")))
            .unwrap_err();
        assert!(
            matches!(err, keyward::Error::InvalidUrl { .. })
                && err.to_string().contains("without a password"),
            "{url}: {err}"
        );
    }
    let err = rt
        .block_on(Keyward::connect_with(
            &format!("redis+cluster://127.0.0.1:{port}"),
            policy("tls"),
            ConnectOptions::default().tls_ca_pem(b"not used".to_vec()),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("rediss+cluster://"), "{err}");
}

/// With the default `cluster-require-full-coverage yes`, once a dead primary is flagged failing every node
/// answers `CLUSTERDOWN`: a call then fails with that reply, promptly, not as a timeout after redis-rs's retry
/// waits (it used to report "did not answer within" the response timeout, naming a live node).
#[test]
fn clusterdown_is_reported_as_itself_and_promptly() {
    let mut cluster = RedisCluster::spawn();
    let app = format!("down{}", std::process::id());
    let rt = common::runtime();
    let kw = rt
        .block_on(Keyward::connect_with(
            &cluster.seed_url(),
            policy(&app),
            ConnectOptions::default().response_timeout(Duration::from_secs(5)),
        ))
        .unwrap();
    let locks = kw.locks("job").unwrap();
    let dead = cluster.master_for_key("{a}").port;
    let live = (0..100)
        .map(|i| format!("n{i}"))
        .find(|n| cluster.master_for_key(&format!("{{{n}}}")).port != dead)
        .unwrap();
    cluster.kill_node(dead);
    // Until the live primary says the cluster is down (a condition, polled).
    let live_port = cluster.master_for_key(&format!("{{{live}}}")).port;
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{live_port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
        if info.contains("cluster_state:fail") {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster never went down");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let err = rt.block_on(locks.try_lock(live.as_str())).unwrap_err();
    let took = started.elapsed();
    assert!(
        err.to_string().contains("CLUSTERDOWN") || err.to_string().contains("ClusterDown"),
        "{err}"
    );
    assert!(err.is_unavailable(), "{err}");
    println!("CLUSTERDOWN reported after {took:?} (response timeout 5 s)");
}
