//! Attacks on write-behind (issue #12) that found bugs: a sink that panics must not stop the drain for good
//! (it used to kill the batching task, after which every later write was dead-lettered); concurrent
//! writes to one id through one handle must leave the cache holding the write the sink keeps (the newest
//! version), not whichever cache set happened to land last; writes queued before the drain's consumer group
//! existed were trimmed by the stream's retention (lost); a replayed dead letter got a new, higher
//! version, so it overwrote newer writes the sink had persisted; and two processes writing one id at once
//! could leave the cache at the older write (their cache sets landed in arrival order, not version order).

#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward::policy::{Backoff, CacheClass, Policy, Retention, StreamClass};
use keyward::stream::{EntryId, Message};
use keyward::{Keyward, Write};
use tokio::sync::Notify;

use crate::common::Harness;

conformance!(
    a_panicking_sink_is_a_failed_batch_not_a_dead_drain,
    concurrent_writes_to_one_id_leave_the_cache_at_the_persisted_version,
    writes_made_before_a_drain_exists_are_not_trimmed,
    without_a_drain_only_the_hard_cap_bounds_the_queue,
    a_replayed_write_does_not_overwrite_a_newer_persisted_write,
    a_replay_keeps_the_first_id_through_dead_letters_retries_and_reclaims,
);

/// The harness's namespace with small classes: `queue`, a write-behind stream of exactly 10 entries with a
/// hard cap of 50; `retry`, a stream with 2 deliveries and a 300 ms `claim_idle`; `product`, a cache.
async fn small(h: &Harness) -> Keyward {
    let policy = Policy::builder("test", h.app())
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .stream(
            "queue",
            StreamClass::new(Retention::maxlen(10).approximate(false).hard_maxlen(50)),
        )
        .stream(
            "retry",
            StreamClass::new(Retention::maxlen(1000))
                .max_deliveries(2)
                .backoff(
                    Backoff::new(Duration::from_millis(10), 2.0, Duration::from_millis(20))
                        .jitter_percent(0.0),
                )
                .claim_idle(Duration::from_millis(300)),
        )
        .build()
        .unwrap();
    match h.url() {
        Some(url) => Keyward::connect(&url, policy).await.unwrap(),
        None => Keyward::embedded(policy),
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

    pub async fn writes_made_before_a_drain_exists_are_not_trimmed(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        // `writes` keeps maxlen = 10,000 (with `~`: trimmed once 100 over it); no drain has run yet.
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
        assert_eq!(wb.stream().len().await.unwrap(), 10_300);
    }

    pub async fn without_a_drain_only_the_hard_cap_bounds_the_queue(h: Harness) {
        let kw = small(&h).await;
        let wb = kw.write_behind::<u32, u64>("product", "queue").unwrap();
        let mut versions = Vec::new();
        for id in 0..40u32 {
            versions.push(wb.write(id, u64::from(id)).await.unwrap());
        }
        assert_eq!(
            wb.stream().len().await.unwrap(),
            40,
            "maxlen = 10 trims nothing before a drain read the writes"
        );
        // The hard cap (50) still bounds the stream: the oldest writes go once it is reached.
        for id in 40..60u32 {
            versions.push(wb.write(id, u64::from(id)).await.unwrap());
        }
        assert_eq!(wb.stream().len().await.unwrap(), 50);
        let oldest = wb.stream().range(None, 1).await.unwrap();
        assert_eq!(oldest.first().map(|e| e.0), Some(versions[10]));

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
        until("every write the hard cap kept persisted", || {
            let db = db.lock().unwrap();
            (10..60u32).all(|id| db.get(&id).map(|e| e.0) == Some(u64::from(id)))
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = wb.stream().group_info("db").await.unwrap().unwrap();
            if info.pending == 0 && info.lag == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "never acknowledged: {info:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.notify_one();
        run.await.unwrap().unwrap();
        assert!(
            (0..10u32).all(|id| !db.lock().unwrap().contains_key(&id)),
            "the 10 writes past the hard cap were lost, as documented"
        );
        // Once the drain's group has read them, the queue is trimmed to its retention again.
        wb.write(60, 60).await.unwrap();
        assert_eq!(wb.stream().len().await.unwrap(), 10);
    }

    pub async fn a_replayed_write_does_not_overwrite_a_newer_persisted_write(h: Harness) {
        let kw = h.keyward().await;
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        let old = wb.write(1, 10).await.unwrap();
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

        let new = wb.write(1, 20).await.unwrap();
        let db: Db = Arc::default();
        let seen: Arc<Mutex<Vec<(u64, EntryId)>>> = Arc::default();
        let good = {
            let (db, seen) = (db.clone(), seen.clone());
            wb.drain("db", move |batch: Vec<Write<u32, u64>>| {
                let (db, seen) = (db.clone(), seen.clone());
                async move {
                    seen.lock()
                        .unwrap()
                        .extend(batch.iter().map(|w| (w.value, w.version)));
                    upsert(&db, batch);
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
        let replayed = wb
            .stream()
            .replay_dead_letters(|_| true, 10, false)
            .await
            .unwrap();
        assert_eq!(replayed.len(), 1);
        until("the replayed write reached the sink", || {
            seen.lock().unwrap().iter().any(|w| w.0 == 10)
        })
        .await;
        stop.notify_one();
        run.await.unwrap().unwrap();
        assert_eq!(
            seen.lock().unwrap().iter().find(|w| w.0 == 10).map(|w| w.1),
            Some(old),
            "the replayed write keeps the version it was first queued under"
        );
        assert!(old < new);
        assert_eq!(
            db.lock().unwrap().get(&1).copied(),
            Some((20, new)),
            "the replayed older write must not win"
        );
    }

    pub async fn a_replay_keeps_the_first_id_through_dead_letters_retries_and_reclaims(h: Harness) {
        let kw = small(&h).await;
        let s = kw.stream::<u64>("retry").unwrap();
        let first = s.publish(&7).await.unwrap();
        let seen: Seen = Arc::default();
        fail_until_dead(&s, seen.clone()).await;
        let dead = s.dead_letters(10).await.unwrap();
        assert_eq!((dead[0].id, dead[0].origin), (first, None));
        assert_eq!(
            seen.lock().unwrap().iter().map(|d| d.1).collect::<Vec<_>>(),
            [None, None]
        );

        // Replayed once: a new entry, delivered with its first id, dead-lettered again keeping it.
        let moved = s.replay_dead_letters(|_| true, 10, false).await.unwrap();
        let again = moved[0].1.unwrap();
        assert!(again > first);
        let seen: Seen = Arc::default();
        fail_until_dead(&s, seen.clone()).await;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (again, Some(first), first, 1),
                (again, Some(first), first, 2)
            ],
            "a first delivery and a retry, both with the first id"
        );
        let dead = s.dead_letters(10).await.unwrap();
        assert_eq!((dead[0].id, dead[0].origin), (again, Some(first)));

        // Replayed twice: still the first id, also when a dead worker's delivery is reclaimed.
        let moved = s.replay_dead_letters(|_| true, 10, false).await.unwrap();
        let third = moved[0].1.unwrap();
        let entered = Arc::new(Notify::new());
        let hung = {
            let entered = entered.clone();
            let worker = s.worker("g", move |_m: Message<u64>| {
                let entered = entered.clone();
                async move {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                    Ok::<(), String>(())
                }
            });
            tokio::spawn(worker.run(std::future::pending()))
        };
        entered.notified().await;
        hung.abort();
        let _ = hung.await;
        let seen: Seen = Arc::default();
        let worker = {
            let seen = seen.clone();
            s.worker("g", move |m: Message<u64>| {
                let seen = seen.clone();
                async move {
                    record(&seen, &m);
                    Ok::<(), String>(())
                }
            })
        };
        let stop = Arc::new(Notify::new());
        let run = {
            let stop = stop.clone();
            tokio::spawn(worker.run(async move { stop.notified().await }))
        };
        until("the abandoned replay was reclaimed", || {
            !seen.lock().unwrap().is_empty()
        })
        .await;
        stop.notify_one();
        run.await.unwrap().unwrap();
        assert_eq!(*seen.lock().unwrap(), [(third, Some(first), first, 2)]);
    }
}

/// (id, origin, first_id, deliveries) of every delivery a worker saw.
type Seen = Arc<Mutex<Vec<(EntryId, Option<EntryId>, EntryId, u64)>>>;

fn record(seen: &Seen, m: &Message<u64>) {
    seen.lock()
        .unwrap()
        .push((m.id, m.origin, m.first_id(), m.deliveries));
}

/// Runs a worker of group `g` that fails every delivery until the stream has a dead letter.
async fn fail_until_dead(s: &keyward::stream::Stream<u64>, seen: Seen) {
    let worker = s.worker("g", move |m: Message<u64>| {
        let seen = seen.clone();
        async move {
            record(&seen, &m);
            Err::<(), _>("always")
        }
    });
    let stop = Arc::new(Notify::new());
    let run = {
        let stop = stop.clone();
        tokio::spawn(worker.run(async move { stop.notified().await }))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.dead_letters(10).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.notify_one();
    run.await.unwrap().unwrap();
}

/// Across OS processes: two processes write the same ids at the same moment (each id once per process, 16
/// writes in flight per process), against one Redis and against the Cluster. Afterwards every id's cache entry
/// holds the write with the highest version of the two, and a drain with a version-checking sink persists
/// exactly those. Before the cache set was version-conditional, a process whose append came first but whose
/// cache set landed last left the cache at its older value (the sets were ordered only within a process).
mod across_processes {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write as _};
    use std::process::{Child, ChildStdout, Command, Stdio};

    use super::*;

    const CHILD_URL: &str = "KEYWARD_TEST_WB_CHILD_URL";
    const CHILD_APP: &str = "KEYWARD_TEST_WB_CHILD_APP";
    const IDS: u32 = 300;
    const IN_FLIGHT: u32 = 16;

    fn policy(app: &str) -> Policy {
        Policy::builder("test", app)
            .cache(
                "product",
                CacheClass::new(Duration::from_secs(600), "tests, after each write"),
            )
            .stream(
                "writes",
                StreamClass::new(Retention::maxlen(100_000)).claim_idle(Duration::from_millis(300)),
            )
            .build()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_writing_the_same_ids_leave_the_cache_at_the_newest_write() {
        race(Harness::redis()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_writing_the_same_ids_leave_the_cache_at_the_newest_write_on_cluster() {
        race(Harness::cluster()).await;
    }

    async fn race(h: Harness) {
        let url = h.url().unwrap();
        let app = h.app().to_owned();
        let mut children: Vec<(Child, BufReader<ChildStdout>)> =
            (0..2).map(|_| spawn_child(&url, &app)).collect();
        for (_, out) in &mut children {
            expect_line(out, "READY");
        }
        for (child, _) in &mut children {
            writeln!(child.stdin.as_mut().unwrap(), "GO").unwrap();
        }
        // id -> (version, value) of the newest write of either process.
        let mut newest: HashMap<u32, (EntryId, u64)> = HashMap::new();
        let mut writes = 0;
        for (child, out) in &mut children {
            loop {
                let line = expect_line(out, "");
                if line.contains("DONE") {
                    break;
                }
                let Some(w) = line.find("W ").map(|at| &line[at + 2..]) else {
                    continue;
                };
                let [id, version, value] = w.split(' ').collect::<Vec<_>>()[..] else {
                    panic!("bad child line {line:?}");
                };
                let (id, version, value): (u32, EntryId, u64) = (
                    id.parse().unwrap(),
                    version.parse().unwrap(),
                    value.parse().unwrap(),
                );
                writes += 1;
                let e = newest.entry(id).or_insert((version, value));
                if e.0 < version {
                    *e = (version, value);
                }
            }
            assert!(child.wait().unwrap().success(), "a writer process failed");
        }
        assert_eq!(writes, 2 * IDS, "every write of both processes reported");

        let kw = Keyward::connect(&url, policy(&app)).await.unwrap();
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        let mut stale = Vec::new();
        for id in 0..IDS {
            let cached = wb.cache().get(&id).await.unwrap();
            if cached != Some(newest[&id].1) {
                stale.push((id, cached, newest[&id]));
            }
        }
        assert!(
            stale.is_empty(),
            "{} of {IDS} ids cache an older write than the newest: {:?}",
            stale.len(),
            &stale[..stale.len().min(5)]
        );

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
        until("the newest write of every id persisted", || {
            let db = db.lock().unwrap();
            (0..IDS).all(|id| db.get(&id).copied() == Some((newest[&id].1, newest[&id].0)))
        })
        .await;
        stop.notify_one();
        run.await.unwrap().unwrap();
    }

    /// A writer process: `IN_FLIGHT` tasks write every id once (ids in increasing order, as the other
    /// process does), then report `W <id> <version> <value>` for each write and `DONE`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a child process of the cross-process write-behind race (needs its environment)"]
    async fn child_wb_writer() {
        let (Ok(url), Ok(app)) = (std::env::var(CHILD_URL), std::env::var(CHILD_APP)) else {
            return;
        };
        let kw = Keyward::connect(&url, policy(&app)).await.unwrap();
        let wb = kw.write_behind::<u32, u64>("product", "writes").unwrap();
        println!("READY");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let me = u64::from(std::process::id()) << 20;
        let mut tasks = Vec::new();
        for t in 0..IN_FLIGHT {
            let wb = wb.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for id in (t..IDS).step_by(IN_FLIGHT as usize) {
                    let value = me | u64::from(id);
                    done.push((id, wb.write(id, value).await.unwrap(), value));
                }
                done
            }));
        }
        for t in tasks {
            for (id, version, value) in t.await.unwrap() {
                println!("W {id} {version} {value}");
            }
        }
        println!("DONE");
    }

    fn spawn_child(url: &str, app: &str) -> (Child, BufReader<ChildStdout>) {
        let test = match module_path!().split_once("::") {
            Some((_crate, module)) => format!("{module}::child_wb_writer"),
            None => "child_wb_writer".to_owned(),
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_URL, url)
            .env(CHILD_APP, app)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("re-run the test binary as a child");
        let out = BufReader::new(child.stdout.take().unwrap());
        (child, out)
    }

    /// The next line containing `prefix`, from `prefix` on (the harness prints `test … ` before a child's
    /// first line). Panics if the child closes stdout first.
    fn expect_line(out: &mut BufReader<ChildStdout>, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "child exited before printing {prefix:?}");
            if let Some(at) = line.find(prefix) {
                return line[at..].trim().to_owned();
            }
        }
    }
}
