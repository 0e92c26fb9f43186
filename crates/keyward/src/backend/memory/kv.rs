//! A small in-process subset of Redis's data model — strings, hashes and sorted sets with a millisecond
//! expiry — for the embedded implementations of sessions, locks and idempotency keys.
//!
//! Each of those capabilities mirrors its Lua script as one closure run under this store's lock
//! ([`Records::with`]), so the atomicity of a script is the atomicity of the critical section, and the code
//! reads like the script it mirrors. Time is the store's [`Clock`] (Unix time advanced by tokio's pausable
//! clock), in milliseconds like Redis's `TIME`-derived values in the scripts.
//!
//! Unlike the cache's store it never evicts (Redis's `noeviction`): past its capacity, operations that would
//! add keys fail with [`Error::StoreFull`](crate::Error::StoreFull) until entries expire or are removed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::KeyTtl;
use crate::error::{Error, Result};
use crate::key::glob_match;
use crate::rate_limit::local::Clock;

/// A stored value.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    /// A string.
    Str(Bytes),
    /// A hash: field → bytes.
    Hash(HashMap<String, Bytes>),
    /// A sorted set: member → score.
    ZSet(HashMap<String, i64>),
}

struct Item {
    val: Val,
    expires_ms: i64,
}

/// The keyspace: values with an absolute expiry (every key has one, like everything keyward writes).
#[derive(Default)]
pub(crate) struct Kv {
    items: HashMap<String, Item>,
    by_expiry: BTreeSet<(i64, String)>,
    capacity: usize,
    now_ms: i64,
}

impl Kv {
    fn purge(&mut self) {
        while let Some((at, _)) = self.by_expiry.first() {
            if *at > self.now_ms {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.items.remove(&key);
            }
        }
    }

    /// The current time of this critical section, in ms.
    pub(crate) fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The live value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&Val> {
        self.items
            .get(key)
            .filter(|i| i.expires_ms > self.now_ms)
            .map(|i| &i.val)
    }

    /// The live value of `key`, mutably (its expiry unchanged).
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Val> {
        let now = self.now_ms;
        self.items
            .get_mut(key)
            .filter(|i| i.expires_ms > now)
            .map(|i| &mut i.val)
    }

    /// The live string at `key`.
    pub(crate) fn get_str(&self, key: &str) -> Option<&Bytes> {
        match self.get(key) {
            Some(Val::Str(b)) => Some(b),
            _ => None,
        }
    }

    /// The live hash at `key`.
    pub(crate) fn get_hash(&self, key: &str) -> Option<&HashMap<String, Bytes>> {
        match self.get(key) {
            Some(Val::Hash(h)) => Some(h),
            _ => None,
        }
    }

    /// Whether `key` holds a live value.
    pub(crate) fn exists(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// `SET key val PX ttl_ms` (any type): replaces the value and its expiry.
    pub(crate) fn set(&mut self, key: &str, val: Val, ttl_ms: i64) {
        let expires_ms = self.now_ms.saturating_add(ttl_ms.max(1));
        // Never evicts: a lock, a session or an in-progress marker that silently vanished would break the
        // guarantee it exists for. Operations that add keys check for room first (`Records::with_room`).
        if let Some(old) = self.items.remove(key) {
            self.by_expiry.remove(&(old.expires_ms, key.to_owned()));
        }
        self.by_expiry.insert((expires_ms, key.to_owned()));
        self.items.insert(key.to_owned(), Item { val, expires_ms });
    }

    /// `DEL key`: whether a live value was removed.
    pub(crate) fn del(&mut self, key: &str) -> bool {
        let live = self.exists(key);
        if let Some(old) = self.items.remove(key) {
            self.by_expiry.remove(&(old.expires_ms, key.to_owned()));
        }
        live
    }

    /// `PEXPIRE key ttl_ms`: whether the key exists.
    pub(crate) fn pexpire(&mut self, key: &str, ttl_ms: i64) -> bool {
        if !self.exists(key) {
            return false;
        }
        let expires_ms = self.now_ms.saturating_add(ttl_ms.max(1));
        if let Some(item) = self.items.get_mut(key) {
            self.by_expiry.remove(&(item.expires_ms, key.to_owned()));
            item.expires_ms = expires_ms;
            self.by_expiry.insert((expires_ms, key.to_owned()));
        }
        true
    }

    /// `PTTL key`: the remaining lifetime in ms, or -2 if the key does not exist.
    pub(crate) fn pttl(&self, key: &str) -> i64 {
        match self.items.get(key) {
            Some(i) if i.expires_ms > self.now_ms => i.expires_ms - self.now_ms,
            _ => -2,
        }
    }

    /// `RENAME from to` (keeps the expiry): whether `from` existed.
    pub(crate) fn rename(&mut self, from: &str, to: &str) -> bool {
        let ttl = self.pttl(from);
        if ttl < 0 {
            return false;
        }
        let Some(old) = self.items.remove(from) else {
            return false;
        };
        self.by_expiry.remove(&(old.expires_ms, from.to_owned()));
        self.set(to, old.val, ttl);
        true
    }

    /// `HSET key field value …` on an existing hash or a new one; a new hash gets `ttl_ms`.
    pub(crate) fn hset(&mut self, key: &str, fields: &[(&str, Bytes)], ttl_ms_if_new: i64) {
        if let Some(Val::Hash(h)) = self.get_mut(key) {
            for (f, v) in fields {
                h.insert((*f).to_owned(), v.clone());
            }
            return;
        }
        let h = fields
            .iter()
            .map(|(f, v)| ((*f).to_owned(), v.clone()))
            .collect();
        self.set(key, Val::Hash(h), ttl_ms_if_new);
    }

    /// The live sorted set at `key`, mutably.
    pub(crate) fn zset_mut(&mut self, key: &str) -> Option<&mut HashMap<String, i64>> {
        match self.get_mut(key) {
            Some(Val::ZSet(z)) => Some(z),
            _ => None,
        }
    }
}

/// The store: one lock, one clock.
pub(crate) struct Records {
    kv: Mutex<Kv>,
    clock: Clock,
}

impl Records {
    pub(crate) fn new(capacity: usize) -> Self {
        Records {
            kv: Mutex::new(Kv {
                capacity: capacity.max(1),
                ..Kv::default()
            }),
            clock: Clock::new(),
        }
    }

    /// Run `f` as one critical section at one instant (what a Lua script is on Redis).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Kv) -> T) -> T {
        let mut kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock, so critical sections see time in the order they run (never backwards).
        kv.now_ms = kv.now_ms.max(self.clock.now_us().div_euclid(1000));
        kv.purge();
        f(&mut kv)
    }

    /// [`with`](Self::with) for an operation that may add up to two keys: refused with
    /// [`Error::StoreFull`] when the store holds its capacity of live keys, rather than evicting one.
    pub(crate) fn with_room<T>(&self, f: impl FnOnce(&mut Kv) -> T) -> Result<T> {
        self.with(|kv| {
            if kv.items.len() + 2 > kv.capacity {
                metrics::counter!("keyward_memory_full_total").increment(1);
                return Err(Error::StoreFull {
                    capacity: kv.capacity,
                });
            }
            Ok(f(kv))
        })
    }

    /// The store's clock in µs (for values that must be µs, such as fencing tokens).
    pub(crate) fn now_us(&self) -> i64 {
        self.clock.now_us()
    }

    /// Keys matching a glob, with their TTL.
    pub(crate) fn scan(&self, pattern: &str) -> Vec<KeyTtl> {
        self.with(|kv| {
            kv.items
                .iter()
                .filter(|(k, i)| {
                    i.expires_ms > kv.now_ms && glob_match(pattern.as_bytes(), k.as_bytes())
                })
                .map(|(k, i)| KeyTtl {
                    key: k.clone(),
                    ttl: Some(Duration::from_millis(
                        u64::try_from(i.expires_ms - kv.now_ms).unwrap_or(0),
                    )),
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expiry_rename_and_capacity() {
        let r = Records::new(2);
        r.with(|kv| {
            kv.set("a", Val::Str(Bytes::from_static(b"1")), 1000);
            kv.set("b", Val::Str(Bytes::from_static(b"2")), 5000);
            assert!(kv.rename("a", "c"));
            assert!(!kv.exists("a"));
            assert_eq!(kv.pttl("c"), 1000);
        });
        tokio::time::advance(Duration::from_millis(5000)).await;
        r.with(|kv| {
            assert!(!kv.exists("b"));
            assert_eq!(kv.pttl("b"), -2);
            assert!(!kv.pexpire("b", 10));
        });
        assert_eq!(r.scan("*").len(), 0);
        // Full (capacity 2): an operation that adds keys is refused; nothing is evicted.
        r.with(|kv| kv.set("e", Val::Str(Bytes::from_static(b"1")), 60_000));
        assert!(matches!(
            r.with_room(|_| ()),
            Err(Error::StoreFull { capacity: 2 })
        ));
        assert_eq!(r.scan("*").len(), 1);
    }
}
