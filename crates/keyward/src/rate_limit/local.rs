//! In-process rate-limit state: what the embedded backend stores, and what the `on_error = "local"` fallback
//! uses while Redis is unreachable. One mutex, one critical section per check (the script's atomicity).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::algo::{Group, State, Verdict, Write};
use crate::backend::KeyTtl;
use crate::key::glob_match;

/// The clock of the in-process store: Unix time in µs, advanced by tokio's (pausable) monotonic clock.
#[derive(Debug)]
pub(crate) struct Clock {
    base_us: i64,
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        Clock {
            base_us,
            base: Instant::now(),
        }
    }

    pub(crate) fn now_us(&self) -> i64 {
        let elapsed = i64::try_from(self.base.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.base_us.saturating_add(elapsed)
    }
}

struct Slot {
    state: State,
    expires_us: i64,
}

#[derive(Default)]
struct Slots {
    map: HashMap<String, Slot>,
    by_expiry: BTreeSet<(i64, String)>,
}

impl Slots {
    fn purge(&mut self, now: i64) {
        while let Some((at, _)) = self.by_expiry.first() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.map.remove(&key);
            }
        }
    }

    fn put(&mut self, key: &str, state: State, expires_us: i64, capacity: usize) {
        if let Some(old) = self.map.remove(key) {
            self.by_expiry.remove(&(old.expires_us, key.to_owned()));
        } else {
            while self.map.len() >= capacity {
                // Past capacity the identity closest to expiry goes first (Redis's volatile-ttl).
                let Some((_, victim)) = self.by_expiry.pop_first() else {
                    break;
                };
                self.map.remove(&victim);
            }
        }
        self.by_expiry.insert((expires_us, key.to_owned()));
        self.map.insert(key.to_owned(), Slot { state, expires_us });
    }
}

/// Rate-limit state held in process.
pub(crate) struct LocalRates {
    slots: Mutex<Slots>,
    clock: Clock,
    capacity: usize,
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

impl LocalRates {
    pub(crate) fn new(capacity: usize) -> Self {
        LocalRates {
            slots: Mutex::new(Slots::default()),
            clock: Clock::new(),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn check(&self, call: &RateCall<'_>) -> RateReply {
        let now = self.clock.now_us();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.purge(now);
        let states: Vec<Option<&State>> = call
            .keys
            .iter()
            .map(|k| slots.map.get(k).map(|s| &s.state))
            .collect();
        let (allowed, verdicts, writes) = call.group.check(&states, now, call.cost, call.consume);
        for (key, write) in call.keys.iter().zip(writes) {
            if let Write::Put(state, ttl) = write {
                // Whole milliseconds, rounded up, like the script's PX.
                let ttl_ms = (ttl + 999).div_euclid(1000).max(1);
                slots.put(key, state, now + ttl_ms * 1000, self.capacity);
            }
        }
        RateReply { allowed, verdicts }
    }

    /// Keys matching a glob, with their TTL (for `scan_namespace`).
    pub(crate) fn scan(&self, pattern: &str) -> Vec<KeyTtl> {
        let now = self.clock.now_us();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.purge(now);
        slots
            .map
            .iter()
            .filter(|(k, _)| glob_match(pattern.as_bytes(), k.as_bytes()))
            .map(|(k, s)| KeyTtl {
                key: k.clone(),
                ttl: Some(Duration::from_micros(
                    u64::try_from(s.expires_us - now).unwrap_or(0),
                )),
            })
            .collect()
    }
}
