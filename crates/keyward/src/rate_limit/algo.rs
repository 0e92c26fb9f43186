//! The five algorithms as pure functions of (stored state, now, cost). The embedded backend and the in-process
//! fallback run these; `backend/redis/ratelimit.lua` is their line-for-line mirror, and the conformance suite
//! checks the two agree.
//!
//! Units: time is integer microseconds (server time on Redis), which stay below 2^53 so Lua's doubles hold
//! them exactly; the one fractional computation (the sliding counter's weight) uses the same IEEE operations
//! in the same order on both sides.
//!
//! **Corrupt state starts fresh.** A stored state that this class could not have written (see [`sanitize`]:
//! a field outside the class's range, a time more than one horizon beyond what the class ever writes, on
//! Redis also text that is not a non-negative integer such as `1e300`, `nan` or `-5`) is treated as absent and
//! reported in [`Verdict::corrupt`]: the identity starts afresh, it is never locked out for an absurd time.
//! The script also deletes such a key; the embedded store only ever holds states written here, so there it
//! cannot arise except through a policy whose numbers changed without a new `version`.

use crate::policy::Algorithm;

/// One limit's numbers, as passed to the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    pub(crate) algorithm: Algorithm,
    /// Requests per window.
    pub(crate) limit: i64,
    /// Window (period), µs.
    pub(crate) window: i64,
    /// Capacity: burst for token bucket and GCRA, else `limit`.
    pub(crate) capacity: i64,
    /// µs per unit of refill (token bucket, GCRA): `ceil(window / limit)`.
    pub(crate) interval: i64,
}

impl Spec {
    /// The wire code of the algorithm (argument to the script).
    pub(crate) fn code(&self) -> i64 {
        match self.algorithm {
            Algorithm::FixedWindow => 1,
            Algorithm::SlidingLog => 2,
            Algorithm::SlidingCounter => 3,
            Algorithm::TokenBucket => 4,
            Algorithm::Gcra => 5,
        }
    }
}

/// What one identity's key holds. `None` (absent) is the fresh state of every algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Fixed window: window index and count.
    Window { idx: i64, count: i64 },
    /// Sliding log: request timestamps, ascending.
    Log(Vec<i64>),
    /// Sliding counter: current window index, its count, the previous window's count.
    Counter { idx: i64, curr: i64, prev: i64 },
    /// Token bucket: whole tokens left, and the time up to which refill has been credited.
    Bucket { tokens: i64, last: i64 },
    /// GCRA: theoretical arrival time.
    Tat(i64),
}

/// The answer for one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    /// What is left after this call (for a peek or a refusal: what is available now).
    pub(crate) remaining: i64,
    /// µs until the limit is fully replenished.
    pub(crate) reset: i64,
    /// µs until a call of this cost could succeed; 0 when allowed.
    pub(crate) retry: i64,
    /// The stored state was corrupt and was treated as absent (see [`sanitize`]).
    pub(crate) corrupt: bool,
}

/// What to store after a check: nothing, or the new state with its TTL (µs, > 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    Keep,
    Put(State, i64),
}

/// Evaluate one limit. `cost >= 1` (a peek asks about cost 1 and passes `consume = false`). Nothing is
/// written unless `consume` and the verdict is allowed.
pub(crate) fn evaluate(
    spec: &Spec,
    state: Option<&State>,
    now: i64,
    cost: i64,
    consume: bool,
) -> (Verdict, Write) {
    let (state, corrupt) = sanitize(spec, state, now);
    let (available, allowed, reset_now, retry, next) = match spec.algorithm {
        Algorithm::FixedWindow => fixed_window(spec, state, now, cost),
        Algorithm::SlidingLog => sliding_log(spec, state, now, cost),
        Algorithm::SlidingCounter => sliding_counter(spec, state, now, cost),
        Algorithm::TokenBucket => token_bucket(spec, state, now, cost),
        Algorithm::Gcra => gcra(spec, state, now, cost),
    };
    if allowed && consume {
        // For every algorithm the state just written stops mattering exactly when the limit is fully
        // replenished, so its TTL is also the reset time.
        let (state, ttl) = next;
        let verdict = Verdict {
            allowed: true,
            remaining: available - cost,
            reset: ttl,
            retry: 0,
            corrupt,
        };
        (verdict, Write::Put(state, ttl))
    } else {
        let verdict = Verdict {
            allowed,
            remaining: available,
            reset: reset_now,
            retry: if allowed { 0 } else { retry.max(1) },
            corrupt,
        };
        (verdict, Write::Keep)
    }
}

/// `state`, or `None` with `true` when it is corrupt: a state this class could not have written.
///
/// - fixed window: a negative window index, or a count outside `0..=limit`;
/// - sliding log: more than `limit` entries inside the window, or an entry later than `now + window`;
/// - sliding counter: a negative window index, or a count outside `0..=limit`;
/// - token bucket: tokens outside `0..=capacity`, or a refill time below 0 or later than `now + capacity ×
///   interval`;
/// - GCRA: a theoretical arrival time below 0 or later than `now + 2 × capacity × interval`;
/// - a state of another algorithm.
///
/// Times the class writes are at most one horizon ahead (GCRA) or not ahead at all (the others); one more
/// horizon is tolerated so that a server clock that stepped back at a failover does not reset every identity.
/// A class whose numbers were lowered without a new `version` also reads its old states as corrupt, once.
/// The script applies the same rules (`backend/redis/ratelimit.lua`).
pub(crate) fn sanitize<'a>(
    spec: &Spec,
    state: Option<&'a State>,
    now: i64,
) -> (Option<&'a State>, bool) {
    let Some(s) = state else {
        return (None, false);
    };
    let tau = spec.capacity.saturating_mul(spec.interval);
    let within = |v: i64, max: i64| (0..=max).contains(&v);
    let ok = match (spec.algorithm, s) {
        (Algorithm::FixedWindow, State::Window { idx, count }) => {
            *idx >= 0 && within(*count, spec.limit)
        }
        (Algorithm::SlidingLog, State::Log(entries)) => {
            let cutoff = now - spec.window;
            let live = entries.iter().filter(|&&e| e > cutoff);
            let count = live.clone().count();
            let newest = live.max().copied().unwrap_or(i64::MIN);
            i64::try_from(count).is_ok_and(|c| c <= spec.limit)
                && newest <= now.saturating_add(spec.window)
        }
        (Algorithm::SlidingCounter, State::Counter { idx, curr, prev }) => {
            *idx >= 0 && within(*curr, spec.limit) && within(*prev, spec.limit)
        }
        (Algorithm::TokenBucket, State::Bucket { tokens, last }) => {
            within(*tokens, spec.capacity) && within(*last, now.saturating_add(tau))
        }
        (Algorithm::Gcra, State::Tat(tat)) => {
            within(*tat, now.saturating_add(tau.saturating_mul(2)))
        }
        _ => false,
    };
    if ok { (Some(s), false) } else { (None, true) }
}

/// (available, allowed, reset if nothing is written, retry if refused, state and TTL to write if allowed)
type Step = (i64, bool, i64, i64, (State, i64));

fn fixed_window(spec: &Spec, state: Option<&State>, now: i64, cost: i64) -> Step {
    let idx = now.div_euclid(spec.window);
    let count = match state {
        Some(State::Window { idx: s, count }) if *s == idx => *count,
        _ => 0,
    };
    let available = (spec.limit - count).max(0);
    let allowed = cost <= available;
    let reset = (idx + 1) * spec.window - now;
    let reset_now = if count > 0 { reset } else { 0 };
    (
        available,
        allowed,
        reset_now,
        reset,
        (
            State::Window {
                idx,
                count: count + cost,
            },
            reset,
        ),
    )
}

fn sliding_log(spec: &Spec, state: Option<&State>, now: i64, cost: i64) -> Step {
    let cutoff = now - spec.window;
    let mut entries: Vec<i64> = match state {
        Some(State::Log(e)) => e.iter().copied().filter(|&s| s > cutoff).collect(),
        _ => Vec::new(),
    };
    let count = i64::try_from(entries.len()).unwrap_or(i64::MAX);
    let available = (spec.limit - count).max(0);
    let allowed = cost <= available;
    let reset_now = entries.last().map_or(0, |&s| s + spec.window - now);
    // Refused: wait until the `need`-th oldest entry leaves the window.
    let need = count + cost - spec.limit;
    let retry = if need >= 1 {
        usize::try_from(need - 1)
            .ok()
            .and_then(|i| entries.get(i))
            .map_or(spec.window, |&s| s + spec.window - now)
    } else {
        0
    };
    for _ in 0..cost {
        entries.push(now);
    }
    (
        available,
        allowed,
        reset_now,
        retry,
        (State::Log(entries), spec.window),
    )
}

/// The sliding counter's estimate of the requests in the last window: the previous window's count weighted
/// by its overlap, plus the current count. The same expression, in the same order, as in the script.
fn estimate(prev: i64, curr: i64, window: i64, elapsed: i64) -> f64 {
    (prev as f64) * ((window - elapsed) as f64) / (window as f64) + (curr as f64)
}

fn counter_reset(spec: &Spec, idx: i64, curr: i64, prev: i64, now: i64) -> i64 {
    if curr > 0 {
        (idx + 2) * spec.window - now
    } else if prev > 0 {
        (idx + 1) * spec.window - now
    } else {
        0
    }
}

fn sliding_counter(spec: &Spec, state: Option<&State>, now: i64, cost: i64) -> Step {
    let w = spec.window;
    let idx = now.div_euclid(w);
    let elapsed = now - idx * w;
    let (curr, prev) = match state {
        Some(State::Counter { idx: s, curr, prev }) if *s == idx => (*curr, *prev),
        Some(State::Counter { idx: s, curr, .. }) if *s == idx - 1 => (0, *curr),
        _ => (0, 0),
    };
    let est = estimate(prev, curr, w, elapsed);
    let limit = spec.limit as f64;
    let available = ((limit - est).floor() as i64).max(0);
    let allowed = est + (cost as f64) <= limit;
    let retry = if allowed {
        0
    } else if curr + cost <= spec.limit && prev > 0 {
        // Later in this window, once enough of the previous window has slid out.
        let at = ((w as f64) - ((spec.limit - curr - cost) as f64) * (w as f64) / (prev as f64))
            .ceil() as i64;
        at - elapsed
    } else {
        // In the next window, where this window's count becomes the weighted one.
        let at = if curr > 0 {
            ((w as f64) - ((spec.limit - cost) as f64) * (w as f64) / (curr as f64)).ceil() as i64
        } else {
            0
        };
        (w - elapsed) + at.max(0)
    };
    let reset_now = counter_reset(spec, idx, curr, prev, now);
    (
        available,
        allowed,
        reset_now,
        retry,
        (
            State::Counter {
                idx,
                curr: curr + cost,
                prev,
            },
            (idx + 2) * w - now,
        ),
    )
}

fn bucket_full_in(spec: &Spec, tokens: i64, last: i64, now: i64) -> i64 {
    if tokens >= spec.capacity {
        0
    } else {
        ((spec.capacity - tokens) * spec.interval - (now - last)).max(0)
    }
}

fn token_bucket(spec: &Spec, state: Option<&State>, now: i64, cost: i64) -> Step {
    let t = spec.interval;
    let (mut tokens, mut last) = match state {
        Some(State::Bucket { tokens, last }) => (*tokens, *last),
        _ => (spec.capacity, now),
    };
    if now > last {
        let add = (now - last).div_euclid(t);
        tokens = (tokens + add).min(spec.capacity);
        last = if tokens == spec.capacity {
            now
        } else {
            last + add * t
        };
    }
    let available = tokens;
    let allowed = cost <= available;
    let reset_now = bucket_full_in(spec, tokens, last, now);
    let retry = (cost - tokens) * t - (now - last);
    let after = tokens - cost;
    let ttl = bucket_full_in(spec, after, last, now);
    (
        available,
        allowed,
        reset_now,
        retry,
        (
            State::Bucket {
                tokens: after,
                last,
            },
            ttl,
        ),
    )
}

fn gcra(spec: &Spec, state: Option<&State>, now: i64, cost: i64) -> Step {
    let t = spec.interval;
    let tau = spec.capacity * t;
    let tat = match state {
        Some(State::Tat(tat)) => (*tat).max(now),
        _ => now,
    };
    let new_tat = tat + cost * t;
    let allowed = new_tat - now <= tau;
    let available = (tau - (tat - now)).div_euclid(t).max(0);
    let retry = new_tat - now - tau;
    (
        available,
        allowed,
        tat - now,
        retry,
        (State::Tat(new_tat), new_tat - now),
    )
}

/// One check over several limits, all or nothing: every enforced limit must allow, or nothing is consumed.
/// Shadow limits never block the others; each consumes only when it allows and the enforced ones do.
pub(crate) struct Group<'a> {
    pub(crate) specs: &'a [Spec],
    pub(crate) shadow: &'a [bool],
}

impl Group<'_> {
    /// Evaluate every limit against its state; returns (allowed, verdicts, writes).
    pub(crate) fn check(
        &self,
        states: &[Option<&State>],
        now: i64,
        cost: i64,
        consume: bool,
    ) -> (bool, Vec<Verdict>, Vec<Write>) {
        let probes: Vec<Verdict> = self
            .specs
            .iter()
            .zip(states)
            .map(|(spec, state)| evaluate(spec, *state, now, cost, false).0)
            .collect();
        let allowed = probes
            .iter()
            .zip(self.shadow)
            .all(|(v, shadow)| *shadow || v.allowed);
        if !(allowed && consume) {
            let writes = vec![Write::Keep; probes.len()];
            return (allowed, probes, writes);
        }
        let mut verdicts = Vec::with_capacity(probes.len());
        let mut writes = Vec::with_capacity(probes.len());
        for ((spec, state), probe) in self.specs.iter().zip(states).zip(&probes) {
            if probe.allowed {
                let (v, w) = evaluate(spec, *state, now, cost, true);
                verdicts.push(v);
                writes.push(w);
            } else {
                verdicts.push(*probe);
                writes.push(Write::Keep);
            }
        }
        (allowed, verdicts, writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn spec(algorithm: Algorithm, limit: i64, window: i64, capacity: i64) -> Spec {
        Spec {
            algorithm,
            limit,
            window,
            capacity,
            interval: (window + limit - 1) / limit,
        }
    }

    /// Run `n` checks of `cost` at `now` against one state; returns how many were allowed.
    fn run(spec: &Spec, state: &mut Option<State>, now: i64, cost: i64, n: usize) -> usize {
        let mut allowed = 0;
        for _ in 0..n {
            let (v, w) = evaluate(spec, state.as_ref(), now, cost, true);
            if let Write::Put(s, ttl) = w {
                assert!(ttl > 0, "{spec:?} wrote a state without a TTL");
                *state = Some(s);
            }
            allowed += usize::from(v.allowed);
        }
        allowed
    }

    #[test]
    fn every_algorithm_allows_exactly_its_capacity_at_once() {
        let now = 1_700_000_000 * S + 123;
        for algorithm in Algorithm::ALL {
            let s = spec(algorithm, 100, 3600 * S, 100);
            let mut state = None;
            assert_eq!(run(&s, &mut state, now, 1, 1000), 100, "{algorithm}");
        }
    }

    #[test]
    fn refusal_consumes_nothing_and_reports_retry() {
        let now = 50 * S;
        for algorithm in Algorithm::ALL {
            let s = spec(algorithm, 10, 10 * S, 10);
            let mut state = None;
            assert_eq!(run(&s, &mut state, now, 1, 7), 7, "{algorithm}");
            let before = state.clone();
            let (v, w) = evaluate(&s, state.as_ref(), now, 4, true);
            assert!(!v.allowed, "{algorithm}");
            assert_eq!(w, Write::Keep, "{algorithm}");
            assert_eq!(v.remaining, 3, "{algorithm}");
            assert!(v.retry > 0, "{algorithm}");
            assert_eq!(state, before);
            // The rest still fits.
            assert_eq!(run(&s, &mut state, now, 3, 1), 1, "{algorithm}");
            // And after retry_after a new call of that cost fits again.
        }
    }

    #[test]
    fn retry_after_is_when_the_call_succeeds() {
        for algorithm in Algorithm::ALL {
            let s = spec(algorithm, 10, 10 * S, 10);
            let mut state = None;
            let t0 = 1_000 * S + 400_000;
            run(&s, &mut state, t0, 1, 10);
            let (v, _) = evaluate(&s, state.as_ref(), t0 + S / 3, 2, false);
            assert!(!v.allowed);
            let at = t0 + S / 3 + v.retry;
            let (early, _) = evaluate(&s, state.as_ref(), at - 1, 2, false);
            let (then, _) = evaluate(&s, state.as_ref(), at, 2, false);
            assert!(!early.allowed, "{algorithm}: allowed before retry_after");
            assert!(then.allowed, "{algorithm}: still refused at retry_after");
        }
    }

    #[test]
    fn peek_does_not_consume() {
        for algorithm in Algorithm::ALL {
            let s = spec(algorithm, 5, 10 * S, 5);
            let mut state = None;
            run(&s, &mut state, 10 * S, 1, 2);
            let (v, w) = evaluate(&s, state.as_ref(), 10 * S, 1, false);
            assert!(v.allowed);
            assert_eq!(v.remaining, 3, "{algorithm}");
            assert_eq!(w, Write::Keep);
        }
    }

    #[test]
    fn gcra_and_bucket_refill_at_the_rate() {
        for algorithm in [Algorithm::Gcra, Algorithm::TokenBucket] {
            let s = spec(algorithm, 10, 10 * S, 10); // one per second
            let mut state = None;
            assert_eq!(run(&s, &mut state, 0, 1, 20), 10);
            assert_eq!(run(&s, &mut state, S - 1, 1, 5), 0, "{algorithm}");
            assert_eq!(run(&s, &mut state, S, 1, 5), 1, "{algorithm}");
            assert_eq!(run(&s, &mut state, 5 * S, 1, 10), 4, "{algorithm}");
        }
    }

    /// States this class could not have written start fresh and say so; states it could have written
    /// (including a GCRA time up to one horizon beyond what it writes: a clock that stepped back) are kept.
    #[test]
    fn corrupt_state_starts_fresh() {
        let now = 1_700_000_000 * S;
        let cases = |a: Algorithm, s: &Spec| -> (Vec<State>, Vec<State>) {
            let tau = s.capacity * s.interval;
            let idx = now.div_euclid(s.window);
            match a {
                Algorithm::FixedWindow => (
                    vec![
                        State::Window { idx, count: 11 },
                        State::Window { idx, count: -1 },
                        State::Window {
                            idx: -idx,
                            count: 1,
                        },
                        State::Window {
                            idx,
                            count: i64::MAX,
                        },
                    ],
                    vec![
                        State::Window { idx, count: 10 },
                        State::Window {
                            idx: idx + 5,
                            count: 3,
                        },
                    ],
                ),
                Algorithm::SlidingLog => (
                    vec![
                        State::Log(vec![now; 11]),
                        State::Log(vec![now, now + s.window + 1]),
                        State::Log(vec![i64::MAX]),
                    ],
                    vec![
                        State::Log(vec![now; 10]),
                        State::Log(vec![now - 1, now + s.window]),
                    ],
                ),
                Algorithm::SlidingCounter => (
                    vec![
                        State::Counter {
                            idx,
                            curr: 11,
                            prev: 0,
                        },
                        State::Counter {
                            idx,
                            curr: 0,
                            prev: i64::MAX,
                        },
                        State::Counter {
                            idx: -1,
                            curr: 0,
                            prev: 0,
                        },
                        State::Counter {
                            idx,
                            curr: -2,
                            prev: 0,
                        },
                    ],
                    vec![State::Counter {
                        idx,
                        curr: 10,
                        prev: 10,
                    }],
                ),
                Algorithm::TokenBucket => (
                    vec![
                        State::Bucket {
                            tokens: 0,
                            last: now + tau + 1,
                        },
                        State::Bucket {
                            tokens: 0,
                            last: i64::MAX,
                        },
                        State::Bucket {
                            tokens: 11,
                            last: now,
                        },
                        State::Bucket {
                            tokens: -1,
                            last: now,
                        },
                        State::Bucket {
                            tokens: 0,
                            last: -1,
                        },
                    ],
                    vec![
                        State::Bucket {
                            tokens: 0,
                            last: now + tau,
                        },
                        State::Bucket {
                            tokens: 10,
                            last: 0,
                        },
                    ],
                ),
                Algorithm::Gcra => (
                    vec![
                        State::Tat(now + 2 * tau + 1),
                        State::Tat(i64::MAX),
                        State::Tat(-1),
                    ],
                    vec![State::Tat(now + 2 * tau), State::Tat(0)],
                ),
            }
        };
        for algorithm in Algorithm::ALL {
            let s = spec(algorithm, 10, 10 * S, 10);
            let (corrupt, clean) = cases(algorithm, &s);
            // Another algorithm's state is corrupt too.
            let other = if algorithm == Algorithm::Gcra {
                State::Log(vec![])
            } else {
                State::Tat(now)
            };
            for state in corrupt.iter().chain([&other]) {
                let (v, w) = evaluate(&s, Some(state), now, 3, true);
                assert!(v.corrupt, "{algorithm}: {state:?} not flagged");
                assert!(
                    v.allowed && v.remaining == 7,
                    "{algorithm}: {state:?} not fresh: {v:?}"
                );
                assert!(matches!(w, Write::Put(..)), "{algorithm}: {state:?}");
                // A peek and a refusal see the same fresh state, and nothing is written.
                let (p, w) = evaluate(&s, Some(state), now, 1, false);
                assert!(
                    p.corrupt && p.allowed && p.remaining == 10,
                    "{algorithm}: {p:?}"
                );
                assert_eq!(w, Write::Keep);
            }
            for state in &clean {
                let (v, _) = evaluate(&s, Some(state), now, 1, false);
                assert!(
                    !v.corrupt,
                    "{algorithm}: {state:?} is a state the class can write"
                );
                // Whatever it says, the wait is bounded by two horizons.
                assert!(v.retry <= 2 * 10 * S + s.interval, "{algorithm}: {v:?}");
            }
            let (fresh, _) = evaluate(&s, None, now, 1, true);
            assert!(
                !fresh.corrupt,
                "{algorithm}: an absent state is not corrupt"
            );
        }
    }

    #[test]
    fn group_is_all_or_nothing() {
        let a = spec(Algorithm::Gcra, 10, S, 10);
        let b = spec(Algorithm::FixedWindow, 3, 60 * S, 3);
        let group = Group {
            specs: &[a, b],
            shadow: &[false, false],
        };
        let mut states: Vec<Option<State>> = vec![None, None];
        for i in 0..5 {
            let refs: Vec<Option<&State>> = states.iter().map(Option::as_ref).collect();
            let (allowed, _, writes) = group.check(&refs, 0, 1, true);
            assert_eq!(allowed, i < 3);
            for (s, w) in states.iter_mut().zip(writes) {
                if let Write::Put(n, _) = w {
                    *s = Some(n);
                }
            }
        }
        // The GCRA limit was charged only for the 3 allowed calls.
        assert_eq!(states[0], Some(State::Tat(3 * (S / 10))));
    }
}
