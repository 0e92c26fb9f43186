//! The rate-limit check on both backends: one Lua script on Redis (`ratelimit.lua`, next to this file), and its
//! mirror over the embedded keyspace ([`mirror`]), which the embedded backend and the `on_error = "local"`
//! fallback ([`LocalRates`](super::local::LocalRates)) both run.
//!
//! **The one decision to know:** the embedded mirror stores each identity's state as a string in the keyspace,
//! in the script's own formats (`tat`, `idx count`, `idx curr prev`, `tokens last`; the sliding log, a sorted
//! set on Redis, is a string of 8-byte little-endian timestamps), so `backend/` never depends on rate-limit
//! types, and a value that does not parse counts as absent, as `tonumber(x) or …` does in the script.

use bytes::Bytes;

use super::algo::{Group, State, Verdict, Write};
use crate::backend::{Backend, Kv, Val, scripts};
use crate::error::Result;
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

/// One rate-limit check over one or more limits of one identity, all or nothing, on the store's clock.
///
/// # Errors
/// The store's: on Redis, the connection's and the script's; embedded,
/// [`Error::StoreFull`](crate::Error::StoreFull) when the class's budget is full (nothing is charged).
pub(crate) async fn check(b: &Backend, call: &RateCall<'_>) -> Result<RateReply> {
    let mut script = SCRIPTS
        .ratelimit
        .call("rate_limit")
        .arg(call.cost)
        .arg(if call.consume { "1" } else { "0" })
        .arg(rand::random::<u64>());
    for key in call.keys {
        script = script.key(key);
    }
    for (spec, shadow) in call.group.specs.iter().zip(call.group.shadow) {
        script = script
            .arg(spec.code())
            .arg(spec.limit)
            .arg(spec.window)
            .arg(spec.capacity)
            .arg(spec.interval)
            .arg(if *shadow { "1" } else { "0" });
    }
    // A check that times out may still run on the server once (it cannot be undone): the caller counts it.
    b.atomic(
        script,
        |kv| mirror(kv, call),
        |reply| {
            let reply = reply.ints()?;
            if reply.len() != 1 + 5 * call.keys.len() {
                return None;
            }
            let verdicts = reply[1..]
                .chunks_exact(5)
                .map(|c| Verdict {
                    allowed: c[0] == 1,
                    remaining: c[1],
                    reset: c[2],
                    retry: c[3],
                    corrupt: c[4] == 1,
                })
                .collect();
            Some(RateReply {
                allowed: reply[0] == 1,
                verdicts,
            })
        },
    )
    .await
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
