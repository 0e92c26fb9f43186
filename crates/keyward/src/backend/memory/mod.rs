//! The embedded backend: one [`keyspace::Keyspace`] that every capability's mirrors run over, each operation
//! one critical section.
//!
//! It keeps Redis's data model for what keyward stores (strings, hashes and sorted sets with an expiry), and
//! each capability mirrors its Lua scripts line for line in its own `store.rs`, so both backends agree by
//! construction and the conformance suite checks it: one lock, one clock, one budget per class.
//!
//! **Memory is bounded per class** (see [`MemoryOptions`]): cache entries make room by evicting their own
//! class's entries closest to expiry; nothing else is ever evicted, and no class can take another's room.

use std::collections::BTreeMap;

pub(crate) mod keyspace;
pub(crate) mod stream;

use self::keyspace::{Budget, Budgets, INTERNAL_CLASS, Keyspace};
use super::KeyTtl;

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

/// The embedded backend: one keyspace for everything a handle stores (cache entries, epochs, sessions, locks,
/// idempotency keys, rate limits). The capabilities' mirrors run over it through
/// [`Backend::atomic`](super::Backend::atomic).
pub(crate) struct MemoryBackend {
    pub(crate) keyspace: Keyspace,
    /// Typed channels' in-process subscribers.
    pub(crate) channels: super::channels::LocalHub,
}

impl MemoryBackend {
    /// A backend for a policy declaring `classes` (their names give each one its own budget).
    /// `classes` are the policy's classes with their eviction rule (`ClassKind::evictable()`).
    pub(crate) fn new(options: &MemoryOptions, classes: &[(&str, bool)]) -> Self {
        let names: Vec<&str> = classes.iter().map(|(name, _)| *name).collect();
        let budgets = classes
            .iter()
            .filter(|(_, evictable)| !evictable)
            .fold(options.budgets(&names), |b, (name, _)| {
                b.never_evicted(name)
            });
        Self {
            keyspace: Keyspace::new(budgets),
            channels: super::channels::LocalHub::default(),
        }
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

    fn set(m: &MemoryBackend, class: &str, id: i32, secs: i64) {
        let key = format!("t:a:{class}:v1:{{{id}}}");
        m.keyspace.with_evicting(|kv| {
            let until = kv.now_us() + secs * 1_000_000;
            kv.put_evictable(&key, bytes::Bytes::from_static(b"V1:0:0:v:1"), until)
        });
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_and_a_full_class_evicts_its_own_soonest() {
        // 4 entries in all: 1 reserved for keyward's own keys, 3 for the class `c` (and as many for `d`).
        let m = MemoryBackend::new(&MemoryOptions::default().capacity(4), &[("c", true)]);
        set(&m, "d", 9, 1);
        for (i, secs) in [(1, 10), (2, 5), (3, 20), (4, 30)] {
            set(&m, "c", i, secs);
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
        tokio::time::advance(std::time::Duration::from_secs(11)).await;
        let keys: Vec<_> = m.scan("t:a:*").into_iter().map(|k| k.key).collect();
        assert_eq!(keys, ["t:a:c:v1:{3}", "t:a:c:v1:{4}"]);
        assert_eq!(
            m.keyspace.usage("c").1,
            2,
            "expired entries are gone from memory, not just hidden"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_class_the_policy_never_evicts_refuses_instead() {
        // Class `n` is declared never evicted: even an evictable write does not push out its entries.
        let m = MemoryBackend::new(&MemoryOptions::default().capacity(4), &[("n", false)]);
        for i in 0..3 {
            set(&m, "n", i, 10);
        }
        let before: Vec<_> = m.scan("t:a:n:*").into_iter().map(|k| k.key).collect();
        assert_eq!(before.len(), 3);
        set(&m, "n", 9, 60);
        let after: Vec<_> = m.scan("t:a:n:*").into_iter().map(|k| k.key).collect();
        assert_eq!(after, before, "nothing evicted, the new write refused");
    }
}
