//! The in-process tier (L1): repeat reads are served without asking the store, and an invalidation anywhere
//! reaches every instance within `l1_max_stale` — on every backend, in randomized trials, while the backplane
//! connection is killed and while Redis is paused. (Two handles on Redis are two instances: separate
//! connections, separate L1s; several OS processes are in keyward-cli's `bench staleness` tests.)

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Harness, L1_MAX_STALE};
use keyward::{Cache, CacheLookup, ConnectOptions, Keyward};

/// A deadline for things that must happen "soon".
const SOON: Duration = Duration::from_secs(20);

conformance!(
    repeat_reads_are_served_in_process,
    invalidations_reach_other_instances_within_the_bound,
    writes_and_group_invalidations_reach_other_instances,
    a_refused_fill_never_lands_in_l1,
    randomized_trials_never_read_beyond_the_bound,
    shared_reads_share_one_decoding_and_follow_invalidations,
    tagged_shared_reads_share_one_decoding_and_follow_tag_invalidations,
    a_tag_invalidation_drops_only_the_copies_carrying_it,
    batch_read_copies_know_their_tags,
);

fn load(
    source: &Arc<AtomicU64>,
) -> impl FnOnce() -> futures_util::future::Ready<Result<u64, std::io::Error>> + use<> {
    let v = source.load(Ordering::SeqCst);
    move || futures_util::future::ready(Ok(v))
}

/// Read until the handle serves `id` from L1 (a new handle vouches for its L1 once its first heartbeat came
/// back), within [`SOON`].
async fn until_l1_hit(c: &Cache<u64>, id: u64, source: &Arc<AtomicU64>) {
    let deadline = Instant::now() + SOON;
    loop {
        let (_, how) = c.get_or_set_with_status(&id, load(source)).await.unwrap();
        if how == CacheLookup::L1Hit {
            return;
        }
        assert!(Instant::now() < deadline, "L1 never served {id}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// After an invalidation of `id` (new source version `new`) returned at `returned`, read through `c` until it
/// serves `new`; every read that *started* more than `l1_max_stale` after `returned` must already serve it.
/// Returns how long after `returned` the last stale read started.
async fn converges(
    c: &Cache<u64>,
    id: u64,
    new: u64,
    returned: Instant,
    source: &Arc<AtomicU64>,
) -> Duration {
    let mut last_stale = Duration::ZERO;
    loop {
        let started = Instant::now();
        let (v, how) = c.get_or_set_with_status(&id, load(source)).await.unwrap();
        if v >= new {
            return last_stale;
        }
        let after = started.duration_since(returned);
        assert!(
            after < L1_MAX_STALE,
            "a read started {after:?} after the invalidation returned still served {v} < {new} ({how:?})"
        );
        last_stale = after;
        tokio::task::yield_now().await;
    }
}

mod cases {
    use super::*;

    pub async fn repeat_reads_are_served_in_process(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("near").unwrap();
        let source = Arc::new(AtomicU64::new(7));
        let (v, how) = c.get_or_set_with_status(&1, load(&source)).await.unwrap();
        assert_eq!((v, how), (7, CacheLookup::Miss));
        until_l1_hit(&c, 1, &source).await;
        let before = c.stats();
        source.store(8, Ordering::SeqCst);
        if let Some(mut raw) = h.raw() {
            // Behind keyward's back (no invalidation): L1 does not ask Redis, so it still serves 7.
            let _: () = ::redis::cmd("DEL")
                .arg(c.key(&1).unwrap())
                .query(&mut *raw)
                .unwrap();
        }
        for _ in 0..100 {
            let (v, how) = c.get_or_set_with_status(&1, load(&source)).await.unwrap();
            assert_eq!((v, how), (7, CacheLookup::L1Hit));
            assert_eq!(c.get(&1).await.unwrap(), Some(7));
        }
        let after = c.stats();
        assert_eq!(after.l1_hits - before.l1_hits, 200);
        assert_eq!(after.hits - before.hits, 200, "L1 hits are hits");
        assert_eq!(after.loader_calls, before.loader_calls);
        // The class without L1 never reports one.
        let plain = kw.cache::<u64>("product").unwrap();
        for _ in 0..3 {
            let (_, how) = plain
                .get_or_set_with_status(&1, load(&source))
                .await
                .unwrap();
            assert_ne!(how, CacheLookup::L1Hit);
        }
    }

    pub async fn invalidations_reach_other_instances_within_the_bound(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<u64>("near").unwrap();
        let b = hs[1].cache::<u64>("near").unwrap();
        let source = Arc::new(AtomicU64::new(0));
        let mut worst = Duration::ZERO;
        for round in 1..=20 {
            until_l1_hit(&b, 1, &source).await;
            source.store(round, Ordering::SeqCst);
            a.invalidate(&1).await.unwrap();
            let returned = Instant::now();
            worst = worst.max(converges(&b, 1, round, returned, &source).await);
        }
        println!(
            "L1-FIGURE invalidate: last stale read started {worst:?} after the invalidation returned"
        );
    }

    pub async fn writes_and_group_invalidations_reach_other_instances(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<u64>("near").unwrap();
        let b = hs[1].cache::<u64>("near").unwrap();
        let b2 = hs[1].cache::<u64>("near2").unwrap();
        let source = Arc::new(AtomicU64::new(1));
        until_l1_hit(&b, 1, &source).await;
        until_l1_hit(&b2, 1, &source).await;

        // A direct write.
        source.store(2, Ordering::SeqCst);
        a.set(&1, &2).await.unwrap();
        converges(&b, 1, 2, Instant::now(), &source).await;

        // The class: `near2` keeps its L1 entry.
        until_l1_hit(&b, 1, &source).await;
        source.store(3, Ordering::SeqCst);
        a.invalidate_all().await.unwrap();
        converges(&b, 1, 3, Instant::now(), &source).await;
        let (v, how) = b2.get_or_set_with_status(&1, load(&source)).await.unwrap();
        assert_eq!(
            (v, how),
            (1, CacheLookup::L1Hit),
            "another class is untouched"
        );

        // The namespace: every class.
        until_l1_hit(&b, 1, &source).await;
        source.store(4, Ordering::SeqCst);
        hs[0].invalidate_namespace().await.unwrap();
        let returned = Instant::now();
        converges(&b, 1, 4, returned, &source).await;
        converges(&b2, 1, 4, returned, &source).await;

        // A tag (the entry was filled with it; reads without naming it still honour it).
        let v = b
            .get_or_set_tagged(&7, &["category:3"], load(&source))
            .await
            .unwrap();
        assert_eq!(v, 4);
        until_l1_hit(&b, 7, &source).await;
        source.store(5, Ordering::SeqCst);
        hs[0].invalidate_tag("category:3").await.unwrap();
        converges(&b, 7, 5, Instant::now(), &source).await;

        // invalidate_after, the write-first form.
        until_l1_hit(&b, 1, &source).await;
        let src = Arc::clone(&source);
        a.invalidate_after(&1, async move {
            src.store(6, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
        converges(&b, 1, 6, Instant::now(), &source).await;
    }

    /// A load that started before an invalidation returns its (overlapping) value to its caller but never
    /// enters L1: the next read loads again.
    pub async fn a_refused_fill_never_lands_in_l1(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<u64>("near").unwrap();
        let b = hs[1].cache::<u64>("near").unwrap();
        let source = Arc::new(AtomicU64::new(1));
        // Make sure b vouches for its L1 (its inserts would otherwise be refused for another reason).
        until_l1_hit(&b, 99, &source).await;
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let fill = {
            let (b, entered, release) = (b.clone(), Arc::clone(&entered), Arc::clone(&release));
            tokio::spawn(async move {
                b.get_or_set(&1, || async move {
                    entered.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>(1)
                })
                .await
                .unwrap()
            })
        };
        entered.notified().await;
        source.store(2, Ordering::SeqCst);
        a.invalidate(&1).await.unwrap();
        release.notify_one();
        assert_eq!(
            fill.await.unwrap(),
            1,
            "the overlapping caller gets what it loaded"
        );
        let (v, how) = b.get_or_set_with_status(&1, load(&source)).await.unwrap();
        assert_eq!(
            (v, how),
            (2, CacheLookup::Miss),
            "the refused fill is in neither tier"
        );
    }

    /// At least 10,000 operations (and 5 × the bound) from four tasks on two instances over eight keys: writes of the source followed by
    /// an invalidation (key, class) on the first instance, reads on both (plain and shared reads). No read that started more than `l1_max_stale` after an
    /// invalidation returned serves a value older than it.
    pub async fn randomized_trials_never_read_beyond_the_bound(h: Harness) {
        const KEYS: usize = 8;
        const OPS: usize = 10_000;
        let hs = h.handles(2).await;
        let caches: Vec<Cache<u64>> = hs.iter().map(|k| k.cache::<u64>("near").unwrap()).collect();
        let sources: Arc<Vec<Arc<AtomicU64>>> =
            Arc::new((0..KEYS).map(|_| Arc::new(AtomicU64::new(0))).collect());
        // Per key: (version, when its invalidation returned), newest last.
        let returned: Arc<Vec<Returned>> =
            Arc::new((0..KEYS).map(|_| std::sync::Mutex::default()).collect());
        let version = Arc::new(AtomicU64::new(0));
        let ops = Arc::new(AtomicU64::new(0));
        // At least OPS operations, and long enough for the bound to matter many times over.
        let until = Instant::now() + L1_MAX_STALE * 5;
        let mut tasks = Vec::new();
        for t in 0..4 {
            let c = caches[t % 2].clone();
            let (sources, returned, version, ops) = (
                Arc::clone(&sources),
                Arc::clone(&returned),
                Arc::clone(&version),
                Arc::clone(&ops),
            );
            tasks.push(tokio::spawn(async move {
                let (mut violations, mut l1_hits) = (0u64, 0u64);
                while ops.fetch_add(1, Ordering::Relaxed) < OPS as u64 || Instant::now() < until {
                    tokio::task::yield_now().await;
                    let (k, roll) = {
                        use rand::Rng as _;
                        let mut rng = rand::rng();
                        (rng.random_range(0..KEYS), rng.random_range(0..100u32))
                    };
                    let id = k as u64;
                    // Only the first instance writes: the second one learns of every change through the backplane.
                    if t % 2 == 0 && roll < 8 {
                        let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                        sources[k].fetch_max(v, Ordering::SeqCst);
                        if roll == 0 {
                            c.invalidate_all().await.unwrap();
                            let now = Instant::now();
                            for r in returned.iter().enumerate() {
                                let cur = sources[r.0].load(Ordering::SeqCst);
                                r.1.lock().unwrap().push((cur, now));
                            }
                        } else {
                            c.invalidate(&id).await.unwrap();
                            returned[k].lock().unwrap().push((v, Instant::now()));
                        }
                    } else {
                        let started = Instant::now();
                        // The newest version whose invalidation returned more than the bound ago.
                        let floor = returned[k]
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|(_, at)| started.duration_since(*at) > L1_MAX_STALE)
                            .map(|(v, _)| *v)
                            .max()
                            .unwrap_or(0);
                        // Half the readers (one per instance) use the shared read, which keeps the
                        // decoded value with the L1 entry: it must follow invalidations the same way.
                        let (v, how) = if t >= 2 {
                            let (v, how) = c
                                .get_or_set_shared_with_status(&id, load(&sources[k]))
                                .await
                                .unwrap();
                            (*v, how)
                        } else {
                            c.get_or_set_with_status(&id, load(&sources[k]))
                                .await
                                .unwrap()
                        };
                        if how == CacheLookup::L1Hit {
                            l1_hits += 1;
                        }
                        if v < floor {
                            violations += 1;
                            eprintln!("stale: key {k} served {v} < {floor} ({how:?})");
                        }
                    }
                }
                (violations, l1_hits)
            }));
        }
        let (mut violations, mut l1_hits) = (0, 0);
        for t in tasks {
            let (v, l) = t.await.unwrap();
            violations += v;
            l1_hits += l;
        }
        let ops = ops.load(Ordering::Relaxed);
        println!(
            "L1-FIGURE randomized: {ops} ops, {l1_hits} L1 hits, {violations} reads beyond the bound"
        );
        assert_eq!(violations, 0);
        assert!(l1_hits > 0, "L1 was never exercised");
    }

    /// The shared reads: an L1 entry is decoded once and every later shared read gets the same `Arc`; a
    /// `Cache` of the class with another value type decodes for itself; an invalidation here or on another
    /// instance replaces what the shared reads serve, within the bound; L1 hits are counted as such.
    pub async fn shared_reads_share_one_decoding_and_follow_invalidations(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<u64>("near").unwrap();
        let b = hs[1].cache::<u64>("near").unwrap();
        let source = Arc::new(AtomicU64::new(7));
        let (v, how) = b
            .get_or_set_shared_with_status(&1, load(&source))
            .await
            .unwrap();
        assert_eq!((*v, how), (7, CacheLookup::Miss));
        until_l1_hit(&b, 1, &source).await;
        let before = b.stats();
        let (first, how) = b
            .get_or_set_shared_with_status(&1, load(&source))
            .await
            .unwrap();
        assert_eq!((*first, how), (7, CacheLookup::L1Hit));
        for _ in 0..10 {
            let again = b.get_or_set_shared(&1, load(&source)).await.unwrap();
            assert!(Arc::ptr_eq(&first, &again), "one decoding per entry");
            let got = b.get_shared(&1).await.unwrap().expect("an L1 hit");
            assert!(Arc::ptr_eq(&first, &got));
        }
        let after = b.stats();
        assert_eq!(after.l1_hits - before.l1_hits, 21);
        assert_eq!(after.hits - before.hits, 21, "L1 hits are hits");
        // Another value type on the same class and entry: its own decoding, the same value.
        let signed = hs[1].cache::<i64>("near").unwrap();
        assert_eq!(*signed.get_shared(&1).await.unwrap().unwrap(), 7);
        assert_eq!(b.get(&1).await.unwrap(), Some(7));

        // Invalidated on this instance: the next shared read loads the new value at once.
        source.store(8, Ordering::SeqCst);
        b.invalidate(&1).await.unwrap();
        let (v, how) = b
            .get_or_set_shared_with_status(&1, load(&source))
            .await
            .unwrap();
        assert_eq!((*v, how), (8, CacheLookup::Miss));

        // Invalidated on another instance: within the bound.
        until_l1_hit(&b, 1, &source).await;
        assert_eq!(*b.get_shared(&1).await.unwrap().unwrap(), 8);
        source.store(9, Ordering::SeqCst);
        a.invalidate(&1).await.unwrap();
        let returned = Instant::now();
        loop {
            let started = Instant::now();
            let v = b.get_or_set_shared(&1, load(&source)).await.unwrap();
            if *v == 9 {
                break;
            }
            let after = started.duration_since(returned);
            assert!(
                after < L1_MAX_STALE,
                "a shared read started {after:?} after the invalidation returned still served {v}"
            );
            tokio::task::yield_now().await;
        }
        // And a plain get after it agrees.
        assert_eq!(b.get_shared(&1).await.unwrap().as_deref(), Some(&9));
    }

    /// `get_or_set_tagged_shared`: the entry carries its tag, an L1 hit hands out the same `Arc` every time,
    /// and a tag invalidation on another instance replaces what the shared reads serve within the bound.
    pub async fn tagged_shared_reads_share_one_decoding_and_follow_tag_invalidations(h: Harness) {
        let hs = h.handles(2).await;
        let b = hs[1].cache::<u64>("near").unwrap();
        let source = Arc::new(AtomicU64::new(7));
        let v = b
            .get_or_set_tagged_shared(&1, &["shelf"], load(&source))
            .await
            .unwrap();
        assert_eq!(*v, 7);
        // Until L1 vouches for the entry: two reads in a row then return the same `Arc`.
        let deadline = Instant::now() + SOON;
        let first = loop {
            let x = b
                .get_or_set_tagged_shared(&1, &["shelf"], load(&source))
                .await
                .unwrap();
            let y = b
                .get_or_set_tagged_shared(&1, &["shelf"], load(&source))
                .await
                .unwrap();
            if Arc::ptr_eq(&x, &y) {
                break y;
            }
            assert!(
                Instant::now() < deadline,
                "L1 never served the tagged entry"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        for _ in 0..10 {
            let again = b
                .get_or_set_tagged_shared(&1, &["shelf"], load(&source))
                .await
                .unwrap();
            assert!(Arc::ptr_eq(&first, &again), "one decoding per entry");
        }
        // The tag, invalidated on the other instance: within the bound.
        source.store(8, Ordering::SeqCst);
        hs[0].invalidate_tag("shelf").await.unwrap();
        let returned = Instant::now();
        loop {
            let started = Instant::now();
            let v = b
                .get_or_set_tagged_shared(&1, &["shelf"], load(&source))
                .await
                .unwrap();
            if *v == 8 {
                break;
            }
            let after = started.duration_since(returned);
            assert!(
                after < L1_MAX_STALE,
                "a tagged shared read started {after:?} after the tag's invalidation still served {v}"
            );
            tokio::task::yield_now().await;
        }
        // A bad tag is refused before anything is read.
        assert!(matches!(
            b.get_or_set_tagged_shared(&1, &[""], load(&source)).await,
            Err(keyward::Error::InvalidTag { .. })
        ));
    }

    /// A tag's invalidation drops the L1 copies that carry the tag — those a fill made and those read back
    /// from the store alike — on every instance within the bound, and keeps the others. (Before, it dropped
    /// every copy of every class.) Up to three tries: a loss of trust in between (a heartbeat late on a
    /// loaded machine) drops every copy legitimately; the old behaviour fails every try.
    pub async fn a_tag_invalidation_drops_only_the_copies_carrying_it(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<u64>("near").unwrap();
        let b = hs[1].cache::<u64>("near").unwrap();
        let mut tries = Vec::new();
        for t in 0..3 {
            match tag_try(&a, &b, 1_000 * (t + 1)).await {
                Ok(()) => return,
                Err(e) => tries.push(e),
            }
        }
        panic!("copies without the tag were dropped in every try: {tries:#?}");
    }

    /// Copies a batch read (`get_or_set_many`) made know their tags from the stored envelopes: a tag's
    /// invalidation drops the tagged one and keeps the untagged one. (Before, a batch copy's tags were
    /// unknown and any tag dropped it.) Up to three tries, as above.
    pub async fn batch_read_copies_know_their_tags(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<u64>("near").unwrap();
        let b = hs[1].cache::<u64>("near").unwrap();
        let mut tries = Vec::new();
        for t in 0..3 {
            match batch_try(&a, &b, 10_000 * (t + 1)).await {
                Ok(()) => return,
                Err(e) => tries.push(e),
            }
        }
        panic!("the untagged batch copy was dropped in every try: {tries:#?}");
    }
}

/// Read `id` (filled with `tags`) through `c` until L1 serves it, within [`SOON`].
async fn until_tagged_l1_hit(c: &Cache<u64>, id: u64, tags: &[&str], source: &Arc<AtomicU64>) {
    let deadline = Instant::now() + SOON;
    loop {
        let (_, how) = c
            .get_or_set_tagged_with_status(&id, tags, load(source))
            .await
            .unwrap();
        if how == CacheLookup::L1Hit {
            return;
        }
        assert!(Instant::now() < deadline, "L1 never served {id}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One try of [`cases::a_tag_invalidation_drops_only_the_copies_carrying_it`] on fresh ids from `base`:
/// `Ok` when the copies without the tag were still served from L1 on both instances afterwards, `Err` with
/// what was not (a loss of trust, which drops every copy, can explain one such try).
async fn tag_try(a: &Cache<u64>, b: &Cache<u64>, base: u64) -> Result<(), String> {
    let source = Arc::new(AtomicU64::new(base));
    let (x, y, plain) = (base + 1, base + 2, base + 3);
    // `a` fills (its copies know their tags from the fill); `b` reads them from the store (its copies
    // know them from the stored envelope).
    for c in [a, b] {
        until_tagged_l1_hit(c, x, &["kind:x"], &source).await;
        until_tagged_l1_hit(c, y, &["kind:y"], &source).await;
        until_tagged_l1_hit(c, plain, &[], &source).await;
    }
    source.store(base + 100, Ordering::SeqCst);
    a.invalidate_tag("kind:x").await.unwrap();
    let returned = Instant::now();
    // The tagged copies go: on `a` at once, on `b` within the bound.
    let (v, how) = a
        .get_or_set_tagged_with_status(&x, &["kind:x"], load(&source))
        .await
        .unwrap();
    assert_eq!((v, how), (base + 100, CacheLookup::Miss));
    converges(b, x, base + 100, returned, &source).await;
    // The others stay, on both instances.
    let mut kept = Vec::new();
    for (name, c) in [("a", a), ("b", b)] {
        for (id, tags) in [(y, &["kind:y"][..]), (plain, &[][..])] {
            let (v, how) = c
                .get_or_set_tagged_with_status(&id, tags, load(&source))
                .await
                .unwrap();
            assert_eq!(
                v, base,
                "{name} {id}: the copy it keeps is the value it had"
            );
            kept.push((name, id, how));
        }
    }
    if kept.iter().all(|(_, _, how)| *how == CacheLookup::L1Hit) {
        Ok(())
    } else {
        Err(format!("{kept:?}"))
    }
}

/// One try of [`cases::batch_read_copies_know_their_tags`] on fresh ids from `base` (see [`tag_try`]).
async fn batch_try(a: &Cache<u64>, b: &Cache<u64>, base: u64) -> Result<(), String> {
    let source = Arc::new(AtomicU64::new(base));
    let (tagged, plain, warm) = (base + 1, base + 2, base + 3);
    // `a` fills both; `b` vouches for its L1 (on a third id), then reads the two in one batch: its copies
    // come from the batch read, which takes their tags from the stored envelopes.
    until_tagged_l1_hit(a, tagged, &["kind:z"], &source).await;
    until_tagged_l1_hit(a, plain, &[], &source).await;
    until_l1_hit(b, warm, &source).await;
    let v = source.load(Ordering::SeqCst);
    let got = b
        .get_or_set_many(&[tagged, plain], |_| async move {
            Ok::<_, std::io::Error>(vec![(tagged, v), (plain, v)])
        })
        .await
        .unwrap();
    assert_eq!(got, [base, base]);
    source.store(base + 100, Ordering::SeqCst);
    a.invalidate_tag("kind:z").await.unwrap();
    let returned = Instant::now();
    converges(b, tagged, base + 100, returned, &source).await;
    let (v, how) = b
        .get_or_set_with_status(&plain, load(&source))
        .await
        .unwrap();
    assert_eq!(v, base, "the untagged copy keeps its value");
    if how == CacheLookup::L1Hit {
        Ok(())
    } else {
        Err(format!("{how:?}"))
    }
}

/// Per key: (version, when its invalidation returned), newest last.
type Returned = std::sync::Mutex<Vec<(u64, Instant)>>;

/// Redis only: a connection option set for fault tests (a short response timeout, a quick breaker).
async fn quick(h: &Harness) -> Keyward {
    Keyward::connect_with(
        &h.url().unwrap(),
        h.policy(),
        ConnectOptions::default()
            .response_timeout(Duration::from_millis(250))
            .breaker(3, Duration::from_millis(500)),
    )
    .await
    .unwrap()
}

/// The subscription that carries the backplane is killed (`CLIENT KILL TYPE pubsub`) right before each
/// invalidation: the instance that may have missed the message drops its L1 and vouches again only once its
/// own messages come back, so the bound still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_backplane_connection_keeps_the_bound() {
    let h = Harness::redis();
    let (ka, kb) = (quick(&h).await, quick(&h).await);
    let a = ka.cache::<u64>("near").unwrap();
    let b = kb.cache::<u64>("near").unwrap();
    let source = Arc::new(AtomicU64::new(0));
    let mut raw = h.server().unwrap().connection();
    let mut killed = 0;
    for round in 1..=15 {
        until_l1_hit(&b, 1, &source).await;
        let n: i64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut raw)
            .unwrap();
        killed += n;
        source.store(round, Ordering::SeqCst);
        // The invalidation returns once it is done (it may need a retry while `a` reconnects).
        let deadline = Instant::now() + SOON;
        while a.invalidate(&1).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the invalidation never went through"
            );
        }
        let returned = Instant::now();
        converges(&b, 1, round, returned, &source).await;
    }
    assert!(
        killed >= 15,
        "the backplane connections were killed ({killed})"
    );
}

/// Redis is stopped (SIGSTOP) right after an invalidation returned: the other instance neither hangs nor
/// serves its L1 past the bound (its own heartbeats stop coming back), and answers from the source (fail
/// open) until Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_keeps_the_bound() {
    let mut h = Harness::redis();
    let (ka, kb) = (quick(&h).await, quick(&h).await);
    let a = ka.cache::<u64>("near").unwrap();
    let b = kb.cache::<u64>("near").unwrap();
    let source = Arc::new(AtomicU64::new(1));
    until_l1_hit(&b, 1, &source).await;
    source.store(2, Ordering::SeqCst);
    a.invalidate(&1).await.unwrap();
    let returned = Instant::now();
    h.server_mut().unwrap().pause();
    // Past the bound, every read serves the new value (from L1's successor: the source, failing open).
    let mut reads = 0;
    while Instant::now() < returned + L1_MAX_STALE + Duration::from_secs(1) {
        let started = Instant::now();
        let (v, how) = b.get_or_set_with_status(&1, load(&source)).await.unwrap();
        reads += 1;
        if started > returned + L1_MAX_STALE {
            assert_eq!(
                v,
                2,
                "a read started {:?} after the invalidation served {v} ({how:?})",
                started - returned
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a read hung while Redis was paused"
        );
    }
    h.server_mut().unwrap().resume();
    assert!(reads > 2);
    // And L1 comes back once the heartbeats do.
    until_l1_hit(&b, 1, &source).await;
}
