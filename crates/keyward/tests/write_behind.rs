//! Write-behind on every backend: the cache has a write at once, the drain persists the newest write per id
//! (in version order within a batch), a failing sink is retried and then dead-lettered, and a drain that
//! dies mid-batch loses nothing (another drain takes its writes over after `claim_idle`).

#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward::{Error, Write};
use tokio::sync::Notify;

use crate::common::Harness;

conformance!(
    writes_are_cached_at_once_and_the_newest_per_id_is_persisted,
    a_failing_sink_is_retried_then_dead_lettered,
    a_drain_that_dies_mid_batch_loses_nothing,
    bad_writes_are_refused_before_anything_is_queued,
);

/// id -> (value, version) as a version-checking sink keeps them.
type Db = Arc<Mutex<HashMap<u32, (u64, keyward::stream::EntryId)>>>;

/// Each sink call's (id, version) pairs.
type Batches = Arc<Mutex<Vec<Vec<(u32, keyward::stream::EntryId)>>>>;

/// A sink that keeps the highest version per id, as the docs recommend.
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

    pub async fn writes_are_cached_at_once_and_the_newest_per_id_is_persisted(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        let mut last = HashMap::new();
        for round in 0..20u64 {
            for id in 0..5u32 {
                let v = round * 10 + u64::from(id);
                wb.write(id, v).await.unwrap();
                last.insert(id, v);
                assert_eq!(
                    wb.cache().get(&id).await.unwrap(),
                    Some(v),
                    "cached at once"
                );
            }
        }
        let db: Db = Arc::default();
        let batches: Batches = Arc::default();
        let drain = {
            let (db, batches) = (db.clone(), batches.clone());
            wb.drain("db", move |batch: Vec<Write<u32, u64>>| {
                let (db, batches) = (db.clone(), batches.clone());
                async move {
                    batches
                        .lock()
                        .unwrap()
                        .push(batch.iter().map(|w| (w.id, w.version)).collect());
                    upsert(&db, batch);
                    Ok::<(), String>(())
                }
            })
            .batch(32)
        };
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(drain.run(async move { stop.notified().await }))
        };
        until("every newest write persisted", || {
            let db = db.lock().unwrap();
            last.iter()
                .all(|(id, v)| db.get(id).map(|e| e.0) == Some(*v))
        })
        .await;
        stop.notify_one();
        let report = run.await.unwrap().unwrap();
        assert_eq!(
            report.handled, 100,
            "every write acknowledged, superseded ones too"
        );
        for batch in batches.lock().unwrap().iter() {
            let mut ids: Vec<u32> = batch.iter().map(|w| w.0).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(
                ids.len(),
                batch.len(),
                "one write per id in a batch: {batch:?}"
            );
            assert!(batch.windows(2).all(|w| w[0].1 < w[1].1), "version order");
        }
        assert!(
            batches.lock().unwrap().iter().map(Vec::len).sum::<usize>() <= 100,
            "coalesced, never more sink writes than writes"
        );
    }

    pub async fn a_failing_sink_is_retried_then_dead_lettered(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        wb.write(1, 10).await.unwrap();
        // Fails twice, then works: persisted on the third delivery (max_deliveries = 3).
        let calls = Arc::new(Mutex::new(0u32));
        let db: Db = Arc::default();
        let drain = {
            let (calls, db) = (calls.clone(), db.clone());
            wb.drain("flaky", move |batch: Vec<Write<u32, u64>>| {
                let (calls, db) = (calls.clone(), db.clone());
                async move {
                    let n = {
                        let mut c = calls.lock().unwrap();
                        *c += 1;
                        *c
                    };
                    if n <= 2 {
                        return Err(format!("database down (attempt {n})"));
                    }
                    upsert(&db, batch);
                    Ok(())
                }
            })
        };
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(drain.run(async move { stop.notified().await }))
        };
        until("persisted after two failures", || {
            db.lock().unwrap().get(&1).map(|e| e.0) == Some(10)
        })
        .await;
        stop.notify_one();
        let report = run.await.unwrap().unwrap();
        assert_eq!((report.failed, report.handled), (2, 1), "{report:?}");

        // A sink that always fails: dead-lettered after max_deliveries, with the last error.
        wb.write(2, 20).await.unwrap();
        let drain = wb.drain("broken", |_batch: Vec<Write<u32, u64>>| async {
            Err::<(), _>("database gone")
        });
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(drain.run(async move { stop.notified().await }))
        };
        let stream = wb.stream().clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        let dead = loop {
            let dead = stream.dead_letters(100).await.unwrap();
            if dead.iter().filter(|d| d.group == "broken").count() == 2 {
                break dead;
            }
            assert!(Instant::now() < deadline, "never dead-lettered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        stop.notify_one();
        let report = run.await.unwrap().unwrap();
        assert_eq!(
            report.dead_lettered, 2,
            "both writes of the stream, for this group: {report:?}"
        );
        let mine: Vec<_> = dead.iter().filter(|d| d.group == "broken").collect();
        assert!(
            mine.iter().all(|d| d.error.contains("database gone")),
            "{mine:?}"
        );
    }

    pub async fn a_drain_that_dies_mid_batch_loses_nothing(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        for id in 0..10u32 {
            wb.write(id, u64::from(id) + 100).await.unwrap();
        }
        // The first drain takes a batch and hangs in its sink; then it dies (its task is aborted, as a
        // crash would end it: nothing acknowledged).
        let entered = Arc::new(Notify::new());
        let hung = {
            let entered = entered.clone();
            let drain = wb.drain("db", move |_batch: Vec<Write<u32, u64>>| {
                let entered = entered.clone();
                async move {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                    Ok::<(), String>(())
                }
            });
            tokio::spawn(drain.run(std::future::pending()))
        };
        entered.notified().await;
        hung.abort();
        let _ = hung.await;
        // Another drain takes the writes over after claim_idle (300 ms) and persists every one.
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
        until("every write persisted by the second drain", || {
            let db = db.lock().unwrap();
            (0..10u32).all(|id| db.get(&id).map(|e| e.0) == Some(u64::from(id) + 100))
        })
        .await;
        stop.notify_one();
        run.await.unwrap().unwrap();
    }

    pub async fn bad_writes_are_refused_before_anything_is_queued(h: Harness) {
        let kw = h.keyward().await;
        let err = kw.write_behind::<u32, u64>("writes", "writes").unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongKind {
                    expected: "cache",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = kw
            .write_behind::<u32, u64>("product", "product")
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongKind {
                    expected: "stream",
                    ..
                }
            ),
            "{err:?}"
        );
        let small = kw.write_behind::<u32, String>("small", "writes").unwrap();
        let before = small.stream().len().await.unwrap();
        let err = small.write(1, "x".repeat(100)).await.unwrap_err();
        assert!(matches!(err, Error::ValueTooLarge { .. }), "{err:?}");
        assert_eq!(
            small.stream().len().await.unwrap(),
            before,
            "nothing queued"
        );
        assert_eq!(small.cache().get(&1u32).await.unwrap(), None);
    }
}
