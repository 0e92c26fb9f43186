//! The embedded backend: the same semantic operations as the Redis scripts, each one critical section over
//! one [`keyspace::Keyspace`].
//!
//! It keeps Redis's data model for what keyward stores (byte strings with an expiry, one hash of epochs per
//! namespace) and mirrors each Lua script line for line, so both backends agree by construction and the
//! conformance suite checks it. Sessions, locks, idempotency keys and rate limits run their own mirrors over
//! the same keyspace (`m.keyspace.with(..)` in their `store.rs`): one lock, one clock, one budget per class.
//!
//! **Memory is bounded per class** (see [`MemoryOptions`]): cache entries make room by evicting their own
//! class's entries closest to expiry; nothing else is ever evicted, and no class can take another's room.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub(crate) mod keyspace;

use self::keyspace::{Budget, Budgets, INTERNAL_CLASS, Keyspace, Kv};
use super::{Entry, Fetched, KeyTtl, Namespace};
use crate::envelope::{self, Gens, LEASE_PREFIX, is_current};
use crate::error::Result;
use crate::wake::WakeBus;

const MIB: usize = 1024 * 1024;

/// Settings of the embedded backend: how much it may hold, in total and per class.
///
/// Every class of the policy gets **its own budget**, carved out of the totals, so that the budgets never
/// overlap: a flood of one class (say 100,000 idempotency keys) fills that class's budget and nothing else, and
/// a session or lock write never fails because of it. keyward's own bookkeeping (the epochs hash) has a small
/// reserved budget of its own: an eighth of the totals, at most 1 MiB and 1,024 entries.
/// A class given [`class_budget`](Self::class_budget) gets exactly that many bytes; the other classes share
/// what is left of [`max_bytes`](Self::max_bytes) equally. Entries ([`capacity`](Self::capacity)) are shared
/// equally by all classes. Past its budget a cache class evicts its own entries closest to expiry; any other
/// class refuses the write with [`Error::StoreFull`](crate::Error::StoreFull) naming it.
///
/// Sizes are approximate: a key and its value count their bytes plus a fixed overhead per entry (128 bytes)
/// and per hash field or sorted-set member (48 bytes).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryOptions {
    capacity: usize,
    max_bytes: usize,
    class_budgets: BTreeMap<String, usize>,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            capacity: 1_000_000,
            max_bytes: 256 * MIB,
            class_budgets: BTreeMap::new(),
        }
    }
}

impl MemoryOptions {
    /// Most entries kept at once over all classes (default 1,000,000), divided equally among the classes.
    #[must_use]
    pub fn capacity(mut self, entries: usize) -> Self {
        self.capacity = entries.max(1);
        self
    }

    /// Most bytes kept at once over all classes (default 256 MiB), approximate (see above). Classes without a
    /// [`class_budget`](Self::class_budget) share what the explicit budgets leave, equally.
    #[must_use]
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes.max(1);
        self
    }

    /// The byte budget of one class, taken out of [`max_bytes`](Self::max_bytes). If the explicit budgets add
    /// up to more than the total, the other classes get 64 KiB each (and a warning is logged).
    #[must_use]
    pub fn class_budget(mut self, class: impl Into<String>, bytes: usize) -> Self {
        self.class_budgets.insert(class.into(), bytes);
        self
    }

    /// The budget of every class, for a policy declaring `classes`.
    pub(crate) fn budgets(&self, classes: &[&str]) -> Budgets {
        let internal = Budget {
            bytes: (self.max_bytes / 8).clamp(1024.min(self.max_bytes), MIB),
            entries: (self.capacity / 8).clamp(1, 1024),
        };
        let entries =
            (self.capacity.saturating_sub(internal.entries) / classes.len().max(1)).max(1);
        let explicit: usize = self.class_budgets.values().sum();
        let others = classes
            .iter()
            .filter(|c| !self.class_budgets.contains_key(**c))
            .count();
        let left = self.max_bytes.saturating_sub(internal.bytes);
        let shared = if explicit > left {
            tracing::warn!(
                explicit,
                max_bytes = self.max_bytes,
                "keyward: MemoryOptions class budgets add up to more than max_bytes; other classes get 64 KiB each"
            );
            64 * 1024
        } else {
            (left - explicit) / others.max(1)
        };
        let mut budgets = Budgets::uniform(Budget {
            bytes: shared,
            entries,
        })
        .with_class(INTERNAL_CLASS, internal);
        for (class, &bytes) in &self.class_budgets {
            budgets = budgets.with_class(class, Budget { bytes, entries });
        }
        budgets
    }
}

pub(crate) struct MemoryBackend {
    bus: Arc<WakeBus>,
    /// Everything this backend stores: cache entries, epochs, sessions, locks, idempotency keys, rate limits.
    pub(crate) keyspace: Keyspace,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// An epoch field: a corrupt or absent one counts as 0 (Lua's `tonumber(x) or 0`).
/// A stored epoch field, as `epochs.lua` reads it: absent, or anything but an integer below 2^53, is 0.
fn epoch(h: Option<&std::collections::HashMap<String, Bytes>>, field: &str) -> u64 {
    h.and_then(|h| h.get(field))
        .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
        .filter(|n| *n < 1 << 53)
        .unwrap_or(0)
}

fn current_gens(kv: &Kv, ns: &Namespace, class: &str) -> Gens {
    let h = kv.get_hash(&ns.gens_key);
    Gens {
        ns: epoch(h, "*"),
        class: epoch(h, class),
    }
}

/// Whether `key` still holds the lease whose marker starts with `lease_prefix`.
fn holds(kv: &Kv, key: &str, lease_prefix: &str) -> bool {
    kv.get_str(key)
        .is_some_and(|s| s.starts_with(lease_prefix.as_bytes()))
}

// Evictability is decided by how a key is written: the cache operations below write with `put_evictable`,
// every other capability with `Kv::set`/`hset`, which never evict. When the policy exposes
// `ClassKind::evictable()`, the budgets can carry it per class instead.
impl MemoryBackend {
    /// A backend for a policy declaring `classes` (their names give each one its own budget).
    pub(crate) fn new(options: &MemoryOptions, classes: &[&str], bus: Arc<WakeBus>) -> Self {
        Self {
            bus,
            keyspace: Keyspace::new(options.budgets(classes)),
        }
    }

    pub(crate) fn fetch(
        &self,
        e: &Entry<'_>,
        marker: &str,
        lease_ttl: Duration,
        negative_ok: bool,
    ) -> Fetched {
        self.keyspace.with_evicting(|kv| {
            let now = kv.now_us();
            let gens = current_gens(kv, e.ns, e.class);
            let lease = Bytes::copy_from_slice(marker.as_bytes());
            let lease_until = now.saturating_add(micros(lease_ttl));
            let found = kv.get_str(e.key).cloned().zip(kv.expires_us(e.key));
            match found {
                None => {
                    kv.put_evictable(e.key, lease, lease_until);
                    Fetched::Leased(gens)
                }
                Some((data, expires)) if data.starts_with(LEASE_PREFIX) => {
                    if !envelope::lease_has_waiters(&data) {
                        let mut flagged = data.to_vec();
                        if let Some(last) = flagged.last_mut() {
                            *last = b'1';
                        }
                        kv.put_evictable(e.key, Bytes::from(flagged), expires);
                    }
                    Fetched::Wait(Duration::from_micros(
                        u64::try_from(expires - now).unwrap_or(0),
                    ))
                }
                Some((data, _)) => match is_current(&data, gens, negative_ok) {
                    Some(false) => {
                        kv.put_evictable(e.key, lease, lease_until);
                        Fetched::Leased(gens)
                    }
                    _ => Fetched::Hit(data),
                },
            }
        })
    }

    pub(crate) fn read(&self, e: &Entry<'_>) -> Option<Bytes> {
        self.keyspace.with_evicting(|kv| {
            let gens = current_gens(kv, e.ns, e.class);
            let s = kv.get_str(e.key)?;
            if s.starts_with(LEASE_PREFIX) || is_current(s, gens, true) == Some(false) {
                return None;
            }
            Some(s.clone())
        })
    }

    /// Whether the value was stored: false if the lease is no longer held, or if the value cannot fit in its
    /// class's budget even after evicting (the lease is then given back).
    pub(crate) fn commit(
        &self,
        e: &Entry<'_>,
        lease_prefix: &str,
        value: &[u8],
        ttl: Duration,
    ) -> bool {
        let stored = self.keyspace.with_evicting(|kv| {
            if !holds(kv, e.key, lease_prefix) {
                return None;
            }
            let until = kv.now_us().saturating_add(micros(ttl));
            Some(kv.put_evictable(e.key, Bytes::copy_from_slice(value), until))
        });
        let Some(stored) = stored else { return false };
        self.bus.wake(e.key);
        stored
    }

    pub(crate) fn release(&self, e: &Entry<'_>, lease_prefix: &str) -> bool {
        let released = self
            .keyspace
            .with_evicting(|kv| holds(kv, e.key, lease_prefix) && kv.del(e.key));
        if released {
            self.bus.wake(e.key);
        }
        released
    }

    /// Store `body` under the current epochs. A value too large for its class's budget is not stored, and
    /// the previous value is removed (never left to be read as current).
    pub(crate) fn set(&self, e: &Entry<'_>, body: &[u8], ttl: Duration) {
        self.keyspace.with_evicting(|kv| {
            let gens = current_gens(kv, e.ns, e.class);
            let value = Bytes::from(envelope::value(gens, body));
            let until = kv.now_us().saturating_add(micros(ttl));
            kv.put_evictable(e.key, value, until);
        });
        self.bus.wake(e.key);
    }

    pub(crate) fn invalidate(&self, e: &Entry<'_>) -> bool {
        let removed = self.keyspace.with_evicting(|kv| kv.del(e.key));
        self.bus.wake(e.key);
        removed
    }

    /// Bump a group epoch to `max(current + 1, now in Unix µs)`, so that an epochs hash that expired and was
    /// recreated never climbs back to a value that old entries carry (`bump.lua` does the same).
    ///
    /// # Errors
    /// [`Error::StoreFull`](crate::Error::StoreFull) if the internal class's budget is full.
    pub(crate) fn bump(&self, ns: &Namespace, field: &str) -> Result<u64> {
        self.keyspace.with(|kv| {
            // µs, like `epochs.lua`: the clock floor keeps a recreated field above every epoch issued before.
            let now_us = u64::try_from(kv.now_us()).unwrap_or(0);
            let next = epoch(kv.get_hash(&ns.gens_key), field)
                .saturating_add(1)
                .max(now_us);
            let life_ms = i64::try_from(ns.gens_lifetime.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let left = kv.pttl(&ns.gens_key);
            kv.hset(
                &ns.gens_key,
                &[(field, Bytes::from(next.to_string()))],
                life_ms,
            );
            if left < life_ms {
                kv.pexpire(&ns.gens_key, life_ms);
            }
            next
        })
    }

    pub(crate) fn heal(&self, key: &str, raw: &[u8]) -> bool {
        self.keyspace
            .with_evicting(|kv| kv.get_str(key).is_some_and(|s| s == raw) && kv.del(key))
    }

    pub(crate) fn scan(&self, pattern: &str) -> Vec<KeyTtl> {
        let mut out = self.keyspace.scan(pattern);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keyward;
    use crate::policy::{CacheClass, Jitter, Policy};

    fn ns() -> Namespace {
        Namespace {
            gens_key: "t:a:_kw:gens".into(),
            channel: "t:a:_kw:fills".into(),
            gens_lifetime: Duration::from_secs(60),
        }
    }

    fn set(m: &MemoryBackend, ns: &Namespace, class: &str, id: i32, secs: u64) {
        let key = format!("t:a:{class}:v1:{{{id}}}");
        let e = Entry {
            ns,
            class,
            key: &key,
        };
        m.set(&e, b"v:1", Duration::from_secs(secs));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_and_a_full_class_evicts_its_own_soonest() {
        let bus = Arc::new(WakeBus::default());
        // 4 entries in all: 1 reserved for keyward's own keys, 3 for the class `c` (and as many for `d`).
        let m = MemoryBackend::new(&MemoryOptions::default().capacity(4), &["c"], bus);
        let ns = ns();
        set(&m, &ns, "d", 9, 1);
        for (i, secs) in [(1, 10), (2, 5), (3, 20), (4, 30)] {
            set(&m, &ns, "c", i, secs);
        }
        let keys: Vec<_> = m.scan("t:a:*").into_iter().map(|k| k.key).collect();
        assert_eq!(
            keys,
            [
                "t:a:c:v1:{1}",
                "t:a:c:v1:{3}",
                "t:a:c:v1:{4}",
                "t:a:d:v1:{9}"
            ],
            "c:2 expired soonest in its class and was evicted; d's entry, expiring sooner, is another class's"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let keys: Vec<_> = m.scan("t:a:*").into_iter().map(|k| k.key).collect();
        assert_eq!(keys, ["t:a:c:v1:{3}", "t:a:c:v1:{4}"]);
        assert_eq!(
            m.keyspace.usage("c").1,
            2,
            "expired entries are gone from memory, not just hidden"
        );
    }

    #[test]
    fn budgets_give_every_class_its_own_share_of_the_totals() {
        let o = MemoryOptions::default()
            .capacity(10_000)
            .max_bytes(100 * MIB)
            .class_budget("big", 50 * MIB);
        let b = o.budgets(&["big", "a", "b"]);
        let internal = Budget {
            bytes: MIB,
            entries: 1024,
        };
        let share = (10_000 - 1024) / 3;
        assert_eq!(b.of(INTERNAL_CLASS), internal);
        assert_eq!(
            b.of("big"),
            Budget {
                bytes: 50 * MIB,
                entries: share
            }
        );
        let other = Budget {
            bytes: (99 * MIB - 50 * MIB) / 2,
            entries: share,
        };
        assert_eq!(b.of("a"), other);
        assert_eq!(b.of("b"), other);
        let total: usize = ["big", "a", "b", INTERNAL_CLASS]
            .iter()
            .map(|c| b.of(c).bytes)
            .sum();
        assert!(total <= 100 * MIB, "the budgets never overlap: {total}");
        // Explicit budgets past the total leave the others a floor rather than nothing.
        let b = MemoryOptions::default()
            .max_bytes(MIB)
            .class_budget("big", 2 * MIB)
            .budgets(&["big", "a"]);
        assert_eq!(b.of("a").bytes, 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn bump_never_repeats_an_epoch_and_repairs_a_corrupt_field() {
        let m = MemoryBackend::new(
            &MemoryOptions::default(),
            &["c"],
            Arc::new(WakeBus::default()),
        );
        let ns = ns();
        let first = m.bump(&ns, "c").unwrap();
        assert!(
            first > 1_600_000_000_000_000,
            "starts at the clock, in Unix µs: {first}"
        );
        assert_eq!(
            m.bump(&ns, "c").unwrap(),
            first + 1,
            "bumps in one µs still climb"
        );
        tokio::time::advance(Duration::from_secs(120)).await; // the epochs hash expires
        let after = m.bump(&ns, "c").unwrap();
        assert!(after >= first + 120_000_000, "{first} -> {after}");
        m.keyspace
            .with(|kv| kv.hset(&ns.gens_key, &[("c", Bytes::from_static(b"garbage"))], 1))
            .unwrap();
        let repaired = m.bump(&ns, "c").unwrap();
        assert!(repaired >= after, "a corrupt field counts as 0: {repaired}");
    }

    /// The scenario: class ttl 10s, no jitter, lease 1s, loader timeout 500ms (the epochs hash lives
    /// ~71s after a bump). A value filled at 65s must not come back after the bump at 72s, which finds the
    /// epochs hash expired and recreates it.
    #[tokio::test(start_paused = true)]
    async fn an_invalidation_after_the_epochs_expired_is_not_undone() {
        let class = CacheClass::new(Duration::from_secs(10), "tests")
            .jitter(Jitter::Fixed(Duration::ZERO))
            .lease_ttl(Duration::from_secs(1))
            .loader_timeout(Duration::from_millis(500));
        let policy = Policy::builder("t", "epochs")
            .cache("c", class)
            .build()
            .unwrap();
        let kw = Keyward::embedded(policy);
        let cache = kw.cache::<String>("c").unwrap();
        let load = |v: &'static str| move || async move { Ok::<_, std::io::Error>(v.to_owned()) };

        kw.invalidate_namespace().await.unwrap(); // t = 0
        tokio::time::advance(Duration::from_secs(65)).await;
        assert_eq!(cache.get_or_set("k", load("S1")).await.unwrap(), "S1");
        tokio::time::advance(Duration::from_secs(7)).await; // t = 72: the epochs hash has expired
        kw.invalidate_namespace().await.unwrap();
        assert_eq!(
            cache.get("k").await.unwrap(),
            None,
            "the entry filled at 65s is stale"
        );
        assert_eq!(cache.get_or_set("k", load("S2")).await.unwrap(), "S2");

        // The same with the class's own epoch.
        tokio::time::advance(Duration::from_secs(80)).await;
        cache.invalidate_all().await.unwrap();
        tokio::time::advance(Duration::from_secs(65)).await;
        assert_eq!(cache.get_or_set("j", load("S1")).await.unwrap(), "S1");
        tokio::time::advance(Duration::from_secs(7)).await;
        cache.invalidate_all().await.unwrap();
        assert_eq!(cache.get("j").await.unwrap(), None);
        assert_eq!(cache.get_or_set("j", load("S2")).await.unwrap(), "S2");
    }
}
