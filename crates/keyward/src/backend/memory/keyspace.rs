//! The embedded keyspace: one expiring map with Redis's typed values (string, hash, sorted set, and a stream,
//! which alone has no expiry: its retention bounds it), one clock, and one budget per class. Every embedded
//! operation — the cache's, the sessions', locks', idempotency keys', rate limits' and streams' — runs over it
//! as one critical section
//! ([`Keyspace::with`]), which is what a Lua script is on Redis.
//!
//! **The one decision to know: budgets are per class, never shared.** The class is the third segment of the
//! key (`{env}:{app}:{class}:…`; keyward's own `…:_kw:…` keys form the internal class `_kw`). Each class has
//! its own budget of approximate bytes (key + value + a fixed overhead per entry and per field) and entries.
//! A class whose keys are written as evictable (cache entries and their fill leases) makes room past its
//! budget by evicting *its own* entries closest to expiry (Redis's `volatile-ttl`, within the class); any other
//! class (sessions, locks, idempotency markers, rate-limit state, epochs) is never evicted: a critical section
//! that would grow such a class past its budget is rolled back whole and fails with
//! [`Error::StoreFull`] naming the class. Nothing one class does can evict or refuse
//! another class.
//!
//! Time is [`Clock`]: Unix time in µs advanced by tokio's pausable `Instant`, so `#[tokio::test(start_paused =
//! true)]` drives expiry. Expired keys are purged at the start of every critical section, and the map gives its
//! memory back (`shrink_to_fit`) once it holds less than a quarter of what it has room for.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::stream::StreamVal;
use crate::backend::KeyTtl;
use crate::error::{Error, Result};
use crate::key::glob_match;

/// The expiry of a key without a TTL (only streams, which their retention bounds instead).
const NO_EXPIRY: i64 = i64::MAX;

/// The class of keyward's own bookkeeping keys (`{env}:{app}:_kw:…`).
pub(crate) const INTERNAL_CLASS: &str = "_kw";

/// Approximate bytes an entry costs beyond its key and value: the map slot, the expiry-index node, the `Arc`.
const ENTRY_OVERHEAD: usize = 128;
/// Approximate bytes a hash field or sorted-set member costs beyond its own bytes.
const FIELD_OVERHEAD: usize = 48;
/// Below this many slots a map is not worth shrinking.
const SHRINK_FLOOR: usize = 64;

/// The clock of the embedded keyspace: Unix time in µs, advanced by tokio's (pausable) monotonic clock.
#[derive(Debug)]
pub(crate) struct Clock {
    base_us: i64,
    base: Instant,
}

impl Clock {
    /// A clock reading the system's Unix time now and advancing with tokio's `Instant` from here on.
    pub(crate) fn new() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        Clock {
            base_us,
            base: Instant::now(),
        }
    }

    /// Unix time in µs.
    pub(crate) fn now_us(&self) -> i64 {
        let elapsed = i64::try_from(self.base.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.base_us.saturating_add(elapsed)
    }
}

/// A stored value (Redis's types).
#[derive(Debug, Clone)]
pub(crate) enum Val {
    /// A string.
    Str(Bytes),
    /// A hash: field → bytes.
    Hash(HashMap<String, Bytes>),
    /// A sorted set: member → score.
    ZSet(HashMap<String, i64>),
    /// A stream with its consumer groups (no expiry: a stream is bounded by its retention).
    Stream(Box<StreamVal>),
}

impl Val {
    /// Approximate heap bytes of the value.
    fn bytes(&self) -> usize {
        match self {
            Val::Str(b) => b.len(),
            Val::Hash(h) => h
                .iter()
                .map(|(f, v)| f.len() + v.len() + FIELD_OVERHEAD)
                .sum(),
            Val::ZSet(z) => z.keys().map(|m| m.len() + 8 + FIELD_OVERHEAD).sum(),
            Val::Stream(s) => s.bytes(),
        }
    }
}

/// What one class may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Approximate bytes (keys + values + overhead).
    pub(crate) bytes: usize,
    /// Entries (keys).
    pub(crate) entries: usize,
}

/// The budget of every class: explicit ones, and one for any class not named.
#[derive(Debug, Clone)]
pub(crate) struct Budgets {
    classes: HashMap<String, Budget>,
    default: Budget,
    /// Classes the policy says are never evicted (`ClassKind::evictable()` false): even an evictable write
    /// (`put_evictable`) to one of them refuses rather than evict.
    never_evicted: std::collections::HashSet<String>,
}

impl Budgets {
    /// Every class gets `default`.
    pub(crate) fn uniform(default: Budget) -> Self {
        Budgets {
            classes: HashMap::new(),
            default,
            never_evicted: std::collections::HashSet::new(),
        }
    }

    /// `class` gets `budget`.
    #[must_use]
    pub(crate) fn with_class(mut self, class: &str, budget: Budget) -> Self {
        self.classes.insert(class.to_owned(), budget);
        self
    }

    /// `class` is never evicted, whatever writes it.
    #[must_use]
    pub(crate) fn never_evicted(mut self, class: &str) -> Self {
        self.never_evicted.insert(class.to_owned());
        self
    }

    /// Whether entries of `class` may be evicted to make room in it.
    pub(crate) fn evictable(&self, class: &str) -> bool {
        !self.never_evicted.contains(class)
    }

    /// The budget of `class`.
    pub(crate) fn of(&self, class: &str) -> Budget {
        self.classes.get(class).copied().unwrap_or(self.default)
    }
}

/// The class a key belongs to: its third `:`-separated segment (`""` for a key with fewer segments).
pub(crate) fn class_of(key: &str) -> &str {
    key.split(':').nth(2).unwrap_or("")
}

struct Item {
    val: Val,
    expires_us: i64,
    class: usize,
    /// What this item is accounted as in its class (key + value + overhead, as last measured).
    bytes: usize,
    /// Written by an operation that allows eviction (cache entries and leases).
    evictable: bool,
}

struct ClassUse {
    name: Arc<str>,
    budget: Budget,
    /// From the policy's eviction rule for the class.
    evictable: bool,
    bytes: usize,
    entries: usize,
    by_expiry: BTreeSet<(i64, Arc<str>)>,
}

/// What a class held when a critical section first touched it.
#[derive(Clone, Copy)]
struct Before {
    class: usize,
    bytes: usize,
    entries: usize,
}

/// The keyspace as one critical section sees it: every read and write of an embedded operation goes through
/// this, at one instant ([`now_us`](Kv::now_us)).
pub(crate) struct Kv {
    items: HashMap<Arc<str>, Item>,
    classes: Vec<ClassUse>,
    class_ids: HashMap<Arc<str>, usize>,
    budgets: Budgets,
    now_us: i64,
    /// The state of each key before this section first changed it; `None` outside a checked section.
    undo: Option<HashMap<Arc<str>, Option<Item>>>,
    /// Keys handed out mutably in this section, whose size must be measured again.
    dirty: Vec<Arc<str>>,
    /// Classes this section changed, with what they held before.
    before: Vec<Before>,
}

impl Kv {
    fn new(budgets: Budgets) -> Self {
        Kv {
            items: HashMap::new(),
            classes: Vec::new(),
            class_ids: HashMap::new(),
            budgets,
            now_us: i64::MIN,
            undo: None,
            dirty: Vec::new(),
            before: Vec::new(),
        }
    }

    // ---- bookkeeping -------------------------------------------------------------------------------------

    fn class_id(&mut self, key: &str) -> usize {
        let name = class_of(key);
        if let Some(&id) = self.class_ids.get(name) {
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = self.classes.len();
        self.classes.push(ClassUse {
            budget: self.budgets.of(&name),
            evictable: self.budgets.evictable(&name),
            name: Arc::clone(&name),
            bytes: 0,
            entries: 0,
            by_expiry: BTreeSet::new(),
        });
        self.class_ids.insert(name, id);
        id
    }

    fn note_class(&mut self, class: usize) {
        if self.undo.is_some() && !self.before.iter().any(|b| b.class == class) {
            let c = &self.classes[class];
            self.before.push(Before {
                class,
                bytes: c.bytes,
                entries: c.entries,
            });
        }
    }

    /// Remember `key`'s state before its first change in this section (checked sections only).
    fn save(&mut self, key: &str) {
        let Some(undo) = &self.undo else { return };
        if undo.contains_key(key) {
            return;
        }
        let saved = self.items.get_key_value(key).map(|(k, i)| {
            (
                Arc::clone(k),
                Item {
                    val: i.val.clone(),
                    expires_us: i.expires_us,
                    class: i.class,
                    bytes: i.bytes,
                    evictable: i.evictable,
                },
            )
        });
        let (k, prev) = match saved {
            Some((k, item)) => (k, Some(item)),
            None => (Arc::from(key), None),
        };
        if let Some(undo) = &mut self.undo {
            undo.insert(k, prev);
        }
    }

    /// Take `key` out of the map and its class's accounting (no undo record).
    fn take(&mut self, key: &str) -> Option<(Arc<str>, Item)> {
        let (k, item) = self.items.remove_entry(key)?;
        self.note_class(item.class);
        let c = &mut self.classes[item.class];
        c.bytes = c.bytes.saturating_sub(item.bytes);
        c.entries = c.entries.saturating_sub(1);
        c.by_expiry.remove(&(item.expires_us, Arc::clone(&k)));
        Some((k, item))
    }

    /// Put an item in the map and its class's accounting (no undo record, no budget check).
    fn place(&mut self, key: Arc<str>, item: Item) {
        self.note_class(item.class);
        let c = &mut self.classes[item.class];
        c.bytes += item.bytes;
        c.entries += 1;
        c.by_expiry.insert((item.expires_us, Arc::clone(&key)));
        self.items.insert(key, item);
    }

    fn remove(&mut self, key: &str) -> Option<Item> {
        self.save(key);
        self.take(key).map(|(_, i)| i)
    }

    fn insert(&mut self, key: &str, val: Val, expires_us: i64, evictable: bool) {
        self.save(key);
        let key: Arc<str> = match self.take(key) {
            Some((k, _)) => k,
            None => Arc::from(key),
        };
        let class = self.class_id(&key);
        let bytes = key.len() + val.bytes() + ENTRY_OVERHEAD;
        self.place(
            key,
            Item {
                val,
                expires_us,
                class,
                bytes,
                evictable,
            },
        );
    }

    fn set_expiry(&mut self, key: &str, expires_us: i64) {
        self.save(key);
        if let Some((k, mut item)) = self.take(key) {
            item.expires_us = expires_us;
            self.place(k, item);
        }
    }

    /// Measure again the keys handed out mutably.
    fn settle(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(item) = self.items.get_mut(&key) {
                let bytes = key.len() + item.val.bytes() + ENTRY_OVERHEAD;
                let class = item.class;
                let old = std::mem::replace(&mut item.bytes, bytes);
                self.note_class(class);
                let c = &mut self.classes[class];
                c.bytes = c.bytes.saturating_sub(old) + bytes;
            }
        }
    }

    /// The first class this section grew past its budget.
    fn overflow(&self) -> Option<&ClassUse> {
        self.before.iter().find_map(|b| {
            let c = &self.classes[b.class];
            let over_bytes = c.bytes > c.budget.bytes && c.bytes > b.bytes;
            let over_entries = c.entries > c.budget.entries && c.entries > b.entries;
            (over_bytes || over_entries).then_some(c)
        })
    }

    fn rollback(&mut self) {
        self.dirty.clear();
        let Some(undo) = self.undo.take() else { return };
        for (key, prev) in undo {
            self.take(&key);
            if let Some(item) = prev {
                self.place(key, item);
            }
        }
    }

    fn purge(&mut self) {
        let now = self.now_us;
        for c in 0..self.classes.len() {
            while let Some((at, key)) = self.classes[c].by_expiry.first() {
                if *at > now {
                    break;
                }
                let key = Arc::clone(key);
                self.take(&key);
            }
        }
        if self.items.capacity() > SHRINK_FLOOR && self.items.len() < self.items.capacity() / 4 {
            self.items.shrink_to_fit();
        }
    }

    fn live(&self, key: &str) -> Option<&Item> {
        self.items.get(key).filter(|i| i.expires_us > self.now_us)
    }

    // ---- time ----------------------------------------------------------------------------------------------

    /// The instant of this critical section, Unix µs.
    pub(crate) fn now_us(&self) -> i64 {
        self.now_us
    }

    /// The instant of this critical section, Unix ms (what the scripts derive from `TIME`).
    pub(crate) fn now_ms(&self) -> i64 {
        self.now_us.div_euclid(1000)
    }

    /// The ms-aligned base of a `PX` expiry, as Redis computes it (`mstime() + px`).
    fn px(&self, ttl_ms: i64) -> i64 {
        self.now_ms()
            .saturating_add(ttl_ms.max(1))
            .saturating_mul(1000)
    }

    // ---- Redis's commands ----------------------------------------------------------------------------------

    /// The live value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&Val> {
        self.live(key).map(|i| &i.val)
    }

    /// The live value of `key`, mutably (its expiry unchanged; its size is measured again at the end of the
    /// section).
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Val> {
        self.live(key)?;
        self.save(key);
        let now = self.now_us;
        let (k, item) = self.items.get_key_value(key)?;
        let k = Arc::clone(k);
        let class = item.class;
        self.note_class(class);
        self.dirty.push(k);
        self.items
            .get_mut(key)
            .filter(|i| i.expires_us > now)
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
        self.live(key).is_some()
    }

    /// When the live `key` expires, Unix µs.
    pub(crate) fn expires_us(&self, key: &str) -> Option<i64> {
        self.live(key).map(|i| i.expires_us)
    }

    /// `SET key val PX ttl_ms` (any type): replaces the value and its expiry. Never evicts; a section that
    /// grows a class past its budget is rolled back ([`Keyspace::with`]).
    pub(crate) fn set(&mut self, key: &str, val: Val, ttl_ms: i64) {
        let expires_us = self.px(ttl_ms);
        self.insert(key, val, expires_us, false);
    }

    /// `SET key val` expiring `ttl_us` µs from now (for state whose lifetime is computed in µs).
    pub(crate) fn set_us(&mut self, key: &str, val: Val, ttl_us: i64) {
        let expires_us = self.now_us.saturating_add(ttl_us.max(1));
        self.insert(key, val, expires_us, false);
    }

    /// Store an evictable string (a cache entry or lease) expiring at `expires_us`. Past its class's budget
    /// the class's own evictable entries closest to expiry make room; returns false (and `key` holds nothing)
    /// if that cannot make enough room.
    pub(crate) fn put_evictable(&mut self, key: &str, data: Bytes, expires_us: i64) -> bool {
        self.remove(key);
        let class = self.class_id(key);
        let bytes = key.len() + data.len() + ENTRY_OVERHEAD;
        let budget = self.classes[class].budget;
        if bytes > budget.bytes || budget.entries == 0 {
            metrics::counter!("keyward_memory_refused_total", "class" => self.classes[class].name.to_string())
                .increment(1);
            return false;
        }
        loop {
            let c = &self.classes[class];
            if c.bytes + bytes <= budget.bytes && c.entries < budget.entries {
                break;
            }
            let victim = c
                .by_expiry
                .iter()
                .filter(|_| c.evictable)
                .find(|(_, k)| self.items.get(&**k).is_some_and(|i| i.evictable))
                .map(|(_, k)| Arc::clone(k));
            let Some(victim) = victim else {
                metrics::counter!("keyward_memory_refused_total", "class" => c.name.to_string())
                    .increment(1);
                return false;
            };
            metrics::counter!("keyward_memory_evictions_total", "class" => c.name.to_string())
                .increment(1);
            self.remove(&victim);
        }
        self.insert(key, Val::Str(data), expires_us, true);
        true
    }

    /// `DEL key`: whether a live value was removed.
    pub(crate) fn del(&mut self, key: &str) -> bool {
        let live = self.exists(key);
        if self.items.contains_key(key) {
            self.remove(key);
        }
        live
    }

    /// `PEXPIRE key ttl_ms`: whether the key exists.
    pub(crate) fn pexpire(&mut self, key: &str, ttl_ms: i64) -> bool {
        if !self.exists(key) {
            return false;
        }
        let expires_us = self.px(ttl_ms);
        self.set_expiry(key, expires_us);
        true
    }

    /// `PTTL key`: the remaining lifetime in ms, -1 for a key without a TTL (a stream), or -2 if the key does
    /// not exist.
    pub(crate) fn pttl(&self, key: &str) -> i64 {
        match self.live(key) {
            Some(i) if i.expires_us == NO_EXPIRY => -1,
            Some(i) => i.expires_us.div_euclid(1000) - self.now_ms(),
            None => -2,
        }
    }

    /// `RENAME from to` (keeps the expiry): whether `from` existed.
    pub(crate) fn rename(&mut self, from: &str, to: &str) -> bool {
        let Some(expires_us) = self.expires_us(from) else {
            return false;
        };
        let Some(old) = self.remove(from) else {
            return false;
        };
        self.insert(to, old.val, expires_us, old.evictable);
        true
    }

    /// `HSET key field value …` on an existing hash or a new one; a new hash gets `ttl_ms_if_new`.
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
        if !matches!(self.get(key), Some(Val::ZSet(_))) {
            return None;
        }
        match self.get_mut(key) {
            Some(Val::ZSet(z)) => Some(z),
            _ => None,
        }
    }

    /// The live stream at `key`.
    pub(crate) fn stream(&self, key: &str) -> Option<&StreamVal> {
        match self.get(key) {
            Some(Val::Stream(s)) => Some(s),
            _ => None,
        }
    }

    /// The live stream at `key`, mutably (measured again at the end of the section).
    pub(crate) fn stream_mut(&mut self, key: &str) -> Option<&mut StreamVal> {
        if !matches!(self.get(key), Some(Val::Stream(_))) {
            return None;
        }
        match self.get_mut(key) {
            Some(Val::Stream(s)) => Some(s),
            _ => None,
        }
    }

    /// The stream at `key`, created empty (without a TTL) if there is none, as `XADD` and `XGROUP CREATE …
    /// MKSTREAM` do. A key of another type is replaced (keyward never writes one under a stream's key).
    pub(crate) fn stream_or_create(&mut self, key: &str) -> &mut StreamVal {
        if !matches!(self.get(key), Some(Val::Stream(_))) {
            self.insert(key, Val::Stream(Box::default()), NO_EXPIRY, false);
        }
        match self.get_mut(key) {
            Some(Val::Stream(s)) => s,
            _ => unreachable!("a stream was just stored at this key"),
        }
    }

    /// Keys matching a glob, with their TTL (`None` for a stream).
    pub(crate) fn scan(&self, pattern: &str) -> Vec<KeyTtl> {
        self.items
            .iter()
            .filter(|(k, i)| {
                i.expires_us > self.now_us && glob_match(pattern.as_bytes(), k.as_bytes())
            })
            .map(|(k, i)| KeyTtl {
                key: k.to_string(),
                ttl: (i.expires_us != NO_EXPIRY).then(|| {
                    Duration::from_micros(u64::try_from(i.expires_us - self.now_us).unwrap_or(0))
                }),
            })
            .collect()
    }
}

/// The keyspace: one lock, one clock, one budget per class.
pub(crate) struct Keyspace {
    // A std mutex: every critical section is short and has no await inside, like a Lua script.
    kv: Mutex<Kv>,
    clock: Clock,
}

impl Keyspace {
    pub(crate) fn new(budgets: Budgets) -> Self {
        Keyspace {
            kv: Mutex::new(Kv::new(budgets)),
            clock: Clock::new(),
        }
    }

    /// Lock, read the clock (under the lock, so sections see time in the order they run) and purge.
    fn enter(&self) -> MutexGuard<'_, Kv> {
        let mut kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
        kv.now_us = kv.now_us.max(self.clock.now_us());
        // Normally no-ops: they matter only after a section panicked half-way (the lock is then poisoned).
        kv.undo = None;
        kv.settle();
        kv.before.clear();
        kv.purge();
        kv
    }

    /// Run `f` as one critical section at one instant (what a Lua script is on Redis), all or nothing.
    ///
    /// # Errors
    /// [`Error::StoreFull`] if `f` grew a class that is never evicted past its budget; every change `f` made
    /// is then undone.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Kv) -> T) -> Result<T> {
        let mut kv = self.enter();
        kv.undo = Some(HashMap::new());
        let out = f(&mut kv);
        kv.settle();
        if let Some(c) = kv.overflow() {
            let err = Error::StoreFull {
                class: c.name.to_string(),
                budget_bytes: c.budget.bytes,
                capacity: c.budget.entries,
            };
            metrics::counter!("keyward_memory_full_total", "class" => c.name.to_string())
                .increment(1);
            kv.rollback();
            return Err(err);
        }
        kv.undo = None;
        Ok(out)
    }

    /// Run `f` as one critical section whose writes are all [`Kv::put_evictable`] (or removals), which never
    /// take a class past its budget, so nothing needs undoing.
    pub(crate) fn with_evicting<T>(&self, f: impl FnOnce(&mut Kv) -> T) -> T {
        let mut kv = self.enter();
        let out = f(&mut kv);
        kv.settle();
        out
    }

    /// Keys matching a glob, with their TTL.
    pub(crate) fn scan(&self, pattern: &str) -> Vec<KeyTtl> {
        self.enter().scan(pattern)
    }

    /// Slots the map has room for (to observe that memory is given back).
    #[cfg(test)]
    pub(crate) fn map_capacity(&self) -> usize {
        self.enter().items.capacity()
    }

    /// (bytes, entries) a class holds.
    #[cfg(test)]
    pub(crate) fn usage(&self, class: &str) -> (usize, usize) {
        let kv = self.enter();
        kv.class_ids
            .get(class)
            .map_or((0, 0), |&c| (kv.classes[c].bytes, kv.classes[c].entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &'static [u8]) -> Val {
        Val::Str(Bytes::from_static(v))
    }

    fn key(class: &str, id: impl std::fmt::Display) -> String {
        format!("t:a:{class}:v1:{{{id}}}")
    }

    fn budgets(bytes: usize, entries: usize) -> Budgets {
        Budgets::uniform(Budget { bytes, entries })
    }

    #[test]
    fn the_class_is_the_third_segment() {
        assert_eq!(class_of("prod:shop:carts:v1:{a:b}"), "carts");
        assert_eq!(class_of("prod:shop:_kw:gens"), INTERNAL_CLASS);
        assert_eq!(class_of("k1"), "");
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_rename_and_pttl_on_the_paused_clock() {
        let ks = Keyspace::new(budgets(1 << 20, 100));
        ks.with(|kv| {
            kv.set("a", s(b"1"), 1000);
            kv.set("b", s(b"2"), 5000);
            assert!(kv.rename("a", "c"));
            assert!(!kv.exists("a"));
            assert_eq!(kv.pttl("c"), 1000);
        })
        .unwrap();
        tokio::time::advance(Duration::from_millis(999)).await;
        ks.with(|kv| assert_eq!(kv.pttl("c"), 1)).unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        ks.with(|kv| assert!(!kv.exists("c"))).unwrap();
        tokio::time::advance(Duration::from_millis(4000)).await;
        ks.with(|kv| {
            assert!(!kv.exists("b"));
            assert_eq!(kv.pttl("b"), -2);
            assert!(!kv.pexpire("b", 10));
        })
        .unwrap();
        assert_eq!(ks.scan("*").len(), 0);
        assert_eq!(
            ks.usage(""),
            (0, 0),
            "expired keys are gone from the accounting"
        );
    }

    /// The case: 100k idempotency keys must never make a session write fail or evict a session.
    #[tokio::test(start_paused = true)]
    async fn a_flood_of_one_class_never_refuses_or_evicts_another() {
        let ks = Keyspace::new(
            crate::backend::MemoryOptions::default()
                .capacity(100_000)
                .budgets(&["idem", "sess"]),
        );
        let session = key("sess", "s:alice");
        ks.with(|kv| kv.hset(&session, &[("u", Bytes::from_static(b"alice"))], 60_000))
            .unwrap();
        let mut refused = 0;
        for i in 0..100_000 {
            match ks.with(|kv| kv.hset(&key("idem", i), &[("s", Bytes::from_static(b"p"))], 60_000))
            {
                Ok(()) => {}
                Err(Error::StoreFull { class, .. }) => {
                    assert_eq!(class, "idem");
                    refused += 1;
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!(refused > 0, "the idempotency class reached its own budget");
        ks.with(|kv| {
            assert!(kv.exists(&session), "the session was not evicted");
            kv.hset(
                &key("sess", "s:bob"),
                &[("u", Bytes::from_static(b"bob"))],
                60_000,
            );
            kv.set(&key("sess", "u:bob"), s(b"index"), 60_000);
        })
        .expect("a session write succeeds after the flood");
        assert_eq!(ks.usage("sess").1, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn cache_eviction_is_soonest_expiry_within_the_class_only() {
        let ks = Keyspace::new(budgets(1 << 20, 3));
        ks.with(|kv| kv.set(&key("sess", 1), s(b"x"), 1)).unwrap();
        ks.with_evicting(|kv| {
            let now = kv.now_us();
            assert!(kv.put_evictable(&key("other", 1), Bytes::from_static(b"o"), now + 1));
            for (i, secs) in [(1, 10), (2, 5), (3, 20), (4, 30)] {
                assert!(kv.put_evictable(
                    &key("c", i),
                    Bytes::from_static(b"v"),
                    now + secs * 1_000_000
                ));
            }
        });
        let mut keys: Vec<_> = ks.scan("*").into_iter().map(|k| k.key).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                key("c", 1),
                key("c", 3),
                key("c", 4),
                key("other", 1),
                key("sess", 1)
            ],
            "c:2 expired soonest and was evicted; the other classes' entries, expiring sooner still, stay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn byte_budgets_bound_values_and_growth_and_name_the_class() {
        let ks = Keyspace::new(budgets(1000, 100));
        // Evictable: a value larger than the whole budget is not stored (nor is the old one kept).
        ks.with_evicting(|kv| {
            let until = kv.now_us() + 1_000_000;
            assert!(kv.put_evictable("t:a:c:v1:{k}", Bytes::from_static(b"small"), until));
            assert!(!kv.put_evictable("t:a:c:v1:{k}", Bytes::from(vec![0; 2000]), until));
            assert!(!kv.exists("t:a:c:v1:{k}"));
        });
        // Never evicted: growing an existing hash past the budget is refused and undone whole.
        let (a, b) = (key("locks", "a"), key("locks", "b"));
        ks.with(|kv| kv.hset(&a, &[("v", Bytes::from_static(b"1"))], 60_000))
            .unwrap();
        let err = ks
            .with(|kv| {
                kv.set(&b, s(b"token"), 60_000);
                kv.hset(&a, &[("big", Bytes::from(vec![0; 900]))], 60_000);
            })
            .unwrap_err();
        assert!(
            matches!(&err, Error::StoreFull { class, budget_bytes: 1000, capacity: 100 } if class == "locks"),
            "{err:?}"
        );
        assert!(err.to_string().contains("class `locks`"), "{err}");
        ks.with(|kv| {
            assert!(!kv.exists(&b), "the whole section was undone");
            assert_eq!(kv.get_hash(&a).map(HashMap::len), Some(1));
        })
        .unwrap();
        // Shrinking is allowed even over budget, and deleting gives the room back.
        ks.with(|kv| kv.del(&a)).unwrap();
        assert_eq!(ks.usage("locks"), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn entry_budgets_refuse_new_keys_but_not_updates() {
        let ks = Keyspace::new(budgets(1 << 20, 2));
        ks.with(|kv| {
            kv.set("t:a:l:v1:{1}", s(b"1"), 60_000);
            kv.set("t:a:l:v1:{2}", s(b"2"), 60_000);
        })
        .unwrap();
        assert!(matches!(
            ks.with(|kv| kv.set("t:a:l:v1:{3}", s(b"3"), 60_000)),
            Err(Error::StoreFull { capacity: 2, .. })
        ));
        ks.with(|kv| kv.set("t:a:l:v1:{1}", s(b"one"), 60_000))
            .expect("replacing a key adds no entry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_has_no_ttl_ids_follow_the_clock_and_its_growth_is_budgeted() {
        use crate::backend::memory::stream::StreamId;
        let ks = Keyspace::new(budgets(4000, 100));
        let k = key("events", "events");
        let first = ks
            .with(|kv| {
                let now = kv.now_ms();
                let s = kv.stream_or_create(&k);
                let id = s.add(
                    now,
                    vec![(Bytes::from_static(b"m"), Bytes::from_static(b"a"))],
                );
                assert!(s.create_group("g", Some(StreamId::ZERO)));
                (now, id)
            })
            .unwrap();
        assert_eq!(first.1, StreamId::new(u64::try_from(first.0).unwrap(), 0));
        tokio::time::advance(Duration::from_millis(5)).await;
        ks.with(|kv| {
            assert_eq!(kv.pttl(&k), -1, "a stream has no TTL");
            let now = kv.now_ms();
            let s = kv.stream_mut(&k).unwrap();
            let id = s.add(now, vec![]);
            assert_eq!(id.ms, first.1.ms + 5);
            assert_eq!(s.group_names().collect::<Vec<_>>(), ["g"]);
            assert!(s.group("g").is_some() && s.entry(id).is_some());
        })
        .unwrap();
        assert_eq!(ks.scan("*")[0].ttl, None);
        tokio::time::advance(Duration::from_secs(365 * 86400)).await;
        ks.with(|kv| assert_eq!(kv.stream(&k).map(StreamVal::len), Some(2)))
            .unwrap();
        // Growing the stream past its class's budget is refused and undone whole.
        let used = ks.usage("events");
        let err = ks
            .with(|kv| {
                let now = kv.now_ms();
                kv.stream_mut(&k).unwrap().add(
                    now,
                    vec![(Bytes::from_static(b"m"), Bytes::from(vec![0; 5000]))],
                );
            })
            .unwrap_err();
        assert!(
            matches!(err, Error::StoreFull { ref class, .. } if class == "events"),
            "{err}"
        );
        assert_eq!(ks.usage("events"), used);
        ks.with(|kv| assert_eq!(kv.stream(&k).map(StreamVal::len), Some(2)))
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_given_back_after_a_flood_expires() {
        let ks = Keyspace::new(budgets(1 << 30, 1 << 20));
        for i in 0..20_000 {
            ks.with(|kv| kv.set(&key("idem", i), s(b"p"), 1000))
                .unwrap();
        }
        ks.with(|kv| kv.set(&key("sess", 1), s(b"x"), 60_000))
            .unwrap();
        let flooded = ks.map_capacity();
        assert!(flooded >= 20_000, "{flooded}");
        tokio::time::advance(Duration::from_secs(2)).await;
        let after = ks.map_capacity();
        assert!(after < flooded / 4, "capacity {flooded} -> {after}");
        assert_eq!(ks.usage("idem"), (0, 0));
        ks.with(|kv| assert!(kv.exists(&key("sess", 1)))).unwrap();
    }
}
