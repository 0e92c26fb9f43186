//! Adversarial review of 513310e (fenced cache commits of one handle batched into `commit_many.lua` calls,
//! since measured and taken out: one `commit.lua` call per fill again). The cases stand for concurrent
//! commits however they are sent: each decided and answered as a lone commit is — also when the server
//! refuses it for being a replica, stalls while commits are in flight, or when callers give up; fills leased
//! before an invalidation never land and callers who start after one never get older data, with several
//! handles racing on overlapping keys; waiters on another handle's lease are woken by the commit.

#![allow(unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cache_commits::{FILLS, fill_all_at_once};
use crate::common::Harness;
use keyward::{Cache, ConnectOptions, Keyward};
use tokio::sync::Barrier;

conformance!(
    racing_fills_and_invalidations_on_several_handles_never_serve_older_data,
    waiters_on_another_handles_lease_are_woken_by_a_batched_commit,
    fills_of_many_classes_commit_together_each_in_its_own_class,
);

/// A deadline for things that must happen "soon".
const SOON: Duration = Duration::from_secs(20);

/// Waits (up to [`SOON`]) until the handle stores a new value again: the breaker has recovered and nothing
/// left behind blocks a fill.
async fn stores_again(c: &Cache<u64>) {
    let deadline = Instant::now() + SOON;
    loop {
        let id = 1000u32;
        let _ = c
            .get_or_set(&id, || async { Ok::<_, std::io::Error>(7) })
            .await;
        if c.get(&id).await.ok().flatten() == Some(7) {
            return;
        }
        assert!(Instant::now() < deadline, "the handle never stores again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every caller's `(id, answer)` by id, all of them within [`SOON`] (else the test fails with `hung`).
async fn all_answers<T: 'static>(
    callers: &mut tokio::task::JoinSet<(u32, T)>,
    hung: &str,
) -> BTreeMap<u32, T> {
    tokio::time::timeout(SOON, async {
        let mut out = BTreeMap::new();
        while let Some(j) = callers.join_next().await {
            let (id, got) = j.unwrap();
            out.insert(id, got);
        }
        out
    })
    .await
    .expect(hung)
}

/// A TCP port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A server demoted to a replica (of a master that is not there) while fills load refuses their commits with
/// `READONLY`: a lone commit's caller fails open (the value is served, not cached), and so must every caller
/// whose commit went in a batch. Fails if a batched entry's `READONLY` is an error reply that is not
/// "unavailable" (the caller of a fail-open class gets an error instead of its value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_commit_refused_by_a_demoted_server_fails_open_as_a_lone_one() {
    let h = Harness::redis();
    let url = h.url().unwrap();
    // A breaker that never opens here: the lone commits' failures must not turn the batch's into
    // `CircuitOpen` (which fails open anyway and would hide the batch's own answer).
    let options = ConnectOptions::default().breaker(10_000, Duration::from_secs(1));
    let kw = Keyward::connect_with(&url, h.policy(), options)
        .await
        .unwrap();
    let c = kw.cache::<u64>("product").unwrap();
    let port = closed_port();
    let answers = tokio::time::timeout(
        SOON,
        fill_all_at_once(&c, || async {
            let mut con = h.server().unwrap().connection();
            let () = ::redis::cmd("REPLICAOF")
                .arg("127.0.0.1")
                .arg(port)
                .query(&mut con)
                .unwrap();
        }),
    )
    .await
    .expect("the fills hung");
    let mut con = h.server().unwrap().connection();
    let () = ::redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut con)
        .unwrap();
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|(id, got)| match got {
            Ok(v) => {
                assert_eq!(*v, u64::from(*id) * 10, "id {id}");
                None
            }
            Err(e) => Some(format!("id {id}: {e} ({e:?})")),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "a commit refused with READONLY fails open alone; in a batch {} of {FILLS} callers got an error:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Sets `CONFIG SET name value` on the test's server.
fn config_set(h: &Harness, name: &str, value: &str) {
    let () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(&mut h.server().unwrap().connection())
        .unwrap();
}

/// The server stops (SIGSTOP) after the fills leased and while their commits go out and queue: every caller
/// returns within a few response timeouts (fail open: its value), none waits for the batch it queued
/// behind; once the server runs again, a caller of each id gets an answer within the lease's TTL (a lease
/// left behind blocks no one longer), and the handle stores again (the breaker recovered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_returns_within_the_response_timeout_when_the_server_stalls_mid_batch() {
    let mut h = Harness::redis();
    let url = h.url().unwrap();
    let timeout = Duration::from_millis(300);
    let options = ConnectOptions::default().response_timeout(timeout);
    let kw = Keyward::connect_with(&url, h.policy(), options)
        .await
        .unwrap();
    let c = kw.cache::<u64>("product").unwrap();
    let released = std::sync::Mutex::new(None);
    let answers = tokio::time::timeout(
        SOON,
        fill_all_at_once(&c, || async {
            h.server_mut().unwrap().pause();
            *released.lock().unwrap() = Some(Instant::now());
        }),
    )
    .await
    .expect("the fills hung on a stalled server");
    let took = released.lock().unwrap().unwrap().elapsed();
    h.server_mut().unwrap().resume();
    for (id, got) in &answers {
        assert_eq!(
            got.as_ref().ok(),
            Some(&(u64::from(*id) * 10)),
            "id {id}: fails open ({got:?})"
        );
    }
    assert!(
        took < timeout * 4 + Duration::from_secs(1),
        "callers waited {took:?} on a stalled server (response timeout {timeout:?})"
    );
    // After the stall: each id answers within the lease TTL (10 s), with its load or the new one.
    let lease = Duration::from_secs(10);
    let after = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for id in 0..FILLS {
        let c = c.clone();
        set.spawn(async move {
            let got = c
                .get_or_set(&id, || async move {
                    Ok::<_, std::io::Error>(u64::from(id) * 10 + 1)
                })
                .await;
            (id, got)
        });
    }
    let all = tokio::time::timeout(lease + Duration::from_secs(5), async {
        let mut out = Vec::new();
        while let Some(j) = set.join_next().await {
            out.push(j.unwrap());
        }
        out
    })
    .await
    .expect("a lease left by the stall blocked callers beyond its TTL");
    for (id, got) in all {
        let v = got.unwrap_or_else(|e| panic!("id {id} after the stall: {e}"));
        assert!(
            v == u64::from(id) * 10 || v == u64::from(id) * 10 + 1,
            "id {id}: {v}"
        );
    }
    assert!(after.elapsed() < lease + Duration::from_secs(5));
    stores_again(&c).await;
}

/// Half the callers are dropped (cancelled) while their commits wait behind a stalled server; the other half
/// must each get their own value, stored, and a later caller of a dropped id is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_dropped_while_their_commits_wait_do_not_break_their_batch_mates() {
    let mut h = Harness::redis();
    let url = h.url().unwrap();
    let options = ConnectOptions::default().response_timeout(Duration::from_secs(10));
    let kw = Keyward::connect_with(&url, h.policy(), options)
        .await
        .unwrap();
    let c = kw.cache::<u64>("product").unwrap();
    let (loading, release) = (
        Arc::new(Barrier::new(FILLS as usize + 1)),
        Arc::new(Barrier::new(FILLS as usize + 1)),
    );
    let loaded = Arc::new(Barrier::new(FILLS as usize + 1));
    let cancel = Arc::new(tokio::sync::Notify::new());
    let mut callers = tokio::task::JoinSet::new();
    for id in 0..FILLS {
        let (c, loading, release, loaded, cancel) = (
            c.clone(),
            loading.clone(),
            release.clone(),
            loaded.clone(),
            cancel.clone(),
        );
        callers.spawn(async move {
            let cancelled = cancel.notified();
            let call = c.get_or_set(&id, || async move {
                loading.wait().await;
                release.wait().await;
                loaded.wait().await;
                Ok::<_, std::io::Error>(u64::from(id) * 10)
            });
            if id % 2 == 1 {
                tokio::select! {
                    got = call => (id, Some(got)),
                    () = cancelled => (id, None),
                }
            } else {
                (id, Some(call.await))
            }
        });
    }
    loading.wait().await;
    h.server_mut().unwrap().pause();
    release.wait().await;
    loaded.wait().await;
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    cancel.notify_waiters();
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    h.server_mut().unwrap().resume();
    let answers = all_answers(&mut callers, "callers hung").await;
    for (id, got) in &answers {
        if id % 2 == 0 {
            let got = got.as_ref().unwrap();
            assert_eq!(got.as_ref().ok(), Some(&(u64::from(*id) * 10)), "id {id}");
            assert_eq!(
                c.get(id).await.unwrap(),
                Some(u64::from(*id) * 10),
                "id {id} stored"
            );
        }
    }
    for id in (1..FILLS).step_by(2) {
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            c.get_or_set(&id, || async move {
                Ok::<_, std::io::Error>(u64::from(id) * 10)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("id {id}: a dropped caller's lease blocks"))
        .unwrap();
        assert_eq!(got, u64::from(id) * 10);
    }
}

/// Under `maxmemory` with `noeviction`, commits refused with `OOM` fail open (each caller its own value),
/// batched or alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_refused_for_memory_each_fail_open() {
    let h = Harness::redis();
    let kw = h.keyward().await;
    let c = kw.cache::<u64>("product").unwrap();
    let answers = tokio::time::timeout(
        SOON,
        fill_all_at_once(&c, || async {
            config_set(&h, "maxmemory-policy", "noeviction");
            config_set(&h, "maxmemory", "1");
        }),
    )
    .await
    .expect("the fills hung");
    config_set(&h, "maxmemory", "0");
    for (id, got) in &answers {
        assert_eq!(
            got.as_ref().ok(),
            Some(&(u64::from(*id) * 10)),
            "id {id}: {got:?}"
        );
    }
}

/// As the documented ACL user without `publish`/`spublish`: a commit whose lease has a waiter stores its value
/// but its publish fails; every such caller gets the error (batched or alone), none silently succeeds, and
/// the values are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publish_grant_fails_each_waited_on_commit() {
    let mut h = Harness::redis();
    let app = h.app().to_owned();
    crate::common::restrict_to_documented_acl(h.server_mut().unwrap(), "test", &app);
    let () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("keyward")
        .arg("-publish")
        .arg("-spublish")
        .query(&mut h.server().unwrap().connection())
        .unwrap();
    let handles = h.handles(2).await;
    let (a, b) = (
        handles[0].cache::<u64>("product").unwrap(),
        handles[1].cache::<u64>("product").unwrap(),
    );
    let keys: Vec<String> = (0..FILLS).map(|id| a.key(&id).unwrap()).collect();
    let mut waiters = tokio::task::JoinSet::new();
    let answers = fill_all_at_once(&a, || async {
        for id in 0..FILLS {
            let b = b.clone();
            waiters.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(15),
                    b.get_or_set(&id, || async { Ok::<_, std::io::Error>(9999) }),
                )
                .await;
            });
        }
        let mut con = h.server().unwrap().connection();
        let deadline = Instant::now() + SOON;
        for key in &keys {
            loop {
                let head: Vec<u8> = ::redis::cmd("GETRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(127)
                    .query(&mut con)
                    .unwrap();
                if head.get(36) == Some(&b'1') {
                    break;
                }
                assert!(Instant::now() < deadline, "B never waited on {key}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
    .await;
    waiters.abort_all();
    for (id, got) in &answers {
        assert!(
            got.is_err(),
            "id {id}: a missing publish grant must show: {got:?}"
        );
        let mut con = h.server().unwrap().connection();
        let ty: String = ::redis::cmd("TYPE")
            .arg(&keys[*id as usize])
            .query(&mut con)
            .unwrap();
        assert_eq!(ty, "string", "id {id}");
    }
    // The value stays stored (as commit.lua's SET before its failing publish).
    for id in 0..FILLS {
        assert_eq!(
            a.get(&id).await.unwrap(),
            Some(u64::from(id) * 10),
            "id {id}"
        );
    }
}

/// Values from 0 bytes to nearly 1 MiB, committed at once: each caller gets and stores its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_very_different_sizes_commit_together() {
    let h = Harness::redis();
    let kw = h.keyward().await;
    let c = kw.cache::<String>("product").unwrap();
    let sizes: Vec<usize> = vec![
        0,
        1,
        1000,
        1023,
        1024,
        1025,
        16 * 1024,
        31 * 1024,
        32 * 1024,
        33 * 1024,
        200 * 1024,
        (1 << 20) - 64,
    ];
    let n = sizes.len() * 3;
    let (loading, release) = (Arc::new(Barrier::new(n + 1)), Arc::new(Barrier::new(n + 1)));
    let mut callers = tokio::task::JoinSet::new();
    for id in 0..n {
        let size = sizes[id % sizes.len()];
        let (c, loading, release) = (c.clone(), loading.clone(), release.clone());
        callers.spawn(async move {
            let value: String =
                std::iter::repeat_n(char::from(b'a' + (id % 26) as u8), size).collect();
            let expect = value.clone();
            let got = c
                .get_or_set(&(id as u64), || async move {
                    loading.wait().await;
                    release.wait().await;
                    Ok::<_, std::io::Error>(value)
                })
                .await;
            (id, expect, got)
        });
    }
    loading.wait().await;
    release.wait().await;
    while let Some(j) = callers.join_next().await {
        let (id, expect, got) = j.unwrap();
        assert_eq!(got.unwrap(), expect, "id {id}");
        assert_eq!(
            c.get(&(id as u64)).await.unwrap(),
            Some(expect),
            "id {id} stored"
        );
    }
}

/// The connection is cut while commits are in flight (sent into a partition) and queued behind them: every
/// caller returns (fail open, its own value) well within the response timeout, and afterwards each id answers
/// within the lease TTL and the handle stores again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_batch_fails_each_caller_open_and_recovers() {
    let server = keyward_testkit::RedisServer::spawn_tcp();
    let proxy = keyward_testkit::TcpProxy::to_server(&server);
    let h = Harness::embedded(); // only for its policy
    let timeout = Duration::from_secs(5);
    let options = ConnectOptions::default().response_timeout(timeout);
    let kw = Keyward::connect_with(&proxy.url(), h.policy(), options)
        .await
        .unwrap();
    let c = kw.cache::<u64>("product").unwrap();
    let (loading, release) = (
        Arc::new(Barrier::new(FILLS as usize + 1)),
        Arc::new(Barrier::new(FILLS as usize + 1)),
    );
    let loaded = Arc::new(Barrier::new(FILLS as usize + 1));
    let mut callers = tokio::task::JoinSet::new();
    for id in 0..FILLS {
        let (c, loading, release, loaded) =
            (c.clone(), loading.clone(), release.clone(), loaded.clone());
        callers.spawn(async move {
            let got = c
                .get_or_set(&id, || async move {
                    loading.wait().await;
                    release.wait().await;
                    loaded.wait().await;
                    Ok::<_, std::io::Error>(u64::from(id) * 10)
                })
                .await;
            (id, got)
        });
    }
    loading.wait().await;
    proxy.blackhole();
    release.wait().await;
    loaded.wait().await;
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    let cut = Instant::now();
    proxy.refuse();
    proxy.forward();
    let answers = all_answers(&mut callers, "callers hung after the cut").await;
    let took = cut.elapsed();
    for (id, got) in &answers {
        assert_eq!(
            got.as_ref().ok(),
            Some(&(u64::from(*id) * 10)),
            "id {id}: {got:?}"
        );
    }
    assert!(took < timeout, "callers took {took:?} after the cut");
    let deadline = Instant::now() + Duration::from_secs(15);
    for id in 0..FILLS {
        let got = tokio::time::timeout_at(
            deadline.into(),
            c.get_or_set(&id, || async move {
                Ok::<_, std::io::Error>(u64::from(id) * 10)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("id {id}: blocked after the cut"));
        assert_eq!(got.ok(), Some(u64::from(id) * 10), "id {id} after the cut");
    }
    stores_again(&c).await;
}

/// Redis Cluster, one master stalled (SIGSTOP) while the fills commit: callers whose keys live on the
/// healthy masters are answered as fast as before batching (a lone commit to a healthy master never waited
/// for another master), not after the response timeout their batch-mates on the stalled master wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_master_does_not_hold_back_commits_to_healthy_masters() {
    let mut cluster = keyward_testkit::RedisCluster::spawn();
    let h = Harness::embedded(); // only for its policy
    let timeout = Duration::from_secs(3);
    let options = ConnectOptions::default().response_timeout(timeout);
    let kw = Keyward::connect_with(&cluster.seed_url(), h.policy(), options)
        .await
        .unwrap();
    let c = kw.cache::<u64>("product").unwrap();
    let stalled = cluster.master_for_key(&c.key(&0u32).unwrap()).port;
    let healthy: Vec<u32> = (0..FILLS)
        .filter(|id| cluster.master_for_key(&c.key(id).unwrap()).port != stalled)
        .collect();
    assert!(healthy.len() > FILLS as usize / 3, "{healthy:?}");
    let (loading, release) = (
        Arc::new(Barrier::new(FILLS as usize + 1)),
        Arc::new(Barrier::new(FILLS as usize + 1)),
    );
    let mut callers = tokio::task::JoinSet::new();
    for id in 0..FILLS {
        let (c, loading, release) = (c.clone(), loading.clone(), release.clone());
        callers.spawn(async move {
            let got = c
                .get_or_set(&id, || async move {
                    loading.wait().await;
                    release.wait().await;
                    Ok::<_, std::io::Error>(u64::from(id) * 10)
                })
                .await;
            (id, got, Instant::now())
        });
    }
    loading.wait().await;
    cluster.pause(stalled);
    let released = Instant::now();
    release.wait().await;
    let mut slow = Vec::new();
    let answers = tokio::time::timeout(SOON, async {
        let mut out = Vec::new();
        while let Some(j) = callers.join_next().await {
            out.push(j.unwrap());
        }
        out
    })
    .await;
    cluster.resume(stalled);
    for (id, got, at) in answers.expect("callers hung") {
        assert_eq!(got.as_ref().ok(), Some(&(u64::from(id) * 10)), "id {id}");
        let took = at.saturating_duration_since(released);
        if healthy.contains(&id) && took > timeout / 2 {
            slow.push(format!("id {id}: {took:?}"));
        }
    }
    assert!(
        slow.is_empty(),
        "{} of {} callers on healthy masters waited for the stalled one (response timeout {timeout:?}):\n{}",
        slow.len(),
        healthy.len(),
        slow.join("\n")
    );
}

mod cases {
    use super::*;

    pub async fn racing_fills_and_invalidations_on_several_handles_never_serve_older_data(
        h: Harness,
    ) {
        // Each key's source has a version; a writer bumps it, then invalidates. Once an invalidation of
        // version v returned, the store never holds a version older than v (a fill leased before the
        // invalidation never lands, whatever batch its commit waits in), and a call that starts after an
        // invalidation made through its own handle gets v or later. (A call that joins its handle's fetch in
        // flight may get a value committed just before *another* handle's invalidation: in-process
        // single-flight cannot know of it, before and after batching alike.) Several handles
        // (connections), many readers, overlapping keys.
        const KEYS: usize = 6;
        const ROUNDS: usize = 40;
        const HANDLES: usize = 3;
        let handles = h.handles(HANDLES).await;
        let caches: Vec<Cache<u64>> = handles
            .iter()
            .map(|kw| kw.cache::<u64>("product").unwrap())
            .collect();
        let source: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
        // Per handle, per key: the latest version whose invalidation through that handle returned.
        let invalidated: Arc<Vec<AtomicU64>> =
            Arc::new((0..KEYS * HANDLES).map(|_| AtomicU64::new(0)).collect());
        let floor_of = |inv: &[AtomicU64], handle: Option<usize>, k: usize| -> u64 {
            (0..HANDLES)
                .filter(|&w| handle.is_none_or(|h| h == w))
                .map(|w| inv[w * KEYS + k].load(Ordering::SeqCst))
                .max()
                .unwrap_or(0)
        };
        let violations = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        // Writers: one per handle.
        for (w, c) in caches.iter().enumerate() {
            let (c, source, invalidated) = (c.clone(), source.clone(), invalidated.clone());
            tasks.spawn(async move {
                for round in 0..ROUNDS {
                    let k = (round * 7 + w) % KEYS;
                    let v = source[k].fetch_add(1, Ordering::SeqCst) + 1;
                    c.invalidate(&(k as u64)).await.unwrap();
                    invalidated[w * KEYS + k].fetch_max(v, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            });
        }
        // Readers: many per handle, on every key.
        for r in 0..24 {
            let handle = r % HANDLES;
            let (c, source, invalidated, violations, errors) = (
                caches[handle].clone(),
                source.clone(),
                invalidated.clone(),
                violations.clone(),
                errors.clone(),
            );
            tasks.spawn(async move {
                for round in 0..ROUNDS {
                    let k = (round + r) % KEYS;
                    let own = floor_of(&invalidated, Some(handle), k);
                    let any = floor_of(&invalidated, None, k);
                    let src = source.clone();
                    let got = c
                        .get_or_set(&(k as u64), || async move {
                            let v = src[k].load(Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            Ok::<_, std::io::Error>(v)
                        })
                        .await;
                    match got {
                        Ok(v) if v < own => {
                            violations.fetch_add(1, Ordering::SeqCst);
                            eprintln!("key {k}: got version {v} after own invalidation of {own}");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            eprintln!("key {k}: {e}");
                        }
                    }
                    match c.get(&(k as u64)).await {
                        Ok(Some(v)) if v < any => {
                            violations.fetch_add(1, Ordering::SeqCst);
                            eprintln!("key {k}: stored version {v} after invalidation of {any}");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            eprintln!("key {k}: get: {e}");
                        }
                    }
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("a task panicked");
        }
        assert_eq!(violations.load(Ordering::SeqCst), 0, "older data served");
        assert_eq!(errors.load(Ordering::SeqCst), 0, "errors");
        // Quiet now: every handle reads each key's latest version.
        for c in &caches {
            for k in 0..KEYS {
                let latest = source[k].load(Ordering::SeqCst);
                let src = source.clone();
                let got = c
                    .get_or_set(&(k as u64), || async move {
                        Ok::<_, std::io::Error>(src[k].load(Ordering::SeqCst))
                    })
                    .await
                    .unwrap();
                assert_eq!(got, latest, "key {k}: the cache keeps an old version");
            }
        }
        h.assert_no_acl_denials();
    }

    pub async fn fills_of_many_classes_commit_together_each_in_its_own_class(h: Harness) {
        // One handle, five classes (one with an in-process tier, one with another TTL), the same ids in each:
        // all commit at once, half of them voided by an invalidation of their class only.
        let kw = h.keyward().await;
        let classes = ["product", "other", "near", "near2", "pii_ok"];
        let caches: Vec<Cache<u64>> = classes
            .iter()
            .map(|c| kw.cache::<u64>(c).unwrap())
            .collect();
        let n = classes.len() * 8;
        let (loading, release) = (Arc::new(Barrier::new(n + 1)), Arc::new(Barrier::new(n + 1)));
        let mut callers = tokio::task::JoinSet::new();
        for (ci, c) in caches.iter().enumerate() {
            for id in 0..8u64 {
                let (c, loading, release) = (c.clone(), loading.clone(), release.clone());
                callers.spawn(async move {
                    let v = (ci as u64) * 1000 + id;
                    let got = c
                        .get_or_set(&id, || async move {
                            loading.wait().await;
                            release.wait().await;
                            Ok::<_, std::io::Error>(v)
                        })
                        .await;
                    (ci, id, v, got)
                });
            }
        }
        loading.wait().await;
        for (ci, c) in caches.iter().enumerate() {
            for id in (0..8u64).filter(|id| (id + ci as u64).is_multiple_of(2)) {
                c.invalidate(&id).await.unwrap();
            }
        }
        release.wait().await;
        while let Some(j) = callers.join_next().await {
            let (ci, id, v, got) = j.unwrap();
            assert_eq!(got.unwrap(), v, "{} {id}", classes[ci]);
        }
        for (ci, c) in caches.iter().enumerate() {
            for id in 0..8u64 {
                let stored = c.get(&id).await.unwrap();
                if (id + ci as u64).is_multiple_of(2) {
                    assert_eq!(stored, None, "{} {id}: voided", classes[ci]);
                } else {
                    assert_eq!(stored, Some(ci as u64 * 1000 + id), "{} {id}", classes[ci]);
                }
            }
        }
        h.assert_no_acl_denials();
    }

    pub async fn waiters_on_another_handles_lease_are_woken_by_a_batched_commit(h: Harness) {
        // Handle A fills FILLS ids (commits batched); handle B asks for the same ids meanwhile and waits on
        // A's leases (10 s). Each B caller must get A's value as soon as A's commit stores it, long before
        // the leases would expire, and never run its own loader.
        let handles = h.handles(2).await;
        let (a, b) = (
            handles[0].cache::<u64>("product").unwrap(),
            handles[1].cache::<u64>("product").unwrap(),
        );
        let b_loads = Arc::new(AtomicUsize::new(0));
        let waiters = tokio::sync::Mutex::new(None);
        let mut raw = h.raw();
        let keys: Vec<String> = (0..FILLS).map(|id| a.key(&id).unwrap()).collect();
        let answers = fill_all_at_once(&a, || async {
            let mut set = tokio::task::JoinSet::new();
            for id in 0..FILLS {
                let (b, b_loads) = (b.clone(), b_loads.clone());
                set.spawn(async move {
                    let got = b
                        .get_or_set(&id, || async move {
                            b_loads.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::io::Error>(9999)
                        })
                        .await;
                    (id, got, Instant::now())
                });
            }
            // Wait until every lease carries B's waiter flag (byte 37 = '1') on Redis.
            if let Some(raw) = raw.as_mut() {
                let deadline = Instant::now() + SOON;
                for key in &keys {
                    loop {
                        let head: Vec<u8> = ::redis::cmd("GETRANGE")
                            .arg(key)
                            .arg(0)
                            .arg(127)
                            .query(&mut **raw)
                            .unwrap();
                        if head.get(36) == Some(&b'1') {
                            break;
                        }
                        assert!(Instant::now() < deadline, "B never waited on {key}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            } else {
                tokio::task::yield_now().await;
            }
            *waiters.lock().await = Some((set, Instant::now()));
        })
        .await;
        for (id, got) in &answers {
            assert_eq!(
                got.as_ref().ok(),
                Some(&(u64::from(*id) * 10)),
                "A's id {id}"
            );
        }
        let (mut set, released) = waiters.lock().await.take().unwrap();
        while let Some(joined) = set.join_next().await {
            let (id, got, at) = joined.unwrap();
            assert_eq!(
                got.unwrap(),
                u64::from(id) * 10,
                "B's id {id} gets A's value"
            );
            if h.is_redis() {
                let waited = at.saturating_duration_since(released);
                assert!(
                    waited < Duration::from_secs(3),
                    "B's id {id} waited {waited:?} after A's commit (not woken?)"
                );
            }
        }
        assert_eq!(b_loads.load(Ordering::SeqCst), 0, "B never loads");
        h.assert_no_acl_denials();
    }
}
