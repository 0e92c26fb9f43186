//! Adversarial review of the batch eager refresh (`get_or_set_many` refreshing ahead inline): what the
//! loader leaves out of its answer, invalidations (key, tag, class) while the refresh's loader runs, and many
//! overlapping batches and single reads on two handles inside one refresh window; and, behind Sentinel, a
//! burst of first calls after a failover the handle did not hear about.

#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::Harness;
use keyward::{Cache, Keyward};

conformance!(
    a_batch_refresh_whose_loader_omits_an_id_keeps_its_current_value,
    a_batch_refresh_keeps_the_entry_s_tags,
    an_untagged_single_refresh_keeps_the_entry_s_tags,
    an_invalidation_during_a_batch_refresh_wins,
    a_class_invalidation_during_a_batch_refresh_wins,
    overlapping_batches_and_single_reads_refresh_each_id_once,
    a_sliding_log_peek_after_a_burst_counts_every_check,
);

fn v(tag: &str, id: u64) -> String {
    format!("{tag}-{id}")
}

/// Fill `ids` of the `eager` class (2 s TTL, refreshed ahead in its last 1.8 s) with `v1-{id}`, then wait
/// until a plain `get` of the first id still answers and 250 ms have passed (inside the refresh window).
async fn fill_then_enter_the_window(c: &Cache<String>, ids: &[u64], tags: &[&str]) -> Instant {
    for id in ids {
        c.get_or_set_tagged(id, tags, || async { Ok::<_, std::io::Error>(v("v1", *id)) })
            .await
            .unwrap();
    }
    let filled = Instant::now();
    // The window opens 200 ms after the fill; the TTL ends at 2 s. Time passing is the thing waited for.
    tokio::time::sleep(Duration::from_millis(250)).await;
    filled
}

/// One batch read whose loader answers with `answer(wanted)` after running `during`; returns the result and
/// what the loader was asked for.
async fn batch<Fut>(
    c: &Cache<String>,
    ids: &[u64],
    answer: impl Fn(&[u64]) -> Vec<(u64, String)>,
    during: impl Fn() -> Fut,
) -> (keyward::Result<Vec<String>>, Vec<u64>)
where
    Fut: std::future::Future<Output = ()>,
{
    let asked = Mutex::new(Vec::new());
    let got = c
        .get_or_set_many(ids, |wanted| {
            let wanted: Vec<u64> = wanted.into_iter().copied().collect();
            *asked.lock().unwrap() = wanted.clone();
            let answer = answer(&wanted);
            let during = during();
            async move {
                during.await;
                Ok::<_, std::io::Error>(answer)
            }
        })
        .await;
    (got, asked.into_inner().unwrap())
}

mod cases {
    use super::*;

    /// 64 concurrent checks of one id on a sliding log (1000 an hour): `peek` then reports exactly what
    /// the last check left.
    pub async fn a_sliding_log_peek_after_a_burst_counts_every_check(h: Harness) {
        use keyward::policy::{Algorithm, Policy, RateLimitClass};
        let policy = Policy::builder("test", format!("log-{}", h.app()))
            .rate_limit(
                "api",
                RateLimitClass::new(Algorithm::SlidingLog, 1000, Duration::from_secs(3600)),
            )
            .build()
            .unwrap();
        let kw = match h.url() {
            Some(url) => Keyward::connect(&url, policy).await.unwrap(),
            None => Keyward::embedded(policy),
        };
        let limiter = kw.rate_limiter("api").unwrap();
        let checks = (0..64).map(|_| {
            let limiter = limiter.clone();
            async move { limiter.check(&"u").await.unwrap().remaining() }
        });
        let remaining = futures_util::future::join_all(checks).await;
        assert_eq!(remaining.iter().min(), Some(&936));
        assert_eq!(limiter.peek(&"u").await.unwrap().remaining(), 936);
    }

    /// A refresh is not a miss: an id the loader's answer lacks still has a current value, which the caller
    /// got before today's change (batches gave the refresh lease back and served a hit). It must get it now
    /// too, not a `MissingFromBatch` error for a value that is in the cache and fresh.
    pub async fn a_batch_refresh_whose_loader_omits_an_id_keeps_its_current_value(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let ids = [1u64, 2];
        let filled = fill_then_enter_the_window(&c, &ids, &[]).await;
        // The source has id 1 only now (2 is being moved, say): the answer lacks 2.
        let (got, asked) = batch(
            &c,
            &ids,
            |w| {
                w.iter()
                    .filter(|&&id| id == 1)
                    .map(|&id| (id, v("v2", id)))
                    .collect()
            },
            || async {},
        )
        .await;
        assert!(
            filled.elapsed() < Duration::from_secs(2),
            "too slow: past the TTL"
        );
        assert_eq!(asked, ids, "both ids were due for a refresh");
        assert_eq!(got.unwrap(), ["v2-1", "v1-2"]);
        assert_eq!(c.get(&2).await.unwrap().as_deref(), Some("v1-2"));
    }

    /// An entry filled with tags, refreshed by a batch (which takes no tags), must still be removed by
    /// `invalidate_tag`: before today a batch never rewrote a fresh entry, now its refresh must not turn a
    /// tagged entry into an untagged one that a later tag invalidation misses.
    pub async fn a_batch_refresh_keeps_the_entry_s_tags(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let ids = [5u64];
        let filled = fill_then_enter_the_window(&c, &ids, &["cat:7"]).await;
        let (got, asked) = batch(
            &c,
            &ids,
            |w| w.iter().map(|&id| (id, v("v2", id))).collect(),
            || async {},
        )
        .await;
        assert_eq!(asked, ids, "due for a refresh");
        assert_eq!(got.unwrap(), ["v2-5"]);
        // The source of truth changes; its writer invalidates the tag.
        c.invalidate_tag("cat:7").await.unwrap();
        assert!(
            filled.elapsed() < Duration::from_secs(2),
            "too slow: past the TTL"
        );
        assert_eq!(
            c.get(&5).await.unwrap(),
            None,
            "a tag invalidation must remove the entry a batch refreshed"
        );
    }

    /// The same for an untagged `get_or_set` that wins the refresh of an entry a tagged call filled.
    pub async fn an_untagged_single_refresh_keeps_the_entry_s_tags(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let filled = fill_then_enter_the_window(&c, &[6], &["cat:8"]).await;
        let got = c
            .get_or_set(&6, || async { Ok::<_, std::io::Error>(v("v2", 6)) })
            .await
            .unwrap();
        assert_eq!(got, "v2-6", "due for a refresh");
        c.invalidate_tag("cat:8").await.unwrap();
        assert!(
            filled.elapsed() < Duration::from_secs(2),
            "too slow: past the TTL"
        );
        assert_eq!(c.get(&6).await.unwrap(), None);
    }

    /// `invalidate` (key) and `invalidate_tag` while the batch's refresh loader runs: the refreshed value
    /// (loaded before the write) is returned to the caller but never stored, and no later read serves it or
    /// the pre-invalidation value.
    pub async fn an_invalidation_during_a_batch_refresh_wins(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let ids = [1u64, 2];
        let filled = fill_then_enter_the_window(&c, &ids, &["cat:1"]).await;
        let (got, asked) = batch(
            &c,
            &ids,
            |w| w.iter().map(|&id| (id, v("v2", id))).collect(),
            || {
                let c = c.clone();
                async move {
                    c.invalidate(&1).await.unwrap();
                    c.invalidate_tag("cat:1").await.unwrap();
                }
            },
        )
        .await;
        assert!(
            filled.elapsed() < Duration::from_secs(2),
            "too slow: past the TTL"
        );
        assert_eq!(asked, ids);
        assert_eq!(got.unwrap(), ["v2-1", "v2-2"]);
        for id in ids {
            assert_eq!(
                c.get(&id).await.unwrap(),
                None,
                "id {id}: an invalidation during the load must win"
            );
        }
        let (again, asked) = batch(
            &c,
            &ids,
            |w| w.iter().map(|&id| (id, v("v3", id))).collect(),
            || async {},
        )
        .await;
        assert_eq!(asked, ids);
        assert_eq!(again.unwrap(), ["v3-1", "v3-2"]);
    }

    /// `invalidate_all` (the class) while the batch's refresh loader runs wins as well.
    pub async fn a_class_invalidation_during_a_batch_refresh_wins(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("eager").unwrap();
        let ids = [1u64, 2, 3];
        let filled = fill_then_enter_the_window(&c, &ids, &[]).await;
        let (got, _) = batch(
            &c,
            &ids,
            |w| w.iter().map(|&id| (id, v("v2", id))).collect(),
            || {
                let c = c.clone();
                async move { c.invalidate_all().await.unwrap() }
            },
        )
        .await;
        assert!(
            filled.elapsed() < Duration::from_secs(2),
            "too slow: past the TTL"
        );
        assert_eq!(got.unwrap(), ["v2-1", "v2-2", "v2-3"]);
        for id in ids {
            assert_eq!(c.get(&id).await.unwrap(), None, "id {id}");
        }
    }

    /// Two handles, 24 concurrent readers inside one refresh window: batches over overlapping ids and single
    /// `get_or_set` calls, the loader slow (100 ms). Each id is loaded exactly once fleet-wide, every reader
    /// gets `v1` or `v2` and never an error, and afterwards every id reads `v2`.
    pub async fn overlapping_batches_and_single_reads_refresh_each_id_once(h: Harness) {
        let hs: Vec<Keyward> = h.handles(2).await;
        let caches: Vec<Cache<String>> = hs.iter().map(|k| k.cache("eager").unwrap()).collect();
        let ids = [1u64, 2, 3, 4];
        let filled = fill_then_enter_the_window(&caches[0], &ids, &[]).await;
        let loads: std::sync::Arc<Mutex<HashMap<u64, usize>>> = Default::default();
        let subsets: [&[u64]; 6] = [
            &[1, 2],
            &[2, 3],
            &[3, 4],
            &[4, 1],
            &[1, 2, 3, 4],
            &[2, 2, 4],
        ];
        let mut tasks = Vec::new();
        for r in 0..24usize {
            let c = caches[r % 2].clone();
            let loads = std::sync::Arc::clone(&loads);
            tasks.push(tokio::spawn(async move {
                let slow = Duration::from_millis(100);
                if r % 3 == 2 {
                    let id = ids[r % 4];
                    let got = c
                        .get_or_set(&id, || {
                            *loads.lock().unwrap().entry(id).or_default() += 1;
                            async move {
                                tokio::time::sleep(slow).await;
                                Ok::<_, std::io::Error>(v("v2", id))
                            }
                        })
                        .await;
                    (vec![id], got.map(|g| vec![g]))
                } else {
                    let sub = subsets[r % 6];
                    let got = c
                        .get_or_set_many(sub, |wanted| {
                            let mut l = loads.lock().unwrap();
                            let answer: Vec<(u64, String)> = wanted
                                .iter()
                                .map(|&&id| {
                                    *l.entry(id).or_default() += 1;
                                    (id, v("v2", id))
                                })
                                .collect();
                            async move {
                                tokio::time::sleep(slow).await;
                                Ok::<_, std::io::Error>(answer)
                            }
                        })
                        .await;
                    (sub.to_vec(), got)
                }
            }));
        }
        for t in tasks {
            let (sub, got) = t.await.unwrap();
            let got = got.unwrap_or_else(|e| panic!("{sub:?}: a reader got an error: {e}"));
            for (id, g) in sub.iter().zip(got) {
                assert!(g == v("v1", *id) || g == v("v2", *id), "{id}: {g}");
            }
        }
        assert!(
            filled.elapsed() < Duration::from_secs(2),
            "too slow: past the TTL"
        );
        let loads = loads.lock().unwrap().clone();
        for id in ids {
            assert_eq!(
                loads.get(&id),
                Some(&1),
                "id {id} loaded {:?} times: {loads:?}",
                loads.get(&id)
            );
            assert_eq!(caches[1].get(&id).await.unwrap(), Some(v("v2", id)));
        }
    }
}

/// `cmdstat_sentinel` calls summed over the set's sentinels (every `SENTINEL …` query, the follower's
/// `get-master-addr-by-name` included).
fn sentinel_queries(set: &keyward_testkit::SentinelSet) -> u64 {
    set.sentinel_ports()
        .into_iter()
        .map(|port| {
            let mut con = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_connection()
                .unwrap();
            let info: String = ::redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut con)
                .unwrap();
            // Redis 7 counts each subcommand apart: `cmdstat_sentinel|get-master-addr-by-name:calls=…`.
            info.lines()
                .filter(|l| l.starts_with("cmdstat_sentinel"))
                .filter_map(|l| {
                    l.split_once(":calls=")?
                        .1
                        .split(',')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>()
        })
        .sum()
}

/// Behind Sentinel, an idle handle that cannot hear `+switch-master` (its sentinel user has no channels),
/// right after a failover: a burst of 64 concurrent calls (a service's first requests after a quiet spell).
/// Every call ends within its response timeout, the sentinels are not asked once per call, and no call times
/// out or is refused by the breaker: each is sent to the new master, or fails at once with a connection
/// error that may have reached the old one (a write the dead socket reset), which is never resent.
///
/// Before, only the call the dead port refused was resent: the others waited on the connection manager's
/// reconnect attempts against the dead port (or were refused by the breaker those failures opened) and
/// failed after the full response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_calls_after_an_unheard_failover_reaches_the_new_master() {
    use keyward::ConnectOptions;
    use keyward::policy::{CacheClass, Policy};
    let mut set = tokio::task::spawn_blocking(keyward_testkit::SentinelSet::spawn)
        .await
        .unwrap();
    let url = set.url_as_poller();
    let policy = Policy::builder("test", "burst")
        .cache("c", CacheClass::new(Duration::from_secs(60), "tests"))
        .build()
        .unwrap();
    let timeout = Duration::from_secs(2);
    let kw = Keyward::connect_with(
        &url,
        policy,
        ConnectOptions::default().response_timeout(timeout),
    )
    .await
    .unwrap();
    let cache = kw.cache::<String>("c").unwrap();
    cache.set(&"warm", &"v".to_owned()).await.unwrap();
    let (old, _) = set.kill_master();
    let set = std::sync::Arc::new(set);
    {
        let set = std::sync::Arc::clone(&set);
        tokio::task::spawn_blocking(move || set.wait_new_master(old))
            .await
            .unwrap();
    }
    let before = sentinel_queries(&set);
    let calls = (0..64u32).map(|i| {
        let cache = cache.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = cache.set(&i, &format!("v{i}")).await;
            (started.elapsed(), r)
        })
    });
    let ended = futures_util::future::join_all(calls).await;
    let asked = sentinel_queries(&set) - before;
    assert!(asked <= 9, "64 calls asked the sentinels {asked} times");
    let mut failed = 0;
    for e in ended {
        let (took, r) = e.unwrap();
        assert!(
            took < timeout + Duration::from_millis(300),
            "a call took {took:?}"
        );
        match r {
            Ok(()) => {}
            Err(keyward::Error::Redis { source, .. }) if source.is_connection_failure() => {
                failed += 1;
            }
            Err(e) => panic!("a call failed with {e} after {took:?}"),
        }
    }
    assert!(failed < 64, "no call reached the new master");
}
