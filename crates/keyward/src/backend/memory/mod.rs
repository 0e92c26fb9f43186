//! The embedded backend: the same semantic operations as the Redis scripts, each one critical section.
//!
//! It keeps Redis's data model for what keyward stores (byte strings with an expiry, one hash of epochs per
//! namespace) and mirrors each Lua script line for line, so both backends agree by construction and the
//! conformance suite checks it. Time is `tokio::time::Instant`, so tests can pause and advance it.
//! Memory is bounded: expired entries are purged as time passes, and past `capacity` entries the one closest
//! to expiry is evicted (Redis's `volatile-ttl` policy).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

pub(crate) mod kv;

use super::{Entry, Fetched, KeyTtl, Namespace};
use crate::envelope::{self, Gens, LEASE_PREFIX, is_current};
use crate::key::glob_match;
use crate::rate_limit::local::LocalRates;
use crate::wake::WakeBus;

/// Settings of the embedded backend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryOptions {
    capacity: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self { capacity: 100_000 }
    }
}

impl MemoryOptions {
    /// Most entries kept at once (default 100,000); past it the entry closest to expiry is evicted.
    #[must_use]
    pub fn capacity(mut self, entries: usize) -> Self {
        self.capacity = entries.max(1);
        self
    }
}

struct Stored {
    data: Bytes,
    expires: Instant,
}

struct Gen {
    fields: HashMap<String, u64>,
    expires: Instant,
}

#[derive(Default)]
struct State {
    strings: HashMap<String, Stored>,
    by_expiry: BTreeSet<(Instant, String)>,
    gens: HashMap<String, Gen>,
}

pub(crate) struct MemoryBackend {
    // A std mutex: every operation is a short critical section with no await inside, like a Lua script.
    state: Mutex<State>,
    bus: Arc<WakeBus>,
    capacity: usize,
    /// Rate-limit state (its own lock: checks never wait on cache operations).
    pub(crate) rates: LocalRates,
    /// Sessions, locks and idempotency keys (a small Redis-like store; its own lock).
    pub(crate) records: kv::Records,
}

impl State {
    fn purge(&mut self, now: Instant) {
        while let Some((at, _)) = self.by_expiry.first() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.strings.remove(&key);
            }
        }
        self.gens.retain(|_, g| g.expires > now);
    }

    fn live(&self, key: &str, now: Instant) -> Option<&Stored> {
        self.strings.get(key).filter(|s| s.expires > now)
    }

    /// Whether `key` still holds the lease whose marker starts with `lease_prefix`.
    fn holds(&self, key: &str, lease_prefix: &str, now: Instant) -> bool {
        self.live(key, now)
            .is_some_and(|s| s.data.starts_with(lease_prefix.as_bytes()))
    }

    fn remove(&mut self, key: &str) -> Option<Stored> {
        let old = self.strings.remove(key)?;
        self.by_expiry.remove(&(old.expires, key.to_owned()));
        Some(old)
    }

    fn put(&mut self, key: &str, data: Bytes, expires: Instant, capacity: usize, now: Instant) {
        if self.remove(key).is_none() && self.strings.len() >= capacity {
            self.purge(now);
            while self.strings.len() >= capacity {
                let Some((_, victim)) = self.by_expiry.pop_first() else {
                    break;
                };
                self.strings.remove(&victim);
                metrics::counter!("keyward_memory_evictions_total").increment(1);
            }
        }
        self.by_expiry.insert((expires, key.to_owned()));
        self.strings
            .insert(key.to_owned(), Stored { data, expires });
    }

    fn current_gens(&self, ns: &Namespace, class: &str, now: Instant) -> Gens {
        match self.gens.get(&ns.gens_key).filter(|g| g.expires > now) {
            Some(g) => Gens {
                ns: g.fields.get("*").copied().unwrap_or(0),
                class: g.fields.get(class).copied().unwrap_or(0),
            },
            None => Gens::default(),
        }
    }
}

impl MemoryBackend {
    pub(crate) fn new(options: &MemoryOptions, bus: Arc<WakeBus>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            bus,
            capacity: options.capacity,
            rates: LocalRates::new(options.capacity),
            records: kv::Records::new(options.capacity),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn fetch(
        &self,
        e: &Entry<'_>,
        marker: &str,
        lease_ttl: Duration,
        negative_ok: bool,
    ) -> Fetched {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge(now);
        let gens = st.current_gens(e.ns, e.class, now);
        let lease = Bytes::copy_from_slice(marker.as_bytes());
        match st.live(e.key, now) {
            None => {
                st.put(e.key, lease, now + lease_ttl, self.capacity, now);
                Fetched::Leased(gens)
            }
            Some(s) if s.data.starts_with(LEASE_PREFIX) => {
                let left = s.expires - now;
                if !envelope::lease_has_waiters(&s.data) {
                    let mut flagged = s.data.to_vec();
                    if let Some(last) = flagged.last_mut() {
                        *last = b'1';
                    }
                    let expires = s.expires;
                    st.put(e.key, Bytes::from(flagged), expires, self.capacity, now);
                }
                Fetched::Wait(left)
            }
            Some(s) => match is_current(&s.data, gens, negative_ok) {
                Some(false) => {
                    st.put(e.key, lease, now + lease_ttl, self.capacity, now);
                    Fetched::Leased(gens)
                }
                _ => Fetched::Hit(s.data.clone()),
            },
        }
    }

    pub(crate) fn read(&self, e: &Entry<'_>) -> Option<Bytes> {
        let now = Instant::now();
        let st = self.lock();
        let gens = st.current_gens(e.ns, e.class, now);
        let s = st.live(e.key, now)?;
        if s.data.starts_with(LEASE_PREFIX) || is_current(&s.data, gens, true) == Some(false) {
            return None;
        }
        Some(s.data.clone())
    }

    pub(crate) fn commit(
        &self,
        e: &Entry<'_>,
        lease_prefix: &str,
        value: &[u8],
        ttl: Duration,
    ) -> bool {
        let now = Instant::now();
        {
            let mut st = self.lock();
            if !st.holds(e.key, lease_prefix, now) {
                return false;
            }
            st.put(
                e.key,
                Bytes::copy_from_slice(value),
                now + ttl,
                self.capacity,
                now,
            );
        }
        self.bus.wake(e.key);
        true
    }

    pub(crate) fn release(&self, e: &Entry<'_>, lease_prefix: &str) -> bool {
        let now = Instant::now();
        {
            let mut st = self.lock();
            if !st.holds(e.key, lease_prefix, now) {
                return false;
            }
            st.remove(e.key);
        }
        self.bus.wake(e.key);
        true
    }

    pub(crate) fn set(&self, e: &Entry<'_>, body: &[u8], ttl: Duration) {
        let now = Instant::now();
        {
            let mut st = self.lock();
            let gens = st.current_gens(e.ns, e.class, now);
            let value = Bytes::from(envelope::value(gens, body));
            st.put(e.key, value, now + ttl, self.capacity, now);
        }
        self.bus.wake(e.key);
    }

    pub(crate) fn invalidate(&self, e: &Entry<'_>) -> bool {
        let removed = self.lock().remove(e.key).is_some();
        self.bus.wake(e.key);
        removed
    }

    pub(crate) fn bump(&self, ns: &Namespace, field: &str) -> u64 {
        let now = Instant::now();
        let mut st = self.lock();
        let g = st.gens.entry(ns.gens_key.clone()).or_insert_with(|| Gen {
            fields: HashMap::new(),
            expires: now,
        });
        if g.expires <= now {
            g.fields.clear();
        }
        g.expires = g.expires.max(now + ns.gens_lifetime);
        let n = g.fields.entry(field.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    pub(crate) fn heal(&self, key: &str, raw: &[u8]) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        if st.live(key, now).is_some_and(|s| s.data == raw) {
            st.remove(key);
            return true;
        }
        false
    }

    pub(crate) fn scan(&self, pattern: &str) -> Vec<KeyTtl> {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge(now);
        let strings = st.strings.iter().map(|(k, s)| (k, s.expires));
        let hashes = st.gens.iter().map(|(k, g)| (k, g.expires));
        let mut out: Vec<KeyTtl> = strings
            .chain(hashes)
            .filter(|(k, _)| glob_match(pattern.as_bytes(), k.as_bytes()))
            .map(|(k, at)| KeyTtl {
                key: k.clone(),
                ttl: Some(at - now),
            })
            .collect();
        drop(st);
        out.extend(self.rates.scan(pattern));
        out.extend(self.records.scan(pattern));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().strings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace {
            gens_key: "t:a:_kw:gens".into(),
            channel: "t:a:_kw:fills".into(),
            gens_lifetime: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_and_capacity_evicts_soonest() {
        let bus = Arc::new(WakeBus::default());
        let m = MemoryBackend::new(&MemoryOptions::default().capacity(3), bus);
        let ns = ns();
        for (i, secs) in [(1, 10), (2, 5), (3, 20)] {
            let key = format!("k{i}");
            let e = Entry {
                ns: &ns,
                class: "c",
                key: &key,
            };
            m.set(&e, b"v:1", Duration::from_secs(secs));
        }
        let e4 = Entry {
            ns: &ns,
            class: "c",
            key: "k4",
        };
        m.set(&e4, b"v:1", Duration::from_secs(30));
        assert_eq!(m.len(), 3);
        let keys: Vec<_> = m.scan("k*").into_iter().map(|k| k.key).collect();
        assert_eq!(
            keys,
            ["k1", "k3", "k4"],
            "k2 expired soonest and was evicted"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let keys: Vec<_> = m.scan("k*").into_iter().map(|k| k.key).collect();
        assert_eq!(keys, ["k3", "k4"]);
        assert_eq!(
            m.len(),
            2,
            "expired entries are gone from memory, not just hidden"
        );
    }
}
