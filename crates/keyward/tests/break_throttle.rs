//! Adversarial review of 4e96721 (a fail-safe throttle stores the kept value back with the value's own tags,
//! at their epochs when the refill's lease was granted): a removal of any tag the value carries while the
//! failing load runs removes the throttled copy, an expiry only makes it stale again; the same tag named by
//! the caller and the value; values near and over `MAX_TAGS`; batches; the in-process tier; on Redis Cluster a
//! handle whose epoch view lags the value it keeps; and kept values whose tag epochs the client cannot read.
//!
//! Classes `ft` / `ft_l1` of the test policy: values stale only when a tag expires them (or by hand), and a
//! 60 s throttle, so that a throttled copy is there for the whole case.

#![allow(unreachable_pub)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::break_today2::Gate;
use crate::common::{Harness, L1_MAX_STALE};
use keyward::{Cache, CacheLookup, ConnectOptions, Keyward, StaleReason};

conformance!(
    a_removal_of_any_tag_of_the_value_during_the_failed_load_removes_the_throttled_copy,
    an_expiry_during_the_failed_load_leaves_a_stale_copy_a_removal_leaves_none,
    a_tag_the_caller_and_the_value_both_name,
    a_value_with_max_tags_is_throttled_with_all_of_them,
    over_max_tags_the_stale_value_is_served_but_not_stored,
    a_failed_batch_throttles_each_kept_value_with_its_own_tags,
    no_instance_serves_a_throttled_copy_beyond_the_bound_after_a_tag_removal,
);

/// A deadline for things that must happen "soon".
const SOON: Duration = Duration::from_secs(20);

/// `MAX_TAGS` (the most tags one header holds).
const MAX_TAGS: usize = 32;

fn ok(v: &str) -> Result<String, std::io::Error> {
    Ok(v.to_owned())
}

fn down() -> Result<String, std::io::Error> {
    Err(std::io::Error::other("the source is down"))
}

fn new_id() -> u64 {
    u64::from(rand::random::<u32>()) * 100
}

/// Start `refill` (a call whose loader is the gate's), wait until its loader runs (it holds the lease over
/// the stale value), run `during`, then let the loader fail; returns the refill's answer. A refill answered
/// without running its loader (the value was not stale) fails the test.
async fn fail_a_refill<T, F, Fut, D, DFut>(refill: F, during: D) -> T
where
    F: FnOnce(Arc<Gate>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + std::fmt::Debug + 'static,
    D: FnOnce() -> DFut,
    DFut: Future<Output = ()>,
{
    let gate = Arc::new(Gate::default());
    let mut task = tokio::spawn(refill(Arc::clone(&gate)));
    tokio::select! {
        () = gate.entered.notified() => {}
        done = &mut task => panic!("the refill answered without loading (not stale?): {:?}", done.unwrap()),
        () = tokio::time::sleep(SOON) => panic!("the refill's loader never ran"),
    }
    during().await;
    gate.release.notify_one();
    tokio::time::timeout(SOON, task)
        .await
        .expect("the refill never answered")
        .unwrap()
}

/// A refill's call, as [`fail_a_refill`] runs it.
type Refill =
    std::pin::Pin<Box<dyn Future<Output = keyward::Result<(String, CacheLookup)>> + Send>>;

/// An untagged `get_or_set_with_status` of `id` whose loader is the gate's.
fn untagged(c: &Cache<String>, id: u64) -> impl FnOnce(Arc<Gate>) -> Refill + use<> {
    let c = c.clone();
    move |gate| {
        Box::pin(async move {
            c.get_or_set_with_status(&id, || gate.fail_when_released())
                .await
        })
    }
}

/// A `get_or_set_tagged_with_status` of `id` naming `tags`, whose loader is the gate's.
fn tagged(
    c: &Cache<String>,
    id: u64,
    tags: Vec<String>,
) -> impl FnOnce(Arc<Gate>) -> Refill + use<> {
    let c = c.clone();
    move |gate| {
        Box::pin(async move {
            c.get_or_set_tagged_with_status(&id, tags.as_slice(), || gate.fail_when_released())
                .await
        })
    }
}

/// The failed refill's own answer: the stale value (its lease was still held).
fn assert_served_stale(got: keyward::Result<(String, CacheLookup)>, v: &str) {
    let (got, how) = got.expect("the failed refill served no stale value");
    assert_eq!(
        (got.as_str(), how),
        (v, CacheLookup::Stale(StaleReason::LoaderError))
    );
}

/// Whether a read through `get_or_set` of `id` (a loader that fails and counts) is answered from the
/// throttled copy: `Some(value)` with the loader not asked, `None` when the loader was asked.
async fn throttled(c: &Cache<String>, id: u64) -> Option<String> {
    let asked = AtomicUsize::new(0);
    let got = c
        .get_or_set_with_status(&id, || {
            asked.fetch_add(1, Ordering::SeqCst);
            async { down() }
        })
        .await;
    match (asked.load(Ordering::SeqCst), got) {
        (0, Ok((v, how))) => {
            assert!(
                matches!(how, CacheLookup::Hit | CacheLookup::L1Hit),
                "answered without its loader, but as {how:?}"
            );
            Some(v)
        }
        (0, Err(e)) => panic!("failed without asking its loader: {e}"),
        _ => None,
    }
}

fn tag_names(prefix: &str, id: u64, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}:{id}")).collect()
}

mod cases {
    use super::*;

    /// A value carrying tags `s` (expired to make it stale), `a`, `b`, `c`; an untagged refill fails while
    /// one of `a`, `b`, `c` is removed: the throttled copy is gone, whichever it was (a read asks the
    /// source). Control: with nothing removed, the throttled copy answers without the source.
    pub async fn a_removal_of_any_tag_of_the_value_during_the_failed_load_removes_the_throttled_copy(
        h: Harness,
    ) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        for round in 0..4u64 {
            let id = new_id() + round;
            let tags: Vec<String> = ["s", "a", "b", "c"]
                .iter()
                .map(|t| format!("{t}:{id}"))
                .collect();
            c.get_or_set_tagged(&id, &tags, || async { ok("v1") })
                .await
                .unwrap();
            c.expire_tag(&tags[0]).await.unwrap();
            let removed = (round > 0).then(|| tags[usize::try_from(round).unwrap()].clone());
            let got = fail_a_refill(untagged(&c, id), || async {
                if let Some(t) = &removed {
                    c.invalidate_tag(t).await.unwrap();
                }
            })
            .await;
            assert_served_stale(got, "v1");
            match &removed {
                None => assert_eq!(
                    throttled(&c, id).await.as_deref(),
                    Some("v1"),
                    "the throttle stored nothing"
                ),
                Some(t) => {
                    assert_eq!(
                        c.get(&id).await.unwrap(),
                        None,
                        "tag `{t}` was removed during the load"
                    );
                    assert_eq!(
                        throttled(&c, id).await,
                        None,
                        "the copy tag `{t}`'s removal removed answers for the source"
                    );
                }
            }
        }
    }

    /// During the failing load, tag `a` (which the value carries, the untagged caller does not name) is
    /// *expired* for one id and *removed* for another. The expired one's throttled copy is stale again: no
    /// plain read gets it, but a failing refill still falls back to it; the removed one's is gone: a failing
    /// refill is an error.
    pub async fn an_expiry_during_the_failed_load_leaves_a_stale_copy_a_removal_leaves_none(
        h: Harness,
    ) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let base = new_id();
        for (id, remove) in [(base + 1, false), (base + 2, true)] {
            let (s, a) = (format!("s:{id}"), format!("a:{id}"));
            c.get_or_set_tagged(&id, &[s.as_str(), a.as_str()], || async { ok("v1") })
                .await
                .unwrap();
            c.expire_tag(&s).await.unwrap();
            let got = fail_a_refill(untagged(&c, id), || async {
                if remove {
                    c.invalidate_tag(&a).await.unwrap();
                } else {
                    c.expire_tag(&a).await.unwrap();
                }
            })
            .await;
            assert_served_stale(got, "v1");
            assert_eq!(c.get(&id).await.unwrap(), None, "remove={remove}");
            let again = c.get_or_set_with_status(&id, || async { down() }).await;
            if remove {
                assert!(
                    again.is_err(),
                    "a value removed during the load is still the fallback: {again:?}"
                );
            } else {
                assert_served_stale(again, "v1");
            }
        }
    }

    /// The caller names tag `a`, which the value carries too (with `s`, expired to make it stale): the
    /// throttled copy carries `a` once, and a removal of `a` during the load removes it, an expiry of `a`
    /// leaves it stale; with neither, it is a throttled hit under the caller's tags.
    pub async fn a_tag_the_caller_and_the_value_both_name(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let base = new_id();
        for (round, what) in ["nothing", "expire", "remove"].into_iter().enumerate() {
            let id = base + round as u64;
            let (s, a) = (format!("s:{id}"), format!("a:{id}"));
            c.get_or_set_tagged(&id, &[s.as_str(), a.as_str()], || async { ok("v1") })
                .await
                .unwrap();
            c.expire_tag(&s).await.unwrap();
            let got = fail_a_refill(tagged(&c, id, vec![a.clone()]), || async {
                match what {
                    "expire" => c.expire_tag(&a).await.unwrap(),
                    "remove" => c.invalidate_tag(&a).await.unwrap(),
                    _ => {}
                }
            })
            .await;
            assert_served_stale(got, "v1");
            let read = c
                .get_or_set_tagged_with_status(&id, &[a.as_str()], || async { down() })
                .await;
            match what {
                "nothing" => {
                    let (v, how) = read.unwrap();
                    assert_eq!((v.as_str(), how), ("v1", CacheLookup::Hit));
                    assert_eq!(c.get(&id).await.unwrap().as_deref(), Some("v1"));
                }
                "expire" => assert_served_stale(read, "v1"),
                _ => assert!(read.is_err(), "removed, yet the fallback: {read:?}"),
            }
        }
    }

    /// A value with `MAX_TAGS` tags (the caller names none): the throttled copy holds them all (it is a
    /// throttled hit), and a removal of the last one during the load removes it.
    pub async fn a_value_with_max_tags_is_throttled_with_all_of_them(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let base = new_id();
        for (round, remove_last) in [false, true].into_iter().enumerate() {
            let id = base + round as u64;
            let tags = tag_names("m", id, MAX_TAGS);
            c.set_tagged(&id, &"v1".to_owned(), &tags).await.unwrap();
            c.expire_tag(&tags[0]).await.unwrap();
            let last = tags[MAX_TAGS - 1].clone();
            let got = fail_a_refill(untagged(&c, id), || async {
                if remove_last {
                    c.invalidate_tag(&last).await.unwrap();
                }
            })
            .await;
            assert_served_stale(got, "v1");
            let expect = (!remove_last).then(|| "v1".to_owned());
            assert_eq!(throttled(&c, id).await, expect, "remove_last={remove_last}");
            if !remove_last {
                // Every tag of the value counts in the throttled copy: removing the 17th removes it.
                c.invalidate_tag(&tags[16]).await.unwrap();
                assert_eq!(c.get(&id).await.unwrap(), None);
            }
        }
        // Exactly `MAX_TAGS` with the caller's: 31 on the value, one more named by the caller.
        let id = base + 10;
        let tags = tag_names("n", id, MAX_TAGS - 1);
        c.set_tagged(&id, &"v1".to_owned(), &tags).await.unwrap();
        c.expire_tag(&tags[0]).await.unwrap();
        let own = format!("own:{id}");
        let got = fail_a_refill(tagged(&c, id, vec![own.clone()]), || async {}).await;
        assert_served_stale(got, "v1");
        assert_eq!(throttled(&c, id).await.as_deref(), Some("v1"));
        c.invalidate_tag(&own).await.unwrap();
        assert_eq!(c.get(&id).await.unwrap(), None, "the caller's tag is kept");
    }

    /// A value with `MAX_TAGS` tags and a caller naming another: one header cannot hold them. The failed
    /// refill serves the stale value to its caller and stores nothing: the next refill asks the source again
    /// (and falls back again), and the value's own tags still govern it — a removal of one removes it.
    pub async fn over_max_tags_the_stale_value_is_served_but_not_stored(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let id = new_id();
        let tags = tag_names("o", id, MAX_TAGS);
        c.set_tagged(&id, &"v1".to_owned(), &tags).await.unwrap();
        c.expire_tag(&tags[0]).await.unwrap();
        let own = vec![format!("own:{id}")];
        let got = fail_a_refill(tagged(&c, id, own.clone()), || async {}).await;
        assert_served_stale(got, "v1");
        assert_eq!(c.get(&id).await.unwrap(), None, "stored although over");
        let asked = AtomicUsize::new(0);
        let again = c
            .get_or_set_tagged_with_status(&id, &own, || {
                asked.fetch_add(1, Ordering::SeqCst);
                async { down() }
            })
            .await;
        assert_eq!(asked.load(Ordering::SeqCst), 1, "the source was throttled");
        assert_served_stale(again, "v1");
        // Over the limit, with a removal of one of the value's tags during the load: gone.
        let got = fail_a_refill(tagged(&c, id, own.clone()), || async {
            c.invalidate_tag(&tags[MAX_TAGS - 1]).await.unwrap();
        })
        .await;
        assert_served_stale(got, "v1");
        let after = c.get_or_set_with_status(&id, || async { down() }).await;
        assert!(after.is_err(), "removed, yet the fallback: {after:?}");
    }

    /// `get_or_set_many` over three stale values (each with its own tag and the shared expired one) whose
    /// batch load fails while the second's own tag is removed: the first and third are throttled hits, the
    /// second is gone (the next batch asks the source for it alone).
    pub async fn a_failed_batch_throttles_each_kept_value_with_its_own_tags(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let base = new_id();
        let ids = [base + 1, base + 2, base + 3];
        let shared = format!("s:{base}");
        for id in ids {
            let own = format!("t:{id}");
            c.get_or_set_tagged(&id, &[shared.as_str(), own.as_str()], || async {
                Ok::<_, std::io::Error>(format!("v1-{id}"))
            })
            .await
            .unwrap();
        }
        c.expire_tag(&shared).await.unwrap();
        let batch = {
            let c = c.clone();
            move |gate: Arc<Gate>| async move {
                c.get_or_set_many(&ids, |_| {
                    let gate = Arc::clone(&gate);
                    async move {
                        gate.fail_when_released()
                            .await
                            .map(|_| Vec::<(u64, String)>::new())
                    }
                })
                .await
            }
        };
        let got = fail_a_refill(batch, || async {
            c.invalidate_tag(&format!("t:{}", ids[1])).await.unwrap();
        })
        .await;
        assert_eq!(
            got.expect("the failed batch served no stale values"),
            ids.map(|id| format!("v1-{id}"))
        );
        assert_eq!(
            c.get(&ids[1]).await.unwrap(),
            None,
            "removed during the load"
        );
        let asked = Mutex::new(Vec::new());
        let again = c
            .get_or_set_many(&ids, |missing| {
                asked.lock().unwrap().extend(missing.iter().map(|id| **id));
                let out: Vec<(u64, String)> =
                    missing.iter().map(|id| (**id, "v2".into())).collect();
                async move { Ok::<_, std::io::Error>(out) }
            })
            .await
            .unwrap();
        assert_eq!(*asked.lock().unwrap(), [ids[1]], "the source was asked for");
        assert_eq!(
            again,
            [
                format!("v1-{}", ids[0]),
                "v2".into(),
                format!("v1-{}", ids[2])
            ]
        );
    }

    /// The in-process tier: two instances read the throttled copy (each keeps it in L1); a tag the value
    /// carries (the refill's caller named none) is then removed — after the throttle for one id, during the
    /// failing load for another. No read that starts later than the bound after the removal returned may
    /// get the value, on either instance.
    pub async fn no_instance_serves_a_throttled_copy_beyond_the_bound_after_a_tag_removal(
        h: Harness,
    ) {
        let hs = h.handles(2).await;
        let (a, b) = (
            hs[0].cache::<String>("ft_l1").unwrap(),
            hs[1].cache::<String>("ft_l1").unwrap(),
        );
        // On Cluster an instance's view of the epochs may lag by the group-invalidation bound (500 ms).
        let bound = L1_MAX_STALE
            + if h.is_cluster() {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            }
            + Duration::from_millis(200);
        let base = new_id();
        for (round, during_load) in [false, true].into_iter().enumerate() {
            let id = base + round as u64;
            let (s, t) = (format!("s:{id}"), format!("t:{id}"));
            a.get_or_set_tagged(&id, &[s.as_str(), t.as_str()], || async { ok("v1") })
                .await
                .unwrap();
            assert_eq!(b.get(&id).await.unwrap().as_deref(), Some("v1"));
            a.expire_tag(&s).await.unwrap();
            let removed_at = Mutex::new(None);
            let got = fail_a_refill(untagged(&a, id), || async {
                if during_load {
                    a.invalidate_tag(&t).await.unwrap();
                    *removed_at.lock().unwrap() = Some(Instant::now());
                }
            })
            .await;
            assert_served_stale(got, "v1");
            if !during_load {
                // The throttled copy, read (and kept in L1) by both instances.
                for c in [&a, &b] {
                    assert_eq!(c.get(&id).await.unwrap().as_deref(), Some("v1"));
                    assert_eq!(c.get(&id).await.unwrap().as_deref(), Some("v1"));
                }
                a.invalidate_tag(&t).await.unwrap();
                *removed_at.lock().unwrap() = Some(Instant::now());
            }
            let removed_at = removed_at.into_inner().unwrap().unwrap();
            let until = removed_at + bound + Duration::from_millis(500);
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            let mut checked = 0;
            while Instant::now() < until {
                pace.tick().await;
                for (name, c) in [("a", &a), ("b", &b)] {
                    let started = Instant::now();
                    let got = c.get(&id).await.unwrap();
                    if started > removed_at + bound {
                        checked += 1;
                        assert_eq!(
                            got,
                            None,
                            "round {round}: instance {name} served the throttled copy {:?} after tag `{t}` was removed",
                            started - removed_at
                        );
                    }
                }
            }
            assert!(checked > 0, "no read past the bound");
        }
    }
}

/// A Redis-only case on a single server, one with the documented ACL user, and the shared cluster (they write
/// stored bytes behind keyward's back, which the embedded keyspace cannot hold).
macro_rules! on_redis {
    ($($name:ident),* $(,)?) => {
        mod on_redis {
            $(
                pub mod $name {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn redis() {
                        super::super::redis_cases::$name(crate::common::Harness::redis()).await;
                    }
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn redis_acl() {
                        super::super::redis_cases::$name(crate::common::Harness::redis_acl()).await;
                    }
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn cluster() {
                        super::super::redis_cases::$name(crate::common::Harness::cluster()).await;
                    }
                }
            )*
        }
    };
}

on_redis!(
    a_kept_value_whose_tag_epoch_the_client_cannot_read_is_refilled_not_an_error,
    a_kept_value_recording_an_epoch_no_bump_reaches_is_throttled_at_the_current_one,
);

/// The stored bytes of `key`.
fn raw_get(raw: &mut dyn ::redis::ConnectionLike, key: &str) -> Vec<u8> {
    ::redis::cmd("GET").arg(key).query(raw).unwrap()
}

/// Store `bytes` at `key` for `px_ms`.
fn raw_set(raw: &mut dyn ::redis::ConnectionLike, key: &str, bytes: &[u8], px_ms: u64) {
    ::redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .arg("PX")
        .arg(px_ms)
        .exec(raw)
        .unwrap();
}

/// Where the epoch recorded for `tag` sits in stored bytes (start, end).
fn tag_epoch_span(stored: &[u8], tag: &str) -> (usize, usize) {
    let needle = format!("{}:{tag}:", tag.len());
    let at = stored
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("the tag in the header")
        + needle.len();
    let end = at + stored[at..].iter().position(|&b| b == b':').unwrap();
    (at, end)
}

/// Stored bytes with the epoch recorded for `tag` replaced by `epoch` (any text).
fn with_tag_epoch(stored: &[u8], tag: &str, epoch: &str) -> Vec<u8> {
    let (at, end) = tag_epoch_span(stored, tag);
    let mut out = stored[..at].to_vec();
    out.extend_from_slice(epoch.as_bytes());
    out.extend_from_slice(&stored[end..]);
    out
}

/// The epoch recorded for `tag` in stored bytes.
fn tag_epoch(stored: &[u8], tag: &str) -> u64 {
    let (at, end) = tag_epoch_span(stored, tag);
    std::str::from_utf8(&stored[at..end])
        .unwrap()
        .parse()
        .unwrap()
}

/// Within `ft`'s 60 s stale grace: a value with this much TTL left is stale (kept for fail-safe).
const IN_GRACE_MS: u64 = 30_000;

mod redis_cases {
    use super::*;

    /// Fill `id` with `"v1"` tagged `tag`, then rewrite it behind keyward's back as a stale value (within
    /// the grace) whose header records `epoch` (any text) for `tag`. Returns the entry's key.
    async fn stale_recording(
        c: &Cache<String>,
        raw: &mut dyn ::redis::ConnectionLike,
        id: u64,
        tag: &str,
        epoch: &str,
    ) -> String {
        c.get_or_set_tagged(&id, &[tag], || async { ok("v1") })
            .await
            .unwrap();
        let key = c.key(&id).unwrap();
        let stored = raw_get(raw, &key);
        raw_set(raw, &key, &with_tag_epoch(&stored, tag, epoch), IN_GRACE_MS);
        key
    }

    /// A kept (stale) value whose header records a tag epoch of more digits than a `u64` holds: `fetch.lua`
    /// reads it (and grants the refill's lease over it), the client cannot. The refill must go on as for a
    /// value it cannot serve: a loader that succeeds fills the entry, one that fails is the caller's error.
    /// Before, the reply (one kept-tag epoch, no tag name the client could read) was "unexpected script
    /// reply", whatever the loader did.
    pub async fn a_kept_value_whose_tag_epoch_the_client_cannot_read_is_refilled_not_an_error(
        h: Harness,
    ) {
        let mut raw = h.raw().unwrap();
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let base = new_id();
        for (round, loads) in [true, false].into_iter().enumerate() {
            let id = base + round as u64;
            let tag = format!("t:{id}");
            stale_recording(&c, raw.as_mut(), id, &tag, "1234567890123456789012345").await;
            let got = c
                .get_or_set_with_status(&id, || async { if loads { ok("v2") } else { down() } })
                .await;
            if loads {
                let (v, how) = got.expect("a refill with a working loader failed");
                assert_eq!((v.as_str(), how), ("v2", CacheLookup::Miss));
                assert_eq!(c.get(&id).await.unwrap().as_deref(), Some("v2"));
            } else {
                let err = got.expect_err("a value the client cannot read was served");
                assert!(
                    matches!(err, keyward::Error::Loader { .. }),
                    "not the loader's error: {err}"
                );
            }
        }
    }

    /// A kept value recording, for its tag, an epoch no bump ever reaches (the top epoch `2^53 - 1`, or one
    /// past the valid range that a `u64` still holds): the throttle must record the tag at its current epoch,
    /// not at the recorded one — at the top, the copy would outlive every removal of the tag; out of range,
    /// the script's reply would not be an integer the client reads.
    pub async fn a_kept_value_recording_an_epoch_no_bump_reaches_is_throttled_at_the_current_one(
        h: Harness,
    ) {
        let mut raw = h.raw().unwrap();
        let kw = h.keyward().await;
        let c = kw.cache::<String>("ft").unwrap();
        let base = new_id();
        for (round, epoch) in ["9007199254740991", "18446744073709551615"]
            .into_iter()
            .enumerate()
        {
            let id = base + round as u64;
            let tag = format!("t:{id}");
            let key = stale_recording(&c, raw.as_mut(), id, &tag, epoch).await;
            let got = c.get_or_set_with_status(&id, || async { down() }).await;
            assert_served_stale(got, "v1");
            let copy = raw_get(raw.as_mut(), &key);
            assert!(
                tag_epoch(&copy, &tag) < 9007199254740991,
                "epoch {epoch}: the throttled copy records {}",
                String::from_utf8_lossy(&copy)
            );
            assert_eq!(throttled(&c, id).await.as_deref(), Some("v1"));
            c.invalidate_tag(&tag).await.unwrap();
            assert_eq!(
                c.get(&id).await.unwrap(),
                None,
                "epoch {epoch}: the throttled copy outlived a removal of its tag"
            );
        }
    }
}

/// Redis Cluster: handle `A`'s epoch view lags (an announcement it missed, made here by writing the tag's
/// removal epoch behind keyward's back; its next full read is 15 s away with a 60 s bound), handle `B`'s
/// does not. `B` fills a value tagged `t` (recording the new epoch), which then goes stale (its TTL, by
/// hand). `A` refills it, the load fails, and `A` throttles the stale value. The throttled copy must record
/// `t` no lower than the value did: else every handle that sees the removal epoch (`B`) takes the copy for
/// removed, so the throttle does not hold and the fail-safe value is lost (the next failing refill is an
/// error). `names_tag`: whether `A`'s refill names `t` itself (its own epoch of `t` is the lagging one).
async fn a_lagging_view_throttles_the_kept_value_no_lower_than_it_recorded(names_tag: bool) {
    let h = Harness::cluster();
    let url = h.url().unwrap();
    let slow = ConnectOptions::default().group_invalidation_bound(Duration::from_secs(60));
    let a_kw = Keyward::connect_with(&url, h.policy(), slow.clone())
        .await
        .unwrap();
    let a = a_kw.cache::<String>("ft").unwrap();
    let id = new_id();
    let tag = format!("t:{id}");
    // `A` reads its view (at connect) before the removal epoch is written: it never sees it.
    a.get(&id).await.unwrap();
    let mut raw = h.raw().unwrap();
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query(raw.as_mut()).unwrap();
    let epoch = secs * 1_000_000 + micros;
    ::redis::cmd("HSET")
        .arg(format!("test:{}:_kw:gens", h.app()))
        .arg(format!("t:{tag}"))
        .arg(epoch)
        .exec(raw.as_mut())
        .unwrap();
    let b_kw = Keyward::connect_with(&url, h.policy(), slow).await.unwrap();
    let b = b_kw.cache::<String>("ft").unwrap();
    b.get_or_set_tagged(&id, &[tag.as_str()], || async { ok("v1") })
        .await
        .unwrap();
    let key = a.key(&id).unwrap();
    let stored = raw_get(raw.as_mut(), &key);
    assert_eq!(tag_epoch(&stored, &tag), epoch, "B's view saw the epoch");
    ::redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(IN_GRACE_MS)
        .exec(raw.as_mut())
        .unwrap();
    let got = if names_tag {
        a.get_or_set_tagged_with_status(&id, &[tag.as_str()], || async { down() })
            .await
    } else {
        a.get_or_set_with_status(&id, || async { down() }).await
    };
    assert_served_stale(got, "v1");
    // The case was provoked: `A`'s view still lags (a fill by `A` records the old epoch of `t`).
    let probe = id + 1;
    a.get_or_set_tagged(&probe, &[tag.as_str()], || async { ok("probe") })
        .await
        .unwrap();
    let lagging = tag_epoch(&raw_get(raw.as_mut(), &a.key(&probe).unwrap()), &tag);
    assert!(
        lagging < epoch,
        "A's view did not lag ({lagging} >= {epoch})"
    );
    let copy = raw_get(raw.as_mut(), &key);
    assert!(
        tag_epoch(&copy, &tag) >= epoch,
        "the throttled copy records `{tag}` below the value's own epoch: {}",
        String::from_utf8_lossy(&copy)
    );
    assert_eq!(
        throttled(&b, id).await.as_deref(),
        Some("v1"),
        "B took the throttled copy for removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_lagging_view_throttles_an_untagged_refill_no_lower_than_the_value_recorded() {
    a_lagging_view_throttles_the_kept_value_no_lower_than_it_recorded(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_lagging_view_throttles_a_refill_naming_the_tag_no_lower_than_the_value_recorded()
{
    a_lagging_view_throttles_the_kept_value_no_lower_than_it_recorded(true).await;
}
