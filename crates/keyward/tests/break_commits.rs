//! Adversarial review of 513310e (fenced cache commits of one handle batched into `commit_many.lua` calls):
//! every entry of a batch must be decided and answered exactly as `commit.lua` decides a lone commit — also
//! when the server refuses it for being a replica, stalls while commits are queued, or when callers give up;
//! fills leased before an invalidation never land and callers who start after one never get older data, with
//! several handles racing on overlapping keys; waiters on another handle's lease are woken by the batch.

#![allow(unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::Harness;
use keyward::{Cache, ConnectOptions, Error, Keyward};
use tokio::sync::Barrier;

conformance!(
    racing_fills_and_invalidations_on_several_handles_never_serve_older_data,
    waiters_on_another_handles_lease_are_woken_by_a_batched_commit,
);

/// How many fills commit at once.
const FILLS: u32 = 32;

/// A deadline for things that must happen "soon".
const SOON: Duration = Duration::from_secs(20);

/// Starts `FILLS` callers of `get_or_set` on `c` for ids `0..FILLS`, each loading `id * 10` once every loader
/// is running and `between` has returned; returns each caller's answer by id.
async fn fill_all_at_once<F, Fut>(c: &Cache<u64>, between: F) -> BTreeMap<u32, Result<u64, Error>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
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
            (id, got)
        });
    }
    loading.wait().await;
    between().await;
    release.wait().await;
    let mut answers = BTreeMap::new();
    while let Some(joined) = callers.join_next().await {
        let (id, got) = joined.expect("a caller panicked");
        answers.insert(id, got);
    }
    answers
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
