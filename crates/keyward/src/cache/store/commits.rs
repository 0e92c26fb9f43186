//! Fenced commits on Redis, batched: the commits of concurrent fills of one [`Keyward`] handle (every class,
//! every namespace) that wait at the same moment go to the server as **one** script call
//! (`commit_many.lua`, on Cluster one per slot), each entry decided exactly as `commit.lua` decides it alone.
//!
//! Why: a fill's commit is the costliest thing a miss asks of the server. Alone it is one `EVALSHA` whose
//! Lua set-up (arguments copied into Lua, the call frame, the reply) costs the server several times the
//! commit's own `GETRANGE` and `SET`; in a batch that set-up is paid once per call, though each entry's inner
//! calls keep their own Lua cost: about 5.0 µs of server time per entry against 6.5 µs alone (BENCHMARKS.md,
//! "2026-12-02 (second session)"). As for rate-limit checks ([`crate::batch`]): the only commit in flight is
//! made by its caller at once; nothing ever waits for more commits to arrive.
//!
//! Nothing about the fence changes: each entry is stored only if its lease prefix still heads the key,
//! checked and written in one script, so an invalidation that deleted the lease refuses it whatever batch it
//! is in. Entries are decided in queue order, one after the other, each with its own answer; an error on one
//! key (another type, a write refused for memory, a missing publish grant) is that entry's error only.

use bytes::Bytes;

use super::{Entry, holds, micros, millis};
use crate::Keyward;
use crate::backend::{Backend, Call, Reply, scripts};
use crate::batch::{Lane, Pending, Unanswered, per_slot};
use crate::error::{Error, Result};
use std::time::Duration;

scripts! {
    commit: "../commit.lua";
    commit_many: "../commit_many.lua";
}

/// The most bytes of values one batched commit carries (a value larger than this goes alone). 32 KiB is 32
/// commits of 1 KiB values, about 0.15 ms of server time: one call never holds the server long. Measured
/// against 16 KiB (as fast), 64 KiB and 128 KiB (slower) with `miss` (BENCHMARKS.md, "2026-12-02 (second
/// session)").
const MAX_BATCH_BYTES: usize = 32 * 1024;

/// Below this, a value weighs as if it had this many bytes, so that a batch of tiny values still stops at
/// `MAX_BATCH_BYTES / MIN_WEIGHT` entries.
const MIN_WEIGHT: usize = 1024;

/// Batched calls of one handle in flight at once: two, so that the client builds and sends one while the
/// server runs the other (as for rate-limit checks); measured faster than one and three.
const CALLS_IN_FLIGHT: usize = 2;

/// One commit waiting in the handle's queue, owning its parts.
pub(crate) struct Queued {
    key: String,
    prefix: String,
    value: Bytes,
    ttl: Duration,
    wake: String,
}

/// The commit lane of one [`Keyward`] handle (in its shared state). Each output is a commit's answer, sent
/// when the call that carries it ends: on Cluster a batch's calls (one per slot) each answer their own
/// callers, and the batch does not wait for them, so a stalled master holds back only the commits to its own
/// slots (see [`per_slot`]).
pub(crate) struct Commits(Lane<Queued, Pending<Result<bool>>>);

impl Default for Commits {
    fn default() -> Self {
        Commits(Lane::new(MAX_BATCH_BYTES, CALLS_IN_FLIGHT))
    }
}

/// `commit.lua` for one entry.
fn single_call(key: &str, prefix: &str, value: &[u8], ttl: Duration, wake: &str) -> Call {
    SCRIPTS
        .commit
        .call("commit")
        .key(key)
        .arg(prefix)
        .arg(value)
        .arg(millis(ttl))
        .arg(wake)
        .evicting()
}

/// Commit on Redis: alone when nothing else is in flight, else in the handle's next batch.
///
/// # Errors
/// As [`super::commit`]; [`Error::Timeout`] when the response timeout passed while the commit waited for its
/// batch (it may still be sent with it, as any timed-out call may land).
pub(super) async fn commit(
    kw: &Keyward,
    e: &Entry<'_>,
    prefix: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<bool> {
    let b = &kw.inner.backend;
    let lane = kw.shared::<Commits>();
    if let Some(_alone) = lane.0.alone() {
        return single(b, e.key, prefix, value, ttl, &e.wake).await;
    }
    let queued = Queued {
        key: e.key.to_owned(),
        prefix: prefix.to_owned(),
        value: Bytes::copy_from_slice(value),
        ttl,
        wake: e.wake.clone().into_owned(),
    };
    let waiting = kw.clone();
    // The whole wait (in the queue, then for the call that carries it) is bounded by the response timeout.
    let answer = lane.0.batcher().submit_pending_within(
        queued,
        value.len().max(MIN_WEIGHT),
        move |items| flush(waiting.clone(), items),
        b.response_timeout(),
    );
    match answer.await {
        Ok(stored) => stored,
        Err(Unanswered::TimedOut) => Err(b.timeout_error("commit", e.key)),
        Err(Unanswered::Abandoned) => Err(Error::InvalidArgument {
            what:
                "a cache commit was abandoned before its answer (the runtime is shutting down, or \
                   the batch task panicked); the value may or may not have been stored"
                    .to_owned(),
        }),
    }
}

/// One entry's commit in a call of its own (`commit.lua`, or its mirror embedded).
pub(super) async fn single(
    b: &Backend,
    key: &str,
    prefix: &str,
    value: &[u8],
    ttl: Duration,
    wake: &str,
) -> Result<bool> {
    b.atomic(
        single_call(key, prefix, value, ttl, wake),
        |kv| {
            if !holds(kv, key, prefix) {
                return false;
            }
            let until = kv.now_us().saturating_add(micros(ttl));
            kv.put_evictable(key, Bytes::copy_from_slice(value), until)
        },
        |reply| Some(reply.int()? == 1),
    )
    .await
}

/// One batch: one script call on a single server (awaited: the batch's drive makes at most
/// `CALLS_IN_FLIGHT` calls at once); on Cluster one per slot, each in a task of its own that answers its
/// callers when it ends (see [`per_slot`]).
async fn flush(kw: Keyward, items: Vec<Queued>) -> Vec<Pending<Result<bool>>> {
    let cluster = kw.inner.backend.batching() == Some(true);
    per_slot(
        cluster,
        items,
        |q| q.key.as_bytes(),
        |group| {
            let kw = kw.clone();
            async move {
                let group: Vec<&Queued> = group.iter().collect();
                call_many(&kw.inner.backend, &group).await
            }
        },
    )
    .await
}

/// The commits `items` (one slot on Cluster) in one script call; a lone one takes `commit.lua`.
async fn call_many(b: &Backend, items: &[&Queued]) -> Vec<Result<bool>> {
    if let [q] = items {
        return vec![single(b, &q.key, &q.prefix, &q.value, q.ttl, &q.wake).await];
    }
    let mut call = SCRIPTS.commit_many.call("commit").evicting();
    for q in items {
        call = call
            .key(&q.key)
            .arg(&q.prefix)
            .arg(&q.value[..])
            .arg(millis(q.ttl))
            .arg(&q.wake);
    }
    let answers = b
        .atomic(
            call,
            |kv| {
                items
                    .iter()
                    .map(|q| {
                        if !holds(kv, &q.key, &q.prefix) {
                            return Ok(false);
                        }
                        let until = kv.now_us().saturating_add(micros(q.ttl));
                        Ok(kv.put_evictable(&q.key, q.value.clone(), until))
                    })
                    .collect()
            },
            |reply| parse(reply, items.len()),
        )
        .await;
    match answers {
        Ok(answers) => answers
            .into_iter()
            .zip(items)
            .map(|(a, q)| a.map_err(|message| b.reply_error("commit", &q.key, &message)))
            .collect(),
        Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// `commit_many.lua`'s reply for `n` entries: per entry stored or not, or its error reply's text. `None` for
/// another shape.
fn parse(reply: &Reply, n: usize) -> Option<Vec<std::result::Result<bool, String>>> {
    let Reply::Array(items) = reply else {
        return None;
    };
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    while at < items.len() {
        match items[at].int()? {
            -1 => {
                let message = items.get(at + 1)?.bytes()?;
                out.push(Err(String::from_utf8_lossy(&message).into_owned()));
                at += 2;
            }
            0 => {
                out.push(Ok(false));
                at += 1;
            }
            1 => {
                out.push(Ok(true));
                at += 1;
            }
            _ => return None,
        }
    }
    (out.len() == n).then_some(out)
}
