//! The rate-limit check on both backends: one Lua script on Redis (`ratelimit.lua`, next to this file), and its
//! mirror over the embedded keyspace ([`mirror`]), which the embedded backend and the `on_error = "local"`
//! fallback ([`LocalRates`](super::local::LocalRates)) both run.
//!
//! **The one decision to know:** the embedded mirror stores each identity's state as a string in the keyspace,
//! in the script's own formats (`tat`, `idx count`, `idx curr prev`, `tokens last`; the sliding log, a sorted
//! set on Redis, is a string of 8-byte little-endian timestamps), so `backend/` never depends on rate-limit
//! types, and a value that does not parse counts as absent, as `tonumber(x) or …` does in the script.

use std::sync::Arc;

use bytes::Bytes;

use super::algo::{Group, Spec, State, Verdict, Write};
use crate::Keyward;
use crate::backend::{Backend, Call, Kv, Reply, Val, scripts};
use crate::batch::{Lane, Pending, Unanswered, per_slot};
use crate::error::{Error, Result};
use crate::policy::Algorithm;

scripts! {
    ratelimit: "ratelimit.lua";
}

/// The answer to one grouped check.
#[derive(Debug, Clone)]
pub(crate) struct RateReply {
    pub(crate) allowed: bool,
    pub(crate) verdicts: Vec<Verdict>,
}

/// One grouped check: the keys (one per limit) and what to do.
pub(crate) struct RateCall<'a> {
    pub(crate) keys: &'a [String],
    pub(crate) group: Group<'a>,
    pub(crate) cost: i64,
    pub(crate) consume: bool,
}

/// One grouped check that owns its parts, so that it can wait in the [`Batching`] queue.
pub(crate) struct Queued {
    pub(crate) keys: Arc<[String]>,
    pub(crate) specs: Arc<[Spec]>,
    pub(crate) shadow: Arc<[bool]>,
    pub(crate) cost: i64,
    pub(crate) consume: bool,
}

impl Queued {
    fn call(&self) -> RateCall<'_> {
        RateCall {
            keys: &self.keys,
            group: Group {
                specs: &self.specs,
                shadow: &self.shadow,
            },
            cost: self.cost,
            consume: self.consume,
        }
    }
}

/// How the checks of one [`Keyward`](crate::Keyward) handle (every class, every identity) reach Redis: a lone
/// check in a call of its own, made by its caller; checks that meet others batched, each item one check, each
/// output its answer, sent when the call that carries it ends (on Cluster a batch's calls, one per slot, each
/// answer their own checks: a stalled master holds back only the checks of its own slots; see [`per_slot`]).
pub(crate) struct Batching(Lane<Queued, Pending<Result<RateReply>>>);

impl Default for Batching {
    fn default() -> Self {
        Batching(Lane::new(MAX_BATCH_LIMITS, BATCH_CALLS_IN_FLIGHT))
    }
}

/// The most limits (keys) one batched script call decides: bounds how long one call holds the server
/// (about 3 µs of server time per GCRA check, so ~0.1 ms). 32 measured fastest of 16, 32, 64 and 128
/// (`BENCHMARKS.md`, issue #16).
const MAX_BATCH_LIMITS: usize = 32;

/// How many batched calls of one handle may be in flight at once: two, so that the client builds and sends
/// one batch while the server runs the other (measured faster than one, three or four). Order does not matter between concurrent checks (each is
/// decided atomically on its own), so a `NOSCRIPT` retry that reorders two calls changes nothing.
const BATCH_CALLS_IN_FLIGHT: usize = 2;

/// The script call deciding `calls` in order (see `ratelimit.lua`): each distinct limit group once (checks of
/// one limiter share its group), then per check its group, its signed cost and its keys.
fn script(calls: &[RateCall<'_>]) -> Call {
    let mut groups: Vec<&Group<'_>> = Vec::new();
    let mut of = Vec::with_capacity(calls.len());
    for c in calls {
        let same = |g: &&Group<'_>| {
            std::ptr::eq(g.specs, c.group.specs) && std::ptr::eq(g.shadow, c.group.shadow)
        };
        of.push(match groups.iter().position(same) {
            Some(i) => i + 1,
            None => {
                groups.push(&c.group);
                groups.len()
            }
        });
    }
    let mut script = SCRIPTS
        .ratelimit
        .call("rate_limit")
        .arg(rand::random::<u64>())
        .arg(groups.len());
    for g in groups {
        script = script.arg(g.specs.len());
        for (spec, shadow) in g.specs.iter().zip(g.shadow) {
            script = script
                .arg(spec.code())
                .arg(spec.limit)
                .arg(spec.window)
                .arg(spec.capacity)
                .arg(spec.interval)
                .arg(if *shadow { "1" } else { "0" });
        }
    }
    for (c, g) in calls.iter().zip(of) {
        // A peek goes as a negative cost (a charged check always costs at least 1).
        script = script.arg(g).arg(if c.consume { c.cost } else { -c.cost });
        for key in c.keys {
            script = script.key(key);
        }
    }
    script
}

/// The script's reply for checks of `limits` limits each, in order: per check its answer, or the error reply
/// the script returned for it (a key of the wrong type). `None` if the reply has another shape.
fn parse(
    reply: &Reply,
    limits: impl Iterator<Item = usize>,
) -> Option<Vec<std::result::Result<RateReply, String>>> {
    let Reply::Array(items) = reply else {
        return None;
    };
    let mut at = 0;
    let mut out = Vec::new();
    for n in limits {
        let head = items.get(at)?.int()?;
        if head == -1 {
            let message = items.get(at + 1)?.bytes()?;
            out.push(Err(String::from_utf8_lossy(&message).into_owned()));
            at += 2;
            continue;
        }
        let verdicts = items
            .get(at + 1..at + 1 + 5 * n)?
            .chunks_exact(5)
            .map(|c| {
                Some(Verdict {
                    allowed: c[0].int()? == 1,
                    remaining: c[1].int()?,
                    reset: c[2].int()?,
                    retry: c[3].int()?,
                    corrupt: c[4].int()? == 1,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        out.push(Ok(RateReply {
            allowed: head == 1,
            verdicts,
        }));
        at += 1 + 5 * n;
    }
    (at == items.len()).then_some(out)
}

/// One rate-limit check over one or more limits of one identity, all or nothing, on the store's clock, in a
/// call of its own.
///
/// # Errors
/// The store's: on Redis, the connection's and the script's ([`Error::Redis`] with code `WRONGTYPE` when a
/// key holds another type than its algorithm keeps); embedded, [`Error::StoreFull`] when the class's
/// budget is full (nothing is charged).
pub(crate) async fn check(b: &Backend, call: &RateCall<'_>) -> Result<RateReply> {
    let script = script(std::slice::from_ref(call));
    // A check that times out may still run on the server once (it cannot be undone): the caller counts it.
    let answer = b
        .atomic(
            script,
            |kv| Ok(mirror(kv, call)),
            |reply| parse(reply, std::iter::once(call.keys.len()))?.pop(),
        )
        .await?;
    answer.map_err(|message| b.reply_error("rate_limit", &call.keys[0], &message))
}

/// Whether Redis Cluster refused a call without running it because its slot is moving between masters: a
/// multi-key call whose keys are split between source and target (`TRYAGAIN`), or a redirect that could not
/// be followed (`MOVED`/`ASK`). Such a call was not charged, and calls with fewer keys may be served.
fn is_split(e: &Error) -> bool {
    matches!(
        e,
        Error::Redis { source, .. }
            if matches!(source.code(), Some("TRYAGAIN" | "MOVED" | "ASK" | "CROSSSLOT"))
    )
}

/// Decide `check`, merged with the checks of other callers of `batcher` that wait at the same moment when the
/// store is Redis (see [`crate::batch`]): one script call decides them one after the other, each exactly as
/// alone, under one reading of the server's clock (on Cluster, one call per slot). Embedded, the check runs
/// at once (it costs no round trip).
///
/// # Errors
/// As [`check`]; every check of a call that failed gets the call's error.
pub(crate) async fn decide(kw: &Keyward, batching: &Batching, queued: Queued) -> Result<RateReply> {
    let b = &kw.inner.backend;
    // Embedded: decided at once (no round trip to save).
    if b.batching().is_none() {
        return check(b, &queued.call()).await;
    }
    // The only check in flight: made by its caller, without the hop to a batch task, so that a lone
    // caller's latency is one plain round trip. The flag sends the next concurrent check to the batcher.
    if let Some(_alone) = batching.0.alone() {
        return check(b, &queued.call()).await;
    }
    let weight = queued.keys.len();
    let key = Arc::clone(&queued.keys);
    let waiting = kw.clone();
    // Each call is bounded by the response timeout, and so is the whole wait (in the queue, then for the
    // call that carries it). One given up may still be sent (and charged once, like any timed-out check).
    let answer = batching.0.batcher().submit_pending_within(
        queued,
        weight,
        move |items| flush(waiting.clone(), items),
        b.response_timeout(),
    );
    match answer.await {
        Ok(answer) => answer,
        Err(Unanswered::TimedOut) => Err(b.timeout_error("rate_limit", &key[0])),
        Err(Unanswered::Abandoned) => Err(Error::InvalidArgument {
            what:
                "a rate-limit check was abandoned before its answer (the runtime is shutting down, \
                   or the batch task panicked); it may or may not have been charged"
                    .to_owned(),
        }),
    }
}

/// One batch: on standalone Redis one script call (awaited: the batch's drive makes at most
/// `BATCH_CALLS_IN_FLIGHT` calls at once); on Cluster one per slot (the keys of one check share a hash tag),
/// each in a task of its own that answers its checks when it ends (see [`per_slot`]).
async fn flush(kw: Keyward, items: Vec<Queued>) -> Vec<Pending<Result<RateReply>>> {
    let cluster = kw.inner.backend.batching() == Some(true);
    per_slot(
        cluster,
        items,
        |q| q.keys[0].as_bytes(),
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

/// The checks `items` (all in one slot on Cluster) in one script call; a lone check takes [`check`].
async fn call_many(b: &Backend, items: &[&Queued]) -> Vec<Result<RateReply>> {
    if let [one] = items {
        return vec![check(b, &one.call()).await];
    }
    let calls: Vec<RateCall<'_>> = items.iter().map(|q| q.call()).collect();
    let answers = b
        .atomic(
            script(&calls),
            |kv| items.iter().map(|q| Ok(mirror(kv, &q.call()))).collect(),
            |reply| parse(reply, items.iter().map(|q| q.keys.len())),
        )
        .await;
    match answers {
        // `parse` returns one answer per check.
        Ok(answers) => answers
            .into_iter()
            .zip(items)
            .map(|(a, q)| a.map_err(|message| b.reply_error("rate_limit", &q.keys[0], &message)))
            .collect(),
        // While the slot moves between masters, a call whose keys are split between them (some still on the
        // source, some only on the target) is refused before it runs (`TRYAGAIN`), although each check's own
        // keys sit on one side and a lone check is served there (through `ASK`). So each check goes alone, as
        // it would have without batching (at once: the whole stays bounded by one response timeout).
        Err(e) if is_split(&e) => {
            futures_util::future::join_all(
                items
                    .iter()
                    .map(|q| async move { check(b, &q.call()).await }),
            )
            .await
        }
        Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// The script's mirror: one critical section reading every limit's state, deciding, and writing the new
/// states (with their TTL rounded up to whole ms, like the script's `PX`).
pub(crate) fn mirror(kv: &mut Kv, call: &RateCall<'_>) -> RateReply {
    let now = kv.now_us();
    let states: Vec<Option<State>> = call
        .keys
        .iter()
        .zip(call.group.specs)
        .map(|(key, spec)| kv.get_str(key).and_then(|b| decode(spec.algorithm, b)))
        .collect();
    let refs: Vec<Option<&State>> = states.iter().map(Option::as_ref).collect();
    let (allowed, verdicts, writes) = call.group.check(&refs, now, call.cost, call.consume);
    for (key, write) in call.keys.iter().zip(writes) {
        if let Write::Put(state, ttl) = write {
            let ttl_ms = (ttl + 999).div_euclid(1000).max(1);
            kv.set_us(key, Val::Str(encode(&state)), ttl_ms.saturating_mul(1000));
        }
    }
    RateReply { allowed, verdicts }
}

fn encode(state: &State) -> Bytes {
    match state {
        State::Tat(t) => Bytes::from(t.to_string()),
        State::Window { idx, count } => Bytes::from(format!("{idx} {count}")),
        State::Counter { idx, curr, prev } => Bytes::from(format!("{idx} {curr} {prev}")),
        State::Bucket { tokens, last } => Bytes::from(format!("{tokens} {last}")),
        State::Log(stamps) => {
            let mut out = Vec::with_capacity(stamps.len() * 8);
            for s in stamps {
                out.extend_from_slice(&s.to_le_bytes());
            }
            Bytes::from(out)
        }
    }
}

fn decode(algorithm: Algorithm, raw: &[u8]) -> Option<State> {
    if algorithm == Algorithm::SlidingLog {
        if !raw.len().is_multiple_of(8) {
            return None;
        }
        let stamps = raw
            .chunks_exact(8)
            .map(|c| <[u8; 8]>::try_from(c).map(i64::from_le_bytes))
            .collect::<std::result::Result<Vec<_>, _>>()
            .ok()?;
        return Some(State::Log(stamps));
    }
    let text = std::str::from_utf8(raw).ok()?;
    let mut parts = text.split(' ').map(str::parse::<i64>);
    let mut next = || parts.next()?.ok();
    let state = match algorithm {
        Algorithm::Gcra => State::Tat(next()?),
        Algorithm::FixedWindow => State::Window {
            idx: next()?,
            count: next()?,
        },
        Algorithm::SlidingCounter => State::Counter {
            idx: next()?,
            curr: next()?,
            prev: next()?,
        },
        Algorithm::TokenBucket => State::Bucket {
            tokens: next()?,
            last: next()?,
        },
        Algorithm::SlidingLog => return None,
    };
    next().is_none().then_some(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_garbage_is_absent() {
        let cases = [
            (Algorithm::Gcra, State::Tat(1_700_000_000_000_123)),
            (Algorithm::FixedWindow, State::Window { idx: -3, count: 7 }),
            (
                Algorithm::SlidingCounter,
                State::Counter {
                    idx: 9,
                    curr: 2,
                    prev: 5,
                },
            ),
            (
                Algorithm::TokenBucket,
                State::Bucket {
                    tokens: 4,
                    last: 1_700_000_000_000_000,
                },
            ),
            (Algorithm::SlidingLog, State::Log(vec![1, 2, 2, i64::MAX])),
        ];
        for (algorithm, state) in cases {
            assert_eq!(decode(algorithm, &encode(&state)), Some(state));
        }
        assert_eq!(decode(Algorithm::Gcra, b"1e300"), None);
        assert_eq!(decode(Algorithm::FixedWindow, b"1 2 3"), None);
        assert_eq!(decode(Algorithm::TokenBucket, b"1"), None);
        assert_eq!(decode(Algorithm::SlidingLog, b"1234567"), None);
    }
}
