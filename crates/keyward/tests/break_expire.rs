//! An adversarial review of tag *expiry* (`Keyward::expire_tag`), on every backend: an expired value is never
//! served as fresh — not by plain reads, L1 classes, batches, refills leased before the expiry, eager
//! refreshes or soft timeouts, nor when the caller did not name the expired tag — and stays the fail-safe
//! fallback of classes with `stale_grace`; corrupt `x:` fields read as expiries, never as errors; pruning
//! `x:` fields brings nothing back; epoch fields written at the top of the range (2^53 - 1) never swallow a
//! removal ("Exhaustion" in `cache/epochs.lua`).

#![allow(unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::Harness;
use keyward::{CacheLookup, Error, StaleReason};
use tokio::sync::Notify;

/// `ConnectOptions::group_invalidation_bound`'s default: on Redis Cluster, a call starting this long after a
/// write behind keyward's back sees it.
const DEFAULT_BOUND: Duration = Duration::from_millis(500);

conformance!(
    a_corrupt_expiry_field_reads_as_expired_never_as_an_error,
    the_fast_path_calls_corrupt_what_the_scripts_call_corrupt,
    a_corrupt_expiry_field_is_not_repaired_to_the_end_of_the_epochs,
    expiring_a_tag_the_caller_did_not_name_still_expires_the_entry,
    sets_after_an_expiry_are_fresh,
    batches_never_return_an_expired_value_as_fresh,
    l1_classes_never_serve_an_expired_value,
    a_negative_caching_class_reloads_an_expired_entry,
    a_soft_timeout_serves_the_expired_value_stale_and_it_stays_expired,
    an_eager_refresh_leased_before_an_expiry_never_lands_as_fresh,
    a_refill_leased_before_a_second_expiry_or_a_removal_never_lands_as_fresh,
    pruning_expiry_fields_brings_nothing_back,
    a_near_limit_expiry_field_never_swallows_a_removal,
    a_tag_field_next_to_the_top_is_rebased_and_a_removal_wins,
    a_class_field_at_the_top_never_swallows_an_invalidation,
    a_namespace_epoch_at_the_top_caches_nothing_until_its_hash_expires,
);

/// The last valid epoch, 2^53 - 1 (`epochs.lua`'s `KW_TOP`).
const TOP: u64 = (1 << 53) - 1;

fn ok<T>(v: T) -> Result<T, std::io::Error> {
    Ok(v)
}

fn broken<T>() -> Result<T, std::io::Error> {
    Err(std::io::Error::other("source down"))
}

fn gens_key(h: &Harness) -> String {
    format!("test:{}:_kw:gens", h.app())
}

/// Write a field of the epochs hash behind keyward's back (Redis only), then wait out the Cluster view's bound.
async fn poke_epoch(h: &Harness, raw: &mut dyn ::redis::ConnectionLike, field: &str, value: &str) {
    ::redis::cmd("HSET")
        .arg(gens_key(h))
        .arg(field)
        .arg(value)
        .exec(raw)
        .unwrap();
    if h.is_cluster() {
        tokio::time::sleep(DEFAULT_BOUND).await;
    }
}

mod cases {
    use super::*;

    /// A loader that must not run (the source is throttled).
    fn unreachable_loader() -> Result<u32, std::io::Error> {
        Err(std::io::Error::other("the throttled source was asked"))
    }

    pub async fn a_corrupt_expiry_field_reads_as_expired_never_as_an_error(h: Harness) {
        let Some(mut raw) = h.raw() else {
            return; // the embedded keyspace only holds what keyward wrote
        };
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        let plain = kw.cache::<u32>("product").unwrap();
        let junk = [
            "garbage",
            "99999999999999999999",
            "9007199254740992",
            "-5",
            "1.5",
            "",
        ];
        for (i, junk) in junk.iter().enumerate() {
            let tag = format!("c{i}");
            let tags = [tag.as_str()];
            let i = u32::try_from(i).unwrap();
            kept.set_tagged(&i, &(i + 1), &tags).await.unwrap();
            plain.set_tagged(&i, &(i + 1), &tags).await.unwrap();
            poke_epoch(&h, raw.as_mut(), &format!("x:{tag}"), junk).await;
            // Repairing bumps the field: entries filled before it are expired, never an error, never fresh.
            assert_eq!(kept.get(&i).await.unwrap(), None, "{junk:?}");
            assert_eq!(plain.get(&i).await.unwrap(), None, "{junk:?}");
            let (v, how) = kept
                .get_or_set_tagged_with_status(&i, &tags, || async { broken() })
                .await
                .unwrap();
            assert_eq!(
                (v, how),
                (i + 1, CacheLookup::Stale(StaleReason::LoaderError)),
                "{junk:?}: expired, so kept for fail-safe"
            );
            let err = plain
                .get_or_set_tagged(&i, &tags, || async { broken() })
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Loader { .. }), "{junk:?}: {err:?}");
            // The failed refill throttled the source: the fallback is current for `fail_safe_throttle`
            // (stored under the refill lease's stamp, i.e. the repaired epoch)…
            let (v, how) = kept
                .get_or_set_tagged_with_status(&i, &tags, || async { ok(100) })
                .await
                .unwrap();
            assert_eq!((v, how), (i + 1, CacheLookup::Hit), "{junk:?}");
            // …and the repaired field works as any other: a new expiry expires that copy too.
            kw.expire_tag(&tag).await.unwrap();
            assert_eq!(kept.get(&i).await.unwrap(), None, "{junk:?}");
            let (v, how) = kept
                .get_or_set_tagged_with_status(&i, &tags, || async { ok(100) })
                .await
                .unwrap();
            assert_eq!((v, how), (100, CacheLookup::Miss), "{junk:?}");
            assert_eq!(kept.get(&i).await.unwrap(), Some(100), "{junk:?}");
        }
    }

    pub async fn the_fast_path_calls_corrupt_what_the_scripts_call_corrupt(h: Harness) {
        // Fails if the fast path (`HMGET` decoded in Rust) read a field `epochs.lua` calls corrupt (a sign, more
        // than 16 digits) as a number: it would serve as fresh a value the scripts treat as expired.
        let Some(mut raw) = h.raw() else {
            return; // the embedded keyspace only holds what keyward wrote
        };
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        for (i, junk) in ["+1", "00000000000000001", " 1"].iter().enumerate() {
            let tag = format!("f{i}");
            let tags = [tag.as_str()];
            let i = u32::try_from(i).unwrap();
            // An entry recording an epoch above 1 (filled after an expiry of its tag).
            kw.expire_tag(&tag).await.unwrap();
            kept.set_tagged(&i, &(i + 1), &tags).await.unwrap();
            poke_epoch(&h, raw.as_mut(), &format!("x:{tag}"), junk).await;
            // The first read after the corruption goes through the fast path.
            let (v, how) = kept
                .get_or_set_tagged_with_status(&i, &tags, || async { broken() })
                .await
                .unwrap();
            assert_eq!(
                (v, how),
                (i + 1, CacheLookup::Stale(StaleReason::LoaderError)),
                "{junk:?} is corrupt: repaired, so the entry is expired"
            );
        }
    }

    pub async fn a_corrupt_expiry_field_is_not_repaired_to_the_end_of_the_epochs(h: Harness) {
        // Fails if a bump took a corrupt field's face value (Lua's `tonumber` reads "9.007199254740991e15" as
        // 2^53 - 1) as its floor: the repair lands on 2^53, out of range, so the field stays corrupt, fills
        // record 2^53, and a removal (whose floor then reads the out-of-range field as 0) is lost.
        let Some(mut raw) = h.raw() else {
            return; // the embedded keyspace only holds what keyward wrote
        };
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        for (i, junk) in ["9.007199254740991e15", "0x1fffffffffffff", "9e15"]
            .iter()
            .enumerate()
        {
            let tag = format!("e{i}");
            let tags = [tag.as_str()];
            let i = u32::try_from(i).unwrap();
            poke_epoch(&h, raw.as_mut(), &format!("x:{tag}"), junk).await;
            assert_eq!(c.get(&i).await.unwrap(), None);
            c.set_tagged(&i, &1, &tags).await.unwrap();
            assert_eq!(c.get(&i).await.unwrap(), Some(1), "{junk:?}");
            kw.invalidate_tag(&tag).await.unwrap();
            assert_eq!(c.get(&i).await.unwrap(), None, "{junk:?}: the removal");
            c.set_tagged(&i, &2, &tags).await.unwrap();
            kw.expire_tag(&tag).await.unwrap();
            assert_eq!(c.get(&i).await.unwrap(), None, "{junk:?}: the expiry");
        }
    }

    pub async fn expiring_a_tag_the_caller_did_not_name_still_expires_the_entry(h: Harness) {
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        let plain = kw.cache::<u32>("product").unwrap();
        kept.set_tagged("k", &1, &["a", "b"]).await.unwrap();
        plain.set_tagged("k", &1, &["a", "b"]).await.unwrap();
        let (v, how) = kept
            .get_or_set_tagged_with_status("k", &["b"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Hit));
        kw.expire_tag("a").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), None);
        assert_eq!(plain.get("k").await.unwrap(), None);
        // A caller naming only `b` (or no tag) judges the entry by the tags it carries: `a` expired it.
        let (v, how) = kept
            .get_or_set_tagged_with_status("k", &["b"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Stale(StaleReason::LoaderError)));
        // That failed refill throttled the source: for `fail_safe_throttle` the fallback is served as is,
        // to every caller, without asking the source (FusionCache's fail-safe throttle).
        let (v, how) = kept
            .get_or_set_with_status("k", || async { unreachable_loader() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Hit));
        // An untagged caller judges an entry by the tags it carries too.
        kept.set_tagged("k3", &1, &["a", "b"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        let (v, how) = kept
            .get_or_set_with_status("k3", || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Stale(StaleReason::LoaderError)));
        let err = plain
            .get_or_set_tagged("k", &["b"], || async { broken() })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err:?}");
        // The refill records only the tags its caller named: `a` no longer concerns it, `b` does.
        kept.set_tagged("k2", &1, &["a", "b"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        let (v, how) = kept
            .get_or_set_tagged_with_status("k2", &["b"], || async { ok(2) })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Miss));
        kw.expire_tag("a").await.unwrap();
        assert_eq!(kept.get("k2").await.unwrap(), Some(2));
        kw.expire_tag("b").await.unwrap();
        assert_eq!(kept.get("k2").await.unwrap(), None);
    }

    pub async fn sets_after_an_expiry_are_fresh(h: Harness) {
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        kept.set_tagged("k", &1, &["a"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), None);
        // A set records the current epochs: after the expiry, so it is fresh…
        kept.set_tagged("k", &2, &["a"]).await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), Some(2));
        let (v, how) = kept
            .get_or_set_tagged_with_status("k", &["a"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Hit));
        // …and the next expiry expires it.
        kw.expire_tag("a").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), None);
        // An untagged set over an expired entry is fresh and no tag concerns it any more.
        kept.set("k", &3).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), Some(3));
        // A set under another tag likewise.
        kept.set_tagged("k", &4, &["a"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        kept.set_tagged("k", &5, &["b"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), Some(5));
    }

    pub async fn batches_never_return_an_expired_value_as_fresh(h: Harness) {
        let kw = h.keyward().await;
        for class in ["product", "kept"] {
            let c = kw.cache::<u32>(class).unwrap();
            let tag = format!("batch:{class}");
            for i in 0..4u32 {
                c.set_tagged(&i, &i, &[tag.as_str()]).await.unwrap();
            }
            c.set(&9u32, &9).await.unwrap();
            kw.expire_tag(&tag).await.unwrap();
            let asked = Mutex::new(Vec::new());
            let got = c
                .get_or_set_many(&[0u32, 1, 2, 3, 9], |missing| {
                    let mut ids: Vec<u32> = missing.iter().map(|id| **id).collect();
                    ids.sort_unstable();
                    asked.lock().unwrap().push(ids.clone());
                    async move { ok(ids.into_iter().map(|id| (id, id + 100)).collect::<Vec<_>>()) }
                })
                .await
                .unwrap();
            assert_eq!(got, [100, 101, 102, 103, 9], "{class}");
            assert_eq!(*asked.lock().unwrap(), [vec![0, 1, 2, 3]], "{class}");
            for i in 0..4u32 {
                assert_eq!(c.get(&i).await.unwrap(), Some(i + 100), "{class}");
            }
            // A failing batch loader over expired entries: without fail-safe an error; with it (`kept`),
            // each expired id's kept value, throttled as a single call would be. Entries the batch did not
            // ask for stay expired.
            for i in 0..4u32 {
                c.set_tagged(&i, &i, &[tag.as_str()]).await.unwrap();
            }
            kw.expire_tag(&tag).await.unwrap();
            let got = c
                .get_or_set_many(&[0u32, 1, 9], |_| async { broken::<Vec<(u32, u32)>>() })
                .await;
            if class == "kept" {
                assert_eq!(got.unwrap(), [0, 1, 9], "{class}: the kept values");
                assert_eq!(c.get(&0u32).await.unwrap(), Some(0), "{class}: throttled");
                for i in 2..4u32 {
                    assert_eq!(c.get(&i).await.unwrap(), None, "{class}: {i}");
                }
                let (v, how) = c
                    .get_or_set_tagged_with_status(&2u32, &[tag.as_str()], || async { broken() })
                    .await
                    .unwrap();
                assert_eq!((v, how), (2, CacheLookup::Stale(StaleReason::LoaderError)));
            } else {
                let err = got.unwrap_err();
                assert!(matches!(err, Error::Loader { .. }), "{class}: {err:?}");
                for i in 0..4u32 {
                    assert_eq!(c.get(&i).await.unwrap(), None, "{class}: {i}");
                }
            }
        }
    }

    pub async fn l1_classes_never_serve_an_expired_value(h: Harness) {
        let kw = h.keyward().await;
        let near = kw.cache::<u32>("near").unwrap();
        near.get_or_set_tagged("k", &["n"], || async { ok(1) })
            .await
            .unwrap();
        // A new handle serves from L1 once its first heartbeat came back (it vouches for nothing before):
        // read until the in-process copy answers. On a loaded machine that echo can come after the fill
        // (CI saw a `Hit` here once).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (v, how) = near
                .get_or_set_tagged_with_status("k", &["n"], || async { broken() })
                .await
                .unwrap();
            assert_eq!(v, 1);
            if how == CacheLookup::L1Hit {
                break;
            }
            assert_eq!(
                how,
                CacheLookup::Hit,
                "read from Redis until L1 is vouched for"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "L1 never served the in-process copy"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(near.get("k").await.unwrap(), Some(1));
        near.expire_tag("n").await.unwrap();
        // No stale_grace: expiring is removing, in both tiers.
        assert_eq!(near.get("k").await.unwrap(), None);
        let err = near
            .get_or_set_tagged("k", &["n"], || async { broken() })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err:?}");
        let (v, how) = near
            .get_or_set_tagged_with_status("k", &["n"], || async { ok(2) })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Miss));
        assert_eq!(near.get("k").await.unwrap(), Some(2));
        // A value loaded while the expiry runs is not kept in L1 past it.
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        near.invalidate("k").await.unwrap();
        let filler = {
            let (near, loaded, proceed) = (near.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                near.get_or_set_tagged("k", &["n"], || async move {
                    loaded.notify_one();
                    proceed.notified().await;
                    ok(3)
                })
                .await
            })
        };
        loaded.notified().await;
        kw.expire_tag("n").await.unwrap();
        proceed.notify_one();
        assert_eq!(filler.await.unwrap().unwrap(), 3);
        assert_eq!(
            near.get("k").await.unwrap(),
            None,
            "leased before the expiry: neither tier serves it"
        );
    }

    pub async fn a_negative_caching_class_reloads_an_expired_entry(h: Harness) {
        let kw = h.keyward().await;
        let maybe = kw.cache::<u32>("maybe").unwrap();
        maybe.set_tagged("k", &1, &["m"]).await.unwrap();
        kw.expire_tag("m").await.unwrap();
        assert_eq!(maybe.get("k").await.unwrap(), None);
        // No stale_grace: the expired value is gone; the source now says "absent", which is cached.
        let v = maybe
            .get_or_set_opt("k", || async { ok(None::<u32>) })
            .await
            .unwrap();
        assert_eq!(v, None);
        let again = maybe
            .get_or_set_opt("k", || async { ok(Some(7)) })
            .await
            .unwrap();
        assert_eq!(again, None, "the cached absent is a hit");
        // An absent carries no tags: expiring the tag again does not touch it.
        kw.expire_tag("m").await.unwrap();
        let again = maybe
            .get_or_set_opt("k", || async { ok(Some(7)) })
            .await
            .unwrap();
        assert_eq!(again, None);
    }

    pub async fn a_soft_timeout_serves_the_expired_value_stale_and_it_stays_expired(h: Harness) {
        let kw = h.keyward().await;
        let soft = kw.cache::<u32>("soft").unwrap();
        soft.set_tagged("k", &1, &["s"]).await.unwrap();
        kw.expire_tag("s").await.unwrap();
        let never = Arc::new(Notify::new());
        let (v, how) = soft
            .get_or_set_tagged_with_status("k", &["s"], || async move {
                never.notified().await;
                ok(2)
            })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Stale(StaleReason::SoftTimeout)));
        // The abandoned refill gave the kept value back: still expired, still the fallback.
        assert_eq!(soft.get("k").await.unwrap(), None);
        let (v, how) = soft
            .get_or_set_tagged_with_status("k", &["s"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Stale(StaleReason::LoaderError)));
        // That failure throttles the source: the fallback is served as is for `fail_safe_throttle`.
        let (v, how) = soft
            .get_or_set_tagged_with_status("k", &["s"], || async { unreachable_loader() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Hit));
    }

    pub async fn an_eager_refresh_leased_before_an_expiry_never_lands_as_fresh(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("safe_eager").unwrap();
        c.set_tagged("k", &0, &["e"]).await.unwrap();
        // Into the refresh window (the last 150 ms of its 200 ms TTL).
        tokio::time::sleep(Duration::from_millis(80)).await;
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        let refresher = {
            let (c, loaded, proceed) = (c.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                c.get_or_set_tagged_with_status("k", &["e"], || async move {
                    loaded.notify_one();
                    proceed.notified().await;
                    ok(1)
                })
                .await
            })
        };
        loaded.notified().await;
        kw.expire_tag("e").await.unwrap();
        assert_eq!(
            c.get("k").await.unwrap(),
            None,
            "kept under the refresh lease, but expired"
        );
        proceed.notify_one();
        refresher.await.unwrap().unwrap();
        assert_eq!(
            c.get("k").await.unwrap(),
            None,
            "the refresh was leased before the expiry"
        );
        let (v, how) = c
            .get_or_set_tagged_with_status("k", &["e"], || async { ok(2) })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Miss));
    }

    pub async fn a_refill_leased_before_a_second_expiry_or_a_removal_never_lands_as_fresh(
        h: Harness,
    ) {
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("kept").unwrap();
        for remove in [false, true] {
            let key = if remove { "k-removed" } else { "k-expired" };
            c.set_tagged(key, &0, &["r"]).await.unwrap();
            kw.expire_tag("r").await.unwrap();
            let loaded = Arc::new(Notify::new());
            let proceed = Arc::new(Notify::new());
            let filler = {
                let (c, loaded, proceed) = (c.clone(), loaded.clone(), proceed.clone());
                tokio::spawn(async move {
                    c.get_or_set_tagged_with_status(key, &["r"], || async move {
                        loaded.notify_one();
                        proceed.notified().await;
                        ok(1)
                    })
                    .await
                })
            };
            loaded.notified().await;
            if remove {
                kw.invalidate_tag("r").await.unwrap();
            } else {
                kw.expire_tag("r").await.unwrap();
            }
            proceed.notify_one();
            let (v, _) = filler.await.unwrap().unwrap();
            assert_eq!(v, 1, "the filler gets what it loaded");
            assert_eq!(c.get(key).await.unwrap(), None, "remove: {remove}");
            let fallback = c
                .get_or_set_tagged_with_status(key, &["r"], || async { broken() })
                .await;
            if remove {
                assert!(
                    matches!(fallback, Err(Error::Loader { .. })),
                    "a removal drops the kept value: {fallback:?}"
                );
            } else {
                let (v, how) = fallback.unwrap();
                assert_eq!(
                    v, 1,
                    "the refill, expired by the second expiry, is the fallback"
                );
                assert_eq!(how, CacheLookup::Stale(StaleReason::LoaderError));
            }
            // After a removal the refill loads; after the failed refill of an expired value, the source is
            // throttled and the fallback served as is.
            let (v, how) = c
                .get_or_set_tagged_with_status(key, &["r"], || async { ok(2) })
                .await
                .unwrap();
            let expected = if remove {
                (2, CacheLookup::Miss)
            } else {
                (1, CacheLookup::Hit)
            };
            assert_eq!((v, how), expected, "remove: {remove}");
        }
    }

    pub async fn pruning_expiry_fields_brings_nothing_back(h: Harness) {
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        kept.set_tagged("k", &1, &["y"]).await.unwrap();
        kw.expire_tag("y").await.unwrap();
        if let Some(mut raw) = h.raw() {
            // Fields long past the epochs' lifetime: both kinds may go.
            let (secs, _): (u64, u64) = ::redis::cmd("TIME").query(raw.as_mut()).unwrap();
            let long_ago = ((secs - 3600) * 1_000_000).to_string();
            poke_epoch(&h, raw.as_mut(), "x:old", &long_ago).await;
            poke_epoch(&h, raw.as_mut(), "t:old2", &long_ago).await;
        }
        for i in 0..40 {
            kw.expire_tag(&format!("other:{i}")).await.unwrap();
        }
        assert_eq!(kept.get("k").await.unwrap(), None, "x:y is recent: kept");
        let (v, how) = kept
            .get_or_set_tagged_with_status("k", &["y"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Stale(StaleReason::LoaderError)));
        if let Some(mut raw) = h.raw() {
            let fields: Vec<String> = ::redis::cmd("HKEYS")
                .arg(gens_key(&h))
                .query(raw.as_mut())
                .unwrap();
            assert!(fields.iter().any(|f| f == "x:y"), "{fields:?}");
            assert!(
                !fields.iter().any(|f| f == "x:old" || f == "t:old2"),
                "old fields were pruned: {fields:?}"
            );
        }
        // Entries of the pruned tags expire and are removed as usual.
        kept.set_tagged("fresh", &2, &["old", "old2"])
            .await
            .unwrap();
        assert_eq!(kept.get("fresh").await.unwrap(), Some(2));
        kw.expire_tag("old").await.unwrap();
        assert_eq!(kept.get("fresh").await.unwrap(), None);
        let (v, how) = kept
            .get_or_set_tagged_with_status("fresh", &["old", "old2"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Stale(StaleReason::LoaderError)));
        kw.invalidate_tag("old2").await.unwrap();
        assert!(
            kept.get_or_set_tagged("fresh", &["old", "old2"], || async { broken() })
                .await
                .is_err()
        );
    }

    /// Open bug (see `open_bugs`): a failed refill of a tag-expired value is not throttled. `Cache::throttle`
    /// re-commits the kept bytes with their old stamp, which is still expired, so every read (and every
    /// waiter, one after the other) asks the failing source again; a value stale by its TTL is served for
    /// `fail_safe_throttle` without asking it.
    pub async fn a_failed_refill_of_an_expired_value_is_throttled(h: Harness) {
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        kept.set_tagged("k", &1, &["p"]).await.unwrap();
        kw.expire_tag("p").await.unwrap();
        let calls = AtomicUsize::new(0);
        for round in 0..3 {
            let (v, how) = kept
                .get_or_set_tagged_with_status("k", &["p"], || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    broken()
                })
                .await
                .unwrap();
            // The first read asks the source and serves the fallback; the throttle then serves it as is.
            let expected = if round == 0 {
                CacheLookup::Stale(StaleReason::LoaderError)
            } else {
                CacheLookup::Hit
            };
            assert_eq!((v, how), (1, expected));
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "within fail_safe_throttle (5 s) the failing source is asked once"
        );
    }

    /// Was a bug: an expiry field at the top of the epoch range (valid, but no epoch above it fits) is the floor
    /// of the removal field too, so a removal bumped `t:<tag>` out of range and its repair landed on the same
    /// value every time: on Redis the *second* removal changed nothing; on Cluster the view refused the
    /// out-of-range epoch and the *first* was lost. Now the field is re-based (deleted, `*` bumped) on sight.
    pub async fn a_near_limit_expiry_field_never_swallows_a_removal(h: Harness) {
        let Some(mut raw) = h.raw() else {
            return; // the embedded keyspace only holds what keyward wrote (see `embedded_clock_at_the_top`)
        };
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        poke_epoch(&h, raw.as_mut(), "x:big", "9007199254740991").await;
        c.set_tagged("k", &1, &["big"]).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(1));
        kw.invalidate_tag("big").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None, "the first removal");
        c.set_tagged("k", &2, &["big"]).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(2));
        kw.invalidate_tag("big").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None, "the second removal");
        // Nothing in the hash is out of range, and the field at the top is gone.
        let fields = epoch_fields(&h, raw.as_mut());
        assert!(
            fields.iter().all(|(_, v)| *v < TOP),
            "every field below the top: {fields:?}"
        );
    }

    /// A removal field one below the top is a valid epoch, recorded by fills; the next bump of the tag (here an
    /// expiry) cannot go higher, so it re-bases: `*` rises and the entry is *gone* — a removal stays a removal
    /// (a fail-safe class does not get the value back as stale), and nothing filled before is fresh.
    pub async fn a_tag_field_next_to_the_top_is_rebased_and_a_removal_wins(h: Harness) {
        let Some(mut raw) = h.raw() else {
            return;
        };
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        let plain = kw.cache::<u32>("product").unwrap();
        poke_epoch(&h, raw.as_mut(), "t:near", &(TOP - 1).to_string()).await;
        kept.set_tagged("k", &1, &["near"]).await.unwrap();
        plain.set("other", &1).await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), Some(1));
        kw.expire_tag("near").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), None);
        assert_eq!(plain.get("other").await.unwrap(), None, "`*` was bumped");
        assert!(
            kept.get_or_set_tagged("k", &["near"], || async { broken() })
                .await
                .is_err(),
            "the entry was removed, not kept as a fail-safe fallback"
        );
        // The tag works again, from the clock.
        kept.set_tagged("k", &2, &["near"]).await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), Some(2));
        kw.expire_tag("near").await.unwrap();
        assert_eq!(kept.get("k").await.unwrap(), None, "expired");
        kw.invalidate_tag("near").await.unwrap();
        assert!(
            kept.get_or_set_tagged("k", &["near"], || async { broken() })
                .await
                .is_err(),
            "removed"
        );
        let fields = epoch_fields(&h, raw.as_mut());
        assert!(fields.iter().all(|(_, v)| *v < TOP), "{fields:?}");
    }

    /// A class epoch at the top (repaired on sight) and one below it (re-based by the next invalidation).
    pub async fn a_class_field_at_the_top_never_swallows_an_invalidation(h: Harness) {
        let Some(mut raw) = h.raw() else {
            return;
        };
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        for (round, value) in [TOP, TOP - 1].into_iter().enumerate() {
            let round = u32::try_from(round).unwrap();
            poke_epoch(&h, raw.as_mut(), "product", &value.to_string()).await;
            c.set("k", &round).await.unwrap();
            assert_eq!(c.get("k").await.unwrap(), Some(round), "{value}");
            c.invalidate_all().await.unwrap();
            assert_eq!(c.get("k").await.unwrap(), None, "{value}: the first");
            c.set("k", &(round + 10)).await.unwrap();
            assert_eq!(c.get("k").await.unwrap(), Some(round + 10), "{value}");
            c.invalidate_all().await.unwrap();
            assert_eq!(c.get("k").await.unwrap(), None, "{value}: the second");
        }
    }

    /// `*` one below the top: the next namespace invalidation lands on the top, after which nothing filled is
    /// ever current (every call loads) and bumps no longer extend the epochs hash's life; once it expires, the
    /// namespace caches again.
    pub async fn a_namespace_epoch_at_the_top_caches_nothing_until_its_hash_expires(h: Harness) {
        let Some(mut raw) = h.raw() else {
            return;
        };
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        poke_epoch(&h, raw.as_mut(), "*", &(TOP - 1).to_string()).await;
        c.set("k", &1).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(1));
        kw.invalidate_namespace().await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None, "the removal");
        let loads = AtomicUsize::new(0);
        for _ in 0..3 {
            c.set("k", &2).await.unwrap();
            assert_eq!(
                c.get("k").await.unwrap(),
                None,
                "filled under `*` at the top"
            );
            let v = c
                .get_or_set("j", || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    ok(3)
                })
                .await
                .unwrap();
            assert_eq!(v, 3);
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            3,
            "nothing served from the cache"
        );
        let pttl = |raw: &mut dyn ::redis::ConnectionLike| -> i64 {
            ::redis::cmd("PTTL").arg(gens_key(&h)).query(raw).unwrap()
        };
        let left = pttl(raw.as_mut());
        assert!(left > 0, "{left}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        kw.invalidate_namespace().await.unwrap();
        kw.invalidate_tag("t").await.unwrap();
        assert!(pttl(raw.as_mut()) < left, "bumps no longer extend its life");
        assert!(
            epoch_fields(&h, raw.as_mut()).contains(&("*".to_owned(), TOP)),
            "`*` stays at the top"
        );
        // Let the hash expire now rather than in a lifetime.
        ::redis::cmd("PEXPIRE")
            .arg(gens_key(&h))
            .arg(1)
            .exec(raw.as_mut())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        if h.is_cluster() {
            tokio::time::sleep(DEFAULT_BOUND).await;
        }
        c.set("k", &4).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(4), "caching again");
        kw.invalidate_namespace().await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
    }
}

/// The epochs hash's fields as numbers (`u64::MAX` for one that is not a number).
fn epoch_fields(h: &Harness, raw: &mut dyn ::redis::ConnectionLike) -> Vec<(String, u64)> {
    let all: std::collections::HashMap<String, String> =
        ::redis::cmd("HGETALL").arg(gens_key(h)).query(raw).unwrap();
    all.into_iter()
        .map(|(f, v)| {
            let n = v.parse().unwrap_or(u64::MAX);
            (f, n)
        })
        .collect()
}

/// The throttle after a failed refill of an expired value (two bugs found by this review, fixed), and the top
/// of the epoch range on the embedded backend's (paused) clock.
mod throttle_and_limits {
    use super::*;
    use keyward::Keyward;
    use keyward::policy::{CacheClass, Jitter, Policy};

    /// The embedded keyspace holds only what keyward wrote, so its epochs reach the top only with its clock:
    /// paused 2 s before 2^53 - 1 µs (in the year 2255), then moved 1 ms per round across it. Whatever the
    /// invalidation (tag removal or expiry, class, namespace), the entry filled before it is never read as
    /// fresh after it, and a removal leaves no fail-safe fallback; below the top the cache works as usual.
    #[tokio::test(start_paused = true)]
    async fn embedded_clock_at_the_top() {
        let before = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap();
        let kw = Keyward::embedded(policy());
        let c = kw.cache::<u32>("c").unwrap();
        tokio::time::advance(Duration::from_micros(TOP - 2_000_000 - before)).await;
        let mut served = 0;
        for round in 0..4000u32 {
            tokio::time::advance(Duration::from_millis(1)).await;
            c.set_tagged("k", &round, &["big"]).await.unwrap();
            if c.get("k").await.unwrap() == Some(round) {
                served += 1;
            }
            match round % 4 {
                0 => kw.invalidate_tag("big").await.unwrap(),
                1 => kw.expire_tag("big").await.unwrap(),
                2 => c.invalidate_all().await.unwrap(),
                _ => kw.invalidate_namespace().await.unwrap(),
            }
            assert_eq!(c.get("k").await.unwrap(), None, "round {round}");
            if round % 4 != 1 {
                assert!(
                    c.get_or_set_tagged("k", &["big"], || async { broken() })
                        .await
                        .is_err(),
                    "round {round}: a removal left a fail-safe fallback"
                );
            }
        }
        assert!(served > 1000, "below the top the cache serves: {served}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_refill_of_an_expired_value_is_throttled_embedded() {
        cases::a_failed_refill_of_an_expired_value_is_throttled(Harness::embedded()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_refill_of_an_expired_value_is_throttled_redis() {
        cases::a_failed_refill_of_an_expired_value_is_throttled(Harness::redis()).await;
    }

    /// A fail-safe class with short windows: TTL 1 s, grace 2 s, throttle 100 ms (the epochs' lifetime is
    /// then about 64 s).
    fn policy() -> Policy {
        Policy::builder("test", "throttle")
            .cache(
                "c",
                CacheClass::new(Duration::from_secs(1), "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(2))
                    .fail_safe_throttle(Duration::from_millis(100))
                    .lease_ttl(Duration::from_secs(1))
                    .loader_timeout(Duration::from_millis(500)),
            )
            .build()
            .unwrap()
    }

    /// Was a bug: after a failed refill, `Cache::throttle` committed the kept bytes again with their *old*
    /// stamp (still expired) and a fresh TTL, so every failed refill renewed the expired value's life; it then
    /// outlived the epochs hash, and once the hash expired (or `x:<tag>` was pruned) a plain `get` returned a
    /// value expired a minute ago. Now the throttle stores it under the refill lease's stamp, as a refill
    /// would: current for `fail_safe_throttle`, then stale again (kept for fail-safe until grace), never
    /// fresh after its throttle window.
    #[tokio::test(start_paused = true)]
    async fn a_throttled_expired_value_never_comes_back_fresh() {
        let kw = Keyward::embedded(policy());
        let c = kw.cache::<u32>("c").unwrap();
        c.set_tagged("k", &1, &["p"]).await.unwrap();
        kw.expire_tag("p").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None, "expired");
        // A source outage of 100 s, read once a second: every read is answered with the fallback, and a
        // plain read once the throttle's window (100 ms) has passed never gets it.
        for second in 1..=100u64 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let got = c
                .get_or_set_tagged_with_status("k", &["p"], || async { broken() })
                .await;
            assert!(
                matches!(
                    got,
                    Ok((1, CacheLookup::Stale(_))) | Err(Error::Loader { .. })
                ),
                "second {second}: {got:?}"
            );
            tokio::time::advance(Duration::from_millis(200)).await;
            assert_eq!(
                c.get("k").await.unwrap(),
                None,
                "second {second}: a value expired {second} s ago reads as fresh"
            );
        }
    }
}
