//! Cache tags (dependency sets), on every backend: `invalidate_tag` makes every entry carrying the tag a miss,
//! in every class, in O(1); `expire_tag` makes them stale but keeps them as the fail-safe fallback of classes
//! with `stale_grace`; a fill leased before either never lands as fresh; tag versions never repeat; pruning
//! old tag fields never brings a stale entry back; bad tags are typed errors; entries written before tags
//! still read.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{Harness, Source};
use keyward::{CacheLookup, Error, StaleReason};
use tokio::sync::Notify;

/// `ConnectOptions::group_invalidation_bound`'s default: on Redis Cluster, a call starting this long after a
/// tag invalidation returned (elsewhere, or behind keyward's back) sees it.
const DEFAULT_BOUND: Duration = Duration::from_millis(500);

conformance!(
    tag_invalidation_misses_every_tagged_entry_across_classes,
    untagged_calls_honour_the_tags_an_entry_carries,
    a_fill_leased_before_the_tag_invalidation_never_lands,
    another_handles_tag_invalidation_is_seen,
    randomized_fill_invalidate_tag_trials_never_read_stale,
    tag_versions_never_repeat_after_the_epochs_are_deleted,
    a_corrupt_tag_field_reads_as_a_miss_not_an_error,
    pruning_does_not_resurrect_stale_entries,
    bad_tags_are_typed_errors_naming_class_and_tag,
    untagged_entries_stay_v1_and_v1_entries_still_read,
    an_expired_tag_keeps_the_value_as_the_fail_safe_fallback_only,
    without_stale_grace_expiring_a_tag_removes,
    a_removal_after_an_expiry_drops_the_kept_value,
    a_fill_leased_before_the_tag_expiry_never_lands_as_fresh,
    another_handles_tag_expiry_is_seen,
    expired_values_are_refilled_through_the_fast_path_classes_too,
);

mod cases {
    use super::*;

    fn ok<T>(v: T) -> Result<T, std::io::Error> {
        Ok(v)
    }

    fn gens_key(h: &Harness) -> String {
        format!("test:{}:_kw:gens", h.app())
    }

    pub async fn tag_invalidation_misses_every_tagged_entry_across_classes(h: Harness) {
        let kw = h.keyward().await;
        let product = kw.cache::<u32>("product").unwrap();
        let other = kw.cache::<u32>("other").unwrap();
        for i in 0..10u32 {
            let v = product
                .get_or_set_tagged(&i, &["p:1"], || async move { ok(i) })
                .await
                .unwrap();
            assert_eq!(v, i);
            other
                .set_tagged(&i, &(i + 100), &["p:1", "c:1"])
                .await
                .unwrap();
            product.set_tagged(&(i + 10), &i, &["p:2"]).await.unwrap();
            other.set(&(i + 10), &i).await.unwrap();
        }
        // All hits before the invalidation.
        let (v, how) = product
            .get_or_set_tagged_with_status(&3, &["p:1"], || async { ok(999) })
            .await
            .unwrap();
        assert_eq!((v, how), (3, CacheLookup::Hit));

        kw.invalidate_tag("p:1").await.unwrap();
        for i in 0..10u32 {
            assert_eq!(product.get(&i).await.unwrap(), None, "product {i}");
            assert_eq!(other.get(&i).await.unwrap(), None, "other {i}");
            assert_eq!(
                product.get(&(i + 10)).await.unwrap(),
                Some(i),
                "another tag's entry stays"
            );
            assert_eq!(
                other.get(&(i + 10)).await.unwrap(),
                Some(i),
                "an untagged entry stays"
            );
        }
        let (v, how) = product
            .get_or_set_tagged_with_status(&3, &["p:1"], || async { ok(42) })
            .await
            .unwrap();
        assert_eq!((v, how), (42, CacheLookup::Miss));
        let (v, how) = product
            .get_or_set_tagged_with_status(&3, &["p:1"], || async { ok(43) })
            .await
            .unwrap();
        assert_eq!((v, how), (42, CacheLookup::Hit), "the refill is current");

        // The other tag of a two-tag entry invalidates it too; the class convenience is the same call.
        other.set_tagged(&0, &7, &["p:1", "c:1"]).await.unwrap();
        assert_eq!(other.get(&0).await.unwrap(), Some(7));
        product.invalidate_tag("c:1").await.unwrap();
        assert_eq!(other.get(&0).await.unwrap(), None);
        assert_eq!(product.get(&3).await.unwrap(), Some(42), "carries p:1 only");
    }

    pub async fn untagged_calls_honour_the_tags_an_entry_carries(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        c.set_tagged("k", &1, &["a", "b"]).await.unwrap();
        // Plain reads judge the entry by its own tags: a hit now…
        assert_eq!(c.get_or_set("k", || async { ok(9) }).await.unwrap(), 1);
        assert_eq!(
            c.get_or_set_tagged("k", &["other"], || async { ok(9) })
                .await
                .unwrap(),
            1,
            "a call naming other tags still reads the entry by the tags it carries"
        );
        kw.invalidate_tag("b").await.unwrap();
        // …and a miss after one of them was invalidated, through every read.
        assert_eq!(c.get("k").await.unwrap(), None);
        let (v, how) = c
            .get_or_set_with_status("k", || async { ok(2) })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Miss));
        // That fill named no tags: the entry no longer depends on `a`.
        kw.invalidate_tag("a").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(2));
    }

    pub async fn a_fill_leased_before_the_tag_invalidation_never_lands(h: Harness) {
        // Fails if a fill recorded the tag's epoch when it committed instead of when its lease was granted.
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("product").unwrap();
        let source = Arc::new(Source::default());
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        let filler = {
            let (c, source, loaded, proceed) =
                (c.clone(), source.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                c.get_or_set_tagged("k", &["product:42"], || async move {
                    let v = source.version.load(Ordering::SeqCst); // reads version 0
                    loaded.notify_one();
                    proceed.notified().await;
                    ok(v)
                })
                .await
            })
        };
        loaded.notified().await;
        // The source-of-truth write, then the tag invalidation, while the fill is in flight.
        source.version.store(1, Ordering::SeqCst);
        kw.invalidate_tag("product:42").await.unwrap();
        // A caller arriving now does not share the load that started before.
        let late = {
            let (c, source) = (c.clone(), source.clone());
            tokio::spawn(async move {
                c.get_or_set_tagged("k", &["product:42"], || async move {
                    ok(source.version.load(Ordering::SeqCst))
                })
                .await
            })
        };
        proceed.notify_one();
        assert_eq!(
            filler.await.unwrap().unwrap(),
            0,
            "the loader's own caller sees its load"
        );
        assert_eq!(
            late.await.unwrap().unwrap(),
            1,
            "a later caller never gets the old load"
        );
        let read = c.get("k").await.unwrap();
        assert_ne!(read, Some(0), "the stale fill never became visible");
        let fresh = c
            .get_or_set_tagged("k", &["product:42"], || async {
                ok(source.version.load(Ordering::SeqCst))
            })
            .await
            .unwrap();
        assert_eq!(fresh, 1);
    }

    pub async fn another_handles_tag_invalidation_is_seen(h: Harness) {
        let handles = h.handles(2).await;
        let reader = handles[0].cache::<u32>("product").unwrap();
        reader.set_tagged("k", &1, &["shared"]).await.unwrap();
        assert_eq!(reader.get("k").await.unwrap(), Some(1));
        handles[1].invalidate_tag("shared").await.unwrap();
        if h.is_cluster() {
            // The documented guarantee: a call starting later than the bound after the invalidation returned.
            tokio::time::sleep(DEFAULT_BOUND).await;
        }
        assert_eq!(reader.get("k").await.unwrap(), None);
    }

    pub async fn randomized_fill_invalidate_tag_trials_never_read_stale(h: Harness) {
        // 2,000 trials over 4 keys in two classes sharing one tag per key: a writer bumps the source and
        // invalidates the tag while readers fill with random delays; every read that starts after an
        // invalidation returned must see at least that version.
        let kw = h.keyward().await;
        let stale = Arc::new(AtomicUsize::new(0));
        let mut keys = Vec::new();
        for key in 0..4u32 {
            let class = if key % 2 == 0 { "product" } else { "other" };
            let c = kw.cache::<u64>(class).unwrap();
            let mirror = kw
                .cache::<u64>(if key % 2 == 0 { "other" } else { "product" })
                .unwrap();
            let (kw, stale) = (kw.clone(), stale.clone());
            keys.push(tokio::spawn(async move {
                let source = Arc::new(Source::default());
                let tag = format!("key:{key}");
                for trial in 0..500u64 {
                    let reader = {
                        let (c, source, tag) = (c.clone(), source.clone(), tag.clone());
                        tokio::spawn(async move {
                            c.get_or_set_tagged(&key, &[tag], || async {
                                let v = source.version.load(Ordering::SeqCst);
                                for _ in 0..(rand::random::<u8>() % 4) {
                                    tokio::task::yield_now().await;
                                }
                                ok(v)
                            })
                            .await
                        })
                    };
                    for _ in 0..(rand::random::<u8>() % 4) {
                        tokio::task::yield_now().await;
                    }
                    source.version.store(trial + 1, Ordering::SeqCst);
                    kw.invalidate_tag(&tag).await.unwrap();
                    for c in [&c, &mirror] {
                        let after = c
                            .get_or_set_tagged(&key, &[tag.as_str()], || async {
                                ok(source.version.load(Ordering::SeqCst))
                            })
                            .await
                            .unwrap();
                        if after < trial + 1 {
                            stale.fetch_add(1, Ordering::SeqCst);
                        }
                        if let Some(seen) = c.get(&key).await.unwrap()
                            && seen < trial + 1
                        {
                            stale.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    reader.await.unwrap().unwrap();
                }
            }));
        }
        for k in keys {
            k.await.unwrap();
        }
        assert_eq!(
            stale.load(Ordering::SeqCst),
            0,
            "stale reads after tag invalidation"
        );
    }

    pub async fn tag_versions_never_repeat_after_the_epochs_are_deleted(h: Harness) {
        // The embedded backend's version of this (the hash expiring under a paused clock) is a unit test in
        // `cache/store.rs`; here the hash is deleted behind keyward's back.
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        c.set_tagged("k", &1, &["t"]).await.unwrap();
        kw.invalidate_tag("t").await.unwrap();
        c.set_tagged("k", &2, &["t"]).await.unwrap(); // records the tag's epoch after that invalidation
        assert_eq!(c.get("k").await.unwrap(), Some(2));
        if let Some(mut raw) = h.raw() {
            ::redis::cmd("DEL")
                .arg(gens_key(&h))
                .exec(raw.as_mut())
                .unwrap();
            assert_eq!(
                c.get("k").await.unwrap(),
                Some(2),
                "filled after the last invalidation: still current"
            );
        }
        // A counter that started over would hand out a version at or below the one the entry carries.
        kw.invalidate_tag("t").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
        c.set_tagged("k", &3, &["t"]).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(3));
    }

    pub async fn a_corrupt_tag_field_reads_as_a_miss_not_an_error(h: Harness) {
        let Some(mut raw) = h.raw() else {
            return; // the embedded keyspace only holds what keyward wrote
        };
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        c.set_tagged("k", &1, &["t"]).await.unwrap();
        ::redis::cmd("HSET")
            .arg(gens_key(&h))
            .arg("t:t")
            .arg("garbage")
            .exec(raw.as_mut())
            .unwrap();
        if h.is_cluster() {
            // Written behind keyward's back (no announcement): the view finds it corrupt within the bound.
            tokio::time::sleep(DEFAULT_BOUND).await;
        }
        // Repairing bumps the field: the entry filled before is a miss, never an error and never current.
        assert_eq!(c.get("k").await.unwrap(), None);
        let v = c
            .get_or_set_tagged("k", &["t"], || async { ok(2) })
            .await
            .unwrap();
        assert_eq!(v, 2);
        assert_eq!(c.get("k").await.unwrap(), Some(2));
    }

    pub async fn pruning_does_not_resurrect_stale_entries(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        c.set_tagged("stale", &1, &["x"]).await.unwrap();
        kw.invalidate_tag("x").await.unwrap();
        assert_eq!(c.get("stale").await.unwrap(), None);
        // A field long past the epochs' lifetime (the policy's longest entry, 70 s, plus a minute): an entry
        // carrying an older epoch of it cannot exist anymore, so it may go.
        let old_field = "t:old";
        if let Some(mut raw) = h.raw() {
            let (secs, _): (u64, u64) = ::redis::cmd("TIME").query(raw.as_mut()).unwrap();
            let long_ago_us = (secs - 3600) * 1_000_000;
            ::redis::cmd("HSET")
                .arg(gens_key(&h))
                .arg(old_field)
                .arg(long_ago_us)
                .exec(raw.as_mut())
                .unwrap();
        }
        // Bumps prune: many tags, each bumped once.
        for i in 0..40 {
            kw.invalidate_tag(&format!("other:{i}")).await.unwrap();
        }
        assert_eq!(
            c.get("stale").await.unwrap(),
            None,
            "the recent invalidation of x is still in force"
        );
        if let Some(mut raw) = h.raw() {
            let fields: Vec<String> = ::redis::cmd("HKEYS")
                .arg(gens_key(&h))
                .query(raw.as_mut())
                .unwrap();
            assert!(fields.iter().any(|f| f == "t:x"), "{fields:?}");
            assert!(
                !fields.iter().any(|f| f == old_field),
                "the old field was pruned: {fields:?}"
            );
        }
        // Entries filled after the pruning read and invalidate as usual.
        c.set_tagged("fresh", &2, &["old", "x"]).await.unwrap();
        assert_eq!(c.get("fresh").await.unwrap(), Some(2));
        kw.invalidate_tag("old").await.unwrap();
        assert_eq!(c.get("fresh").await.unwrap(), None);
    }

    pub async fn bad_tags_are_typed_errors_naming_class_and_tag(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u32>("product").unwrap();
        let loads = AtomicUsize::new(0);
        let long = "x".repeat(129);
        let many: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
        let cases: Vec<(Vec<String>, &str)> = vec![
            (vec![String::new()], ""),
            (vec!["a b".to_owned()], "a b"),
            (
                vec!["ok".to_owned(), "line\nbreak".to_owned()],
                "line\nbreak",
            ),
            (vec![long.clone()], &long[..64]),
            (many.clone(), "t32"),
        ];
        for (tags, named) in &cases {
            let err = c
                .get_or_set_tagged("k", tags, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    ok(1)
                })
                .await
                .unwrap_err();
            match &err {
                Error::InvalidTag { class, tag, .. } => {
                    assert_eq!(class.as_deref(), Some("product"));
                    assert_eq!(tag, named);
                }
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().contains("class `product`"), "{err}");
            assert!(matches!(
                c.set_tagged("k", &1, tags).await.unwrap_err(),
                Error::InvalidTag { .. }
            ));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 0, "no loader ran");
        assert_eq!(c.get("k").await.unwrap(), None, "nothing was written");
        let err = kw.invalidate_tag("").await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidTag { class: None, .. }),
            "{err:?}"
        );
        let err = c.invalidate_tag("a\tb").await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidTag { class: Some(c), .. } if c == "product"),
            "{err:?}"
        );
        // Duplicates are fine; 32 distinct tags of 128 bytes are the limits.
        let at_limit: Vec<String> = (0..32).map(|i| format!("{i:0>128}")).collect();
        c.set_tagged("k", &5, &at_limit).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(5));
        kw.invalidate_tag(&at_limit[31]).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
        let v = c
            .get_or_set_tagged("k", &["d", "d"], || async { ok(6) })
            .await
            .unwrap();
        assert_eq!(v, 6);
    }

    pub async fn untagged_entries_stay_v1_and_v1_entries_still_read(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("product").unwrap();
        c.set("plain", &"p".to_owned()).await.unwrap();
        c.set_tagged("tagged", &"t".to_owned(), &["tag"])
            .await
            .unwrap();
        kw.invalidate_tag("unrelated").await.unwrap();
        assert_eq!(c.get("plain").await.unwrap().as_deref(), Some("p"));
        assert_eq!(c.get("tagged").await.unwrap().as_deref(), Some("t"));
        let Some(mut raw) = h.raw() else {
            return;
        };
        let stored = |raw: &mut Box<dyn ::redis::ConnectionLike>, id: &str| -> Vec<u8> {
            ::redis::cmd("GET")
                .arg(c.key(id).unwrap())
                .query(raw.as_mut())
                .unwrap()
        };
        assert!(stored(&mut raw, "plain").starts_with(b"V1:"));
        assert!(stored(&mut raw, "tagged").starts_with(b"V2:"));
        // An entry written by a keyward without tags (V1, epochs 0) reads as an untagged value.
        ::redis::cmd("SET")
            .arg(c.key("old").unwrap())
            .arg("V1:0:0:v:\"before tags\"")
            .arg("PX")
            .arg(60_000)
            .exec(raw.as_mut())
            .unwrap();
        assert_eq!(c.get("old").await.unwrap().as_deref(), Some("before tags"));
        let v = c
            .get_or_set_tagged("old", &["tag"], || async { ok("reloaded".to_owned()) })
            .await
            .unwrap();
        assert_eq!(v, "before tags", "a V1 hit carries no tag");
        kw.invalidate_tag("tag").await.unwrap();
        assert_eq!(c.get("old").await.unwrap().as_deref(), Some("before tags"));
        assert_eq!(c.get("tagged").await.unwrap(), None);
    }

    fn broken<T>() -> Result<T, std::io::Error> {
        Err(std::io::Error::other("source down"))
    }

    pub async fn an_expired_tag_keeps_the_value_as_the_fail_safe_fallback_only(h: Harness) {
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        for id in 0..3u32 {
            kept.get_or_set_tagged(&id, &["p:1"], || async move { ok(id) })
                .await
                .unwrap();
        }
        kept.set_tagged(&9, &9, &["p:2"]).await.unwrap();
        kw.expire_tag("p:1").await.unwrap();

        // Never read as fresh…
        assert_eq!(
            kept.get(&0).await.unwrap(),
            None,
            "a plain read never serves it"
        );
        // …but a failing refill serves it instead of the error.
        let (v, how) = kept
            .get_or_set_tagged_with_status(&0, &["p:1"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (0, CacheLookup::Stale(StaleReason::LoaderError)));
        // A refill that works replaces it: a miss (the loader ran), then a hit.
        let (v, how) = kept
            .get_or_set_tagged_with_status(&1, &["p:1"], || async { ok(101) })
            .await
            .unwrap();
        assert_eq!((v, how), (101, CacheLookup::Miss));
        let (v, how) = kept
            .get_or_set_tagged_with_status(&1, &["p:1"], || async { ok(999) })
            .await
            .unwrap();
        assert_eq!((v, how), (101, CacheLookup::Hit), "the refill is fresh");
        assert_eq!(kept.get(&1).await.unwrap(), Some(101));
        // An untagged call judges the entry by the tags it carries, and an entry of another tag is untouched.
        let (v, how) = kept
            .get_or_set_with_status(&2, || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Stale(StaleReason::LoaderError)));
        assert_eq!(kept.get(&9).await.unwrap(), Some(9));
        // Expiring again a tag whose entries were refilled expires the refills.
        kw.expire_tag("p:1").await.unwrap();
        assert_eq!(kept.get(&1).await.unwrap(), None);
    }

    pub async fn without_stale_grace_expiring_a_tag_removes(h: Harness) {
        let kw = h.keyward().await;
        let plain = kw.cache::<u32>("product").unwrap();
        plain.set_tagged("k", &1, &["p:1"]).await.unwrap();
        plain.expire_tag("p:1").await.unwrap();
        assert_eq!(plain.get("k").await.unwrap(), None);
        let err = plain
            .get_or_set_tagged("k", &["p:1"], || async { broken() })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err:?}");
        let (v, how) = plain
            .get_or_set_tagged_with_status("k", &["p:1"], || async { ok(2) })
            .await
            .unwrap();
        assert_eq!((v, how), (2, CacheLookup::Miss));
    }

    pub async fn a_removal_after_an_expiry_drops_the_kept_value(h: Harness) {
        let kw = h.keyward().await;
        let kept = kw.cache::<u32>("kept").unwrap();
        kept.set_tagged("k", &1, &["a", "b"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        kw.invalidate_tag("a").await.unwrap();
        let err = kept
            .get_or_set_tagged("k", &["a", "b"], || async { broken() })
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Loader { .. }),
            "removed, not kept: {err:?}"
        );
        // A removal of another tag the entry carries wins over an expiry too.
        kept.set_tagged("k", &2, &["a", "b"]).await.unwrap();
        kw.expire_tag("a").await.unwrap();
        kw.invalidate_tag("b").await.unwrap();
        let err = kept
            .get_or_set_tagged("k", &["a", "b"], || async { broken() })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err:?}");
        // And an expiry after a removal does not bring a removed value back.
        kept.set_tagged("k", &3, &["a"]).await.unwrap();
        kw.invalidate_tag("a").await.unwrap();
        kw.expire_tag("a").await.unwrap();
        assert!(
            kept.get_or_set_tagged("k", &["a"], || async { broken() })
                .await
                .is_err()
        );
    }

    pub async fn a_fill_leased_before_the_tag_expiry_never_lands_as_fresh(h: Harness) {
        // Fails if a fill recorded the larger of the two epochs when it committed instead of when its lease was
        // granted, or if an expiry did not count for fills.
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("kept").unwrap();
        let source = Arc::new(Source::default());
        let loaded = Arc::new(Notify::new());
        let proceed = Arc::new(Notify::new());
        let filler = {
            let (c, source, loaded, proceed) =
                (c.clone(), source.clone(), loaded.clone(), proceed.clone());
            tokio::spawn(async move {
                c.get_or_set_tagged("k", &["product:42"], || async move {
                    let v = source.version.load(Ordering::SeqCst);
                    loaded.notify_one();
                    proceed.notified().await;
                    ok(v)
                })
                .await
            })
        };
        loaded.notified().await;
        source.version.store(1, Ordering::SeqCst);
        kw.expire_tag("product:42").await.unwrap();
        proceed.notify_one();
        assert_eq!(filler.await.unwrap().unwrap(), 0);
        assert_eq!(c.get("k").await.unwrap(), None, "the old fill is not fresh");
        let (v, how) = c
            .get_or_set_tagged_with_status("k", &["product:42"], || async {
                ok(source.version.load(Ordering::SeqCst))
            })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Miss));
    }

    pub async fn another_handles_tag_expiry_is_seen(h: Harness) {
        let handles = h.handles(2).await;
        let reader = handles[0].cache::<u32>("kept").unwrap();
        reader.set_tagged("k", &1, &["shared"]).await.unwrap();
        assert_eq!(reader.get("k").await.unwrap(), Some(1));
        handles[1].expire_tag("shared").await.unwrap();
        if h.is_cluster() {
            tokio::time::sleep(DEFAULT_BOUND).await;
        }
        assert_eq!(reader.get("k").await.unwrap(), None);
        let (v, how) = reader
            .get_or_set_tagged_with_status("k", &["shared"], || async { broken() })
            .await
            .unwrap();
        assert_eq!((v, how), (1, CacheLookup::Stale(StaleReason::LoaderError)));
    }

    pub async fn expired_values_are_refilled_through_the_fast_path_classes_too(h: Harness) {
        // Random expiries and removals on a plain class and a fail-safe one, with fills racing them: a read
        // that starts after either returned never gets a value loaded before it.
        let kw = h.keyward().await;
        let stale = Arc::new(AtomicUsize::new(0));
        let mut keys = Vec::new();
        for key in 0..4u32 {
            let c = kw
                .cache::<u64>(if key % 2 == 0 { "product" } else { "kept" })
                .unwrap();
            let (kw, stale) = (kw.clone(), stale.clone());
            keys.push(tokio::spawn(async move {
                let source = Arc::new(Source::default());
                let tag = format!("key:{key}");
                for trial in 0..250u64 {
                    let reader = {
                        let (c, source, tag) = (c.clone(), source.clone(), tag.clone());
                        tokio::spawn(async move {
                            c.get_or_set_tagged(&key, &[tag], || async {
                                let v = source.version.load(Ordering::SeqCst);
                                for _ in 0..(rand::random::<u8>() % 4) {
                                    tokio::task::yield_now().await;
                                }
                                ok(v)
                            })
                            .await
                        })
                    };
                    for _ in 0..(rand::random::<u8>() % 4) {
                        tokio::task::yield_now().await;
                    }
                    source.version.store(trial + 1, Ordering::SeqCst);
                    if rand::random::<bool>() {
                        kw.expire_tag(&tag).await.unwrap();
                    } else {
                        kw.invalidate_tag(&tag).await.unwrap();
                    }
                    let after = c
                        .get_or_set_tagged(&key, &[tag.as_str()], || async {
                            ok(source.version.load(Ordering::SeqCst))
                        })
                        .await
                        .unwrap();
                    if after < trial + 1 {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(seen) = c.get(&key).await.unwrap()
                        && seen < trial + 1
                    {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    reader.await.unwrap().unwrap();
                }
            }));
        }
        for k in keys {
            k.await.unwrap();
        }
        assert_eq!(
            stale.load(Ordering::SeqCst),
            0,
            "stale reads after a tag expiry or removal"
        );
    }
}
