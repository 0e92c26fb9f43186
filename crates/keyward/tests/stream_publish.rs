//! Batched stream publishes: concurrent `publish` calls on one stream share one script call, and each caller
//! still gets its own ids (increasing in its own call order), its own error, and is neither lost nor blocked
//! when a batch-mate gives up; retention never trims what a lagging group has not acknowledged. Every case
//! runs on the embedded backend, a real redis-server, the documented ACL user and the shared Cluster; the
//! cases that need the server held mid-call (`CLIENT PAUSE WRITE`) do that part on a single server only.

#![allow(unreachable_pub)]

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use crate::common::Harness;
use keyward::policy::{Policy, Retention, StreamClass};
use keyward::stream::{EntryId, Stream};
use keyward::{Error, Keyward};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Event {
    caller: u64,
    n: u64,
}

/// `wide` (100,000 entries, nothing trimmed here), `small` (128-byte messages), `lagged_exact` (exactly 20,
/// hard cap 1,000), `lagged_approx` (about 20, hard cap 1,000), `capped` (exactly 20, hard cap 100).
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .stream("wide", StreamClass::new(Retention::maxlen(100_000)))
        .stream(
            "small",
            StreamClass::new(Retention::maxlen(1000)).max_message_bytes(128),
        )
        .stream(
            "lagged_exact",
            StreamClass::new(Retention::maxlen(20).approximate(false).hard_maxlen(1000)),
        )
        .stream(
            "lagged_approx",
            StreamClass::new(Retention::maxlen(20).hard_maxlen(1000)),
        )
        .stream(
            "capped",
            StreamClass::new(Retention::maxlen(20).approximate(false).hard_maxlen(100)),
        )
        .build()
        .unwrap()
}

async fn connect(h: &Harness) -> Keyward {
    let app = format!("spub-{}", h.app());
    match h.url() {
        Some(s) => Keyward::connect(&s, policy(&app)).await.unwrap(),
        None => Keyward::embedded(policy(&app)),
    }
}

/// A raw `XRANGE`/`XREADGROUP` entry: its id and fields.
type RawEntry = (String, Vec<(String, Vec<u8>)>);

fn stream_key(h: &Harness, class: &str) -> String {
    format!("test:spub-{}:{class}:v1:{{{class}}}", h.app())
}

/// Poll `f` once: a publish queues itself on its first poll.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

type Publish<'a> = Pin<Box<dyn Future<Output = keyward::Result<EntryId>> + Send + 'a>>;

fn publish<'a>(s: &'a Stream<Event>, caller: u64, n: u64) -> Publish<'a> {
    Box::pin(async move { s.publish(&Event { caller, n }).await })
}

/// A call polled once: done already, or still waiting.
enum Started<F: Future> {
    Done(F::Output),
    Waiting(F),
}

impl<F: Future + Unpin> Started<F> {
    async fn start(mut f: F) -> Self {
        match poll_once(&mut f).await {
            Poll::Ready(out) => Started::Done(out),
            Poll::Pending => Started::Waiting(f),
        }
    }

    async fn finish(self) -> F::Output {
        match self {
            Started::Done(out) => out,
            Started::Waiting(f) => f.await,
        }
    }
}

/// A single server (not the cluster): the one whose writes a case can pause.
fn single(h: &Harness) -> Option<::redis::Connection> {
    if h.is_cluster() {
        return None;
    }
    h.node_connections().pop()
}

fn info_field(con: &mut ::redis::Connection, section: &str, field: &str) -> Option<i64> {
    let info: String = ::redis::cmd("INFO").arg(section).query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().parse().unwrap())
}

/// `calls=` of `cmdstat_<cmd>` (0 if the command never ran since the last `CONFIG RESETSTAT`).
fn calls(con: &mut ::redis::Connection, cmd: &str) -> u64 {
    let info: String = ::redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Pause the server's writes and wait (deadline 10 s) until `blocked` clients wait on the pause.
fn pause_writes(con: &mut ::redis::Connection) {
    let () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(20_000)
        .arg("WRITE")
        .query(con)
        .unwrap();
}

async fn until_blocked(con: &mut ::redis::Connection, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while info_field(con, "clients", "blocked_clients").unwrap() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the publish never reached the paused server"
        );
        tokio::task::yield_now().await;
    }
}

fn unpause(con: &mut ::redis::Connection) {
    let () = ::redis::cmd("CLIENT").arg("UNPAUSE").query(con).unwrap();
}

conformance!(
    racing_publishes_each_get_distinct_ids_in_their_call_order,
    concurrent_publishes_share_one_script_call,
    an_oversized_message_fails_only_its_own_caller,
    a_caller_dropped_mid_batch_neither_loses_nor_blocks_the_others,
    a_lagging_group_keeps_its_entries_under_batched_publishes,
    the_hard_cap_holds_under_batched_publishes,
    a_flushed_script_cache_never_duplicates_or_loses_an_entry,
);

mod cases {
    use super::*;

    pub async fn racing_publishes_each_get_distinct_ids_in_their_call_order(h: Harness) {
        let kw = connect(&h).await;
        let stream = kw.stream::<Event>("wide").unwrap();
        const CALLERS: u64 = 24;
        const EACH: u64 = 40;
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..CALLERS {
            // A handle of its own for half of the callers: batching is per stream, not per handle.
            let stream = if caller % 2 == 0 {
                stream.clone()
            } else {
                kw.stream::<Event>("wide").unwrap()
            };
            tasks.spawn(async move {
                let mut ids = Vec::new();
                let mut n = 0;
                while n < EACH {
                    if n % 10 == 5 {
                        let many: Vec<Event> = (n..n + 3).map(|n| Event { caller, n }).collect();
                        ids.extend(stream.publish_many(&many).await.unwrap());
                        n += 3;
                    } else {
                        ids.push(stream.publish(&Event { caller, n }).await.unwrap());
                        n += 1;
                    }
                }
                (caller, ids)
            });
        }
        let mut all = HashSet::new();
        let mut mine = std::collections::HashMap::new();
        while let Some(done) = tasks.join_next().await {
            let (caller, ids) = done.unwrap();
            assert_eq!(ids.len() as u64, EACH);
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "caller {caller}: ids not increasing in call order: {ids:?}"
            );
            for (n, id) in (0u64..).zip(&ids) {
                assert!(all.insert(*id), "id {id} given twice");
                mine.insert(*id, Event { caller, n });
            }
        }
        assert_eq!(stream.len().await.unwrap(), CALLERS * EACH);
        let kept = stream.range(None, 10_000).await.unwrap();
        assert_eq!(kept.len() as u64, CALLERS * EACH);
        for (id, event) in kept {
            assert_eq!(
                mine.get(&id),
                Some(&event),
                "entry {id} is not its caller's"
            );
        }
    }

    pub async fn concurrent_publishes_share_one_script_call(h: Harness) {
        let Some(mut con) = single(&h) else { return };
        let kw = connect(&h).await;
        let stream = kw.stream::<Event>("wide").unwrap();
        stream.publish(&Event { caller: 0, n: 0 }).await.unwrap(); // loads the script
        let () = ::redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut con)
            .unwrap();
        pause_writes(&mut con);
        let mut first = publish(&stream, 1, 0);
        assert!(poll_once(&mut first).await.is_pending());
        until_blocked(&mut con, 1).await;
        // Ten more while the first call is held at the server: they queue, and leave together.
        let mut rest: Vec<_> = (0..10).map(|n| publish(&stream, 2, n)).collect();
        for p in &mut rest {
            assert!(poll_once(p).await.is_pending());
        }
        unpause(&mut con);
        let first = first.await.unwrap();
        let mut ids = vec![first];
        for p in rest {
            ids.push(p.await.unwrap());
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(calls(&mut con, "xadd"), 11);
        // One script call for the first publish, one for the ten queued behind it.
        let scripts = calls(&mut con, "evalsha") + calls(&mut con, "eval");
        assert_eq!(scripts, 2, "11 publishes in {scripts} script calls");
    }

    pub async fn an_oversized_message_fails_only_its_own_caller(h: Harness) {
        let kw = connect(&h).await;
        let small = kw.stream::<String>("small").unwrap();
        let big = "x".repeat(200);
        let size = serde_json::to_vec(&big).unwrap().len();
        let words = ["first", "before", "after", "m1"].map(str::to_owned);
        // The script is loaded first, so that no call below is retried (`NOSCRIPT`) behind a later one.
        small.publish(&"warm-up".to_owned()).await.unwrap();
        let mut con = single(&h);
        if let Some(con) = con.as_mut() {
            pause_writes(con);
        }
        // Held at the server (on a single server), so that the others below queue behind it.
        let mut first = Box::pin(small.publish(&words[0]));
        let polled = poll_once(&mut first).await;
        if let Some(con) = con.as_mut() {
            assert!(polled.is_pending());
            until_blocked(con, 1).await;
        }
        let pair = [words[3].clone(), big.clone()];
        let (before, oversized, many, after) = tokio::join!(
            small.publish(&words[1]),
            small.publish(&big),
            small.publish_many(&pair),
            small.publish(&words[2]),
            async {
                if let Some(con) = con.as_mut() {
                    unpause(con);
                }
            }
        )
        .into_tuple4();
        let first = match polled {
            Poll::Ready(done) => done.unwrap(),
            Poll::Pending => first.await.unwrap(),
        };
        let err = oversized.unwrap_err();
        assert!(
            matches!(&err, Error::ValueTooLarge { class, field: "max_message_bytes", size: s, max: 128 }
                if class == "small" && *s == size),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("class `small`")
                && err.to_string().contains(&size.to_string())
        );
        assert!(matches!(many.unwrap_err(), Error::ValueTooLarge { .. }));
        let (before, after) = (before.unwrap(), after.unwrap());
        assert!(first < before && before < after);
        let kept: Vec<String> = small
            .range(None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(kept, ["warm-up", "first", "before", "after"]);
    }

    pub async fn a_caller_dropped_mid_batch_neither_loses_nor_blocks_the_others(h: Harness) {
        let kw = connect(&h).await;
        let stream = kw.stream::<Event>("wide").unwrap();
        // The script is loaded first, so that no call below is retried (`NOSCRIPT`) behind a later one.
        stream.publish(&Event { caller: 9, n: 0 }).await.unwrap();
        let mut con = single(&h);
        if let Some(con) = con.as_mut() {
            pause_writes(con);
        }
        // Each call is polled once: queued (or, on the embedded backend, maybe already answered).
        let a = Started::start(publish(&stream, 0, 0)).await;
        if let Some(con) = con.as_mut() {
            assert!(matches!(a, Started::Waiting(_)));
            // `a`'s script call is at the server, held: it is in flight.
            until_blocked(con, 1).await;
        }
        let b = Started::start(publish(&stream, 1, 0)).await;
        let c = Started::start(publish(&stream, 2, 0)).await;
        let d = Started::start(publish(&stream, 3, 0)).await;
        // The caller whose call started the drive gives up mid-call, and so does one still queued.
        drop(a);
        drop(d);
        if let Some(con) = con.as_mut() {
            assert!(
                matches!(b, Started::Waiting(_)),
                "b cannot finish while the server is paused"
            );
            unpause(con);
        }
        let within = Duration::from_secs(10);
        let b = tokio::time::timeout(within, b.finish())
            .await
            .expect("b is stuck")
            .unwrap();
        let c = tokio::time::timeout(within, c.finish())
            .await
            .expect("c is stuck")
            .unwrap();
        assert!(b < c);
        let e = tokio::time::timeout(within, stream.publish(&Event { caller: 4, n: 0 }))
            .await
            .expect("the stream's publishes are stuck")
            .unwrap();
        assert!(c < e);
        let kept: Vec<u64> = stream
            .range(None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, ev)| ev.caller)
            .collect();
        // b, c and e are there once each and in order; `a` was sent before it was dropped (on a single
        // server, where it was seen held there), so it is there too; `d` may or may not be.
        let seen: Vec<u64> = kept
            .iter()
            .copied()
            .filter(|c| [1, 2, 4].contains(c))
            .collect();
        assert_eq!(seen, [1, 2, 4], "{kept:?}");
        if con.is_some() {
            assert_eq!(kept[..2], [9, 0], "{kept:?}");
        }
        let unique: HashSet<_> = kept.iter().collect();
        assert_eq!(unique.len(), kept.len(), "{kept:?}");
    }

    pub async fn a_lagging_group_keeps_its_entries_under_batched_publishes(h: Harness) {
        // The group is made and read with raw commands (the worker runtime is not part of this change):
        // Redis only; the embedded mirror's trimming is unit-tested in `stream::store`.
        let Some(mut raw) = h.raw() else { return };
        let kw = connect(&h).await;
        for (class, approximate) in [("lagged_exact", false), ("lagged_approx", true)] {
            let stream = kw.stream::<Event>(class).unwrap();
            let key = stream_key(&h, class);
            let first = stream
                .publish_many(&(0..10).map(|n| Event { caller: 99, n }).collect::<Vec<_>>())
                .await
                .unwrap();
            let () = ::redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg("mailer")
                .arg("0")
                .query(&mut *raw)
                .unwrap();
            // Five delivered (pending), two of them acknowledged; five never delivered.
            let _: ::redis::Value = ::redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("mailer")
                .arg("c1")
                .arg("COUNT")
                .arg(5)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query(&mut *raw)
                .unwrap();
            let acked: i64 = ::redis::cmd("XACK")
                .arg(&key)
                .arg("mailer")
                .arg(first[0].to_string())
                .arg(first[1].to_string())
                .query(&mut *raw)
                .unwrap();
            assert_eq!(acked, 2);

            // 16 callers × 20 publishes racing: far past maxlen (20), below the hard cap (1,000).
            let mut tasks = tokio::task::JoinSet::new();
            for caller in 0..16 {
                let stream = stream.clone();
                tasks.spawn(async move {
                    for n in 0..20 {
                        stream.publish(&Event { caller, n }).await.unwrap();
                    }
                });
            }
            while let Some(t) = tasks.join_next().await {
                t.unwrap();
            }
            // Nothing from the group's oldest unacknowledged entry on was trimmed (`~` may also keep some
            // acknowledged ones below it, in the same node).
            let kept = stream.range(None, 10_000).await.unwrap();
            let needed = kept.iter().filter(|(id, _)| *id >= first[2]).count();
            assert_eq!(needed, 8 + 320, "{class}");
            assert!(
                kept.iter().any(|(id, _)| *id == first[2]),
                "{class}: the oldest pending entry is kept"
            );
            if !approximate {
                assert_eq!(
                    kept.len(),
                    8 + 320,
                    "{class}: exact retention trims the acknowledged ones"
                );
            }

            // Once the group has read and acknowledged everything, retention applies again.
            let reply: Vec<(String, Vec<RawEntry>)> = ::redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("mailer")
                .arg("c1")
                .arg("COUNT")
                .arg(10_000)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query(&mut *raw)
                .unwrap();
            let mut ack = ::redis::cmd("XACK");
            ack.arg(&key).arg("mailer");
            for id in &first[2..5] {
                ack.arg(id.to_string());
            }
            for (id, _) in reply.into_iter().flat_map(|(_, e)| e) {
                ack.arg(id);
            }
            let _: i64 = ack.query(&mut *raw).unwrap();
            stream.publish(&Event { caller: 99, n: 99 }).await.unwrap();
            let len = stream.len().await.unwrap();
            if approximate {
                assert!((20..=20 + 100 + 1).contains(&len), "{class}: {len}");
            } else {
                assert_eq!(len, 20, "{class}: exact retention stays exact");
            }
        }
    }

    pub async fn the_hard_cap_holds_under_batched_publishes(h: Harness) {
        let Some(mut raw) = h.raw() else { return };
        let kw = connect(&h).await;
        let stream = kw.stream::<Event>("capped").unwrap(); // exactly 20, hard cap 100
        let key = stream_key(&h, "capped");
        stream.publish(&Event { caller: 99, n: 0 }).await.unwrap();
        // A group that never reads: every entry is undelivered to it.
        let () = ::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("stalled")
            .arg("0")
            .query(&mut *raw)
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..16 {
            let stream = stream.clone();
            tasks.spawn(async move {
                let mut ids = Vec::new();
                for n in 0..20 {
                    ids.push(stream.publish(&Event { caller, n }).await.unwrap());
                }
                ids
            });
        }
        let mut newest = Vec::new();
        while let Some(t) = tasks.join_next().await {
            newest.extend(t.unwrap());
        }
        newest.sort();
        // The hard cap holds, and what it kept is the newest 100.
        let kept: Vec<EntryId> = stream
            .range(None, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(kept, newest[newest.len() - 100..]);
    }

    /// The retention script rides with the appends as `EVAL` of its text: a server that lost its script
    /// cache (`SCRIPT FLUSH`, as after a restart or failover) between or during publishes answers them
    /// without a `NOSCRIPT`, so nothing is retried and no entry is appended twice or missing.
    pub async fn a_flushed_script_cache_never_duplicates_or_loses_an_entry(h: Harness) {
        let kw = connect(&h).await;
        let stream = kw.stream::<Event>("wide").unwrap();
        const ROUNDS: u64 = 12;
        const CALLERS: u64 = 8;
        let flush = |h: &Harness| {
            for mut con in h.node_connections() {
                let () = ::redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
            }
        };
        let mut sent = std::collections::HashMap::new();
        for round in 0..ROUNDS {
            flush(&h);
            // Concurrent callers (batched together), one of them with `publish_many`; on even rounds the
            // cache is flushed again while they are in flight.
            let calls = (0..CALLERS).map(|caller| {
                let stream = stream.clone();
                async move {
                    if caller == 0 {
                        let many: Vec<Event> = (0..3)
                            .map(|i| Event {
                                caller,
                                n: round * 10 + i,
                            })
                            .collect();
                        let ids = stream.publish_many(&many).await.unwrap();
                        ids.into_iter().zip(many).collect::<Vec<_>>()
                    } else {
                        let e = Event { caller, n: round };
                        vec![(stream.publish(&e).await.unwrap(), e)]
                    }
                }
            });
            let all = futures_util::future::join_all(calls);
            let all = if round % 2 == 0 {
                let (all, ()) = tokio::join!(all, async { flush(&h) });
                all
            } else {
                all.await
            };
            for (id, e) in all.into_iter().flatten() {
                assert!(sent.insert(id, e).is_none(), "id {id} given twice");
            }
        }
        let expected = ROUNDS * (CALLERS - 1 + 3);
        assert_eq!(sent.len() as u64, expected);
        assert_eq!(
            stream.len().await.unwrap(),
            expected,
            "an entry was duplicated or lost"
        );
        let kept = stream.range(None, 10_000).await.unwrap();
        assert_eq!(kept.len() as u64, expected);
        for (id, event) in kept {
            assert_eq!(
                sent.get(&id),
                Some(&event),
                "entry {id} was not published as such"
            );
        }
    }
}

/// `tokio::join!` of five, the last `()`: the first four.
trait IntoTuple4<A, B, C, D> {
    fn into_tuple4(self) -> (A, B, C, D);
}

impl<A, B, C, D> IntoTuple4<A, B, C, D> for (A, B, C, D, ()) {
    fn into_tuple4(self) -> (A, B, C, D) {
        (self.0, self.1, self.2, self.3)
    }
}
