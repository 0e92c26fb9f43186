//! Attacks on write-behind (issue #12) that found bugs: a sink that panics must not stop the drain for good
//! (it used to kill the batching task, after which every later write was dead-lettered), and concurrent
//! writes to one id through one handle must leave the cache holding the write the sink keeps (the newest
//! version), not whichever cache set happened to land last. Two known holes have ignored tests here: writes
//! trimmed before the drain's group exists, and replayed dead letters getting new versions.

#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward::Write;
use keyward::stream::EntryId;
use tokio::sync::Notify;

use crate::common::Harness;

conformance!(
    a_panicking_sink_is_a_failed_batch_not_a_dead_drain,
    concurrent_writes_to_one_id_leave_the_cache_at_the_persisted_version,
);

// Known hole, not fixed here (the fix is in the stream's publish path, `stream/store.rs`, owned elsewhere):
// until the drain's consumer group exists, retention trims queued writes like any stream's (no group, no
// floor), so writes made before the first drain ever ran are lost once the stream is over `maxlen`.
mod writes_before_the_first_drain {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "known hole: retention trims writes queued before the drain's group exists (fix in stream/store.rs)"]
    async fn are_not_trimmed_before_a_drain_exists() {
        let h = Harness::embedded();
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        // `writes` keeps maxlen = 10,000 (with `~`: trimmed once 100 over it).
        let first = wb.write(0, 0).await.unwrap();
        for id in 1..10_300u32 {
            wb.write(id, u64::from(id)).await.unwrap();
        }
        let oldest = wb.stream().range(None, 1).await.unwrap();
        assert_eq!(
            oldest.first().map(|e| e.0),
            Some(first),
            "the first write, never persisted, is still queued"
        );
    }
}

/// id -> (value, version), keeping the highest version as the docs recommend.
type Db = Arc<Mutex<HashMap<u32, (u64, EntryId)>>>;

fn upsert(db: &Db, batch: Vec<Write<u32, u64>>) {
    let mut db = db.lock().unwrap();
    for w in batch {
        let e = db.entry(w.id).or_insert((w.value, w.version));
        if e.1 <= w.version {
            *e = (w.value, w.version);
        }
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

mod cases {
    use super::*;

    pub async fn a_panicking_sink_is_a_failed_batch_not_a_dead_drain(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        wb.write(1, 10).await.unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let db: Db = Arc::default();
        let drain = {
            let (calls, db) = (calls.clone(), db.clone());
            wb.drain("db", move |batch: Vec<Write<u32, u64>>| {
                let (calls, db) = (calls.clone(), db.clone());
                async move {
                    assert!(
                        calls.fetch_add(1, Ordering::SeqCst) > 0,
                        "the sink panics once (a bug in the application's sink)"
                    );
                    upsert(&db, batch);
                    Ok::<(), String>(())
                }
            })
        };
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(drain.run(async move { stop.notified().await }))
        };
        until("the write persisted on its second delivery", || {
            db.lock().unwrap().get(&1).map(|e| e.0) == Some(10)
        })
        .await;
        // The drain still works for writes made after the panic.
        wb.write(2, 20).await.unwrap();
        until("a later write persisted", || {
            db.lock().unwrap().get(&2).map(|e| e.0) == Some(20)
        })
        .await;
        stop.notify_one();
        let report = run.await.unwrap().unwrap();
        assert_eq!(
            (report.failed, report.handled, report.dead_lettered),
            (1, 2, 0),
            "{report:?}"
        );
        assert!(wb.stream().dead_letters(10).await.unwrap().is_empty());
    }

    pub async fn concurrent_writes_to_one_id_leave_the_cache_at_the_persisted_version(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        let db: Db = Arc::default();
        let drain = {
            let db = db.clone();
            wb.drain("db", move |batch: Vec<Write<u32, u64>>| {
                let db = db.clone();
                async move {
                    upsert(&db, batch);
                    Ok::<(), String>(())
                }
            })
        };
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(drain.run(async move { stop.notified().await }))
        };
        // Rounds of 32 tasks writing distinct values to one id at once (the publishes are batched into one
        // script call, the cache sets race); after each round the cache must hold what the sink keeps.
        for round in 0..20u64 {
            let id = u32::try_from(round).unwrap();
            let mut tasks = Vec::new();
            for t in 0..32u64 {
                let wb = wb.clone();
                tasks.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for i in 0..4u64 {
                        let v = round * 1000 + t * 10 + i;
                        mine.push((wb.write(id, v).await.unwrap(), v));
                    }
                    mine
                }));
            }
            let mut written = Vec::new();
            for t in tasks {
                written.extend(t.await.unwrap());
            }
            let newest = written.iter().max().unwrap().1;
            until("the round persisted", || {
                db.lock().unwrap().get(&id).map(|e| e.0) == Some(newest)
            })
            .await;
            assert_eq!(
                wb.cache().get(&id).await.unwrap(),
                Some(newest),
                "round {round}: the cache holds the newest write's value, as the database will"
            );
        }
        stop.notify_one();
        run.await.unwrap().unwrap();
    }
}

// Known hole, not fixed here: `replay_dead_letters` appends a dead-lettered write as a new entry, so it gets a
// new, higher version and overwrites a newer write the sink already persisted, version check or not. The fix
// is for the replayed write to keep its original version (e.g. `Write::version` taken from a field the
// replay carries, which means a change in the stream's replay path and `Record`'s format).
mod replayed_dead_letters {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "known hole: a replayed write-behind write gets a new version and beats newer persisted writes"]
    async fn do_not_overwrite_a_newer_persisted_write() {
        let h = Harness::embedded();
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        wb.write(1, 10).await.unwrap();
        let broken = wb.drain("db", |_batch: Vec<Write<u32, u64>>| async {
            Err::<(), _>("database down")
        });
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(broken.run(async move { stop.notified().await }))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while wb.stream().dead_letters(10).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "never dead-lettered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.notify_one();
        run.await.unwrap().unwrap();

        wb.write(1, 20).await.unwrap();
        let db: Db = Arc::default();
        let calls = Arc::new(AtomicU32::new(0));
        let good = {
            let (db, calls) = (db.clone(), calls.clone());
            wb.drain("db", move |batch: Vec<Write<u32, u64>>| {
                let (db, calls) = (db.clone(), calls.clone());
                async move {
                    upsert(&db, batch);
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), String>(())
                }
            })
        };
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(good.run(async move { stop.notified().await }))
        };
        until("the newer write persisted", || {
            db.lock().unwrap().get(&1).map(|e| e.0) == Some(20)
        })
        .await;
        let seen = calls.load(Ordering::SeqCst);
        let replayed = wb
            .stream()
            .replay_dead_letters(|_| true, 10, false)
            .await
            .unwrap();
        assert_eq!(replayed.len(), 1);
        until("the replayed write reached the sink", || {
            calls.load(Ordering::SeqCst) > seen
        })
        .await;
        stop.notify_one();
        run.await.unwrap().unwrap();
        assert_eq!(
            db.lock().unwrap().get(&1).map(|e| e.0),
            Some(20),
            "the replayed older write must not win"
        );
    }
}
