//! Redis Cluster under faults and bad data, each case a bug an adversarial review found (each failed before its
//! fix): corrupt, out-of-range and wrong-type group epochs must not resurrect invalidated entries or break the
//! namespace; a frozen primary must not stall calls to the others, not even a first script call (`NOSCRIPT`),
//! nor keep a handle from connecting; cancelled waiters leave no subscription behind; a caller sharing another
//! caller's fetch is still held to the invalidation bound. Also: many waiters, watch/unwatch races, the undo of a
//! timed-out fetch, and odd URLs (no panic, no secret). The few sleeps create the races under test (a fetch in
//! flight while a primary is frozen, the bound passing); they do not wait for results.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common;
use keyward::policy::{CacheClass, LockClass, Policy};
use keyward::{ConnectOptions, Keyward};
use keyward_testkit::{ClusterOptions, RedisCluster};

fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .cache(
            "slow",
            CacheClass::new(Duration::from_secs(60), "tests")
                .lease_ttl(Duration::from_secs(30))
                .loader_timeout(Duration::from_secs(20)),
        )
        .lock(
            "job",
            LockClass::new(Duration::from_secs(30)).wait(Duration::from_secs(25)),
        )
        .build()
        .unwrap()
}

fn raw(cluster: &RedisCluster) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_connection()
        .unwrap()
}

const BOUND: Duration = Duration::from_millis(200);

fn opts() -> ConnectOptions {
    ConnectOptions::default().group_invalidation_bound(BOUND)
}

/// A corrupt namespace epoch (`*` = "garbage") on Cluster: a handle that starts after the corruption reads
/// `*` as 0 and serves an entry filled *before* the last `invalidate_namespace`. On one server the scripts
/// re-bump a corrupt field (so such entries read as misses).
#[test]
fn a_corrupt_epoch_field_is_repaired_not_read_as_zero() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("brk_corrupt{}", std::process::id());
    let rt = common::runtime();
    rt.block_on(async {
        let a = Keyward::connect_with(&url, policy(&app), opts())
            .await
            .unwrap();
        let ca = a.cache::<String>("product").unwrap();
        ca.set("k", &"old".to_owned()).await.unwrap();
        a.invalidate_namespace().await.unwrap();
        assert_eq!(ca.get("k").await.unwrap(), None, "invalidated");
        // The field gets corrupted behind keyward's back.
        let mut r = raw(cluster);
        let () = redis::cmd("HSET")
            .arg(format!("test:{app}:_kw:gens"))
            .arg("*")
            .arg("garbage")
            .query(&mut r)
            .unwrap();
        tokio::time::sleep(BOUND * 2).await;
        assert_eq!(ca.get("k").await.unwrap(), None, "old handle still misses");
        let b = Keyward::connect_with(&url, policy(&app), opts())
            .await
            .unwrap();
        let cb = b.cache::<String>("product").unwrap();
        assert_eq!(
            cb.get("k").await.unwrap(),
            None,
            "a new handle serves the entry filled before invalidate_namespace"
        );
    });
}

/// The epochs key of the wrong type on Cluster. On one server a wrong-type epochs key is re-bumped in place
/// (documented: "a corrupt or wrong-type epoch is re-bumped in place"); on Cluster every cache call of the
/// namespace fails with WRONGTYPE (even with on_error = fail_open) and new handles cannot connect.
#[test]
fn an_epochs_key_of_the_wrong_type_is_repaired() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("brk_wrongtype{}", std::process::id());
    let rt = common::runtime();
    rt.block_on(async {
        let a = Keyward::connect_with(&url, policy(&app), opts())
            .await
            .unwrap();
        let ca = a.cache::<String>("product").unwrap();
        ca.set("k", &"v".to_owned()).await.unwrap();
        let mut r = raw(cluster);
        let gens = format!("test:{app}:_kw:gens");
        let () = redis::cmd("DEL").arg(&gens).query(&mut r).unwrap();
        let () = redis::cmd("SET").arg(&gens).arg("x").query(&mut r).unwrap();
        tokio::time::sleep(BOUND * 2).await;
        let got = ca
            .get_or_set("k2", || async {
                Ok::<_, std::io::Error>("loaded".to_owned())
            })
            .await;
        let b = Keyward::connect_with(&url, policy(&app), opts()).await;
        let b_err = b.as_ref().err().map(|e| e.to_string());
        println!("NEW HANDLE: {b_err:?}");
        assert!(got.is_ok(), "get_or_set on an existing handle: {got:?}");
        assert!(b_err.is_none(), "new handle: {b_err:?}");
    });
}

/// A primary frozen with SIGSTOP: calls to keys on the *other* primaries must neither fail nor wait.
/// Measures, per call on a live primary, the latency and failures while the paused primary's keys are also
/// being hit (opening its breaker).
#[test]
fn paused_primary_does_not_stall_the_others() {
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .node_timeout(Duration::from_millis(3000))
            .require_full_coverage(false),
    );
    let url = cluster.seed_url();
    let app = format!("brk_pause{}", std::process::id());
    let rt = common::runtime();
    let kw = rt
        .block_on(Keyward::connect_with(
            &url,
            policy(&app),
            opts().response_timeout(Duration::from_millis(300)),
        ))
        .unwrap();
    let cache = kw.cache::<String>("product").unwrap();
    // The epochs must live elsewhere for this test to be about breakers: a victim on another primary.
    let gens_master = cluster.master_for_key(&format!("test:{app}:_kw:gens"));
    let victim_id = (0..100)
        .map(|i| format!("victim{i}"))
        .find(|id| {
            cluster
                .master_for_key(&cache.key(id.as_str()).unwrap())
                .port
                != gens_master.port
        })
        .unwrap();
    let victim = cluster.master_for_key(&cache.key(victim_id.as_str()).unwrap());
    let live: Vec<String> = (0..200)
        .map(|i| format!("l{i}"))
        .filter(|id| {
            cluster
                .master_for_key(&cache.key(id.as_str()).unwrap())
                .port
                != victim.port
        })
        .take(20)
        .collect();
    rt.block_on(async {
        for id in &live {
            cache.set(id.as_str(), id).await.unwrap();
        }
        // Warm the read script on every primary (NOSCRIPT is the subject of another test).
        for id in [victim_id.as_str()]
            .iter()
            .map(|s| s.to_string())
            .chain(live.iter().cloned())
        {
            let _ = cache.get(id.as_str()).await.unwrap();
        }
    });
    cluster.pause(victim.port);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let victim_task = {
        let (cache, stop) = (cache.clone(), stop.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = cache.get(victim_id.as_str()).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (worst, failures, n, states) = rt.block_on(async {
        let s = Instant::now();
        let p = kw.ping().await;
        println!(
            "ping with one primary paused: {:?} after {:?}",
            p.map_err(|e| e.to_string()),
            s.elapsed()
        );
        let t0 = Instant::now();
        let mut worst = Duration::ZERO;
        let mut failures = Vec::new();
        let mut n = 0;
        let mut states = std::collections::BTreeSet::new();
        while t0.elapsed() < Duration::from_secs(5) {
            for id in &live {
                let s = Instant::now();
                let r = cache.get(id.as_str()).await;
                let took = s.elapsed();
                n += 1;
                if took > worst {
                    worst = took;
                }
                match r {
                    Ok(Some(v)) if &v == id => {}
                    other => failures.push(format!("{id} at {:?}: {other:?}", t0.elapsed())),
                }
            }
            states.insert(format!("{:?}", kw.breaker_state()));
        }
        (worst, failures, n, states)
    });
    stop.store(true, Ordering::SeqCst);
    rt.block_on(victim_task).unwrap();
    cluster.resume(victim.port);
    println!(
        "paused primary: {n} calls to live primaries, worst {worst:?}, {} failures: {:?}; breaker states seen {states:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        states.contains("Open"),
        "breaker_state reports the paused primary: {states:?}"
    );
}

/// Cache waiters cancelled (their future dropped, as by a caller's own timeout) while they wait for another
/// handle's fill: once the fill committed and every waiter is gone, nobody is subscribed any more.
#[test]
fn cancelled_waiters_leave_no_subscription() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("brk_cancel{}", std::process::id());
    let rt = common::runtime();
    rt.block_on(async {
        let slow = opts().response_timeout(Duration::from_secs(30));
        let a = Keyward::connect_with(&url, policy(&app), slow.clone())
            .await
            .unwrap();
        let b = Keyward::connect_with(&url, policy(&app), slow)
            .await
            .unwrap();
        let (ca, cb) = (
            a.cache::<String>("slow").unwrap(),
            b.cache::<String>("slow").unwrap(),
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
        let channel = format!("test:{app}:_kw:fills:{{k}}");
        // Many waiters, each aborted after a different short busy-wait (µs resolution, unlike timers).
        let mut leaked_at = None;
        for i in 0..600u64 {
            let cb = cb.clone();
            let h = tokio::spawn(async move {
                cb.get_or_set("k", || async {
                    Ok::<_, std::io::Error>("from-b".to_owned())
                })
                .await
            });
            let spin = Duration::from_micros(20 + (i * 13) % 4000);
            let s = std::time::Instant::now();
            while s.elapsed() < spin {
                std::hint::spin_loop();
            }
            h.abort();
            let _ = h.await;
            if leaked_at.is_none() && i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if common::shard_subscribers(cluster, &channel) > 0 {
                    leaked_at = Some(i);
                }
            }
        }
        println!("subscribed with no waiter left, first seen after waiter {leaked_at:?}");
        release.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), "from-a");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut n = common::shard_subscribers(cluster, &channel);
        while n != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            n = common::shard_subscribers(cluster, &channel);
        }
        assert_eq!(
            n, 0,
            "a cancelled waiter's subscription outlived every waiter"
        );
        // And a later waiter is still woken by the commit (its re-check comes only every 30 s).
        let ca = a.cache::<String>("slow").unwrap();
        let cb = b.cache::<String>("slow").unwrap();
        let started = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let holder = {
            let (started, release) = (started.clone(), release.clone());
            tokio::spawn(async move {
                ca.get_or_set("k2", || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("from-a".to_owned())
                })
                .await
            })
        };
        started.notified().await;
        let waiter = tokio::spawn(async move {
            cb.get_or_set("k2", || async {
                Ok::<_, std::io::Error>("from-b".to_owned())
            })
            .await
        });
        let channel2 = format!("test:{app}:_kw:fills:{{k2}}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::shard_subscribers(cluster, &channel2) == 0 {
            assert!(
                Instant::now() < deadline,
                "the later waiter never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), "from-a");
        let got = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the later waiter was woken by the commit")
            .unwrap()
            .unwrap();
        assert_eq!(got, "from-a");
    });
}

/// How a primary is taken away in [`first_script_calls_with_a_primary`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// `SIGSTOP`: it accepts connections and never answers.
    Frozen,
    /// `SIGKILL`: connections are refused.
    Dead,
}

/// A process that starts (and so first uses each script) while one primary is frozen or dead: its calls to keys
/// on the *live* primaries must not fail (each is bounded by a 300 ms response timeout, so one that waited for
/// the missing primary would). Scripts that meet `NOSCRIPT` used to be loaded with `SCRIPT LOAD`, which redis-rs
/// sends to every primary, the missing one included.
fn first_script_calls_with_a_primary(gone: Gone) {
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .node_timeout(Duration::from_millis(30000))
            .require_full_coverage(false),
    );
    let url = cluster.seed_url();
    let app = format!(
        "brk_noscript{}{}",
        u8::from(gone == Gone::Dead),
        std::process::id()
    );
    let rt = common::runtime();
    let probe_kw = rt.block_on(Keyward::connect(&url, policy(&app))).unwrap();
    let probe = probe_kw.cache::<String>("product").unwrap();
    let gens_master = cluster.master_for_key(&format!("test:{app}:_kw:gens"));
    let victim = (0..200)
        .map(|i| cluster.master_for_key(&probe.key(&format!("v{i}")).unwrap()))
        .find(|m| m.port != gens_master.port)
        .unwrap();
    let live: Vec<String> = (0..200)
        .map(|i| format!("l{i}"))
        .filter(|id| {
            cluster
                .master_for_key(&probe.key(id.as_str()).unwrap())
                .port
                != victim.port
        })
        .take(4)
        .collect();
    drop(probe_kw);
    let kw = rt
        .block_on(Keyward::connect_with(
            &url,
            policy(&app),
            opts().response_timeout(Duration::from_millis(300)),
        ))
        .unwrap();
    match gone {
        Gone::Frozen => cluster.pause(victim.port),
        Gone::Dead => cluster.kill_node(victim.port),
    }
    rt.block_on(async {
        let cache = kw.cache::<String>("product").unwrap();
        let locks = kw.locks("job").unwrap();
        let mut report = Vec::new();
        for id in &live {
            let r1 = cache.set(id.as_str(), id).await.map_err(|e| e.to_string());
            let r2 = cache.get(id.as_str()).await.map_err(|e| e.to_string());
            let r3 = locks
                .try_lock(id.as_str())
                .await
                .map(|g| g.is_some())
                .map_err(|e| e.to_string());
            report.push(format!(
                "{id}: set {r1:?}; get {r2:?}; try_lock {r3:?}; breaker {:?}",
                kw.breaker_state()
            ));
        }
        let joined = report.join("\n");
        assert!(
            !joined.contains("Err") && !joined.contains("None"),
            "calls to live primaries failed:\n{joined}"
        );
    });
    if gone == Gone::Frozen {
        cluster.resume(victim.port);
    }
}

#[test]
fn a_first_script_call_does_not_wait_for_a_frozen_primary() {
    first_script_calls_with_a_primary(Gone::Frozen);
}

#[test]
fn a_first_script_call_does_not_wait_for_a_dead_primary() {
    first_script_calls_with_a_primary(Gone::Dead);
}

/// A new process connecting while one primary is frozen (a blackholed host, before or after the cluster
/// flags it failed): "any reachable seed is enough", and the other primaries serve.
#[test]
fn a_handle_connects_while_a_primary_is_frozen() {
    let mut cluster =
        RedisCluster::spawn_with(ClusterOptions::default().require_full_coverage(false));
    let url = cluster.seed_url();
    let app = format!("brk_conn{}", std::process::id());
    let gens_master = cluster.master_for_key(&format!("test:{app}:_kw:gens"));
    // Pause the *last* seed (so the probe succeeds on the first), not the epochs' primary.
    let victim = *cluster
        .ports()
        .iter()
        .rev()
        .find(|p| **p != gens_master.port)
        .unwrap();
    cluster.pause(victim);
    // Until the others flag it failed (node timeout 1 s): a condition, polled.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.nodes().iter().any(|n| n.port == victim && n.failed) {
        assert!(Instant::now() < deadline, "never flagged failed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = common::runtime();
    let s = Instant::now();
    let r = rt.block_on(Keyward::connect_with(
        &url,
        policy(&app),
        opts().response_timeout(Duration::from_millis(300)),
    ));
    println!(
        "connect with a paused (failed-flagged) primary: {:?} after {:?}",
        r.as_ref().map(|_| ()).map_err(|e| e.to_string()),
        s.elapsed()
    );
    cluster.resume(victim);
    assert!(r.is_ok());
}

#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
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

/// Odd Cluster and Sentinel URLs: no panic, and no secret (as written or percent-decoded) in the error,
/// its Debug, or any log line (trace level, redis-rs included).
#[test]
fn odd_urls_neither_panic_nor_leak() {
    let cluster = RedisCluster::shared();
    let live = cluster.ports()[0];
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "redis+cluster://u:S3cr3tPw@[::1]:1".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3tPw@[::1]".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3tPw@::1:7000".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3%63r3tPw@127.0.0.1:1".to_owned(),
            vec!["S3%63r3tPw", "S3cr3tPw"],
        ),
        (
            "redis+cluster://:S3cr3tPw@127.0.0.1:1/5".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3tPw@127.0.0.1:1,,x".to_owned(),
            vec!["S3cr3tPw"],
        ),
        ("redis+cluster://u:S3cr3tPw@".to_owned(), vec!["S3cr3tPw"]),
        (
            "redis+cluster://u:S3cr3tPw@127.0.0.1:99999".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://127.0.0.1:1?password=S3cr3tPw".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://127.0.0.1:{live}?password=S3cr3tPw"),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3tPw@127.0.0.1:1/#frag".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "rediss+cluster://u:S3cr3tPw@127.0.0.1:1".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3tPw@héllo:1".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3t@Pw@127.0.0.1:1".to_owned(),
            vec!["S3cr3t@Pw"],
        ),
        (
            "redis+cluster://u:S3cr3t/Pw@127.0.0.1:1".to_owned(),
            vec!["S3cr3t/Pw"],
        ),
        (
            "redis+cluster://u:S3cr3t,Pw@127.0.0.1:1".to_owned(),
            vec!["S3cr3t,Pw"],
        ),
        (
            "redis+cluster://u:S3cr3t%Pw@127.0.0.1:1".to_owned(),
            vec!["S3cr3t%Pw"],
        ),
        (
            format!("redis+cluster://u:S3cr3t%2CPw@127.0.0.1:{live}"),
            vec!["S3cr3t%2CPw", "S3cr3t,Pw"],
        ),
        (
            format!("redis+cluster://u:S3cr3t%40Pw@127.0.0.1:{live}"),
            vec!["S3cr3t%40Pw", "S3cr3t@Pw"],
        ),
        (
            format!("redis+cluster://S3cr3tUs:S3cr3tPw@127.0.0.1:{live}"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://:S3cr3tPw@127.0.0.1:{live},127.0.0.1:1"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@127.0.0.1:{live}?protocol=2"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@[127.0.0.1]:{live}"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@127.0.0.1:{live}/0/"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@127.0.0.1:{live} "),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@ 127.0.0.1:{live}"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@127.0.0.1:{live}:5"),
            vec!["S3cr3tPw"],
        ),
        (
            format!("redis+cluster://u:S3cr3tPw@127.0.0.1:{live}\n"),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+cluster://u:S3cr3tPw@\u{0}:1".to_owned(),
            vec!["S3cr3tPw"],
        ),
        (
            "redis+sentinel://u:S3cr3tPw@127.0.0.1:1/m?sentinel_password=S3nt1nelPw".to_owned(),
            vec!["S3cr3tPw", "S3nt1nelPw"],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=S3nt%40nelPw".to_owned(),
            vec!["S3nt%40nelPw", "S3nt@nelPw"],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=S3nt@nelPw".to_owned(),
            vec!["S3nt@nelPw"],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=S3nt&nelPw".to_owned(),
            vec!["S3nt&nelPw"],
        ),
        (
            "redis+sentinel://[::1]:1/m?sentinel_password=S3nt1nelPw".to_owned(),
            vec!["S3nt1nelPw"],
        ),
        (
            "redis+sentinel://[::1/m?sentinel_password=S3nt1nelPw".to_owned(),
            vec!["S3nt1nelPw"],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=%".to_owned(),
            vec![],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=%zzS3nt1nelPw".to_owned(),
            vec!["S3nt1nelPw"],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=%e2%82S3nt1nelPw".to_owned(),
            vec!["S3nt1nelPw"],
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?sentinel_password=%C3%A9S3nt1nelPw".to_owned(),
            vec!["S3nt1nelPw", "éS3nt1nelPw"],
        ),
        ("redis+sentinel://:1/m".to_owned(), vec![]),
        ("redis+sentinel:///m".to_owned(), vec![]),
        ("redis+sentinel://,/m".to_owned(), vec![]),
        ("redis+sentinel://h:0/m".to_owned(), vec![]),
        ("redis+sentinel://h:-1/m".to_owned(), vec![]),
        (
            "redis+sentinel://h/m?sentinel_password=S3nt1nelPw&sentinel_password=S3nt2nelPw"
                .to_owned(),
            vec!["S3nt1nelPw", "S3nt2nelPw"],
        ),
        (
            "redis+sentinel://h/m?sentinel_username=S3ntUser".to_owned(),
            vec![],
        ),
        (
            format!("redis+sentinel://u:S3cr3tPw@127.0.0.1:{live}/m?sentinel_password=S3nt1nelPw"),
            vec!["S3cr3tPw", "S3nt1nelPw"],
        ),
        (
            "rediss+sentinel://u:S3cr3tPw@127.0.0.1:1/m?sentinel_password=S3nt1nelPw".to_owned(),
            vec!["S3cr3tPw", "S3nt1nelPw"],
        ),
        (
            format!("redis+sentinel://127.0.0.1:{live}/m?sentinel_password=S3nt%2BnelPw"),
            vec!["S3nt%2BnelPw", "S3nt+nelPw"],
        ),
    ];
    let mut leaks = Vec::new();
    for (url, secrets) in cases {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url2 = url.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                let opts = ConnectOptions::default()
                    .connect_timeout(Duration::from_millis(500))
                    .response_timeout(Duration::from_millis(300));
                match Keyward::connect_with(&url2, policy("brkurl"), opts).await {
                    Ok(kw) => format!("OK {kw:?}"),
                    Err(e) => format!("ERR {e} / {e:?}"),
                }
            })
        }));
        drop(rt);
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        let out = match r {
            Ok(s) => s,
            Err(_) => {
                leaks.push(format!("PANIC on {url:?}"));
                continue;
            }
        };
        println!("{url:?}\n    -> {out}");
        for s in &secrets {
            if out.contains(s) {
                leaks.push(format!("{url:?}: secret {s:?} in result: {out}"));
            }
            if let Some(at) = text.find(s) {
                let line = text[..at].rsplit('\n').next().unwrap_or("").to_owned()
                    + text[at..].split('\n').next().unwrap_or("");
                leaks.push(format!("{url:?}: secret {s:?} in logs: {line}"));
            }
        }
    }
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
}

/// A fetch that times out on a frozen primary leaves a lease behind on the server unless its undo (`EVAL`,
/// routed by key on the cluster client) runs after it. After the primary resumes, no lease of ours may stay.
#[test]
fn undo_of_a_timed_out_fetch_on_cluster() {
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .node_timeout(Duration::from_millis(30000))
            .require_full_coverage(false),
    );
    let url = cluster.seed_url();
    let app = format!("brk_undo{}", std::process::id());
    let rt = common::runtime();
    let kw = rt
        .block_on(Keyward::connect_with(
            &url,
            policy(&app),
            opts().response_timeout(Duration::from_millis(200)),
        ))
        .unwrap();
    let cache = kw.cache::<String>("slow").unwrap();
    let gens_master = cluster.master_for_key(&format!("test:{app}:_kw:gens"));
    let ids: Vec<String> = (0..400)
        .map(|i| format!("u{i}"))
        .filter(|id| {
            cluster
                .master_for_key(&cache.key(id.as_str()).unwrap())
                .port
                != gens_master.port
        })
        .collect();
    let victim = cluster
        .master_for_key(&cache.key(ids[0].as_str()).unwrap())
        .port;
    let ids: Vec<String> = ids
        .into_iter()
        .filter(|id| {
            cluster
                .master_for_key(&cache.key(id.as_str()).unwrap())
                .port
                == victim
        })
        .take(10)
        .collect();
    // Warm the scripts.
    rt.block_on(async {
        let _ = cache
            .get_or_set("warm", || async { Ok::<_, std::io::Error>("w".to_owned()) })
            .await;
    });
    let mut r = raw(&cluster);
    let mut left = Vec::new();
    for round in 0..3 {
        cluster.pause(victim);
        rt.block_on(async {
            let mut hs = Vec::new();
            for id in &ids {
                let (cache, id) = (cache.clone(), format!("{id}-{round}"));
                hs.push(tokio::spawn(async move {
                    cache
                        .get_or_set(id.as_str(), || async {
                            Ok::<_, std::io::Error>("v".to_owned())
                        })
                        .await
                }));
            }
            for h in hs {
                let _ = h.await;
            }
        });
        // Paused a while more (the client may retry, reconnect...).
        std::thread::sleep(Duration::from_millis(700));
        cluster.resume(victim);
        // Let the undos land (they retry with backoff up to the lease TTL, 30 s); poll.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut held = Vec::new();
            for id in &ids {
                let key = cache.key(format!("{id}-{round}").as_str()).unwrap();
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut r).unwrap();
                if v.as_deref().is_some_and(|v| v.starts_with(b"L1:")) {
                    held.push(key);
                }
            }
            if held.is_empty() || Instant::now() > deadline {
                left.extend(held);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        left.is_empty(),
        "leases left behind 10 s after the primary resumed: {left:?}"
    );
}

/// An out-of-range namespace epoch (≥ 2^53, which `epochs.lua` treats as corrupt) is taken as is by the Cluster
/// view: a handle fills under it, and a later `invalidate_namespace` (whose bump restarts from the clock, far
/// below) never makes that entry stale.
#[test]
fn an_out_of_range_epoch_does_not_outrank_later_invalidations() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("brk_huge{}", std::process::id());
    let rt = common::runtime();
    rt.block_on(async {
        let mut r = raw(cluster);
        let () = redis::cmd("HSET")
            .arg(format!("test:{app}:_kw:gens"))
            .arg("*")
            .arg("9007199254740993")
            .query(&mut r)
            .unwrap();
        let a = Keyward::connect_with(&url, policy(&app), opts())
            .await
            .unwrap();
        let ca = a.cache::<String>("product").unwrap();
        ca.set("k", &"old".to_owned()).await.unwrap();
        a.invalidate_namespace().await.unwrap();
        tokio::time::sleep(BOUND * 2).await;
        let b = Keyward::connect_with(&url, policy(&app), opts())
            .await
            .unwrap();
        let cb = b.cache::<String>("product").unwrap();
        let got_a = ca.get("k").await.unwrap();
        let got_b = cb.get("k").await.unwrap();
        assert_eq!(
            (got_a, got_b),
            (None, None),
            "served after invalidate_namespace returned"
        );
    });
}

/// Control: the same corruptions on one server.
#[test]
fn corruptions_on_one_server_control() {
    let server = keyward_testkit::RedisServer::spawn();
    let url = server.url();
    let rt = common::runtime();
    rt.block_on(async {
        for (i, value) in ["9007199254740993", "garbage"].iter().enumerate() {
            let app = format!("ctl{i}");
            let mut r = server.connection();
            let a = Keyward::connect(&url, policy(&app)).await.unwrap();
            let ca = a.cache::<String>("product").unwrap();
            if i == 1 {
                ca.set("k", &"old".to_owned()).await.unwrap();
                a.invalidate_namespace().await.unwrap();
            }
            let () = redis::cmd("HSET")
                .arg(format!("test:{app}:_kw:gens"))
                .arg("*")
                .arg(*value)
                .query(&mut r)
                .unwrap();
            if i == 0 {
                ca.set("k", &"old".to_owned()).await.unwrap();
                a.invalidate_namespace().await.unwrap();
            }
            let b = Keyward::connect(&url, policy(&app)).await.unwrap();
            let cb = b.cache::<String>("product").unwrap();
            println!(
                "one server, `*` = {value}: a {:?}, b {:?}",
                ca.get("k").await.unwrap(),
                cb.get("k").await.unwrap()
            );
        }
    });
}

fn policy2(app: &str) -> Policy {
    Policy::builder("test", app)
        .cache(
            "p",
            CacheClass::new(Duration::from_secs(60), "t")
                .lease_ttl(Duration::from_secs(30))
                .loader_timeout(Duration::from_secs(20)),
        )
        .cache(
            "q",
            CacheClass::new(Duration::from_secs(60), "t")
                .lease_ttl(Duration::from_secs(30))
                .loader_timeout(Duration::from_secs(20)),
        )
        .build()
        .unwrap()
}

/// Watch/unwatch race: in handle B, a waiter on class `p` id X finishes (its unsubscribe is spawned) while a
/// waiter on class `q` id X (same hash tag, same channel) arrives. Re-checks happen every 30 s, so a waiter
/// done within 3 s of its holder's commit was woken.
#[test]
fn a_watch_arriving_while_an_unwatch_is_in_flight_is_woken() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("brk_race{}", std::process::id());
    let rt = common::runtime();
    let lost = rt.block_on(async {
        let slow = opts().response_timeout(Duration::from_secs(30));
        let a = Keyward::connect_with(&url, policy2(&app), slow.clone())
            .await
            .unwrap();
        let b = Keyward::connect_with(&url, policy2(&app), slow)
            .await
            .unwrap();
        let mut lost = Vec::new();
        for i in 0..400u64 {
            let id = format!("r{i}");
            let mut holders = Vec::new();
            let mut releases = Vec::new();
            for class in ["p", "q"] {
                let c = a.cache::<String>(class).unwrap();
                let started = Arc::new(tokio::sync::Notify::new());
                let release = Arc::new(tokio::sync::Notify::new());
                let (s2, r2, id2) = (started.clone(), release.clone(), id.clone());
                holders.push(tokio::spawn(async move {
                    c.get_or_set(id2.as_str(), || async move {
                        s2.notify_one();
                        r2.notified().await;
                        Ok::<_, std::io::Error>("A".to_owned())
                    })
                    .await
                }));
                started.notified().await;
                releases.push(release);
            }
            let bp = b.cache::<String>("p").unwrap();
            let bq = b.cache::<String>("q").unwrap();
            let id1 = id.clone();
            let w1 = tokio::spawn(async move {
                bp.get_or_set(id1.as_str(), || async {
                    Ok::<_, std::io::Error>("B".to_owned())
                })
                .await
            });
            let channel = format!("test:{app}:_kw:fills:{{{id}}}");
            while common::shard_subscribers(cluster, &channel) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let id2 = id.clone();
            let w2 = tokio::spawn(async move {
                bq.get_or_set(id2.as_str(), || async {
                    Ok::<_, std::io::Error>("B".to_owned())
                })
                .await
            });
            let spin = Duration::from_micros((i * 7) % 1500);
            let s = std::time::Instant::now();
            while s.elapsed() < spin {
                std::hint::spin_loop();
            }
            releases[0].notify_one();
            let r1 = tokio::time::timeout(Duration::from_secs(3), w1).await;
            // Give the spawned unsubscribe time to land, then commit q.
            tokio::time::sleep(Duration::from_millis(20)).await;
            releases[1].notify_one();
            let r2 = tokio::time::timeout(Duration::from_secs(3), w2).await;
            if r1.is_err() || r2.is_err() {
                lost.push(format!(
                    "round {i}: w1 woken {}, w2 woken {}",
                    r1.is_ok(),
                    r2.is_ok()
                ));
            }
            for h in holders {
                let _ = h.await;
            }
        }
        lost
    });
    assert!(lost.is_empty(), "lost wake-ups: {lost:#?}");
}

/// Many waiters on many keys in another handle: every one woken by its holder's commit (re-checks every 30 s),
/// and every subscription gone afterwards.
#[test]
fn many_waiters_on_many_keys_are_woken_and_leave_no_subscription() {
    let cluster = RedisCluster::shared();
    let url = cluster.seed_url();
    let app = format!("brk_many{}", std::process::id());
    let rt = common::runtime();
    rt.block_on(async {
        let slow = opts().response_timeout(Duration::from_secs(30));
        let a = Keyward::connect_with(&url, policy2(&app), slow.clone())
            .await
            .unwrap();
        let b = Keyward::connect_with(&url, policy2(&app), slow)
            .await
            .unwrap();
        const N: usize = 300;
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let mut holders = Vec::new();
        for i in 0..N {
            let c = a.cache::<String>("p").unwrap();
            let (release, started) = (release.clone(), started.clone());
            holders.push(tokio::spawn(async move {
                c.get_or_set(format!("m{i}").as_str(), || async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    release.acquire().await.unwrap().forget();
                    Ok::<_, std::io::Error>(format!("A{i}"))
                })
                .await
            }));
        }
        while started.load(Ordering::SeqCst) < N {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut waiters = Vec::new();
        for i in 0..N {
            let c = b.cache::<String>("p").unwrap();
            waiters.push(tokio::spawn(async move {
                c.get_or_set(format!("m{i}").as_str(), || async move {
                    Ok::<_, std::io::Error>(format!("B{i}"))
                })
                .await
            }));
        }
        // Until every waiter is subscribed (polled).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut n = 0;
            for i in 0..N {
                n += common::shard_subscribers(cluster, &format!("test:{app}:_kw:fills:{{m{i}}}"))
                    .min(1);
            }
            if n as usize == N {
                break;
            }
            assert!(Instant::now() < deadline, "only {n} subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t0 = Instant::now();
        release.add_permits(N);
        for (i, w) in waiters.into_iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("woken")
                .unwrap()
                .unwrap();
            assert_eq!(got, format!("A{i}"));
        }
        println!("{N} waiters woken within {:?}", t0.elapsed());
        for h in holders {
            h.await.unwrap().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut n = 0;
            for i in 0..N {
                n += common::shard_subscribers(cluster, &format!("test:{app}:_kw:fills:{{m{i}}}"));
            }
            if n == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{n} subscriptions left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// A caller that starts well past the bound after `invalidate_all` returned, in another handle, joins that
/// handle's in-flight fetch (single-flight) which began before the invalidation and was delayed (its primary
/// briefly frozen): it is served the entry filled before the invalidation.
#[test]
fn a_caller_sharing_a_fetch_is_held_to_the_bound() {
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .node_timeout(Duration::from_millis(30000))
            .require_full_coverage(false),
    );
    let url = cluster.seed_url();
    let app = format!("brk_follow{}", std::process::id());
    let rt = common::runtime();
    let o = opts().response_timeout(Duration::from_secs(3));
    let (h1, h3) = rt.block_on(async {
        (
            Keyward::connect_with(&url, policy(&app), o.clone())
                .await
                .unwrap(),
            Keyward::connect_with(&url, policy(&app), o.clone())
                .await
                .unwrap(),
        )
    });
    let c1 = h1.cache::<String>("product").unwrap();
    let c3 = h3.cache::<String>("product").unwrap();
    let gens_master = cluster.master_for_key(&format!("test:{app}:_kw:gens")).port;
    let id = (0..200)
        .map(|i| format!("f{i}"))
        .find(|id| cluster.master_for_key(&c1.key(id.as_str()).unwrap()).port != gens_master)
        .unwrap();
    let entry_master = cluster.master_for_key(&c1.key(id.as_str()).unwrap()).port;
    rt.block_on(async {
        c1.invalidate_all().await.unwrap(); // loads the bump script (NOSCRIPT is another test's subject)
        c1.set(id.as_str(), &"old".to_owned()).await.unwrap();
        tokio::time::sleep(BOUND * 2).await;
        assert_eq!(
            c3.get_or_set(id.as_str(), || async {
                Ok::<_, std::io::Error>("x".to_owned())
            })
            .await
            .unwrap(),
            "old"
        );
    });
    cluster.pause(entry_master);
    let (leader, follower_start, inv_returned) = rt.block_on(async {
        let (c3a, ida) = (c3.clone(), id.clone());
        let leader = tokio::spawn(async move {
            c3a.get_or_set(ida.as_str(), || async {
                Ok::<_, std::io::Error>("new-L".to_owned())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await; // the leader's fetch is in flight
        c1.invalidate_all().await.unwrap();
        let inv_returned = Instant::now();
        tokio::time::sleep(BOUND * 2).await;
        (leader, Instant::now(), inv_returned)
    });
    let follower = {
        let (c3b, idb) = (c3.clone(), id.clone());
        rt.spawn(async move {
            c3b.get_or_set(idb.as_str(), || async {
                Ok::<_, std::io::Error>("new-F".to_owned())
            })
            .await
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    cluster.resume(entry_master);
    let (l, f) = rt.block_on(async { (leader.await.unwrap(), follower.await.unwrap()) });
    println!(
        "follower started {:?} after invalidate_all returned (bound {BOUND:?}): leader {l:?}, follower {f:?}",
        follower_start - inv_returned
    );
    assert_ne!(
        f.unwrap(),
        "old",
        "served an entry filled before the invalidation, past the bound"
    );
}
