//! Batches (`Cache::get_or_set_many`): hits are never loaded, every miss goes to one loader call, values come
//! back in the order of the ids, and each id keeps the single-entry guarantees (one load fleet-wide, fenced
//! fills, shared loader errors) — on the embedded backend, Redis, Redis as the documented ACL user and Redis
//! Cluster alike. Also, outside the conformance suite: the store going down (fail open), on one server and on
//! one primary of a cluster. Nothing here sleeps to wait for things; the few sleeps are a source's latency.

#![allow(unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{Harness, Source};
use keyward::{Error, Keyward, MissingFromBatch};
use tokio::sync::{Barrier, Notify};

conformance!(
    hits_are_not_loaded_and_values_keep_their_order,
    duplicate_and_empty_ids,
    batches_racing_single_callers_load_each_id_once,
    an_invalidation_during_the_load_refuses_that_id_only,
    loader_errors_are_shared_and_not_cached,
    an_id_the_loader_omits,
    size_limit_and_loader_timeout_per_batch,
    ids_over_many_slots_in_one_pipeline_each,
    a_failed_batch_load_serves_the_kept_stale_values,
);

/// What the test source holds for `id`.
fn value(id: u32) -> String {
    format!("v{id}")
}

/// A loader answer for `ids` from the test source.
fn answer(ids: &[&u32]) -> Result<HashMap<u32, String>, std::io::Error> {
    Ok(ids.iter().map(|&&id| (id, value(id))).collect())
}

/// Records each loader call's ids, sorted.
#[derive(Default, Clone)]
struct Calls(Arc<Mutex<Vec<Vec<u32>>>>);

impl Calls {
    fn record(&self, ids: &[&u32]) {
        let mut ids: Vec<u32> = ids.iter().map(|&&id| id).collect();
        ids.sort_unstable();
        self.0.lock().unwrap().push(ids);
    }

    fn take(&self) -> Vec<Vec<u32>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

mod cases {
    use super::*;

    pub async fn hits_are_not_loaded_and_values_keep_their_order(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        c.set(&2u32, &"cached 2".to_owned()).await.unwrap();
        c.set(&4u32, &"cached 4".to_owned()).await.unwrap();
        let calls = Calls::default();
        let ids = [5u32, 4, 1, 2, 3];
        let got = c
            .get_or_set_many(&ids, |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(got, ["v5", "cached 4", "v1", "cached 2", "v3"]);
        assert_eq!(calls.take(), [vec![1, 3, 5]], "one call, misses only");
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.loader_calls),
            (2, 3, 1),
            "per id, one loader call: {s:?}"
        );
        // Everything is cached now, with the class TTL.
        let again = c
            .get_or_set_many(&ids, |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(again, got);
        assert!(
            calls.take().is_empty(),
            "all hits: the loader is not called"
        );
        for id in [1u32, 3, 5] {
            assert_eq!(c.get(&id).await.unwrap(), Some(value(id)));
        }
        let keys = h.all_keys(&kw).await;
        let entries: Vec<_> = keys
            .iter()
            .filter(|k| k.key.contains(":product:"))
            .collect();
        assert_eq!(entries.len(), 5, "{keys:?}");
        for k in entries {
            let ttl = k.ttl.expect("every key has a TTL");
            // The class TTL (60 s) plus at most its 10 % jitter, less the test's own time.
            assert!(
                ttl >= Duration::from_secs(30) && ttl <= Duration::from_secs(66),
                "{k:?}"
            );
        }
        h.assert_no_acl_denials();
    }

    pub async fn duplicate_and_empty_ids(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let calls = Calls::default();
        let got = c
            .get_or_set_many(&[7u32, 8, 7, 7], |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(got, ["v7", "v8", "v7", "v7"]);
        assert_eq!(calls.take(), [vec![7, 8]], "a duplicate id is loaded once");
        assert_eq!(c.stats().misses, 2, "{:?}", c.stats());
        // Duplicates that are hits are answered at each position too.
        let got = c
            .get_or_set_many(&[8u32, 8], |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(got, ["v8", "v8"]);
        let none: [u32; 0] = [];
        let got = c
            .get_or_set_many(&none, |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert!(got.is_empty());
        assert!(
            calls.take().is_empty(),
            "hits and an empty batch call no loader"
        );
        // An id that cannot form a key is refused before anything is fetched.
        let err = c
            .get_or_set_many(&["ok", ""], |_| async {
                Ok::<_, std::io::Error>(Vec::<(&str, String)>::new())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Key(_)), "{err}");
    }

    pub async fn batches_racing_single_callers_load_each_id_once(h: Harness) {
        // On Redis each handle has its own connection, flights and wake-ups, as separate processes would.
        let handles = h.handles(4).await;
        let loads: Arc<Vec<AtomicUsize>> = Arc::new((0..48).map(|_| AtomicUsize::new(0)).collect());
        let tasks_per_handle = 24;
        let gate = Arc::new(Barrier::new(handles.len() * tasks_per_handle));
        let mut tasks = Vec::new();
        for (n, kw) in handles.iter().enumerate() {
            let c = kw.cache::<String>("product").unwrap();
            for t in 0..tasks_per_handle {
                let (c, loads, gate) = (c.clone(), loads.clone(), gate.clone());
                tasks.push(tokio::spawn(async move {
                    gate.wait().await;
                    if t % 4 == 0 {
                        // A single caller of one id.
                        let id = u32::try_from((n * 7 + t) % 48).unwrap();
                        let got = c
                            .get_or_set(&id, || async {
                                loads[id as usize].fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok::<_, std::io::Error>(value(id))
                            })
                            .await
                            .unwrap();
                        assert_eq!(got, value(id));
                    } else {
                        // A batch of 16 overlapping ids (every id is in several batches of every handle).
                        let start = (n * 5 + t * 3) % 48;
                        let ids: Vec<u32> = (0..16)
                            .map(|i| u32::try_from((start + i * 3) % 48).unwrap())
                            .collect();
                        let got = c
                            .get_or_set_many(&ids, |missing| {
                                for id in &missing {
                                    loads[**id as usize].fetch_add(1, Ordering::SeqCst);
                                }
                                async move {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    answer(&missing)
                                }
                            })
                            .await
                            .unwrap();
                        let want: Vec<String> = ids.iter().map(|&id| value(id)).collect();
                        assert_eq!(got, want);
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let counts: Vec<usize> = loads.iter().map(|l| l.load(Ordering::SeqCst)).collect();
        assert!(
            counts.iter().all(|&n| n == 1),
            "every id loaded exactly once fleet-wide: {counts:?}"
        );
    }

    pub async fn an_invalidation_during_the_load_refuses_that_id_only(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("product").unwrap();
        let sources: Arc<BTreeMap<u32, Source>> =
            Arc::new((1..=3).map(|id| (id, Source::default())).collect());
        let version = |s: &BTreeMap<u32, Source>, id: u32| s[&id].version.load(Ordering::SeqCst);
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        let filler = {
            let (c, sources, loaded, proceed) =
                (c.clone(), sources.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                c.get_or_set_many(&[1u32, 2, 3], |missing| {
                    // Reads version 0 of every id.
                    let read: Vec<(u32, u64)> = missing
                        .iter()
                        .map(|&&id| (id, version(&sources, id)))
                        .collect();
                    let (loaded, proceed) = (loaded.clone(), proceed.clone());
                    async move {
                        loaded.notify_one();
                        proceed.notified().await;
                        Ok::<_, std::io::Error>(read)
                    }
                })
                .await
            })
        };
        loaded.notified().await;
        // The source-of-truth write of id 2, then its invalidation, while the batch's fill is in flight.
        sources[&2].version.store(1, Ordering::SeqCst);
        c.invalidate(&2u32).await.unwrap();
        proceed.notify_one();
        assert_eq!(
            filler.await.unwrap().unwrap(),
            [0, 0, 0],
            "the batch's own caller sees its load"
        );
        assert_eq!(c.stats().fills_refused, 1, "{:?}", c.stats());
        // Ids 1 and 3 were stored; id 2's stale fill never landed.
        assert_eq!(c.get(&1u32).await.unwrap(), Some(0));
        assert_eq!(c.get(&3u32).await.unwrap(), Some(0));
        assert_eq!(c.get(&2u32).await.unwrap(), None);
        let calls = Calls::default();
        let fresh = c
            .get_or_set_many(&[1u32, 2, 3], |missing| {
                calls.record(&missing);
                let read: Vec<(u32, u64)> = missing
                    .iter()
                    .map(|&&id| (id, version(&sources, id)))
                    .collect();
                async move { Ok::<_, std::io::Error>(read) }
            })
            .await
            .unwrap();
        assert_eq!(fresh, [0, 1, 0]);
        assert_eq!(calls.take(), [vec![2]], "only the invalidated id is loaded");
    }

    pub async fn loader_errors_are_shared_and_not_cached(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let started = Arc::new(Notify::new());
        let fail = Arc::new(Notify::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let batch = {
            let (c, started, fail, loads) =
                (c.clone(), started.clone(), fail.clone(), loads.clone());
            tokio::spawn(async move {
                c.get_or_set_many(&[1u32, 2, 3], |_| {
                    loads.fetch_add(1, Ordering::SeqCst);
                    let (started, fail) = (started.clone(), fail.clone());
                    async move {
                        started.notify_one();
                        fail.notified().await;
                        Err::<Vec<(u32, String)>, _>(std::io::Error::other("database down"))
                    }
                })
                .await
            })
        };
        started.notified().await;
        // Callers of ids the batch is loading share its outcome (the same handle: one process). Polled once,
        // each has joined the flights of its ids and waits on them.
        let mut single = Box::pin(c.get_or_set(&2u32, || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("single".to_owned())
        }));
        assert!(futures_util::poll!(single.as_mut()).is_pending());
        let mut other_batch = Box::pin(c.get_or_set_many(&[3u32, 1], |missing| {
            loads.fetch_add(1, Ordering::SeqCst);
            async move { answer(&missing) }
        }));
        assert!(futures_util::poll!(other_batch.as_mut()).is_pending());
        fail.notify_one();
        let (single, other_batch) = tokio::join!(single, other_batch);
        for got in [
            batch.await.unwrap().map(drop),
            single.map(drop),
            other_batch.map(drop),
        ] {
            match got {
                Err(Error::Loader { class, source }) => {
                    assert_eq!(class, "product");
                    assert!(source.to_string().contains("database down"), "{source}");
                }
                other => panic!("expected the shared loader error, got {other:?}"),
            }
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "one load, its error shared"
        );
        for id in [1u32, 2, 3] {
            assert_eq!(c.get(&id).await.unwrap(), None, "error not cached");
        }
        // The leases were given back: the next batch loads every id at once.
        let calls = Calls::default();
        let got = c
            .get_or_set_many(&[1u32, 2, 3], |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(got, ["v1", "v2", "v3"]);
        assert_eq!(calls.take(), [vec![1, 2, 3]]);
    }

    pub async fn an_id_the_loader_omits(h: Harness) {
        let kw = h.keyward().await;
        // Without negative caching: an error naming the class and the id; the other ids are cached.
        let c = kw.cache::<String>("product").unwrap();
        let err = c
            .get_or_set_many(&[1u32, 2, 3], |missing| async move {
                let found: Vec<(u32, String)> = missing
                    .into_iter()
                    .filter(|&&id| id != 2)
                    .map(|&id| (id, value(id)))
                    .chain([(99, "not asked for".to_owned())])
                    .collect();
                Ok::<_, std::io::Error>(found)
            })
            .await
            .unwrap_err();
        let Error::Loader { class, source } = &err else {
            panic!("expected a loader error, got {err}");
        };
        assert_eq!(class, "product");
        let missing = source
            .downcast_ref::<MissingFromBatch>()
            .unwrap_or_else(|| panic!("source names the id: {source}"));
        assert_eq!(missing.id, "2");
        assert!(err.to_string().contains("product"), "{err}");
        assert_eq!(c.get(&1u32).await.unwrap(), Some(value(1)));
        assert_eq!(c.get(&3u32).await.unwrap(), Some(value(3)));
        assert_eq!(c.get(&2u32).await.unwrap(), None);
        assert_eq!(
            c.get(&99u32).await.unwrap(),
            None,
            "ids not asked for are ignored"
        );

        // `_opt`: an omitted id is `None`, cached for `negative_ttl`.
        let maybe = kw.cache::<String>("maybe").unwrap();
        let calls = Calls::default();
        for _ in 0..2 {
            let got = maybe
                .get_or_set_many_opt(&[1u32, 2, 3], |missing| {
                    calls.record(&missing);
                    async move {
                        Ok::<_, std::io::Error>(
                            missing
                                .into_iter()
                                .filter(|&&id| id != 2)
                                .map(|&id| (id, value(id)))
                                .collect::<Vec<_>>(),
                        )
                    }
                })
                .await
                .unwrap();
            assert_eq!(got, [Some(value(1)), None, Some(value(3))]);
        }
        assert_eq!(calls.take(), [vec![1, 2, 3]], "the absence was cached");
        assert_eq!(maybe.stats().negative_hits, 1, "{:?}", maybe.stats());
    }

    pub async fn size_limit_and_loader_timeout_per_batch(h: Harness) {
        let kw = h.keyward().await;
        // `small` holds values of at most 64 bytes: the oversized id is the error, the others are stored.
        let small = kw.cache::<String>("small").unwrap();
        let err = small
            .get_or_set_many(&[1u32, 2], |missing| async move {
                Ok::<_, std::io::Error>(
                    missing
                        .into_iter()
                        .map(|&id| (id, if id == 2 { "x".repeat(100) } else { value(id) }))
                        .collect::<Vec<_>>(),
                )
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::ValueTooLarge { class, .. } if class == "small"),
            "{err}"
        );
        assert_eq!(small.get(&1u32).await.unwrap(), Some(value(1)));
        assert_eq!(small.get(&2u32).await.unwrap(), None);

        // `short`: loader_timeout 300 ms. Every id gets the timeout; the leases are given back at once.
        let short = kw.cache::<String>("short").unwrap();
        let err = short
            .get_or_set_many(&[1u32, 2], |_| {
                std::future::pending::<Result<Vec<(u32, String)>, std::io::Error>>()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LoaderTimeout { .. }), "{err}");
        let got = short
            .get_or_set_many(&[1u32, 2], |missing| async move { answer(&missing) })
            .await
            .unwrap();
        assert_eq!(got, ["v1", "v2"]);
        assert_eq!(short.stats().lease_waits, 0, "nobody waited for a lease");
    }

    pub async fn ids_over_many_slots_in_one_pipeline_each(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        let ids: Vec<u32> = (0..300).collect();
        // Warm the connection, the epochs and the commit script, so the counts below are the batches' alone.
        c.get_or_set(&100_000u32, || async { Ok::<_, std::io::Error>(value(0)) })
            .await
            .unwrap();
        let mut nodes = h.node_connections();
        let reset = |nodes: &mut Vec<::redis::Connection>| {
            for con in nodes.iter_mut() {
                let () = ::redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query(con)
                    .expect("CONFIG RESETSTAT");
            }
        };
        if !h.is_cluster() {
            reset(&mut nodes);
        }
        let calls = Calls::default();
        let got = c
            .get_or_set_many(&ids, |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(got, ids.iter().map(|&id| value(id)).collect::<Vec<_>>());
        assert_eq!(calls.take(), std::slice::from_ref(&ids));
        let hits = c
            .get_or_set_many(&ids, |missing| {
                calls.record(&missing);
                async move { answer(&missing) }
            })
            .await
            .unwrap();
        assert_eq!(hits, got);
        assert!(calls.take().is_empty());
        if h.is_cluster() {
            // The shared cluster's counters include other tests: check the spread instead. Every primary
            // holds some of the ids, so the batch crossed slots (and nodes) and was answered whole.
            for con in &mut nodes {
                let pattern = format!("test:{}:product:*", h.app());
                let keys: Vec<String> = ::redis::cmd("SCAN")
                    .cursor_arg(0)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .clone()
                    .iter(con)
                    .expect("scan")
                    .map(|k: ::redis::RedisResult<String>| k.expect("key"))
                    .collect();
                assert!(!keys.is_empty(), "a primary holds none of 300 ids");
            }
        } else if h.is_redis() {
            // One server: each batch is one pipeline (one HMGET of the epochs) of plain `SET … NX GET`s, no
            // fetch script; each fill is one commit script (whose GETRANGE and SET count here too).
            let stats = commandstats(&mut nodes[0]);
            assert_eq!(
                stats.get("hmget"),
                Some(&2),
                "one HMGET per batch: {stats:?}"
            );
            assert_eq!(stats.get("evalsha"), Some(&300), "300 commits: {stats:?}");
            assert_eq!(stats.get("getrange"), Some(&300), "{stats:?}");
            assert_eq!(stats.get("set"), Some(&(2 * 300 + 300)), "{stats:?}");
        }
        h.assert_no_acl_denials();
    }

    /// `INFO commandstats` as command → calls.
    fn commandstats(con: &mut ::redis::Connection) -> BTreeMap<String, u64> {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query(con)
            .expect("INFO");
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    pub async fn a_failed_batch_load_serves_the_kept_stale_values(h: Harness) {
        // Fails if a batch dropped the stale value a fail-safe lease keeps: a failed batch load would be an
        // error for every id although each single `get_or_set` would have served its old value.
        let kw = h.keyward().await;
        let kept = kw.cache::<String>("kept").unwrap();
        for id in [1u32, 2] {
            kept.set_tagged(&id, &value(id), &["batch"]).await.unwrap();
        }
        kw.expire_tag("batch").await.unwrap();
        let calls = Calls::default();
        let got = kept
            .get_or_set_many(&[1u32, 2], |missing| {
                calls.record(&missing);
                async { Err::<HashMap<u32, String>, _>(std::io::Error::other("source down")) }
            })
            .await
            .unwrap();
        assert_eq!(got, [value(1), value(2)], "the kept values, not the error");
        assert_eq!(calls.take(), [vec![1, 2]], "one loader call for both");
        assert_eq!(kept.stats().stale_served, 2);
        // Throttled, as a single call would be: served as is without asking the source again.
        let got = kept
            .get_or_set_many(&[1u32, 2], |missing| {
                calls.record(&missing);
                async { Err::<HashMap<u32, String>, _>(std::io::Error::other("source down")) }
            })
            .await
            .unwrap();
        assert_eq!(got, [value(1), value(2)]);
        assert!(
            calls.take().is_empty(),
            "the failing source is not asked during the throttle"
        );
        // An id with nothing kept still gets the error; a removal drops the kept value too.
        kw.invalidate_tag("batch").await.unwrap();
        let err = kept
            .get_or_set_many(&[1u32, 3], |_missing| async {
                Err::<HashMap<u32, String>, _>(std::io::Error::other("source down"))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err:?}");
    }
}

/// With the store unreachable and `on_error = "fail_open"`, a batch is answered by one loader call for every
/// id, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_down_fails_open_with_one_loader_call() {
    let server = keyward_testkit::RedisServer::spawn_tcp();
    let proxy = keyward_testkit::TcpProxy::to_server(&server);
    let h = Harness::embedded(); // only for its policy and app name
    // Generous timeouts: calls before the fault must not time out on a loaded machine.
    let options = keyward::ConnectOptions::default()
        .response_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1));
    let kw = Keyward::connect_with(&proxy.url(), h.policy(), options)
        .await
        .unwrap();
    let direct = Keyward::connect(&server.url(), h.policy()).await.unwrap();
    let c = kw.cache::<String>("product").unwrap();
    c.set(&1u32, &"cached".to_owned()).await.unwrap();
    proxy.blackhole();
    let calls = Calls::default();
    let got = c
        .get_or_set_many(&[1u32, 2, 3], |missing| {
            calls.record(&missing);
            async move { answer(&missing) }
        })
        .await
        .unwrap();
    assert_eq!(got, ["v1", "v2", "v3"], "the source answers every id");
    assert_eq!(calls.take(), [vec![1, 2, 3]]);
    assert_eq!(c.stats().fail_open, 3, "{:?}", c.stats());
    proxy.forward();
    let d = direct.cache::<String>("product").unwrap();
    assert_eq!(d.get(&1u32).await.unwrap().as_deref(), Some("cached"));
    for id in [2u32, 3] {
        assert_eq!(
            d.get(&id).await.unwrap(),
            None,
            "a fail-open load was stored"
        );
    }
}

/// One primary of a cluster frozen: the batch's pipelines to the live primaries are answered and filled, the
/// frozen primary's ids fail open in the same single loader call, and nothing lands there.
#[test]
fn one_frozen_primary_fails_open_only_its_own_ids() {
    use keyward_testkit::{ClusterOptions, RedisCluster};
    let mut cluster = RedisCluster::spawn_with(
        ClusterOptions::default()
            .node_timeout(Duration::from_millis(3000))
            .require_full_coverage(false),
    );
    let h = Harness::embedded(); // only for its policy and app name
    let rt = crate::common::runtime();
    let kw = rt
        .block_on(Keyward::connect_with(
            &cluster.seed_url(),
            h.policy(),
            keyward::ConnectOptions::default().response_timeout(Duration::from_secs(1)),
        ))
        .unwrap();
    let c = kw.cache::<String>("product").unwrap();
    let gens = cluster.master_for_key(&format!("test:{}:_kw:gens", h.app()));
    let master_of = |id: u32| cluster.master_for_key(&c.key(&id).unwrap()).port;
    let ids: Vec<u32> = (0..60).collect();
    let victim = ids
        .iter()
        .map(|&id| master_of(id))
        .find(|&port| port != gens.port)
        .unwrap();
    let (frozen, live): (Vec<u32>, Vec<u32>) = ids.iter().partition(|&&id| master_of(id) == victim);
    assert!(!frozen.is_empty() && !live.is_empty());
    // Warm the epochs view and the scripts.
    rt.block_on(c.get(&1000u32)).unwrap();
    cluster.pause(victim);
    let calls = Calls::default();
    let got = rt
        .block_on(c.get_or_set_many(&ids, |missing| {
            calls.record(&missing);
            async move { answer(&missing) }
        }))
        .unwrap();
    cluster.resume(victim);
    assert_eq!(got, ids.iter().map(|&id| value(id)).collect::<Vec<_>>());
    assert_eq!(
        calls.take(),
        std::slice::from_ref(&ids),
        "one loader call for all ids"
    );
    assert_eq!(c.stats().fail_open, frozen.len() as u64, "{:?}", c.stats());
    rt.block_on(async {
        for &id in &live {
            assert_eq!(c.get(&id).await.unwrap(), Some(value(id)), "live id {id}");
        }
    });
    // What the frozen primary holds for its ids once it runs again: nothing, or a lease the batch's undo is
    // about to give back, never a value.
    let mut raw = ::redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_connection()
        .unwrap();
    for &id in &frozen {
        let stored: Option<Vec<u8>> = ::redis::cmd("GET")
            .arg(c.key(&id).unwrap())
            .query(&mut raw)
            .unwrap();
        assert!(
            stored.as_ref().is_none_or(|s| s.starts_with(b"L1:")),
            "a fail-open load was stored for {id}: {:?}",
            stored.map(|s| String::from_utf8_lossy(&s).into_owned())
        );
    }
}
